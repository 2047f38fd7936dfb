"""Gateway errors and their JSON bodies, in the dialect of the client's API.

Every error a client can see is a `GatewayError`: it knows its HTTP status, a machine-readable
`code` and a human message. It renders itself as OpenAI does, `{"error": {"message", "type",
"code"}}`, except on Ollama's routes (`/api/`), where it is Ollama's `{"error": "message"}`
(Ollama's clients show that string; an object would reach the user as its repr). The status
is the same in both.
"""

from __future__ import annotations

import enum
import json
from typing import Literal

Source = Literal["client", "upstream", "gateway"]


class Dialect(enum.Enum):
    OPENAI = "openai"
    OLLAMA = "ollama"


def dialect_of(path: str) -> Dialect:
    """Ollama's API lives under /api/; every other route speaks OpenAI's error shape."""
    return Dialect.OLLAMA if path.startswith("/api/") else Dialect.OPENAI


_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
}


class GatewayError(Exception):
    """An error answered to the client; `source` says whose fault it is."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        source: Source,
        retry_after: float | None = None,
        allow: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.source = source
        self.retry_after = retry_after
        self.allow = allow  # a 405's methods, for its Allow header

    @property
    def type(self) -> str:
        return _TYPE_BY_STATUS.get(self.status, "server_error")

    def payload(self, dialect: Dialect = Dialect.OPENAI) -> dict[str, object]:
        if dialect is Dialect.OLLAMA:
            return {"error": self.message}
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}

    def body(self, dialect: Dialect = Dialect.OPENAI) -> bytes:
        return json.dumps(self.payload(dialect)).encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        if self.retry_after is not None:
            headers.append((b"retry-after", str(max(1, round(self.retry_after))).encode()))
        if self.allow:
            headers.append((b"allow", ", ".join(self.allow).encode()))
        return headers

    def __repr__(self) -> str:
        return f"GatewayError({self.status}, {self.code!r}, {self.message!r})"


def client_error(status: int, code: str, message: str) -> GatewayError:
    return GatewayError(status, code, message, source="client")


def upstream_error(status: int, code: str, message: str) -> GatewayError:
    return GatewayError(status, code, message, source="upstream")
