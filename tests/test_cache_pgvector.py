"""The pgvector backend on a real PostgreSQL 16 + pgvector (``pgserver``): chosen by itself,
shared by processes without polling, exact for small partitions and HNSW for large ones,
and a typed error when it was asked for and cannot be had."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text

from budgetkit import ConfigurationError, Engine
from budgetkit.cache import MiniLMEmbedder, ResponseCache, VectorBackendUnavailable
from budgetkit.cache._pgvector import PgVectorEntries
from budgetkit.testing import PgvectorServer

MODEL = "gpt-4o-mini"
DIM = 48


@pytest.fixture(scope="module")
def pgvector_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgvectorServer]:
    pytest.importorskip("pgserver", reason="pgserver (PostgreSQL 16 + pgvector) not installed")
    server = PgvectorServer(tmp_path_factory.mktemp("pg"))
    try:
        server.start()
    except ConfigurationError as exc:
        pytest.skip(f"pgserver could not start PostgreSQL with pgvector here: {exc}")
    yield server
    server.stop()


@pytest.fixture
def pgvector_url(pgvector_server: PgvectorServer) -> str:
    return pgvector_server.new_database()


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    return MiniLMEmbedder()


def hashed_embedder(texts: list[str]) -> np.ndarray:
    """A fixed random unit vector per text: equal texts match, different ones do not."""
    rows = []
    for item in texts:
        seed = int.from_bytes(hashlib.sha256(item.encode()).digest()[:8], "little")
        rows.append(np.random.default_rng(seed).standard_normal(DIM))
    return np.asarray(rows, dtype=np.float32)


def test_auto_uses_pgvector_and_every_cache_sees_new_entries_at_once(
        pgvector_url: str, minilm: MiniLMEmbedder) -> None:
    with Engine(pgvector_url) as first, Engine(pgvector_url) as second:
        # an hour between polls: only a shared index can make the reader see the entry
        writer = ResponseCache(first, embedder=minilm, sync_interval=3600)
        reader = ResponseCache(second, embedder=minilm, sync_interval=3600)
        assert writer.vector_backend == reader.vector_backend == "pgvector"
        writer.store("Paris", model=MODEL, prompt="What is the capital of France?")
        hit = reader.lookup(model=MODEL, prompt="Which city is the capital of France?")
        assert hit is not None and hit.value == "Paris" and hit.kind == "semantic"
        exact = reader.lookup(model=MODEL, prompt="What is the capital of France?")
        assert exact is not None and exact.kind == "exact"
        assert reader.lookup(model=MODEL, prompt="How do I bake bread?") is None
        assert reader.lookup(model="gpt-4o", prompt="What is the capital of France?") is None
        assert len(reader) == 1
        writer.invalidate(pattern="*France*")
        assert reader.lookup(model=MODEL, prompt="What is the capital of France?") is None
        assert len(reader) == 0


_CHILD = textwrap.dedent("""
    import sys
    from budgetkit import Engine
    from budgetkit.cache import MiniLMEmbedder, ResponseCache
    engine = Engine(sys.argv[1])
    cache = ResponseCache(engine, embedder=MiniLMEmbedder(), sync_interval=3600)
    print("ready", cache.vector_backend, flush=True)
    for line in sys.stdin:
        verb, _, rest = line.rstrip("\\n").partition(" ")
        if verb == "lookup":
            hit = cache.lookup(model="gpt-4o-mini", prompt=rest)
            print(hit.value if hit else "MISS", flush=True)
        elif verb == "store":
            answer, _, prompt = rest.partition("|")
            cache.store(answer, model="gpt-4o-mini", prompt=prompt)
            print("stored", flush=True)
""")


@pytest.mark.slow
def test_two_processes_see_each_others_entries_without_polling(
        pgvector_url: str, minilm: MiniLMEmbedder) -> None:
    child = subprocess.Popen([sys.executable, "-c", _CHILD, pgvector_url], text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None

    def ask(line: str) -> str:
        child.stdin.write(line + "\n")  # type: ignore[union-attr]
        child.stdin.flush()  # type: ignore[union-attr]
        return child.stdout.readline().strip()  # type: ignore[union-attr]

    try:
        assert child.stdout.readline().strip() == "ready pgvector"
        with Engine(pgvector_url) as engine:
            cache = ResponseCache(engine, embedder=minilm, sync_interval=3600)
            assert ask("lookup What is the capital of France?") == "MISS"
            cache.store("Paris", model=MODEL, prompt="What is the capital of France?")
            assert ask("lookup Which city is the capital of France?") == "Paris"
            assert ask("store Rome|What is the capital of Italy?") == "stored"
            hit = cache.lookup(model=MODEL, prompt="Which city is the capital of Italy?")
            assert hit is not None and hit.value == "Rome"
            cache.invalidate(namespace="default")
            assert ask("lookup What is the capital of France?") == "MISS"
    finally:
        child.stdin.close()
        child.wait(timeout=30)


def _spy(backend: PgVectorEntries, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, per SQL search, whether it was the exact one."""
    calls: list[bool] = []
    original = backend._query

    def spied(*args: Any, exact: bool, **kwargs: Any) -> Any:
        calls.append(exact)
        return original(*args, exact=exact, **kwargs)

    monkeypatch.setattr(backend, "_query", spied)
    return calls


