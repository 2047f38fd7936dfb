"""The mock's load signals, in the flavour of one real engine, from the mock's true state.

Invariants: no I/O and no clock of its own (the caller passes `now`); each flavour serves the
same paths, metric names, types and label sets as the engine it imitates (tests/data/ has
samples of the real ones), so the gateway cannot tell a mock from the engine by its signals.
`waiting` counts requests queued for a slot, `running` those generating.
"""

from collections.abc import Callable

import attrs

from .generation import timestamp
from .options import MockOptions
from .replies import Reply, json_reply, whole_reply

FLAVOURS = ("vllm", "sglang", "llamacpp", "tgi", "ollama")
KEEP_ALIVE = 300.0  # Ollama keeps a model loaded 5 minutes after its last request
_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


@attrs.frozen
class EngineState:
    """What the mock is doing right now."""

    waiting: int
    running: int
    loaded: tuple[tuple[str, float], ...]  # (model, last used, time.time()) per loaded model


def _gauge(name: str, help_text: str, value: float, labels: str = "") -> str:
    return f"# HELP {name} {help_text}\n# TYPE {name} gauge\n{name}{labels} {value}\n"


def _kv(state: EngineState, options: MockOptions) -> float:
    # Each running request holds an equal share of the cache; with no slot limit, 16 fill it.
    return min(1.0, state.running / (options.slots or 16))


def _vllm(state: EngineState, options: MockOptions, now: float) -> Reply:
    labels = f'{{engine="0",model_name="{options.models[0]}"}}'
    text = (
        _gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
               float(state.running), labels)
        + _gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                 float(state.waiting), labels)
        + _gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                 _kv(state, options), labels)
    )  # fmt: skip
    return whole_reply(200, _PROMETHEUS, text.encode())


def _sglang(state: EngineState, options: MockOptions, now: float) -> Reply:
    labels = f'{{model_name="{options.models[0]}"}}'
    text = (
        _gauge("sglang:num_running_reqs", "The number of running requests.",
               float(state.running), labels)
        + _gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.",
                 float(state.waiting), labels)
        + _gauge("sglang:token_usage", "The token usage.", _kv(state, options), labels)
    )  # fmt: skip
    return whole_reply(200, _PROMETHEUS, text.encode())


def _llamacpp(state: EngineState, options: MockOptions, now: float) -> Reply:
    text = _gauge(
        "llamacpp:requests_processing", "Number of requests processing.", state.running
    ) + _gauge("llamacpp:requests_deferred", "Number of requests deferred.", state.waiting)
    return whole_reply(200, _PROMETHEUS, text.encode())


def _llamacpp_slots(state: EngineState, options: MockOptions, now: float) -> Reply:
    slots = [
        {"id": index, "n_ctx": 4096, "is_processing": index < state.running}
        for index in range(options.slots or max(1, state.running))
    ]
    return json_reply(200, slots)


def _tgi(state: EngineState, options: MockOptions, now: float) -> Reply:
    text = (
        f"# TYPE tgi_queue_size gauge\ntgi_queue_size {state.waiting}\n"
        f"# TYPE tgi_batch_current_size gauge\ntgi_batch_current_size {state.running}\n"
    )
    return whole_reply(200, _PROMETHEUS, text.encode())


def _ollama_ps(state: EngineState, options: MockOptions, now: float) -> Reply:
    models = [
        {
            "name": model,
            "model": model,
            "size": 0,
            "digest": "",
            "expires_at": timestamp(used + KEEP_ALIVE),
            "size_vram": 0,
        }
        for model, used in state.loaded
    ]
    return json_reply(200, {"models": models})


_ROUTES: dict[tuple[str, str], Callable[[EngineState, MockOptions, float], Reply]] = {
    ("vllm", "/metrics"): _vllm,
    ("sglang", "/metrics"): _sglang,
    ("llamacpp", "/metrics"): _llamacpp,
    ("llamacpp", "/slots"): _llamacpp_slots,
    ("tgi", "/metrics"): _tgi,
    ("ollama", "/api/ps"): _ollama_ps,
}


def signals_reply(
    path: str, options: MockOptions, state: EngineState, *, now: float
) -> Reply | None:
    """The engine's answer on `path`, or None when its flavour serves nothing there."""
    route = _ROUTES.get((options.engine, path))
    return None if route is None else route(state, options, now)
