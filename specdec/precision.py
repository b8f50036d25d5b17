"""The precision a model runs in when the user names none: fast and exact on the machine at hand.

bf16 where the hardware computes it natively: a GPU that supports it, or a CPU with AVX-512 BF16 or AMX-BF16
(there bf16 decoding is about 2.1x faster than fp32 and a forward over 8 tokens costs about 1.2x one token, see
docs/models.md). fp32 elsewhere: without native support torch emulates bf16 matrix products, which is slower than
fp32. Speculative decoding is exact against the target in whatever precision the target runs, so this choice
changes speed, never which tokens a drafter may emit.
"""

from __future__ import annotations

import sys
from functools import lru_cache

import torch

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with native bf16 matrix products


@lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the OS reports (Linux ``/proc/cpuinfo``); empty where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device | str | None = None) -> bool:
    """Whether ``device`` (default CPU) computes bf16 matrix products natively."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)
    return False


_REPORTED: set[tuple[str, str]] = set()


def default_dtype(device: torch.device | str | None = None, report: bool = True) -> torch.dtype:
    """bf16 where ``device`` computes it natively, else fp32; says which once per device type and choice."""
    device = torch.device(device or "cpu")
    dtype = torch.bfloat16 if native_bf16(device) else torch.float32
    key = (device.type, str(dtype))
    if report and key not in _REPORTED:
        _REPORTED.add(key)
        why = "native bf16" if dtype == torch.bfloat16 else "no native bf16"
        print(f"specdec: loading in {str(dtype).replace('torch.', '')} on {device.type} ({why}; pass dtype= to "
              f"choose)", file=sys.stderr)
    return dtype
