"""The config file contract (SPEC section 2): defaults, lookup order, one message per problem."""

import io
import math
import os
from pathlib import Path

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ntonix.config import (
    AuthSettings,
    BackendSettings,
    BalancerSettings,
    CacheSettings,
    Config,
    ConfigError,
    GatewaySettings,
    HealthSettings,
    KeySettings,
    WebSocketSettings,
    check_config_file,
    load_config,
)

# SPEC section 2, verbatim: every value in it is the documented default.
SPEC_EXAMPLE = """
[gateway]
max_request_body = 4194304      # bytes; larger requests get 413
upstream_connect_timeout = 2.0  # connecting to a backend
first_byte_timeout = 60.0       # request sent -> first response byte from the backend
idle_timeout = 30.0             # longest silence between two chunks of a stream
retries = 2                     # extra backends tried, only before the first byte reached the client
queue_timeout = 5.0             # longest wait for a free slot when every eligible backend is at max_concurrent
graceful_timeout = 30.0         # on SIGTERM/Ctrl-C: stop accepting, let streams finish this long, then cancel
body_timeout = 30.0             # the whole request body must arrive within this (else 408)
max_connections = 10000         # open client connections; more are refused
batch_aging = 10.0              # a batch request queued this long goes with the interactive ones
max_connections_per_client = 256  # open connections from one client address; 0 = no limit
handshake_timeout = 5.0         # a TLS handshake must complete within this

[[backends]]
name = "gpu-a"                  # unique; defaults to host:port
url = "http://127.0.0.1:11434"  # http or https
weight = 1                      # > 0
models = []                     # models it serves; empty = any
max_concurrent = 0              # in-flight requests this backend accepts; 0 = unlimited
api_key = ""                    # sent upstream as Bearer, replacing the client's credentials
ca_file = ""                    # extra CA bundle for an https backend
client_cert = ""                # client certificate and key for mTLS to this backend
client_key = ""
tls_verify = true               # false only on purpose: logged as a warning at start-up
engine = "auto"                 # whose load signals to read: "vllm", "sglang", "llamacpp", "tgi", "ollama", "none"; "auto" detects

[balancer]
strategy = "least-loaded"       # or "least-connections", "weighted-round-robin" (nginx's smooth WRR), "power-of-two", "prefix-affinity"
slow_start = 30.0               # a backend back from an open circuit (or added by a reload) ramps from 10% to its weight

[health]
interval = 5.0                  # active probe period per backend (with jitter)
timeout = 2.0
path = "/v1/models"             # served by vLLM, llama.cpp, Ollama and SGLang alike; also teaches the model list
failure_threshold = 3           # consecutive failures (probe or live traffic) that open the circuit
open_for = 10.0                 # first ejection; doubles on each re-open, capped at max_open_for
max_open_for = 300.0
load_interval = 1.0             # how often each backend's own load signals are read (with jitter)
load_timeout = 0.5              # one read of them; a slow one never delays a request

[cache]
enabled = true
max_entries = 10000
max_bytes = 268435456
ttl = 600.0
scope = "key"                   # "key": one cache per API key; "global": shared by all clients
deterministic_only = true       # cache only requests with temperature 0 or a seed; false = cache all

[auth]
api_keys = []                   # empty = no client auth
api_keys_file = ""              # one key per line; re-read on reload
admin_token = ""                # guards /ntonix/* (but health and ready) and /metrics when set
requests_per_minute = 0         # per API key (per client address without auth); 0 = off
max_concurrent_per_key = 0      # in-flight requests per API key; 0 = off
keys = []                       # named keys: [[auth.keys]] tables (name, key or key_sha256, limits)

[usage]
request_stream_usage = true     # ask OpenAI streams for usage; the client still gets what it asked for
"""  # noqa: E501 (verbatim)

ONE_BACKEND = '[[backends]]\nurl = "http://10.0.0.1:8000"\n'


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        Config.from_toml(text)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


# --- Defaults ------------------------------------------------------------------------------


