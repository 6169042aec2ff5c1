"""Budgets stored in the ledger: registered once (code, file, CLI), enforced by every engine
on the ledger within seconds; removed or changed the same way; local budgets stay local.

Before, an engine that had not registered a budget spent straight through it (a second
engine on the same ledger spent 375 % of a global budget another engine had registered).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from budgetkit import Budget, BudgetExceeded, Engine
from budgetkit.budgets import POLL_INTERVAL, SharedBudgets
from budgetkit.cli import main as cli_main
from budgetkit.errors import ConfigurationError

MODEL = "gpt-4o-mini"


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "shared.db")
    return str(request.getfixturevalue("pg_url"))


def _spend_until_blocked(engine: Engine, deadline: float) -> tuple[int, bool]:
    """Make calls until one is refused or ``deadline`` (monotonic) passes; returns the
    calls admitted and whether one was refused."""
    calls = 0
    while time.monotonic() < deadline:
        try:
            ticket = engine.admit(MODEL, input_tokens=1000, max_output_tokens=1000)
        except BudgetExceeded:
            return calls, True
        engine.settle(ticket, input_tokens=1000, output_tokens=1000)
        calls += 1
    return calls, False


def test_a_budget_one_engine_registers_stops_another(ledger: str) -> None:
    with Engine(db=ledger) as registrar, Engine(db=ledger) as worker:
        assert worker.budgets() == [] and not worker.has_budgets  # nothing stored yet
        call_cost = worker.catalog.get(MODEL).cost_nanos(1000, 1000)
        limit_nanos = 20 * call_cost + call_cost // 2
        registrar.add_budget(Budget(name="global", limit=limit_nanos / 1e9))
        registered_at = time.monotonic()
        while not worker.has_budgets and time.monotonic() - registered_at < 10:
            time.sleep(0.01)  # the worker looks at the ledger's budgets once a second
        assert time.monotonic() - registered_at <= POLL_INTERVAL + 0.5
        calls, refused = _spend_until_blocked(worker, time.monotonic() + 30)
        assert refused, "the worker spent past a budget stored in its ledger"
        assert calls == 20  # up to the limit, never past it (375 % before)
        worker.flush()
        (status,) = worker.budget_status("global")
        assert round(status.used * 1e9) == calls * call_cost <= limit_nanos
        assert [budget.name for budget in worker.budgets()] == ["global"]


def test_remove_and_change_reach_the_other_engine(ledger: str) -> None:
    with Engine(db=ledger) as registrar, Engine(db=ledger) as worker:
        registrar.add_budget(Budget(name="tight", limit=0.000_001))
        deadline = time.monotonic() + 3 * POLL_INTERVAL + 5
        while time.monotonic() < deadline and not worker.has_budgets:
            time.sleep(0.05)
        with pytest.raises(BudgetExceeded):
            worker.admit(MODEL, input_tokens=1000, max_output_tokens=1000)

        registrar.add_budget(Budget(name="tight", limit=100.0), replace=True)  # changed
        deadline = time.monotonic() + 3 * POLL_INTERVAL + 5
        while time.monotonic() < deadline and worker.budgets()[0].limit != 100.0:
            time.sleep(0.05)
        worker.settle(worker.admit(MODEL, input_tokens=1000, max_output_tokens=1000),
                      output_tokens=10)

        registrar.remove_budget("tight")
        deadline = time.monotonic() + 3 * POLL_INTERVAL + 5
        while time.monotonic() < deadline and worker.budgets():
            time.sleep(0.05)
        assert worker.budgets() == []


def test_a_different_budget_of_a_stored_name_needs_replace(tmp_path: Path) -> None:
    url = str(tmp_path / "names.db")
    with Engine(db=url) as first, Engine(db=url) as second:
        first.add_budget(Budget(name="day", limit=1.0))
        second.add_budget(Budget(name="day", limit=1.0))  # the same: fine, nothing changes
        version = SharedBudgets(second.store).version()
        with pytest.raises(ConfigurationError, match="'day'.*different budget"):
            second.add_budget(Budget(name="day", limit=2.0))
        assert SharedBudgets(second.store).version() == version  # nothing changed
        (stored,) = SharedBudgets(second.store).read()[1].values()
        assert stored.limit == 1.0


def test_a_local_budget_stays_local(tmp_path: Path) -> None:
    url = str(tmp_path / "local.db")
    with Engine(db=url) as owner, Engine(db=url) as other:
        owner.add_budget(Budget(name="mine", limit=0.000_001), shared=False)
        with pytest.raises(BudgetExceeded):
            owner.admit(MODEL, input_tokens=1000, max_output_tokens=1000)
        time.sleep(2 * POLL_INTERVAL + 0.2)  # well past the other engine's next look
        ticket = other.admit(MODEL, input_tokens=1000, max_output_tokens=1000)
        other.settle(ticket, output_tokens=1)
        assert other.budgets() == [] and SharedBudgets(other.store).read()[1] == {}
        with pytest.raises(ConfigurationError, match="local budget"):
            owner.add_budget(Budget(name="mine", limit=5.0))  # a stored one would be shadowed


_WORKER = textwrap.dedent("""
    import sys, time
    from budgetkit import BudgetExceeded, Engine

    engine = Engine(db=sys.argv[1])   # registers no budget
    print("ready", flush=True)
    calls = 0
    while True:
        try:
            ticket = engine.admit("gpt-4o-mini", input_tokens=1000, max_output_tokens=1000)
        except BudgetExceeded:
            engine.close()
            print("blocked", calls, time.time(), flush=True)
            break
        engine.settle(ticket, input_tokens=1000, output_tokens=1000)
        calls += 1
        time.sleep(0.01)
