"""What one bench run measured, and on what machine and code."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from bench.clients import ClientsResult
from bench.costs import CostsResult
from bench.profile import Profile
from bench.scenarios import (
    BurstResult,
    DisconnectResult,
    FloorResult,
    SlowStreamsResult,
    ThroughputResult,
)

LIBRARIES = ("trio", "hypercorn", "h11", "httpx", "httpcore", "attrs")


@dataclass
class ClientsRun:
    result: ClientsResult
    mocks_cpu: float  # percent of one core over the whole scenario


@dataclass
class Results:
    """Everything one run measured, by gateway worker count."""

    throughput: dict[int, ThroughputResult] = field(default_factory=dict)
    burst: dict[int, BurstResult] = field(default_factory=dict)
    slow: dict[int, SlowStreamsResult] = field(default_factory=dict)
    disconnects: dict[int, DisconnectResult] = field(default_factory=dict)
    floor: dict[int, FloorResult] = field(default_factory=dict)
    costs: dict[int, CostsResult] = field(default_factory=dict)
    clients: ClientsRun | None = None
    profiles: dict[int, Profile] = field(default_factory=dict)


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    model = "unknown"
    memory = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    versions = ", ".join(f"{name} {_version(name)}" for name in LIBRARIES)
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": f"{os.cpu_count()} x {model}",
        "memory": memory,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "libraries": versions,
        "kernel": platform.release(),
        "commit": _commit(),
    }


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def _commit() -> str:
    """The commit measured, and whether the work tree differed from it (read-only git)."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--", "src", "mocks")
    except (OSError, subprocess.SubprocessError):
        return "-"
    return f"{head} (with uncommitted changes)" if dirty else head


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, check=True)
    return out.stdout.strip()
