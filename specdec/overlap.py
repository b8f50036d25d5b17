"""Overlapped drafting: the drafter drafts the next proposal while the target verifies the current one.

PEARL (Liu et al., ICLR 2025, arXiv 2408.11850) runs draft and target concurrently. Each *round* here:

1. the target runs one forward over the root and the *pending* tree (what the drafter proposed last round below
   the token then accepted; empty after a rejection);
2. meanwhile, in a worker with its own threads (or device), the drafter proposes a tree below the sequence extended
   by the pending tree's *main path* (its first-child path, the drafter's own best guess): it drafts ahead on the
   outcome that the whole guess is accepted (``state.assumed`` says how many tokens are guessed);
3. the children of that new proposal's root are grafted below the main path's leaf and the verifier checks the
   grafted tree with the rows of step 1. If it accepts a grafted token, that token is emitted instead of a bonus
   and the rest of its subtree is the next round's pending tree (PEARL's post-verify); otherwise the step ends as
   usual (accepted tokens, then a bonus or recovered token), the proposal drafted ahead is discarded and the next
   round verifies only the root while the drafter drafts below the true sequence (PEARL's pre-verify).

Lossless: every grafted token was drafted from the drafter's distribution below exactly the path it hangs under,
and is checked by the same verifier with the target's row of its parent; a bonus drawn from the placeholder row of
a grafted node is never emitted. With a chain drafter this is PEARL's pre-/post-verify schedule. Where we differ:
PEARL runs two processes exchanging probabilities every round, with a draft window tuned to the cost ratio; here
one process runs the drafter in a thread (torch ops release the GIL) with its own thread count, and the drafter's
own length policy decides the window. Trees work too (the main path is the guess).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from specdec.drafters.base import Drafter
from specdec.errors import InvalidInputError
from specdec.runner import CausalLMRunner
from specdec.state import DecodeState, StepOutcome, VerificationResult
from specdec.stats import DecodingStats
from specdec.step import emit, fit, on_device, step_tokens, verify_and_commit
from specdec.tree import DraftTree
from specdec.verifiers.base import Verifier


def check_can_overlap(drafter: Drafter) -> None:
    """Refuse drafters that cannot draft beside the target's forward, naming why and the fix."""
    if drafter.needs_target_hidden_states:
        raise InvalidInputError(f"overlap=True: the {drafter.name!r} drafter drafts from the target's hidden states "
                                f"of the step before, so it cannot draft while the target verifies; use overlap=False")
    if not drafter.can_draft_ahead:
        raise InvalidInputError(f"overlap=True: the {drafter.name!r} drafter drafts on the target's own KV cache, "
                                f"which the target's forward is extending; use overlap=False")


def split_threads(threads: "tuple[int, int] | None", draft_on_cpu: bool) -> tuple[int, int]:
    """(target threads, draft threads): the given pair, or this process's torch threads split between the two
    (the target keeps them all when the drafter runs on an accelerator)."""
    if threads is not None:
        if len(threads) != 2 or any(not isinstance(t, int) or t < 1 for t in threads):
            raise InvalidInputError(f"threads must be (target_threads, draft_threads), each an int >= 1; got "
                                    f"{threads!r}")
        return int(threads[0]), int(threads[1])
    total = torch.get_num_threads()
    if not draft_on_cpu or total < 2:
        return total, 1
    return total - total // 2, total // 2


@dataclass
class _Pending:
    """A proposal drafted ahead whose depth-1 node ``anchor`` was accepted: its subtree is verified next round."""

    proposal: DraftTree  # as the drafter returned it (memo included)
    anchor: int  # the accepted depth-1 node, now the root
    root_row: torch.Tensor  # [V] the target's logits at the proposal's root (computed the round before)


