"""``specdec train``: self-distill draft heads for a target (docs/training.md)."""

from __future__ import annotations

import argparse

from specdec.drafters import create_drafter
from specdec.drafters.acceptance import save_acceptance_head
from specdec.drafters.heads.fingerprint import target_fingerprint
from specdec.errors import InvalidInputError
from specdec.files import sha256_of
from specdec.loading import load_models
from specdec.training import preset, train_heads
from specdec.training.acceptance import acceptance_examples, held_out, train_acceptance_head
from specdec.training.jsonl import read_rows


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train Medusa / Hydra / Clover / Chimera / DEER drafters on the target's own "
                                     "answers",
                       description="Self-distillation: the target grows the shipped seed instructions, answers them "
                                   "greedily, and its hidden states and top-8 probabilities train the heads. Every "
                                   "stage resumes (--resume) from what is in --output.")
    p.add_argument("--target", required=True, help="target model name (specdec.models) or local HF folder")
    p.add_argument("--kind", default="medusa,hydra,clover",
                   help="comma-separated kinds: medusa, hydra, clover, chimera, deer (one shared data run)")
    p.add_argument("--output", required=True, help="folder for the data, feature cache, checkpoints and heads")
    p.add_argument("--preset", default=None, choices=["cpu", "gpu"], help="recipe preset (default: by --device)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="target precision (auto: bf16 where native, else fp32)")
    p.add_argument("--budget-minutes", type=float, help="wall-time budget for data + training (cpu preset: 90)")
    p.add_argument("--num-prompts", type=int, help="prompts to answer")
    p.add_argument("--max-new-tokens", type=int, help="answer length cap")
    p.add_argument("--num-heads", type=int)
    p.add_argument("--max-epochs", type=float, help="passes over the training split (cpu preset: 3)")
    p.add_argument("--deer-block", type=int, help="deer: slots per block (default 8)")
    p.add_argument("--deer-positions", type=int, help="deer: blocks drawn per sequence per step (default 256)")
    p.add_argument("--deer-pretrain-fraction", type=float,
                   help="deer: share of steps in stage I, diffusion pre-training (default 0.3)")
    p.add_argument("--reuse-data", action="store_true",
                   help="train on the feature cache already in --output (no new instructions or answers)")
    p.add_argument("--draft-vocab", type=int, help="FR-Spec draft vocabulary size (0: the full vocabulary)")
    p.add_argument("--seeds", help="seed instruction JSONL (default: the shipped one)")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--resume", action="store_true", help="continue the run in --output")
    p.add_argument("--no-progress", action="store_true")
    return p


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = preset(args.preset or ("gpu" if args.device == "cuda" else "cpu"))
    changes = {"kinds": tuple(k.strip() for k in args.kind.split(",") if k.strip())}
    for flag, field in (("budget_minutes", "budget_minutes"), ("num_prompts", "num_prompts"),
                        ("max_new_tokens", "max_new_tokens"), ("num_heads", "num_heads"), ("seeds", "seeds"),
                        ("seed", "seed"), ("max_epochs", "max_epochs"), ("deer_block", "deer_block"),
                        ("deer_positions", "deer_positions"), ("deer_pretrain_fraction", "deer_pretrain_fraction")):
        if getattr(args, flag) is not None:
            changes[field] = getattr(args, flag)
    if args.draft_vocab is not None:
        changes["draft_vocab_size"] = args.draft_vocab or None
    recipe = recipe.replace(**changes)
    target, _, tokenizer = load_models({"target": args.target, "dtype": args.dtype, "weights": "dense"})  # features
    #                                                                 of the dense target, as the shipped heads had
    if args.device == "cuda":
        target = target.to("cuda")
    summary = train_heads(target, tokenizer, args.output, recipe, resume=args.resume, progress=not args.no_progress,
                          reuse_data=args.reuse_data)
    for kind, info in summary["kinds"].items():
        after = info["held_out_after"]
        print(f"{kind}: {info['steps']} steps, {info['seconds']:.0f}s; held-out top-1 "
              + " ".join(f"{a:.2f}" for a in after["top1"]) + "; top-5 "
              + " ".join(f"{a:.2f}" for a in after["top5"]) + f" -> {args.output}/heads-{kind}")
    return 0



def add_acceptance_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train-acceptance", help="train SpecDec++'s acceptance head for a draft model and target",
                       description="The draft model (as the draft-model drafter runs it) reads the target's own "
                                   "answers (answers.jsonl of a `specdec train` run) and learns to predict which of "
                                   "its greedy tokens the target accepts (docs/drafters.md#specdec).")
    p.add_argument("--target", required=True, help="target model name (specdec.models) or local HF folder")
    p.add_argument("--draft", required=True, help="draft model name or folder")
    p.add_argument("--answers", required=True, help="answers.jsonl of a `specdec train` run (the target's answers)")
    p.add_argument("--output", required=True, help="folder for the head (acceptance.json + .safetensors)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--limit", type=int, help="use the first N answers")
    p.add_argument("--per-sequence", type=int, default=48, help="answer positions per sequence (0: all)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--layers", type=int, default=3, help="residual blocks (shared weights, as the paper's)")
    p.add_argument("--reject-weight", type=float, default=6.0, help="BCE weight of rejected tokens (paper: 6)")
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    return p


def cmd_train_acceptance(args: argparse.Namespace) -> int:
    import sys

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = read_rows(args.answers)[: args.limit]
    if not rows or "answer_ids" not in rows[0]:
        raise InvalidInputError(f"{args.answers} holds no answers with answer_ids: pass the answers.jsonl of a "
                                "`specdec train` run")
    target, draft, tokenizer = load_models({"target": args.target, "draft": args.draft, "dtype": args.dtype,
                                            "weights": "dense"})
    drafter = create_drafter("draft-model", target=target, model=draft)  # the draft model exactly as it drafts
    progress = not args.no_progress
    data = acceptance_examples(drafter.runner.model, tokenizer, rows, per_sequence=args.per_sequence or None,
                               progress=progress)
    mask = held_out(data["sequence"], rows, args.eval_fraction)
    head, metrics = train_acceptance_head(data, mask, args.layers, args.reject_weight, args.epochs,
                                          seed=args.seed, progress=progress)
    head.meta = {"draft": target_fingerprint(draft), "target": target_fingerprint(target),
                 "training": {"command": "specdec " + " ".join(sys.argv[1:]), "answers": str(args.answers),
                              "answers_sha256": sha256_of(args.answers), "sequences": len(rows), **metrics}}
    save_acceptance_head(head, args.output)
    after = metrics["after"]
    print(f"acceptance head: {metrics['train_examples']} examples ({metrics['train_accept_rate']:.2f} accepted), "
          f"held-out AUC {after['auc']:.3f}, accuracy {after['accuracy']:.3f}, mean predicted "
          f"{after['mean_predicted']:.3f} vs {after['accept_rate']:.3f} accepted -> {args.output}")
    return 0
