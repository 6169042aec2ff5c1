"""Try cheap models first; escalate only when the answer fails its checks.

A :class:`Cascade` holds models ordered cheapest first and a list of checks. For each
request it calls the first model, runs every check on the answer text and returns the
first answer that passes them all; otherwise it escalates to the next model. The last
model's answer is returned as best effort (``result.accepted`` is then False).

Checks (``_checks.py``, ``_model_checks.py``) are small callables ``check(text) -> str |
None`` (``None`` = pass, a string = why it failed); a check with ``needs_prompt = True`` is
called ``check(text, prompt)``. Checks compose: an answer must pass every one.

With an ``engine``, every attempt is admitted and settled as its own usage row carrying the
request id, the attempt number and, as ``route_reason``, why the attempt ran, so a report
can show what the cascade cost and what it saved. A budget that blocks an *escalation*
stops the cascade and returns the answer in hand (``result.stopped_by``); a budget that
blocks the first attempt raises :class:`BudgetExceeded` as usual. Provider errors are not
handled here: wrap ``call`` with a :class:`~budgetkit.Fallback` for that.

With an engine the cascade also records its *verdict* on the first (cheapest) answer in
that attempt's usage row (``metadata["route_verdict"]``: the prompt's hashed features and
whether the answer failed; the prompt text only with ``verdict_prompts=True``), so
:meth:`Router.fit_from_ledger` can learn which prompts the cheap model fails.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from budgetkit.errors import BudgetExceeded, ConfigurationError

from ._checks import Check
from ._features import prompt_features
from ._learning import verdict_metadata
from ._prompt import prompt_text

__all__ = [
    "Completion",
    "Attempt",
    "CascadeResult",
    "Cascade",
    "settle_completion",
    "asettle_completion",
    "metered_call",
    "is_metered_call",
]

# True while a budgetkit wrapper (a routed model) has admitted the model call being made in
# this context itself: tracking handlers that see such a call must not record it again.
_METERED_CALL: ContextVar[bool] = ContextVar("budgetkit_metered_call", default=False)


@contextmanager
def metered_call(active: bool = True) -> Iterator[None]:
    """Mark model calls made inside the block as already recorded by a wrapper."""
    token = _METERED_CALL.set(active)
    try:
        yield
    finally:
        _METERED_CALL.reset(token)


def is_metered_call() -> bool:
    """Whether the current model call was already admitted by a budgetkit wrapper.

    Tracking handlers (LangChain, LlamaIndex) check this and skip such calls, so a routed
    model with an engine and a tracking handler never count one call twice.
    """
    return _METERED_CALL.get()


@dataclass
class Completion:
    """One model answer and, when the provider reported it, its usage.

    ``input_tokens`` includes cached input; ``output_tokens`` includes reasoning tokens.
    Leave counts ``None`` when the provider did not report them: the ledger then counts
    them with the tokenizer and marks the row as estimated. ``raw`` keeps the framework's
    own object (an ``AIMessage``, a ``ChatResponse``) for the adapter.
    """

    text: str
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    model: str | None = None
    raw: Any = None


# ----------------------------------------------------------------------------- cascade

@dataclass
class Attempt:
    """One model tried by a cascade: its answer, whether it passed, and its usage row."""

    number: int
    model: str
    reason: str
    completion: Completion | None
    failures: list[str] = field(default_factory=list)
    record: Any = None  # UsageRecord when the cascade has an engine

    @property
    def passed(self) -> bool:
        return self.completion is not None and not self.failures

    @property
    def cost_nanos(self) -> int:
        return self.record.cost_nanos if self.record is not None else 0


@dataclass
class CascadeResult:
    """What a cascade answered, which model answered it, and every attempt it made."""

    completion: Completion
    model: str
    accepted: bool
    attempts: list[Attempt]
    request_id: str
    stopped_by: BudgetExceeded | None = None

    @property
    def text(self) -> str:
        return self.completion.text

    @property
    def escalations(self) -> int:
        return len(self.attempts) - 1

    @property
    def cost_nanos(self) -> int:
        """Total cost of every attempt in nano-dollars (0 without an engine)."""
        return sum(a.cost_nanos for a in self.attempts)


CallFn = Callable[[str], "Completion | str"]
AsyncCallFn = Callable[[str], Awaitable["Completion | str"]]


class Cascade:
    """Models cheapest first and the checks an answer must pass to stop escalating.

    ``call(model) -> Completion | str`` performs one model call; :meth:`run` (and
    :meth:`arun` for a coroutine ``call``) drives the cascade. ``max_output_tokens`` is
    reserved per attempt when an engine admits it. ``record_verdicts`` (default on, needs an
    engine and a prompt) stores the verdict on the first answer for the router to learn
    from; ``verdict_prompts`` stores the prompt text with it (off: hashed features only).
    """

    def __init__(self, models: Sequence[str], checks: Sequence[Check] = (), *,
                 engine: Any = None, max_output_tokens: int | None = None,
                 record_verdicts: bool = True, verdict_prompts: bool = False) -> None:
        if not models or not all(isinstance(m, str) and m for m in models):
            raise ConfigurationError(f"Cascade needs one or more model names, got {models!r}")
        if len(set(models)) != len(models):
            raise ConfigurationError(f"Cascade models repeat: {list(models)!r}")
        for check in checks:
            if not callable(check):
                raise ConfigurationError(f"check {check!r} is not callable")
        if engine is not None:
            for model in models:
                engine.catalog.get(model)  # UnknownModelError before any call
        self.models = tuple(models)
        self.checks = tuple(checks)
        self.engine = engine
        self.max_output_tokens = max_output_tokens
        self.record_verdicts = record_verdicts
        self.verdict_prompts = verdict_prompts

    def evaluate(self, text: str, prompt: str | None = None) -> list[str]:
        """The reasons ``text`` fails the checks (empty when it passes them all).

        Checks with ``needs_prompt`` get ``prompt`` too; without one they raise
        ConfigurationError (pass ``prompt=`` or ``messages=`` to :meth:`run`).
        """
        failures = []
        for check in self.checks:
            if getattr(check, "needs_prompt", False):
                if prompt is None:
                    raise ConfigurationError(
                        f"check {check!r} needs the prompt: give run() a prompt or messages")
                failure = check(text, prompt)  # type: ignore[call-arg]
            else:
                failure = check(text)
            if failure is not None:
                failures.append(failure)
        return failures

    def attempt_reason(self, number: int, previous: Attempt | None) -> str:
        """The route reason recorded for attempt ``number`` (1-based)."""
        total = len(self.models)
        if previous is None:
            return f"cascade attempt {number}/{total}: cheapest first"
        return (f"cascade attempt {number}/{total}: {previous.model} answer failed: "
                f"{'; '.join(previous.failures)}")

    def run(self, call: CallFn, *, prompt: str | None = None,
            messages: Sequence[Mapping[str, Any]] | None = None,
            request_id: str | None = None, **attribution: Any) -> CascadeResult:
        """Call the models in order until an answer passes every check.

        ``prompt`` / ``messages`` are used only to count the prompt when admitting each
        attempt; ``attribution`` takes :meth:`Engine.admit`'s keyword arguments.
        """
        request_id = request_id or uuid.uuid4().hex
        text = prompt_text(prompt, messages)
        attempts: list[Attempt] = []
        for number, model in enumerate(self.models, start=1):
            reason = self.attempt_reason(number, attempts[-1] if attempts else None)
            try:
                ticket = self._admit(model, number, reason, prompt, messages, request_id,
                                     attribution)
            except BudgetExceeded as exc:
                if not attempts:
                    raise
                return self._result(attempts, request_id, stopped_by=exc)
            try:
                answer = _as_completion(call(model))
            except BaseException as exc:
                if ticket is not None:
                    self.engine.release(ticket, error=exc)
                raise
            attempt = Attempt(number, model, reason, answer,
                              self.evaluate(answer.text, text))
            self._note_verdict(ticket, number, text, attempt)
            attempt.record = settle_completion(self.engine, ticket, answer)
            attempts.append(attempt)
            if attempt.passed:
                break
        return self._result(attempts, request_id)

    async def arun(self, call: AsyncCallFn, *, prompt: str | None = None,
                   messages: Sequence[Mapping[str, Any]] | None = None,
                   request_id: str | None = None, **attribution: Any) -> CascadeResult:
        """:meth:`run` for a coroutine ``call``."""
        request_id = request_id or uuid.uuid4().hex
        text = prompt_text(prompt, messages)
        attempts: list[Attempt] = []
        for number, model in enumerate(self.models, start=1):
            reason = self.attempt_reason(number, attempts[-1] if attempts else None)
            try:
                ticket = await self._aadmit(model, number, reason, prompt, messages,
                                            request_id, attribution)
            except BudgetExceeded as exc:
                if not attempts:
                    raise
                return self._result(attempts, request_id, stopped_by=exc)
            try:
                answer = _as_completion(await call(model))
            except BaseException as exc:
                if ticket is not None:
                    await self.engine.arelease(ticket, error=exc)
                raise
            attempt = Attempt(number, model, reason, answer,
                              self.evaluate(answer.text, text))
            self._note_verdict(ticket, number, text, attempt)
            attempt.record = await asettle_completion(self.engine, ticket, answer)
            attempts.append(attempt)
            if attempt.passed:
                break
        return self._result(attempts, request_id)

    # -- helpers -------------------------------------------------------------------------
    def _admit_kwargs(self, number: int, reason: str, prompt: str | None,
                      messages: Sequence[Mapping[str, Any]] | None, request_id: str,
                      attribution: Mapping[str, Any]) -> dict[str, Any]:
        return {"prompt": prompt, "messages": messages, "request_id": request_id,
                "attempt": number, "route_reason": reason,
                "max_output_tokens": self.max_output_tokens, **attribution}

    def _admit(self, model: str, number: int, reason: str, prompt: str | None,
               messages: Sequence[Mapping[str, Any]] | None, request_id: str,
               attribution: Mapping[str, Any]) -> Any:
        if self.engine is None:
            return None
        return self.engine.admit(model, **self._admit_kwargs(number, reason, prompt, messages,
                                                             request_id, attribution))

    async def _aadmit(self, model: str, number: int, reason: str, prompt: str | None,
                      messages: Sequence[Mapping[str, Any]] | None, request_id: str,
                      attribution: Mapping[str, Any]) -> Any:
        if self.engine is None:
            return None
        return await self.engine.aadmit(model, **self._admit_kwargs(
            number, reason, prompt, messages, request_id, attribution))

    def verdict_metadata(self, prompt: str | None, failures: Sequence[str]) -> dict[str, Any]:
        """The usage-row metadata recording the verdict on the cheapest answer to
        ``prompt`` (empty when verdicts are off or there is no prompt). Adapters that run the
        cascade themselves add it to their first attempt's ticket before settling it."""
        if not self.record_verdicts or prompt is None:
            return {}
        return verdict_metadata(prompt_features(prompt), cheap_failed=bool(failures),
                                prompt=prompt if self.verdict_prompts else None)

    def _note_verdict(self, ticket: Any, number: int, text: str | None,
                      attempt: Attempt) -> None:
        """Put the verdict on the cheapest answer into that attempt's usage row."""
        if number == 1 and ticket is not None:
            ticket.metadata.update(self.verdict_metadata(text, attempt.failures))

    @staticmethod
    def _result(attempts: list[Attempt], request_id: str, *,
                stopped_by: BudgetExceeded | None = None) -> CascadeResult:
        last = attempts[-1]
        assert last.completion is not None
        return CascadeResult(completion=last.completion, model=last.model,
                             accepted=last.passed, attempts=attempts, request_id=request_id,
                             stopped_by=stopped_by)


