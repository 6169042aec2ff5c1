"""Context fitter: chat history, documents, prompt compression."""

from __future__ import annotations

import copy
import random
import re

import pytest

import budgetkit
from budgetkit import (ConfigurationError, ContextWindowExceeded, UnknownModelError, compress_prompt, count_message_tokens, count_tokens, fit_documents, fit_messages)
from budgetkit.fitting import DEFAULT_PHRASES, prompt_token_limit
from budgetkit.fitting import _fitter

MODEL = "gpt-4o"
WORDS = ("budget token window model reply history tool call result alpha beta gamma delta "
         "über naïve 東京 emoji🙂 x=1; {json: true}").split()
TOOLS = [{"type": "function", "function": {
    "name": "lookup", "description": "Find a record.",
    "parameters": {"type": "object", "properties": {"key": {"type": "string",
                                                             "description": "Record key"}}}}}]


def text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(low, high)))


def history(rng: random.Random, turns: int, *, tool_rate: float = 0.3,
            extra_system: bool = False) -> list[dict]:
    """A realistic history: system, then user turns answered directly or through tools."""
    messages: list[dict] = [{"role": "system", "content": text(rng, 5, 30)}]
    call = 0
    for turn in range(turns):
        messages.append({"role": "user", "content": text(rng, 1, 80)})
        while rng.random() < tool_rate:
            ids = [f"call_{call + k}" for k in range(rng.randint(1, 3))]
            call += len(ids)
            messages.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": i, "type": "function",
                 "function": {"name": "lookup", "arguments": f'{{"key": "{text(rng, 1, 3)}"}}'}}
                for i in ids]})
            messages.extend({"role": "tool", "tool_call_id": i, "content": text(rng, 1, 120)}
                            for i in ids)
        messages.append({"role": "assistant", "content": text(rng, 1, 150)})
        if extra_system and turn % 7 == 3:
            messages.append({"role": "developer", "content": text(rng, 2, 10)})
    return messages


def assert_well_formed(kept: list[dict]) -> None:
    """Tool results follow their call, calls keep all their results, history starts on user."""
    rest = [m for m in kept if m["role"] not in ("system", "developer")]
    assert not rest or rest[0]["role"] == "user"
    pending: set[str] = set()
    for m in rest:
        if m["role"] == "tool":
            assert m["tool_call_id"] in pending, "tool result kept without its call"
            pending.discard(m["tool_call_id"])
        else:
            assert not pending, "a tool call lost some of its results"
            pending = {c["id"] for c in m.get("tool_calls") or ()}
    assert not pending


# ---------------------------------------------------------------------------- messages

def test_history_that_fits_is_returned_whole_with_exact_counts():
    messages = history(random.Random(1), 5)
    kept, report = fit_messages(messages, MODEL, max_tokens=100_000)
    assert kept == messages and all(a is b for a, b in zip(kept, messages))
    assert kept is not messages
    assert report.tokens_before == report.tokens_after == count_message_tokens(messages, MODEL)
    assert report.dropped == 0 and not report.truncated
    assert report.kept == tuple(range(len(messages)))


