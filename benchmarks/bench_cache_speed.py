"""Semantic cache speed: open, first lookup and lookup latency at 1k-100k entries, in process
and on PostgreSQL with pgvector, memory per entry, and pgvector shared by two processes.

    python benchmarks/bench_cache_speed.py [--sizes 1000,10000,100000] [--queries 300]
                                           [--no-pgvector] [--libraries] [--quiet]

Vectors: 384-dim, shaped like real MiniLM embeddings: 400 real MiniLM vectors of GPTCache's
mock questions are topic centres; each entry is a centre plus noise (cosine about 0.75 to
its centre). Each query is a stored entry plus noise (cosine about 0.9: a paraphrase), so
it should be served that entry. Entries are written straight into the cache tables (what
``ResponseCache.store`` writes, without embedding 100k texts); lookups go through
``ResponseCache.lookup`` with an embedder that returns the query's precomputed vector, so
"lookup" is everything but the model (exact key, index search, candidate rows, guard,
hit bookkeeping in the database). The model's own cost is measured beside it.

1. In process (SQLite ledger): a cold open after the rows were written (no saved graph:
   from 20k entries the graph builds in the background while the exact scan answers), its
   first lookup and the time until the graph was built (then saved next to the ledger);
   a second open (restores the graph), its first lookup, lookup p50 / p99, how often the
   source entry is served, and resident memory per entry.
2. pgvector (a private PostgreSQL 16 + pgvector from ``pgserver``): the same, plus the
   database's bytes per entry (table + indexes); then two processes looking up at once.
3. The local model on the largest in-process cache: open, then the first lookup at once
   (the model loads in the background from open, while the index is read) and after
   ``ready()``; the cost of one embedding.
4. ``--libraries``: numpy, hnswlib, faiss-cpu and usearch on the same vectors (those
   installed): build, save / restore, search p50, top-1 equal to the exact scan.
"""

from __future__ import annotations

import os

# One BLAS thread: the 2 cores are shared with other work; every method runs on one thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import datetime as dt
import gc
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from budgetkit import Engine  # noqa: E402
from budgetkit.cache import MiniLMEmbedder, ResponseCache, make_request  # noqa: E402

DIM = 384
MODEL = "gpt-4o-mini"
EMBEDDER = MiniLMEmbedder.name
SHARED = ROOT.parent / "shared" / "data" / "cache-eval"
NOW = dt.datetime(2026, 1, 1)
QUIET = False


def say(message: str) -> None:
    if not QUIET:
        print(f"  .. {message}", file=sys.stderr, flush=True)


# -- data -------------------------------------------------------------------------------------
def centres(count: int = 400) -> np.ndarray:
    rows = json.loads((SHARED / "gptcache_mock_data.json").read_text())
    texts = list(dict.fromkeys(row["origin"] for row in rows))[:count]
    return MiniLMEmbedder()(texts)


def unit(matrix: np.ndarray) -> np.ndarray:
    return (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float32)


def make_entries(topics: np.ndarray, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    chosen = topics[rng.integers(0, len(topics), size)]
    return unit(chosen + rng.standard_normal((size, DIM)).astype(np.float32)
                * (0.88 / np.sqrt(DIM)))


def make_queries(entries: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    picked = rng.choice(len(entries), count, replace=False)
    noisy = entries[picked] + rng.standard_normal((count, DIM)).astype(np.float32) * (
        0.45 / np.sqrt(DIM))
    return picked, unit(noisy)


class TableEmbedder:
    """Returns the precomputed vector of query ``i`` for any text naming ``i`` (the cache
    may normalise the text before embedding it), under the local model's name, so
    queries land in the partition the entries were written to."""

    def __init__(self, vectors: dict[int, np.ndarray]) -> None:
        self.vectors = vectors
        self.__name__ = EMBEDDER

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.vectors[number_of(text)] for text in texts])


def question(i: int) -> str:
    # i in two short numbers: five digits in a row would read as a record number (an
    # order, an account), which makes a question personal and moves it to its own scope
    return f"stored question {i // 1000} {i % 1000}"


def paraphrase(i: int) -> str:
    # a wording the second stage accepts as the same question: the hit path is measured
    return f"Stored question {i // 1000} {i % 1000} please?"


def number_of(text: str) -> int:
    high, low = re.findall(r"\d+", text)[:2]
    return int(high) * 1000 + int(low)


