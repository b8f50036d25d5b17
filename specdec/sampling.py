"""Generation arguments that shape the target's next-token choice, validated once at the public entry point."""

from __future__ import annotations

from dataclasses import dataclass

from specdec.errors import InvalidInputError


@dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False  # False: greedy decoding (argmax), the exactness reference
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise InvalidInputError(f"temperature must be > 0 when do_sample=True, got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise InvalidInputError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise InvalidInputError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise InvalidInputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample
