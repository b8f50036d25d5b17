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

- ``specdec++``: SpecDec++ (Huang, Guo, Wang, arXiv 2405.19715): a trained head predicts, for each draft token
  fed to the draft model, the probability that the target accepts it; drafting stops once the predicted
  probability that at least one fed token is rejected exceeds a threshold h (the paper proves the optimal policy
  has this form). h is given, or "auto": derived here from measured costs, depth by depth (the paper tunes it):
  one more draft forward (t_d seconds, plus the verification's marginal cost dv_k of one more token) pays when the
  tokens it adds, P(fed tokens accepted) * a^2 (the newest drafted token and the next one must be accepted too; a
  = running per-token acceptance), beat the running throughput r (tokens per second of a step) times its cost:
  stop iff 1 - P > h_k = 1 - r (t_d + dv_k) / a^2.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from enum import Enum

from specdec.errors import InvalidInputError


class StopReason(str, Enum):
    MAX_DEPTH = "max_depth"  # the drafter's cap (or the tokens generate() still allows)
    LOW_CONFIDENCE = "low_confidence"  # the confidence policy's threshold
    SCHEDULE = "schedule"  # the length the heuristic schedule set
    PREDICTED_REJECTION = "predicted_rejection"  # SpecDec++: P(a fed token is rejected) above the threshold


@dataclass(frozen=True)
class DepthSignal:
    depth: int  # tokens drafted so far on the best path (>= 1)
    path_prob: float  # the drafter's probability of that path (product of its token probabilities)
    token_prob: float  # the drafter's probability of the path's newest token
    accept_prob: float | None = None  # SpecDec++: predicted P(every token fed to the draft model so far is accepted)
    draft_seconds: float = 0.0  # the drafter's running seconds per draft forward (0: unknown)


class DraftLengthPolicy(ABC):
    name: str = ""

    @abstractmethod
    def stop(self, signal: DepthSignal) -> StopReason | None:
        """After a depth is drafted: a reason to stop there, or None to draft the next depth (below the cap)."""

    def observe(self, drafted: int, accepted: int, draft_seconds: float = 0.0) -> None:
        """After verification: ``accepted`` of the ``drafted`` tokens on the verified path were accepted;
        ``draft_seconds``: the drafter's running seconds per draft forward (0: unknown)."""


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

    def observe(self, drafted: int, accepted: int, draft_seconds: float = 0.0) -> None:
        if drafted == 0:
            return
        self.length = self.length + 2 if accepted == drafted else max(1, self.length - 1)


class SpecDecPP(DraftLengthPolicy):
    """SpecDec++'s threshold policy on the acceptance head's predictions (module docstring)."""

    name = "specdec++"
    DECAY = 0.9  # running averages over about the last ten steps

    def __init__(self, threshold: "float | str" = "auto", costs=None):
        if threshold != "auto" and not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
            raise InvalidInputError(f"specdec++ policy: threshold must be in [0, 1] or 'auto', got {threshold!r}")
        self.threshold = threshold
        self.costs = costs  # specdec.budget.ForwardCosts of the target (threshold "auto"); set by the drafter
        self.tokens_per_step = 2.0  # running averages, with priors
        self.seconds_per_step = 0.0
        self.acceptance = 0.7
        self.thresholds: deque[float] = deque(maxlen=1024)  # the latest auto thresholds (for reports)

    def stop(self, signal: DepthSignal) -> StopReason | None:
        if signal.accept_prob is None:
            raise InvalidInputError("the specdec++ length policy needs a drafter with an acceptance head")
        h = self.threshold if self.threshold != "auto" else self.auto_threshold(signal.depth, signal.draft_seconds)
        return StopReason.PREDICTED_REJECTION if 1.0 - signal.accept_prob > h else None

    def auto_threshold(self, depth: int, draft_seconds: float) -> float:
        """h_k for ``depth`` drafted tokens (module docstring); 1 (never stop) while costs are unknown."""
        if self.costs is None or draft_seconds <= 0.0:
            return 1.0
        marginal = float(self.costs.seconds_for(depth + 2)) - float(self.costs.seconds_for(depth + 1))
        seconds = self.seconds_per_step or (float(self.costs.seconds_for(depth + 1)) + depth * draft_seconds)
        rate = self.tokens_per_step / seconds
        h = 1.0 - rate * (draft_seconds + max(marginal, 0.0)) / self.acceptance ** 2
        self.thresholds.append(h)
        return h

    def observe(self, drafted: int, accepted: int, draft_seconds: float = 0.0) -> None:
        if drafted == 0:
            return
        d = self.DECAY
        per_token = accepted / (accepted + (1 if accepted < drafted else 0))  # a rejection ends the path
        self.acceptance = d * self.acceptance + (1 - d) * max(per_token, 0.05)
        self.tokens_per_step = d * self.tokens_per_step + (1 - d) * (accepted + 1)
        if self.costs is not None and draft_seconds > 0.0:
            step = float(self.costs.seconds_for(drafted + 1)) + drafted * draft_seconds
            self.seconds_per_step = step if not self.seconds_per_step else d * self.seconds_per_step + (1 - d) * step


POLICIES = ("fixed", "confidence", "hf-heuristic", "specdec++")


def create_length_policy(name: str, threshold: "float | str" = 0.0, on: str = "path") -> DraftLengthPolicy:
    """A policy by name (``POLICIES``); ``threshold`` is the confidence policy's (with ``on``) or SpecDec++'s
    (a probability or "auto")."""
    if name == "fixed":
        return FixedLength()
    if name == "confidence":
        return ConfidenceThreshold(threshold, on)
    if name == "hf-heuristic":
        return HFHeuristicSchedule()
    if name == "specdec++":
        return SpecDecPP(threshold)
    raise InvalidInputError(f"unknown draft-length policy {name!r}; choose one of {', '.join(POLICIES)}")
