"""`python -m mocks.llm`: one mock LLM backend (SPEC section 5), and the in-process API.

Prints exactly one line, `mock NAME listening on http://HOST:PORT`, once the port is bound (so a
parent process can pass `--port 0` and read the port), and exits 0 on SIGINT or SIGTERM.
"""

import argparse
import signal
import sys
from functools import partial

import trio

from .backend import MockLLM, MockStats
from .engines import FLAVOURS
from .options import MockOptions
from .serve import serve_mock

__all__ = ["MockLLM", "MockOptions", "MockStats", "main", "serve_mock"]


def _parser() -> argparse.ArgumentParser:
    defaults = MockOptions()
    parser = argparse.ArgumentParser(prog=f"python -m {__package__}.llm", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--tokens", type=int, default=defaults.tokens)
    parser.add_argument("--token-delay", type=float, default=defaults.token_delay, help="seconds")
    parser.add_argument("--ttft", type=float, default=defaults.ttft, help="seconds")
    parser.add_argument("--models", default=",".join(defaults.models), help="comma-separated")
    parser.add_argument("--fail-rate", type=float, default=defaults.fail_rate)
    parser.add_argument("--name", default=defaults.name)
    parser.add_argument(
        "--slots",
        type=int,
        default=0,
        help="at most N generate at once, the rest wait (0: no limit)",
    )
    parser.add_argument(
        "--engine",
        choices=FLAVOURS,
        help="serve load signals as this engine does (/metrics, /slots or /api/ps)",
    )
    parser.add_argument(
        "--loaded", help="comma-separated models in memory at start (default: all of --models)"
    )
    parser.add_argument(
        "--load-time", type=float, default=0.0, help="seconds to load a model not in memory"
    )
    parser.add_argument(
        "--lean", action="store_true", help="serve with trio + h11 instead of Hypercorn"
    )
    return parser


async def _run(mock: MockLLM, host: str, port: int, lean: bool) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(partial(serve_mock, mock, host=host, port=port, lean=lean))
            print(f"mock {mock.options.name} listening on http://{host}:{bound}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        options = MockOptions(
            tokens=args.tokens,
            token_delay=args.token_delay,
            ttft=args.ttft,
            models=tuple(model for model in args.models.split(",") if model),
            fail_rate=args.fail_rate,
            name=args.name,
            slots=args.slots,
            engine=args.engine or "",
            loaded=None
            if args.loaded is None
            else tuple(model for model in args.loaded.split(",") if model),
            load_time=args.load_time,
        )
    except ValueError as error:
        print(f"{__package__}.llm: {error}", file=sys.stderr)
        return 2
    trio.run(_run, MockLLM(options), args.host, args.port, args.lean)
    return 0


if __name__ == "__main__":
    sys.exit(main())
