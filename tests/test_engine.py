"""The engine and ledger: admit → settle / release, one row per ticket, pricing, reading back.

The ledger tests run on a SQLite file and, when BUDGETKIT_TEST_POSTGRES_URL is set, on a
fresh PostgreSQL database too.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading

import pytest

from budgetkit import ConfigurationError, Engine, UnknownModelError


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request, tmp_path, fake_clock):
    """An engine on each store backend, with the fake clock."""
    if request.param == "sqlite":
        url = str(tmp_path / "ledger.db")
    else:
        url = request.getfixturevalue("pg_url")
    with Engine(db=url, clock=fake_clock) as engine:
        yield engine


# ---------------------------------------------------------------------------- the life of a call

def test_settle_writes_one_priced_row(ledger):
    ticket = ledger.admit("gpt-4o-mini", messages=[{"role": "user", "content": "hello"}],
                          user_id="alice", run_id="run-1", tags=["a", "b"],
                          metadata={"k": "v"})
    assert ticket.input_tokens == ledger.count_message_tokens(
        [{"role": "user", "content": "hello"}], "gpt-4o-mini")
    record = ledger.settle(ticket, input_tokens=1000, output_tokens=500,
                           cached_input_tokens=400, reasoning_tokens=100)
    assert record is not None
    # gpt-4o-mini: 600 plain × 150 + 400 cached × 75 + 500 out × 600 pico-dollars → nanos
    assert record.cost_nanos == (600 * 150_000 + 400 * 75_000 + 500 * 600_000) // 1000
    [row] = ledger.usage()
    assert row.id == record.id and row.cost_nanos == record.cost_nanos
    assert (row.input_tokens, row.output_tokens, row.total_tokens) == (1000, 500, 1500)
    assert (row.cached_input_tokens, row.reasoning_tokens) == (400, 100)
    assert row.user_id == "alice" and row.run_id == "run-1" and row.root_run_id == "run-1"
    assert row.tags == ["a", "b"] and row.metadata_ == {"k": "v"}
    assert row.provider == "openai" and row.status == "ok"
    assert row.prompt_hash and row.prompt_preview is None  # prompts are not kept by default


def test_one_row_per_ticket_whoever_finishes_first(ledger):
    ticket = ledger.admit("gpt-4o", input_tokens=10)
    assert ledger.settle(ticket, input_tokens=10, output_tokens=5) is not None
    assert ledger.settle(ticket, input_tokens=10, output_tokens=5) is None
    assert ledger.release(ticket, error=RuntimeError("late")) is None
    assert ledger.discard(ticket) is False
    assert len(ledger.usage()) == 1


def test_concurrent_finishers_write_exactly_one_row(ledger):
    tickets = [ledger.admit("gpt-4o-mini", input_tokens=3) for _ in range(50)]
    barrier = threading.Barrier(4)

    def finish(kind: int) -> None:
        barrier.wait()
        for ticket in tickets:
            if kind % 2:
                ledger.settle(ticket, input_tokens=3, output_tokens=1)
            else:
                ledger.release(ticket, error="cancelled")

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ledger.usage()) == 50


def test_release_records_an_error_without_phantom_cost(ledger):
    ticket = ledger.admit("gpt-4o", input_tokens=100, max_output_tokens=1000)
    assert ticket.worst_case_nanos > 0
    ledger.release(ticket, error=TimeoutError("provider timed out"))
    [row] = ledger.usage()
    assert row.status == "error" and row.error_type == "TimeoutError"
    assert row.cost_nanos == 0 and row.input_tokens == 0


def test_release_with_partial_output_bills_it(ledger):
    ticket = ledger.admit("gpt-4o", input_tokens=100)
    ledger.release(ticket, error="stream cut", input_tokens=100, output_tokens=20)
    [row] = ledger.usage()
    assert row.cost_nanos == ledger.catalog.get("gpt-4o").cost_nanos(100, 20) > 0
    assert row.usage_source == "estimated"


def test_discard_writes_no_row(ledger):
    ticket = ledger.admit("gpt-4o", input_tokens=100)
    assert ledger.discard(ticket) is True
    assert ledger.settle(ticket, input_tokens=1, output_tokens=1) is None
    assert ledger.usage() == []


def test_record_cached_hit_is_free_and_says_what_it_saved(ledger):
    saved = ledger.catalog.get("gpt-4o").cost_nanos(500, 100)
    ledger.record("gpt-4o", input_tokens=500, output_tokens=100, status="cached",
                  saved_nanos=saved, user_id="u")
    [row] = ledger.usage()
    assert row.status == "cached" and row.cost_nanos == 0 and row.saved_nanos == saved


def test_settle_prices_the_model_the_provider_reports(ledger):
    ticket = ledger.admit("gpt-4o", input_tokens=10)
    ledger.settle(ticket, input_tokens=1000, output_tokens=0, model="gpt-4o-2024-05-13")
    [row] = ledger.usage()
    assert row.model == "gpt-4o-2024-05-13"  # a snapshot with its own (higher) price
    assert row.cost_nanos == ledger.catalog.get("gpt-4o-2024-05-13").cost_nanos(1000)


def test_cache_writes_are_part_of_input_and_priced_once(ledger):
    ticket = ledger.admit("claude-sonnet-4-5", input_tokens=10)
    ledger.settle(ticket, input_tokens=10_000, output_tokens=100, cached_input_tokens=2_000,
                  cache_write_tokens=6_000)
    [row] = ledger.usage()
    # $3/M plain, $0.30/M cache read, $3.75/M cache write, $15/M output
    assert row.cost_nanos == 2_000 * 3_000 + 2_000 * 300 + 6_000 * 3_750 + 100 * 15_000
    assert row.total_tokens == 10_100


def test_money_sums_without_drift(ledger):
    # 1 input token of gpt-4o-mini costs 0.15 nano-dollars: each row rounds once, and the
    # sum of 1,000 rows is an exact integer (floats would drift).
    for _ in range(1000):
        ledger.record("gpt-4o-mini", input_tokens=7, output_tokens=3)
    rows = ledger.usage()
    per_row = ledger.catalog.get("gpt-4o-mini").cost_nanos(7, 3)
    assert sum(row.cost_nanos for row in rows) == 1000 * per_row
    assert all(isinstance(row.cost_nanos, int) for row in rows)


def test_usage_filters(ledger, fake_clock):
    ledger.record("gpt-4o", input_tokens=1, user_id="a", operation_type="embedding",
                  run_id="r1", project="p1", session_id="s1", request_id="q1", tags=["x"])
    fake_clock.advance(hours=2)
    ledger.record("gpt-4o-mini", input_tokens=1, user_id="b", run_id="r2", tags=["y"])
    start = fake_clock.now - dt.timedelta(hours=1)
    assert [r.user_id for r in ledger.usage(since=start)] == ["b"]
    assert [r.user_id for r in ledger.usage(until=start)] == ["a"]
    assert [r.user_id for r in ledger.usage(model="gpt-4o")] == ["a"]
    assert [r.user_id for r in ledger.usage(operation_type="embedding")] == ["a"]
    assert [r.user_id for r in ledger.usage(run_id="r2")] == ["b"]
    assert [r.user_id for r in ledger.usage(tag="x")] == ["a"]
    assert [r.user_id for r in ledger.usage(project="p1", session_id="s1",
                                            request_id="q1")] == ["a"]
    assert len(ledger.usage(limit=1)) == 1
    assert ledger.usage(user_id="nobody") == []


def test_retention_purges_old_rows(ledger, fake_clock):
    ledger.record("gpt-4o", input_tokens=1, user_id="old")
    fake_clock.advance(days=40)
    ledger.record("gpt-4o", input_tokens=1, user_id="new")
    assert ledger.purge(older_than_days=30) == 1
    assert [row.user_id for row in ledger.usage()] == ["new"]


# ---------------------------------------------------------------------------- sqlite only

def test_store_prompts_keeps_a_redacted_preview(tmp_path):
    with Engine(db=str(tmp_path / "p.db"), store_prompts=True) as engine:
        ticket = engine.admit("gpt-4o", prompt="mail me at jane.doe@example.com, key "
                                                "sk-abcdefghijklmnopqrstuvwx")
        engine.settle(ticket, input_tokens=5, output_tokens=1)
        [row] = engine.usage()
        assert "jane.doe@example.com" not in row.prompt_preview
        assert "<email>" in row.prompt_preview and "<secret>" in row.prompt_preview


def test_retention_days_purges_at_start(tmp_path, fake_clock):
    path = str(tmp_path / "r.db")
    with Engine(db=path, clock=fake_clock) as engine:
        engine.record("gpt-4o", input_tokens=1)
    fake_clock.advance(days=10)
    with Engine(db=path, clock=fake_clock, retention_days=7) as engine:
        assert engine.usage() == []


def test_listener_sees_every_record_and_a_broken_one_is_contained(engine):
    seen = []
    engine.add_listener(lambda record: 1 / 0)
    engine.add_listener(seen.append)
    record = engine.record("gpt-4o", input_tokens=3)
    assert seen == [record]
    engine.remove_listener(seen.append)
    engine.record("gpt-4o", input_tokens=3)
    assert len(seen) == 1 and len(engine.usage()) == 2


async def test_async_twins(engine):
    ticket = await engine.aadmit("gpt-4o", input_tokens=10)
    await engine.asettle(ticket, input_tokens=10, output_tokens=2)
    other = await engine.aadmit("gpt-4o", input_tokens=10)
    await engine.arelease(other, error="cancelled")
    assert sorted(row.status for row in engine.usage()) == ["error", "ok"]


def test_context_manager_flushes_on_close(tmp_path):
    path = str(tmp_path / "c.db")
    with Engine(db=path) as engine:
        for _ in range(25):
            engine.record("gpt-4o", input_tokens=1)
    with Engine(db=path) as engine:
        assert len(engine.usage()) == 25


async def test_async_context_manager(tmp_path):
    async with Engine(db=str(tmp_path / "a.db")) as engine:
        engine.record("gpt-4o", input_tokens=1)
    assert engine._closed


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("call, match", [
    (lambda e: e.admit("gpt-4o", input_tokens=-1), "input_tokens"),
    (lambda e: e.admit("gpt-4o", input_tokens=1, max_output_tokens=-5), "max_output_tokens"),
    (lambda e: e.settle(e.admit("gpt-4o", input_tokens=1), output_tokens=-2), "output_tokens"),
    (lambda e: e.record("gpt-4o", input_tokens=1, colour="red"), "colour"),
    (lambda e: e.admit("", input_tokens=1), "model"),
    (lambda e: e.purge(older_than_days=0), "older_than_days"),
])
def test_bad_input_is_a_typed_error_that_changes_nothing(engine, call, match):
    with pytest.raises(ConfigurationError, match=match):
        call(engine)
    assert engine.usage() == []


def test_unknown_model_names_the_model(engine):
    with pytest.raises(UnknownModelError, match="gpt-4o-mni") as info:
        engine.admit("gpt-4o-mni", input_tokens=1)
    assert "gpt-4o-mini" in info.value.suggestions
    assert engine.usage() == []


@pytest.mark.parametrize("kwargs, match", [
    ({"retention_days": 0}, "retention_days"),
    ({"default_max_output_tokens": 0}, "default_max_output_tokens"),
])
def test_bad_engine_settings(tmp_path, kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        Engine(db=str(tmp_path / "x.db"), **kwargs)


def test_usage_after_close_has_rows_on_disk(tmp_path):
    path = str(tmp_path / "d.db")
    engine = Engine(db=path)
    engine.record("gpt-4o", input_tokens=1)
    engine.close()
    engine.close()  # idempotent
    with Engine(db=path) as again:
        assert len(again.usage()) == 1


def test_asyncio_gather_of_many_calls(engine):
    async def call(i: int) -> None:
        ticket = await engine.aadmit("gpt-4o-mini", input_tokens=i + 1)
        await asyncio.sleep(0)
        await engine.asettle(ticket, input_tokens=i + 1, output_tokens=1)

    async def main() -> None:
        await asyncio.gather(*(call(i) for i in range(100)))

    asyncio.run(main())
    rows = engine.usage()
    assert len(rows) == 100
    assert sorted(row.input_tokens for row in rows) == list(range(1, 101))


# ---------------------------------------------------------------------------- deferred counting

def _counting(engine):
    """Wrap the prompt counters of the engine's recorder (which counts a ticket's prompt);
    returns the list of calls made."""
    calls = []
    recorder = engine.recorder
    real_messages, real_text = recorder.count_message_tokens, recorder.count_tokens

    def count_messages(messages, model, **kwargs):
        calls.append("messages")
        return real_messages(messages, model, **kwargs)

    def count_text(text, model):
        calls.append("text")
        return real_text(text, model)

    recorder.count_message_tokens, recorder.count_tokens = count_messages, count_text
    return calls


def test_without_budgets_a_reported_usage_means_the_prompt_is_never_counted(engine):
    calls = _counting(engine)
    ticket = engine.admit("gpt-4o-mini", messages=[{"role": "user", "content": "hi there"}])
    assert not ticket.input_counted and ticket.prompt_hash
    engine.settle(ticket, input_tokens=12, output_tokens=3)
    assert calls == []
    [row] = engine.usage()
    assert (row.input_tokens, row.usage_source, row.prompt_hash) == (12, "provider",
                                                                     ticket.prompt_hash)


def test_deferred_count_is_of_the_admitted_prompt_and_runs_once(engine):
    calls = _counting(engine)
    messages = [{"role": "user", "content": "how much is a ticket?"}]
    expected = engine.count_message_tokens(list(messages), "gpt-4o-mini")
    calls.clear()
    ticket = engine.admit("gpt-4o-mini", messages=messages, max_output_tokens=100)
    messages.append({"role": "assistant", "content": "a much longer answer " * 20})
    # no usage reported: settle falls back to the count of the prompt as admitted
    engine.settle(ticket, output_tokens=7, usage_source="estimated")
    assert ticket.input_tokens == expected and ticket.input_counted
    assert ticket.worst_case_nanos == ticket.price.cost_nanos(expected, 100)
    assert calls == ["messages"]
    [row] = engine.usage()
    assert (row.input_tokens, row.output_tokens, row.usage_source) == (expected, 7, "estimated")


def test_deferred_prompt_count_for_text_and_release_with_partial_output(engine):
    calls = _counting(engine)
    ticket = engine.admit("gpt-4o", prompt="Tell me a story about a lighthouse.")
    engine.release(ticket, error="TimeoutError", input_tokens=ticket.input_tokens,
                   output_tokens=5)
    [row] = engine.usage()
    assert row.input_tokens == engine.count_tokens("Tell me a story about a lighthouse.",
                                                   "gpt-4o") > 0
    assert row.cost_nanos > 0 and calls.count("text") == 1 + 1  # release + the check here


def test_with_a_budget_the_prompt_is_counted_at_admit(engine):
    from budgetkit import Budget

    engine.add_budget(Budget(limit=1.00))
    ticket = engine.admit("gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert ticket.input_counted and ticket.input_tokens > 0


@pytest.mark.parametrize("call, match", [
    (lambda e: e.admit("gpt-4o", messages=["just a string"]), "messages must be dicts"),
    (lambda e: e.admit("gpt-4o", prompt=42), "prompt must be a str"),
])
def test_bad_prompt_fails_at_admit_even_when_counting_is_deferred(engine, call, match):
    with pytest.raises(ConfigurationError, match=match):
        call(engine)
    assert engine.usage() == []


def test_a_listener_changing_record_metadata_does_not_change_the_row(engine):
    engine.add_listener(lambda record: record.metadata.update(changed=True))
    ticket = engine.admit("gpt-4o", input_tokens=3, metadata={"k": "v"})
    record = engine.settle(ticket, output_tokens=1)
    assert record is not None and record.as_row()["metadata"] == {"k": "v", "changed": True}
    [row] = engine.usage()
    assert row.metadata_ == {"k": "v"}


# ---------------------------------------------------------------------------- deferred work

def test_deferred_jobs_run_in_order_before_a_flush_and_survive_a_failing_one(engine, caplog):
    ran: list[int] = []

    def job(index: int) -> None:
        if index == 2:
            raise ValueError("job 2 is broken")
        ticket = engine.ticket("gpt-4o-mini", input_tokens=10, request_id=f"job-{index}")
        engine.settle(ticket, input_tokens=10, output_tokens=1)
        ran.append(index)

    for index in range(5):
        engine.defer(lambda index=index: job(index))
    engine.flush()
    assert ran == [0, 1, 3, 4]
    assert sorted(row.request_id for row in engine.usage()) == [f"job-{i}" for i in (0, 1, 3, 4)]
    assert "job 2 is broken" in caplog.text


def test_deferred_jobs_run_on_close_and_inline_after_it(tmp_path):
    engine = Engine(db=str(tmp_path / "defer.db"))
    ran = []
    engine.defer(lambda: ran.append("before close"))
    engine.close()
    assert ran == ["before close"]
    engine.defer(lambda: ran.append("after close"))  # nothing is left to run it later
    assert ran == ["before close", "after close"]


def test_the_writer_thread_runs_deferred_jobs_without_a_flush(engine):
    done = threading.Event()
    engine.defer(done.set)
    assert done.wait(5.0)  # the writer takes them at its next batch


def test_a_ticket_finished_later_keeps_the_moment_its_call_ended(ledger, fake_clock):
    engine = ledger
    ticket = engine.ticket("gpt-4o-mini", input_tokens=10)
    ended = engine.mark_end()
    fake_clock.advance(seconds=30)  # bookkeeping runs well after the call ended
    ticket.ended = ended
    record = engine.settle(ticket, input_tokens=10, output_tokens=1)
    assert record is not None and record.created_at == ended[1]
    assert record.latency_ms is not None and record.latency_ms < 30_000


def test_ticket_checks_no_budget_but_its_spend_counts(engine):
    from budgetkit import Budget

    engine.add_budget(Budget(name="tiny", limit=0.000001))
    ticket = engine.ticket("gpt-4o-mini", input_tokens=100_000)  # no BudgetExceeded
    engine.settle(ticket, input_tokens=100_000, output_tokens=10)
    engine.flush()
    assert engine.budget_status("tiny")[0].used > 0


def test_tools_sent_with_the_messages_are_part_of_the_prompt(engine):
    from budgetkit import Budget

    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Look up today's weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    expected = engine.count_message_tokens(messages, "gpt-4o", tools=tools)
    assert engine.ticket("gpt-4o", messages=messages, tools=tools).input_tokens == expected
    engine.add_budget(Budget(name="day", limit=5.0))
    admitted = engine.admit("gpt-4o", messages=messages, tools=tools, max_output_tokens=10)
    assert admitted.input_tokens == expected
    assert admitted.input_bound is None or admitted.input_bound >= expected


def test_a_wall_clock_end_mark_becomes_the_rows_time(tmp_path):
    import time

    with Engine(db=str(tmp_path / "wall.db")) as engine:
        ticket = engine.ticket("gpt-4o-mini", input_tokens=10)
        ended = ticket.ended = engine.mark_end()  # seconds: no datetime on the call's thread
        time.sleep(0.05)
        record = engine.settle(ticket, input_tokens=10, output_tokens=1)
        assert record.created_at == engine.end_time(ended)
        wall = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        assert dt.timedelta(0) < wall - record.created_at < dt.timedelta(seconds=5)
