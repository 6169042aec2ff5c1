"""What the engine hands out and writes: a :class:`Ticket` per admitted call and a
:class:`UsageRecord` per finished one, and the prompt helpers they use (hash, preview)."""

from __future__ import annotations

import datetime as dt
import hashlib
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from budgetkit.errors import ConfigurationError
from budgetkit.pricing import ModelPrice, nanos_to_decimal, nanos_to_usd

__all__ = ["Ticket", "UsageRecord", "messages_text", "new_id", "prompt_hash", "redact_preview",
           "snapshot_messages"]


def new_id() -> str:
    """A random 128-bit id in hex, like ``uuid4().hex`` but without a system call per LLM
    call (``os.urandom`` releases the GIL: measured ~20 µs per call under load). ``random``
    is seeded from ``os.urandom`` and reseeded in forked children."""
    return f"{random.getrandbits(128):032x}"


class Ticket:
    """An admitted call: who it is for, what it may cost, what it reserved.

    Hand it back to :meth:`Engine.settle` or :meth:`Engine.release`.

    ``input_tokens`` (and ``worst_case_nanos``, which depends on it) may be counted on
    first read: with no budget registered the engine does not count a prompt the provider
    will report the usage of anyway. The count is of the prompt as it was admitted.
    """

    __slots__ = ("id", "model", "price", "_input_tokens", "max_output_tokens",
                 "_worst_case_nanos", "operation_type", "provider", "user_id", "session_id",
                 "project", "request_id", "run_id", "parent_run_id", "root_run_id",
                 "task_type", "attempt", "route_reason", "tags", "metadata", "_prompt_hash",
                 "prompt_preview", "started", "decision", "reservations", "warnings", "done",
                 "_pending_count", "ended", "input_bound")

    def __init__(self, id: str, model: str, price: ModelPrice, input_tokens: int | None,
                 max_output_tokens: int, worst_case_nanos: int | None,
                 operation_type: str = "chat_completion", provider: str | None = None,
                 user_id: str | None = None, session_id: str | None = None,
                 project: str | None = None, request_id: str | None = None,
                 run_id: str | None = None, parent_run_id: str | None = None,
                 root_run_id: str | None = None, task_type: str | None = None,
                 attempt: int | None = None, route_reason: str | None = None,
                 tags: tuple[str, ...] = (), metadata: dict[str, Any] | None = None,
                 prompt_hash: str | Callable[[], str] | None = None,
                 prompt_preview: str | None = None, started: float = 0.0, decision: str = "allow",
                 reservations: list[Any] | None = None, warnings: list[str] | None = None,
                 done: bool = False,
                 pending_count: Callable[[], int] | None = None) -> None:
        self.id = id
        self.model = model
        self.price = price
        self._input_tokens = input_tokens
        self.max_output_tokens = max_output_tokens
        self._worst_case_nanos = worst_case_nanos
        self.operation_type = operation_type
        self.provider = provider
        self.user_id = user_id
        self.session_id = session_id
        self.project = project
        self.request_id = request_id
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.root_run_id = root_run_id
        self.task_type = task_type
        self.attempt = attempt
        self.route_reason = route_reason
        self.tags = tags
        self.metadata = {} if metadata is None else metadata
        #: sha256 of the prompt text, or a callable giving the text (hashed when read)
        self._prompt_hash: str | Callable[[], str] | None = prompt_hash
        self.prompt_preview = prompt_preview
        self.started = started
        #: Outcome of the budget check: "allow", "warn", "downgrade", ... (budgets fill it).
        self.decision = decision
        #: Budget reservations held by this ticket (owned by the budget book).
        self.reservations = [] if reservations is None else reservations
        self.warnings = [] if warnings is None else warnings
        self.done = done
        # Counts the admitted prompt when input_tokens is first read (None once counted).
        self._pending_count = pending_count
        #: When the call really ended, as :meth:`Engine.mark_end` gives it, if it is
        #: finished later than that (an adapter deferring its bookkeeping); None: when
        #: it is finished.
        self.ended: tuple[float, dt.datetime | float] | None = None
        #: An upper bound of the prompt's tokens known without counting it (None: count):
        #: enough to admit the call against a budget with plenty of room.
        self.input_bound: int | None = None
        if input_tokens is None and pending_count is None:
            raise ConfigurationError("a Ticket needs input_tokens or a way to count them")

    @property
    def input_tokens(self) -> int:
        """Prompt tokens as admitted (counted on first read when the engine deferred it)."""
        value = self._input_tokens
        if value is None:
            count = self._pending_count
            if count is None:  # another thread has just counted it
                return self._input_tokens  # type: ignore[return-value]
            value = self._input_tokens = count()
            self._pending_count = None  # counted; drop the prompt it held
        return value

    @input_tokens.setter
    def input_tokens(self, value: int) -> None:
        self._input_tokens = value
        self._pending_count = None
        self._worst_case_nanos = None

    @property
    def prompt_hash(self) -> str | None:
        """A stable hash of the prompt (see :func:`prompt_hash`), for grouping repeats."""
        value = self._prompt_hash
        if value is not None and not isinstance(value, str):
            value = self._prompt_hash = prompt_hash(value())
        return value

    @prompt_hash.setter
    def prompt_hash(self, value: str | None) -> None:
        self._prompt_hash = value

    @property
    def input_counted(self) -> bool:
        """Whether the prompt has been counted yet (see the class docs)."""
        return self._input_tokens is not None

    @property
    def worst_case_nanos(self) -> int:
        """Cost of the prompt plus ``max_output_tokens`` of output, in nano-dollars."""
        value = self._worst_case_nanos
        if value is None:
            value = self._worst_case_nanos = self.price.cost_nanos(self.input_tokens,
                                                                   self.max_output_tokens)
        return value

    @worst_case_nanos.setter
    def worst_case_nanos(self, value: int) -> None:
        self._worst_case_nanos = value

    @property
    def worst_case_cost(self) -> float:
        return nanos_to_usd(self.worst_case_nanos)

    def __repr__(self) -> str:
        tokens = self._input_tokens if self._input_tokens is not None else "<not counted>"
        return (f"Ticket(id={self.id!r}, model={self.model!r}, input_tokens={tokens}, "
                f"max_output_tokens={self.max_output_tokens}, decision={self.decision!r}, "
                f"done={self.done})")


