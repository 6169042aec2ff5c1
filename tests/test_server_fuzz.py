"""Fuzz every query and path parameter of every endpoint in the app's own OpenAPI schema:
the answer is never a 5xx, always JSON, and a 200 carries no NaN or infinity.

Values are drawn per parameter from its schema (dates over the whole calendar, 0001-01-01
to 9999-12-31; integers beyond their bounds; floats with NaN and infinities; strings
matching and not matching their pattern) and from arbitrary text. Requests go in-process
(Starlette's TestClient over ASGI): no socket, no network. Bounded to a few hundred
requests (~10 s); runs in CI with the rest of the suite.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed")
hypothesis = pytest.importorskip("hypothesis")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from budgetkit import Budget, Engine  # noqa: E402
from budgetkit.server import create_app  # noqa: E402

from .conftest import FakeClock  # noqa: E402

ADMIN, ALICE = "fuzz-admin-token", "fuzz-alice-token"
NOW = dt.datetime(2025, 3, 20, 15, 0)
EXAMPLES_PER_ENDPOINT = 60

SCHEMA: dict[str, Any] = create_app(None, tokens={ADMIN: None}).openapi()
OPERATIONS = [(path, op) for path, item in SCHEMA["paths"].items()
              for method, op in item.items() if method == "get"]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """A small ledger: two users over three days, budgets with an alert, a cache hit."""
    clock = FakeClock(NOW - dt.timedelta(days=2))
    path: Path = tmp_path_factory.mktemp("fuzz") / "fuzz.db"
    with Engine(db=str(path), clock=clock) as engine:
        engine.add_budget(Budget(limit=0.001, name="per-user-daily", scope="user"))
        for _day in range(3):
            for user in ("alice", "bob"):
                ticket = engine.admit("gpt-4o", input_tokens=300, max_output_tokens=20,
                                      user_id=user, tags=("fuzz",), project="p1")
                engine.settle(ticket, input_tokens=300, output_tokens=20)
            clock.advance(days=1)
        engine.record("gpt-4o", input_tokens=10, status="cached", saved_nanos=1000,
                      user_id="bob")
        clock.now = NOW
        yield TestClient(create_app(engine, tokens={ADMIN: None, ALICE: "alice"}),
                         raise_server_exceptions=False)


def _schema_of(parameter: dict[str, Any]) -> dict[str, Any]:
    schema = parameter.get("schema", {})
    for option in schema.get("anyOf", []):  # ``X | None`` is anyOf [X, null]
        if option.get("type") != "null":
            return option
    return schema


def values_for(parameter: dict[str, Any]) -> st.SearchStrategy[str]:
    """Strings to send for one parameter: in-schema values, edges and junk."""
    schema = _schema_of(parameter)
    kind, fmt = schema.get("type"), schema.get("format")
    junk = st.text(max_size=24)
    if fmt == "date":
        edges = st.sampled_from(["0001-01-01", "9999-12-31", "2025-02-29", "2025-13-01"])
        return st.one_of(st.dates().map(dt.date.isoformat), edges, junk)
    if kind == "integer":
        low = schema.get("minimum", -(10**6))
        high = schema.get("maximum", 10**6)
        return st.one_of(st.integers(low, high).map(str), st.integers().map(str),
                         st.sampled_from([str(low - 1), str(high + 1), "1e3", "1.5"]), junk)
    if kind == "number":
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                         st.sampled_from(["nan", "inf", "-inf", "1e309", "0", "-0"]), junk)
    if schema.get("pattern"):
        return st.one_of(st.from_regex(schema["pattern"], fullmatch=True), junk)
    return st.one_of(st.sampled_from(["gpt-4o", "alice", "bob", "metadata.team", "tag",
                                      "user", "", "\x00", "../../etc/passwd"]), junk)


def request_for(path: str, op: dict[str, Any]) -> st.SearchStrategy[str]:
    """A URL for one operation: path parameters filled, each query parameter given or not."""
    parameters = op.get("parameters", [])
    path_params = {p["name"]: values_for(p) for p in parameters if p["in"] == "path"}
    query_params = {p["name"]: values_for(p) for p in parameters if p["in"] == "query"}

    @st.composite
    def build(draw: st.DrawFn) -> str:
        url = path
        for name, strategy in path_params.items():
            url = url.replace("{" + name + "}", urllib.parse.quote(draw(strategy), safe="") or "x")
        query = {name: draw(strategy) for name, strategy in query_params.items()
                 if draw(st.booleans())}
        return url + ("?" + urllib.parse.urlencode(query) if query else "")

    return build()


def _no_nan(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_no_nan(v) for v in value.values())
    if isinstance(value, list):
        return all(_no_nan(v) for v in value)
    return True


def test_the_schema_has_the_endpoints_we_fuzz() -> None:
    paths = {path for path, _ in OPERATIONS}
    assert {"/token-usage", "/token-usage/user/{user_id}", "/token-usage/cost-analysis",
            "/token-usage/what-if", "/budgets", "/alerts", "/api/dashboard"} <= paths


@pytest.mark.parametrize("path, op", OPERATIONS, ids=[path for path, _ in OPERATIONS])
def test_no_parameter_value_makes_an_endpoint_fail(client: TestClient, path: str,
                                                   op: dict[str, Any]) -> None:
    @settings(max_examples=EXAMPLES_PER_ENDPOINT, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(url=request_for(path, op), token=st.sampled_from([ADMIN, ALICE]))
    def check(url: str, token: str) -> None:
        response = client.get(url, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code < 500, f"{url}: {response.status_code} {response.text}"
        assert response.status_code in (200, 403, 404, 422), (url, response.text)
        body = json.loads(response.text, parse_constant=lambda name: float(name))
        if response.status_code == 200:
            assert _no_nan(body), f"{url}: NaN or infinity in {response.text[:300]}"
        else:
            assert isinstance(body.get("detail"), (str, list)), body

    check()


@pytest.mark.parametrize("query", [
    "end_date=9999-12-31", "start_date=0001-01-01", "start_date=0001-01-01&end_date=9999-12-31",
    "end_date=0001-01-01", "start_date=9999-12-31", "end_date=0001-01-01&days=3660",
])
@pytest.mark.parametrize("path", ["/token-usage", "/token-usage/user/alice",
                                  "/token-usage/cost-analysis", "/token-usage/allocation",
                                  "/token-usage/what-if?target=gpt-4o-mini"])
def test_extreme_dates_are_answered_not_500(client: TestClient, path: str, query: str) -> None:
    joiner = "&" if "?" in path else "?"
    response = client.get(path + joiner + query, headers={"Authorization": f"Bearer {ADMIN}"})
    assert response.status_code == 200, response.text
    if query == "start_date=0001-01-01&end_date=9999-12-31" and path == "/token-usage":
        totals = response.json()["summary"]["totals"]
        assert totals["total_operations"] == 7  # the whole calendar holds every row
