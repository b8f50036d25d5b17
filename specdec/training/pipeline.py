"""``train_heads``: the whole self-distillation pipeline, from seed instructions to saved heads.

Stages (each resumable, each with a progress bar), all under one output folder::

    instructions.jsonl   growth requests and the instructions the target wrote (instructions.py)
    answers.jsonl        the target's greedy answers, text and token ids (answers.py)
    features/            hidden states + top-k soft labels, chunked, with a manifest (feature_cache.py)
    train-<kind>/        checkpoint.pt of the running training (trainer.py)
    heads-<kind>/        the finished heads (save_heads; format in docs/heads.md)
    summary.json         per kind: steps, seconds, held-out top-1/top-5 before and after

The kinds share one data run and one feature cache; the draft vocabulary (FR-Spec) is counted once, from the
training split's labels, so all kinds predict over the same rows.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from specdec.drafters.heads import KINDS, DraftVocab, build_heads, save_heads, target_fingerprint
from specdec.errors import InvalidInputError
from specdec.files import sha256_of, write_json_atomic
from specdec.training import instructions as ins
from specdec.training.answers import answer_and_extract
from specdec.training.batches import label_counts, split
from specdec.training.feature_cache import FeatureCache
from specdec.training.recipe import TrainRecipe
from specdec.training.trainer import train_heads_on


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_heads(target, tokenizer, output: "str | os.PathLike", recipe: TrainRecipe | None = None,
                resume: bool = True, progress: bool = True, prompts: list | None = None,
                reuse_data: bool = False) -> dict:
    """Run the pipeline for ``target`` (a loaded HF causal LM; heads train on its device) and return the summary
    (also written to ``output/summary.json``); heads go to ``output/heads-<kind>``. ``prompts``: a list of
    :class:`TrainingPrompt` to answer instead of seeds + growth. With ``resume=False`` the output folder must hold
    no earlier run. ``reuse_data``: train on the feature cache already in ``output`` (another kind on the same
    data), with no growth and no answering; the kinds trained are added to the summary there."""
    recipe = recipe or TrainRecipe()
    out = Path(output)
    if reuse_data and not (out / "features" / "manifest.json").is_file():
        raise InvalidInputError(f"--reuse-data: {out / 'features'} holds no feature cache; run `specdec train` "
                                "without --reuse-data first")
    if not resume and not reuse_data and out.exists() and any(out.iterdir()):
        raise InvalidInputError(f"{out} already holds a run; pass resume=True (--resume) to continue it or choose "
                                "an empty --output folder")
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    budget = recipe.budget_minutes * 60 if recipe.budget_minutes else None
    data_deadline = start + budget * recipe.data_share if budget else None
    generator = torch.Generator().manual_seed(recipe.seed)
    t_data = time.perf_counter()

    if reuse_data:
        prompts = []
    elif prompts is None:
        seeds = ins.read_seeds(recipe.seeds)
        grown = []
        if recipe.grow_requests:
            grown = ins.grow(target, tokenizer, seeds, out / "instructions.jsonl", recipe.grow_requests,
                             recipe.grow_per_request, generator, recipe.grow_max_new_tokens, recipe.generate_batch,
                             chat=recipe.chat, progress=progress,
                             deadline=start + budget * recipe.data_share * 0.15 if budget else None)
        prompts = ins.collect_prompts(seeds, grown, recipe.num_prompts)
    hidden = target.get_output_embeddings().weight.shape[1]
    fingerprint = target_fingerprint(target)
    cache = FeatureCache(out / "features", recipe.top_k, hidden, target=fingerprint)
    if reuse_data:
        earlier = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
        num_prompts, chunks = earlier.get("prompts", 0), len(cache.manifest["chunks"])
        data_seconds = earlier.get("data_seconds", 0.0)
        _log(f"reusing the feature cache in {cache.folder} ({chunks} chunks)")
    else:
        num_prompts = len(prompts)
        _log(f"{num_prompts} training prompts")
        chunks = answer_and_extract(target, tokenizer, prompts, out / "answers.jsonl", cache, recipe.chunk_size,
                                    recipe.generate_batch, recipe.max_new_tokens, recipe.max_seq_len, recipe.top_k,
                                    capture=recipe.capture, chat=recipe.chat, progress=progress,
                                    deadline=data_deadline)
        data_seconds = time.perf_counter() - t_data
        earlier = {}
    sequences = cache.read()
    if len(sequences) < 2:
        raise InvalidInputError(f"only {len(sequences)} finished training sequence(s) in {cache.folder}; raise "
                                "--budget-minutes or lower the data size")
    train, held_out = split(sequences, recipe.eval_fraction)
    vocab_size = target.get_output_embeddings().weight.shape[0]
    counts = label_counts(train, vocab_size)
    size = recipe.draft_vocab_size
    vocab = DraftVocab.full(vocab_size) if size is None or size >= vocab_size else DraftVocab.from_counts(counts, size)
    coverage = float(counts[vocab.ids].sum() / counts.sum().clamp_min(1))
    _log(f"{len(train)} training / {len(held_out)} held-out sequences, {cache.num_tokens} tokens, {chunks} chunks; "
         f"draft vocabulary {vocab.size} rows covers {coverage:.1%} of training labels")

    data_files = {name: {"sha256": sha256_of(out / name), "rows": sum(1 for _ in open(out / name, encoding="utf-8"))}
                  for name in ("instructions.jsonl", "answers.jsonl") if (out / name).is_file()}
    summary = {"prompts": num_prompts, "sequences": len(sequences), "tokens": cache.num_tokens,
               "data_seconds": round(data_seconds, 1), "draft_vocab_coverage": coverage,
               "kinds": dict(earlier.get("kinds", {}))}
    kinds = list(recipe.kinds)
    for i, kind in enumerate(kinds):
        deadline = None
        if budget:  # what is left, shared equally by the kinds still to train
            deadline = time.monotonic() + (start + budget - time.monotonic()) / (len(kinds) - i)
        kind_seed = recipe.seed * 1000 + 1 + KINDS.index(kind)
        kind_generator = torch.Generator().manual_seed(kind_seed)
        heads = build_heads(kind, target, recipe.deer_block if kind == "deer" else recipe.num_heads,
                            draft_vocab=vocab, generator=kind_generator, **recipe.sizes)
        result = train_heads_on(heads, train, held_out, recipe, out / f"train-{kind}", kind_generator,
                                deadline=deadline, resume=resume, progress=progress)
        info = {"steps": result.steps, "planned_steps": result.planned_steps, "seconds": round(result.seconds, 1),
                "stopped": result.stopped, "held_out_before": result.initial.__dict__,
                "held_out_after": result.final.__dict__}
        recipe_dict = {"recipe": recipe.to_dict(), "data_files": data_files, "prompts": num_prompts,
                       "sequences": {"train": len(train), "held_out": len(held_out)}, "tokens": cache.num_tokens,
                       "draft_vocab_coverage": coverage, "steps": result.steps,
                       "train_seconds": round(result.seconds, 1),
                       "data_seconds": round(data_seconds, 1), "device": _device_name(target),
                       "target_dtype": str(target.dtype).removeprefix("torch."), "torch": torch.__version__}
        save_heads(result.heads.with_metadata(recipe=recipe_dict, accuracies=result.final.accuracies),
                   out / f"heads-{kind}")
        summary["kinds"][kind] = info
        _log(f"[{kind}] {result.steps} steps in {result.seconds:.0f}s ({result.stopped}); held-out top-1 "
             + " ".join(f"{a:.2f}" for a in result.final.top1) + f" -> {out / f'heads-{kind}'}")
        write_json_atomic(out / "summary.json", summary)
    return summary


def _device_name(model) -> str:
    device = next(model.parameters()).device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
