"""``W8A8Linear``: int8 weights (per output row, as :class:`Int8Linear`) times int8 activations, quantized per token
and per block of 128 input columns at every call (symmetric, round to nearest even).

The products are exact int32 dot products on AVX-512 VNNI (``w8a8_linear.cpp``), so, unlike the bf16-activation
kernel, the weights are never de-quantized and a forward over 8-12 tokens costs about what reading the weights
for one costs. The price is the activations' rounding (about 0.7% relative error per layer output, against
<0.001% for bf16 activations); llama.cpp makes the same trade with 256-column Q8_K blocks. As for every weight
format, speculative decoding is exact against this model's own greedy decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specdec.kernels.int8_linear import Int8Linear, quantize_padded

BLOCK = 128  # activation columns per scale (w8a8_linear.cpp)
_ROWS = 16


class W8A8Linear(Int8Linear):
    """Packed ``[N/16, Kp/4, 16, 4]`` int8 weights (Kp: K rounded up to 128), ``wsum = 128 * block sums``."""

    def __init__(self, packed, wsum, scale, bias, in_features: int, out_features: int):
        super().__init__(packed, scale, bias, in_features, out_features)
        self.register_buffer("wsum", wsum, persistent=True)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "W8A8Linear":
        q, scale, bias = quantize_padded(linear, columns=BLOCK)
        n_pad, k_pad = q.shape
        packed = q.view(n_pad // _ROWS, _ROWS, k_pad // 4, 4).permute(0, 2, 1, 3).contiguous()
        wsum = (128 * q.view(n_pad // _ROWS, _ROWS, k_pad // BLOCK, BLOCK).sum(-1, dtype=torch.int32))
        return cls(packed, wsum.permute(0, 2, 1).contiguous(), scale, bias, linear.in_features, linear.out_features)

    def int8_weight(self) -> torch.Tensor:
        blocks, quads = self.packed.shape[:2]
        q = self.packed.permute(0, 2, 1, 3).reshape(blocks * _ROWS, quads * 4)
        return q[:self.out_features, :self.in_features]

    def _kernel_call(self, kernel, flat: torch.Tensor) -> torch.Tensor:
        return kernel.w8a8_linear(flat.contiguous(), self.packed, self.wsum, self.scale, self.bias)

    def _fallback(self, flat: torch.Tensor) -> torch.Tensor:
        """The kernel's function in torch: activations rounded per 128-column block, exact integer products (in
        fp64, exact at these sizes), per-block scales, then the row scales and bias."""
        a, s = quantize_activations(flat)
        q = F.pad(self.int8_weight(), (0, a.shape[-1] - self.in_features)).double()
        n, blocks = s.shape
        dots = torch.einsum("nbk,obk->nbo", a.double().view(n, blocks, BLOCK), q.view(-1, blocks, BLOCK))
        y = (dots * s.double()[:, :, None]).sum(1) * self.scale[:self.out_features].double()
        if self.bias.numel():
            y = y + self.bias[:self.out_features].double()
        return y.to(flat.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=int8, activations=int8"


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a int8 [n, Kp], s fp32 [n, Kp/128])`` with ``x ~= a * s`` per block, as the kernel rounds them."""
    n, k = x.shape
    xp = F.pad(x.float(), (0, -k % BLOCK)).view(n, -1, BLOCK)
    s = xp.abs().amax(-1) / 127.0
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    a = torch.round(xp * inv[:, :, None]).to(torch.int8)
    return a.view(n, -1), s
