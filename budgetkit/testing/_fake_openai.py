"""A small OpenAI-compatible HTTP server for tests and demos (no network, no API key).

It speaks enough of the OpenAI API for the official clients (``openai``, LangChain's
``ChatOpenAI`` / ``OpenAIEmbeddings``, LlamaIndex's ``OpenAI`` / ``OpenAIEmbedding``):

- ``POST /v1/chat/completions``: JSON, or server-sent events when ``stream`` is true; the
  final usage chunk is sent only when the request asks for it with
  ``stream_options.include_usage`` (as OpenAI does).
- ``POST /v1/completions``: the legacy text endpoint, JSON or streamed.
- ``POST /v1/embeddings``: text or token-id inputs, ``float`` or ``base64`` encoding.

Usage is realistic: prompt and completion tokens are counted with tiktoken (the model's own
encoding when budgetkit knows the model), and the configured cached, cache-write and
reasoning tokens are reported in ``prompt_tokens_details`` / ``completion_tokens_details``.
Every usage block sent is kept in :attr:`FakeOpenAIServer.usages` so a test can compare
what was recorded with what the "provider" billed.

    with FakeOpenAIServer(reply="Hi!", cached_tokens=8) as server:
        llm = ChatOpenAI(model="gpt-4o-mini", base_url=server.base_url, api_key="test")
"""

from __future__ import annotations

import base64
import json
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FakeOpenAIServer", "FakeRequest"]

Reply = str | Callable[[Mapping[str, Any]], str]


@dataclass
class FakeRequest:
    """One request the server received."""

    path: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Failure:
    status: int
    message: str
    type: str
    mid_stream: bool


