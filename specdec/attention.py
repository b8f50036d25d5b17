"""Attention for decoding and verification on the CPU: a few queries against a long KV cache.

torch's CPU ``scaled_dot_product_attention`` (the flash kernel) is built for many queries: with one query and a
730-token cache it took 0.74 ms per layer here (2 threads, 12 query heads, 2 KV heads), 28 layers: 21 ms of a 46 ms
token. Two batched matrix products with the query heads grouped onto their shared key/value head, and an fp32
softmax between them, take 0.09 ms. This is the same function; only the rounding order differs.

For bf16 models with the native kernels, every forward over a KV cache (decoding, tree verification, any
number of queries and keys) runs ``cached_attention`` (``specdec/kernels/cached_attention.cpp``): each query and
head is reduced alone, in an order fixed by the keys it attends, masked keys skipped. A token's output is then
bit-identical whether it is verified with other draft tokens or decoded alone over the same cache, which, with the
row-invariant linear kernels, makes speculative decoding on the quantized CPU path equal plain greedy decoding
token for token (docs/cpu-fast-path.md, Exactness). Prefill (no cache yet) stays on sdpa: plain and speculative
decoding prefill the same prompt in the same single forward.

``specdec_cpu`` is registered with transformers' ``AttentionInterface`` (its documented extension point) and uses
the sdpa mask builder; otherwise it hands off to sdpa for many queries, short caches and anything it does not
handle. :func:`use_fast_cpu_attention` switches a model to it; :func:`specdec.models.load` does so for CPU models.
"""

from __future__ import annotations

import torch

from specdec.kernels.build import cpu_kernels

NAME = "specdec_cpu"
MAX_QUERIES = 32  # beyond this (prefill), sdpa's flash kernel is faster
MIN_KEYS = 128  # below this, sdpa is as fast


def grouped_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``(out [B, q, H, D], None)`` from ``query [B, H, q, D]``, ``key`` and ``value [B, KVH, k, D]`` and a mask
    ``[B, 1, q, k]`` (bool, True = may attend, or additive float), as transformers' attention functions return."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, queries, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    if _cached_kernel_applies(query, key, attention_mask, dropout, kwargs):
        return cached_attention(query, key, value, attention_mask, scaling), None
    if (query.device.type != "cpu" or queries > MAX_QUERIES or keys < MIN_KEYS or dropout
            or kwargs.get("softcap") is not None or kwargs.get("output_attentions") or heads % kv_heads
            or (attention_mask is None and queries > 1)  # causal by default: left to sdpa
            or (attention_mask is not None and attention_mask.dim() != 4)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = heads // kv_heads
    scale = dim ** -0.5 if scaling is None else scaling
    # [B, KVH, groups * q, D] @ [B, KVH, D, k]: the query heads that share a key/value head, in one product
    scores = torch.matmul(query.reshape(batch, kv_heads, groups * queries, dim), key.transpose(-1, -2))
    scores = scores.float().mul_(scale).view(batch, kv_heads, groups, queries, keys)
    if attention_mask is not None:  # None: one query, which sees the whole cache
        mask = attention_mask[..., -keys:][:, :, None]  # [B, 1, 1, q, k] over the groups
        if mask.dtype == torch.bool:
            scores = scores.masked_fill_(~mask, torch.finfo(torch.float32).min)
        else:
            scores = scores.add_(mask.float())
    probs = scores.softmax(-1).to(value.dtype).view(batch, kv_heads, groups * queries, keys)
    out = torch.matmul(probs, value).view(batch, heads, queries, dim)
    return out.transpose(1, 2).contiguous(), None


def _cached_kernel_applies(query, key, attention_mask, dropout, kwargs) -> bool:
    """A forward over a cache (or of one token) of a bf16 model on the CPU, with the native kernels built."""
    if (query.device.type != "cpu" or query.dtype != torch.bfloat16 or key.dtype != torch.bfloat16 or dropout
            or kwargs.get("softcap") is not None or kwargs.get("output_attentions")
            or query.shape[1] % key.shape[1] or key.shape[2] < query.shape[2]
            or (key.shape[2] == query.shape[2] and query.shape[2] > 1)  # prefill: no cache yet (sdpa)
            or (attention_mask is not None and attention_mask.dim() != 4)):
        return False
    return cpu_kernels() is not None


def cached_attention(query, key, value, attention_mask, scaling=None) -> torch.Tensor:
    """``out [B, q, H, D]`` from ``query [B, H, q, D]``, ``key``/``value [B, KVH, k, D]`` (bf16) and a mask
    ``[B | 1, 1, q, >= k]`` (bool, True = may attend, or additive float) or None (causal, the queries last), on the
    batch-invariant native kernel (``cached_attention.cpp``)."""
    dim, keys = query.shape[-1], key.shape[2]
    scale = dim ** -0.5 if scaling is None else scaling
    if attention_mask is None:
        mask = torch.empty(0)
    else:
        mask = attention_mask[:, 0, :, :keys]  # as transformers' sdpa forward slices it
        mask = mask.contiguous() if mask.dtype == torch.bool else mask.float().contiguous()
    return cpu_kernels().cached_attention(query.contiguous(), key.contiguous(), value.contiguous(), mask,
                                          float(scale))


def register() -> str:
    """Register ``specdec_cpu`` with transformers (idempotent); return its name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, grouped_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use_fast_cpu_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Switch ``model`` (an HF causal LM using sdpa) to ``specdec_cpu`` attention; other implementations (eager,
    flash) are left as they are. Returns the model."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return model
    model.set_attn_implementation(register())
    return model
