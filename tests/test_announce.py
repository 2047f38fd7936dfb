"""What the gateway says in its log: its setup at start, every circuit change, failures in
plain words (never the text of Python's exception groups), seen from a real `ntonix serve`."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import attrs
import httpx
import trio

from mocks.llm import MockLLM, MockOptions, serve_mock
from ntonix.announce import start_lines
from ntonix.config import Config, SharedSettings
from tests.conftest import StartGateway
from tests.support import PYTHON, RUNNING_ON, SERVE, Spawn, chat, closed_port_url

FAST_HEALTH = (
    "[health]\ninterval = 0.2\ntimeout = 0.5\nfailure_threshold = 3\nopen_for = 0.5\n"
    "max_open_for = 2.0\n"
)


async def test_the_setup_is_logged_at_start(tmp_path: Path, spawn: Spawn) -> None:
    config = tmp_path / "ntonix.toml"
    config.write_text(
        '[balancer]\nstrategy = "power-of-two"\n[cache]\nmax_entries = 50\nmax_bytes = 1048576\n'
        f'[log]\naccess_log = "{tmp_path / "access.log"}"\n'
        '[[backends]]\nname = "gpu-a"\nurl = "http://10.0.0.11:8000"\nmodels = ["m1", "m2"]\n'
        "weight = 3\nmax_concurrent = 64\n"
        '[[backends]]\nname = "gpu-b"\nurl = "http://10.0.0.12:11434/ollama"\n'
    )
    gateway = await spawn(*SERVE, "--config", str(config))
    url = (await gateway.wait_for(RUNNING_ON)).group(1).decode()
    lines = _messages(gateway.output, "ntonix")
    assert lines == [
        f"config: read from {config}",
        "backend gpu-a: http://10.0.0.11:8000, models m1, m2, weight 3, max_concurrent 64",
        "backend gpu-b: http://10.0.0.12:11434/ollama, models any, weight 1, "
        "max_concurrent unlimited",
        "balancer: power-of-two",
        "cache: on, up to 50 entries and 1 MiB, ttl 600 s, scope key, deterministic requests only",
        f"access log: {tmp_path / 'access.log'}",
    ]
    assert _messages(gateway.output, "ntonix.server") == [f"Running on {url} (CTRL + C to quit)"]


async def test_the_plain_hypercorn_command_logs_the_setup_too(tmp_path: Path, spawn: Spawn) -> None:
    config = tmp_path / "ntonix.toml"
    config.write_text(
        '[cache]\nenabled = false\n[[backends]]\nname = "m"\nurl = "http://10.0.0.9"\n'
    )
    gateway = await spawn(
        PYTHON, "-m", "hypercorn", "--worker-class", "trio", "--bind", "127.0.0.1:0",
        "ntonix:app", env={"NTONIX_CONFIG": str(config)},
    )  # fmt: skip
    await gateway.wait_for(RUNNING_ON)
    assert _messages(gateway.output, "ntonix") == [
        f"config: read from {config}",
        "backend m: http://10.0.0.9, models any, weight 1, max_concurrent unlimited",
        "balancer: least-loaded",  # the default
        "cache: off",
        "access log: stderr",
    ]


async def test_without_a_config_file_the_log_says_the_built_in_default_is_used(
    tmp_path: Path, spawn: Spawn
) -> None:
    gateway = await spawn(
        PYTHON, "-m", "ntonix.cli", "serve", "--bind", "127.0.0.1:0",
        cwd=tmp_path, env={"NTONIX_CONFIG": ""},
    )  # fmt: skip
    await gateway.wait_for(RUNNING_ON)
    assert _messages(gateway.output, "ntonix")[:2] == [
        "config: no file found (no --config, $NTONIX_CONFIG unset, no ./ntonix.toml): "
        "the built-in default, a local Ollama at 127.0.0.1:11434",
        "backend 127.0.0.1:11434: http://127.0.0.1:11434, models any, weight 1, "
        "max_concurrent unlimited",
    ]
    assert "cache: on" in _messages(gateway.output, "ntonix")[3]


def test_the_shared_tier_is_one_line_that_never_shows_a_password() -> None:
    remote = Config.from_toml(
        '[shared]\nurl = "valkey://ntonix:s3cret@valkey.internal:6380/2"\ntimeout = 0.1\n'
        '[[backends]]\nname = "m"\nurl = "http://10.0.0.9"\n'
    )
    lines = start_lines(remote, "ntonix.toml")
    assert lines[-2] == (
        "shared tier: valkey://ntonix@valkey.internal:6380/2 (remote), timeout 100 ms, lease 10 s"
    )
    assert not any("s3cret" in line for line in lines)
    embedded = attrs.evolve(remote, shared=SharedSettings(url="embedded"))
    assert start_lines(embedded, "ntonix.toml")[-2] == (
        "shared tier: embedded valkey-server (private to this ntonix serve: unix socket, "
        "no persistence, up to 256 MiB, allkeys-lru), timeout 50 ms, lease 10 s"
    )
    assert not any("shared tier" in line for line in start_lines(Config.default(), None))


async def test_every_circuit_change_is_one_line_with_its_reason_in_plain_words(
    tmp_path: Path, spawn: Spawn, nursery: trio.Nursery
) -> None:
    backend_url = closed_port_url()
    address = backend_url.removeprefix("http://")
    config = tmp_path / "ntonix.toml"
    config.write_text(f'{FAST_HEALTH}[[backends]]\nname = "m"\nurl = "{backend_url}"\n')
    gateway = await spawn(*SERVE, "--config", str(config))
    url = (await gateway.wait_for(RUNNING_ON)).group(1).decode()
    refused = f"health probe failed: connection refused by {address}"
    await gateway.wait_for(rb"circuit half-open -> open")
    async with httpx.AsyncClient() as client:
        status = (await client.get(f"{url}/ntonix/status")).json()
        assert status["backends"][0]["last_error"] == refused
        port = int(address.rsplit(":", 1)[1])
        await nursery.start(partial(serve_mock, MockLLM(MockOptions(name="m")), port=port))
        await gateway.wait_for(rb"circuit half-open -> closed")
    changes = [m for m in _messages(gateway.output, "ntonix") if m.startswith("backend m: circuit")]
    assert changes[:3] == [
        f"backend m: circuit closed -> open: 3 failures in a row, the last: {refused}; "
        "open for 0.5 s",
        "backend m: circuit open -> half-open: open for 0.5 s; a health probe is the trial",
        f"backend m: circuit half-open -> open: the trial failed: {refused}; open for 1 s",
    ]
    # Then, while the mock starts, perhaps more failed trials; at last one that succeeds.
    moves = [change.split(": ")[1] for change in changes[3:]]
    retries = (len(moves) - 2) // 2
    back = ["circuit open -> half-open", "circuit half-open -> open"] * retries
    assert moves == [*back, "circuit open -> half-open", "circuit half-open -> closed"]
    assert (
        changes[-1]
        == "backend m: circuit half-open -> closed: the trial (a health probe) succeeded"
    )
    assert b"WARNING ntonix: backend m: circuit closed -> open" in gateway.output
    assert b"sub-exception" not in gateway.output


async def test_a_client_reads_a_refused_connection_in_plain_words(
    start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    backend_url = closed_port_url()
    gateway = await start_gateway(backend_url, retries=0)
    for path in ("/v1/chat/completions", "/api/chat"):
        response = await client.post(f"{gateway}{path}", json=chat(stream=False))
        assert response.status_code == 502
        assert response.text.count("connection refused by") == 1
        assert f"failed while connecting: connection refused by {backend_url[7:]}" in response.text


def _messages(output: bytes, logger: str) -> list[str]:
    """The messages `logger` (exactly that one) logged, in order."""
    pattern = rb"^\S+ \S+ \w+ " + re.escape(logger.encode()) + rb": (.*)$"
    return [m.decode() for m in re.findall(pattern, output, re.MULTILINE)]
