"""/metrics: Prometheus text from the gateway's snapshots, parsed with prometheus-client."""

from __future__ import annotations

import json

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ntonix.config import (
    AuthSettings,
    BackendSettings,
    BalancerSettings,
    Config,
    HealthSettings,
)
from tests.conftest import StartGatewayWith, StartMock
from tests.support import RawClient, SteerableMock, chat, eventually, wait_until


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_cache_results_and_show_backend_state(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock()
    gateway = await start_gateway_with(Config(backends=(BackendSettings(name="a", url=mock.url),)))
    url = f"{gateway}/v1/chat/completions"
    await client.post(url, json=chat("one"))  # miss
    await client.post(url, json=chat("one"))  # hit
    await client.post(url, json=chat("two", temperature=0.7))  # bypass: sampled
    response = await client.get(f"{gateway}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)
    assert samples[("ntonix_cache_hits_total", ())] == 1
    assert samples[("ntonix_cache_misses_total", ())] == 1
    assert samples[("ntonix_cache_bypass_total", ())] == 1
    assert samples[("ntonix_cache_entries", ())] == 1
    assert samples[("ntonix_cache_backend_requests_saved_total", ())] == 1
    assert samples[("ntonix_backend_state", (("backend", "a"), ("state", "closed")))] == 1
    assert samples[("ntonix_backend_state", (("backend", "a"), ("state", "open")))] == 0
    assert samples[("ntonix_backend_in_flight_requests", (("backend", "a"),))] == 0
    assert mock.stats["requests"] == 2


async def test_metrics_are_guarded_by_the_admin_token(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock()
    config = Config(
        backends=(BackendSettings(name="a", url=mock.url),), auth=AuthSettings(admin_token="s3")
    )
    gateway = await start_gateway_with(config)
    assert (await client.get(f"{gateway}/metrics")).status_code == 401
    allowed = await client.get(f"{gateway}/metrics", headers={"authorization": "Bearer s3"})
    assert allowed.status_code == 200
    assert (await client.get(f"{gateway}/ntonix/health")).status_code == 200


async def test_metrics_after_a_known_sequence_are_exact(
    start_mock: StartMock,
    start_steerable_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
) -> None:
    """A failover, two hits, a disconnect mid-stream and a bad request, counted exactly."""
    mock = await start_mock()
    broken = await start_steerable_mock("broken")
    assert isinstance(broken.mock, SteerableMock)
    broken.mock.forced_headers = {"x-mock-status": "500"}  # its probes still pass
    # The broken backend weighs most, so smooth WRR tries it first; one failure opens it.
    config = Config(
        backends=(
            BackendSettings(name="dead", url=broken.url, weight=100),
            BackendSettings(name="good", url=mock.url),
        ),
        balancer=BalancerSettings(strategy="weighted-round-robin"),
        health=HealthSettings(interval=600, failure_threshold=1, open_for=600, max_open_for=600),
    )
    gateway = await start_gateway_with(config)
    url = f"{gateway}/v1/chat/completions"
    first = await client.post(url, json=chat("one", stream=False))  # dead, then good: a miss
    assert first.headers["x-ntonix-backend"] == "good"
    hits = [await client.post(url, json=chat("one", stream=False)) for _ in range(2)]
    assert [hit.headers["x-ntonix-cache"] for hit in hits] == ["hit", "hit"]
    raw = await RawClient.connect(gateway)
    slow = {"x-mock-tokens": "200", "x-mock-token-delay": "0.02"}
    await raw.send_request("POST", "/v1/chat/completions", chat("two"), headers=slow)
    await raw.read_until(b'"content"')
    await raw.hang_up()
    await wait_until(lambda: mock.stats["client_disconnects"] == 1)
    bad = await client.post(url, content=b"{not json", headers={"content-type": "x/y"})
    assert bad.status_code == 400

    async def settled() -> bool:
        samples = _samples((await client.get(f"{gateway}/metrics")).text)
        return samples[("ntonix_active_requests", ())] == 0

    await eventually(settled)
    samples = _samples((await client.get(f"{gateway}/metrics")).text)

    def requests(backend: str, status: str, cache: str) -> float:
        labels = (
            ("backend", backend),
            ("cache", cache),
            ("route", "/v1/chat/completions"),
            ("status", status),
        )
        return samples[("ntonix_requests_total", labels)]

    assert requests("good", "200", "miss") == 2
    assert requests("", "200", "hit") == 2
    assert requests("", "400", "bypass") == 1
    assert sum(v for (name, _), v in samples.items() if name == "ntonix_requests_total") == 5
    assert (
        samples[("ntonix_upstream_attempts_total", _backend("dead", outcome="upstream_5xx"))] == 1
    )
    assert samples[("ntonix_upstream_attempts_total", _backend("good", outcome="completed"))] == 1
    assert (
        samples[("ntonix_upstream_attempts_total", _backend("good", outcome="client_disconnected"))]
        == 1
    )
    assert samples[("ntonix_retries_total", _backend("dead"))] == 1
    assert samples[("ntonix_failovers_total", _backend("good"))] == 1
    transition = (("backend", "dead"), ("from_state", "closed"), ("to_state", "open"))
    assert samples[("ntonix_breaker_transitions_total", transition)] == 1
    assert samples[("ntonix_backend_state", (("backend", "dead"), ("state", "open")))] == 1
    assert samples[("ntonix_client_disconnects_total", (("phase", "stream"),))] == 1
    assert samples[("ntonix_upstream_cancellations_total", _backend("good"))] == 1
    assert samples[("ntonix_cache_hits_total", ())] == 2
    assert samples[("ntonix_cache_misses_total", ())] == 2
    assert samples[("ntonix_cache_stored_total", ())] == 1  # the broken-off stream is not kept
    assert samples[("ntonix_cache_backend_requests_saved_total", ())] == 2
    # Hits come from no backend; their bytes are exactly what the client received.
    hit_bytes = sum(len(hit.content) for hit in hits)
    assert samples[("ntonix_response_bytes_total", _backend(""))] == hit_bytes + len(bad.content)
    assert samples[("ntonix_time_to_first_token_seconds_count", _backend(""))] == 2
    assert samples[("ntonix_time_to_first_token_seconds_count", _backend("good"))] == 2
    assert samples[("ntonix_request_duration_seconds_count", _backend(""))] == 3
    inf = (("backend", "good"), ("le", "+Inf"))
    assert samples[("ntonix_request_duration_seconds_bucket", inf)] == 2
    sent = [first, *hits, bad]
    raw_body = len(json.dumps(chat("two")).encode())
    assert samples[("ntonix_request_bytes_total", ())] == raw_body + sum(
        len(r.request.content) for r in sent
    )


def _backend(name: str, **more: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"backend": name, **more}.items()))
