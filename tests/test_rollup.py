"""The rollup: reports read from it give exactly what the raw ledger gives.

A randomized ledger (rows on hour and day boundaries, at odd microseconds, NULL users and
projects, every status, missing latencies, tags) is written through ``Store.insert_usage``
(the background writer's path) into a real SQLite file and a real PostgreSQL database; every
report is computed twice, once with the rollup and once from the raw rows only, and
compared (integers exactly, average latencies to float rounding). Purge at a cutoff in
the middle of an hour, a ledger older than the rollup, and two processes writing the same
buckets at once must leave the rollup equal to one rebuilt from scratch.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select, text

import budgetkit
from budgetkit.reports._reports import Period, UsageSummary, as_source
from budgetkit.ledger.rollups import SHAPES, plan_pieces
from budgetkit.ledger._store import Store

NOW = dt.datetime(2025, 3, 12, 15, 41, 27, 250_000)  # deliberately not on an hour
MODELS = ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small", "o3-mini"]
OPERATIONS = ["chat_completion", "embedding", "rag_input", "rag_output"]
STATUSES = ["ok", "ok", "ok", "cached", "error", "blocked"]


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    url = (str(tmp_path / "rollup.db") if request.param == "sqlite"
           else request.getfixturevalue("pg_url"))
    s = Store(url)
    s.create_tables()
    yield s
    s.dispose()


def random_rows(rng: random.Random, n: int, *, start: dt.datetime = NOW - dt.timedelta(days=9),
                end: dt.datetime = NOW) -> list[dict[str, Any]]:
    span = (end - start).total_seconds()
    edges = [truncate for truncate in (
        NOW.replace(minute=0, second=0, microsecond=0),  # the hour "now" is in
        NOW.replace(hour=0, minute=0, second=0, microsecond=0),  # today's midnight
        NOW - dt.timedelta(days=3), NOW - dt.timedelta(days=1), NOW)]
    rows = []
    for _ in range(n):
        pick = rng.random()
        if pick < 0.15:  # exactly on an hour / day boundary
            when = (start + dt.timedelta(seconds=rng.uniform(0, span))).replace(
                minute=0, second=0, microsecond=0)
            if rng.random() < 0.3:
                when = when.replace(hour=0)
        elif pick < 0.25:  # exactly on, or a microsecond around, a period edge
            when = rng.choice(edges) + dt.timedelta(microseconds=rng.choice([-1, 0, 1]))
        else:
            when = start + dt.timedelta(seconds=rng.uniform(0, span))
        status = rng.choice(STATUSES)
        tokens_in, tokens_out = rng.randrange(0, 5000), rng.randrange(0, 900)
        rows.append({
            "id": uuid.uuid4().hex, "created_at": when,
            "operation_type": rng.choice(OPERATIONS), "provider": rng.choice(["openai", None]),
            "model": rng.choice(MODELS), "input_tokens": tokens_in, "output_tokens": tokens_out,
            "cached_input_tokens": rng.randrange(0, 100), "cache_write_tokens": rng.randrange(3),
            "reasoning_tokens": rng.randrange(0, 50), "total_tokens": tokens_in + tokens_out,
            "cost_nanos": 0 if status in ("cached", "blocked") else rng.randrange(0, 10**8),
            "saved_nanos": rng.randrange(0, 10**7) if status == "cached" else 0,
            "latency_ms": None if rng.random() < 0.2 else rng.uniform(0.5, 4000.0),
            "status": status, "error_type": None, "usage_source": "provider",
            "user_id": rng.choice(["alice", "bob", "carol", "", None]),
            "session_id": rng.choice(["s1", "s2", None]), "request_id": None, "run_id": None,
            "parent_run_id": None, "root_run_id": None,
            "project": rng.choice(["search", "support", None]),
            "task_type": rng.choice(["qa", None]), "attempt": None, "route_reason": None,
            "tags": rng.choice([[], [], ["team-a"], ["team-a", "team-b"]]), "metadata": {},
            "prompt_hash": None, "prompt_preview": None})
    return rows


def write(store: Store, rows: list[dict[str, Any]], rng: random.Random) -> None:
    """In batches of random size, like the background writer."""
    at = 0
    while at < len(rows):
        size = rng.randrange(1, 120)
        store.insert_usage(rows[at:at + size])
        at += size


def report_pair(store: Store, fn: Any, **kwargs: Any) -> tuple[Any, Any, list[str]]:
    """``fn`` with the rollup, then from the raw ledger only; and the SQL of the first."""
    statements: list[str] = []

    def listen(conn: Any, cursor: Any, sql: str, *rest: Any) -> None:
        statements.append(sql)

    event.listen(store.engine, "before_cursor_execute", listen)
    try:
        with_rollup = fn(as_source(store, now=NOW), **kwargs)
    finally:
        event.remove(store.engine, "before_cursor_execute", listen)
    raw_src = as_source(store, now=NOW)
    raw_src.rollup = False  # as if the rollup were not built: every query reads the ledger
    return with_rollup, fn(raw_src, **kwargs), statements


def assert_same_summary(a: UsageSummary, b: UsageSummary) -> None:
    assert a.period == b.period and a.group_by == b.group_by
    assert [g.key for g in a.groups] == [g.key for g in b.groups]
    for x, y in [*zip(a.groups, b.groups), (a.totals, b.totals)]:
        fields = ("calls", "input_tokens", "output_tokens", "cached_input_tokens",
                  "total_tokens", "cost_nanos", "saved_nanos", "cache_hits", "errors",
                  "blocked", "latency_n")
        assert {f: getattr(x, f) for f in fields} == {f: getattr(y, f) for f in fields}, x.key
        assert x.latency_sum == pytest.approx(y.latency_sum, rel=1e-12, abs=1e-9)


def rollup_snapshot(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    with store.engine.connect() as conn:
        for shape in SHAPES:
            t = shape.table
            rows = conn.execute(select(t).order_by(t.c.bucket, t.c.dims_key)).all()
            out[t.name] = [(*row[:-1], round(row[-1], 6)) for row in rows]
    return out


GROUPINGS: list[Any] = ["model", "operation_type", "user", "status", "provider", "project",
                        "task_type", "day", "hour", "week", "month", ("model", "day"),
                        ("user", "status"), ("project", "hour"), (), "tag", "session"]
PERIODS: list[dict[str, Any]] = [
    {"days": 1}, {"days": 3}, {"days": 7}, {"days": 30},
    {"start_date": "2025-03-05", "end_date": "2025-03-10"},  # whole days
    {"start_date": dt.datetime(2025, 3, 6, 7, 0), "end_date": dt.datetime(2025, 3, 6, 19, 0)},
    {"start_date": dt.datetime(2025, 3, 4, 23, 59, 59, 999_999),
     "end_date": dt.datetime(2025, 3, 11, 0, 0, 0, 1)},
    {"start_date": NOW.replace(minute=0, second=0, microsecond=0)},  # up to now
]
FILTERS: list[dict[str, Any]] = [{}, {"model": "gpt-4o"}, {"user_id": "alice"},
                                 {"status": "cached"}, {"project": "search", "model": "o3-mini"},
                                 {"user_id": ""}, {"tag": "team-a"}]


def test_reports_from_the_rollup_equal_reports_from_the_ledger(store: Store) -> None:
    rng = random.Random(20261126)
    write(store, random_rows(rng, 1500), rng)
    used_rollup = 0
    for period in PERIODS:
        for grouping in GROUPINGS:
            for filters in (FILTERS if grouping in ("model", "day", ()) else FILTERS[:3]):
                a, b, sql = report_pair(store, budgetkit.summarize, group_by=grouping,
                                        **period, **filters)
                assert_same_summary(a, b)
                used_rollup += any("budgetkit_usage_hourly" in s or "budgetkit_usage_daily" in s
                                   for s in sql)
    assert used_rollup > 100  # the comparison above really exercised the rollup path
    many_a, many_b, _ = report_pair(store, budgetkit.reports.summarize_many,
                                    groupings=["model", "operation_type", "day"], days=7)
    for a, b in zip(many_a, many_b):
        assert_same_summary(a, b)
    for target in ("gpt-4o-mini", "text-embedding-3-large"):
        a, b, _ = report_pair(store, budgetkit.what_if, target=target, days=7)
        assert a.to_dict() == b.to_dict()
    a, b, _ = report_pair(store, budgetkit.cost_series, unit="hour", days=2)
    assert [g.to_dict() for g in a] == [g.to_dict() for g in b]


def test_tags_read_the_tag_rollup_and_sessions_the_ledger(store: Store) -> None:
    rng = random.Random(3)
    write(store, random_rows(rng, 300), rng)
    whole_days = {"start_date": "2025-03-04", "end_date": "2025-03-10"}
    a, b, sql = report_pair(store, budgetkit.summarize, group_by="tag", **whole_days)
    assert any("FROM budgetkit_usage_daily_tag" in s for s in sql)
    assert not any("budgetkit_usage_tag" in s for s in sql)  # no join with the ledger's tags
    assert_same_summary(a, b)
    assert {g.key["tag"] for g in a.groups} == {"team-a", "team-b", None}
    # calls carrying team-a, grouped by all their tags: only the ledger knows co-occurrence
    a, b, sql = report_pair(store, budgetkit.summarize, group_by="tag", tag="team-a",
                            **whole_days)
    grouped = [s for s in sql if "GROUP BY" in s.upper()]
    assert grouped and all("budgetkit_usage_tag" in s for s in grouped)
    assert_same_summary(a, b)  # (its totals, each call once, may come from the rollup)
    assert {g.key["tag"] for g in a.groups} == {"team-a", "team-b"}
    _, _, sql = report_pair(store, budgetkit.summarize, group_by="session", **whole_days)
    assert not any("budgetkit_usage_hourly" in s or "budgetkit_usage_daily" in s for s in sql)


def test_incremental_rollup_equals_a_rebuild_and_survives_a_mid_hour_purge(store: Store) -> None:
    rng = random.Random(11)
    write(store, random_rows(rng, 1200), rng)
    incremental = rollup_snapshot(store)
    seen: list[tuple[int, int | None]] = []
    assert store.rebuild_rollup(progress=lambda done, total: seen.append((done, total))).ready
    assert rollup_snapshot(store) == incremental
    # the progress hook hears of each rollup table as it is rebuilt, in order
    assert seen == [(done, len(SHAPES)) for done in range(len(SHAPES) + 1)]
    assert sum(r[SHAPES[0].table.c.keys().index("calls")] for r in incremental[
        "budgetkit_usage_hourly"]) == 1200

    for cutoff in (NOW - dt.timedelta(days=6, minutes=17, microseconds=3),  # mid hour
                   (NOW - dt.timedelta(days=4)).replace(minute=0, second=0, microsecond=0),
                   (NOW - dt.timedelta(days=2)).replace(hour=0, minute=0, second=0,
                                                        microsecond=0)):
        deleted = store.purge_usage(cutoff)
        assert deleted > 0
        after_purge = rollup_snapshot(store)
        store.rebuild_rollup()
        assert rollup_snapshot(store) == after_purge, cutoff
        for grouping in ("model", "hour", ("user", "status"), ()):
            a, b, _ = report_pair(store, budgetkit.summarize, group_by=grouping, days=10)
            assert_same_summary(a, b)
            assert a.totals.calls == len(store.query_usage(  # the period ends at NOW inclusive
                since=NOW - dt.timedelta(days=10), until=NOW + dt.timedelta(microseconds=1)))


def test_a_ledger_older_than_the_rollup_reads_raw_until_rebuilt(tmp_path: Path,
                                                                capsys: Any) -> None:
    db = tmp_path / "old.db"
    old = Store(str(db))
    old.create_tables()
    rng = random.Random(5)
    write(old, random_rows(rng, 400), rng)
    with old.engine.begin() as conn:  # the ledger as an older budgetkit left it
        for shape in SHAPES:
            conn.execute(text(f"DROP TABLE {shape.table.name}"))
        conn.execute(text("DROP TABLE budgetkit_rollup_state"))
    old.dispose()

    store = Store(str(db))
    store.create_tables()
    assert not store.rollup_status().ready
    a, b, sql = report_pair(store, budgetkit.summarize, group_by="model", days=30)
    assert not any("budgetkit_usage_daily" in s for s in sql)  # not trusted: the ledger
    assert_same_summary(a, b)
    in_period = len(store.query_usage(since=NOW - dt.timedelta(days=30),
                                      until=NOW + dt.timedelta(microseconds=1)))
    assert a.totals.calls == in_period > 350

    from budgetkit.cli._main import main

    assert main(["rollup", "--db", str(db)]) == 0
    assert "not built" in capsys.readouterr().out
    assert main(["rollup", "--rebuild", "--db", str(db), "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["ready"] and state["buckets"]["budgetkit_usage_hourly"] > 0
    a, b, sql = report_pair(store, budgetkit.summarize, group_by="model", days=30)
    assert any("budgetkit_usage_daily" in s for s in sql)
    assert_same_summary(a, b)

    # rows written around budgetkit (bulk SQL) are only in the rollup after a rebuild
    extra = random_rows(rng, 1)[0]
    with store.engine.begin() as conn:
        conn.execute(text("INSERT INTO budgetkit_usage (id, created_at, operation_type, model, "
                          "input_tokens, output_tokens, cached_input_tokens, "
                          "cache_write_tokens, reasoning_tokens, total_tokens, cost_nanos, "
                          "saved_nanos, status, usage_source, tags, metadata) VALUES "
                          "(:id, :at, 'chat_completion', 'gpt-4o', 1, 1, 0, 0, 0, 2, 7, 0, "
                          "'ok', 'provider', '[]', '{}')"),
                     {"id": extra["id"], "at": NOW - dt.timedelta(days=2)})
    stale = budgetkit.summarize(as_source(store, now=NOW), group_by=(), days=30)
    assert stale.totals.calls == in_period
    store.rebuild_rollup()
    fresh = budgetkit.summarize(as_source(store, now=NOW), group_by=(), days=30)
    assert fresh.totals.calls == in_period + 1


WRITER = textwrap.dedent("""
    import datetime as dt, sys, time
    from budgetkit import Engine
    url, who, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    at = dt.datetime(2025, 3, 12, 9, 30)
    with Engine(db=url, clock=lambda: at, batch_size=7) as engine:
        engine.flush()
        time.sleep(max(0.0, go - time.time()))  # both processes start writing together
        for i in range(n):
            engine.record(["gpt-4o", "gpt-4o-mini"][i % 2], input_tokens=100 + i,
                          output_tokens=i % 13, user_id=["alice", "bob"][i % 2],
                          latency_ms=float(i), project=who if i % 3 else None)
