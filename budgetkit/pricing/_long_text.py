"""Counting and encoding very long texts in bounded time and memory.

tiktoken is fast on prose but slow on long runs without whitespace: its pre-tokenizer makes
one piece of a whole run of letters, and byte-pair merging of one piece grows faster than
its length (one 10 MB word took 6.1 s and 570 MB to count, where 10 MB of prose took
0.9 s). Encoding a whole text also holds every token id at once: about 36 bytes per token
as Python ints, 217 MB for 10 MB of prose.

So a text longer than :data:`LONG_TEXT` characters is encoded piece by piece:

- Pieces end at a space that sits between two non-whitespace characters, where both
  encodings budgetkit uses (cl100k_base, o200k_base) always start a new pre-token: none of
  their patterns runs from a non-space character across a space, and the space begins the
  next pre-token whatever follows. BPE never merges across pre-tokens, so the sum of the
  pieces' counts is the exact count.
- A stretch of :data:`WINDOW` characters without such a space (one long word, base64, a
  run of spaces) is cut every :data:`FORCED_PIECE` characters instead (at the last exact
  cut before, when there is one). A forced cut can change the count: measured on random
  strings of 11 scripts (lower case, mixed case, digits, punctuation, base64, CJK,
  Cyrillic, accents, combining marks, emoji; 300 cuts each, both encodings) the pieces
  counted 1 token fewer to 2 more than the whole. Each forced cut adds 1, so a count is at
  most 3 tokens per 8,192 characters of unbroken text above the exact count, and was never
  below it in those measurements.

Bound (``benchmarks/bench_big_prompts.py`` measures it; table in docs/reliability.md):
CPU time linear in the text's length, measured at 0.13 µs per character of prose and
0.25 µs per character of one 10 MB random-letter word (tiktoken alone on that word: 2.0 µs
per character and growing with its length), and memory beyond the text itself bounded by
one piece (at most 64k characters and their tokens; measured peak growth under 10 MB),
whatever the length.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

#: ``Encoding.encode_ordinary`` (special-token text encoded as plain text)
Encode = Callable[[str], list[int]]

__all__ = ["LONG_TEXT", "WINDOW", "FORCED_PIECE", "text_pieces", "count_long_text",
           "encode_long_text"]

#: Texts up to this many characters are encoded in one call (exact; at most ~50 ms).
LONG_TEXT = 65_536
#: The longest piece; a piece ends at the first exact cut after FORCED_PIECE characters.
WINDOW = 65_536
#: Where a stretch with no exact cut is cut; pieces this size encode at the fastest rate.
FORCED_PIECE = 8_192

# A space between two non-whitespace characters (Python's \s includes every character the
# encodings' \s does, so "\S" here is never whitespace to them).
_EXACT_CUT = re.compile(r"(?<=\S) (?=\S)")


def text_pieces(text: str) -> Iterator[tuple[str, bool]]:
    """``text`` as consecutive pieces, each with whether it ends at a forced cut.

    Joined, the pieces are ``text``. Linear time: every character is scanned by the cut
    search a bounded number of times.
    """
    size = len(text)
    pos = 0
    no_cut_until = 0  # no exact cut in [searched_from, no_cut_until): skip it next time
    while size - pos > LONG_TEXT:
        start, end = max(pos + FORCED_PIECE, no_cut_until), pos + WINDOW
        found = _EXACT_CUT.search(text, start, end) if start < end else None
        if found is not None:
            cut, forced = found.start(), False
        else:
            no_cut_until = max(no_cut_until, end - 1)  # (the last place's lookahead was cut)
            last = None
            for last in _EXACT_CUT.finditer(text, pos + 1, pos + FORCED_PIECE + 1):
                pass
            if last is not None:
                cut, forced = last.start(), False
            else:
                cut, forced = pos + FORCED_PIECE, True
        yield text[pos:cut], forced
        pos = cut
    if pos < size:
        yield text[pos:], False


def count_long_text(encode: Encode, text: str) -> int:
    """Tokens of ``text`` in bounded time and memory (see the module's docstring): exact
    up to :data:`LONG_TEXT` characters and when every cut is exact; otherwise at most
    3 tokens per forced cut above the exact count. ``encode`` is an encoding's
    ``encode_ordinary``."""
    if len(text) <= LONG_TEXT:
        return len(encode(text))
    total = 0
    for piece, forced in text_pieces(text):
        total += len(encode(piece)) + forced
    return total


def encode_long_text(encode: Encode, text: str) -> list[int]:
    """Token ids of ``text``, encoded piece by piece: they decode to ``text`` exactly, and
    are the whole text's own ids unless a forced cut was needed. Bounded time; the ids
    themselves take memory in proportion to the text (use :func:`count_long_text` to
    count)."""
    if len(text) <= LONG_TEXT:
        return encode(text)
    tokens: list[int] = []
    for piece, _forced in text_pieces(text):
        tokens.extend(encode(piece))
    return tokens
