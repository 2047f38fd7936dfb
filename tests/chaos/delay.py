"""`python -m tests.chaos.delay --host H --port P --to PORT --delay S --jitter S`: latency.

A TCP relay from H:P to H:PORT that holds every chunk, each way, for `delay` plus or
minus up to `jitter` seconds (uniformly), in order. The chaos tests run it inside a node's
namespace, in front of the mock, where `tc netem` is missing: this machine's kernel has no
sch_netem. Unlike netem it delays chunks, not packets, and drops nothing.

Prints `delay listening on http://H:P` once bound; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import random
import signal
from functools import partial

import trio


async def _pump(
    source: trio.SocketStream, sink: trio.SocketStream, delay: float, jitter: float
) -> None:
    send, receive = trio.open_memory_channel[tuple[float, bytes]](float("inf"))

    async def hold() -> None:
        async for due, data in receive:
            await trio.sleep_until(due)
            await sink.send_all(data)
        await sink.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold)
        last = 0.0
        async with send:
            while data := await source.receive_some(65536):
                # In order: a chunk never overtakes the one before it.
                last = max(last, trio.current_time() + delay + random.uniform(-jitter, jitter))
                await send.send((last, data))


async def relay(
    host: str, target: int, delay: float, jitter: float, client: trio.SocketStream
) -> None:
    # One connection's end (a peer that resets or gives up, such as the gateway's load reader
    # past its timeout) must not take the relay and every other connection down with it; the
    # nursery reports it inside an exception group, hence except*.
    try:
        upstream = await trio.open_tcp_stream(host, target)
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(_pump, client, upstream, delay, jitter)
            nursery.start_soon(_pump, upstream, client, delay, jitter)
    except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def main(args: argparse.Namespace) -> None:
    handler = partial(relay, args.host, args.to, args.delay, args.jitter)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(trio.serve_tcp, handler, args.port, host=args.host))
            print(f"delay listening on http://{args.host}:{args.port}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.delay")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--to", type=int, required=True, help="the port on the same host")
    parser.add_argument("--delay", type=float, required=True, help="seconds, each way")
    parser.add_argument("--jitter", type=float, default=0.0, help="seconds, each way")
    trio.run(main, parser.parse_args())
