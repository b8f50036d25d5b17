"""Prompt sets for benchmarks: the shipped Spec-Bench questions or any JSONL file with a prompt field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from specdec.errors import InvalidInputError, UnknownNameError

SPEC_BENCH = resources.files("specdec.benchmarks") / "data" / "specbench_questions.jsonl"  # shipped in the wheel
MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
MAIN_CATEGORIES = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str  # as in the file (Spec-Bench: MT-bench sub-category or task)
    text: str

    @property
    def main_category(self) -> str:
        return "mt_bench" if self.category in MT_BENCH else self.category


def read_prompts(path: str | Path | None = None) -> list[Prompt]:
    path = Path(path) if path else SPEC_BENCH
    if not path.is_file():
        raise InvalidInputError(f"prompt file {path} does not exist")
    prompts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["prompt"] if "prompt" in row else row["turns"][0]
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
                raise InvalidInputError(
                    f"{path}:{lineno}: not a JSON object with a 'prompt' or 'turns' field ({exc})") from exc
            if not isinstance(text, str) or not text.strip():
                raise InvalidInputError(f"{path}:{lineno}: the prompt is empty")
            prompts.append(Prompt(str(row.get("question_id", row.get("id", lineno))), row.get("category", "all"), text))
    return prompts


def select(prompts: list[Prompt], categories: list[str] | None = None, limit: int | None = None) -> list[Prompt]:
    """Prompts of the given (main or sub) categories, ``limit`` in all, taken round-robin across categories."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise InvalidInputError(f"limit must be an integer >= 1 (the number of prompts), got {limit!r}; leave it unset "
                                "for every prompt")
    known = {p.category for p in prompts} | {p.main_category for p in prompts}
    wanted = set(categories or []) - {"all"}
    unknown = wanted - known
    if unknown:
        raise UnknownNameError(f"unknown categories {sorted(unknown)}; valid: {', '.join(sorted(known))}")
    chosen = [p for p in prompts if not wanted or p.category in wanted or p.main_category in wanted]
    groups: dict[str, list[Prompt]] = {}
    for p in chosen:  # round-robin over main categories, and over sub-categories inside one
        groups.setdefault(p.main_category, []).append(p)
    for key, group in groups.items():
        subs: dict[str, list[Prompt]] = {}
        for p in group:
            subs.setdefault(p.category, []).append(p)
        groups[key] = _interleave(list(subs.values()))
    ordered = _interleave(list(groups.values()))
    return ordered[:limit] if limit else ordered


def _interleave(lists: list[list[Prompt]]) -> list[Prompt]:
    out = []
    for i in range(max((len(x) for x in lists), default=0)):
        out.extend(x[i] for x in lists if i < len(x))
    return out


def encode(tokenizer, prompt: Prompt, chat: bool = True):
    """Token ids [1, L] of ``prompt``, through the tokenizer's chat template when it has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        return enc["input_ids"]
    return tokenizer(prompt.text, return_tensors="pt")["input_ids"]
