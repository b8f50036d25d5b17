"""An independent small draft model with the target's tokenizer: a chain of k tokens or a dynamic top-k tree.

Chain: classic speculative decoding (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv 2302.01318).
Tree: EAGLE-2's dynamic draft tree (Li et al. 2024, arXiv 2406.16858) with the draft model's own probabilities as
confidence: every level expands the ``width`` frontier nodes with the highest cumulative log-probability, each
into its ``topk`` children, in one draft forward under a tree mask; at the end the ``budget`` nodes of highest
cumulative log-probability form the tree (a child never scores above its parent, so the choice is
ancestor-closed). A chain is the tree with ``topk = width = 1``.

With ``do_sample=True`` the draft model's logits go through the same processors as the target's (repetition
penalty over the sequence and the node's draft path, temperature, top-k, top-p, min-p), giving q, and
``sample_tree`` picks how children are chosen:

  "without_replacement"  each expanded node draws ``topk`` distinct children from q in draw order (EAGLE-1,
                         arXiv 2401.15077); ProposalKind.WITHOUT_REPLACEMENT
  "iid"                  ``topk`` i.i.d. children, repeats allowed (SpecInfer arXiv 2305.09781, SpecTr arXiv
                         2310.15141); ProposalKind.IID
  "topk"                 the greedy dynamic tree on q, verified as point masses (EAGLE-2); ProposalKind.POINT_MASS

A chain samples each token from q (ProposalKind.IID) unless ``sample_tree="topk"``. Unless set, a sampled tree
has 2 children per expanded node and expands 1 node per level (``DraftModelConfig.shape`` says why). Sampled
children are verified as draws from q, so the tree may not keep or drop a node's children by their own tokens: a
sampled tree is made of whole sibling groups (all children of an expanded node, cut only by draw rank), chosen by
their parent's cumulative log-probability until ``budget`` nodes are taken; ``min_prob`` does not cut them short
(a sampled token is accepted with probability about 1 - TV(p, q) whatever its own q). Only sampled trees carry
``draft_probs``.

``budget="auto"`` sizes the tree to this machine (``specdec.budget``, Sequoia-style, arXiv 2402.12374): node
values are the draft's path probabilities scaled by a running calibration (accepted tokens per step over the value
the tree predicted), and the node count maximises expected tokens per second under the target's measured forward
costs, drafting time included; ``max_budget`` caps it.

The draft model keeps its own KV cache in step with the sequence: after verification the accepted nodes it has
already processed stay in its cache (moved into contiguous slots), everything else is dropped, and the next
proposal feeds only what the cache lacks.
"""

from __future__ import annotations

import copy
import functools
import time
import warnings
import weakref
from dataclasses import dataclass, replace

import torch

from specdec.draft_length import POLICIES, StopReason, create_length_policy
from specdec.drafters import register_drafter
from specdec.drafters.acceptance import load_acceptance_head, shipped_acceptance_head
from specdec.drafters.base import Drafter
from specdec.drafters.sampled_pool import SAMPLE_TREES, grow_sampled_pool, sampled_order
from specdec.drafters.topk_pool import grow_topk_pool, path_signal
from specdec.drafters.tree_budget import TreeBudget
from specdec.errors import IncompatibleModelsError, InvalidInputError
from specdec.finite import check_draft_distribution
from specdec.kernels import cpu_kernels, kernel_status, quantized_copy, weights_kind
from specdec.memory import release_memory
from specdec.models.draft_transforms import cheap_draft, resolve_draft_vocab
from specdec.models.lean_runner import draft_runner
from specdec.sampling import drafter_logits, seen_mask
from specdec.state import DecodeState, StepOutcome
from specdec.tree import DraftTree, ProposalKind, kept_parents


