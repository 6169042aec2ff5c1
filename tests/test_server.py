"""HTTP API: the seed's endpoints and shapes, tokens and user scoping, 422s, OpenAPI,
budgets and alerts, the dashboard page; in-process (TestClient) and over a real socket
(uvicorn on a random port)."""

from __future__ import annotations

import datetime as dt
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed")
import httpx  # noqa: E402
import uvicorn  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import budgetkit  # noqa: E402
from budgetkit import ConfigurationError, Engine  # noqa: E402
from budgetkit.budgets._budget import Budget  # noqa: E402
from budgetkit.server import create_app, parse_tokens  # noqa: E402

from .conftest import FakeClock  # noqa: E402

ADMIN, ALICE = "admin-secret-token", "alice-secret-token"
NOW = dt.datetime(2025, 3, 20, 15, 0)


def price(model: str, i: int, o: int = 0) -> float:
    return budgetkit.default_catalog().cost_nanos(model, i, o) / 1e9


def populate(engine: Engine, clock: FakeClock) -> None:
    """alice and bob over three days, an embedding, a cache hit, budgets with alerts."""
    engine.add_budget(Budget(limit=0.01, name="per-user-daily", scope="user"))
    engine.add_budget(Budget(limit=5.0, name="global-daily"))
    for day_offset, calls in ((2, 2), (1, 3), (0, 4)):
        clock.now = NOW - dt.timedelta(days=day_offset, hours=1)
        for n in range(calls):
            for user in ("alice", "bob"):
                ticket = engine.admit("gpt-4o", input_tokens=400, max_output_tokens=50,
                                      user_id=user, operation_type="rag_output")
                engine.settle(ticket, input_tokens=400, output_tokens=50)
    clock.now = NOW - dt.timedelta(minutes=30)
    engine.record("text-embedding-3-small", input_tokens=10_000, operation_type="embedding",
                  user_id="alice")
    engine.record("gpt-4o", input_tokens=400, output_tokens=50, status="cached",
                  saved_nanos=int(price("gpt-4o", 400, 50) * 1e9), user_id="bob",
                  operation_type="rag_output")
    clock.now = NOW


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    clock = FakeClock(NOW)
    with Engine(db=str(tmp_path / "api.db"), clock=clock) as eng:
        populate(eng, clock)
        yield eng


@pytest.fixture
def client(engine: Engine) -> TestClient:
    return TestClient(create_app(engine, tokens={ADMIN: None, ALICE: "alice"}))


