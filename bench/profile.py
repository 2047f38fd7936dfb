"""Sampling the gateway with py-spy while scenario (a) loads it, for `--profile`.

py-spy attaches from outside the process, so the gateway runs unmodified; the raw (collapsed
stack) output is kept next to the report and summarised here. py-spy is optional
(`pip install py-spy`): without it the bench says so and skips the profile.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Processes

TOP = 15
_INCLUSIVE = ("ntonix/", "hypercorn/")  # code the lead can change or configure
_LINE = re.compile(r":\d+\)$")
# A thread of Trio's cache (the access log writes in one) waiting for work: py-spy does not
# always see that it is idle, and such samples are no CPU the gateway spends.
_IDLE_THREAD = "WorkerThread._work ("
# The frames of the per-request metrics and access log (the budget: 5% of the CPU).
# The request id is left out: the gateway made one per request before it counted anything.
_TELEMETRY = (
    "_begin (ntonix/app.py",
    "_finish (ntonix/app.py",
    "ntonix/accesslog.py",
    "ntonix/core/telemetry.py",
)


def py_spy() -> str | None:
    """The py-spy executable: on PATH, or next to this Python (an unactivated venv)."""
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def start(
    processes: Processes, executable: str, pid: int, seconds: float, output: Path
) -> subprocess.Popen[bytes]:
    """py-spy sampling `pid` for `seconds`; collapsed stacks go to `output`."""
    argv = [
        executable,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        "200",
        "--format",
        "raw",
        "--output",
        str(output),
    ]
    return processes.start(f"py-spy-{pid}", argv)


@dataclass
class Profile:
    samples: int
    own: list[tuple[float, str]]  # (percent of samples, function), by own time
    inclusive: list[tuple[float, str]]  # the same for the gateway's and Hypercorn's functions
    telemetry: float  # percent of the working samples in the request metrics and access log


def summarise(outputs: list[Path], top: int = TOP) -> Profile:
    """Functions by own time (the running frame of a sample) and, for our code and Hypercorn,
    by inclusive time (anywhere on the stack)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    telemetry = 0
    idle = 0
    total = 0
    for output in outputs:
        if not output.exists():
            continue
        for line in output.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            # "function (file.py:LINE)": drop the line so that a function's lines add up.
            frames = [_LINE.sub(")", frame) for frame in stack.split(";")]
            own[frames[-1]] += int(count)
            for frame in set(frames):
                if any(package in frame for package in _INCLUSIVE):
                    inclusive[frame] += int(count)
            if any(marker in stack for marker in _TELEMETRY) and "new_request_id" not in stack:
                telemetry += int(count)
            if frames[-1].startswith(_IDLE_THREAD):
                idle += int(count)
            total += int(count)

    def shares(counter: Counter[str]) -> list[tuple[float, str]]:
        return [(100 * n / total, frame) for frame, n in counter.most_common(top)]

    if not total:
        return Profile(0, [], [], 0.0)
    working = total - idle
    return Profile(total, shares(own), shares(inclusive), 100 * telemetry / max(1, working))