def test_spec_example_parses_to_the_attrs_defaults() -> None:
    config = Config.from_toml(SPEC_EXAMPLE)
    assert config == Config(backends=(BackendSettings(name="gpu-a", url="http://127.0.0.1:11434"),))
    assert config.gateway == GatewaySettings()
    assert config.balancer == BalancerSettings()
    assert config.health == HealthSettings()
    assert config.cache == CacheSettings()
    assert config.auth == AuthSettings()


def test_spec_example_sets_every_key_there_is() -> None:
    # If a key is added to a record, SPEC section 2 and this example must learn it too.
    data = Config.from_toml(SPEC_EXAMPLE)
    sections = (data.gateway, data.balancer, data.health, data.cache, data.auth, data.usage)
    for section in sections:
        assert {f.name for f in attrs.fields(type(section))} <= set(SPEC_EXAMPLE.split())
    assert {f.name for f in attrs.fields(BackendSettings) if f.init} <= set(SPEC_EXAMPLE.split())
    assert {f.name for f in attrs.fields(KeySettings)} <= set(NAMED_KEY.split())


NAMED_KEY = """
[[auth.keys]]
name = "team-a"                 # shown in logs, metrics and /ntonix/usage; never the key
key = "sk-team-a"               # or key_sha256 = "<64 hex digits>", so the file holds no secret
key_sha256 = ""
requests_per_minute = 0         # 0 = no limit
tokens_per_minute = 0
tokens_per_day = 0
max_concurrent = 0
priority = "interactive"        # or "batch": queued behind interactive requests until they age
weight = 1                      # share of freed slots among the keys of its priority
models = []                     # models it may use; empty = all
"""


def test_named_keys_parse_with_their_limits_and_refuse_what_is_wrong() -> None:
    config = Config.from_toml(ONE_BACKEND + NAMED_KEY.replace('key_sha256 = ""', ""))
    (team,) = config.auth.keys
    assert team == KeySettings(name="team-a", key="sk-team-a")
    hashed = '[[auth.keys]]\nname = "h"\nkey_sha256 = "' + "A1" * 32 + '"\n'
    assert Config.from_toml(ONE_BACKEND + hashed).auth.keys[0].key_sha256 == "A1" * 32
    problems = problems_of(
        ONE_BACKEND
        + '[[auth.keys]]\nname = "a"\nkey = "sk-secret"\nkey_sha256 = "'
        + "0" * 64
        + '"\n'
        + '[[auth.keys]]\nname = "a"\nkey = "sk-secret"\npriority = "low"\nweight = 0\n'
        + '[[auth.keys]]\nkey_sha256 = "xyz"\n'
    )
    assert problems == [
        "auth.keys[0].key: set exactly one of key and key_sha256",
        'auth.keys[1].priority: must be one of "interactive", "batch" (got "low")',
        "auth.keys[1].weight: must be an integer > 0 (got 0)",
        'auth.keys[1].name: "a" is already used by auth.keys[0]',
        "auth.keys[1]: holds the same key as auth.keys[0] (value not shown)",
        'auth.keys[2].key_sha256: must be 64 hexadecimal digits (the key\'s SHA-256) (got "xyz")',
        'auth.keys[2].name: required (shown in logs and metrics, say "team-a")',
    ]
    assert not any("sk-secret" in problem for problem in problems)
    assert problems_of(ONE_BACKEND + "[auth]\nkeys = 3\n") == [
        "auth.keys: must be an array of [[auth.keys]] tables (got 3)"
    ]


def test_built_in_default_is_one_local_ollama() -> None:
    config = Config.default()
    (backend,) = config.backends
    assert backend.name == "127.0.0.1:11434"
    assert backend.url == "http://127.0.0.1:11434"
    assert backend.host_header == b"127.0.0.1:11434"
    assert config == Config(backends=config.backends)


def test_only_backends_is_required() -> None:
    config = Config.from_toml(ONE_BACKEND)
    assert config.backends[0].name == "10.0.0.1:8000"
    assert config.gateway == GatewaySettings()


def test_int_is_accepted_where_seconds_are_expected() -> None:
    config = Config.from_toml(ONE_BACKEND + "[gateway]\nidle_timeout = 5\n")
    assert config.gateway.idle_timeout == 5.0
    assert isinstance(config.gateway.idle_timeout, float)


