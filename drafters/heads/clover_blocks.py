"""The two blocks of Clover-2 (arXiv 2408.00264), shrunk: the cosine-gated attention decoder and a small causal
augmenting block with its own KV cache over committed positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from specdec.drafters.heads.base import ResidualMLP, normal_, uniform_


class CosineGate(nn.Module):
    """Clover's "attention decoder" (ResAttentionBlock): one key per query, so softmax becomes a cosine gate.

    out = x + concat_h(cos(q_h, k_h) v_h),  q = W_q RMSNorm(x), k = W_k y, v = W_v y, h over ``heads`` groups.
    Ours: W_q, W_k map d -> r (the reference: d -> d, initialised I + U(0, 0.01)); W_v = B A is low-rank d -> r -> d
    with B ~ U(0, 0.01) as the reference's W_v.
    """

    def __init__(self, d: int, rank: int, heads: int):
        super().__init__()
        assert rank % heads == 0 and d % heads == 0, "rank and hidden size must divide into the gate's heads"
        self.heads = heads
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.q = nn.Linear(d, rank)
        self.k = nn.Linear(d, rank)
        self.v_in = nn.Linear(d, rank, bias=False)
        self.v_out = nn.Linear(rank, d, bias=False)

    def init_weights(self, generator: torch.Generator | None) -> None:
        d = self.q.in_features
        for lin in (self.q, self.k, self.v_in):
            normal_(lin.weight, d ** -0.5, generator)
        nn.init.zeros_(self.q.bias)
        nn.init.zeros_(self.k.bias)
        uniform_(self.v_out.weight, 0.0, 0.01, generator)
        nn.init.ones_(self.norm.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y [..., d] -> [..., d]."""
        shape = (*x.shape[:-1], self.heads, -1)
        gate = nn.functional.cosine_similarity(self.q(self.norm(x)).view(shape), self.k(y).view(shape), dim=-1)
        v = self.v_out(self.v_in(y)).view(shape)  # [..., heads, d / heads]
        return x + (gate[..., None] * v).flatten(-2)


@dataclass
class SequenceCache:
    """Keys and values of the augmenting block over the committed positions of one generation."""

    keys: torch.Tensor | None = None  # [1, H, L, hd]
    values: torch.Tensor | None = None  # [1, H, L, hd]

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]


def rotate(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of ``x`` [B, H, T, hd] at ``positions`` [T] (half-split layout)."""
    half = x.shape[-1] // 2
    freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angle = positions.to(x.device, torch.float32)[:, None] * freq  # [T, half]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class AugmentingBlock(ResidualMLP, nn.Module):
    """One pre-norm causal decoder layer over the sequence (RoPE attention with ``heads`` x ``head_dim`` inner size,
    SwiGLU MLP of width ``mlp``); output projections zero-initialised (the identity at init).

    Clover-2 stacks two full decoder layers initialised from the target's last layer; for a 1.5B target those
    are ~47M parameters each, so we keep one layer with a narrow attention and MLP, randomly initialised.
    """

    def __init__(self, d: int, heads: int, head_dim: int, mlp: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm1 = nn.RMSNorm(d, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * inner, bias=False)
        self.out = nn.Linear(inner, d, bias=False)
        self.build_mlp(d, mlp)

    def init_weights(self, generator: torch.Generator | None) -> None:
        d = self.qkv.in_features
        normal_(self.qkv.weight, d ** -0.5, generator)
        normal_(self.gate_up.weight, d ** -0.5, generator)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.down.weight)
        nn.init.ones_(self.norm1.weight)
        nn.init.ones_(self.norm2.weight)

    def forward(self, x: torch.Tensor, cache: SequenceCache | None = None) -> torch.Tensor:
        """x [B, T, d] at positions cache.length + 0..T-1 -> [B, T, d]; with ``cache`` (B = 1) its keys and values
        are read and the new ones appended."""
        b, t, _ = x.shape
        start = 0 if cache is None else cache.length
        positions = torch.arange(start, start + t, device=x.device)
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, positions), rotate(k, positions)  # [B, H, T, hd]
        if cache is not None and cache.keys is not None:
            k = torch.cat([cache.keys, k], dim=2)
            v = torch.cat([cache.values, v], dim=2)
        if cache is not None:
            cache.keys, cache.values = k, v
        causal = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril_(start)  # [T, start + T]
        attn = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal)  # [B, H, T, hd]
        h = x + self.out(attn.transpose(1, 2).reshape(b, t, -1))
        return self.mlp_residual(h)