def snapshot_messages(messages: Iterable[Mapping[str, Any]]) -> tuple[Mapping[str, Any], ...]:
    """The prompt as admitted (a later ``messages.append`` must not change what is counted),
    checked now so that bad input fails at admit even when counting is deferred."""
    snapshot = tuple(messages)
    for message in snapshot:
        if type(message) is not dict and not isinstance(message, Mapping):
            raise ConfigurationError(
                f"messages must be dicts with 'role' and 'content', got {type(message).__name__}"
                " (framework messages are converted by the adapters)")
    return snapshot


@dataclass(frozen=True)
class UsageRecord:
    """What one finished call cost: the row the ledger writes."""

    id: str
    created_at: dt.datetime
    model: str
    provider: str | None
    operation_type: str
    status: str
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    total_tokens: int
    cost_nanos: int
    saved_nanos: int
    latency_ms: float | None
    usage_source: str
    error_type: str | None
    user_id: str | None
    session_id: str | None
    project: str | None
    request_id: str | None
    run_id: str | None
    parent_run_id: str | None
    root_run_id: str | None
    task_type: str | None
    attempt: int | None
    route_reason: str | None
    tags: tuple[str, ...]
    metadata: Mapping[str, Any]
    prompt_hash: str | None
    prompt_preview: str | None

    @property
    def cost(self) -> Decimal:
        """Cost in USD, exact (``cost_nanos`` / 1e9); ``format_usd`` prints it."""
        return nanos_to_decimal(self.cost_nanos)

    @property
    def saved(self) -> Decimal:
        """Money a cache hit saved, in USD, exact (``saved_nanos`` / 1e9)."""
        return nanos_to_decimal(self.saved_nanos)

    def as_row(self) -> dict[str, Any]:
        """The record as a dict of :class:`UsageRow` columns (``tags`` a list)."""
        row = dict(self.__dict__)  # every field, without a getattr per field
        row["tags"] = list(self.tags)
        row["metadata"] = dict(self.metadata)
        return row

    @classmethod
    def _from_fields(cls, values: dict[str, Any]) -> UsageRecord:
        """Build from a dict with every field (the engine's hot path: no per-field setattr)."""
        record = object.__new__(cls)
        record.__dict__.update(values)
        return record


def messages_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text of a chat prompt that its hash is of (roles and contents)."""
    return "\x1e".join([f"{m.get('role')}\x1f{m.get('content')}" for m in messages])


def prompt_hash(text: str) -> str:
    """A stable hash of a prompt (sha256, hex, 32 chars), for grouping repeats."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


_REDACT_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"[\w.+-]+@[\w-]+\.[\w.-]+", "<email>"),
    (r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{12,}\b", "<secret>"),
    (r"\b\d(?:[ -]?\d){12,18}\b", "<number>"),
)


def redact_preview(text: str, limit: int = 200) -> str:
    """A short preview with e-mail addresses, API keys and long numbers masked."""
    import re

    preview = text[:limit]
    for pattern, replacement in _REDACT_PATTERNS:
        preview = re.sub(pattern, replacement, preview)
    return preview