def test_lists_become_tuples_so_records_stay_frozen_and_hashable() -> None:
    config = Config.from_toml(ONE_BACKEND + 'models = ["llama3", "qwen"]\n')
    assert config.backends[0].models == ("llama3", "qwen")
    hash(config)


def test_secrets_stay_out_of_repr() -> None:
    config = Config.from_toml(
        '[[backends]]\nurl = "http://h"\napi_key = "sk-upstream"\n'
        '[auth]\napi_keys = ["sk-client"]\nadmin_token = "sk-admin"\n'
    )
    assert "sk-" not in repr(config)


# --- Lookup order --------------------------------------------------------------------------


def write_config(path: Path, url: str) -> str:
    path.write_text(f'[[backends]]\nurl = "{url}"\n')
    return str(path)


def test_explicit_path_beats_environment_and_local_file(tmp_path: Path) -> None:
    explicit = write_config(tmp_path / "explicit.toml", "http://explicit")
    env = write_config(tmp_path / "env.toml", "http://env")
    write_config(tmp_path / "ntonix.toml", "http://local")
    config = load_config(explicit, environ={"NTONIX_CONFIG": env}, cwd=str(tmp_path))
    assert config.backends[0].host == "explicit"


def test_environment_beats_local_file(tmp_path: Path) -> None:
    env = write_config(tmp_path / "env.toml", "http://env")
    write_config(tmp_path / "ntonix.toml", "http://local")
    config = load_config(environ={"NTONIX_CONFIG": env}, cwd=str(tmp_path))
    assert config.backends[0].host == "env"


def test_relative_environment_path_is_taken_from_cwd(tmp_path: Path) -> None:
    write_config(tmp_path / "env.toml", "http://env")
    config = load_config(environ={"NTONIX_CONFIG": "env.toml"}, cwd=str(tmp_path))
    assert config.backends[0].host == "env"


def test_local_file_beats_built_in_default(tmp_path: Path) -> None:
    write_config(tmp_path / "ntonix.toml", "http://local")
    assert load_config(environ={}, cwd=str(tmp_path)).backends[0].host == "local"


def test_empty_environment_variable_counts_as_unset(tmp_path: Path) -> None:
    write_config(tmp_path / "ntonix.toml", "http://local")
    config = load_config(environ={"NTONIX_CONFIG": ""}, cwd=str(tmp_path))
    assert config.backends[0].host == "local"


def test_built_in_default_when_nothing_is_configured(tmp_path: Path) -> None:
    assert load_config(environ={}, cwd=str(tmp_path)) == Config.default()


def test_missing_file_named_by_the_environment_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"NTONIX_CONFIG": missing}, cwd=str(tmp_path))
    (problem,) = caught.value.problems
    assert problem.startswith(f"{missing}: cannot read the config file")


def test_broken_local_file_is_reported_not_skipped(tmp_path: Path) -> None:
    (tmp_path / "ntonix.toml").write_text("[gateway\n")
    with pytest.raises(ConfigError, match=r"ntonix\.toml: invalid TOML"):
        load_config(environ={}, cwd=str(tmp_path))


# --- One message per problem ---------------------------------------------------------------


@attrs.frozen
class Bad:
    """A config that must be refused, and the key path its problem must start with."""

    why: str
    toml: str
    key: str


