"""Where the in-process HNSW graphs are saved, so opening a large cache does not rebuild them.

Building the graph of a 100k-entry partition takes 12-15 s here; reading it back takes
0.1 s. The files live next to the SQLite ledger (``budgetkit.db`` ->
``budgetkit.db.vectors/``), one per partition and vector size, named by a hash of the
partition. A file is only ever a head start: at open it is reconciled with the entries
the database says are alive (:meth:`LocalIndex.restore`), so a file left stale by a
killed process costs a few adds, never a wrong answer. A PostgreSQL ledger without
pgvector keeps them under ``~/.budgetkit/vectors/``; ``index_dir`` puts them anywhere.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._index import LocalIndex

__all__ = ["IndexFiles"]

logger = logging.getLogger("budgetkit.cache")

Partition = tuple[str, str, str, str, str]


class IndexFiles:
    """Saves and restores the :class:`LocalIndex` of each large partition in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._saved: dict[Partition, int] = {}  # partition -> index.changes when saved

    @classmethod
    def beside(cls, store: Any, index_dir: str | os.PathLike[str] | None) -> IndexFiles | None:
        """Files in ``index_dir``; else next to the store's SQLite file; else, for a
        server database (PostgreSQL without pgvector), in ``~/.budgetkit/vectors/`` under
        a hash of its URL; ``None`` for an in-memory database (nothing outlives it)."""
        if index_dir is not None:
            return cls(Path(index_dir))
        url = store.engine.url
        if not store.is_sqlite:
            where = url.render_as_string(hide_password=True)
            digest = hashlib.sha256(where.encode("utf-8")).hexdigest()[:16]
            return cls(Path.home() / ".budgetkit" / "vectors" / digest)
        if not url.database or url.database == ":memory:":
            return None
        return cls(Path(url.database).with_name(Path(url.database).name + ".vectors"))

    def path(self, partition: Partition, dim: int) -> Path:
        digest = hashlib.sha256("\x1f".join(partition).encode("utf-8", "surrogatepass"))
        return self.folder / f"{digest.hexdigest()[:32]}-{dim}.hnsw"

    def restore(self, partition: Partition, seqs: np.ndarray, vectors: np.ndarray, *,
                exact_max: int | None) -> LocalIndex | None:
        """The saved index of ``partition`` brought up to date with ``seqs`` (alive) and
        their ``vectors``; ``None`` when there is no usable file."""
        order = np.argsort(seqs, kind="stable")
        sorted_seqs = seqs[order]

        def vectors_of(missing: np.ndarray) -> np.ndarray:
            return vectors[order[np.searchsorted(sorted_seqs, missing)]]

        index = LocalIndex.restore(self.path(partition, vectors.shape[1]), vectors.shape[1],
                                   seqs, vectors_of, exact_max=exact_max)
        if index is not None:
            self._saved[partition] = 0  # the file holds the index as it was restored
        return index

    def save(self, indexes: Mapping[Partition, LocalIndex]) -> int:
        """Write every large index changed since it was last saved; returns how many."""
        written = 0
        for partition, index in list(indexes.items()):
            if index.kind != "hnsw" or self._saved.get(partition) == index.changes:
                continue
            try:
                if index.save(self.path(partition, index.dim)):
                    written += 1
                    self._saved[partition] = index.changes
            except OSError as exc:  # a read-only folder must not break the cache
                logger.warning("budgetkit cache: could not save the vector index in %s: %s",
                               self.folder, exc)
        return written
