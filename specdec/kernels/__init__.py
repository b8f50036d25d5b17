"""Native CPU kernels (docs/cpu-fast-path.md): built from source on first use, with a portable torch fallback."""

from specdec.kernels.build import cpu_kernels, kernel_status
from specdec.kernels.int8_linear import Int8Linear
from specdec.kernels.layers import quantize_linears, quantized_copy, weights_kind
from specdec.kernels.w8a8_linear import W8A8Linear

__all__ = ["Int8Linear", "W8A8Linear", "cpu_kernels", "kernel_status", "quantize_linears", "quantized_copy",
           "weights_kind"]
