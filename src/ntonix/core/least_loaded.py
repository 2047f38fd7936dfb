"""The `least-loaded` strategy: order backends by what their engines say, not by our own counts.

Invariants: like every strategy it only orders what it is handed (each candidate once, the
pick first); it reads nothing but the candidates' `Signals`, so it is as pure and as testable
as the others. With no signal at all (no fresh reading, no ramp, no residency) it *is*
least-connections, turn for turn, so the default strategy costs nothing where engines say
nothing.

The score of a backend is what it would carry if it took this request, per unit of weight:
- each request queued beyond its capacity counts 1 (the heaviest: a queued request waits a
  whole generation), the running ones count their share of the capacity (below 1 together),
  and KV-cache use adds up to 0.5; without a known capacity (vLLM, SGLang and TGI do not
  export theirs) each running request counts 1 and each queued one 2;
- a queued request waits for a slot to free, and a backend that holds each request longer
  frees them later: its queued requests count as many times more as our requests take longer
  there than on the quickest backend (at most DRAIN_CAP times), so near saturation a queue
  forms where it drains soonest, not evenly on a backend three times slower;
- the load is the engine's reading brought up to now with this worker's own requests
  (core/signals.py), so a burst between two readings spreads instead of herding;
- it is divided by the weight times the slow-start ramp, so a backend back from an open circuit
  takes a growing share, not all new requests at once;
- a backend whose time to first byte is 1.5x the fastest one's or worse pays for it, as for
  one queued request per extra multiple (at most 4): it answers, but slowly, and every token
  of its answers is slow too; nearer than that, latency only breaks near-ties (scores within
  0.05). The times are of streams' first body bytes, queueing included, so a fast backend
  whose queue grows looks slower and the surcharge shrinks.
Residency comes first: a backend with the model loaded and room for the request is preferred
to one that would have to load it; a cold backend comes before a warm but full one.
Exact ties share by smooth weighted round-robin.
"""

from __future__ import annotations

from collections.abc import Sequence

from ntonix.core.balancer import Candidate, LeastConnections, _smooth_pick

WAITING_COST = 1.0  # per request queued beyond capacity
UNKNOWN_CAPACITY_WAITING_COST = 2.0  # per request queued, when running ones count 1 each
KV_COST = 0.5  # a full KV cache
DRAIN_CAP = 8.0  # a queued request costs at most this many times more on a slow backend
SLOW_RATIO = 1.5  # this much slower than the fastest: the backend pays for its latency
SLOW_COST = 1.0  # per extra multiple of the fastest TTFB: as much as one queued request
SLOW_CAP = 4.0
NEAR_TIE = 0.05  # scores this close are near-ties, which latency breaks
LATENCY_TIE_RATIO = 1.2  # ... when the faster answers at least this much sooner
_EXACT = 1e-9


def load_after(candidate: Candidate) -> tuple[int, int]:
    """(requests on the backend if it took this one, of which queued in its engine)."""
    signals = candidate.signals
    if signals is None or signals.load is None:
        total = candidate.in_flight + 1
        known_waiting = 0
    else:
        total = signals.load + 1
        known_waiting = min(signals.waiting, signals.load)
    capacity = signals.capacity if signals is not None else None
    if capacity:
        return total, max(0, total - capacity)
    return total, known_waiting


def has_room(candidate: Candidate) -> bool:
    """Whether the backend can start one more request without queueing it."""
    total, waiting = load_after(candidate)
    signals = candidate.signals
    capacity = signals.capacity if signals is not None else None
    return total <= capacity if capacity else waiting == 0