def write_entries(engine: Engine, vectors: np.ndarray, *, pgvector: bool) -> None:
    """What ``ResponseCache.store`` writes, for every vector, in bulk."""
    from sqlalchemy import insert

    from budgetkit.cache._store import CacheRows
    from budgetkit.cache._tables import CacheEntryRow

    rows = CacheRows(engine.store)
    partition_ids: dict[tuple[str, str, str, str, str], int] = {}
    table = CacheEntryRow.__table__  # type: ignore[attr-defined]
    chunk = 20_000
    for start in range(0, len(vectors), chunk):
        batch = []
        for i in range(start, min(len(vectors), start + chunk)):
            request = make_request(namespace="default", model=MODEL, prompt=question(i))
            partition = request.partition(EMBEDDER)
            if partition not in partition_ids:
                partition_ids[partition] = rows._partition_id(partition)
            batch.append({
                "key": request.key, "partition_id": partition_ids[partition],
                "namespace": "default",
                "model": MODEL, "price_model": MODEL, "params_hash": request.params_hash,
                "context_hash": request.context_hash, "focus": request.stored_focus,
                "embedder": EMBEDDER, "embedding": vectors[i].tobytes(),
                "response": f"answer {i}", "task_type": None, "created_at": NOW,
                "expires_at": NOW + dt.timedelta(days=7), "hit_count": 0,
                "cost_nanos": 1000, "input_tokens": 10, "output_tokens": 10})
        with engine.store.engine.begin() as conn:
            conn.execute(insert(table), batch)
        say(f"wrote {min(len(vectors), start + chunk):,} / {len(vectors):,} rows")
    if not pgvector:
        return
    from budgetkit.cache._pgvector import PgVectorEntries

    name = PgVectorEntries.table(DIM)
    raw = engine.store.engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute(f"CREATE TABLE {name} (seq BIGINT PRIMARY KEY REFERENCES "
                       f"budgetkit_cache_entry(seq) ON DELETE CASCADE, partition_id INTEGER "
                       f"NOT NULL, embedding vector({DIM}) NOT NULL)")
        cursor.execute("SELECT seq, partition_id FROM budgetkit_cache_entry ORDER BY seq")
        seqs = cursor.fetchall()  # in insertion order, so row i holds vector i
        with cursor.copy(f"COPY {name} (seq, partition_id, embedding) FROM STDIN") as copy:
            for (seq, partition_id), vector in zip(seqs, vectors):
                copy.write_row((seq, partition_id,
                                "[" + ",".join(map(repr, vector.tolist())) + "]"))
        raw.commit()
        say("building the HNSW index in PostgreSQL")
        started = time.perf_counter()
        # built once the rows are in (faster than row by row), in enough memory; the
        # backend's own DDL then finds it and adds only what is missing
        cursor.execute("SET maintenance_work_mem = '512MB'")
        cursor.execute(f"CREATE INDEX {name}_hnsw ON {name} USING hnsw "
                       f"(embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)")
        raw.commit()
        PgVectorEntries(rows).ensure(DIM)
        say(f"HNSW index built in {time.perf_counter() - started:.1f} s")
        cursor.execute(f"ANALYZE {name}")
        raw.commit()
    finally:
        raw.close()


# -- measuring --------------------------------------------------------------------------------
def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def lookups(cache: ResponseCache,
            picked: np.ndarray) -> tuple[list[float], float, list[float]]:
    """Wall-clock ms per lookup, the share served its source entry, and CPU ms of the
    calling thread per lookup (what the lookup itself costs, whatever else runs on the
    machine; for pgvector the database's own work is not in it)."""
    times, served, cpu = [], 0, []
    for i in picked.tolist():
        started, cpu_started = time.perf_counter(), time.thread_time()
        hit = cache.lookup(model=MODEL, prompt=paraphrase(i), record=False)
        times.append((time.perf_counter() - started) * 1000.0)
        cpu.append((time.thread_time() - cpu_started) * 1000.0)
        served += hit is not None and hit.value == f"answer {i}"
    return times, served / len(picked), cpu