class OverlapRounds:
    """Runs the rounds of one generate() call for :class:`specdec.engine.SpecEngine` (``overlap=True``): the
    target's ``runner`` verifies with ``verifier`` while ``drafter`` drafts ahead in a worker with
    ``draft_threads`` torch threads."""

    def __init__(self, runner: CausalLMRunner, drafter: Drafter, verifier: Verifier, draft_threads: int):
        self.runner, self.drafter, self.verifier = runner, drafter, verifier
        self.draft_threads = draft_threads

    def run(self, state: DecodeState, stops, stats: DecodingStats, streamer) -> None:
        stats.overlapped = True
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="specdec-draft",
                                initializer=torch.set_num_threads, initargs=(self.draft_threads,)) as worker:
            pending: _Pending | None = None
            done = False
            while not done:
                done, pending = self._round(worker, state, stops, stats, streamer, pending)
            if pending is not None:  # the last round accepted a token drafted ahead; nothing below it was verified
                self._observe(state, pending, None, None, None, stats)

    # ------------------------------------------------------------------ one round
    def _round(self, worker: ThreadPoolExecutor, state: DecodeState, stops, stats: DecodingStats, streamer,
               pending: "_Pending | None") -> "tuple[bool, _Pending | None]":
        """verify the pending tree (target) while drafting ahead below its guess (worker) -> verify the grafted
        tree -> commit -> emit -> observe the pending proposal; returns (done, the next round's pending tree)."""
        runner, drafter = self.runner, self.drafter
        dev = state.sequence.device
        if pending is None:
            tree, index = DraftTree.empty(dev), torch.zeros(0, dtype=torch.long, device=dev)
        else:
            tree, index = pending.proposal.subtree(pending.anchor)
        tree, fit_index = fit(tree, state.remaining)
        if fit_index is not None:
            index = index[fit_index]
        guess = tree.main_path()

        ahead_state = DecodeState(torch.cat([state.sequence, tree.tokens[guess][None]], dim=1), state.prompt_len,
                                  runner, state.sampling, state.generator, state.max_new_tokens,
                                  assumed=guess.numel())
        future: Future | None = worker.submit(_timed_propose, drafter, ahead_state) \
            if ahead_state.remaining >= 2 else None

        t0 = time.perf_counter()
        prefix_len = runner.length
        try:
            slot_tokens = torch.cat([state.sequence[0, -1:], tree.tokens])
            out = runner.forward(slot_tokens, tree.slot_positions(prefix_len), tree.ancestors)
        finally:
            t1 = time.perf_counter()
            ahead, draft_seconds = future.result() if future is not None else (DraftTree.empty(dev), 0.0)
        t2 = time.perf_counter()
        stats.draft_time += draft_seconds
        stats.draft_wait_time += t2 - t1
        ahead = on_device(ahead, runner.device, stats)
        stats.transfer_time += ahead_state.transfer_time

        # the tree with the proposal drafted ahead hung below its guess (the forward scored only ``tree``)
        leaf = int(guess[-1]) if guess.numel() else -1
        graft, _ = fit(tree.graft(ahead, leaf), state.remaining)
        step = verify_and_commit(runner, self.verifier, state, graft, out.logits, prefix_len, stats, ahead,
                                 self._tokens)
        stats.verify_time += time.perf_counter() - t2 + (t1 - t0)
        grafted = graft.size > tree.size
        stats.lookahead["accepted" if step.lookahead else ("missed" if grafted else "none")] += 1

        done = emit(state, stops, step.tokens, streamer)
        t3 = time.perf_counter()
        if pending is not None:
            here = VerificationResult(step.accepted, step.tokens, bonus=step.result.bonus and not step.lookahead)
            self._observe(state, pending, index, here, out.logits, stats,
                          emitted=state.sequence[0, -step.tokens.numel():])
        nxt = None
        if step.lookahead:  # the accepted grafted node: the same position among the proposal's depth-1 nodes
            first = torch.nonzero(ahead.parents < 0).flatten()
            anchor = int(first[int(step.result.accepted_nodes[-1]) - tree.size])
            nxt = _Pending(ahead, anchor, out.logits[leaf + 1])
        elif ahead.size:
            drafter.discard(ahead)
        stats.draft_time += time.perf_counter() - t3
        return done, nxt

    _tokens = staticmethod(step_tokens)  # what a round emits (specdec.step.step_tokens)

    def _observe(self, state: DecodeState, pending: _Pending, index, result, logits, stats: DecodingStats,
                 emitted: torch.Tensor | None = None) -> None:
        """Tell the drafter how its proposal ``pending.proposal`` went: its anchor accepted the round before, then
        ``result`` over its subtree (nodes ``index`` of the proposal; logits rows [root, subtree nodes]), or nothing
        more when generation ended on the anchor."""
        proposal = pending.proposal
        dev = proposal.tokens.device
        n = proposal.size
        rows = pending.root_row.new_zeros(n + 1, pending.root_row.shape[-1])
        scored = torch.zeros(n + 1, dtype=torch.bool, device=rows.device)
        rows[0], scored[0] = pending.root_row, True
        anchor = torch.tensor([pending.anchor], dtype=torch.long, device=dev)
        anchor_token = proposal.tokens[anchor]
        if result is None:
            accepted, tokens, bonus, emitted = anchor, anchor_token, False, anchor_token
        else:
            slots = torch.cat([anchor, index.to(dev)]) + 1  # the anchor is this round's root
            rows[slots.to(rows.device)], scored[slots.to(rows.device)] = logits, True
            accepted = torch.cat([anchor, index.to(dev)[result.accepted_nodes.to(dev)]])
            tokens = torch.cat([anchor_token, result.tokens.to(dev)])
            bonus = result.bonus
            emitted = torch.cat([anchor_token, emitted.to(dev)])
        t0 = time.perf_counter()
        outcome = StepOutcome(proposal, VerificationResult(accepted, tokens, bonus), rows, emitted, scored=scored)
        self.drafter.observe(state, outcome)
        stats.draft_time += time.perf_counter() - t0


def _timed_propose(drafter: Drafter, state: DecodeState) -> tuple[DraftTree, float]:
    t0 = time.perf_counter()
    tree = drafter.propose(state)
    return tree, time.perf_counter() - t0
