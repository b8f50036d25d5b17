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
    exact = True  # same numerics as plain greedy: a different output is examined as a near-tie or an error

    @abstractmethod
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id, seed: int = 0) -> RunRecord:
        """One generation; ``seed`` fixes the random numbers when the method samples."""

    @staticmethod
    def _timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0


@dataclass(frozen=True)
class Sampling:
    """How every method of a benchmark decodes: greedy, or sampling with the same warpers for all."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None  # None/0: off (passed to HF as 0, so its generation-config default of 50 is not used)
    top_p: float | None = None  # None: off

    def hf_kwargs(self) -> dict:
        if not self.do_sample:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k or 0,
                "top_p": 1.0 if self.top_p is None else self.top_p}

    def engine_kwargs(self) -> dict:
        if not self.do_sample:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k or None, "top_p": self.top_p}


@dataclass
class HFGenerate(Method):
    """``target.generate``, optionally with an assistant model or prompt lookup (HF's own speculation).

    HF draws from the global RNG, so a sampling run seeds it with ``seed`` first (the benchmark is an application;
    the library itself never touches the global RNG).
    """

    name: str
    target: torch.nn.Module
    options: dict = field(default_factory=dict)
    sampling: Sampling = Sampling()
    kind: str = "baseline"

    def generate(self, input_ids, max_new_tokens, eos_token_id, seed: int = 0) -> RunRecord:
        mask = torch.ones_like(input_ids)
        if self.sampling.do_sample:
            torch.manual_seed(seed)
        out, seconds = self._timed(lambda: self.target.generate(
            input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
            pad_token_id=_first(eos_token_id), **self.sampling.hf_kwargs(), **self.options))
        return RunRecord(out[0, input_ids.shape[1]:], seconds)


@dataclass
class SpecDecMethod(Method):
    name: str
    engine: SpecEngine
    sampling: Sampling = Sampling()
    kind: str = "specdec"

    def generate(self, input_ids, max_new_tokens, eos_token_id, seed: int = 0) -> RunRecord:
        generator = None
        if self.sampling.do_sample:
            generator = torch.Generator(device=self.engine.runner.device).manual_seed(seed)
        result, seconds = self._timed(lambda: self.engine.generate(
            input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, generator=generator,
            **self.sampling.engine_kwargs()))
        return RunRecord(result.sequences[0, input_ids.shape[1]:], seconds, result.stats.as_dict())


def sampling_of(cfg: dict) -> Sampling:
    """The benchmark's decoding mode from preset/flag settings."""
    return Sampling(bool(cfg.get("do_sample")), float(cfg.get("temperature") or 1.0), cfg.get("top_k"),
                    cfg.get("top_p"))


BASELINES = ("plain", "hf-assisted", "hf-prompt-lookup", "llama-cpp", "llama-cpp-prompt-lookup")


def build_method(spec: dict, target, draft=None, sampling: Sampling = Sampling(), gguf: str | None = None,
                 threads: int | None = None) -> Method:
    """One method from a preset entry: ``{name, drafter | baseline, options, verifier, overlap}``; the llama-cpp
    baselines run ``gguf`` (the GGUF file the target was converted from) on ``threads`` threads."""
    name = spec["name"]
    options = dict(spec.get("options") or {})
    baseline = spec.get("baseline")
    if baseline == "plain":
        return HFGenerate(name, target, sampling=sampling)
    if baseline == "hf-assisted":
        if draft is None:
            raise InvalidInputError("the hf-assisted baseline needs a draft model (preset key 'draft')")
        return HFGenerate(name, target, {"assistant_model": draft, **options}, sampling)
    if baseline == "hf-prompt-lookup":
        return HFGenerate(name, target, {"prompt_lookup_num_tokens": options.get("num_tokens", 10)}, sampling)
    if baseline in ("llama-cpp", "llama-cpp-prompt-lookup"):
        from specdec.benchmarks.llama_cpp import LlamaCppGenerate  # cycle: llama_cpp imports methods

        if gguf is None:
            raise InvalidInputError(f"the {baseline} baseline needs the target's GGUF file: name a registered model "
                                    "as target (specdec models), not a folder")
        lookup = options.get("num_tokens", 10) if baseline == "llama-cpp-prompt-lookup" else 0
        return LlamaCppGenerate(name, str(gguf), threads or torch.get_num_threads(), sampling, lookup)
    if baseline is not None:
        raise UnknownNameError(f"unknown baseline {baseline!r}; valid: {', '.join(BASELINES)}")
    drafter_name = spec.get("drafter", name)
    if spec.get("uses_draft_model", drafter_name == "draft-model"):
        if draft is None:
            raise InvalidInputError(f"method {name!r} needs a draft model (preset key 'draft')")
        options["model"] = draft
    drafter = create_drafter(drafter_name, target=target, **options)
    verifier = spec.get("verifier") or ("rejection" if sampling.do_sample else "greedy")
    return SpecDecMethod(name, SpecEngine(target, drafter, verifier, overlap=bool(spec.get("overlap"))), sampling)


def _first(eos):
    if eos is None:
        return None
    return eos if isinstance(eos, int) else list(eos)[0]
