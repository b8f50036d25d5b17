"""YAML presets in ``configs/`` (installed as ``specdec.configs``): every CLI flag can come from one, and flags
override it."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from specdec.errors import InvalidInputError, UnknownNameError

DEFAULT_PRESET = "qwen-coder-pair"
KEYS = {"target", "draft", "dtype", "weights", "threads", "max_new_tokens", "limit", "categories", "verifier", "baselines",
        "drafters", "prompts", "output", "chat", "do_sample", "temperature", "top_k", "top_p", "seed", "draft_device",
        "device_map", "offload_folder", "overlap"}
ENTRY_KEYS = {"drafter", "baseline", "options", "verifier", "uses_draft_model", "overlap"}  # an entry of `drafters:`


def _shipped() -> dict[str, object]:
    """Preset name -> resource of every YAML file shipped in ``specdec.configs``, wherever it is installed."""
    folder = resources.files("specdec.configs")
    return {entry.name[:-5]: entry for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def available_presets() -> list[str]:
    return sorted(_shipped())


def load_preset(name_or_path: str | None) -> dict:
    """Read a preset by name (``configs/NAME.yaml``) or path."""
    name_or_path = name_or_path or DEFAULT_PRESET
    path = Path(name_or_path)
    if path.suffix:
        if not path.is_file():
            raise InvalidInputError(f"preset file {path} does not exist")
    else:
        path = _shipped().get(name_or_path)
        if path is None:
            raise UnknownNameError(
                f"unknown preset {name_or_path!r}; available presets: {', '.join(available_presets())}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path}: a preset is a mapping of settings (target: ..., drafters: {{...}}), got "
                                f"{type(data).__name__} {data!r:.80}")
    if not isinstance(data.get("drafters") or {}, dict):
        raise InvalidInputError(f"{path}: drafters must be a mapping of entry names to {{drafter: NAME, options: "
                                f"{{...}}}}, got {data['drafters']!r:.80}")
    unknown = set(data) - KEYS
    if unknown:
        raise InvalidInputError(f"{path}: unknown keys {sorted(unknown)}; valid keys: {', '.join(sorted(KEYS))}")
    for entry_name, entry in (data.get("drafters") or {}).items():
        if not isinstance(entry, dict):
            raise InvalidInputError(f"{path}: drafter entry {entry_name!r} must be a mapping, e.g. "
                                    "{drafter: draft-model, options: {depth: 4}}")
        unknown = set(entry) - ENTRY_KEYS
        if unknown:  # an option written beside `drafter:` would otherwise be silently ignored
            raise InvalidInputError(f"{path}: drafter entry {entry_name!r} has unknown keys {sorted(unknown)}; valid "
                                    f"keys: {', '.join(sorted(ENTRY_KEYS))} (drafter options go under options: "
                                    "{...})")
    return data
