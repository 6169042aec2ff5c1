"""The command line: every subcommand in-process through ``main(argv)``, exit codes, short
errors without tracebacks, ``--json`` for scripts, and one real subprocess run."""

from __future__ import annotations

import csv
import datetime as dt
import json
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import budgetkit
from budgetkit import Engine
from budgetkit.cli._main import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main

BUDGETS_TOML = """
[[budget]]
name = "daily-usd"
limit = 0.05

[[budget]]
name = "per-user"
scope = "user"
limit = 0.02
"""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def price(model: str, i: int, o: int = 0) -> float:
    return budgetkit.default_catalog().cost_nanos(model, i, o) / 1e9


@pytest.fixture
def db(tmp_path: Path) -> str:
    """A ledger with three days of usage (stamped relative to the real clock, as the CLI
    reads it) and budget windows for the budgets of budgets.toml next to it."""
    path = tmp_path / "cli.db"
    (tmp_path / "budgets.toml").write_text(BUDGETS_TOML)
    offset = {"value": dt.timedelta(days=2)}
    with Engine(db=str(path), clock=lambda: utcnow() - offset["value"]) as engine:
        for days_ago in (2, 1):
            offset["value"] = dt.timedelta(days=days_ago)
            for user in ("alice", "bob"):
                engine.record("gpt-4o", input_tokens=1000, output_tokens=100, user_id=user,
                              operation_type="rag_output", prompt="same question")
        offset["value"] = dt.timedelta(0)
        engine.load_budgets(tmp_path / "budgets.toml")
        for _ in range(3):
            ticket = engine.admit("gpt-4o", input_tokens=1000, max_output_tokens=100,
                                  user_id="alice", operation_type="rag_output")
            engine.settle(ticket, input_tokens=1000, output_tokens=100)
        engine.record("text-embedding-3-small", input_tokens=5000, operation_type="embedding",
                      user_id="bob")
        engine.record("gpt-4o", input_tokens=1000, output_tokens=100, status="cached",
                      saved_nanos=int(price("gpt-4o", 1000, 100) * 1e9), user_id="bob",
                      operation_type="rag_output")
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run(capsys, *argv, "--json")
    assert code == EXIT_OK, err
    return json.loads(out)


# -- report ---------------------------------------------------------------------------------
def test_report_prints_readable_tables(capsys: pytest.CaptureFixture[str], db: str) -> None:
    code, out, err = run(capsys, "--db", db, "report")
    assert code == EXIT_OK, err
    assert "By model" in out and "By operation" in out and "Spend per day" in out
    assert "gpt-4o " in out and "rag_output" in out
    assert "calls 9 " in out  # 4 + 3 + embedding + cache hit
    assert "Recommendations" in out and "repeated an earlier prompt" in out


def test_report_json_matches_the_library(capsys: pytest.CaptureFixture[str], db: str) -> None:
    data = run_json(capsys, "report", "--db", db, "--days", "7")
    expected = budgetkit.summarize(db, group_by="model", days=7)
    assert data["totals"]["calls"] == expected.totals.calls == 9
    assert data["totals"]["cost_usd"] == pytest.approx(expected.totals.cost)
    assert data["totals"]["saved_usd"] == pytest.approx(price("gpt-4o", 1000, 100))
    assert len(data["daily"]) == 8
    by_user = run_json(capsys, "report", "--db", db, "--by", "user,operation", "--days", "7")
    assert {(g["user_id"], g["operation_type"]) for g in by_user["groups"]} == {
        ("alice", "rag_output"), ("bob", "rag_output"), ("bob", "embedding")}
    only_alice = run_json(capsys, "report", "--db", db, "--user", "alice", "--by", "day")
    assert only_alice["totals"]["calls"] == 5