@pytest.mark.parametrize("seed", range(40))
def test_generated_histories_keep_a_valid_exactly_counted_suffix(seed):
    rng = random.Random(seed)
    messages = history(rng, rng.randint(3, 40), extra_system=seed % 2 == 0)
    original = copy.deepcopy(messages)
    tools = TOOLS if seed % 3 == 0 else None
    full = count_message_tokens(messages, MODEL, tools=tools)
    limit = rng.randint(full // 5, full)
    result = fit_messages(messages, MODEL, max_tokens=limit, tools=tools)
    kept, report = result.messages, result.report

    assert messages == original  # never mutated
    assert report.tokens_before == full
    assert report.tokens_after == count_message_tokens(kept, MODEL, tools=tools) <= limit
    assert report.limit == limit
    assert report.dropped == len(messages) - len(kept)
    assert [messages[i] for i in report.kept] == kept or report.truncated
    # every system message survives, in place
    systems = [m for m in messages if m["role"] in ("system", "developer")]
    assert [m for m in kept if m["role"] in ("system", "developer")] == systems
    assert_well_formed(kept)
    if not report.truncated:
        # the non-system part is a suffix of the input ...
        rest_in = [i for i, m in enumerate(messages) if m["role"] not in ("system", "developer")]
        rest_kept = [i for i in report.kept if messages[i]["role"] not in ("system", "developer")]
        assert rest_kept == rest_in[len(rest_in) - len(rest_kept):]
        # ... and the longest one: the next user message back would not have fit
        if rest_kept:
            earlier_users = [i for i in rest_in if i < rest_kept[0]
                             and messages[i]["role"] == "user"]
            if earlier_users:
                wider = sorted(set(report.kept) | set(range(earlier_users[-1], rest_kept[0])))
                wider = [i for i in wider if messages[i]["role"] not in ("system", "developer")
                         or i in report.kept]
                assert count_message_tokens([messages[i] for i in wider], MODEL,
                                            tools=tools) > limit


def test_tool_call_and_results_are_dropped_together():
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "look up a"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "result " * 50},
        {"role": "assistant", "content": "done"},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "welcome"},
    ]
    whole = count_message_tokens(messages, MODEL)
    last_exchange = count_message_tokens([messages[0], *messages[5:]], MODEL)
    # Room for everything except the first user message: the tool block cannot start the
    # history (orphan) so the fitter falls back to the last user message.
    kept, report = fit_messages(messages, MODEL, max_tokens=whole - 1)
    assert kept == [messages[0], *messages[5:]]
    assert report.tokens_after == last_exchange and report.dropped == 4


def test_history_never_starts_on_assistant_or_tool():
    messages = [{"role": "user", "content": "q1 " * 40}, {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    # The suffix [a1, q2, a2] fits but would start on an assistant reply.
    limit = count_message_tokens(messages[1:], MODEL)
    kept, report = fit_messages(messages, MODEL, max_tokens=limit)
    assert kept == messages[2:]
    assert report.kept == (2, 3)


def call(call_id: str) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": "f", "arguments": "{}"}}]}


def test_history_without_user_messages_starts_on_a_non_tool_block():
    messages = [{"role": "system", "content": "sys"},
                {"role": "tool", "tool_call_id": "x", "content": "orphan"},
                {"role": "assistant", "content": "long " * 100},
                {"role": "assistant", "content": "short"}]
    limit = count_message_tokens([messages[0], messages[3]], MODEL)
    kept, report = fit_messages(messages, MODEL, max_tokens=limit)
    assert kept == [messages[0], messages[3]] and report.tokens_after == limit


def test_orphan_tool_results_and_system_messages_inside_a_tool_block():
    messages = [{"role": "user", "content": "q1 " * 50},
                {"role": "assistant", "content": "plain"},
                {"role": "tool", "tool_call_id": "zz", "content": "orphan"},  # no call before it
                {"role": "user", "content": "q2"},
                call("c1"),
                {"role": "system", "content": "mid-block note"},
                {"role": "tool", "tool_call_id": "c1", "content": "r1"},
                {"role": "assistant", "content": "done"}]
    whole = count_message_tokens(messages, MODEL)
    assert fit_messages(messages, MODEL, max_tokens=whole).messages == messages
    kept, report = fit_messages(messages, MODEL, max_tokens=whole - 1)
    assert report.kept == (3, 4, 5, 6, 7)
    # The tool block is never split: room for the last reply but not the whole turn fails.
    tight = count_message_tokens([messages[3], messages[5], messages[7]], MODEL)
    with pytest.raises(ContextWindowExceeded, match="tool results after it"):
        fit_messages(messages, MODEL, max_tokens=tight)


def test_empty_history_and_report_values():
    kept, report = fit_messages([], MODEL, max_tokens=10)
    assert kept == [] and report.tokens_before == report.tokens_after == 3 and report.kept == ()
    messages = history(random.Random(4), 30)
    a = fit_messages(messages, MODEL, max_tokens=1500).report
    b = fit_messages(messages, MODEL, max_tokens=1500).report
    assert a == b and a.tokens_saved == count_message_tokens(messages, MODEL) - a.tokens_after
    assert "tokens_before=" in repr(a) and "positions" in repr(a)


def test_newest_user_turn_is_cut_in_the_middle_exactly():
    words = [f"w{i}" for i in range(3000)]
    big = " ".join(words)
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "old question"},
                {"role": "assistant", "content": "old answer"},
                {"role": "user", "content": big}]
    original = copy.deepcopy(messages)
    for limit in (120, 301, 1000):
        kept, report = fit_messages(messages, MODEL, max_tokens=limit)
        assert messages == original
        assert report.truncated and report.truncated_index == 3 and report.kept == (0, 3)
        assert report.tokens_after == count_message_tokens(kept, MODEL)
        assert limit - 3 <= report.tokens_after <= limit  # cut to fill the room, not more
        content = kept[1]["content"]
        match = re.search(r"…\[truncated (\d+) tokens\]…", content)
        assert match, content[:200]
        head, tail = content[:match.start()], content[match.end():]
        assert big.startswith(head) and big.endswith(tail) and head and tail
        dropped = int(match.group(1))
        total = count_tokens(big, MODEL)
        assert 0 < dropped < total
        assert abs(count_tokens(head, MODEL) + count_tokens(tail, MODEL) - (total - dropped)) <= 2


