"""Gateway errors and their OpenAI-shaped JSON bodies.

Every error a client can see is a `GatewayError`: it knows its HTTP status, a machine-readable
`code` and a human message, and renders itself as `{"error": {"message", "type", "code"}}`.
"""

from __future__ import annotations

import json
from typing import Literal

Source = Literal["client", "upstream", "gateway"]

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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.source = source
        self.retry_after = retry_after

    @property
    def type(self) -> str:
        return _TYPE_BY_STATUS.get(self.status, "server_error")

    def payload(self) -> dict[str, dict[str, str]]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}

    def body(self) -> bytes:
        return json.dumps(self.payload()).encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        if self.retry_after is not None:
            headers.append((b"retry-after", str(max(1, round(self.retry_after))).encode()))
        return headers

    def __repr__(self) -> str:
        return f"GatewayError({self.status}, {self.code!r}, {self.message!r})"


def client_error(status: int, code: str, message: str) -> GatewayError:
    return GatewayError(status, code, message, source="client")


def upstream_error(status: int, code: str, message: str) -> GatewayError:
    return GatewayError(status, code, message, source="upstream")
