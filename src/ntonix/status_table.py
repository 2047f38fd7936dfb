"""`ntonix status` as text: the JSON of GET /ntonix/status in, aligned terminal lines out.

Pure functions, no I/O, so every layout decision is tested with fixed inputs. The input is
read leniently (missing keys and nulls become "-"): a newer CLI must still show what an older
gateway reports. Widths are measured on the plain text and colour is added after padding,
because escape codes take no room on screen but would count in `len`. The engines' load (each
backend's `load` record) is a second table under the first, so that neither outgrows a wide
terminal; a gateway that reports no load (an older one) prints none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Enough for a one-line error ("ConnectError: [Errno 111] Connection refused") and a handful
# of model names, short enough for a wide terminal; the full text is one `--json` away.
LAST_ERROR_WIDTH = 48
MODELS_WIDTH = 32
REASONS_WIDTH = 80
GAP = "  "

_STATE_COLOURS = {"closed": "32", "half-open": "33", "open": "31"}  # green, yellow, red
_RESET = "\x1b[0m"

# (title, right-aligned): numbers line up on their last digit.
_COLUMNS = (
    ("BACKEND", False),
    ("STATE", False),
    ("IN-FLIGHT", True),
    ("LATENCY MS", True),
    ("FAILURES", True),
    ("MODELS", False),
    ("LAST ERROR", False),
    ("NOT ELIGIBLE BECAUSE", False),
)
_STATE_COLUMN = 1
_LOAD_COLUMNS = (
    ("BACKEND", False),
    ("ENGINE", False),
    ("WAITING", True),
    ("RUNNING", True),
    ("KV USE", True),
    ("LOADED MODELS", False),
    ("READ AGO", True),
    ("TTFB MS", True),
    ("SCORE", True),
)


def render_status(status: Mapping[str, Any], *, colour: bool = False) -> str:
    """The whole output: the backends table, a gateway line and a cache line."""
    backends = status.get("backends") or []
    lines = backend_table(backends, colour=colour)
    if any(backend.get("load") for backend in backends):
        lines.append("")
        lines.extend(load_table(backends))
    lines.append("")
    lines.append(gateway_line(status))
    lines.append(cache_line(status.get("cache")))
    return "\n".join(lines) + "\n"


def any_backend_usable(status: Mapping[str, Any]) -> bool:
    """True when at least one backend's circuit is not open (the exit status of the command)."""
    return any(backend.get("state") != "open" for backend in status.get("backends") or [])


def backend_table(backends: Sequence[Mapping[str, Any]], *, colour: bool = False) -> list[str]:
    """One header line and one line per backend, columns aligned."""
    lines = _aligned(
        _COLUMNS, [_backend_cells(b) for b in backends], _STATE_COLUMN if colour else None
    )
    if not backends:
        lines.append("(no backends)")
    return lines


def load_table(backends: Sequence[Mapping[str, Any]]) -> list[str]:
    """The engines' last word on each backend (as `least-loaded` reads it) and its score."""
    return _aligned(_LOAD_COLUMNS, [_load_cells(b) for b in backends], None)