BAD_CONFIGS = [
    Bad("typo in a key", ONE_BACKEND + "[gateway]\nidle_timout = 3\n", "gateway.idle_timout"),
    Bad("typo in a section", ONE_BACKEND + "[gatway]\nretries = 1\n", "gatway"),
    Bad("typo in a backend key", ONE_BACKEND + "wieght = 2\n", "backends[0].wieght"),
    Bad(
        "key in the wrong table",
        ONE_BACKEND + "[gateway]\nstrategy = 'power-of-two'\n",
        "gateway.strategy",
    ),
    Bad("string for an int", ONE_BACKEND + "[gateway]\nretries = '2'\n", "gateway.retries"),
    Bad("bool for an int", ONE_BACKEND + "[gateway]\nretries = true\n", "gateway.retries"),
    Bad(
        "bool for seconds", ONE_BACKEND + "[gateway]\nidle_timeout = true\n", "gateway.idle_timeout"
    ),
    Bad(
        "float for an int",
        ONE_BACKEND + "[gateway]\nmax_connections = 1.5\n",
        "gateway.max_connections",
    ),
    Bad("string for a bool", ONE_BACKEND + "tls_verify = 'false'\n", "backends[0].tls_verify"),
    Bad(
        "negative duration",
        ONE_BACKEND + "[gateway]\nqueue_timeout = -1\n",
        "gateway.queue_timeout",
    ),
    Bad(
        "zero timeout",
        ONE_BACKEND + "[gateway]\nupstream_connect_timeout = 0\n",
        "gateway.upstream_connect_timeout",
    ),
    Bad(
        "infinite duration",
        ONE_BACKEND + "[gateway]\ngraceful_timeout = inf\n",
        "gateway.graceful_timeout",
    ),
    Bad("nan duration", ONE_BACKEND + "[health]\ninterval = nan\n", "health.interval"),
    Bad(
        "zero body limit",
        ONE_BACKEND + "[gateway]\nmax_request_body = 0\n",
        "gateway.max_request_body",
    ),
    Bad("zero weight", ONE_BACKEND + "weight = 0\n", "backends[0].weight"),
    Bad(
        "negative max_concurrent",
        ONE_BACKEND + "max_concurrent = -1\n",
        "backends[0].max_concurrent",
    ),
    Bad("ftp url", '[[backends]]\nurl = "ftp://h"\n', "backends[0].url"),
    Bad("url without scheme", '[[backends]]\nurl = "127.0.0.1:8000"\n', "backends[0].url"),
    Bad("url without host", '[[backends]]\nurl = "http://:8000"\n', "backends[0].url"),
    Bad("port 0", '[[backends]]\nurl = "http://h:0"\n', "backends[0].url"),
    Bad("port too big", '[[backends]]\nurl = "http://h:70000"\n', "backends[0].url"),
    Bad("port not a number", '[[backends]]\nurl = "http://h:x"\n', "backends[0].url"),
    Bad("space in url", '[[backends]]\nurl = "http://gpu a:8000"\n', "backends[0].url"),
    Bad("query in url", '[[backends]]\nurl = "http://h/v1?x=1"\n', "backends[0].url"),
    Bad("fragment in url", '[[backends]]\nurl = "http://h/#top"\n', "backends[0].url"),
    Bad("userinfo in url", '[[backends]]\nurl = "http://u:p@h"\n', "backends[0].url"),
    Bad("empty url", '[[backends]]\nurl = ""\n', "backends[0].url"),
    Bad("bad IPv6", '[[backends]]\nurl = "http://[::zz]:80"\n', "backends[0].url"),
    Bad("no url", '[[backends]]\nname = "a"\n', "backends[0].url"),
    Bad("empty name", ONE_BACKEND + 'name = ""\n', "backends[0].name"),
    Bad(
        "same explicit name",
        ONE_BACKEND + 'name = "a"\n' + ONE_BACKEND + 'name = "a"\n',
        "backends[1].name",
    ),
    Bad("same default name", ONE_BACKEND + ONE_BACKEND, "backends[1].name"),
    Bad("no backends", "backends = []\n", "backends"),
    Bad("backends missing", "[gateway]\nretries = 1\n", "backends"),
    Bad("backends as one table", '[backends]\nurl = "http://h"\n', "backends"),
    Bad("backend not a table", "backends = [1]\n", "backends[0]"),
    Bad("section not a table", "gateway = 5\n" + ONE_BACKEND, "gateway"),
    Bad("models not a list", ONE_BACKEND + "models = 'llama3'\n", "backends[0].models"),
    Bad("empty model name", ONE_BACKEND + "models = ['a', '']\n", "backends[0].models"),
    Bad("model not a string", ONE_BACKEND + "models = [3]\n", "backends[0].models"),
    Bad("unknown strategy", ONE_BACKEND + "[balancer]\nstrategy = 'random'\n", "balancer.strategy"),
    Bad("unknown scope", ONE_BACKEND + "[cache]\nscope = 'user'\n", "cache.scope"),
    Bad("cert without key", ONE_BACKEND + "client_cert = 'c.pem'\n", "backends[0].client_key"),
    Bad("key without cert", ONE_BACKEND + "client_key = 'k.pem'\n", "backends[0].client_cert"),
    Bad("probe path without slash", ONE_BACKEND + "[health]\npath = 'v1/models'\n", "health.path"),
    Bad(
        "max_open_for below open_for",
        ONE_BACKEND + "[health]\nopen_for = 60\nmax_open_for = 30\n",
        "health.max_open_for",
    ),
    Bad(
        "zero failure threshold",
        ONE_BACKEND + "[health]\nfailure_threshold = 0\n",
        "health.failure_threshold",
    ),
    Bad("zero cache entries", ONE_BACKEND + "[cache]\nmax_entries = 0\n", "cache.max_entries"),
    Bad("zero cache bytes", ONE_BACKEND + "[cache]\nmax_bytes = 0\n", "cache.max_bytes"),
    Bad("negative ttl", ONE_BACKEND + "[cache]\nttl = -1.0\n", "cache.ttl"),
    Bad("empty api key", ONE_BACKEND + "[auth]\napi_keys = ['k', '']\n", "auth.api_keys"),
    Bad(
        "negative rate",
        ONE_BACKEND + "[auth]\nrequests_per_minute = -1\n",
        "auth.requests_per_minute",
    ),
    Bad(
        "a tier ca_file without TLS",
        ONE_BACKEND + "[shared]\nurl = 'valkey://v:6379'\nca_file = 'ca.pem'\n",
        "shared.ca_file",
    ),
    Bad(
        "a ca_file for the embedded tier",
        ONE_BACKEND + "[shared]\nurl = 'embedded'\nca_file = 'ca.pem'\n",
        "shared.ca_file",
    ),
]


