"""Draft trees and the buffers that verify them in one target forward.

A draft is a tree of candidate tokens hanging below the *root*: the newest decided token, which the target has
not yet seen. Nodes are stored in topological order (a parent comes before its children) with ``parents[i] = -1``
for children of the root. A chain of k tokens is the tree with ``parents = [-1, 0, 1, ..., k-2]``.

For verification the target reads ``[root, node_0, ..., node_{n-1}]`` ("slots" 0..n) on top of its KV cache:
slot ``s`` attends to the whole cache and to the slots of its ancestors and itself (ancestor mask), at position
``prefix_len + depth(s)``. This is the buffer layout of Medusa's ``generate_medusa_buffers`` (Cai et al. 2024,
arXiv 2401.10774) and SpecInfer's tree attention (Miao et al. 2024, arXiv 2305.09781), built here from parent
indices with one vectorised step per tree level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch


class ProposalKind(str, Enum):
    """How a drafter chose sibling tokens; sampling verifiers pick the matching rejection rule."""

    POINT_MASS = "point_mass"  # deterministic choice (top-k, lookup): verified as a point-mass proposal
    IID = "iid"  # children drawn i.i.d. from the draft distribution
    WITHOUT_REPLACEMENT = "without_replacement"  # children drawn from q without replacement


@dataclass(frozen=True)
class DraftTree:
    """Candidate tokens below the root.

    tokens:  LongTensor [n]   token id of each node
    parents: LongTensor [n]   index of the parent node, -1 for the root; parents[i] < i
    draft_probs: optional FloatTensor [n, V]: the drafter's (warped) distribution q at each node's parent, the one the
                 node was proposed from; needed only by sampling verifiers.
    stop_reason: why a sequential drafter stopped drafting deeper (specdec.draft_length.StopReason), for the stats.
    budget: the node budget a drafter that sizes its trees chose for this proposal (``drafters/tree_budget.py``);
            None for drafters that do not size trees. The engine records it in ``stats.tree_budgets``.
    memo: the drafter's own record of how it built this proposal (any object; None for stateless drafters). It
          travels with the tree and comes back in ``Drafter.observe`` as ``outcome.tree.memo``, so a drafter keeps
          nothing about a proposal on ``self`` and may draft ahead before an earlier proposal is observed
          (``SpecEngine(overlap=True)``).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    draft_probs: torch.Tensor | None = None
    proposal: ProposalKind = ProposalKind.POINT_MASS
    stop_reason: str | None = None
    memo: object = field(default=None, repr=False, compare=False)
    budget: int | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        assert self.tokens.dim() == 1 and self.parents.shape == self.tokens.shape, "tokens/parents must be [n]"
        if self.tokens.numel():
            idx = torch.arange(self.tokens.numel(), device=self.parents.device)
            if bool((self.parents >= idx).any()) or bool((self.parents < -1).any()):
                raise ValueError("draft tree nodes must be in topological order (-1 <= parents[i] < i)")

    # ------------------------------------------------------------------ construction
    def with_stop_reason(self, reason: "str | None") -> "DraftTree":
        """The same tree (tensors shared) carrying why its drafter stopped (specdec.draft_length)."""
        return DraftTree(self.tokens, self.parents, self.draft_probs, self.proposal, reason, self.memo, self.budget)

    def with_memo(self, memo: object) -> "DraftTree":
        """The same tree (tensors shared) carrying the drafter's ``memo``."""
        return DraftTree(self.tokens, self.parents, self.draft_probs, self.proposal, self.stop_reason, memo,
                         self.budget)

    def with_budget(self, budget: "int | None") -> "DraftTree":
        """The same tree (tensors shared) carrying the node ``budget`` its drafter chose."""
        return DraftTree(self.tokens, self.parents, self.draft_probs, self.proposal, self.stop_reason, self.memo,
                         budget)

    def _like(self, tokens: torch.Tensor, parents: torch.Tensor, draft_probs: "torch.Tensor | None") -> "DraftTree":
        """Other nodes, this tree's proposal kind, stop reason, memo and budget."""
        return DraftTree(tokens, parents, draft_probs, self.proposal, self.stop_reason, self.memo, self.budget)

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> "DraftTree":
        z = torch.zeros(0, dtype=torch.long, device=device)
        return DraftTree(z, z.clone())

    @staticmethod
    def chain(tokens: torch.Tensor, draft_probs: torch.Tensor | None = None,
              proposal: ProposalKind = ProposalKind.POINT_MASS) -> "DraftTree":
        tokens = tokens.reshape(-1).long()
        parents = torch.arange(-1, tokens.numel() - 1, device=tokens.device)
        return DraftTree(tokens, parents, draft_probs, proposal)

    @staticmethod
    def from_paths(paths: list[list[int]], device: torch.device | str = "cpu") -> "DraftTree":
        """Build a tree from token paths below the root (shared prefixes are merged)."""
        index: dict[tuple[int, ...], int] = {}
        tokens: list[int] = []
        parents: list[int] = []
        for path in sorted(paths, key=len):
            for d in range(1, len(path) + 1):
                key = tuple(path[:d])
                if key not in index:
                    index[key] = len(tokens)
                    tokens.append(int(path[d - 1]))
                    parents.append(index[key[:-1]] if d > 1 else -1)
        return DraftTree(torch.tensor(tokens, dtype=torch.long, device=device),
                         torch.tensor(parents, dtype=torch.long, device=device))

    # ------------------------------------------------------------------ derived buffers
    @property
    def size(self) -> int:
        return int(self.tokens.numel())

    @property
    def depths(self) -> torch.Tensor:
        """LongTensor [n]: depth of each node (children of the root have depth 1)."""
        if "depths" not in self._cache:
            self._build()
        return self._cache["depths"]

    @property
    def ancestors(self) -> torch.Tensor:
        """BoolTensor [n+1, n+1] over slots (slot 0 = root): True where column is row's ancestor or itself."""
        if "ancestors" not in self._cache:
            self._build()
        return self._cache["ancestors"]

    @property
    def max_depth(self) -> int:
        return int(self.depths.max()) if self.size else 0

    def _build(self) -> None:
        n = self.size
        dev = self.parents.device
        slot_parent = self.parents + 1  # parent slot of node slot i+1
        anc = torch.zeros(n + 1, n + 1, dtype=torch.bool, device=dev)
        anc[:, 0] = True
        anc[0, 0] = True
        depths = torch.zeros(n, dtype=torch.long, device=dev)
        if n:
            # One vectorised step per level: nodes whose parent is already placed get their parent's row.
            placed = torch.zeros(n + 1, dtype=torch.bool, device=dev)
            placed[0] = True
            slots = torch.arange(1, n + 1, device=dev)
            level = 1
            remaining = torch.ones(n, dtype=torch.bool, device=dev)
            while bool(remaining.any()):
                ready = remaining & placed[slot_parent]
                rs = slots[ready]
                anc[rs] = anc[slot_parent[ready]]
                anc[rs, rs] = True
                depths[ready] = level
                placed[rs] = True
                remaining &= ~ready
                level += 1
        self._cache["ancestors"] = anc
        self._cache["depths"] = depths

    def slot_positions(self, prefix_len: int) -> torch.Tensor:
        """LongTensor [n+1]: position ids of root and nodes (prefix_len + depth)."""
        zero = torch.zeros(1, dtype=torch.long, device=self.parents.device)
        return prefix_len + torch.cat([zero, self.depths])

    def leaves(self) -> torch.Tensor:
        """LongTensor [m]: node indices that are nobody's parent."""
        is_parent = torch.zeros(self.size, dtype=torch.bool, device=self.parents.device)
        has = self.parents >= 0
        is_parent[self.parents[has]] = True
        return torch.nonzero(~is_parent).flatten()

    def retrieve_paths(self) -> torch.Tensor:
        """LongTensor [leaves, max_depth]: node indices from depth 1 to each leaf, padded with -1."""
        leaves = self.leaves()
        out = torch.full((leaves.numel(), self.max_depth), -1, dtype=torch.long, device=self.parents.device)
        anc = self.ancestors[leaves + 1, 1:]  # [m, n] nodes on each root-to-leaf path
        node_depth = self.depths.expand_as(anc)
        rows, cols = torch.nonzero(anc, as_tuple=True)
        out[rows, node_depth[rows, cols] - 1] = cols
        return out

    def path_to(self, node: int) -> torch.Tensor:
        """LongTensor [depth(node)]: node indices from depth 1 down to ``node`` (empty for the root, node = -1)."""
        if node < 0:
            return torch.zeros(0, dtype=torch.long, device=self.parents.device)
        on_path = torch.nonzero(self.ancestors[node + 1, 1:]).flatten()
        return on_path[torch.argsort(self.depths[on_path])]

    def prune(self, keep: torch.Tensor) -> tuple["DraftTree", torch.Tensor]:
        """Keep the nodes where ``keep`` [n] is True (must be ancestor-closed); returns the tree and, for each of
        its nodes, the index it had here."""
        kept = torch.nonzero(keep).flatten()
        par = self.parents[kept]
        new_par = kept_parents(par, kept, self.size)
        if bool((new_par[par >= 0] < 0).any()):
            raise ValueError("pruning must keep every ancestor of a kept node")
        probs = None if self.draft_probs is None else self.draft_probs[kept]
        return self._like(self.tokens[kept], new_par, probs), kept

    def to(self, device: torch.device | str) -> "DraftTree":
        """This tree on ``device``; the same object (with its built buffers) when it is already there."""
        if self.tokens.device == torch.device(device):
            return self
        probs = None if self.draft_probs is None else self.draft_probs.to(device)
        return self._like(self.tokens.to(device), self.parents.to(device), probs)

    # ------------------------------------------------------------------ drafting ahead (SpecEngine overlap mode)
    def main_path(self) -> torch.Tensor:
        """LongTensor [d]: node indices of the drafter's first guess, from depth 1 down: the first child of the root,
        then each node's first child (children keep their drafter's order, best first), to a node without one."""
        if self.size == 0:
            return torch.zeros(0, dtype=torch.long, device=self.parents.device)
        first_child = torch.full((self.size + 1,), -1, dtype=torch.long, device=self.parents.device)  # by slot
        idx = torch.arange(self.size, device=self.parents.device)
        first_child.scatter_reduce_(0, self.parents + 1, idx, reduce="amin", include_self=False)
        return self.path_to(int(_follow(first_child.tolist())))

    def subtree(self, node: int) -> tuple["DraftTree", torch.Tensor]:
        """The nodes below ``node`` as a tree of their own (``node`` becomes its root) and, for each of its nodes,
        the index it has here. Proposal kind and memo are kept; draft_probs follow their nodes."""
        below = self.ancestors[1:, node + 1].clone()  # [n]: node itself and its descendants
        below[node] = False
        kept = torch.nonzero(below).flatten()
        new_par = kept_parents(self.parents[kept], kept, self.size)  # ``node`` is not kept: its children get -1
        probs = None if self.draft_probs is None else self.draft_probs[kept]
        return self._like(self.tokens[kept], new_par, probs), kept

    def graft(self, other: "DraftTree", under: int) -> "DraftTree":
        """This tree with the children of ``other``'s root (its depth-1 nodes) hung below node ``under`` (-1: below
        the root), appended after this tree's nodes. Both must be the same proposal kind (or one of them empty), and
        both carry draft_probs or neither."""
        first = torch.nonzero(other.parents < 0).flatten()
        if first.numel() == 0:
            return self
        if self.size == 0:
            return other.prune(other.parents < 0)[0]
        if other.proposal != self.proposal or (other.draft_probs is None) != (self.draft_probs is None):
            raise ValueError(f"cannot graft a {other.proposal.value} proposal below a {self.proposal.value} one")
        tokens = torch.cat([self.tokens, other.tokens[first].to(self.tokens.device)])
        parents = torch.cat([self.parents, torch.full((first.numel(),), under, dtype=torch.long,
                                                      device=self.parents.device)])
        probs = None if self.draft_probs is None else \
            torch.cat([self.draft_probs, other.draft_probs[first].to(self.draft_probs.device)])
        return self._like(tokens, parents, probs)


def kept_parents(parents: torch.Tensor, kept: torch.Tensor, size: int) -> torch.Tensor:
    """LongTensor [k]: ``parents`` [k] (indices among ``size`` nodes, -1 = the root) of the nodes ``kept`` [k]
    (increasing node indices) as indices into ``kept``; a parent that is not kept becomes -1 (the new root).

    The one re-indexing behind pruning a tree, cutting a subtree, and keeping a drafter's chosen pool nodes."""
    remap = torch.full((size,), -1, dtype=torch.long, device=kept.device)
    remap[kept] = torch.arange(kept.numel(), device=kept.device)
    parents = parents.to(kept.device)
    return torch.where(parents >= 0, remap[parents.clamp(min=0)], parents)


def _follow(first_child: list[int]) -> int:
    """The last node reached from the root slot by following ``first_child`` (by slot; -1 = none): a node index."""
    slot = 0
    while first_child[slot] >= 0:
        slot = first_child[slot] + 1
    return slot - 1
