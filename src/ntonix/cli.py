"""The `ntonix` command: serve, demo, check-config, status."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import ssl
import sys
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

import httpx
import trio

from ntonix import __version__
from ntonix.announce import LOG_FORMAT
from ntonix.config import (
    ConfigError,
    check_config_file,
    config_path,
    load_config,
)
from ntonix.demo import run_demo
from ntonix.server import serve, serve_workers
from ntonix.status_table import any_backend_usable, render_status
from ntonix.tls import server_ssl_context


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    # httpx logs every request at INFO: a line per health probe (and per `ntonix status`).
    logging.getLogger("httpx").setLevel(logging.WARNING)
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
    serve_cmd.add_argument(
        "--workers",
        type=_worker_count,
        default=1,
        help="worker processes, or 'auto': one per core this process may use (default 1)",
    )
    serve_cmd.set_defaults(run=_serve)

    demo = commands.add_parser("demo", help="mock backends and a gateway, until Ctrl-C")
    demo.add_argument("--backends", type=_positive_int, default=3, help="mock backends (3)")
    demo.add_argument("--port", type=int, default=8000, help="gateway port (8000)")
    demo.add_argument(
        "--tls", action="store_true", help="HTTPS with a throw-away local CA (needs ntonix[demo])"
    )
    demo.set_defaults(run=_demo)

    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("file")
    check.set_defaults(run=lambda args: check_config_file(args.file, sys.stdout))

    status = commands.add_parser("status", help="a running gateway's backends and cache")
    status.add_argument(
        "--url", default="http://127.0.0.1:8000", help="the gateway (http://127.0.0.1:8000)"
    )
    status.add_argument(
        "--admin-token",
        metavar="TOKEN",
        default=os.environ.get("NTONIX_ADMIN_TOKEN", ""),
        help="[auth] admin_token of the gateway (default: $NTONIX_ADMIN_TOKEN)",
    )
    status.add_argument(
        "--cacert", metavar="FILE", help="CA bundle (PEM) to trust for an https gateway"
    )
    status.add_argument("--json", action="store_true", help="print the JSON as received")
    status.add_argument(
        "--timeout", metavar="S", type=float, default=5.0, help="seconds to wait (5)"
    )
    status.set_defaults(run=_status)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _worker_count(text: str) -> int:
    if text == "auto":
        # The cores this process may run on (a container's CPU set), not the machine's.
        return len(os.sched_getaffinity(0))
    return _positive_int(text)


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
    if args.certfile:
        # Loaded once here so that a bad file is one line now, not a traceback from each worker
        # after start-up; the workers build their own contexts from the same files.
        try:
            server_ssl_context(args.certfile, args.keyfile)
        except OSError as error:  # ssl.SSLError is an OSError too
            print(f"ntonix: cannot use --certfile/--keyfile: {error}", file=sys.stderr)
            return 1
    binds = args.bind or ["127.0.0.1:8000"]
    tls = {"certfile": args.certfile, "keyfile": args.keyfile}
    if args.workers > 1:
        return serve_workers(config_file, config, binds, args.workers, **tls)
    serving = partial(serve, config, binds, config_file=config_file, **tls)
    return _run(serving, f"cannot serve on {', '.join(binds)}")


def _demo(args: argparse.Namespace) -> int:
    if args.tls:
        try:
            importlib.import_module("trustme")
        except ImportError:
            print("ntonix: demo --tls needs trustme: pip install 'ntonix[demo]'", file=sys.stderr)
            return 1
    return _run(
        partial(run_demo, args.backends, args.port, tls=args.tls),
        "demo cannot start",
        port_in_use=f"demo cannot listen on 127.0.0.1:{args.port}: the port is in use; "
        "choose another with --port (e.g. --port 8080)",
    )


def _status(args: argparse.Namespace) -> int:
    """GET /ntonix/status and print it; exit 0 only when some backend can take traffic."""
    verify: ssl.SSLContext | bool = True
    if args.cacert:
        try:
            verify = ssl.create_default_context(cafile=args.cacert)
        except OSError as error:  # ssl.SSLError is an OSError too
            print(f"ntonix: cannot use --cacert {args.cacert}: {error}", file=sys.stderr)
            return 1
    headers = {"authorization": f"Bearer {args.admin_token}"} if args.admin_token else {}
    try:
        response = httpx.get(
            args.url.rstrip("/") + "/ntonix/status",
            headers=headers,
            verify=verify,
            timeout=args.timeout,
        )
    except (httpx.HTTPError, httpx.InvalidURL) as error:
        reason = str(error) or type(error).__name__  # timeouts can come without a message
        print(f"ntonix: cannot reach the gateway at {args.url}: {reason}", file=sys.stderr)
        return 1
    if response.status_code == 401:
        if args.admin_token:
            print("ntonix: the gateway refused the admin token", file=sys.stderr)
        else:
            print(
                "ntonix: the gateway requires its admin token: "
                "give --admin-token or set NTONIX_ADMIN_TOKEN",
                file=sys.stderr,
            )
        return 1
    try:
        status = response.json() if response.status_code == 200 else None
    except ValueError:
        status = None
    if not isinstance(status, dict):
        print(
            f"ntonix: {args.url} answered {response.status_code} without a status: "
            "is it an NTONIX gateway?",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(response.text)
    else:
        colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        sys.stdout.write(render_status(status, colour=colour))
    if not any_backend_usable(status):
        print("ntonix: no backend can take traffic: every circuit is open", file=sys.stderr)
        return 1
    return 0


def _run(
    program: Callable[[], Awaitable[object]], failure: str, *, port_in_use: str | None = None
) -> int:
    """Run a Trio program; an OSError (a port in use, say) is one line, not a traceback.

    `port_in_use`, when given, replaces the line for EADDRINUSE (to name the flag to change).
    """
    errors: list[OSError] = []
    try:
        trio.run(program)
    except* OSError as group:
        errors.extend(_leaves(group))
    if not errors:
        return 0
    if port_in_use and errors[0].errno == errno.EADDRINUSE:
        print(f"ntonix: {port_in_use}", file=sys.stderr)
    else:
        print(f"ntonix: {failure}: {errors[0]}", file=sys.stderr)
    return 1


def _leaves(group: BaseExceptionGroup[OSError]) -> list[OSError]:
    """The errors in a group however deeply nested: each nursery on the way out adds a level."""
    leaves: list[OSError] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            leaves.extend(_leaves(error))
        else:
            leaves.append(error)
    return leaves


if __name__ == "__main__":
    raise SystemExit(main())
