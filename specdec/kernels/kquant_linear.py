"""``KQuantLinear``: a linear layer that runs a GGUF file's own Q4_K or Q6_K weights (what llama.cpp runs), never
de-quantized to a dense copy.

The GGUF blocks (ggml's ``block_q4_K`` / ``block_q6_K``: 256 columns of one row per super-block, an fp16 scale,
6- or 8-bit sub-block scales, 4- or 6-bit quants) are regrouped at load time for 16 output rows at a time
(``kquant_linear.cpp`` documents the layout). Per token, the activations are rounded to int8 per 256-column block,
as llama.cpp's Q8_K does, and the kernel sums exact integer products with AVX-512 VNNI: a forward over 8 tokens
reads the weights once. Where the kernel cannot run, the fallback computes the same function in torch from the
de-quantized weights, slower.

We differ from llama.cpp in the arithmetic order of the float sums and in rounding the output to bf16, so the two
decode the same weights with slightly different numerics; exactness in specdec is against this model's own greedy
decoding.
"""

from __future__ import annotations

import numpy as np
import torch

from specdec.kernels.build import cpu_kernels

Q4_K, Q6_K = 12, 14  # GGML's type ids (gguf.GGMLQuantizationType)
QK = 256  # columns per super-block
BLOCK_BYTES = {Q4_K: 144, Q6_K: 210}
NAMES = {Q4_K: "Q4_K", Q6_K: "Q6_K"}
_ROWS = 16


