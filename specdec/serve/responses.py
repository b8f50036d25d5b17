"""OpenAI's response shapes: whole responses, streamed chunks, and server-sent-event framing.

``/v1/completions`` answers ``text_completion`` objects, ``/v1/chat/completions`` ``chat.completion`` objects; a
stream sends ``data: {chunk}`` events (chat: a first chunk with the assistant role, then content deltas) and a last
chunk with ``finish_reason``, then, when ``stream_options.include_usage`` is set, a chunk with empty ``choices`` and
the ``usage`` block, and finally ``data: [DONE]``. Our ``spec`` block (tau, draft forwards, acceptance by depth)
rides beside ``usage`` in the whole response and on the finishing chunk; OpenAI's clients keep unknown fields.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from specdec.serve.generation import Completion

DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


@dataclass
class ResponseShape:
    """Ids and fields shared by every object of one response."""

    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def _head(self, object_: str) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def whole(self, c: Completion) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                      "finish_reason": c.finish_reason}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": usage(c), "spec": c.spec()}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def finishing_chunk(self, c: Completion) -> dict:
        return {**self.chunk(finish_reason=c.finish_reason), "spec": c.spec()}

    def usage_chunk(self, c: Completion) -> dict:
        head = self._head("chat.completion.chunk" if self.chat else "text_completion")
        return {**head, "choices": [], "usage": usage(c), "spec": c.spec()}
