"""A private PostgreSQL with pgvector for tests, from the ``pgserver`` package.

The machine's own PostgreSQL may lack pgvector; ``pgserver`` ships PostgreSQL 16 with
pgvector in its wheel, so a test can start one in a temporary folder with no network
and no system package.
"""

from __future__ import annotations

import os
import uuid
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

from budgetkit.errors import ConfigurationError

__all__ = ["PgvectorServer"]


class PgvectorServer:
    """PostgreSQL 16 + pgvector in ``folder`` (``pip install pgserver``).

        with PgvectorServer(tmp_path / "pg") as server:
            url = server.new_database()          # fresh, with the vector extension
            cache = ResponseCache(Engine(url))   # uses the pgvector backend

    Other processes reach the server through :meth:`url` until :meth:`stop`.
    Raises :class:`ConfigurationError` when ``pgserver`` is missing or cannot start.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._server: Any = None

    def start(self) -> PgvectorServer:
        try:
            import pgserver
        except ImportError as exc:
            raise ConfigurationError("PgvectorServer needs the pgserver package: "
                                     "pip install pgserver") from exc
        self.folder.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR
            warnings.simplefilter("ignore")
            try:
                self._server = pgserver.get_server(
                    self.folder, cleanup_mode="stop")
            except Exception as exc:  # pgserver raises bare exceptions of many kinds
                raise ConfigurationError(f"pgserver could not start PostgreSQL in "
                                         f"{self.folder}: {exc}") from exc
        return self

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL (psycopg 3) for ``database`` on this server."""
        if self._server is None:
            raise ConfigurationError("PgvectorServer is not started")
        uri = str(self._server.get_uri(database))
        return "postgresql+psycopg://" + uri.split("://", 1)[1]

    def new_database(self) -> str:
        """Create an empty database with the ``vector`` extension; returns its URL."""
        name = f"bk_{uuid.uuid4().hex[:12]}"
        self._server.psql(f'CREATE DATABASE "{name}";')
        self._server.psql(f'\\c "{name}"\nCREATE EXTENSION IF NOT EXISTS vector;')
        return self.url(name)

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None

    def __enter__(self) -> PgvectorServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
