"""Offline token counting.

OpenAI models are counted exactly with tiktoken and the encoding of their family (o200k for
gpt-4o / 4.1 / o-series / gpt-5, cl100k for gpt-4 / 3.5 / embeddings). Models without a
local tokenizer (Claude, Gemini, Llama via Groq) are counted with cl100k and the result is
an *estimate*: :func:`is_exact` says which, and the ledger marks estimated rows.

The cl100k and o200k BPE files ship with budgetkit (``pricing/data/``) and are read from
there, without network and without touching the process environment (see ``_bpe``).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

from budgetkit.errors import ConfigurationError

from ._bpe import load_encoding
from ._catalog import PriceCatalog, default_catalog
from ._long_text import LONG_TEXT, count_long_text, encode_long_text

if TYPE_CHECKING:
    import tiktoken

__all__ = [
    "count_tokens",
    "count_message_tokens",
    "count_tool_tokens",
    "chunk_text",
    "encoding_for_model",
    "is_exact",
    "tool_counts_are_exact",
    "ESTIMATE_ENCODING",
]

ESTIMATE_ENCODING = "cl100k_base"
_PREFIX_ENCODINGS = (  # for models not in the catalog, tiktoken-style prefixes
    ("gpt-4o", "o200k_base"), ("gpt-4.1", "o200k_base"), ("gpt-4.5", "o200k_base"),
    ("gpt-5", "o200k_base"), ("o1", "o200k_base"), ("o3", "o200k_base"), ("o4", "o200k_base"),
    ("chatgpt-4o", "o200k_base"), ("gpt-4", "cl100k_base"), ("gpt-3.5", "cl100k_base"),
    ("text-embedding-3", "cl100k_base"), ("text-embedding-ada", "cl100k_base"),
)

_encodings: dict[str, tiktoken.Encoding] = {}
_encoding_lock = threading.Lock()
_model_encodings: dict[tuple[int, str], tuple[str, bool]] = {}
# Token counts of repeated strings (system prompts, history turns) are kept. Bounded to
# 16k strings of at most 8k characters per encoding: at worst ~128 MB of keys, typically far
# less.
_COUNT_CACHE_SIZE = 16_384
_CACHEABLE_CHARS = 8_000  # longer strings are rare repeats; not worth the memory


class _TextCounter:
    """Counts texts in one encoding, remembering the counts of short texts.

    The first count of a text is as cheap as tiktoken itself allows: one plain ``dict`` look-up
    (no lock, no tuple key, no LRU bookkeeping) before ``encode_ordinary`` (which, unlike
    ``encode``, does not scan for special tokens: their text is counted as plain text either
    way). When full, the older half is dropped in one go (first in, first out): a repeated
    string evicted that way is counted again once, which costs less than moving every hit to
    the end of an LRU list.
    """

    __slots__ = ("_encode", "_counts", "_lock")

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self._encode = encoding.encode_ordinary
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def count(self, text: str) -> int:
        found = self._counts.get(text)
        if found is not None:
            return found
        found = (len(self._encode(text)) if len(text) <= LONG_TEXT  # huge: see _long_text
                 else count_long_text(self._encode, text))
        if len(text) <= _CACHEABLE_CHARS:
            if len(self._counts) >= _COUNT_CACHE_SIZE:
                self._drop_older_half()
            self._counts[text] = found
        return found

    def _drop_older_half(self) -> None:
        with self._lock:
            counts = self._counts
            if len(counts) >= _COUNT_CACHE_SIZE:
                # Readers keep using the old dict until they see the new one: no lock to read.
                self._counts = dict(islice(counts.items(), len(counts) // 2, None))

    def clear(self) -> None:
        self._counts = {}


_counters: dict[str, _TextCounter] = {}


def get_encoding(name: str) -> tiktoken.Encoding:
    """A tiktoken encoding, loaded once per process (offline for the bundled ones)."""
    enc = _encodings.get(name)
    if enc is not None:
        return enc
    with _encoding_lock:
        enc = _encodings.get(name)
        if enc is None:
            enc = _encodings[name] = load_encoding(name)
    return enc


def _counter(encoding: str) -> _TextCounter:
    counter = _counters.get(encoding)
    if counter is None:
        enc = get_encoding(encoding)
        with _encoding_lock:
            counter = _counters.setdefault(encoding, _TextCounter(enc))
    return counter


def _encoding_name(model: str, catalog: PriceCatalog | None) -> tuple[str, bool]:
    catalog = catalog if catalog is not None else default_catalog()
    key = (id(catalog), model)
    found = _model_encodings.get(key)
    if found is not None:
        return found
    price = catalog.resolve(model)
    if price is not None:
        result = (price.tokenizer, True) if price.tokenizer else (ESTIMATE_ENCODING, False)
    else:
        bare = model.strip().lower().rsplit("/", 1)[-1]
        result = next(((enc, True) for prefix, enc in _PREFIX_ENCODINGS if bare.startswith(prefix)),
                      (ESTIMATE_ENCODING, False))
    _model_encodings[key] = result
    return result


def encoding_for_model(model: str, *, catalog: PriceCatalog | None = None) -> tiktoken.Encoding:
    """The encoding used to count ``model``'s tokens (cl100k as the estimate for others)."""
    return get_encoding(_encoding_name(model, catalog)[0])


