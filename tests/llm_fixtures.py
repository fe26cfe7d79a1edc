"""Fixtures shared by the LLM tool tests (test_judge.py, test_refiner.py): fake keys, a clean SDK environment, the fake
server, and the seed text the prompts are checked against.

A test module takes them with::

    from llm_fixtures import llm_env, serve
    pytestmark = pytest.mark.usefixtures("llm_env")
    server = serve(gemini=my_default_handler)
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from fake_llm_server import FakeLLMServer, Reply

# Distinctive fake keys: the tests assert they never appear in logs, stdout or files.
GEMINI_KEY = "AIzaFAKE-test-key-7f3c9d1e5b"
OPENAI_KEY = "sk-FAKE-refiner-key-0b4e8a2c91"
# Environment variables that would send either SDK somewhere else or with other credentials.
FOREIGN_ENV = ("GOOGLE_API_KEY", "GOOGLE_GENAI_USE_VERTEXAI", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID")


@pytest.fixture
def llm_env(monkeypatch):
    """Both SDKs' keys set to the fake keys; everything else that could redirect them cleared."""
    monkeypatch.setenv("GEMINI_API_KEY", GEMINI_KEY)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    for name in FOREIGN_ENV:
        monkeypatch.delenv(name, raising=False)


def serve(**handlers: Callable[[dict], Reply]):
    """A ``server`` fixture: a running :class:`FakeLLMServer` whose ``gemini`` / ``openai`` endpoints answer with
    ``handlers`` unless a test sets its own."""

    unknown = set(handlers) - {"gemini", "openai"}
    if unknown:
        raise TypeError(f"serve(): unknown endpoints {sorted(unknown)} (gemini, openai)")

    @pytest.fixture
    def server(llm_env):
        with FakeLLMServer() as s:
            for endpoint, handler in handlers.items():
                setattr(s, endpoint, handler)
            yield s

    return server


def seed_text(marker: str) -> str | None:
    """The seed supplement's text if it contains ``marker`` (e.g. ``"Prompt 11.1"``), else None."""
    here = Path(__file__).resolve()
    for d in (here.parents[1] / "shared" / "seed", Path("/work/shared/seed")):
        if d.is_dir():
            for f in sorted(d.glob("*.txt")):
                t = f.read_text(encoding="utf-8")
                if marker in t:
                    return t
    return None
