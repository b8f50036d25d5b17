"""``specdec serve``: load the preset's models once, build one engine, serve it over HTTP (docs/serve.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specdec.benchmarks.methods import build_method
from specdec.errors import InvalidInputError, SpecDecError
from specdec.loading import load_models
from specdec.serve.generation import GenerationService

PER_REQUEST = ("do_sample", "temperature", "top_k", "top_p", "seed")  # _common's flags a request sets for itself


def add_parser(sub, common) -> None:
    """Register ``serve`` with the model-loading flags of ``common`` (specdec.commands.parser's shared flags)."""
    p = sub.add_parser("serve", help="an OpenAI-compatible server (/v1/completions, /v1/chat/completions)",
                       description="Serve one engine over HTTP; needs pip install 'specdec[serve]'. The first drafter "
                                   "entry of the preset (or --drafter) drafts; --max-new-tokens is the default "
                                   "max_tokens of a request that names none; sampling is per request.")
    common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", dest="served_model_name",
                   help="the model id clients send (default: the target's name)")
    p.add_argument("--max-waiting", dest="max_waiting", type=int, default=16,
                   help="requests that may wait for the engine; more get 429 with Retry-After (default 16)")
    p.add_argument("--max-body-bytes", dest="max_body_bytes", type=int, default=1 << 20,
                   help="largest request body; larger ones get 413 (default 1 MiB)")


def build_service(cfg: dict):
    """The models of ``cfg`` (a preset overlaid with flags), loaded once, as a GenerationService."""
    import torch

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    target, draft, tokenizer = load_models(cfg)
    entry = dict(cfg["drafter_entries"][0]) if cfg["drafter_entries"] else {"name": "prompt-lookup"}
    entry["verifier"] = "greedy"  # temperature 0; sampling requests get the sampling verifier below
    engine = build_method(entry, target, draft).engine
    verifier = cfg.get("verifier") or "rejection"
    if verifier == "greedy":
        verifier = "rejection"
    name = cfg.get("served_model_name") or Path(str(cfg["target"])).name
    return GenerationService(engine, tokenizer, name, int(cfg["max_new_tokens"]), sampling_verifier=verifier)


def cmd_serve(cfg: dict, args: argparse.Namespace) -> int:
    given = [f"--{k.replace('_', '-')}" for k in PER_REQUEST if getattr(args, k, None) is not None]
    if given:
        raise InvalidInputError(f"{', '.join(given)}: a request sets its own sampling (temperature, top_p, seed); "
                                "drop these flags from specdec serve")
    for flag, value in (("--max-waiting", args.max_waiting), ("--max-body-bytes", args.max_body_bytes)):
        if value < 1:
            raise InvalidInputError(f"{flag} must be at least 1, got {value}")
    try:
        import uvicorn

        from specdec.serve.app import create_app  # optional: Starlette and uvicorn (serve extra)
    except ImportError as exc:
        raise SpecDecError(f"specdec serve needs the serve extra ({exc.name} is missing): "
                           "pip install 'specdec[serve]'") from exc
    service = build_service(cfg)
    app = create_app(service, max_waiting=args.max_waiting, max_body_bytes=args.max_body_bytes)
    print(f"serving {service.model_name!r} on http://{args.host}:{args.port}/v1 "
          f"(drafter {getattr(service.engine.drafter, 'name', '?')})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
