"""``temporary_postgres_database`` (the ``pg_url`` fixture's engine) rides out a short drop of
the PostgreSQL server: a real server behind a TCP proxy that cuts the first connections."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from budgetkit.testing import temporary_postgres_database

psycopg = pytest.importorskip("psycopg")
BASE = os.environ.get("BUDGETKIT_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(not BASE, reason="BUDGETKIT_TEST_POSTGRES_URL is not set")


class FlakyProxy:
    """Forwards TCP to the real server, but closes the first ``drop`` connections at once
    (what a client sees while the server restarts)."""

    def __init__(self, target: tuple[str, int], drop: int) -> None:
        self.target, self.drop = target, drop
        self.accepted = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self.accepted <= self.drop:
                client.close()
                continue
            server = socket.create_connection(self.target)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def url(self, base: str) -> str:
        parts = urlsplit(base)
        user = f"{parts.username}@" if parts.username else ""
        return f"{parts.scheme}://{user}127.0.0.1:{self.port}{parts.path}"

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def target() -> Iterator[tuple[str, int]]:
    assert BASE is not None
    parts = urlsplit(BASE)
    yield parts.hostname or "127.0.0.1", parts.port or 5432


def exists(name: str) -> bool:
    assert BASE is not None
    with psycopg.connect(BASE) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (name,)).fetchone() is not None


def test_a_short_drop_is_retried_and_the_database_works(target: tuple[str, int]) -> None:
    assert BASE is not None
    proxy = FlakyProxy(target, drop=3)
    pauses: list[float] = []
    try:
        with temporary_postgres_database(proxy.url(BASE), sleep=pauses.append) as url:
            name = url.rsplit("/", 1)[1]
            assert exists(name)
            with psycopg.connect(url) as conn:  # a real, empty, usable database
                conn.execute("CREATE TABLE t (x int)")
                conn.execute("INSERT INTO t VALUES (1)")
                assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)
        assert not exists(name)  # dropped afterwards
    finally:
        proxy.close()
    assert len(pauses) == 3 and pauses == sorted(pauses)  # three cut connections, backoff


def test_a_server_that_stays_away_fails_after_the_retry_window(
        target: tuple[str, int]) -> None:
    assert BASE is not None
    proxy = FlakyProxy(target, drop=10**6)
    try:
        with pytest.raises(psycopg.OperationalError):
            with temporary_postgres_database(proxy.url(BASE), retry_for=1.0):
                pytest.fail("no database can have been created")  # pragma: no cover
    finally:
        proxy.close()
    assert proxy.accepted >= 2  # it did retry before giving up
