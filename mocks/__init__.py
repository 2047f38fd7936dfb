"""Mock LLM backends (OpenAI and Ollama APIs) for NTONIX's tests, benchmarks and demo."""

from .backend import MockLLM, MockStats
from .options import MockOptions
from .serve import serve_mock

__all__ = ["MockLLM", "MockOptions", "MockStats", "serve_mock"]