class KQuantLinear(torch.nn.Module):
    """Packed GGUF k-quant weights of an ``[out_features, in_features]`` linear layer, and an fp32 bias.

    Buffers (R = out_features / 16 rounded up, B = in_features / 256): ``qs`` uint8 ``[R, B, 2048 | 3072]``,
    ``sc`` ``[R, B, 8 | 16, 16]`` (uint8 for Q4_K, int8 for Q6_K), ``mins`` uint8 ``[R, B, 8, 16]`` (Q4_K, else
    empty), ``d`` and ``dmin`` fp16 ``[R, B, 16]`` (``dmin`` empty for Q6_K), ``qtype`` the GGML type id."""

    def __init__(self, qtype: int, qs, sc, mins, d, dmin, bias, in_features: int, out_features: int):
        super().__init__()
        if qtype not in NAMES:
            raise ValueError(f"KQuantLinear runs Q4_K or Q6_K weights, not GGML type {qtype}")
        self.in_features, self.out_features = in_features, out_features
        self.qtype_id = int(qtype)  # a Python int for the hot path (the buffer is for the saved state)
        self.register_buffer("qtype", torch.tensor(qtype, dtype=torch.int64), persistent=True)
        for name, value in (("qs", qs), ("sc", sc), ("mins", mins), ("d", d), ("dmin", dmin)):
            self.register_buffer(name, value, persistent=True)
        self.register_buffer("bias", bias if bias is not None else torch.empty(0), persistent=True)

    @classmethod
    def from_blocks(cls, blocks: np.ndarray, qtype: int, in_features: int, bias: torch.Tensor | None = None):
        """From a GGUF tensor's raw bytes ``blocks`` (uint8 ``[out_features, in_features / 256 * block bytes]``)."""
        qtype = int(qtype)
        if qtype not in NAMES:
            raise ValueError(f"KQuantLinear runs Q4_K or Q6_K weights, not GGML type {qtype}")
        if in_features % QK or blocks.shape[1] != in_features // QK * BLOCK_BYTES[qtype]:
            raise ValueError(f"{NAMES[qtype]} blocks of shape {tuple(blocks.shape)} do not hold rows of "
                             f"{in_features} columns")
        out_features = blocks.shape[0]
        if bias is not None:
            bias = torch.nn.functional.pad(bias.detach().float(), (0, -out_features % _ROWS))
        return cls(qtype, *pack_fields(unpack_blocks(blocks, qtype), qtype), bias, in_features, out_features)

    @property
    def format(self) -> str:
        return NAMES[self.qtype_id]

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        """The ``[out_features, in_features]`` weights the blocks encode (tests, the fallback; never the hot path)."""
        return dequantize_fields(unpack_packed(self), self.qtype_id)[:self.out_features].to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """A de-quantized bf16 copy (for code that reads an LM head's shape or rows; not the hot path)."""
        return self.dequantized(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        kernel = cpu_kernels() if x.device.type == "cpu" and x.dtype == torch.bfloat16 else None
        if kernel is not None:
            y = kernel.kquant_linear(flat.contiguous(), self.qtype_id, self.qs, self.sc, self.mins, self.d,
                                     self.dmin, self.bias)
        else:
            y = self._fallback(flat)
        if y.shape[-1] != self.out_features:
            y = y[:, :self.out_features]
        return y.reshape(*shape[:-1], self.out_features)

    def _fallback(self, flat: torch.Tensor) -> torch.Tensor:
        """The kernel's function in torch: activations rounded per 256-column block, times the de-quantized weights
        (fp32), plus bias."""
        a, s = quantize_activations(flat)
        x = (a.float().view(a.shape[0], -1, QK) * s[:, :, None]).view(a.shape[0], -1)
        y = x @ self.dequantized().T
        if self.bias.numel():
            y = y + self.bias[:self.out_features]
        return y.to(flat.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.format}"


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a int8 [n, K], s fp32 [n, K/256])`` with ``x ~= a * s`` per block, as the kernel rounds them."""
    n, k = x.shape
    xb = x.float().view(n, k // QK, QK)
    s = xb.abs().amax(-1) / 127.0
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    return torch.round(xb * inv[:, :, None]).to(torch.int8).view(n, k), s


# --- GGUF blocks <-> integer fields <-> the kernel's layout ---------------------------------------------------------
# Fields, per row r and super-block b: q [N, B, 256] uint8 (Q4_K 0..15, Q6_K 0..63), sc [N, B, 8 | 16]
# (uint8 | int8), m [N, B, 8] uint8 (Q4_K), d and dmin [N, B] fp16.

def unpack_blocks(blocks: np.ndarray, qtype: int) -> dict:
    """The integer fields of GGUF ``block_q4_K`` / ``block_q6_K`` rows (layouts of ggml-common.h)."""
    n = blocks.shape[0]
    raw = np.ascontiguousarray(blocks).reshape(n, -1, BLOCK_BYTES[qtype])
    if qtype == Q4_K:  # d fp16, dmin fp16, scales[12] (eight 6-bit scales and mins), qs[128]
        d, dmin = raw[..., 0:2].copy().view(np.float16)[..., 0], raw[..., 2:4].copy().view(np.float16)[..., 0]
        s = raw[..., 4:16]
        sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
        m = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
        qs = raw[..., 16:144].reshape(n, -1, 4, 32)  # 64-column chunks: low nibbles, then high nibbles
        q = np.stack([qs & 15, qs >> 4], axis=3).reshape(n, -1, QK)
        return {"q": q, "sc": sc, "m": m, "d": d, "dmin": dmin}
    # Q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] int8, d fp16; two halves of 128 columns
    ql = raw[..., 0:128].reshape(n, -1, 2, 2, 32)
    qh = raw[..., 128:192].reshape(n, -1, 2, 1, 32)
    lo = np.stack([ql[:, :, :, 0] & 15, ql[:, :, :, 1] & 15, ql[:, :, :, 0] >> 4, ql[:, :, :, 1] >> 4], axis=3)
    hi = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3
    q = (lo | (hi << 4)).reshape(n, -1, QK)
    d = raw[..., 208:210].copy().view(np.float16)[..., 0]
    return {"q": q, "sc": raw[..., 192:208].copy().view(np.int8), "d": d}


def dequantize_fields(f: dict, qtype: int) -> torch.Tensor:
    """``[N, B * 256]`` fp32 weights from the fields: Q4_K ``d*sc*q - dmin*m``, Q6_K ``d*sc*(q-32)``."""
    q = torch.as_tensor(np.asarray(f["q"])).float()
    n, blocks = q.shape[:2]
    d = torch.as_tensor(np.asarray(f["d"])).float()[:, :, None, None]
    sc = torch.as_tensor(np.asarray(f["sc"])).float()
    if qtype == Q4_K:
        m = torch.as_tensor(np.asarray(f["m"])).float()
        dmin = torch.as_tensor(np.asarray(f["dmin"])).float()[:, :, None, None]
        w = d * sc[..., None] * q.view(n, blocks, 8, 32) - dmin * m[..., None]
    else:
        w = d * sc[..., None] * (q.view(n, blocks, 16, 16) - 32)
    return w.reshape(n, blocks * QK)


def pack_fields(f: dict, qtype: int) -> tuple:
    """``(qs, sc, mins, d, dmin)`` in the kernel's layout, rows padded with zeros to a multiple of 16."""
    q, sc, d = np.asarray(f["q"]), np.asarray(f["sc"]), np.asarray(f["d"])
    pad = -q.shape[0] % _ROWS
    if pad:
        padding = lambda a: np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)])  # noqa: E731
        f = {k: padding(np.asarray(v)) for k, v in f.items()}
        q, sc, d = f["q"], f["sc"], f["d"]
    rb, blocks = q.shape[0] // _ROWS, q.shape[1]

    def by_rows(a):  # [N, B, ...] -> [R, B, ..., 16]
        a = a.reshape(rb, _ROWS, blocks, -1)
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1))

    if qtype == Q4_K:  # [R, 16, B, j, half, i, c] -> [R, B, j, i, 16, c]: low nibble half 0, high nibble half 1
        qq = q.reshape(rb, _ROWS, blocks, 8, 2, 4, 4).transpose(0, 2, 3, 4, 5, 1, 6)
        qs = (qq[:, :, :, 0] | (qq[:, :, :, 1] << 4)).reshape(rb, blocks, 2048)
        dmin = by_rows(np.asarray(f["dmin"])[..., None])[..., 0, :]
        mins = torch.from_numpy(by_rows(np.asarray(f["m"]).astype(np.uint8)))
        dmin = torch.from_numpy(np.ascontiguousarray(dmin).astype(np.float16))
        sc_t = torch.from_numpy(by_rows(sc.astype(np.uint8)))
    else:  # [R, 16, B, j, i, c] -> [R, B, j, i, 16, c]; three 64-byte vectors per 16-column sub-block
        qq = q.reshape(rb, _ROWS, blocks, 16, 4, 4).transpose(0, 2, 3, 4, 1, 5)
        lo, hi = qq & 15, qq >> 4
        parts = [lo[:, :, :, 0] | (lo[:, :, :, 2] << 4), lo[:, :, :, 1] | (lo[:, :, :, 3] << 4),
                 hi[:, :, :, 0] | (hi[:, :, :, 1] << 2) | (hi[:, :, :, 2] << 4) | (hi[:, :, :, 3] << 6)]
        qs = np.stack(parts, axis=3).reshape(rb, blocks, 3072)
        mins, dmin = torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.float16)
        sc_t = torch.from_numpy(by_rows(sc.astype(np.int8)))
    d_t = torch.from_numpy(np.ascontiguousarray(by_rows(d[..., None])[..., 0, :]).astype(np.float16))
    return torch.from_numpy(np.ascontiguousarray(qs, dtype=np.uint8)), sc_t, mins, d_t, dmin


