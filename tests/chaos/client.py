"""`python -m tests.chaos.client MODE HOST PORT`: a hostile client, run in its own namespace.

- `slow-reader`: asks for a long stream and reads it one byte a second, with a tiny receive
  buffer;
- `slowloris`: sends a request head one byte a second, never finishing it;
- `half-open`: asks for a long stream and reads it at full speed, until the test takes its link
  down (no FIN ever reaches the gateway).

Prints `started` once the first byte went out, then whatever happens to the connection.
"""

from __future__ import annotations

import json
import socket
import sys
import time

BODY = json.dumps(
    {"model": "mock-llm", "messages": [{"role": "user", "content": "hi"}], "stream": True}
).encode()


def request(tokens: int, delay: float) -> bytes:
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
        f"x-mock-tokens: {tokens}\r\nx-mock-token-delay: {delay}\r\n"
        f"content-length: {len(BODY)}\r\n\r\n"
    )
    return head.encode() + BODY


def main(mode: str, host: str, port: int) -> None:
    sock = socket.socket()
    if mode == "slow-reader":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    try:
        if mode == "slowloris":
            data = request(8, 0)
            print("started", flush=True)
            for byte in data[:-1]:  # never the last byte
                sock.send(bytes([byte]))
                time.sleep(1.0)
        elif mode == "slow-reader":
            sock.sendall(request(100_000, 0))
            print("started", flush=True)
            while sock.recv(1):
                time.sleep(1.0)
        else:
            sock.sendall(request(100_000, 0.01))
            print("started", flush=True)
            while sock.recv(65536):
                pass
        print("closed by the gateway", flush=True)
    except OSError as error:
        print(f"connection error: {error}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
