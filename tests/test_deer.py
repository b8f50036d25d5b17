"""The ``deer`` drafter (block drafting by a diffusion drafter) and its two-stage training objective."""

from __future__ import annotations

import re

import pytest
import torch
from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper

from distributions import Z_09995, chi_square, claim_uniform_q, follows
from specdec import InvalidInputError, SpecEngine
from specdec.drafters import create_drafter
from specdec.training.batches import Batch
from specdec.training.diffusion import gather, noise, positions
from tiny_heads import perturbed_heads
from tiny_models import greedy_reference, tiny_model, tiny_prompt

V = 8  # the distribution tests' vocabulary
SAMPLES = 2000
TEMPERATURE = 1.5


def _drafter(target, **options):
    return create_drafter("deer", target=target, heads=perturbed_heads("deer", target, scale=3.0), **options)


def _recording(drafter) -> list:
    trees = []
    propose = drafter.propose
    drafter.propose = lambda state: trees.append(propose(state)) or trees[-1]
    return trees


# ---------------------------------------------------------------------------------------------- sampling
def exact_four_tokens(target, prompt: torch.Tensor) -> torch.Tensor:
    """DoubleTensor [V, V, V, V]: P(t1..t4) of sampling the target at TEMPERATURE."""
    warp = LogitsProcessorList([TemperatureLogitsWarper(TEMPERATURE)])
    joint = torch.ones(1, dtype=torch.float64)
    contexts = prompt
    for _ in range(4):
        with torch.no_grad():
            logits = target(input_ids=contexts).logits[:, -1].float()
        probs = warp(contexts, logits).softmax(dim=-1).double()
        joint = (joint[:, None] * probs).flatten()
        contexts = torch.cat([contexts.repeat_interleave(V, 0), torch.arange(V).repeat(contexts.shape[0])[:, None]], 1)
    return joint.reshape(V, V, V, V)


@pytest.mark.parametrize("case", ["one-step", "two-steps", "broken-uniform-q"])
def test_sampled_blocks_follow_the_target(case):
    """Four sampled tokens: t1 from the prefill, then a drafted block of up to 2 slots (its q far from p) and the
    verifier's bonus or recovered token.
    Chi-square on the (t2, t3) and (t3, t4) marginals at 0.05% each. With ``steps=2`` slot 2 is drawn after slot 1
    is known; the broken case draws from q but claims a uniform q, and the same test must reject it."""
    target = tiny_model("llama", vocab_size=V)
    drafter = _drafter(target, steps=2 if case == "two-steps" else 1, budget=3)
    trees = _recording(drafter)
    if case.startswith("broken"):
        claim_uniform_q(drafter, V)
    engine = SpecEngine(target, drafter, "rejection")
    prompt = torch.tensor([[3, 5, 4, 7, 3, 6]])
    g = torch.Generator().manual_seed(5)
    counts = torch.zeros(V, V, V, V)
    for _ in range(SAMPLES):
        tokens = engine.generate(prompt, max_new_tokens=4, eos_token_id=None, do_sample=True, generator=g,
                                 temperature=TEMPERATURE).new_tokens[0].tolist()
        counts[tuple(tokens)] += 1
    assert max(t.size for t in trees) == 2  # blocks of 2 slots were drafted
    expected = exact_four_tokens(target, prompt)
    results = [follows(counts.sum(dim=dims), expected.sum(dim=dims), z=Z_09995) for dims in [(0, 3), (0, 1)]]
    assert all(results) != case.startswith("broken"), [chi_square(counts.sum(dim=d), expected.sum(dim=d))
                                                       for d in [(0, 3), (0, 1)]]


# ---------------------------------------------------------------------------------------------- drafting
def _greedy_trees(target, new_tokens: int, **options) -> list:
    """The proposals of a greedy generation with these options, after checking it equals the target's own."""
    drafter = _drafter(target, **options)
    trees = _recording(drafter)
    result = SpecEngine(target, drafter).generate(tiny_prompt(), max_new_tokens=new_tokens, eos_token_id=None)
    assert torch.equal(result.sequences, greedy_reference(target, tiny_prompt(), new_tokens))
    return trees


