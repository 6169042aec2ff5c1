"""The end of a LangChain model run: what to tell the engine (settle, release, discard or
record, planned from the response's facts) and the running totals of what the handler
recorded. A mixin of :class:`~langchain_budgetkit._tracker._Tracker`; the deferred work
(usually on the ledger writer's thread) runs it.
"""

from __future__ import annotations

import threading
from typing import Any

from langchain_core.outputs import LLMResult

from budgetkit import Engine, UnknownModelError
from budgetkit.ledger import Usage, UsageRecord

from ._runs import (_CACHE_MARK, _ROUTED_MARK, _estimate_reason, _Facts, _Outcome, _Run,
                    logger)
from ._stream_usage import ESTIMATE_REASON_KEY, usage_of_running_totals
from ._usage_parse import tool_call_text, usage_from_metadata, usage_from_openai


class _Totals:
    """Running totals of the calls a handler recorded."""

    __slots__ = ("calls", "input_tokens", "output_tokens", "cached_input_tokens",
                 "reasoning_tokens", "cost_nanos", "usage_by_model")

    def __init__(self) -> None:
        self.calls = self.input_tokens = self.output_tokens = 0
        self.cached_input_tokens = self.reasoning_tokens = self.cost_nanos = 0
        self.usage_by_model: dict[str, dict[str, int]] = {}


def _total(name: str) -> property:
    def read(self: _Settlement) -> Any:
        self.engine.run_deferred()  # calls that ended but are not counted yet
        return getattr(self._totals, name)

    return property(read, doc=f"Running total: {name.replace('_', ' ')}.")


