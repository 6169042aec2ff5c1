"""VectorIndex: exact and clustered search agree; adds and removals keep it consistent."""

from __future__ import annotations

import numpy as np
import pytest

from budgetkit import ConfigurationError
from budgetkit.cache._index import VectorIndex

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


def test_clustered_search_finds_what_the_exact_scan_finds(data) -> None:
    entries, queries = data
    exact = VectorIndex(DIM, ivf_min=None)
    clustered = VectorIndex(DIM, ivf_min=500, nprobe=8)
    exact.add_many(range(len(entries)), entries)
    clustered.add_many(range(len(entries)), entries)
    clustered.build()
    assert clustered.clustered and not exact.clustered
    same = sum(clustered.search(q)[0][0] == exact.search(q)[0][0] for q in queries)
    assert same >= 0.99 * len(queries)
    best = exact.search(queries[0], k=3)
    assert [score for _, score in best] == sorted((score for _, score in best), reverse=True)
    assert exact.search(queries[0], threshold=1.01) == []


def test_adds_and_removals_stay_consistent_in_both_layouts(data) -> None:
    entries, _ = data
    index = VectorIndex(DIM, ivf_min=500, nprobe=64)
    index.add_many(range(600), entries[:600])
    index.build()
    for item in range(0, 600, 3):
        assert index.remove(item)
    assert not index.remove(0)
    index.add(10_000, entries[0])  # the removed vector, under a new id
    assert index.search(entries[0])[0] == (10_000, pytest.approx(1.0, abs=1e-5))
    assert index.search(entries[1])[0][0] == 1
    assert len(index) == 401
    for item in [i for i in range(600) if i % 3] + [10_000]:
        index.remove(item)
    assert len(index) == 0 and index.search(entries[1]) == []


def test_bad_vectors_are_typed_errors() -> None:
    index = VectorIndex(DIM)
    with pytest.raises(ConfigurationError, match="dimensions"):
        index.add(1, np.ones(DIM + 1, dtype=np.float32))
    with pytest.raises(ConfigurationError, match="dimensions"):
        index.search(np.ones(3))
    with pytest.raises(ConfigurationError):
        VectorIndex(0)