def test_other_reports(capsys: pytest.CaptureFixture[str], db: str) -> None:
    costs = run_json(capsys, "report", "costs", "--db", db)
    assert set(costs["operation_costs"]) == {"rag_output", "embedding"}
    assert any("caching" in r for r in costs["recommendations"])
    forecast = run_json(capsys, "report", "forecast", "--db", db, "--period", "week")
    assert forecast["projected_total_usd"] >= forecast["spent_usd"] and forecast["method"]
    assert run_json(capsys, "report", "anomalies", "--db", db) == []
    what_if = run_json(capsys, "report", "what-if", "--db", db, "--target", "gpt-4o-mini")
    assert what_if["repriced_cost_usd"] == pytest.approx(price("gpt-4o-mini", 7000, 700))
    allocation = run_json(capsys, "report", "allocation", "--db", db, "--by", "user")
    assert sum(r["share"] for r in allocation) == pytest.approx(1.0)
    monthly = run_json(capsys, "report", "monthly", "--db", db)
    assert monthly["report"] == "monthly" and "cost_analysis" in monthly
    code, out, _ = run(capsys, "report", "weekly", "--db", db)
    assert code == EXIT_OK and "Weekly report" in out and "Budgets" in out


# -- budgets, alerts, approve ----------------------------------------------------------------
def test_budgets_are_read_from_the_file_next_to_the_database(
        capsys: pytest.CaptureFixture[str], db: str) -> None:
    listed = run_json(capsys, "budgets", "list", "--db", db)
    assert [b["name"] for b in listed] == ["daily-usd", "per-user"]
    status = run_json(capsys, "budgets", "status", "--db", db)
    alice = next(s for s in status if s["budget"] == "per-user" and s["scope_key"] == "alice")
    assert alice["used"] == pytest.approx(3 * price("gpt-4o", 1000, 100))
    code, out, _ = run(capsys, "budgets", "--db", db)
    assert code == EXIT_OK and "per-user" in out and "user alice" in out and "%" in out
    alerts = run_json(capsys, "alerts", "--db", db)
    assert any(a["budget"] == "per-user" and a["scope_key"] == "alice" for a in alerts)


def test_approve_lifts_a_stop_and_is_stored(capsys: pytest.CaptureFixture[str], db: str,
                                            tmp_path: Path) -> None:
    code, out, err = run(capsys, "approve", "per-user", "--key", "alice", "--extra", "0.01",
                         "--expires-in", "2", "--by", "lead", "--db", db)
    assert code == EXIT_OK, err
    assert "Approved 'per-user'" in out
    with Engine(db=db) as engine:
        engine.load_budgets(tmp_path / "budgets.toml")
        [approval] = engine.approvals()
        assert approval.approved_by == "lead" and approval.extra == pytest.approx(0.01)
    code, _, err = run(capsys, "approve", "no-such-budget", "--db", db)
    assert code == EXIT_USAGE and "unknown budget 'no-such-budget'" in err
    code, _, err = run(capsys, "approve", "per-user", "--db", db)  # which user?
    assert code == EXIT_USAGE and "key" in err and "Traceback" not in err


def test_no_budget_file_gives_a_hint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    Engine(db=str(tmp_path / "empty.db")).close()  # an empty ledger that exists
    code, out, _ = run(capsys, "budgets", "--db", str(tmp_path / "empty.db"))
    assert code == EXIT_OK and "No budgets loaded" in out
    bad = tmp_path / "bad.toml"
    bad.write_text("[[budget]]\nname = 'x'\nlimit = -1\n")
    code, _, err = run(capsys, "budgets", "--db", str(tmp_path / "empty.db"), "--budgets", str(bad))
    assert code == EXIT_USAGE and "'x'" in err and "limit" in err


