"""The chaos tests' cluster: mocks in namespaces, a gateway on the host, load, and leak checks.

`Cluster` holds three (or more) lean mock backends, each alone in its namespace on port 8000 of
its own address, and a gateway (`tests.chaos.census`, which is `ntonix serve` plus a task
count; with `--workers N`, its workers are what is counted) on 127.0.0.1 that reaches them
over the veth links. `Load` runs non-streaming requests at a steady rate and long streams next
to them and records what every client saw. `Baseline` is what the gateway and the mocks hold
when idle; `settled()` waits until they hold that again after a fault (no task, connection or
file descriptor left over, RSS within 5%, the status showing nothing in flight).
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from tests.chaos.netns import Node
from tests.support import PYTHON, ChildProcess, Spawn, pool_totals, workers_of

MOCK_PORT = 8000  # each mock is alone in its namespace
MOCK_OPTIONS = ("--tokens", "8", "--token-delay", "0.01", "--ttft", "0.01")
RUNNING_ON = rb"Running on (http://[\d.]+:\d+)"
CHAT = "/v1/chat/completions"
RSS_TOLERANCE = 0.05
# A few MiB of RSS move with the allocator and the caches of a first request of each kind:
# below this, a difference is noise, not a leak.
RSS_FLOOR_KIB = 3 * 1024


def chat(stream: bool, content: str = "hi") -> dict[str, Any]:
    return {
        "model": "mock-llm",
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
    }


IDLE_TIMEOUT = 2.0  # the gateway's [gateway] idle_timeout in every chaos config


def config_text(mocks: list[str], **sections: dict[str, object]) -> str:
    """A gateway config: the mocks as backends m0, m1, ...; `sections` add or override keys."""
    settings: dict[str, dict[str, object]] = {
        "gateway": {
            "upstream_connect_timeout": 0.5,
            "first_byte_timeout": 1.0,
            "idle_timeout": IDLE_TIMEOUT,
            "retries": 2,
            "graceful_timeout": 1.0,
        },
        "health": {
            "interval": 0.25,
            "timeout": 0.5,
            "failure_threshold": 3,
            "open_for": 0.5,
            "max_open_for": 1.0,
        },
        "cache": {"enabled": False},
        "log": {"access_log": "off"},
    }
    for name, keys in sections.items():
        settings.setdefault(name, {}).update(keys)
    lines = []
    for name, keys in settings.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    for index, url in enumerate(mocks):
        lines += ["[[backends]]", f'name = "m{index}"', f'url = "{url}"']
    return "\n".join(lines) + "\n"


@attrs.define
class Mock:
    """A lean mock in a node's namespace; `start()` again after a kill brings it back."""

    node: Node
    name: str
    spawn: Spawn
    options: tuple[str, ...] = MOCK_OPTIONS
    child: ChildProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{self.node.address}:{MOCK_PORT}"

    async def start(self) -> None:
        argv = [PYTHON, "-m", "mocks.llm", "--lean", "--name", self.name]
        argv += ["--host", self.node.address, "--port", str(MOCK_PORT), *self.options]
        self.child = await self.spawn(*self.node.exec_argv(*argv))
        await self.child.wait_for(rb"mock \S+ listening on")

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    async def stats(self, client: httpx.AsyncClient) -> dict[str, Any]:
        response = await client.get(f"{self.url}/mock/stats", timeout=10)
        result: dict[str, Any] = response.json()
        return result


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


async def tasks_of(census: Path, pid: int) -> int:
    stream = await trio.open_unix_socket(str(census / f"{pid}.sock"))
    async with stream:
        data = b""
        while chunk := await stream.receive_some(4096):
            data += chunk
    count: int = json.loads(data)["tasks"]
    return count


@attrs.frozen
class Snapshot:
    """What a process holds when the cluster is idle."""

    tasks: int
    fds: int
    rss_kib: int
    mock_fds: tuple[int, ...]
    # Idle keep-alive connections pooled to each backend: one fd at each end, not a leak.
    pooled: tuple[int, ...]

    def unpooled_fds(self) -> int:
        return self.fds - sum(self.pooled)

    def unpooled_mock_fds(self) -> tuple[int, ...]:
        return tuple(fds - pooled for fds, pooled in zip(self.mock_fds, self.pooled, strict=True))


