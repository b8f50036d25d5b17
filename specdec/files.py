"""Where specdec keeps its files (:func:`default_cache_dir`), and files that other processes may read while one
rewrites them (forward costs, layer sets, heads, training checkpoints and feature chunks): written to a temporary
file beside the target, then renamed onto it."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from specdec.errors import UnsafeFileError


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/specdec`` (default ``~/.cache/specdec``): models, kernels, forward costs, layer sets."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "specdec"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: "str | os.PathLike", write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it onto ``path``: a reader sees
    the old file or the new one, never half of it. Creates the folder; the file gets the usual permissions
    (0666 less the umask, not mkstemp's 0600); no temporary file is left behind on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: "str | os.PathLike", data) -> None:
    """``data`` as JSON (indented, sorted keys) to ``path``, atomically (:func:`write_atomic`)."""
    text = json.dumps(data, indent=1, sort_keys=True)
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def sha256_of(path: "str | os.PathLike") -> str:
    """Hex sha256 of the file at ``path``, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tensors(path: "str | os.PathLike", what: str):
    """Read a ``torch.save`` file of tensors, numbers, strings and containers with ``weights_only=True``: a pickle
    that would build any other object (and so could run code) is refused before it runs, naming the file."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeFileError(f"{path} is not a plain {what}: it holds objects other than tensors and numbers, which "
                              f"could run code when loaded, so it was not loaded ({first}); delete it if you did not "
                              "write it") from exc


def file_in_folder(folder: "str | os.PathLike", name, listed_in: str) -> Path:
    """``folder / name`` for a file name read from an index file (``listed_in``): a bare name only, never an
    absolute path, a ``..`` or a sub-folder, so a crafted index cannot make us read files outside ``folder``."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or os.path.isabs(name) or "\x00" in name:
        raise UnsafeFileError(f"{Path(folder) / listed_in} lists the file {name!r}, which is not a plain file name in "
                              f"{folder}; files it names must sit in that folder (e.g. 'heads.safetensors')")
    return Path(folder) / name
