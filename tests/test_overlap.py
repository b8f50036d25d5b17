"""SpecEngine(overlap=True) (PEARL, specdec.overlap): drafting beside the target's forward stays exact and lossless.

- The exactness harness again, in overlap mode, for every drafter that can draft ahead (the others are refused).
- Scheduling with a drafter and a target of known latency: each proposal is drafted while the target's forward
  runs, on the guess that the pending draft is accepted; a wrong guess is discarded (rollback) and the next
  proposal drafts on the true sequence; EOS and max_new_tokens landing while a proposal is in flight.
- The sampled distribution of six tokens equals the target's, and the same test rejects a wrong rule (emitting the
  bonus drawn from a drafted-ahead token's placeholder row).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from distributions import Z_09995, chi_square, follows
from regimes import REGIMES, RegimeDrafter
from specdec import SpecEngine
from specdec.drafters import available_drafters, create_drafter
from specdec.drafters.base import Drafter
from specdec.errors import InvalidInputError
from specdec.overlap import OverlapRounds
from specdec.tree import DraftTree
from test_exactness import DRAFTER_FACTORIES, NEW_TOKENS, _long_reference
from tiny_models import ARCHS, VOCAB, greedy_reference, tiny_model, tiny_prompt

OVERLAPPING = [name for name in available_drafters() if name in ("draft-model", "prompt-lookup", "token-recycling",
                                                                 "aded")]


def _variants() -> list:
    return [pytest.param(name, variant, id=f"{name}[{variant}]") for name in OVERLAPPING
            for variant in DRAFTER_FACTORIES[name]]


def test_every_drafter_either_overlaps_or_is_refused():
    target = tiny_model("llama")
    for name in available_drafters():
        options = next(iter(DRAFTER_FACTORIES[name].values()))(target, "llama")
        drafter = create_drafter(name, target=target, **options)
        if name in OVERLAPPING:
            assert drafter.can_draft_ahead and not drafter.needs_target_hidden_states
            SpecEngine(target, drafter, overlap=True)
        else:
            with pytest.raises(InvalidInputError, match="overlap=False"):
                SpecEngine(target, drafter, overlap=True)


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("drafter_name,variant", _variants())
def test_overlap_equals_greedy(drafter_name, variant, arch, regime):
    target = tiny_model(arch)
    prompt = tiny_prompt()
    inner = create_drafter(drafter_name, target=target, **DRAFTER_FACTORIES[drafter_name][variant](target, arch))
    drafter = RegimeDrafter(inner, regime, _long_reference(arch))

    result = SpecEngine(target, drafter, overlap=True).generate(prompt, max_new_tokens=NEW_TOKENS)

    assert torch.equal(result.sequences, greedy_reference(target, prompt, NEW_TOKENS))
    stats = result.stats
    assert stats.overlapped and stats.new_tokens == NEW_TOKENS
    assert stats.target_forwards == len(stats.accepted_lengths) == sum(stats.lookahead.values())
    assert sum(stats.accepted_lengths) == NEW_TOKENS - 1
    if regime == "all_right":  # drafted-ahead tokens are accepted (every round for a chain; a tree's verified path
        #                          may leave its first-child path, the guess)
        assert stats.lookahead["accepted"] >= 1 and stats.mean_accepted_length > 1
        if variant == "chain":
            assert stats.lookahead["missed"] == 0
    elif regime == "all_wrong":
        assert stats.lookahead["accepted"] == 0 and stats.accepted_lengths == [1] * (NEW_TOKENS - 1)


# ---------------------------------------------------------------------------------------------- scheduling
LATENCY = 0.03  # seconds the scripted drafter and the target each take per call (time.sleep releases the GIL)


class SlowTarget(torch.nn.Module):
    """The tiny target, LATENCY seconds per forward, recording each forward's (start, end)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config, self.generation_config = model.config, model.generation_config
        self.calls: list[tuple[float, float]] = []

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def forward(self, cache=None, **kwargs):
        t0 = time.perf_counter()
        time.sleep(LATENCY)
        out = self.model(cache=cache, **kwargs)
        self.calls.append((t0, time.perf_counter()))
        return out


