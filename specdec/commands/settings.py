"""What a command that decodes runs with: the preset overlaid with the flags that were given, and its drafter
entries."""

from __future__ import annotations

import argparse

from specdec.drafters import available_drafters
from specdec.errors import UnknownNameError
from specdec.presets import load_preset


def settings(args: argparse.Namespace) -> dict:
    """The preset overlaid with the flags that were given."""
    cfg = load_preset(args.config)
    for key, value in vars(args).items():
        if value is None or key in ("config", "command", "drafter"):
            continue
        if key in ("categories", "baselines"):
            value = [v.strip() for v in value.split(",") if v.strip()]
        cfg[key] = value
    cfg.setdefault("dtype", "auto")
    cfg.setdefault("weights", "auto")
    cfg.setdefault("max_new_tokens", 128)
    cfg.setdefault("do_sample", False)
    cfg.setdefault("temperature", 1.0)
    cfg.setdefault("seed", 0)
    cfg["drafter_entries"] = select_drafters(cfg.get("drafters") or {}, args.drafter)
    if cfg.get("overlap"):
        for entry in cfg["drafter_entries"]:
            entry["overlap"] = True
    return cfg


def select_drafters(entries: dict, wanted: list[str] | None) -> list[dict]:
    """The preset's drafter ``entries`` named in ``wanted`` (a preset entry or a registered drafter), all when none
    is."""
    if not wanted:
        return [{"name": k, **v} for k, v in entries.items()]
    out = []
    for name in wanted:
        if name in entries:
            out.append({"name": name, **entries[name]})
        elif name in available_drafters():
            out.append({"name": name, "drafter": name})
        else:
            raise UnknownNameError(f"unknown drafter {name!r}; preset entries: {', '.join(entries) or '-'}; "
                                   f"registered drafters: {', '.join(available_drafters())}")
    return out
