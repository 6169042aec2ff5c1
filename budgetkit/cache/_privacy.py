"""Whose answer is it? Questions about the asker stay with the asker.

"What is the capital of France?" has one answer for everybody; "what's my balance?",
"where is order 48213?" and "am I eligible for a refund?" have one per user, and serving
one user's answer to another leaks it. With ``scope="auto"`` (the default) a request is
*personal* when any user message in it:

* uses a first-person possessive ("my", "mine", "our", "ours", "myself"), also when it
  asks for steps ("how do I reset my password?");
* asks about the asker's own state ("am I", "did I", "have I", "was I", "do I have",
  "how much do I owe", "I'm", "I've", "I was", "I got", ...). Not "how many ... do I
  need" or "when do I file": generic questions in the first person, and a wider net here
  was measured to split paraphrases onto two sides;
* names a record: a run of five or more digits, or a code of letters and at least three
  digits ("order 48213", "ticket AB12345").

A personal request is keyed by its user (``user_id``; requests without one share one
anonymous slot, which is never served to a request that has a user, nor the reverse).
``scope="user"`` keys every request by user, ``scope="shared"`` none. The rules lean to
personal: a shared question taken for personal costs a hit, the reverse leaks an answer.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from budgetkit.errors import ConfigurationError

__all__ = ["Scope", "check_scope", "is_personal"]

Scope = Literal["auto", "shared", "user"]

_WORDS = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_POSSESSIVES = frozenset("my mine our ours myself ourselves".split())
_SELF_STATE = re.compile(
    r"\b(?:am i|did i|have i|had i|was i|were we|do i have|did we|have we|are we|"
    r"i'm|i've|i'd|i was|i got|i paid|i ordered|i bought|i booked|i have been|i've been|"
    r"i owe)\b")

# five or more digits in a row, or letters with three or more digits ("ab12345", "x-9921"),
# not "python3", "iphone15" or a year
_RECORD = re.compile(r"\b(?:\d{5,}|(?=[a-z0-9-]*[a-z])(?=(?:[a-z-]*\d){3})[a-z0-9-]{5,})\b")


def check_scope(scope: object) -> Scope:
    """``scope`` if it is one of "auto", "shared", "user"; else a ConfigurationError."""
    if scope not in get_args(Scope):
        raise ConfigurationError(
            f"scope must be one of 'auto', 'shared', 'user', got {scope!r}")
    return scope  # type: ignore[return-value]


def is_personal(text: str) -> bool:
    """Whether ``text`` asks about the asker (see the module docstring)."""
    lowered = text.casefold().replace("\u2019", "'")
    if any(word in _POSSESSIVES for word in _WORDS.findall(lowered)):
        return True
    return bool(_SELF_STATE.search(lowered) or _RECORD.search(lowered))
