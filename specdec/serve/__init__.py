"""``specdec serve``: an OpenAI-compatible HTTP server over one SpecEngine (docs/serve.md).

    from specdec.serve import GenerationService, create_app
    app = create_app(GenerationService(engine, tokenizer, "my-model"), max_waiting=16)

Needs the optional extra: ``pip install 'specdec[serve]'`` (Starlette and uvicorn). One generation at a time, in
arrival order, from a bounded queue (:mod:`specdec.serve.queue`); no batching yet.
"""

from specdec.serve.generation import Completion, GenerationCancelled, GenerationService


def create_app(service: GenerationService, max_waiting: int = 16, max_body_bytes: int = 1 << 20):
    """The Starlette app (imported here lazily: the extra is optional); see :func:`specdec.serve.app.create_app`."""
    from specdec.serve.app import create_app as _create_app  # optional: Starlette (the serve extra)

    return _create_app(service, max_waiting, max_body_bytes)


__all__ = ["Completion", "GenerationCancelled", "GenerationService", "create_app"]