def test_cut_keeps_the_replies_after_the_user_message():
    messages = [{"role": "user", "content": "data " * 2000},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c9", "type": "function",
                     "function": {"name": "lookup", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c9", "content": "42"}]
    kept, report = fit_messages(messages, MODEL, max_tokens=200)
    assert report.truncated and kept[1:] == messages[1:]
    assert report.tokens_after == count_message_tokens(kept, MODEL) <= 200


def test_cut_of_a_multipart_message_keeps_the_image():
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "long " * 3000}, image]}]
    kept, report = fit_messages(messages, MODEL, max_tokens=300)
    assert report.truncated and kept[0]["content"][1] is image
    assert "truncated" in kept[0]["content"][0]["text"]
    assert report.tokens_after == count_message_tokens(kept, MODEL) <= 300
    assert messages[0]["content"][0]["text"] == "long " * 3000


def test_overflow_can_raise_instead_of_cut():
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "x " * 500}]
    with pytest.raises(ContextWindowExceeded) as caught:
        fit_messages(messages, MODEL, max_tokens=100, on_overflow="raise")
    assert caught.value.limit == 100
    assert caught.value.tokens == count_message_tokens(messages, MODEL)


def test_system_alone_too_large_raises():
    messages = [{"role": "system", "content": "rule " * 300}, {"role": "user", "content": "hi"}]
    with pytest.raises(ContextWindowExceeded, match="system messages"):
        fit_messages(messages, MODEL, max_tokens=100)


def test_tool_results_after_the_user_message_are_never_cut():
    messages = [{"role": "user", "content": "fetch"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "page " * 1000}]
    with pytest.raises(ContextWindowExceeded, match="tool results after it"):
        fit_messages(messages, MODEL, max_tokens=200)


def test_tools_count_against_the_window():
    messages = history(random.Random(7), 20, tool_rate=0)
    limit = count_message_tokens([messages[0], *messages[-4:]], MODEL)  # two turns exactly
    without = fit_messages(messages, MODEL, max_tokens=limit)
    with_tools = fit_messages(messages, MODEL, max_tokens=limit, tools=TOOLS)
    assert without.messages == [messages[0], *messages[-4:]]
    assert with_tools.messages == [messages[0], *messages[-2:]]
    assert with_tools.report.tokens_after == count_message_tokens(with_tools.messages, MODEL,
                                                                  tools=TOOLS)


