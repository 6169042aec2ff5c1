"""The handler's admission lanes (see budgetkit.budgets._lane): after a call was admitted the
ordinary way, calls with the same model and attribution are admitted from leases on the
caller's thread without building a ticket; every row, budget and stop stays as before."""

from __future__ import annotations

import pytest

from budgetkit import Budget, BudgetExceeded
from budgetkit.budgets import AdmissionLane
from budgetkit.budgets import LEASE_AFTER
from langchain_budgetkit import BudgetkitCallbackHandler

SMALL = {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}


@pytest.fixture
def lane_admits(monkeypatch) -> list[bool]:
    """Whether each lane admit succeeded, in order."""
    outcomes: list[bool] = []
    admit = AdmissionLane.admit

    def spy(self, *args, **kwargs):
        held = admit(self, *args, **kwargs)
        outcomes.append(held is not None)
        return held

    monkeypatch.setattr(AdmissionLane, "admit", spy)
    return outcomes


def test_calls_like_the_last_admitted_one_take_the_lane_and_count_exactly(
        engine, usage_model, lane_admits):
    engine.add_budget(Budget(name="day", limit=100.0))
    engine.add_budget(Budget(name="alice", limit=100.0, scope="user", match="alice"))
    engine.add_budget(Budget(name="tokens", limit=10_000_000, unit="tokens", period="month"))
    model = usage_model(usage=SMALL)
    handler = BudgetkitCallbackHandler(engine, user_id="alice", project="shop")
    calls = LEASE_AFTER + 200
    for index in range(calls):
        model.invoke(f"question {index % 7}", config={"callbacks": [handler],
                                                      "tags": ["faq"]})
    assert sum(lane_admits) >= 190  # all but the first calls and lease top-ups
    rows = engine.usage()
    assert len(rows) == calls
    assert {(row.user_id, row.project, tuple(row.tags)) for row in rows} == {
        ("alice", "shop", ("faq",))}
    status = {item.budget: item for item in engine.budget_status()}
    total = sum(row.cost_nanos for row in rows)
    assert status["day"].used == pytest.approx(total / 1e9)
    assert status["alice"].used == pytest.approx(total / 1e9)
    assert status["tokens"].used == sum(row.total_tokens for row in rows)
    assert all(item.reserved == 0 for item in status.values())


def test_lanes_keep_each_users_budget(engine, usage_model, lane_admits):
    engine.add_budget(Budget(name="day", limit=100.0))
    engine.add_budget(Budget(name="bob", limit=0.0001, scope="user", match="bob",
                             require_approval=False))
    model = usage_model(usage=SMALL)
    handler = BudgetkitCallbackHandler(engine)
    for _ in range(LEASE_AFTER + 20):  # alice's calls make a lane for alice's windows
        model.invoke("hi", config={"callbacks": [handler], "metadata": {"user_id": "alice"}})
    assert any(lane_admits)
    before = model.calls
    with pytest.raises(BudgetExceeded):
        for _ in range(1_000):  # bob's cannot use it: his own budget stops him
            model.invoke("hi", config={"callbacks": [handler], "metadata": {
                "user_id": "bob", "ls_max_tokens": 5}})
    bob_calls = model.calls - before
    assert 0 < bob_calls < 1_000
    assert [row.status for row in engine.usage(user_id="bob")][-1] == "blocked"
    assert sum(row.cost_nanos for row in engine.usage(user_id="bob", status="ok")) \
        <= 100_000
    for _ in range(LEASE_AFTER + 2):  # (reading rows flushed the leases: leased anew)
        model.invoke("hi", config={"callbacks": [handler], "metadata": {"user_id": "alice"}})
    assert lane_admits[-1] is True  # alice goes on in her lane


def test_a_stream_admitted_in_a_lane_is_still_cut_when_its_budget_runs_out(
        engine, usage_model, lane_admits):
    engine.add_budget(Budget(name="alice tokens", limit=2_000, unit="tokens", scope="user",
                             match="alice", stop_streams=True, require_approval=False))
    model = usage_model(usage=SMALL, reply=" ".join(["word"] * 3_000))
    handler = BudgetkitCallbackHandler(engine, user_id="alice")
    # Within their worst case (the prompt "hi" is 8 tokens, 2 may be output): a call that
    # is billed more than it reserved could push the window past its limit by the excess.
    short = usage_model(usage={"input_tokens": 8, "output_tokens": 2, "total_tokens": 10})
    for _ in range(LEASE_AFTER + 2):
        short.invoke("hi", config={"callbacks": [handler], "metadata": {"ls_max_tokens": 2}})
    received = 0
    with pytest.raises(BudgetExceeded):
        for _chunk in model.stream("hi", config={"callbacks": [handler],
                                                 "metadata": {"ls_max_tokens": 2}}):
            received += 1
    assert lane_admits[-1] is True  # the stream was admitted in the lane
    assert 500 < received < 3_000  # it streamed on the window's room, then was cut
    row = engine.usage(status="error")[-1]
    assert row.error_type == "BudgetExceeded"
    (status,) = engine.budget_status("alice tokens")
    # the provider billed the token whose arrival cut the stream, nothing after it
    assert status.used == sum(r.total_tokens for r in engine.usage()) <= 2_000 + 1
    assert status.reserved == 0


def test_the_lane_prompt_bound_is_never_below_the_count(engine):
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

    from langchain_budgetkit._messages import prompt_tokens_bound, to_openai_messages

    texts = ["", "hi", "Où est ma commande ? 🚚", "数据" * 50, "a" * 3_000,
             " ".join(["token"] * 400), "\n\n\t  spaced  \n", "日本語のテキスト" * 20]
    for model in ("gpt-4o-mini", "gpt-4", "claude-3-5-sonnet-20241022"):
        for index, text in enumerate(texts):
            prompt = [SystemMessage(texts[index - 1]), HumanMessage(text, name="ana"),
                      AIMessage(text[::-1]), HumanMessage(text)]
            exact = engine.count_message_tokens(to_openai_messages(prompt), model)
            assert prompt_tokens_bound(prompt) >= exact, (model, text[:20])
    call = AIMessage("", tool_calls=[{"name": "lookup", "args": {"q": "x"}, "id": "c1"}])
    assert prompt_tokens_bound([HumanMessage("hi"), call]) is None  # counted instead
    assert prompt_tokens_bound([ToolMessage("42", tool_call_id="c1")]) is None
    assert prompt_tokens_bound([HumanMessage([{"type": "text", "text": "hi"}])]) is None


def test_the_async_handler_admits_in_lanes_too(engine, usage_model, lane_admits):
    import asyncio

    from langchain_budgetkit import AsyncBudgetkitCallbackHandler

    engine.add_budget(Budget(name="day", limit=100.0))
    model = usage_model(usage=SMALL)
    handler = AsyncBudgetkitCallbackHandler(engine, user_id="alice")

    async def main() -> None:
        for _ in range(LEASE_AFTER + 40):
            await model.ainvoke("hi", config={"callbacks": [handler]})

    asyncio.run(main())
    assert sum(lane_admits) >= 30
    rows = engine.usage()
    assert len(rows) == LEASE_AFTER + 40 and {row.user_id for row in rows} == {"alice"}
    (status,) = engine.budget_status("day")
    assert status.used == pytest.approx(sum(row.cost_nanos for row in rows) / 1e9)
    assert status.reserved == 0
