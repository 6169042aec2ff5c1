"""Survive provider errors: retry with backoff, fall back to other models, cool failing ones.

:class:`Fallback` calls ``fn(model)`` for a list of models in order. What happens on an
error depends on what it is:

* transient (rate limit, timeout, 5xx, connection reset; :func:`is_transient`): the same
  model is retried up to ``max_retries`` times with exponential backoff and jitter, then
  the model is put in *cooldown* (skipped by later calls for ``cooldown`` seconds) and the
  next model is tried;
* context length exceeded (:func:`is_context_length_error`): no retry; the next model
  whose context window is *larger* is tried (needs a catalog to know the windows);
* anything else, and every :class:`BudgetExceeded`: raised at once. A budget stop is a
  decision, not a failure: retrying it or sending it to another model would spend the
  money the budget refused. (LangChain's ``with_fallbacks`` catches every ``Exception``
  by default and ``with_retry`` retries it; narrow them with ``exceptions_to_handle`` /
  ``retry_if_exception_type``, or use this class, which never does either.)

When every model failed, the last error is raised with a note listing each attempt.
Time, sleep and randomness are injected (``clock``, ``sleep`` / ``asleep``, ``random``) so
tests never wait. The cooldown table is shared by every call through one instance and
is thread-safe.
"""

from __future__ import annotations

import asyncio
import random as _random
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from budgetkit.errors import BudgetExceeded, ConfigurationError, ContextWindowExceeded
from budgetkit.pricing import PriceCatalog

__all__ = [
    "Fallback",
    "FallbackAttempt",
    "is_rate_limit",
    "is_timeout",
    "is_server_error",
    "is_transient",
    "is_context_length_error",
]

T = TypeVar("T")
ErrorMatcher = type[BaseException] | Callable[[BaseException], bool]


# --------------------------------------------------------------------- classification

