"""The soak's outputs: a Markdown table (one row a minute), the JSON of every sample, a PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

from bench.soak import Sample, Soak


def markdown(
    soak: Soak, passed: bool, fits: dict[str, Any], steepest: dict[str, Any], command: str
) -> str:
    tally = soak.tally
    lines = [
        f"# Soak: `{command}`",
        "",
        f"**{'PASS' if passed else 'FAIL'}**: {len(tally.unexpected)} unexpected client errors; "
        f"{tally.plain} non-streaming requests ({tally.cache_hits} cache hits), {tally.streams} "
        f"long streams, {tally.dropped_by_client} streams dropped by their client, "
        f"{tally.expected_errors} failures where a fault was injected.",
        "",
        "Least-squares fits: over the window the verdict uses, and the steepest within one",
        "stretch between worker kills (for information):",
        "",
        "| series | fit | slope per 10 min | mean | slope / mean | minutes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, table in (("window", fits), ("steepest stretch", steepest)):
        for field, fit in table.items():
            lines.append(
                f"| {field} | {name} | {fit['slope_per_10_min']:+.3f} | {fit['mean']:.1f} | "
                f"{100 * fit['share']:+.2f}% | {fit['minutes']:.1f} |"
            )
    lines += ["", "| minute | RSS MiB | fds | tasks | pooled | queued | events |"]
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for minute, sample in _per_minute(soak.samples):
        events = ", ".join(
            event for at, event in soak.events if minute * 60 <= at < (minute + 1) * 60
        )
        lines.append(
            f"| {minute} | {sample.rss_mib:.1f} | {sample.fds} | {sample.tasks} | "
            f"{sample.pooled} | {sample.queued} | {events} |"
        )
    if tally.unexpected:
        lines += ["", "Unexpected errors (first 20):", ""]
        lines += [f"- {what}" for what in tally.unexpected[:20]]
    return "\n".join(lines) + "\n"


def _per_minute(samples: list[Sample]) -> list[tuple[int, Sample]]:
    rows: dict[int, Sample] = {}
    for sample in samples:
        rows.setdefault(int(sample.at // 60), sample)
    return sorted(rows.items())


def write(
    soak: Soak,
    passed: bool,
    fits: dict[str, Any],
    steepest: dict[str, Any],
    command: str,
    results: Path,
) -> None:
    results.mkdir(exist_ok=True)
    (results / "soak.md").write_text(markdown(soak, passed, fits, steepest, command))
    record = {
        "passed": passed,
        "fits": fits,
        "steepest": steepest,
        "tally": attrs.asdict(soak.tally),
        "events": soak.events,
        "samples": [attrs.asdict(sample) for sample in soak.samples],
    }
    (results / "soak.json").write_text(json.dumps(record, indent=1))
    plot(soak, results / "soak.png")


def plot(soak: Soak, path: Path) -> None:
    """Five panels over time; dotted lines at worker kills, shading while a backend is down."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = [
        ("rss_mib", "RSS of the workers (MiB)"),
        ("fds", "open fds"),
        ("tasks", "Trio tasks"),
        ("pooled", "pooled upstream connections"),
        ("queued", "queued requests"),
    ]
    figure, axes = plt.subplots(len(fields), 1, figsize=(10, 12), sharex=True)
    minutes = [sample.at / 60 for sample in soak.samples]
    for axis, (field, label) in zip(axes, fields, strict=True):
        axis.plot(minutes, [getattr(sample, field) for sample in soak.samples], linewidth=1)
        axis.set_ylabel(label, fontsize=8)
        axis.grid(alpha=0.3)
        for killed in soak.worker_killed_at:
            axis.axvline(killed / 60, color="red", linestyle=":", linewidth=1)
        for at, event in soak.events:
            if event.endswith("killed") and not event.startswith("worker"):
                axis.axvspan(at / 60, at / 60 + 20 / 60, color="orange", alpha=0.2)
    axes[-1].set_xlabel("minutes")
    figure.suptitle("ntonix soak: 2 workers, 3 mocks (red: worker SIGKILLed; orange: backend down)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
