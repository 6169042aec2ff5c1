"""Cache keys: a prompt or message list reduced to what the response cache compares.

The exact key is a sha256 over the namespace, the model identity, the canonical prompt or
messages and the parameters that can change an answer. The semantic layer compares the
*focus* (the prompt, or the last user message) inside a partition: namespace, model,
parameters and the conversation before the last user message. A personal request (a
question about the asker, :mod:`._privacy`) carries its user among the parameters, so its
key and partition are that user's alone.

A conversation whose last user message is *standalone* (:func:`is_standalone`: it names
what it asks about and points at nothing earlier, "Does Flixora offer a free trial?") is
partitioned by its system messages only (apart from first questions, which keep their own
partition), so it is served whatever conversation came before.
Any other last message ("cancel it", "yes please", "what will my payment be?") depends on
the turns before it, and is compared only with entries of exactly the same conversation:
measured on the labelled multi-turn pairs, no similarity or fact check over the earlier
turns told reworded conversations from traps whose offers were swapped or reordered.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from budgetkit.errors import ConfigurationError

from ._privacy import Scope, check_scope, is_personal

__all__ = ["CacheRequest", "make_request", "canonical_json", "is_standalone",
           "CONTEXT_MARK"]

#: Separates the question from the exact-context hash in the stored focus of a standalone
#: conversation turn (the table has one text column for what is compared).
CONTEXT_MARK = "\x1f"

# Parameters that never change an answer, so they stay out of the key.
_IGNORED_PARAMS = frozenset({
    "stream", "stream_options", "timeout", "request_timeout", "max_retries", "user",
    "metadata", "tags", "callbacks", "run_name", "run_id", "api_key", "base_url",
    "api_base", "organization", "headers", "extra_headers", "http_client",
})
_MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id", "function_call")


@dataclass(frozen=True)
class CacheRequest:
    """A prompt reduced to what the cache compares."""

    namespace: str
    model: str
    key: str
    params_hash: str
    context_hash: str
    focus: str | None  # None: only exact lookups (no user message to compare)
    #: sha256 of every message before the last one ("" for a prompt or a lone message):
    #: equals ``context_hash`` unless the last user message is standalone.
    exact_context_hash: str = ""
    #: the partition of standalone turns after the same system messages; ``None`` for a
    #: prompt, a lone message or a conversation with tool turns (no such partition)
    standalone_hash: str | None = None
    #: keyed by its user (a question about the asker, or ``scope="user"``)
    personal: bool = False

    @property
    def standalone(self) -> bool:
        """A multi-turn conversation ending in a standalone question."""
        return self.context_hash != self.exact_context_hash

    def partition(self, embedder: str) -> tuple[str, str, str, str, str]:
        return (self.namespace, self.model, self.params_hash, self.context_hash, embedder)

    def partitions(self, embedder: str) -> list[tuple[str, str, str, str, str]]:
        """Where similar entries may be: the own partition first, then the other one of
        (exact context, standalone turns). Entries of standalone turns found from a
        dependent question must carry the same exact context (see :meth:`stored_focus`)."""
        own = self.partition(embedder)
        if self.standalone_hash is None or self.standalone_hash == self.exact_context_hash:
            return [own]
        other = self.exact_context_hash if self.standalone else self.standalone_hash
        return [own, (self.namespace, self.model, self.params_hash, other, embedder)]

    @property
    def stored_focus(self) -> str | None:
        """The focus as stored: a standalone turn keeps its exact context after a mark,
        so a later lookup in the very same conversation can still be served from it."""
        if self.focus is None or not self.standalone:
            return self.focus
        return f"{self.focus}{CONTEXT_MARK}{self.exact_context_hash}"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=repr)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = [part.get("text", "") if isinstance(part, Mapping) else str(part)
                 for part in content]
        return "\n".join(part for part in parts if part)
    return "" if content is None else str(content)


def _canonical_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    canonical = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise ConfigurationError(
                f"messages[{index}] must be a dict with 'role' and 'content', got "
                f"{type(message).__name__}")
        canonical.append({field: message[field] for field in _MESSAGE_FIELDS
                          if message.get(field) is not None})
    return canonical


# Words that point at something said earlier, or at the asker's own account or order.
_DEPENDENT_WORDS = frozenset(
    "it its it's that that's this these those them they they're their there one ones he "
    "she him her his same else also too then either other another former latter such "
    "my mine our ours me us above below yes yeah yep no nope ok okay".split())
_DEPENDENT_STARTS = frozenset("and but so or also then plus".split())
_WORDS = re.compile(r"[a-z]+(?:'[a-z]+)?")


# Words that edit an earlier turn ("actually, make it Saturday", "sorry, I meant ..."),
# and words that choose between things ("which of", "A or B", "better").
_CORRECTING_WORDS = frozenset("actually instead rather meant sorry correction oops wait "
                              "scratch changed".split())
_CHOOSING_WORDS = frozenset("or between versus vs compare compared comparison better best "
                            "either".split())


def is_standalone(text: str, earlier: Sequence[Mapping[str, Any]] = ()) -> bool:
    """Whether a user message can be answered without the conversation before it.

    Conservative on purpose: at least five words, a named thing (a capitalised name, an
    acronym, a quoted or known entity), no pronoun or "my"/"our" that points back at the
    conversation or the asker's own details, no "and ..." / "so ..." continuation, and no
    correction of an earlier turn ("actually", "instead", "I meant"). With the ``earlier``
    messages: not when it names two things the conversation already named, or one while
    choosing ("is Option A or Option B better?" after the options were described: the
    earlier turns set what the names stand for).
    """
    from ._guard import extract_facts
    from ._text import lemma, tokens

    words = _WORDS.findall(text.casefold().replace("\u2019", "'"))
    if len(words) < 5 or words[0] in _DEPENDENT_STARTS:
        return False
    if words[:2] in (["what", "about"], ["how", "about"]):
        return False
    if any(word in _DEPENDENT_WORDS or word in _CORRECTING_WORDS for word in words):
        return False
    # "I'm", "I've" are capitalised inside a sentence but name nothing
    names = {lemma(word) for entity in extract_facts(text).entities
             if not entity.startswith("i'") for word in tokens(entity.removeprefix("q:"))}
    if not names:
        return False
    said = {lemma(word) for message in earlier for word in tokens(_text_of(message.get("content")))}
    named_before = names & said
    choosing = any(word in _CHOOSING_WORDS for word in words) or "which of" in " ".join(words)
    return not (len(named_before) >= 2 or (named_before and choosing))


def _is_plain_turn(message: Mapping[str, Any]) -> bool:
    return message["role"] in ("user", "assistant") and set(message) <= {"role", "content"}


def make_request(*, namespace: str, model: str, prompt: str | None = None,
                 messages: Sequence[Mapping[str, Any]] | None = None,
                 params: Mapping[str, Any] | None = None,
                 standalone_turns: bool = True, user_id: str | None = None,
                 scope: Scope = "auto") -> CacheRequest:
    """Canonicalise one lookup; raises :class:`ConfigurationError` for bad input.

    ``standalone_turns``: key a conversation ending in a standalone question on that
    question alone (see :func:`is_standalone`); off, every earlier turn must match.
    ``user_id`` / ``scope``: a personal request (:func:`._privacy.is_personal` on any user
    message, with ``scope="auto"``) or any request with ``scope="user"`` is keyed by its
    user, so its entries are found by that user only (see :mod:`._privacy`).
    """
    check_scope(scope)
    if user_id is not None and not isinstance(user_id, str):
        raise ConfigurationError(f"user_id must be a string or None, got "
                                 f"{type(user_id).__name__}")
    if not namespace or not isinstance(namespace, str):
        raise ConfigurationError(f"namespace must be a non-empty string, got {namespace!r}")
    if not model or not isinstance(model, str):
        raise ConfigurationError(f"model must be a non-empty string, got {model!r}")
    if (prompt is None) == (messages is None):
        raise ConfigurationError("give exactly one of prompt= or messages=")
    kept = {name: value for name, value in (params or {}).items()
            if name not in _IGNORED_PARAMS and value is not None}
    params_text = canonical_json(kept)
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ConfigurationError(f"prompt must be a string, got {type(prompt).__name__}")
        body: Any = {"prompt": prompt}
        context_hash, focus = "", prompt
        standalone_hash: str | None = None
    else:
        canonical = _canonical_messages(messages or [])
        if not canonical:
            raise ConfigurationError("messages must not be empty")
        body = {"messages": canonical}
        last = canonical[-1]
        standalone_hash = None
        if last["role"] == "user":
            focus = _text_of(last.get("content"))
            context_hash = _sha(canonical_json(canonical[:-1])) if len(canonical) > 1 else ""
            exact_context_hash = context_hash
            system = [message for message in canonical[:-1]
                      if message["role"] in ("system", "developer")]
            turns = [message for message in canonical[:-1] if message not in system]
            if standalone_turns and turns and all(_is_plain_turn(m) for m in turns):
                # standalone questions after these system messages share a partition;
                # not the one of a first question: that stays as it was before
                standalone_hash = _sha(canonical_json({"standalone_after": system}))
                if is_standalone(focus, turns):
                    context_hash = standalone_hash
        else:  # ends with a tool result or an assistant turn: exact matches only
            focus, context_hash = None, _sha(canonical_json(canonical))
            exact_context_hash = context_hash
    if prompt is not None:
        exact_context_hash = ""
    # a standalone last question is answered without the turns before it, so only it
    # decides; any other answer may rest on every earlier user turn
    if focus is not None and (prompt is not None or context_hash != exact_context_hash):
        asked = [focus]
    else:
        asked = [_text_of(m.get("content")) for m in canonical if m["role"] == "user"]
    personal = scope == "user" or (scope == "auto" and any(map(is_personal, asked)))
    if personal:
        # the user joins the parameters: both the exact key and the semantic partition
        # change, so no other user's entry (nor a shared one) is ever a candidate
        asker = "anonymous" if user_id is None else f"user:{user_id}"
        kept = {**kept, "\x00user": _sha(asker)}
        params_text = canonical_json(kept)
    key = _sha(canonical_json({"namespace": namespace, "model": model, "params": kept, **body}))
    return CacheRequest(namespace=namespace, model=model, key=key,
                        params_hash=_sha(params_text), context_hash=context_hash, focus=focus,
                        exact_context_hash=exact_context_hash,
                        standalone_hash=standalone_hash, personal=personal)