class ScriptedDrafter(Drafter):
    """Proposes a chain of ``depth`` reference tokens (wrong at ``wrong_at`` steps), LATENCY seconds per proposal;
    records every proposal's (start, end, assumed tokens, threads) and every observe / discard."""

    name = "scripted"

    def __init__(self, target, reference: torch.Tensor, depth: int = 3, wrong_at: tuple[int, ...] = ()):
        super().__init__(target)
        self.reference, self.depth, self.wrong_at = reference.reshape(-1), depth, set(wrong_at)
        self.proposals: list[dict] = []
        self.observed: list[int] = []
        self.discarded: list[int] = []

    def propose(self, state):
        t0 = time.perf_counter()
        time.sleep(LATENCY)
        pos = state.sequence.shape[1] - 1
        k = min(self.depth, state.remaining - 1)
        tokens = self.reference[pos + 1: pos + 1 + k].clone()
        number = len(self.proposals)
        if number in self.wrong_at and k:
            tokens[0] = (tokens[0] + 1) % VOCAB
        self.proposals.append(dict(start=t0, end=time.perf_counter(), assumed=state.assumed, length=pos + 1,
                                   threads=torch.get_num_threads(), thread=threading.get_ident()))
        return DraftTree.chain(tokens).with_memo(number)

    def observe(self, state, outcome):
        self.observed.append(outcome.tree.memo)

    def discard(self, proposal):
        self.discarded.append(proposal.memo)


def _scripted(wrong_at=(), depth=3, new_tokens=20, eos=None, threads=None):
    model = tiny_model("llama")
    prompt = tiny_prompt()
    reference = greedy_reference(model, prompt, new_tokens + 8)[0]
    target = SlowTarget(model)
    drafter = ScriptedDrafter(target, reference, depth, wrong_at)
    engine = SpecEngine(target, drafter, overlap=True, threads=threads)
    result = engine.generate(prompt, max_new_tokens=new_tokens, eos_token_id=eos)
    return result, drafter, target, reference, prompt.shape[1]


def test_each_proposal_is_drafted_during_a_target_forward_on_the_guessed_outcome():
    result, drafter, target, reference, p = _scripted(new_tokens=20)
    assert torch.equal(result.sequences[0], reference[: p + 20])
    forwards = target.calls[1:]  # after the prefill
    for proposal in drafter.proposals:  # each overlaps one verification forward
        assert any(s < proposal["end"] and proposal["start"] < e for s, e in forwards), proposal
    # all guesses right: after the first round (no pending draft), each proposal assumes the 2 pending tokens
    assert [pr["assumed"] for pr in drafter.proposals][:4] == [0, 2, 2, 2]
    assert result.stats.lookahead["missed"] == 0
    assert drafter.discarded == []
    assert sorted(drafter.observed) == list(range(len(drafter.proposals)))  # each observed once
    # both sleep LATENCY per call: overlapped, a round takes about one latency, not two
    assert result.stats.draft_wait_time < 0.5 * result.stats.draft_time


def test_a_wrong_guess_is_discarded_and_the_next_proposal_drafts_on_the_true_sequence():
    result, drafter, target, reference, p = _scripted(wrong_at=(2,), new_tokens=20)
    assert torch.equal(result.sequences[0], reference[: p + 20])
    # proposal 2, drafted on a right guess, is wrong at its first token: the round that grafted it rejects that
    # token, so it is discarded whole; proposal 3 drafts on the true sequence (PEARL's pre-verify)
    assert drafter.discarded == [2]
    assert [pr["assumed"] for pr in drafter.proposals][:4] == [0, 2, 2, 0]
    assert result.stats.lookahead["missed"] >= 1
    assert sorted(drafter.observed + drafter.discarded) == list(range(len(drafter.proposals)))


@pytest.mark.parametrize("new_tokens", [7, 8, 9])
def test_max_new_tokens_landing_mid_overlap(new_tokens):
    result, drafter, target, reference, p = _scripted(depth=3, new_tokens=new_tokens)
    assert torch.equal(result.sequences[0], reference[: p + new_tokens])
    assert all(pr["length"] - p + pr["assumed"] <= new_tokens for pr in drafter.proposals)
    assert sorted(drafter.observed + drafter.discarded) == list(range(len(drafter.proposals)))


def test_eos_while_a_proposal_is_in_flight():
    model = tiny_model("llama")
    prompt = tiny_prompt()
    reference = greedy_reference(model, prompt, 28)[0]
    eos = int(reference[prompt.shape[1] + 9])  # the 10th new token: emitted in the middle of a round
    first = int(torch.nonzero(reference[prompt.shape[1]:] == eos)[0]) + 1
    result, drafter, target, _, p = _scripted(new_tokens=20, eos=eos)
    assert torch.equal(result.sequences[0], reference[: p + first])
    assert sorted(drafter.observed + drafter.discarded) == list(range(len(drafter.proposals)))