def measure(db: str, vectors: np.ndarray, queries: np.ndarray, picked: np.ndarray,
            backend: str) -> dict[str, Any]:
    embedder = TableEmbedder(dict(zip(picked.tolist(), queries)))
    result: dict[str, Any] = {"backend": backend, "entries": len(vectors)}
    opens = []
    for attempt in range(2 if backend == "local" else 1):
        gc.collect()
        started = time.perf_counter()
        with Engine(db, clock=lambda: NOW) as engine:
            cache = ResponseCache(engine, embedder=embedder, vector_backend=backend)
            opens.append(time.perf_counter() - started)
            assert cache.vector_backend == backend
            started = time.perf_counter()
            hit = cache.lookup(model=MODEL, prompt=paraphrase(int(picked[0])), record=False)
            first = (time.perf_counter() - started) * 1000.0
            if attempt == 0 and backend == "local":
                started = time.perf_counter()
                cache.ready()  # a graph of 20k+ vectors builds in the background
                built = time.perf_counter() - started
                cache.save_index()
                result.update(cold_first_ms=first, built_s=built)
                say(f"cold open (no saved graph) {opens[-1]:.2f} s, first lookup "
                    f"{first:.1f} ms, then {built:.1f} s until the graph was built")
                continue
            say(f"open {opens[-1]:.2f} s, first lookup {first:.1f} ms "
                f"({'hit' if hit else 'miss'})")
            times, served, cpu = lookups(cache, picked)
            result.update(cold_open_s=opens[0], open_s=opens[-1], first_ms=first,
                          p50=pct(times, 50), p99=pct(times, 99), served=served,
                          cpu_p50=pct(cpu, 50),
                          rss_per_entry=memory(db, backend, len(vectors)))
            if backend == "pgvector":
                from sqlalchemy import text

                with engine.store.engine.connect() as conn:
                    size = conn.execute(text(
                        "SELECT pg_total_relation_size('budgetkit_cache_vector_384') + "
                        "pg_total_relation_size('budgetkit_cache_entry')")).scalar_one()
                result["db_per_entry"] = size / len(vectors)
            del cache
    return result


def local_row(size: int, topics: np.ndarray, count: int, folder: Path) -> dict[str, Any]:
    vectors = make_entries(topics, size, seed=size)
    picked, queries = make_queries(vectors, count, seed=size)
    db = str(folder / f"local-{size}.db")
    with Engine(db, clock=lambda: NOW) as engine:
        engine.store.create_tables()
        write_entries(engine, vectors, pgvector=False)
    return measure(db, vectors, queries, picked, "local")


def pgvector_row(server: Any, size: int, topics: np.ndarray,
                 count: int) -> tuple[dict[str, Any], str]:
    vectors = make_entries(topics, size, seed=size)
    picked, queries = make_queries(vectors, count, seed=size)
    url = server.new_database()
    with Engine(url, clock=lambda: NOW) as engine:
        engine.store.create_tables()
        write_entries(engine, vectors, pgvector=True)
    return measure(url, vectors, queries, picked, "pgvector"), url


def two_processes(url: str, size: int, topics: np.ndarray, count: int) -> list[dict[str, float]]:
    workers = [subprocess.Popen([sys.executable, __file__, "--worker", url, str(size),
                                 str(count), str(seed)], stdout=subprocess.PIPE, text=True)
               for seed in (1, 2)]
    return [json.loads(worker.communicate()[0].strip().splitlines()[-1]) for worker in workers]


def worker(url: str, size: int, count: int, seed: int) -> None:
    """One of the two processes: ``count`` lookups against the shared database."""
    topics = np.load(Path(tempfile.gettempdir()) / "bk_bench_centres.npy")
    vectors = make_entries(topics, size, seed=size)
    picked, queries = make_queries(vectors, count, seed=size)
    order = np.random.default_rng(seed).permutation(count)
    picked, queries = picked[order], queries[order]
    embedder = TableEmbedder(dict(zip(picked.tolist(), queries)))
    with Engine(url, clock=lambda: NOW) as engine:
        cache = ResponseCache(engine, embedder=embedder, vector_backend="pgvector")
        times, served, _ = lookups(cache, picked)
    print(json.dumps({"p50": pct(times, 50), "p99": pct(times, 99), "served": served}))


