"""Fit prompts to what a model can take: chat history, retrieved documents, plain text.

Every decision is made with exact token counts from :mod:`budgetkit.pricing._tokens` (the model's own
tokenizer; an estimate only for models without one). A history is read newest first and
only until the window is full, and each message's count is remembered (keyed by the fields
the count depends on), so a chat that grows by one turn per call tokenizes only the new turn
and fitting costs about one dictionary lookup per message read, however long the history.

Chat history rules (:func:`fit_messages`):

- system (and ``developer``) messages are always kept, in place;
- the most recent messages that fit are kept, as a suffix of the history;
- an assistant message with ``tool_calls`` and the tool results that follow it are one
  block: kept or dropped together;
- the kept history (after the system messages) starts on a ``user`` message, never on an
  orphan tool result or assistant reply;
- when not even the newest user turn fits, that user message is cut in the middle with a
  marker (``…[truncated N tokens]…``) so the result fits exactly, or
  :class:`ContextWindowExceeded` is raised with ``on_overflow="raise"``.

Inputs are never mutated; a truncated message is a new dict.

Huge messages (a pasted 10 MB log, one 10 MB word) are fitted in time linear in their
length and memory independent of it: the message is counted once, piece by piece (see
``budgetkit/pricing/_long_text.py`` for the count's bound), only the head and tail that
can be kept are encoded, and each try counts only the kept text
(``benchmarks/bench_big_prompts.py`` measures it; figures in docs/reliability.md).

Over 500 lines because history fitting, document fitting and compression share one
counting and one report type; splitting them would scatter the invariants (never split a
tool call from its result, keep the system message) across files.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, NamedTuple, TypeVar

from budgetkit.errors import ConfigurationError, ContextWindowExceeded
from budgetkit.pricing import (
    PriceCatalog,
    count_message_tokens,
    count_tokens,
    default_catalog,
    encode_long_text,
    encoding_for_model,
)

__all__ = [
    "FitReport",
    "FitResult",
    "CompressionReport",
    "CompressedPrompt",
    "DEFAULT_PHRASES",
    "DEFAULT_RESERVE_CAP",
    "fit_messages",
    "fit_documents",
    "compress_prompt",
    "prompt_token_limit",
]

T = TypeVar("T")
OnOverflow = Literal["truncate", "raise"]

SYSTEM_ROLES = frozenset({"system", "developer"})
TOOL_RESULT_ROLES = frozenset({"tool", "function"})
# When the caller does not say how long the reply may be, this much of the window is kept
# free for it: the model's max_output_tokens, but at most 4,096. Reserving a model's full
# maximum (128k for gpt-5) would throw away history most replies never need; callers that
# set a larger max_tokens on the call pass the same value as ``reserve_output``.
DEFAULT_RESERVE_CAP = 4096
_MARKER = "…[truncated {n} tokens]…"


class FitReport:
    """What a fit did. ``kept`` holds the input positions of the kept items, in order.

    ``tokens_before`` is the whole input's count. A fit reads a history newest first and
    stops where the window is full, so the older messages it dropped are counted only when
    ``tokens_before`` is first read.
    """

    __slots__ = ("_tokens_before", "tokens_after", "limit", "dropped", "truncated", "kept",
                 "truncated_index")

    def __init__(self, tokens_before: int | Callable[[], int], tokens_after: int, limit: int,
                 dropped: int, truncated: bool = False, kept: tuple[int, ...] = (),
                 truncated_index: int | None = None) -> None:
        self._tokens_before = tokens_before
        self.tokens_after = tokens_after
        self.limit = limit
        self.dropped = dropped
        self.truncated = truncated
        self.kept = kept
        self.truncated_index = truncated_index  # input position of the item that was cut

    @property
    def tokens_before(self) -> int:
        value = self._tokens_before
        if not isinstance(value, int):
            value = self._tokens_before = value()
        return value

    @property
    def tokens_saved(self) -> int:
        return self.tokens_before - self.tokens_after

    def _fields(self) -> tuple[Any, ...]:
        return (self.tokens_before, self.tokens_after, self.limit, self.dropped, self.truncated,
                self.kept, self.truncated_index)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FitReport) and self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        names = ("tokens_before", "tokens_after", "limit", "dropped", "truncated", "kept",
                 "truncated_index")
        kept = self.kept if len(self.kept) <= 8 else f"({len(self.kept)} positions)"
        values = dict(zip(names, self._fields()), kept=kept)
        return "FitReport(" + ", ".join(f"{k}={v!r}" if k != "kept" else f"kept={v}"
                                        for k, v in values.items()) + ")"


@dataclass(frozen=True)
class FitResult(Generic[T]):
    """The kept items and the report; unpacks as ``items, report = fit_...(...)``."""

    items: list[T]
    report: FitReport

    def __iter__(self) -> Iterator[Any]:  # a NamedTuple cannot be generic before 3.11
        return iter((self.items, self.report))

    @property
    def messages(self) -> list[T]:
        return self.items

    @property
    def documents(self) -> list[T]:
        return self.items


# ---------------------------------------------------------------------------- limits

def prompt_token_limit(model: str, *, reserve_output: int | None = None,
                       max_tokens: int | None = None,
                       catalog: PriceCatalog | None = None) -> int:
    """Prompt tokens ``model`` can take while leaving room for the reply.

    ``max_tokens``, when given, is the room the call has and the catalog is not consulted:
    the allowance is ``max_tokens - reserve_output`` (``reserve_output`` defaults to 0 here,
    so ``max_tokens`` alone is the allowance itself). Both arguments are always honoured; a
    ``reserve_output`` that leaves no room raises :class:`ConfigurationError`.
    Otherwise: the catalog's context window minus ``reserve_output`` (default: the model's
    max_output_tokens, at most :data:`DEFAULT_RESERVE_CAP`), and never more than the model's
    max_input_tokens.
    """
    if reserve_output is not None and (isinstance(reserve_output, bool)
                                       or not isinstance(reserve_output, int)
                                       or reserve_output < 0):
        raise ConfigurationError(f"reserve_output must be an int >= 0, got {reserve_output!r}")
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise ConfigurationError(f"max_tokens must be a positive int, got {max_tokens!r}")
        allowance = max_tokens - (reserve_output or 0)
        if allowance <= 0:
            raise ConfigurationError(
                f"reserve_output={reserve_output} leaves no room for a prompt in "
                f"max_tokens={max_tokens}")
        return allowance
    price = (catalog if catalog is not None else default_catalog()).get(model)
    if not price.context_window:
        raise ConfigurationError(f"the catalog has no context window for {model!r}; "
                                 "pass max_tokens")
    if reserve_output is None:
        reserve_output = min(price.max_output_tokens or DEFAULT_RESERVE_CAP, DEFAULT_RESERVE_CAP)
    limit = price.context_window - reserve_output
    if price.max_input_tokens:
        limit = min(limit, price.max_input_tokens)
    if limit <= 0:
        raise ConfigurationError(
            f"reserve_output={reserve_output} leaves no room for a prompt in {model!r}'s "
            f"{price.context_window}-token window")
    return limit


# ---------------------------------------------------------------------------- messages

class _MessageCounter:
    """Tokens of single messages, so that a list's count is the sum plus fixed parts.

    ``count_message_tokens`` is additive: per-message tokens, plus reply priming once, plus
    tool definitions once. Counting ``[m]`` and subtracting the priming gives ``m``'s share.
    Messages with string fields (text turns, tool calls, tool results) are remembered by
    those fields, so a history that grows by one turn per call is counted once in all.
    """

    def __init__(self, model: str, catalog: PriceCatalog | None) -> None:
        self.model, self.catalog = model, catalog
        self.priming = count_message_tokens((), model, catalog=catalog)
        self._prefix = (model, encoding_for_model(model, catalog=catalog).name)
        self._this_fit: dict[int, tuple[Mapping[str, Any], int]] = {}

    def __call__(self, message: Mapping[str, Any]) -> int:
        return count_message_tokens((message,), self.model, catalog=self.catalog) - self.priming

    def tools(self, tools: Sequence[Mapping[str, Any]] | None) -> int:
        if not tools:
            return 0
        return count_message_tokens((), self.model, tools=tools, catalog=self.catalog) - self.priming

    def cached(self, message: Mapping[str, Any]) -> int:
        """``message``'s tokens, remembered by the fields the count depends on."""
        key = _cache_key(message)
        if key is None:  # long or multipart: remembered for this fit only, by identity
            found = self._this_fit.get(id(message))
            if found is None or found[0] is not message:
                found = self._this_fit[id(message)] = (message, self(message))
            return found[1]
        key = (self._prefix, *key)
        tokens = _MESSAGE_COUNTS.get(key)
        if tokens is None:
            tokens = self(message)
            _remember(key, tokens)
        return tokens