@dataclass(frozen=True)
class DraftModelConfig:
    mode: str = "tree"  # "chain" or "tree"
    depth: int = 6  # levels of the tree / tokens of the chain
    topk: int | None = None  # children per expanded node (tree); None: 4 greedy, 2 sampled (see sampled_shape);
    #                           2 for a gguf draft (GGUF_DEFAULTS)
    width: int | None = None  # nodes expanded per level (tree); None: 4 greedy, 1 sampled; 2 for a gguf draft
    budget: "int | str" = "auto"  # nodes kept in the final tree (an int), or "auto": the node count that maximises
    #                               expected tokens per second under the target's measured forward costs; it won on
    #                               every measured dtype and mode (docs/drafters.md, "Defaults")
    max_budget: int = 32  # cap of an "auto" budget
    min_prob: float | None = None  # stop expanding once the best frontier path probability falls below this: one
    #                                more draft forward must buy more than it costs. None: 0.2 (an int8 draft of a
    #                                bf16 target, ~0.2x its cost; tuned on the Qwen pair) or 0.4 for a gguf draft
    length_policy: str = "confidence"  # when to stop drafting deeper (specdec.draft_length): "confidence" (the
    #                                    best path's probability below min_prob), "fixed" (always to depth),
    #                                    "hf-heuristic" (HF's num_assistant_tokens schedule) or "specdec++" (an
    #                                    acceptance head's predictions); greedy drafts only
    acceptance_head: str | None = None  # specdec++: a head folder (specdec train-acceptance); None: the shipped
    #                                     head for this draft model and target
    acceptance_threshold: "float | str" = "auto"  # specdec++: stop once P(a fed token is rejected) exceeds this;
    #                                               "auto": derived from measured costs (specdec.draft_length)
    quantize: str | None = "auto"  # "int8": a copy with int8 linear layers on the native CPU kernels, as
    #                                weights="w8a8" loads a model (int8 activations too; CPU only; without the
    #                                kernels the draft runs in its own dtype, with a warning); "auto": int8 when
    #                                on CPU, q4_k for a gguf draft (GGUF_DEFAULTS);
    #                                "q4_k": every linear layer re-quantized to Q4_K on the CPU kernel, whatever
    #                                format it was loaded in (specdec.models.draft_transforms)
    draft_vocab: object = None  # a reduced vocabulary for the draft's LM head (FR-Spec): a DraftVocab, "shipped"
    #                             (the shipped heads' vocabulary for this target) or None (the full vocabulary)
    draft_layers: int | None = None  # keep only the draft model's first n decoder layers (None: all)
    lean: "bool | str" = "auto"  # draft with the lean forward (specdec.models.lean_runner: Llama / Qwen2 on the
    #                               CPU, a third of the draft's time saved); "auto": where it runs, True: required
    dtype: str | None = None  # cast the draft model ("bfloat16", "float32"); None keeps it as given
    sample_tree: str = "without_replacement"  # do_sample=True: "without_replacement", "iid" or "topk" children

    def __post_init__(self) -> None:
        if self.mode not in ("chain", "tree"):
            raise InvalidInputError(f"draft-model mode must be 'chain' or 'tree', got {self.mode!r}")
        if isinstance(self.budget, str) and self.budget != "auto":
            raise InvalidInputError(f"draft-model budget must be an int >= 1 or 'auto', got {self.budget!r}")
        for field in ("depth", "topk", "width", "max_budget") + (() if self.budget == "auto" else ("budget",)):
            if getattr(self, field) is not None and getattr(self, field) < 1:
                raise InvalidInputError(f"draft-model {field} must be >= 1, got {getattr(self, field)}")
        if self.sample_tree not in SAMPLE_TREES:
            raise InvalidInputError(f"draft-model sample_tree must be one of {', '.join(map(repr, SAMPLE_TREES))}, "
                                    f"got {self.sample_tree!r}")
        if self.length_policy not in POLICIES:
            raise InvalidInputError(f"draft-model length_policy must be one of {', '.join(POLICIES)}, got "
                                    f"{self.length_policy!r}")
        if self.lean not in (True, False, "auto"):
            raise InvalidInputError(f"draft-model lean must be True, False or 'auto', got {self.lean!r}")
        if self.quantize not in (None, "int8", "auto", "q4_k"):
            raise InvalidInputError(f"draft-model quantize must be None, 'int8', 'q4_k' or 'auto', got "
                                    f"{self.quantize!r}")

    def shape(self, sampled: bool = False) -> tuple[int, int, int]:
        """(topk, width, budget) actually used: a chain is topk = width = 1 with budget = depth.

        Unset topk/width differ by mode. Greedy: 4 x 4, the tuned EAGLE-2-style tree. Sampled: 2 x 1, a main path
        with one more drawn sibling per level: sampled trees keep whole sibling groups, so with 4 x 4 a 12-node
        budget held only ~3 groups (depth ~3 for 6 levels drafted); on the Qwen pair at T=0.7 (bf16, 5 prompts,
        64 tokens) 2 x 1 gave tau 3.90 and 1.54x plain sampling, 4 x 4 tau 2.82 and 0.98x, a depth-5 chain 1.34x.
        """
        if self.mode == "chain":
            return 1, 1, self.depth
        topk = self.topk if self.topk is not None else (2 if sampled else 4)
        width = self.width if self.width is not None else (1 if sampled else 4)
        return topk, width, self.max_budget if self.budget == "auto" else self.budget


