"""How fast are the reports on a large ledger? (issue: a summary over 1,000,000 rows < 1 s)

Generates N usage rows (default 1,000,000, spread over 90 days, 6 models, 7 operation
types, 200 users, a tag on 20 % of rows) into a fresh SQLite file with one
``INSERT ... SELECT`` over a recursive CTE, then times each report, best of 3, next to the
peers: the same summary done the naive way (load rows with ``Store.query_usage`` and sum in
Python, on a 3-day slice and scaled up) and the bare SQL through the stdlib ``sqlite3``
module (the floor any SQLAlchemy layer sits on).

    /work/venv/bin/python benchmarks/bench_reports.py [--rows 1000000] [--db PATH]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import budgetkit  # noqa: E402
from budgetkit._store import Store  # noqa: E402

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
    args = parser.parse_args()
    path = args.db or os.path.join(tempfile.mkdtemp(prefix="bk-bench-"), "reports.db")
    if not (args.reuse and _row_count(path) == args.rows):
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)
        made = generate(path, args.rows)
        size_mb = os.path.getsize(path) / 1e6
        print(f"generated {args.rows:,} rows in {made:.1f} s ({size_mb:.0f} MB) at {path}")

    store = Store(path)
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
        ("summary by tag, 90 days", lambda: budgetkit.summarize(
            store, group_by="tag", days=90, **kw)),
        ("one user, 30 days (index)", lambda: budgetkit.summarize(
            store, group_by="operation_type", days=30, user_id="user-7", **kw)),
        ("cost analysis, 30 days", lambda: budgetkit.cost_analysis(store, days=30, **kw)),
        ("forecast (month)", lambda: budgetkit.forecast(store, **kw)),
        ("anomalies, daily, 30 days", lambda: budgetkit.detect_anomalies(store, **kw)),
        ("model+operation+day in one scan, 90 d", lambda: budgetkit.summarize_many(
            store, ["model", "operation_type", "day"], days=90, **kw)),
    ]
    try:  # the whole dashboard payload (the server extra)
        from budgetkit._reports import as_source
        from budgetkit._server._app import Principal, dashboard_payload

        cases.append(("dashboard payload, 30 days", lambda: dashboard_payload(
            as_source(store, now=NOW), Principal(None), 30)))
    except ImportError:
        pass
    results = [(name, best_of(fn)) for name, fn in cases]

    # peers: the bare SQL through sqlite3, and loading rows into Python
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
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'report':<42} {'seconds':>9} {'vs summary':>11}")
    print("-" * 64)
    for name, seconds in results:
        print(f"{name:<42} {seconds:>9.3f} {seconds / base:>10.2f}x")
    print("-" * 64)
    print(f"{'peer: bare SQL via sqlite3 (8 aggregates)':<42} {floor:>9.3f} {floor / base:>10.2f}x")
    print(f"{'peer: load rows + sum in Python (scaled)':<42} {naive:>9.3f} {naive / base:>10.2f}x")
    verdict = "PASS" if base < 1.0 else "FAIL"
    print(f"\nsummary over {args.rows:,} rows: {base:.3f} s (goal < 1 s): {verdict}")


if __name__ == "__main__":
    main()
