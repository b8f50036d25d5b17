"""One client's streamed tokens/s through ``specdec serve`` against ``specdec generate``'s decoding, same run.

Both run on one engine in this process (so the drafter, its tree budget and the kernels are the same): the server
as ``specdec serve`` builds it, under uvicorn in a thread, called over loopback HTTP by a streaming client; the
baseline exactly as ``specdec generate`` decodes (chat template, greedy, ``engine.generate`` with a text streamer),
while the server is idle. Each prompt alternates which goes first; the figures are medians over prompts and repeats.
The served rate is what the client sees: completion tokens over the time from sending the request to ``[DONE]``
(tokenization, HTTP and SSE included); the baseline's is the CLI's own (new tokens over the generate call).

    python -m specdec.benchmarks.serve_throughput --config qwen-coder-cpu-fast --drafter draft-model --limit 6
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import statistics
import sys
import threading
import time
import urllib.request

from specdec.benchmarks import prompts as P
from specdec.cli import build_parser, settings
from specdec.serve.cli import build_service


def stream_chat(url: str, model: str, prompt: str, max_tokens: int) -> tuple[str, int, float, float]:
    """(text, completion tokens, seconds from request to [DONE], tau) of one streamed greedy chat completion."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    text, tokens, tau = [], 0, 0.0
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
            tau = chunk.get("spec", {}).get("tau", tau)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return "".join(text), tokens, time.perf_counter() - t0, tau


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="qwen-coder-cpu-fast")
    ap.add_argument("--drafter", default="draft-model")
    ap.add_argument("--limit", type=int, default=6, help="prompts, round-robin over Spec-Bench categories")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()

    import torch
    import uvicorn
    from transformers import TextStreamer

    from specdec.serve.app import create_app  # optional: Starlette (the serve extra)

    flags = ["--config", args.config, "--drafter", args.drafter, "--max-new-tokens", str(args.max_new_tokens)]
    service = build_service(settings(build_parser().parse_args(["serve", *flags])))
    engine, tokenizer = service.engine, service.tokenizer
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
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
                        tau = result.stats.mean_accepted_length
                    else:
                        text, n, seconds, tau = stream_chat(url, service.model_name, prompt.text, args.max_new_tokens)
                    got[method] = (n / seconds, n, text, round(tau, 3))
                rows.append({"prompt": prompt.category, "repeat": r,
                             "generate_tok_s": got["generate"][0], "serve_tok_s": got["serve"][0],
                             "tokens": (got["generate"][1], got["serve"][1]), "tau": (got["generate"][3], got["serve"][3]),
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
        server.should_exit = True
        thread.join(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
