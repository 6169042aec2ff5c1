"""Streams whose chunks report running usage totals (LangChain #30429) are recorded with the
last totals, streams with per-chunk usage (OpenAI, Anthropic) with their sum: the handler
and RoutedChatModel, with fake streaming models scripted chunk by chunk like the providers,
and the real ChatOpenAI client reading a vLLM-style ``continuous_usage_stats`` stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.chat_models import generate_from_stream
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI

from budgetkit import Engine
from langchain_budgetkit import BudgetkitCallbackHandler, RoutedChatModel
from langchain_budgetkit._stream_usage import usage_of_running_totals

MODEL = "gpt-4o-mini"
PROMPT_TOKENS = 35
PIECES = ["The", " capital", " of", " France", " is", " Paris."]
OUTPUT_TOKENS = len(PIECES)  # one token per piece, as the scripts below report


def usage(input_tokens: int, output_tokens: int, **details: Any) -> dict[str, Any]:
    result: dict[str, Any] = {"input_tokens": input_tokens, "output_tokens": output_tokens,
                              "total_tokens": input_tokens + output_tokens}
    result.update(details)
    return result


# Each script: the chunks a provider's LangChain integration yields, (text, usage_metadata).
SCRIPTS: dict[str, list[tuple[str, dict[str, Any] | None]]] = {
    # vLLM continuous_usage_stats, llama.cpp forks, lmdeploy, Gemini's OpenAI endpoint: the
    # running total in every chunk, repeated on the finish chunk and the usage chunk
    "running totals": [("", usage(PROMPT_TOKENS, 0))]
    + [(piece, usage(PROMPT_TOKENS, i)) for i, piece in enumerate(PIECES, start=1)]
    + [("", usage(PROMPT_TOKENS, OUTPUT_TOKENS))] * 2,
    # the #30429 report: the prompt repeated in every chunk, output per chunk
    "repeated prompt, output per chunk": [("", usage(PROMPT_TOKENS, 0))]
    + [(piece, usage(PROMPT_TOKENS, 1)) for piece in PIECES],
    # OpenAI with stream_usage: one usage chunk at the end
    "openai": [(piece, None) for piece in PIECES] + [("", usage(PROMPT_TOKENS, OUTPUT_TOKENS))],
    # Anthropic: the prompt in the first chunk, the output in the last
    "anthropic": [("", usage(PROMPT_TOKENS, 0))] + [(piece, None) for piece in PIECES]
    + [("", usage(0, OUTPUT_TOKENS))],
    # a server that repeats its final snapshot (finish chunk, then usage chunk)
    "repeated final snapshot": [(piece, None) for piece in PIECES]
    + [("", usage(PROMPT_TOKENS, OUTPUT_TOKENS))] * 2,
}


class ScriptedStreamChat(BaseChatModel):
    """Streams ``script`` chunk by chunk; ``invoke`` with ``streaming=True`` streams too."""

    model_name: str = MODEL
    script: list[tuple[str, dict[str, Any] | None]]
    streaming: bool = False

    @property
    def _llm_type(self) -> str:
        return "scripted-stream-chat"

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        for text, chunk_usage in self.script:
            yield ChatGenerationChunk(message=AIMessageChunk(
                content=text, usage_metadata=chunk_usage,  # type: ignore[arg-type]
                response_metadata={"model_name": self.model_name}))

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None,
                  **kwargs: Any) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))


def run_stream(model: Any, mode: str, config: dict[str, Any]) -> tuple[str, Any]:
    """(text, the summed message LangChain's chunk addition gives) for one call."""
    if mode == "stream":
        chunks = list(model.stream("Capital of France?", config=config))
    elif mode == "astream":
        async def consume() -> list[Any]:
            return [chunk async for chunk in model.astream("Capital of France?",
                                                           config=config)]
        chunks = asyncio.run(consume())
    else:  # invoke of a streaming model: LangChain streams and sums inside
        message = model.invoke("Capital of France?", config=config)
        return message.content, message
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total.content, total


@pytest.mark.parametrize("mode", ["stream", "astream", "invoke"])
@pytest.mark.parametrize("shape", list(SCRIPTS))
def test_handler_records_the_true_usage_of_every_stream_shape(engine: Engine, shape, mode):
    handler = BudgetkitCallbackHandler(engine)
    check_stream_shape(engine, handler, shape, mode)


@pytest.mark.parametrize("shape", list(SCRIPTS))
def test_async_handler_records_the_true_usage_of_every_stream_shape(engine: Engine, shape):
    from langchain_budgetkit import AsyncBudgetkitCallbackHandler

    check_stream_shape(engine, AsyncBudgetkitCallbackHandler(engine), shape, "astream")


def check_stream_shape(engine: Engine, handler: Any, shape: str, mode: str) -> None:
    model = ScriptedStreamChat(script=SCRIPTS[shape], streaming=True)
    text, summed = run_stream(model, mode, {"callbacks": [handler]})
    assert text == "".join(PIECES)
    [row] = engine.usage()
    assert (row.input_tokens, row.output_tokens) == (PROMPT_TOKENS, OUTPUT_TOKENS)
    assert row.usage_source == "provider"
    assert row.cost_nanos == engine.catalog.get(MODEL).cost_nanos(PROMPT_TOKENS, OUTPUT_TOKENS)
    if shape in ("running totals", "repeated prompt, output per chunk",
                 "repeated final snapshot"):  # what LangChain's own sum says (the bug)
        assert summed.usage_metadata["input_tokens"] > PROMPT_TOKENS


def test_running_totals_keep_cache_reads_and_reasoning(engine: Engine) -> None:
    script = [(piece, usage(PROMPT_TOKENS, i + 2, input_token_details={"cache_read": 20},
                            output_token_details={"reasoning": 2}))
              for i, piece in enumerate(PIECES, start=1)]
    handler = BudgetkitCallbackHandler(engine)
    list(ScriptedStreamChat(script=script).stream("Capital?", config={"callbacks": [handler]}))
    [row] = engine.usage()
    assert (row.input_tokens, row.cached_input_tokens) == (PROMPT_TOKENS, 20)
    assert (row.output_tokens, row.reasoning_tokens) == (OUTPUT_TOKENS + 2, 2)
    assert row.cost_nanos == engine.catalog.get(MODEL).cost_nanos(
        PROMPT_TOKENS, OUTPUT_TOKENS + 2, cached_input_tokens=20)
    assert handler.input_tokens == PROMPT_TOKENS  # the running totals agree with the row


def test_a_chain_stream_with_running_totals(engine: Engine) -> None:
    handler = BudgetkitCallbackHandler(engine)
    chain = ChatPromptTemplate.from_messages([("human", "{question}")]) | ScriptedStreamChat(
        script=SCRIPTS["running totals"])
    "".join(chunk.content for chunk in chain.stream({"question": "Capital of France?"},
                                                    config={"callbacks": [handler]}))
    [row] = engine.usage()
    assert (row.input_tokens, row.output_tokens) == (PROMPT_TOKENS, OUTPUT_TOKENS)


@pytest.mark.parametrize("mode", ["stream", "astream"])
@pytest.mark.parametrize("shape", ["running totals", "openai"])
def test_routed_model_settles_inner_streams_with_the_true_usage(engine: Engine, shape, mode):
    inner = ScriptedStreamChat(script=SCRIPTS[shape])
    model = RoutedChatModel(models={MODEL: inner}, engine=engine)
    text, _ = run_stream(model, mode, {})
    assert text == "".join(PIECES)
    [row] = engine.usage()
    assert (row.input_tokens, row.output_tokens) == (PROMPT_TOKENS, OUTPUT_TOKENS)


# ------------------------------------------------------------- the real ChatOpenAI client

def continuous_usage_stream(reply_pieces: list[str], prompt_tokens: int) -> bytes:
    """The SSE body of a vLLM server asked for ``continuous_usage_stats``: usage on every
    chunk, the running total so far."""
    head = {"id": "chatcmpl-vllm", "object": "chat.completion.chunk", "created": 1,
            "model": MODEL}
    events = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}],
               "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0,
                         "total_tokens": prompt_tokens}}]
    for i, piece in enumerate(reply_pieces, start=1):
        events.append({**head, "choices": [{"index": 0, "delta": {"content": piece},
                                            "finish_reason": None}],
                       "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": i,
                                 "total_tokens": prompt_tokens + i}})
    final = {"prompt_tokens": prompt_tokens, "completion_tokens": len(reply_pieces),
             "total_tokens": prompt_tokens + len(reply_pieces)}
    events.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "usage": final})
    events.append({**head, "choices": [], "usage": final})
    return b"".join(f"data: {json.dumps(event)}\n\n".encode() for event in events) + \
        b"data: [DONE]\n\n"


