"""Metering for LangChain embeddings, which fire no callbacks.

    embeddings = MeteredEmbeddings(OpenAIEmbeddings(model="text-embedding-3-small"), engine)
    vectorstore = InMemoryVectorStore(embeddings)   # every embed call now has a usage row

``embed_documents`` rows have operation type ``embedding``, ``embed_query`` rows
``query_embedding``. LangChain's ``Embeddings`` interface returns vectors only, so tokens
are counted with the model's tokenizer (exact for OpenAI models) and the rows say
``usage_source="estimated"``. Calls are admitted first, so budgets can stop them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.embeddings import Embeddings

from budgetkit import ConfigurationError, Engine
from budgetkit.ledger import Ticket

__all__ = ["MeteredEmbeddings"]

_MODEL_ATTRIBUTES = ("model", "model_name", "deployment", "model_id")


class MeteredEmbeddings(Embeddings):
    """Wrap any LangChain :class:`~langchain_core.embeddings.Embeddings` to record its usage.

    ``model`` names the catalog entry to price with; by default it is read from the
    wrapped object's ``model`` / ``model_name`` attribute. Attribution keywords
    (``user_id``, ``project``, ``tags``, ...) go on every row.
    """

    def __init__(self, embeddings: Embeddings, engine: Engine, *, model: str | None = None,
                 user_id: str | None = None, session_id: str | None = None,
                 project: str | None = None, task_type: str | None = None,
                 tags: Sequence[str] = (), metadata: Mapping[str, Any] | None = None) -> None:
        if not isinstance(engine, Engine):
            raise ConfigurationError(
                f"engine must be a budgetkit.Engine, got {type(engine).__name__}")
        if model is None:
            model = next((value for name in _MODEL_ATTRIBUTES
                          if isinstance(value := getattr(embeddings, name, None), str)
                          and value), None)
        if not model:
            raise ConfigurationError(
                f"cannot tell which model {type(embeddings).__name__} uses; pass model=...")
        engine.catalog.get(model)  # an unpriced model fails here, not on the first call
        self.embeddings = embeddings
        self.engine = engine
        self.model = model
        self._attribution: dict[str, Any] = {
            key: value for key, value in (("user_id", user_id), ("session_id", session_id),
                                          ("project", project), ("task_type", task_type))
            if value is not None}
        self._attribution["tags"] = tuple(tags)
        self._attribution["metadata"] = dict(metadata or {})

    def _count(self, texts: Sequence[str]) -> int:
        return sum(self.engine.count_tokens(text, self.model) for text in texts)

    def _admit_kwargs(self, texts: Sequence[str], operation_type: str) -> dict[str, Any]:
        return dict(self._attribution, input_tokens=self._count(texts), max_output_tokens=0,
                    operation_type=operation_type)

    def _settle(self, ticket: Ticket) -> None:
        self.engine.settle(ticket, input_tokens=ticket.input_tokens, output_tokens=0,
                           usage_source="estimated")

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        ticket = self.engine.admit(self.model, **self._admit_kwargs(texts, "embedding"))
        try:
            vectors = self.embeddings.embed_documents(texts)
        except BaseException as exc:
            self.engine.release(ticket, error=exc)
            raise
        self._settle(ticket)
        return vectors

    def embed_query(self, text: str) -> list[float]:
        ticket = self.engine.admit(self.model, **self._admit_kwargs([text], "query_embedding"))
        try:
            vector = self.embeddings.embed_query(text)
        except BaseException as exc:
            self.engine.release(ticket, error=exc)
            raise
        self._settle(ticket)
        return vector

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        ticket = await self.engine.aadmit(self.model, **self._admit_kwargs(texts, "embedding"))
        try:
            vectors = await self.embeddings.aembed_documents(texts)
        except BaseException as exc:
            await self.engine.arelease(ticket, error=exc)
            raise
        await self.engine.asettle(ticket, input_tokens=ticket.input_tokens, output_tokens=0,
                                  usage_source="estimated")
        return vectors

    async def aembed_query(self, text: str) -> list[float]:
        ticket = await self.engine.aadmit(self.model,
                                          **self._admit_kwargs([text], "query_embedding"))
        try:
            vector = await self.embeddings.aembed_query(text)
        except BaseException as exc:
            await self.engine.arelease(ticket, error=exc)
            raise
        await self.engine.asettle(ticket, input_tokens=ticket.input_tokens, output_tokens=0,
                                  usage_source="estimated")
        return vector

    def __getattr__(self, name: str) -> Any:
        # Anything else (model, dimensions, ...) reads through to the wrapped embeddings.
        if name in ("embeddings", "engine", "model", "_attribution"):
            raise AttributeError(name)
        return getattr(self.embeddings, name)
