"""What /ntonix/status and the dashboard show, built from figures (one worker's, or the whole
gateway's merged: `ntonix.core.figures`), and how one worker takes its own figures.

Invariant: the status and the dashboard read only figures, never the live components, so they
say the same thing with one worker or N.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, cast

import attrs

from ntonix import __version__
from ntonix.core.figures import Figures, tier_up
from ntonix.core.ledger import KINDS, UsageFigures, utc_date
from ntonix.core.telemetry import RecentWindow, SecondSummary, Tallies, WindowSummary
from ntonix.load_view import as_json, backend_loads
from ntonix.proxy import Proxy
from ntonix.tier import TierStatistics


def own_figures(
    proxy: Proxy,
    tallies: Tallies,
    access_log_dropped: int,
    recent: RecentWindow,
    now: float,
    *,
    window: bool,
    tier: TierStatistics | None = None,
    usage: UsageFigures | None = None,
) -> Figures:
    """This worker's figures now (`now` on its Trio clock); its last minute if `window`."""
    cache = proxy.cache
    return Figures(
        workers=1,
        tallies=tallies,
        backends=tuple(attrs.evolve(s, retry_after_until=None) for s in proxy.health.snapshot(now)),
        pools={name: attrs.asdict(pool.statistics()) for name, pool in proxy.pools.items()},
        cache=attrs.asdict(cache.statistics()) if cache else None,
        transitions=proxy.health.transitions,
        access_log_dropped=access_log_dropped,
        queued=proxy.admission.waiting,
        window=_on_wall_clock(recent.summary(now), time.time() - now) if window else None,
        shared=None if tier is None else _tier_figures(tier),
        usage=usage or UsageFigures(),
        loads=backend_loads(proxy.loads, proxy.health, now),
    )


def _tier_figures(tier: TierStatistics) -> dict[str, int]:
    """The tier's numbers as figures: `workers_up` is this worker's 0 or 1, summed over the
    workers like the counters (core/figures.py)."""
    return {
        "workers_up": int(tier.up),
        "calls": tier.calls,
        "failures": tier.failures,
        "skipped": tier.skipped,
        "transitions": tier.transitions,
    }


def _on_wall_clock(summary: WindowSummary, offset: float) -> WindowSummary:
    """The window's seconds on the wall clock, which all workers share (Trio's is per process)."""
    series = tuple(attrs.evolve(s, at=round(s.at + offset)) for s in summary.series)
    return attrs.evolve(summary, series=series)


def status(
    figures: Figures | None,
    urls: dict[str, str],
    strategy: str,
    uptime_seconds: float,
) -> dict[str, object]:
    """/ntonix/status: the gateway's backends and cache; None before the gateway started."""
    backends: list[dict[str, object]] = []
    loads = {load.name: as_json(load) for load in figures.loads} if figures else {}
    for snapshot in figures.backends if figures else ():
        pool = figures.pools.get(snapshot.name) if figures else None
        backends.append(
            {
                "name": snapshot.name,
                "url": urls.get(snapshot.name),
                "weight": snapshot.weight,
                "state": snapshot.state,
                "consecutive_failures": snapshot.consecutive_failures,
                "active_requests": snapshot.in_flight,
                "latency_ms": snapshot.latency_ms,
                "last_error": snapshot.last_error,
                "models": snapshot.models,
                "probe": snapshot.probe,
                "draining": snapshot.draining,
                "not_eligible_because": list(snapshot.reasons),
                "pool": pool,
                "load": loads.get(snapshot.name),
            }
        )
    return {
        "version": __version__,
        "workers": figures.workers if figures else 0,
        "cache": figures.cache if figures else None,
        "shared_tier": shared_tier(figures) if figures else None,
        "uptime_seconds": round(uptime_seconds, 3),
        "strategy": strategy,
        "queued": figures.queued if figures else 0,
        "backends": backends,
    }


def shared_tier(figures: Figures) -> dict[str, object] | None:
    """The tier as the gateway sees it (`tier_up`), with the calls of all its workers."""
    tier = figures.shared
    return None if tier is None else {"up": tier_up(figures), **tier}


def live_status(
    figures: Figures, base: dict[str, object], window_seconds: int
) -> dict[str, object]:
    """What the dashboard shows each second: the status (`base`) plus the last minute's rates
    (`figures.window`, on the wall clock)."""
    recent = figures.window or WindowSummary(0.0, None, None, {}, ())
    for backend in cast(list[dict[str, object]], base["backends"]):
        backend["ttft_p50_ms"] = _ms(recent.backend_ttft_p50.get(cast(str, backend["name"])))
    cache = figures.cache
    saved = cache["hits"] + cache["coalesced"] if cache else 0
    lookups = saved + cache["misses"] if cache else 0
    base["rates"] = {
        "window_seconds": window_seconds,
        "requests_per_second": recent.requests_per_second,
        "ttft_p50_ms": _ms(recent.ttft_p50),
        "ttft_p99_ms": _ms(recent.ttft_p99),
        "cache_hit_ratio": saved / lookups if lookups else None,
        "backend_requests_saved": saved,
        "active_requests": figures.tallies.active,
    }
    base["series"] = [_second(second) for second in recent.series]
    base["usage"] = usage_table(usage(figures, time.time()))
    return base


def usage(figures: Figures, wall: float) -> dict[str, object]:
    """/ntonix/usage: tokens per key, this minute (the last 60 s), today (UTC) and since
    start, in all and per model. `estimated` is the part of prompt and completion that was
    estimated; `cached` was served from the cache, not generated."""
    date = utc_date(wall)
    windows = {
        "minute": figures.usage.minute,
        "today": figures.usage.days.get(date, Counter()),
        "total": figures.usage.total,
    }
    keys: dict[str, dict[str, Any]] = {}
    for window, rows in windows.items():
        for (key, model, kind), count in rows.items():
            entry = keys.setdefault(key, {"models": {}, **{w: _zeros() for w in windows}})
            per_model = entry["models"].setdefault(model, {w: _zeros() for w in windows})
            entry[window][kind] += count
            per_model[window][kind] += count
    return {"date": date, "keys": dict(sorted(keys.items()))}


def _zeros() -> dict[str, int]:
    return dict.fromkeys((*KINDS, "estimated"), 0)


def usage_table(usage_page: dict[str, object]) -> list[dict[str, object]]:
    """The dashboard's per-key rows: tokens this minute, today and since start."""
    keys = cast(dict[str, dict[str, dict[str, int]]], usage_page["keys"])
    return [
        {
            "key": key,
            "minute": sum(entry["minute"][kind] for kind in KINDS),
            "today": sum(entry["today"][kind] for kind in KINDS),
            "prompt": entry["total"]["prompt"],
            "completion": entry["total"]["completion"],
            "cached": entry["total"]["cached"],
            "estimated": entry["total"]["estimated"],
        }
        for key, entry in keys.items()
    ]


def _second(second: SecondSummary) -> dict[str, object]:
    return {
        "t": second.at,
        "requests": second.requests,
        "ttft_p50_ms": _ms(second.ttft_p50),
        "ttft_p99_ms": _ms(second.ttft_p99),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
