"""Per-generate() decoding statistics: tau, accepted lengths, forwards, time split (draft, verify, and the
per-step overhead outside model forwards)."""

from __future__ import annotations

from dataclasses import dataclass, field


def acceptance_by_depth(accepted_lengths: list[int], draft_depths: list[int]) -> list[float]:
    """For depth d = 1, 2, ...: P(the draft token at depth d is accepted | depth d was drafted and reached).

    ``accepted_lengths`` are tokens per step (accepted + 1), ``draft_depths`` the depth of each step's tree.
    """
    rates = []
    for d in range(1, max(draft_depths, default=0) + 1):
        pairs = [(a, depth) for a, depth in zip(accepted_lengths, draft_depths) if depth >= d and a >= d]
        ok = sum(1 for a, _ in pairs if a >= d + 1)
        rates.append(ok / len(pairs) if pairs else float("nan"))
    return rates


@dataclass
class DecodingStats:
    accepted_lengths: list[int] = field(default_factory=list)  # tokens per verification step (accepted + 1)
    draft_depths: list[int] = field(default_factory=list)  # depth of the verified tree per step
    tree_sizes: list[int] = field(default_factory=list)  # draft nodes verified per step
    tree_budgets: list[int] = field(default_factory=list)  # node budget the drafter chose per step (if it sizes trees)
    stop_reasons: dict[str, int] = field(default_factory=dict)  # why sequential drafters stopped: reason -> steps
    target_forwards: int = 0  # verification forwards (prefill excluded)
    draft_forwards: int = 0  # drafter model forwards (0 for model-free drafters)
    prefill_time: float = 0.0  # seconds
    draft_time: float = 0.0
    verify_time: float = 0.0
    transfer_time: float = 0.0  # seconds moving drafts, tokens and hidden states between the drafter's and the
    #                             target's devices (inside draft_time / verify_time)
    overlapped: bool = False  # SpecEngine(overlap=True): drafting ran beside the target's forward (specdec.overlap)
    draft_wait_time: float = 0.0  # overlap: seconds the target waited for the drafter after its forward
    lookahead: dict[str, int] = field(default_factory=lambda: {"accepted": 0, "missed": 0, "none": 0})  # overlap:
    #   rounds that accepted a token drafted ahead / did not (a rejection before the guessed path's end, or another
    #   path) / had nothing drafted ahead
    step_time: float = 0.0  # seconds of the decoding steps (draft + verify + observe; sequential mode only)
    target_forward_time: float = 0.0  # of which inside the target model's forwards
    draft_forward_time: float = 0.0  # of which inside the draft model's forwards (drafters with a model runner)
    new_tokens: int = 0
    lossless: bool = True  # False when an opt-in lossy verifier (typical acceptance) was used
    verifier: str = "greedy"
    drafter: str = ""
    drafter_info: dict = field(default_factory=dict)  # Drafter.describe() after the call (layer set, exit, ...)

    @property
    def mean_accepted_length(self) -> float:
        """tau: tokens produced per target forward during decoding (Spec-Bench's mean accepted tokens)."""
        return sum(self.accepted_lengths) / len(self.accepted_lengths) if self.accepted_lengths else 0.0

    @property
    def total_time(self) -> float:
        """Seconds of the whole call: with overlap, drafting ran beside verification and only the wait counts."""
        if self.overlapped:
            return self.prefill_time + self.verify_time + self.draft_wait_time
        return self.prefill_time + self.draft_time + self.verify_time

    @property
    def overhead_time(self) -> float:
        """Seconds of the steps spent outside any model forward: drafting logic, masks, verification, cache
        commits, Python (0 in overlap mode, whose rounds are not split this way)."""
        return max(0.0, self.step_time - self.target_forward_time - self.draft_forward_time)

    @property
    def overhead_fraction(self) -> float:
        """:attr:`overhead_time` as a share of the steps' time."""
        return self.overhead_time / self.step_time if self.step_time > 0 else 0.0

    def record_step_time(self, seconds: float, target_forward: float, draft_forward: float) -> None:
        """One decoding step's wall time and the parts of it inside the target's and the draft's forwards."""
        self.step_time += seconds
        self.target_forward_time += target_forward
        self.draft_forward_time += draft_forward

    def record_step(self, tokens: int, tree_depth: int, tree_size: int) -> None:
        """One verification forward that produced ``tokens`` (accepted + 1) over a tree of that depth and size."""
        self.target_forwards += 1
        self.accepted_lengths.append(tokens)
        self.draft_depths.append(tree_depth)
        self.tree_sizes.append(tree_size)

    def record_proposal(self, budget: "int | None", stop_reason: "str | None") -> None:
        """What a proposal reported about itself: the node budget its drafter chose and why it stopped drafting."""
        if budget is not None:  # drafters that size trees to the hardware
            self.tree_budgets.append(int(budget))
        if stop_reason is not None:  # sequential drafters (specdec.draft_length)
            reason = str(getattr(stop_reason, "value", stop_reason))
            self.stop_reasons[reason] = self.stop_reasons.get(reason, 0) + 1

    def acceptance_rate_by_depth(self) -> list[float]:
        return acceptance_by_depth(self.accepted_lengths, self.draft_depths)

    def as_dict(self) -> dict:
        return {
            "tau": self.mean_accepted_length,
            "accepted_lengths": list(self.accepted_lengths),
            "draft_depths": list(self.draft_depths),
            "tree_sizes": list(self.tree_sizes),
            "tree_budgets": list(self.tree_budgets),
            "stop_reasons": dict(self.stop_reasons),
            "target_forwards": self.target_forwards,
            "draft_forwards": self.draft_forwards,
            "prefill_time": self.prefill_time,
            "draft_time": self.draft_time,
            "verify_time": self.verify_time,
            "transfer_time": self.transfer_time,
            "overlapped": self.overlapped,
            "draft_wait_time": self.draft_wait_time,
            "lookahead": dict(self.lookahead),
            "step_time": self.step_time,
            "target_forward_time": self.target_forward_time,
            "draft_forward_time": self.draft_forward_time,
            "overhead_time": self.overhead_time,
            "overhead_fraction": self.overhead_fraction,
            "new_tokens": self.new_tokens,
            "acceptance_rate_by_depth": self.acceptance_rate_by_depth(),
            "lossless": self.lossless,
            "verifier": self.verifier,
            "drafter": self.drafter,
            "drafter_info": dict(self.drafter_info),
        }