def load_score(candidate: Candidate, drain: float = 1.0) -> float:
    """The backend's load if it took this request, per unit of (ramped) weight; no latency.

    `drain` is how many times longer than on the quickest backend a queued request waits here
    for each one ahead of it (`drain_factors`).
    """
    total, waiting = load_after(candidate)
    signals = candidate.signals
    capacity = signals.capacity if signals is not None else None
    running = total - waiting
    if capacity:
        load = WAITING_COST * drain * waiting + running / capacity
    else:
        load = UNKNOWN_CAPACITY_WAITING_COST * drain * waiting + running
    kv = (signals.kv_usage or 0.0) if signals is not None else 0.0
    ramp = signals.ramp if signals is not None else 1.0
    return (load + KV_COST * kv) / (candidate.weight * ramp)


def slowness(candidate: Candidate, fastest: float | None) -> float:
    """The latency surcharge: 0 unless this backend is SLOW_RATIO times the fastest or worse."""
    ttfb = candidate.signals.ttfb if candidate.signals is not None else None
    if ttfb is None or not fastest:
        return 0.0
    ratio = ttfb / fastest
    return 0.0 if ratio < SLOW_RATIO else min(SLOW_CAP, SLOW_COST * (ratio - 1))


def drain_factors(candidates: Sequence[Candidate]) -> dict[str, float]:
    """How much slower than the quickest each backend frees a slot: its requests' hold time
    over the shortest one's, 1..DRAIN_CAP (1 where unknown)."""
    holds = {c.name: c.signals.hold for c in candidates if c.signals is not None and c.signals.hold}
    quickest = min(holds.values(), default=None)
    return {
        c.name: min(DRAIN_CAP, holds[c.name] / quickest) if quickest and c.name in holds else 1.0
        for c in candidates
    }


def scores(candidates: Sequence[Candidate]) -> dict[str, float]:
    """Each candidate's score, latency surcharge included (lower is better)."""
    fastest = min(
        (c.signals.ttfb for c in candidates if c.signals is not None and c.signals.ttfb),
        default=None,
    )
    drain = drain_factors(candidates)
    return {c.name: load_score(c, drain[c.name]) + slowness(c, fastest) for c in candidates}


def _informed(candidate: Candidate) -> bool:
    signals = candidate.signals
    return signals is not None and (
        signals.load is not None or signals.warm is not None or signals.ramp < 1.0
    )


def _residency(candidate: Candidate) -> int:
    """0: warm (or not reported) with room, 1: would load the model, 2: warm but full."""
    warm = candidate.signals.warm if candidate.signals is not None else None
    if warm is False:
        return 1
    return 0 if has_room(candidate) else 2


class LeastLoaded(LeastConnections):
    """Least engine-reported load per unit of weight; least-connections without signals."""

    def order(
        self, candidates: Sequence[Candidate], *, affinity_key: str | None = None
    ) -> list[str]:
        if not any(_informed(c) for c in candidates):
            return super().order(candidates)
        current = self._counters(candidates)
        score = scores(candidates)
        # Residency only splits when some backend would have to load the model.
        cold = any(c.signals is not None and c.signals.warm is False for c in candidates)
        group = {c.name: _residency(c) if cold else 0 for c in candidates}
        first = min(group.values())
        pool = [c for c in candidates if group[c.name] == first]
        least = min(score[c.name] for c in pool)
        best = self._pick(pool, score, least, current)
        rest = sorted(
            (c for c in candidates if c is not best),
            key=lambda c: (group[c.name], score[c.name], -current[c.name]),
        )
        return [best.name, *(c.name for c in rest)]

    @staticmethod
    def _pick(
        pool: Sequence[Candidate], score: dict[str, float], least: float, current: dict[str, int]
    ) -> Candidate:
        near = [c for c in pool if score[c.name] <= least + NEAR_TIE]
        known = {c.name: c.signals.ttfb for c in near if c.signals is not None and c.signals.ttfb}
        if (
            len(near) > 1
            and len(known) == len(near)
            and max(known.values()) >= LATENCY_TIE_RATIO * min(known.values())
        ):
            return min(near, key=lambda c: known[c.name])
        return _smooth_pick(current, [c for c in pool if score[c.name] <= least + _EXACT])
