"""What a draft model costs and how often it is right, per draft transform (docs/cpu-fast-path.md, "A cheap draft").

For each variant of the draft (``specdec.models.draft_transforms``: quantize, draft_vocab, draft_layers), in one
process beside the target:

- ms of one forward over n new tokens on top of a ``--context``-token cache (median of ``--repeats`` rounds, the
  variants and the target interleaved round by round, so machine load hits them alike);
- first-token acceptance: on ``--prompts`` Spec-Bench prompts (one per category, round-robin), the target's own
  greedy continuation of ``--new-tokens`` tokens, and the fraction of its tokens that the draft's greedy choice
  after the same prefix matches (teacher forced: a chain's first draft token is accepted exactly then);
- with ``--tau``, a draft-model chain of 4 through SpecEngine on the same prompts: tokens per step and tok/s.

    python -m benchmarks.draft_cost --variants base,vocab,q4k,q4k+vocab --tau
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import specdec.models
from specdec import SpecEngine
from specdec.benchmarks.prompts import encode, read_prompts, select
from specdec.drafters import create_drafter
from specdec.drafters.draft_model import DraftModelDrafter
from specdec.models.draft_transforms import resolve_draft_vocab
from specdec.runner import CausalLMRunner

VARIANTS = {  # name -> draft-model options
    "base": dict(quantize=None),  # as loaded (quantize "auto" would re-quantize a gguf draft to Q4_K)
    "vocab": dict(quantize=None, draft_vocab="shipped"),
    "q4k": dict(quantize="q4_k"),
    "q4k+vocab": dict(quantize="q4_k", draft_vocab="shipped"),
}


def parse_variant(name: str) -> dict:
    """``base``, ``vocab``, ``q4k``, ``q4k+vocab``, or any of them with ``+L<n>`` (keep n layers) or ``+hf``
    (draft with transformers' forward, not the lean one)."""
    parts = name.split("+")
    options: dict = {}
    for part in parts:
        if part.startswith("L") and part[1:].isdigit():
            options["draft_layers"] = int(part[1:])
        elif part in VARIANTS:
            options.update(VARIANTS[part])
        elif part == "hf":
            options["lean"] = False  # transformers' forward instead of the lean one
        else:
            raise SystemExit(f"unknown variant part {part!r} in {name!r}")
    return options


def time_forwards(runners: dict, sizes: tuple, context: int, repeats: int) -> dict:
    """{name: {n: median ms}} of one forward over n tokens after ``context`` tokens, interleaved across runners
    (a :class:`CausalLMRunner` or the runner a drafter drafts with)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30000, (context + max(sizes),), generator=gen)
    for runner in runners.values():
        runner.prefill(ids[None, :context])
    times = {name: {n: [] for n in sizes} for name in runners}
    for r in range(repeats + 1):
        for name, runner in runners.items():
            for n in sizes:
                positions = torch.arange(context, context + n)
                causal = torch.ones(n, n, dtype=torch.bool).tril_()
                t0 = time.perf_counter()
                runner.forward(ids[context:context + n], positions, causal)
                took = time.perf_counter() - t0
                runner.crop(context)
                if r:
                    times[name][n].append(took * 1000)
    return {name: {n: statistics.median(v) for n, v in by_n.items()} for name, by_n in times.items()}


@torch.no_grad()
def first_token_acceptance(draft, sequences: list[tuple[torch.Tensor, int]]) -> float:
    """Fraction of the target's greedy tokens that the draft's argmax after the same prefix equals."""
    hits = total = 0
    for seq, prompt_len in sequences:
        logits = draft(seq[None]).logits[0, prompt_len - 1:-1]
        hits += int((logits.argmax(-1) == seq[prompt_len:]).sum())
        total += seq.numel() - prompt_len
    return hits / total


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b")
    ap.add_argument("--weights", default="gguf")
    ap.add_argument("--variants", default="base,vocab,q4k,q4k+vocab")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--sizes", default="1,4")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tau", action="store_true", help="also run a draft-model chain of 4 through SpecEngine")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    target, tok = specdec.models.load(args.target, weights=args.weights)
    draft, _ = specdec.models.load(args.draft, weights=args.weights, tokenizer=False)
    names = args.variants.split(",")
    options = {name: parse_variant(name) for name in names}
    if any(o.get("draft_vocab") == "shipped" for o in options.values()):
        vocab = resolve_draft_vocab("shipped", target)  # once: it fingerprints the target's LM head
        for o in options.values():
            if o.get("draft_vocab") == "shipped":
                o["draft_vocab"] = vocab
    drafters = {name: DraftModelDrafter(target, model=draft, mode="chain", depth=4, min_prob=0.0, **options[name])
                for name in names}
    models = {name: d.runner.model for name, d in drafters.items()}
    sizes = tuple(int(s) for s in args.sizes.split(","))
    runners = {"target": CausalLMRunner(target), **{name: d.runner for name, d in drafters.items()}}
    costs = time_forwards(runners, sizes, args.context, args.repeats)
    for name, by_n in costs.items():
        print(f"{name:<16} " + " ".join(f"{n} tok {ms:.2f} ms" for n, ms in by_n.items())
              + f"  ({by_n[sizes[0]] / costs['target'][sizes[0]]:.3f}x target)", flush=True)

    prompts = select(read_prompts(), limit=args.prompts)
    sequences = []
    for p in prompts:
        ids = encode(tok, p)
        out = target.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                              pad_token_id=tok.eos_token_id)
        sequences.append((out[0], ids.shape[1]))
    one = costs["target"][sizes[0]]
    print(f"target {args.target} ({args.weights}): " + ", ".join(f"{n} tok {ms:.2f} ms" for n, ms in
                                                                   costs["target"].items()))
    print(f"{'variant':<16} " + " ".join(f"{f'ms@{n}':>8}" for n in sizes) + f" {'x target':>9} {'accept1':>8}"
          + (f" {'tau':>6} {'tok/s':>7}" if args.tau else ""))
    for name in names:
        acc = first_token_acceptance(models[name], sequences)
        line = (f"{name:<16} " + " ".join(f"{costs[name][n]:8.2f}" for n in sizes)
                + f" {costs[name][sizes[0]] / one:9.3f} {acc:8.3f}")
        if args.tau:
            drafter = create_drafter("draft-model", target=target, model=draft, mode="chain", depth=4, min_prob=0.0,
                                     **options[name])
            engine = SpecEngine(target, drafter)
            steps = tokens = 0
            seconds = 0.0
            for p in prompts:
                t0 = time.perf_counter()
                result = engine.generate(encode(tok, p), max_new_tokens=args.new_tokens, eos_token_id=None)
                seconds += time.perf_counter() - t0
                steps += len(result.stats.accepted_lengths)
                tokens += sum(result.stats.accepted_lengths)
            line += f" {tokens / steps:6.2f} {len(prompts) * args.new_tokens / seconds:7.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
