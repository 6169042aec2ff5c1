"""Why a model ran lands in the row's ``route_reason`` column (and the attempt in
``attempt``), also when a RoutedChatModel without an engine leaves the recording to a
BudgetkitCallbackHandler (it used to land in ``metadata_``)."""

from __future__ import annotations

from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage

from budgetkit import Cascade, Engine, MinLength, Router
from langchain_budgetkit import BudgetkitCallbackHandler, RoutedChatModel

CHEAP, STRONG = "gpt-4o-mini", "gpt-4o"
USAGE = {"input_tokens": 11, "output_tokens": 7, "total_tokens": 18}


def fake(reply: str) -> FakeMessagesListChatModel:
    return FakeMessagesListChatModel(responses=[AIMessage(content=reply, usage_metadata=USAGE)])


def test_cascade_reason_and_attempt_are_columns_when_the_handler_records(tmp_path) -> None:
    with Engine(db=str(tmp_path / "usage.db")) as engine:
        model = RoutedChatModel(models={CHEAP: fake("no"), STRONG: fake("a full answer")},
                                cascade=Cascade([CHEAP, STRONG], [MinLength(5)]))
        model.invoke("hello there", config={"callbacks": [BudgetkitCallbackHandler(engine)]})
        rows = sorted(engine.usage(), key=lambda r: r.attempt or 0)
    assert [(r.model, r.attempt) for r in rows] == [(CHEAP, 1), (STRONG, 2)]
    assert rows[0].route_reason == "cascade attempt 1/2: cheapest first"
    assert rows[1].route_reason == ("cascade attempt 2/2: gpt-4o-mini answer failed: "
                                    "too short (2 < 5 chars)")
    assert all("route_reason" not in r.metadata_ and "attempt" not in r.metadata_
               for r in rows)


def test_router_reason_is_a_column_when_the_handler_records(tmp_path) -> None:
    with Engine(db=str(tmp_path / "usage.db")) as engine:
        model = RoutedChatModel(models={CHEAP: fake("cheap"), STRONG: fake("strong")},
                                router=Router({"low": CHEAP, "high": STRONG}))
        model.invoke("hi", config={"callbacks": [BudgetkitCallbackHandler(engine)]})
        (row,) = engine.usage()
    assert row.model == CHEAP and (row.route_reason or "").startswith("score ")
    assert "P(cheap answer fails)" in (row.route_reason or "")
    assert "route_reason" not in row.metadata_


def test_a_routed_cascade_with_an_engine_leaves_verdicts_the_router_learns_from(
        tmp_path) -> None:
    from budgetkit.routing import Agreement

    def cheap_model(prompt: str) -> FakeMessagesListChatModel:
        return fake("?" if "integral" in prompt else "a fine answer")

    with Engine(db=str(tmp_path / "usage.db")) as engine:
        for n in range(15):
            for prompt in (f"Compute the integral of x^{n} from 0 to 2.",
                           f"Suggest a name for the cafe at number {n}."):
                model = RoutedChatModel(
                    models={CHEAP: cheap_model(prompt), STRONG: fake("a full answer")},
                    cascade=Cascade([CHEAP, STRONG], [MinLength(5)]), engine=engine)
                model.invoke(prompt)
        first = [r for r in engine.usage() if r.attempt == 1]
        assert len(first) == 30 and all("route_verdict" in r.metadata_ for r in first)
        router = Router({"low": CHEAP, "high": STRONG}, engine=engine)
        router.fit_from_ledger(engine)
        assert router.route("Compute the integral of x^9 from 0 to 5.").model == STRONG
        assert router.route("Suggest a name for the cafe at number 99.").model == CHEAP

        # checks that need the question get it from the routed call's messages
        asked: list[str] = []
        agree = Agreement(lambda prompt: asked.append(prompt) or "a different answer")
        model = RoutedChatModel(models={CHEAP: fake("an answer"), STRONG: fake("strong")},
                                cascade=Cascade([CHEAP, STRONG], [agree]), engine=engine)
        assert model.invoke("Which is larger, 2^10 or 10^3?").content == "strong"
        assert asked[0] == "Which is larger, 2^10 or 10^3?"
