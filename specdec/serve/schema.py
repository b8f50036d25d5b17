"""Request bodies of ``/v1/completions`` and ``/v1/chat/completions``, checked field by field.

Follows OpenAI's API reference for the fields we serve: ``model``, ``prompt`` / ``messages``, ``max_tokens``
(chat: also ``max_completion_tokens``), ``temperature`` (0 = greedy), ``top_p``, ``stop``, ``seed``, ``stream``,
``stream_options.include_usage``, ``n`` (1 only). Unknown fields are ignored, as OpenAI's clients send extras; fields
we cannot honour (``n`` > 1, ``echo``, ``logprobs``, ``best_of`` > 1) are refused rather than silently dropped.
A missing field or a wrong type is a 422, a value out of range a 400; the message names the field. Limits that need
the tokenizer (prompt and ``max_tokens`` against the context) are checked in :mod:`specdec.serve.generation`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specdec.serve.errors import ApiError

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 4  # OpenAI's limit on stop sequences


@dataclass(frozen=True)
class GenerationRequest:
    chat: bool  # /v1/chat/completions (messages through the chat template) or /v1/completions (raw prompt)
    model: str
    prompt: str | list[int] | None = None  # completions: text or token ids
    messages: list[dict] = field(default_factory=list)  # chat: [{"role", "content": str}]
    max_tokens: int | None = None  # None: the server's default, within the context
    temperature: float = 1.0  # OpenAI's default; 0 decodes greedily
    top_p: float | None = None  # None: off
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage block

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def parse_request(body: object, chat: bool) -> GenerationRequest:
    """A checked request from a decoded JSON body; :class:`ApiError` names the first field at fault."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = _required(body, "model", str, "a string")
    if chat:
        messages, prompt = _messages(body), None
        max_tokens = _optional_int(body, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _optional_int(body, "max_tokens")
        elif body.get("max_tokens") is not None:
            raise ApiError(400, "give max_tokens or max_completion_tokens, not both", "max_tokens")
        param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    else:
        messages, prompt = [], _prompt(body)
        max_tokens, param = _optional_int(body, "max_tokens"), "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"{param} must be at least 1, got {max_tokens}", param)
    temperature = _optional_number(body, "temperature")
    temperature = 1.0 if temperature is None else temperature
    if not 0 <= temperature <= 2:
        raise ApiError(400, f"temperature must be between 0 and 2 (0 decodes greedily), got {temperature}",
                       "temperature")
    top_p = _optional_number(body, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
    seed = _optional_int(body, "seed")
    stream = _optional(body, "stream", bool, "a boolean") or False
    options = _optional(body, "stream_options", dict, "an object") or {}
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(422, "stream_options.include_usage must be a boolean", "stream_options")
    _refuse_unsupported(body, chat)
    return GenerationRequest(chat, model, prompt, messages, max_tokens, float(temperature), top_p, _stop(body), seed,
                             stream, include_usage)


def _required(body: dict, name: str, kind, words: str):
    if body.get(name) is None:
        raise ApiError(422, f"missing required field {name!r} ({words})", name, "missing_field")
    return _optional(body, name, kind, words)


def _optional(body: dict, name: str, kind, words: str):
    value = body.get(name)
    if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
        raise ApiError(422, f"{name} must be {words}, got {type(value).__name__} {_short(value)}", name, "invalid_type")
    return value


def _optional_int(body: dict, name: str) -> int | None:
    return _optional(body, name, int, "an integer")


def _optional_number(body: dict, name: str) -> float | None:
    value = _optional(body, name, (int, float), "a number")
    return None if value is None else float(value)


def _prompt(body: dict) -> str | list[int]:
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(422, "missing required field 'prompt' (a string or a list of token ids)", "prompt",
                       "missing_field")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "prompt is empty", "prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError(400, f"one prompt per request (got a batch of {len(prompt)}): requests are not batched yet",
                       "prompt")
    raise ApiError(422, f"prompt must be a non-empty string or a list of token ids, got {_short(prompt)}", "prompt",
                   "invalid_type")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise ApiError(422, "missing required field 'messages' (a list of {role, content} objects)", "messages",
                       "missing_field")
    if not isinstance(messages, list) or not messages:
        raise ApiError(422, f"messages must be a non-empty list of {{role, content}} objects, got {_short(messages)}",
                       "messages", "invalid_type")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(422, f"{where} must be an object with role and content, got {_short(message)}", where,
                           "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(422, f"{where}.role must be one of {', '.join(ROLES)}, got {_short(role)}",
                           f"{where}.role", "invalid_value")
        out.append({"role": role, "content": _content(message.get("content"), f"{where}.content")})
    return out


def _content(content, where: str) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(422, f"{where} must be a string or a list of text parts ({{\"type\": \"text\", \"text\": ...}}), "
                        f"got {_short(content)}", where, "invalid_type")


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(422, f"stop must be a string or a list of strings, got {_short(stop)}", "stop", "invalid_type")
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise ApiError(400, f"stop takes up to {MAX_STOP} non-empty strings, got {_short(stop)}", "stop")
    return list(stops)


def _refuse_unsupported(body: dict, chat: bool) -> None:
    n = _optional_int(body, "n")
    if n is not None and n != 1:
        raise ApiError(400, f"n must be 1 (one choice per request), got {n}", "n")
    best_of = _optional_int(body, "best_of")
    if best_of is not None and best_of != 1:
        raise ApiError(400, f"best_of must be 1, got {best_of}", "best_of")
    for name in ("echo", "logprobs"):
        if body.get(name) not in (None, False) and not (name == "logprobs" and not chat and body[name] == 0):
            raise ApiError(400, f"{name} is not supported by this server", name, "unsupported")


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