_PREPARED: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


# The defaults for a draft loaded with weights="gguf" (the CPU fast path), where a draft forward costs 0.3-0.4x the
# target's instead of ~0.2x: the best of the configurations measured there (docs/cpu-fast-path.md, "What a chain
# or tree of this draft can gain": a 2 x 2 tree of the Q4_K re-quantized draft, stopped below path probability 0.4).
GGUF_DEFAULTS = dict(quantize="q4_k", topk=2, width=2, min_prob=0.4)
DENSE_MIN_PROB = 0.2


def resolve_defaults(config: DraftModelConfig, model: torch.nn.Module) -> DraftModelConfig:
    """``config`` with what was left to the draft's format filled in: :data:`GGUF_DEFAULTS` for a gguf draft (only
    the fields left at "auto" / None), min_prob 0.2 otherwise."""
    if weights_kind(model) != "gguf":
        return replace(config, min_prob=DENSE_MIN_PROB) if config.min_prob is None else config
    unset = {"quantize": "auto", "topk": None, "width": None, "min_prob": None}
    return replace(config, **{k: v for k, v in GGUF_DEFAULTS.items() if getattr(config, k) == unset[k]})


def _prepare(model: torch.nn.Module, config: DraftModelConfig, vocab=None) -> torch.nn.Module:
    """The model that drafts: on CPU by default a copy with int8 weights on the native kernels, converted as
    ``weights="int8"`` converts a model (:func:`specdec.kernels.quantized_copy`; proposals only); without the kernels
    the model's own dtype, with a warning. A model loaded with quantized weights (``weights="int8"`` or ``"w8a8"``,
    specdec.kernels) is used as it is; ``quantize="q4_k"``, a reduced ``vocab`` or ``draft_layers`` make a cheaper
    copy (draft_transforms).

    Converted copies are shared by every drafter built from the same model (a 0.5B copy costs ~1 GB).
    """
    q4_k = config.quantize == "q4_k"
    if not (q4_k or vocab is not None or config.draft_layers is not None):
        return _prepare_base(model, config)
    key = ("cheap", config.quantize, config.dtype, None if vocab is None else tuple(vocab.ids.tolist()),
           config.draft_layers)
    copies = _PREPARED.setdefault(model, {})
    if key not in copies:
        base = model.eval() if q4_k else _prepare_base(model, config)
        copies[key] = cheap_draft(base, "q4_k" if q4_k else None, vocab, config.draft_layers)
    return copies[key]


def _prepare_base(model: torch.nn.Module, config: DraftModelConfig) -> torch.nn.Module:
    on_cpu = model.get_input_embeddings().weight.device.type == "cpu"
    if weights_kind(model) != "dense":
        return model.eval()  # loaded with weights="int8" / "w8a8": already on a native kernel, drafts as it is
    quantize = config.quantize == "int8" or (config.quantize == "auto" and on_cpu)
    if quantize and not on_cpu:
        raise InvalidInputError("quantize='int8' runs on the native CPU int8 kernels (specdec.kernels); the draft "
                                "model is not on CPU")
    if quantize and cpu_kernels() is None:
        _warn_no_int8_kernels(kernel_status()["cpu"].removeprefix("fallback: "))
        quantize = False
    key = "int8" if quantize else config.dtype
    if key is None:
        return model.eval()
    copies = _PREPARED.setdefault(model, {})
    if key not in copies:
        # int8: converted as weights="w8a8" converts a model (int8 weights and activations, bf16 elsewhere; tensors
        # shared). The 0.5B Qwen draft's one-token forward: 31 ms, against 62 ms with bf16 activations (Int8Linear)
        # and ~200 ms for the bf16 1.5B target (2026-12-06, one interleaved run)
        copies[key] = quantized_copy(model, "w8a8") if quantize else copy.deepcopy(model).to(getattr(torch, key))
        release_memory()
    return copies[key].eval()