class _Settlement:
    """A finished run's outcome and the running totals (the tracker sets the attributes)."""

    engine: Engine
    _totals: _Totals
    _totals_lock: threading.Lock
    _warned: set[str]

    # -- running totals -------------------------------------------------------------------
    calls = _total("calls")
    input_tokens = _total("input_tokens")
    output_tokens = _total("output_tokens")
    cached_input_tokens = _total("cached_input_tokens")
    reasoning_tokens = _total("reasoning_tokens")
    cost_nanos = _total("cost_nanos")
    usage_by_model = _total("usage_by_model")

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def cost(self) -> float:
        """Money recorded through this handler, in USD."""
        return self.cost_nanos / 1e9

    def _count(self, record: UsageRecord | None) -> None:
        if record is None:
            return
        with self._totals_lock:
            totals = self._totals
            totals.calls += 1
            totals.input_tokens += record.input_tokens
            totals.output_tokens += record.output_tokens
            totals.cached_input_tokens += record.cached_input_tokens
            totals.reasoning_tokens += record.reasoning_tokens
            totals.cost_nanos += record.cost_nanos
            per_model = totals.usage_by_model.get(record.model)
            if per_model is None:
                per_model = totals.usage_by_model[record.model] = {
                    "calls": 0, "input_tokens": 0, "output_tokens": 0, "cost_nanos": 0}
            per_model["calls"] += 1
            per_model["input_tokens"] += record.input_tokens
            per_model["output_tokens"] += record.output_tokens
            per_model["cost_nanos"] += record.cost_nanos

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    # -- end: the outcome -----------------------------------------------------------------
    def _plan_end(self, facts: _Facts, run: _Run) -> _Outcome | None:
        response_metadata = facts.response_metadata
        generation_info = facts.generation_info
        llm_output = facts.llm_output
        if response_metadata.get(_CACHE_MARK) or generation_info.get(_CACHE_MARK):
            return _Outcome("discard", run.ticket)  # budgetkit's cache records the hit
        if response_metadata.get(_ROUTED_MARK):
            return _Outcome("discard", run.ticket)  # a wrapper: its inner runs are recorded
        model = (response_metadata.get("model_name") or response_metadata.get("model")
                 or llm_output.get("model_name") or llm_output.get("model") or run.model)
        raw_usage = facts.usage_metadata
        if run.chunk_usage is not None:  # LangChain summed the chunks: right unless totals
            raw_usage = usage_of_running_totals(run.chunk_usage) or raw_usage
        usage = usage_from_metadata(raw_usage)
        if usage is None:
            usage = usage_from_openai(llm_output.get("token_usage") or llm_output.get("usage")
                                      or generation_info.get("usage"))
        if usage is None and not facts.chat and llm_output.get("token_usage") == {}:
            # A legacy LLM answered several prompts in one request: LangChain gives the
            # request's whole usage to the first prompt's run and an emptied dict to the
            # others (LLMResult.flatten). Counting these again would double the total.
            usage = Usage(0, 0)
        source = "provider"
        if raw_usage and raw_usage.get("total_cost") == 0 and usage is not None:
            return self._foreign_cache_hit(run, model, usage)
        reason = None
        if usage is None:
            usage = self._estimate(run, model, facts.response)
            source = "estimated"
            reason = _estimate_reason(run)
        if run.ticket is None:
            if run.deferred is None or not model:
                return None
            deferred = run.deferred
            if reason is not None:
                deferred = dict(deferred, metadata={**(deferred.get("metadata") or {}),
                                                    ESTIMATE_REASON_KEY: reason})
            return _Outcome("record", None, model,
                            dict(deferred, usage_source=source, **usage.settle_kwargs()))
        return _Outcome("settle", run.ticket, model, {
            "input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
            "cached_input_tokens": usage.cached_input_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
            "reasoning_tokens": usage.reasoning_tokens, "model": model,
            "usage_source": source,
            "metadata": {ESTIMATE_REASON_KEY: reason} if reason is not None else None})

    def _foreign_cache_hit(self, run: _Run, model: str | None, usage: Usage) -> _Outcome | None:
        attribution = run.deferred
        if run.ticket is not None:
            ticket = run.ticket
            attribution = {key: getattr(ticket, key) for key in (
                "operation_type", "user_id", "session_id", "project", "request_id", "run_id",
                "parent_run_id", "root_run_id", "task_type", "tags", "metadata")}
        if attribution is None or not model:
            return None
        return _Outcome("record", run.ticket, model, dict(
            attribution, status="cached", **usage.settle_kwargs()))

    def _estimate(self, run: _Run, model: str | None, response: LLMResult | None) -> Usage:
        """No usage reported: count the prompt and the output with the tokenizer."""
        counting_model = model or run.model or "gpt-4o"
        if run.ticket is not None:
            input_tokens = run.ticket.input_tokens
            counting_model = run.ticket.model
        elif run.messages is not None:
            input_tokens = self.engine.count_message_tokens(run.messages, counting_model,
                                                            tools=run.tools)
        else:
            input_tokens = self.engine.count_tokens(run.prompt_text or "", counting_model)
        text = "".join(run.chunks or ())
        extra = ""
        if not text and response is not None:
            for generations in response.generations[:1]:
                for generation in generations:
                    text += generation.text
                    extra += tool_call_text(generation)
        output_tokens = self.engine.count_tokens(text + extra, counting_model) if (
            text or extra) else 0
        return Usage(input_tokens, output_tokens)

    def _plan_error(self, error: BaseException, run: _Run) -> _Outcome | None:
        if run.ticket is None:
            return None
        partial = "".join(run.chunks or ())
        if not partial:
            return _Outcome("release", run.ticket, kwargs={"error": error})
        # Output was streamed before the failure: the provider bills it, and the prompt.
        output_tokens = self.engine.count_tokens(partial, run.ticket.model)
        return _Outcome("release", run.ticket, kwargs={
            "error": error, "input_tokens": run.ticket.input_tokens,
            "output_tokens": output_tokens, "usage_source": "estimated"})

    def _execute(self, outcome: _Outcome, ended: tuple[float, Any], run_started: float) -> None:
        engine = self.engine
        try:
            if outcome.action == "settle":
                assert outcome.ticket is not None
                self._count(engine.settle(outcome.ticket, **outcome.kwargs))
            elif outcome.action == "release":
                assert outcome.ticket is not None
                self._count(engine.release(outcome.ticket, **outcome.kwargs))
            elif outcome.action == "discard":
                if outcome.ticket is not None:
                    engine.discard(outcome.ticket)
            else:  # record
                if outcome.ticket is not None:
                    engine.discard(outcome.ticket)
                self._record(outcome, ended, run_started)
        except UnknownModelError as exc:
            self._warn_once(f"unknown:{exc.model}", "budgetkit: not recording calls to %r: %s",
                            exc.model, exc)

    def _record(self, outcome: _Outcome, ended: tuple[float, Any], run_started: float) -> None:
        assert outcome.model is not None
        kwargs = dict(outcome.kwargs)
        if kwargs.get("status") == "cached":
            price = self.engine.catalog.get(outcome.model)
            kwargs["saved_nanos"] = price.cost_nanos(
                kwargs["input_tokens"], kwargs["output_tokens"],
                cached_input_tokens=kwargs["cached_input_tokens"],
                cache_write_tokens=kwargs["cache_write_tokens"])
            kwargs["usage_source"] = "provider"
        self._count(self.engine.record(outcome.model, created_at=self.engine.end_time(ended),
                                       latency_ms=(ended[0] - run_started) * 1000.0,
                                       **kwargs))

