"""ADED: draft trees from an adaptive tri-gram table searched with Monte-Carlo tree search; no draft model.

ADED (Liu, Lei, Zhang, Xu; AAAI 2025; arXiv 2407.12021; reference PyPI ``draftretriever`` 0.1.1). Every step

  1. adapt: each tri-gram among the last ``window`` (16) tokens of the sequence gains ``boost`` (0.04) in the table,
     capped at ``cap`` (3.0), created when missing, so even an empty table drafts the context's repeated n-grams
     (``trigram_table.AdaptiveTrigrams``);
  2. search: PUCT MCTS from the last two tokens (``mcts.search``: 150 iterations, sentences of 4 states, c1 = 32,
     c2 = 8); the ``top_k`` (24) most visited nodes, each extended by its best successor, are the candidates;
  3. size: the candidates come best first (ancestor-closed); the draft keeps the first ``budget`` of them.
The draft is a POINT_MASS tree (deterministic lookups), so the ``rejection`` verifier samples losslessly with it.

``budget="auto"`` sizes the tree to the target's measured forward costs (``specdec.budget.choose_budget``, Sequoia
style): node values = the search's visit share of the node (its estimated chance to be accepted) times a running
per-depth calibration ratio, (accepted nodes at that depth + 1) / (predicted value at that depth + 2), both sums
decayed by ``CALIBRATION_DECAY`` per step, so a table whose visit shares are over-confident earns smaller trees.

Where we differ from the reference: the node budget is exact (best-valued nodes, see ``mcts.py``) instead of the
reference's ``cut_to_choices``; the mcts.py docstring lists the differences of the search itself. The adapted scores
persist across generate() calls as in the reference (``keep_adaptation=False`` forgets them at every call); the
rollout generator restarts from ``seed`` at every call.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from specdec.budget import ForwardCosts
from specdec.drafters import register_drafter
from specdec.drafters.base import Drafter
from specdec.drafters.tree_budget import TreeBudget
from specdec.drafters.aded.mcts import Candidates, MCTSConfig, draft_candidates
from specdec.drafters.aded.trigram_table import DEFAULT_TOP, AdaptiveTrigrams, TrigramTable
from specdec.errors import InvalidInputError
from specdec.state import DecodeState, StepOutcome
from specdec.tree import DraftTree

CALIBRATION_DECAY = 0.95  # per-step decay of the acceptance calibration sums (~20 steps of memory)
TIME_DECAY = 0.8  # per-step weight kept by the running drafting time passed to choose_budget


@dataclass(frozen=True)
class AdedConfig:
    iterations: int = 150  # MCTS simulations per step (reference: 150)
    sentence_length: int = 4  # states per simulated sentence, root included (reference: 4)
    top_k: int = 24  # most visited search nodes kept as candidate paths (reference: 24)
    c1: float = 32.0  # PUCT exploration weight (reference)
    c2: float = 8.0  # PUCT visit scale (reference)
    budget: "int | str" = "auto"  # "auto": sized by the target's forward costs; or draft nodes per step (reference
    #                              `choices`: 24; measured on the Qwen 1.5B, bf16: 1.09x plain, against 1.83x for auto
    #                              with adapt_prompt, which is why both are the defaults)
    boost: float = 0.04  # added to each recent tri-gram's score every step (reference)
    cap: float = 3.0  # boosted scores stop here (reference)
    window: int = 16  # recent tokens whose tri-grams are boosted (reference)
    top: int = DEFAULT_TOP  # successors kept per context when a table file is loaded (reference Reader: 12)
    seed: int = 0  # seeds the drafter's own numpy Generator for rollouts (never the global RNG)
    keep_adaptation: bool = True  # boosts persist across generate() calls (reference); False: forget at begin()
    adapt_prompt: bool = True  # also boost every tri-gram of the prompt once at begin() (ours; the reference only
    #                             ever sees the last 16 tokens, so prompt n-grams further back never enter the table)
    cost_cache: str | None = None  # directory of forward_costs.json for budget="auto"; None: ~/.cache/specdec

    def __post_init__(self) -> None:
        auto = self.budget == "auto"
        if not auto and (not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget < 1):
            raise InvalidInputError(f"aded budget must be an integer >= 1 or 'auto', got {self.budget!r}")
        if not isinstance(self.window, int) or self.window < 3:
            raise InvalidInputError(f"aded window must be an integer >= 3 (one tri-gram), got {self.window!r}")
        if not (self.boost >= 0 and self.cap > 0):
            raise InvalidInputError(f"aded needs boost >= 0 and cap > 0, got boost={self.boost}, cap={self.cap}")
        self.mcts  # noqa: B018 -- validates the search options now

    @property
    def mcts(self) -> MCTSConfig:
        return MCTSConfig(self.iterations, self.sentence_length, self.top_k, self.c1, self.c2)


@register_drafter
class AdedDrafter(Drafter):
    name = "aded"

    def __init__(self, target: torch.nn.Module, table: "TrigramTable | str | os.PathLike | None" = None,
                 config: AdedConfig | None = None, costs: "ForwardCosts | Mapping[int, float] | None" = None,
                 **options):
        """``table``: a TrigramTable, the path of one saved by ``specdec trigrams``, or None (context only).
        ``costs``: the target's forward costs for ``budget="auto"`` (or ``{tokens: seconds}``); None measures them
        once (``specdec.budget.forward_costs``, cached in ``cost_cache``)."""
        super().__init__(target)
        self.config = config or AdedConfig(**options)
        vocab = int(target.get_input_embeddings().weight.shape[0])
        if table is None:
            table = TrigramTable.empty()
        elif not isinstance(table, TrigramTable):
            path = table
            table = TrigramTable.load(path, top=self.config.top)
            table.check_vocabulary(vocab, source=f"trigram table {path}")
        else:
            table.check_vocabulary(vocab)
        self.table = AdaptiveTrigrams(table, self.config.boost, self.config.cap)
        self._mcts = self.config.mcts
        self.rng = np.random.default_rng(self.config.seed)
        self.budget_policy = TreeBudget(target, self.config.budget, costs=costs, cache_dir=self.config.cost_cache)
        if self.auto:
            self.budget_policy.measured_costs()
        self._accepted = np.zeros(self.config.sentence_length + 2)  # [depth] decayed accepted nodes (auto)
        self._predicted = np.zeros(self.config.sentence_length + 2)  # [depth] decayed sum of node values (auto)
        self._draft_seconds = 0.0
        self._proposed: tuple[np.ndarray, np.ndarray] | None = None  # (values, depths) of the last tree (auto)

    @property
    def auto(self) -> bool:
        return self.config.budget == "auto"

    def begin(self, state: DecodeState) -> None:
        self.rng = np.random.default_rng(self.config.seed)
        if not self.config.keep_adaptation:
            self.table.reset()
        if self.config.adapt_prompt:
            self.table.adapt(state.sequence[0].tolist())

    def propose(self, state: DecodeState) -> DraftTree:
        seq = state.sequence[0]
        dev = seq.device
        if state.remaining < 2 or seq.numel() < 2:
            return DraftTree.empty(dev).with_budget(0)
        t0 = time.perf_counter()
        recent = seq[-self.config.window:].tolist()  # the one host sync of a step
        self.table.adapt(recent)
        cands = draft_candidates(recent[-2], recent[-1], self.table.lookup, self._mcts, self.rng)
        if self.auto:
            tree = self._auto_tree(cands, dev, time.perf_counter() - t0)
        else:
            k = min(self.config.budget, len(cands))
            tree = DraftTree(torch.tensor(cands.tokens[:k], dtype=torch.long, device=dev),
                             torch.tensor(cands.parents[:k], dtype=torch.long, device=dev), budget=self.config.budget)
        return tree

    # ------------------------------------------------------------------ budget="auto"
    def _auto_tree(self, cands: Candidates, dev: torch.device, search_seconds: float) -> DraftTree:
        self._draft_seconds = search_seconds if not self._draft_seconds else \
            TIME_DECAY * self._draft_seconds + (1 - TIME_DECAY) * search_seconds
        if not len(cands):
            return DraftTree.empty(dev).with_budget(0)
        depths = np.asarray(cands.depths)  # [m]
        ratio = (self._accepted + 1.0) / (self._predicted + 2.0)  # [depth] calibration
        values = torch.tensor(np.minimum(np.asarray(cands.values) * ratio[depths], 1.0))  # [m]
        pool = DraftTree(torch.tensor(cands.tokens, dtype=torch.long), torch.tensor(cands.parents, dtype=torch.long))
        keep = self.budget_policy.select(values, pool.parents, self._draft_seconds)  # [k]
        mask = torch.zeros(len(cands), dtype=torch.bool)
        mask[keep] = True
        memo = (np.asarray(cands.values)[keep.numpy()], depths[keep.numpy()])  # node values and depths, for observe
        return pool.prune(mask)[0].with_memo(memo).with_budget(keep.numel()).to(dev)

    def observe(self, state: DecodeState, outcome: StepOutcome) -> None:
        if outcome.tree.memo is None:  # not an auto-sized tree
            return
        values, depths = outcome.tree.memo
        accepted = outcome.result.num_accepted  # accepted nodes lie at depths 1..accepted
        self._accepted *= CALIBRATION_DECAY
        self._predicted *= CALIBRATION_DECAY
        self._accepted[1:accepted + 1] += 1.0
        np.add.at(self._predicted, depths, values)
