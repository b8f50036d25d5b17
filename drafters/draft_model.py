"""An independent small draft model with the target's tokenizer: a chain of k tokens or a dynamic top-k tree.

Chain: classic speculative decoding (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv 2302.01318).
Tree: EAGLE-2's dynamic draft tree (Li et al. 2024, arXiv 2406.16858) with the draft model's own probabilities as
confidence: every level expands the ``width`` frontier nodes with the highest cumulative log-probability, each
into its ``topk`` children, in one draft forward under a tree mask; at the end the ``budget`` nodes of highest
cumulative log-probability form the tree (a child never scores above its parent, so the choice is
ancestor-closed). A chain is the tree with ``topk = width = 1``.

The draft model keeps its own KV cache in step with the sequence: after verification the accepted nodes it has
already processed stay in its cache (moved into contiguous slots), everything else is dropped, and the next
proposal feeds only what the cache lacks.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch

from specdec.drafters import register_drafter
from specdec.drafters.base import Drafter
from specdec.errors import IncompatibleModelsError, InvalidInputError
from specdec.runner import CausalLMRunner
from specdec.state import DecodeState, StepOutcome
from specdec.tree import DraftTree


@dataclass(frozen=True)
class DraftModelConfig:
    mode: str = "tree"  # "chain" or "tree"
    depth: int = 6  # levels of the tree / tokens of the chain
    topk: int = 4  # children per expanded node (tree)
    width: int = 4  # nodes expanded per level (tree)
    budget: int = 12  # nodes kept in the final tree
    min_prob: float = 0.0  # stop expanding once the best frontier path probability falls below this
    quantize: str | None = "auto"  # "int8": dynamic int8 Linear layers (CPU only); "auto": int8 when on CPU
    dtype: str | None = None  # cast the draft model ("bfloat16", "float32"); None keeps it as given

    def __post_init__(self) -> None:
        if self.mode not in ("chain", "tree"):
            raise InvalidInputError(f"draft-model mode must be 'chain' or 'tree', got {self.mode!r}")
        for field in ("depth", "topk", "width", "budget"):
            if getattr(self, field) < 1:
                raise InvalidInputError(f"draft-model {field} must be >= 1, got {getattr(self, field)}")
        if self.quantize not in (None, "int8", "auto"):
            raise InvalidInputError(f"draft-model quantize must be None, 'int8' or 'auto', got {self.quantize!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(topk, width, budget) actually used: a chain is topk = width = 1 with budget = depth."""
        if self.mode == "chain":
            return 1, 1, self.depth
        return self.topk, self.width, self.budget


def _prepare(model: torch.nn.Module, config: DraftModelConfig) -> torch.nn.Module:
    """The model that drafts: int8-quantized on CPU by default (3x cheaper than bf16 there; proposals only)."""
    on_cpu = model.get_input_embeddings().weight.device.type == "cpu"
    quantize = config.quantize == "int8" or (config.quantize == "auto" and on_cpu)
    if quantize and not on_cpu:
        raise InvalidInputError("quantize='int8' uses torch's CPU dynamic quantization; the draft model is not on CPU")
    if quantize:
        with warnings.catch_warnings():  # torch.ao dynamic quantization warns that it is deprecated for torchao
            warnings.simplefilter("ignore")
            from torch.ao.quantization import quantize_dynamic

            model = quantize_dynamic(copy.deepcopy(model).float(), {torch.nn.Linear}, dtype=torch.qint8)
    elif config.dtype is not None:
        model = copy.deepcopy(model).to(getattr(torch, config.dtype))
    return model.eval()


