"""The ledger's call services on their own, without an engine or a database:
UsageRecorder (ticket in, one usage row out) and DeferredJobs (bookkeeping off the caller's
thread)."""

from __future__ import annotations

import datetime as dt
import logging

import pytest

from budgetkit.errors import ConfigurationError
from budgetkit.ledger import DeferredJobs, UsageRecorder
from budgetkit.pricing import default_catalog


class CountingBudgets:
    """Stands in for the budget book: what the recorder commits and releases."""

    def __init__(self):
        self.committed, self.released = [], []

    def commit(self, ticket, cost_nanos, tokens):
        self.committed.append((ticket.id, cost_nanos, tokens))

    def release(self, ticket):
        self.released.append(ticket.id)


def test_a_recorder_alone_turns_each_ticket_into_one_priced_row():
    rows = []
    recorder = UsageRecorder(rows.append, project="docs")
    ticket = recorder.ticket("gpt-4o-mini", prompt="hello there", user_id="ann")
    record = recorder.settle(ticket, input_tokens=8, output_tokens=20)
    assert recorder.settle(ticket, input_tokens=8, output_tokens=20) is None
    assert recorder.release(ticket, error="TimeoutError") is None
    [row] = rows
    price = default_catalog().get("gpt-4o-mini")
    assert row["cost_nanos"] == price.cost_nanos(8, 20) == record.cost_nanos > 0
    assert (row["user_id"], row["project"], row["status"]) == ("ann", "docs", "ok")
    assert row["prompt_hash"] == record.prompt_hash is not None


def test_a_recorder_counts_a_prompt_only_when_asked():
    rows = []
    recorder = UsageRecorder(rows.append)
    messages = [{"role": "user", "content": "how long is the flight to Lima?"}]
    ticket = recorder.ticket("gpt-4o-mini", messages=messages, max_output_tokens=50)
    assert not ticket.input_counted
    recorder.settle(ticket, output_tokens=3, usage_source="estimated")
    assert rows[0]["input_tokens"] == recorder.count_message_tokens(messages, "gpt-4o-mini")


def test_a_recorder_counts_finished_calls_in_its_budgets_and_discards_without_a_row():
    rows, budgets = [], CountingBudgets()
    recorder = UsageRecorder(rows.append, budgets=lambda: budgets)
    paid = recorder.ticket("gpt-4o-mini", input_tokens=10)
    recorder.settle(paid, output_tokens=5)
    failed = recorder.ticket("gpt-4o-mini", input_tokens=10)
    recorder.release(failed, error=TimeoutError("slow"))
    hit = recorder.ticket("gpt-4o-mini", input_tokens=10)
    assert recorder.discard(hit) and not recorder.discard(hit)
    blocked = recorder.ticket("gpt-4o-mini", input_tokens=10)
    recorder.block(blocked, "BudgetExceeded")
    assert budgets.committed == [(paid.id, rows[0]["cost_nanos"], 15), (failed.id, 0, 0)]
    assert budgets.released == [hit.id]  # a blocked call reserved nothing to give back
    assert [row["status"] for row in rows] == ["ok", "error", "blocked"]
    assert rows[1]["error_type"] == "TimeoutError"


def test_a_recorders_listeners_see_every_record_and_a_failing_one_breaks_nothing(caplog):
    rows, seen = [], []
    recorder = UsageRecorder(rows.append)

    def broken(record):
        raise ValueError("listener bug")

    recorder.add_listener(broken)
    recorder.add_listener(seen.append)
    with caplog.at_level(logging.ERROR, logger="budgetkit"):
        recorder.record("gpt-4o-mini", input_tokens=4, status="cached", saved_nanos=99)
    recorder.remove_listener(seen.append)
    recorder.record("gpt-4o-mini", input_tokens=4)
    assert [record.saved_nanos for record in seen] == [99] and len(rows) == 2
    assert "listener" in caplog.text


def test_a_recorder_refuses_bad_input_by_name_and_records_nothing():
    rows = []
    recorder = UsageRecorder(rows.append)
    with pytest.raises(ConfigurationError, match="output_tokens"):
        recorder.record("gpt-4o-mini", input_tokens=3, output_tokens=-1)
    with pytest.raises(ConfigurationError, match="unknown argument.*colour"):
        recorder.record("gpt-4o-mini", input_tokens=3, colour="red")
    ticket = recorder.ticket("gpt-4o-mini", input_tokens=3)
    with pytest.raises(ConfigurationError, match="input_tokens"):
        recorder.settle(ticket, input_tokens=float("nan"))
    with pytest.raises(ConfigurationError, match="default_max_output_tokens"):
        UsageRecorder(rows.append, default_max_output_tokens=0)
    assert rows == [] and not ticket.done


def test_a_recorder_without_somewhere_to_send_rows_says_so():
    recorder = UsageRecorder()
    with pytest.raises(RuntimeError, match="submit="):
        recorder.record("gpt-4o-mini", input_tokens=1)


def test_a_recorder_uses_its_clock_for_row_times():
    moment = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    rows = []
    recorder = UsageRecorder(rows.append, clock=lambda: moment)
    ticket = recorder.ticket("gpt-4o-mini", input_tokens=1)
    ticket.ended = recorder.mark_end()
    recorder.settle(ticket, output_tokens=1)
    assert not recorder.wall_clock
    assert rows[0]["created_at"] == dt.datetime(2026, 3, 1, 10, 0)


def test_deferred_jobs_run_in_order_and_one_failure_stops_no_other(caplog):
    done = []
    jobs = DeferredJobs(max_waiting=100, wake_at=50)
    jobs.add(lambda: done.append(1))
    jobs.add(lambda: 1 / 0)
    jobs.add(lambda: done.append(3))
    assert len(jobs) == 3 and jobs.due() is not None and done == []
    with caplog.at_level(logging.ERROR, logger="budgetkit"):
        assert jobs.run() == 3
    assert done == [1, 3] and "ZeroDivisionError" in caplog.text
    assert len(jobs) == 0 and jobs.due() is None


def test_deferred_jobs_run_on_the_callers_thread_when_too_many_wait_or_once_closed():
    done = []
    jobs = DeferredJobs(max_waiting=3, wake_at=2)
    for number in range(3):
        jobs.add(lambda number=number: done.append(number))
    assert done == [0, 1, 2] and len(jobs) == 0  # the third add ran the queue
    jobs.closed = True
    jobs.add(lambda: done.append("after close"))
    assert done[-1] == "after close" and len(jobs) == 0
