"""One verification step, shared by the serial loop (:mod:`specdec.engine`) and the overlap rounds
(:mod:`specdec.overlap`): put a proposal on the target's device, fit it to the tokens still allowed, then
penalty -> verify -> commit -> stats in :func:`verify_and_commit`, and emit the tokens through the stopping rules.

The verified tree may end in nodes the target's forward did not score: overlap mode grafts the proposal drafted
ahead below its guess (PEARL's post-verify, arXiv 2408.11850). Their rows are placeholders; when the verifier
accepts one, it is the step's last token (no bonus is drawn from a placeholder row) and it is not committed to the
target's cache (the target has not read it). In the serial loop every node is scored and this never happens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from specdec.runner import CausalLMRunner
from specdec.sampling import apply_repetition_penalty, tree_seen_mask
from specdec.state import DecodeState, VerificationResult
from specdec.stats import DecodingStats
from specdec.stopping import StoppingRules
from specdec.tree import DraftTree
from specdec.verifiers.base import Verifier


@dataclass(frozen=True)
class Verified:
    """What one verification decided."""

    result: VerificationResult  # the verifier's, over the whole verified tree (grafted nodes included)
    accepted: torch.Tensor  # LongTensor [a]: accepted nodes the forward scored (committed to the target's cache)
    tokens: torch.Tensor  # LongTensor [t]: the step's tokens, before the stopping rules cut them
    kept_slots: torch.Tensor  # LongTensor [a + 1]: slots [root, accepted...] of the forward kept in the cache
    lookahead: bool  # the last accepted node was grafted (drafted ahead): it ends the step, no bonus token


def step_tokens(tree: DraftTree, result: VerificationResult, lookahead: bool) -> torch.Tensor:
    """The step's tokens: the accepted path, then the bonus or recovered token, except after an accepted grafted
    node (its row is a placeholder: a lookahead hit emits no bonus)."""
    return tree.tokens[result.accepted_nodes] if lookahead else result.tokens


def verify_and_commit(runner: CausalLMRunner, verifier: Verifier, state: DecodeState, tree: DraftTree,
                      logits: torch.Tensor, prefix_len: int, stats: DecodingStats, proposal: DraftTree,
                      tokens_rule: Callable[[DraftTree, VerificationResult, bool], torch.Tensor] = step_tokens
                      ) -> Verified:
    """Verify ``tree`` with the target's rows ``logits`` [s, V] over [root, its first s - 1 nodes] (the rest are
    grafted, unscored), keep the accepted path in the target's cache (``runner``, ``prefix_len`` tokens before the
    root) and record the step and ``proposal`` (what the drafter returned) in ``stats``. ``tokens_rule``: what the
    step emits (:func:`step_tokens`; a test swaps in a wrong rule to show the distribution test catches it)."""
    scored = logits.shape[0] - 1
    grafted = tree.size - scored
    assert grafted >= 0, "more rows than tree nodes"
    if grafted:  # placeholder rows for the grafted nodes
        logits = torch.cat([logits, logits.new_zeros(grafted, logits.shape[-1])])
    if state.sampling.penalizes_repetition:  # each slot penalises the sequence and its own draft path
        seen = tree_seen_mask(state.sequence[0], tree, logits.shape[-1])
        logits = apply_repetition_penalty(logits, seen, state.sampling.repetition_penalty)
    result = verifier.verify(tree, logits, state.sampling, state.generator)
    accepted = result.accepted_nodes
    lookahead = bool(grafted) and bool(accepted.numel()) and int(accepted[-1]) >= scored
    tokens = tokens_rule(tree, result, lookahead)
    if lookahead:  # the grafted node was not in the forward: the cache keeps the path above it
        accepted = accepted[:-1]
    kept_slots = torch.cat([accepted.new_zeros(1), accepted + 1])
    runner.commit(prefix_len, kept_slots)
    stats.record_step(int(tokens.numel()), tree.max_depth, tree.size)
    stats.record_proposal(proposal.budget, proposal.stop_reason)
    return Verified(result, accepted, tokens, kept_slots, lookahead)


def on_device(tree: DraftTree, device: torch.device, stats: DecodingStats) -> DraftTree:
    """A proposal on the target's ``device``; a real move's time goes to ``stats.transfer_time``."""
    if tree.tokens.device == device:
        return tree
    t0 = time.perf_counter()
    moved = tree.to(device)
    stats.transfer_time += time.perf_counter() - t0
    return moved


def fit(tree: DraftTree, remaining: int) -> tuple[DraftTree, torch.Tensor | None]:
    """Drop nodes deeper than the tokens still allowed (a step emits accepted + 1); returns the tree and, when it
    was cut, each node's index in ``tree``."""
    if tree.size == 0 or tree.max_depth <= remaining - 1:
        return tree, None
    return tree.prune(tree.depths <= remaining - 1)


def emit(state: DecodeState, stops: StoppingRules, tokens: torch.Tensor, streamer) -> bool:
    """Append ``tokens`` as the stopping rules cut them (and stream them); True when generation is done."""
    emitted, done = stops.cut(state.sequence[0], state.prompt_len, tokens.to(state.sequence.device))
    state.sequence = torch.cat([state.sequence, emitted[None]], dim=1)
    if streamer is not None and emitted.numel():
        streamer.put(emitted.cpu())
    return done
