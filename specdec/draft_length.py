"""Draft-length policies: the one place that decides, depth by depth, whether a sequential drafter drafts on.

A drafter that drafts one depth at a time (``draft-model``'s chain and tree levels, ``swift``'s and ``del``'s
layer-skipped chains) asks its policy after each depth, with what it knows then (a :class:`DepthSignal`), whether
to stop and why; the reason travels with the draft (``DraftTree.stop_reason``) into ``stats.stop_reasons``. After
verification the policy sees how much of the draft was accepted (HF's heuristic schedule learns from it).

Policies (``create_length_policy``):

- ``fixed``: draft to the drafter's depth cap.
- ``confidence``: stop once the drafter's probability falls below ``threshold``: of its best path so far
  (``on="path"``: ``draft-model``'s ``min_prob``) or of its newest token (``on="token"``: SWIFT's and DEL's
  ``stop_threshold``, where that token is still kept).
- ``hf-heuristic``: HF assisted generation's ``num_assistant_tokens_schedule="heuristic"``: draft ``length``
  tokens, +2 after a step that accepted them all, -1 (not below 1) otherwise; starts at HF's default 20.

SpecDec++'s acceptance-prediction head (arXiv 2405.19715) is the policy still to come.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum

from specdec.errors import InvalidInputError


class StopReason(str, Enum):
    MAX_DEPTH = "max_depth"  # the drafter's cap (or the tokens generate() still allows)
    LOW_CONFIDENCE = "low_confidence"  # the confidence policy's threshold
    SCHEDULE = "schedule"  # the length the heuristic schedule set


@dataclass(frozen=True)
class DepthSignal:
    depth: int  # tokens drafted so far on the best path (>= 1)
    path_prob: float  # the drafter's probability of that path (product of its token probabilities)
    token_prob: float  # the drafter's probability of the path's newest token


class DraftLengthPolicy(ABC):
    name: str = ""

    @abstractmethod
    def stop(self, signal: DepthSignal) -> StopReason | None:
        """After a depth is drafted: a reason to stop there, or None to draft the next depth (below the cap)."""

    def observe(self, drafted: int, accepted: int) -> None:
        """After verification: ``accepted`` of the ``drafted`` tokens on the verified path were accepted."""


class FixedLength(DraftLengthPolicy):
    name = "fixed"

    def stop(self, signal: DepthSignal) -> StopReason | None:
        return None


class ConfidenceThreshold(DraftLengthPolicy):
    name = "confidence"

    def __init__(self, threshold: float, on: str = "path"):
        if not 0.0 <= threshold <= 1.0 or on not in ("path", "token"):
            raise InvalidInputError(f"confidence policy: threshold in [0, 1] and on='path' or 'token', got "
                                    f"{threshold}, {on!r}")
        self.threshold, self.on = threshold, on

    def stop(self, signal: DepthSignal) -> StopReason | None:
        prob = signal.path_prob if self.on == "path" else signal.token_prob
        return StopReason.LOW_CONFIDENCE if prob < self.threshold else None


class HFHeuristicSchedule(DraftLengthPolicy):
    """HF's ``num_assistant_tokens`` heuristic (``transformers`` ``AssistedCandidateGenerator``)."""

    name = "hf-heuristic"

    def __init__(self, initial: int = 20):
        if initial < 1:
            raise InvalidInputError(f"hf-heuristic policy: initial length must be >= 1, got {initial}")
        self.length = initial

    def stop(self, signal: DepthSignal) -> StopReason | None:
        return StopReason.SCHEDULE if signal.depth >= self.length else None

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self.length = self.length + 2 if accepted == drafted else max(1, self.length - 1)


POLICIES = ("fixed", "confidence", "hf-heuristic")


def create_length_policy(name: str, threshold: float = 0.0, on: str = "path") -> DraftLengthPolicy:
    """A policy by name (``POLICIES``); ``threshold`` and ``on`` are the confidence policy's."""
    if name == "fixed":
        return FixedLength()
    if name == "confidence":
        return ConfidenceThreshold(threshold, on)
    if name == "hf-heuristic":
        return HFHeuristicSchedule()
    raise InvalidInputError(f"unknown draft-length policy {name!r}; choose one of {', '.join(POLICIES)}")