""")


@pytest.mark.slow
def test_a_budget_added_with_the_cli_stops_a_running_process(ledger: str,
                                                             tmp_path: Path) -> None:
    Engine(db=ledger).close()
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    worker = subprocess.Popen([sys.executable, str(script), ledger],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # it spends freely for a while
        added_at = time.time()
        assert cli_main(["budgets", "add", "ops-cap", "--limit", "0.02", "--db", ledger]) == 0
        line = worker.stdout.readline().split()
        assert line and line[0] == "blocked", line
        assert float(line[2]) - added_at < 3 * POLL_INTERVAL + 2  # within seconds
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    with Engine(db=ledger) as engine:
        (status,) = engine.budget_status("ops-cap")
        spent_today = sum(row.cost_nanos for row in engine.usage()) / 1e9
    # the window counts what the worker spent earlier today (count_earlier_spend; rows
    # still queued in its writer at that moment are not seen) and stopped the worker when
    # its next call's worst case no longer fitted
    worst_case = Engine(db=":memory:", journal=False).estimate_cost(MODEL, 1000, 1000)
    assert status.used <= spent_today + 1e-9
    assert status.used + status.reserved + worst_case > 0.02


def test_cli_add_set_remove_and_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    db = str(tmp_path / "cli.db")
    Engine(db=db).close()
    assert cli_main(["budgets", "add", "team", "--limit", "5", "--scope", "project",
                     "--match", "search", "--period", "week", "--db", db]) == 0
    assert cli_main(["budgets", "add", "team", "--limit", "6", "--db", db]) == 2
    assert "different budget has this name" in capsys.readouterr().err
    assert cli_main(["budgets", "set", "team", "--limit", "8", "--db", db]) == 0
    (team,) = SharedBudgets(Engine(db=db, journal=False).store).read()[1].values()
    assert (team.limit, team.scope, team.match, team.period) == (8.0, "project", "search",
                                                                 "week")
    assert cli_main(["budgets", "set", "nobody", "--limit", "1", "--db", db]) == 2
    assert "unknown budget 'nobody'" in capsys.readouterr().err
    assert cli_main(["budgets", "add", "bad", "--limit", "1", "--period", "fortnight",
                     "--db", db]) == 2
    assert "period" in capsys.readouterr().err
    file = tmp_path / "budgets.toml"
    file.write_text('[[budget]]\nname = "from-file"\nlimit = 3\n')
    assert cli_main(["budgets", "add", "--file", str(file), "--db", db]) == 0
    capsys.readouterr()
    assert cli_main(["budgets", "list", "--json", "--db", db]) == 0
    assert {"team", "from-file"} <= {b["name"] for b in __import__("json").loads(
        capsys.readouterr().out)}
    assert cli_main(["budgets", "remove", "team", "--db", db]) == 0
    assert cli_main(["budgets", "remove", "team", "--db", db]) == 2
    stored = SharedBudgets(Engine(db=db, journal=False).store).read()[1]
    assert set(stored) == {"from-file"}
