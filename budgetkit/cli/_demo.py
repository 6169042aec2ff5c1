"""``budgetkit demo``: a realistic offline workload, then the report.

A few hundred LangChain calls from several users over the last two weeks, through a local
OpenAI-compatible server (:class:`budgetkit.testing.FakeOpenAIServer`: no network, no key):

- FAQ questions go through ``prompt | ChatOpenAI(gpt-4o-mini) | parser``; analysis, code
  and batch work through a ``RoutedChatModel`` whose router picks gpt-4o for reasoning,
  gpt-4.1-mini for code and gpt-4o-mini for the rest (it meters its inner calls itself,
  with the route reason);
- ``BudgetkitCallbackHandler`` is attached to every call: it records (and budget-checks)
  the plain model's calls and leaves the routed model's, which carry its markers, alone;
  ``BudgetkitCache`` answers repeated questions for free (one ``cached`` row each);
- ``MeteredEmbeddings`` meters document ingestion;
- budgets: a per-user daily limit (the router steps down a tier as a user nears it; one
  heavy user's burst on a model pinned to gpt-4o is stopped, a lead approves two more
  cents and the retry goes through), a team daily budget and a monthly one; alerts fire;
- five days ago a runaway batch job spends far more than usual: the anomaly report shows it.

Rows go to ``--db`` when it is given, else to a fresh SQLite file in a new temporary folder
(never to the user's own ledger, ``~/.budgetkit/`` or ``BUDGETKIT_DB``); the budgets are
written to ``budgets.toml`` next to a SQLite database when none is there, so
``budgetkit serve`` shows the same gauges. Both paths are printed. Each stage shows its
progress on stderr (a bar on a terminal, one line per stage otherwise, nothing with
``--quiet``). Needs ``langchain-openai``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import random
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["run_demo", "DEMO_BUDGETS_TOML"]

DEMO_BUDGETS_TOML = """\
# Budgets of `budgetkit demo` (edit freely; budgetkit reads budgets.toml next to its database)
[[budget]]
name = "demo-per-user-daily"
scope = "user"
period = "day"
limit = 0.02
description = "each user: two cents a day"

[[budget]]
name = "demo-team-daily"
period = "day"
limit = 0.40

[[budget]]
name = "demo-monthly"
period = "month"
limit = 5.00
"""

FAQ = [
    "How do I reset my password?", "What are your opening hours?",
    "How can I change my billing address?", "Do you ship to Canada?",
    "How do I cancel my subscription?", "Where can I download my invoices?",
    "Is there a student discount?", "How do I enable two-factor authentication?",
]
ANALYSIS = [
    "Analyze the quarterly churn figures below, explain the three most likely causes step by "
    "step, compare them with last year's trend and recommend measures with expected impact. ",
    "Review the architecture of our order pipeline: the queue, the payment service and the "
    "ledger. Identify failure modes, justify each with evidence, and propose a migration plan. ",
    "Write a Python function that merges overlapping booking intervals, handles time zones "
    "and open-ended intervals, and include unit tests covering the edge cases. ",
]
CONTEXT = ("Context: revenue grew 4% while churn rose from 2.1% to 3.4%; support tickets "
           "about billing doubled; the new onboarding flow shipped in week 6. ") * 6
DOCUMENTS = [f"Policy document {n}: refunds, shipping, warranty and privacy terms. " * 20
             for n in range(12)]


def _reply(body: Mapping[str, Any]) -> str:
    """A deterministic answer whose length follows the question's weight."""
    messages = body.get("messages") or [{"content": body.get("prompt", "")}]
    last = str(messages[-1].get("content", ""))
    seed = int(hashlib.sha256(last.encode()).hexdigest()[:8], 16)
    sentences = 2 + seed % 3 if len(last) < 300 else 14 + seed % 8
    return " ".join(f"Point {i + 1}: here is a considered answer with specific detail."
                    for i in range(sentences))