def vllm_client(body: bytes) -> ChatOpenAI:
    def reply(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    transport = httpx.MockTransport(reply)
    return ChatOpenAI(model=MODEL, base_url="http://vllm.test/v1", api_key="test-key",
                      max_retries=0, stream_usage=True,
                      http_client=httpx.Client(transport=transport),
                      http_async_client=httpx.AsyncClient(transport=transport))


@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_chat_openai_over_a_continuous_usage_stream(engine: Engine, mode) -> None:
    handler = BudgetkitCallbackHandler(engine)
    client = vllm_client(continuous_usage_stream(PIECES, PROMPT_TOKENS))
    text, summed = run_stream(client, mode, {"callbacks": [handler]})
    assert text == "".join(PIECES)
    assert summed.usage_metadata["input_tokens"] == PROMPT_TOKENS * (len(PIECES) + 3)
    [row] = engine.usage()
    assert (row.input_tokens, row.output_tokens) == (PROMPT_TOKENS, OUTPUT_TOKENS)


def test_chat_openai_over_an_openai_stream_is_unchanged(engine: Engine, fake_openai) -> None:
    handler = BudgetkitCallbackHandler(engine)
    client = ChatOpenAI(model=MODEL, base_url=fake_openai.base_url, api_key="test-key",
                        max_retries=0, stream_usage=True)
    "".join(chunk.content for chunk in client.stream("Hi", config={"callbacks": [handler]}))
    [row] = engine.usage()
    [served] = fake_openai.usages
    assert (row.input_tokens, row.output_tokens) == (served["prompt_tokens"],
                                                     served["completion_tokens"])


# ------------------------------------------------------------- the detection on its own

@pytest.mark.parametrize("chunks, expected", [
    ([], None),
    ([(usage(10, 3), False)], None),                                    # one usage chunk
    ([(usage(10, 0), False), (usage(0, 4), False)], None),              # Anthropic
    ([(usage(10, 1), True), (usage(10, 2), True), (usage(10, 3), True)], (10, 3)),
    ([(usage(10, 0), False), (usage(10, 1), True), (usage(10, 1), True)], (10, 2)),
    ([(usage(10, 2), True), (usage(10, 1), True), (usage(10, 3), True)], (10, 6)),  # deltas
    ([(usage(10, 3), True), (usage(12, 4), True)], (12, 4)),            # prompt grew
    ([(usage(12, 3), True), (usage(10, 4), True)], None),              # prompt shrank
])
def test_running_totals_detection(chunks, expected) -> None:
    result = usage_of_running_totals(chunks)
    if expected is None:
        assert result is None
    else:
        assert (result["input_tokens"], result["output_tokens"]) == expected
        assert result["total_tokens"] == sum(expected)


# ------------------------------------- asking OpenAI-compatible streams for their usage

def compatible_client(server: Any, **kwargs: Any) -> ChatOpenAI:
    """ChatOpenAI on a custom base_url: LangChain leaves stream_usage unset there."""
    return ChatOpenAI(model=MODEL, base_url=server.base_url, api_key="test-key", max_retries=0,
                      **kwargs)


def stream_routed(model: RoutedChatModel, mode: str) -> str:
    if mode == "stream":
        return "".join(chunk.content for chunk in model.stream("Hi"))

    async def consume() -> str:
        return "".join([chunk.content async for chunk in model.astream("Hi")])
    return asyncio.run(consume())


@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_routed_model_asks_a_compatible_stream_for_its_usage(engine: Engine, fake_openai,
                                                             mode: str) -> None:
    assert compatible_client(fake_openai).stream_usage is None  # LangChain would not ask
    model = RoutedChatModel(models={MODEL: compatible_client(fake_openai)}, engine=engine)
    assert stream_routed(model, mode) == fake_openai.reply
    [request] = fake_openai.requests
    assert request.body["stream_options"] == {"include_usage": True}
    [row] = engine.usage()
    [served] = fake_openai.usages
    assert row.usage_source == "provider"
    assert (row.input_tokens, row.output_tokens) == (served["prompt_tokens"],
                                                     served["completion_tokens"])
    assert "usage_estimate_reason" not in row.metadata_


@pytest.mark.parametrize(("client_kwargs", "server_reports", "asked", "reason"), [
    ({"stream_usage": False}, True, False, "stream_usage=False on the ChatOpenAI"),
    ({}, False, True, "budgetkit asked the ChatOpenAI stream for usage"),
])
def test_routed_stream_estimated_anyway_says_why(engine: Engine, fake_openai, client_kwargs,
                                                 server_reports: bool, asked: bool,
                                                 reason: str) -> None:
    fake_openai.configure(stream_usage=server_reports)
    model = RoutedChatModel(models={MODEL: compatible_client(fake_openai, **client_kwargs)},
                            engine=engine)
    assert stream_routed(model, "stream") == fake_openai.reply
    [request] = fake_openai.requests
    assert ("stream_options" in request.body) is asked
    [row] = engine.usage()
    assert row.usage_source == "estimated"
    assert reason in row.metadata_["usage_estimate_reason"]


def test_caller_choice_of_stream_usage_is_kept(engine: Engine, fake_openai) -> None:
    model = RoutedChatModel(models={MODEL: compatible_client(fake_openai)}, engine=engine)
    "".join(chunk.content for chunk in model.stream("Hi", stream_usage=False))
    [request] = fake_openai.requests
    assert "stream_options" not in request.body
    [row] = engine.usage()
    assert row.usage_source == "estimated"
    assert "caller's stream_usage" in row.metadata_["usage_estimate_reason"]


def test_handler_row_says_how_to_get_a_compatible_streams_usage(engine: Engine,
                                                                fake_openai) -> None:
    handler = BudgetkitCallbackHandler(engine)
    client = compatible_client(fake_openai)
    text = "".join(chunk.content for chunk in client.stream("Hi", config={"callbacks": [handler]}))
    assert text == fake_openai.reply
    engine.flush()
    [row] = engine.usage()
    assert row.usage_source == "estimated"
    assert "stream_usage=True" in row.metadata_["usage_estimate_reason"]
    # the same client asked for usage: the provider's figures, no reason
    fake_openai.reset()
    client = compatible_client(fake_openai, stream_usage=True)
    "".join(chunk.content for chunk in client.stream("Hi", config={"callbacks": [handler]}))
    engine.flush()
    latest = max(engine.usage(), key=lambda r: r.created_at)
    assert latest.usage_source == "provider" and "usage_estimate_reason" not in latest.metadata_
