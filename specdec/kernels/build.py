"""Build the C++ kernels on first use and cache them; say once, and why, when the portable fallback runs instead.

The extension is compiled from the shipped sources (``*.cpp`` here) with torch's JIT extension builder
(ninja + the system C++ compiler) for the CPU at hand (``-march=native``), into ``<cache>/kernels/<key>`` where the
key covers the source, the torch version and the CPU flags, so a changed machine or torch never reuses a stale
build. A first build takes ~30 s; later loads take milliseconds. We build at first use, not at ``pip install``,
because the kernel must match the installed torch's ABI and the running CPU's instruction set, which a wheel
built elsewhere cannot know (DeepSpeed's op builder makes the same choice).

``SPECDEC_KERNELS=0`` turns the kernels off (the fallback runs); ``SPECDEC_KERNELS=1`` makes a failed build an
error instead of a warning.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from specdec.precision import cpu_flags

SOURCES = tuple(Path(__file__).with_name(f)
                for f in ("bindings.cpp", "int8_linear.cpp", "w8a8_linear.cpp", "kquant_linear.cpp",
                          "cached_attention.cpp"))
HEADERS = (Path(__file__).with_name("tiles.h"),)  # part of the build key, not compiled alone
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512_bf16", "avx512_vnni")  # what the sources execute

_status: dict = {"cpu": None}


def kernel_status() -> dict:
    """What the last :func:`cpu_kernels` call found: ``{"cpu": "native" | "fallback: <why>" | None}``."""
    return dict(_status)


def _cache_root() -> Path:
    from specdec.models.fetch import default_cache_dir

    return default_cache_dir() / "kernels"


def build_key() -> str:
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))
    text = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    text += torch.__version__.encode() + sys.version.encode() + " ".join(flags).encode()
    return hashlib.sha256(text).hexdigest()[:16]


@lru_cache(maxsize=None)
def cpu_kernels():
    """The compiled extension (``int8_linear``, ``w8a8_linear``, ``kquant_linear``), or None where the fallback
    must run."""
    setting = os.environ.get("SPECDEC_KERNELS", "auto")
    why = _unavailable(setting)
    if why is None:
        try:
            module = _build("specdec_cpu_kernels", SOURCES)
            _status["cpu"] = "native"
            return module
        except Exception as exc:  # a missing compiler or a build error: the fallback is correct, only slower
            if setting == "1":
                raise RuntimeError(f"building the CPU kernels failed ({type(exc).__name__}: {exc}); install a C++ "
                                   "compiler (g++) and `pip install ninja`, or unset SPECDEC_KERNELS") from exc
            why = f"the build failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    _status["cpu"] = f"fallback: {why}"
    if setting != "0":
        warnings.warn(f"specdec: quantized weights run on the portable torch fallback, which is slower: {why}",
                      RuntimeWarning, stacklevel=2)
    return None


def _unavailable(setting: str) -> str | None:
    if setting == "0":
        return "SPECDEC_KERNELS=0"
    missing = [f for f in REQUIRED_FLAGS if f not in cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    return None


def _build(name: str, sources: tuple):
    from torch.utils.cpp_extension import load

    try:  # ninja from PyPI puts its binary in the venv, which need not be on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    folder = _cache_root() / f"{name}-{build_key()}"
    folder.mkdir(parents=True, exist_ok=True)
    if not any(folder.glob(f"{name}*.so")):
        print(f"specdec: compiling the CPU kernels for this machine (once, ~30 s) in {folder}", file=sys.stderr)
    return load(name=name, sources=[str(p) for p in sources], build_directory=str(folder), verbose=False,
                extra_include_paths=[str(Path(__file__).parent)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"])
