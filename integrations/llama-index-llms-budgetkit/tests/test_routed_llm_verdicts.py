"""A cascade run through RoutedLLM leaves the verdict on the cheapest answer in the ledger,
the router learns from it, and checks that need the question get the call's prompt."""

from __future__ import annotations

from typing import Any

from llama_index.core.base.llms.types import CompletionResponse, LLMMetadata
from llama_index.core.llms import CustomLLM
from llama_index.core.llms.callbacks import llm_completion_callback

from budgetkit import Cascade, Engine, MinLength, Router
from budgetkit.routing import Agreement
from llama_index.llms.budgetkit import RoutedLLM

CHEAP, STRONG = "gpt-4o-mini", "gpt-4o"


class Scripted(CustomLLM):
    """Answers ``reply``, or "?" for prompts mentioning an integral when ``weak``."""

    reply: str = "a fine answer"
    weak: bool = False

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=16_000, num_output=256, model_name="scripted")

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        text = "?" if self.weak and "integral" in prompt else self.reply
        return CompletionResponse(text=text, raw={
            "usage": {"prompt_tokens": 9, "completion_tokens": 4}})

    def stream_complete(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        raise NotImplementedError


def test_verdicts_from_a_routed_cascade_teach_the_router(tmp_path) -> None:
    with Engine(db=str(tmp_path / "usage.db")) as engine:
        llm = RoutedLLM(models={CHEAP: Scripted(weak=True), STRONG: Scripted()},
                        cascade=Cascade([CHEAP, STRONG], [MinLength(5)]), engine=engine)
        for n in range(15):
            llm.complete(f"Compute the integral of x^{n} from 0 to 2.")
            llm.complete(f"Suggest a name for the cafe at number {n}.")
        first = [r for r in engine.usage() if r.attempt == 1]
        assert len(first) == 30 and all("route_verdict" in r.metadata_ for r in first)
        assert sum(r.metadata_["route_verdict"]["cheap_failed"] for r in first) == 15
        router = Router({"low": CHEAP, "high": STRONG}, engine=engine)
        router.fit_from_ledger(engine)
        assert router.route("Compute the integral of x^9 from 0 to 5.").model == STRONG
        assert router.route("Suggest a name for the cafe at number 99.").model == CHEAP


def test_prompt_checks_get_the_prompt() -> None:
    asked: list[str] = []
    check = Agreement(lambda prompt: asked.append(prompt) or "something else")
    llm = RoutedLLM(models={CHEAP: Scripted(reply="one"), STRONG: Scripted(reply="two")},
                    cascade=Cascade([CHEAP, STRONG], [check]))
    assert llm.complete("Which is larger, 2^10 or 10^3?").text == "two"
    assert asked[0] == "Which is larger, 2^10 or 10^3?"
