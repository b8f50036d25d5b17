"""Write GGUF Q4_K / Q6_K blocks from dense weights (gguf-py only de-quantizes these types), for tests: a plain
round-to-nearest encoder, not llama.cpp's search, but valid blocks of the format that gguf-py's reference
``gguf.quants.dequantize`` reads."""

from __future__ import annotations

import numpy as np
import torch

from specdec.kernels.kquant_linear import Q4_K, Q6_K, KQuantLinear


def encode_q4_k(w: np.ndarray) -> np.ndarray:
    """uint8 ``[N, K/256 * 144]`` blocks for fp32 ``w [N, K]`` (K a multiple of 256)."""
    n, k = w.shape
    x = w.reshape(n, k // 256, 8, 32).astype(np.float32)
    lo = np.minimum(x.min(-1), 0.0)
    step = (x.max(-1) - lo) / 15.0
    tiny = 2.0 ** -14  # fp16's smallest normal: an all-zero block (a padding row) keeps finite scales
    d16 = np.maximum(step.max(-1) / 63.0, tiny).astype(np.float16)
    dmin16 = np.maximum((-lo).max(-1) / 63.0, tiny).astype(np.float16)
    sc = np.clip(np.round(step / d16.astype(np.float32)[..., None]), 1, 63).astype(np.uint8)
    m = np.clip(np.round(-lo / dmin16.astype(np.float32)[..., None]), 0, 63).astype(np.uint8)
    scale = d16.astype(np.float32)[..., None] * sc
    offset = dmin16.astype(np.float32)[..., None] * m
    q = np.clip(np.round((x + offset[..., None]) / scale[..., None]), 0, 15).astype(np.uint8).reshape(n, -1, 256)
    s = np.zeros((n, k // 256, 12), np.uint8)
    s[..., 0:4] = sc[..., 0:4] | ((sc[..., 4:8] >> 4) << 6)
    s[..., 4:8] = m[..., 0:4] | ((m[..., 4:8] >> 4) << 6)
    s[..., 8:12] = (sc[..., 4:8] & 15) | ((m[..., 4:8] & 15) << 4)
    chunks = q.reshape(n, -1, 4, 2, 32)
    qs = (chunks[:, :, :, 0] | (chunks[:, :, :, 1] << 4)).reshape(n, -1, 128)
    blocks = np.concatenate([d16[..., None].view(np.uint8), dmin16[..., None].view(np.uint8), s, qs], axis=-1)
    return np.ascontiguousarray(blocks.reshape(n, -1))


def encode_q6_k(w: np.ndarray) -> np.ndarray:
    """uint8 ``[N, K/256 * 210]`` blocks for fp32 ``w [N, K]``."""
    n, k = w.shape
    x = w.reshape(n, k // 256, 16, 16).astype(np.float32)
    step = np.abs(x).max(-1) / 31.0
    d16 = np.maximum(step.max(-1) / 127.0, 2.0 ** -14).astype(np.float16)
    sc = np.clip(np.round(step / d16.astype(np.float32)[..., None]), 1, 127).astype(np.int8)
    scale = d16.astype(np.float32)[..., None] * sc
    q = (np.clip(np.round(x / scale[..., None]), -32, 31) + 32).astype(np.uint8).reshape(n, -1, 2, 4, 32)
    lo, hi = q & 15, q >> 4
    ql = np.concatenate([lo[:, :, :, 0] | (lo[:, :, :, 2] << 4), lo[:, :, :, 1] | (lo[:, :, :, 3] << 4)], axis=-1)
    qh = hi[:, :, :, 0] | (hi[:, :, :, 1] << 2) | (hi[:, :, :, 2] << 4) | (hi[:, :, :, 3] << 6)
    blocks = np.concatenate([ql.reshape(n, -1, 128), qh.reshape(n, -1, 64), sc.view(np.uint8),
                             d16[..., None].view(np.uint8)], axis=-1)
    return np.ascontiguousarray(blocks.reshape(n, -1))


ENCODERS = {Q4_K: encode_q4_k, Q6_K: encode_q6_k}


def kquant_layer(linear: torch.nn.Linear, qtype: int) -> KQuantLinear:
    blocks = ENCODERS[qtype](linear.weight.detach().float().numpy())
    return KQuantLinear.from_blocks(blocks, qtype, linear.in_features, linear.bias)


def kquantize_model(model: torch.nn.Module, qtypes=(Q4_K, Q6_K)) -> int:
    """Swap every ``nn.Linear`` whose input size is a multiple of 256 for a :class:`KQuantLinear`, alternating the
    formats in ``qtypes`` (as a Q4_K_M file mixes them); return how many."""
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and child.in_features % 256 == 0:
                setattr(module, child_name, kquant_layer(child, qtypes[count % len(qtypes)]))
                count += 1
    return count
