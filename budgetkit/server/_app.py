"""FastAPI app: the Token Usage Tracking seed's endpoints, budgets, alerts and a dashboard.

Access needs a bearer token. A token maps to ``None`` (sees everything) or to one user
id (sees only that user's usage, budgets and alerts; other users' pages answer 403).
Bad parameters (days < 1, malformed dates, end before start) answer 422 with a message;
any date from 0001-01-01 to 9999-12-31 is answered (9999-12-31: no end), never a 500
(``tests/test_server_fuzz.py`` fuzzes every parameter of every endpoint).
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from budgetkit._version import __version__
from budgetkit.errors import ConfigurationError, StoreUnavailable, UnknownModelError
from budgetkit.reports import (
    alert_rows,
    allocate_costs,
    as_source,
    budget_rows,
    cost_analysis,
    detect_anomalies,
    fill_series,
    forecast,
    summarize,
    summarize_many,
    what_if,
)

from ._docs import render_api_reference
from ._models import (
    CostAnalysisResponse,
    TokenUsageResponse,
    UserUsageResponse,
    seed_daily,
    seed_summary_row,
    seed_totals,
)
from ._money_text import money_ticks, with_money_text

__all__ = ["create_app", "parse_tokens", "admin_token_from_file", "TOKENS_ENV",
           "TOKEN_FILE_ENV", "DEFAULT_TOKEN_FILE"]

TOKENS_ENV = "BUDGETKIT_API_TOKENS"
TOKEN_FILE_ENV = "BUDGETKIT_API_TOKEN_FILE"
#: Where ``budgetkit serve`` keeps the admin token it generates (mode 0600).
DEFAULT_TOKEN_FILE = Path("~/.budgetkit/api-token")
_DASHBOARD = Path(__file__).with_name("dashboard.html")
_bearer = HTTPBearer(auto_error=False, description="An API token (admin or user-scoped)")

Days = Annotated[int | None, Query(ge=1, le=3660, description="the last N days (default 30)")]
StartDate = Annotated[dt.date | None, Query(description="first day, YYYY-MM-DD")]
EndDate = Annotated[dt.date | None, Query(description="last day (inclusive), YYYY-MM-DD")]


def parse_tokens(specs: Iterable[str] | str) -> dict[str, str | None]:
    """``"admin-token"`` (sees all) and ``"user-token:alice"`` (sees alice only).

    Accepts a list or one comma-separated string (the ``BUDGETKIT_API_TOKENS`` format).
    Refuses, with a :class:`ConfigurationError`, tokens under 8 characters, an empty user
    after the colon (``"tok:"``, which would otherwise read as an admin token), and one
    token given with two different users.
    """
    items = specs.split(",") if isinstance(specs, str) else list(specs)
    tokens: dict[str, str | None] = {}
    for item in (part.strip() for part in items):
        if not item:
            continue
        token, colon, user = item.partition(":")
        token, user = token.strip(), user.strip()
        # (errors show a token's first three characters only: they end up in logs)
        if len(token) < 8:
            raise ConfigurationError(f"API token {token[:3]!r}... is too short; use at least "
                                     "8 characters")
        if colon and not user:
            # "tok:" used to become an admin token: a typo must not widen access.
            raise ConfigurationError(
                f"API token {token[:3]!r}... has an empty user after ':'; write TOKEN:USER "
                "for a token scoped to one user, or TOKEN alone for an admin token")
        scope = user or None
        if token in tokens and tokens[token] != scope:
            raise ConfigurationError(f"API token {token[:3]!r}... is given twice with "
                                     "different users")
        tokens[token] = scope
    return tokens


def admin_token_from_file(path: str | Path) -> tuple[str, bool]:
    """The admin token kept in ``path``, created (random, 32 characters) if the file does
    not exist; returns ``(token, created)``.

    The file is readable and writable by its owner only (0600; created so, never briefly
    wider, and tightened if it was wider), in a folder made 0700. So the token never has to
    be printed, logged or passed on a command line (visible to every user in ``ps``): the
    operator reads it from the file. Raises :class:`ConfigurationError` naming the file
    when it cannot be read or holds no valid token.
    """
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)  # a copy others can read is not a secret
            token = path.read_text(encoding="utf-8").strip()
            created = False
        else:
            token = secrets.token_urlsafe(24)
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                handle.write(token + "\n")
            created = True
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"API token file {str(path)!r}: {exc}") from None
    if len(token) < 8 or any(ch in token for ch in ":, \t\n"):
        raise ConfigurationError(f"API token file {str(path)!r}: expected one token of at "
                                 "least 8 characters (no ':', ',' or spaces)")
    return token, created


class Principal:
    """Who is asking: ``user_id`` None is an admin token."""

    def __init__(self, user_id: str | None) -> None:
        self.user_id = user_id

    def user_filter(self) -> dict[str, Any]:
        return {"user_id": self.user_id} if self.user_id is not None else {}


def principal(request: Request, credentials: Annotated[
        HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
    """The caller, from its bearer token (compared in constant time)."""
    state = request.app.state
    if state.allow_anonymous:
        return Principal(None)
    if credentials is None:
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    offered = credentials.credentials.encode()
    for token, user in state.tokens.items():
        if secrets.compare_digest(offered, token.encode()):
            return Principal(user)
    raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})


Who = Annotated[Principal, Depends(principal)]


def create_app(engine: Any, *, tokens: Mapping[str, str | None] | None = None,
               allow_anonymous: bool = False) -> FastAPI:
    """The API and dashboard over ``engine`` (an :class:`~budgetkit.Engine`).

    ``tokens`` maps token → user id (``None``: sees every user). Default: the
    ``BUDGETKIT_API_TOKENS`` variable, else one random admin token, readable as
    ``app.state.tokens`` (``budgetkit serve`` keeps its token in a 0600 file instead, see
    :func:`admin_token_from_file`, and never prints it). ``allow_anonymous=True`` turns
    access control off (local experiments only).
    """
    if tokens is None:
        env = os.environ.get(TOKENS_ENV, "")
        tokens = parse_tokens(env) if env.strip() else {}
        if not tokens and not allow_anonymous:
            tokens = {secrets.token_urlsafe(24): None}
    # FastAPI's Swagger UI and ReDoc pages load scripts and styles from a CDN: off, and
    # /docs is our own page with nothing external (see _docs).
    app = FastAPI(title="budgetkit", version=__version__,
                  description="Token usage, cost analysis, budgets and alerts.",
                  docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.tokens = dict(tokens)
    app.state.allow_anonymous = allow_anonymous


    @app.exception_handler(ConfigurationError)
    async def _bad_input(_request: Request, exc: ConfigurationError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(UnknownModelError)
    async def _unknown_model(_request: Request, exc: UnknownModelError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(StoreUnavailable)
    async def _store_down(_request: Request, exc: StoreUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    def span(days: int | None, start: dt.date | None, end: dt.date | None) -> dict[str, Any]:
        if start is not None and end is not None and end < start:
            raise HTTPException(422, f"end_date ({end}) is before start_date ({start})")
        return {"days": days, "start_date": start, "end_date": end}

    @app.get("/health", tags=["meta"])
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/token-usage", response_model=TokenUsageResponse, tags=["usage"])
    def token_usage(who: Who, days: Days = None, start_date: StartDate = None,
                    end_date: EndDate = None) -> dict[str, Any]:
        """Usage by operation type and model, totals, and the daily series."""
        kw = {**span(days, start_date, end_date), **who.user_filter()}
        src = as_source(app.state.engine)
        summary = summarize(src, group_by=["operation_type", "model"], **kw)
        series = summarize(src, group_by="day", **kw)
        return with_money_text({
            "message": "Token usage statistics retrieved successfully",
            "period": summary.period.to_dict(),
            "summary": {"summary": [seed_summary_row(g) for g in summary.groups],
                        "totals": seed_totals(summary.totals)},
            "daily_usage": [seed_daily(g) for g in series.groups]})

    @app.get("/token-usage/user/{user_id}", response_model=UserUsageResponse, tags=["usage"])
    def user_usage(user_id: str, who: Who, days: Days = None, start_date: StartDate = None,
                   end_date: EndDate = None) -> dict[str, Any]:
        """One user's usage by operation type."""
        if who.user_id is not None and who.user_id != user_id:
            raise HTTPException(403, "this token may only read its own user's usage")
        summary = summarize(app.state.engine, group_by="operation_type", user_id=user_id,
                            **span(days, start_date, end_date))
        return with_money_text({
            "message": f"Token usage statistics for user {user_id}",
            "period": summary.period.to_dict(),
            "user_usage": {"user_id": user_id,
                           "summary": [seed_summary_row(g) for g in summary.groups],
                           "totals": seed_totals(summary.totals)}})

    @app.get("/token-usage/cost-analysis", response_model=CostAnalysisResponse,
             tags=["usage"])
    def cost_analysis_endpoint(who: Who, days: Days = None, start_date: StartDate = None,
                               end_date: EndDate = None) -> dict[str, Any]:
        """Cost per token and per operation, with recommendations naming their figures."""
        analysis = cost_analysis(app.state.engine, **span(days, start_date, end_date),
                                 **who.user_filter())
        return with_money_text({"message": "Cost analysis completed successfully",
                                "cost_analysis": analysis.to_dict()})

    @app.get("/token-usage/forecast", tags=["usage"])
    def forecast_endpoint(who: Who, period: Annotated[str, Query(
            pattern="^(day|week|month)$")] = "month") -> dict[str, Any]:
        """Projected spend at the end of the calendar period (method included)."""
        return with_money_text(forecast(app.state.engine, period=period,
                                        **who.user_filter()).to_dict())

    @app.get("/token-usage/anomalies", tags=["usage"])
    def anomalies_endpoint(who: Who, days: Days = None,
                           threshold: Annotated[float, Query(gt=0)] = 2.0,
                           unit: Annotated[str, Query(pattern="^(day|hour)$")] = "day"
                           ) -> dict[str, Any]:
        """Days or hours whose cost is more than ``threshold`` standard deviations off."""
        found = detect_anomalies(app.state.engine, days=days or 30, threshold=threshold,
                                 unit=unit, **who.user_filter())
        return {"anomalies": [a.to_dict() for a in found]}

    @app.get("/token-usage/allocation", tags=["usage"])
    def allocation_endpoint(who: Who, by: Annotated[str, Query(
            description="project, tag, user, model, operation or metadata.<key>")] = "project",
            days: Days = None, start_date: StartDate = None,
            end_date: EndDate = None) -> dict[str, Any]:
        """Spend split by project, tag, user or a metadata key, with each share."""
        rows = allocate_costs(app.state.engine, by=by, **span(days, start_date, end_date),
                              **who.user_filter())
        return with_money_text({"by": by, "allocation": rows})

    @app.get("/token-usage/what-if", tags=["usage"])
    def what_if_endpoint(who: Who, target: Annotated[str, Query(min_length=1)],
                         days: Days = None, start_date: StartDate = None,
                         end_date: EndDate = None) -> dict[str, Any]:
        """The period's calls re-priced as if ``target`` had answered them."""
        return with_money_text(what_if(app.state.engine, target,
                                       **span(days, start_date, end_date),
                                       **who.user_filter()).to_dict())

    @app.get("/budgets", tags=["budgets"])
    def budgets_endpoint(who: Who) -> dict[str, Any]:
        """Used / reserved / remaining / percentage of each budget window."""
        return with_money_text({"budgets": budget_rows(app.state.engine, user_id=who.user_id)})

    @app.get("/alerts", tags=["budgets"])
    def alerts_endpoint(who: Who, limit: Annotated[int, Query(ge=1, le=1000)] = 50
                        ) -> dict[str, Any]:
        """Recent budget alerts, oldest first."""
        return {"alerts": _alerts_for(app.state.engine, who, limit)}

    @app.get("/api/dashboard", tags=["dashboard"])
    def dashboard_data(who: Who, days: Days = None) -> dict[str, Any]:
        """Everything the dashboard draws, in one call."""
        return dashboard_payload(app.state.engine, who, days or 30)

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> HTMLResponse:
        return HTMLResponse(_DASHBOARD.read_text(encoding="utf-8"),
                            headers={"Cache-Control": "no-store"})

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/dashboard")

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def api_reference() -> HTMLResponse:
        return HTMLResponse(render_api_reference(app.openapi()))

    return app


