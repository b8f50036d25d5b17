"""``specdec train``: self-distill draft heads for a target (docs/training.md)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train Medusa / Hydra / Clover draft heads on the target's own answers",
                       description="Self-distillation: the target grows the shipped seed instructions, answers them "
                                   "greedily, and its hidden states and top-8 probabilities train the heads. Every "
                                   "stage resumes (--resume) from what is in --output.")
    p.add_argument("--target", required=True, help="target model name (specdec.models) or local HF folder")
    p.add_argument("--kind", default="medusa,hydra,clover", help="comma-separated head kinds (one shared data run)")
    p.add_argument("--output", required=True, help="folder for the data, feature cache, checkpoints and heads")
    p.add_argument("--preset", default=None, choices=["cpu", "gpu"], help="recipe preset (default: by --device)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="target precision (auto: bf16 where native, else fp32)")
    p.add_argument("--budget-minutes", type=float, help="wall-time budget for data + training (cpu preset: 90)")
    p.add_argument("--num-prompts", type=int, help="prompts to answer")
    p.add_argument("--max-new-tokens", type=int, help="answer length cap")
    p.add_argument("--num-heads", type=int)
    p.add_argument("--draft-vocab", type=int, help="FR-Spec draft vocabulary size (0: the full vocabulary)")
    p.add_argument("--seeds", help="seed instruction JSONL (default: the shipped one)")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--resume", action="store_true", help="continue the run in --output")
    p.add_argument("--no-progress", action="store_true")
    return p


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from specdec.cli import load_models
    from specdec.training import preset, train_heads

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = preset(args.preset or ("gpu" if args.device == "cuda" else "cpu"))
    changes = {"kinds": tuple(k.strip() for k in args.kind.split(",") if k.strip())}
    for flag, field in (("budget_minutes", "budget_minutes"), ("num_prompts", "num_prompts"),
                        ("max_new_tokens", "max_new_tokens"), ("num_heads", "num_heads"), ("seeds", "seeds"),
                        ("seed", "seed")):
        if getattr(args, flag) is not None:
            changes[field] = getattr(args, flag)
    if args.draft_vocab is not None:
        changes["draft_vocab_size"] = args.draft_vocab or None
    recipe = recipe.replace(**changes)
    target, _, tokenizer = load_models({"target": args.target, "dtype": args.dtype})
    if args.device == "cuda":
        target = target.to("cuda")
    summary = train_heads(target, tokenizer, args.output, recipe, resume=args.resume, progress=not args.no_progress)
    for kind, info in summary["kinds"].items():
        after = info["held_out_after"]
        print(f"{kind}: {info['steps']} steps, {info['seconds']:.0f}s; held-out top-1 "
              + " ".join(f"{a:.2f}" for a in after["top1"]) + "; top-5 "
              + " ".join(f"{a:.2f}" for a in after["top5"]) + f" -> {args.output}/heads-{kind}")
    return 0

