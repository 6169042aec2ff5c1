"""Try cheap models first; escalate only when the answer fails its checks.

A :class:`Cascade` holds models ordered cheapest first and a list of checks. For each
request it calls the first model, runs every check on the answer text and returns the
first answer that passes them all; otherwise it escalates to the next model. The last
model's answer is returned as best effort (``result.accepted`` is then False).

Checks are small callables ``check(text) -> str | None`` (``None`` = pass, a string = why
it failed): :class:`MinLength`, :class:`RequiredElements`, :class:`MatchesRegex`,
:class:`ValidJSON` (optionally against a JSON schema subset), :class:`ScoreAtLeast` (a user
scorer against a threshold), or any function of that shape.

With an ``engine``, every attempt is admitted and settled as its own usage row carrying the
request id, the attempt number and, as ``route_reason``, why the attempt ran, so a report
can show what the cascade cost and what it saved. A budget that blocks an *escalation*
stops the cascade and returns the answer in hand (``result.stopped_by``); a budget that
blocks the first attempt raises :class:`BudgetExceeded` as usual. Provider errors are not
handled here: wrap ``call`` with a :class:`~budgetkit.Fallback` for that.

Over 500 lines because the checks and the cascade that runs them are documented
together; the checks are small classes.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

from budgetkit.errors import BudgetExceeded, ConfigurationError

__all__ = [
    "Completion",
    "Check",
    "MinLength",
    "RequiredElements",
    "MatchesRegex",
    "ValidJSON",
    "ScoreAtLeast",
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


class Check(Protocol):
    """An acceptability check: ``None`` when the answer passes, else the reason it fails."""

    def __call__(self, text: str) -> str | None: ...


# ----------------------------------------------------------------------------- checks

@dataclass(frozen=True)
class MinLength:
    """At least ``chars`` characters (after stripping whitespace)."""

    chars: int

    def __post_init__(self) -> None:
        if self.chars < 0:
            raise ConfigurationError(f"MinLength chars must be >= 0, got {self.chars}")

    def __call__(self, text: str) -> str | None:
        length = len(text.strip())
        return None if length >= self.chars else f"too short ({length} < {self.chars} chars)"


@dataclass(frozen=True)
class RequiredElements:
    """Every element occurs in the answer (case-insensitive unless ``case_sensitive``)."""

    elements: tuple[str, ...]
    case_sensitive: bool = False

    def __init__(self, *elements: str, case_sensitive: bool = False) -> None:
        if len(elements) == 1 and not isinstance(elements[0], str):
            elements = tuple(elements[0])  # RequiredElements(["a", "b"]) works too
        if not elements or not all(isinstance(e, str) and e for e in elements):
            raise ConfigurationError(f"RequiredElements needs non-empty strings, got {elements!r}")
        object.__setattr__(self, "elements", tuple(elements))
        object.__setattr__(self, "case_sensitive", case_sensitive)

    def __call__(self, text: str) -> str | None:
        haystack = text if self.case_sensitive else text.lower()
        missing = [e for e in self.elements
                   if (e if self.case_sensitive else e.lower()) not in haystack]
        return f"missing required element(s): {', '.join(map(repr, missing))}" if missing else None


class MatchesRegex:
    """The answer matches ``pattern`` somewhere (``re.search``), or nowhere if ``negate``."""

    def __init__(self, pattern: str | re.Pattern[str], *, flags: int = 0,
                 negate: bool = False) -> None:
        try:
            self.pattern = (pattern if isinstance(pattern, re.Pattern)
                            else re.compile(pattern, flags))
        except re.error as exc:
            raise ConfigurationError(f"invalid regex {pattern!r}: {exc}") from None
        self.negate = negate

    def __call__(self, text: str) -> str | None:
        found = self.pattern.search(text) is not None
        if found != self.negate:
            return None
        verb = "matches" if self.negate else "does not match"
        return f"answer {verb} /{self.pattern.pattern}/"

    def __repr__(self) -> str:
        return f"MatchesRegex({self.pattern.pattern!r}, negate={self.negate})"


_FENCE = re.compile(r"^\s*```(?:json|JSON)?\s*\n(.*?)\n?```\s*$", re.DOTALL)
_SCHEMA_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool)
    or isinstance(v, float) and v.is_integer(),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}
_SCHEMA_KEYWORDS = frozenset({
    "type", "properties", "required", "items", "enum", "const", "additionalProperties",
    "minLength", "maxLength", "minimum", "maximum", "minItems", "maxItems",
    # annotations, no effect on validity
    "title", "description", "default", "examples", "$schema", "$id",
})


class ValidJSON:
    """The answer parses as JSON and, with ``schema``, satisfies it.

    The schema support is a dependency-free subset of JSON Schema: ``type`` (one or a
    list), ``properties``, ``required``, ``additionalProperties: false`` or a schema,
    ``items``, ``enum``, ``const``, ``minLength`` / ``maxLength``, ``minimum`` /
    ``maximum``, ``minItems`` / ``maxItems``. A schema using any other keyword is refused
    when the check is built (ConfigurationError), so a check never passes by ignoring a
    rule. A fenced block (```json ... ```) is accepted unless ``allow_fences=False``.
    """

    def __init__(self, schema: Mapping[str, Any] | None = None, *,
                 allow_fences: bool = True) -> None:
        if schema is not None:
            _check_schema(schema, "$")
        self.schema = schema
        self.allow_fences = allow_fences

    def parse(self, text: str) -> Any:
        """The answer's JSON value (raises ``ValueError`` when it is not JSON)."""
        if self.allow_fences:
            fenced = _FENCE.match(text)
            if fenced:
                text = fenced.group(1)
        return json.loads(text)

    def __call__(self, text: str) -> str | None:
        try:
            value = self.parse(text)
        except ValueError as exc:
            return f"not valid JSON ({exc})"
        if self.schema is None:
            return None
        errors = _validate(value, self.schema, "$")
        return f"JSON does not match the schema: {'; '.join(errors[:3])}" if errors else None


