"""`python -m mocks.load URL`: a closed-loop HTTP/1.1 load generator on trio + h11.

Each of N keep-alive connections sends the same request again as soon as the previous answer is
whole, for a fixed time, reconnecting when the server closes; one JSON line reports the counts and
the rate. httpx costs more per request than the servers it would measure (see PITFALLS.md).
"""

import argparse
import json
import sys
import time
from functools import partial
from urllib.parse import urlsplit

import attrs
import h11
import trio

_RECEIVE_SIZE = 65536
_DEFAULT_BODY = {
    "model": "mock-llm",
    "messages": [{"role": "user", "content": "Say hi."}],
    "temperature": 0,
}


@attrs.frozen
class LoadResult:
    ok: int  # answers with a 2xx status
    failed: int  # other statuses, and exchanges broken by the network
    seconds: float

    @property
    def rate(self) -> float:
        """Successful requests per second."""
        return self.ok / self.seconds


@attrs.define
class _Tally:
    ok: int = 0
    failed: int = 0


async def _exchange(
    stream: trio.SocketStream, conn: h11.Connection, request: h11.Request, body: bytes
) -> int:
    """Send one request on a ready connection and read its answer whole; return the status."""
    out = conn.send(request) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
    await stream.send_all(out)
    status = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(_RECEIVE_SIZE))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.EndOfMessage):
            return status
        elif isinstance(event, h11.ConnectionClosed):
            raise h11.RemoteProtocolError("closed before the answer was whole")


async def _client(
    host: str, port: int, request: h11.Request, body: bytes, deadline: float, tally: _Tally
) -> None:
    while trio.current_time() < deadline:
        conn = h11.Connection(h11.CLIENT)
        try:
            async with await trio.open_tcp_stream(host, port) as stream:
                while trio.current_time() < deadline:
                    status = await _exchange(stream, conn, request, body)
                    if 200 <= status < 300:
                        tally.ok += 1
                    else:
                        tally.failed += 1
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        break  # the server closes this connection: open another
                    conn.start_next_cycle()
        except (OSError, trio.BrokenResourceError, h11.ProtocolError):
            tally.failed += 1


async def run_load(
    url: str, *, body: bytes, connections: int = 64, seconds: float = 5.0
) -> LoadResult:
    """POST `body` to `url` over `connections` connections for `seconds`, as fast as answered."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    headers = [
        ("host", parts.netloc),
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
    ]
    request = h11.Request(method="POST", target=parts.path or "/", headers=headers)
    tally = _Tally()
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        deadline = trio.current_time() + seconds
        for _ in range(connections):
            nursery.start_soon(_client, host, port, request, body, deadline, tally)
    return LoadResult(ok=tally.ok, failed=tally.failed, seconds=time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__package__}.load", description=__doc__)
    parser.add_argument("url", help="e.g. http://127.0.0.1:8001/v1/chat/completions")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--body", default=json.dumps(_DEFAULT_BODY), help="JSON to POST")
    args = parser.parse_args(argv)
    load = partial(run_load, args.url, body=args.body.encode(), connections=args.connections)
    result = trio.run(partial(load, seconds=args.seconds))
    report = {"ok": result.ok, "failed": result.failed, "seconds": round(result.seconds, 3)}
    print(json.dumps({**report, "rate": round(result.rate)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
