"""The command line: ``specdec bench`` and ``specdec generate`` over presets in ``configs/`` (``specdec presets``
lists them); ``specdec models`` lists, fetches and re-fetches the real models; ``specdec trigrams`` builds the
table of the 'aded' drafter; ``specdec train`` self-distills draft heads (specdec.training); ``specdec
export-heads`` writes trained Medusa heads in vLLM's layout; ``specdec serve`` serves one engine over HTTP.

This module only dispatches: the parser, the settings and each command live in :mod:`specdec.commands` (or in the
subpackage a command belongs to)."""

from __future__ import annotations

import sys

from specdec.commands.bench import cmd_bench
from specdec.commands.generate import cmd_generate
from specdec.commands.parser import build_parser
from specdec.commands.presets import cmd_presets
from specdec.commands.settings import select_drafters, settings
from specdec.commands.trigrams import cmd_trigrams
from specdec.drafters.heads.export import cmd_export_heads
from specdec.errors import SpecDecError
from specdec.models.cli import cmd_models
from specdec.serve.cli import cmd_serve
from specdec.settings_check import check_settings
from specdec.training.cli import cmd_train, cmd_train_acceptance

__all__ = ["build_parser", "main", "select_drafters", "settings"]

# commands that run from their arguments alone, and those that run a preset overlaid with the flags (checked first)
ON_ARGUMENTS = {"trigrams": cmd_trigrams, "train": cmd_train, "train-acceptance": cmd_train_acceptance,
                "export-heads": cmd_export_heads, "models": cmd_models, "presets": lambda args: cmd_presets()}
ON_SETTINGS = {"bench": lambda cfg, args: cmd_bench(cfg, progress=not args.no_progress),
               "generate": cmd_generate, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ON_ARGUMENTS:
            return ON_ARGUMENTS[args.command](args)
        cfg = settings(args)
        check_settings(cfg, args.command, getattr(args, "prompt", None), getattr(args, "min_p", None),
                       getattr(args, "repetition_penalty", 1.0))  # before any model loads
        return ON_SETTINGS[args.command](cfg, args)
    except SpecDecError as exc:
        print(f"specdec: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