def get(client: TestClient, url: str, token: str = ADMIN) -> Any:
    response = client.get(url, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    return response.json()


# -- the seed's endpoints ----------------------------------------------------------------
def test_token_usage_has_the_seed_shape_and_figures(client: TestClient) -> None:
    body = get(client, "/token-usage?days=7")
    assert body["message"] == "Token usage statistics retrieved successfully"
    rows = {(r["operation_type"], r["model_name"]): r for r in body["summary"]["summary"]}
    rag = rows[("rag_output", "gpt-4o")]
    assert rag["operation_count"] == 2 * (2 + 3 + 4) + 1  # + bob's cache hit
    assert rag["total_input_tokens"] == 19 * 400 and rag["total_output_tokens"] == 19 * 50
    assert rag["total_cost_usd"] == pytest.approx(18 * price("gpt-4o", 400, 50))
    assert rag["total_saved_usd"] == pytest.approx(price("gpt-4o", 400, 50))
    assert rag["cache_hits"] == 1
    totals = body["summary"]["totals"]
    assert totals["total_operations"] == 20
    assert totals["total_cost_usd"] == pytest.approx(
        18 * price("gpt-4o", 400, 50) + price("text-embedding-3-small", 10_000))
    days = {d["usage_date"]: d["operation_count"] for d in body["daily_usage"]}
    assert days == {"2025-03-18": 4, "2025-03-19": 6, "2025-03-20": 10}
    one_day = get(client, "/token-usage?start_date=2025-03-19&end_date=2025-03-19")
    assert one_day["summary"]["totals"]["total_operations"] == 6


def test_user_usage_and_cost_analysis_shapes(client: TestClient) -> None:
    body = get(client, "/token-usage/user/alice?days=30")
    assert body["message"] == "Token usage statistics for user alice"
    usage = body["user_usage"]
    assert usage["user_id"] == "alice"
    ops = {r["operation_type"]: r for r in usage["summary"]}
    assert set(ops) == {"rag_output", "embedding"}
    assert usage["totals"]["total_operations"] == 10
    analysis = get(client, "/token-usage/cost-analysis?days=30")
    assert analysis["message"] == "Cost analysis completed successfully"
    costs = analysis["cost_analysis"]
    assert set(costs["operation_costs"]) == {"rag_output", "embedding"}
    embed = costs["operation_costs"]["embedding"]
    assert embed["cost_per_token"] == pytest.approx(price("text-embedding-3-small", 1))
    assert isinstance(costs["recommendations"], list)
    assert costs["cost_per_token"] == pytest.approx(costs["total_cost_usd"] / costs["total_tokens"])


# -- access --------------------------------------------------------------------------------
def test_requests_need_a_valid_token(client: TestClient) -> None:
    missing = client.get("/token-usage")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    wrong = client.get("/token-usage", headers={"Authorization": "Bearer nope-nope-nope"})
    assert wrong.status_code == 401
    assert client.get("/health").status_code == 200  # liveness needs no token


def test_a_user_token_sees_only_its_own_user(client: TestClient) -> None:
    mine = get(client, "/token-usage?days=30", ALICE)
    assert mine["summary"]["totals"]["total_operations"] == 10  # alice's 9 calls + 1 embedding
    forbidden = client.get("/token-usage/user/bob",
                           headers={"Authorization": f"Bearer {ALICE}"})
    assert forbidden.status_code == 403
    assert get(client, "/token-usage/user/alice", ALICE)["user_usage"]["totals"][
        "total_operations"] == 10
    budgets = get(client, "/budgets", ALICE)["budgets"]
    assert budgets and {b["scope_key"] for b in budgets} == {"alice"}
    assert all(a["scope_key"] == "alice" for a in get(client, "/alerts", ALICE)["alerts"])
    board = get(client, "/api/dashboard?days=30", ALICE)
    assert board["user_scope"] == "alice" and board["totals"]["calls"] == 10


@pytest.mark.parametrize("query, needle", [
    ("days=-1", "greater than or equal to 1"),
    ("days=0", "greater than or equal to 1"),
    ("days=abc", "valid integer"),
    ("start_date=2025-13-01", "month value is outside"),
    ("start_date=yesterday", "valid date"),
    ("start_date=2025-03-10&end_date=2025-03-01", "is before start_date"),
])
def test_bad_parameters_get_422_with_a_message(client: TestClient, query: str,
                                               needle: str) -> None:
    for path in ("/token-usage", "/token-usage/user/alice", "/token-usage/cost-analysis"):
        response = client.get(f"{path}?{query}", headers={"Authorization": f"Bearer {ADMIN}"})
        assert response.status_code == 422, (path, response.text)
        assert needle in response.text


def test_openapi_schema_documents_the_endpoints_and_shapes(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path in ("/token-usage", "/token-usage/user/{user_id}", "/token-usage/cost-analysis",
                 "/budgets", "/alerts", "/token-usage/forecast", "/token-usage/anomalies"):
        assert path in schema["paths"], path
    params = {p["name"] for p in schema["paths"]["/token-usage"]["get"]["parameters"]}
    assert params == {"days", "start_date", "end_date"}
    components = schema["components"]
    assert components["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert {"total_cost_usd", "operation_count", "model_name"} <= set(
        components["schemas"]["SummaryRow"]["properties"])


# -- budgets, alerts, extras ---------------------------------------------------------------
def test_budget_status_and_alerts(client: TestClient) -> None:
    budgets = get(client, "/budgets")["budgets"]
    by_key = {(b["budget"], b["scope_key"]): b for b in budgets}
    alice = by_key[("per-user-daily", "alice")]
    assert alice["used"] == pytest.approx(4 * price("gpt-4o", 400, 50)  # today's calls
                                          + price("text-embedding-3-small", 10_000))
    assert alice["percentage"] == pytest.approx(100 * alice["used"] / 0.01)
    assert ("global-daily", "") in by_key
    alerts = get(client, "/alerts?limit=100")["alerts"]
    assert any(a["budget"] == "per-user-daily" and a["kind"] == "threshold" for a in alerts)
    assert client.get("/alerts?limit=0",
                      headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 422


def test_forecast_anomalies_and_dashboard_data(client: TestClient) -> None:
    prediction = get(client, "/token-usage/forecast?period=week")
    assert prediction["projected_total_usd"] >= prediction["spent_usd"] > 0
    assert "method" in prediction
    assert get(client, "/token-usage/anomalies")["anomalies"] == []
    board = get(client, "/api/dashboard?days=7")
    assert len(board["daily"]) == 8 and board["cache"]["hits"] == 1
    assert {m["model"] for m in board["by_model"]} == {"gpt-4o", "text-embedding-3-small"}
    assert board["budgets"] and board["alerts"]


def test_allocation_and_what_if(client: TestClient) -> None:
    shares = get(client, "/token-usage/allocation?by=user&days=30")["allocation"]
    assert {r["user_id"] for r in shares} == {"alice", "bob"}
    assert sum(r["share"] for r in shares) == pytest.approx(1.0)
    repriced = get(client, "/token-usage/what-if?target=gpt-4o-mini&days=30")
    assert repriced["repriced_cost_usd"] == pytest.approx(price("gpt-4o-mini", 18 * 400, 18 * 50))
    assert repriced["skipped_models"] == ["text-embedding-3-small"]
    for bad in ("/token-usage/what-if?target=gpt-99", "/token-usage/allocation?by=colour"):
        response = client.get(bad, headers={"Authorization": f"Bearer {ADMIN}"})
        assert response.status_code == 422 and response.json()["detail"]
    mine = get(client, "/token-usage/allocation?by=user", ALICE)["allocation"]
    assert [r["user_id"] for r in mine] == ["alice"]


def test_dashboard_page_is_self_contained(client: TestClient) -> None:
    page = client.get("/dashboard")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    html = page.text
    assert "<script src" not in html and "<link" not in html and "@import" not in html
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", html))
    assert urls <= {"http://www.w3.org/2000/svg"}  # the SVG namespace only: no network
    assert client.get("/", follow_redirects=False).headers["location"] == "/dashboard"


EXTERNAL_URL = re.compile(r"""(?:https?:)?//[^\s"'<>)]+""")
ALLOWED_URLS = {"http://www.w3.org/2000/svg"}  # an SVG namespace name, never fetched


def served_pages(client: TestClient) -> dict[str, str]:
    """Every GET route the app serves (path parameters filled in), and its body."""
    pages = {}
    for route in client.app.routes:  # type: ignore[attr-defined]
        if "GET" not in getattr(route, "methods", set()):
            continue
        path = route.path.replace("{user_id}", "alice")
        query = "?target=gpt-4o-mini" if path.endswith("/what-if") else ""
        response = client.get(path + query, headers={"Authorization": f"Bearer {ADMIN}"},
                              follow_redirects=False)
        assert response.status_code in (200, 307), (path, response.status_code)
        pages[path] = response.text
    return pages


def test_no_page_the_server_serves_references_an_external_url(client: TestClient) -> None:
    pages = served_pages(client)
    assert {"/docs", "/openapi.json", "/dashboard", "/token-usage"} <= set(pages)
    for path, body in pages.items():
        found = set(EXTERNAL_URL.findall(body))
        assert found <= ALLOWED_URLS, (path, found - ALLOWED_URLS)
    assert client.get("/redoc").status_code == 404  # FastAPI's CDN pages are off


def test_the_api_reference_page_lists_every_endpoint_and_parameter(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "<script" not in page.text and "<link" not in page.text
    schema = client.get("/openapi.json").json()
    for path, item in schema["paths"].items():
        assert f"<code>{path}</code>" in page.text
        for parameter in item["get"].get("parameters", []):
            assert f"<code>{parameter['name']}</code>" in page.text


def test_tokens_from_spec_strings_and_environment(engine: Engine,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_tokens("admin-token-1, user-token-2:carol") == {
        "admin-token-1": None, "user-token-2": "carol"}
    with pytest.raises(ConfigurationError, match="too short"):
        parse_tokens(["abc"])


@pytest.mark.parametrize("spec, words", [
    ("admin-token-1:", "empty user"), ("admin-token-1 :  ", "empty user"),
    (["admin-token-1:alice", "admin-token-1"], "twice with different users"),
    ("ok-token-123, :bob", "too short"),
])
def test_a_token_with_an_empty_user_is_refused_not_made_admin(spec: Any, words: str) -> None:
    with pytest.raises(ConfigurationError, match=words) as info:
        parse_tokens(spec)
    assert "admin-token-1" not in str(info.value)  # the secret is not echoed


def test_an_empty_user_in_the_environment_is_refused_at_start(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGETKIT_API_TOKENS", "admin-token-1,alice-token-1:")
    with pytest.raises(ConfigurationError, match="empty user"):
        create_app(engine)
    monkeypatch.setenv("BUDGETKIT_API_TOKENS", "env-admin-token")
    app = create_app(engine)
    assert app.state.tokens == {"env-admin-token": None}
    monkeypatch.delenv("BUDGETKIT_API_TOKENS")
    generated = create_app(engine).state.tokens
    [(token, user)] = generated.items()
    assert user is None and len(token) >= 24


# -- a real server -------------------------------------------------------------------------
class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 at a free port, in a background thread."""

    def __init__(self, app: Any) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:  # readiness poll, not a timing assertion
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


def test_real_uvicorn_server_answers_over_http(engine: Engine) -> None:
    app = create_app(engine, tokens={ADMIN: None, ALICE: "alice"})
    with ServerThread(app) as server:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            body = http.get("/token-usage?days=30",
                            headers={"Authorization": f"Bearer {ADMIN}"}).json()
            assert body["summary"]["totals"]["total_operations"] == 20
            assert http.get("/token-usage").status_code == 401
            assert http.get("/token-usage?days=-3", headers={
                "Authorization": f"Bearer {ADMIN}"}).status_code == 422
            assert http.get("/openapi.json").json()["info"]["title"] == "budgetkit"


def test_seed_endpoints_on_postgresql(pg_url: str) -> None:
    clock = FakeClock(NOW)
    with Engine(db=pg_url, clock=clock) as engine:
        populate(engine, clock)
        client = TestClient(create_app(engine, tokens={ADMIN: None, ALICE: "alice"}))
        body = get(client, "/token-usage?days=7")
        days = {d["usage_date"]: d["operation_count"] for d in body["daily_usage"]}
        assert days == {"2025-03-18": 4, "2025-03-19": 6, "2025-03-20": 10}
        assert body["summary"]["totals"]["total_operations"] == 20
        assert get(client, "/token-usage", ALICE)["summary"]["totals"]["total_operations"] == 10
        board = get(client, "/api/dashboard?days=7")
        assert board["cache"]["hits"] == 1 and len(board["budgets"]) == 3


def test_money_is_formatted_by_one_function_everywhere(client: TestClient,
                                                       engine: Engine) -> None:
    """Every USD number in the JSON has its text beside it, made by format_usd (as the CLI
    prints it), and the dashboard page formats no money itself."""
    from budgetkit.cli._console import money
    from budgetkit.pricing import format_usd

    assert money is not None and money(0.00421) == format_usd(0.00421) == "$0.004210"
    usage = get(client, "/token-usage")
    totals = usage["summary"]["totals"]
    assert totals["total_cost_text"] == format_usd(totals["total_cost_usd"])
    assert totals["total_saved_text"] == format_usd(totals["total_saved_usd"]) != "$0"
    for row in usage["summary"]["summary"] + usage["daily_usage"]:
        assert row["total_cost_text"] == format_usd(row["total_cost_usd"])
    data = get(client, "/api/dashboard")
    assert data["totals"]["cost_text"] == format_usd(data["totals"]["cost_usd"])
    assert data["cache"]["saved_text"] == format_usd(data["cache"]["saved_usd"])
    assert data["forecast"]["projected_total_text"] == format_usd(
        data["forecast"]["projected_total_usd"])
    assert all(r["cost_text"] == format_usd(r["cost_usd"]) for r in data["by_model"])
    top = max(r["cost_usd"] for r in data["daily"])
    assert data["daily_ticks"] == [format_usd(top * i / 4) for i in range(5)]
    usd_budgets = [b for b in data["budgets"] if b["unit"] == "usd"]
    assert usd_budgets and all(b["used_text"] == format_usd(b["used"]) for b in usd_budgets)
    # The row the API summed: its exact Decimal cost prints the same as the float.
    [row] = [r for r in engine.usage() if r.status == "cached"][:1]
    assert format_usd(row.saved) == format_usd(float(row.saved))
    html = client.get("/dashboard").text
    assert "function money" not in html and "toFixed(2)" not in html and "toFixed(4)" not in html
