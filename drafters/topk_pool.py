"""Greedy draft trees: EAGLE-2's dynamic top-k tree (Li et al. 2024, arXiv 2406.16858), grown as a candidate pool.

Shared by every drafter that grows greedy trees level by level (``draft-model`` with its own model, the trained
heads with theirs), beside :mod:`specdec.drafters.sampled_pool` for sampled trees. Before each level the drafter's
length policy (:mod:`specdec.draft_length`, the one place that decides how deep to draft) sees the best path so
far and may stop; otherwise the ``width`` frontier nodes of highest cumulative log q are expanded, each into its
``topk`` most probable children (fewer where q has fewer tokens). The drafter then keeps the best nodes of the
pool (:meth:`TopkPool.best_first`): a child never scores above its parent, so every prefix of that order is
ancestor-closed. Where we differ from EAGLE-2: the confidence is the drafter's own q (its model's or heads'), and the
depth comes from the length policy rather than a fixed number of levels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from specdec.draft_length import DepthSignal, StopReason

# (pool tokens [P], pool parents [P], nodes [w] to expand, depth d of those nodes) -> log q of their children [w, V]
Expand = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
# (levels drafted so far, pool scores [P], pool parents [P], newest level's pool indices [l]) -> a reason to stop
Stop = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], "StopReason | None"]


@dataclass(frozen=True)
class TopkPool:
    """Candidate nodes in creation order (parents before children)."""

    tokens: torch.Tensor  # LongTensor [P] token ids
    parents: torch.Tensor  # LongTensor [P] pool index of the parent, -1 below the root
    scores: torch.Tensor  # FloatTensor [P] cumulative log q of the path
    expansions: int  # calls of ``expand`` (draft forwards or head passes)
    stop_reason: StopReason  # why the pool stopped growing deeper

    def best_first(self) -> torch.Tensor:
        """LongTensor [P]: nodes by score, descending; the stable sort keeps a parent before an equal child."""
        return torch.sort(self.scores, descending=True, stable=True).indices


def grow_topk_pool(root_log_q: torch.Tensor, expand: Expand, depth: int, topk: int, width: int,
                   stop: Stop) -> TopkPool:
    """The greedy pool at most ``depth`` levels deep below a root whose children follow ``root_log_q`` [V]."""
    assert root_log_q.dim() == 1, "root_log_q must be [V]"
    dev = root_log_q.device
    k = min(topk, int(torch.isfinite(root_log_q).sum()))
    scores, tokens = root_log_q.topk(k)
    parents = torch.full((k,), -1, dtype=torch.long, device=dev)
    level = torch.arange(k, device=dev)  # pool indices of the newest level
    expansions = 0
    reason = StopReason.MAX_DEPTH
    for d in range(1, depth):  # expand nodes at depth d into depth d + 1
        reason = stop(d, scores, parents, level)
        if reason is not None:
            break
        reason = StopReason.MAX_DEPTH
        nodes = level[scores[level].topk(min(width, level.numel())).indices]  # [w] pool indices, best first
        child = expand(tokens, parents, nodes, d)  # [w, V]
        expansions += 1
        kc = min(topk, int(torch.isfinite(child).sum(-1).min()))
        child_logp, child_tok = child.topk(kc)  # [w, kc]
        n_pool = tokens.numel()
        scores = torch.cat([scores, (scores[nodes, None] + child_logp).flatten()])
        tokens = torch.cat([tokens, child_tok.flatten()])
        parents = torch.cat([parents, nodes.repeat_interleave(kc)])
        level = torch.arange(n_pool, tokens.numel(), device=dev)
    return TopkPool(tokens, parents, scores, expansions, reason)


def path_signal(drafted: int, scores: torch.Tensor, parents: torch.Tensor, level: torch.Tensor,
                accept_prob: torch.Tensor | None = None, draft_seconds: float = 0.0) -> DepthSignal:
    """What a length policy sees after ``drafted`` levels: the best path's probability and its newest token's,
    and (SpecDec++) ``accept_prob``, the predicted acceptance of the tokens fed so far (a 0-d tensor; no host sync
    until here). One host sync."""
    best = level[scores[level].argmax()]
    parent = parents[best]
    last = torch.where(parent >= 0, scores[best] - scores[parent.clamp(min=0)], scores[best])
    values = torch.stack([scores[best], last]).exp().float()
    if accept_prob is not None:
        values = torch.cat([values, accept_prob.float().reshape(1)])
    read = values.tolist()
    return DepthSignal(drafted, read[0], read[1], read[2] if accept_prob is not None else None, draft_seconds)
