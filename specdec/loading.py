"""Loading the models a command names: the target, its draft model and the tokenizer, from a preset's settings
(``specdec bench``, ``generate``, ``train``, ``train-acceptance``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from specdec import models
from specdec.errors import InvalidInputError
from specdec.memory import limit_heap_retention


def load_models(cfg: dict):
    dtype = None if cfg["dtype"] == "auto" else getattr(torch, cfg["dtype"])  # None: native bf16, else fp32
    weights = cfg.get("weights", "auto")
    placement = {"device_map": device_map_of(cfg.get("device_map")), "offload_folder": cfg.get("offload_folder")}
    target, tokenizer = _load(models, cfg["target"], dtype, weights=weights, **placement)
    cfg["dtype"] = str(target.dtype).removeprefix("torch.")  # what "auto" chose, for the report
    draft = None
    if cfg.get("draft"):  # it shares the target's tokenizer
        draft, _ = _load(models, cfg["draft"], target.dtype, tokenizer=False, weights=weights,
                         device=cfg.get("draft_device"))
    return target, draft, tokenizer


def device_map_of(value):
    """A --device-map / preset value: None, "auto", or a dict (given as one or as a JSON object string)."""
    if value is None or isinstance(value, dict) or value == "auto":
        return value
    try:
        parsed = json.loads(value)
    except (TypeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"--device-map must be 'auto' or a JSON object such as "
                                f"'{{\"model.layers.20\": \"disk\"}}', got {value!r}") from exc
    if not isinstance(parsed, dict):
        raise InvalidInputError(f"--device-map must be 'auto' or a JSON object, got {value!r}")
    return parsed


def _load(models, name: str, dtype, tokenizer: bool = True, weights: str = "auto", **placement):
    limit_heap_retention()  # freed loading temporaries and activations go back to the OS (peak RSS)
    if Path(name).is_dir():  # read, not memory-mapped (peak RSS)
        return models.load_folder(name, dtype=dtype, tokenizer=tokenizer, weights=weights, **placement)
    return models.load(name, dtype=dtype, tokenizer=tokenizer, weights=weights, **placement)


def gguf_of(target: str):
    """The GGUF file of a registered target (what the llama-cpp baselines run); None for a local folder."""
    return None if Path(target).is_dir() else models.gguf_path(target)
