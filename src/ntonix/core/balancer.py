"""Backend selection: strategies that order the candidates they are given, best first.

Invariants: a strategy only orders what it is handed — every candidate exactly once, the first
is the pick and the rest is the failover order — and never learns about health (eligibility is
filtered before, in core/health.py). Randomness comes from an injected `random.Random` and
hashing from blake2b, so a seed or a key always gives the same order; per-backend state is keyed
by name and follows the candidate set as backends come and go.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Protocol, TypeVar

import attrs

T = TypeVar("T")

STRATEGIES = (
    "least-loaded",
    "least-connections",
    "weighted-round-robin",
    "power-of-two",
    "prefix-affinity",
)


@attrs.frozen
class Signals:
    """What the engine said about a backend's load, brought up to now (core/signals.py)."""

    load: int | None = None  # requests on the engine now; None: no fresh reading, count locally
    waiting: int = 0  # of the engine's own reading, requests queued
    capacity: int | None = None  # requests it generates at once, when known
    kv_usage: float | None = None  # 0..1
    warm: bool | None = None  # the requested model is loaded; None: not reported
    ttfb: float | None = None  # EWMA of time to first byte for this model, seconds
    hold: float | None = None  # EWMA of how long our requests held the backend, seconds
    ramp: float = 1.0  # slow start: share of its weight it takes now, 0.1..1


@attrs.frozen
class Candidate:
    """A backend that may take the request: its name, config weight and requests in flight."""

    name: str
    weight: int = attrs.field(default=1, validator=attrs.validators.gt(0))
    in_flight: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    signals: Signals | None = None  # read by least-loaded only

    @property
    def load(self) -> float:
        """In-flight requests per unit of weight.

        A float, not a `Fraction` (whose construction was the balancer's largest cost per
        request): IEEE division is correctly rounded, so equal ratios of integers give equal
        floats and the order of unequal ones is kept for any count and weight below 2**26.
        """
        return self.in_flight / self.weight


class Strategy(Protocol):
    def order(
        self, candidates: Sequence[Candidate], *, affinity_key: str | None = None
    ) -> list[str]:
        """Every candidate's name once, best first; the caller tries them in order on failure."""
        ...


def make_strategy(name: str, rng: random.Random) -> Strategy:
    """The strategy called `name` in the config ([balancer] strategy)."""
    if name == "weighted-round-robin":
        return WeightedRoundRobin()
    if name == "least-connections":
        return LeastConnections()
    if name == "power-of-two":
        return PowerOfTwo(rng)
    if name == "prefix-affinity":
        return PrefixAffinity()
    if name == "least-loaded":
        # Imported here: least_loaded builds on this module's candidates and turns.
        from ntonix.core.least_loaded import LeastLoaded

        return LeastLoaded()
    raise ValueError(f"unknown balancer strategy {name!r}; expected one of {STRATEGIES}")


def _smooth_pick(current: dict[str, int], group: Sequence[Candidate]) -> Candidate:
    """One step of nginx's smooth weighted round-robin over `group`, updating `current`.

    Each member gains its weight, the richest (first on ties) is picked and pays the group's
    total weight back; over sum(weights) steps each member is picked exactly `weight` times,
    interleaved rather than in runs.
    """
    total = 0
    best = group[0]
    for candidate in group:
        current[candidate.name] = current.get(candidate.name, 0) + candidate.weight
        total += candidate.weight
        if current[candidate.name] > current[best.name]:
            best = candidate
    current[best.name] -= total
    return best


class _SmoothTurns:
    """The per-backend counters of smooth weighted round-robin, kept across calls."""

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def _counters(self, candidates: Sequence[Candidate]) -> dict[str, int]:
        # Names that left the candidate set are forgotten; newcomers start at 0.
        self._current = {c.name: self._current.get(c.name, 0) for c in candidates}
        return self._current


class WeightedRoundRobin(_SmoothTurns):
    """nginx's smooth weighted round-robin: weights 5, 1, 1 give a a b a c a a."""

    def order(
        self, candidates: Sequence[Candidate], *, affinity_key: str | None = None
    ) -> list[str]:
        current = self._counters(candidates)
        if not candidates:
            return []
        best = _smooth_pick(current, candidates)
        # Failover goes to whoever would be picked next.
        rest = sorted((c for c in candidates if c is not best), key=lambda c: -current[c.name])
        return [best.name, *(c.name for c in rest)]


class LeastConnections(_SmoothTurns):
    """Fewest in-flight requests per unit of weight; ties share by smooth weighted round-robin.

    As in nginx's least_conn, only the tied backends take a round-robin step, so equal idle
    backends take turns and idle backends of weights 3 and 1 split 3:1.
    """

    def order(
        self, candidates: Sequence[Candidate], *, affinity_key: str | None = None
    ) -> list[str]:
        current = self._counters(candidates)
        if not candidates:
            return []
        least = min(c.load for c in candidates)
        best = _smooth_pick(current, [c for c in candidates if c.load == least])
        rest = sorted(
            (c for c in candidates if c is not best), key=lambda c: (c.load, -current[c.name])
        )
        return [best.name, *(c.name for c in rest)]


