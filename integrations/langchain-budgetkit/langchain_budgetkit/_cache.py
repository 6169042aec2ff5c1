"""``BudgetkitCache``: budgetkit's exact + semantic response cache as a LangChain cache.

Use it globally (``set_llm_cache(BudgetkitCache(engine))``) or per model
(``ChatOpenAI(..., cache=BudgetkitCache(engine))``). The model identity is LangChain's
``llm_string`` (the serialized model plus the call's parameters), so a different model,
temperature, stop list or tool set never shares an answer.

Chat prompts arrive as LangChain's ``dumps(messages)``; they are read back with
``allowed_objects="messages"`` (message classes only) so the semantic layer can compare
the last user message within the same earlier conversation.

Hits are written to the ledger by the cache itself (a ``cached`` row: zero cost, the
original call's cost as ``saved_nanos``). LangChain still replays a chat hit through the
callbacks with its *original* usage, so every served ``ChatGeneration`` is marked::

    generation.message.response_metadata["budgetkit_cache_hit"] = True
    generation.generation_info["budgetkit_cache_hit"] = True
    # plus "budgetkit_cache": "exact" | "semantic", "budgetkit_similarity": float,
    # "budgetkit_saved_nanos": int

and ``BudgetkitCallbackHandler`` skips settling such a call (it only returns the
reservation). Plain text ``Generation`` objects are returned unchanged: legacy text LLMs
fire no callbacks on hits, and their values round-trip exactly.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from typing import Any

from langchain_core.caches import RETURN_VAL_TYPE, BaseCache
from langchain_core.load import dumps, loads
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGeneration, Generation

from budgetkit import ConfigurationError, Engine
from budgetkit.cache import CacheHit, ResponseCache

from ._tracker import current_call_attribution, want_call_attribution
from ._messages import to_openai_messages

__all__ = ["BudgetkitCache", "CACHE_HIT_MARK"]

#: The key a served chat generation carries in ``response_metadata`` / ``generation_info``.
CACHE_HIT_MARK = "budgetkit_cache_hit"

_MODEL_IN_PARAMS = re.compile(r"\('(?:model_name|model|model_id|deployment_name)', '([^']+)'\)")
_MODEL_IN_JSON = re.compile(r'"(?:model_name|model|model_id|deployment_name)": "([^"]+)"')


def model_from_llm_string(llm_string: str) -> str | None:
    """The model name inside LangChain's ``llm_string`` (for pricing), if there is one."""
    for pattern in (_MODEL_IN_PARAMS, _MODEL_IN_JSON):
        found = pattern.search(llm_string)
        if found:
            return found.group(1)
    return None


def _messages_of(prompt: str) -> list[dict[str, Any]] | None:
    """The OpenAI-format messages of a chat prompt, or ``None`` for a text prompt."""
    if not prompt.startswith("[") or '"lc"' not in prompt:
        return None
    try:
        revived = loads(prompt, allowed_objects="messages")
    except Exception:  # not a serialized message list: treat it as text  # noqa: BLE001
        return None
    if not isinstance(revived, list) or not all(isinstance(m, BaseMessage) for m in revived):
        return None
    return to_openai_messages(revived)


def _mark(generation: Generation, hit: CacheHit) -> Generation:
    if not isinstance(generation, ChatGeneration):
        return generation
    marks = {CACHE_HIT_MARK: True, "budgetkit_cache": hit.kind,
             "budgetkit_similarity": round(hit.similarity, 4),
             "budgetkit_saved_nanos": hit.saved_nanos}
    message = generation.message.model_copy(
        update={"response_metadata": {**generation.message.response_metadata, **marks}})
    return generation.model_copy(update={
        "message": message, "generation_info": {**(generation.generation_info or {}), **marks}})


def _reported_model(generations: Sequence[Generation]) -> str | None:
    for generation in generations:
        metadata = getattr(getattr(generation, "message", None), "response_metadata", None)
        if metadata:
            name = metadata.get("model_name") or metadata.get("model")
            if isinstance(name, str) and name:
                return name
    return None