# (model, encoding), role, content, name, tool_call_id, tool calls -> tokens of one message.
_MESSAGE_COUNTS: dict[tuple[Any, ...], int] = {}
_MESSAGE_COUNTS_MAX = 65_536
_MESSAGE_COUNTS_LOCK = threading.Lock()
_CACHEABLE_CHARS = 32_000


def _remember(key: tuple[Any, ...], tokens: int) -> None:
    with _MESSAGE_COUNTS_LOCK:  # reads stay lock-free; only eviction iterates the dict
        if len(_MESSAGE_COUNTS) >= _MESSAGE_COUNTS_MAX:
            # Forget the oldest quarter (dicts keep insertion order): live histories are
            # re-counted only for what they still use.
            for old in list(itertools.islice(_MESSAGE_COUNTS, _MESSAGE_COUNTS_MAX // 4)):
                del _MESSAGE_COUNTS[old]
        _MESSAGE_COUNTS[key] = tokens


def _cache_key(message: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """Exactly the fields count_message_tokens reads, when they are all plain strings;
    ``None`` for messages it is simpler to count every time (multipart content)."""
    content, name = message.get("content"), message.get("name")
    call_id, calls = message.get("tool_call_id"), message.get("tool_calls")
    if content is not None and (type(content) is not str or len(content) > _CACHEABLE_CHARS):
        return None
    if (name is not None and type(name) is not str) or (call_id is not None
                                                        and type(call_id) is not str):
        return None
    calls_key: tuple[tuple[str, str], ...] | None = None
    if calls:
        parts = []
        for call in calls:
            function = call.get("function") if isinstance(call, Mapping) else None
            if not isinstance(function, Mapping):
                return None
            fname, arguments = function.get("name"), function.get("arguments")
            if type(fname) is not str or type(arguments) is not str:
                return None
            parts.append((fname, arguments))
        calls_key = tuple(parts)
    return (message["role"], content, name, call_id, calls_key)


def _not_a_message(position: int, message: Any) -> ConfigurationError:
    return ConfigurationError(
        f"messages[{position}] must be a dict with a 'role' string (OpenAI format), got "
        f"{type(message).__name__}; framework messages go through the adapters")


def _roles(messages: Sequence[Any]) -> list[str]:
    """Each message's role; checks that every message is a dict with a role string."""
    roles = []
    for i, message in enumerate(messages):
        if type(message) is not dict and not isinstance(message, Mapping):
            raise _not_a_message(i, message)
        role = message.get("role")
        if type(role) is not str:
            raise _not_a_message(i, message)
        roles.append(role)
    return roles


def _blocks_from_end(msgs: Sequence[Mapping[str, Any]], roles: Sequence[str],
                     count: _MessageCounter) -> Iterator[tuple[list[int], int]]:
    """The non-system messages as blocks kept or dropped whole, newest first, with tokens.

    An assistant message with tool_calls and the tool results right after it (system
    messages aside) are one block; a tool result without such a call is a block alone.
    Messages are counted as they are reached, so a fit counts only what it looks at.
    """
    pending: list[int] = []  # tool results waiting for their call, newest first
    pending_tokens = 0
    for i in range(len(msgs) - 1, -1, -1):
        role = roles[i]
        if role in SYSTEM_ROLES:
            continue
        if role in TOOL_RESULT_ROLES:
            pending.append(i)
            pending_tokens += count.cached(msgs[i])
            continue
        tokens = count.cached(msgs[i])
        if pending:
            if role == "assistant" and msgs[i].get("tool_calls"):
                yield [i, *reversed(pending)], tokens + pending_tokens
                pending, pending_tokens = [], 0
                continue
            for j in pending:
                yield [j], count.cached(msgs[j])
            pending, pending_tokens = [], 0
        yield [i], tokens
    for j in pending:
        yield [j], count.cached(msgs[j])


def fit_messages(messages: Sequence[Mapping[str, Any]], model: str, *,
                 reserve_output: int | None = None, max_tokens: int | None = None,
                 on_overflow: OnOverflow = "truncate",
                 tools: Sequence[Mapping[str, Any]] | None = None,
                 catalog: PriceCatalog | None = None) -> FitResult[Mapping[str, Any]]:
    """Keep the system messages and the most recent turns of ``messages`` that fit.

    ``messages`` are OpenAI-format dicts (``role``, ``content``, ``name``, ``tool_calls``,
    ``tool_call_id``). The allowance is ``max_tokens - reserve_output`` when ``max_tokens`` is
    given (``reserve_output`` then defaults to 0: with both, both are honoured, e.g.
    ``reserve_output=1000, max_tokens=4000`` allows 3,000 prompt tokens), else ``model``'s
    window minus ``reserve_output`` (see :func:`prompt_token_limit`); ``tools`` are counted
    in it.
    The kept prompt, counted with :func:`count_message_tokens` (tools included), is
    ``report.tokens_after`` and never exceeds ``report.limit``. A history that fits whole is
    returned whole.

    Raises :class:`ContextWindowExceeded` when the system messages and tools alone do not
    fit, or when the newest user turn does not fit and either ``on_overflow="raise"`` or
    cutting the user message cannot make it fit (the replies and tool results after it are
    never cut).
    """
    msgs = list(messages)
    return fit_message_sequence(msgs, _roles(msgs), model, reserve_output=reserve_output,
                                max_tokens=max_tokens, on_overflow=on_overflow, tools=tools,
                                catalog=catalog)


class LazyOpenAIMessages(Sequence[Mapping[str, Any]]):
    """Framework messages seen as OpenAI dicts, each converted when the fitter first reads it:
    a fit reads the newest messages up to the window, so long histories are mostly never
    converted. Adapters subclass it with ``_convert`` (one message) and ``role``."""

    def __init__(self, messages: list[Any]) -> None:
        self._messages = messages
        self._converted: list[dict[str, Any] | None] = [None] * len(messages)

    def __len__(self) -> int:
        return len(self._messages)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        found = self._converted[index]
        if found is None:
            found = self._converted[index] = self._convert(index)
        return found

    def _convert(self, index: int) -> dict[str, Any]:
        """The OpenAI form of ``self._messages[index]``."""
        raise NotImplementedError

    def role(self, index: int) -> str:
        """The OpenAI role of ``self._messages[index]``."""
        raise NotImplementedError


def fit_message_sequence(msgs: Sequence[Mapping[str, Any]], roles: Sequence[str], model: str, *,
                         reserve_output: int | None = None, max_tokens: int | None = None,
                         on_overflow: OnOverflow = "truncate",
                         tools: Sequence[Mapping[str, Any]] | None = None,
                         catalog: PriceCatalog | None = None) -> FitResult[Mapping[str, Any]]:
    """:func:`fit_messages` for framework adapters: ``msgs[i]`` may convert a framework
    message on first access (only the messages a fit reads are converted), ``roles`` are the
    OpenAI roles of all messages. Not public API."""
    if on_overflow not in ("truncate", "raise"):
        raise ConfigurationError(f"on_overflow must be 'truncate' or 'raise', got {on_overflow!r}")
    limit = prompt_token_limit(model, reserve_output=reserve_output, max_tokens=max_tokens,
                               catalog=catalog)
    count = _MessageCounter(model, catalog)
    system = [i for i, role in enumerate(roles) if role in SYSTEM_ROLES]
    fixed = count.priming + count.tools(tools) + sum(count.cached(msgs[i]) for i in system)
    if fixed > limit:
        raise ContextWindowExceeded(
            f"the system messages and tools alone take {fixed} tokens, more than the "
            f"{limit} allowed for {model!r}", tokens=fixed, limit=limit)
    has_user = "user" in roles

    def can_start(block: list[int]) -> bool:
        # The kept history begins on a user message; in a history without any, on any
        # block that is not an orphan tool result.
        role = roles[block[0]]
        return role == "user" if has_user else role not in TOOL_RESULT_ROLES

    room = limit - fixed
    walked: list[tuple[list[int], int]] = []  # blocks that fit, newest first
    used, starts_at, overflow = 0, 0, None
    blocks = _blocks_from_end(msgs, roles, count)
    for block, tokens in blocks:
        if used + tokens > room:
            overflow = (block, tokens)
            break
        walked.append((block, tokens))
        used += tokens
        if can_start(block):
            starts_at = len(walked)
    if overflow is None:  # everything fits
        return FitResult(list(msgs), FitReport(fixed + used, fixed + used, limit, 0,
                                         kept=tuple(range(len(msgs)))))

    def tokens_before() -> int:
        older = [msgs[i] for i in range(overflow[0][0]) if roles[i] not in SYSTEM_ROLES]
        return fixed + used + overflow[1] + sum(count.cached(m) for m in older)

    if starts_at:
        kept = sorted(system + [i for block, _ in walked[:starts_at] for i in block])
        tokens_after = fixed + sum(tokens for _, tokens in walked[:starts_at])
        return FitResult([msgs[i] for i in kept],
                         FitReport(tokens_before, tokens_after, limit, len(msgs) - len(kept),
                                   kept=tuple(kept)))

    # Not even the newest turn fits: find where it starts, then cut its user message.
    turn = [*walked, overflow]
    if not can_start(overflow[0]):
        for block, tokens in blocks:
            turn.append((block, tokens))
            if can_start(block):
                break
    turn_tokens = fixed + sum(tokens for _, tokens in turn)
    first = turn[-1][0][0]
    if not can_start(turn[-1][0]) or on_overflow == "raise" or roles[first] != "user":
        raise ContextWindowExceeded(
            f"the newest turn takes {turn_tokens} tokens with the system messages, more than "
            f"the {limit} allowed for {model!r}", tokens=turn_tokens, limit=limit)
    after = sum(tokens for _, tokens in turn[:-1])
    cut = _truncate_middle(msgs[first], limit - fixed - after, model, count)
    if cut is None:
        raise ContextWindowExceeded(
            f"the newest turn does not fit in the {limit} tokens allowed for {model!r} even "
            f"with its user message cut: the replies and tool results after it take {after}",
            tokens=turn_tokens, limit=limit)
    cut_message, cut_tokens = cut
    kept = sorted(system + [i for block, _ in turn for i in block])
    out = [cut_message if i == first else msgs[i] for i in kept]
    return FitResult(out, FitReport(tokens_before, fixed + cut_tokens + after, limit,
                                    len(msgs) - len(kept), truncated=True, kept=tuple(kept),
                                    truncated_index=first))


def _truncate_middle(message: Mapping[str, Any], allowance: int, model: str,
                     count: _MessageCounter) -> tuple[dict[str, Any], int] | None:
    """A copy of ``message`` whose text is cut in the middle so the message takes at most
    ``allowance`` tokens, with its exact count; ``None`` if no cut is short enough."""
    content = message.get("content")
    if isinstance(content, str):
        text = content

        def rebuild(new_text: str) -> dict[str, Any]:
            return {**message, "content": new_text}
    elif isinstance(content, list):
        # Cut the longest text part; images and other parts stay.
        text_parts = [i for i, p in enumerate(content)
                      if isinstance(p, Mapping) and isinstance(p.get("text"), str)]
        if not text_parts:
            return None
        longest = max(text_parts, key=lambda i: len(content[i]["text"]))
        text = content[longest]["text"]

        def rebuild(new_text: str) -> dict[str, Any]:
            parts = list(content)
            parts[longest] = {**content[longest], "text": new_text}
            return {**message, "content": parts}
    else:
        return None

    encoding = encoding_for_model(model, catalog=count.catalog)
    empty = count(rebuild(""))
    # The text's tokens: the message's count (remembered from the fit) less the rest of it.
    n = (count.cached(message) - empty if isinstance(content, str)
         else count_tokens(text, model, catalog=count.catalog))
    # Start from the arithmetic guess, then shrink by the measured overshoot: token counts of
    # joined strings are not additive (BPE merges at the seams), so each try is counted.
    keep = allowance - empty - count_tokens(_MARKER.format(n=n), model, catalog=count.catalog)
    keep = min(keep, n - 1)
    # Only the ends that can be kept are encoded, never the whole text (10 MB: 570 MB of
    # token ids before), and each try counts only what it keeps.
    heads = _edge_tokens(encoding, text, keep - keep // 2, from_end=False)
    tails = _edge_tokens(encoding, text, keep // 2, from_end=True)
    while keep >= 0:
        head = encoding.decode_bytes(heads[: keep - keep // 2]).decode("utf-8", "ignore")
        tail = encoding.decode_bytes(tails[len(tails) - keep // 2:] if keep // 2 else []
                                     ).decode("utf-8", "ignore")
        overlap = len(head) + len(tail) - len(text)
        if overlap >= 0:  # (the ends' own tokenizations met in the middle)
            tail = tail[overlap + 1:]
        candidate = rebuild(head + _MARKER.format(n=n - keep) + tail)
        used = count(candidate)
        if used <= allowance:
            return candidate, used
        keep -= max(1, used - allowance)
    return None


def _edge_tokens(encoding: Any, text: str, want: int, *, from_end: bool) -> list[int]:
    """The first (``from_end``: last) ``want`` token ids of ``text``, encoding only as much
    of that end as needed (a prefix four characters per wanted token long, doubled until it
    holds more than ``want``). Decoded, they are a prefix (suffix) of ``text``."""
    if want <= 0:
        return []
    size = min(len(text), 4 * want + 16)
    while True:
        piece = text[len(text) - size:] if from_end else text[:size]
        tokens = encode_long_text(encoding.encode_ordinary, piece)
        if len(tokens) > want or size == len(text):
            # (> want: the token cut by the piece's artificial edge is left out)
            return tokens[len(tokens) - want:] if from_end else tokens[:want]
        size = min(len(text), size * 2)


# ---------------------------------------------------------------------------- documents

_DOC_KEYS = ("text", "page_content", "content")


def _document_text(doc: Any, position: int, text_key: str | None) -> str:
    if isinstance(doc, str):
        return doc
    keys = (text_key,) if text_key else _DOC_KEYS
    if isinstance(doc, Mapping):
        for key in keys:
            value = doc.get(key)
            if isinstance(value, str):
                return value
    else:  # framework documents: LangChain Document.page_content, LlamaIndex node .text
        for key in keys:
            value = getattr(doc, key, None)
            if isinstance(value, str):
                return value
    raise ConfigurationError(
        f"docs[{position}] has no text: expected a str or a document with a "
        f"{' / '.join(repr(k) for k in keys)} string, got {type(doc).__name__}")


def fit_documents(docs: Sequence[T], model: str | None = None, *, max_tokens: int | None = None,
                  reserve_output: int | None = None, separator: str = "\n\n",
                  text_key: str | None = None,
                  catalog: PriceCatalog | None = None) -> FitResult[T]:
    """Keep the highest-ranked ``docs`` whose text fits the allowance, in their given order.

    ``docs`` are in rank order, best first: strings, dicts with a ``text`` (or
    ``page_content`` / ``content``, or ``text_key``) string, or objects with such an
    attribute. The allowance is ``max_tokens`` minus ``reserve_output`` (default 0 then),
    or ``model``'s window minus ``reserve_output``. Documents are taken best first; one that
    does not fit is skipped and
    smaller, lower-ranked ones may still fill the room. ``report.tokens_after`` is the exact
    count of the kept texts joined with ``separator`` (``tokens_before``, all of them joined,
    is counted when first read). Counts use ``model``'s tokenizer (gpt-4o's when no model is
    given).
    """
    if model is None and max_tokens is None:
        raise ConfigurationError("fit_documents needs a model or max_tokens")
    counting_model = model or "gpt-4o"
    limit = prompt_token_limit(counting_model, reserve_output=reserve_output,
                               max_tokens=max_tokens, catalog=catalog)
    items = list(docs)
    texts = [_document_text(d, i, text_key) for i, d in enumerate(items)]

    def joined_tokens(positions: Sequence[int]) -> int:
        return count_tokens(separator.join(texts[i] for i in positions), counting_model,
                            catalog=catalog)

    counts = [count_tokens(t, counting_model, catalog=catalog) for t in texts]
    gap = count_tokens(separator, counting_model, catalog=catalog)
    kept: list[int] = []
    used = 0
    for i, tokens in enumerate(counts):
        need = tokens + (gap if kept else 0)
        if used + need <= limit:
            kept.append(i)
            used += need
    tokens_after = joined_tokens(kept)
    while tokens_after > limit:  # a seam merged differently than the parts: drop the lowest
        kept.pop()
        tokens_after = joined_tokens(kept)
    return FitResult([items[i] for i in kept],
                     FitReport(lambda: joined_tokens(range(len(items))), tokens_after, limit,
                               len(items) - len(kept), kept=tuple(kept)))


# ---------------------------------------------------------------------------- compression

# Conservative rewrites from the Cost Optimization Reference's PromptOptimizer, without its
# ambiguous ones ("that is" -> "i.e." also rewrites "the file that is open"). Pass your own
# table, or this one, as compress_prompt(text, phrases=DEFAULT_PHRASES).
DEFAULT_PHRASES: Mapping[str, str] = {
    "for example": "e.g.",
    "please provide": "provide",
    "I would like you to": "",
    "Could you please": "",
    "in order to": "to",
    "due to the fact that": "because",
    "at this point in time": "now",
}


@dataclass(frozen=True, slots=True)
class CompressionReport:
    tokens_before: int
    tokens_after: int
    replacements: int  # phrase-table replacements made

    @property
    def tokens_saved(self) -> int:
        return self.tokens_before - self.tokens_after


class CompressedPrompt(NamedTuple):
    """The compressed text and its report; unpacks as ``text, report``."""

    text: str
    report: CompressionReport


_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})")
_QUOTE_LINE = re.compile(r"^[ \t]*>")
_INLINE_PROTECTED = re.compile(r'`[^`\n]+`|"[^"]*"|“[^”]*”')


def _protect(text: str) -> tuple[str, list[str], str]:
    """Replace fenced code blocks, '>' quote lines and quoted or inline-code spans with
    placeholders so no rewrite can reach them. Returns (text, originals, sentinel)."""
    sentinel = next(chr(c) for c in range(0xE000, 0xF8FF) if chr(c) not in text)
    saved: list[str] = []

    def hold(original: str) -> str:
        saved.append(original)
        return f"{sentinel}{len(saved) - 1}{sentinel}"

    out: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence:
            mark = fence.group(1)
            end = next((j for j in range(i + 1, len(lines))
                        if lines[j].lstrip(" \t").startswith(mark[0] * len(mark))), len(lines) - 1)
            out.append(hold("\n".join(lines[i:end + 1])))
            i = end + 1
        elif _QUOTE_LINE.match(lines[i]):
            out.append(hold(lines[i]))
            i += 1
        else:
            out.append(lines[i])
            i += 1
    joined = "\n".join(out)
    return _INLINE_PROTECTED.sub(lambda m: hold(m.group(0)), joined), saved, sentinel


def _phrase_pattern(phrases: Mapping[str, str]) -> re.Pattern[str]:
    ordered = sorted(phrases, key=len, reverse=True)  # longest first: no partial overlaps
    alternatives = "|".join(re.escape(p) for p in ordered)
    return re.compile(rf"(?<!\w)(?P<phrase>{alternatives})(?!\w)(?P<space>[ \t]*)(?P<next>\w?)",
                      re.IGNORECASE)


def compress_prompt(text: str, model: str = "gpt-4o", *,
                    phrases: Mapping[str, str] | None = None,
                    catalog: PriceCatalog | None = None) -> CompressedPrompt:
    """Conservative token reductions that keep the meaning.

    Collapses runs of spaces and tabs inside lines (indentation is kept), strips trailing
    whitespace, turns runs of blank lines into one, and applies ``phrases`` (a mapping of
    phrase -> shorter phrase, matched on word boundaries, ignoring case) when given.
    Fenced code blocks, ``>`` quote lines, ``"quoted"`` text and inline ``code`` are never
    changed. If the result would not be shorter in tokens the text is returned unchanged.
    """
    if not isinstance(text, str):
        raise ConfigurationError(f"text must be a str, got {type(text).__name__}")
    if phrases is not None and (not isinstance(phrases, Mapping) or not all(
            isinstance(k, str) and k and isinstance(v, str) for k, v in phrases.items())):
        raise ConfigurationError("phrases must map non-empty strings to strings")
    tokens_before = count_tokens(text, model, catalog=catalog)
    work, saved, sentinel = _protect(text)
    replacements = 0
    if phrases:
        lookup = {k.lower(): v for k, v in phrases.items()}
        pattern = _phrase_pattern(phrases)

        def replace(match: re.Match[str]) -> str:
            nonlocal replacements
            replacements += 1
            found, nxt = match.group("phrase"), match.group("next")
            short = lookup[found.lower()]
            # At a sentence start the capital letter stays: "For example" -> "E.g.", and
            # "Could you please check" -> "Check". ("I would like you to" mid-sentence is not.)
            before = match.string[:match.start()].rstrip(" \t")
            capital = found[:1].isupper() and (not before or before[-1] in ".!?:\n")
            if short:
                if capital:
                    short = short[:1].upper() + short[1:]
                return short + match.group("space") + nxt
            # A dropped sentence opener hands its capital letter to the next word.
            return nxt.upper() if capital else nxt

        work = pattern.sub(replace, work)
    lines = []
    for line in work.split("\n"):
        indent = len(line) - len(line.lstrip(" \t"))
        lines.append(line[:indent] + re.sub(r"[ \t]{2,}", " ", line[indent:]).rstrip(" \t")
                     if line.strip(" \t") else "")
    work = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
    restore = re.compile(rf"{sentinel}(\d+){sentinel}")
    result = work
    while sentinel in result:  # a quoted span may hold a placeholder (a fence inside quotes)
        result = restore.sub(lambda m: saved[int(m.group(1))], result)
    tokens_after = count_tokens(result, model, catalog=catalog)
    if tokens_after >= tokens_before:
        return CompressedPrompt(text, CompressionReport(tokens_before, tokens_before, 0))
    return CompressedPrompt(result, CompressionReport(tokens_before, tokens_after, replacements))
