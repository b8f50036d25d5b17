"""Sampled drafts (``drafters/sampled_pool.py``) keep whole sibling groups, and the draft model's cache stays in step
with the sequence whatever a sampled or auto-sized draft kept (``drafters/draft_model.py``)."""

from __future__ import annotations


import pytest
import torch

from specdec import SpecEngine
from specdec.budget import ForwardCosts
from specdec.drafters import create_drafter
from specdec.drafters.base import Drafter
from test_draft_model_cache import assert_cache_holds
from specdec.tree import DraftTree, ProposalKind
from tiny_heads import perturbed_heads
from tiny_models import ARCHS, tiny_model, tiny_prompt

IID, WOR, POINT = ProposalKind.IID, ProposalKind.WITHOUT_REPLACEMENT, ProposalKind.POINT_MASS


class Watched(Drafter):
    """Wraps a draft-model drafter: records its trees, checks their draft distributions and, after every observe(),
    that its cache equals a fresh prefill of the tokens it claims to hold."""

    name = "draft-model"

    def __init__(self, inner):
        super().__init__(inner.target_model)
        self.inner = inner
        self.trees: list[DraftTree] = []

    @property
    def forward_count(self):
        return self.inner.forward_count

    @forward_count.setter
    def forward_count(self, value):  # Drafter.__init__ sets it
        pass

    def begin(self, state):
        self.inner.begin(state)

    def propose(self, state):
        tree = self.inner.propose(state)
        self.trees.append(tree)
        if tree.size:
            assert tree.draft_probs is not None and tree.draft_probs.shape == (tree.size, self.inner.runner.vocab_size)
            torch.testing.assert_close(tree.draft_probs.sum(-1), torch.ones(tree.size))
            assert bool((tree.draft_probs[torch.arange(tree.size), tree.tokens] > 0).all())
            if tree.proposal is WOR:  # siblings are distinct
                pairs = (tree.parents[:, None] == tree.parents[None, :]) & (tree.tokens[:, None] == tree.tokens)
                assert torch.equal(pairs, torch.eye(tree.size, dtype=torch.bool))
        return tree

    def observe(self, state, outcome):
        self.inner.observe(state, outcome)
        cached = self.inner.cached
        assert torch.equal(cached, state.sequence[0, :cached.numel()].cpu())
        assert_cache_holds(self.inner, cached)


@pytest.mark.parametrize("options", [dict(mode="chain"), dict(mode="tree", budget=12),
                                     dict(mode="tree", sample_tree="iid", budget=12),
                                     dict(mode="tree", depth=10, topk=2, width=2, budget=30)],
                         ids=["chain", "tree-without-replacement", "tree-iid", "deep-tree"])
@pytest.mark.parametrize("arch", ARCHS)
def test_sampled_drafts_keep_the_draft_cache_in_step(arch, options):
    """Sampled trees carry q for every node (rows sum to 1, each token has q > 0, no repeated sibling without
    replacement), and the draft cache stays in step through accepted and rejected sampled drafts, with the target
    drafting for itself (long accepted paths, past Gemma 3's sliding window)."""
    target = tiny_model(arch)
    drafter = Watched(create_drafter("draft-model", target=target, model=target, quantize=None, **options))
    result = SpecEngine(target, drafter, "rejection").generate(
        tiny_prompt(), max_new_tokens=24, do_sample=True, temperature=0.8, generator=torch.Generator().manual_seed(0),
        eos_token_id=None)
    assert result.stats.new_tokens == 24
    assert max(result.stats.accepted_lengths) >= 3


@pytest.mark.parametrize("arch", ARCHS)
def test_an_empty_auto_sized_draft_leaves_the_draft_cache_in_step(arch):
    """Forward costs so steep that budget="auto" keeps no node: the pool the draft model already read must leave
    its cache at once (a sampled tree drafts more than one level before the budget is chosen)."""
    target = tiny_model(arch)
    drafter = Watched(create_drafter("draft-model", target=target, model=target, quantize=None, budget="auto"))
    drafter.inner.budget_policy.costs = ForwardCosts((1, 2), (1.0, 3.0))  # a second token costs twice the first
    result = SpecEngine(target, drafter, "rejection").generate(
        tiny_prompt(), max_new_tokens=12, do_sample=True, temperature=0.8, generator=torch.Generator().manual_seed(0),
        eos_token_id=None)
    assert result.stats.new_tokens == 12 and set(result.stats.tree_sizes) == {0}
    assert drafter.inner.forward_count > len(result.stats.tree_sizes)  # it did read pools it then dropped


@pytest.mark.parametrize("new_tokens", range(8, 16))
def test_a_last_step_without_draft_leaves_the_draft_cache_in_step(new_tokens):
    """The last step of a generation may allow no draft at all (one token left): the draft model reads nothing
    then, and its cache must stay as the previous, accepted step left it."""
    target = tiny_model("llama")
    drafter = Watched(create_drafter("draft-model", target=target, model=target, quantize=None, budget="auto"))
    drafter.inner.budget_policy.costs = ForwardCosts((1, 64), (1.0, 1.0))  # flat: every node pays, long accepted paths
    result = SpecEngine(target, drafter, "rejection").generate(
        tiny_prompt(), max_new_tokens=new_tokens, do_sample=True, temperature=0.8,
        generator=torch.Generator().manual_seed(new_tokens), eos_token_id=None)
    assert result.stats.new_tokens == new_tokens


def test_sampled_tree_keeps_whole_sibling_groups():
    """Children are verified as draws from q, so the budget never drops a child for its token: every node with
    children in the tree has all topk of them, except the last group taken, which is cut by draw rank."""
    target = tiny_model("llama")
    drafter = Watched(create_drafter("draft-model", target=target, model=tiny_model("llama", seed=1), quantize=None,
                                     mode="tree", topk=3, width=3, budget=10, sample_tree="iid"))
    SpecEngine(target, drafter, "rejection").generate(
        tiny_prompt(), max_new_tokens=12, do_sample=True, generator=torch.Generator().manual_seed(1),
        eos_token_id=None)
    assert any(tree.max_depth >= 2 for tree in drafter.trees)
    for tree in drafter.trees:
        if tree.size:
            assert tree.proposal is IID and tree.size <= 10
            sizes = torch.bincount(tree.parents + 1)
            sizes = sizes[sizes > 0]
            assert int((sizes != 3).sum()) <= 1 and int(sizes.min()) >= 1, sizes


def test_sampled_heads_tree_keeps_whole_sibling_groups():
    """The same for a trained-head drafter (the shared sampled pool), with several nodes expanded per level."""
    target = tiny_model("llama")
    drafter = create_drafter("hydra", target=target, heads=perturbed_heads("hydra", target), topk=3, width=3,
                             budget=10, sample_tree="iid")
    trees = []
    propose = drafter.propose
    drafter.propose = lambda state: trees.append(propose(state)) or trees[-1]
    SpecEngine(target, drafter, "rejection").generate(
        tiny_prompt(), max_new_tokens=12, do_sample=True, generator=torch.Generator().manual_seed(1),
        eos_token_id=None)
    assert any(tree.max_depth >= 2 for tree in trees)
    for tree in trees:
        if tree.size:
            sizes = torch.bincount(tree.parents + 1)
            sizes = sizes[sizes > 0]
            assert tree.size <= 10 and int((sizes != 3).sum()) <= 1, sizes
