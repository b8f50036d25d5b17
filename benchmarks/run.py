"""Run every method on every prompt, interleaved, and summarise: tokens/s, tau, speedups, exactness.

Methods run in rotating order on each prompt (A B C, B C A, ...) after a warm-up, so machine drift hits all
alike; summaries use medians over prompts. tau is Spec-Bench's mean accepted tokens per target forward
(all verification steps of all prompts pooled). An output that differs from plain greedy is examined at its first
differing token: the target's top-2 logit gap there tells a numerical near-tie from a real error.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from specdec.benchmarks.methods import Method, RunRecord
from specdec.benchmarks.prompts import Prompt
from specdec.memory import release_memory
from specdec.runner import CausalLMRunner
from specdec.stats import acceptance_by_depth

NEAR_TIE_GAP = 0.5  # logits; bf16 rounding moves logits of this model by a few tenths


@dataclass
class PromptResult:
    prompt: Prompt
    prompt_tokens: int
    runs: dict[str, RunRecord] = field(default_factory=dict)
    divergence: dict[str, dict] = field(default_factory=dict)  # method -> first-difference analysis
    compared: bool = False  # outputs were compared with the reference (greedy runs)


def run_benchmark(methods: list[Method], prompts: list[Prompt], encode, max_new_tokens: int, eos_token_id,
                  reference: str = "plain", target=None, warmup_prompt: Prompt | None = None,
                  progress: bool = True, sampled: bool = False, seed: int = 0) -> list[PromptResult]:
    """``encode(prompt) -> input_ids [1, L]``; ``reference`` names the plain-greedy method.

    ``sampled``: the methods sample (all with seed ``seed + prompt index``); outputs are then not compared with the
    reference, since equal distributions do not mean equal samples.
    """
    if warmup_prompt is not None:
        ids = encode(warmup_prompt)[:, :64]
        for m in methods:
            m.generate(ids, 8, eos_token_id)
    results = []
    bar = tqdm(total=len(prompts) * len(methods), desc="bench", disable=not progress)
    for i, prompt in enumerate(prompts):
        ids = encode(prompt)
        res = PromptResult(prompt, ids.shape[1])
        order = methods[i % len(methods):] + methods[: i % len(methods)]
        for m in order:
            bar.set_postfix_str(f"{prompt.category}:{m.name}")
            res.runs[m.name] = m.generate(ids, max_new_tokens, eos_token_id, seed=seed + i)
            release_memory()  # outside the timed call: one method's freed caches never add to the next one's peak
            bar.update(1)
        if reference in res.runs and target is not None and not sampled:
            res.compared = True
            ref = res.runs[reference].new_tokens
            for m in methods:
                run = res.runs[m.name]
                if m.name != reference and not torch.equal(run.new_tokens, ref):
                    res.divergence[m.name] = (first_difference(target, ids, ref, run.new_tokens) if m.exact
                                              else {**first_mismatch(ref, run.new_tokens), "kind": "own-numerics"})
        results.append(res)
    bar.close()
    return results


def first_mismatch(ref: torch.Tensor, other: torch.Tensor) -> dict:
    """The first position where ``other`` leaves ``ref`` (kind "token"), or where the shorter one ends ("length")."""
    n = min(ref.numel(), other.numel())
    diff = torch.nonzero(ref[:n] != other[:n]).flatten()
    if diff.numel() == 0:
        return {"position": n, "kind": "length", "ref_len": ref.numel(), "other_len": other.numel()}
    return {"position": int(diff[0]), "kind": "token"}


def first_difference(target, input_ids: torch.Tensor, ref: torch.Tensor, other: torch.Tensor) -> dict:
    """Where ``other`` leaves ``ref`` and how close the target's top-2 logits were there."""
    where = first_mismatch(ref, other)
    if where["kind"] == "length":
        return where
    j = where["position"]
    runner = CausalLMRunner(target)
    logits = runner.prefill(torch.cat([input_ids, ref[None, :j].to(input_ids.device)], dim=1)).logits[-1]
    top = logits.topk(2)
    ref_tok, other_tok = int(ref[j]), int(other[j])
    gap = float(logits[ref_tok] - logits[other_tok])
    return {"position": j, "kind": "token", "ref_token": ref_tok, "other_token": other_tok,
            "logit_gap": gap, "top2_gap": float(top.values[0] - top.values[1]),
            "other_is_top2": other_tok in top.indices.tolist(),
            "near_tie": other_tok in top.indices.tolist() and abs(gap) <= NEAR_TIE_GAP}