def is_exact(model: str, *, catalog: PriceCatalog | None = None) -> bool:
    """Whether counts for ``model`` are exact (a local tokenizer) rather than estimates."""
    return _encoding_name(model, catalog)[1]


def _count(text: str, encoding: str) -> int:
    return _counter(encoding).count(text)


def count_tokens(text: str, model: str = "gpt-4o", *, catalog: PriceCatalog | None = None) -> int:
    """Number of tokens of ``text`` for ``model`` (special-token text counted as plain text)."""
    if not isinstance(text, str):
        raise ConfigurationError(f"text must be a str, got {type(text).__name__}")
    if not text:
        return 0
    return _count(text, _encoding_name(model, catalog)[0])


# Per-message overheads of OpenAI chat formatting (OpenAI cookbook, "How to count tokens with
# tiktoken"): every message is wrapped as <|start|>{role/name}\n{content}<|end|>\n, and every
# reply is primed with <|start|>assistant<|message|>.
_TOKENS_PER_MESSAGE = 3
_TOKENS_PER_NAME = 1
_REPLY_PRIMING = 3
_LEGACY_0301 = ("gpt-3.5-turbo-0301",)
_IMAGE_TOKENS_LOW = 85  # low-detail image; high detail depends on tiles: an estimate


def _content_text(content: Any) -> tuple[str, int]:
    """Text of a message content and the extra tokens of its non-text parts."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        return content, 0
    if isinstance(content, Sequence):
        texts, extra = [], 0
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping):
                kind = part.get("type")
                if kind == "text" or "text" in part:
                    texts.append(str(part.get("text", "")))
                elif kind in ("image_url", "image", "input_image"):
                    extra += _IMAGE_TOKENS_LOW
        return "".join(texts), extra
    return str(content), 0


def count_message_tokens(messages: Iterable[Mapping[str, Any]], model: str = "gpt-4o", *,
                         tools: Sequence[Mapping[str, Any]] | None = None,
                         catalog: PriceCatalog | None = None) -> int:
    """Prompt tokens of a chat request, as OpenAI bills them.

    ``messages`` are dicts with ``role``, ``content`` (a string or a list of parts), and
    optionally ``name`` and ``tool_calls`` (OpenAI format). Exact for text messages on
    OpenAI models; tool calls, images and non-OpenAI models are estimates.
    """
    encoding, _ = _encoding_name(model, catalog)
    count = _counter(encoding).count
    per_message, per_name = _TOKENS_PER_MESSAGE, _TOKENS_PER_NAME
    if model in _LEGACY_0301:
        per_message, per_name = 4, -1
    total = 0
    for message in messages:
        # type() before isinstance(): the ABC check costs more than counting a short turn.
        if type(message) is not dict and not isinstance(message, Mapping):
            raise ConfigurationError(
                f"messages must be dicts with 'role' and 'content', got {type(message).__name__}"
                " (framework messages are converted by the adapters)")
        total += per_message
        content = message.get("content")
        if type(content) is str:
            total += count(content) if content else 0
        else:
            text, extra = _content_text(content)
            total += extra + (count(text) if text else 0)
        role = message.get("role")
        if role:
            total += count(role if type(role) is str else str(role))
        name = message.get("name")
        if name:
            total += count(str(name)) + per_name
        for call in message.get("tool_calls") or ():
            function = call.get("function", call) if isinstance(call, Mapping) else {}
            arguments = function.get("arguments", function.get("args", ""))
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, separators=(",", ":"))
            total += count(str(function.get("name", ""))) + count(arguments) + 3
        if message.get("tool_call_id"):
            total += count(str(message["tool_call_id"]))
    total += _REPLY_PRIMING
    if tools:
        total += count_tool_tokens(tools, model, catalog=catalog)
    return total


def _utf8_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def message_tokens_bound(messages: Iterable[Mapping[str, Any]]) -> int | None:
    """A cheap upper bound of :func:`count_message_tokens` for plain text messages (role,
    string content, optional name), for any model; ``None`` for anything else (tool calls,
    content parts, images), which must be counted.

    Every token of a byte-level BPE encoding (all budgetkit counts with) stands for at
    least one byte of text, so a text has at most as many tokens as UTF-8 bytes; each
    message adds at most four tokens of chat formatting, the reply's priming three.
    """
    total = _REPLY_PRIMING
    for message in messages:
        if type(message) is not dict:
            return None
        content = message.get("content")
        if content is not None and type(content) is not str:
            return None
        size = 4 + (_utf8_length(content) if content else 0)
        for key, value in message.items():
            if key == "role" or key == "name":
                size += _utf8_length(str(value)) + 1 if value else 0
            elif key != "content" and value:
                return None  # tool calls and ids: count them
        total += size
    return total


def text_tokens_bound(text: str) -> int:
    """An upper bound of :func:`count_tokens` for any model (see message_tokens_bound)."""
    return _utf8_length(text)


@dataclass(frozen=True)
class _ToolOverheads:
    """Tokens OpenAI's hidden tool formatting adds around what the definitions' text encodes to
    (OpenAI cookbook, "How to count tokens with tiktoken", ``num_tokens_for_tools``)."""

    function_start: int  # per function
    properties_start: int  # per function that has properties
    property: int  # per property
    enum_start: int  # per property with an enum
    enum_item: int  # per enum value
    tools_end: int  # once, when there is any function


# The cookbook's constants, checked there against the API's prompt_tokens for its weather
# tool: 101 for gpt-4o and gpt-4o-mini, 105 for gpt-4 and gpt-3.5-turbo.
_GPT_4O_TOOLS = _ToolOverheads(7, 3, 3, -3, 3, 12)
_GPT_4_TOOLS = _ToolOverheads(10, 3, 3, -3, 3, 12)
_TOOL_OVERHEADS_BY_ENCODING = {"o200k_base": _GPT_4O_TOOLS, "cl100k_base": _GPT_4_TOOLS}
# Models (and their dated snapshots) whose tool counts the cookbook checked against the API.
_EXACT_TOOL_MODELS = re.compile(
    r"(gpt-4o(-mini)?(-\d{4}-\d{2}-\d{2})?|gpt-4(-0613)?|gpt-3\.5-turbo(-0125)?)")


def tool_counts_are_exact(model: str, *, catalog: PriceCatalog | None = None) -> bool:
    """Whether :func:`count_tool_tokens` is exact for ``model``: only for the families the
    OpenAI cookbook checked against the API (gpt-4o, gpt-4o-mini, gpt-4, gpt-3.5-turbo);
    every other model's tool count is an estimate (see docs/token-counting.md)."""
    bare = model.strip().lower().rsplit("/", 1)[-1]
    return _EXACT_TOOL_MODELS.fullmatch(bare) is not None and is_exact(model, catalog=catalog)


