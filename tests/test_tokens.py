"""Token counting: exact OpenAI counts offline, estimates marked, chunking on token boundaries."""

from __future__ import annotations

import pytest

from budgetkit import ConfigurationError, count_message_tokens, count_tokens, count_tool_tokens
from budgetkit.pricing import chunk_text, is_exact, tool_counts_are_exact
from budgetkit.pricing._tokens import encoding_for_model, get_encoding

# The OpenAI cookbook's example ("How to count tokens with tiktoken"), with the prompt_tokens
# the API itself reported for it: 129 for gpt-3.5-turbo-0613 / gpt-4-0613, 124 for gpt-4o.
COOKBOOK_MESSAGES = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that "
                                  "translates corporate jargon into plain English."},
    {"role": "system", "name": "example_user",
     "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant",
     "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user",
     "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
                "for increased leverage."},
    {"role": "system", "name": "example_assistant",
     "content": "Let's talk later when we're less busy about how to do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean "
                                "for the client deliverable."},
]


@pytest.mark.parametrize(("model", "expected"), [
    ("gpt-3.5-turbo-0613", 129), ("gpt-4-0613", 129), ("gpt-4", 129),
    ("gpt-4o", 124), ("gpt-4o-mini", 124),
])
def test_message_counts_match_what_openai_bills(model: str, expected: int) -> None:
    assert count_message_tokens(COOKBOOK_MESSAGES, model) == expected


def test_encoding_per_model_family() -> None:
    assert encoding_for_model("gpt-4o").name == "o200k_base"
    assert encoding_for_model("gpt-4.1-mini").name == "o200k_base"
    assert encoding_for_model("o3-mini").name == "o200k_base"
    assert encoding_for_model("gpt-4").name == "cl100k_base"
    assert encoding_for_model("gpt-3.5-turbo").name == "cl100k_base"
    assert encoding_for_model("text-embedding-3-small").name == "cl100k_base"
    # A model the catalog does not know, named like an OpenAI family, is still exact.
    assert encoding_for_model("gpt-4o-realtime-2099-01-01").name == "o200k_base"


def test_text_counts_are_exact_tiktoken_counts() -> None:
    import tiktoken

    text = "Tokenizers split text into sub-word units; émojis 🎉 and code `x = 1` too."
    assert count_tokens(text, "gpt-4o") == len(encoding_for_model("gpt-4o").encode(text))
    assert count_tokens(text, "gpt-4") == len(encoding_for_model("gpt-4").encode(text))
    assert isinstance(encoding_for_model("gpt-4"), tiktoken.Encoding)
    assert count_tokens("", "gpt-4o") == 0
    # Special-token text in user input is counted as plain text, never rejected.
    assert count_tokens("<|endoftext|>", "gpt-4") > 1


def test_models_without_a_local_tokenizer_are_marked_estimates() -> None:
    assert is_exact("gpt-4o") and is_exact("text-embedding-3-large")
    assert not is_exact("claude-3-5-sonnet-20241022")
    assert not is_exact("llama-3.3-70b-versatile")
    assert not is_exact("some-unknown-model")
    assert count_tokens("hello there", "claude-3-haiku-20240307") > 0


def test_names_and_tools_add_tokens() -> None:
    base = [{"role": "user", "content": "hi"}]
    named = [{"role": "user", "content": "hi", "name": "alice"}]
    assert count_message_tokens(named, "gpt-4o") > count_message_tokens(base, "gpt-4o")
    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "Get the weather",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["c", "f"]}}}}}
    with_tools = count_message_tokens(base, "gpt-4o", tools=[tool])
    assert with_tools == count_message_tokens(base, "gpt-4o") + count_tool_tokens([tool], "gpt-4o")
    assert count_tool_tokens([tool], "gpt-4o") > 12


def test_list_content_and_tool_calls_are_counted() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "describe"},
                                          {"type": "image_url", "image_url": {"url": "x"}}]}]
    assert count_message_tokens(parts, "gpt-4o") > count_message_tokens(
        [{"role": "user", "content": "describe"}], "gpt-4o")
    call = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "lookup", "arguments": '{"q": "paris"}'}}]}]
    assert count_message_tokens(call, "gpt-4o") > count_message_tokens(
        [{"role": "assistant", "content": ""}], "gpt-4o")


def test_bad_messages_are_rejected_with_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="messages must be dicts"):
        count_message_tokens(["hello"], "gpt-4o")  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match="text must be a str"):
        count_tokens(None, "gpt-4o")  # type: ignore[arg-type]


def test_chunk_text_respects_the_limit_and_reassembles() -> None:
    text = ("Budgets hold under concurrency. Ünïcödé text with emoji 🎉🎉 and 日本語の文章 "
            "must never be split inside a character. ") * 40
    chunks = chunk_text(text, "text-embedding-3-small", 17)
    assert "".join(chunks) == text
    assert all(count_tokens(c, "text-embedding-3-small") <= 17 for c in chunks)
    assert all("\ufffd" not in c for c in chunks)


