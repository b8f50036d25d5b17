"""The ``specdec`` argument parser: every subcommand, with the model and decoding flags they share."""

from __future__ import annotations

import argparse

from specdec.drafters.heads.export import add_parser as add_export_parser
from specdec.models.cli import add_parser as add_models_parser
from specdec.serve.cli import add_parser as add_serve_parser
from specdec.training.cli import add_acceptance_parser, add_parser as add_train_parser


def add_common_flags(p: argparse.ArgumentParser) -> None:
    """The flags of every command that loads the preset's models and decodes: bench, generate, serve."""
    p.add_argument("--config", help="preset name in configs/ or a YAML path (default: qwen-coder-pair)")
    p.add_argument("--target", help="target model name (specdec.models) or local HF folder")
    p.add_argument("--draft", help="draft model name or folder, for drafters and baselines that need one")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="target, draft and baseline precision (auto: bf16 where the hardware has it natively, else "
                        "fp32; the presets name theirs)")
    p.add_argument("--weights", choices=["auto", "dense", "int8", "w8a8", "gguf"],
                   help="target and draft weights: auto (default: gguf on a CPU where the kernels run and the model "
                        "has a k-quant GGUF file, else dense), dense (every weight in --dtype), int8 (weight-only int8, "
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
    add_common_flags(bench)
    bench.add_argument("--categories", help="comma-separated categories (Spec-Bench main or sub categories)")
    bench.add_argument("--limit", type=int, help="number of prompts, round-robin over categories")
    bench.add_argument("--prompts", help="JSONL prompt file (default: the shipped Spec-Bench questions)")
    bench.add_argument("--baselines", help="comma-separated: plain,hf-assisted,hf-prompt-lookup,llama-cpp,"
                                           "llama-cpp-prompt-lookup (llama.cpp on the target's GGUF file: "
                                           "pip install 'specdec[llamacpp]')")
    bench.add_argument("--output", help="folder for results.json, report.md and the plots")
    bench.add_argument("--no-progress", action="store_true")
    gen = sub.add_parser("generate", help="generate from one prompt, streaming the text")
    add_common_flags(gen)
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
    add_models_parser(sub)
    add_train_parser(sub)
    add_acceptance_parser(sub)
    add_export_parser(sub)
    add_serve_parser(sub, add_common_flags)
    sub.add_parser("presets", help="list the shipped presets (--config NAME) with their models and drafter entries")
    return parser