def _as_completion(answer: Completion | str) -> Completion:
    if isinstance(answer, Completion):
        return answer
    if isinstance(answer, str):
        return Completion(text=answer)
    raise ConfigurationError(
        f"a cascade call must return a Completion or a str, got {type(answer).__name__}")


def _settle_kwargs(engine: Any, ticket: Any, answer: Completion,
                   estimate_reason: str | None = None) -> dict[str, Any]:
    estimated = answer.input_tokens is None or answer.output_tokens is None
    output_tokens = answer.output_tokens
    if output_tokens is None:
        output_tokens = engine.count_tokens(answer.text, ticket.model) if answer.text else 0
    input_tokens = answer.input_tokens if answer.input_tokens is not None else ticket.input_tokens
    return {"input_tokens": input_tokens, "output_tokens": output_tokens,
            "cached_input_tokens": answer.cached_input_tokens,
            "cache_write_tokens": answer.cache_write_tokens,
            "reasoning_tokens": answer.reasoning_tokens, "model": answer.model,
            "usage_source": "estimated" if estimated else "provider",
            "metadata": {"usage_estimate_reason": estimate_reason}
            if estimated and estimate_reason else None}


def settle_completion(engine: Any, ticket: Any, answer: Completion, *,
                      estimate_reason: str | None = None) -> Any:
    """Settle ``ticket`` with ``answer``'s usage; counts what the provider did not report.

    Shared by the cascade and the framework adapters so every path records usage the same
    way. ``estimate_reason``, when the usage has to be counted, goes in the row's metadata
    as ``usage_estimate_reason`` (why the provider's figures are missing). Returns the usage
    record (``None`` without an engine or ticket).
    """
    if engine is None or ticket is None:
        return None
    return engine.settle(ticket, **_settle_kwargs(engine, ticket, answer, estimate_reason))


async def asettle_completion(engine: Any, ticket: Any, answer: Completion, *,
                             estimate_reason: str | None = None) -> Any:
    """:func:`settle_completion` for asyncio code (budget commits may touch the database)."""
    if engine is None or ticket is None:
        return None
    return await engine.asettle(ticket,
                                **_settle_kwargs(engine, ticket, answer, estimate_reason))
