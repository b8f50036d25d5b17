"""Every ``specdec bench`` / ``specdec generate`` setting that can be checked without a model, checked before any
model loads: types and ranges of preset values and flags, baseline, verifier and drafter names, drafter options, the
output folder, the prompt. A mistake costs a message naming the setting and its valid values, not a traceback after
minutes of loading, nor (``--output``) a finished run whose results cannot be written.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

from specdec.benchmarks.methods import BASELINES
from specdec.drafters import available_drafters, drafter_class
from specdec.drafters.options import check_options
from specdec.errors import InvalidInputError, UnknownNameError
from specdec.sampling import SamplingConfig
from specdec.verifiers import available_verifiers, create_verifier

DTYPES = ("auto", "float32", "bfloat16", "float16")
WEIGHTS = ("auto", "dense", "int8", "w8a8", "gguf")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _int_at_least(low: int):
    return lambda v: _is_int(v) and v >= low, f"an integer >= {low}"


# setting -> (test of a given value, what it must be); None values mean "not set" and are not checked here
_RULES = {
    "target": (lambda v: isinstance(v, str) and v.strip() != "", "a model name (specdec models) or a folder"),
    "draft": (lambda v: isinstance(v, str) and v.strip() != "", "a model name (specdec models) or a folder"),
    "dtype": (lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
    "weights": (lambda v: v in WEIGHTS, f"one of {', '.join(WEIGHTS)}"),
    "threads": _int_at_least(1),
    "max_new_tokens": _int_at_least(1),
    "limit": _int_at_least(1),
    "seed": (_is_int, "an integer"),
    "categories": (lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v), "a list of category names"),
    "verifier": (lambda v: isinstance(v, str), "a verifier name"),
    "baselines": (lambda v: isinstance(v, list) and all(isinstance(b, str) for b in v), "a list of baseline names"),
    "drafters": (lambda v: isinstance(v, dict), "a mapping of entry names to {drafter: NAME, options: {...}}"),
    "prompts": (lambda v: isinstance(v, str), "the path of a JSONL prompt file"),
    "output": (lambda v: isinstance(v, str) and v.strip() != "", "a folder path"),
    "chat": (lambda v: isinstance(v, bool), "true or false"),
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "overlap": (lambda v: isinstance(v, bool), "true or false"),
    "temperature": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: off)"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "draft_device": (lambda v: isinstance(v, str), "a torch device such as cuda or cpu"),
    "device_map": (lambda v: isinstance(v, (str, dict)), "'auto' or a mapping of module names to devices"),
    "offload_folder": (lambda v: isinstance(v, str), "a folder path"),
}


def check_settings(cfg: dict, command: str, prompt: "str | None" = None, min_p=None, repetition_penalty=1.0) -> None:
    """Refuse (InvalidInputError / UnknownNameError) any setting of ``cfg`` (a preset overlaid with flags) that
    cannot work, before a model loads; ``prompt``, ``min_p``, ``repetition_penalty``: ``specdec generate``'s."""
    for key, (valid, what) in _RULES.items():
        value = cfg.get(key)
        if value is not None and not valid(value):
            raise InvalidInputError(f"setting {key!r} (preset key or --{key.replace('_', '-')}) must be {what}, got "
                                    f"{value!r:.80}")
    if not cfg.get("target"):
        raise InvalidInputError("no target model: give --target NAME or a preset (--config) that names one")
    _check_names(cfg)
    _check_drafter_entries(cfg["drafter_entries"])
    _check_sampling(cfg, min_p, repetition_penalty)
    if command == "bench":
        check_output_folder(cfg.get("output") or "results/latest")
    if command == "generate" and (prompt is None or not prompt.strip()):
        raise InvalidInputError("the prompt is empty: give the text to continue, e.g. specdec generate \"def fib(n):\"")


def check_output_folder(path: str) -> None:
    """The results folder must be a folder we can create or write into; checked before a run, not after it."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InvalidInputError(f"--output {path} is an existing file; give a folder for results.json and report.md")
    existing = folder
    while not existing.exists():  # the nearest existing ancestor is where the folder would be created
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidInputError(f"--output {path}: {existing} is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidInputError(f"--output {path}: {existing} is not writable; give a folder you can write to")


def _check_names(cfg: dict) -> None:
    unknown = [b for b in cfg.get("baselines") or [] if b not in BASELINES]
    if unknown:
        raise UnknownNameError(f"unknown baselines {unknown}; valid: {', '.join(BASELINES)}")
    verifier = cfg.get("verifier")
    if verifier is not None and verifier not in available_verifiers():
        raise UnknownNameError(f"unknown verifier {verifier!r}; available verifiers: "
                               f"{', '.join(available_verifiers())}")


def _check_drafter_entries(entries: list[dict]) -> None:
    for entry in entries:
        name = entry["name"]
        options = entry.get("options") or {}
        if not isinstance(options, dict):
            raise InvalidInputError(f"drafter entry {name!r}: options must be a mapping such as {{depth: 4}}, got "
                                    f"{options!r:.80}")
        baseline = entry.get("baseline")
        if baseline is not None:
            if baseline not in BASELINES:
                raise UnknownNameError(f"entry {name!r}: unknown baseline {baseline!r}; valid: {', '.join(BASELINES)}")
            continue
        drafter = entry.get("drafter", name)
        if drafter not in available_drafters():
            raise UnknownNameError(f"entry {name!r}: unknown drafter {drafter!r}; registered drafters: "
                                   f"{', '.join(available_drafters())}")
        verifier = entry.get("verifier")
        if verifier is not None and verifier not in available_verifiers():
            raise UnknownNameError(f"entry {name!r}: unknown verifier {verifier!r}; available verifiers: "
                                   f"{', '.join(available_verifiers())}")
        check_options(drafter, drafter_class(drafter), options)  # the draft model (model=...) is added at load


def _check_sampling(cfg: dict, min_p, repetition_penalty) -> None:
    do_sample = bool(cfg.get("do_sample"))
    SamplingConfig(do_sample, cfg.get("temperature", 1.0), cfg.get("top_k"), cfg.get("top_p"), min_p,
                   repetition_penalty)
    names = {cfg.get("verifier")} | {e.get("verifier") for e in cfg["drafter_entries"] if not e.get("baseline")}
    for name in names - {None}:
        samples = create_verifier(name).samples
        if samples != do_sample:
            raise InvalidInputError(f"verifier {name!r} {'samples' if samples else 'decodes greedily'}: "
                                    + ("add --do-sample or use the greedy verifier" if samples else
                                       "drop --do-sample, or use a sampling verifier such as 'rejection'"))
