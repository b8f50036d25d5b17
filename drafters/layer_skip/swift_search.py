"""SWIFT's layer-set search: which sub-layers the draft skips, chosen online by matchness (arXiv 2410.06916, §3.2).

A layer set is an indicator vector x in {0, 1}^D over the D = 2(L - 2) skippable sub-layers (attention and MLP of
layers 1 .. L-2, interleaved: entry 2(l-1) is layer l's attention, 2(l-1)+1 its MLP) with exactly k ones. The
search alternates random proposals with a Bayesian-optimisation proposal every ``bayes_interval`` iterations: a
Gaussian process with an RBF kernel over the evaluated sets and their scores, maximising the upper confidence bound
mean + kappa * std over candidate sets. The caller scores each proposal (SWIFT: matchness of the skipped model on
recent tokens) and registers it; the best set so far is kept.

Where we differ from the paper's code (hemingkx/SWIFT, which uses the ``bayes_opt`` package):
- random proposals are local moves (``mutations`` skipped sub-layers swapped for kept ones in the best set) rather
  than uniform k-subsets: our iteration budget is tens, not the paper's 1000, and uniform draws from C(52, 23)
  sets almost never beat a decent incumbent in so few tries;
- the GP is fitted to the evaluated indicator vectors themselves (fixed length scale, standardised scores) and
  its UCB is maximised over discrete candidates (random k-subsets and one-swap neighbours of the best set) instead
  of over [0, 1]^D followed by a top-k rounding, so every proposal is a valid set and none is evaluated twice while
  unseen sets remain.
Randomness comes from a private ``torch.Generator`` seeded by the caller; nothing touches the global RNG.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from specdec.errors import InvalidInputError
from specdec.files import write_json_atomic
from specdec.drafters.layer_skip.runner import SkipPlan


# ---------------------------------------------------------------------------------------------- sub-layer encoding
def skippable_count(num_layers: int) -> int:
    """D = 2(L - 2): attention and MLP of every layer but the first and the last."""
    return max(0, 2 * (num_layers - 2))


def plan_from_indicator(x: torch.Tensor) -> SkipPlan:
    """The SkipPlan of indicator ``x`` [D] (bool)."""
    chosen = torch.nonzero(x).flatten().tolist()
    return SkipPlan(frozenset(1 + j // 2 for j in chosen if j % 2 == 0),
                    frozenset(1 + j // 2 for j in chosen if j % 2 == 1))


def indicator_from_plan(plan: SkipPlan, num_layers: int) -> torch.Tensor:
    """BoolTensor [D]: ``plan`` as an indicator (sub-layers of the first/last layer cannot be represented)."""
    x = torch.zeros(skippable_count(num_layers), dtype=torch.bool)
    for layers, offset in ((plan.skip_attention, 0), (plan.skip_mlp, 1)):
        for layer in layers:
            if not 1 <= layer <= num_layers - 2:
                raise InvalidInputError(f"layer {layer} is not skippable in the search space (layers 1..L-2)")
            x[2 * (layer - 1) + offset] = True
    return x


def initial_indicator(num_layers: int, num_skip: int) -> torch.Tensor:
    """BoolTensor [D]: SWIFT's initial set, the sub-layers of the odd layers 1, 3, ..., thinned evenly to
    ``num_skip`` (or topped up evenly from the even layers when it needs more)."""
    d = skippable_count(num_layers)
    x = torch.zeros(d, dtype=torch.bool)
    if num_skip == 0:
        return x
    j = torch.arange(d)
    odd = j[((j // 2 + 1) % 2) == 1]  # sub-layers of odd layers
    rest = j[((j // 2 + 1) % 2) == 0]
    if num_skip <= odd.numel():
        x[odd[torch.linspace(0, odd.numel() - 1, num_skip).round().long()]] = True
    else:
        x[odd] = True
        more = num_skip - odd.numel()
        x[rest[torch.linspace(0, rest.numel() - 1, more).round().long()]] = True
    return x


# ---------------------------------------------------------------------------------------------- GP-UCB
class GaussianProcessUCB:
    """GP regression with an RBF kernel on indicator vectors; ``ucb`` ranks candidates by mean + kappa * std.

    Scores are standardised before fitting (as ``bayes_opt``'s normalize_y), so mean and std are in units of the
    observed scores' spread; only the ranking matters.
    """

    def __init__(self, length_scale: float = 2.0, noise: float = 1e-2, kappa: float = 2.5):
        self.length_scale = length_scale  # RBF width in Hamming-distance units: one swap = squared distance 2
        self.noise = noise  # the paper's GP alpha: matchness on a sliding window is a noisy score
        self.kappa = kappa  # exploration weight of the UCB (paper: 2.5)
        self._x: torch.Tensor | None = None
        self._alpha: torch.Tensor | None = None
        self._chol: torch.Tensor | None = None

    def _kernel(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * self.length_scale ** 2))  # [m, c]

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """``x`` [m, D] evaluated sets, ``y`` [m] their scores."""
        x, y = x.double(), y.double()
        spread = y.std() if y.numel() > 1 and float(y.std()) > 0 else torch.ones((), dtype=torch.float64)
        y = (y - y.mean()) / spread
        k = self._kernel(x, x) + self.noise * torch.eye(x.shape[0], dtype=torch.float64)
        self._chol = torch.linalg.cholesky(k)
        self._alpha = torch.cholesky_solve(y[:, None], self._chol)  # [m, 1]
        self._x = x

    def posterior(self, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [c], std [c]) of the posterior at ``candidates`` [c, D], in standardised score units."""
        assert self._x is not None, "fit the GP first"
        kq = self._kernel(self._x, candidates.double())  # [m, c]
        mean = (kq * self._alpha).sum(0)
        v = torch.cholesky_solve(kq, self._chol)  # K^-1 k
        var = (1.0 - (kq * v).sum(0)).clamp(min=0.0)  # prior variance 1 (RBF at distance 0)
        return mean, var.sqrt()

    def ucb(self, candidates: torch.Tensor) -> torch.Tensor:
        """FloatTensor [c]: mean + kappa * std of the posterior at ``candidates`` [c, D]."""
        mean, std = self.posterior(candidates)
        return mean + self.kappa * std


# ---------------------------------------------------------------------------------------------- the search
@dataclass(frozen=True)
class SearchConfig:
    max_iterations: int = 40  # total evaluations (paper: 1000); each costs a partial forward over `window` tokens
    target_score: float = 0.95  # stop once the best matchness reaches this (paper: 0.95; its script 0.93); > 1: never
    patience: int = 20  # stop after this many evaluations without improvement (paper: 300)
    bayes_interval: int = 5  # every n-th evaluation is a GP-UCB proposal (paper: 25 of 1000)
    mutations: int = 2  # skipped sub-layers swapped per random proposal
    candidates: int = 256  # random k-subsets scored by the UCB per Bayesian proposal, beside the one-swap neighbours
    length_scale: float = 2.0  # GP RBF length scale (see GaussianProcessUCB)
    kappa: float = 2.5  # UCB exploration weight (paper: 2.5)
    noise: float = 1e-2  # GP noise (paper: alpha 1e-2)

    def __post_init__(self) -> None:
        for name in ("max_iterations", "patience", "mutations", "candidates"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"search {name} must be >= 1, got {getattr(self, name)}")
        if self.bayes_interval < 0:
            raise InvalidInputError(f"bayes_interval must be >= 0 (0 = random search only), got {self.bayes_interval}")
        if not self.length_scale > 0 or self.kappa < 0 or not self.noise > 0:
            raise InvalidInputError("the GP needs length_scale > 0, kappa >= 0 and noise > 0")


class LayerSetSearch:
    """Propose / register loop over k-subsets of D sub-layers, starting from ``initial`` [D] (bool, k ones)."""

    def __init__(self, initial: torch.Tensor, config: SearchConfig, seed: int = 0):
        self.config = config
        self.dim = initial.numel()
        self.num_skip = int(initial.sum())
        self.generator = torch.Generator().manual_seed(seed)
        self.gp = GaussianProcessUCB(config.length_scale, config.noise, config.kappa)
        self.best = initial.clone()  # [D] bool
        self.best_score = -math.inf
        self.first_score: float | None = None  # score of the initial set
        self.iterations = 0
        self.since_improvement = 0
        self._xs: list[torch.Tensor] = []  # evaluated sets, each [D] bool
        self._ys: list[float] = []  # their scores

    @property
    def done(self) -> bool:
        c = self.config
        trivial = self.num_skip in (0, self.dim)  # a single possible set
        return (trivial and self.iterations > 0) or self.iterations >= c.max_iterations \
            or self.best_score >= c.target_score or self.since_improvement >= c.patience

    def propose(self) -> torch.Tensor:
        """BoolTensor [D] with ``num_skip`` ones: the next set to score (the initial set first)."""
        if self.iterations == 0:
            return self.best.clone()
        interval = self.config.bayes_interval
        if interval and self.iterations % interval == 0 and len(self._ys) >= 2:
            return self.bayes_proposal()
        return self.random_proposal()

    def register(self, x: torch.Tensor, score: float) -> bool:
        """Record the score of set ``x`` [D]; True when it became the best."""
        x = x.bool().cpu()
        self._xs.append(x)
        self._ys.append(float(score))
        if self.first_score is None:
            self.first_score = float(score)
        self.iterations += 1
        if score > self.best_score:
            self.best, self.best_score, self.since_improvement = x.clone(), float(score), 0
            return True
        self.since_improvement += 1
        return False

    def seen(self, sets: torch.Tensor) -> torch.Tensor:
        """BoolTensor [c]: which of ``sets`` [c, D] were evaluated already."""
        if not self._xs:
            return torch.zeros(sets.shape[0], dtype=torch.bool)
        return (sets[:, None, :] == torch.stack(self._xs)[None]).all(-1).any(-1)

    # ------------------------------------------------------------------ proposals
    def random_proposal(self, tries: int = 8) -> torch.Tensor:
        """The best set with ``mutations`` skipped sub-layers swapped for kept ones (an unseen set if one is found)."""
        x = self.best
        for _ in range(tries):
            x = self._mutate(self.best)
            if not bool(self.seen(x[None])[0]):
                break
        return x

    def _mutate(self, base: torch.Tensor) -> torch.Tensor:
        on, off = torch.nonzero(base).flatten(), torch.nonzero(~base).flatten()
        m = min(self.config.mutations, on.numel(), off.numel())
        x = base.clone()
        if m == 0:
            return x
        x[on[torch.randperm(on.numel(), generator=self.generator)[:m]]] = False
        x[off[torch.randperm(off.numel(), generator=self.generator)[:m]]] = True
        return x

    def bayes_proposal(self) -> torch.Tensor:
        """The unseen candidate set with the highest GP-UCB (random k-subsets + one-swap neighbours of the best)."""
        self.gp.fit(torch.stack(self._xs).double(), torch.tensor(self._ys, dtype=torch.float64))
        cands = torch.cat([self._random_subsets(self.config.candidates), self._neighbours(self.best)])  # [c, D]
        unseen = ~self.seen(cands)
        if bool(unseen.any()):
            cands = cands[unseen]
        return cands[int(self.gp.ucb(cands.double()).argmax())].clone()

    def _random_subsets(self, count: int) -> torch.Tensor:
        order = torch.rand(count, self.dim, generator=self.generator).argsort(dim=1)[:, :self.num_skip]
        x = torch.zeros(count, self.dim, dtype=torch.bool)
        return x.scatter_(1, order, True)  # [count, D]

    def _neighbours(self, base: torch.Tensor) -> torch.Tensor:
        on, off = torch.nonzero(base).flatten(), torch.nonzero(~base).flatten()
        rows = on.numel() * off.numel()
        x = base.repeat(rows, 1)  # [on * off, D]
        r = torch.arange(rows)
        x[r, on.repeat_interleave(off.numel())] = False
        x[r, off.repeat(on.numel())] = True
        return x


# ---------------------------------------------------------------------------------------------- saved layer sets
def load_layer_set(path: str, model_key: str, task: str) -> SkipPlan | None:
    """The plan saved under ``[model_key][task]`` in the JSON file ``path``; None when absent."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            entry = json.load(f).get(model_key, {}).get(task)
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise InvalidInputError(f"cannot read the layer-set file {path!r}: {e}") from e
    if entry is None:
        return None
    return SkipPlan(frozenset(entry["skip_attention"]), frozenset(entry["skip_mlp"]))


def save_layer_set(path: str, model_key: str, task: str, plan: SkipPlan, score: float | None = None) -> None:
    """Write ``plan`` under ``[model_key][task]`` in the JSON file ``path``, keeping its other entries (atomic)."""
    data: dict = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise InvalidInputError(f"cannot read the layer-set file {path!r} to add a set to it: {e}") from e
    data.setdefault(model_key, {})[task] = {"skip_attention": sorted(plan.skip_attention),
                                            "skip_mlp": sorted(plan.skip_mlp), "matchness": score}
    write_json_atomic(path, data)
