"""The in-process vector index: exact below a size, HNSW above, agreeing with an exact scan;
adds, replacements and removals stay consistent; saved graphs restore and reconcile."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from budgetkit import ConfigurationError
from budgetkit.cache import _index
from budgetkit.cache._index import ExactIndex, HnswIndex, LocalIndex, VectorIndex

DIM = 32


def _unit(matrix: np.ndarray) -> np.ndarray:
    return (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    topics = _unit(rng.standard_normal((20, DIM)))
    entries = _unit(topics[rng.integers(0, 20, 2000)] + 0.4 * rng.standard_normal((2000, DIM)))
    queries = _unit(entries[:200] + 0.1 * rng.standard_normal((200, DIM)))
    return entries, queries


def test_every_index_is_a_vector_index() -> None:
    for index in (ExactIndex(DIM), HnswIndex(DIM), LocalIndex(DIM)):
        assert isinstance(index, VectorIndex)


def test_the_local_index_switches_to_hnsw_above_exact_max_and_back(data) -> None:
    entries, _ = data
    index = LocalIndex(DIM, exact_max=500)
    index.add(range(500), entries[:500])
    assert index.kind == "exact"
    index.add([500], entries[500:501])
    assert index.kind == "hnsw" and len(index) == 501
    for item in range(251):
        index.remove(item)
    assert index.kind == "hnsw"  # 250 left: not below half of exact_max, no rebuild yet
    index.remove(251)
    assert index.kind == "exact" and len(index) == 249
    survivors = [item for item in range(501) if item in index]
    for item in survivors:
        assert index.search(entries[item])[0] == (item, pytest.approx(1.0, abs=1e-5))


def test_hnsw_finds_what_the_exact_scan_finds(data) -> None:
    entries, queries = data
    exact, graph = ExactIndex(DIM), LocalIndex(DIM, exact_max=100)
    exact.add(range(len(entries)), entries)
    graph.add(range(len(entries)), entries)
    assert graph.kind == "hnsw"
    same = sum(graph.search(q)[0][0] == exact.search(q)[0][0] for q in queries)
    assert same >= 0.98 * len(queries)
    best = graph.search(queries[0], k=5)
    assert [score for _, score in best] == sorted((score for _, score in best), reverse=True)
    assert len(best) == 5
    assert graph.search(queries[0], threshold=1.01) == []
    assert all(score >= 0.9 for _, score in graph.search(queries[0], k=8, threshold=0.9))


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_adds_replacements_and_removals_stay_consistent(data, kind: str) -> None:
    entries, _ = data
    index = LocalIndex(DIM, exact_max=None if kind == "exact" else 10)
    index.add(range(600), entries[:600])
    assert index.kind == kind
    for item in range(0, 600, 3):
        assert index.remove(item)
    assert not index.remove(0)
    assert 0 not in index and 1 in index
    index.add([10_000], entries[0:1])  # the removed vector, under a new id
    assert index.search(entries[0])[0] == (10_000, pytest.approx(1.0, abs=1e-5))
    index.add([0], entries[700:701])  # a removed id comes back with another vector
    assert index.search(entries[700])[0][0] == 0
    assert index.search(entries[0])[0][0] == 10_000
    index.add([1], entries[701:702])  # a live id gets a new vector: the old one is gone
    assert index.search(entries[701])[0][0] == 1
    assert all(item != 1 for item, _ in index.search(entries[1], k=5))
    assert len(index) == 600 - 200 + 2
    for item in [i for i in range(600) if i % 3] + [0, 10_000]:
        index.remove(item)
    assert len(index) == 0 and index.search(entries[1]) == []


def test_saved_graph_restores_and_reconciles_with_the_live_ids(data, tmp_path: Path) -> None:
    entries, _ = data
    index = LocalIndex(DIM, exact_max=100)
    index.add(range(1500), entries[:1500])
    path = tmp_path / "part.hnsw"
    assert index.save(path)
    alive = np.arange(100, 2000)  # 100 deleted since, 500 added by another process
    asked: list[np.ndarray] = []

    def vectors_of(ids: np.ndarray) -> np.ndarray:
        asked.append(ids)
        return entries[ids]

    restored = LocalIndex.restore(path, DIM, alive, vectors_of, exact_max=100)
    assert restored is not None and restored.kind == "hnsw" and restored.changes == 1
    assert len(restored) == 1900 and 5 not in restored and 1999 in restored
    assert np.array_equal(np.concatenate(asked), np.arange(1500, 2000))  # only the new
    assert restored.search(entries[1999])[0][0] == 1999
    assert all(item >= 100 for item, _ in restored.search(entries[5], k=8))
    unchanged = LocalIndex.restore(path, DIM, np.arange(1500), vectors_of, exact_max=100)
    assert unchanged is not None and unchanged.changes == 0


def test_a_saved_graph_that_does_not_fit_is_not_used(data, tmp_path: Path) -> None:
    entries, _ = data
    index = LocalIndex(DIM, exact_max=100)
    index.add(range(500), entries[:500])
    path = tmp_path / "part.hnsw"
    index.save(path)
    never = lambda ids: pytest.fail("no vectors should be asked for")  # noqa: E731
    assert LocalIndex.restore(path, DIM + 1, np.arange(500), never) is None  # other size
    assert LocalIndex.restore(path, DIM, np.arange(5000, 6000), never) is None  # all gone
    assert LocalIndex.restore(tmp_path / "absent.hnsw", DIM, np.arange(5), never) is None
    path.with_name(path.name + ".ids.json").write_text("{not json")
    assert LocalIndex.restore(path, DIM, np.arange(500), never) is None
    assert not LocalIndex(DIM).save(tmp_path / "exact.hnsw")  # exact indexes are not saved


def test_without_hnswlib_large_partitions_stay_exact_and_say_so(
        data, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    entries, queries = data
    monkeypatch.setattr(_index, "hnswlib_available", lambda: False)
    monkeypatch.setattr(LocalIndex, "_warned", False)
    index = LocalIndex(DIM, exact_max=100)
    with caplog.at_level(logging.WARNING, logger="budgetkit.cache"):
        index.add(range(1000), entries[:1000])
    assert index.kind == "exact" and len(index) == 1000
    assert "hnswlib is not installed" in caplog.text
    assert index.search(queries[0])[0][0] == 0


def test_bad_vectors_are_typed_errors() -> None:
    index = LocalIndex(DIM)
    with pytest.raises(ConfigurationError, match="shape"):
        index.add([1], np.ones(DIM + 1, dtype=np.float32))
    with pytest.raises(ConfigurationError, match="2 ids for 1 vectors"):
        index.add([1, 2], np.ones(DIM, dtype=np.float32))
    with pytest.raises(ConfigurationError, match="same id twice"):
        index.add([1, 1], np.ones((2, DIM), dtype=np.float32))
    with pytest.raises(ConfigurationError, match="dimensions"):
        index.search(np.ones(3))
    with pytest.raises(ConfigurationError):
        LocalIndex(0)
    with pytest.raises(ConfigurationError, match="exact_max"):
        LocalIndex(DIM, exact_max=-1)


def test_a_large_graph_is_built_in_the_background_while_the_exact_scan_answers(
        data, monkeypatch: pytest.MonkeyPatch) -> None:
    entries, queries = data
    gate = threading.Event()
    build = _index._Build._run

    def held(self: Any, *args: Any) -> None:  # the build waits until the test lets it go
        gate.wait(30)
        build(self, *args)

    monkeypatch.setattr(_index._Build, "_run", held)
    monkeypatch.setattr(LocalIndex, "background_min", 1000)
    index = LocalIndex(DIM, exact_max=100)
    index.add(range(1500), entries[:1500])
    assert index.building and index.kind == "exact"
    assert index.search(queries[0])[0][0] == 0  # answered exactly meanwhile
    for item in range(10):
        assert index.remove(item)
    index.add([5_000], entries[1600:1601])
    index.add([20], entries[1700:1701])  # a live id gets a new vector meanwhile
    gate.set()
    assert index.wait_built(30) and index.kind == "hnsw" and not index.building
    assert len(index) == 1500 - 10 + 1
    assert 3 not in index and 5_000 in index  # what happened meanwhile was replayed
    assert index.search(entries[1600])[0][0] == 5_000
    assert index.search(entries[1700])[0][0] == 20
    assert all(item >= 10 for item, _ in index.search(entries[3], k=5))
