"""A cache is ready when it opens: the local model loads in the background from open, and a
large partition's HNSW graph is saved next to the ledger and restored (reconciled with the
database) by the next open instead of being rebuilt on the first request."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from budgetkit import Engine
from budgetkit.cache import MiniLMEmbedder, ResponseCache
from budgetkit.cache import _index_files
from budgetkit.cache._index import LocalIndex

MODEL = "gpt-4o-mini"
DIM = 48


def hashed_embedder(texts: list[str]) -> np.ndarray:
    """A fixed random vector per text, so equal texts match and others do not."""
    rows = []
    for item in texts:
        seed = int.from_bytes(hashlib.sha256(item.encode()).digest()[:8], "little")
        rows.append(np.random.default_rng(seed).standard_normal(DIM))
    return np.asarray(rows, dtype=np.float32)


def test_the_local_model_loads_at_open_not_on_the_first_lookup(tmp_path: Path) -> None:
    embedder = MiniLMEmbedder()
    with Engine(tmp_path / "ready.db") as engine:
        cache = ResponseCache(engine, embedder=embedder)
        assert cache.ready(timeout=60)
        assert embedder._session is not None  # loaded before anyone asked
        assert cache.lookup(model=MODEL, prompt="What is the capital of France?") is None


def test_a_custom_embedder_is_not_called_at_open(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def remote(texts: list[str]) -> np.ndarray:  # stands for a paid embeddings API
        calls.append(list(texts))
        return hashed_embedder(texts)

    with Engine(tmp_path / "custom.db") as engine:
        cache = ResponseCache(engine, embedder=remote)
        assert cache.ready(timeout=1) and calls == []


def test_a_large_partition_is_restored_from_its_saved_graph_and_reconciled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "big.db"
    prompts = [f"question number {i}" for i in range(300)]
    with Engine(db) as engine:
        cache = ResponseCache(engine, embedder=hashed_embedder, exact_max=50, guard=False)
        for i, prompt in enumerate(prompts):
            cache.store(f"answer {i}", model=MODEL, prompt=prompt)
        assert cache.save_index() == 1
        assert cache.save_index() == 0  # nothing changed since
        files = sorted(path.name for path in (tmp_path / "big.db.vectors").iterdir())
        assert len(files) == 2 and files[0].endswith(".hnsw")
        # changes after the save: the file will be stale at the next open
        cache.invalidate(pattern="question number 7")
        cache.store("late answer", model=MODEL, prompt="a late question")

    restored: list[Any] = []
    original = _index_files.IndexFiles.restore

    def spied(self: Any, *args: Any, **kwargs: Any) -> Any:
        restored.append(original(self, *args, **kwargs))
        return restored[-1]

    monkeypatch.setattr(_index_files.IndexFiles, "restore", spied)
    with Engine(db) as engine:
        cache = ResponseCache(engine, embedder=hashed_embedder, exact_max=50, guard=False)
        assert len(restored) == 1 and restored[0] is not None
        assert restored[0].kind == "hnsw" and len(restored[0]) == 300  # 300 - 1 + 1
        assert restored[0].changes == 1  # reconciled, so it is saved again
        graph = restored[0]
        late, gone = hashed_embedder(["a late question", "question number 7"])
        best = graph.search(late / np.linalg.norm(late))
        assert best and best[0][1] == pytest.approx(1.0, abs=1e-5)  # added at open
        best = graph.search(gone / np.linalg.norm(gone))
        assert best and best[0][1] < 0.9  # removed at open
        assert cache.lookup(model=MODEL, prompt="question number 7") is None
        hit = cache.lookup(model=MODEL, prompt="question number 8", semantic=True)
        assert hit is not None and hit.value == "answer 8"
        hit = cache.lookup(model=MODEL, prompt="a late question")
        assert hit is not None and hit.value == "late answer"


def test_an_in_memory_ledger_saves_nothing(tmp_path: Path) -> None:
    with Engine(":memory:") as engine:
        cache = ResponseCache(engine, embedder=hashed_embedder, exact_max=5)
        for i in range(20):
            cache.store(f"a{i}", model=MODEL, prompt=f"q{i}")
        assert cache.save_index() == 0
    with Engine(tmp_path / "x.db") as engine:
        cache = ResponseCache(engine, embedder=hashed_embedder, exact_max=5,
                              index_dir=tmp_path / "elsewhere")
        for i in range(20):
            cache.store(f"a{i}", model=MODEL, prompt=f"q{i}")
        assert cache.save_index() == 1 and (tmp_path / "elsewhere").is_dir()
        assert not (tmp_path / "x.db.vectors").exists()


def test_a_graph_built_in_the_background_serves_once_ready_and_is_saved(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "cold.db"
    with Engine(db) as engine:
        cache = ResponseCache(engine, embedder=hashed_embedder, exact_max=50)
        for i in range(400):
            cache.store(f"answer {i}", model=MODEL, prompt=f"question number {i}")
    monkeypatch.setattr(LocalIndex, "background_min", 200)
    for path in (tmp_path / "cold.db.vectors").glob("*"):  # no saved graph: a cold open
        path.unlink()
    with Engine(db) as engine:
        cache = ResponseCache(engine, embedder=hashed_embedder, exact_max=50)
        hit = cache.lookup(model=MODEL, prompt="Question number 7?", semantic=True)
        assert hit is not None and hit.value == "answer 7" and hit.kind == "semantic"
        assert cache.ready(timeout=60)
        index = next(iter(cache._indexes.values()))
        assert index.kind == "hnsw" and len(index) == 400
        hit = cache.lookup(model=MODEL, prompt="Question number 9?", semantic=True)
        assert hit is not None and hit.value == "answer 9"
        assert cache.save_index() == 1