def test_segments_condition_on_earlier_slots():
    """steps=1 fills every slot from the prefix alone; steps=4 fills them one by one, each seeing the slots before
    it: the first slot agrees, later ones may differ, and every proposal is a chain of point masses."""
    target = tiny_model("qwen2")
    blocks = {}
    for steps in (1, 4):
        trees = _greedy_trees(target, 12, steps=steps, budget=4)
        assert torch.equal(trees[0].parents, torch.arange(-1, trees[0].size - 1))
        blocks[steps] = trees[0].tokens
    assert blocks[1][0] == blocks[4][0] and not torch.equal(blocks[1], blocks[4])


def test_confidence_cut_and_fixed_length():
    target = tiny_model("gemma3")
    sizes = {}
    for confidence in (0.0, 1.0):
        sizes[confidence] = [t.size for t in _greedy_trees(target, 10, confidence=confidence, budget=4)]
    assert sizes[1.0] == [0] * len(sizes[1.0])  # no slot is certain: nothing is drafted, plain decoding
    assert max(sizes[0.0]) == 4  # the fixed length caps the block


def test_options_are_checked_and_reported():
    target = tiny_model("llama")
    heads = perturbed_heads("deer", target)  # 4 slots
    with pytest.raises(InvalidInputError, match=re.escape("deer block_size 6 exceeds the 4 slots these heads were "
                                                          "trained with")):
        create_drafter("deer", target=target, heads=heads, block_size=6)
    for bad, phrase in [(dict(steps=0), "deer steps must be an integer >= 1"),
                        (dict(confidence=1.5), "deer confidence must be in [0, 1]"),
                        (dict(budget="most"), "deer budget must be an int >= 1 or 'auto'")]:
        with pytest.raises(InvalidInputError, match=re.escape(phrase)):
            create_drafter("deer", target=target, heads=heads, **bad)
    described = create_drafter("deer", target=target, heads=heads, block_size=3, steps=2, confidence=0.1).describe()
    assert (described["kind"], described["block_size"], described["steps"], described["confidence"]) == (
        "deer", 3, 2, 0.1)


def test_deer_is_no_tree_drafter():
    heads = perturbed_heads("deer", tiny_model("llama"))
    with pytest.raises(RuntimeError, match="deer drafts a block at once"):
        heads.node_logits(torch.zeros(1, 64), 0)


# ---------------------------------------------------------------------------------------------- training pieces
def _batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    b, t, k = 2, 12, 3
    tokens = torch.randint(0, 50, (b, t), generator=g)
    top_ids = torch.randint(0, 50, (b, t, k), generator=g)
    return Batch(torch.randn(b, t, 8, generator=g).bfloat16(), tokens, top_ids, torch.rand(b, t, k, generator=g),
                 torch.tensor([12, 9]), torch.tensor([3, 2]))


def test_blocks_are_gathered_at_the_right_offsets():
    batch = _batch()
    b, t = positions(batch, None, None)
    # trainable positions: t >= prompt_len - 1 and t + 2 < length
    assert [(int(i), int(j)) for i, j in zip(b, t)] == [(0, j) for j in range(2, 10)] + [(1, j) for j in range(1, 7)]
    blocks = gather(batch, b, t, 4)
    i = 3  # sequence 0, position 5
    assert int(blocks.root[i]) == int(batch.tokens[0, 6])
    assert blocks.answer[i].tolist() == batch.tokens[0, 7:11].tolist()
    assert blocks.label[i].tolist() == batch.top_ids[0, 6:10, 0].tolist()
    assert blocks.valid[i].tolist() == [True, True, True, True]
    last = 7  # sequence 0, position 9: only slot 0 (token 11) exists
    assert blocks.valid[last].tolist() == [True, False, False, False]
    sampled_b, sampled_t = positions(batch, 3, torch.Generator().manual_seed(1))
    assert sampled_b.tolist() == [0, 0, 0, 1, 1, 1] and len(set(sampled_t[:3].tolist())) == 3


def test_stage_one_noise():
    masked, u = noise(4000, 8, torch.Generator().manual_seed(0))
    assert bool(masked.any(1).all())  # at least one slot masked
    assert float(u.min()) >= 1 / 8 and float(u.max()) <= 1.0
    share = masked.float().mean(1)
    expected = u + (1 - u) / 8  # each slot masked with probability u, plus the forced one where it was not
    assert abs(float(share.mean()) - float(expected.mean())) < 0.02
    assert float(torch.corrcoef(torch.stack([share, u]))[0, 1]) > 0.7
