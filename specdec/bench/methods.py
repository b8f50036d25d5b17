"""The decoders a benchmark compares: plain HF generate, HF assisted generation, HF prompt lookup, SpecEngine."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from specdec.drafters import create_drafter
from specdec.engine import SpecEngine
from specdec.errors import InvalidInputError, UnknownNameError


@dataclass
class RunRecord:
    new_tokens: torch.Tensor  # LongTensor [k] generated tokens
    seconds: float  # wall time of the whole generate call (prefill included)
    stats: dict | None = None  # DecodingStats.as_dict() for SpecEngine runs


class Method(ABC):
    name: str
    kind: str  # "baseline" or "specdec"

    @abstractmethod
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id) -> RunRecord: ...

    @staticmethod
    def _timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0


@dataclass
class HFGenerate(Method):
    """``target.generate`` greedy, optionally with an assistant model or prompt lookup (HF's own speculation)."""

    name: str
    target: torch.nn.Module
    options: dict = field(default_factory=dict)
    kind: str = "baseline"

    def generate(self, input_ids, max_new_tokens, eos_token_id) -> RunRecord:
        mask = torch.ones_like(input_ids)
        out, seconds = self._timed(lambda: self.target.generate(
            input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos_token_id, pad_token_id=_first(eos_token_id), **self.options))
        return RunRecord(out[0, input_ids.shape[1]:], seconds)


@dataclass
class SpecDecMethod(Method):
    name: str
    engine: SpecEngine
    kind: str = "specdec"

    def generate(self, input_ids, max_new_tokens, eos_token_id) -> RunRecord:
        result, seconds = self._timed(lambda: self.engine.generate(
            input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id))
        return RunRecord(result.sequences[0, input_ids.shape[1]:], seconds, result.stats.as_dict())


def build_method(spec: dict, target, draft=None) -> Method:
    """One method from a preset entry: ``{name, drafter | baseline, options, verifier}``."""
    name = spec["name"]
    options = dict(spec.get("options") or {})
    baseline = spec.get("baseline")
    if baseline == "plain":
        return HFGenerate(name, target)
    if baseline == "hf-assisted":
        if draft is None:
            raise InvalidInputError("the hf-assisted baseline needs a draft model (preset key 'draft')")
        return HFGenerate(name, target, {"assistant_model": draft, **options})
    if baseline == "hf-prompt-lookup":
        return HFGenerate(name, target, {"prompt_lookup_num_tokens": options.get("num_tokens", 10)})
    if baseline is not None:
        raise UnknownNameError(f"unknown baseline {baseline!r}; valid: plain, hf-assisted, hf-prompt-lookup")
    drafter_name = spec.get("drafter", name)
    if spec.get("uses_draft_model", drafter_name == "draft-model"):
        if draft is None:
            raise InvalidInputError(f"method {name!r} needs a draft model (preset key 'draft')")
        options["model"] = draft
    drafter = create_drafter(drafter_name, target=target, **options)
    return SpecDecMethod(name, SpecEngine(target, drafter, spec.get("verifier", "greedy")))


def _first(eos):
    if eos is None:
        return None
    return eos if isinstance(eos, int) else list(eos)[0]
