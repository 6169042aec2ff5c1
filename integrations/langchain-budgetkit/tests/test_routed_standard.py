"""langchain-tests' standard unit tests for RoutedChatModel (langchain-tests==1.1.9, pinned
in requirements-dev.txt)."""

from __future__ import annotations

from typing import Any

from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage
from langchain_tests.unit_tests import ChatModelUnitTests

from budgetkit import Router
from langchain_budgetkit import RoutedChatModel


class _ToolFake(FakeMessagesListChatModel):
    def bind_tools(self, tools, **kwargs):
        return self.bind(tools=tools, **kwargs)


class TestRoutedChatModelStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[RoutedChatModel]:
        return RoutedChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        reply = [AIMessage(content="ok")]
        return {"models": {"gpt-4o-mini": _ToolFake(responses=reply),
                           "gpt-4o": _ToolFake(responses=reply)},
                "router": Router({"low": "gpt-4o-mini", "high": "gpt-4o"})}
