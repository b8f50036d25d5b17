"""``weights="auto"``, the default of :func:`specdec.models.load`: the fast path where it runs, dense elsewhere.

``"gguf"`` (the GGUF file's own Q4_K / Q6_K tensors on the native kernels, docs/cpu-fast-path.md) when the model
comes with a GGUF file that holds k-quant tensors, runs on the CPU in bf16 without a ``device_map``, and the
kernels run on this CPU; otherwise ``"dense"``. The choice is said once per process and reason, on stderr; the
dense model stays one argument away (``weights="dense"``, ``--weights dense``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from specdec.kernels import cpu_kernels
from specdec.models.gguf_weights import holds_kquants

_SAID: set[str] = set()


def resolve_weights(weights: str, gguf_file: "Callable[[], Path] | str | Path | None", device, device_map,
                    dtype) -> str:
    """``weights`` itself unless it is ``"auto"``; then ``"gguf"`` or ``"dense"`` (module docstring)."""
    if weights != "auto":
        return weights
    why = _why_dense(gguf_file, device, device_map, dtype)
    chosen = "dense" if why else "gguf"
    message = (f"specdec: weights='auto' -> dense ({why})" if why else
               "specdec: weights='auto' -> gguf: the GGUF file's own Q4_K / Q6_K tensors on the native CPU kernels "
               "(weights='dense' or --weights dense for the dense model)")
    if message not in _SAID:
        _SAID.add(message)
        print(message, file=sys.stderr)
    return chosen


def _why_dense(gguf_file, device, device_map, dtype) -> str | None:
    if gguf_file is None:
        return "no GGUF file for this model"
    if device_map is not None:
        return "a device_map places dense weights"
    if device is not None and torch.device(device).type != "cpu":
        return f"on {device}: the k-quant kernels run on the CPU"
    if dtype is not None and dtype != torch.bfloat16:
        return f"dtype {dtype}: the k-quant kernels compute in bf16"
    if cpu_kernels() is None:
        return "the native CPU kernels do not run here (docs/cpu-fast-path.md)"
    path = gguf_file() if callable(gguf_file) else gguf_file
    if not holds_kquants(path):
        return f"{Path(path).name} holds no Q4_K / Q6_K tensors"
    return None
