"""Each engine's load signals, parsed from samples in that engine's own format (tests/data/)."""

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ntonix.core.engines import (
    LoadedModel,
    LoadReading,
    SignalError,
    detect_engine,
    read_llamacpp_slots,
    read_metrics,
    read_ollama_ps,
    serves_loaded,
)

DATA = Path(__file__).parent.parent / "data"


def sample(name: str) -> str:
    return (DATA / name).read_text()


@pytest.mark.parametrize(
    ("file", "expected"),
    [
        (
            "vllm_metrics.txt",
            LoadReading("vllm", 5, 3, 0.4213, None, (LoadedModel("Qwen/Qwen3-0.6B"),)),
        ),
        (
            "vllm_v0_metrics.txt",
            LoadReading(
                "vllm", 0, 7, 0.0871, None, (LoadedModel("meta-llama/Llama-3.1-8B-Instruct"),)
            ),
        ),
        (
            "sglang_metrics.txt",
            LoadReading(
                "sglang", 2, 28, 0.28, None, (LoadedModel("meta-llama/Llama-3.1-8B-Instruct"),)
            ),
        ),
        # Captured from a real llama-server: 2 slots generating, 3 requests deferred.
        ("llamacpp_metrics.txt", LoadReading("llamacpp", 3, 2, None, None, None)),
        ("llamacpp_old_metrics.txt", LoadReading("llamacpp", 0, 1, 0.25, None, None)),
        ("tgi_metrics.txt", LoadReading("tgi", 4, 16, None, None, None)),
    ],
)
def test_each_engines_metrics_page_is_read_and_detected(file: str, expected: LoadReading) -> None:
    assert read_metrics(sample(file)) == expected
    assert read_metrics(sample(file), expected.engine) == expected


def test_llamacpp_slots_give_running_and_capacity() -> None:
    reading = read_llamacpp_slots(json.loads(sample("llamacpp_slots.json")))
    # Captured from a real llama-server with 2 slots, one of them generating.
    assert reading == LoadReading("llamacpp", running=1, capacity=2)


def test_ollama_ps_gives_the_loaded_models_and_their_expiry() -> None:
    reading = read_ollama_ps(json.loads(sample("ollama_ps.json")))
    assert reading.engine == "ollama"
    assert reading.waiting is None and reading.running is None
    assert reading.models == (
        LoadedModel("llama3.2:latest", "2026-11-30T14:38:31.83753-07:00"),
        LoadedModel("nomic-embed-text:latest", "2026-11-30T14:33:02.117823-07:00"),
    )
    assert serves_loaded(reading, "llama3.2") is True  # Ollama's implicit :latest
    assert serves_loaded(reading, "llama3.2:latest") is True
    assert serves_loaded(reading, "qwen2.5") is False
    assert serves_loaded(LoadReading("tgi", 0, 0), "x") is None


def test_two_engines_of_one_server_add_up_and_the_fullest_cache_counts() -> None:
    text = (
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{engine="0",model_name="m"} 2\n'
        'vllm:num_requests_waiting{engine="1",model_name="m"} 3\n'
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2\n'
        'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.7\n'
    )
    reading = read_metrics(text)
    assert (reading.waiting, reading.running, reading.kv_usage) == (5, None, 0.7)


def test_detection_looks_at_queue_gauges_only() -> None:
    assert detect_engine(["vllm:prompt_tokens_total"]) is None
    assert detect_engine(["process_cpu_seconds_total", "tgi_queue_size"]) == "tgi"
    assert detect_engine(["sglang:num_running_reqs"]) == "sglang"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("process_cpu_seconds_total 1.5\n", "no vLLM, SGLang, llama.cpp or TGI load gauge"),
        ("vllm:num_requests_waiting{ 3\n", "not Prometheus text"),
        ("<html>502 Bad Gateway</html>", "not Prometheus text"),
        ("vllm:num_requests_waiting -1\n", "must be a finite number >= 0"),
        ("vllm:num_requests_waiting NaN\n", "must be a finite number >= 0"),
        ("vllm:num_requests_waiting +Inf\n", "must be a finite number >= 0"),
    ],
)
def test_a_broken_metrics_page_is_refused_with_a_reason(text: str, problem: str) -> None:
    with pytest.raises(SignalError, match=problem):
        read_metrics(text)


def test_a_page_of_another_engine_than_configured_is_refused() -> None:
    with pytest.raises(SignalError, match="no tgi queue gauge"):
        read_metrics(sample("vllm_metrics.txt"), "tgi")


@pytest.mark.parametrize(
    "payload", [{}, {"models": "x"}, {"models": [{"size": 1}]}, [], None, "models"]
)
def test_a_broken_ollama_ps_is_refused(payload: object) -> None:
    with pytest.raises(SignalError):
        read_ollama_ps(payload)


@pytest.mark.parametrize("payload", [{}, [1], [{"id": 0}], [{"is_processing": "yes"}]])
def test_broken_llamacpp_slots_are_refused(payload: object) -> None:
    with pytest.raises(SignalError):
        read_llamacpp_slots(payload)


@given(st.text(max_size=200))
def test_any_text_is_a_reading_or_a_signal_error(text: str) -> None:
    try:
        reading = read_metrics(text)
    except SignalError:
        return
    assert reading.engine in {"vllm", "sglang", "llamacpp", "tgi"}
    assert all(v is None or v >= 0 for v in (reading.waiting, reading.running, reading.kv_usage))


def test_engine_names_match_the_config() -> None:
    from ntonix.config import ENGINES as CONFIG_ENGINES
    from ntonix.core.engines import ENGINES

    assert CONFIG_ENGINES == ENGINES
