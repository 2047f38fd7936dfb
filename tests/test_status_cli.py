"""`ntonix status` as an operator runs it: a child process against a real gateway; and the
Grafana dashboard and alert rules, checked against what a real gateway's /metrics serves."""

from __future__ import annotations

import json
import os
import re
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
import trustme

from ntonix.config import AuthSettings, CacheSettings, HealthSettings
from ntonix.server import serve
from tests.conftest import StartGatewayWith, StartMock
from tests.support import (
    FAST_HEALTH,
    PYTHON,
    REPO_ROOT,
    RawClient,
    backend,
    chat,
    closed_port_url,
    gateway_config,
    wait_for_backend,
    wait_until,
)

DASHBOARD = REPO_ROOT / "docs" / "grafana-dashboard.json"
# Probes that find a dead backend within a few tenths of a second, whose circuit then stays
# open for the rest of the test: a half-open moment would change what the command prints.
EJECT_AND_HOLD = HealthSettings(
    interval=0.1, timeout=0.5, failure_threshold=2, open_for=60, max_open_for=60
)
OPERATIONS = REPO_ROOT / "docs" / "operations.md"


@attrs.frozen
class Run:
    code: int
    out: str
    err: str

    def row(self, backend_name: str) -> list[str]:
        """The table row of a backend, split on runs of spaces."""
        for line in self.out.splitlines():
            if line.startswith(backend_name + " "):
                return re.split(r"\s{2,}", line)
        raise AssertionError(f"no row for {backend_name} in:\n{self.out}")


