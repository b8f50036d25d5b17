"""DraftTree: literal buffers for one hand-built tree, then properties over random trees."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.tree import DraftTree, ProposalKind

T, F = True, False

# from_paths orders nodes by path length:   node: token (parent)
#   root ─┬─ 0: 5 ─┬─ 2: 7 ── 4: 9          0: 5 (-1)   1: 6 (-1)   2: 7 (0)   3: 8 (0)   4: 9 (2)
#         │        └─ 3: 8
#         └─ 1: 6
PATHS = [[5], [6], [5, 7], [5, 8], [5, 7, 9]]


@pytest.fixture
def tree() -> DraftTree:
    return DraftTree.from_paths(PATHS)


def test_from_paths_layout(tree):
    assert tree.tokens.tolist() == [5, 6, 7, 8, 9]
    assert tree.parents.tolist() == [-1, -1, 0, 0, 2]
    assert tree.size == 5 and tree.max_depth == 3


def test_buffers(tree):
    assert tree.ancestors.tolist() == [
        # root n0 n1 n2 n3 n4     (slot 0 is the root, slot i + 1 is node i)
        [T, F, F, F, F, F],  # root
        [T, T, F, F, F, F],  # n0
        [T, F, T, F, F, F],  # n1
        [T, T, F, T, F, F],  # n2
        [T, T, F, F, T, F],  # n3
        [T, T, F, T, F, T],  # n4
    ]
    assert tree.depths.tolist() == [1, 1, 2, 2, 3]
    assert tree.slot_positions(prefix_len=10).tolist() == [10, 11, 11, 12, 12, 13]
    assert tree.leaves().tolist() == [1, 3, 4]
    assert tree.retrieve_paths().tolist() == [[1, -1, -1], [0, 3, -1], [0, 2, 4]]


@pytest.mark.parametrize("node,path", [(-1, []), (0, [0]), (1, [1]), (2, [0, 2]), (3, [0, 3]), (4, [0, 2, 4])])
def test_path_to(tree, node, path):
    assert tree.path_to(node).tolist() == path


@pytest.mark.parametrize("keep,tokens,parents,kept", [
    ([T, T, T, T, T], [5, 6, 7, 8, 9], [-1, -1, 0, 0, 2], [0, 1, 2, 3, 4]),
    ([T, F, T, F, T], [5, 7, 9], [-1, 0, 1], [0, 2, 4]),
    ([T, T, F, T, F], [5, 6, 8], [-1, -1, 0], [0, 1, 3]),
    ([F, T, F, F, F], [6], [-1], [1]),
    ([F, F, F, F, F], [], [], []),
])
def test_prune(tree, keep, tokens, parents, kept):
    pruned, kept_idx = tree.prune(torch.tensor(keep))
    assert pruned.tokens.tolist() == tokens
    assert pruned.parents.tolist() == parents
    assert kept_idx.tolist() == kept


def test_prune_carries_draft_probs():
    probs = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    tree = DraftTree(torch.tensor([5, 6, 7, 8, 9]), torch.tensor([-1, -1, 0, 0, 2]), probs)
    pruned, _ = tree.prune(torch.tensor([T, F, T, F, F]))
    assert torch.equal(pruned.draft_probs, probs[[0, 2]])


@pytest.mark.parametrize("keep", [
    [F, F, T, F, F],  # node 2 without its parent 0
    [T, F, F, F, T],  # node 4 without its parent 2
    [F, F, F, T, F],  # node 3 without its parent 0
])
def test_prune_rejects_sets_missing_an_ancestor(tree, keep):
    with pytest.raises(ValueError, match="every ancestor"):
        tree.prune(torch.tensor(keep))


@pytest.mark.parametrize("parents", [[0], [-1, 1], [-1, 2, 0], [1, -1], [-2], [-1, -3]])
def test_non_topological_parents_raise(parents):
    with pytest.raises(ValueError, match="topological order"):
        DraftTree(torch.zeros(len(parents), dtype=torch.long), torch.tensor(parents))


def test_chain():
    chain = DraftTree.chain(torch.tensor([[4, 5, 6]]))
    assert chain.tokens.tolist() == [4, 5, 6]
    assert chain.parents.tolist() == [-1, 0, 1]
    assert chain.depths.tolist() == [1, 2, 3]
    assert torch.equal(chain.ancestors, torch.ones(4, 4, dtype=torch.bool).tril())
    assert chain.retrieve_paths().tolist() == [[0, 1, 2]]
    assert chain.slot_positions(7).tolist() == [7, 8, 9, 10]


def test_empty_tree():
    empty = DraftTree.empty()
    assert empty.size == 0 and empty.max_depth == 0
    assert empty.ancestors.tolist() == [[True]]
    assert empty.slot_positions(7).tolist() == [7]
    assert empty.retrieve_paths().shape == (0, 0)
    assert DraftTree.chain(torch.zeros(0, dtype=torch.long)).size == 0


# ---------------------------------------------------------------------------------------------- properties
@st.composite
def parent_arrays(draw, max_nodes: int = 12) -> list[int]:
    n = draw(st.integers(0, max_nodes))
    return [draw(st.integers(-1, i - 1)) for i in range(n)]


def _chain_to_root(parents: list[int], node: int) -> list[int]:
    """Node indices from depth 1 down to ``node``, by walking parent links."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


