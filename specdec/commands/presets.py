"""``specdec presets``: the shipped presets with their models and drafter entries."""

from __future__ import annotations

from specdec.presets import available_presets, load_preset


def cmd_presets() -> int:
    for name in available_presets():
        cfg = load_preset(name)
        entries = ", ".join(cfg.get("drafters") or {}) or "-"
        print(f"{name}: target {cfg.get('target')}, draft {cfg.get('draft') or '-'}; drafters: {entries}")
    return 0