def _usage_of(generations: Sequence[Generation]) -> tuple[int | None, int | None]:
    input_tokens = output_tokens = 0
    found = False
    for generation in generations:
        usage = getattr(getattr(generation, "message", None), "usage_metadata", None)
        if usage:
            found = True
            input_tokens = max(input_tokens, int(usage.get("input_tokens") or 0))
            output_tokens += int(usage.get("output_tokens") or 0)
    return (input_tokens, output_tokens) if found else (None, None)


class BudgetkitCache(BaseCache):
    """A LangChain cache backed by budgetkit's :class:`ResponseCache`.

    ``semantic``: also serve reworded prompts (default: on when ``embeddings`` is given);
    ``embeddings``: a LangChain ``Embeddings`` (default: budgetkit's local MiniLM);
    ``namespace``: the tenant (nothing is served across namespaces); ``task_type``: sets
    the lifetime (``creative`` is never cached). ``cache``: share an existing
    :class:`ResponseCache` instead of creating one. Other keyword arguments
    (``threshold``, ``guard``, ``maxsize``, ``default_ttl`` ...) go to
    :class:`ResponseCache`.
    """

    def __init__(self, engine: Engine | None = None, *, semantic: bool | None = None,
                 embeddings: Any = None, namespace: str = "default",
                 task_type: str | None = None, cache: ResponseCache | None = None,
                 **options: Any) -> None:
        want_call_attribution()  # its rows name the run that asked
        if cache is None:
            if engine is None:
                raise ConfigurationError("BudgetkitCache needs an engine or a cache")
            if semantic is None:
                semantic = embeddings is not None
            cache = ResponseCache(engine, semantic=semantic, embedder=embeddings,
                                  namespace=namespace, **options)
        elif options or embeddings is not None:
            raise ConfigurationError("pass options to the ResponseCache, not with cache=")
        self.cache = cache
        self.namespace = namespace
        self.task_type = task_type

    def _request(self, prompt: str, llm_string: str) -> dict[str, Any]:
        messages = _messages_of(prompt)
        request: dict[str, Any] = {"model": llm_string, "namespace": self.namespace,
                                   "task_type": self.task_type}
        if messages is not None:
            request["messages"] = messages
        else:
            request["prompt"] = prompt
        return request

    def lookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        """The cached generations for ``prompt`` under ``llm_string``, or ``None``."""
        # The hit's row belongs to the run asking (its user, project, run ids), which
        # budgetkit's callback handler, if attached, has just started in this context.
        hit = self.cache.lookup(**self._request(prompt, llm_string),
                                **current_call_attribution())
        if hit is None:
            return None
        return [_mark(loads(item, allowed_objects="core"), hit)
                for item in hit.value["generations"]]

    def update(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        """Cache ``return_val``; its usage prices what later hits save."""
        input_tokens, output_tokens = _usage_of(return_val)
        value = {"generations": [dumps(generation) for generation in return_val]}
        json.dumps(value)  # fail here, not in the database, if something is not JSON
        price_model = model_from_llm_string(llm_string) or _reported_model(return_val)
        # the run's user (its metadata, read by budgetkit's callback handler): a question
        # about the asker is stored for that user only (ResponseCache's scope)
        user_id = current_call_attribution().get("user_id")
        self.cache.store(value, price_model=price_model,
                         input_tokens=input_tokens, output_tokens=output_tokens,
                         user_id=user_id, **self._request(prompt, llm_string))

    def clear(self, **kwargs: Any) -> None:
        """Drop every entry of this cache's namespace."""
        self.cache.invalidate(namespace=self.namespace)

    async def alookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        return await asyncio.to_thread(self.lookup, prompt, llm_string)

    async def aupdate(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        await asyncio.to_thread(self.update, prompt, llm_string, return_val)

    async def aclear(self, **kwargs: Any) -> None:
        await asyncio.to_thread(self.clear, **kwargs)
