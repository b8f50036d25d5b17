"""Build the C++ kernels on first use and cache them; say once, and why, when the portable fallback runs instead.

The extension is compiled from the shipped sources (``*.cpp`` here) with torch's JIT extension builder
(ninja + the system C++ compiler) for the CPU at hand (``-march=native``), into ``<cache>/kernels/<key>`` where the
key covers the source, the torch version and the CPU flags, so a changed machine or torch never reuses a stale
build. A first build takes ~30 s; later loads take milliseconds. We build at first use, not at ``pip install``,
because the kernel must match the installed torch's ABI and the running CPU's instruction set, which a wheel
built elsewhere cannot know (DeepSpeed's op builder makes the same choice).

A build is crash-safe: torch's builder runs in its own process group (:mod:`specdec.kernels.compile_job`) inside
a fresh temporary folder, renamed onto ``<key>`` only once complete, so a killed build leaves no half-built folder
and none of its compilers running; one build per key runs at a time, under a lock the kernel releases when its
owner dies (:mod:`specdec.kernels.build_lock`); a build or a wait that takes too long stops with a message.

``SPECDEC_KERNELS=0`` (or false/off/no) turns the kernels off (the fallback runs); ``SPECDEC_KERNELS=1`` (or
true/on/yes) makes a failed build an error instead of a warning; ``auto`` (the default) builds and falls back with a
warning; any other value is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from specdec.errors import InvalidInputError, KernelBuildError
from specdec.files import default_cache_dir
from specdec.kernels.build_lock import BuildLock
from specdec.precision import cpu_flags

SOURCES = tuple(Path(__file__).with_name(f)
                for f in ("bindings.cpp", "int8_linear.cpp", "w8a8_linear.cpp", "kquant_linear.cpp",
                          "cached_attention.cpp", "rms_norm.cpp"))
HEADERS = (Path(__file__).with_name("tiles.h"),)  # part of the build key, not compiled alone
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512_bf16", "avx512_vnni")  # what the sources execute

BUILD_TIMEOUT_S = 900.0  # a first build takes ~30-60 s on 2 cores; a build 15x slower is stuck, not busy
WAIT_TIMEOUT_S = BUILD_TIMEOUT_S + 60.0  # waiting for another process's build: its timeout, and some
STOP_GRACE_S = 10.0  # for a stopped build to stop its compilers (compile_job.NINJA_GRACE_S, and some)

_status: dict = {"cpu": None}


def kernel_status() -> dict:
    """What the last :func:`cpu_kernels` call found: ``{"cpu": "native" | "fallback: <why>" | None}``."""
    return dict(_status)


def _cache_root() -> Path:
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
    raw, setting = kernels_setting()
    why = _unavailable(raw, setting)
    if why is None:
        try:
            module = _build("specdec_cpu_kernels", SOURCES)
            _status["cpu"] = "native"
            return module
        except Exception as exc:  # a missing compiler or a build error: the fallback is correct, only slower
            if setting == "on":
                raise KernelBuildError(f"building the CPU kernels failed ({type(exc).__name__}: {exc}); install a "
                                       "C++ compiler (g++) and `pip install ninja`, or unset SPECDEC_KERNELS") from exc
            why = f"the build failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    _status["cpu"] = f"fallback: {why}"
    if setting != "off":
        warnings.warn(f"specdec: quantized weights run on the portable torch fallback, which is slower: {why}",
                      RuntimeWarning, stacklevel=2)
    return None


_SPELLINGS = {**dict.fromkeys(("0", "false", "off", "no"), "off"), **dict.fromkeys(("1", "true", "on", "yes"), "on"),
              **dict.fromkeys(("", "auto"), "auto")}


def kernels_setting() -> tuple[str, str]:
    """(the raw value, "off" | "on" | "auto") of ``SPECDEC_KERNELS``; any other spelling is refused."""
    raw = os.environ.get("SPECDEC_KERNELS", "auto")
    setting = _SPELLINGS.get(raw.strip().lower())
    if setting is None:
        raise InvalidInputError(f"SPECDEC_KERNELS={raw!r} is not understood; use 0/false/off/no (portable fallback), "
                                "1/true/on/yes (the native kernels, a failed build is an error) or auto (default)")
    return raw, setting


def _unavailable(raw: str, setting: str) -> str | None:
    if setting == "off":
        return f"SPECDEC_KERNELS={raw}"
    missing = [f for f in REQUIRED_FLAGS if f not in cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    return None


def _build(name: str, sources: tuple):
    """The extension ``name`` from the cache, or built into a temporary folder renamed into place (module
    docstring); one build per key at a time across processes (:mod:`specdec.kernels.build_lock`)."""
    root = _cache_root()
    folder = root / f"{name}-{build_key()}"
    module = _import_built(folder, name)
    if module is not None:
        return module

    def waiting(pid):
        print(f"specdec: waiting for process {pid}, which is compiling the CPU kernels into {folder}", file=sys.stderr)

    with BuildLock(root / f"{folder.name}.lock", WAIT_TIMEOUT_S, waiting):
        module = _import_built(folder, name)  # another process built it while we waited
        if module is not None:
            return module
        for leftover in root.glob(f".building-{folder.name}-*"):  # from builds killed before their rename
            shutil.rmtree(leftover, ignore_errors=True)
        print(f"specdec: compiling the CPU kernels for this machine (once, ~30 s) into {folder}", file=sys.stderr)
        tmp = Path(tempfile.mkdtemp(prefix=f".building-{folder.name}-", dir=root))
        tmp.chmod(0o755)  # mkdtemp's 0700 would follow the folder into place
        try:
            _compile(name, sources, tmp)
            if folder.exists():  # a folder without a loadable extension (an older, killed build)
                stale = Path(tempfile.mkdtemp(prefix=f".stale-{folder.name}-", dir=root))
                os.replace(folder, stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    module = _import_built(folder, name)
    if module is None:
        raise KernelBuildError(f"the build in {folder} finished but left no loadable {name}*.so")
    return module


def _import_built(folder: Path, name: str):
    """The extension module in ``folder``, or None when there is none or it does not load (a damaged build)."""
    import importlib.util

    for path in sorted(folder.glob(f"{name}*.so")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        try:
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except ImportError:
            continue
        return module
    return None


def _compile(name: str, sources: tuple, folder: Path) -> None:
    """Run torch's builder in its own process group (:mod:`specdec.kernels.compile_job`) into ``folder``; kill the
    whole group on a timeout, an interrupt or any other exit of ours."""
    env = dict(os.environ)
    try:  # ninja from PyPI puts its binary in the venv, which need not be on PATH
        import ninja

        env["PATH"] = ninja.BIN_DIR + os.pathsep + env.get("PATH", "")
    except ImportError:
        pass
    spec = {"name": name, "sources": [str(p) for p in sources], "build_directory": str(folder),
            "include_paths": [str(Path(__file__).parent)], "cflags": ["-O3", "-march=native", "-fopenmp"],
            "ldflags": ["-fopenmp"], "parent": os.getpid()}
    log_path = folder / "build.log"
    with open(log_path, "wb") as log:
        job = subprocess.Popen([sys.executable, str(Path(__file__).with_name("compile_job.py")), json.dumps(spec)],
                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
        try:
            code = job.wait(timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise KernelBuildError(f"the kernel build took more than {BUILD_TIMEOUT_S:.0f} s and was stopped (log: "
                                   f"{log_path}); a busy machine? run again, or set SPECDEC_KERNELS=0") from None
        finally:
            _kill_group(job)
    if code != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise KernelBuildError(f"the kernel build failed (exit {code}):\n" + "\n".join(tail))


def _kill_group(job: subprocess.Popen) -> None:
    """Stop the build if anything of it is left: SIGTERM to the job, which stops ninja and every compiler
    (:mod:`specdec.kernels.compile_job`), then SIGKILL to its process group."""
    if job.poll() is None:
        job.terminate()
        try:
            job.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    job.wait()
