"""Serve a repeated question without paying again: exact and semantic response cache,
its keys, the fact guard, embedders and the vector index.

Built on :mod:`budgetkit.ledger` and :mod:`budgetkit.pricing`; it records hits through
whatever engine it is given (see :class:`CacheEngine`).
"""

from __future__ import annotations

from ._cache import DEFAULT_TASK_TTLS as DEFAULT_TASK_TTLS
from ._cache import DEFAULT_THRESHOLD as DEFAULT_THRESHOLD
from ._cache import CacheEngine as CacheEngine
from ._cache import CacheHit as CacheHit
from ._cache import CacheStats as CacheStats
from ._cache import ResponseCache as ResponseCache
from ._cache import cached as cached
from ._cache import engine_cache as engine_cache
from ._embedders import Embedder as Embedder
from ._embedders import MiniLMEmbedder as MiniLMEmbedder
from ._embedders import as_embedder as as_embedder
from ._keys import CacheRequest as CacheRequest
from ._keys import is_standalone as is_standalone
from ._keys import make_request as make_request
from ._pgvector import VectorBackendUnavailable as VectorBackendUnavailable

__all__ = ['CacheEngine', 'ResponseCache', 'CacheHit', 'CacheStats', 'DEFAULT_TASK_TTLS',
           'DEFAULT_THRESHOLD', 'cached', 'engine_cache', 'Embedder', 'MiniLMEmbedder',
           'as_embedder', 'CacheRequest', 'make_request', 'is_standalone',
           'VectorBackendUnavailable']