def test_counts_each_message_once_and_only_what_it_reads(monkeypatch):
    """A fit counts newest first and stops at the window; a history growing by one turn per
    call is counted incrementally, never again."""
    calls = []
    real = _fitter.count_message_tokens

    def counting(messages, *args, **kwargs):
        messages = list(messages)
        calls.append(len(messages))
        return real(messages, *args, **kwargs)

    monkeypatch.setattr(_fitter, "count_message_tokens", counting)
    marker = f"unique-{random.random()}"  # fresh strings: nothing cached from other tests
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{marker} {i}"}
                for i in range(1990)]
    messages += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": f"c{i}", "type": "function",
         "function": {"name": "lookup", "arguments": f'{{"k": "{marker} {i}"}}'}}]} if i % 2 == 0
        else {"role": "tool", "tool_call_id": f"c{i - 1}", "content": f"{marker} r{i}"}
        for i in range(10)]
    result = fit_messages(messages, MODEL, max_tokens=2000)
    counted = sum(1 for n in calls if n == 1)
    assert len(result.messages) < counted < 300  # the kept ones, plus the one that overflowed
    assert result.report.tokens_before == real(messages, MODEL)  # the rest, counted now
    assert sum(1 for n in calls if n == 1) == 2000
    calls.clear()
    messages.append({"role": "user", "content": f"{marker} new"})
    result = fit_messages(messages, MODEL, max_tokens=2000)
    assert result.report.tokens_before == real(messages, MODEL)
    assert sum(1 for n in calls if n == 1) == 1  # only the new message was counted


def test_count_cache_is_bounded_and_stays_exact(monkeypatch):
    monkeypatch.setattr(_fitter, "_MESSAGE_COUNTS_MAX", 100)
    monkeypatch.setattr(_fitter, "_MESSAGE_COUNTS", {})
    rng = random.Random(42)
    for _ in range(5):
        messages = history(rng, 40)
        kept, report = fit_messages(messages, MODEL, max_tokens=2000)
        assert len(_fitter._MESSAGE_COUNTS) <= 100
        assert report.tokens_before == count_message_tokens(messages, MODEL)
        assert report.tokens_after == count_message_tokens(kept, MODEL)


def test_window_comes_from_the_catalog():
    catalog = budgetkit.default_catalog()
    gpt4o = catalog.get("gpt-4o")
    assert prompt_token_limit("gpt-4o") == gpt4o.context_window - 4096
    assert prompt_token_limit("gpt-4o", reserve_output=1000) == gpt4o.context_window - 1000
    gpt5 = catalog.get("gpt-5")
    if gpt5.max_input_tokens and gpt5.max_input_tokens < gpt5.context_window - 4096:
        assert prompt_token_limit("gpt-5") == gpt5.max_input_tokens
    assert prompt_token_limit("no-such-model", max_tokens=10) == 10
    report = fit_messages([{"role": "user", "content": "hi"}], "gpt-4o").report
    assert report.limit == gpt4o.context_window - 4096


@pytest.mark.parametrize("kwargs, error, words", [
    ({"max_tokens": 0}, ConfigurationError, "max_tokens"),
    ({"max_tokens": 1.5}, ConfigurationError, "max_tokens"),
    ({"reserve_output": -1}, ConfigurationError, "reserve_output"),
    ({"reserve_output": 10_000_000}, ConfigurationError, "reserve_output"),
    ({"on_overflow": "drop"}, ConfigurationError, "on_overflow"),
])
def test_bad_arguments_are_named(kwargs, error, words):
    with pytest.raises(error, match=words):
        fit_messages([{"role": "user", "content": "hi"}], MODEL, **kwargs)


