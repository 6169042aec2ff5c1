"""In-process vector search for the semantic cache: exact below a size, HNSW above it.

Every index here holds unit vectors under integer ids (the cache's ``seq``) and answers
"the ``k`` best cosines at or above a threshold". :class:`VectorIndex` is the protocol the
cache codes against; :class:`LocalIndex` is the embedded default.

Why two layouts (measured in ``benchmarks/bench_cache_speed.py``, 384 dimensions, one
thread): a numpy scan is exact and costs nothing to build, and is as fast as an HNSW
graph up to about 1,000 vectors (0.03 ms); from there it falls behind linearly (0.6 ms at
10k, 10.6 ms at 100k) while hnswlib stays near 0.1-0.15 ms at 100k with 99.6 % of top
matches equal to the exact scan's. So :class:`LocalIndex` scans exactly up to
``exact_max`` vectors and moves to :class:`HnswIndex` above it (and back when it shrinks
to half of that). hnswlib was chosen over faiss-cpu (its HNSW cannot remove ids, and a
cache evicts all the time) and usearch (twice the build time, 1.4-2.5x the lookup time
here); it is imported only when a partition grows past ``exact_max``.

A 100k graph takes 12-15 s to build but 0.1 s to read back, so large indexes are saved
and restored at open (:meth:`LocalIndex.restore` reconciles the file with the ids the
database says are alive). Not thread-safe on their own: the cache holds its lock.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from budgetkit.errors import ConfigurationError

__all__ = ["VectorIndex", "ExactIndex", "HnswIndex", "LocalIndex", "DEFAULT_EXACT_MAX",
           "hnswlib_available"]

logger = logging.getLogger("budgetkit.cache")

#: Largest size searched by a plain scan (see the module docstring for the measurement).
DEFAULT_EXACT_MAX = 1_000


@runtime_checkable
class VectorIndex(Protocol):
    """What the cache needs from a vector index."""

    @property
    def dim(self) -> int: ...

    def __len__(self) -> int: ...

    def __contains__(self, item_id: object) -> bool: ...

    def add(self, ids: Iterable[int], vectors: np.ndarray) -> None:
        """Add (or replace) unit vectors under ``ids``."""

    def remove(self, item_id: int) -> bool:
        """Forget ``item_id``; ``False`` if it was not there."""

    def search(self, query: np.ndarray, *, k: int = 1,
               threshold: float = -1.0) -> list[tuple[int, float]]:
        """Up to ``k`` (id, cosine) pairs with cosine >= ``threshold``, best first."""


def hnswlib_available() -> bool:
    return importlib.util.find_spec("hnswlib") is not None


def _as_query(query: np.ndarray, dim: int) -> np.ndarray:
    query = np.asarray(query, dtype=np.float32).reshape(-1)
    if query.shape[0] != dim:
        raise ConfigurationError(f"query has {query.shape[0]} dimensions, the index {dim}")
    return query


def _as_batch(ids: Iterable[int], vectors: np.ndarray,
              dim: int) -> tuple[np.ndarray, np.ndarray]:
    id_array = np.fromiter((int(item) for item in ids), dtype=np.int64)
    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    if matrix.ndim == 1:
        matrix = matrix.reshape(1, -1)
    if matrix.ndim != 2 or matrix.shape[1] != dim:
        raise ConfigurationError(f"vectors have shape {matrix.shape}, the index wants "
                                 f"(n, {dim})")
    if len(id_array) != len(matrix):
        raise ConfigurationError(f"{len(id_array)} ids for {len(matrix)} vectors")
    if len(np.unique(id_array)) != len(id_array):
        raise ConfigurationError("the same id twice in one add()")
    return id_array, matrix


class ExactIndex:
    """A growable float32 matrix scanned in full: exact, cheap below ~1,000 vectors."""

    def __init__(self, dim: int) -> None:
        if dim <= 0:
            raise ConfigurationError(f"dim must be > 0, got {dim}")
        self._dim = dim
        self._matrix = np.empty((0, dim), dtype=np.float32)
        self._ids = np.empty(0, dtype=np.int64)
        self._size = 0
        self._row: dict[int, int] = {}

    @property
    def dim(self) -> int:
        return self._dim

    def __len__(self) -> int:
        return self._size

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._row

    def nbytes(self) -> int:
        return int(self._matrix.nbytes + self._ids.nbytes)

    def add(self, ids: Iterable[int], vectors: np.ndarray) -> None:
        id_array, matrix = _as_batch(ids, vectors, self._dim)
        for item in id_array.tolist():
            if item in self._row:
                self.remove(item)
        needed = self._size + len(id_array)
        if needed > len(self._ids):
            capacity = max(16, needed, 2 * len(self._ids))
            grown = np.empty((capacity, self._dim), dtype=np.float32)
            grown[:self._size] = self._matrix[:self._size]
            grown_ids = np.empty(capacity, dtype=np.int64)
            grown_ids[:self._size] = self._ids[:self._size]
            self._matrix, self._ids = grown, grown_ids
        self._matrix[self._size:needed] = matrix
        self._ids[self._size:needed] = id_array
        self._row.update(zip(id_array.tolist(), range(self._size, needed)))
        self._size = needed

    def remove(self, item_id: int) -> bool:
        row = self._row.pop(item_id, None)
        if row is None:
            return False
        last = self._size - 1
        if row != last:  # keep the rows dense: the last one moves into the hole
            self._matrix[row] = self._matrix[last]
            moved = int(self._ids[last])
            self._ids[row] = moved
            self._row[moved] = row
        self._size = last
        return True

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of everything held, as copies."""
        return self._ids[:self._size].copy(), self._matrix[:self._size].copy()

    def search(self, query: np.ndarray, *, k: int = 1,
               threshold: float = -1.0) -> list[tuple[int, float]]:
        query = _as_query(query, self._dim)
        if self._size == 0 or k <= 0:
            return []
        scores = self._matrix[:self._size] @ query
        keep = np.flatnonzero(scores >= threshold)
        if len(keep) > k:
            keep = keep[np.argpartition(-scores[keep], k - 1)[:k]]
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        return [(int(self._ids[i]), float(scores[i])) for i in keep]


