"""The command line: ``specdec bench`` and ``specdec generate`` over presets in ``configs/`` (``specdec presets``
lists them); ``specdec models`` lists, fetches and re-fetches the real models; ``specdec trigrams`` builds the
table of the 'aded' drafter; ``specdec train`` self-distills draft heads (specdec.training); ``specdec
export-heads`` writes trained Medusa heads in vLLM's layout."""

from __future__ import annotations

import argparse
import sys
import time

from specdec.errors import SpecDecError, UnknownNameError
from specdec.loading import device_map_of, gguf_of, load_models  # noqa: F401  (device_map_of: tests, older imports)
from specdec.presets import available_presets, load_preset
from specdec.settings_check import check_settings


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="preset name in configs/ or a YAML path (default: qwen-coder-pair)")
    p.add_argument("--target", help="target model name (specdec.models) or local HF folder")
    p.add_argument("--draft", help="draft model name or folder, for drafters and baselines that need one")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="target, draft and baseline precision (auto: bf16 where the hardware has it natively, else "
                        "fp32; the presets name theirs)")
    p.add_argument("--weights", choices=["dense", "int8", "w8a8", "gguf"],
                   help="target and draft weights: dense (default: every weight in --dtype), int8 (weight-only int8, "
                        "bf16 activations), w8a8 (int8 weights and activations) or gguf (the GGUF file's own Q4_K / Q6_K "
                        "tensors, as llama.cpp runs them), on native CPU kernels (docs/cpu-fast-path.md)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--draft-device", dest="draft_device",
                   help="device of the draft model (e.g. cuda): tokens and drafts cross between it and the target's")
    p.add_argument("--device-map", dest="device_map",
                   help="place the target with accelerate: 'auto' or a JSON object from module names to devices "
                        "(\"cpu\", a GPU index, \"disk\"); dense weights only")
    p.add_argument("--offload-folder", dest="offload_folder", help="folder for modules a --device-map puts on disk")
    p.add_argument("--overlap", action="store_const", const=True,
                   help="draft beside the target's forward (PEARL; docs/overlap.md), for every drafter entry")
    p.add_argument("--drafter", action="append", help="preset drafter entry or registered drafter (repeatable)")
    p.add_argument("--verifier", help="acceptance rule (default greedy)")
    p.add_argument("--max-new-tokens", type=int, dest="max_new_tokens")
    p.add_argument("--do-sample", action="store_const", const=True, dest="do_sample",
                   help="sample (the verifier defaults to 'rejection') instead of greedy decoding")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int, dest="top_k")
    p.add_argument("--top-p", type=float, dest="top_p")
    p.add_argument("--seed", type=int, help="random seed of a sampling run (bench: seed + prompt index)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description="Lossless speculative decoding for HF causal LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmark drafters against HF baselines on a prompt set")
    _common(bench)
    bench.add_argument("--categories", help="comma-separated categories (Spec-Bench main or sub categories)")
    bench.add_argument("--limit", type=int, help="number of prompts, round-robin over categories")
    bench.add_argument("--prompts", help="JSONL prompt file (default: the shipped Spec-Bench questions)")
    bench.add_argument("--baselines", help="comma-separated: plain,hf-assisted,hf-prompt-lookup,llama-cpp,"
                                           "llama-cpp-prompt-lookup (llama.cpp on the target's GGUF file: "
                                           "pip install 'specdec[llamacpp]')")
    bench.add_argument("--output", help="folder for results.json, report.md and the plots")
    bench.add_argument("--no-progress", action="store_true")
    gen = sub.add_parser("generate", help="generate from one prompt, streaming the text")
    _common(gen)
    gen.add_argument("prompt", help="the prompt (a chat message when the tokenizer has a chat template)")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--min-p", type=float)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    tri = sub.add_parser("trigrams", help="count a tri-gram table for the 'aded' drafter from text files")
    tri.add_argument("corpus", nargs="+", help="text files, tokenised with the target's tokenizer")
    tri.add_argument("--tokenizer", required=True, help="target model name (specdec.models) or local HF folder")
    tri.add_argument("--output", required=True, help="the table file to write (.npz)")
    tri.add_argument("--top", type=int, default=12, help="successors kept per bigram context (default 12)")
    tri.add_argument("--no-progress", action="store_true")
    from specdec.models.cli import add_parser as add_models_parser

    add_models_parser(sub)
    from specdec.training.cli import add_acceptance_parser, add_parser as add_train_parser

    add_train_parser(sub)
    add_acceptance_parser(sub)
    from specdec.drafters.heads.export import add_parser as add_export_parser

    add_export_parser(sub)
    from specdec.serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub, _common)
    sub.add_parser("presets", help="list the shipped presets (--config NAME) with their models and drafter entries")
    return parser


