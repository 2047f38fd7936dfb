"""`ntonix status` rendering: fixed /ntonix/status JSON in, exact terminal text out."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from ntonix.status_table import (
    LAST_ERROR_WIDTH,
    any_backend_usable,
    backend_table,
    cache_line,
    hit_ratio,
    human_bytes,
    human_duration,
    render_status,
    truncate,
)

ANSI = re.compile(r"\x1b\[[0-9;]*m")

# What a gateway with three backends and a warm cache answers (trimmed of fields not shown).
STATUS: dict[str, Any] = {
    "version": "0.1.0",
    "cache": {
        "entries": 12,
        "bytes": 1_572_864,
        "hits": 30,
        "misses": 10,
        "coalesced": 10,
        "bypass": 4,
    },
    "uptime_seconds": 3725.5,
    "strategy": "least-connections",
    "workers": 2,
    "queued": 2,
    "backends": [
        {
            "name": "vllm-a",
            "state": "closed",
            "consecutive_failures": 0,
            "active_requests": 12,
            "latency_ms": 85.25,
            "last_error": "",
            "models": ["llama-8b"],
            "draining": False,
            "not_eligible_because": [],
        },
        {
            "name": "ollama-long-name",
            "state": "open",
            "consecutive_failures": 3,
            "active_requests": 0,
            "latency_ms": None,
            "last_error": "ConnectError: [Errno 111] Connection refused",
            "models": None,
            "draining": False,
            "not_eligible_because": ["circuit open for 8.2 s more after 3 failures"],
        },
        {
            "name": "b",
            "state": "half-open",
            "consecutive_failures": 3,
            "active_requests": 1,
            "latency_ms": 1234.0,
            "last_error": "upstream answered 502",
            "models": [],
            "draining": True,
            "not_eligible_because": ["half-open: the trial request is in flight"],
        },
    ],
}


def _status(**changes: Any) -> dict[str, Any]:
    status = copy.deepcopy(STATUS)
    status.update(changes)
    return status


def test_the_whole_output_for_a_typical_gateway() -> None:
    expected = [
        "BACKEND           STATE      IN-FLIGHT  LATENCY MS  FAILURES  MODELS    LAST ERROR"
        "                                    NOT ELIGIBLE BECAUSE",
        "vllm-a            closed            12        85.2         0  llama-8b  -"
        "                                             -",
        "ollama-long-name  open               0           -         3  any       ConnectError:"
        " [Errno 111] Connection refused  circuit open for 8.2 s more after 3 failures",
        "b                 half-open          1      1234.0         3  -         upstream"
        " answered 502                         draining; half-open: the trial request is in"
        " flight",
        "",
        "workers: 2  strategy: least-connections  queued: 2  uptime: 1h 02m  version: 0.1.0",
        "cache: 12 entries, 1.5 MiB, 30 hits, 10 misses, 10 coalesced, hit ratio 60.0%,"
        " backend requests saved 40",
    ]
    assert render_status(STATUS) == "\n".join(expected) + "\n"


def test_every_column_starts_at_the_same_offset_on_every_line() -> None:
    lines = backend_table(STATUS["backends"])
    header = lines[0]
    starts = [header.index(title) for title in ("STATE", "MODELS", "LAST ERROR")]
    for line in lines[1:]:
        for start in starts:
            assert line[start - 2 : start] == "  " and line[start] != " ", (line, start)


def test_numbers_are_right_aligned_under_their_titles() -> None:
    lines = backend_table(STATUS["backends"])
    end = lines[0].index("LATENCY MS") + len("LATENCY MS")
    assert [line[end - 6 : end] for line in lines[1:]] == ["  85.2", "     -", "1234.0"]


def test_a_long_last_error_is_cut_to_its_width_and_kept_on_one_line() -> None:
    error = "ReadTimeout: no byte for 60 s\nfrom http://10.0.0.11:8000 " + "x" * 100
    status = _status()
    status["backends"][0]["last_error"] = error
    row = backend_table(status["backends"])[1]
    cut = truncate(error, LAST_ERROR_WIDTH)
    assert len(cut) == LAST_ERROR_WIDTH
    assert cut == "ReadTimeout: no byte for 60 s from http://10...."
    assert cut in row
    assert "\n" not in row


@pytest.mark.parametrize(
    ("text", "width", "shown"),
    [("short", 10, "short"), ("exactly-10", 10, "exactly-10"), ("eleven chars", 10, "eleven...")],
)
def test_truncate(text: str, width: int, shown: str) -> None:
    assert truncate(text, width) == shown


def test_nulls_and_missing_keys_show_as_a_dash() -> None:
    sparse = {"backends": [{"name": "old", "state": "closed"}]}
    output = render_status(sparse)
    assert output.splitlines()[1].split() == ["old", "closed", "-", "-", "-", "any", "-", "-"]
    assert "workers: -  strategy: -  queued: -  uptime: -  version: -" in output
    assert "cache: off" in output


def test_a_gateway_without_a_cache_says_cache_off() -> None:
    assert cache_line(None) == "cache: off"
    assert render_status(_status(cache=None)).endswith("\ncache: off\n")


def test_an_empty_cache_has_no_hit_ratio_yet() -> None:
    empty = {"entries": 0, "bytes": 0, "hits": 0, "misses": 0, "coalesced": 0}
    assert cache_line(empty) == (
        "cache: 0 entries, 0 B, 0 hits, 0 misses, 0 coalesced, hit ratio -,"
        " backend requests saved 0"
    )
    assert cache_line({**empty, "entries": 1}).startswith("cache: 1 entry, ")


def test_zero_backends_is_a_header_and_a_note_and_no_usable_backend() -> None:
    status = _status(backends=[])
    lines = render_status(status).splitlines()
    assert lines[0].split()[:2] == ["BACKEND", "STATE"]
    assert lines[1] == "(no backends)"
    assert not any_backend_usable(status)


@pytest.mark.parametrize(
    ("states", "usable"),
    [
        (["closed", "open"], True),
        (["half-open"], True),
        (["open", "open"], False),
        ([], False),
    ],
)
def test_usable_means_some_circuit_is_not_open(states: list[str], usable: bool) -> None:
    status = {"backends": [{"name": str(i), "state": s} for i, s in enumerate(states)]}
    assert any_backend_usable(status) is usable


def test_without_colour_there_are_no_escape_codes() -> None:
    assert not ANSI.search(render_status(STATUS, colour=False))


def test_colour_paints_only_the_state_and_keeps_the_alignment() -> None:
    coloured = render_status(STATUS, colour=True)
    assert ANSI.sub("", coloured) == render_status(STATUS)
    lines = coloured.splitlines()
    assert "\x1b[32mclosed   \x1b[0m" in lines[1]  # green, padded inside the colour
    assert "\x1b[31mopen     \x1b[0m" in lines[2]  # red
    assert "\x1b[33mhalf-open\x1b[0m" in lines[3]  # yellow
    assert not ANSI.search(lines[0])  # the header stays plain
    assert not ANSI.search("\n".join(lines[4:]))


@pytest.mark.parametrize(
    ("count", "shown"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1_572_864, "1.5 MiB"),
        (268_435_456, "256.0 MiB"),
        (3 * 1024**3, "3.0 GiB"),
        (5 * 1024**4, "5.0 TiB"),
    ],
)
def test_human_bytes(count: int, shown: str) -> None:
    assert human_bytes(count) == shown


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0s"), (42.9, "42s"), (303, "5m 03s"), (7620, "2h 07m"), (273_600, "3d 04h")],
)
def test_human_duration(seconds: float, shown: str) -> None:
    assert human_duration(seconds) == shown


def test_hit_ratio_counts_each_cacheable_request_once() -> None:
    assert hit_ratio(0, 0, 0) is None
    assert hit_ratio(30, 10, 10) == 0.6
    assert hit_ratio(0, 5, 5) == 0


# --- The engines' load, a second table -----------------------------------------------------


def _loaded(status: dict[str, Any]) -> dict[str, Any]:
    """`status` with the load records a least-loaded gateway reports for its backends."""
    status = copy.deepcopy(status)
    vllm, ollama, plain = status["backends"]
    vllm["load"] = {
        "engine": "vllm",
        "reading": {
            "waiting": 3, "running": 8, "kv_usage": 0.8125, "capacity": 8,
            "loaded_models": [{"name": "llama-8b", "expires_at": None}],
        },
        "age_seconds": 0.4, "stale": False, "error": "", "estimated_load": 11,
        "slow_start": 1.0, "ttfb_ewma_ms": {"*": 182.25, "llama-8b": 182.25}, "score": 4.40625,
    }  # fmt: skip
    ollama["load"] = {
        "engine": "ollama",
        "reading": {
            "waiting": None, "running": None, "kv_usage": None, "capacity": None,
            "loaded_models": [
                {"name": "llama3:latest", "expires_at": "2026-12-06T20:00:00Z"},
                {"name": "qwen2:7b", "expires_at": "2026-12-06T20:05:00Z"},
            ],
        },
        "age_seconds": 12.75, "stale": True, "error": "load signals unreadable: ConnectError",
        "estimated_load": None, "slow_start": 1.0, "ttfb_ewma_ms": {}, "score": 1.0,
    }  # fmt: skip
    plain["load"] = {
        "engine": "none", "reading": None, "age_seconds": None, "stale": False,
        "error": "no load signal: GET /metrics answered 404", "estimated_load": None,
        "slow_start": 0.55, "ttfb_ewma_ms": {}, "score": 3.6364,
    }  # fmt: skip
    return status


def test_the_load_table_shows_each_engines_reading_its_age_and_the_score() -> None:
    output = render_status(_loaded(STATUS))
    table = output.split("\n\n")[1].splitlines()
    assert table == [
        "BACKEND           ENGINE  WAITING  RUNNING  KV USE  LOADED MODELS              READ AGO"
        "  TTFB MS  SCORE",
        "vllm-a            vllm          3        8   81.2%  llama-8b                       0.4s"
        "    182.2   4.41",
        "ollama-long-name  ollama        -        -       -  llama3:latest,qwen2:7b  12.8s stale"
        "        -   1.00",
        "b                 none          -        -       -  -                                 -"
        "        -   3.64",
    ]
    # The first table is unchanged, and the gateway and cache lines still close the output.
    assert output.startswith(render_status(STATUS).split("\n\n")[0] + "\n\n")
    assert output.endswith("\n\n" + "\n".join(render_status(STATUS).splitlines()[-2:]) + "\n")


def test_no_load_records_no_load_table() -> None:
    assert "ENGINE" not in render_status(STATUS)  # a gateway from before issue 13
    sparse = {"backends": [{"name": "old", "state": "closed", "load": None}]}
    assert "ENGINE" not in render_status(sparse)


def test_a_load_record_with_missing_keys_shows_dashes() -> None:
    status = {"backends": [{"name": "m", "state": "closed", "load": {"engine": "sglang"}}]}
    row = render_status(status).split("\n\n")[1].splitlines()[1]
    assert row.split() == ["m", "sglang", "-", "-", "-", "-", "-", "-", "-"]
