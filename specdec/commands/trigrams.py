"""``specdec trigrams``: count the tri-gram table of the 'aded' drafter from text files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformers import AutoTokenizer

from specdec import models
from specdec.drafters.aded.trigram_table import build_from_files


def cmd_trigrams(args: argparse.Namespace) -> int:
    folder = args.tokenizer if Path(args.tokenizer).is_dir() else str(models.local_path(args.tokenizer))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    table = build_from_files(args.corpus, tokenizer, top=args.top, progress=not args.no_progress)
    path = table.save(args.output)
    print(f"{path}: {table.num_contexts} bigram contexts, {table.num_entries} successors "
          f"(vocabulary {table.vocab_size})", file=sys.stderr)
    return 0
