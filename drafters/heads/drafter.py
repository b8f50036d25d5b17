"""The ``medusa``, ``hydra``, ``clover`` and ``chimera`` drafters: trained draft heads on the target's last hidden
states (``deer``, a block drafter on the same heads machinery, is in ``deer_drafter.py``).

``create_drafter("medusa", target=target, heads=PATH | DraftHeads | None, **options)``. With ``heads=None`` the
heads shipped for this target are used (``weights/<name>/`` in this package, matched by kind and the target's
fingerprint); without any, randomly initialised heads draft, with a warning (they start as the target's own LM
head on its own hidden state: the exactness tests and a quick try work on any model, speed-ups need training).

Each proposal first feeds the target's states of the newly committed positions (``state.target_hidden``) to the
heads (Clover's augmenting block keeps a KV cache over them; committed positions are never rolled back, so nothing
is undone after a rejection), then builds a tree (``trees.py``): Medusa with measured accuracies uses its static
sparse tree, everything else the dynamic top-k tree; with ``do_sample`` children are drawn from the heads' warped
q (``sample_tree``) and carry ``draft_probs`` over the full vocabulary (zero outside the draft vocabulary).
``budget="auto"`` sizes the tree to the target's measured forward costs, as ``draft_model`` does.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from specdec.drafters import register_drafter
from specdec.drafters.base import Drafter
from specdec.drafters.heads.base import DraftHeads
from specdec.drafters.heads.checkpoint import CONFIG_FILE, build_heads, load_heads
from specdec.drafters.heads.config import HeadsConfig
from specdec.drafters.heads.fingerprint import fingerprint_difference, target_fingerprint
from specdec.drafters.heads.trees import greedy_tree, sampled_tree, static_tree
from specdec.drafters.sampled_pool import SAMPLE_TREES, sampled_order
from specdec.drafters.topk_pool import path_signal
from specdec.drafters.tree_budget import TreeBudget
from specdec.draft_length import create_length_policy
from specdec.errors import HeadsTargetMismatchError, InvalidInputError
from specdec.finite import check_finite
from specdec.sampling import drafter_logits, seen_mask
from specdec.state import DecodeState, StepOutcome
from specdec.tree import DraftTree, ProposalKind, kept_parents
SHIPPED = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class HeadsDrafterConfig:
    depth: int | None = None  # tree levels; None: one per head (a head drafts one level)
    topk: int | None = None  # children per expanded node; None: 4 greedy, 2 sampled (as draft-model)
    width: int | None = None  # nodes expanded per level; None: 4 greedy, 1 sampled
    budget: "int | str" = "auto"  # nodes in the tree (an int), or "auto": sized to the target's forward costs (as
    #                               draft-model's default, where it beat fixed budgets in every measured mode)
    max_budget: int = 32  # cap of an "auto" budget, and the size of Medusa's static tree
    min_prob: float = 0.0  # stop expanding below this best path probability (a level costs one small head pass;
    #                         the "confidence" length policy of specdec.draft_length)
    static_tree: bool = True  # medusa: use the static sparse tree when the heads carry measured accuracies
    sample_tree: str = "without_replacement"  # do_sample=True: "without_replacement", "iid" or "topk" children
    seed: int = 0  # seeds the generator of randomly initialised heads (when none are given or shipped)

    def __post_init__(self) -> None:
        if isinstance(self.budget, str) and self.budget != "auto":
            raise InvalidInputError(f"heads drafter budget must be an int >= 1 or 'auto', got {self.budget!r}")
        for name in ("depth", "topk", "width", "max_budget") + (() if self.budget == "auto" else ("budget",)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InvalidInputError(f"heads drafter {name} must be an integer >= 1, got {value!r}")
        if self.sample_tree not in SAMPLE_TREES:
            raise InvalidInputError(f"heads drafter sample_tree must be one of {', '.join(map(repr, SAMPLE_TREES))}, "
                                    f"got {self.sample_tree!r}")
        if not 0.0 <= self.min_prob <= 1.0:
            raise InvalidInputError(f"heads drafter min_prob must be in [0, 1], got {self.min_prob}")


def shipped_heads(kind: str, target: torch.nn.Module) -> Path | None:
    """The shipped heads folder of ``kind`` whose fingerprint matches ``target``, or None."""
    if not SHIPPED.is_dir():
        return None
    fingerprint = None
    for index in sorted(SHIPPED.glob(f"*/{CONFIG_FILE}")):
        try:
            config = HeadsConfig.from_dict(json.loads(index.read_text()).get("config"))
        except (OSError, ValueError, AttributeError):  # unreadable, or not a heads config (HeadsConfigError)
            continue
        if config.kind != kind:
            continue
        fingerprint = fingerprint or target_fingerprint(target)
        if fingerprint_difference(config.target, fingerprint) is None:
            return index.parent
    return None


class HeadsDrafter(Drafter):
    kind: ClassVar[str]
    needs_target_hidden_states = True

    def __init__(self, target: torch.nn.Module, heads: "str | os.PathLike | DraftHeads | None" = None,
                 config: HeadsDrafterConfig | None = None, **options):
        super().__init__(target)
        self.config = config or HeadsDrafterConfig(**options)
        self.heads, self.source = self._resolve(target, heads)
        self.heads.eval()
        acc = self.heads.config.accuracies
        self.static = static_tree(acc, self.config.max_budget) if acc is not None and self.kind == "medusa" \
            and self.config.static_tree else None
        self.cache = None
        self.fed = 0  # committed positions the heads have consumed
        self.context: torch.Tensor | None = None
        self.budget_policy = TreeBudget(target, self.config.budget, max_budget=self.config.max_budget)
        self.length_policy = create_length_policy("confidence", self.config.min_prob, "path")

    def _resolve(self, target, heads) -> tuple[DraftHeads, str]:
        if isinstance(heads, DraftHeads):
            difference = fingerprint_difference(heads.config.target, target_fingerprint(target))
            if difference is not None:
                raise HeadsTargetMismatchError(f"the given {heads.kind} heads were built for another target "
                                               f"({difference}); build or load heads for this target")
            if heads.kind != self.kind:
                raise InvalidInputError(f"the {self.name!r} drafter needs {self.kind} heads, got {heads.kind} heads; "
                                        f"use create_drafter({heads.kind!r}, ...)")
            if heads._embedding is not target.get_input_embeddings():
                heads.attach(target, heads.vocab)
            check_finite(heads.named_parameters(), f"the given {heads.kind} heads")
            return heads, "given"
        if heads is not None:
            loaded = load_heads(heads, target)
            if loaded.kind != self.kind:
                raise InvalidInputError(f"{heads} holds {loaded.kind} heads; the {self.name!r} drafter needs "
                                        f"{self.kind} heads: use create_drafter({loaded.kind!r}, ...)")
            return loaded, str(heads)
        folder = shipped_heads(self.kind, target)
        if folder is not None:
            return load_heads(folder, target), f"shipped:{folder.name}"
        warnings.warn(f"no trained {self.kind} heads for this target ({type(target).__name__}): drafting with "
                      f"randomly initialised, untrained heads (exact, but expect little speed-up); train them with "
                      f"`specdec train` and pass heads=FOLDER", stacklevel=4)
        dtype = target.get_output_embeddings().weight.dtype
        generator = torch.Generator().manual_seed(self.config.seed)
        return build_heads(self.kind, target, generator=generator, dtype=dtype), "random-init"

    # ------------------------------------------------------------------ engine hooks
    def begin(self, state: DecodeState) -> None:
        self.cache = self.heads.new_cache()
        self.fed = 0
        self.context = None

    def propose(self, state: DecodeState) -> DraftTree:
        depth = min(self.config.depth or self.heads.config.num_heads, self.heads.config.num_heads,
                    state.remaining - 1)
        if depth < 1:
            return DraftTree.empty(state.sequence.device)
        t_start = time.perf_counter()
        with torch.no_grad():
            context = self._sync(state)
            root = state.sequence[0, -1:].to(context.device)
            heads = self.heads.bind(self.cache)
            root_state = heads.node_states(heads.initial_state(context), root, 0)
            log_q = self._log_q_fn(state)
            sampled = state.sampling.do_sample and self.config.sample_tree != "topk"
            if self.static is not None and not sampled:
                return self._static(state, context, log_q, depth, t_start)
            topk = self.config.topk or (2 if sampled else 4)
            width = self.config.width or (1 if sampled else 4)
            if sampled:
                kind = SAMPLE_TREES[self.config.sample_tree]
                pool, n = sampled_tree(heads, root_state, log_q, depth, topk, width, kind, state.generator)
                order = sampled_order(pool)
            else:
                kind = ProposalKind.POINT_MASS
                pool, n = greedy_tree(heads, root_state, log_q, depth, topk, width, self._stop)
                order = pool.best_first()
            self.forward_count += n
            budget, predicted = self.budget_policy.choose(pool.scores[order], time.perf_counter() - t_start)
            chosen = order[:budget].sort().values  # creation order is topological
            parents = kept_parents(pool.parents[chosen], chosen, pool.tokens.numel())
            tree = self._tree(state, pool.tokens[chosen], parents, kind, predicted,
                              pool.q_at(chosen) if sampled else None)
            return tree if sampled else tree.with_stop_reason(pool.stop_reason)

    def _stop(self, drafted: int, scores: torch.Tensor, parents: torch.Tensor, level: torch.Tensor):
        """The length policy (``min_prob``) on the best path of the greedy pool."""
        return self.length_policy.stop(path_signal(drafted, scores, parents, level))

    def observe(self, state: DecodeState, outcome: StepOutcome) -> None:
        # memo: an auto budget's predicted tokens; None for a fixed budget
        self.budget_policy.observe(outcome.tree.memo, outcome.tree.size, outcome.result.num_accepted)

    def describe(self) -> dict:
        cfg = self.heads.config
        learned = sum(p.numel() * p.element_size() for p in self.heads.parameters())
        rows = self.heads.lm_head  # a copy of the target's LM-head rows for a reduced vocabulary, else shared
        copied = 0 if self.heads.vocab.is_full else rows.numel() * rows.element_size()
        return {"heads": self.source, "kind": cfg.kind, "num_heads": cfg.num_heads, "draft_vocab": cfg.draft_size,
                "static_tree": self.static is not None, "memory_mb": round((learned + copied) / 1e6, 1)}

    # ------------------------------------------------------------------ pieces
    def _sync(self, state: DecodeState) -> torch.Tensor:
        """Feed the heads the target's states of the positions committed since the last proposal."""
        committed = state.sequence.shape[1] - 1  # tokens in the target's cache; the root is not among them
        new = committed - self.fed
        if new > 0:
            hidden = state.target_hidden
            if hidden is None or hidden.shape[0] < new:
                raise InvalidInputError(f"the {self.name!r} drafter needs the target's hidden states of the last "
                                        f"{new} committed positions; run it through SpecEngine")
            next_tokens = state.sequence[0, self.fed + 1: committed + 1]  # the last one is the root
            self.context = self.heads.extend(self.cache, hidden[-new:], next_tokens)
            self.forward_count += 1
            self.fed = committed
        return self.context

    def _log_q_fn(self, state: DecodeState):
        vocab, sampling = self.heads.vocab, state.sampling

        def log_q(logits: torch.Tensor, paths: torch.Tensor | None) -> torch.Tensor:
            """FloatTensor [m, V]: log q over the target's vocabulary (-inf outside the draft vocabulary)."""
            full = vocab.scatter(logits.float())
            seen = None
            if sampling.penalizes_repetition:
                seen = seen_mask(state.sequence[0].to(full.device), vocab.vocab_size, paths, rows=full.shape[0])
            return torch.log_softmax(drafter_logits(full, sampling, seen), dim=-1)

        return log_q

    def _static(self, state: DecodeState, context: torch.Tensor, log_q, depth: int, t_start: float) -> DraftTree:
        """Medusa's static sparse tree: node = (head, rank) -> that head's rank-th token (point masses)."""
        logq = log_q(self.heads.all_logits(context), None)  # [K, V]; the sequence's repetition penalty only
        self.forward_count += 1
        top = logq.topk(min(10, int(torch.isfinite(logq).sum(-1).min()))).indices  # [K, 10]
        tree = self.static
        keep = (tree.depth <= depth) & (tree.rank < top.shape[1])  # fewer than 10 ranks: a tiny vocabulary
        for _ in range(self.heads.config.num_heads):  # ancestor-closed: usable only where the parent is
            keep = keep & torch.where(tree.parents >= 0, keep[tree.parents.clamp(min=0)], True)
        order = torch.nonzero(keep).flatten()
        budget, predicted = self.budget_policy.choose(torch.log(tree.values[order]).float(),
                                                      time.perf_counter() - t_start)
        chosen = order[:budget]
        dev = top.device
        tokens = top[tree.depth[chosen] - 1, tree.rank[chosen]].to(dev)
        parents = kept_parents(tree.parents[chosen], chosen, tree.parents.numel()).to(dev)
        return self._tree(state, tokens, parents, ProposalKind.POINT_MASS, predicted)

    def _tree(self, state: DecodeState, tokens: torch.Tensor, parents: torch.Tensor, kind: ProposalKind,
              predicted: float | None, probs: torch.Tensor | None = None) -> DraftTree:
        """The tree of the chosen nodes (``tokens`` [n], ``parents`` [n] among them); ``probs`` [n, V] their q if
        sampled; the memo is the tokens an auto budget predicted, for observe's calibration."""
        budget = None if predicted is None else tokens.numel()  # an auto budget's choice, for the stats
        tree = DraftTree(tokens, parents, probs, kind, memo=predicted, budget=budget)
        return tree.to(state.sequence.device)


@register_drafter
class MedusaDrafter(HeadsDrafter):
    """Medusa heads (arXiv 2401.10774); see ``medusa.py`` and this module's docstring."""

    name = "medusa"
    kind = "medusa"


@register_drafter
class HydraDrafter(HeadsDrafter):
    """Hydra heads (arXiv 2402.05109); see ``hydra.py``."""

    name = "hydra"
    kind = "hydra"


@register_drafter
class CloverDrafter(HeadsDrafter):
    """Clover-2 heads (arXiv 2408.00264); see ``clover.py``."""

    name = "clover"
    kind = "clover"


@register_drafter
class ChimeraDrafter(HeadsDrafter):
    """Chimera's lightweight draft model (arXiv 2402.15758); see ``chimera.py``."""

    name = "chimera"
    kind = "chimera"
