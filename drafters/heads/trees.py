"""Draft trees from draft heads: Medusa's static sparse tree, the EAGLE-2-style dynamic top-k tree and the
sampled tree (children drawn from q).

Static tree (Medusa, arXiv 2401.10774, "optimized tree construction"): with a_k(i) the measured probability that
head k's i-th ranked token is right, a node reached by ranks (i_1, ..., i_d) is accepted with probability
prod_j a_j(i_j) (heads taken as independent); the tree that maximises the expected accepted length for n nodes is
built greedily, adding each time the candidate child (of a node already in the tree) of largest path product.

Dynamic tree (EAGLE-2, arXiv 2406.16858; ``drafters/topk_pool.py``, shared with ``draft_model``): level by level,
the ``width`` frontier nodes of highest cumulative log q are expanded into their ``topk`` children until the length
policy stops; the best ``budget`` nodes form the tree (a child never scores above its parent, so the choice is
ancestor-closed). With Medusa the children's tokens do not depend on the path.

Sampled tree (do_sample): the children of an expanded node are drawn from q (i.i.d. or without replacement) and
whole sibling groups are kept, so verifiers can treat them as draws from q (``drafters/sampled_pool.py``, shared
with ``draft_model``).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable

import torch

from specdec.drafters.heads.base import DraftHeads
from specdec.drafters.sampled_pool import SampledPool, grow_sampled_pool
from specdec.drafters.topk_pool import Stop, TopkPool, grow_topk_pool
from specdec.tree import ProposalKind

LogQ = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]  # (logits [w, N], paths [w, a]) -> [w, V]


@dataclass(frozen=True)
class StaticTree:
    """Medusa's static sparse tree, nodes in greedy (best-first, ancestor-closed) order."""

    depth: torch.Tensor  # LongTensor [M] 1-based depth = head index + 1
    rank: torch.Tensor  # LongTensor [M] rank of the node's token in its head's top-10
    parents: torch.Tensor  # LongTensor [M] parent index, -1 below the root
    values: torch.Tensor  # FloatTensor [M] expected acceptance (path product of accuracies)


def static_tree(accuracies: list, max_nodes: int) -> StaticTree:
    """Greedy Medusa tree of at most ``max_nodes`` nodes from ``accuracies[k][i]`` (head k, rank i)."""
    heap = [(-float(a), (i,)) for i, a in enumerate(accuracies[0])]
    heapq.heapify(heap)
    index: dict[tuple, int] = {}
    depth, rank, parents, values = [], [], [], []
    while heap and len(index) < max_nodes:
        neg, path = heapq.heappop(heap)
        index[path] = len(index)
        depth.append(len(path))
        rank.append(path[-1])
        parents.append(index[path[:-1]] if len(path) > 1 else -1)
        values.append(-neg)
        if len(path) < len(accuracies):
            for i, a in enumerate(accuracies[len(path)]):
                heapq.heappush(heap, (neg * float(a), path + (i,)))
    long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return StaticTree(long(depth), long(rank), long(parents), torch.tensor(values, dtype=torch.float64))


def _expander(heads: DraftHeads, root_state: torch.Tensor, log_q: LogQ):
    """The ``expand`` of a pool grown by draft heads: (pool tokens, pool parents, nodes [w], depth d) -> their
    children's log q [w, V]; the heads' states and draft paths of the expanded nodes are kept for their children."""
    dev = root_state.device
    states, paths = root_state, torch.zeros(1, 0, dtype=torch.long, device=dev)
    row = torch.zeros(0, dtype=torch.long, device=dev)  # row of ``states`` of each expanded pool node, else -1

    def expand(tokens: torch.Tensor, parents: torch.Tensor, nodes: torch.Tensor, d: int) -> torch.Tensor:
        nonlocal states, paths, row
        row = torch.cat([row, torch.full((tokens.numel() - row.numel(),), -1, dtype=torch.long, device=dev)])
        par = parents[nodes]
        prow = torch.where(par >= 0, row[par.clamp(min=0)], torch.zeros_like(par))  # parents' rows in ``states``
        states = heads.node_states(states[prow], tokens[nodes], d)
        paths = torch.cat([paths[prow], tokens[nodes, None]], dim=1)  # [w, d] draft tokens on each path
        row[nodes] = torch.arange(nodes.numel(), device=dev)
        return log_q(heads.node_logits(states, d), paths)

    return expand


def greedy_tree(heads: DraftHeads, root_state: torch.Tensor, log_q: LogQ, depth: int, topk: int, width: int,
                stop: Stop) -> tuple[TopkPool, int]:
    """The dynamic top-k pool (``drafters/topk_pool.py``, shared with ``draft_model``); returns it and the number
    of head evaluations."""
    root_log_q = log_q(heads.node_logits(root_state, 0), None)[0]  # [V]
    pool = grow_topk_pool(root_log_q, _expander(heads, root_state, log_q), depth, topk, width, stop)
    return pool, 1 + pool.expansions


def sampled_tree(heads: DraftHeads, root_state: torch.Tensor, log_q: LogQ, depth: int, topk: int, width: int,
                 kind: ProposalKind, generator: torch.Generator | None) -> tuple[SampledPool, int]:
    """Children drawn from q (``drafters/sampled_pool.py``): i.i.d. (``ProposalKind.IID``) or without
    replacement, in draw order; returns the pool and the number of head evaluations."""
    root_log_q = log_q(heads.node_logits(root_state, 0), None)[0]  # [V]
    pool = grow_sampled_pool(root_log_q, _expander(heads, root_state, log_q), depth, topk, width, kind, generator)
    return pool, 1 + pool.expansions
