"""Speculative sampling is lossless: with do_sample=True every lossless verifier emits tokens distributed exactly as
the target's own warped sampling, and each check below fails for a deliberately wrong rule (the verifiers' own
rules, per node and on hand-made trees: tests/test_verifiers.py; sampled drafts and the draft cache:
tests/test_sampled_drafts.py).

  warpers      the logits processors equal HF's (TemperatureLogitsWarper, TopK, TopP, MinP, RepetitionPenalty)
  end to end   SpecEngine with the draft-model drafter against the exact 3-token distribution that HF's processors
               give the tiny target, and the same for the trained-head drafters (medusa, hydra, clover), which
               fails for heads that misreport q; greedy with repetition_penalty equals HF greedy
  determinism  a seeded generator reproduces the output; the global RNG is never touched
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                    RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from distributions import Z_09995, chi_square, claim_uniform_q, follows
from specdec import InvalidInputError, SpecEngine
from specdec.drafters import create_drafter
from specdec.drafters.heads import DraftVocab
from specdec.sampling import (SamplingConfig, apply_repetition_penalty, seen_mask, tree_seen_mask, warp_logits,
                              warped_probs)
from specdec.tree import DraftTree, ProposalKind
from specdec.verifiers import available_verifiers, create_verifier
from tiny_heads import perturbed_heads
from tiny_models import ARCHS, tiny_model, tiny_prompt

IID, WOR, POINT = ProposalKind.IID, ProposalKind.WITHOUT_REPLACEMENT, ProposalKind.POINT_MASS


def hf_processors(temperature=1.0, top_k=None, top_p=None, min_p=None, repetition_penalty=1.0):
    """The processors HF generate(do_sample=True) builds, in its order (generation/utils.py _get_logits_processor)."""
    procs = LogitsProcessorList()
    if repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(repetition_penalty)))
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(float(temperature)))
    if top_k:
        procs.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    if min_p is not None:
        procs.append(MinPLogitsWarper(min_p=min_p, min_tokens_to_keep=1))
    return procs


# ---------------------------------------------------------------------------------------------- warpers
WARPINGS = {
    "temperature-0.7": dict(temperature=0.7),
    "temperature-1.5": dict(temperature=1.5),
    "top-k-1": dict(top_k=1),
    "top-k-7": dict(top_k=7),
    "top-k-above-vocab": dict(top_k=500),
    "top-p-0.3": dict(top_p=0.3),
    "top-p-0.9": dict(top_p=0.9),
    "top-p-tiny": dict(top_p=1e-6),  # keeps only the top token
    "min-p-0.1": dict(min_p=0.1),
    "min-p-1": dict(min_p=1.0),
    "all": dict(temperature=1.3, top_k=20, top_p=0.8, min_p=0.05),
}


@pytest.mark.parametrize("kwargs", WARPINGS.values(), ids=WARPINGS.keys())
def test_warpers_equal_hf(kwargs):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    logits[0, :10] = 2.0  # ties at the top-k / top-p boundaries
    logits[1, 5] = -torch.inf  # an already-filtered token
    input_ids = torch.zeros(6, 1, dtype=torch.long)
    expected = hf_processors(**kwargs)(input_ids, logits.clone())
    got = warp_logits(logits, SamplingConfig(do_sample=True, **kwargs))
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_equals_hf(penalty):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 40, generator=g) * 3
    input_ids = torch.randint(0, 40, (5, 12), generator=g)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits.clone())
    seen = seen_mask(torch.zeros(0, dtype=torch.long), 40, paths=input_ids)  # one row per sequence
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, penalty), expected, rtol=0, atol=0)


def test_tree_seen_mask_is_sequence_plus_slot_path():
    """Slot s penalises the sequence and the tokens of s and its ancestors: HF's processor on each slot's context."""
    tree = DraftTree.from_paths([[5], [6], [5, 7], [5, 8], [5, 7, 9]])  # nodes 5, 6, 7(5), 8(5), 9(7)
    sequence = torch.tensor([3, 4, 4, 1])
    contexts = [[], [5], [6], [5, 7], [5, 8], [5, 7, 9]]  # draft path of slot 0 (root), 1..5 (nodes)
    seen = tree_seen_mask(sequence, tree, 12)
    logits = torch.randn(6, 12, generator=torch.Generator().manual_seed(2))
    got = apply_repetition_penalty(logits, seen, 1.5)
    for s, path in enumerate(contexts):
        ids = torch.cat([sequence, torch.tensor(path, dtype=torch.long)])[None]
        expected = RepetitionPenaltyLogitsProcessor(1.5)(ids, logits[s:s + 1].clone())
        torch.testing.assert_close(got[s:s + 1], expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- end to end
V_E2E = 8
E2E_SAMPLES = 1500
# verifier, draft-model options, sampling arguments. Point-mass ("topk") drafts are lossless whatever q is, so the
# Monte Carlo test above covers them; these cases check that the drafter's q and the target's p are warped alike.
E2E_CASES = {
    "rejection-chain-top-k-top-p": ("rejection", dict(mode="chain"), dict(temperature=1.5, top_k=6, top_p=0.95)),
    "rejection-tree-without-replacement": ("rejection", dict(mode="tree", topk=3),
                                           dict(temperature=1.5, min_p=0.1, repetition_penalty=1.5)),
    "spectr-tree-iid": ("spectr", dict(mode="tree", topk=3, sample_tree="iid"),
                        dict(temperature=1.5, repetition_penalty=0.8)),
}


def exact_three_tokens(target, prompt: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """DoubleTensor [V, V, V]: P(t1, t2, t3) of HF sampling: each step's logits through hf_processors, softmax."""
    procs = hf_processors(**kwargs)
    v = V_E2E
    joint = torch.ones(1, dtype=torch.float64)
    contexts = prompt  # [B, L]: every continuation so far
    for _ in range(3):
        with torch.no_grad():
            logits = target(input_ids=contexts).logits[:, -1].float()
        probs = procs(contexts, logits).softmax(dim=-1).double()  # [B, V]
        joint = (joint[:, None] * probs).flatten()
        contexts = torch.cat([contexts.repeat_interleave(v, 0), torch.arange(v).repeat(contexts.shape[0])[:, None]], 1)
    return joint.reshape(v, v, v)


