"""Make a draft model cheaper to run: a reduced LM head, 4-bit weights, fewer layers. Each transform changes only
what the draft proposes, never the output: the target verifies every token.

- :func:`restrict_vocab`: the LM head over the rows of a reduced draft vocabulary (FR-Spec, Zhao et al. 2025,
  arXiv 2502.14856; :class:`~specdec.drafters.heads.vocab.DraftVocab`). The 0.5B Qwen draft's head is 136M of its
  494M parameters; over the 16,384 tokens of the shipped heads' vocabulary it is 15M. The head still returns
  logits over the full vocabulary, -inf outside the kept rows: greedy argmax, top-k and the sampling distribution q
  are computed as before, a token outside the vocabulary gets q = 0 and is never drafted, and rejection sampling
  stays lossless because q is exactly the distribution the draft drew from (it need not cover p's support).
- :func:`requantize_q4_k`: every linear layer (LM head included) re-quantized to Q4_K from its current weights, run
  on the Q4_K kernel (:mod:`specdec.kernels.kquant_linear`). The 0.5B Qwen GGUF file stores its 896-column
  matrices as Q5_0 / Q8_0, which have no kernel, so they run as w8a8 (8 bits); as Q4_K they read 4.5 bits per
  weight. A Q4_K super-block holds 256 columns, so an 896-column matrix is padded with zero columns to 1024 (the
  activations are padded with zeros per call; the products of the padding are exact zeros). The encoder is plain
  round-to-nearest with a per-32-column scale and minimum (llama.cpp's ``make_qkx2_quants`` also searches the
  scale; we do not: a draft's rounding costs acceptance, never exactness).
- :func:`keep_layers`: the first ``n`` decoder layers (then the final norm and the LM head), an early exit
  (LayerSkip, Elhoushi et al. 2024, arXiv 2404.16710, trains for it; the draft here is used as it is).

:func:`cheap_draft` applies them to a copy that shares the untouched tensors with the model it was given.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from specdec.errors import InvalidInputError
from specdec.kernels.int8_linear import Int8Linear
from specdec.kernels.kquant_linear import Q4_K, QK, KQuantLinear, pack_fields, unpack_packed

QUANTIZE = ("q4_k",)


def cheap_draft(model: torch.nn.Module, quantize: str | None = None, vocab=None,
                layers: int | None = None) -> torch.nn.Module:
    """A copy of ``model`` (modules copied, tensors shared) with the given transforms; ``model`` is untouched.

    ``quantize``: None (as loaded) or ``"q4_k"``; ``vocab``: a :class:`DraftVocab` (None: the full vocabulary);
    ``layers``: how many decoder layers to keep (None: all)."""
    if quantize not in (None,) + QUANTIZE:
        raise InvalidInputError(f"draft quantize must be None or one of {', '.join(map(repr, QUANTIZE))}, got "
                                f"{quantize!r}")
    tensors = [*model.parameters(), *model.buffers()]
    clone = copy.deepcopy(model, memo={id(t): t for t in tensors})
    if layers is not None:
        keep_layers(clone, layers)
    if vocab is not None and not vocab.is_full:
        restrict_vocab(clone, vocab, dense=quantize is not None)  # quantized once, below
    if quantize == "q4_k":
        requantize_q4_k(clone)
    return clone.eval()


# --- reduced vocabulary -------------------------------------------------------------------------------------------

def resolve_draft_vocab(spec, target: torch.nn.Module):
    """The :class:`DraftVocab` that ``draft_vocab=spec`` names for ``target``: None (the full vocabulary), a
    DraftVocab, ``"shipped"`` (the vocabulary of the heads shipped for this target) or a heads folder (its
    vocabulary)."""
    from pathlib import Path

    from specdec.drafters.heads.vocab import DraftVocab  # cycle: specdec.drafters -> draft_model -> here

    if spec is None:
        return None
    rows = target.get_output_embeddings().weight.shape[0]
    if isinstance(spec, DraftVocab):
        vocab = spec
    elif spec == "shipped":
        vocab = _shipped_vocab(target, rows)
    elif isinstance(spec, (str, Path)) and Path(spec).is_dir():
        vocab = _folder_vocab(Path(spec), rows)
        if vocab is None:
            raise InvalidInputError(f"draft_vocab={str(spec)!r}: that heads folder has the full vocabulary")
    else:
        raise InvalidInputError(f"draft_vocab must be None, a DraftVocab, 'shipped' or a heads folder, got {spec!r}")
    if vocab.vocab_size != rows:
        raise InvalidInputError(f"draft_vocab is over {vocab.vocab_size} tokens, the target has {rows}; build it with "
                                "the target's tokenizer")
    return vocab


def _shipped_vocab(target: torch.nn.Module, rows: int):
    from specdec.drafters.heads import KINDS  # cycle: specdec.drafters -> draft_model -> here
    from specdec.drafters.heads.drafter import shipped_heads  # cycle: specdec.drafters -> draft_model -> here

    for kind in KINDS:
        folder = shipped_heads(kind, target)
        vocab = None if folder is None else _folder_vocab(folder, rows)
        if vocab is not None:
            return vocab
    raise InvalidInputError("draft_vocab='shipped': no heads with a reduced vocabulary are shipped for this target; "
                            "pass a DraftVocab (DraftVocab.from_counts over token counts of your data) or a heads "
                            "folder trained with `specdec train`")


def _folder_vocab(folder, rows: int):
    """The reduced vocabulary saved with the heads in ``folder``, or None (full vocabulary)."""
    from safetensors import safe_open

    from specdec.drafters.heads.checkpoint import VOCAB_KEY  # cycle: specdec.drafters -> draft_model -> here
    from specdec.drafters.heads.vocab import DraftVocab  # cycle: specdec.drafters -> draft_model -> here

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            if VOCAB_KEY in f.keys():
                return DraftVocab(f.get_tensor(VOCAB_KEY).long(), rows)
    return None


class ReducedLMHead(torch.nn.Module):
    """An LM head over the rows ``ids`` of the full one; returns ``[..., vocab_size]`` logits, -inf outside ``ids``."""

    def __init__(self, rows: torch.nn.Module, ids: torch.Tensor, vocab_size: int):
        super().__init__()
        self.rows = rows  # a linear layer [len(ids), hidden] (any kind: nn.Linear, Int8Linear, KQuantLinear, ...)
        self.register_buffer("ids", ids.long(), persistent=True)
        self.in_features, self.out_features = rows.in_features, int(vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = self.rows(x)
        out = kept.new_full((*kept.shape[:-1], self.out_features), float("-inf"))
        return out.index_copy_(-1, self.ids, kept)

    @property
    def weight(self) -> torch.Tensor:
        """``[vocab_size, hidden]`` with zero rows outside ``ids`` (for code that reads an LM head's shape)."""
        rows = self.rows.weight.detach()
        return rows.new_zeros(self.out_features, rows.shape[1]).index_copy_(0, self.ids, rows)

    def extra_repr(self) -> str:
        return f"kept={self.ids.numel()} of {self.out_features} rows"


def restrict_vocab(model: torch.nn.Module, vocab, dense: bool = False) -> None:
    """Replace ``model``'s LM head in place by a :class:`ReducedLMHead` over ``vocab.ids``: its rows in the head's own
    kind (the same values), or with ``dense`` as an ``nn.Linear`` of their values (to be quantized next)."""
    head = model.get_output_embeddings()
    if head is None or isinstance(head, ReducedLMHead):
        raise InvalidInputError("draft_vocab: the draft model has no LM head to restrict, or it is restricted already")
    rows = head.weight.shape[0]
    if vocab.vocab_size != rows:
        raise InvalidInputError(f"draft_vocab is over {vocab.vocab_size} tokens, the draft model's LM head has {rows} "
                                "rows; build it with the target's tokenizer")
    ids = vocab.ids.cpu()
    model.set_output_embeddings(ReducedLMHead(_rows_of(head, ids, dense), ids, rows))


def _rows_of(head: torch.nn.Module, ids: torch.Tensor, dense: bool) -> torch.nn.Module:
    """A linear layer holding ``head``'s rows ``ids``: of ``head``'s kind (a GGUF k-quant's blocks as they are, an
    int8 kind re-rounded per row from the same values: the same int8 values), or with ``dense`` an ``nn.Linear``."""
    bias = getattr(head, "bias", None)
    bias = None if bias is None or not bias.numel() else bias.detach()[:head.out_features][ids]
    if type(head) is KQuantLinear and not dense:
        fields = {k: np.asarray(v)[ids.numpy()] for k, v in unpack_packed(head).items()}
        if bias is not None:
            bias = F.pad(bias.float(), (0, -ids.numel() % 16))
        return KQuantLinear(head.qtype_id, *pack_fields(fields, head.qtype_id), bias, head.in_features, ids.numel())
    if isinstance(head, Int8Linear):  # the kept int8 rows times their scales, not the whole head de-quantized
        weight = (head.int8_weight()[ids].float() * head.scale[:head.out_features][ids, None]).to(torch.bfloat16)
    else:
        weight = head.weight.detach()[ids]
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    if dense:
        return linear
    if isinstance(head, KQuantLinear):  # a padded Q4_K head of ours: re-encoded from its values
        return q4_k_linear(linear)
    if isinstance(head, Int8Linear):  # Int8Linear or W8A8Linear: the same int8 values (per-row scale of the rows)
        return type(head).from_linear(linear)
    return linear


# --- Q4_K ---------------------------------------------------------------------------------------------------------

class PaddedKQuantLinear(KQuantLinear):
    """A :class:`KQuantLinear` whose packed weights have ``in_features`` rounded up to 256 with zero columns; the
    activations get zero columns to match."""

    def __init__(self, *args, true_in_features: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.true_in_features = true_in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.in_features - x.shape[-1]
        return super().forward(F.pad(x, (0, pad)) if pad else x)

    @property
    def weight(self) -> torch.Tensor:
        """A de-quantized bf16 copy without the padding columns (not the hot path)."""
        return self.dequantized(torch.bfloat16)[:, :self.true_in_features]

    def extra_repr(self) -> str:
        return f"in_features={self.true_in_features} (packed {self.in_features}), out_features={self.out_features}, " \
               f"weights={self.format}"


def q4_k_fields(w: torch.Tensor) -> dict:
    """Q4_K integer fields (the layout of :func:`~specdec.kernels.kquant_linear.unpack_blocks`) of fp32
    ``w [N, K]``, K a multiple of 256: per 32 columns a scale and a minimum from the range (rounded to 6 bits
    against the super-block's fp16 ``d`` / ``dmin``), values rounded to the nearest of 16 levels."""
    n, k = w.shape
    x = w.float().reshape(n, k // QK, 8, 32)
    lo = x.amin(-1).clamp(max=0.0)
    step = (x.amax(-1) - lo) / 15.0
    tiny = 2.0 ** -14  # fp16's smallest normal: an all-zero super-block keeps finite scales
    d = (step.amax(-1) / 63.0).clamp(min=tiny).half()
    dmin = ((-lo).amax(-1) / 63.0).clamp(min=tiny).half()
    sc = torch.round(step / d.float()[..., None]).clamp(1, 63)
    m = torch.round(-lo / dmin.float()[..., None]).clamp(0, 63)
    scale = (d.float()[..., None] * sc)[..., None]
    offset = (dmin.float()[..., None] * m)[..., None]
    q = torch.round((x + offset) / scale).clamp(0, 15)
    return {"q": q.to(torch.uint8).reshape(n, -1, QK).numpy(), "sc": sc.to(torch.uint8).numpy(),
            "m": m.to(torch.uint8).numpy(), "d": d.numpy(), "dmin": dmin.numpy()}


def q4_k_linear(linear: torch.nn.Module, rows: int = 4096) -> KQuantLinear:
    """A Q4_K layer (a :class:`PaddedKQuantLinear` when ``in_features`` is not a multiple of 256) of any linear
    layer's weights (``.weight``: dense, or the de-quantized values of a quantized kind)."""
    weight = linear.weight  # de-quantized once (a property for quantized kinds)
    out_features, true_in = weight.shape
    pad = -true_in % QK
    parts = []
    for start in range(0, out_features, rows):  # a block of rows at a time: an LM head's fp32 copy is 600 MB
        w = weight[start:start + rows].detach().float()
        parts.append(pack_fields(q4_k_fields(F.pad(w, (0, pad)) if pad else w), Q4_K))
    packed = tuple(torch.cat([p[i] for p in parts]) if parts[0][i].numel() else parts[0][i] for i in range(5))
    bias = getattr(linear, "bias", None)
    bias = None if bias is None or not bias.numel() else bias.detach().float()[:out_features]
    if bias is not None:
        bias = F.pad(bias, (0, -out_features % 16))
    if not pad:
        return KQuantLinear(Q4_K, *packed, bias, true_in, out_features)
    return PaddedKQuantLinear(Q4_K, *packed, bias, true_in + pad, out_features, true_in_features=true_in)


def requantize_q4_k(model: torch.nn.Module) -> int:
    """Replace every linear layer of ``model`` (LM head rows included) by its Q4_K re-quantization, in place; a layer
    already in Q4_K stays. Returns the number of layers replaced."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, KQuantLinear) and child.qtype_id == Q4_K:
                continue
            if type(child) is torch.nn.Linear or isinstance(child, (Int8Linear, KQuantLinear)):
                setattr(parent, name, q4_k_linear(child))
                count += 1
    return count


# --- fewer layers -------------------------------------------------------------------------------------------------

def keep_layers(model: torch.nn.Module, n: int) -> None:
    """Keep the first ``n`` decoder layers of ``model`` in place (its config follows)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise InvalidInputError(f"draft_layers: {type(model).__name__} has no decoder layer list to prune")
    total = len(layers)
    if not isinstance(n, int) or not 1 <= n <= total:
        raise InvalidInputError(f"draft_layers must be an integer in [1, {total}] (the draft model's layers), got {n!r}")
    decoder.layers = torch.nn.ModuleList(list(layers)[:n])
    for config in {id(c): c for c in (model.config, getattr(decoder, "config", model.config))}.values():
        config.num_hidden_layers = n
        if getattr(config, "layer_types", None):
            config.layer_types = list(config.layer_types)[:n]
