"""A lean forward for a draft model of the Llama / Qwen2 families on the CPU: the decoder written out once.

transformers' forward spends ~0.4 ms of Python and small ops per decoder layer on this 2-core CPU (module calls,
cache objects, mask building, rotary per call): 10.5 ms of the 0.5B Qwen draft's 34 ms token (docs/cpu-fast-path.md,
"A cheap draft"). :class:`LeanRunner` runs the same model with the runner interface of
:class:`specdec.runner.CausalLMRunner` (prefill, forward under a tree mask, commit, crop) and, per layer:

- q/k/v and gate/up as one linear call each where the layers share a kernel format (GGUF k-quant blocks
  concatenated by rows, or dense weights concatenated);
- the KV cache preallocated (``[layers, kv_heads, capacity, head_dim]``), written in place, committed with one
  gather for all layers;
- attention on the batch-invariant kernel over a slice of that cache (``cached_attention.cpp``), torch's grouped
  matmuls for prefill and non-bf16 models;
- RMSNorm, rotary and SiLU as a few fused torch ops.

It is used only for drafting: the draft's numerics change what it proposes, never the output (the target verifies
every token), so it need not be bit-identical to transformers' forward; the tests check that its logits follow it
closely. llama.cpp (one compute graph per forward) is the model for this; we keep torch ops between our kernels.
Families other than Llama / Qwen2 (Gemma 3: sliding windows, extra norms) keep transformers' forward.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from specdec.kernels.build import cpu_kernels
from specdec.kernels.kquant_linear import KQuantLinear
from specdec.models.draft_transforms import PaddedKQuantLinear
from specdec.errors import InvalidInputError
from specdec.runner import CausalLMRunner, ForwardOutput, KVRunner, text_config

FAMILIES = ("llama", "qwen2")
MAX_KERNEL_QUERIES = 32  # more queries (a prompt's prefill): torch's grouped matmuls


def lean_supported(model: torch.nn.Module) -> str | None:
    """None when :class:`LeanRunner` can run ``model``, else why not (for the message of ``lean=True``)."""
    config = text_config(model)
    if getattr(config, "model_type", None) not in FAMILIES:
        return f"model type {getattr(config, 'model_type', None)!r} (lean forward: {', '.join(FAMILIES)})"
    if model.get_input_embeddings().weight.device.type != "cpu":
        return "the draft model is not on the CPU"
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "use_sliding_window", False):
        return "a non-SiLU MLP or sliding-window attention"
    if getattr(config, "pretraining_tp", 1) not in (None, 1) or getattr(config, "attention_bias", False) and \
            config.model_type == "llama":
        return "tensor-parallel or biased Llama attention"
    decoder = getattr(model, "model", None)
    if decoder is None or not hasattr(decoder, "layers") or not hasattr(decoder, "rotary_emb"):
        return "no decoder layer list with a rotary embedding"
    return None


def fuse_linears(layers: list[torch.nn.Module]) -> torch.nn.Module | None:
    """One layer computing ``cat([l(x) for l in layers], -1)``, or None when their kinds do not concatenate:
    GGUF k-quant layers of one format and input width with row counts multiple of 16, or dense ``nn.Linear``."""
    first = layers[0]
    if all(type(l) is torch.nn.Linear for l in layers):
        weight = torch.cat([l.weight.detach() for l in layers])
        biased = any(l.bias is not None for l in layers)
        fused = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=biased, dtype=weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(weight)
            if biased:
                fused.bias.copy_(torch.cat([l.bias.detach() if l.bias is not None else
                                            weight.new_zeros(l.out_features) for l in layers]))
        return fused
    kind = type(first)
    if kind not in (KQuantLinear, PaddedKQuantLinear) or any(
            type(l) is not kind or l.qtype_id != first.qtype_id or l.in_features != first.in_features
            or l.out_features % 16 for l in layers):
        return None
    buffers = [torch.cat([getattr(l, name) for l in layers]) for name in ("qs", "sc", "mins", "d", "dmin")]
    biased = any(l.bias.numel() for l in layers)
    bias = torch.cat([l.bias if l.bias.numel() else torch.zeros(l.out_features) for l in layers]) if biased else None
    out_features = sum(l.out_features for l in layers)
    if kind is PaddedKQuantLinear:
        return PaddedKQuantLinear(first.qtype_id, *buffers, bias, first.in_features, out_features,
                                  true_in_features=first.true_in_features)
    return KQuantLinear(first.qtype_id, *buffers, bias, first.in_features, out_features)


class _Projection:
    """``layers`` as one call: fused where :func:`fuse_linears` can, else each layer and a concatenation."""

    def __init__(self, layers: list[torch.nn.Module]):
        self.fused = fuse_linears(layers)
        self.layers = layers

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x)
        return torch.cat([layer(x) for layer in self.layers], dim=-1)


class _Layer:
    def __init__(self, layer: torch.nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm = layer.input_layernorm.weight
        self.post_norm = layer.post_attention_layernorm.weight
        self.qkv = _Projection([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = attn.o_proj
        self.gate_up = _Projection([mlp.gate_proj, mlp.up_proj])
        self.down = mlp.down_proj


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float, kernels) -> torch.Tensor:
    """transformers' Llama / Qwen2 RMSNorm (fp32, rounded to the model dtype, times the weight); one call on the
    native ``kernels`` (bf16 models) when given."""
    if kernels is not None:
        return kernels.rms_norm(x.contiguous(), weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


class LeanRunner(KVRunner):
    """The runner interface of :class:`~specdec.runner.CausalLMRunner` over the lean forward (module docstring)."""

    def __init__(self, model: torch.nn.Module, capacity: int = 512):
        why = lean_supported(model)
        if why is not None:
            raise ValueError(f"LeanRunner cannot run this model: {why}")
        self.model = model
        config = text_config(model)
        decoder = model.model
        self.embed = decoder.embed_tokens
        self.rotary = decoder.rotary_emb
        self.final_norm = decoder.norm.weight
        self.head = model.get_output_embeddings()
        self.eps = float(config.rms_norm_eps)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.scale = float(decoder.layers[0].self_attn.scaling)
        self.layers = [_Layer(layer) for layer in decoder.layers]
        self.dtype = self.embed.weight.dtype
        self.kernels = cpu_kernels() if self.dtype == torch.bfloat16 else None  # None: torch ops only
        self.vocab_size = int(self.embed.weight.shape[0])
        self.capacity = capacity
        self.keys = self.values = None  # [layers, kv_heads, capacity, head_dim]
        self.length = 0
        self.forward_seconds = 0.0

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def reset(self) -> None:
        self.length = 0  # no sliding-window layers here, so no per-slot positions to keep

    def _reserve(self, total: int) -> None:
        if self.keys is not None and total <= self.keys.shape[2]:
            return
        capacity = max(self.capacity, 1 << (total - 1).bit_length())
        shape = (len(self.layers), self.kv_heads, capacity, self.head_dim)
        keys, values = torch.empty(shape, dtype=self.dtype), torch.empty(shape, dtype=self.dtype)
        if self.keys is not None and self.length:
            keys[:, :, :self.length] = self.keys[:, :, :self.length]
            values[:, :, :self.length] = self.values[:, :, :self.length]
        self.keys, self.values = keys, values

    # ------------------------------------------------------------------ forwards
    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                output_hidden_states: bool = False, logits_to_keep: int = 0) -> ForwardOutput:
        """As :meth:`CausalLMRunner.forward`: ``mask`` [n, n] over the new tokens (each also sees the whole cache)
        or [n, length + n]."""
        started = time.perf_counter()
        n, past = tokens.numel(), self.length
        total = past + n
        assert mask.shape in ((n, n), (n, total)), "mask must be [n, n] or [n, length + n]"
        tokens, positions, mask = tokens.cpu(), positions.cpu(), mask.cpu()
        if mask.shape[1] == n and past:
            mask = torch.cat([torch.ones(n, past, dtype=torch.bool), mask], dim=1)
        self._reserve(total)
        x = self.embed(tokens)  # [n, d]
        cos, sin = self.rotary(x, positions[None])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [n, 1, D]
        attend = self._attention(mask, n)
        hidden = [x] if output_hidden_states else None
        h, kvh, dim = self.heads, self.kv_heads, self.head_dim
        half = dim // 2
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(_rms(x, layer.input_norm, self.eps, self.kernels))
            qk = qkv[:, :(h + kvh) * dim].view(n, h + kvh, dim)
            qk = qk * cos + torch.cat([-qk[..., half:], qk[..., :half]], dim=-1) * sin  # rotary, both at once
            self.keys[i, :, past:total] = qk[:, h:].transpose(0, 1)
            self.values[i, :, past:total] = qkv[:, (h + kvh) * dim:].view(n, kvh, dim).transpose(0, 1)
            out = attend(qk[:, :h], i, total)  # [n, h * dim]
            x = x + layer.o(out)
            gate, up = layer.gate_up(_rms(x, layer.post_norm, self.eps, self.kernels)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
            if hidden is not None:
                hidden.append(x)
        self.length = total
        kept = x if logits_to_keep == 0 else x[-logits_to_keep:]
        normed = _rms(kept, self.final_norm, self.eps, self.kernels)
        if hidden is not None:  # transformers' last hidden state is after the final norm
            hidden[-1] = _rms(x, self.final_norm, self.eps, self.kernels)
        logits = self.head(normed).float()
        self.forward_seconds += time.perf_counter() - started
        return ForwardOutput(logits, tuple(hidden) if hidden is not None else None)

    def _attention(self, mask: torch.Tensor, n: int):
        """A function ``(q [n, H, D], layer, total) -> [n, H * D]`` over the cache under ``mask`` [n, total]."""
        if self.kernels is not None and n <= MAX_KERNEL_QUERIES:
            kernel = self.kernels.cached_attention
            bool_mask = mask[None].contiguous()

            def on_kernel(q, i, total):
                out = kernel(q.transpose(0, 1).contiguous()[None], self.keys[i, None, :, :total],
                             self.values[i, None, :, :total], bool_mask, self.scale)
                return out.view(n, -1)
            return on_kernel
        groups = self.heads // self.kv_heads
        blocked = ~mask  # [n, total]

        def on_torch(q, i, total):
            dim = self.head_dim
            qg = q.transpose(0, 1).reshape(self.kv_heads, groups * n, dim)  # query heads grouped on their kv head
            scores = torch.matmul(qg, self.keys[i, :, :total].transpose(-1, -2)).float().mul_(self.scale)
            scores = scores.view(self.kv_heads, groups, n, total).masked_fill_(blocked, float("-inf"))
            probs = scores.softmax(-1).to(self.dtype).view(self.kv_heads, groups * n, total)
            out = torch.matmul(probs, self.values[i, :, :total])  # [kvh, groups * n, dim]
            return out.view(self.heads, n, dim).transpose(0, 1).reshape(n, -1)
        return on_torch

    def kv_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the cached ``(keys, values)`` [1, kv_heads, length, head_dim] (views of the preallocated cache)."""
        if self.keys is None:
            return []
        return [(self.keys[i, None, :, :self.length], self.values[i, None, :, :self.length])
                for i in range(len(self.layers))]

    # ------------------------------------------------------------------ cache edits
    def commit(self, base: int, keep: torch.Tensor) -> None:
        """Keep cache slots ``base + keep`` (increasing, relative to ``base``) right after ``base``; drop the rest."""
        assert 0 <= base <= self.length
        keep = keep.cpu().long()
        n_keep = keep.numel()
        if n_keep and bool(keep[-1] != n_keep - 1):  # not a plain prefix: gather the kept slots, all layers at once
            self.keys[:, :, base:base + n_keep] = self.keys[:, :, base + keep]
            self.values[:, :, base:base + n_keep] = self.values[:, :, base + keep]
        self.length = base + n_keep


def draft_runner(model: torch.nn.Module, lean: "bool | str" = "auto"):
    """The runner a draft model drafts with: :class:`LeanRunner` where it runs this model (``lean="auto"``, or
    ``True``, which requires it), else transformers' forward (:class:`~specdec.runner.CausalLMRunner`)."""
    why = lean_supported(model) if lean else "lean=False"
    if lean is True and why is not None:
        raise InvalidInputError(f"draft-model lean=True, but the lean forward cannot run this draft model: {why}")
    return LeanRunner(model) if why is None else CausalLMRunner(model)