def summarize(results: list[PromptResult], reference: str = "plain", assisted: str | None = "hf-assisted",
              sampled: bool = False, llama_cpp: str | None = None) -> dict:
    """Per method: median tokens/s, median per-prompt speedups, pooled tau, exactness, depth acceptance, time split.

    Besides medians of per-prompt ratios, ``pooled_*`` figures divide all tokens by all seconds: with sampling (or
    EOS) the methods' outputs differ in length, and a 16-token answer's tokens/s is mostly prefill.

    ``assisted`` and ``llama_cpp`` name the baselines that every method is also compared with (``speedup_vs_<name>``).

    ``sampled``: exactness is not defined (``identical`` and ``near_ties`` are None).
    """
    names = list(results[0].runs) if results else []
    summary = {}
    for name in names:
        rows = [r for r in results if name in r.runs]
        tps = [_tps(r.runs[name]) for r in rows]
        entry = {
            "tokens_per_s": statistics.median(tps),
            "speedup": statistics.median(_tps(r.runs[name]) / _tps(r.runs[reference]) for r in rows),
            "identical": None if sampled else sum(1 for r in rows if name not in r.divergence),
            "prompts": len(rows),
            "new_tokens": sum(r.runs[name].new_tokens.numel() for r in rows),
        }
        entry["pooled_tokens_per_s"] = _pooled(rows, name)  # all tokens / all seconds: robust to unequal lengths
        entry["pooled_speedup"] = entry["pooled_tokens_per_s"] / _pooled(rows, reference)
        for other in (assisted, llama_cpp):
            if other and all(other in r.runs for r in rows):
                entry["speedup_vs_" + other] = statistics.median(_tps(r.runs[name]) / _tps(r.runs[other]) for r in rows)
                entry["pooled_speedup_vs_" + other] = entry["pooled_tokens_per_s"] / _pooled(rows, other)
        stats = [r.runs[name].stats for r in rows if r.runs[name].stats]
        if stats:
            lengths = [a for s in stats for a in s["accepted_lengths"]]
            depths = [d for s in stats for d in s["draft_depths"]]
            entry["tau"] = sum(lengths) / len(lengths) if lengths else 0.0
            entry["acceptance_by_depth"] = acceptance_by_depth(lengths, depths)
            entry["accepted_lengths"] = lengths
            for key in ("draft_time", "verify_time", "prefill_time"):
                entry[key] = sum(s[key] for s in stats)
            step_time = sum(s.get("step_time", 0.0) for s in stats)
            if step_time > 0:  # time outside model forwards, per step and as a share of the steps' time
                entry["overhead_time"] = sum(s.get("overhead_time", 0.0) for s in stats)
                entry["overhead_ms_per_step"] = 1000 * entry["overhead_time"] / max(1, len(lengths))
                entry["overhead_fraction"] = entry["overhead_time"] / step_time
            entry["mean_tree_size"] = statistics.mean(t for s in stats for t in s["tree_sizes"]) if lengths else 0
            budgets = [b for s in stats for b in s.get("tree_budgets", [])]
            if budgets:
                entry["median_tree_budget"] = statistics.median(budgets)
            entry["draft_ms_per_step"] = 1000 * entry["draft_time"] / max(1, len(lengths))
            if stats[-1].get("drafter_info"):
                entry["drafter_info"] = stats[-1]["drafter_info"]  # Drafter.describe() after the last prompt
            entry["lossless"] = all(s["lossless"] for s in stats)
        entry["near_ties"] = None if sampled else sum(1 for r in rows if r.divergence.get(name, {}).get("near_tie"))
        entry["own_numerics"] = any(r.divergence.get(name, {}).get("kind") == "own-numerics" for r in rows)
        entry["by_category"] = _by_category(rows, name, reference)
        summary[name] = entry
    return summary


def _by_category(rows: list[PromptResult], name: str, reference: str) -> dict:
    out: dict[str, dict] = {}
    for cat in sorted({r.prompt.main_category for r in rows}):
        sub = [r for r in rows if r.prompt.main_category == cat]
        entry = {"speedup": statistics.median(_tps(r.runs[name]) / _tps(r.runs[reference]) for r in sub),
                 "prompts": len(sub)}
        lengths = [a for r in sub if r.runs[name].stats for a in r.runs[name].stats["accepted_lengths"]]
        if lengths:
            entry["tau"] = sum(lengths) / len(lengths)
        out[cat] = entry
    return out


def _pooled(rows: list[PromptResult], name: str) -> float:
    seconds = sum(r.runs[name].seconds for r in rows)
    return sum(r.runs[name].new_tokens.numel() for r in rows) / seconds if seconds > 0 else 0.0


def _tps(run: RunRecord) -> float:
    return run.new_tokens.numel() / run.seconds if run.seconds > 0 else 0.0