def settings(args: argparse.Namespace) -> dict:
    """The preset overlaid with the flags that were given."""
    cfg = load_preset(args.config)
    for key, value in vars(args).items():
        if value is None or key in ("config", "command", "drafter"):
            continue
        if key in ("categories", "baselines"):
            value = [v.strip() for v in value.split(",") if v.strip()]
        cfg[key] = value
    cfg.setdefault("dtype", "auto")
    cfg.setdefault("weights", "dense")
    cfg.setdefault("max_new_tokens", 128)
    cfg.setdefault("do_sample", False)
    cfg.setdefault("temperature", 1.0)
    cfg.setdefault("seed", 0)
    cfg["drafter_entries"] = select_drafters(cfg.get("drafters") or {}, args.drafter)
    if cfg.get("overlap"):
        for entry in cfg["drafter_entries"]:
            entry["overlap"] = True
    return cfg


def select_drafters(entries: dict, wanted: list[str] | None) -> list[dict]:
    from specdec.drafters import available_drafters

    if not wanted:
        return [{"name": k, **v} for k, v in entries.items()]
    out = []
    for name in wanted:
        if name in entries:
            out.append({"name": name, **entries[name]})
        elif name in available_drafters():
            out.append({"name": name, "drafter": name})
        else:
            raise UnknownNameError(f"unknown drafter {name!r}; preset entries: {', '.join(entries) or '-'}; "
                                   f"registered drafters: {', '.join(available_drafters())}")
    return out


def cmd_bench(cfg: dict, progress: bool) -> int:
    import torch

    from specdec.benchmarks import prompts as P
    from specdec.benchmarks.methods import build_method, sampling_of
    from specdec.benchmarks.report import format_table, write_outputs
    from specdec.benchmarks.run import run_benchmark, summarize
    from specdec.memory import release_memory

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
        from specdec.benchmarks.llama_cpp import import_llama_cpp

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


def cmd_generate(cfg: dict, args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from specdec import SpecEngine
    from specdec.benchmarks.methods import build_method
    from specdec.benchmarks.prompts import Prompt, encode

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


def cmd_trigrams(args: argparse.Namespace) -> int:
    from pathlib import Path

    from transformers import AutoTokenizer

    from specdec import models
    from specdec.drafters.aded.trigram_table import build_from_files

    folder = args.tokenizer if Path(args.tokenizer).is_dir() else str(models.local_path(args.tokenizer))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    table = build_from_files(args.corpus, tokenizer, top=args.top, progress=not args.no_progress)
    path = table.save(args.output)
    print(f"{path}: {table.num_contexts} bigram contexts, {table.num_entries} successors "
          f"(vocabulary {table.vocab_size})", file=sys.stderr)
    return 0


def cmd_presets() -> int:
    for name in available_presets():
        cfg = load_preset(name)
        entries = ", ".join(cfg.get("drafters") or {}) or "-"
        print(f"{name}: target {cfg.get('target')}, draft {cfg.get('draft') or '-'}; drafters: {entries}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "trigrams":
            return cmd_trigrams(args)
        if args.command == "train":
            from specdec.training.cli import cmd_train

            return cmd_train(args)
        if args.command == "train-acceptance":
            from specdec.training.cli import cmd_train_acceptance

            return cmd_train_acceptance(args)
        if args.command == "export-heads":
            from specdec.drafters.heads.export import cmd_export_heads

            return cmd_export_heads(args)
        if args.command == "models":
            from specdec.models.cli import cmd_models

            return cmd_models(args)
        if args.command == "presets":
            return cmd_presets()
        cfg = settings(args)
        check_settings(cfg, args.command, getattr(args, "prompt", None), getattr(args, "min_p", None),
                       getattr(args, "repetition_penalty", 1.0))  # before any model loads
        if args.command == "bench":
            return cmd_bench(cfg, progress=not args.no_progress)
        if args.command == "serve":
            from specdec.serve.cli import cmd_serve

            return cmd_serve(cfg, args)
        return cmd_generate(cfg, args)
    except SpecDecError as exc:
        print(f"specdec: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