@pytest.mark.parametrize("bad", BAD_CONFIGS, ids=[bad.why for bad in BAD_CONFIGS])
def test_bad_config_is_refused_naming_the_key(bad: Bad) -> None:
    problems = problems_of(bad.toml)
    assert [p for p in problems if p.startswith(bad.key + ":")], problems


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            ONE_BACKEND + "[gateway]\nidle_timeout = -1\n",
            "gateway.idle_timeout: must be a number of seconds > 0 (got -1)",
        ),
        (
            ONE_BACKEND + "[gateway]\nidle_timout = 3\n",
            "gateway.idle_timout: unknown key (did you mean idle_timeout?)",
        ),
        ("[gatway]\n" + ONE_BACKEND, "gatway: unknown key (did you mean gateway?)"),
        (
            ONE_BACKEND + "[gateway]\nstrategy = 'power-of-two'\n",
            "gateway.strategy: unknown key here (it belongs in [balancer])",
        ),
        ("backends = []\n", "backends: at least one [[backends]] entry is required"),
        (
            ONE_BACKEND + "[balancer]\nstrategy = 'random'\n",
            'balancer.strategy: must be one of "least-loaded", "least-connections", '
            '"weighted-round-robin", "power-of-two", "prefix-affinity" (got "random")',
        ),
        (
            '[[backends]]\nurl = "http://h:0"\n',
            'backends[0].url: port must be an integer in 1..65535 (got "http://h:0")',
        ),
        (
            ONE_BACKEND + "[shared]\nlookup_hold = -0.001\n",
            "shared.lookup_hold: must be a number of seconds >= 0 (got -0.001)",
        ),
        (
            ONE_BACKEND + "[shared]\ntimeout = 0.01\nlookup_hold = 0.01\n",
            "shared.lookup_hold: must be less than timeout (0.01), which it counts against "
            "(got 0.01)",
        ),
    ],
)
def test_messages_read_well(toml: str, message: str) -> None:
    assert message in problems_of(toml)


def test_a_key_written_after_a_backend_table_is_pointed_at_its_table() -> None:
    # The classic TOML slip: a top-level key below [[backends]] lands inside the backend.
    (problem,) = problems_of(ONE_BACKEND + "retries = 3\n")
    assert problem == "backends[0].retries: unknown key here (it belongs in [gateway])"


def test_two_backends_with_the_same_default_name_are_told_to_set_name() -> None:
    (problem,) = problems_of(ONE_BACKEND + ONE_BACKEND)
    assert problem.startswith('backends[1].name: "10.0.0.1:8000" is already used by backends[0]')
    assert "set `name`" in problem


