"""YAML presets in ``configs/``: every CLI flag can come from one, and flags override it."""

from __future__ import annotations

from pathlib import Path

import yaml

from specdec.errors import InvalidInputError, UnknownNameError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_PRESET = "qwen-coder-pair"
KEYS = {"target", "draft", "dtype", "threads", "max_new_tokens", "limit", "categories", "verifier", "baselines",
        "drafters", "prompts", "output", "chat", "do_sample", "temperature", "top_k", "top_p", "seed"}


def available_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_preset(name_or_path: str | None) -> dict:
    """Read a preset by name (``configs/NAME.yaml``) or path."""
    name_or_path = name_or_path or DEFAULT_PRESET
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise UnknownNameError(f"unknown preset {name_or_path!r}; available presets: {', '.join(available_presets())}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"{path}: not valid YAML ({exc})") from exc
    unknown = set(data) - KEYS
    if unknown:
        raise InvalidInputError(f"{path}: unknown keys {sorted(unknown)}; valid keys: {', '.join(sorted(KEYS))}")
    return data