@attrs.define
class Cluster:
    nodes: list[Node]
    mocks: list[Mock]
    gateway: ChildProcess
    url: str
    census: Path
    client: httpx.AsyncClient

    async def status(self) -> dict[str, Any]:
        response = await self.client.get(f"{self.url}/ntonix/status")
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    async def backend(self, name: str) -> dict[str, Any]:
        for record in (await self.status())["backends"]:
            if record["name"] == name:
                return dict(record)
        raise AssertionError(f"no backend {name}")

    async def wait_backend(self, name: str, state: str, timeout: float = 10.0) -> float:
        """Until backend `name`'s circuit is in `state`; returns how long that took."""
        start = time.monotonic()
        with trio.fail_after(timeout):
            while (await self.backend(name))["state"] != state:
                await trio.sleep(0.02)
        return time.monotonic() - start

    def serving_pids(self) -> list[int]:
        """The processes that serve: the workers of `--workers N`, else the gateway itself."""
        return workers_of(self.gateway.pid) or [self.gateway.pid]

    async def snapshot(self) -> Snapshot:
        pids = self.serving_pids()
        backends = {record["name"]: record for record in (await self.status())["backends"]}
        return Snapshot(
            tasks=sum([await tasks_of(self.census, pid) for pid in pids]),
            fds=sum(open_fds(pid) for pid in pids),
            rss_kib=sum(rss_kib(pid) for pid in pids),
            mock_fds=tuple(open_fds(mock.pid) for mock in self.mocks),
            pooled=tuple(backends[mock.name]["pool"]["idle"] for mock in self.mocks),
        )

    async def baseline(self) -> Snapshot:
        """The idle snapshot to come back to (once this client holds its connections). Taken
        right after a load (fault 11 warms its caches first), the last answers' bookkeeping at
        the gateway and the mocks may trail what the clients saw: idle within 10 s, or fail."""
        with trio.fail_after(10):
            while not await self.idle():
                await trio.sleep(0.05)
        return await self.snapshot()

    async def idle(self) -> bool:
        """Nothing in flight at the gateway (status) or the mocks (their own stats)."""
        status = await self.status()
        busy = status["queued"] or pool_totals(status).get("in_use", 0)
        busy = busy or any(backend["active_requests"] for backend in status["backends"])
        for mock in self.mocks:
            try:
                busy = busy or (await mock.stats(self.client))["active"]
            except httpx.TimeoutException:  # a mock busy writing a huge answer
                return False
        return not busy

    async def settled(self, baseline: Snapshot, timeout: float = 20.0) -> Snapshot:
        """Wait until the gateway and the mocks are back to `baseline`: idle, the same tasks,
        no more fds (pooled idle connections to the backends may differ by the ones a fault
        closed), RSS within 5%. Fails with the last snapshot when they do not come back."""
        last: Snapshot | None = None
        with trio.move_on_after(timeout):
            while True:
                if await self.idle():
                    last = await self.snapshot()
                    if _back_to(baseline, last):
                        return last
                await trio.sleep(0.2)
        raise AssertionError(f"not back to the baseline:\n{baseline}\n{last}")


def _back_to(baseline: Snapshot, now: Snapshot) -> bool:
    rss_slack = max(baseline.rss_kib * RSS_TOLERANCE, RSS_FLOOR_KIB)
    before, after = baseline.unpooled_mock_fds(), now.unpooled_mock_fds()
    return (
        now.tasks <= baseline.tasks
        and now.unpooled_fds() <= baseline.unpooled_fds()
        and now.rss_kib <= baseline.rss_kib + rss_slack
        and all(now <= then for then, now in zip(before, after, strict=True))
    )


async def start_cluster(
    spawn: Spawn,
    nodes: list[Node],
    client: httpx.AsyncClient,
    tmp_path: Path,
    *,
    binds: tuple[str, ...] = ("127.0.0.1:0",),
    env: dict[str, str] | None = None,
    extra_toml: str = "",
    backend_urls: list[str] | None = None,
    workers: int = 1,
    **sections: dict[str, object],
) -> Cluster:
    """A mock in each namespace, then the gateway in front of them (at `backend_urls` when
    given, with `workers` worker processes) once all of them answer."""
    mocks = [Mock(node, f"m{index}", spawn) for index, node in enumerate(nodes)]
    async with trio.open_nursery() as nursery:
        for mock in mocks:
            nursery.start_soon(mock.start)
    config = tmp_path / "ntonix.toml"
    urls = backend_urls or [mock.url for mock in mocks]
    config.write_text(config_text(urls, **sections) + extra_toml)
    census = Path(tempfile.mkdtemp(prefix="census-", dir=tmp_path))
    argv = [PYTHON, "-m", "tests.chaos.census", "serve", "--config", str(config)]
    for bind in binds:
        argv += ["--bind", bind]
    if workers > 1:
        argv += ["--workers", str(workers)]
    gateway = await spawn(*argv, env={"NTONIX_CENSUS": str(census), **(env or {})})
    url = (await gateway.wait_for(RUNNING_ON)).group(1).decode()
    with trio.fail_after(30):  # every worker listening, and its census too
        while len(urls_of(gateway)) < workers * len(binds) or _counted(census) < workers:
            await trio.sleep(0.02)
    cluster = Cluster(nodes, mocks, gateway, url, census, client)
    with trio.fail_after(10):
        while any(record["state"] != "closed" for record in (await cluster.status())["backends"]):
            await trio.sleep(0.05)
    return cluster


def _counted(census: Path) -> int:
    """The processes whose census socket is up."""
    return len(list(census.iterdir()))


def urls_of(gateway: ChildProcess) -> list[str]:
    return [match.decode() for match in re.findall(RUNNING_ON, gateway.output)]


async def attempts(cluster: Cluster, backend: str, outcome: str) -> float:
    """`ntonix_upstream_attempts_total` for one backend and outcome."""
    text = (await cluster.client.get(f"{cluster.url}/metrics")).text
    pattern = rf'ntonix_upstream_attempts_total{{backend="{backend}",outcome="{outcome}"}} (\S+)'
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0