def count_tool_tokens(tools: Sequence[Mapping[str, Any]], model: str = "gpt-4o", *,
                      catalog: PriceCatalog | None = None) -> int:
    """Tokens that OpenAI-format tool definitions add to a prompt.

    The formatting overheads depend on the model family: gpt-4o's for o200k models (gpt-4o,
    4.1, o-series, gpt-5), gpt-4's for cl100k models (gpt-4, gpt-4-turbo, gpt-3.5-turbo, and
    the cl100k estimate of other providers). Exact for gpt-4o, gpt-4o-mini, gpt-4 and
    gpt-3.5-turbo (the cookbook's example matches the API: 101, 101, 105, 105 prompt tokens);
    an estimate for every other model (:func:`tool_counts_are_exact` says which).
    """
    encoding, _ = _encoding_name(model, catalog)
    overheads = _TOOL_OVERHEADS_BY_ENCODING.get(encoding, _GPT_4_TOOLS)
    total = 0
    for tool in tools:
        function = tool.get("function", tool)
        total += overheads.function_start
        name = str(function.get("name", ""))
        description = str(function.get("description", "")).removesuffix(".")
        total += _count(f"{name}:{description}", encoding)
        properties = (function.get("parameters") or {}).get("properties") or {}
        if properties:
            total += overheads.properties_start
            for key, spec in properties.items():
                total += overheads.property
                p_type = str(spec.get("type", ""))
                p_desc = str(spec.get("description", "")).removesuffix(".")
                if "enum" in spec:
                    total += overheads.enum_start
                    for item in spec["enum"]:
                        total += overheads.enum_item + _count(str(item), encoding)
                total += _count(f"{key}:{p_type}:{p_desc}", encoding)
    if total:
        total += overheads.tools_end
    return total


