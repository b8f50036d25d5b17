"""The node-budget policy shared by every drafter that sizes its trees: how many candidate nodes a proposal keeps.

A budget is fixed (an int) or ``"auto"``: the node count that maximises expected tokens per second under the
target's measured forward costs (Sequoia-style, arXiv 2402.12374; the cost model and the choice are
:mod:`specdec.budget`). Drafters hand over their candidates' values best first; for drafters whose values are their
own probabilities (``draft-model``, the trained heads) the policy scales them by a running calibration, the ratio of
accepted to predicted tokens (:func:`specdec.budget.update_calibration`, which also relaxes it toward 1 after a
step that kept no node, so a low estimate cannot pin the budget at 0). Drafters that calibrate their values
themselves (``aded`` per depth, ``token-recycling`` per node) take the kept nodes from :meth:`TreeBudget.select`,
and a chain's length from :meth:`TreeBudget.chain_length` (``prompt-lookup``, from its acceptance rates by depth).

The chosen count travels on the proposal (``DraftTree.budget``); the calibration is the only state kept here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from specdec.budget import ForwardCosts, best_nodes, choose_budget, forward_costs, update_calibration
from specdec.errors import InvalidInputError


class TreeBudget:
    """A fixed node budget, or ``"auto"`` capped at ``max_budget`` under the forward costs of ``target``."""

    def __init__(self, target: torch.nn.Module, budget: "int | str", max_budget: int | None = None,
                 costs: "ForwardCosts | Mapping[int, float] | None" = None,
                 cache_dir: "str | os.PathLike | None" = None):
        """``costs``: the target's forward costs (or ``{tokens: seconds}``); None measures them on first use
        (:func:`specdec.budget.forward_costs`, cached in ``cache_dir``)."""
        if budget != "auto" and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 0):
            raise InvalidInputError(f"a tree budget must be an integer >= 0 or 'auto', got {budget!r}")
        self.target = target
        self.budget = budget
        self.max_budget = max_budget
        self.cache_dir = cache_dir
        self.costs = ForwardCosts.from_mapping(costs) if isinstance(costs, Mapping) else costs
        self.calibration = 1.0  # running (accepted tokens) / (predicted tokens) of auto-sized trees

    @property
    def auto(self) -> bool:
        return self.budget == "auto"

    def measured_costs(self) -> ForwardCosts:
        """The target's forward costs, measured (or read from the cache) the first time they are needed: drafters
        call this in ``begin`` (or their constructor), not mid-proposal, since a proposal may run beside the
        target's forward in overlap mode."""
        if self.costs is None:
            self.costs = forward_costs(self.target, cache_dir=self.cache_dir)
        return self.costs

    def choose(self, ordered_log_values: torch.Tensor, draft_seconds: float) -> tuple[int, float | None]:
        """How many of the candidates (``ordered_log_values`` [m]: log acceptance estimates, best first and
        ancestor-closed) a tree keeps, and the tokens that count predicts (None for a fixed budget).

        Auto: node values exp(log value) x calibration (at most 1); the count (at most ``max_budget``) that maximises
        expected tokens per second, ``draft_seconds`` of drafting included."""
        if not self.auto:
            return min(int(self.budget), ordered_log_values.numel()), None
        values = (ordered_log_values.float().exp() * self.calibration).clamp(max=1.0)
        k = choose_budget(values, self.measured_costs(), draft_seconds, self.max_budget)
        return k, float(values[:k].sum())

    def chain_length(self, path_values: torch.Tensor, draft_seconds: float = 0.0) -> int:
        """How many links of a chain to keep, from ``path_values`` [m]: the probability that the chain is accepted
        up to each depth, calibrated by the drafter itself (``prompt-lookup``'s rates by depth). Fixed: the budget
        (at most m); auto: the count (at most ``max_budget``) that maximises expected tokens per second."""
        if not self.auto:
            return min(int(self.budget), path_values.numel())
        return choose_budget(path_values, self.measured_costs(), draft_seconds, self.max_budget)

    def observe(self, predicted: float | None, tree_size: int, accepted: int) -> None:
        """After a proposal whose :meth:`choose` predicted ``predicted`` tokens was verified: ``accepted`` of its
        ``tree_size`` nodes were accepted. A tree without nodes is no evidence: the calibration relaxes toward 1."""
        if predicted is None:  # a fixed budget
            return
        self.calibration = update_calibration(self.calibration, accepted if tree_size else 0,
                                              predicted if tree_size else 0.0)

    def select(self, values: torch.Tensor, parents: torch.Tensor, draft_seconds: float = 0.0,
               usable: torch.Tensor | None = None) -> torch.Tensor:
        """LongTensor [k] (ascending): the nodes kept from a candidate tree (``values`` [n] already calibrated,
        ``parents`` [n]; ``usable`` [n] bool), best first under the fixed budget or the measured costs
        (:func:`specdec.budget.best_nodes`)."""
        fixed = None if self.auto else int(self.budget)
        return best_nodes(values, parents, self.measured_costs() if self.auto else self.costs, draft_seconds, fixed,
                          usable)