def test_small_partitions_are_searched_exactly_and_large_ones_through_hnsw(
        pgvector_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with Engine(pgvector_url) as engine:
        cache = ResponseCache(engine, embedder=hashed_embedder, threshold=0.0, guard=False)
        backend = cache._shared
        assert isinstance(backend, PgVectorEntries)
        monkeypatch.setattr(backend, "exact_rows", 40)
        big = [f"big question {i}" for i in range(240)]
        for prompt in big:
            cache.store("big", model=MODEL, prompt=prompt, namespace="big")
        for i in range(3):
            cache.store(f"small {i}", model=MODEL, prompt=f"small question {i}",
                        namespace="small")
        with engine.store.engine.connect() as conn:  # the vector rows are where they belong
            counts = dict(conn.execute(text(
                "SELECT e.namespace, count(*) FROM budgetkit_cache_vector_48 v JOIN "
                "budgetkit_cache_entry e USING (seq) GROUP BY e.namespace")).fetchall())
        assert counts == {"big": 240, "small": 3}
        calls = _spy(backend, monkeypatch)
        # 3 rows among 243: pgvector 0.6 would filter HNSW's candidates down to nothing
        hit = cache.lookup(model=MODEL, prompt="small question 1", namespace="small",
                           semantic=True, params={"changed": 1})
        assert hit is None  # other params: another partition, nothing there
        vectors = hashed_embedder(big)
        rng = np.random.default_rng(0)
        found_best = 0
        for i in rng.choice(len(big), 30, replace=False).tolist():
            query = vectors[i] / np.linalg.norm(vectors[i]) + 0.05 * rng.standard_normal(DIM)
            partitions = [("big", MODEL, *_partition_tail(cache, "big"))]
            result = backend.search(partitions, query.astype(np.float32), k=8, threshold=-1)
            found_best += bool(result) and result[0][0].focus == big[i]
        assert found_best >= 28  # HNSW agrees with the exact answer
        assert calls.count(False) >= 30  # ... and it was HNSW that answered
        calls.clear()
        small = [("small", MODEL, *_partition_tail(cache, "small"))]
        query = hashed_embedder(["small question 2"])[0]
        result = backend.search(small, query / np.linalg.norm(query), k=8, threshold=-1)
        assert [entry.focus for entry, _ in result][0] == "small question 2"
        assert len(result) == 3 and calls == [True]  # exact: the partition is small


def _partition_tail(cache: ResponseCache, namespace: str) -> tuple[str, str, str]:
    with cache._rows.store.engine.connect() as conn:
        row = conn.execute(text("SELECT params_hash, context_hash, embedder FROM "
                                "budgetkit_cache_partition WHERE namespace = :ns"),
                           {"ns": namespace}).one()
    return row[0], row[1], row[2]


def test_hnsw_falls_back_to_exact_when_it_finds_too_few(
        pgvector_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with Engine(pgvector_url) as engine:
        cache = ResponseCache(engine, embedder=hashed_embedder, threshold=0.0, guard=False)
        backend = cache._shared
        assert isinstance(backend, PgVectorEntries)
        monkeypatch.setattr(backend, "exact_rows", 0)  # HNSW first, whatever the size
        for i in range(5):
            cache.store(f"a{i}", model=MODEL, prompt=f"question {i}")
        calls = _spy(backend, monkeypatch)
        hit = cache.lookup(model=MODEL, prompt="question 3", semantic=True, record=False)
        assert hit is not None and hit.value == "a3"
        hit = cache.lookup(model=MODEL, prompt="question 3?", semantic=True, record=False)
        assert hit is not None  # the best of 5 above threshold 0
        assert calls == [False, True]  # 5 rows < k = 8: the exact query had the last word


def test_size_bound_and_expiry_hold_in_the_database(
        pgvector_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [dt.datetime(2026, 1, 1)]
    with Engine(pgvector_url, clock=lambda: now[0]) as engine:
        cache = ResponseCache(engine, embedder=hashed_embedder, maxsize=3)
        assert isinstance(cache._shared, PgVectorEntries)
        monkeypatch.setattr(PgVectorEntries, "TRIM_EVERY", 1)
        for i in range(5):
            now[0] += dt.timedelta(seconds=1)
            cache.store(f"a{i}", model=MODEL, prompt=f"question {i}")
        assert len(cache) == 3
        assert cache.lookup(model=MODEL, prompt="question 0") is None  # least recent went
        assert cache.lookup(model=MODEL, prompt="question 4") is not None
        now[0] += dt.timedelta(days=2)  # past the default 24 h lifetime
        assert cache.lookup(model=MODEL, prompt="question 4") is None
        assert cache.lookup(model=MODEL, prompt="question 3", semantic=True) is None
        with engine.store.engine.connect() as conn:  # vectors left with their entries
            left = conn.execute(text("SELECT count(*) FROM budgetkit_cache_vector_48")).scalar()
        assert left == len(cache) == 1  # the expired entries found were deleted
        assert cache.purge_expired() == 1 and len(cache) == 0  # the last expired one
        cache.store("fresh", model=MODEL, prompt="a new question")
        assert cache.clear() == 1 and len(cache) == 0


def test_asking_for_pgvector_where_it_cannot_be_had_is_a_typed_error(tmp_path: Path) -> None:
    with Engine(tmp_path / "local.db") as engine:
        with pytest.raises(VectorBackendUnavailable, match="not PostgreSQL"):
            ResponseCache(engine, semantic=False, vector_backend="pgvector")
        with pytest.raises(ConfigurationError, match="vector_backend must be one of"):
            ResponseCache(engine, semantic=False, vector_backend="faiss")
        assert ResponseCache(engine, semantic=False).vector_backend == "local"


def test_postgres_without_the_extension_falls_back_and_says_why(
        pg_url: str, caplog: pytest.LogCaptureFixture, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with Engine(pg_url) as engine:
        with engine.store.engine.connect() as conn:
            if conn.execute(text("SELECT 1 FROM pg_available_extensions "
                                 "WHERE name = 'vector'")).scalar():
                pytest.skip("this PostgreSQL has pgvector: nothing to fall back from")
        with pytest.raises(VectorBackendUnavailable, match="no pgvector extension"):
            ResponseCache(engine, semantic=False, vector_backend="pgvector")
        with caplog.at_level(logging.WARNING, logger="budgetkit.cache"):
            cache = ResponseCache(engine, semantic=False)
        assert cache.vector_backend == "local"
        assert "not using pgvector because the PostgreSQL server has no pgvector" in caplog.text
        # the in-process graphs of a server database are saved under the user's home
        local = ResponseCache(engine, embedder=hashed_embedder, exact_max=5,
                              vector_backend="local")
        for i in range(20):
            local.store(f"a{i}", model=MODEL, prompt=f"question {i}")
        assert local.save_index() == 1
        saved = list((tmp_path / ".budgetkit" / "vectors").glob("*/*.hnsw"))
        assert len(saved) == 1


def test_entries_stored_before_pgvector_get_their_vectors_at_open(
        pgvector_url: str, minilm: MiniLMEmbedder) -> None:
    with Engine(pgvector_url) as engine:
        before = ResponseCache(engine, embedder=minilm, vector_backend="local")
        before.store("Paris", model=MODEL, prompt="What is the capital of France?")
        before.store("Rome", model=MODEL, prompt="What is the capital of Italy?")
        with engine.store.engine.connect() as conn:  # no vector rows were written
            assert conn.execute(text("SELECT to_regclass('budgetkit_cache_vector_384')")
                                ).scalar() is None
        cache = ResponseCache(engine, embedder=minilm)  # auto: pgvector from now on
        assert cache.vector_backend == "pgvector"
        assert cache.ready(timeout=60)  # waits for the copy too
        with engine.store.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM budgetkit_cache_vector_384")
                                ).scalar() == 2
        hit = cache.lookup(model=MODEL, prompt="Which city is the capital of Italy?")
        assert hit is not None and hit.value == "Rome" and hit.kind == "semantic"
        assert isinstance(cache._shared, PgVectorEntries) and cache._shared.backfill() == 0