def _check_schema(schema: Any, path: str) -> None:
    if not isinstance(schema, Mapping):
        raise ConfigurationError(f"schema at {path} must be an object, got {schema!r}")
    unknown = set(schema) - _SCHEMA_KEYWORDS
    if unknown:
        raise ConfigurationError(
            f"schema at {path} uses unsupported keyword(s) {', '.join(sorted(unknown))}; "
            f"ValidJSON supports {', '.join(sorted(_SCHEMA_KEYWORDS))}")
    types = schema.get("type")
    for name in ([types] if isinstance(types, str) else types or []):
        if name not in _SCHEMA_TYPES:
            raise ConfigurationError(f"schema at {path} has unknown type {name!r}")
    for key, sub in (schema.get("properties") or {}).items():
        _check_schema(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), Mapping):
        _check_schema(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), Mapping):
        _check_schema(schema["additionalProperties"], f"{path}.*")


def _validate(value: Any, schema: Mapping[str, Any], path: str) -> list[str]:
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_SCHEMA_TYPES[name](value) for name in names):
            return [f"{path} is {type(value).__name__}, expected {' or '.join(names)}"]
    errors: list[str] = []
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path} must equal {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path} must be one of {schema['enum']!r}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path} shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path} longer than {schema['maxLength']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path} below minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path} above maximum {schema['maximum']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path} has fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path} has more than {schema['maxItems']} items")
        if isinstance(schema.get("items"), Mapping):
            for i, item in enumerate(value):
                errors.extend(_validate(item, schema["items"], f"{path}[{i}]"))
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for key in schema.get("required") or ():
            if key not in value:
                errors.append(f"{path} lacks required property {key!r}")
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                errors.extend(_validate(item, properties[key], f"{path}.{key}"))
            elif extra is False:
                errors.append(f"{path} has unexpected property {key!r}")
            elif isinstance(extra, Mapping):
                errors.extend(_validate(item, extra, f"{path}.{key}"))
    return errors


class ScoreAtLeast:
    """A user scorer ``scorer(text) -> float`` must reach ``threshold``."""

    def __init__(self, scorer: Callable[[str], float], threshold: float) -> None:
        if not callable(scorer):
            raise ConfigurationError(f"scorer must be callable, got {scorer!r}")
        self.scorer, self.threshold = scorer, threshold

    def __call__(self, text: str) -> str | None:
        score = float(self.scorer(text))
        return None if score >= self.threshold else (
            f"score {score:.3g} < threshold {self.threshold:.3g}")

    def __repr__(self) -> str:
        return f"ScoreAtLeast({getattr(self.scorer, '__name__', self.scorer)!r}, {self.threshold})"


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
    reserved per attempt when an engine admits it.
    """

    def __init__(self, models: Sequence[str], checks: Sequence[Check] = (), *,
                 engine: Any = None, max_output_tokens: int | None = None) -> None:
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

    def evaluate(self, text: str) -> list[str]:
        """The reasons ``text`` fails the checks (empty when it passes them all)."""
        return [failure for check in self.checks if (failure := check(text)) is not None]

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
            attempt = Attempt(number, model, reason, answer, self.evaluate(answer.text))
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
            attempt = Attempt(number, model, reason, answer, self.evaluate(answer.text))
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


def _settle_kwargs(engine: Any, ticket: Any, answer: Completion) -> dict[str, Any]:
    estimated = answer.input_tokens is None or answer.output_tokens is None
    output_tokens = answer.output_tokens
    if output_tokens is None:
        output_tokens = engine.count_tokens(answer.text, ticket.model) if answer.text else 0
    input_tokens = answer.input_tokens if answer.input_tokens is not None else ticket.input_tokens
    return {"input_tokens": input_tokens, "output_tokens": output_tokens,
            "cached_input_tokens": answer.cached_input_tokens,
            "cache_write_tokens": answer.cache_write_tokens,
            "reasoning_tokens": answer.reasoning_tokens, "model": answer.model,
            "usage_source": "estimated" if estimated else "provider"}


def settle_completion(engine: Any, ticket: Any, answer: Completion) -> Any:
    """Settle ``ticket`` with ``answer``'s usage; counts what the provider did not report.

    Shared by the cascade and the framework adapters so every path records usage the same
    way. Returns the usage record (``None`` without an engine or ticket).
    """
    if engine is None or ticket is None:
        return None
    return engine.settle(ticket, **_settle_kwargs(engine, ticket, answer))


async def asettle_completion(engine: Any, ticket: Any, answer: Completion) -> Any:
    """:func:`settle_completion` for asyncio code (budget commits may touch the database)."""
    if engine is None or ticket is None:
        return None
    return await engine.asettle(ticket, **_settle_kwargs(engine, ticket, answer))
