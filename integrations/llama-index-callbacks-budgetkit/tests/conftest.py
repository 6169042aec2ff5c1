"""Fixtures of the LlamaIndex handler tests: a real SQLite ledger, a fake OpenAI server, and
``MockLLM`` / ``MockEmbedding`` subclasses that name a priced model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from llama_index.core.base.llms.types import LLMMetadata
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.llms import MockLLM

from budgetkit import Engine
from budgetkit.testing import FakeOpenAIServer


class NamedMockLLM(MockLLM):
    """``MockLLM`` (echoes the prompt, reports no usage) that says it is gpt-4o-mini."""

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(num_output=self.max_tokens or -1, model_name="gpt-4o-mini")


class NamedMockEmbedding(MockEmbedding):
    model_name: str = "text-embedding-3-small"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    with Engine(db=str(tmp_path / "usage.db")) as eng:
        yield eng


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
def mocks() -> Any:
    """The mock LLM and embedding classes."""
    return type("Mocks", (), {"LLM": NamedMockLLM, "Embedding": NamedMockEmbedding})


@pytest.fixture
def root_dispatcher() -> Iterator[Any]:
    """The root instrumentation dispatcher, with handlers added by the test removed after."""
    dispatcher = get_dispatcher()
    events, spans = list(dispatcher.event_handlers), list(dispatcher.span_handlers)
    try:
        yield dispatcher
    finally:
        dispatcher.event_handlers = events
        dispatcher.span_handlers = spans
