"""One client's streamed tokens/s through ``specdec serve`` against ``specdec generate``'s decoding, same run.

The server runs as its own process (``specdec serve``, as a user starts it); the baseline decodes in this process
exactly as ``specdec generate`` does (the same preset and drafter entry, chat template, greedy, ``engine.generate``
with a text streamer). Each prompt alternates which goes first; the figures are medians over prompts and repeats.
The served rate is what the client sees: completion tokens over the time from sending the request to ``[DONE]``
(tokenization, HTTP and SSE included); the baseline's is the CLI's own (new tokens over the generate call).

    python -m specdec.benchmarks.serve_throughput --config qwen-coder-cpu-fast --drafter draft-model --limit 6
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import time
import urllib.request


def stream_chat(url: str, model: str, prompt: str, max_tokens: int) -> tuple[str, int, float]:
    """(text, completion tokens, seconds from request to [DONE]) of one streamed greedy chat completion."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    text, tokens = [], 0
    with urllib.request.urlopen(req) as resp:
        for line in resp:
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                break
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                text.append(chunk["choices"][0]["delta"].get("content") or "")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return "".join(text), tokens, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="qwen-coder-cpu-fast")
    ap.add_argument("--drafter", default="draft-model")
    ap.add_argument("--limit", type=int, default=6, help="prompts, round-robin over Spec-Bench categories")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()

    import torch
    from transformers import TextStreamer

    from specdec.benchmarks import prompts as P
    from specdec.cli import build_parser, settings
    from specdec.serve.cli import build_service

    flags = ["--config", args.config, "--drafter", args.drafter, "--max-new-tokens", str(args.max_new_tokens)]
    server = subprocess.Popen([sys.executable, "-m", "specdec.cli", "serve", *flags, "--port", str(args.port)])
    url = f"http://127.0.0.1:{args.port}"
    try:
        service = build_service(settings(build_parser().parse_args(["generate", *flags, "x"])))
        engine, tokenizer = service.engine, service.tokenizer
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(f"{url}/health").read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(1)
        selected = P.select(P.read_prompts(), None, args.limit)
        # warm-up: kernels, caches and the server's first request
        stream_chat(url, service.model_name, selected[0].text, 16)
        engine.generate(P.encode(tokenizer, selected[0]), max_new_tokens=16)
        rows = []
        for i, prompt in enumerate(selected):
            ids = P.encode(tokenizer, prompt, chat=True)
            for r in range(args.repeats):
                order = ("generate", "serve") if (i + r) % 2 == 0 else ("serve", "generate")
                got = {}
                for method in order:
                    if method == "generate":  # as cmd_generate: engine.generate with a text streamer
                        sink = io.StringIO()
                        streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
                        streamer.on_finalized_text = lambda text, stream_end=False: sink.write(text)
                        t0 = time.perf_counter()
                        result = engine.generate(ids, max_new_tokens=args.max_new_tokens, streamer=streamer)
                        seconds = time.perf_counter() - t0
                        n = result.stats.new_tokens
                        text = tokenizer.decode(result.new_tokens[0], skip_special_tokens=True)
                    else:
                        text, n, seconds = stream_chat(url, service.model_name, prompt.text, args.max_new_tokens)
                    got[method] = (n / seconds, n, text)
                rows.append({"prompt": prompt.category, "repeat": r,
                             "generate_tok_s": got["generate"][0], "serve_tok_s": got["serve"][0],
                             "tokens": (got["generate"][1], got["serve"][1]),
                             "same_text": got["generate"][2] == got["serve"][2]})
                print(json.dumps(rows[-1]), flush=True)
        gen = statistics.median(r["generate_tok_s"] for r in rows)
        srv = statistics.median(r["serve_tok_s"] for r in rows)
        ratios = statistics.median(r["serve_tok_s"] / r["generate_tok_s"] for r in rows)
        print(f"\n{args.config} / {args.drafter}, {len(selected)} prompts x {args.repeats}, max {args.max_new_tokens} "
              f"tokens, torch threads {torch.get_num_threads()}:\n  specdec generate: median {gen:.2f} tok/s\n"
              f"  specdec serve (one streaming client): median {srv:.2f} tok/s\n"
              f"  paired ratio serve/generate: median {ratios:.3f}; same text in "
              f"{sum(r['same_text'] for r in rows)}/{len(rows)} runs")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
