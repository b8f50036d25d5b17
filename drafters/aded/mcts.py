"""ADED's draft maker: PUCT Monte-Carlo tree search over tri-gram successors, then the draft candidates it implies.

ADED (Liu, Lei, Zhang, Xu; AAAI 2025; arXiv 2407.12021), reference PyPI ``draftretriever`` 0.1.1, src/mcts_sub.rs.
A search node is a bigram state (prev, word); its children are the successors of that bigram in the tri-gram table,
with prior P = the successor's score. The root is the last two tokens of the sequence. Each iteration

  selection   descends while the node has children and the state list (root included) is shorter than
              ``sentence_length``, taking argmax Q + U with Q = score / visits (infinite while unvisited) and
              U = (c1 + ln((N + c2 + 1) / c2)) * P * sqrt(N) / (1 + visits), N = the parent's visits (AlphaZero PUCT);
  expansion   creates all children of the leaf at once and steps into one;
  rollout     extends the state list to ``sentence_length`` by sampling successors in proportion to their scores;
  backprop    adds 1 visit and reward r = 1 + sum of the tri-gram scores along the simulated sentence to every node
              from the leaf to the root.

Candidates: the ``top_k`` most visited nodes (each stands for its root-to-node path), each extended by its best
successor, deduplicated; every candidate node gets a value, its estimated chance to lie on the accepted path, and
the candidates come out best first in an ancestor-closed order, ready to be cut to a node budget.

The search needs only ``lookup(a, b) -> (tokens [m], scores [m]) | None`` (rows best first), not the table's
storage, so it runs on hand-made tables in tests. It is plain Python over small lists: a node has at most a dozen
children and a search touches a few hundred contexts, sizes where numpy's per-call overhead costs more than it saves.

Where we differ from the reference:
  - the reward reads the score of the *next* word, T[state_i][word_{i+1}]; mcts_sub.rs indexes
    ``state[i + 1].0`` (the current word again), which makes its reward almost always exactly 1;
  - children are ordered best prior first and the expansion steps into the best one (the reference iterates a hash
    map, i.e. an arbitrary order, and steps into the last child); unvisited siblings are then tried in prior order;
  - the greedy extension and all ties are deterministic (best score, then smaller token id; smaller node index);
  - the reference's ``top_k`` slots include the root sentence (dropped afterwards); here ``top_k`` counts real nodes;
  - the node values (visit shares) are our addition, to cut the draft to a node budget by expected acceptance
    instead of ``cut_to_choices`` (which drops whole paths with the most unique tokens).
Random numbers come from the caller's ``np.random.Generator``: one vector of uniforms per search.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass
from itertools import accumulate
from typing import Callable, NamedTuple

import numpy as np

from specdec.errors import InvalidInputError

Lookup = Callable[[int, int], "tuple[np.ndarray, np.ndarray] | None"]


@dataclass(frozen=True)
class MCTSConfig:
    iterations: int = 150  # simulations per drafting step (reference: 150)
    sentence_length: int = 4  # states per simulated sentence, root included: <= 3 search levels below the root
    top_k: int = 24  # most visited nodes turned into candidate paths (reference: 24)
    c1: float = 32.0  # PUCT exploration weight (reference mcts_sub.rs const c1)
    c2: float = 8.0  # PUCT visit-count scale inside the log (reference const c2)

    def __post_init__(self) -> None:
        for name, low in (("iterations", 1), ("sentence_length", 2), ("top_k", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidInputError(f"MCTS {name} must be an integer >= {low}, got {value!r}")
        if not (self.c1 >= 0 and self.c2 > 0):
            raise InvalidInputError(f"MCTS needs c1 >= 0 and c2 > 0, got c1={self.c1}, c2={self.c2}")


class Successors(NamedTuple):
    tokens: list[int]  # best first
    scores: list[float]
    cumulative: list[float]  # running sums of scores, for sampling in proportion to them


class SuccessorCache:
    """``lookup`` converted to Python lists once per context for the duration of one search."""

    def __init__(self, lookup: Lookup):
        self.lookup = lookup
        self.rows: dict[tuple[int, int], Successors | None] = {}

    def __call__(self, a: int, b: int) -> Successors | None:
        key = (a, b)
        if key in self.rows:
            return self.rows[key]
        row = self.lookup(a, b)
        out = None
        if row is not None and len(row[0]):
            scores = row[1].tolist()
            out = Successors(row[0].tolist(), scores, list(accumulate(scores)))
        self.rows[key] = out
        return out


@dataclass
class SearchTree:
    """The search tree as parallel lists; node 0 is the root (prev, word) = the last two tokens.

    The children of a node are contiguous: ``first_child[i] : first_child[i] + num_children[i]``.
    """

    tokens: list[int]  # the node's word
    prevs: list[int]  # the word before it (the node's state is (prev, word))
    parents: list[int]  # -1 for the root
    priors: list[float]  # P: the word's score after its parent's state
    visits: list[int]
    totals: list[float]  # summed rewards
    first_child: list[int]
    num_children: list[int]

    def depth(self, node: int) -> int:
        d = 0
        while node > 0:
            node, d = self.parents[node], d + 1
        return d

    def most_visited_path(self) -> list[int]:
        """Tokens below the root along the most visited child at each level (ties: the earlier child)."""
        path, node = [], 0
        while self.num_children[node]:
            s = self.first_child[node]
            node = max(range(s, s + self.num_children[node]), key=lambda c: (self.visits[c], -c))
            if not self.visits[node]:
                break
            path.append(self.tokens[node])
        return path


def search(a: int, b: int, successors: SuccessorCache, config: MCTSConfig, rng: np.random.Generator) -> SearchTree:
    """Run ``config.iterations`` PUCT simulations from the state (a, b)."""
    length_limit = config.sentence_length
    c1, c2 = config.c1, config.c2
    tokens, prevs, parents, priors = [b], [a], [-1], [0.0]
    visits, totals, first_child, num_children = [0], [0.0], [0], [0]
    tried = [0]  # children visited at least once; they are tried in order, so they are the first ones
    uniforms = rng.random(config.iterations * (length_limit - 1)).tolist()
    next_uniform = 0
    for _ in range(config.iterations):
        node, length, reward = 0, 1, 1.0  # length: states in the simulated sentence, root included
        # selection
        while num_children[node] and length < length_limit:
            start, count = first_child[node], num_children[node]
            if tried[node] < count:  # an unvisited child scores +inf: the first one wins
                child = start + tried[node]
                tried[node] += 1
            else:
                n = visits[node]
                coef = (c1 + math.log((n + c2 + 1.0) / c2)) * math.sqrt(n)
                best, child = -math.inf, start
                for c in range(start, start + count):
                    v = visits[c]
                    value = totals[c] / v + coef * priors[c] / (1 + v)
                    if value > best:
                        best, child = value, c
            node, length = child, length + 1
            reward += priors[node]
        # expansion: every child at once, then step into the best-prior one
        if length < length_limit:
            succ = successors(prevs[node], tokens[node])
            if succ is not None:
                start, count = len(tokens), len(succ.tokens)
                first_child[node], num_children[node], tried[node] = start, count, 1
                tokens += succ.tokens
                prevs += [tokens[node]] * count
                parents += [node] * count
                priors += succ.scores
                visits += [0] * count
                totals += [0.0] * count
                first_child += [0] * count
                num_children += [0] * count
                tried += [0] * count
                node, length = start, length + 1
                reward += priors[node]
        # rollout: sample successors in proportion to their scores
        pa, pb = prevs[node], tokens[node]
        while length < length_limit:
            succ = successors(pa, pb)
            if succ is None:
                break
            x = uniforms[next_uniform] * succ.cumulative[-1]
            next_uniform += 1
            i = min(bisect_left(succ.cumulative, x), len(succ.tokens) - 1)
            reward += succ.scores[i]
            pa, pb, length = pb, succ.tokens[i], length + 1
        # backpropagation
        while node >= 0:
            visits[node] += 1
            totals[node] += reward
            node = parents[node]
    return SearchTree(tokens, prevs, parents, priors, visits, totals, first_child, num_children)


@dataclass(frozen=True)
class Candidates:
    """Draft nodes best first; every prefix is ancestor-closed (a parent comes before its children).

    tokens:  token of each node
    parents: index of the parent in these lists, -1 below the root
    values:  estimated chance that the node lies on the accepted path: the search node's share of the root's
             visits, or, for a node the search did not visit (greedy extensions, untried children), its parent's
             value times the node's score normalised over the parent's successors. Non-increasing down every path.
    depths:  1 for children of the root
    """

    tokens: list[int]
    parents: list[int]
    values: list[float]
    depths: list[int]

    def __len__(self) -> int:
        return len(self.tokens)


def extract(tree: SearchTree, successors: SuccessorCache, top_k: int) -> Candidates:
    """The ``top_k`` most visited nodes plus one greedy extension each, deduplicated, best first."""
    ranked = sorted(range(1, len(tree.tokens)), key=lambda i: (-tree.visits[i], i))[:top_k]
    # Parents are visited at least as often as children and created before them: ``ranked`` is ancestor-closed.
    root_visits = max(tree.visits[0], 1)
    tokens: list[int] = []
    parents: list[int] = []
    values: list[float] = []
    depths: list[int] = []
    states: list[tuple[int, int]] = []  # (prev, word) of each candidate
    index_of = {0: -1}  # search node -> candidate index
    children: dict[tuple[int, int], int] = {}  # (candidate parent, token) -> candidate

    def add(parent: int, token: int, value: float, prev: int) -> int:
        children[(parent, token)] = len(tokens)
        tokens.append(token)
        parents.append(parent)
        values.append(value)
        depths.append(depths[parent] + 1 if parent >= 0 else 1)
        states.append((prev, token))
        return len(tokens) - 1

    for node in sorted(ranked):  # node index order: parents first
        parent = index_of[tree.parents[node]]
        if tree.visits[node]:
            value = tree.visits[node] / root_visits
        else:  # an untried child of an expanded node
            pa = tree.parents[node]
            succ = successors(tree.prevs[pa], tree.tokens[pa])
            share = tree.priors[node] / succ.cumulative[-1] if succ is not None and succ.cumulative[-1] > 0 else 0.0
            value = (values[parent] if parent >= 0 else 1.0) * share
        index_of[node] = add(parent, tree.tokens[node], value, tree.prevs[node])
    for cand in range(len(tokens)):  # one greedy extension per kept node
        succ = successors(*states[cand])
        if succ is None or (cand, succ.tokens[0]) in children:
            continue
        total = succ.cumulative[-1]
        add(cand, succ.tokens[0], values[cand] * (succ.scores[0] / total if total > 0 else 0.0), states[cand][1])

    order = sorted(range(len(tokens)), key=lambda i: (-values[i], depths[i], i))
    position = {old: new for new, old in enumerate(order)}
    return Candidates([tokens[i] for i in order], [position[parents[i]] if parents[i] >= 0 else -1 for i in order],
                      [values[i] for i in order], [depths[i] for i in order])


def draft_candidates(a: int, b: int, lookup: Lookup, config: MCTSConfig, rng: np.random.Generator) -> Candidates:
    """Search from the state (a, b) and return its candidates, best first."""
    successors = SuccessorCache(lookup)
    return extract(search(a, b, successors, config, rng), successors, config.top_k)