def chunk_text(text: str, model: str, max_tokens: int, overlap: int = 0, *,
               catalog: PriceCatalog | None = None) -> list[str]:
    """Split ``text`` into chunks of at most ``max_tokens`` tokens, cut on token boundaries.

    Consecutive chunks share ``overlap`` tokens. Boundaries never split a UTF-8 character,
    so every chunk decodes cleanly and re-joining chunks (without overlap) gives ``text``.
    """
    if max_tokens <= 0:
        raise ConfigurationError(f"max_tokens must be > 0, got {max_tokens}")
    if overlap < 0 or overlap >= max_tokens:
        raise ConfigurationError(f"overlap must be >= 0 and < max_tokens, got {overlap}")
    if not text:
        return []
    enc = encoding_for_model(model, catalog=catalog)
    tokens = encode_long_text(enc.encode_ordinary, text)
    token_bytes = [enc.decode_single_token_bytes(t) for t in tokens]
    chunks: list[str] = []
    start = 0
    while start < len(tokens):
        end = min(start + max_tokens, len(tokens))
        # Move the end back until the chunk's bytes end on a character boundary.
        while end > start + 1 and not _decodes(token_bytes, start, end):
            end -= 1
        chunks.append(b"".join(token_bytes[start:end]).decode("utf-8", errors="replace"))
        if end >= len(tokens):
            break
        next_start = max(end - overlap, start + 1)
        while next_start < end and not _starts_clean(token_bytes[next_start]):
            next_start += 1  # never begin inside a multi-byte character
        start = next_start
    return chunks


def _decodes(token_bytes: list[bytes], start: int, end: int) -> bool:
    try:
        b"".join(token_bytes[start:end]).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _starts_clean(first: bytes) -> bool:
    return not first or (first[0] & 0xC0) != 0x80