def test_bad_messages_and_unknown_models():
    with pytest.raises(ConfigurationError, match=r"messages\[1\]"):
        fit_messages([{"role": "user", "content": "a"}, "b"], MODEL, max_tokens=10)
    with pytest.raises(ConfigurationError, match=r"messages\[0\]"):
        fit_messages([{"content": "no role"}], MODEL, max_tokens=10)
    with pytest.raises(UnknownModelError):
        fit_messages([{"role": "user", "content": "a"}], "no-such-model")


# ---------------------------------------------------------------------------- documents

def test_documents_keep_the_best_ranked_that_fit_in_given_order():
    docs = ["alpha " * 60, "beta " * 200, "gamma " * 30, "delta " * 30, "eps " * 30]
    counts = [count_tokens(d, MODEL) for d in docs]
    sep = count_tokens("\n\n", MODEL)
    limit = counts[0] + counts[2] + counts[3] + 2 * sep + 5
    kept, report = fit_documents(docs, MODEL, max_tokens=limit)
    assert kept == [docs[0], docs[2], docs[3]]  # beta skipped (too big), eps no room left
    assert report.kept == (0, 2, 3) and report.dropped == 2
    assert report.tokens_after == count_tokens("\n\n".join(kept), MODEL) <= limit
    assert report.tokens_before == count_tokens("\n\n".join(docs), MODEL)


def test_documents_as_dicts_and_objects_are_returned_as_given():
    class Node:
        def __init__(self, text: str) -> None:
            self.text = text

    docs = [{"page_content": "one " * 10}, Node("two " * 10), {"body": "three", "text": "3"}]
    kept, report = fit_documents(docs, max_tokens=1000)
    assert all(a is b for a, b in zip(kept, docs)) and len(kept) == 3
    kept, _ = fit_documents([{"body": "x " * 50}, {"body": "y"}], max_tokens=5, text_key="body")
    assert kept == [{"body": "y"}]


def test_documents_limit_from_model_and_errors():
    assert fit_documents(["a"], "gpt-4o").report.limit == prompt_token_limit("gpt-4o")
    with pytest.raises(ConfigurationError, match="model or max_tokens"):
        fit_documents(["a"])
    with pytest.raises(ConfigurationError, match=r"docs\[1\]"):
        fit_documents(["a", 3], max_tokens=10)


@pytest.mark.parametrize("seed", range(10))
def test_documents_never_exceed_the_allowance(seed):
    rng = random.Random(seed)
    docs = [text(rng, 1, 200) for _ in range(30)]
    limit = rng.randint(20, 2000)
    separator = rng.choice(["\n\n", "\n---\n", " "])
    kept, report = fit_documents(docs, MODEL, max_tokens=limit, separator=separator)
    assert report.tokens_after == count_tokens(separator.join(kept), MODEL) <= limit
    assert list(report.kept) == sorted(report.kept)


# ---------------------------------------------------------------------------- compression

def test_compress_collapses_whitespace_but_keeps_indentation():
    text_in = "Summarize   this\t\tplease.   \n\n\n\n  - item   one\n    - nested\n\n\nEnd"
    out, report = compress_prompt(text_in)
    assert out == "Summarize this please.\n\n  - item one\n    - nested\n\nEnd"
    assert report.tokens_before == count_tokens(text_in, MODEL)
    assert report.tokens_after == count_tokens(out, MODEL)
    assert report.tokens_saved > 0


def test_compress_never_touches_code_quotes_or_quote_lines():
    code = "```python\ndef f(x):\n    return   x  *  2\n\n\n\n```"
    tilde = "~~~\na    b\n~~~"
    quote_line = ">  keep    this   exactly  "
    quoted = '"for example,   spaced"'
    smart = "“in order to   stay”"
    inline = "`a    b`"
    text_in = (f"For example,   here:\n\n\n{code}\n{quote_line}\nSay {quoted} and {smart} "
               f"and {inline}   now.\n{tilde}\n")
    out, report = compress_prompt(text_in, phrases=DEFAULT_PHRASES)
    for protected in (code, tilde, quote_line, quoted, smart, inline):
        assert protected in out
    assert out.startswith("E.g., here:\n\n```python")
    assert report.replacements == 1


