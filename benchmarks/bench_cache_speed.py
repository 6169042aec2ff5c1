"""Semantic lookup latency and memory at 1k to 1M entries, and loading entries from the store.

    python benchmarks/bench_cache_speed.py [--max 1000000] [--queries 300]

Vectors: 384-dim, shaped like real MiniLM embeddings: 400 real MiniLM vectors of GPTCache's
mock questions are topic centres; each entry is a centre plus noise (cosine about 0.75 to
its centre, about 0.56 between entries of one topic). Each query is a stored entry plus
noise (cosine about 0.9: a paraphrase). Embedding a million real prompts would take an
hour here, so the entries are synthetic; the centres are not.

1. Per size: budgetkit's ``VectorIndex`` (exact scan below 20k entries, clustered above)
   against a plain float32 numpy scan and faiss ``IndexFlatL2`` (what GPTCache's faiss
   store searches) on the same vectors: p50 / p99 of one lookup, how often the top match
   equals the exact scan's, memory per entry.
2. ``nprobe`` sweep at the largest size (the default is the first row at or above 99 %).
3. ``ResponseCache`` start-up with 100k entries in SQLite (vectors selected as bytes).
"""

from __future__ import annotations

import os

# One BLAS thread: the 2 cores are shared with other work, and a second spinning BLAS thread
# turns other processes' load into noise. Every method below runs on one thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import datetime as dt
import gc
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from budgetkit.cache._index import VectorIndex  # noqa: E402

DIM = 384
SHARED = ROOT.parent / "shared" / "data" / "cache-eval"


def centres(count: int) -> np.ndarray:
    from budgetkit.cache._embedders import MiniLMEmbedder

    rows = json.loads((SHARED / "gptcache_mock_data.json").read_text())
    texts = list(dict.fromkeys(row["origin"] for row in rows))[:count]
    return MiniLMEmbedder()(texts)


