"""How fast are the reports on a large ledger? (issue: a summary over 1,000,000 rows < 1 s)

Generates N usage rows (default 1,000,000, spread over 90 days, 6 models, 7 operation
types, 200 users, a tag on 20 % of rows) into a fresh SQLite file with one
``INSERT ... SELECT`` over a recursive CTE. Those rows go around budgetkit's writer, so the
rollup is then rebuilt from them (``Store.rebuild_rollup``, what ``budgetkit rollup
--rebuild`` runs; timed). Then each report is timed, best of 3, next to the peers: the
same summary read from the ledger alone (the rollup ignored), done the naive way (load
rows with ``Store.query_usage`` and sum in Python, on a 3-day slice and scaled up), and the
bare SQL through the stdlib ``sqlite3`` module. Last, what the rollup costs the writer:
``Store.insert_usage`` of 500-row batches shaped like the generated rows, with and without
the rollup upserts.

    /work/venv/bin/python benchmarks/bench_reports.py [--rows 1000000] [--db PATH] [--reuse]
    /work/venv/bin/python benchmarks/bench_reports.py --postgres postgresql://postgres@127.0.0.1:5432/test

With ``--postgres URL`` the same rows go into a database ``bk_bench_reports`` on that
server (made with ``generate_series``; ``ANALYZE`` run after the load, as autovacuum would
soon), and the writer's cost is measured on a scratch database there; the sqlite3 peer is
left out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import budgetkit  # noqa: E402
from budgetkit.reports._reports import as_source  # noqa: E402
from budgetkit.ledger._store import Store  # noqa: E402
from _stages import Stages  # noqa: E402  (benchmarks/_stages.py, next to this script)

NOW = dt.datetime(2026, 3, 31, 12, 0, 0)
MODELS = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "text-embedding-3-small",
          "o3-mini"]
OPERATIONS = ["embedding", "query_embedding", "rag_input", "rag_output", "chat_completion",
              "text_generation", "text_classification"]


def generate(path: str, rows: int) -> float:
    Store(path).create_tables()
    start = time.perf_counter()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    # bulk load without the indexes, then build them once (much faster than row by row)
    indexes = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND "
                           "tbl_name = 'budgetkit_usage' AND sql IS NOT NULL").fetchall()
    for name, _sql in indexes:
        conn.execute(f'DROP INDEX "{name}"')
    models = ",".join(f'"{m}"' for m in MODELS)
    ops = ",".join(f'"{o}"' for o in OPERATIONS)
    span_seconds = 90 * 86400
    base = (NOW - dt.timedelta(days=90)).strftime("%Y-%m-%d %H:%M:%S")
    conn.execute(f"""
        WITH RECURSIVE n(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM n WHERE x < {rows - 1})
        INSERT INTO budgetkit_usage (id, created_at, operation_type, provider, model,
            input_tokens, output_tokens, cached_input_tokens, cache_write_tokens,
            reasoning_tokens, total_tokens, cost_nanos, saved_nanos, latency_ms, status,
            usage_source, user_id, session_id, project, tags, metadata, prompt_hash)
        SELECT printf('%032x', x),
               strftime('%Y-%m-%d %H:%M:%S', '{base}',
                        '+' || (x * {span_seconds} / {rows}) || ' seconds') || '.000000',
               json_extract('[{ops}]', '$[' || (x % 7) || ']'),
               'openai',
               json_extract('[{models}]', '$[' || ((x / 7) % 6) || ']'),
               100 + x % 900, (x % 7) * 40, (x % 5) * 10, 0, 0,
               100 + x % 900 + (x % 7) * 40,
               CASE WHEN x % 10 = 0 THEN 0 ELSE 1000 + (x % 997) * 1300 END,
               CASE WHEN x % 10 = 0 THEN 5000 ELSE 0 END,
               50 + x % 400,
               CASE WHEN x % 10 = 0 THEN 'cached' WHEN x % 97 = 0 THEN 'error' ELSE 'ok' END,
               'provider', 'user-' || (x % 200), 'session-' || (x % 5000),
               'project-' || (x % 5),
               CASE WHEN x % 5 = 0 THEN '["team-' || (x % 3) || '"]' ELSE '[]' END,
               '{{}}', printf('%032x', x % 50000)
        FROM n
    """)
    for _name, sql in indexes:
        conn.execute(sql)
    conn.execute("""
        INSERT INTO budgetkit_usage_tag (usage_id, tag)
        SELECT id, json_extract(tags, '$[0]') FROM budgetkit_usage WHERE tags != '[]'
    """)
    conn.commit()
    conn.close()  # no ANALYZE: budgetkit's own databases never run it, so plans here are theirs
    return time.perf_counter() - start


def generate_postgres(url: str, rows: int) -> float:
    Store(url).create_tables()
    import psycopg

    start = time.perf_counter()
    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        indexes = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'budgetkit_usage' "
            "AND indexname NOT LIKE '%pkey'").fetchall()
        for name, _sql in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        models = ",".join(f"'{m}'" for m in MODELS)
        ops = ",".join(f"'{o}'" for o in OPERATIONS)
        base = (NOW - dt.timedelta(days=90)).strftime("%Y-%m-%d %H:%M:%S")
        conn.execute(f"""
            INSERT INTO budgetkit_usage (id, created_at, operation_type, provider, model,
                input_tokens, output_tokens, cached_input_tokens, cache_write_tokens,
                reasoning_tokens, total_tokens, cost_nanos, saved_nanos, latency_ms, status,
                usage_source, user_id, session_id, project, tags, metadata, prompt_hash)
            SELECT lpad(to_hex(x), 32, '0'),
                   timestamp '{base}' + (x::bigint * {90 * 86400} / {rows}) * interval '1 second',
                   (ARRAY[{ops}])[x % 7 + 1], 'openai', (ARRAY[{models}])[(x / 7) % 6 + 1],
                   100 + x % 900, (x % 7) * 40, (x % 5) * 10, 0, 0, 100 + x % 900 + (x % 7) * 40,
                   CASE WHEN x % 10 = 0 THEN 0 ELSE 1000 + (x % 997) * 1300 END,
                   CASE WHEN x % 10 = 0 THEN 5000 ELSE 0 END, 50 + x % 400,
                   CASE WHEN x % 10 = 0 THEN 'cached' WHEN x % 97 = 0 THEN 'error' ELSE 'ok' END,
                   'provider', 'user-' || (x % 200), 'session-' || (x % 5000),
                   'project-' || (x % 5),
                   CASE WHEN x % 5 = 0 THEN json_build_array('team-' || (x % 3))
                        ELSE '[]'::json END,
                   '{{}}'::json, lpad(to_hex(x % 50000), 32, '0')
            FROM generate_series(0, {rows - 1}) AS x
        """)
        for _name, sql in indexes:
            conn.execute(sql)
        conn.execute("INSERT INTO budgetkit_usage_tag (usage_id, tag) SELECT id, tags->>0 "
                     "FROM budgetkit_usage WHERE json_array_length(tags) > 0")
        conn.execute("ANALYZE")
    return time.perf_counter() - start


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def _postgres_database(server: str, name: str, fresh: bool) -> str:
    """The URL of database ``name`` on ``server`` (dropped and made again if ``fresh``)."""
    import psycopg

    with psycopg.connect(_libpq(server), autocommit=True) as admin:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                               (name,)).fetchone()
        if exists and fresh:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        if fresh or not exists:
            admin.execute(f'CREATE DATABASE "{name}"')
    return server.rsplit("/", 1)[0] + "/" + name


def _postgres_row_count(url: str) -> int:
    import psycopg

    try:
        with psycopg.connect(_libpq(url)) as conn:
            return int(conn.execute("SELECT count(*) FROM budgetkit_usage").fetchone()[0])
    except psycopg.Error:
        return -1


def _row_count(path: str) -> int:
    if not os.path.exists(path):
        return -1
    try:
        with sqlite3.connect(path) as conn:
            return int(conn.execute("SELECT count(*) FROM budgetkit_usage").fetchone()[0])
    except sqlite3.Error:
        return -1


def best_of(fn: Callable[[], Any], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def naive_summary(store: Store, days: int) -> dict[str, int]:
    totals: dict[str, int] = {}
    for item in store.query_usage(since=NOW - dt.timedelta(days=days), until=NOW):
        row = item if hasattr(item, "model") else item[0]  # ORM object or a Row of one
        totals[row.model] = totals.get(row.model, 0) + row.cost_nanos
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--db", help="SQLite file to (re)create (default: a temp file)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep --db if it already holds --rows rows")
    parser.add_argument("--postgres", metavar="URL",
                        help="benchmark PostgreSQL: a server URL (a database is made there)")
    parser.add_argument("--quiet", action="store_true", help="print the table only")
    args = parser.parse_args()
    stages = Stages(args.quiet)
    if args.postgres:
        path = _postgres_database(args.postgres, "bk_bench_reports", fresh=False)
        if not (args.reuse and _postgres_row_count(path) == args.rows):
            path = _postgres_database(args.postgres, "bk_bench_reports", fresh=True)
            stages.say(f"generating {args.rows:,} rows on PostgreSQL")
            made = generate_postgres(path, args.rows)
            print(f"generated {args.rows:,} rows in {made:.1f} s on PostgreSQL ({path})")
    else:
        path = args.db or os.path.join(tempfile.mkdtemp(prefix="bk-bench-"), "reports.db")
        if not (args.reuse and _row_count(path) == args.rows):
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(path + suffix):
                    os.remove(path + suffix)
            stages.say(f"generating {args.rows:,} rows in {path}")
            made = generate(path, args.rows)
            size_mb = os.path.getsize(path) / 1e6
            print(f"generated {args.rows:,} rows in {made:.1f} s ({size_mb:.0f} MB) at {path}")

    store = Store(path)
    # the generated rows went around the writer
    rebuilt = store.rebuild_rollup(progress=stages.hook("rebuilding the rollup"))
    print(f"rollup rebuilt in {rebuilt.seconds:.1f} s: "
          + ", ".join(f"{name} {n:,}" for name, n in rebuilt.buckets.items()))
    kw: dict[str, Any] = {"now": NOW}
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("summary by model, 90 days (all rows)", lambda: budgetkit.summarize(
            store, group_by="model", days=90, **kw)),
        ("summary by model, 30 days", lambda: budgetkit.summarize(
            store, group_by="model", days=30, **kw)),
        ("summary by operation+model, 90 days", lambda: budgetkit.summarize(
            store, group_by=["operation_type", "model"], days=90, **kw)),
        ("summary by user, 90 days", lambda: budgetkit.summarize(
            store, group_by="user", days=90, **kw)),
        ("daily series, 90 days", lambda: budgetkit.cost_series(store, days=90, **kw)),
        ("hourly series, 90 days", lambda: budgetkit.cost_series(
            store, unit="hour", days=90, **kw)),
        ("summary by tag, 90 days", lambda: budgetkit.summarize(
            store, group_by="tag", days=90, **kw)),
        ("one user, 30 days (index)", lambda: budgetkit.summarize(
            store, group_by="operation_type", days=30, user_id="user-7", **kw)),
        ("summary by session, 90 days (ledger)", lambda: budgetkit.summarize(
            store, group_by="session", days=90, **kw)),
        ("what-if gpt-4o-mini, 90 days", lambda: budgetkit.what_if(
            store, "gpt-4o-mini", days=90, **kw)),
        ("cost analysis, 30 days", lambda: budgetkit.cost_analysis(store, days=30, **kw)),
        ("forecast (month)", lambda: budgetkit.forecast(store, **kw)),
        ("anomalies, daily, 30 days", lambda: budgetkit.detect_anomalies(store, **kw)),
        ("model+operation+day in one scan, 90 d", lambda: budgetkit.reports.summarize_many(
            store, ["model", "operation_type", "day"], days=90, **kw)),
    ]
    try:  # the whole dashboard payload (the server extra)
        from budgetkit.server._app import Principal, dashboard_payload

        cases.append(("dashboard payload, 30 days", lambda: dashboard_payload(
            as_source(store, now=NOW), Principal(None), 30)))
    except ImportError:
        pass
    results = [(name, best_of(fn)) for name, fn in stages.items(
        cases, "timing the reports (best of 3)")]
    stages.say("timing the peers")

    # peers: the ledger alone, the bare SQL through sqlite3, and loading rows into Python
    def ledger_only() -> Any:
        src = as_source(store, now=NOW)
        src.rollup = False  # as if the rollup were not built
        return budgetkit.summarize(src, group_by="model", days=90)

    ledger = best_of(ledger_only)
    floor = None
    if not args.postgres:
        raw = sqlite3.connect(path)
        floor = best_of(lambda: raw.execute(
            "SELECT model, count(*), sum(input_tokens), sum(output_tokens), sum(total_tokens), "
            "sum(cost_nanos), sum(saved_nanos), avg(latency_ms) FROM budgetkit_usage "
            "WHERE created_at >= ? GROUP BY model",
            ((NOW - dt.timedelta(days=90)).strftime("%Y-%m-%d %H:%M:%S"),)).fetchall())
    slice_days = 3
    naive = best_of(lambda: naive_summary(store, slice_days), repeat=1) * (90 / slice_days)

    base = results[0][1]
    print()
    print(f"database: {'PostgreSQL' if args.postgres else 'SQLite'}; load average before: "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'report':<42} {'seconds':>9} {'vs summary':>11}")
    print("-" * 64)
    for name, seconds in results:
        print(f"{name:<42} {seconds:>9.3f} {seconds / base:>10.2f}x")
    print("-" * 64)
    peers = [("peer: same summary, ledger only (no rollup)", ledger),
             ("peer: bare SQL via sqlite3 (8 aggregates)", floor),
             ("peer: load rows + sum in Python (scaled)", naive)]
    for name, seconds in peers:
        if seconds is not None:
            print(f"{name:<42} {seconds:>9.3f} {seconds / base:>10.2f}x")
    print("-" * 64)
    print(f"{'rollup rebuild of ' + format(args.rows, ',') + ' rows (once)':<42} "
          f"{rebuilt.seconds:>9.3f}")
    if args.postgres:
        scratch = lambda: _postgres_database(args.postgres, "bk_bench_insert", fresh=True)  # noqa: E731
    else:
        folder = tempfile.mkdtemp(prefix="bk-insert-")
        scratch = lambda: os.path.join(folder, f"insert-{uuid.uuid4().hex[:8]}.db")  # noqa: E731
    plain_ms, rollup_ms = insert_cost(scratch)
    if args.postgres:
        import psycopg

        with psycopg.connect(_libpq(args.postgres), autocommit=True) as admin:
            admin.execute('DROP DATABASE IF EXISTS "bk_bench_insert" WITH (FORCE)')
    print(f"{'writer: insert 500-row batch, no rollup':<42} {plain_ms / 1000:>9.4f}")
    print(f"{'writer: insert 500-row batch, with rollup':<42} {rollup_ms / 1000:>9.4f}"
          f"   (+{(rollup_ms - plain_ms) / 500 * 1000:.0f} us per row)")
    verdict = "PASS" if base < 1.0 else "FAIL"
    print(f"\nsummary over {args.rows:,} rows: {base:.3f} s (goal < 1 s): {verdict}")


def insert_cost(scratch: Callable[[], str], batches: int = 40) -> tuple[float, float]:
    """Milliseconds per 500-row ``Store.insert_usage`` batch without / with the rollup
    (rows like the generated ones, in time order; best of 3 rounds, a fresh database from
    ``scratch()`` each)."""
    def rows(start: int) -> list[dict[str, Any]]:
        out = []
        for x in range(start, start + 500):
            out.append({
                "id": uuid.uuid4().hex,
                # as often as in the generated ledger: a batch spans about an hour
                "created_at": NOW + dt.timedelta(seconds=x * 90 * 86400 / 1_000_000),
                "operation_type": OPERATIONS[x % 7], "provider": "openai",
                "model": MODELS[(x // 7) % 6], "input_tokens": 100 + x % 900,
                "output_tokens": (x % 7) * 40, "cached_input_tokens": (x % 5) * 10,
                "cache_write_tokens": 0, "reasoning_tokens": 0,
                "total_tokens": 100 + x % 900 + (x % 7) * 40, "cost_nanos": 1000 + x % 997,
                "saved_nanos": 0, "latency_ms": float(50 + x % 400),
                "status": "cached" if x % 10 == 0 else "ok", "usage_source": "provider",
                "user_id": f"user-{x % 200}", "session_id": f"session-{x % 5000}",
                "project": f"project-{x % 5}",
                "tags": [f"team-{x % 3}"] if x % 5 == 0 else [], "metadata": {}})
        return out

    work = [rows(i * 500) for i in range(batches)]
    best = {False: float("inf"), True: float("inf")}
    for _round in range(3):
        for maintain in (False, True):
            target = Store(scratch())
            target.create_tables()
            target._maintain_rollup = maintain  # the switch insert_usage reads
            start = time.perf_counter()
            for batch in work:
                target.insert_usage(batch)
            best[maintain] = min(best[maintain],
                                 (time.perf_counter() - start) / batches * 1000)
            target.dispose()
    return best[False], best[True]


if __name__ == "__main__":
    main()