""")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_processes_writing_the_same_buckets_at_once(backend: str, tmp_path: Path,
                                                        request: pytest.FixtureRequest) -> None:
    url = str(tmp_path / "two.db") if backend == "sqlite" else request.getfixturevalue("pg_url")
    store = Store(url)
    store.create_tables()
    n = 1500
    go = str(time.time() + 3.0)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, who, str(n), go],
                              stderr=subprocess.PIPE, text=True) for who in ("p1", "p2")]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    incremental = rollup_snapshot(store)
    store.rebuild_rollup()
    assert rollup_snapshot(store) == incremental
    at = dt.datetime(2025, 3, 12, 9, 30)
    period = {"start_date": "2025-03-11", "end_date": "2025-03-13"}  # whole days
    for grouping in ("user", ("model", "project")):
        a, b, sql = report_pair(store, budgetkit.summarize, group_by=grouping, **period)
        assert any("budgetkit_usage_daily" in s for s in sql)
        assert_same_summary(a, b)
    a, b, sql = report_pair(store, budgetkit.summarize, group_by="model",
                            start_date=at.replace(minute=0), end_date=at + dt.timedelta(hours=1))
    assert any("budgetkit_usage_hourly" in s for s in sql)
    assert_same_summary(a, b)
    assert a.totals.calls == 2 * n
    assert a.totals.input_tokens == 2 * sum(100 + i for i in range(n))


STREAM = textwrap.dedent("""
    import datetime as dt, sys, time
    from budgetkit import Engine
    url, n, go = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    base = dt.datetime(2025, 3, 12, 6, 0)
    state = {"i": 0}
    clock = lambda: base + dt.timedelta(minutes=(state["i"] * 7) % 360)  # 06:00-12:00
    with Engine(db=url, clock=clock, batch_size=5) as engine:
        engine.flush()
        time.sleep(max(0.0, go - time.time()))
        for i in range(n):
            state["i"] = i
            engine.record("gpt-4o", input_tokens=10 + i, output_tokens=1, user_id="u",
                          tags=["t"] if i % 2 else [])
            if i % 50 == 0:
                time.sleep(0.01)  # let the purges in between