# -- export, prices, purge ------------------------------------------------------------------
def test_export_csv_file_and_json_stdout(capsys: pytest.CaptureFixture[str], db: str,
                                         tmp_path: Path) -> None:
    target = tmp_path / "usage.csv"
    code, _, err = run(capsys, "export", "--db", db, "-o", str(target))
    assert code == EXIT_OK and "Exported 9 rows" in err
    with open(target, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 9 and {r["user_id"] for r in rows} == {"alice", "bob"}
    code, out, _ = run(capsys, "export", "--db", db, "--format", "json", "--user", "alice")
    assert code == EXIT_OK and len(json.loads(out)) == 5


def test_prices_looks_up_models(capsys: pytest.CaptureFixture[str]) -> None:
    [entry] = run_json(capsys, "prices", "gpt-4o")
    catalog_price = budgetkit.default_catalog().get("gpt-4o")
    assert entry["input_per_1m_usd"] == pytest.approx(catalog_price.input_picos / 1e6)
    assert entry["context_window"] == catalog_price.context_window
    code, out, _ = run(capsys, "prices", "--search", "embedding")
    assert code == EXIT_OK and "text-embedding-3-small" in out
    code, out, err = run(capsys, "prices", "gpt-99-ultra")
    assert code == EXIT_USAGE and "unknown model 'gpt-99-ultra'" in err and out == ""


def test_purge_deletes_old_rows(capsys: pytest.CaptureFixture[str], db: str) -> None:
    dry = run_json(capsys, "purge", "--older-than", "2", "--dry-run", "--db", db)
    assert dry == {"rows": 2, "before": dry["before"], "dry_run": True}
    done = run_json(capsys, "purge", "--older-than", "2", "--db", db)
    assert done["rows"] == 2
    assert budgetkit.summarize(db, days=30).totals.calls == 7


def test_rollup_reports_its_state_and_rebuilds(capsys: pytest.CaptureFixture[str],
                                               db: str) -> None:
    code, out, _ = run(capsys, "rollup", "--db", db)
    assert code == EXIT_OK and "Rollup ready" in out  # kept up to date by every write
    before = run_json(capsys, "rollup", "--db", db)
    rebuilt = run_json(capsys, "rollup", "--rebuild", "--db", db)
    assert rebuilt["ready"] and rebuilt["seconds"] is not None
    assert rebuilt["buckets"] == before["buckets"]  # rebuilt from the rows: the same buckets
    # two days of one kind of call, then today: paid calls, an embedding and a cache hit
    assert before["buckets"]["budgetkit_usage_daily"] == 1 + 1 + 3


# -- errors and exit codes ------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["report", "--days", "-2"], "days must be >= 1"),
    (["report", "--start", "2024-02-30"], "start_date must be a date"),
    (["report", "--by", "colour"], "cannot group by 'colour'"),
    (["report", "what-if"], "needs --target"),
    (["report", "--days", "many"], "invalid int value"),
    (["frobnicate"], "invalid choice"),
    (["purge"], "--older-than"),
    (["alerts", "--limit", "0"], "--limit must be >= 1"),
])
def test_wrong_arguments_give_a_short_message(capsys: pytest.CaptureFixture[str], db: str,
                                              argv: list[str], needle: str) -> None:
    code, _, err = run(capsys, *argv, "--db", db)
    assert code == EXIT_USAGE
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2


@pytest.mark.parametrize("argv", [
    ["report"], ["report", "costs"], ["budgets", "list"], ["budgets"], ["alerts"],
    ["export", "-o", "-"], ["serve"], ["purge", "--older-than", "30"], ["rollup"],
])
@pytest.mark.parametrize("form", ["path", "url", "environment"])
def test_read_commands_refuse_a_ledger_that_does_not_exist(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        argv: list[str], form: str) -> None:
    missing = tmp_path / "typo" / "ledgr.db"
    db_args = {"path": ["--db", str(missing)], "url": ["--db", f"sqlite:///{missing}"],
               "environment": []}[form]
    if form == "environment":
        monkeypatch.setenv("BUDGETKIT_DB", str(missing))
    code, out, err = run(capsys, *argv, *db_args)
    assert code == EXIT_USAGE and out == ""
    assert f"no ledger at {missing}" in err and "Traceback" not in err
    assert not missing.exists() and not missing.parent.exists()  # nothing created


