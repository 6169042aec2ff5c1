"""Test helpers for budgetkit users: an OpenAI-compatible server that needs no network,
a private PostgreSQL with pgvector (:class:`PgvectorServer`, from the ``pgserver`` package),
and a throwaway database per test on a PostgreSQL server that may drop for a few seconds
(:func:`temporary_postgres_database`).

    from budgetkit.testing import FakeOpenAIServer

    with FakeOpenAIServer(reply="Hi!", cached_tokens=64) as server:
        llm = ChatOpenAI(model="gpt-4o-mini", base_url=server.base_url, api_key="test")
        llm.invoke("hello")
        assert server.last_usage["prompt_tokens_details"]["cached_tokens"] == 64
"""

from __future__ import annotations

from ._fake_openai import FakeOpenAIServer as FakeOpenAIServer
from ._fake_openai import FakeRequest as FakeRequest
from ._pgvector import PgvectorServer as PgvectorServer
from ._postgres import temporary_postgres_database as temporary_postgres_database

__all__ = ["FakeOpenAIServer", "FakeRequest", "PgvectorServer", "temporary_postgres_database"]