""")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_purges_and_rebuilds_while_another_process_writes_keep_the_rollup_exact(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = str(tmp_path / "race.db") if backend == "sqlite" else request.getfixturevalue("pg_url")
    store = Store(url)
    store.create_tables()
    go = time.time() + 3.0
    writer = subprocess.Popen([sys.executable, "-c", STREAM, url, "1500", str(go)],
                              stderr=subprocess.PIPE, text=True)
    time.sleep(max(0.0, go - time.time()))
    cutoff = dt.datetime(2025, 3, 12, 6, 0)
    purges = 0
    while writer.poll() is None:  # cutoffs creep through the hours being written
        cutoff += dt.timedelta(minutes=3, seconds=17, microseconds=1)
        store.purge_usage(cutoff)
        purges += 1
        if purges % 4 == 0:  # and full rebuilds race the writer too
            store.rebuild_rollup()
        time.sleep(0.002)  # hundreds of purges still land between the writes, without
        # spinning: a loop flat out starved the writer (1,776 purges, 15 s on SQLite)
    _, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    assert purges >= 5, purges
    incremental = rollup_snapshot(store)
    store.rebuild_rollup()
    assert rollup_snapshot(store) == incremental
    left = len(store.query_usage())
    whole = {"start_date": "2025-03-12", "end_date": "2025-03-12"}
    for grouping in ("model", "tag", "user", "hour"):
        a, b, _ = report_pair(store, budgetkit.summarize, group_by=grouping, **whole)
        assert_same_summary(a, b)
        assert a.totals.calls == left


def test_plan_pieces_cover_the_period_once() -> None:
    start, end = dt.datetime(2025, 1, 1, 12, 30), dt.datetime(2025, 1, 4, 3, 15)
    pieces = plan_pieces(start, end, True, ["day", "hour"])
    assert [p[0] for p in pieces] == ["raw", "hour", "day", "hour", "raw"]
    assert pieces[0][1] == start and pieces[-1][2] == end and pieces[-1][3]
    for before, after in zip(pieces, pieces[1:]):
        assert before[2] == after[1]  # contiguous, no overlap
    assert plan_pieces(start, start + dt.timedelta(minutes=20), False, ["day", "hour"]) == [
        ("raw", start, start + dt.timedelta(minutes=20), False)]
    whole = Period(dt.datetime(2025, 1, 1), dt.datetime(2025, 1, 3))
    assert plan_pieces(whole.start, whole.end, False, ["day", "hour"]) == [
        ("day", whole.start, whole.end, False)]
    # a period ending "now" on an hour boundary still reads rows stamped exactly then
    assert plan_pieces(whole.start, whole.end, True, ["day"])[-1] == (
        "raw", whole.end, whole.end, True)
