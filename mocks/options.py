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