def _three_token_counts(engine: SpecEngine, target, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(observed counts [V, V, V] of E2E_SAMPLES sampled 3-token answers, their exact distribution [V, V, V])."""
    prompt = torch.tensor([[3, 5, 4, 7, 3, 6]])
    g = torch.Generator().manual_seed(3)
    counts = torch.zeros(V_E2E, V_E2E, V_E2E)
    for _ in range(E2E_SAMPLES):
        t1, t2, t3 = engine.generate(prompt, max_new_tokens=3, eos_token_id=None, do_sample=True, generator=g,
                                     **kwargs).new_tokens[0].tolist()
        counts[t1, t2, t3] += 1
    return counts, exact_three_tokens(target, prompt, kwargs)


@pytest.mark.parametrize("case", E2E_CASES)
def test_generate_three_token_distribution(case):
    """The first three tokens of SpecEngine.generate(max_new_tokens=3) over E2E_SAMPLES seeded runs: t1 is sampled
    after the prefill, t2 and t3 come from speculation (a depth-1 draft: accepted + bonus, or recovered + one more
    step). Two chi-square tests, on the 64 cells of (t1, t2) and of (t2, t3) (cells expected below 5 pooled), each
    at the 0.05% level (0.1% together), against the exact distribution that HF's processors give the tiny target
    at temperature 1.5 (V = 8)."""
    verifier, options, kwargs = E2E_CASES[case]
    target = tiny_model("llama", vocab_size=V_E2E)
    drafter = create_drafter("draft-model", target=target, model=tiny_model("llama", seed=1, vocab_size=V_E2E),
                             quantize=None, **options)
    counts, expected = _three_token_counts(SpecEngine(target, drafter, verifier), target, kwargs)
    for dims in [(2,), (0,)]:  # (t1, t2), then (t2, t3)
        observed, probs = counts.sum(dim=dims), expected.sum(dim=dims)
        assert follows(observed, probs, z=Z_09995), (dims, chi_square(observed, probs))


# Trained-head drafters (medusa, hydra, clover, chimera) with perturbed heads (q far from p), one over a reduced draft
# vocabulary (q is zero on 3 of the 8 tokens), each checked like E2E_CASES; the broken case draws from q but hands
# the verifier a uniform q, and the same test must reject it.
HEADS_E2E_CASES = {
    "medusa-rejection-tree": ("medusa", "rejection", dict(topk=3), dict(temperature=1.5, top_k=6), False),
    "hydra-rejection-reduced-vocab": ("hydra", "rejection", dict(topk=2, width=2), dict(temperature=1.5,
                                                                                         repetition_penalty=1.5), True),
    "clover-spectr-iid": ("clover", "spectr", dict(topk=3, sample_tree="iid"), dict(temperature=1.5, top_p=0.9),
                          False),
    "chimera-rejection-tree": ("chimera", "rejection", dict(topk=2, width=2), dict(temperature=1.5, top_p=0.95),
                               False),
    "broken-uniform-q": ("hydra", "rejection", dict(topk=1), dict(temperature=1.5), False),
    "broken-chimera-uniform-q": ("chimera", "rejection", dict(topk=2), dict(temperature=1.5), False),
}


@pytest.mark.parametrize("case", HEADS_E2E_CASES)
def test_heads_drafters_three_token_distribution(case):
    kind, verifier, options, kwargs, reduced = HEADS_E2E_CASES[case]
    target = tiny_model("llama", vocab_size=V_E2E)
    vocab = DraftVocab(torch.tensor([0, 2, 3, 5, 6]), V_E2E) if reduced else None
    drafter = create_drafter(kind, target=target, heads=perturbed_heads(kind, target, draft_vocab=vocab, scale=3.0),
                             **options)
    if case.startswith("broken"):
        claim_uniform_q(drafter, V_E2E)
    counts, expected = _three_token_counts(SpecEngine(target, drafter, verifier), target, kwargs)
    results = [follows(counts.sum(dim=dims), expected.sum(dim=dims), z=Z_09995) for dims in [(2,), (0,)]]
    assert all(results) != case.startswith("broken"), [chi_square(counts.sum(dim=dims), expected.sum(dim=dims))
                                                       for dims in [(2,), (0,)]]


def test_self_drafting_accepts_every_token():
    """With the target drafting for itself q == p after the same processors, so min(1, p/q) = 1 everywhere: every
    sampled chain is accepted whole (a processor applied to one side only would reject some)."""
    target = tiny_model("llama")
    drafter = create_drafter("draft-model", target=target, model=target, quantize=None, mode="chain", depth=4)
    result = SpecEngine(target, drafter, "rejection").generate(
        tiny_prompt(), max_new_tokens=21, do_sample=True, temperature=0.9, top_k=30, top_p=0.9, min_p=0.02,
        repetition_penalty=1.4, generator=torch.Generator().manual_seed(0), eos_token_id=None)
    assert result.stats.accepted_lengths == [5] * 4


GREEDY_DRAFTERS = {
    "draft-model-chain": lambda arch: ("draft-model", dict(model=tiny_model(arch, seed=1), mode="chain")),
    "draft-model-tree": lambda arch: ("draft-model", dict(model=tiny_model(arch, seed=1), mode="tree")),
    "prompt-lookup": lambda arch: ("prompt-lookup", dict(num_candidates=3)),
}


@pytest.mark.parametrize("penalty", [1.3, 0.8])
@pytest.mark.parametrize("drafter", GREEDY_DRAFTERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_with_repetition_penalty_equals_hf(arch, drafter, penalty):
    target = tiny_model(arch)
    prompt = tiny_prompt()
    name, options = GREEDY_DRAFTERS[drafter](arch)
    result = SpecEngine(target, create_drafter(name, target=target, **options)).generate(
        prompt, max_new_tokens=20, repetition_penalty=penalty)
    expected = target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                               repetition_penalty=penalty, pad_token_id=2)
    assert torch.equal(result.sequences, expected)


# ---------------------------------------------------------------------------------------------- determinism, errors
# Fixed budgets: an "auto" budget follows measured timings, so the tree (and with it the random draws) may differ
# between two runs with the same seed.
@pytest.mark.parametrize("verifier,options", [
    ("rejection", dict(mode="tree", budget=12)), ("rejection", dict(mode="chain")),
    ("spectr", dict(mode="tree", sample_tree="iid", budget=12)),
    ("typical", dict(mode="tree", sample_tree="topk", budget=12))])
def test_deterministic_when_seeded(verifier, options):
    target = tiny_model("llama")
    drafter = create_drafter("draft-model", target=target, model=tiny_model("llama", seed=1), **options)
    engine = SpecEngine(target, drafter, verifier)
    rng_before = torch.get_rng_state()

    def run(seed):
        return engine.generate(tiny_prompt(), max_new_tokens=16, do_sample=True, temperature=1.2, top_p=0.95,
                               generator=torch.Generator().manual_seed(seed), eos_token_id=None).sequences

    first = run(0)
    assert torch.equal(run(0), first)
    assert any(not torch.equal(run(seed), first) for seed in (1, 2, 3))
    engine.generate(tiny_prompt(), max_new_tokens=4, do_sample=True, eos_token_id=None)  # no generator: fresh seed
    assert torch.equal(torch.get_rng_state(), rng_before), "generate() touched the global RNG"


def test_sampling_verifiers_are_registered():
    assert {"greedy", "rejection", "spectr", "typical"} <= set(available_verifiers())
    for name in ("rejection", "spectr", "typical"):
        assert create_verifier(name).samples
    target = tiny_model("llama")
    result = SpecEngine(target, create_drafter("prompt-lookup", target=target), "typical").generate(
        tiny_prompt(), max_new_tokens=4, do_sample=True, generator=torch.Generator().manual_seed(0))
    assert result.stats.lossless is False and result.stats.verifier == "typical"


@pytest.mark.parametrize("verifier,kwargs,phrase", [
    ("greedy", dict(do_sample=True), "do_sample=True needs a sampling verifier; 'greedy' decodes greedily"),
    ("rejection", {}, "verifier 'rejection' samples; pass do_sample=True or use 'greedy'"),
    ("spectr", {}, "verifier 'spectr' samples; pass do_sample=True"),
    ("rejection", dict(do_sample=True, temperature=0.0), "temperature must be > 0 when do_sample=True, got 0.0"),
    ("rejection", dict(do_sample=True, temperature=-0.5), "temperature must be > 0 when do_sample=True, got -0.5"),
    ("rejection", dict(do_sample=True, temperature=float("nan")), "temperature must be a finite number"),
    ("rejection", dict(do_sample=True, top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    ("rejection", dict(do_sample=True, top_p=1.01), "top_p must be in (0, 1], got 1.01"),
    ("rejection", dict(do_sample=True, top_k=2.5), "top_k must be a non-negative integer, got 2.5"),
    ("rejection", dict(do_sample=True, min_p=-0.1), "min_p must be in [0, 1], got -0.1"),
    ("rejection", dict(do_sample=True, repetition_penalty=-1.0), "repetition_penalty must be > 0, got -1.0"),
])
def test_sampling_arguments_rejected(verifier, kwargs, phrase):
    target = tiny_model("llama")
    engine = SpecEngine(target, create_drafter("prompt-lookup", target=target), verifier)
    with pytest.raises(InvalidInputError, match=re.escape(phrase)):
        engine.generate(tiny_prompt(), max_new_tokens=4, **kwargs)


def test_unknown_sample_tree_rejected():
    target = tiny_model("llama")
    with pytest.raises(InvalidInputError, match=re.escape("sample_tree must be one of 'without_replacement', 'iid', "
                                                          "'topk', got 'beam'")):
        create_drafter("draft-model", target=target, model=target, sample_tree="beam")


def test_first_token_is_sampled_from_warped_target():
    """The token after the prefill is drawn from the warped target distribution (top_k=2: only the two most likely
    tokens ever appear, both of them do)."""
    target = tiny_model("llama")
    engine = SpecEngine(target, create_drafter("prompt-lookup", target=target), "rejection")
    g = torch.Generator().manual_seed(0)
    firsts = {int(engine.generate(tiny_prompt(), max_new_tokens=1, do_sample=True, top_k=2, temperature=3.0,
                                  generator=g, eos_token_id=None).new_tokens[0, 0]) for _ in range(40)}
    with torch.no_grad():
        top2 = set(target(tiny_prompt()).logits[0, -1].topk(2).indices.tolist())
    assert firsts == top2
    assert warped_probs(torch.tensor([[0.0, 1.0, 2.0]]), SamplingConfig(do_sample=True, top_k=2))[0, 0] == 0
