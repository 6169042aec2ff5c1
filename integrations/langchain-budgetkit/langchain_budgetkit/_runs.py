"""One LangChain model run as the callback handlers hold it: the state kept from its start
to its end (:class:`_Run`), the facts its response gave (:class:`_Facts`, taken on the
caller's thread), and what its end tells the engine (:class:`_Outcome`).

The handlers' logic is in ``_tracker`` (a run's start, stream and end) and ``_settlement``
(the outcome and the running totals); their LangChain hooks in ``_callback`` and
``_callback_async``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGeneration, LLMResult

from budgetkit.budgets import LaneReservation
from budgetkit.ledger import Ticket

from ._stream_usage import ChunkUsage

logger = logging.getLogger("budgetkit.langchain")

_CACHE_MARK = "budgetkit_cache_hit"
#: A run of budgetkit's routed model (its cost is recorded on its inner runs) and an inner
#: run that model has already recorded itself (see langchain_budgetkit._routed).
_ROUTED_MARK = "budgetkit_routed"
_METERED_MARK = "budgetkit_metered"


# ---------------------------------------------------------------------------- run state

@dataclass(slots=True)
class _Run:
    """A model run between its start and its end: what LangChain gave at the start (read
    when the run is resolved, usually off the caller's thread) and what was decided."""

    operation_type: str
    parent_run_id: UUID | None
    root_run_id: UUID
    tags: list[str] | None
    metadata: dict[str, Any] | None
    model: str | None
    max_tokens: int | None
    tools: Any  # OpenAI-format tool definitions sent with the prompt (bind_tools), or None
    prompt: Sequence[BaseMessage] | str
    started: float
    ticket: Ticket | None = None
    #: the admit keyword arguments, once resolved (see _Tracker._resolve)
    kwargs: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = None  # the prompt as OpenAI-format messages
    prompt_text: str | None = None  # the prompt of a completion LLM
    #: set when the catalog could not price the start model: recorded at the end if the
    #: response names a model it can price
    deferred: dict[str, Any] | None = None
    chunks: list[str] | None = None  # streamed text (None until a token arrives)
    stream_tokens: int = 0
    #: the streamed chunks' usage_metadata (None until a chunk reports one)
    chunk_usage: list[ChunkUsage] | None = None
    task: Any = None  # the asyncio task running the call (async path), watched for cancel
    on_done: Any = None
    #: what an admission lane reserved at the start (the ticket is built at the end)
    held: LaneReservation | None = None
    #: an OpenAI-compatible LangChain model (invocation params ``_type``): its stream
    #: reports usage when the model is created with ``stream_usage=True``
    openai_compatible: bool = False


class _Facts:
    """What the end of a run said, taken on the caller's thread: the few dicts the
    bookkeeping reads, not LangChain's response objects (held until the deferred work
    runs, those would outlive the garbage collector's young generation). Taken now also
    because LangChain's cache replaces a shared generation's message on a later hit (to
    zero its cost), which must not turn this call into a hit."""

    __slots__ = ("chat", "response_metadata", "generation_info", "llm_output",
                 "usage_metadata", "response")

    chat: bool  # a chat model's run (its first generation carries a message)
    response_metadata: dict[str, Any]
    generation_info: dict[str, Any]
    llm_output: dict[str, Any]
    usage_metadata: Any
    response: LLMResult | None  # kept only when the call must be estimated from its text

    @classmethod
    def of(cls, response: LLMResult) -> _Facts:
        facts = cls()
        generations = response.generations
        generation = (generations[0][0] if generations and generations[0]
                      else next((gen for gens in generations for gen in gens), None))
        message = generation.message if isinstance(generation, ChatGeneration) else None
        facts.chat = message is not None
        facts.response_metadata = (message.response_metadata if message is not None
                                   else None) or {}
        facts.generation_info = (generation.generation_info if generation is not None
                                 else None) or {}
        facts.llm_output = response.llm_output or {}
        usage = facts.usage_metadata = getattr(message, "usage_metadata", None)
        # The text is needed only to estimate a call that reported no usage.
        reported = (usage and (usage.get("input_tokens") or usage.get("output_tokens"))) \
            or facts.llm_output.get("token_usage") or facts.llm_output.get("usage") \
            or facts.generation_info.get("usage")
        facts.response = None if reported else response
        return facts


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What to tell the engine at a run's end."""

    action: str  # "settle" | "discard" | "record" | "release"
    ticket: Ticket | None = None
    model: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


def _estimate_reason(run: _Run) -> str:
    """Why a run's usage had to be counted (the row's ``usage_estimate_reason``)."""
    if run.chunks is None:
        return "the response reported no usage"
    if run.openai_compatible:
        # A callback only observes the request: it cannot add stream_options to it.
        return ("the stream reported no usage; create the model with stream_usage=True "
                "(ChatOpenAI sends stream_options={'include_usage': true} then) for "
                "the provider's figures")
    return "the stream reported no usage"


def _log_failure(where: str) -> None:
    # A bug in tracking must not break the user's LLM call: report it and carry on.
    logger.exception("budgetkit: tracking failed in %s; the call continues untracked", where)
