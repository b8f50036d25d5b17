"""The server's errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status.

Statuses (docs/serve.md): 400 a value out of range or a body that is not JSON, 404 an unknown model or route, 413 a
body over the size limit, 422 a missing field or a field of the wrong type, 429 a full queue (with Retry-After).
"""

from __future__ import annotations

from dataclasses import dataclass

TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
         422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


@dataclass
class ApiError(Exception):
    status: int  # HTTP status
    message: str  # names the field and what it must be
    param: str | None = None  # the request field at fault (OpenAI's "param")
    code: str | None = None  # a short machine-readable reason, e.g. "model_not_found"

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}
