"""The `ntonix` command: serve, demo, check-config."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from functools import partial

import trio

from ntonix import __version__
from ntonix.config import (
    BackendSettings,
    Config,
    ConfigError,
    check_config_file,
    config_path,
    load_config,
)
from ntonix.server import serve, serve_workers, wait_for_stop_signal


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    result: int = args.run(args)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ntonix", description="A streaming gateway for LLM servers."
    )
    parser.add_argument("--version", action="version", version=f"ntonix {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve_cmd = commands.add_parser("serve", help="serve the gateway")
    serve_cmd.add_argument("--config", help="config file (default: $NTONIX_CONFIG, ./ntonix.toml)")
    serve_cmd.add_argument(
        "--bind", action="append", metavar="HOST:PORT", help="address to listen on (repeatable)"
    )
    serve_cmd.add_argument("--certfile", help="TLS certificate (PEM); enables HTTPS")
    serve_cmd.add_argument("--keyfile", help="TLS private key (PEM)")
    serve_cmd.add_argument("--workers", type=_positive_int, default=1, help="worker processes")
    serve_cmd.set_defaults(run=_serve)

    demo = commands.add_parser("demo", help="mock backends and a gateway, until Ctrl-C")
    demo.add_argument("--backends", type=_positive_int, default=3, help="mock backends (3)")
    demo.add_argument("--port", type=int, default=8000, help="gateway port (8000)")
    demo.set_defaults(run=_demo)

    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("file")
    check.set_defaults(run=lambda args: check_config_file(args.file, sys.stdout))
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _serve(args: argparse.Namespace) -> int:
    try:
        config_file = config_path(args.config)
        config = load_config(config_file)
    except ConfigError as error:
        sys.stderr.write(error.report())
        return 1
    if bool(args.certfile) != bool(args.keyfile):
        print("ntonix: --certfile and --keyfile go together", file=sys.stderr)
        return 2
    binds = args.bind or ["127.0.0.1:8000"]
    tls = {"certfile": args.certfile, "keyfile": args.keyfile}
    if args.workers > 1:
        return serve_workers(config_file, config, binds, args.workers, **tls)
    try:
        trio.run(partial(serve, config, binds, config_file=config_file, **tls))
    except OSError as error:
        print(
            f"ntonix: cannot serve on {', '.join(binds)}: {error.strerror or error}",
            file=sys.stderr,
        )
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    try:
        trio.run(run_demo, args.backends, args.port)
    except OSError as error:
        print(
            f"ntonix demo: cannot listen on 127.0.0.1:{args.port}: {error.strerror or error}",
            file=sys.stderr,
        )
        return 1
    return 0


async def run_demo(
    backends: int,
    port: int,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mock backends plus a gateway in front of them, in one process, until SIGINT/SIGTERM."""
    from mocks.llm import MockLLM, MockOptions, serve_mock

    async with trio.open_nursery() as mock_nursery:
        mocks = []
        for index in range(1, backends + 1):
            name = f"mock-{index}"
            mock = MockLLM(MockOptions(name=name))
            mock_port = await mock_nursery.start(partial(serve_mock, mock))
            mocks.append(BackendSettings(name=name, url=f"http://127.0.0.1:{mock_port}"))
        stop = trio.Event()
        async with trio.open_nursery() as gateway_nursery:
            serve_gateway = partial(
                serve,
                Config(backends=tuple(mocks)),
                [f"127.0.0.1:{port}"],
                shutdown_trigger=stop.wait,
            )
            gateway_url = (await gateway_nursery.start(serve_gateway))[0]
            print(_demo_instructions(gateway_url, mocks), flush=True)
            task_status.started(gateway_url)
            await wait_for_stop_signal()
            stop.set()  # the gateway drains its streams; the mocks serve them until it is done
        mock_nursery.cancel_scope.cancel()
    print("ntonix demo: stopped", flush=True)


def _demo_instructions(gateway_url: str, mocks: Sequence[BackendSettings]) -> str:
    backends = "\n".join(f"  {mock.name}: {mock.url}" for mock in mocks)
    return f"""NTONIX demo: gateway on {gateway_url} in front of {len(mocks)} mock LLM backends:
{backends}

Try a streaming chat completion:
  curl -N {gateway_url}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "mock-llm", "stream": true,
         "messages": [{{"role": "user", "content": "Hello"}}]}}'

With the OpenAI SDK (pip install openai):
  python -c 'from openai import OpenAI
c = OpenAI(base_url="{gateway_url}/v1", api_key="unused")
for ch in c.chat.completions.create(model="mock-llm", stream=True,
        messages=[{{"role": "user", "content": "Hello"}}]):
    print(ch.choices[0].delta.content or "", end="", flush=True)'

Gateway status: curl {gateway_url}/ntonix/status
Press Ctrl-C to stop."""


if __name__ == "__main__":
    raise SystemExit(main())