def _alerts_for(engine: Any, who: Principal, limit: int) -> list[dict[str, Any]]:
    if who.user_id is None:
        return alert_rows(engine, limit=limit)
    mine = {row["budget"] for row in budget_rows(engine, user_id=who.user_id)}
    rows = alert_rows(engine, limit=1000, budgets=mine)
    return [r for r in rows if r["scope_key"] == who.user_id][-limit:]


def dashboard_payload(engine: Any, who: Principal, days: int) -> dict[str, Any]:
    """Spend per day, cost by model and operation, budgets, alerts, cache savings."""
    src = as_source(engine)
    kw = who.user_filter()
    by_model, by_op, by_day = summarize_many(src, ["model", "operation_type", "day"],
                                             days=days, **kw)
    series = fill_series(by_day, "day")
    totals = by_model.totals
    analysis = cost_analysis(src, days=days, **kw)
    prediction = forecast(src, period="month", **kw)
    anomalies = detect_anomalies(src, days=days, **kw)
    return with_money_text({
        "generated_at": src.now.isoformat(), "days": days, "user_scope": who.user_id,
        "daily_ticks": money_ticks(max((g.cost for g in series), default=0.0)),
        "period": by_model.period.to_dict(), "totals": totals.to_dict(),
        "daily": [{"day": g.key["day"], "cost_usd": g.cost, "calls": g.calls,
                   "saved_usd": g.saved, "tokens": g.total_tokens} for g in series],
        "by_model": [{"model": g.key["model"], "cost_usd": g.cost, "calls": g.calls,
                      "tokens": g.total_tokens} for g in by_model.groups],
        "by_operation": [{"operation_type": g.key["operation_type"], "cost_usd": g.cost,
                          "calls": g.calls, "tokens": g.total_tokens} for g in by_op.groups],
        "budgets": budget_rows(engine, user_id=who.user_id),
        "alerts": _alerts_for(engine, who, 10),
        "cache": {"hits": totals.cache_hits, "saved_usd": totals.saved,
                  "hit_rate": totals.cache_hits / totals.calls if totals.calls else 0.0,
                  "paid_calls": totals.calls - totals.cache_hits},
        "forecast": prediction.to_dict(),
        "anomalies": [a.to_dict() for a in anomalies],
        "recommendations": [r.message for r in analysis.recommendations],
    })
