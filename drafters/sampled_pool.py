"""Sampled draft trees: children drawn from the draft distribution q, kept as whole sibling groups.

Shared by every drafter that samples trees (``draft-model``, the trained heads). Level by level, the ``width``
frontier nodes of highest cumulative log q are expanded and each draws ``topk`` children from its q: i.i.d.
(SpecInfer, arXiv 2305.09781; SpecTr, arXiv 2310.15141) or without replacement (EAGLE-1, arXiv 2401.15077), in
draw order. Sampled children are verified as draws from q, so a tree may not keep or drop a child because of its
own token: :func:`sampled_order` takes whole sibling groups, in the order of their parent's score, and cuts only
the last group, by draw rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from specdec.sampling import sample
from specdec.tree import ProposalKind

# a sampling drafter's ``sample_tree`` option -> how its tree's children are chosen ("topk": the greedy tree on q)
SAMPLE_TREES = {"without_replacement": ProposalKind.WITHOUT_REPLACEMENT, "iid": ProposalKind.IID,
                "topk": ProposalKind.POINT_MASS}

# (pool tokens [P], pool parents [P], nodes [w] to expand, depth d of those nodes) -> log q of their children [w, V]
Expand = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class SampledPool:
    """Candidate nodes in creation order (parents before children)."""

    tokens: torch.Tensor  # LongTensor [P] token ids
    parents: torch.Tensor  # LongTensor [P] pool index of the parent, -1 below the root
    scores: torch.Tensor  # FloatTensor [P] cumulative log q of the path
    q_rows: torch.Tensor  # FloatTensor [R, V] q after the root and after every expanded node
    q_row: torch.Tensor  # LongTensor [P] row of q_rows each node was drawn from (its parent's q)
    group: torch.Tensor  # LongTensor [P] sibling group (one per expanded node, the root's first)
    rank: torch.Tensor  # LongTensor [P] draw rank within the group
    group_score: torch.Tensor  # FloatTensor [G] the group's parent's score (+inf for the root's)
    expansions: int  # calls of ``expand`` (draft forwards or head passes)

    def q_at(self, nodes: torch.Tensor) -> torch.Tensor:
        """FloatTensor [n, V]: the q each of ``nodes`` [n] was drawn from (a verifier's ``draft_probs``)."""
        return self.q_rows[self.q_row[nodes]]


def grow_sampled_pool(root_log_q: torch.Tensor, expand: Expand, depth: int, topk: int, width: int,
                      kind: ProposalKind, generator: torch.Generator | None) -> SampledPool:
    """The pool of a sampled tree ``depth`` levels deep below a root whose children follow ``root_log_q`` [V]."""
    assert root_log_q.dim() == 1, "root_log_q must be [V]"
    dev = root_log_q.device
    replacement = kind is ProposalKind.IID

    def draw(q: torch.Tensor) -> torch.Tensor:  # [w, V] -> [w, k] children in draw order
        k = topk
        if not replacement:  # no more distinct children than q has tokens (host sync)
            k = min(topk, int((q > 0).sum(dim=-1).min()))
        return sample(q, generator, k, replacement=replacement)

    q_rows = [root_log_q[None].exp()]  # q after every expanded node, the root's first
    tokens = draw(q_rows[0])[0]
    k = tokens.numel()
    scores = root_log_q[tokens]
    parents = torch.full_like(tokens, -1)
    q_row = torch.zeros_like(tokens)  # row of q_rows each node was drawn from
    group = torch.zeros_like(tokens)
    rank = torch.arange(k, device=dev)
    group_score = [torch.full((1,), torch.inf, device=dev)]  # per level: the expanded nodes' scores [w]
    level = torch.arange(k, device=dev)
    expansions = 0
    for d in range(1, depth):  # expand nodes at depth d into depth d + 1
        nodes = level[scores[level].topk(min(width, level.numel())).indices]  # [w] pool indices
        w = nodes.numel()
        child_log_q = expand(tokens, parents, nodes, d)  # [w, V]
        expansions += 1
        n_pool, n_rows = tokens.numel(), sum(r.shape[0] for r in q_rows)
        n_groups = sum(g.numel() for g in group_score)  # one group per expanded node, the root's first
        q_rows.append(child_log_q.exp())
        child_tok = draw(q_rows[-1])  # [w, k]
        k = child_tok.shape[1]
        scores = torch.cat([scores, (scores[nodes, None] + child_log_q.gather(1, child_tok)).flatten()])
        tokens = torch.cat([tokens, child_tok.flatten()])
        parents = torch.cat([parents, nodes.repeat_interleave(k)])
        q_row = torch.cat([q_row, torch.arange(n_rows, n_rows + w, device=dev).repeat_interleave(k)])
        group = torch.cat([group, torch.arange(n_groups, n_groups + w, device=dev).repeat_interleave(k)])
        rank = torch.cat([rank, torch.arange(k, device=dev).repeat(w)])
        group_score.append(scores[nodes])
        level = torch.arange(n_pool, tokens.numel(), device=dev)
    return SampledPool(tokens, parents, scores, torch.cat(q_rows), q_row, group, rank, torch.cat(group_score),
                       expansions)


def sampled_order(pool: SampledPool) -> torch.Tensor:
    """LongTensor [P]: the order sampled nodes are taken in: groups by their parent's score (a parent's group
    before its children's, since a child never scores above its parent; stable on ties), then by draw rank. Every
    prefix is ancestor-closed and made of whole groups but the last."""
    order = torch.sort(pool.group_score, descending=True, stable=True).indices
    group_rank = torch.empty_like(order)
    group_rank[order] = torch.arange(order.numel(), device=order.device)
    return torch.argsort(group_rank[pool.group] * (int(pool.rank.max()) + 1) + pool.rank)
