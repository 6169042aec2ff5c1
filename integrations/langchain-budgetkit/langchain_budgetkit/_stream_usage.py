"""The usage of a streamed call when its chunks report *running totals* (LangChain #30429).

LangChain adds streamed chunks with ``AIMessageChunk.__add__``, which *sums* their
``usage_metadata``. That is right for providers that report per-chunk amounts: OpenAI
(usage once, in the last chunk), Anthropic (input in the first chunk, output in the last).
It overcounts providers that repeat the running total in every chunk: vLLM with
``stream_options.continuous_usage_stats``, llama.cpp forks, lmdeploy, Gemini's
OpenAI-compatible endpoint, and other OpenAI-compatible servers reached through
``ChatOpenAI(base_url=...)``. There every chunk carries the whole prompt (``input_tokens``
35, 35, 35, ...) and the output so far (1, 2, 3, ...), and the sum multiplies both. Some
servers (the #30429 report itself) repeat the prompt but send output per chunk (1, 1, 1).

Reading the chunks' usage in order:

- the prompt is a running total when two or more chunks report a positive
  ``input_tokens`` and those never decrease (no provider splits a prompt across chunks;
  per-chunk providers report it once);
- then the output is a running total when it never decreases *and* grows with every chunk
  that brings new text (a chunk of text is at least one token); otherwise it is per chunk
  and summed. A final snapshot repeated on a text-free chunk (finish chunk, then usage
  chunk) is a running total too.

Anything else is left to LangChain's sum, which is right for it.

Streams that report no usage at all are estimated with the tokenizer. RoutedChatModel asks
OpenAI-compatible inner models for usage (:func:`stream_usage_request`); a callback handler
cannot change the request it observes. Either way an estimated row says why in its metadata
(``usage_estimate_reason``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["ChunkUsage", "usage_of_running_totals", "stream_usage_request",
           "ESTIMATE_REASON_KEY"]

#: One streamed chunk's ``usage_metadata`` and whether the chunk carried new text.
ChunkUsage = tuple[Mapping[str, Any], bool]


def _tokens(usage: Mapping[str, Any], key: str) -> int:
    value = usage.get(key)
    return value if isinstance(value, int) and value > 0 else 0


def _sum_details(usages: Sequence[Mapping[str, Any]], key: str) -> dict[str, int]:
    total: dict[str, int] = {}
    for usage in usages:
        for name, value in (usage.get(key) or {}).items():
            if isinstance(value, int):
                total[name] = total.get(name, 0) + value
    return total


def usage_of_running_totals(chunks: Sequence[ChunkUsage]) -> dict[str, Any] | None:
    """The call's ``usage_metadata`` when ``chunks`` report running totals, else ``None``
    (the chunks' usage is per chunk and LangChain's sum of them is right)."""
    if len(chunks) < 2:
        return None
    with_prompt = [usage for usage, _ in chunks if _tokens(usage, "input_tokens")]
    if len(with_prompt) < 2:
        return None
    prompts = [_tokens(usage, "input_tokens") for usage in with_prompt]
    if any(later < earlier for earlier, later in zip(prompts, prompts[1:])):
        return None
    last_prompt = with_prompt[-1]
    outputs = [_tokens(usage, "output_tokens") for usage, _ in chunks]
    running_output = all(
        later > earlier or (later == earlier and not has_text)
        for earlier, later, has_text in zip(outputs, outputs[1:],
                                            (has_text for _, has_text in chunks[1:])))
    result: dict[str, Any] = {"input_tokens": prompts[-1]}
    input_details = last_prompt.get("input_token_details")
    if input_details:
        result["input_token_details"] = dict(input_details)
    if running_output:
        last = chunks[-1][0]
        result["output_tokens"] = outputs[-1]
        output_details = dict(last.get("output_token_details") or {})
    else:
        result["output_tokens"] = sum(outputs)
        output_details = _sum_details([usage for usage, _ in chunks], "output_token_details")
    if output_details:
        result["output_token_details"] = output_details
    result["total_tokens"] = result["input_tokens"] + result["output_tokens"]
    return result


#: The row metadata key that says why a row's usage is the tokenizer's estimate.
ESTIMATE_REASON_KEY = "usage_estimate_reason"


def stream_usage_request(model: Any, call_kwargs: Mapping[str, Any]) -> tuple[dict[str, Any],
                                                                              str]:
    """The keyword arguments that make ``model``'s stream report its usage, and what to say
    in the row if it still reports none.

    LangChain's OpenAI-compatible models (``ChatOpenAI`` and friends; also ``ChatAnthropic``)
    have a ``stream_usage`` option; ``ChatOpenAI`` leaves it off for a custom ``base_url``
    (not every compatible server accepts ``stream_options``), so those streams would be
    estimated. It is turned on per call (``stream_usage=True``, which ``ChatOpenAI`` sends
    as ``stream_options={"include_usage": True}``) unless the caller chose: an explicit
    ``stream_usage`` / ``stream_options`` argument, or ``stream_usage=False`` on the model.
    """
    if "stream_usage" in call_kwargs or "stream_options" in call_kwargs:
        return {}, "the caller's stream_usage / stream_options choice; the stream sent no usage"
    inner = getattr(model, "bound", model)  # a RunnableBinding (bind, with_config)
    fields = getattr(type(inner), "model_fields", None) or {}
    name = type(inner).__name__
    if "stream_usage" not in fields:
        return {}, f"{name} has no stream_usage option and its stream reported no usage"
    setting = getattr(inner, "stream_usage", None)
    if setting is False:
        return {}, f"stream_usage=False on the {name}: the stream was not asked for usage"
    if setting is True:
        return {}, f"{name} asked the stream for usage (stream_usage=True); none came"
    return {"stream_usage": True}, (f"budgetkit asked the {name} stream for usage "
                                    "(stream_usage=True); the server sent none")