class FakeOpenAIServer:
    """An OpenAI-compatible server on ``127.0.0.1`` and a random free port.

    ``reply`` is the assistant text (or a function of the request body returning it).
    ``response_model`` is the model name the responses carry (a dated snapshot, say);
    by default the requested model is echoed. ``prompt_tokens`` / ``completion_tokens``
    override the counted values; ``cached_tokens`` and ``cache_write_tokens`` are reported
    as parts of the prompt, ``reasoning_tokens`` is *added* to the completion (hidden
    reasoning is billed as output but not returned as text). ``stream_usage=False`` makes
    the server ignore ``include_usage`` (providers that never report usage when streaming).
    ``latency`` (seconds) delays every response; ``chunk_delay`` delays each stream chunk.
    Every attribute can be changed between requests with :meth:`configure`.
    """

    def __init__(self, *, reply: Reply = "Hello! This reply comes from the fake OpenAI server.",
                 response_model: str | None = None, prompt_tokens: int | None = None,
                 completion_tokens: int | None = None, cached_tokens: int = 0,
                 cache_write_tokens: int = 0, reasoning_tokens: int = 0,
                 stream_usage: bool = True, embedding_dim: int = 8, latency: float = 0.0,
                 chunk_delay: float = 0.0, service_tier: str | None = None) -> None:
        self.reply = reply
        self.response_model = response_model
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.cached_tokens = cached_tokens
        self.cache_write_tokens = cache_write_tokens
        self.reasoning_tokens = reasoning_tokens
        self.stream_usage = stream_usage
        self.embedding_dim = embedding_dim
        self.latency = latency
        self.chunk_delay = chunk_delay
        self.service_tier = service_tier
        self.requests: list[FakeRequest] = []
        #: every ``usage`` object sent, in order (streams: the final usage chunk)
        self.usages: list[dict[str, Any]] = []
        self._failures: list[_Failure] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> FakeOpenAIServer:
        if self._httpd is not None:
            return self
        handler = type("_Handler", (_Handler,), {"fake": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.02},
                                        name="fake-openai-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the fake server is not running; call start() first")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """The ``base_url`` / ``api_base`` to give an OpenAI client (ends in ``/v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    # -- configuration ----------------------------------------------------------------
    def configure(self, **settings: Any) -> None:
        """Change settings (the constructor's keyword arguments) for later requests."""
        for name, value in settings.items():
            if name.startswith("_") or not hasattr(self, name) or name in ("requests", "usages"):
                raise TypeError(f"FakeOpenAIServer has no setting {name!r}")
            setattr(self, name, value)

    def fail_next(self, status: int = 500, message: str = "fake server error", *,
                  count: int = 1, error_type: str = "server_error",
                  mid_stream: bool = False) -> None:
        """Answer the next ``count`` requests with an OpenAI-style error.

        ``mid_stream=True`` makes a streamed response send its first content chunk and
        then drop the connection (a stream that breaks half-way).
        """
        with self._lock:
            self._failures.extend(_Failure(status, message, error_type, mid_stream)
                                  for _ in range(count))

    def reset(self) -> None:
        """Forget received requests, sent usages and queued failures."""
        with self._lock:
            self.requests.clear()
            self.usages.clear()
            self._failures.clear()

    @property
    def request_count(self) -> int:
        return len(self.requests)

    @property
    def last_usage(self) -> dict[str, Any]:
        if not self.usages:
            raise LookupError("the fake server has not sent any usage yet")
        return self.usages[-1]

    # -- behaviour (called from the handler threads) ---------------------------------------
    def _take_failure(self) -> _Failure | None:
        with self._lock:
            return self._failures.pop(0) if self._failures else None

    def _record(self, request: FakeRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _reply_text(self, body: Mapping[str, Any]) -> str:
        return self.reply(body) if callable(self.reply) else self.reply

    def _usage(self, model: str, prompt_tokens: int, completion_text: str) -> dict[str, Any]:
        prompt = self.prompt_tokens if self.prompt_tokens is not None else prompt_tokens
        visible = (self.completion_tokens if self.completion_tokens is not None
                   else _count(completion_text, model))
        completion = visible + self.reasoning_tokens
        prompt_details = {"cached_tokens": min(self.cached_tokens, prompt), "audio_tokens": 0}
        if self.cache_write_tokens:
            prompt_details["cache_write_tokens"] = self.cache_write_tokens
        usage = {
            "prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": prompt_details,
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens,
                                          "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0},
        }
        with self._lock:
            self.usages.append(usage)
        return usage


def _count(text: str, model: str) -> int:
    from budgetkit.pricing import count_tokens

    try:
        return count_tokens(text, model)
    except Exception:  # an unknown model name: count with the generic encoding
        return count_tokens(text, "gpt-4")


def _count_messages(messages: Any, model: str) -> int:
    from budgetkit.pricing import count_message_tokens

    plain = [{key: _text_of(value) if key == "content" else value
              for key, value in message.items()} for message in messages]
    try:
        return count_message_tokens(plain, model)
    except Exception:
        return count_message_tokens(plain, "gpt-4")


def _text_of(content: Any) -> Any:
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content


def _pieces(text: str) -> list[str]:
    """Split a reply into stream chunks: word by word, keeping the spaces."""
    words = text.split(" ")
    return [word if i == 0 else " " + word for i, word in enumerate(words)] if text else []


class _Handler(BaseHTTPRequestHandler):
    fake: FakeOpenAIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        return

    # -- plumbing --------------------------------------------------------------------
    def _read_json(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            body = {}
        return body if isinstance(body, dict) else {}

    def _send_json(self, status: int, payload: Mapping[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, failure: _Failure) -> None:
        self._send_json(failure.status, {"error": {
            "message": failure.message, "type": failure.type, "param": None,
            "code": failure.type}})

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _event(self, payload: Mapping[str, Any] | str) -> None:
        if self.fake.chunk_delay:
            time.sleep(self.fake.chunk_delay)
        text = payload if isinstance(payload, str) else json.dumps(payload)
        data = f"data: {text}\n\n".encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _end_stream(self) -> None:
        self._event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _break_stream(self) -> None:
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(2)  # the client sees the stream end without [DONE]

    # -- endpoints -----------------------------------------------------------------------
    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._send_json(200, {"object": "list", "data": []})
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        body = self._read_json()
        fake = self.fake
        fake._record(FakeRequest(self.path, body, dict(self.headers.items())))
        if fake.latency:
            time.sleep(fake.latency)
        failure = fake._take_failure()
        if failure is not None and not failure.mid_stream:
            self._send_error(failure)
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        if path.endswith("/chat/completions"):
            self._chat(body, failure)
        elif path.endswith("/completions"):
            self._completion(body, failure)
        elif path.endswith("/embeddings"):
            self._embeddings(body)
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}"}})

    def _common(self, body: Mapping[str, Any], kind: str) -> dict[str, Any]:
        model = str(body.get("model") or "gpt-4o-mini")
        payload: dict[str, Any] = {
            "id": f"{kind}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": self.fake.response_model or model, "system_fingerprint": "fp_fake",
        }
        if self.fake.service_tier:
            payload["service_tier"] = self.fake.service_tier
        return payload

    def _wants_usage(self, body: Mapping[str, Any]) -> bool:
        options = body.get("stream_options") or {}
        return bool(self.fake.stream_usage and options.get("include_usage"))

    def _chat(self, body: Mapping[str, Any], failure: _Failure | None) -> None:
        fake = self.fake
        model = str(body.get("model") or "gpt-4o-mini")
        text = fake._reply_text(body)
        prompt_tokens = _count_messages(body.get("messages") or [], model)
        head = self._common(body, "chatcmpl")
        if not body.get("stream"):
            usage = fake._usage(model, prompt_tokens, text)
            self._send_json(200, {**head, "object": "chat.completion", "choices": [{
                "index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None, "finish_reason": "stop"}], "usage": usage})
            return
        chunk = {**head, "object": "chat.completion.chunk"}
        with_usage = self._wants_usage(body)
        self._start_stream()
        self._event({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                  "content": ""},
                                           "finish_reason": None}],
                     **({"usage": None} if with_usage else {})})
        for i, piece in enumerate(_pieces(text)):
            self._event({**chunk, "choices": [{"index": 0, "delta": {"content": piece},
                                               "finish_reason": None}],
                         **({"usage": None} if with_usage else {})})
            if failure is not None and i == 0:
                self._break_stream()
                return
        self._event({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                     **({"usage": None} if with_usage else {})})
        if with_usage:
            self._event({**chunk, "choices": [], "usage": fake._usage(model, prompt_tokens,
                                                                       text)})
        self._end_stream()

    def _completion(self, body: Mapping[str, Any], failure: _Failure | None) -> None:
        fake = self.fake
        model = str(body.get("model") or "gpt-3.5-turbo-instruct")
        prompts = body.get("prompt", "")
        prompts = prompts if isinstance(prompts, list) else [prompts]
        texts = [prompt if isinstance(prompt, str) else "" for prompt in prompts]
        prompt_tokens = sum(_count(text, model) for text in texts)
        reply = fake._reply_text(body)
        head = self._common(body, "cmpl")
        if not body.get("stream"):
            usage = fake._usage(model, prompt_tokens, reply * len(texts))
            if fake.completion_tokens is None and len(texts) > 1:
                per = _count(reply, model)
                usage["completion_tokens"] = per * len(texts) + fake.reasoning_tokens
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            self._send_json(200, {**head, "object": "text_completion", "choices": [
                {"index": i, "text": reply, "logprobs": None, "finish_reason": "stop"}
                for i in range(len(texts))], "usage": usage})
            return
        chunk = {**head, "object": "text_completion"}
        self._start_stream()
        for i, piece in enumerate(_pieces(reply)):
            self._event({**chunk, "choices": [{"index": 0, "text": piece, "logprobs": None,
                                               "finish_reason": None}]})
            if failure is not None and i == 0:
                self._break_stream()
                return
        self._event({**chunk, "choices": [{"index": 0, "text": "", "logprobs": None,
                                           "finish_reason": "stop"}]})
        if self._wants_usage(body):
            self._event({**chunk, "choices": [], "usage": fake._usage(model, prompt_tokens,
                                                                       reply)})
        self._end_stream()

    def _embeddings(self, body: Mapping[str, Any]) -> None:
        fake = self.fake
        model = str(body.get("model") or "text-embedding-3-small")
        raw = body.get("input", "")
        # str | list[str] | list[int] (one tokenised input) | list[list[int]]
        if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
            inputs: list[Any] = [raw]
        else:
            inputs = list(raw) if isinstance(raw, list) else [raw]
        tokens = sum(len(item) if isinstance(item, list) else _count(str(item), model)
                     for item in inputs)
        if fake.prompt_tokens is not None:
            tokens = fake.prompt_tokens
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        with fake._lock:
            fake.usages.append(usage)
        encoding = body.get("encoding_format") or "float"
        data = []
        for index, item in enumerate(inputs):
            seed = zlib.crc32(json.dumps(item).encode()) / 0xFFFFFFFF
            vector = [((seed + 0.137 * k) % 1.0) - 0.5 for k in range(fake.embedding_dim)]
            encoded: Any = vector
            if encoding == "base64":
                encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        self._send_json(200, {"object": "list", "data": data, "model": model, "usage": usage})
