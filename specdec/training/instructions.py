"""Training prompts: the shipped seed instructions, grown by the target itself (self-instruct).

Self-distillation (Medusa-2, Cai et al. 2024, arXiv 2401.10774, section 3.3; Hydra, Ankner et al. 2024, arXiv
2402.05109) trains the heads on the target's own answers, so only the prompts have to come from somewhere. We
ship ~80 short seed instructions of our own (``data/seed_tasks.jsonl``: code, math, writing, QA, summarization,
translation, several topics each) and let the target write more, self-instruct style (Wang et al. 2023, arXiv
2212.10560): shown three seeds of one task, it writes new instructions one per line; lines are cleaned, length-
filtered, de-duplicated and checked against the shipped Spec-Bench prompts (no 8-word run in common), so no
benchmark prompt leaks into training. Unlike self-instruct we decode greedily (diversity comes from the choice of
examples, drawn from a passed ``torch.Generator``) and keep no ROUGE filter, only exact de-duplication.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from specdec.benchmarks.prompts import SPEC_BENCH, Prompt, encode
from specdec.errors import InvalidInputError
from specdec.training.jsonl import append_rows, read_rows
from specdec.training.target_forward import greedy_generate

SEED_FILE = resources.files("specdec.training") / "data" / "seed_tasks.jsonl"  # shipped in the wheel
SHINGLE = 8  # words: a grown instruction sharing this many consecutive words with a benchmark prompt is dropped
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.):]|\(\d+\)|instruction\s*\d*\s*:)\s*", re.IGNORECASE)


@dataclass(frozen=True)
class TrainingPrompt:
    id: str  # "seed-code-03" or "grown-00012-2" (request 12, line 2): stable across runs, keys the answers
    task: str  # code, math, writing, qa, summarization, translation
    text: str  # the instruction, sent as one user message


def read_seeds(path: "str | Path | None" = None) -> list[TrainingPrompt]:
    rows = read_rows(path or SEED_FILE)
    if not rows:
        raise InvalidInputError(f"no seed instructions in {path or SEED_FILE}; give a JSONL file with "
                                "'id', 'task' and 'instruction' fields")
    return [TrainingPrompt(r["id"], r["task"], r["instruction"]) for r in rows]


def normalize(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def shingles(text: str, n: int = SHINGLE) -> set[str]:
    words = normalize(text).split()
    return {" ".join(words[i:i + n]) for i in range(max(0, len(words) - n + 1))}


def benchmark_shingles(path: "str | Path | None" = None) -> set[str]:
    """8-word runs of every turn of the shipped Spec-Bench prompts (or the JSONL file ``path``)."""
    out: set[str] = set()
    for row in read_rows(path or SPEC_BENCH):
        for turn in row.get("turns") or [row.get("prompt", "")]:
            out |= shingles(turn)
    return out


def parse_instructions(text: str, min_chars: int = 15, max_chars: int = 400) -> list[str]:
    """One instruction per non-empty line, bullets and numbering removed, kept if its length is in range."""
    out = []
    for line in text.splitlines():
        line = _BULLET.sub("", line).strip().strip('"').strip()
        if min_chars <= len(line) <= max_chars and re.search(r"[^\W\d_]", line):
            out.append(line)
    return out


def growth_message(task: str, examples: list[str], n: int) -> str:
    shown = "\n".join(f"- {e}" for e in examples)
    return (f"Here are examples of {task} tasks that a user might ask an assistant:\n{shown}\n\n"
            f"Write {n} new, different {task} tasks on other topics. Each must be self-contained (include any text "
            f"it refers to). Write one task per line, with no numbering and nothing else.")


def plan_requests(seeds: list[TrainingPrompt], count: int, generator: torch.Generator, shown: int = 3) -> list[dict]:
    """``count`` growth requests: round-robin over tasks, each showing ``shown`` seeds of its task drawn with
    ``generator``. Planned up front, so a resumed run makes the same requests."""
    by_task: dict[str, list[TrainingPrompt]] = {}
    for s in seeds:
        by_task.setdefault(s.task, []).append(s)
    tasks = sorted(by_task)
    plan = []
    for r in range(count):
        pool = by_task[tasks[r % len(tasks)]]
        pick = torch.randperm(len(pool), generator=generator)[:shown].tolist()
        plan.append({"request": r, "task": tasks[r % len(tasks)], "examples": [pool[i].id for i in pick]})
    return plan


def grow(target, tokenizer, seeds: list[TrainingPrompt], path: "str | Path", requests: int, per_request: int,
         generator: torch.Generator, max_new_tokens: int, batch_size: int, chat: bool = True,
         progress: bool = True, deadline: float | None = None) -> list[dict]:
    """Append the target's answers to ``requests`` growth requests to ``path`` (skipping those already there) and
    return every row of the file. Stops early, between batches, once ``time.monotonic()`` passes ``deadline``."""
    import time

    from tqdm.auto import tqdm

    text_of = {s.id: s.text for s in seeds}
    done = {row["request"] for row in read_rows(path)}
    todo = [r for r in plan_requests(seeds, requests, generator) if r["request"] not in done]
    pad = _pad_id(tokenizer)
    with tqdm(total=requests, initial=requests - len(todo), desc="grow instructions", unit="request",
              disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            if deadline is not None and time.monotonic() > deadline:
                break
            batch = todo[start:start + batch_size]
            messages = [growth_message(r["task"], [text_of[i] for i in r["examples"]], per_request) for r in batch]
            gens = greedy_generate(target, [encode_text(tokenizer, m, chat) for m in messages], max_new_tokens, pad)
            rows = []
            for r, g in zip(batch, gens):
                raw = tokenizer.decode(g.answer_ids, skip_special_tokens=True)
                rows.append({**r, "instructions": parse_instructions(raw)})
            append_rows(path, rows)
            bar.update(len(batch))
    return read_rows(path)


def collect_prompts(seeds: list[TrainingPrompt], grown_rows: list[dict], limit: int | None = None,
                    guard: set[str] | None = None) -> list[TrainingPrompt]:
    """Seeds, then grown instructions in request order: de-duplicated (case and punctuation ignored), without any
    that shares an 8-word run with ``guard`` (default: the Spec-Bench prompts); at most ``limit`` in all."""
    guard = benchmark_shingles() if guard is None else guard
    seen = {normalize(s.text) for s in seeds}
    out = list(seeds)
    for row in sorted(grown_rows, key=lambda r: r["request"]):
        for j, text in enumerate(row["instructions"]):
            key = normalize(text)
            if key in seen or shingles(text) & guard:
                continue
            seen.add(key)
            out.append(TrainingPrompt(f"grown-{row['request']:05d}-{j}", row["task"], text))
    return out[:limit] if limit else out


def encode_text(tokenizer, text: str, chat: bool = True) -> list[int]:
    """Token ids of one user message, through the chat template when the tokenizer has one."""
    return encode(tokenizer, Prompt("train", "train", text), chat=chat)[0].tolist()


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)
