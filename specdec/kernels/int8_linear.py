"""``Int8Linear``: weight-only int8 in place of ``nn.Linear``, per-output-row symmetric scales.

q[j, :] = round(w[j, :] / s[j]) with s[j] = max|w[j, :]| / 127, so the weights take half the bytes of bf16 and a
memory-bound decoding step reads half as much. On a CPU with AVX-512 BF16 the compiled kernel
(``int8_linear.cpp``) multiplies bf16 activations by the int8 weights, de-quantizing each weight tile once per
call however many tokens the call holds (what tree verification needs: torch's ``_weight_int8pack_mm`` costs
grow with the token count). Elsewhere, the portable fallback computes the same function in torch, slower.

Exactness in specdec is against the loaded model: an int8 target's own greedy decoding is the reference that
speculative decoding on that target reproduces (the quantization error itself is measured in docs/cpu-fast-path.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specdec.kernels.build import cpu_kernels

_ROWS = 16  # output rows per packed block (one AVX-512 register of fp32 lanes)


class Int8Linear(torch.nn.Module):
    """A linear layer holding int8 weights packed for the kernel (``[N/16, K/2, 16, 2]``), fp32 scales and bias."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, in_features: int,
                 out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", packed, persistent=True)
        self.register_buffer("scale", scale, persistent=True)
        self.register_buffer("bias", bias if bias is not None else torch.empty(0), persistent=True)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "Int8Linear":
        q, scale, bias = quantize_padded(linear, columns=2)
        n_pad, k_pad = q.shape
        packed = q.view(n_pad // _ROWS, _ROWS, k_pad // 2, 2).permute(0, 2, 1, 3).contiguous()
        return cls(packed, scale, bias, linear.in_features, linear.out_features)

    def int8_weight(self) -> torch.Tensor:
        """The unpacked ``[out_features, in_features]`` int8 weight (tests, export)."""
        blocks, kpairs = self.packed.shape[:2]
        q = self.packed.permute(0, 2, 1, 3).reshape(blocks * _ROWS, kpairs * 2)
        return q[:self.out_features, :self.in_features]

    @property
    def weight(self) -> torch.Tensor:
        """A de-quantized bf16 copy ``q * scale`` (for code that reads an LM head's shape or rows; not the hot path)."""
        return (self.int8_weight().float() * self.scale[:self.out_features, None]).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        kernel = cpu_kernels() if x.device.type == "cpu" and x.dtype == torch.bfloat16 else None
        if kernel is not None:
            y = self._kernel_call(kernel, flat)
        else:
            y = self._fallback(flat)
        if y.shape[-1] != self.out_features:
            y = y[:, :self.out_features]
        return y.reshape(*shape[:-1], self.out_features)

    def _kernel_call(self, kernel, flat: torch.Tensor) -> torch.Tensor:
        if self.in_features % 2:
            flat = F.pad(flat, (0, 1))
        return kernel.int8_linear(flat.contiguous(), self.packed, self.scale, self.bias)

    def _fallback(self, flat: torch.Tensor) -> torch.Tensor:
        """The kernel's function in torch: fp32 products of the activations and int8 weights, scaled, plus bias."""
        q = self.int8_weight().float()
        y = (flat.float() @ q.T) * self.scale[:self.out_features]
        if self.bias.numel():
            y = y + self.bias[:self.out_features]
        return y.to(flat.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=int8"


def quantize_rows(w: torch.Tensor, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(q int8 [N, K], scale fp32 [N])`` with ``w ~= q * scale[:, None]``, computed
    ``rows`` rows at a time (every step is per row, so blocks change nothing) so that a bf16 LM head never has a
    whole fp32 copy (545 MB for the 0.5B Qwen draft's)."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for start in range(0, w.shape[0], rows):
        block = w[start:start + rows].float()
        s = block.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
        q[start:start + rows] = torch.round(block / s[:, None]).clamp_(-127, 127)
        scale[start:start + rows] = s
    return q, scale


def quantize_padded(linear: torch.nn.Linear, columns: int) -> tuple:
    """``(q, scale, bias)`` of ``linear`` (:func:`quantize_rows`), padded with zero rows to a multiple of 16 and zero
    columns to a multiple of ``columns`` (the kernels' shape rules; forward slices the padding off)."""
    q, scale = quantize_rows(linear.weight.detach())
    bias = None if linear.bias is None else linear.bias.detach().float()
    pad_n, pad_k = -q.shape[0] % _ROWS, -q.shape[1] % columns
    if pad_n or pad_k:
        q = F.pad(q, (0, pad_k, 0, pad_n))
        scale = F.pad(scale, (0, pad_n), value=1.0)
        bias = None if bias is None else F.pad(bias, (0, pad_n))
    return q, scale.contiguous(), bias