def unpack_packed(layer: KQuantLinear) -> dict:
    """The fields back from a layer's packed buffers (the inverse of :func:`pack_fields`, padding rows kept)."""
    qtype = int(layer.qtype)
    rb, blocks = layer.d.shape[:2]

    def by_block(t):  # [R, B, ..., 16] -> [N, B, ...]
        a = t.numpy()
        return a.reshape(rb, blocks, -1, _ROWS).transpose(0, 3, 1, 2).reshape(rb * _ROWS, blocks, -1)

    d = by_block(layer.d.view(rb, blocks, 1, _ROWS))[..., 0]
    if qtype == Q4_K:
        qs = layer.qs.numpy().reshape(rb, blocks, 8, 4, _ROWS, 4)
        qq = np.stack([qs & 15, qs >> 4], axis=3)  # [R, B, j, half, i, 16, c]
        q = qq.transpose(0, 5, 1, 2, 3, 4, 6).reshape(rb * _ROWS, blocks, QK)
        return {"q": q, "sc": by_block(layer.sc), "m": by_block(layer.mins), "d": d,
                "dmin": by_block(layer.dmin.view(rb, blocks, 1, _ROWS))[..., 0]}
    z = layer.qs.numpy().reshape(rb, blocks, 16, 3, _ROWS, 4)
    lo = np.stack([z[:, :, :, 0] & 15, z[:, :, :, 1] & 15, z[:, :, :, 0] >> 4, z[:, :, :, 1] >> 4], axis=3)
    hi = np.stack([(z[:, :, :, 2] >> s) & 3 for s in (0, 2, 4, 6)], axis=3)
    q = (lo | (hi << 4)).transpose(0, 4, 1, 2, 3, 5).reshape(rb * _ROWS, blocks, QK)
    return {"q": q, "sc": by_block(layer.sc), "d": d}