def _aligned(
    columns: Sequence[tuple[str, bool]], rows: Sequence[list[str]], painted: int | None
) -> list[str]:
    """The header and `rows`, each column as wide as its widest cell; `painted` is the column
    coloured by state (None: no colour)."""
    table = [[title for title, _ in columns], *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = []
    for index, row in enumerate(table):
        cells = []
        for column, (text, width) in enumerate(zip(row, widths, strict=True)):
            padded = text.rjust(width) if columns[column][1] else text.ljust(width)
            if index > 0 and column == painted:
                padded = paint_state(text, padded)
            cells.append(padded)
        lines.append(GAP.join(cells).rstrip())
    return lines


def _backend_cells(backend: Mapping[str, Any]) -> list[str]:
    reasons = backend.get("not_eligible_because") or []
    if backend.get("draining") and not any(r.startswith("draining") for r in reasons):
        reasons = ["draining", *reasons]
    return [
        _text(backend.get("name")),
        _text(backend.get("state")),
        _text(backend.get("active_requests")),
        _number(backend.get("latency_ms")),
        _text(backend.get("consecutive_failures")),
        truncate(_models(backend.get("models")), MODELS_WIDTH),
        truncate(_text(backend.get("last_error")), LAST_ERROR_WIDTH),
        truncate("; ".join(reasons) or "-", REASONS_WIDTH),
    ]


def _load_cells(backend: Mapping[str, Any]) -> list[str]:
    load = backend.get("load") or {}
    reading = load.get("reading") or {}
    age = load.get("age_seconds")
    read_ago = "-" if age is None else f"{age:.1f}s"
    if load.get("stale"):
        read_ago += " stale"  # no longer used: the backend counts by local requests
    kv = reading.get("kv_usage")
    loaded = reading.get("loaded_models")
    ttfb = (load.get("ttfb_ewma_ms") or {}).get("*")
    return [
        _text(backend.get("name")),
        _text(load.get("engine")),
        _text(reading.get("waiting")),
        _text(reading.get("running")),
        "-" if kv is None else percent(kv),
        truncate(
            "-" if loaded is None else ",".join(m.get("name", "?") for m in loaded) or "none",
            MODELS_WIDTH,
        ),
        read_ago,
        _number(ttfb),
        "-" if load.get("score") is None else f"{load['score']:.2f}",
    ]


def _models(models: Sequence[str] | None) -> str:
    # null means the backend has not said (no list configured, none learned): it gets any model.
    if models is None:
        return "any"
    return ",".join(models) or "-"


def paint_state(state: str, padded: str) -> str:
    """`padded` (the state cell) in the state's colour; unknown states stay plain."""
    code = _STATE_COLOURS.get(state)
    return padded if code is None else f"\x1b[{code}m{padded}{_RESET}"


def gateway_line(status: Mapping[str, Any]) -> str:
    uptime = status.get("uptime_seconds")
    return GAP.join(
        [
            f"workers: {_text(status.get('workers'))}",
            f"strategy: {_text(status.get('strategy'))}",
            f"queued: {_text(status.get('queued'))}",
            f"uptime: {'-' if uptime is None else human_duration(uptime)}",
            f"version: {_text(status.get('version'))}",
        ]
    )


def cache_line(cache: Mapping[str, Any] | None) -> str:
    """The cache summary; "cache: off" when the gateway runs without one (null in the JSON)."""
    if cache is None:
        return "cache: off"
    hits, misses, coalesced = (int(cache.get(k) or 0) for k in ("hits", "misses", "coalesced"))
    entries = int(cache.get("entries") or 0)
    return "cache: " + ", ".join(
        [
            f"{entries} {'entry' if entries == 1 else 'entries'}",
            human_bytes(int(cache.get("bytes") or 0)),
            f"{hits} hits",
            f"{misses} misses",
            f"{coalesced} coalesced",
            f"hit ratio {percent(hit_ratio(hits, misses, coalesced))}",
            f"backend requests saved {hits + coalesced}",
        ]
    )


def hit_ratio(hits: int, misses: int, coalesced: int) -> float | None:
    """Hits over every cacheable request (hits, misses and coalesced followers each count once);
    None before the first one. docs/grafana-dashboard.json computes the same ratio."""
    total = hits + misses + coalesced
    return None if total == 0 else hits / total


def percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:.1f}%"


def truncate(text: str, width: int) -> str:
    """`text` cut to `width` characters, the cut marked with "..."; one line always."""
    text = " ".join(text.split())  # a multi-line error message would break the table
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def human_bytes(count: int) -> str:
    """Binary units, one decimal: 0 B, 512 B, 1.5 KiB, 256.0 MiB."""
    if count < 1024:
        return f"{count} B"
    value = count / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def human_duration(seconds: float) -> str:
    """The two largest units: 42s, 5m 03s, 2h 07m, 3d 04h."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _text(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