@register_drafter
class DraftModelDrafter(Drafter):
    name = "draft-model"

    def __init__(self, target: torch.nn.Module, model: torch.nn.Module | None = None,
                 config: DraftModelConfig | None = None, **options):
        super().__init__(target)
        if model is None:
            raise InvalidInputError("draft-model needs model=<a small causal LM sharing the target's tokenizer>")
        self.config = config or DraftModelConfig(**options)
        target_vocab = target.get_output_embeddings().weight.shape[0]
        draft_vocab = model.get_output_embeddings().weight.shape[0]
        if target_vocab != draft_vocab:
            raise IncompatibleModelsError(
                f"draft model vocabulary ({draft_vocab} tokens) differs from the target's ({target_vocab}); "
                "the draft model must share the target's tokenizer")
        self.runner = CausalLMRunner(_prepare(model, self.config))
        self.cached = torch.zeros(0, dtype=torch.long)  # token ids in the draft cache, slot by slot
        self._fed_slots = torch.zeros(0, dtype=torch.long)  # cache slot (relative to tree_base) of each pool node
        self._tree_base = 0
        self._chosen = torch.zeros(0, dtype=torch.long)  # pool index of each node of the proposed tree

    # ------------------------------------------------------------------ engine hooks
    def begin(self, state: DecodeState) -> None:
        self.runner.reset()
        self.cached = torch.zeros(0, dtype=torch.long)

    def propose(self, state: DecodeState) -> DraftTree:
        topk, width, budget = self.config.shape
        depth = min(self.config.depth, state.remaining - 1)
        if depth < 1:
            return DraftTree.empty(state.sequence.device)
        root_logits = self._sync(state.sequence[0].cpu())
        tree_base = self.runner.length  # the root sits at slot tree_base - 1
        self._tree_base = tree_base
        dev = self.runner.device

        # Pool of candidate nodes, in creation order (parents before children).
        logp = torch.log_softmax(root_logits.float(), dim=-1)
        scores, tokens = logp.topk(topk)
        parents = torch.full((topk,), -1, dtype=torch.long, device=dev)
        level = torch.arange(topk, device=dev)  # pool indices of the newest level
        fed = torch.full((topk,), -1, dtype=torch.long, device=dev)  # cache slot of a fed node, -1 if never fed
        fed_anc = torch.zeros(0, 0, dtype=torch.bool, device=dev)  # [F, F] ancestor-or-self among fed nodes
        for d in range(2, depth + 1):
            lvl_scores = scores[level]
            if float(lvl_scores.max().exp()) < self.config.min_prob:
                break
            expand = level[lvl_scores.topk(min(width, level.numel())).indices]  # [w] pool indices
            w = expand.numel()
            f = fed_anc.shape[0]
            par_slot = fed[parents[expand]].clamp(min=0)
            has_par = parents[expand] >= 0
            rows = torch.zeros(w, f, dtype=torch.bool, device=dev)
            if f:
                rows = fed_anc[par_slot] & has_par[:, None]
            new_rows = torch.cat([rows, torch.eye(w, dtype=torch.bool, device=dev)], dim=1)  # [w, f + w]
            fed_anc = torch.cat([torch.cat([fed_anc, torch.zeros(f, w, dtype=torch.bool, device=dev)], 1),
                                 new_rows], 0)
            mask = torch.cat([torch.ones(w, tree_base, dtype=torch.bool, device=dev), new_rows], dim=1)
            positions = torch.full((w,), tree_base - 2 + d, dtype=torch.long, device=dev)
            out = self.runner.forward(tokens[expand], positions, mask)
            self.forward_count += 1
            fed[expand] = torch.arange(f, f + w, device=dev)
            child_logp, child_tok = torch.log_softmax(out.logits, dim=-1).topk(topk)  # [w, topk]
            n_pool = tokens.numel()
            scores = torch.cat([scores, (scores[expand, None] + child_logp).flatten()])
            tokens = torch.cat([tokens, child_tok.flatten()])
            parents = torch.cat([parents, expand.repeat_interleave(topk)])
            fed = torch.cat([fed, torch.full((w * topk,), -1, dtype=torch.long, device=dev)])
            level = torch.arange(n_pool, tokens.numel(), device=dev)

        # Keep the best `budget` nodes; a stable sort puts a parent before an equally scored child.
        order = torch.sort(scores, descending=True, stable=True).indices[:budget]
        chosen = order.sort().values  # creation order is topological
        remap = torch.full((tokens.numel(),), -1, dtype=torch.long, device=dev)
        remap[chosen] = torch.arange(chosen.numel(), device=dev)
        chosen_parents = parents[chosen]
        new_parents = torch.where(chosen_parents >= 0, remap[chosen_parents.clamp(min=0)], chosen_parents)
        self._chosen = chosen
        self._fed_slots = fed
        self._pool_tokens = tokens
        return DraftTree(tokens[chosen], new_parents).to(state.sequence.device)

    def observe(self, state: DecodeState, outcome: StepOutcome) -> None:
        """Keep the accepted nodes the draft model already processed; the next _sync feeds the rest."""
        if outcome.tree.size == 0 or self.runner.length == 0:
            return
        accepted_pool = self._chosen[outcome.result.accepted_nodes.to(self._chosen.device)]
        slots = self._fed_slots[accepted_pool]
        in_sequence = min(int((slots >= 0).sum()), outcome.emitted.numel())  # fed nodes form a prefix of the path
        slots = slots[:in_sequence]  # and stopping rules may have cut the emitted tokens
        self.runner.commit(self._tree_base, slots)
        kept_tokens = self._pool_tokens[accepted_pool[: slots.numel()]].cpu()  # what the draft cache really holds
        self.cached = torch.cat([self.cached[: self._tree_base], kept_tokens])

    # ------------------------------------------------------------------ cache sync
    def _sync(self, sequence: torch.Tensor) -> torch.Tensor:
        """Bring the draft cache to ``sequence`` (1-D, CPU) and return the logits after its last token."""
        n = min(self.cached.numel(), sequence.numel() - 1)  # always feed at least the root
        same = (self.cached[:n] == sequence[:n]).long()
        common = int(same.cumprod(0).sum()) if n else 0
        if common == 0:
            out = self.runner.prefill(sequence[None].to(self.runner.device))
        else:
            self.runner.crop(common)
            pending = sequence[common:]
            k = pending.numel()
            positions = torch.arange(common, common + k)
            causal = torch.ones(k, k, dtype=torch.bool).tril_()
            out = self.runner.forward(pending, positions, causal, logits_to_keep=1)
        self.forward_count += 1
        self.cached = sequence.clone()
        return out.logits[-1]
