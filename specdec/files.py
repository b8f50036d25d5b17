"""Small JSON files that several processes may read while one rewrites them (forward costs, layer sets)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_json_atomic(path: "str | os.PathLike", data) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename: a reader sees the old file or the
    new one, never half of it. Creates the folder; leaves no temporary file behind on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
