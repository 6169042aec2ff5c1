"""Reports: summaries, series, cost analysis, forecast, anomalies, what-if, export, budgets.

Every test records real rows through an Engine with a fake clock into a real database
(a SQLite file; PostgreSQL too where BUDGETKIT_TEST_POSTGRES_URL is set) and checks the
report against figures computed by hand from the catalog's prices.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import event

import budgetkit
from budgetkit import ConfigurationError, Engine, UnknownModelError
from budgetkit.budgets._budget import Budget
from budgetkit.reports._export import export_text
from budgetkit.reports._reports import Period, bucket_labels

from .conftest import FakeClock

T0 = dt.datetime(2025, 1, 15, 12, 0, 0)  # a Wednesday


def price(model: str, i: int, o: int = 0) -> int:
    return budgetkit.default_catalog().cost_nanos(model, i, o)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "reports.db")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def eng(tmp_path: Path, clock: FakeClock) -> Iterator[Engine]:
    with Engine(db=str(tmp_path / "reports.db"), clock=clock) as engine:
        yield engine


def record_at(engine: Engine, clock: FakeClock, when: dt.datetime, model: str = "gpt-4o",
              i: int = 100, o: int = 50, **kw: object) -> None:
    """Record one call stamped ``when``; the clock goes back to where it was."""
    before, clock.now = clock.now, when
    try:
        engine.record(model, input_tokens=i, output_tokens=o, **kw)  # type: ignore[arg-type]
    finally:
        clock.now = before


# -- summaries --------------------------------------------------------------------------
def test_summary_groups_and_totals_match_catalog_prices(db_url: str, clock: FakeClock) -> None:
    with Engine(db=db_url, clock=clock) as engine:
        record_at(engine, clock, T0 - dt.timedelta(hours=3), "gpt-4o", 1000, 200,
                  user_id="alice", operation_type="rag_output", latency_ms=100.0)
        record_at(engine, clock, T0 - dt.timedelta(hours=2), "gpt-4o", 500, 100,
                  user_id="bob", operation_type="rag_output", latency_ms=300.0)
        record_at(engine, clock, T0 - dt.timedelta(hours=1), "gpt-4o-mini", 2000, 10,
                  user_id="alice", operation_type="chat_completion", latency_ms=50.0)
        for _ in range(2):
            record_at(engine, clock, T0, "gpt-4o", 1000, 200, user_id="alice",
                      status="cached", saved_nanos=price("gpt-4o", 1000, 200), latency_ms=1.0)
        for status in ("error", "error", "blocked"):
            record_at(engine, clock, T0, "gpt-4o-mini", 0, 0, status=status)
        summary = budgetkit.summarize(engine, group_by="model", days=1)

    by_model = {g.key["model"]: g for g in summary.groups}
    assert set(by_model) == {"gpt-4o", "gpt-4o-mini"}
    big = by_model["gpt-4o"]
    assert big.calls == 4 and big.cache_hits == 2
    assert big.input_tokens == 3500 and big.output_tokens == 700
    assert big.cost_nanos == price("gpt-4o", 1000, 200) + price("gpt-4o", 500, 100)
    assert big.saved_nanos == 2 * price("gpt-4o", 1000, 200)
    assert big.avg_latency_ms == pytest.approx((100 + 300 + 1 + 1) / 4)
    small = by_model["gpt-4o-mini"]
    assert (small.calls, small.errors, small.blocked, small.cache_hits) == (4, 2, 1, 0)
    assert summary.totals.calls == 8 and summary.totals.errors == 2
    assert summary.totals.cost_nanos == big.cost_nanos + price("gpt-4o-mini", 2000, 10)
    assert summary.groups[0].key["model"] == "gpt-4o"  # most expensive first


def test_time_buckets_are_utc_days_monday_weeks_and_months(db_url: str,
                                                           clock: FakeClock) -> None:
    stamps = [dt.datetime(2025, 1, 12, 23, 59, 59),  # Sunday, week of Mon 6th
              dt.datetime(2025, 1, 13, 0, 0, 0),  # Monday: a new day and week
              dt.datetime(2025, 1, 13, 7, 30),
              dt.datetime(2025, 1, 31, 23, 0),
              dt.datetime(2025, 2, 1, 0, 30)]  # a new month
    with Engine(db=db_url, clock=clock) as engine:
        for when in stamps:
            record_at(engine, clock, when, i=100, o=0)
        kw = dict(start_date="2025-01-01", end_date="2025-02-28")
        days = {g.key["day"]: g.calls
                for g in budgetkit.summarize(engine, group_by="day", **kw).groups}
        weeks = {g.key["week"]: g.calls
                 for g in budgetkit.summarize(engine, group_by="week", **kw).groups}
        months = {g.key["month"]: g.calls
                  for g in budgetkit.summarize(engine, group_by="month", **kw).groups}
        hours = {g.key["hour"]: g.calls
                 for g in budgetkit.summarize(engine, group_by="hour", **kw).groups}
    assert days == {"2025-01-12": 1, "2025-01-13": 2, "2025-01-31": 1, "2025-02-01": 1}
    assert weeks == {"2025-01-06": 1, "2025-01-13": 2, "2025-01-27": 2}
    assert months == {"2025-01": 4, "2025-02": 1}
    assert hours["2025-01-13 07:00"] == 1 and hours["2025-01-12 23:00"] == 1


def test_group_by_tag_counts_each_tag_and_totals_once(eng: Engine, clock: FakeClock) -> None:
    record_at(eng, clock, T0, tags=["team-a", "beta"])
    record_at(eng, clock, T0, tags=["team-a"])
    record_at(eng, clock, T0)
    summary = budgetkit.summarize(eng, group_by="tag", days=1)
    calls = {g.key["tag"]: g.calls for g in summary.groups}
    assert calls == {"team-a": 2, "beta": 1, None: 1}
    assert summary.totals.calls == 3
    assert budgetkit.summarize(eng, group_by="model", days=1, tag="beta").totals.calls == 1


def test_group_by_several_dimensions_and_metadata(eng: Engine, clock: FakeClock) -> None:
    record_at(eng, clock, T0, user_id="alice", operation_type="embedding",
              model="text-embedding-3-small", o=0, metadata={"department": "legal"})
    record_at(eng, clock, T0, user_id="alice", operation_type="rag_output",
              metadata={"department": "legal"})
    record_at(eng, clock, T0, user_id="bob", operation_type="rag_output",
              metadata={"department": "sales"})
    pairs = budgetkit.summarize(eng, group_by=["user", "operation"], days=1)
    assert {(g.key["user_id"], g.key["operation_type"]) for g in pairs.groups} == {
        ("alice", "embedding"), ("alice", "rag_output"), ("bob", "rag_output")}
    shares = budgetkit.allocate_costs(eng, by="metadata.department", days=1)
    legal = next(r for r in shares if r["metadata.department"] == "legal")
    expected = price("text-embedding-3-small", 100) + price("gpt-4o", 100, 50)
    assert legal["cost_usd"] == pytest.approx(expected / 1e9)
    assert sum(r["share"] for r in shares) == pytest.approx(1.0)


def test_summary_runs_in_sql_not_in_python(eng: Engine, clock: FakeClock) -> None:
    for n in range(50):
        record_at(eng, clock, T0 - dt.timedelta(minutes=n), user_id=f"u{n % 3}")
    eng.flush()
    statements: list[str] = []
    fetched: list[int] = []

    def before(conn, cursor, statement, params, context, executemany):  # noqa: ANN001
        statements.append(statement)

    event.listen(eng.store.engine, "before_cursor_execute", before)
    try:
        summary = budgetkit.summarize(eng, group_by="user", days=1)
        fetched.append(len(summary.groups))
    finally:
        event.remove(eng.store.engine, "before_cursor_execute", before)
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    grouped = [s for s in selects if "GROUP BY" in s.upper()]
    assert len(grouped) == 1 and len(selects) <= 2  # + the data's time bounds, once
    assert fetched == [3] and summary.totals.calls == 50
    # a period holding most of the data is one table scan (+column: no index walk) ...
    assert "+budgetkit_usage.user_id" in grouped[0]
    # ... a narrow or filtered one lets SQLite use its indexes
    statements.clear()
    event.listen(eng.store.engine, "before_cursor_execute", before)
    try:
        budgetkit.summarize(eng, group_by="user", days=1, model="gpt-4o")
        budgetkit.summarize(eng, group_by="user", start_date=T0 - dt.timedelta(minutes=2))
    finally:
        event.remove(eng.store.engine, "before_cursor_execute", before)
    assert statements and not any("+budgetkit_usage" in s for s in statements)


def test_summarize_many_rolls_up_one_scan_exactly(eng: Engine, clock: FakeClock) -> None:
    for n in range(30):
        record_at(eng, clock, T0 - dt.timedelta(hours=7 * n), ("gpt-4o", "gpt-4o-mini")[n % 2],
                  100 + n, 10 * n, operation_type=("rag_output", "embedding", "rag_input")[n % 3],
                  latency_ms=float(n), tags=["x"] if n % 4 == 0 else [],
                  status="cached" if n % 5 == 0 else "ok")
    eng.flush()
    groupings = ["model", "operation_type", "day", ("model", "day"), "tag"]
    many = budgetkit.reports.summarize_many(eng, groupings, days=10)
    for grouping, rolled in zip(groupings, many):
        direct = budgetkit.summarize(eng, group_by=grouping, days=10)
        assert [g.to_dict() for g in rolled.groups] == [g.to_dict() for g in direct.groups]
        assert rolled.totals.to_dict() == direct.totals.to_dict()
    statements: list[str] = []
    listener = lambda conn, cursor, sql, *rest: statements.append(sql)  # noqa: E731
    event.listen(eng.store.engine, "before_cursor_execute", listener)
    try:
        budgetkit.reports.summarize_many(eng, ["model", "operation_type", "day"], days=10)
    finally:
        event.remove(eng.store.engine, "before_cursor_execute", listener)
    # one pass: whole days from the daily rollup, the edge hours from the hourly one, the
    # partial hours from the ledger - at most one GROUP BY per piece, never one per grouping
    grouped = [sql for sql in statements if "GROUP BY" in sql.upper()]
    assert 1 <= len(grouped) <= 5
    assert any("FROM budgetkit_usage_daily " in sql for sql in grouped)


@pytest.mark.parametrize("kwargs, message", [
    (dict(days=-1), "days must be >= 1"),
    (dict(days=0), "days must be >= 1"),
    (dict(start_date="2025-02-01", end_date="2025-01-01"), "before start_date"),
    (dict(start_date="last tuesday"), "start_date must be a date"),
    (dict(group_by="colour"), "cannot group by 'colour'"),
    (dict(planet="mars"), "cannot filter by 'planet'"),
])
def test_bad_report_arguments_name_the_problem(eng: Engine, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        budgetkit.summarize(eng, **kwargs)


def test_period_dates_are_inclusive_days_and_now_is_included(eng: Engine,
                                                             clock: FakeClock) -> None:
    record_at(eng, clock, dt.datetime(2025, 1, 31, 23, 59))
    record_at(eng, clock, dt.datetime(2025, 2, 1, 0, 0))
    january = budgetkit.summarize(eng, start_date="2025-01-01", end_date="2025-01-31")
    assert january.totals.calls == 1
    clock.now = dt.datetime(2025, 2, 1, 0, 0)  # the row stamped exactly "now" counts
    assert budgetkit.summarize(eng, days=1).totals.calls == 2
    period = Period.resolve(start_date=dt.date(2025, 1, 1), end_date=dt.date(2025, 1, 2))
    assert period.days == 2
    assert bucket_labels(Period(dt.datetime(2025, 1, 30), dt.datetime(2025, 3, 2)), "month") \
        == ["2025-01", "2025-02", "2025-03"]


def test_cost_series_fills_empty_days(db_url: str, clock: FakeClock) -> None:
    with Engine(db=db_url, clock=clock) as engine:
        record_at(engine, clock, T0 - dt.timedelta(days=3))
        record_at(engine, clock, T0)
        series = budgetkit.cost_series(engine, days=4)
    assert [g.key["day"] for g in series] == ["2025-01-11", "2025-01-12", "2025-01-13",
                                              "2025-01-14", "2025-01-15"]
    assert [g.calls for g in series] == [0, 1, 0, 0, 1]


# -- cost analysis ------------------------------------------------------------------------
def test_cost_analysis_has_the_seed_shape_and_data_driven_advice(db_url: str,
                                                                 clock: FakeClock) -> None:
    with Engine(db=db_url, clock=clock) as engine:
        for n in range(20):  # short prompts on an expensive model, all the same prompt
            record_at(engine, clock, T0 - dt.timedelta(minutes=n), "gpt-4o", 120, 40,
                      operation_type="rag_output", prompt="What is the refund policy?")
        for n in range(10):  # embeddings dominate spend
            record_at(engine, clock, T0 - dt.timedelta(minutes=n), "text-embedding-3-large",
                      200_000, 0, operation_type="embedding")
        analysis = budgetkit.cost_analysis(engine, days=1).to_dict()

    assert analysis["total_tokens"] == 20 * 160 + 10 * 200_000
    ops = analysis["operation_costs"]
    assert set(ops) == {"rag_output", "embedding"}
    assert ops["rag_output"]["operation_count"] == 20
    assert ops["embedding"]["cost_per_operation"] == pytest.approx(
        price("text-embedding-3-large", 200_000) / 1e9)
    kinds = {r["kind"]: r for r in analysis["recommendation_details"]}
    assert set(kinds) == {"embedding_share", "caching", "route_down"}
    assert kinds["caching"]["value"] == pytest.approx(19 / 20)  # 19 repeats of 20 paid calls
    assert "19 of 20" in kinds["caching"]["message"]
    embed_share = 10 * price("text-embedding-3-large", 200_000) / (
        10 * price("text-embedding-3-large", 200_000) + 20 * price("gpt-4o", 120, 40))
    assert kinds["embedding_share"]["value"] == pytest.approx(embed_share, abs=1e-4)
    assert "gpt-4o answered 20 short prompts" in kinds["route_down"]["message"]
    assert analysis["recommendations"] == [r["message"] for r in
                                           analysis["recommendation_details"]]


def test_no_advice_on_lean_usage(eng: Engine, clock: FakeClock) -> None:
    for n in range(10):
        record_at(eng, clock, T0 - dt.timedelta(minutes=n), "gpt-4o-mini", 3000, 800,
                  prompt=f"question {n}")
    assert budgetkit.cost_analysis(eng, days=1).recommendations == []


def test_budget_near_its_limit_is_recommended_about(eng: Engine, clock: FakeClock) -> None:
    eng.add_budget(Budget(limit=0.01, name="daily-usd"))
    for _ in range(20):  # $0.0007 a call, until the budget stops it (at about 91 %)
        try:
            ticket = eng.admit("gpt-4o", input_tokens=200, max_output_tokens=20)
        except budgetkit.BudgetExceeded:
            break
        eng.settle(ticket, input_tokens=200, output_tokens=20)
    advice = [r for r in budgetkit.cost_analysis(eng, days=1).recommendations
              if r.kind == "budget"]
    assert len(advice) == 1 and "'daily-usd'" in advice[0].message
    assert advice[0].value >= 85


# -- forecast and anomalies ------------------------------------------------------------
def test_forecast_follows_a_linear_trend(eng: Engine, clock: FakeClock) -> None:
    unit = price("gpt-4o-mini", 1_000_000)  # cost of one call
    for day in range(1, 11):  # Jan 1..10: day d has d calls
        for _ in range(day):
            record_at(eng, clock, dt.datetime(2025, 1, day, 10), "gpt-4o-mini", 1_000_000, 0)
    clock.now = dt.datetime(2025, 1, 11, 0, 0)
    result = budgetkit.forecast(eng, period="month", lookback_days=14)
    spent = sum(range(1, 11)) * unit
    assert result.spent_nanos == spent and result.history_days == 10
    # the trend goes on: day k costs k units, so Jan 11..31 cost 11 + 12 + ... + 31 units
    assert result.projected_nanos == pytest.approx(spent + sum(range(11, 32)) * unit, rel=1e-6)
    assert "linear trend" in result.method


def test_forecast_without_history_uses_todays_rate(eng: Engine, clock: FakeClock) -> None:
    record_at(eng, clock, dt.datetime(2025, 1, 15, 6, 0), "gpt-4o-mini", 1_000_000, 0)
    clock.now = dt.datetime(2025, 1, 15, 12, 0)  # half a day: rate = 2 calls a day
    result = budgetkit.forecast(eng, period="week")
    unit = price("gpt-4o-mini", 1_000_000)
    assert result.history_days == 0 and "today's" in result.method
    assert result.projected_nanos == pytest.approx(unit + 2 * unit * 4.5, rel=1e-6)


def test_anomalies_flag_a_spike_with_a_description(eng: Engine, clock: FakeClock) -> None:
    for day in range(1, 15):
        for _ in range(10 + day % 3):  # 10..12 calls a day
            record_at(eng, clock, dt.datetime(2025, 1, day, 9), "gpt-4o-mini", 10_000, 0)
    for _ in range(60):
        record_at(eng, clock, dt.datetime(2025, 1, 15, 9), "gpt-4o-mini", 10_000, 0)
    clock.now = dt.datetime(2025, 1, 15, 12)
    found = budgetkit.detect_anomalies(eng, days=10)
    assert [a.bucket for a in found] == ["2025-01-15"]
    spike = found[0]
    assert spike.direction == "spike" and spike.deviations > 2
    assert spike.description.startswith("Cost spike on 2025-01-15: $")
    assert "standard deviations above the 14-day mean" in spike.description
    assert budgetkit.detect_anomalies(eng, days=10, threshold=100) == []


def test_anomalies_by_hour_and_steady_usage_has_none(eng: Engine, clock: FakeClock) -> None:
    for hour in range(12):
        record_at(eng, clock, dt.datetime(2025, 1, 15, hour, 5), "gpt-4o-mini", 10_000, 0)
    clock.now = dt.datetime(2025, 1, 15, 11, 30)
    assert budgetkit.detect_anomalies(eng, unit="hour", days=1) == []
    with pytest.raises(ConfigurationError, match="unit must be day or hour"):
        budgetkit.detect_anomalies(eng, unit="week")


# -- what-if, export ------------------------------------------------------------------------
def test_what_if_reprices_past_usage(eng: Engine, clock: FakeClock) -> None:
    record_at(eng, clock, T0, "gpt-4o", 1000, 500)
    record_at(eng, clock, T0, "gpt-4o", 3000, 100)
    record_at(eng, clock, T0, "text-embedding-3-small", 5000, 0, operation_type="embedding")
    result = budgetkit.what_if(eng, "gpt-4o-mini", days=1)
    assert result.repriced_nanos == price("gpt-4o-mini", 4000, 600)
    assert result.actual_nanos == price("gpt-4o", 1000, 500) + price("gpt-4o", 3000, 100)
    assert result.skipped_models == ["text-embedding-3-small"]
    assert result.to_dict()["difference_usd"] < 0
    with pytest.raises(UnknownModelError):
        budgetkit.what_if(eng, "gpt-99-ultra")


def test_export_csv_and_json_round_trip(eng: Engine, clock: FakeClock, tmp_path: Path) -> None:
    for n in range(7):
        record_at(eng, clock, T0 - dt.timedelta(minutes=n), user_id=f"u{n}", tags=["x"],
                  metadata={"n": n})
    record_at(eng, clock, T0 - dt.timedelta(days=40))  # outside the period
    seen: list[tuple[int, int]] = []
    count = budgetkit.export_usage(eng, tmp_path / "usage.csv", days=30,
                                   progress=lambda done, total: seen.append((done, total)))
    assert count == 7 and seen[-1] == (7, 7)
    with open(tmp_path / "usage.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 7 and rows[0]["created_at"] < rows[-1]["created_at"]
    assert rows[0]["cost_usd"] == str(price("gpt-4o", 100, 50) / 1e9)
    assert json.loads(rows[0]["tags"]) == ["x"]
    as_json = json.loads(export_text(eng, format="json", days=30, user_id="u3"))
    assert len(as_json) == 1 and as_json[0]["metadata"] == {"n": 3}
    assert int(as_json[0]["cost_nanos"]) == price("gpt-4o", 100, 50)
    lines = export_text(eng, format="jsonl", days=365).splitlines()
    assert len(lines) == 8
    assert json.loads(export_text(eng, format="json", days=1, user_id="nobody")) == []
    with pytest.raises(ConfigurationError, match="export format"):
        budgetkit.export_usage(eng, io.StringIO(), format="xlsx")


# -- budgets and periodic reports ---------------------------------------------------------
def test_budget_report_reads_status_alerts_and_approvals(tmp_path: Path,
                                                         clock: FakeClock) -> None:
    db = str(tmp_path / "budgets.db")
    with Engine(db=db, clock=clock) as writer:
        writer.add_budget(Budget(limit=0.01, name="team", scope="user"))
        for _ in range(20):
            try:
                ticket = writer.admit("gpt-4o", input_tokens=200, max_output_tokens=20,
                                      user_id="alice")
            except budgetkit.BudgetExceeded:
                break
            writer.settle(ticket, input_tokens=200, output_tokens=20)
        writer.approve("team", key="alice", extra=0.01, by="lead")
    # another process: same database, budgets loaded from the same definitions
    with Engine(db=db, clock=clock) as reader:
        reader.add_budget(Budget(limit=0.01, name="team", scope="user"))
        report = budgetkit.budget_report(reader)
        alice_only = budgetkit.budget_report(reader, user_id="alice")
        bob_only = budgetkit.budget_report(reader, user_id="bob")
        no_budgets = budgetkit.budget_report(Engine(db=db, clock=clock))
    [status] = report["budgets"]
    assert status["scope_key"] == "alice" and status["percent"] >= 80
    assert status["used"] == pytest.approx(status["percentage"] * 0.01 / 100)
    kinds = [a["kind"] for a in report["alerts"]]
    assert "threshold" in kinds
    assert report["approvals"][0]["approved_by"] == "lead"
    json.dumps(report, allow_nan=False)  # valid JSON for browsers
    assert alice_only["budgets"] == report["budgets"]
    assert bob_only["budgets"] == [] and bob_only["alerts"] == []
    # an engine that registered nothing still reports them: the budgets are stored in
    # the ledger (tests/test_shared_budgets.py)
    assert no_budgets["budgets"] == report["budgets"]
    assert no_budgets["alerts"] == report["alerts"]


@pytest.mark.parametrize("period, extra", [("day", set()),
                                           ("week", {"trend", "forecast", "anomalies",
                                                     "recommendations"}),
                                           ("month", {"trend", "forecast", "anomalies",
                                                      "recommendations", "cost_analysis"})])
def test_daily_weekly_monthly_reports(eng: Engine, clock: FakeClock, period: str,
                                      extra: set[str]) -> None:
    record_at(eng, clock, T0 - dt.timedelta(hours=1), operation_type="rag_input")
    report = budgetkit.periodic_report(eng, period)
    base = {"report", "period", "totals", "by_model", "by_operation", "budgets", "alerts"}
    assert set(report) == base | extra
    assert report["totals"]["calls"] == 1
    assert report["by_operation"][0]["operation_type"] == "rag_input"
    json.dumps(report, allow_nan=False)
