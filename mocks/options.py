"""How a mock backend behaves when a request does not say otherwise."""

import attrs


@attrs.frozen
class MockOptions:
    """Defaults of one mock backend; `x-mock-*` request headers override them per request."""

    tokens: int = attrs.field(default=32, validator=attrs.validators.ge(0))
    token_delay: float = attrs.field(default=0.02, validator=attrs.validators.ge(0.0))  # seconds
    ttft: float = attrs.field(default=0.05, validator=attrs.validators.ge(0.0))  # seconds
    models: tuple[str, ...] = attrs.field(
        default=("mock-llm",), validator=attrs.validators.min_len(1)
    )
    fail_rate: float = attrs.field(
        default=0.0, validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)]
    )
    name: str = "mock"
    # A real queue: at most `slots` requests generate at once, the rest wait in arrival order.
    slots: int = attrs.field(default=0, validator=attrs.validators.ge(0))  # 0: no limit
    # Serve load signals as this engine does ("" serves none): see mocks/engines.py.
    engine: str = attrs.field(
        default="",
        validator=attrs.validators.in_(("", "vllm", "sglang", "llamacpp", "tgi", "ollama")),
    )
    # Models in memory at start (None: all of `models`); another one is loaded when first
    # asked for, which takes `load_time` seconds more before its first token.
    loaded: tuple[str, ...] | None = None
    load_time: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))
