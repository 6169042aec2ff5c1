"""Shared fixtures of the core tests: real SQLite files, real PostgreSQL, a fake OpenAI server.

- ``engine``: an :class:`~budgetkit.Engine` on a fresh SQLite file under ``tmp_path``,
  closed after the test.
- ``pg_url``: a fresh, empty PostgreSQL database (created from
  ``BUDGETKIT_TEST_POSTGRES_URL``, dropped afterwards, each step retried while the server
  is briefly unreachable); the test is skipped when the variable is not set.
- ``fake_openai``: a running :class:`~budgetkit.testing.FakeOpenAIServer`.
- ``fake_clock``: a clock tests move by hand (``fake_clock.advance(seconds=...)``).
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The shells here set PYTHONDONTWRITEBYTECODE=1: every process of the suite (each xdist
# worker, each test that starts Python) then compiled budgetkit, the integrations and
# pytest's assertion-rewritten test modules from source again (collection alone: 15 s
# without the caches, 7 s with them). __pycache__/ is git-ignored: let the suite write it,
# before budgetkit is imported below, and let the processes it starts write it too.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

from budgetkit import Engine  # noqa: E402
from budgetkit.testing import FakeOpenAIServer, temporary_postgres_database  # noqa: E402

POSTGRES_ENV = "BUDGETKIT_TEST_POSTGRES_URL"


class FakeClock:
    """A settable naive-UTC clock; call it to read, ``advance`` to move."""

    def __init__(self, start: dt.datetime = dt.datetime(2025, 1, 15, 12, 0, 0)) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **delta: float) -> dt.datetime:
        self.now += dt.timedelta(**delta)
        return self.now


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "usage.db"


@pytest.fixture
def engine(db_path: Path) -> Iterator[Engine]:
    with Engine(db=str(db_path)) as eng:
        yield eng


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test (skipped without a server)."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"{POSTGRES_ENV} is not set (e.g. postgresql://postgres@127.0.0.1:5432/test)")
    pytest.importorskip("psycopg")
    # retries a dropped server connection (a restart, a failover) for up to 30 s
    with temporary_postgres_database(base) as url:
        yield url