def _status_code(exc: BaseException) -> int | None:
    """The HTTP status of a provider error, wherever the SDK keeps it."""
    for holder in (exc, getattr(exc, "response", None)):
        for attr in ("status_code", "status", "http_status"):
            value = getattr(holder, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _class_names(exc: BaseException) -> str:
    return " ".join(cls.__name__.lower() for cls in type(exc).__mro__)


def is_rate_limit(exc: BaseException) -> bool:
    """HTTP 429 or an SDK ``RateLimitError`` (OpenAI, Anthropic, ...)."""
    return _status_code(exc) == 429 or "ratelimit" in _class_names(exc)


def is_timeout(exc: BaseException) -> bool:
    """A timeout: ``TimeoutError``, ``asyncio.TimeoutError``, ``httpx.TimeoutException``,
    ``openai.APITimeoutError`` (HTTP 408 too)."""
    return (isinstance(exc, (TimeoutError, asyncio.TimeoutError))
            or "timeout" in _class_names(exc) or _status_code(exc) == 408)


def is_server_error(exc: BaseException) -> bool:
    """HTTP 5xx, or a dropped connection (``APIConnectionError``, ``ConnectionError``)."""
    status = _status_code(exc)
    if status is not None and 500 <= status < 600:
        return True
    names = _class_names(exc)
    return (isinstance(exc, ConnectionError) or "internalservererror" in names
            or "serviceunavailable" in names or "apiconnectionerror" in names
            or "overloaded" in names)


_CONTEXT_MESSAGES = ("context_length_exceeded", "maximum context length", "context window",
                     "prompt is too long", "too many tokens", "input is too long",
                     "reduce the length of the messages")


def is_context_length_error(exc: BaseException) -> bool:
    """The prompt was too long for the model (ours or a provider's wording of it)."""
    if isinstance(exc, ContextWindowExceeded):
        return True
    text = f"{getattr(exc, 'code', '') or ''} {exc}".lower()
    return any(marker in text for marker in _CONTEXT_MESSAGES)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: rate limit, timeout or server error."""
    return is_rate_limit(exc) or is_timeout(exc) or is_server_error(exc)


def _matches(exc: BaseException, matchers: Sequence[ErrorMatcher]) -> bool:
    for matcher in matchers:
        if isinstance(matcher, type):  # an exception class
            if isinstance(exc, matcher):
                return True
        elif matcher(exc):
            return True
    return False


# ---------------------------------------------------------------------------- fallback

@dataclass(frozen=True)
class FallbackAttempt:
    """One failed call, kept for the error note and for ``on_error`` hooks."""

    model: str
    retry: int
    error: BaseException
    action: str  # "retry", "fallback", "larger window"


class Fallback:
    """Call models in order; retry transient errors, fall back, and cool failing models.

    ``retry_on`` and ``fallback_on`` are exception types or predicates ``f(exc) -> bool``
    (default: :func:`is_transient` for both); ``larger_window_on`` (default
    :func:`is_context_length_error`) sends the call to the next model with a larger
    context window, which needs ``catalog`` (or ``engine.catalog``). Errors matching none
    of them, and every :class:`BudgetExceeded`, are raised at once.

    Delay before retry ``n`` (0-based) is ``min(max_delay, base_delay * 2**n)`` scaled by
    a random factor in ``[1 - jitter, 1]`` (``jitter=1`` is AWS's "full jitter").
    """

    def __init__(self, models: Sequence[str], *,
                 retry_on: Iterable[ErrorMatcher] = (is_transient,),
                 fallback_on: Iterable[ErrorMatcher] = (is_transient,),
                 larger_window_on: Iterable[ErrorMatcher] = (is_context_length_error,),
                 max_retries: int = 2, base_delay: float = 0.5, max_delay: float = 20.0,
                 jitter: float = 1.0, cooldown: float = 30.0, engine: Any = None,
                 catalog: Any = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 asleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 random: Callable[[], float] = _random.random,
                 on_error: Callable[[FallbackAttempt], None] | None = None) -> None:
        if not models or not all(isinstance(m, str) and m for m in models):
            raise ConfigurationError(f"Fallback needs one or more model names, got {models!r}")
        if max_retries < 0:
            raise ConfigurationError(f"max_retries must be >= 0, got {max_retries}")
        if base_delay < 0 or max_delay < 0 or cooldown < 0:
            raise ConfigurationError(
                f"base_delay, max_delay and cooldown must be >= 0, got {base_delay}, "
                f"{max_delay}, {cooldown}")
        if not 0.0 <= jitter <= 1.0:
            raise ConfigurationError(f"jitter must be within 0..1, got {jitter}")
        self.models = tuple(dict.fromkeys(models))
        self.retry_on = tuple(retry_on)
        self.fallback_on = tuple(fallback_on)
        self.larger_window_on = tuple(larger_window_on)
        self.max_retries, self.base_delay, self.max_delay = max_retries, base_delay, max_delay
        self.jitter, self.cooldown = jitter, cooldown
        self.catalog = catalog if catalog is not None else getattr(engine, "catalog", None)
        self._clock, self._sleep, self._asleep, self._random = clock, sleep, asleep, random
        self._on_error = on_error
        self._cooling: dict[str, float] = {}  # model -> clock time its cooldown ends
        self._lock = threading.Lock()

    # -- state ---------------------------------------------------------------------------
    def cooling_down(self) -> dict[str, float]:
        """Models in cooldown and the seconds left for each."""
        now = self._clock()
        with self._lock:
            return {m: until - now for m, until in self._cooling.items() if until > now}

    def reset(self, model: str | None = None) -> None:
        """End the cooldown of ``model`` (of every model when ``None``)."""
        with self._lock:
            if model is None:
                self._cooling.clear()
            else:
                self._cooling.pop(model, None)

    def plan(self, prefer: str | None = None) -> list[str]:
        """The order models will be tried in: ``prefer`` first, cooled-down models skipped.

        If every model is cooling down they are all kept, soonest-available first: trying
        a model that may have recovered beats failing without a call.
        """
        order = list(self.models)
        if prefer is not None:
            order = [prefer] + [m for m in order if m != prefer]
        now = self._clock()
        with self._lock:
            cooling = {m: until for m, until in self._cooling.items() if until > now}
        ready = [m for m in order if m not in cooling]
        return ready or sorted(order, key=lambda m: cooling.get(m, 0.0))

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        ceiling = min(self.max_delay, self.base_delay * (2.0 ** retry))
        return ceiling * (1.0 - self.jitter * self._random())

    # -- calling ---------------------------------------------------------------------------
    def call(self, fn: Callable[[str], T], *, prefer: str | None = None) -> T:
        """``fn(model)`` for the first model that succeeds (see the class docstring)."""
        failures: list[FallbackAttempt] = []
        plan = self.plan(prefer)
        index = 0
        while index < len(plan):
            model = plan[index]
            retry = 0
            while True:
                try:
                    return fn(model)
                except BudgetExceeded:
                    raise
                except Exception as exc:
                    action = self._action(exc, retry)
                    failures.append(self._failed(model, retry, exc, action))
                    if action == "raise":
                        self._raise(exc, failures)
                    if action == "retry":
                        self._sleep(self.delay(retry))
                        retry += 1
                        continue
                    index = self._next_index(plan, index, model, action)
                    if index >= len(plan):
                        self._raise(exc, failures)
                    break
        raise AssertionError("unreachable: empty plan")  # pragma: no cover

    async def acall(self, fn: Callable[[str], Awaitable[T]], *, prefer: str | None = None) -> T:
        """:meth:`call` for a coroutine function ``fn``."""
        failures: list[FallbackAttempt] = []
        plan = self.plan(prefer)
        index = 0
        while index < len(plan):
            model = plan[index]
            retry = 0
            while True:
                try:
                    return await fn(model)
                except BudgetExceeded:
                    raise
                except Exception as exc:
                    action = self._action(exc, retry)
                    failures.append(self._failed(model, retry, exc, action))
                    if action == "raise":
                        self._raise(exc, failures)
                    if action == "retry":
                        await self._asleep(self.delay(retry))
                        retry += 1
                        continue
                    index = self._next_index(plan, index, model, action)
                    if index >= len(plan):
                        self._raise(exc, failures)
                    break
        raise AssertionError("unreachable: empty plan")  # pragma: no cover

    # -- decisions -------------------------------------------------------------------------
    def _action(self, exc: BaseException, retry: int) -> str:
        if _matches(exc, self.larger_window_on):
            return "larger window"
        if retry < self.max_retries and _matches(exc, self.retry_on):
            return "retry"
        if _matches(exc, self.fallback_on):
            return "fallback"
        return "raise"

    def _failed(self, model: str, retry: int, exc: BaseException,
                action: str) -> FallbackAttempt:
        attempt = FallbackAttempt(model, retry, exc, action)
        if action == "fallback":  # retries exhausted: let the model rest
            with self._lock:
                self._cooling[model] = self._clock() + self.cooldown
        if self._on_error is not None:
            self._on_error(attempt)
        return attempt

    def _next_index(self, plan: list[str], index: int, model: str, action: str) -> int:
        if action != "larger window":
            return index + 1
        if self.catalog is None:
            raise ConfigurationError(
                "a context-length error needs a catalog (or engine) on the Fallback to find "
                "a model with a larger window")
        window = _window(self.catalog, model)
        for later in range(index + 1, len(plan)):
            if _window(self.catalog, plan[later]) > window:
                return later
        return len(plan)

    @staticmethod
    def _raise(exc: BaseException, failures: list[FallbackAttempt]) -> None:
        if len(failures) > 1 and hasattr(exc, "add_note"):  # Python 3.11+
            trail = ", ".join(f"{f.model}#{f.retry}: {type(f.error).__name__} ({f.action})"
                              for f in failures)
            exc.add_note(f"budgetkit.Fallback attempts: {trail}")
        raise exc


def _window(catalog: PriceCatalog, model: str) -> int:
    price = catalog.get(model)
    return price.context_window or price.max_input_tokens