def test_write_commands_and_in_memory_ledgers_may_start_empty(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    new = tmp_path / "new.db"
    (tmp_path / "budgets.toml").write_text(BUDGETS_TOML)
    code, out, err = run(capsys, "approve", "daily-usd", "--db", str(new))
    assert code == EXIT_OK, err
    assert new.is_file()  # approve writes, so it may create the ledger
    code, out, err = run(capsys, "report", "--db", str(new))  # and now it exists
    assert code == EXIT_OK, err
    code, out, err = run(capsys, "report", "--db", ":memory:")
    assert code == EXIT_OK, err


def test_unreachable_database_is_a_failure_not_a_traceback(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "report", "--db",
                       "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
    assert code == EXIT_FAILED and "database" in err and "Traceback" not in err


def test_serve_builds_the_app_and_prints_the_dashboard_url_but_no_token(
        capsys: pytest.CaptureFixture[str], db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fastapi")
    import uvicorn

    served: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    code, out, err = run(capsys, "serve", "--db", db, "--port", "8765",
                         "--token", "admin-token-xyz", "--token", "alice-token-xyz:alice")
    assert code == EXIT_OK and served["port"] == 8765
    assert served["app"].state.tokens == {"admin-token-xyz": None, "alice-token-xyz": "alice"}
    assert "http://127.0.0.1:8765/dashboard" in out and "2 token(s) from --token" in out
    assert "token-xyz" not in out + err  # secrets are never printed


def test_serve_keeps_a_generated_admin_token_in_a_private_file(
        capsys: pytest.CaptureFixture[str], db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fastapi")
    import uvicorn

    served: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    monkeypatch.delenv("BUDGETKIT_API_TOKENS", raising=False)
    token_file = tmp_path / "secrets" / "api-token"
    code, out, err = run(capsys, "serve", "--db", db, "--token-file", str(token_file))
    assert code == EXIT_OK, err
    [(token, user)] = served["app"].state.tokens.items()
    assert user is None and len(token) >= 24
    assert token_file.read_text().strip() == token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    assert token not in out + err and str(token_file) in out
    # a restart keeps the token (and tightens a file someone made readable)
    token_file.chmod(0o644)
    code, out, err = run(capsys, "serve", "--db", db, "--token-file", str(token_file))
    assert code == EXIT_OK and served["app"].state.tokens == {token: None}
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and token not in out + err


@pytest.mark.parametrize("spec, words", [
    ("admin-token-xyz:", "empty user"), ("admin-token-xyz: ", "empty user"),
    ("short", "too short"), (":alice", "too short"),
])
def test_serve_refuses_a_malformed_token_at_start(
        capsys: pytest.CaptureFixture[str], db: str, monkeypatch: pytest.MonkeyPatch,
        spec: str, words: str) -> None:
    pytest.importorskip("fastapi")
    import uvicorn

    served: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    code, out, err = run(capsys, "serve", "--db", db, "--token", spec)
    assert code == EXIT_USAGE and words in err and served == {}
    assert "token-xyz" not in out + err


@pytest.mark.slow
def test_the_console_script_runs_in_a_subprocess(db: str) -> None:
    ok = subprocess.run([sys.executable, "-m", "budgetkit.cli", "report", "--json", "--db", db],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["totals"]["calls"] == 9
    bad = subprocess.run([sys.executable, "-m", "budgetkit.cli", "report", "--days", "0",
                          "--db", db], capture_output=True, text=True, timeout=120)
    assert bad.returncode == EXIT_USAGE
    assert bad.stderr.strip() == "budgetkit: error: days must be >= 1, got 0"


@pytest.mark.slow
def test_demo_runs_offline_and_leaves_a_report_to_serve(capsys: pytest.CaptureFixture[str],
                                                       tmp_path: Path) -> None:
    pytest.importorskip("langchain_openai", reason="the demo needs langchain-openai")
    db = str(tmp_path / "demo.db")
    code, out, err = run(capsys, "demo", "--db", db, "--calls", "60", "--json", "--quiet")
    assert code == EXIT_OK, err
    assert err == ""  # --quiet: no progress lines
    result = json.loads(out)
    demo, report = result["demo"], result["report"]
    assert demo["answered"] + demo["blocked"] + demo["embedded"] == demo["calls_planned"]
    assert demo["blocked"] >= 1 and demo["retry_answered"] == 1  # stopped, approved, answered
    # one row per answer (paid or cached), per stopped call and per embedding batch
    assert report["totals"]["calls"] == demo["calls_planned"]
    assert report["totals"]["blocked"] == demo["blocked"]
    models = {m["model"] for m in report["by_model"]}
    assert {"gpt-4o", "gpt-4o-mini", "text-embedding-3-small"} <= models  # routed + embedded
    assert report["totals"]["cache_hits"] > 0  # repeated FAQ answered by the cache
    assert (tmp_path / "budgets.toml").is_file()  # so `budgetkit serve` shows the gauges
    status = run_json(capsys, "budgets", "status", "--db", db)
    assert {s["budget"] for s in status} >= {"demo-team-daily", "demo-monthly"}
    anomalies = run_json(capsys, "report", "anomalies", "--db", db)
    assert any(a["direction"] == "spike" for a in anomalies)  # the runaway batch job


@pytest.mark.slow
def test_demo_without_db_uses_a_temporary_ledger_and_leaves_home_alone(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("langchain_openai", reason="the demo needs langchain-openai")
    import tempfile

    home, temporary = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    temporary.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("BUDGETKIT_DB", str(home / "app.db"))  # the app's ledger: not the demo's
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    code, out, err = run(capsys, "demo", "--calls", "20")
    assert code == EXIT_OK, err
    assert list(home.iterdir()) == []  # no ~/.budgetkit, no budgets.toml, no app.db
    [folder] = temporary.iterdir()
    ledger = folder / "demo.db"
    assert (folder / "budgets.toml").is_file()
    # it says where it wrote: before the work on stderr, and in the summary
    assert f"writing to a new temporary ledger, {ledger}" in err
    assert f"into sqlite:///{ledger}" in out and f"--db {ledger}" in out
    # not a terminal: no bar, one line per stage
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 4, lines  # where, loading, calls, report
    assert re.fullmatch(r"demo calls: \d+ calls in [\d.]+ s", lines[2])
    with Engine(db=str(ledger)) as engine:
        assert len(engine.usage()) > 0


def test_progress_draws_a_bar_on_a_terminal_and_one_line_elsewhere() -> None:
    import io

    from budgetkit.cli._progress import Progress

    terminal = io.StringIO()
    with Progress("export", 4, unit="rows", stream=terminal, enabled=True, delay=0) as progress:
        for done in range(1, 5):
            progress.update(done)
    assert "100%" in terminal.getvalue() and "4/4 rows" in terminal.getvalue()
    assert terminal.getvalue().endswith("\n")  # the finished bar stays as a line

    log = io.StringIO()  # not a terminal: no bar, one line at the end of the stage
    with Progress("export", unit="rows", stream=log, delay=0) as progress:
        progress.update(2_000, None)
        progress.update(5_200, 5_200)
    assert re.fullmatch(r"export: 5,200 rows in [\d.]+ s\n", log.getvalue())

    quick = io.StringIO()  # quicker than the delay: nothing to say
    with Progress("export", unit="rows", stream=quick, delay=60) as progress:
        progress.update(3, 3)
    quiet = io.StringIO()
    with Progress("export", 3, unit="rows", stream=quiet, enabled=True, quiet=True,
                  delay=0) as progress:
        progress.update(3)
    assert quick.getvalue() == "" and quiet.getvalue() == ""


def test_a_wait_without_updates_shows_the_time_passing() -> None:
    import io
    import time

    from budgetkit.cli._progress import Progress

    terminal = io.StringIO()  # e.g. one long SQL query of a report over a large ledger
    with Progress("report: reading the ledger", stream=terminal, enabled=True, delay=0.2):
        time.sleep(1.3)
    drawn = terminal.getvalue()
    assert "reading the ledger... [00:01]" in drawn and drawn.endswith("\n")


def test_console_money_and_tables() -> None:
    from budgetkit.cli._console import money, table

    assert [money(v) for v in (1234.5, 2.5, 0.0421, 0.000015, 0, -0.5, None)] == [
        "$1,234.50", "$2.50", "$0.0421", "$0.000015", "$0", "-$0.5000", "-"]
    text = table([["gpt-4o", "$1.00"], ["gpt-4o-mini", "$0.0100"]], ["model", "cost"], "lr")
    lines = text.splitlines()
    assert lines[0].startswith("model") and lines[2].endswith("$1.00")
    assert len({len(line) for line in lines[2:]}) == 1  # numbers right-aligned
