"""Active health checks: one task per backend in the supervisor nursery.

Each probe is a GET of `health.path` (by default /v1/models, which vLLM, llama.cpp, Ollama and
SGLang all serve) through httpx, under `health.timeout`. Its outcome feeds the same health table
as live traffic, and the model list it returns teaches the table which models a backend serves.
A probe task never dies of an unexpected error: it logs it and probes again next period.
"""

from __future__ import annotations

import logging
import random
import ssl
from typing import Any

import httpx
import trio

from ntonix.backend_tasks import BackendTasks
from ntonix.config import BackendSettings, HealthSettings
from ntonix.core.health import HealthTable, Outcome, outcome_of_status
from ntonix.upstream import backend_ssl_context, describe_failure, out_of_resources

log = logging.getLogger("ntonix.prober")


def models_in(payload: Any) -> list[str] | None:
    """Model names from an OpenAI /v1/models or an Ollama /api/tags answer."""
    if not isinstance(payload, dict):
        return None
    if isinstance(payload.get("data"), list):
        entries, key = payload["data"], "id"
    elif isinstance(payload.get("models"), list):
        entries, key = payload["models"], "name"
    else:
        return None
    return [e[key] for e in entries if isinstance(e, dict) and isinstance(e.get(key), str)]


async def probe_once(
    client: httpx.AsyncClient, backend: BackendSettings, health: HealthTable, path: str
) -> None:
    """One GET of `path`; its outcome (and the models it lists) goes to the health table."""
    ticket = health.begin_probe(backend.name, trio.current_time())
    if ticket is None:  # removed by a reload meanwhile
        return
    outcome, error, models = Outcome.CLIENT_DISCONNECTED, "", None
    try:
        response = await client.get(backend.url.rstrip("/") + path)
        outcome = outcome_of_status(response.status_code)
        if outcome is Outcome.UPSTREAM_5XX:
            error = f"health probe answered {response.status_code}"
        elif outcome is Outcome.COMPLETED:
            try:
                models = models_in(response.json())
            except ValueError:
                models = None
    except httpx.TimeoutException:
        timeout = client.timeout.read or client.timeout.connect
        outcome, error = Outcome.TIMED_OUT, f"health probe timed out after {timeout} s"
    except httpx.HTTPError as failure:
        # Out of descriptors here says nothing about the backend.
        failed = Outcome.GATEWAY_FAILED if out_of_resources(failure) else Outcome.CONNECT_FAILED
        outcome = failed
        error = f"health probe failed: {describe_failure(failure, backend)}"
    finally:
        health.end(ticket, outcome, trio.current_time(), error=error, models=models)


async def probe_forever(
    backend: BackendSettings, health: HealthTable, settings: HealthSettings, rng: random.Random
) -> None:
    """Probe at once, then every `interval` with +-20% jitter, so backends are not probed in
    lockstep by every gateway worker."""
    context: ssl.SSLContext | bool = backend_ssl_context(backend) or True
    async with httpx.AsyncClient(timeout=settings.timeout, verify=context) as client:
        while True:
            try:
                await probe_once(client, backend, health, settings.path)
            except Exception:
                log.exception("health probe of %s crashed; probing again next period", backend.name)
            await trio.sleep(settings.interval * rng.uniform(0.8, 1.2))


class Probers(BackendTasks):
    """The probe tasks, kept in step with the configured backends across reloads."""

    def __init__(
        self, nursery: trio.Nursery, health: HealthTable, settings: HealthSettings
    ) -> None:
        super().__init__(nursery, settings)
        self._health = health

    async def work(
        self, backend: BackendSettings, settings: HealthSettings, rng: random.Random
    ) -> None:
        await probe_forever(backend, self._health, settings, rng)
