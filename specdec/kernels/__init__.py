"""Native CPU kernels (docs/cpu-fast-path.md): built from source on first use, with a portable torch fallback."""

from specdec.kernels.build import int8_kernel, kernel_status
from specdec.kernels.int8_linear import Int8Linear, quantize_linears, weights_kind

__all__ = ["Int8Linear", "int8_kernel", "kernel_status", "quantize_linears", "weights_kind"]