class _DemoClock:
    """Stamps each call at a chosen moment of the last two weeks (never in the future)."""

    def __init__(self) -> None:
        self.at: dt.datetime | None = None

    def __call__(self) -> dt.datetime:
        now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        return now if self.at is None or self.at > now else self.at


def _plan(calls: int, users: list[str], rng: random.Random) -> list[dict[str, Any]]:
    """Who asks what, when: growing daily traffic, today busiest, a spike 5 days ago."""
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    weights = [1.0 + 0.15 * d for d in range(14)]  # day 0 = 13 days ago ... day 13 = today
    weights[13] *= 2.5
    total = sum(weights)
    spike_calls = max(6, calls // 10)
    plan: list[dict[str, Any]] = []
    for day, weight in enumerate(weights):
        count = max(1, round((calls - spike_calls) * weight / total))
        start = dt.datetime.combine((now - dt.timedelta(days=13 - day)).date(), dt.time(8))
        end = start + dt.timedelta(hours=11)
        if day == 13:  # today: the hours so far (never in the future)
            end = now - dt.timedelta(seconds=30)
            start = max(end - dt.timedelta(hours=11),
                        dt.datetime.combine(now.date(), dt.time()))
        for _ in range(count):
            when = start + (end - start) * rng.random()
            kind = rng.choices(["faq", "analysis", "embed"], weights=[6, 3, 1])[0]
            user = rng.choice(users)
            if day == 13 and kind == "analysis" and rng.random() < 0.5:
                user = users[-1]  # today one user runs many heavy analyses: a budget stops it
            plan.append({"when": when, "user": user, "kind": kind})
    spike_day = dt.datetime.combine((now - dt.timedelta(days=5)).date(), dt.time(2))
    plan += [{"when": spike_day + dt.timedelta(minutes=3 * n), "user": None,
              "kind": "batch"} for n in range(spike_calls)]  # a service account: no user
    # the heavy user's burst just now, on a model pinned to gpt-4o (no router to step down
    # under budget pressure): it runs into the per-user stop
    plan += [{"when": now - dt.timedelta(minutes=12 - n), "user": users[-1], "kind": "pinned"}
             for n in range(10)]
    plan.sort(key=lambda item: item["when"])
    return plan  # about ``calls`` items (rounding per day)


def _budget_file(engine: Any, *, write: bool) -> tuple[Path | None, bool]:
    """The budgets.toml next to a SQLite database: (path, whether the demo wrote it)."""
    url = engine.store.url
    if not url.startswith("sqlite:///"):
        return None, False
    path = Path(url[len("sqlite:///"):]).parent / "budgets.toml"
    if path.exists() or not write:
        return path, False
    path.write_text(DEMO_BUDGETS_TOML, encoding="utf-8")
    return path, True


def run_demo(db: str | None = None, *, calls: int = 300, users: int = 5, seed: int = 7,
             as_json: bool = False, quiet: bool = False) -> int:
    """Run the demo workload into ``db`` (default: a new temporary SQLite file) and print
    the report; returns an exit code."""
    from ._progress import Progress

    def stage(label: str, total: int | None = None, unit: str = "") -> Progress:
        return Progress(label, total, unit=unit, quiet=quiet, delay=0)

    if db is None:
        db = str(Path(tempfile.mkdtemp(prefix="budgetkit-demo-")) / "demo.db")
        where = f"a new temporary ledger, {db} (--db FILE writes elsewhere)"
    else:
        where = db
    if not quiet:
        print(f"budgetkit demo: writing to {where}", file=sys.stderr)
    loading = stage("loading LangChain and the local OpenAI-compatible server")
    try:
        from langchain_budgetkit import (
            BudgetkitCache,
            BudgetkitCallbackHandler,
            MeteredEmbeddings,
            RoutedChatModel,
        )
        from langchain_core.output_parsers import StrOutputParser
        from langchain_core.prompts import ChatPromptTemplate
        from langchain_openai import ChatOpenAI, OpenAIEmbeddings
        from pydantic import SecretStr
    except ImportError as exc:
        loading.close()
        print(f"budgetkit demo needs LangChain's OpenAI client and the LangChain adapter: "
              f"pip install langchain-openai langchain-budgetkit ({exc.name} is missing)",
              file=sys.stderr)
        return 3

    from budgetkit import BudgetExceeded, Engine, Router
    from budgetkit.budgets import load_budgets
    from budgetkit.reports import summarize
    from budgetkit.testing import FakeOpenAIServer

    from ._render import render_summary

    # alerts and budget stops are shown in the report, not as log lines mid-run
    silenced = {name: logging.getLogger(name).level
                for name in ("budgetkit", "budgetkit.alerts", "langchain_core.callbacks.manager")}
    for name in silenced:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    rng = random.Random(seed)
    names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
    people = (names * (users // len(names) + 1))[:users] if users <= len(names) else [
        f"user-{n}" for n in range(users)]
    clock = _DemoClock()
    engine = Engine(db=db, clock=clock, project="support-bot")
    counts = {"answered": 0, "blocked": 0, "embedded": 0}
    try:
        hits_before = summarize(engine, group_by=(), days=3660).totals.cache_hits
        budget_path, wrote = _budget_file(engine, write=True)
        if wrote:
            engine.load_budgets(budget_path, replace=True)
        else:  # keep the user's own budgets.toml; the demo budgets live in this run only
            for budget in _demo_budgets(load_budgets):
                engine.add_budget(budget, replace=True)
        with FakeOpenAIServer(reply=_reply) as server:
            cache = BudgetkitCache(engine)
            common: dict[str, Any] = {"base_url": server.base_url,
                                      "api_key": SecretStr("demo-key"),
                                      "max_retries": 0, "max_tokens": 400}
            models = {name: ChatOpenAI(model=name, **common)
                      for name in ("gpt-4o-mini", "gpt-4.1-mini", "gpt-4o")}
            router = Router({"low": "gpt-4o-mini", "medium": "gpt-4.1-mini", "high": "gpt-4o"},
                            engine=engine)
            routed = RoutedChatModel(models=models, router=router, engine=engine,
                                     max_tokens=400, cache=cache)
            prompt = ChatPromptTemplate.from_messages(
                [("system", "You are the support assistant of an online shop. Be precise."),
                 ("human", "{question}")])
            parser = StrOutputParser()
            chains = {"faq": prompt | ChatOpenAI(model="gpt-4o-mini", cache=cache, **common)
                      | parser,
                      "pinned": prompt | ChatOpenAI(model="gpt-4o", **common) | parser,
                      "routed": prompt | routed | parser}
            handler = BudgetkitCallbackHandler(engine)
            embedder = OpenAIEmbeddings(model="text-embedding-3-small", base_url=server.base_url,
                                        api_key=SecretStr("demo-key"),
                                        check_embedding_ctx_length=False)
            plan = _plan(calls, people, rng)
            loading.close()
            with stage("demo calls", len(plan), unit="calls") as progress:
                for index, item in enumerate(plan, 1):
                    clock.at = item["when"]
                    _one_call(item, chains, handler, embedder, engine, rng, counts,
                              MeteredEmbeddings, BudgetExceeded)
                    progress.update(index)
            # a lead approves the stopped user for two more cents today; the retry goes through
            clock.at = None
            heavy = people[-1]
            approval = None
            if counts["blocked"]:
                approval = engine.approve("demo-per-user-daily", key=heavy, extra=0.02, by="demo-lead",
                               reason="month-end analysis")
                retry = {"when": clock(), "user": heavy, "kind": "pinned"}
                plan.append(retry)
                answered_before = counts["answered"]
                _one_call(retry, chains, handler, embedder, engine, rng, counts,
                          MeteredEmbeddings, BudgetExceeded)
                counts["retry_answered"] = counts["answered"] - answered_before
        with stage("writing the ledger and the report"):
            engine.flush()
            data, text = render_summary(engine, {"days": 14})
            counts["cache_hits"] = (summarize(engine, group_by=(), days=3660).totals.cache_hits
                                    - hits_before)  # this run's, also with earlier rows
        summary = {"calls_planned": len(plan), **counts, "database": engine.store.url,
                   "budgets_file": str(budget_path) if budget_path else None}
        if as_json:
            print(json.dumps({"demo": summary, "report": data}, indent=2, default=str))
        else:
            print(text)
            print()
            from budgetkit.reports import alert_rows, budget_rows

            from ._render import budget_table
            print("Budgets now")
            print(budget_table(budget_rows(engine)))
            recent = alert_rows(engine, limit=5)
            if recent:
                print("\nRecent alerts")
                for alert in recent:
                    print(f"  {alert['created_at'][:16].replace('T', ' ')}  {alert['message']}")
            if approval is not None:
                print(f"\nApproval: {approval.approved_by} lifted the stop of "
                      f"{approval.budget!r} for {approval.scope_key} by "
                      f"${approval.extra or 0:.2f} ({approval.reason}); the retry was "
                      + ("answered" if counts.get("retry_answered") else "stopped again"))
            print(f"\nDemo: {counts['answered']} answers ({counts['cache_hits']} from the cache),"
                  f" {counts['embedded']} embedding calls, {counts['blocked']} calls stopped "
                  f"by a budget, into {engine.store.url}")
            if budget_path is not None:
                print(f"Budgets: {budget_path}" + ("" if wrote else " (yours, left as it was)"))
            print(f"Next: budgetkit report anomalies --db {db}   |   budgetkit serve --db {db}")
        return 0
    finally:
        loading.close()
        engine.close()
        for name, level in silenced.items():
            logging.getLogger(name).setLevel(level)


def _demo_budgets(load: Any) -> list[Any]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "budgets.toml"
        path.write_text(DEMO_BUDGETS_TOML, encoding="utf-8")
        budgets: list[Any] = load(path)
        return budgets


def _one_call(item: dict[str, Any], chains: Any, handler: Any, embedder: Any, engine: Any,
              rng: random.Random, counts: dict[str, int], metered: Any,
              budget_exceeded: type[BaseException]) -> None:
    user, kind = item["user"], item["kind"]
    if kind == "embed":
        docs = rng.sample(DOCUMENTS, 3)
        metered(embedder, engine, user_id=user,
                model="text-embedding-3-small").embed_documents(docs)
        counts["embedded"] += 1
        return
    config: dict[str, Any] = {"tags": [kind], "callbacks": [handler]}
    if kind == "faq":
        question, task, operation = rng.choice(FAQ), "factual_qa", "chat_completion"
    elif kind == "batch":
        question = rng.choice(ANALYSIS) + CONTEXT * 3 + f" Batch item {rng.randint(1, 10**6)}."
        task, operation = "multi_step_analysis", "text_generation"
    else:
        index = 0 if kind == "pinned" else rng.randrange(len(ANALYSIS))
        question = ANALYSIS[index] + CONTEXT + f" Ticket {rng.randint(1, 10**6)}."
        task = "code_generation" if index == 2 else "complex_reasoning"
        operation = "rag_output"
    config["metadata"] = {"user_id": user, "operation_type": operation, "task_type": task,
                          "session_id": f"{user or 'batch'}-{item['when']:%Y%m%d}"}
    if user is None:
        config["metadata"]["project"] = "nightly-batch"
    try:
        chain = chains[kind] if kind in ("faq", "pinned") else chains["routed"]
        chain.invoke({"question": question}, config=config)
        counts["answered"] += 1
    except budget_exceeded:
        counts["blocked"] += 1
