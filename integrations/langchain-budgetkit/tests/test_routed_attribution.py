"""RoutedChatModel rows carry what BudgetkitCallbackHandler would give them: the invoking
run's metadata (operation_type, user, session, project, task type, request id, the rest as
row metadata), its tags, the handler's defaults, and run ids (inner run, routed run as
parent, the chain's root), on invoke / ainvoke / stream / astream, with real ChatOpenAI
clients against the local fake OpenAI server and a real SQLite ledger."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tracers.run_collector import RunCollectorCallbackHandler
from langchain_openai import ChatOpenAI

from budgetkit import Cascade, Engine, MinLength, Router
from langchain_budgetkit import AsyncBudgetkitCallbackHandler, BudgetkitCallbackHandler
from langchain_budgetkit import RoutedChatModel
from langchain_budgetkit._routed import ROUTED_MARKER

CHEAP, STRONG = "gpt-4o-mini", "gpt-4o"
RUN_METADATA = {"operation_type": "rag_output", "user_id": "alice", "session_id": "s-42",
                "project": "support-bot", "task_type": "summarization",
                "request_id": "req-7", "ticket": 1234}


class StartRecorder(BaseCallbackHandler):
    """The run id, parent and metadata of every chat model run that starts."""

    def __init__(self) -> None:
        self.starts: list[dict[str, Any]] = []

    def on_chat_model_start(self, serialized, messages, *, run_id, parent_run_id=None,
                            metadata=None, **kwargs):
        self.starts.append({"run_id": str(run_id), "parent_run_id": str(parent_run_id),
                            "routed": bool((metadata or {}).get(ROUTED_MARKER))})

    def routed_and_inner(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        [routed] = [start for start in self.starts if start["routed"]]
        return routed, [start for start in self.starts if not start["routed"]]


def routed_model(server, engine: Engine, **kwargs: Any) -> RoutedChatModel:
    clients = {name: ChatOpenAI(model=name, base_url=server.base_url, api_key="test-key",
                                max_retries=0, stream_usage=True) for name in (CHEAP, STRONG)}
    kwargs.setdefault("router", Router({"low": CHEAP, "high": STRONG}))
    return RoutedChatModel(models=clients, engine=engine, **kwargs)


def rag_chain(model: RoutedChatModel) -> Any:
    prompt = ChatPromptTemplate.from_messages([("system", "Answer from the context."),
                                               ("human", "{question}")])
    return prompt | model | StrOutputParser()


@pytest.mark.parametrize("mode", ["invoke", "ainvoke", "stream", "astream"])
def test_rows_carry_the_runs_metadata_tags_and_run_ids(engine, fake_openai, mode) -> None:
    handler = BudgetkitCallbackHandler(engine, user_id="nobody", tags=["handler-tag"],
                                       metadata={"team": "search"})
    recorder = StartRecorder()
    root = uuid.uuid4()
    config = {"callbacks": [handler, recorder], "metadata": RUN_METADATA,
              "tags": ["prod"], "run_id": root}
    chain = rag_chain(routed_model(fake_openai, engine))
    question = {"question": "Summarise our refund policy."}
    if mode == "invoke":
        text = chain.invoke(question, config=config)
    elif mode == "ainvoke":
        text = asyncio.run(chain.ainvoke(question, config=config))
    elif mode == "stream":
        text = "".join(chain.stream(question, config=config))
    else:
        async def consume() -> str:
            return "".join([piece async for piece in chain.astream(question, config=config)])
        text = asyncio.run(consume())
    assert text == fake_openai.reply

    [row] = engine.usage()  # the routed model's row only: the handler skipped the inner run
    [usage] = fake_openai.usages
    assert (row.input_tokens, row.output_tokens) == (usage["prompt_tokens"],
                                                     usage["completion_tokens"])
    assert (row.operation_type, row.user_id, row.session_id, row.project, row.task_type,
            row.request_id) == ("rag_output", "alice", "s-42", "support-bot",
                                "summarization", "req-7")
    assert row.metadata_ == {"team": "search", "ticket": 1234, "routed": True}
    assert row.tags[0] == "handler-tag" and "prod" in row.tags
    routed, [inner] = recorder.routed_and_inner()
    assert row.root_run_id == str(root)
    assert row.parent_run_id == routed["run_id"] == inner["parent_run_id"]
    assert row.run_id == inner["run_id"]  # the inner run was started with the row's id
    assert row.route_reason and row.attempt == 1


def test_handler_defaults_fill_what_the_metadata_leaves_out(engine, fake_openai) -> None:
    handler = BudgetkitCallbackHandler(engine, user_id="default-user", project="default-proj",
                                       operation_type="rag_output")
    model = routed_model(fake_openai, engine)
    model.invoke("Hello there", config={"callbacks": [handler],
                                        "metadata": {"user_id": "bob"}})
    model.invoke("Hello again")  # no handler, no metadata: the engine's defaults only
    with_handler, bare = engine.usage()
    assert (with_handler.user_id, with_handler.project, with_handler.operation_type) == (
        "bob", "default-proj", "rag_output")
    assert (bare.user_id, bare.operation_type) == (None, "chat_completion")
    # a routed model invoked on its own is the root of its run
    assert bare.root_run_id == bare.parent_run_id and bare.run_id != bare.parent_run_id


def test_cascade_attempts_are_sibling_runs_of_one_root(engine, fake_openai) -> None:
    fake_openai.configure(reply=lambda body: "ok" if body["model"] == CHEAP
                          else "A long and careful answer that passes the length check.")
    handler = BudgetkitCallbackHandler(engine)
    recorder = StartRecorder()
    model = routed_model(fake_openai, engine, router=None,
                         cascade=Cascade([CHEAP, STRONG], checks=[MinLength(20)]))
    chain = rag_chain(model)
    chain.invoke({"question": "Explain."}, config={
        "callbacks": [handler, recorder], "metadata": {"operation_type": "rag_output"}})
    cheap, strong = engine.usage()
    assert (cheap.model, strong.model, cheap.attempt, strong.attempt) == (CHEAP, STRONG, 1, 2)
    routed, inner = recorder.routed_and_inner()
    assert [row.run_id for row in (cheap, strong)] == [start["run_id"] for start in inner]
    assert cheap.parent_run_id == strong.parent_run_id == routed["run_id"]
    assert cheap.root_run_id == strong.root_run_id != routed["run_id"]
    assert {cheap.operation_type, strong.operation_type} == {"rag_output"}


def test_async_handler_gives_the_same_attribution(engine, fake_openai) -> None:
    handler = AsyncBudgetkitCallbackHandler(engine, project="async-proj")
    root = uuid.uuid4()
    chain = rag_chain(routed_model(fake_openai, engine))
    asyncio.run(chain.ainvoke({"question": "Hi"}, config={
        "callbacks": [handler], "run_id": root, "metadata": {"operation_type": "rag_output"}}))
    [row] = engine.usage()
    assert (row.project, row.operation_type, row.root_run_id) == ("async-proj", "rag_output",
                                                                  str(root))


def test_without_a_budgetkit_handler_a_tracer_gives_the_root(engine, fake_openai) -> None:
    collector = RunCollectorCallbackHandler()  # any LangChain tracer knows the trace id
    chain = rag_chain(routed_model(fake_openai, engine))
    chain.invoke({"question": "Hi"}, config={"callbacks": [collector],
                                             "metadata": {"user_id": "carol"}})
    [row] = engine.usage()
    [chain_run] = [run for run in collector.traced_runs if run.parent_run_id is None]
    assert row.root_run_id == str(chain_run.id) and row.user_id == "carol"