class PowerOfTwo:
    """Power of two choices: draw two distinct backends by weight, take the less loaded one."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def order(
        self, candidates: Sequence[Candidate], *, affinity_key: str | None = None
    ) -> list[str]:
        if len(candidates) < 2:
            return [c.name for c in candidates]
        weights = [c.weight for c in candidates]
        first = self._draw(weights)
        weights[first] = 0
        second = self._draw(weights)
        a, b = candidates[first], candidates[second]
        best = b if b.load < a.load else a
        rest = sorted((c for c in candidates if c is not best), key=lambda c: c.load)
        return [best.name, *(c.name for c in rest)]

    def _draw(self, weights: Sequence[int]) -> int:
        point = self._rng.randrange(sum(weights))
        for index, weight in enumerate(weights):
            if point < weight:
                return index
            point -= weight
        raise AssertionError("unreachable: point < sum(weights)")


def _ring_hash(text: str) -> int:
    # blake2b, not hash(): Python salts str hashes per process, and every worker (and every
    # restart) must send a prefix to the same backend.
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@functools.lru_cache(maxsize=256)
def _ring_points(name: str, count: int) -> tuple[int, ...]:
    # Cached: the eligible set changes often (a 429, a trial in flight), the backends rarely.
    return tuple(_ring_hash(f"{name}#{index}") for index in range(count))


class PrefixAffinity:
    """Consistent hashing of the prompt prefix with bounded loads (Mirrokni et al., 2016).

    A ring holds `points_per_weight * weight` virtual nodes per backend. A key's home is the
    first backend clockwise from its hash whose in-flight count is below
    ceil(load_factor * (in flight + 1) * weight / total weight); fuller ones are passed over, so
    one hot prefix spills to its ring neighbours instead of overloading its home. Adding or
    removing a backend moves only the keys whose home it is. Without a key: least-connections.
    """

    def __init__(self, *, load_factor: float = 1.25, points_per_weight: int = 100) -> None:
        if load_factor < 1 or points_per_weight < 1:
            raise ValueError("load_factor must be >= 1 and points_per_weight >= 1")
        self._load_factor = Fraction(load_factor)
        self._points_per_weight = points_per_weight
        self._fallback = LeastConnections()
        self._ring_members: frozenset[tuple[str, int]] = frozenset()
        self._ring_hashes: list[int] = []
        self._ring_names: list[str] = []

    def order(
        self, candidates: Sequence[Candidate], *, affinity_key: str | None = None
    ) -> list[str]:
        if affinity_key is None:
            return self._fallback.order(candidates)
        if len(candidates) < 2:
            return [c.name for c in candidates]
        by_name = {c.name: c for c in candidates}
        walk = self._walk(by_name, _ring_hash(affinity_key))
        total_weight = sum(c.weight for c in candidates)
        demand = self._load_factor * (sum(c.in_flight for c in candidates) + 1) / total_weight
        with_room: list[str] = []
        full: list[str] = []
        for name in walk:
            candidate = by_name[name]
            fits = candidate.in_flight < math.ceil(demand * candidate.weight)
            (with_room if fits else full).append(name)
        # The capacities add up to more than the load, so with_room is never empty.
        return with_room + full

    def _walk(self, by_name: Mapping[str, Candidate], start: int) -> list[str]:
        """Distinct candidate names clockwise from `start` on the ring."""
        self._build_ring(by_name.values())
        hashes, names = self._ring_hashes, self._ring_names
        first = bisect.bisect_left(hashes, start)
        seen: dict[str, None] = {}
        for step in range(len(names)):
            seen.setdefault(names[(first + step) % len(names)])
            if len(seen) == len(by_name):
                break
        return list(seen)

    def _build_ring(self, candidates: Iterable[Candidate]) -> None:
        members = frozenset((c.name, c.weight) for c in candidates)
        if members == self._ring_members:
            return
        points = sorted(
            (point, name)
            for name, weight in members
            for point in _ring_points(name, weight * self._points_per_weight)
        )
        self._ring_members = members
        self._ring_hashes = [point for point, _ in points]
        self._ring_names = [name for _, name in points]


def affinity_key(payload: Mapping[str, object], chars: int = 256) -> str | None:
    """The first `chars` characters of the rendered prompt, or None when there is no prompt.

    Renders OpenAI chat (`messages`, with roles), OpenAI completions (`prompt`: a string, a
    list of strings or token ids) and Ollama chat / generate (`messages`, or `system` then
    `prompt`). Only text counts: images and other content parts are left out.
    """
    parts: list[str] = []
    system = payload.get("system")
    if isinstance(system, str) and system:
        parts.append(f"system: {system}\n")
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, Mapping):
                role = message.get("role")
                text = _content_text(message.get("content"))
                parts.append(f"{role if isinstance(role, str) else ''}: {text}\n")
    prompt = _prompt_text(payload.get("prompt"))
    if prompt:
        parts.append(prompt)
    rendered = "".join(parts)[:chars]
    return rendered or None


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: [{"type": "text", "text": ...}, ...]
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    return ""


def _prompt_text(prompt: object) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(item, str) for item in prompt):
            return "\n".join(prompt)
        if all(isinstance(item, int) for item in prompt):
            return " ".join(map(str, prompt))
    return ""