def test_every_problem_is_reported_at_once_in_file_order() -> None:
    toml = """
    [gateway]
    idle_timeout = 0
    retries = -1
    [[backends]]
    url = "ftp://a"
    [[backends]]
    url = "http://b"
    weight = 0
    [cache]
    scope = "user"
    [surprise]
    """
    keys = [p.partition(":")[0] for p in problems_of(toml)]
    assert keys == [
        "gateway.idle_timeout",
        "gateway.retries",
        "backends[0].url",
        "backends[1].weight",
        "cache.scope",
        "surprise",
    ]


def test_secrets_are_never_echoed_in_messages() -> None:
    toml = """
    [[backends]]
    url = "http://user:hunter2@h"
    [[backends]]
    url = "http://h"
    api_key = 4242
    [auth]
    api_keys = ["sk-live-1", ""]
    admin_token = 31337
    """
    text = "\n".join(problems_of(toml))
    for secret in ("hunter2", "4242", "sk-live-1", "31337"):
        assert secret not in text
    assert text.count("value not shown") == 3


def test_toml_syntax_error_gives_line_and_column() -> None:
    (problem,) = problems_of(ONE_BACKEND + "[gateway]\nretries = = 2\n")
    assert problem.startswith("invalid TOML:")
    assert problem.endswith("(at line 4, column 11)")


@pytest.mark.parametrize("data", [[], "backends", 3, None])
def test_top_level_that_is_not_a_table_is_a_message(data: object) -> None:
    with pytest.raises(ConfigError, match=r"^top level: must be a table"):
        Config.from_mapping(data)  # type: ignore[arg-type]


def test_non_string_keys_from_python_callers_are_unknown_keys() -> None:
    with pytest.raises(ConfigError, match=r"^backends\[0\]\.1: unknown key"):
        Config.from_mapping({"backends": [{"url": "http://h", 1: 2}]})


def test_every_rule_names_a_real_key() -> None:
    from ntonix.config_validation import _RULES, _TABLES

    assert set(_RULES) == {*_TABLES.values(), KeySettings}  # [[auth.keys]] lives in [auth]
    for record, rules in _RULES.items():
        assert set(rules) <= {f.name for f in attrs.fields(record) if f.init}


# Anything a TOML parser (or a careless Python caller) can produce.
toml_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text("htps:/[]@?#.1:80 é-", max_size=16),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["url", "name", "weight", "retries", "x"]), inner, max_size=3
        )
    ),
    max_leaves=12,
)
section_names = st.sampled_from(["gateway", "backends", "health", "cache", "auth", "balancer", "y"])


@given(st.dictionaries(section_names, toml_values, max_size=4))
def test_any_input_gives_a_config_or_a_config_error(data: dict[str, object]) -> None:
    try:
        Config.from_mapping(data)
    except ConfigError as err:
        assert err.problems
        assert all(problem and "\n" not in problem for problem in err.problems)


# --- Backend URLs --------------------------------------------------------------------------


@attrs.frozen
class Url:
    url: str
    scheme: str
    host: str
    port: int
    base_path: str
    host_header: bytes
    default_name: str


URLS = [
    Url(
        "http://127.0.0.1:11434",
        "http",
        "127.0.0.1",
        11434,
        "",
        b"127.0.0.1:11434",
        "127.0.0.1:11434",
    ),
    Url("http://gpu-a", "http", "gpu-a", 80, "", b"gpu-a", "gpu-a:80"),
    Url("https://gpu-a", "https", "gpu-a", 443, "", b"gpu-a", "gpu-a:443"),
    Url("https://gpu-a:8443/", "https", "gpu-a", 8443, "", b"gpu-a:8443", "gpu-a:8443"),
    Url("http://gpu-a:443", "http", "gpu-a", 443, "", b"gpu-a:443", "gpu-a:443"),
    Url("http://[::1]:8080", "http", "::1", 8080, "", b"[::1]:8080", "[::1]:8080"),
    Url("https://[::1]", "https", "::1", 443, "", b"[::1]", "[::1]:443"),
    Url("http://h:8000/prefix/", "http", "h", 8000, "/prefix", b"h:8000", "h:8000"),
    Url("HTTP://GPU-A:80/v1", "http", "gpu-a", 80, "/v1", b"gpu-a", "gpu-a:80"),
]