def unit(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def make_entries(topics: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    out = np.empty((size, DIM), dtype=np.float32)
    noise = 0.88 / np.sqrt(DIM)  # cosine ~0.75 to the centre
    for start in range(0, size, 100_000):
        stop = min(size, start + 100_000)
        chosen = topics[rng.integers(0, len(topics), stop - start)]
        block = chosen + rng.standard_normal((stop - start, DIM)).astype(np.float32) * noise
        out[start:stop] = unit(block)
    return out


def make_queries(entries: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    picked = entries[rng.integers(0, len(entries), count)]
    noisy = picked + rng.standard_normal(picked.shape).astype(np.float32) * (0.45 / np.sqrt(DIM))
    return unit(noisy).astype(np.float32)


def timed(fn, queries: np.ndarray) -> tuple[list[float], list]:  # type: ignore[no-untyped-def]
    """CPU milliseconds of this thread per call (waiting for a shared core is not counted)."""
    times, results = [], []
    for query in queries:
        started = time.thread_time()
        results.append(fn(query))
        times.append((time.thread_time() - started) * 1000.0)
    return times, results


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def bench_sizes(sizes: list[int], topics: np.ndarray, queries_per_size: int) -> None:
    try:
        import faiss
    except ImportError:
        faiss = None
    print("CPU time of one thread per lookup (BLAS and faiss on one thread too), in ms.\n")
    print("| entries | index | build s | lookup p50 ms | p99 ms | exact scan p50 ms "
          "| faiss flat p50 ms | top-1 = exact | served = exact | bytes/entry |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        rng = np.random.default_rng(size)
        entries = make_entries(topics, size, rng)
        queries = make_queries(entries, queries_per_size, rng)
        started = time.perf_counter()
        index = VectorIndex(DIM)
        index.add_many(range(size), entries)
        index.search(queries[0])  # clusters now if large enough
        build = time.perf_counter() - started
        cache_times, served = timed(lambda q: index.search(q, threshold=0.85, k=8), queries)
        _, top = timed(lambda q: index.search(q), queries)
        exact_queries = queries[: min(len(queries), 60 if size >= 500_000 else len(queries))]
        scan_times, exact = timed(lambda q: int(np.argmax(entries @ q)), exact_queries)
        scores = [float(entries[i] @ q) for i, q in zip(exact, exact_queries)]
        same_top = np.mean([t[0][0] == e for t, e in zip(top, exact)])
        same_served = np.mean([
            (s[0][0] if s else None) == (e if score >= 0.85 else None)
            for s, e, score in zip(served, exact, scores)])
        faiss_p50 = float("nan")
        if faiss is not None:
            faiss.omp_set_num_threads(1)
            flat = faiss.IndexFlatL2(DIM)
            flat.add(entries)
            faiss_times, _ = timed(lambda q: flat.search(q[None, :], 1), exact_queries)
            faiss_p50 = pct(faiss_times, 50)
            del flat
        kind = f"clustered ({len(index._cells)} cells, nprobe {index.nprobe})" \
            if index.clustered else "exact scan"
        print(f"| {size:,} | {kind} | {build:.1f} | {pct(cache_times, 50):.2f} "
              f"| {pct(cache_times, 99):.2f} | {pct(scan_times, 50):.2f} | {faiss_p50:.2f} "
              f"| {same_top:.1%} | {same_served:.1%} | {index.nbytes() / size:,.0f} |",
              flush=True)
        if size == sizes[-1] and index.clustered:
            nprobe_sweep(index, exact_queries, exact)
        del entries, index
        gc.collect()


def nprobe_sweep(index: VectorIndex, queries: np.ndarray, exact: list[int]) -> None:
    print(f"\nnprobe at {len(index):,} entries ({len(index._cells)} cells):")
    print("| nprobe | p50 ms | p99 ms | top-1 = exact |")
    print("|---|---|---|---|")
    default = index.nprobe
    for nprobe in (4, 8, 16, 24, 32, 48):
        index.nprobe = nprobe
        times, top = timed(lambda q: index.search(q), queries)
        same = np.mean([t[0][0] == e for t, e in zip(top, exact)])
        mark = " (default)" if nprobe == default else ""
        print(f"| {nprobe}{mark} | {pct(times, 50):.2f} | {pct(times, 99):.2f} | {same:.1%} |")
    index.nprobe = default


def bench_load(count: int, topics: np.ndarray) -> None:
    from sqlalchemy import insert

    from budgetkit import Engine
    from budgetkit.cache._cache import ResponseCache
    from budgetkit.cache._tables import CacheEntryRow, CachePartitionRow

    rng = np.random.default_rng(7)
    vectors = make_entries(topics, count, rng)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "cache.db"
        now = dt.datetime(2026, 1, 1)
        with Engine(db, clock=lambda: now) as engine:
            table = CacheEntryRow.__table__  # type: ignore[attr-defined]
            embedder = "all-MiniLM-L6-v2-onnx-int8"
            with engine.store.engine.begin() as conn:
                partition = conn.execute(insert(CachePartitionRow.__table__).values(  # type: ignore[attr-defined]
                    hash="h", namespace="default", model="gpt-4o-mini", params_hash="p",
                    context_hash="", embedder=embedder)).inserted_primary_key[0]
            from budgetkit.cache._keys import make_request

            keys = [make_request(namespace="default", model="gpt-4o-mini",
                                 prompt=f"question number {i}").key for i in range(count)]
            rows = [{"key": keys[i], "namespace": "default", "model": "gpt-4o-mini",
                     "partition_id": partition,
                     "price_model": "gpt-4o-mini", "params_hash": "p", "context_hash": "",
                     "focus": f"question number {i}", "embedder": embedder,
                     "embedding": vectors[i].tobytes(), "response": f"answer {i}",
                     "task_type": None, "created_at": now,
                     "expires_at": now + dt.timedelta(days=7), "hit_count": 0,
                     "cost_nanos": 1000, "input_tokens": 10, "output_tokens": 10}
                    for i in range(count)]
            with engine.store.engine.begin() as conn:
                conn.execute(insert(table), rows)
            del rows
        gc.collect()
        with Engine(db, clock=lambda: now) as engine:
            runs, cpu, grown = [], [], 0
            for _ in range(3):
                before = _rss()
                started, cpu_started = time.perf_counter(), time.process_time()
                cache = ResponseCache(engine, embedder=lambda texts: np.zeros((len(texts), DIM)))
                runs.append(time.perf_counter() - started)
                cpu.append(time.process_time() - cpu_started)
                grown = _rss() - before
                assert len(cache) == count
                started = time.perf_counter()
                hit = cache.lookup(model="gpt-4o-mini", prompt="question number 7",
                                   record=False, semantic=False)
                first_exact = time.perf_counter() - started
                assert hit is not None and hit.value == "answer 7"
                del cache
                gc.collect()
    print(f"\nResponseCache start with {count:,} entries in SQLite: "
          f"median {statistics.median(runs):.3f} s wall, {statistics.median(cpu):.3f} s CPU "
          f"over 3 starts (best {min(runs):.3f} s wall); "
          f"resident memory grew {grown / count:,.0f} bytes/entry; first exact hit "
          f"{first_exact * 1000:.1f} ms")


def _rss() -> int:
    """Resident set size now, in bytes (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--load", type=int, default=100_000)
    args = parser.parse_args()
    started = time.perf_counter()
    topics = centres(400)
    sizes = [size for size in (1_000, 10_000, 100_000, 1_000_000) if size <= args.max]
    print(f"{len(topics)} MiniLM topic centres; {args.queries} queries per size; "
          f"numpy {np.__version__}\n")
    bench_sizes(sizes, topics, args.queries)
    if args.load:
        bench_load(args.load, topics)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average "
          f"{os.getloadavg()[0]:.1f} at the end (2 cores shared: absolute times move, "
          "ratios within one row hold)")


if __name__ == "__main__":
    main()
