"""One request on the engine: prompt to token ids (chat template for chat), limits against the context, the
verifier its temperature needs, the seeded generator, stop strings, the text stream, and cancellation.

``temperature == 0`` decodes greedily with the greedy verifier (output equal to the target's own greedy decoding);
``temperature > 0`` samples through the preset's sampling verifier ("rejection" unless the preset names another
sampling rule), lossless. The engine keeps one verifier, so :meth:`GenerationService.run` sets the one a request
needs before each call; :mod:`specdec.serve.queue` guarantees no two calls overlap. A cancelled request raises
:class:`GenerationCancelled` from the streamer at the next step; the engine's next call starts from a fresh prefill
and a fresh ``drafter.begin``, so nothing of the stopped call survives.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import torch

from specdec.engine import SpecEngine
from specdec.errors import InvalidInputError
from specdec.serve.errors import ApiError
from specdec.serve.schema import GenerationRequest
from specdec.serve.text import TextStream
from specdec.stats import DecodingStats
from specdec.stopping import normalize_eos
from specdec.verifiers import create_verifier


class GenerationCancelled(Exception):
    """The client went away; raised inside ``engine.generate`` by the streamer, at the next emitted step."""


@dataclass(frozen=True)
class PreparedRequest:
    request: GenerationRequest
    input_ids: torch.Tensor  # LongTensor [1, L]
    max_tokens: int  # resolved: the request's, or the server's default within the context


@dataclass
class Completion:
    text: str  # cut before the first stop string, special tokens skipped
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int
    stats: DecodingStats

    def spec(self) -> dict:
        """Our extra block beside ``usage``: what speculation did for this request."""
        s = self.stats
        return {"tau": round(s.mean_accepted_length, 4), "draft_forwards": s.draft_forwards,
                "target_forwards": s.target_forwards, "drafter": s.drafter, "verifier": s.verifier,
                "acceptance_by_depth": [None if r != r else round(r, 4) for r in s.acceptance_rate_by_depth()]}


class GenerationService:
    def __init__(self, engine: SpecEngine, tokenizer, model_name: str, default_max_tokens: int = 128,
                 sampling_verifier: str = "rejection"):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self.context = engine.runner.max_positions  # None: no limit known
        self.greedy_verifier = create_verifier("greedy")
        self.sampling_verifier = create_verifier(sampling_verifier)
        if not self.sampling_verifier.samples:
            raise InvalidInputError(f"verifier {sampling_verifier!r} decodes greedily; the server needs a sampling "
                                    "verifier for temperature > 0 (e.g. rejection)")
        config = getattr(engine.target, "generation_config", None)
        self.eos_token_id = normalize_eos(getattr(config, "eos_token_id", None))

    # ------------------------------------------------------------------ on the event loop: cheap checks
    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Token ids and the resolved max_tokens; :class:`ApiError` when the prompt or max_tokens do not fit."""
        ids, param = self._encode(request)
        n = ids.shape[1]
        if self.context is not None and n >= self.context:
            what = "the prompt" if param == "prompt" else "messages, through the chat template,"
            raise ApiError(400, f"{what} make {n} tokens; this model's context is {self.context} tokens, leaving no "
                                f"room to generate: shorten {param}", param, "context_length_exceeded")
        room = None if self.context is None else self.context - n
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = self.default_max_tokens if room is None else min(self.default_max_tokens, room)
        elif room is not None and max_tokens > room:
            raise ApiError(400, f"max_tokens ({max_tokens}) plus the prompt ({n} tokens) exceeds this model's context "
                                f"of {self.context} tokens: ask for at most {room}", "max_tokens",
                           "context_length_exceeded")
        return PreparedRequest(request, ids, max_tokens)

    def _encode(self, request: GenerationRequest) -> tuple[torch.Tensor, str]:
        if request.chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ApiError(400, "this model's tokenizer has no chat template: send a raw prompt to "
                                    "/v1/completions instead", "messages")
            try:
                enc = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True,
                                                         return_tensors="pt", return_dict=True)
            except Exception as exc:  # noqa: BLE001 - templates raise their own errors (e.g. "roles must alternate")
                raise ApiError(400, f"this model's chat template refused the messages: {exc}", "messages") from exc
            return enc["input_ids"].long(), "messages"
        if isinstance(request.prompt, list):
            vocab = self.engine.runner.vocab_size
            if any(not 0 <= t < vocab for t in request.prompt):
                raise ApiError(400, f"prompt holds token ids outside the vocabulary [0, {vocab})", "prompt")
            return torch.tensor([request.prompt], dtype=torch.long), "prompt"
        return self.tokenizer(request.prompt, return_tensors="pt")["input_ids"].long(), "prompt"

    # ------------------------------------------------------------------ on the worker thread
    def run(self, prepared: PreparedRequest, on_text: Callable[[str], None] | None,
            cancelled: threading.Event) -> Completion:
        """Generate; ``on_text`` gets each settled piece of text (streaming). Raises GenerationCancelled."""
        if cancelled.is_set():  # the client left while the request waited
            raise GenerationCancelled()
        request = prepared.request
        engine = self.engine
        engine.verifier = self.greedy_verifier if request.greedy else self.sampling_verifier
        generator = None
        if not request.greedy and request.seed is not None:
            generator = torch.Generator(device=engine.runner.device).manual_seed(request.seed)
        stream = TextStream(self.tokenizer, request.stop)
        streamer = _Streamer(stream, on_text, cancelled)
        try:
            result = engine.generate(prepared.input_ids, max_new_tokens=prepared.max_tokens,
                                     eos_token_id=self.eos_token_id, stop_strings=request.stop or None,
                                     tokenizer=self.tokenizer if request.stop else None,
                                     do_sample=not request.greedy, temperature=request.temperature or 1.0,
                                     top_p=request.top_p, generator=generator, streamer=streamer)
        except InvalidInputError as exc:  # the engine's own checks: the request's fault, not the server's
            raise ApiError(400, str(exc)) from exc
        rest = stream.finish()
        if rest and on_text is not None:
            on_text(rest)
        new = result.new_tokens[0].tolist()
        if stream.stopped_by_string or (new and new[-1] in self.eos_token_id) or len(new) < prepared.max_tokens:
            finish = "stop"
        else:
            finish = "length"
        return Completion(stream.text, finish, prepared.input_ids.shape[1], len(new), result.stats)


class _Streamer:
    """What ``engine.generate(streamer=...)`` calls after each step: text out, cancellation in."""

    def __init__(self, stream: TextStream, on_text, cancelled: threading.Event):
        self.stream, self.on_text, self.cancelled = stream, on_text, cancelled

    def put(self, tokens: torch.Tensor) -> None:
        if self.cancelled.is_set():
            raise GenerationCancelled()
        delta = self.stream.add(tokens.reshape(-1).tolist())
        if delta and self.on_text is not None:
            self.on_text(delta)

    def end(self) -> None:
        pass