def test_draft_and_target_threads():
    before = torch.get_num_threads()
    result, drafter, target, reference, p = _scripted(new_tokens=8, threads=(1, 1))
    assert {pr["threads"] for pr in drafter.proposals} == {1}
    assert {pr["thread"] for pr in drafter.proposals} != {threading.get_ident()}  # a worker thread drafts
    assert torch.get_num_threads() == before  # restored after generate


def test_bad_overlap_arguments():
    target = tiny_model("llama")
    drafter = create_drafter("prompt-lookup", target=target)
    with pytest.raises(InvalidInputError, match="overlap=True only"):
        SpecEngine(target, drafter, threads=(1, 1))
    with pytest.raises(InvalidInputError, match="threads must be"):
        SpecEngine(target, drafter, overlap=True, threads=(0, 1))


# ---------------------------------------------------------------------------------------------- sampling
V = 4
SAMPLES = 1500
NEW = 6
KWARGS = dict(temperature=1.5)


def _exact_joint(target, prompt: torch.Tensor) -> torch.Tensor:
    """DoubleTensor [V] * NEW: P(t1..t6) when the target samples at temperature 1.5."""
    joint = torch.ones(1, dtype=torch.float64)
    contexts = prompt
    for _ in range(NEW):
        with torch.no_grad():
            logits = target(input_ids=contexts).logits[:, -1].double()
        joint = (joint[:, None] * (logits / KWARGS["temperature"]).softmax(-1)).flatten()
        contexts = torch.cat([contexts.repeat_interleave(V, 0), torch.arange(V).repeat(contexts.shape[0])[:, None]],
                             1)
    return joint.reshape([V] * NEW)


class BonusAfterGraft(OverlapRounds):
    """A wrong rule: after an accepted drafted-ahead token, also emit the bonus drawn from its placeholder row."""

    @staticmethod
    def _tokens(graft, result, hit):
        return result.tokens


def _sampled_counts(verifier: str, options: dict, rounds=OverlapRounds, monkeypatch=None) -> tuple:
    target = tiny_model("llama", vocab_size=V)
    drafter = create_drafter("draft-model", target=target, model=tiny_model("llama", seed=1, vocab_size=V),
                             quantize=None, **options)
    if monkeypatch is not None:
        monkeypatch.setattr("specdec.engine.OverlapRounds", rounds)
    engine = SpecEngine(target, drafter, verifier, overlap=True)
    prompt = torch.tensor([[3, 1, 2, 0, 3, 2]])
    g = torch.Generator().manual_seed(5)
    counts = torch.zeros([V] * NEW)
    hits = 0
    for _ in range(SAMPLES):
        result = engine.generate(prompt, max_new_tokens=NEW, eos_token_id=None, do_sample=True, generator=g,
                                 **KWARGS)
        counts[tuple(result.new_tokens[0].tolist())] += 1
        hits += result.stats.lookahead["accepted"]
    return counts, _exact_joint(target, prompt), hits


def _follows(counts, expected) -> list:
    """The dimension sets whose marginal the chi-square test rejects: (t2, t3, t4) and (t4, t5, t6)."""
    failed = []
    for keep in [(1, 2, 3), (3, 4, 5)]:
        dims = tuple(d for d in range(NEW) if d not in keep)
        observed, probs = counts.sum(dim=dims), expected.sum(dim=dims)
        if not follows(observed, probs, z=Z_09995):
            failed.append((keep, chi_square(observed, probs)))
    return failed


@pytest.mark.parametrize("verifier,options", [
    ("rejection", dict(mode="chain", depth=3)),
    ("rejection", dict(mode="tree", depth=3, topk=2, width=1)),
], ids=["rejection-chain", "rejection-tree"])
def test_overlap_sampling_distribution(verifier, options):
    """Six sampled tokens over SAMPLES seeded runs: the marginals of (t2, t3, t4) and (t4, t5, t6) (64 cells each)
    pass a chi-square test at the 0.05% level each against the target's exact distribution at temperature 1.5
    (V = 4); drafted-ahead tokens were accepted in many rounds, so the post-verify path ran."""
    counts, expected, hits = _sampled_counts(verifier, options)
    assert hits > SAMPLES // 2
    assert _follows(counts, expected) == []


def test_overlap_sampling_test_rejects_a_wrong_rule(monkeypatch):
    counts, expected, hits = _sampled_counts("rejection", dict(mode="chain", depth=3), BonusAfterGraft, monkeypatch)
    assert hits > SAMPLES // 2
    assert _follows(counts, expected) != []