@functools.lru_cache(maxsize=None)
def _warn_no_int8_kernels(why: str) -> None:
    """Say once (per reason) that the int8 draft falls back to the draft model's own dtype."""
    warnings.warn(f"specdec: the draft-model drafter's int8 draft needs the native CPU kernels ({why}); it drafts in "
                  "the draft model's own dtype instead, which is slower (outputs are unchanged)", RuntimeWarning,
                  stacklevel=2)


@dataclass
class _Fed:
    """The pool nodes fed to the draft model during one proposal (they sit in its cache after the prefix)."""

    slot: torch.Tensor  # LongTensor [pool]: cache slot (relative to tree_base) of each pool node, -1 if never fed
    anc: torch.Tensor  # BoolTensor [F, F]: ancestor-or-self among fed nodes, in slot order
    tokens: torch.Tensor  # LongTensor [F]: token of each fed node (kept only when paths are tracked)

    @staticmethod
    def empty(device: torch.device) -> "_Fed":
        z = torch.zeros(0, dtype=torch.long, device=device)
        return _Fed(z, torch.zeros(0, 0, dtype=torch.bool, device=device), z.clone())


def _acceptance_head(folder: str | None, draft: torch.nn.Module, target: torch.nn.Module):
    """The SpecDec++ head for this pair: from ``folder``, else the shipped one; a clear error when there is none."""
    if folder is None:
        folder = shipped_acceptance_head(draft, target)
        if folder is None:
            raise InvalidInputError("length_policy='specdec++' needs an acceptance head for this draft model and "
                                    "target; none is shipped for this pair: train one with `specdec "
                                    "train-acceptance` and pass acceptance_head=FOLDER")
    return load_acceptance_head(folder, draft, target)


@dataclass(frozen=True)
class _Proposal:
    """What observe needs about one proposal (its DraftTree.memo)."""

    tree_base: int  # draft-cache length before the proposal's nodes (the root sits at slot tree_base - 1)
    chosen: torch.Tensor  # LongTensor [n]: pool index of each node of the proposed tree
    fed_slots: torch.Tensor  # LongTensor [pool]: cache slot (relative to tree_base) of each pool node, -1 if not fed
    pool_tokens: torch.Tensor  # LongTensor [pool]
    predicted: float | None  # tokens an auto-sized tree predicted (sum of its node values); None: fixed budget
    cache_version: int  # the drafter's cache version when the proposal was made


