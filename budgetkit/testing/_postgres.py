"""A throwaway PostgreSQL database per test, that rides out a short server drop.

A suite that creates and drops a database for every test talks to the server's admin
connection hundreds of times; a restart, a failover or a full connection table for a few
seconds should not fail the run. Each admin statement is retried on a connection failure
until ``retry_for`` seconds have passed, and a retry whose first attempt did land (the
database already exists, or is already gone) counts as done.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["temporary_postgres_database"]

logger = logging.getLogger("budgetkit")


@contextmanager
def temporary_postgres_database(base_url: str, *, retry_for: float = 30.0,
                                prefix: str = "bk_test_",
                                sleep: Callable[[float], None] = time.sleep) -> Iterator[str]:
    """Create an empty database on ``base_url``'s server, yield its URL, drop it after.

    ``base_url`` is a ``postgresql://`` URL whose user may create databases. Connection
    failures (refused, reset, "the database system is starting up", another session on the
    template) are retried with backoff for up to ``retry_for`` seconds, then raised. Needs
    ``psycopg`` (``pip install 'budgetkit[postgres]'``).
    """
    import psycopg
    from psycopg import errors

    name = f"{prefix}{uuid.uuid4().hex[:12]}"

    def run(sql: str, already_done: type[Exception]) -> None:
        def attempt() -> None:
            try:
                with psycopg.connect(base_url, autocommit=True, connect_timeout=5) as admin:
                    admin.execute(sql)
            except already_done:  # an earlier attempt landed before its connection dropped
                pass

        _retrying(attempt, psycopg.OperationalError, retry_for, sleep)

    # DuplicateDatabase: only an earlier attempt of ours can have made this random name
    run(f'CREATE DATABASE "{name}"', errors.DuplicateDatabase)
    try:
        yield base_url.rsplit("/", 1)[0] + "/" + name
    finally:
        run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', errors.InvalidCatalogName)


def _retrying(attempt: Callable[[], Any], transient: type[Exception], retry_for: float,
              sleep: Callable[[float], None]) -> None:
    deadline = time.monotonic() + retry_for
    pause = 0.2
    while True:
        try:
            attempt()
            return
        except transient as exc:
            if time.monotonic() + pause > deadline:
                raise
            logger.warning("budgetkit.testing: PostgreSQL unavailable (%s); retrying in %.1f s",
                           str(exc).strip().splitlines()[0] if str(exc).strip() else exc, pause)
            sleep(pause)
            pause = min(pause * 2, 2.0)