def test_compress_fence_inside_a_quoted_span_is_restored():
    text_in = 'Say "hello\n```\ncode   here\n```\nworld   there" and  go'
    out, _ = compress_prompt(text_in)
    assert out == 'Say "hello\n```\ncode   here\n```\nworld   there" and go'


def test_compress_unterminated_fence_is_protected_to_the_end():
    text_in = "Intro   text\n```\ncode    with   spaces\n\n\n\nmore"
    out, _ = compress_prompt(text_in)
    assert out == "Intro text\n```\ncode    with   spaces\n\n\n\nmore"


def test_compress_phrase_table_matches_whole_words_and_hands_on_capitals():
    table = {"Could you please": "", "in order to": "to", "for example": "e.g."}
    out, report = compress_prompt("Could you please  check it in order to ship. "
                                  "Forexample stays; reinorder to stays. see for example this",
                                  phrases=table)
    assert out == ("Check it to ship. Forexample stays; reinorder to stays. see e.g. this")
    assert report.replacements == 3


def test_compress_capitalizes_only_at_sentence_starts():
    out, _ = compress_prompt("Hello, I would like you to write. I would like you to read.",
                             phrases=DEFAULT_PHRASES)
    assert out == "Hello, write. Read."


def test_compress_returns_text_unchanged_when_nothing_is_saved():
    out, report = compress_prompt("already tight")
    assert out == "already tight" and report.tokens_saved == 0 and report.replacements == 0


def test_compress_bad_input():
    with pytest.raises(ConfigurationError, match="text"):
        compress_prompt(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="phrases"):
        compress_prompt("x", phrases={"": "y"})


def test_private_use_characters_in_text_survive():
    text_in = "a\ue000  b \"q  \ue000\"  ```\n"
    out, _ = compress_prompt(text_in)
    assert "\ue000" in out and '"q  \ue000"' in out


def test_fitting_loads_no_framework():
    import subprocess
    import sys

    code = ("import sys, budgetkit\n"
            "budgetkit.fit_messages([{'role': 'user', 'content': 'hi'}], 'gpt-4o', max_tokens=50)\n"
            "budgetkit.fit_documents(['a'], max_tokens=5); budgetkit.compress_prompt('a  b')\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'langchain_core', 'llama_index', 'sqlalchemy'}))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.strip()
    assert out == "[]"


def test_reserve_output_and_max_tokens_are_both_honoured():
    """max_tokens is the room the call has; reserve_output is kept free of it for the reply."""
    rng = random.Random(11)
    messages = history(rng, 60)
    assert prompt_token_limit(MODEL, reserve_output=1000, max_tokens=4000) == 3000
    kept, report = fit_messages(messages, MODEL, reserve_output=1000, max_tokens=4000)
    assert report.limit == 3000 and report.tokens_after <= 3000
    assert report.tokens_after == count_message_tokens(kept, MODEL)
    alone = fit_messages(messages, MODEL, max_tokens=4000).report
    assert alone.limit == 4000 and alone.tokens_after > 3000  # the reserve made a difference
    docs = ["word " * 400 for _ in range(10)]
    assert fit_documents(docs, MODEL, max_tokens=4000, reserve_output=1000).report.limit == 3000
    with pytest.raises(ConfigurationError, match="reserve_output=4000.*max_tokens=4000"):
        fit_messages(messages, MODEL, reserve_output=4000, max_tokens=4000)
    with pytest.raises(ConfigurationError, match="reserve_output"):  # checked with max_tokens too
        fit_messages(messages, MODEL, reserve_output=-1, max_tokens=4000)