class HnswIndex:
    """hnswlib's HNSW graph over inner product (= cosine for unit vectors).

    ``m`` / ``ef_construction`` / ``ef_search`` are hnswlib's M, ef_construction and ef;
    the defaults (16, 100, 128) found 99.6 % of exact top matches at 100k in 0.15 ms.
    Removal marks the element deleted; its slot is reused by the next add.
    """

    def __init__(self, dim: int, *, capacity: int = 1024, m: int = 16,
                 ef_construction: int = 100, ef_search: int = 128, threads: int = 1,
                 _graph: Any = None, _ids: Iterable[int] = ()) -> None:
        if dim <= 0:
            raise ConfigurationError(f"dim must be > 0, got {dim}")
        import hnswlib  # lazily: only caches with a large partition pay for the import

        self._dim = dim
        self._ef_search = ef_search
        self._threads = threads
        if _graph is None:
            _graph = hnswlib.Index(space="ip", dim=dim)
            _graph.init_index(max_elements=max(16, capacity), ef_construction=ef_construction,
                              M=m, allow_replace_deleted=True)
        self._graph = _graph
        self._graph.set_ef(ef_search)
        self._graph.set_num_threads(threads)
        self._live: set[int] = set(_ids)

    @property
    def dim(self) -> int:
        return self._dim

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._live

    def nbytes(self) -> int:
        """Memory of the graph: per element the vector, 2*M level-0 links and a label."""
        return int(self._graph.get_max_elements()
                   * (4 * self._dim + 8 * self._graph.M + 16))

    def add(self, ids: Iterable[int], vectors: np.ndarray) -> None:
        id_array, matrix = _as_batch(ids, vectors, self._dim)
        if len(id_array) == 0:
            return
        # hnswlib updates a label it knows in place, but a deleted label must be revived
        # first: adding it into another element's freed slot would leave two slots under
        # one label, and reusing the old slot later would erase the live one's label.
        known = np.fromiter((self._revive(item) for item in id_array.tolist()), dtype=bool,
                            count=len(id_array))
        if known.any():
            self._graph.add_items(matrix[known], id_array[known], replace_deleted=False)
        fresh_ids, fresh = id_array[~known], matrix[~known]
        if len(fresh_ids):
            deleted = self._graph.get_current_count() - len(self._live)
            free = self._graph.get_max_elements() - self._graph.get_current_count() + deleted
            if len(fresh_ids) > free:
                self._graph.resize_index(max(2 * self._graph.get_max_elements(),
                                             len(self._live) + len(fresh_ids)))
            self._graph.add_items(fresh, fresh_ids, replace_deleted=True)
        self._live.update(id_array.tolist())

    def _revive(self, item_id: int) -> bool:
        """Whether the graph knows ``item_id`` (live, or deleted and now unmarked)."""
        if item_id in self._live:
            return True
        try:
            self._graph.unmark_deleted(item_id)
        except RuntimeError:  # never added, or its slot was reused by another id
            return False
        self._live.add(item_id)
        return True

    def remove(self, item_id: int) -> bool:
        if item_id not in self._live:
            return False
        self._graph.mark_deleted(item_id)
        self._live.discard(item_id)
        return True

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        ids = np.fromiter(sorted(self._live), dtype=np.int64, count=len(self._live))
        if len(ids) == 0:
            return ids, np.empty((0, self._dim), dtype=np.float32)
        return ids, np.asarray(self._graph.get_items(ids), dtype=np.float32)

    def search(self, query: np.ndarray, *, k: int = 1,
               threshold: float = -1.0) -> list[tuple[int, float]]:
        query = _as_query(query, self._dim)
        k = min(k, len(self._live))
        if k <= 0:
            return []
        self._graph.set_ef(max(self._ef_search, k))
        while True:
            try:
                labels, distances = self._graph.knn_query(query, k=k)
                break
            except RuntimeError:  # fewer than k reachable (after many deletions)
                if k == 1:
                    return []
                k = max(1, k // 2)
        return [(int(label), 1.0 - float(distance))
                for label, distance in zip(labels[0], distances[0])
                if 1.0 - float(distance) >= threshold]

    def save(self, path: Path) -> None:
        self._graph.save_index(str(path))

    @classmethod
    def load(cls, path: Path, dim: int, ids: Iterable[int], *, capacity: int,
             ef_search: int = 128, threads: int = 1) -> HnswIndex:
        import hnswlib

        graph = hnswlib.Index(space="ip", dim=dim)
        graph.load_index(str(path), max_elements=capacity, allow_replace_deleted=True)
        return cls(dim, ef_search=ef_search, threads=threads, _graph=graph, _ids=ids)


class LocalIndex:
    """The embedded default: :class:`ExactIndex` up to ``exact_max`` vectors,
    :class:`HnswIndex` above (back to exact below half of it, so a size that hovers
    around the limit does not rebuild on every add). Without hnswlib installed it stays
    exact and says so once in the log.

    A graph of ``background_min`` vectors or more is built in a background thread (a
    100k graph takes 12-15 s; hnswlib releases the GIL while it builds) and the exact
    scan answers meanwhile (10 ms at 100k): opening a large cache with no saved graph
    is not held up by the build. Adds and removals made meanwhile are replayed on the
    graph before it takes over.
    """

    _warned = False
    #: From this size a graph is built in the background (``None``: never).
    background_min: int | None = 20_000

    def __init__(self, dim: int, *, exact_max: int | None = DEFAULT_EXACT_MAX,
                 threads: int = 1) -> None:
        if exact_max is not None and exact_max < 0:
            raise ConfigurationError(f"exact_max must be >= 0 or None, got {exact_max}")
        self.exact_max = exact_max
        self._threads = threads
        self._impl: ExactIndex | HnswIndex = ExactIndex(dim)
        #: Bumped by every add and removal: tells a saved file whether it is current.
        self.changes = 0
        self._build: _Build | None = None

    @property
    def dim(self) -> int:
        return self._impl.dim

    @property
    def kind(self) -> str:
        """``"exact"`` or ``"hnsw"``: the layout in use now."""
        self._take_built()
        return "hnsw" if isinstance(self._impl, HnswIndex) else "exact"

    @property
    def building(self) -> bool:
        """Whether a graph is being built in the background (the exact scan answers)."""
        self._take_built()
        return self._build is not None

    def wait_built(self, timeout: float | None = None) -> bool:
        """Wait for a background build to finish; ``False`` if ``timeout`` passed first.
        Only waits (any thread may call it); the next call that uses the index switches
        to the graph."""
        build = self._build
        return build is None or build.done.wait(timeout)

    def __len__(self) -> int:
        return len(self._impl)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._impl

    def nbytes(self) -> int:
        return self._impl.nbytes()

    def add(self, ids: Iterable[int], vectors: np.ndarray) -> None:
        id_array, matrix = _as_batch(ids, vectors, self.dim)
        self.changes += 1
        self._take_built()
        if self._build is not None:  # the exact scan answers until the graph is built
            self._impl.add(id_array, matrix)
            self._build.pending.append((id_array, matrix))
            return
        if (isinstance(self._impl, ExactIndex) and self.exact_max is not None
                and len(self._impl) + len(id_array) > self.exact_max and _can_use_hnsw()):
            if (self.background_min is not None
                    and len(self._impl) + len(id_array) >= self.background_min):
                self._impl.add(id_array, matrix)
                self._build = _Build(self.dim, *self._impl.items(), threads=self._threads)
                return
            old_ids, old_vectors = self._impl.items()
            keep = ~np.isin(old_ids, id_array)
            graph = HnswIndex(self.dim, capacity=int(keep.sum()) + len(id_array),
                              threads=self._threads)
            graph.add(np.concatenate([old_ids[keep], id_array]),
                      np.concatenate([old_vectors[keep], matrix]))
            self._impl = graph
            return
        self._impl.add(id_array, matrix)

    def remove(self, item_id: int) -> bool:
        self._take_built()
        removed = self._impl.remove(item_id)
        self.changes += removed
        if removed and self._build is not None:
            self._build.pending.append((np.array([item_id], dtype=np.int64), None))
        if (removed and isinstance(self._impl, HnswIndex) and self.exact_max is not None
                and len(self._impl) < self.exact_max // 2):
            ids, vectors = self._impl.items()
            self._impl = ExactIndex(self.dim)
            self._impl.add(ids, vectors)
        return removed

    def search(self, query: np.ndarray, *, k: int = 1,
               threshold: float = -1.0) -> list[tuple[int, float]]:
        self._take_built()
        return self._impl.search(query, k=k, threshold=threshold)

    def _take_built(self) -> None:
        """Switch to the graph a background build finished, after replaying on it the
        adds and removals made since the build started (in the caller's thread, so the
        graph is only ever changed by one thread at a time)."""
        build = self._build
        if build is None or not build.done.is_set():
            return
        self._build = None
        if build.graph is None:  # the build failed: stay exact (the thread logged why)
            return
        for ids, vectors in build.pending:
            if vectors is None:
                build.graph.remove(int(ids[0]))
            else:
                build.graph.add(ids, vectors)
        self._impl = build.graph

    # -- persistence --------------------------------------------------------------------
    def save(self, path: Path) -> bool:
        """Write the graph to ``path`` (and the ids it holds beside it); exact indexes
        are not saved (rebuilding them from the database is as fast as reading a file).
        Returns whether a file was written."""
        self._take_built()
        if not isinstance(self._impl, HnswIndex):
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".part")
        self._impl.save(partial)
        ids = sorted(self._impl._live)
        _ids_file(partial).write_text(json.dumps({"dim": self.dim, "ids": ids}))
        os.replace(_ids_file(partial), _ids_file(path))  # ids first: a graph without
        os.replace(partial, path)  # its ids file is never trusted
        return True

    @classmethod
    def restore(cls, path: Path, dim: int, alive: np.ndarray,
                vectors_of: Any, *, exact_max: int | None = DEFAULT_EXACT_MAX,
                threads: int = 1) -> LocalIndex | None:
        """The index saved at ``path`` made to hold exactly the ids ``alive``.

        Ids in the file that are no longer alive are removed; alive ids missing from the
        file are added with ``vectors_of(missing_ids) -> matrix``. ``None`` when there is
        no usable file (absent, other dimension, unreadable, or fewer than half of
        ``alive`` in it: rebuilding is then about as fast).
        """
        if not path.is_file() or not _can_use_hnsw():
            return None
        try:
            meta = json.loads(_ids_file(path).read_text())
            if meta.get("dim") != dim:
                return None
            saved = np.asarray(meta["ids"], dtype=np.int64)
            alive = np.asarray(alive, dtype=np.int64)
            common = np.intersect1d(saved, alive, assume_unique=True)
            if len(common) < len(alive) // 2:
                return None
            graph = HnswIndex.load(path, dim, saved.tolist(), capacity=max(len(saved),
                                                                       len(alive)) + 16,
                                   threads=threads)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            logger.info("budgetkit cache: ignoring the saved index %s (%s)", path, exc)
            return None
        gone = np.setdiff1d(saved, alive, assume_unique=True)
        for item in gone.tolist():
            graph.remove(int(item))
        missing = np.setdiff1d(alive, saved, assume_unique=True)
        if len(missing):
            graph.add(missing, vectors_of(missing))
        index = cls(dim, exact_max=exact_max, threads=threads)
        index._impl = graph
        index.changes = int(len(gone) + len(missing) > 0)  # 0: the file is current
        return index


class _Build:
    """One background build of an :class:`HnswIndex` from a snapshot of the vectors."""

    def __init__(self, dim: int, ids: np.ndarray, vectors: np.ndarray, *,
                 threads: int) -> None:
        self.done = threading.Event()
        self.graph: HnswIndex | None = None
        #: (ids, vectors) added, or (id, None) removed, since the snapshot
        self.pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        threading.Thread(target=self._run, args=(dim, ids, vectors, threads),
                         name="budgetkit-hnsw-build", daemon=True).start()

    def _run(self, dim: int, ids: np.ndarray, vectors: np.ndarray, threads: int) -> None:
        try:
            graph = HnswIndex(dim, capacity=len(ids), threads=threads)
            graph.add(ids, vectors)
            self.graph = graph
        except (MemoryError, RuntimeError) as exc:  # hnswlib's errors: keep scanning
            logger.warning("budgetkit cache: building the HNSW index failed (%s); the "
                           "exact scan goes on answering", exc)
        finally:
            self.done.set()


def _ids_file(path: Path) -> Path:
    return path.with_name(path.name + ".ids.json")


def _can_use_hnsw() -> bool:
    if hnswlib_available():
        return True
    if not LocalIndex._warned:
        LocalIndex._warned = True
        logger.warning("budgetkit cache: hnswlib is not installed, so large partitions are "
                       "scanned exactly (slower above ~1,000 entries): "
                       "pip install 'budgetkit[embed]'")
    return False
