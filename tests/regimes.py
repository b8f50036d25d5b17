"""Test-side drafters whose proposals are forced right or wrong against the target's known greedy continuation.

``RegimeDrafter`` wraps a real drafter: the inner drafter runs its own begin/propose/observe (so its state handling
is exercised), then the wrapper rewrites the *tokens* of the proposed tree (never its shape) so that node at depth d
below the root at reference index ``pos`` is right (``ref[pos + d]``) or wrong (``(ref[pos + d] + 1) % VOCAB``):

    natural           proposal unchanged
    all_right         every node right
    all_wrong         every node wrong
    wrong_at_depth_2  right at depth 1, wrong at depth 2, right deeper
"""

from __future__ import annotations

import torch

from specdec.drafters.base import Drafter
from specdec.state import DecodeState, StepOutcome
from specdec.tree import DraftTree
from specdec.verifiers.base import VerificationResult
from tiny_models import VOCAB

REGIMES = ("natural", "all_right", "all_wrong", "wrong_at_depth_2")
EMPTY_SUBSTITUTE_LENGTH = 3  # an empty inner proposal becomes a chain of this many nodes (not in "natural")


class RegimeDrafter(Drafter):
    """Wraps ``inner``; ``reference`` [R] is prompt + the target's greedy continuation, longer than any draft reach."""

    def __init__(self, inner: Drafter, regime: str, reference: torch.Tensor):
        assert regime in REGIMES, regime
        self.inner = inner
        self.regime = regime
        self.reference = reference.reshape(-1)
        self.name = inner.name
        self.target_model = inner.target_model
        self._substituted = False

    @property
    def forward_count(self) -> int:
        return self.inner.forward_count

    @property
    def needs_target_hidden_states(self) -> bool:
        return self.inner.needs_target_hidden_states

    def begin(self, state: DecodeState) -> None:
        self.inner.begin(state)

    def propose(self, state: DecodeState) -> DraftTree:
        pos = state.sequence.shape[1] - 1  # reference index of the root
        verified = pos + 1 - state.assumed  # overlap mode drafts ahead on assumed tokens (the engine's guess)
        assert torch.equal(state.sequence[0, :verified].cpu(), self.reference[:verified]), \
            f"the engine's sequence left the greedy reference before position {verified}"
        tree = self.inner.propose(state)
        substituted = tree.size == 0 and self.regime != "natural"
        inner = tree
        if substituted:
            tree = DraftTree.chain(torch.zeros(EMPTY_SUBSTITUTE_LENGTH, dtype=torch.long, device=tree.tokens.device))
        memo = (inner, substituted)  # observe hands the inner drafter its own proposal back
        off_reference = not torch.equal(state.sequence[0].cpu(), self.reference[: pos + 1])
        if self.regime == "natural" or off_reference:  # a guess that left the reference is dropped unverified
            return tree.with_memo(memo)
        idx = pos + tree.depths.cpu()
        assert int(idx.max()) < self.reference.numel(), "extend the reference: the draft reaches past it"
        right = self.reference[idx]
        wrong = (right + 1) % VOCAB
        if self.regime == "all_right":
            tokens = right
        elif self.regime == "all_wrong":
            tokens = wrong
        else:
            tokens = torch.where(tree.depths.cpu() == 2, wrong, right)
        return DraftTree(tokens.to(tree.tokens.device), tree.parents, tree.draft_probs, tree.proposal, memo=memo)

    def observe(self, state: DecodeState, outcome: StepOutcome) -> None:
        inner, substituted = outcome.tree.memo
        if substituted:  # the inner drafter proposed nothing: tell it so, with the same emitted tokens
            empty = inner
            result = VerificationResult(empty.tokens, outcome.result.tokens, outcome.result.bonus)
            outcome = StepOutcome(empty, result, outcome.target_logits, outcome.emitted)
        else:  # the inner proposal with its memo; tokens as verified (the regime may have rewritten them)
            tree = DraftTree(outcome.tree.tokens, inner.parents, inner.draft_probs, inner.proposal,
                             inner.stop_reason, inner.memo)
            outcome = StepOutcome(tree, outcome.result, outcome.target_logits, outcome.emitted,
                                  outcome.hidden_states, outcome.scored)
        self.inner.observe(state, outcome)

    def discard(self, proposal: DraftTree) -> None:
        self.inner.discard(proposal.memo[0])


class OracleChainDrafter(Drafter):
    """Always proposes the next ``depth`` reference tokens, ignoring how many tokens generate() still allows."""

    name = "oracle-chain"

    def __init__(self, target: torch.nn.Module, reference: torch.Tensor, depth: int):
        super().__init__(target)
        self.reference = reference.reshape(-1)
        self.depth = depth

    def propose(self, state: DecodeState) -> DraftTree:
        pos = state.sequence.shape[1] - 1
        tokens = self.reference[pos + 1: pos + 1 + self.depth]
        assert tokens.numel() == self.depth, "extend the reference: the draft reaches past it"
        return DraftTree.chain(tokens.to(state.sequence.device))