def test_chunk_text_overlap() -> None:
    text = " ".join(f"word{i}" for i in range(200))
    chunks = chunk_text(text, "gpt-4", 20, overlap=5)
    enc = encoding_for_model("gpt-4")
    for first, second in zip(chunks, chunks[1:]):
        assert enc.encode(first)[-5:] == enc.encode(second)[:5]
    with pytest.raises(ConfigurationError):
        chunk_text(text, "gpt-4", 10, overlap=10)
    with pytest.raises(ConfigurationError):
        chunk_text(text, "gpt-4", 0)


# ---------------------------------------------------------------------------- cheap upper bounds

@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4", "gpt-3.5-turbo-0301",
                                   "claude-3-5-sonnet-20241022", "some-unknown-model"])
def test_message_bound_is_never_below_the_count(model):
    import random

    from budgetkit.pricing._tokens import message_tokens_bound, text_tokens_bound

    rng = random.Random(7)
    alphabet = ("abc xyz 0123 ,.!? \n\t" "éüß" "日本語テキスト" "😀🚀" "<|endoftext|>" "\u200b")
    for _ in range(300):
        messages = []
        for _ in range(rng.randint(1, 5)):
            message = {"role": rng.choice(["system", "user", "assistant"]),
                       "content": "".join(rng.choice(alphabet)
                                          for _ in range(rng.randint(0, 200)))}
            if rng.random() < 0.2:
                message["name"] = rng.choice(["alice", "bob_2", "Zoë"])
            messages.append(message)
        bound = message_tokens_bound(messages)
        assert bound is not None and bound >= count_message_tokens(messages, model)
        text = messages[0]["content"]
        assert text_tokens_bound(text) >= count_tokens(text, model)


def test_message_bound_refuses_what_it_cannot_bound():
    from budgetkit.pricing._tokens import message_tokens_bound

    assert message_tokens_bound([{"role": "user", "content": [{"type": "text",
                                                               "text": "hi"}]}]) is None
    assert message_tokens_bound([{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function",
         "function": {"name": "f", "arguments": "{}"}}]}]) is None
    assert message_tokens_bound([{"role": "tool", "content": "42",
                                  "tool_call_id": "1"}]) is None


# ------------------------------------------------------------------ bundled BPE files, offline

_OFFLINE_SCRIPT = r'''
import importlib.abc, json, os, socket, sys, tempfile


class BlockLlamaIndex(importlib.abc.MetaPathFinder):
    """A core-only install: llama_index (which also carries BPE files) cannot be imported."""

    def find_spec(self, name, path, target=None):
        if name == "llama_index" or name.startswith("llama_index."):
            raise ImportError(f"{name} is blocked by the test")
        return None


def no_network(*args, **kwargs):
    raise OSError("network disabled by the test")


sys.meta_path.insert(0, BlockLlamaIndex())
socket.socket.connect = no_network
socket.create_connection = no_network
socket.getaddrinfo = no_network


class RecordingEnviron(type(os.environ)):
    """os.environ that remembers every key written, even if it is removed again."""
    written = []

    def __setitem__(self, key, value):
        self.written.append(key)
        super().__setitem__(key, value)


recording = object.__new__(RecordingEnviron)
recording.__dict__.update(os.environ.__dict__)
os.environ = recording

from budgetkit import ConfigurationError, count_message_tokens, count_tokens

messages = json.loads(sys.argv[1])
result = {
    "cl100k_text": count_tokens("tiktoken is great!", "gpt-4"),
    "gpt-4": count_message_tokens(messages, "gpt-4-0613"),
    "gpt-3.5": count_message_tokens(messages, "gpt-3.5-turbo-0613"),
    "gpt-4o": count_message_tokens(messages, "gpt-4o"),
    "written": RecordingEnviron.written,
    "tiktoken_cache_dir": "TIKTOKEN_CACHE_DIR" in os.environ,
    "llama_index_loaded": any(m.split(".")[0] == "llama_index" for m in sys.modules),
    "temp_files": os.listdir(tempfile.gettempdir()),
}
try:
    count_tokens("hello", "gpt2")  # r50k_base: not bundled, tiktoken would download it
    result["unbundled"] = "counted"
except ConfigurationError as exc:
    result["unbundled"] = str(exc)
print(json.dumps(result))
'''