@settings(deadline=None, max_examples=150)
@given(parent_arrays())
def test_buffers_match_parent_walks(parents):
    n = len(parents)
    tree = DraftTree(torch.arange(n, dtype=torch.long) + 3, torch.tensor(parents, dtype=torch.long))
    anc = tree.ancestors
    assert anc.shape == (n + 1, n + 1)
    assert bool(anc.diagonal().all())  # reflexive
    assert bool(anc[:, 0].all())  # the root is everyone's ancestor
    assert not bool(anc[0, 1:].any())
    for i, p in enumerate(parents):
        expected_row = anc[p + 1].clone()
        expected_row[i + 1] = True
        assert torch.equal(anc[i + 1], expected_row)
        path = _chain_to_root(parents, i)
        assert torch.nonzero(anc[i + 1, 1:]).flatten().tolist() == sorted(path)
        assert tree.path_to(i).tolist() == path
    assert tree.depths.tolist() == [int(anc[i + 1, 1:].sum()) for i in range(n)]
    assert tree.slot_positions(4).tolist() == [4] + [4 + len(_chain_to_root(parents, i)) for i in range(n)]


@settings(deadline=None, max_examples=150)
@given(parent_arrays())
def test_retrieve_paths_are_root_to_leaf_chains(parents):
    n = len(parents)
    tree = DraftTree(torch.zeros(n, dtype=torch.long), torch.tensor(parents, dtype=torch.long))
    leaves = [i for i in range(n) if i not in parents]
    assert tree.leaves().tolist() == leaves
    rows = tree.retrieve_paths()
    assert rows.shape == (len(leaves), tree.max_depth)
    for leaf, row in zip(leaves, rows.tolist()):
        path = _chain_to_root(parents, leaf)
        assert row == path + [-1] * (tree.max_depth - len(path))


@settings(deadline=None, max_examples=150)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=5), max_size=8))
def test_from_paths_merges_shared_prefixes(paths):
    tree = DraftTree.from_paths(paths)
    prefixes = {tuple(p[:d]) for p in paths for d in range(1, len(p) + 1)}
    assert tree.size == len(prefixes)
    parents = tree.parents.tolist()
    node_paths = [tuple(tree.tokens[_chain_to_root(parents, i)].tolist()) for i in range(tree.size)]
    assert sorted(node_paths) == sorted(prefixes)  # every prefix exactly once, so every path is reproduced


def test_main_path_subtree_and_graft_for_drafting_ahead():
    #        root
    #       /    \
    #     5(0)   6(1)
    #    /   \
    #  7(2)  8(3)
    #   |
    #  9(4)
    tree = DraftTree(torch.tensor([5, 6, 7, 8, 9]), torch.tensor([-1, -1, 0, 0, 2]), memo="mine")
    assert tree.main_path().tolist() == [0, 2, 4]  # first child at every level
    below, index = tree.subtree(0)  # node 5 becomes the root
    assert below.tokens.tolist() == [7, 8, 9] and below.parents.tolist() == [-1, -1, 0]
    assert index.tolist() == [2, 3, 4] and below.memo == "mine"
    assert tree.subtree(4)[0].size == 0
    ahead = DraftTree(torch.tensor([1, 2, 3]), torch.tensor([-1, 0, -1]))
    grafted = tree.graft(ahead, 4)  # the depth-1 nodes of `ahead` (1 and 3) below node 4
    assert grafted.tokens.tolist() == [5, 6, 7, 8, 9, 1, 3]
    assert grafted.parents.tolist() == [-1, -1, 0, 0, 2, 4, 4]
    assert grafted.depths.tolist() == [1, 1, 2, 2, 3, 4, 4]
    empty = DraftTree.empty()
    assert empty.main_path().numel() == 0
    assert empty.graft(ahead, -1).tokens.tolist() == [1, 3]
    assert tree.graft(empty, 4) is tree
    sampled = DraftTree.chain(torch.tensor([1]), torch.full((1, 4), 0.25), ProposalKind.IID)
    with pytest.raises(ValueError, match="cannot graft"):
        tree.graft(sampled, 4)
