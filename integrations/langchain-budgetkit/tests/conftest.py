"""Fixtures of the LangChain adapter tests: a real SQLite ledger, a fake OpenAI server, and a
fake chat model that reports usage the way provider integrations do."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from budgetkit import Engine
from budgetkit.testing import FakeOpenAIServer


class UsageChatModel(BaseChatModel):
    """A chat model that answers ``reply`` and reports ``usage`` (``None``: no usage).

    ``response_model`` is the model name its responses carry (a dated snapshot, say);
    ``fail`` raises instead of answering, ``fail_after_chunks`` breaks a stream.
    """

    model_name: str = "gpt-4o-mini"
    response_model: str | None = None
    reply: str = "The capital of France is Paris."
    usage: dict[str, Any] | None = None
    fail: bool = False
    fail_after_chunks: int | None = None
    calls: int = 0

    @property
    def _llm_type(self) -> str:
        return "usage-fake-chat"

    def _message_usage(self) -> UsageMetadata | None:
        return UsageMetadata(**self.usage) if self.usage is not None else None  # type: ignore[typeddict-item]

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None,
                  **kwargs: Any) -> ChatResult:
        self.calls += 1
        if self.fail:
            raise RuntimeError("provider exploded")
        message = AIMessage(content=self.reply, usage_metadata=self._message_usage(),
                            response_metadata={"model_name": self.response_model
                                               or self.model_name})
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        self.calls += 1
        words = self.reply.split(" ")
        for i, word in enumerate(words):
            if self.fail_after_chunks is not None and i >= self.fail_after_chunks:
                raise RuntimeError("stream broke")
            text = word if i == 0 else " " + word
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=text))
            if run_manager is not None:
                run_manager.on_llm_new_token(text, chunk=chunk)
            yield chunk
        yield ChatGenerationChunk(message=AIMessageChunk(
            content="", usage_metadata=self._message_usage(),
            response_metadata={"model_name": self.response_model or self.model_name}))


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    with Engine(db=str(tmp_path / "usage.db")) as eng:
        yield eng


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
def usage_model() -> type[UsageChatModel]:
    """The :class:`UsageChatModel` class (tests build models with their own settings)."""
    return UsageChatModel