def test_core_only_install_counts_offline_without_touching_the_environment(tmp_path) -> None:
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")}
    env["TMPDIR"] = str(tmp_path)  # tiktoken's default cache lives in the temp dir: empty here
    done = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT, json.dumps(COOKBOOK_MESSAGES)],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    # Values OpenAI published: 6 tokens (cookbook, cl100k), 129 / 124 prompt tokens (the API).
    assert result["cl100k_text"] == 6
    assert (result["gpt-4"], result["gpt-3.5"], result["gpt-4o"]) == (129, 129, 124)
    assert result["written"] == [] and not result["tiktoken_cache_dir"]
    assert not result["llama_index_loaded"]
    assert result["temp_files"] == []  # nothing copied into a tiktoken cache
    assert "r50k_base" in result["unbundled"] and "not bundled" in result["unbundled"]


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_bundled_encodings_match_tiktokens_definitions(name: str, monkeypatch) -> None:
    """Pattern and special tokens are the ones the installed tiktoken defines."""
    import tiktoken_ext.openai_public as openai_public

    from budgetkit.pricing._bpe import BUNDLED_ENCODINGS

    expected_hashes: list[str | None] = []

    def no_download(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        expected_hashes.append(expected_hash)
        return {}

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", no_download)
    definition = openai_public.ENCODING_CONSTRUCTORS[name]()
    ours = BUNDLED_ENCODINGS[name]
    assert ours.pat_str == definition["pat_str"]
    assert ours.special_tokens == definition["special_tokens"]
    assert expected_hashes == [ours.sha256]
    enc = get_encoding(name)
    assert enc.name == name and enc.n_vocab == max(definition["special_tokens"].values()) + 1


# ------------------------------------------------------------------ tool definitions per family

# The OpenAI cookbook's tool example ("How to count tokens with tiktoken",
# num_tokens_for_tools), with the prompt_tokens the API reported for it.
COOKBOOK_TOOLS = [{"type": "function", "function": {
    "name": "get_current_weather",
    "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "unit": {"type": "string", "description": "The unit of temperature to return",
                 "enum": ["celsius", "fahrenheit"]}},
        "required": ["location"]}}}]
COOKBOOK_TOOL_MESSAGES = [
    {"role": "system",
     "content": "You are a helpful assistant that can answer to questions about the weather."},
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


@pytest.mark.parametrize(("model", "billed"), [
    ("gpt-3.5-turbo", 105), ("gpt-4", 105), ("gpt-4o", 101), ("gpt-4o-mini", 101),
])
def test_tool_counts_match_what_openai_bills(model: str, billed: int) -> None:
    assert count_message_tokens(COOKBOOK_TOOL_MESSAGES, model, tools=COOKBOOK_TOOLS) == billed
    assert tool_counts_are_exact(model)


def test_tool_counts_of_unchecked_families_are_estimates() -> None:
    for model in ("gpt-4.1", "o3-mini", "gpt-5", "gpt-4-turbo", "claude-3-5-sonnet-20241022",
                  "some-unknown-model"):
        assert not tool_counts_are_exact(model), model
    assert tool_counts_are_exact("gpt-4o-2024-08-06") and tool_counts_are_exact("gpt-4-0613")
    # The family decides the overheads: the same tool costs 3 more on gpt-4's formatting
    # than gpt-4o's, beyond what the two encodings give its text.
    text_cl100k = (count_tokens("get_current_weather:Get the current weather in a given location",
                                "gpt-4")
                   + count_tokens("location:string:The city and state, e.g. San Francisco, CA",
                                  "gpt-4")
                   + count_tokens("unit:string:The unit of temperature to return", "gpt-4")
                   + count_tokens("celsius", "gpt-4") + count_tokens("fahrenheit", "gpt-4"))
    assert count_tool_tokens(COOKBOOK_TOOLS, "gpt-4") == text_cl100k + 10 + 3 + 2 * 3 - 3 + 2 * 3 + 12
    assert count_tool_tokens(COOKBOOK_TOOLS, "gpt-4-turbo") == count_tool_tokens(COOKBOOK_TOOLS,
                                                                                 "gpt-4")
    assert count_tool_tokens(COOKBOOK_TOOLS, "gpt-4.1") == count_tool_tokens(COOKBOOK_TOOLS,
                                                                             "gpt-4o")


def test_count_cache_stays_bounded_and_exact(monkeypatch) -> None:
    from budgetkit.pricing import _tokens

    monkeypatch.setattr(_tokens, "_COUNT_CACHE_SIZE", 64)
    counter = _tokens._TextCounter(get_encoding("o200k_base"))
    texts = [f"turn {i}: the fee is {i * 37} EUR" for i in range(500)]
    for text in texts + texts[::-1]:
        assert counter.count(text) == len(get_encoding("o200k_base").encode(text))
        assert len(counter._counts) <= 64
    long_text = "x " * 5_000  # above the cacheable size: counted, never kept
    assert counter.count(long_text) == len(get_encoding("o200k_base").encode(long_text))
    assert long_text not in counter._counts
