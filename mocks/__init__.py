"""Mock LLM backends (OpenAI and Ollama APIs) for NTONIX's tests, benchmarks and demo."""

from mocks.backend import MockLLM, MockStats
from mocks.options import MockOptions
from mocks.serve import serve_mock

__all__ = ["MockLLM", "MockOptions", "MockStats", "serve_mock"]
