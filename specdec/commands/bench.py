"""``specdec bench``: the preset's drafter entries against the baselines on a prompt set, with the report."""

from __future__ import annotations

import sys
import time

import torch

from specdec.benchmarks import prompts as P
from specdec.benchmarks.llama_cpp import import_llama_cpp
from specdec.benchmarks.methods import build_method, sampling_of
from specdec.benchmarks.report import format_table, write_outputs
from specdec.benchmarks.run import run_benchmark, summarize
from specdec.errors import SpecDecError
from specdec.loading import gguf_of, load_models
from specdec.memory import release_memory


def cmd_bench(cfg: dict, progress: bool) -> int:
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    selected = P.select(P.read_prompts(cfg.get("prompts")), cfg.get("categories"), cfg.get("limit"))
    if not selected:
        raise SpecDecError("no prompts selected")
    t0 = time.perf_counter()
    target, draft, tokenizer = load_models(cfg)
    print(f"models loaded in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    baselines = cfg.get("baselines") or ["plain"]
    if "plain" not in baselines:
        baselines = ["plain", *baselines]
    if draft is None:
        baselines = [b for b in baselines if b != "hf-assisted"]
    specs = [{"name": b, "baseline": b} for b in baselines] + cfg["drafter_entries"]
    sampling = sampling_of(cfg)
    for s in cfg["drafter_entries"]:
        s.setdefault("verifier", cfg.get("verifier") or ("rejection" if sampling.do_sample else "greedy"))
    gguf = None
    if any(b.startswith("llama-cpp") for b in baselines):
        import_llama_cpp()  # before anything runs: a missing extra is a clear error, not a failure mid-benchmark
        gguf = gguf_of(cfg["target"])
    methods = [build_method(s, target, draft, sampling, gguf=gguf, threads=torch.get_num_threads()) for s in specs]
    eos = target.generation_config.eos_token_id
    encode = lambda p: P.encode(tokenizer, p, chat=cfg.get("chat", True))  # noqa: E731
    results = run_benchmark(methods, selected, encode, cfg["max_new_tokens"], eos, target=target,
                            warmup_prompt=selected[0], progress=progress, sampled=sampling.do_sample,
                            seed=int(cfg["seed"]))
    summary = summarize(results, assisted="hf-assisted" if "hf-assisted" in baselines else None,
                        sampled=sampling.do_sample, llama_cpp="llama-cpp" if "llama-cpp" in baselines else None)
    del methods, target, draft  # the report needs none of them: plotting must not add to the run's peak memory
    release_memory()
    print(format_table(summary))
    setup = {k: cfg.get(k) for k in ("target", "draft", "dtype", "weights", "threads", "max_new_tokens", "verifier",
                                     "do_sample", "temperature", "top_k", "top_p", "seed", "draft_device",
                                     "device_map")}
    setup.update(prompts=len(selected), categories=sorted({p.main_category for p in selected}))
    out_dir = cfg.get("output") or "results/latest"
    for kind, path in write_outputs(out_dir, setup, summary, results).items():
        print(f"{kind}: {path}", file=sys.stderr)
    return 0
