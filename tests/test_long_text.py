"""Huge texts are counted, chunked and fitted piece by piece (budgetkit/pricing/_long_text):
exact wherever a piece ends at a space between two words, within the documented bound
where a whitespace-free stretch had to be cut, and never holding more than one piece.
The time and memory figures are measured by benchmarks/bench_big_prompts.py, not here."""

from __future__ import annotations

import random
import string

import pytest

from budgetkit import count_message_tokens, count_tokens, fit_messages
from budgetkit.pricing import chunk_text, count_long_text, encode_long_text
from budgetkit.pricing._long_text import FORCED_PIECE, LONG_TEXT, WINDOW, text_pieces
from budgetkit.pricing._tokens import get_encoding

ENCODINGS = ["o200k_base", "cl100k_base"]


def prose(size: int, seed: int) -> str:
    """Words with every kind of gap the pre-tokenizers treat specially."""
    rng = random.Random(seed)
    gaps = [" ", "  ", "\n", " \n ", "\t", ". ", ", ", "\r\n", "\u00a0", " 123 ", "'s ", " -- "]
    out: list[str] = []
    length = 0
    while length < size:
        word = "".join(rng.choices(string.ascii_letters + "éüß中", k=rng.randint(1, 12)))
        out.append(word + rng.choice(gaps))
        length += len(out[-1])
    return "".join(out)[:size]


def word(size: int, alphabet: str = string.ascii_lowercase, seed: int = 1) -> str:
    return "".join(random.Random(seed).choices(alphabet, k=size))


@pytest.mark.parametrize("encoding_name", ENCODINGS)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_long_prose_is_counted_exactly_in_pieces(encoding_name: str, seed: int) -> None:
    encoding = get_encoding(encoding_name)
    text = prose(3 * WINDOW + 1234, seed)
    pieces = list(text_pieces(text))
    assert len(pieces) > 3 and not any(forced for _, forced in pieces)
    assert "".join(piece for piece, _ in pieces) == text
    exact = len(encoding.encode_ordinary(text))
    assert count_long_text(encoding.encode_ordinary, text) == exact
    assert encode_long_text(encoding.encode_ordinary, text) == encoding.encode_ordinary(text)


@pytest.mark.parametrize("encoding_name", ENCODINGS)
@pytest.mark.parametrize("alphabet", [string.ascii_lowercase, string.digits,
                                      string.ascii_letters + string.digits + "+/",
                                      "".join(chr(c) for c in range(0x4E00, 0x4F00))],
                         ids=["letters", "digits", "base64", "cjk"])
def test_one_long_word_is_cut_and_counted_within_the_bound(encoding_name: str,
                                                           alphabet: str) -> None:
    encoding = get_encoding(encoding_name)
    text = word(LONG_TEXT + 6 * FORCED_PIECE, alphabet)
    pieces = list(text_pieces(text))
    forced = sum(is_forced for _, is_forced in pieces)
    assert forced == 6
    assert all(len(piece) == FORCED_PIECE for piece, is_forced in pieces if is_forced)
    assert "".join(piece for piece, _ in pieces) == text
    exact = len(encoding.encode_ordinary(text))
    counted = count_long_text(encoding.encode_ordinary, text)
    assert exact <= counted <= exact + 3 * forced
    assert encoding.decode(encode_long_text(encoding.encode_ordinary, text)) == text


def test_no_piece_is_longer_than_the_window_whatever_the_text() -> None:
    texts = [word(5 * WINDOW), " " * (3 * WINDOW), prose(2 * WINDOW, 4) + word(3 * WINDOW)
             + prose(2 * WINDOW, 5), ("a " * WINDOW) + "\n" * (2 * WINDOW)]
    for text in texts:
        pieces = [piece for piece, _ in text_pieces(text)]
        assert "".join(pieces) == text
        assert max(map(len, pieces)) <= WINDOW


def test_a_word_after_prose_is_cut_at_the_last_space_before_it() -> None:
    text = prose(FORCED_PIECE // 2, 6) + " " + word(3 * WINDOW)
    first, forced = next(iter(text_pieces(text)))
    assert not forced and text[len(first)] == " "  # the exact cut, not a forced one


def test_count_tokens_of_a_huge_text_is_bounded_and_close() -> None:
    text = prose(2 * WINDOW, 7) + word(4 * FORCED_PIECE) + prose(2 * WINDOW, 8)
    exact = len(get_encoding("o200k_base").encode_ordinary(text))
    counted = count_tokens(text, "gpt-4o")
    assert exact <= counted <= exact + 3 * 4


def test_chunk_text_of_a_long_word_rejoins_to_the_text() -> None:
    text = word(LONG_TEXT + 3 * FORCED_PIECE, seed=9)
    chunks = chunk_text(text, "gpt-4o", 5_000)
    assert "".join(chunks) == text
    assert all(count_tokens(chunk, "gpt-4o") <= 5_000 for chunk in chunks)


@pytest.mark.parametrize("text", [word(1_000_000, seed=10), prose(1_000_000, 11)],
                         ids=["one 1 MB word", "1 MB of prose"])
def test_fitting_a_huge_message_keeps_its_ends_and_fits_exactly(text: str) -> None:
    system = {"role": "system", "content": "Be brief."}
    result = fit_messages([system, {"role": "user", "content": text}], "gpt-4o")
    report = result.report
    assert report.truncated and report.tokens_after <= report.limit
    assert count_message_tokens(result.messages, "gpt-4o") == report.tokens_after
    assert report.tokens_after > report.limit - 50  # the window is used, not wasted
    kept = result.messages[1]["content"]
    head, marker_and_tail = kept.split("…[truncated ", 1)
    tail = marker_and_tail.split(" tokens]…", 1)[1]
    assert text.startswith(head) and text.endswith(tail)
    assert len(head) + len(tail) < len(text)
    assert report.tokens_before == count_message_tokens([system, {"role": "user",
                                                                  "content": text}], "gpt-4o")
