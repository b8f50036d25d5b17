"""Prompt lookup decoding: copy what followed the latest earlier occurrence of the context's last n-gram.

Training-free baseline (Saxena 2023, "Prompt Lookup Decoding", the method behind HF's ``prompt_lookup_num_tokens``).
Matches are searched for n = max_ngram down to min_ngram with one vectorised comparison over all windows; with
``num_candidates > 1`` the continuations of several recent matches are merged into a tree.

Where we differ: ``num_tokens="auto"`` copies as many tokens as maximise expected tokens per second, from the
target's measured forward costs and the acceptance rate by depth seen so far (in the spirit of Sequoia's
hardware-aware budget, arXiv 2402.12374). HF always copies ``prompt_lookup_num_tokens``; on a CPU where a forward
over 11 tokens costs 2.7x one (4-bit weights) and the first copied token is accepted a third of the time, that
loses to plain decoding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from specdec.budget import ForwardCosts
from specdec.drafters import register_drafter
from specdec.drafters.base import Drafter
from specdec.drafters.tree_budget import TreeBudget
from specdec.errors import InvalidInputError
from specdec.state import DecodeState, StepOutcome
from specdec.tree import DraftTree

AUTO_MAX_TOKENS = 10  # the longest continuation num_tokens="auto" considers (HF's default length)


@dataclass(frozen=True)
class PromptLookupConfig:
    num_tokens: "int | str" = 10  # continuation length copied per match (HF's prompt_lookup_num_tokens), or "auto":
    #                               the length (1 to 10) with the most expected tokens per second (module docstring)
    max_ngram: int = 3  # longest n-gram to match
    min_ngram: int = 1  # shortest n-gram to match
    num_candidates: int = 1  # distinct continuations merged into a tree (1 = chain)

    def __post_init__(self) -> None:
        auto = self.num_tokens == "auto"
        if (not auto and (not isinstance(self.num_tokens, int) or self.num_tokens < 1)) or self.num_candidates < 1 \
                or not 1 <= self.min_ngram <= self.max_ngram:
            raise InvalidInputError(f"invalid prompt-lookup options: {self} (num_tokens: a positive int or 'auto')")


class DepthAcceptance:
    """Running acceptance rate at each draft depth, given the previous depth was accepted: ``accepted / reached``
    counts, decayed so that about the last 50 steps count, from a prior of one accepted in two."""

    def __init__(self, depths: int, decay: float = 0.98):
        self.reached = torch.full((depths,), 2.0, dtype=torch.float64)
        self.accepted = torch.full((depths,), 1.0, dtype=torch.float64)
        self.decay = decay

    def update(self, drafted: int, accepted: int) -> None:
        """A chain of ``drafted`` tokens of which the first ``accepted`` were accepted."""
        self.reached.mul_(self.decay)
        self.accepted.mul_(self.decay)
        self.reached[:min(accepted + 1, drafted)] += 1.0
        self.accepted[:accepted] += 1.0

    def path_values(self) -> torch.Tensor:
        """[depths] probability that a chain is accepted up to each depth."""
        return torch.cumprod(self.accepted / self.reached, 0)


@register_drafter
class PromptLookupDrafter(Drafter):
    name = "prompt-lookup"

    def __init__(self, target: torch.nn.Module, config: PromptLookupConfig | None = None,
                 costs: "ForwardCosts | Mapping[int, float] | None" = None, **options):
        """``costs``: the target's forward costs for ``num_tokens="auto"`` (or ``{tokens: seconds}``); None
        measures them on first use (:func:`specdec.budget.forward_costs`)."""
        super().__init__(target)
        self.config = config or PromptLookupConfig(**options)
        self.auto = self.config.num_tokens == "auto"
        self.acceptance = DepthAcceptance(AUTO_MAX_TOKENS)
        self.budget_policy = TreeBudget(target, "auto" if self.auto else self.config.num_tokens,
                                        max_budget=AUTO_MAX_TOKENS, costs=costs)
        self.lengths: list[int] = []  # num_tokens="auto": the length chosen at each step with a match (this call)

    def begin(self, state: DecodeState) -> None:
        self.lengths = []  # the rates carry over between calls: the same target on the same machine

    def propose(self, state: DecodeState) -> DraftTree:
        seq = state.sequence[0]
        dev = seq.device
        length = min(AUTO_MAX_TOKENS if self.auto else self.config.num_tokens, state.remaining - 1)
        if length < 1:
            return DraftTree.empty(dev)
        paths = lookup_continuations(seq, self.config.max_ngram, self.config.min_ngram, length,
                                     self.config.num_candidates)[0]
        if paths and self.auto:
            keep = self.auto_length(max(len(p) for p in paths))
            paths = [p[:keep] for p in paths]
        return DraftTree.from_paths(paths, device=dev) if paths else DraftTree.empty(dev)

    def auto_length(self, available: int) -> int:
        """How many of ``available`` copied tokens to verify: the most expected tokens per second, at least one (a
        step that verifies none would teach the rates nothing)."""
        k = max(1, self.budget_policy.chain_length(self.acceptance.path_values()[:available]))
        self.lengths.append(k)
        return k

    def observe(self, state: DecodeState, outcome: StepOutcome) -> None:
        if self.auto and outcome.tree.size:
            self.acceptance.update(outcome.tree.max_depth, outcome.result.num_accepted)

    def describe(self) -> dict:
        if not self.auto or not self.lengths:
            return {}
        return {"auto_length_median": float(torch.tensor(self.lengths, dtype=torch.float64).median())}


def lookup_continuations(seq: torch.Tensor, max_ngram: int, min_ngram: int, length: int,
                         count: int = 1) -> tuple[list[list[int]], int]:
    """Up to ``count`` distinct continuations (latest match first, each at most ``length`` tokens) of the longest
    n-gram (``max_ngram`` down to ``min_ngram``) that ends ``seq`` [L] and also occurs earlier in it, and that n
    (0 and no paths when nothing matches). One vectorised comparison over all windows per n."""
    for n in range(max_ngram, min_ngram - 1, -1):
        if seq.numel() <= n:
            continue
        windows = seq[:-1].unfold(0, n, 1)  # [L-n, n] every n-gram that has a successor
        hits = torch.nonzero((windows == seq[-n:]).all(dim=1)).flatten()  # start of each match
        if hits.numel() == 0:
            continue
        starts = (hits + n).flip(0)[: 4 * count].tolist()  # latest first
        paths: list[list[int]] = []
        for s in starts:
            cont = seq[s: s + length].tolist()
            if cont and cont not in paths:
                paths.append(cont)
            if len(paths) == count:
                break
        return paths, n
    return [], 0
