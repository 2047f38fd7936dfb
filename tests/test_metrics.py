"""/metrics: Prometheus text from the gateway's snapshots, parsed with prometheus-client."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ntonix.config import AuthSettings, BackendSettings, Config
from tests.conftest import StartGatewayWith, StartMock
from tests.support import chat


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
