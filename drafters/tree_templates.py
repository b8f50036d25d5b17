"""Static draft-tree templates: a tree given as paths of child *ranks* below the root.

A path ``(0, 2)`` is the third candidate after the best candidate of the root. Token Recycling fills a template from
its adjacency matrix (node token = A[parent token, rank]); Medusa-style heads would fill it from per-depth top-k.
``TEMPLATE_2_2_2`` is Token Recycling's tree "2.2.2" (Luo et al., arXiv 2408.08696; repo Luowaterbi/TokenRecycling,
model/recycling/tree_template_.py): 80 nodes on 6 levels of widths 8, 21, 25, 15, 8, 3.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import torch

from specdec.errors import InvalidInputError

Path = tuple[int, ...]

TEMPLATE_2_2_2: tuple[Path, ...] = (
    # level 1 (8)
    (0,), (1,), (2,), (3,), (4,), (5,), (6,), (7,),
    # level 2 (21)
    (0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (0, 6), (0, 7), (1, 0), (1, 1), (1, 2), (1, 3),
    (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (4, 0), (5, 0), (6, 0), (7, 0),
    # level 3 (25)
    (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 0, 4), (0, 0, 5), (0, 0, 6), (0, 0, 7),
    (0, 1, 0), (0, 1, 1), (0, 1, 2), (0, 2, 0), (0, 2, 1), (0, 3, 0), (0, 4, 0), (0, 5, 0), (0, 6, 0), (0, 7, 0),
    (1, 0, 0), (1, 0, 1), (1, 1, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0), (5, 0, 0),
    # level 4 (15)
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 2), (0, 0, 0, 3), (0, 0, 0, 4), (0, 0, 1, 0), (0, 0, 1, 1),
    (0, 0, 2, 0), (0, 0, 3, 0), (0, 0, 4, 0), (0, 1, 0, 0), (0, 2, 0, 0), (1, 0, 0, 0), (2, 0, 0, 0), (3, 0, 0, 0),
    # level 5 (8)
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 0, 2), (0, 0, 0, 1, 0), (0, 0, 0, 2, 0), (0, 0, 1, 0, 0),
    (0, 1, 0, 0, 0), (1, 0, 0, 0, 0),
    # level 6 (3)
    (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1), (0, 0, 0, 1, 0, 0),
)


def build_template(branching: Sequence[int]) -> tuple[Path, ...]:
    """The full tree with ``branching[d]`` children below every node of depth d (the root has depth 0);
    ``build_template([1] * 5)`` is a chain of 5, ``build_template([4, 2])`` 4 + 8 nodes."""
    if not branching or any(int(b) < 1 for b in branching):
        raise InvalidInputError(f"template branching must be a non-empty list of counts >= 1, got {list(branching)}")
    paths: list[Path] = []
    for depth in range(1, len(branching) + 1):
        paths += itertools.product(*(range(int(b)) for b in branching[:depth]))
    return tuple(paths)


@dataclass(frozen=True)
class CompiledTemplate:
    """A template as index tensors (CPU), nodes in breadth-first order: by depth, then lexicographically.

    paths:      the template's paths in node order
    parents:    LongTensor [N] parent node index, -1 below the root
    ranks:      LongTensor [N] child rank (column of the adjacency matrix) of each node
    depths:     LongTensor [N] depth of each node (1 = child of the root)
    levels:     (start, end) node range of each depth, shallowest first
    path_nodes: LongTensor [N, D] node index at depth 1..D on the path to each node, -1 past its depth
    """

    paths: tuple[Path, ...]
    parents: torch.Tensor
    ranks: torch.Tensor
    depths: torch.Tensor
    levels: tuple[tuple[int, int], ...]
    path_nodes: torch.Tensor

    @property
    def size(self) -> int:
        return len(self.paths)

    @property
    def max_rank(self) -> int:
        return int(self.ranks.max()) if self.size else -1


def compile_template(paths: Sequence[Sequence[int]]) -> CompiledTemplate:
    """Check a template (non-empty paths of ranks >= 0, no repeats, every prefix present) and index it."""
    clean = [tuple(int(r) for r in p) for p in paths]
    if not clean:
        raise InvalidInputError("a tree template needs at least one path")
    if any(not p or min(p) < 0 for p in clean):
        raise InvalidInputError("every template path must be a non-empty sequence of child ranks >= 0")
    if len(set(clean)) != len(clean):
        raise InvalidInputError("a tree template lists a path twice")
    ordered = sorted(clean, key=lambda p: (len(p), p))
    index = {p: i for i, p in enumerate(ordered)}
    missing = [p for p in ordered if len(p) > 1 and p[:-1] not in index]
    if missing:
        raise InvalidInputError(f"tree template path {missing[0]} has no parent path {missing[0][:-1]}")
    parents = [index[p[:-1]] if len(p) > 1 else -1 for p in ordered]
    depth = max(len(p) for p in ordered)
    path_nodes = [[index[p[:d]] for d in range(1, len(p) + 1)] + [-1] * (depth - len(p)) for p in ordered]
    starts = [next(i for i, p in enumerate(ordered) if len(p) == d) for d in range(1, depth + 1)]
    levels = tuple(zip(starts, starts[1:] + [len(ordered)]))
    return CompiledTemplate(
        paths=tuple(ordered),
        parents=torch.tensor(parents, dtype=torch.long),
        ranks=torch.tensor([p[-1] for p in ordered], dtype=torch.long),
        depths=torch.tensor([len(p) for p in ordered], dtype=torch.long),
        levels=levels,
        path_nodes=torch.tensor(path_nodes, dtype=torch.long),
    )
