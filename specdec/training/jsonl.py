"""Append-only JSONL files that survive being killed mid-write (their sha256: ``specdec.files.sha256_of``).

Every stage of the data pipeline appends one finished row at a time and fsyncs it, so a killed run loses at most
the row it was writing; :func:`read_rows` skips a torn last line, and the stage redoes that row on resume.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable


def read_rows(path: "str | os.PathLike") -> list[dict]:
    """The JSON objects of ``path`` (none if it does not exist); a torn last line (killed writer) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:  # only the last line may be torn
                raise
    return rows


def append_rows(path: "str | os.PathLike", rows: Iterable[dict]) -> None:
    """Append ``rows`` (one JSON object per line) and fsync, so a later reader sees whole rows only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size > 0:
        with path.open("rb+") as f:  # a killed writer left half a line: cut it off, the stage redoes that row
            data = f.read()
            if not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
