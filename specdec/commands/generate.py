"""``specdec generate``: one prompt through the preset's first drafter entry, streaming the text."""

from __future__ import annotations

import argparse
import sys
import time

import torch
from transformers import TextStreamer

from specdec.benchmarks.methods import build_method
from specdec.benchmarks.prompts import Prompt, encode
from specdec.engine import SpecEngine
from specdec.loading import load_models


def cmd_generate(cfg: dict, args: argparse.Namespace) -> int:
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    target, draft, tokenizer = load_models(cfg)
    entry = cfg["drafter_entries"][0] if cfg["drafter_entries"] else {"name": "prompt-lookup"}
    entry.setdefault("verifier", cfg.get("verifier") or ("rejection" if cfg["do_sample"] else "greedy"))
    method = build_method(entry, target, draft)
    engine: SpecEngine = method.engine
    ids = encode(tokenizer, Prompt("cli", "cli", args.prompt), chat=not args.raw)
    streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
    gen = torch.Generator().manual_seed(int(cfg["seed"]))
    t0 = time.perf_counter()
    result = engine.generate(ids, max_new_tokens=cfg["max_new_tokens"],
                             eos_token_id=target.generation_config.eos_token_id, streamer=streamer,
                             do_sample=bool(cfg["do_sample"]), temperature=float(cfg["temperature"]),
                             top_k=cfg.get("top_k"), top_p=cfg.get("top_p"), min_p=args.min_p,
                             repetition_penalty=args.repetition_penalty,
                             generator=gen)
    seconds = time.perf_counter() - t0
    s = result.stats
    rates = ", ".join(f"{r:.2f}" for r in s.acceptance_rate_by_depth())
    print(f"\n[{entry['name']}] {s.new_tokens} tokens in {seconds:.1f}s = {s.new_tokens / seconds:.2f} tok/s; "
          f"tau {s.mean_accepted_length:.2f} over {s.target_forwards} target forwards; "
          f"acceptance by depth: {rates}", file=sys.stderr)
    return 0
