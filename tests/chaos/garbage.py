"""`python -m tests.chaos.garbage --host H --port P`: a backend that answers with garbage.

Health probes (`GET /v1/models`) get a proper listing of model `garbage`; a generation request
gets what its `x-garbage` header asks for:

- `status-line`: an invalid status line;
- `huge-header`: a 100 KB header;
- `broken-chunked`: a 200 event stream whose second chunk has a size that is not hex;
- `endless`: a 200 event stream with one event, then silence, the connection held open.

Prints `garbage listening on http://H:P` once bound; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
from contextlib import suppress
from functools import partial

import trio

EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)
ANSWERS = {
    b"status-line": b"HTTP/1.1 two hundred OK\r\n\r\n",
    b"huge-header": b"HTTP/1.1 200 OK\r\nx-huge: " + b"a" * 100_000 + b"\r\n\r\n",
    b"broken-chunked": STREAM_HEAD + b"%x\r\n%s\r\nzz\r\nnot a chunk\r\n" % (len(EVENT), EVENT),
    b"endless": STREAM_HEAD + b"%x\r\n%s\r\n" % (len(EVENT), EVENT),
}


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    head = b""
    while b"\r\n\r\n" not in head:
        data = await stream.receive_some(65536)
        if not data:
            return None
        head += data
    return head


async def handle(stream: trio.SocketStream) -> None:
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        async with stream:
            while (head := await _read_head(stream)) is not None:
                lines = head.split(b"\r\n\r\n")[0].split(b"\r\n")
                fields = dict(line.lower().split(b": ", 1) for line in lines[1:] if b": " in line)
                mode = fields.get(b"x-garbage")
                if mode is None:  # a probe, or the body of a request
                    if lines[0].startswith(b"GET "):
                        body = json.dumps({"object": "list", "data": [{"id": "garbage"}]})
                        await stream.send_all(
                            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                            b"content-length: %d\r\n\r\n%s" % (len(body), body.encode())
                        )
                    continue
                await stream.send_all(ANSWERS[mode])
                if mode == b"endless":
                    await trio.sleep_forever()
                return


async def main(host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(trio.serve_tcp, handle, port, host=host))
            print(f"garbage listening on http://{host}:{port}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.garbage")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    trio.run(main, args.host, args.port)