@pytest.mark.parametrize("case", URLS, ids=[case.url for case in URLS])
def test_url_parts_are_derived_once(case: Url) -> None:
    backend = Config.from_toml(f'[[backends]]\nurl = "{case.url}"\n').backends[0]
    assert backend.name == case.default_name
    assert backend.url == case.url
    assert (backend.scheme, backend.host, backend.port) == (case.scheme, case.host, case.port)
    assert (backend.base_path, backend.host_header) == (case.base_path, case.host_header)


def test_derived_url_parts_follow_evolve() -> None:
    backend = BackendSettings(name="a", url="http://h:8000")
    moved = attrs.evolve(backend, url="https://other/v1/")
    assert (moved.scheme, moved.host, moved.port, moved.base_path) == ("https", "other", 443, "/v1")


def test_constructing_a_backend_with_an_unusable_url_raises_value_error() -> None:
    with pytest.raises(ValueError, match="must start with http:// or https://"):
        BackendSettings(name="a", url="localhost:8000")


# --- ntonix check-config -------------------------------------------------------------------


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(ONE_BACKEND + ONE_BACKEND.replace("10.0.0.1", "10.0.0.2"))
    out = io.StringIO()
    assert check_config_file(str(path), out) == 0
    assert out.getvalue() == f"ok: {path} (2 backends)\n"


def test_check_config_prints_one_line_per_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(ONE_BACKEND + "weight = 0\n[gateway]\nidle_timeout = -1\n")
    out = io.StringIO()
    assert check_config_file(str(path), out) == 1
    assert out.getvalue() == (
        "backends[0].weight: must be an integer > 0 (got 0)\n"
        "gateway.idle_timeout: must be a number of seconds > 0 (got -1)\n"
    )


def test_check_config_reports_an_unreadable_file(tmp_path: Path) -> None:
    out = io.StringIO()
    assert check_config_file(str(tmp_path), out) == 1  # a directory
    assert out.getvalue().startswith(f"{tmp_path}: cannot read the config file")


def test_check_config_reports_syntax_errors_with_their_position(tmp_path: Path) -> None:
    path = tmp_path / "syntax.toml"
    path.write_text('[[backends]]\nurl = "http://h\n')
    out = io.StringIO()
    assert check_config_file(str(path), out) == 1
    assert out.getvalue().startswith(f"{path}: invalid TOML:")
    assert "line 2" in out.getvalue()


def test_check_config_reports_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[[backends]]\nurl = "http://h"\nname = "caf\xe9"\n')
    out = io.StringIO()
    assert check_config_file(os.fspath(path), out) == 1
    assert "not UTF-8" in out.getvalue()


def test_a_utf8_bom_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + ONE_BACKEND.encode())
    assert math.isclose(Config.from_file(path).gateway.idle_timeout, 30.0)


# --- docs/configuration.md -----------------------------------------------------------------


def test_the_documented_example_is_a_valid_config() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    (example,) = [block.split("```")[0] for block in doc.split("```toml\n")[1:]]
    config = Config.from_toml(example)
    assert [b.name for b in config.backends] == ["vllm-a", "vllm-b", "ollama"]


# --- [websocket] ---------------------------------------------------------------------------


def test_the_websocket_section_has_defaults_and_rules() -> None:
    assert Config.from_toml(ONE_BACKEND).websocket == WebSocketSettings(
        max_message_size=16 * 1024 * 1024, idle_timeout=60.0, ping_interval=20.0
    )
    tuned = Config.from_toml(
        ONE_BACKEND + "[websocket]\nmax_message_size = 1024\nping_interval = 0\n"
    )
    assert tuned.websocket.max_message_size == 1024 and tuned.websocket.ping_interval == 0
    with pytest.raises(ConfigError) as caught:
        Config.from_toml(ONE_BACKEND + "[websocket]\nmax_message_size = 0\nidle_timeout = 0\n")
    assert caught.value.problems == [
        "websocket.max_message_size: must be a number of bytes > 0 (got 0)",
        "websocket.idle_timeout: must be a number of seconds > 0 (got 0)",
    ]