@register_drafter
class DraftModelDrafter(Drafter):
    name = "draft-model"

    def __init__(self, target: torch.nn.Module, model: torch.nn.Module | None = None,
                 config: DraftModelConfig | None = None, **options):
        super().__init__(target)
        if model is None:
            raise InvalidInputError("draft-model needs model=<a small causal LM sharing the target's tokenizer>")
        self.config = resolve_defaults(config or DraftModelConfig(**options), model)
        target_vocab = target.get_output_embeddings().weight.shape[0]
        draft_vocab = model.get_output_embeddings().weight.shape[0]
        if target_vocab != draft_vocab:
            raise IncompatibleModelsError(
                f"draft model vocabulary ({draft_vocab} tokens) differs from the target's ({target_vocab}); "
                "the draft model must share the target's tokenizer")
        vocab = resolve_draft_vocab(self.config.draft_vocab, target)
        self.runner = draft_runner(_prepare(model, self.config, vocab), self.config.lean)
        self.cached = torch.zeros(0, dtype=torch.long)  # token ids of the draft cache's slots (a prefix of them
        #                                                 when the newest proposal left tree branches behind)
        self._cache_version = 0  # bumped by every proposal: observe commits only the cache its proposal left
        auto = self.config.budget == "auto" and self.config.mode == "tree"
        _, _, fixed = self.config.shape()
        # node values: the draft's path probabilities, calibrated; the costs are measured in begin()
        self.budget_policy = TreeBudget(target, "auto" if auto else fixed, max_budget=self.config.max_budget)
        specdecpp = self.config.length_policy == "specdec++"
        self.length_policy = create_length_policy(
            self.config.length_policy, self.config.acceptance_threshold if specdecpp else self.config.min_prob, "path")
        self.acceptance = _acceptance_head(self.config.acceptance_head, model, target) if specdecpp else None
        self._forward_seconds = 0.0  # running seconds per draft forward (the specdec++ policy's cost)

    @property
    def forward_seconds(self) -> float:
        return self.runner.forward_seconds

    @property
    def device(self) -> torch.device:
        """The draft model's device (``draft_device`` in the bench; tokens cross through ``state.transfer``)."""
        return self.runner.device

    # ------------------------------------------------------------------ engine hooks
    def begin(self, state: DecodeState) -> None:
        self.runner.reset()
        self.cached = torch.zeros(0, dtype=torch.long)
        if self.budget_policy.auto or self.acceptance is not None:  # here, not mid-proposal: a proposal may run
            costs = self.budget_policy.measured_costs()  # beside the target's forward (overlap mode)
            if self.acceptance is not None:
                self.length_policy.costs = costs

    def propose(self, state: DecodeState) -> DraftTree:
        topk, width, _ = self.config.shape()
        depth = min(self.config.depth, state.remaining - 1)
        if depth < 1:
            empty = DraftTree.empty(state.sequence.device)  # no memo: nothing read, observe leaves the cache alone
            return empty.with_budget(0) if self.budget_policy.auto else empty  # an auto budget kept no node
        t_start = time.perf_counter()
        root_logits = self._sync(state.transfer(state.sequence[0], "cpu"), state)
        self._cache_version += 1
        if state.sampling.do_sample and self.config.sample_tree != "topk":
            return self._propose_sampled(state, root_logits, depth, t_start)
        fed = _Fed.empty(self.runner.device)
        accept = None  # specdec++: predicted P(the fed best-path tokens are accepted), a tensor (no sync here)

        def expand(tokens: torch.Tensor, parents: torch.Tensor, nodes: torch.Tensor, d: int) -> torch.Tensor:
            nonlocal accept
            t_feed = time.perf_counter()
            logits, paths, hidden = self._feed(fed, tokens, parents, nodes, d + 1, state.sampling.penalizes_repetition)
            if self.acceptance is not None:  # the head reads the best expanded node's state: is it accepted?
                p_fed = self.acceptance.accept_prob(hidden[0])
                accept = p_fed if accept is None else accept * p_fed
            spent = time.perf_counter() - t_feed
            self._forward_seconds = spent if not self._forward_seconds else 0.9 * self._forward_seconds + 0.1 * spent
            return self._log_q(logits, state, paths)  # [w, V]

        def stop(drafted: int, scores: torch.Tensor, parents: torch.Tensor, level: torch.Tensor):
            """The length policy on the best path (specdec++: and the predicted acceptance, 1 when none was fed)."""
            p_fed = None if self.acceptance is None else (accept if accept is not None else scores.new_ones(()))
            return self.length_policy.stop(path_signal(drafted, scores, parents, level, p_fed, self._forward_seconds))

        pool = grow_topk_pool(self._log_q(root_logits[None], state)[0], expand, depth, topk, width, stop)
        order = pool.best_first()
        budget, predicted = self.budget_policy.choose(pool.scores[order], time.perf_counter() - t_start)
        chosen = order[:budget].sort().values  # creation order is topological
        return self._finish(state, fed, pool.tokens, pool.parents, chosen, predicted, stop_reason=pool.stop_reason)

    def _propose_sampled(self, state: DecodeState, root_logits: torch.Tensor, depth: int,
                         t_start: float) -> DraftTree:
        """Children drawn from q (module docstring): the pool grows level by level as in the greedy tree (the
        ``width`` best-scored nodes of a level are expanded), then whole sibling groups are kept in the order of
        their parent's score."""
        topk, width, _ = self.config.shape(sampled=True)
        kind = ProposalKind.IID if self.config.mode == "chain" else SAMPLE_TREES[self.config.sample_tree]
        fed = _Fed.empty(self.runner.device)

        def expand(tokens: torch.Tensor, parents: torch.Tensor, nodes: torch.Tensor, d: int) -> torch.Tensor:
            logits, paths, _ = self._feed(fed, tokens, parents, nodes, d + 1, state.sampling.penalizes_repetition)
            return self._log_q(logits, state, paths)  # [w, V]

        # no length policy: a sampled token is accepted with probability ~1 - TV(p, q), not ~q(x); drafts go to depth
        root_log_q = self._log_q(root_logits[None], state)[0]  # [V]
        check_draft_distribution(root_log_q, self.runner.model)
        pool = grow_sampled_pool(root_log_q, expand, depth, topk, width, kind, state.generator)
        order = sampled_order(pool)  # whole sibling groups by their parent's score, the last one cut by draw rank
        budget, predicted = self.budget_policy.choose(pool.scores[order], time.perf_counter() - t_start)
        chosen = order[:budget].sort().values  # creation order: parents first, siblings in draw order
        return self._finish(state, fed, pool.tokens, pool.parents, chosen, predicted, pool.q_at(chosen), kind,
                            StopReason.MAX_DEPTH)

    def _feed(self, fed: "_Fed", tokens: torch.Tensor, parents: torch.Tensor, expand: torch.Tensor, d: int,
              track_paths: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Run the draft model on pool nodes ``expand`` [w] (depth d - 1) under the tree mask; returns their logits
        [w, V], with ``track_paths`` each one's draft path tokens [w, F] (-1 = not on the path), and with an
        acceptance head their last-layer hidden states [w, d]."""
        dev = self.runner.device
        w = expand.numel()
        f = fed.anc.shape[0]
        rows = torch.zeros(w, f, dtype=torch.bool, device=dev)
        if f:
            rows = fed.anc[fed.slot[parents[expand]].clamp(min=0)] & (parents[expand] >= 0)[:, None]
        new_rows = torch.cat([rows, torch.eye(w, dtype=torch.bool, device=dev)], dim=1)  # [w, f + w]
        fed.anc = torch.cat([torch.cat([fed.anc, torch.zeros(f, w, dtype=torch.bool, device=dev)], 1), new_rows], 0)
        base = self.runner.length - f  # draft-cache length before this proposal's nodes (the root at base - 1)
        mask = torch.cat([torch.ones(w, base, dtype=torch.bool, device=dev), new_rows], dim=1)
        positions = torch.full((w,), base - 2 + d, dtype=torch.long, device=dev)
        out = self.runner.forward(tokens[expand], positions, mask, output_hidden_states=self.acceptance is not None)
        hidden = None if out.hidden_states is None else out.hidden_states[-1]  # [w, d] last layer (specdec++)
        self.forward_count += 1
        fed.slot = torch.cat([fed.slot, torch.full((tokens.numel() - fed.slot.numel(),), -1, dtype=torch.long,
                                                   device=dev)])
        fed.slot[expand] = torch.arange(f, f + w, device=dev)
        if not track_paths:
            return out.logits, None, hidden
        fed.tokens = torch.cat([fed.tokens, tokens[expand]])
        return out.logits, torch.where(new_rows, fed.tokens[None, :], -1), hidden

    def _finish(self, state: DecodeState, fed: "_Fed", tokens: torch.Tensor, parents: torch.Tensor,
                chosen: torch.Tensor, predicted: float | None, draft_probs: torch.Tensor | None = None,
                kind: ProposalKind = ProposalKind.POINT_MASS, stop_reason: StopReason | None = None) -> DraftTree:
        """The tree of pool nodes ``chosen`` (increasing, ancestor-closed), carrying the pool for ``observe``."""
        dev = self.runner.device
        new_parents = kept_parents(parents[chosen], chosen, tokens.numel())
        fed_slots = torch.cat([fed.slot, torch.full((tokens.numel() - fed.slot.numel(),), -1, dtype=torch.long,
                                                    device=dev)])
        f = fed.anc.shape[0]
        tree_base = self.runner.length - f
        if f and bool(fed.anc.tril().all()):  # the fed nodes are one path below the root (a chain): the cache holds
            fed_pool = torch.nonzero(fed_slots >= 0).flatten()  # a sequence, kept by the next _sync if it matches
            self.cached = torch.cat([self.cached, tokens[fed_pool[fed_slots[fed_pool].argsort()]].cpu()])
        memo = _Proposal(tree_base, chosen, fed_slots, tokens, predicted, self._cache_version)
        budget = None if predicted is None else chosen.numel()  # an auto budget's choice, for the stats
        return DraftTree(tokens[chosen], new_parents, draft_probs, kind, stop_reason, memo, budget)  # the engine
        #                                                                                             moves it

    def _log_q(self, logits: torch.Tensor, state: DecodeState, paths: torch.Tensor | None = None) -> torch.Tensor:
        """FloatTensor [m, V]: log of the draft distribution after each row of ``logits`` [m, V], through the same
        processors as the target's; ``paths`` [m, a] the draft tokens each row follows (-1 = padding)."""
        sampling = state.sampling
        seen = None
        if sampling.penalizes_repetition:
            seen = seen_mask(state.transfer(state.sequence[0], logits.device), logits.shape[-1], paths,
                             rows=logits.shape[0])
        return torch.log_softmax(drafter_logits(logits, sampling, seen), dim=-1)

    def observe(self, state: DecodeState, outcome: StepOutcome) -> None:
        """Learn from the step; keep the accepted nodes the draft model already processed (the next _sync feeds the
        rest) if the cache is still the one this proposal left."""
        memo: _Proposal | None = outcome.tree.memo
        if memo is None or self.runner.length == 0:
            return
        accepted = outcome.result.num_accepted
        self.budget_policy.observe(memo.predicted, outcome.tree.size, accepted)
        if outcome.tree.size:
            self.length_policy.observe(outcome.tree.max_depth, accepted, self._forward_seconds)
        if memo.cache_version != self._cache_version:  # a later proposal drafted ahead: _sync reconciles the cache
            return
        if outcome.tree.size == 0:  # an auto budget may keep no node of a pool the draft model already read
            self.runner.crop(memo.tree_base)
            self.cached = self.cached[: memo.tree_base]
            return
        accepted_pool = memo.chosen[outcome.result.accepted_nodes.to(memo.chosen.device)]
        slots = memo.fed_slots[accepted_pool]
        in_sequence = min(int((slots >= 0).sum()), outcome.emitted.numel())  # fed nodes form a prefix of the path
        slots = slots[:in_sequence]  # and stopping rules may have cut the emitted tokens
        self.runner.commit(memo.tree_base, slots)
        kept_tokens = memo.pool_tokens[accepted_pool[: slots.numel()]].cpu()  # what the draft cache really holds
        self.cached = torch.cat([self.cached[: memo.tree_base], kept_tokens])

    # ------------------------------------------------------------------ cache sync
    def _sync(self, sequence: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Bring the draft cache to ``sequence`` (1-D, CPU) and return the logits after its last token; what it
        feeds crosses to the draft model's device through ``state.transfer`` (timed)."""
        n = min(self.cached.numel(), sequence.numel() - 1)  # always feed at least the root
        same = (self.cached[:n] == sequence[:n]).long()
        common = int(same.cumprod(0).sum()) if n else 0
        dev = self.runner.device
        if common == 0:
            out = self.runner.prefill(state.transfer(sequence[None], dev))
        else:
            self.runner.crop(common)
            pending = state.transfer(sequence[common:], dev)
            k = pending.numel()
            positions = torch.arange(common, common + k, device=dev)
            causal = torch.ones(k, k, dtype=torch.bool, device=dev).tril_()
            out = self.runner.forward(pending, positions, causal, logits_to_keep=1)
        self.forward_count += 1
        self.cached = sequence.clone()
        return out.logits[-1]