async def ntonix_status(*args: str, env: dict[str, str] | None = None) -> Run:
    """Run `ntonix status ARGS` in a child process; the gateway keeps serving meanwhile."""
    environment = {k: v for k, v in os.environ.items() if k != "NTONIX_ADMIN_TOKEN"}
    with trio.fail_after(30):
        done = await trio.run_process(
            [PYTHON, "-m", "ntonix.cli", "status", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=REPO_ROOT,
            env={**environment, **(env or {})},
        )
    return Run(done.returncode, done.stdout.decode(), done.stderr.decode())


async def test_status_shows_each_backend_its_state_and_the_cache_and_exits_0(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    a, b = await start_mock(name="a"), await start_mock(name="b")
    config = attrs.evolve(
        gateway_config(
            backend(a.url, "gpu-a"),
            backend(b.url, "gpu-b"),
            backend(closed_port_url(), "down"),
            health=EJECT_AND_HOLD,
        ),
        cache=CacheSettings(),
    )
    gateway = await start_gateway_with(config)
    await wait_for_backend(client, gateway, "down", lambda r: r["state"] == "open")
    for _ in range(2):  # a miss, then a hit
        response = await client.post(f"{gateway}/v1/chat/completions", json=chat("same"))
        assert response.status_code == 200

    run = await ntonix_status("--url", gateway)

    assert run.code == 0, run
    assert run.err == ""
    assert run.out.splitlines()[0].split()[:2] == ["BACKEND", "STATE"]
    assert run.row("gpu-a")[1] == "closed"
    assert run.row("gpu-b")[1] == "closed"
    down = run.row("down")
    assert down[1] == "open"
    assert down[-2] != "-"  # the last error
    assert down[-1].startswith("circuit open for")
    assert "workers: 1  strategy: least-connections  queued: 0" in run.out
    assert "1 hits, 1 misses, 0 coalesced, hit ratio 50.0%, backend requests saved 1" in run.out
    assert "\x1b[" not in run.out  # stdout is a pipe: no colour


async def test_status_shows_what_each_engine_says_about_its_load(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    busy = await start_mock(name="busy", slots=1, engine="vllm")
    plain = await start_mock(name="plain")
    quick = attrs.evolve(EJECT_AND_HOLD, load_interval=0.05, load_timeout=0.5)
    gateway = await start_gateway_with(
        gateway_config(
            backend(busy.url, "busy"), backend(plain.url, "plain"),
            strategy="least-loaded", health=quick,
        )
    )  # fmt: skip
    long = {"x-mock-tokens": "8", "x-mock-token-delay": "1"}
    async with trio.open_nursery() as direct:
        for index in range(2):  # straight to the engine: one generates, one waits
            body = chat(f"direct{index}", stream=False)
            url = f"{busy.url}/v1/chat/completions"
            direct.start_soon(partial(client.post, url, json=body, headers=long))
        await wait_until(lambda: busy.stats["running"] == 1 and busy.stats["waiting"] == 1)
        await wait_for_backend(
            client,
            gateway,
            "busy",
            lambda r: (r["load"]["reading"] or {}).get("waiting") == 1,
        )
        await wait_for_backend(client, gateway, "plain", lambda r: r["load"]["engine"] == "none")

        run = await ntonix_status("--url", gateway)
        direct.cancel_scope.cancel()

    assert run.code == 0, run
    header, *rows = run.out.split("\n\n")[1].splitlines()
    assert re.split(r"\s{2,}", header) == [
        "BACKEND", "ENGINE", "WAITING", "RUNNING", "KV USE", "LOADED MODELS", "READ AGO",
        "TTFB MS", "SCORE",
    ]  # fmt: skip
    busy_row, plain_row = (re.split(r"\s{2,}", row) for row in rows)
    # vLLM's own count: one generating, one waiting (the direct client's, not the gateway's),
    # its one-slot KV cache full; read 0.05 s ago at most, give or take the machine.
    assert busy_row[:6] == ["busy", "vllm", "1", "1", "100.0%", "mock-llm"]
    assert busy_row[6].endswith("s") and float(busy_row[6][:-1]) < 1
    # Two requests on one slot: one more would be the second queued (2 x 1), plus a full
    # house (1) and a full cache (0.5).
    assert busy_row[8] == "3.50"
    assert plain_row[:7] == ["plain", "none", "-", "-", "-", "-", "-"]
    assert plain_row[8] == "1.00"  # no signal: one request of its own would be its load


async def test_all_backends_open_still_prints_the_table_and_exits_1(
    start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    gateway = await start_gateway_with(
        gateway_config(backend(closed_port_url(), "only"), health=EJECT_AND_HOLD)
    )
    await wait_for_backend(client, gateway, "only", lambda r: r["state"] == "open")

    run = await ntonix_status("--url", gateway)

    assert run.code == 1
    assert run.row("only")[1] == "open"
    assert "cache: off" in run.out
    assert run.err == "ntonix: no backend can take traffic: every circuit is open\n"


async def test_admin_token_from_the_flag_or_the_environment(
    start_mock: StartMock, start_gateway_with: StartGatewayWith
) -> None:
    mock = await start_mock()
    config = attrs.evolve(
        gateway_config(backend(mock.url, "m")), auth=AuthSettings(admin_token="s3cret")
    )
    gateway = await start_gateway_with(config)

    missing = await ntonix_status("--url", gateway)
    assert (missing.code, missing.out) == (1, "")
    assert missing.err == (
        "ntonix: the gateway requires its admin token: give --admin-token or set "
        "NTONIX_ADMIN_TOKEN\n"
    )
    wrong = await ntonix_status("--url", gateway, "--admin-token", "guess")
    assert (wrong.code, wrong.out, wrong.err) == (
        1,
        "",
        "ntonix: the gateway refused the admin token\n",
    )
    for run in [
        await ntonix_status("--url", gateway, "--admin-token", "s3cret"),
        await ntonix_status("--url", gateway, env={"NTONIX_ADMIN_TOKEN": "s3cret"}),
    ]:
        assert run.code == 0, run
        assert run.row("m")[1] == "closed"
        assert "s3cret" not in run.out + run.err


async def test_json_prints_what_the_gateway_answered(
    start_mock: StartMock, start_gateway_with: StartGatewayWith
) -> None:
    mock = await start_mock()
    gateway = await start_gateway_with(gateway_config(backend(mock.url, "m")))

    run = await ntonix_status("--url", gateway + "/", "--json")

    assert run.code == 0, run
    status: dict[str, Any] = json.loads(run.out)
    assert [b["name"] for b in status["backends"]] == ["m"]
    assert status["cache"] is None
    assert {"version", "uptime_seconds", "strategy", "queued"} <= status.keys()


async def test_an_unreachable_gateway_is_one_line_and_exit_1() -> None:
    url = closed_port_url()

    run = await ntonix_status("--url", url, "--timeout", "2")

    assert (run.code, run.out) == (1, "")
    assert run.err.startswith(f"ntonix: cannot reach the gateway at {url}: ")
    assert run.err.count("\n") == 1
    assert "Traceback" not in run.err


async def test_a_gateway_with_a_private_ca_is_read_with_cacert(
    start_mock: StartMock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    certfile, keyfile, cafile = (tmp_path / n for n in ("server.pem", "server.key", "ca.pem"))
    server.cert_chain_pems[0].write_to_path(certfile)
    server.private_key_pem.write_to_path(keyfile)
    ca.cert_pem.write_to_path(cafile)
    mock = await start_mock()
    run_gateway = partial(
        serve,
        gateway_config(backend(mock.url, "m")),
        ["127.0.0.1:0"],
        certfile=str(certfile),
        keyfile=str(keyfile),
        shutdown_trigger=trio.sleep_forever,
    )
    gateway = (await nursery.start(run_gateway))[0]
    assert gateway.startswith("https://")

    untrusted = await ntonix_status("--url", gateway)
    assert untrusted.code == 1
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.err
    trusted = await ntonix_status("--url", gateway, "--cacert", str(cafile))
    assert trusted.code == 0, trusted
    assert trusted.row("m")[1] == "closed"


# --- The dashboard and the alert rules name only metrics the gateway serves ----------------

_METRIC = re.compile(r"\bntonix_[a-z0-9_]+")
ENGINE_LOAD_METRICS = {
    "ntonix_backend_engine_waiting",
    "ntonix_backend_engine_running",
    "ntonix_backend_engine_kv_usage",
    "ntonix_backend_load_score",
    "ntonix_backend_load_signal_age_seconds",
    "ntonix_backend_ttfb_ewma_seconds",
}
# A histogram `x` is queried through its samples `x_bucket`, `x_sum` and `x_count`.
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def served_metric_names(exposition: str) -> set[str]:
    """Every series name a query can use, declared families included even before a sample."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()
            names.add(family)
            if kind == "histogram":
                names.update(family + suffix for suffix in _HISTOGRAM_SUFFIXES)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def dashboard_exprs() -> list[str]:
    """The panels' queries and the template variables' (`label_values(...)`)."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    return panels + [v["query"]["query"] for v in dashboard["templating"]["list"]]


def alert_rule_exprs() -> list[str]:
    """The `expr:` lines of the alert rules in docs/operations.md (one line each there)."""
    return re.findall(r"^\s*expr: (.+)$", OPERATIONS.read_text(), flags=re.MULTILINE)


def test_the_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["schemaVersion"] >= 39
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert panel["targets"], panel["title"]
    assert len(dashboard_exprs()) >= 15


async def test_every_metric_in_the_dashboard_and_the_alerts_is_served(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    # Traffic that makes each family show up: a miss and a hit, a sampled request (bypass), a
    # retry away from a refusing backend that then opens, and a client that hangs up mid-stream;
    # the backend speaks vLLM's signals, so the engine-load families have samples too.
    mock = await start_mock(engine="vllm")
    health = attrs.evolve(FAST_HEALTH, load_interval=0.1)
    config = attrs.evolve(
        gateway_config(backend(mock.url, "up"), backend(closed_port_url(), "down"), health=health),
        cache=CacheSettings(),
    )
    gateway = await start_gateway_with(config)
    await wait_for_backend(client, gateway, "up", lambda r: r["load"]["reading"] is not None)
    for body in [chat("same", stream=False), chat("same", stream=False), chat(temperature=1)]:
        assert (await client.post(f"{gateway}/v1/chat/completions", json=body)).is_success
    await wait_for_backend(client, gateway, "down", lambda r: r["state"] == "open")
    leaver = await RawClient.connect(gateway)
    await leaver.send_request(
        "POST", "/v1/chat/completions", chat("leaving"), headers={"x-mock-tokens": "1000"}
    )
    await leaver.read_until(b"data: ")
    await leaver.hang_up()
    await wait_until(lambda: mock.stats["client_disconnects"] == 1)

    exposition = (await client.get(f"{gateway}/metrics")).text
    served = served_metric_names(exposition)

    exprs = dashboard_exprs() + alert_rule_exprs()
    assert len(alert_rule_exprs()) >= 7
    used = {name for expr in exprs for name in _METRIC.findall(expr)}
    assert used, exprs
    assert sorted(used - served) == []
    # The engines' load has its panels, and each of them draws a real sample, not an empty
    # family: the dashboard shows what least-loaded decides on.
    assert used >= ENGINE_LOAD_METRICS
    sampled = {line.split("{")[0] for line in exposition.splitlines() if line.startswith("ntonix")}
    assert sorted(ENGINE_LOAD_METRICS - sampled) == []
