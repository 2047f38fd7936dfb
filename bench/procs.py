"""Starting, watching and stopping the benchmark's subprocesses: mocks, gateways, load.

Invariants: every process the bench starts is registered in one `Processes` before anything can
fail, and `Processes.close()` ends each of them, and each of their descendants, by PID: SIGTERM,
then SIGKILL after a grace period. Each child runs in its own session, so a Ctrl-C in the
terminal reaches only the bench, which then shuts the children down in order.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The backends answer small non-streaming requests at once; streaming scenarios set the timing
# per request with x-mock-* headers.
MOCK_OPTIONS = ["--tokens", "8", "--token-delay", "0", "--ttft", "0"]
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL


def _lift_open_file_limit() -> None:
    # Runs in the child between fork and exec: the gateway holds two sockets per stream.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Processes:
    """Every subprocess of one bench run; a context manager that stops them all on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._started: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(
        self, name: str, argv: list[str], *, stdout: int | IO[bytes] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `argv` with stderr (and stdout unless given) going to `log_dir/NAME.log`."""
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log if stdout is None else stdout,
                stderr=log,
                start_new_session=True,
                preexec_fn=_lift_open_file_limit,
            )
        finally:
            log.close()  # the child has its own copy of the descriptor
        self._started.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes], grace: float = STOP_GRACE) -> None:
        """SIGTERM, wait up to `grace`, then SIGKILL the process and whatever it left behind."""
        if process.poll() is None:
            family = descendants(process.pid)
            _signal(process.pid, signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                _signal(process.pid, signal.SIGKILL)
                process.wait()
            for pid in family:  # workers that outlived their parent
                _signal(pid, signal.SIGKILL)
        if process in self._started:
            self._started.remove(process)

    def stop_pid(self, pid: int) -> None:
        """`stop` the process started with this PID, if it is one of ours."""
        for process in list(self._started):
            if process.pid == pid:
                self.stop(process)

    def close(self) -> None:
        # A second Ctrl-C must not cut the cleanup short: hold signals until it is done.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            # Newest first: load generators, then gateways, then the mocks they talk to.
            for process in reversed(list(self._started)):
                self.stop(process)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it has exited already
        os.kill(pid, signum)


def python_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def free_port() -> int:
    """A port that was free a moment ago (the gateway's CLI needs a number, not 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --- /proc readings ------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """All live processes below `pid` (hypercorn's workers and multiprocessing helpers)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of one process so far; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime and stime are fields 14 and 15 of proc(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of one process, in KiB."""
    values = {"VmRSS": 0, "VmHWM": 0}
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return values
    for line in lines:
        key, _, rest = line.partition(":")
        if key in values:
            values[key] = int(rest.split()[0])
    return values


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy (anything but idle and iowait), steal included."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


class CpuMeter:
    """CPU used by named groups of processes, and by the whole machine ("machine"), between
    `start()` and `stop()`."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self._groups = groups
        self._at_start: dict[str, float] = {}
        self._started = 0.0
        self.seconds: dict[str, float] = {}
        self.wall = 0.0

    def _read(self) -> dict[str, float]:
        readings = {name: sum(cpu_seconds(p) for p in pids) for name, pids in self._groups.items()}
        readings["machine"] = machine_busy_seconds()
        return readings

    def start(self) -> None:
        self._started = time.monotonic()
        self._at_start = self._read()

    def stop(self) -> None:
        self.wall = time.monotonic() - self._started
        now = self._read()
        self.seconds = {name: now[name] - self._at_start[name] for name in now}


# --- HTTP from the orchestrator (small JSON calls, so urllib does) --------------------------


def http_json(url: str, method: str = "GET", timeout: float = 5.0) -> Any:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body else None


# --- the services under test ------------------------------------------------------------------


@dataclass(frozen=True)
class Mock:
    name: str
    host: str
    port: int
    pid: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = http_json(f"{self.url}/mock/stats")
        return result

    def reset(self) -> None:
        http_json(f"{self.url}/mock/stats", method="DELETE")


def start_mock(
    processes: Processes, name: str, options: list[str], timeout: float = 15.0, lean: bool = True
) -> Mock:
    """A mock on a free port (lean unless told: Hypercorn's serves WebSockets too); returns
    once it has printed the port it bound."""
    server = ["--lean"] if lean else []
    argv = python_argv("mocks.llm", "--port", "0", *server, "--name", name, *options)
    return _start_listening(processes, name, argv, timeout)


def start_backend(
    processes: Processes, name: str, options: list[str], timeout: float = 15.0
) -> Mock:
    """`bench.backend` (the mock's replies at a fraction of its CPU, no `/mock/stats`) on a
    free port; returns once it has printed the port it bound."""
    argv = python_argv("bench.backend", "--port", "0", "--name", name, *options)
    return _start_listening(processes, name, argv, timeout)


def _start_listening(processes: Processes, name: str, argv: list[str], timeout: float) -> Mock:
    process = processes.start(name, argv, stdout=subprocess.PIPE)
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline().decode() if ready else ""
    if " listening on http://" not in line:
        raise RuntimeError(f"mock {name} did not start: {line!r}; see {processes.log_dir}")
    host, _, port = line.strip().rpartition("http://")[2].rpartition(":")
    return Mock(name, host, int(port), process.pid)


@dataclass
class Gateway:
    workers: int
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        """The `ntonix serve` process and every worker or helper below it."""
        return [self.process.pid, *descendants(self.process.pid)]

    def worker_pids(self) -> list[int]:
        """The processes that serve requests (the parent itself when there is one worker)."""
        if self.workers == 1:
            return [self.process.pid]
        return [p for p in descendants(self.process.pid) if "spawn_main" in command_line(p)]

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = http_json(f"{self.url}/ntonix/status")
        return result


def _ntonix_command() -> list[str]:
    """The `ntonix` console script of this environment, as an operator would run it."""
    script = Path(sys.executable).with_name("ntonix")
    return [str(script)] if script.exists() else python_argv("ntonix.cli")


def gateway_config(mocks: list[Mock]) -> str:
    """The gateway's TOML: every mock as a backend, the cache off (it would answer for the
    mocks and measure the cache instead of the relay), a short drain so shutdown is quick, and
    no limit on connections per client address: every bench client connects from 127.0.0.1."""
    lines = ["[gateway]", "graceful_timeout = 5.0", "max_connections_per_client = 0", ""]
    lines += ["[cache]", "enabled = false", ""]
    for mock in mocks:
        lines += ["[[backends]]", f'name = "{mock.name}"', f'url = "{mock.url}"', ""]
    return "\n".join(lines)


def start_gateway(
    processes: Processes,
    config_path: Path,
    workers: int,
    timeout: float = 30.0,
    *,
    name: str = "",
) -> Gateway:
    """`ntonix serve` with `workers` workers; returns once every worker is up and it answers."""
    port = free_port()
    argv = [
        *_ntonix_command(),
        "serve",
        "--config",
        str(config_path),
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
    ]
    gateway = Gateway(workers, port, processes.start(name or f"gateway-w{workers}", argv))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            raise RuntimeError(f"the gateway exited with {gateway.process.returncode}")
        if len(gateway.worker_pids()) == workers:
            try:
                if http_json(f"{gateway.url}/ntonix/health", timeout=1.0):
                    return gateway
            except OSError:
                pass
        time.sleep(0.1)
    raise RuntimeError(f"the gateway did not come up within {timeout:g} s")


@dataclass
class Floor:
    """`python -m bench.floor`: a minimal ASGI app behind the gateway's Hypercorn setup."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_floor(processes: Processes, timeout: float = 30.0, count: int = 1) -> Floor:
    """The framework floor of (f) on a free port, in `count` processes; returns once it
    answers."""
    port = free_port()
    argv = python_argv("bench.floor", "--bind", f"127.0.0.1:{port}", "--processes", str(count))
    floor = Floor(port, processes.start("floor", argv))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if floor.process.poll() is not None:
            raise RuntimeError(f"the floor exited with {floor.process.returncode}")
        try:
            if http_json(floor.url, timeout=1.0):  # any path gets the fixed answer
                return floor
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the floor did not come up within {timeout:g} s")
