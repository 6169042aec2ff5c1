"""Budgets held by leases, through the real langchain-openai client and a local
OpenAI-compatible server: busy threads spend up to the limit, never past it, and every call
a budget stopped never reached the server."""

from __future__ import annotations

import threading

from langchain_openai import ChatOpenAI

from budgetkit import Budget, BudgetExceeded, Engine
from budgetkit.budgets import LEASE_AFTER
from budgetkit.testing import FakeOpenAIServer
from langchain_budgetkit import BudgetkitCallbackHandler


def test_busy_threads_spend_up_to_the_limit_and_stopped_calls_never_reach_the_server(tmp_path):
    limit = 0.05
    with FakeOpenAIServer(prompt_tokens=400, completion_tokens=100) as server, \
            Engine(db=str(tmp_path / "leases.db")) as engine:
        engine.add_budget(Budget(name="day", limit=limit))
        handler = BudgetkitCallbackHandler(engine, user_id="ana")
        model = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="test-key",
                           max_retries=0, max_tokens=200)
        answered = [0]
        stopped = [0]
        leased = [0]
        lock = threading.Lock()
        desk = engine._budgets._desk
        take_all = desk.take_all

        def counted_take_all(*args, **kwargs):
            leases = take_all(*args, **kwargs)
            if leases is not None:
                with lock:
                    leased[0] += 1
            return leases

        desk.take_all = counted_take_all

        def worker() -> None:
            while True:
                try:
                    model.invoke("What does our refund policy say?",
                                 config={"callbacks": [handler]})
                except BudgetExceeded as blocked:
                    with lock:
                        stopped[0] += 1
                    if blocked.reserved == 0:
                        return
                    engine.flush()  # others' calls in flight: their actuals may leave room
                    continue
                with lock:
                    answered[0] += 1

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        engine.flush()
        ok_rows = engine.usage(status="ok")
        spent = sum(row.cost_nanos for row in ok_rows)
        (status,) = engine.budget_status("day")
    # gpt-4o: 400 in x $2.50 + 100 out x $10 per million = $0.002 a call; worst case (200
    # max output) $0.003. The first calls were reserved one by one, later ones from leases.
    assert answered[0] > LEASE_AFTER and stopped[0] >= 4
    assert leased[0] > 0  # calls were admitted from leases, not only one by one
    assert server.request_count == answered[0] == len(ok_rows)  # no stopped call was sent
    assert spent <= limit * 1e9
    assert limit * 1e9 - spent < 3_000_000  # not more than one worst case left unused
    assert status.used == spent / 1e9 and status.reserved == 0