def model_first_lookup(db: Path) -> dict[str, float]:
    """The local model on the largest in-process cache: open, then the first lookup at
    once (the model loads in the background from open) and after ``ready()``; the steady
    cost of one embedding."""
    out: dict[str, float] = {}
    with Engine(db, clock=lambda: NOW) as engine:
        for label in ("at once", "after ready"):
            embedder = MiniLMEmbedder()  # a new one: nothing loaded yet
            started = time.perf_counter()
            cache = ResponseCache(engine, embedder=embedder, vector_backend="local")
            out["open_s"] = time.perf_counter() - started
            if label == "after ready":
                cache.ready()
            started = time.perf_counter()
            cache.lookup(model=MODEL, prompt="Which city is the capital of France?",
                         record=False)
            out[label] = (time.perf_counter() - started) * 1000.0
            assert embedder._session is not None, "the lookup did not embed"
            say(f"local model: open {out['open_s']:.2f} s, first lookup {label} "
                f"{out[label]:.1f} ms")
        times = []
        for i in range(50):
            started = time.perf_counter()
            embedder([f"How do I reset my password, attempt {i}?"])
            times.append((time.perf_counter() - started) * 1000.0)
        out["embed_p50"] = pct(times, 50)
    return out


def memory(db: str, backend: str, size: int) -> float:
    """Resident memory one process gains by opening the cache, per entry (in a fresh
    process: in this one, memory freed by earlier rows would be reused and hide it)."""
    out = subprocess.run([sys.executable, __file__, "--memory", db, backend], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return int(out.strip().splitlines()[-1]) / size


def memory_worker(db: str, backend: str) -> None:
    embedder = TableEmbedder({})
    with Engine(db, clock=lambda: NOW) as engine:
        gc.collect()
        before = rss()
        cache = ResponseCache(engine, embedder=embedder, vector_backend=backend)
        print(rss() - before)
        del cache


# -- the libraries ----------------------------------------------------------------------------
def libraries(sizes: list[int], topics: np.ndarray, count: int) -> None:
    print("\n| library | entries | build s | save + restore s | search p50 ms "
          "| top-1 = exact | file bytes/entry |")
    print("|---|---|---|---|---|---|---|")
    for size in sizes:
        vectors = make_entries(topics, size, seed=size)
        _, queries = make_queries(vectors, count, seed=size)
        exact = [int(np.argmax(vectors @ q)) for q in queries]
        for name, build in _LIBRARIES.items():
            try:
                started = time.perf_counter()
                search, save_restore = build(vectors)
            except ImportError:
                continue
            built = time.perf_counter() - started
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                file_size = save_restore(Path(tmp) / "index")
                moved = time.perf_counter() - started
            times, same = [], 0
            for query, truth in zip(queries, exact):
                started = time.perf_counter()
                found = search(query)
                times.append((time.perf_counter() - started) * 1000.0)
                same += found == truth
            print(f"| {name} | {size:,} | {built:.2f} | {moved:.2f} | {pct(times, 50):.3f} "
                  f"| {same / len(queries):.1%} | {file_size / size:,.0f} |", flush=True)


def _numpy(vectors: np.ndarray) -> tuple[Callable[[np.ndarray], int], Callable[[Path], int]]:
    matrix = vectors.copy()

    def save_restore(path: Path) -> int:
        np.save(path.with_suffix(".npy"), matrix)
        np.load(path.with_suffix(".npy"))
        return path.with_suffix(".npy").stat().st_size

    return (lambda q: int(np.argmax(matrix @ q))), save_restore


def _hnswlib(vectors: np.ndarray) -> tuple[Callable[[np.ndarray], int], Callable[[Path], int]]:
    from budgetkit.cache._index import LocalIndex

    index = LocalIndex(DIM, exact_max=0)
    index.add(range(len(vectors)), vectors)
    index.wait_built()  # from 20k vectors the graph is built in a background thread

    def save_restore(path: Path) -> int:
        index.save(path)
        LocalIndex.restore(path, DIM, np.arange(len(vectors)), lambda ids: vectors[ids])
        return path.stat().st_size

    return (lambda q: index.search(q)[0][0]), save_restore


def _faiss(vectors: np.ndarray) -> tuple[Callable[[np.ndarray], int], Callable[[Path], int]]:
    import faiss

    faiss.omp_set_num_threads(1)
    index = faiss.IndexHNSWFlat(DIM, 16, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 100
    index.add(vectors)
    index.hnsw.efSearch = 128

    def save_restore(path: Path) -> int:
        faiss.write_index(index, str(path))
        faiss.read_index(str(path))
        return path.stat().st_size

    return (lambda q: int(index.search(q[None, :], 1)[1][0][0])), save_restore


def _usearch(vectors: np.ndarray) -> tuple[Callable[[np.ndarray], int], Callable[[Path], int]]:
    from usearch.index import Index

    index = Index(ndim=DIM, metric="ip", dtype="f32", connectivity=16, expansion_add=100,
                  expansion_search=128)
    index.add(np.arange(len(vectors)), vectors, threads=1)

    def save_restore(path: Path) -> int:
        index.save(str(path))
        Index.restore(str(path))
        return path.stat().st_size

    return (lambda q: int(index.search(q, 1, threads=1).keys[0])), save_restore


_LIBRARIES = {"numpy (exact)": _numpy, "hnswlib (budgetkit LocalIndex)": _hnswlib,
              "faiss-cpu HNSWFlat": _faiss, "usearch f32": _usearch}


# -- main -------------------------------------------------------------------------------------
def main() -> None:
    global QUIET
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--memory":
        memory_worker(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--no-pgvector", action="store_true")
    parser.add_argument("--libraries", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args()
    QUIET = args.quiet
    sizes = [int(size) for size in args.sizes.split(",")]
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    say("embedding 400 topic centres with the local model")
    topics = centres()
    np.save(Path(tempfile.gettempdir()) / "bk_bench_centres.npy", topics)
    rows: list[dict[str, Any]] = []
    pair: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bkbench") as tmp:
        folder = Path(tmp)
        for size in sizes:
            say(f"in process, {size:,} entries")
            rows.append(local_row(size, topics, args.queries, folder))
        say("the local model's first lookup")
        model = model_first_lookup(folder / f"local-{sizes[-1]}.db")
        if not args.no_pgvector:
            from budgetkit.testing import PgvectorServer

            with PgvectorServer(folder / "pg") as server:
                url = ""
                for size in sizes:
                    say(f"pgvector, {size:,} entries")
                    row, url = pgvector_row(server, size, topics, args.queries)
                    rows.append(row)
                say(f"pgvector, two processes at once on {sizes[-1]:,} entries")
                pair = two_processes(url, sizes[-1], topics, args.queries)
    print(f"{args.queries} lookups per row (paraphrases of stored entries); wall-clock "
          f"unless CPU; numpy {np.__version__}; {dt.date.today().isoformat()}; load average "
          f"{load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (2 cores "
          f"shared: wall-clock figures grow with it, CPU figures much less)\n")
    print("| backend | entries | open s | first lookup ms | lookup p50 ms | p99 ms "
          "| lookup CPU p50 ms | source served | process bytes/entry | database bytes/entry "
          "| cold open s (no saved graph) | its first lookup ms | graph built after s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        database = f"{row['db_per_entry']:,.0f}" if "db_per_entry" in row else "-"
        cold = (f"{row['cold_open_s']:.2f} | {row['cold_first_ms']:.1f} | {row['built_s']:.1f}"
                if "built_s" in row else "- | - | -")
        print(f"| {row['backend']} | {row['entries']:,} | {row['open_s']:.2f} "
              f"| {row['first_ms']:.1f} | {row['p50']:.2f} | {row['p99']:.2f} "
              f"| {row['cpu_p50']:.2f} | {row['served']:.1%} | {row['rss_per_entry']:,.0f} | {database} | {cold} |")
    if pair:
        print(f"\npgvector, two processes looking up at once on {sizes[-1]:,} entries: "
              + "; ".join(f"p50 {item['p50']:.2f} ms, p99 {item['p99']:.2f} ms, "
                          f"source served {item['served']:.1%}" for item in pair))
    print(f"\nin process with the local model, {sizes[-1]:,} entries: open "
          f"{model['open_s']:.2f} s (the model loads in the background meanwhile); first "
          f"lookup right after open {model['at once']:.1f} ms, after ready() "
          f"{model['after ready']:.1f} ms; one embedding p50 {model['embed_p50']:.2f} ms "
          f"(add it to the lookup figures above)")
    if args.libraries:
        libraries(sizes, topics, args.queries)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average "
          f"{os.getloadavg()[0]:.1f} at the end (2 cores shared)")


if __name__ == "__main__":
    main()
