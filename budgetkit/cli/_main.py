"""The ``budgetkit`` command line.

    budgetkit report [summary|costs|forecast|anomalies|what-if|allocation|daily|weekly|monthly]
    budgetkit budgets list|status|add|set|remove                 budgetkit alerts
    budgetkit approve BUDGET
    budgetkit export -o usage.csv        budgetkit prices MODEL  budgetkit purge --older-than 90
    budgetkit rollup [--rebuild]         budgetkit serve         budgetkit demo

Every command takes ``--db`` (a SQLAlchemy URL or a SQLite path; default ``BUDGETKIT_DB`` or
``~/.budgetkit/budgetkit.db``), ``--budgets`` (a TOML/JSON budget file; default
``BUDGETKIT_BUDGETS`` or ``budgets.toml`` next to the SQLite file) and ``--json``.

Commands that read a ledger (report, budgets, alerts, export, serve, purge, rollup) refuse a
SQLite file that does not exist, naming it (exit 2); approve and demo may create one.

Exit codes: 0 success; 1 the work failed (database unreachable, ...); 2 a wrong argument
or input (unknown model, bad date, unknown budget); 3 an optional dependency is missing.
Errors are one short line on stderr, never a traceback.

Over 500 lines because it is the argument table and one short function per command;
renderings shared with the demo are in ``_render``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from budgetkit.errors import (
    BudgetkitError,
    ConfigurationError,
    StoreUnavailable,
    UnknownModelError,
)

from ._budgets import CHANGE_ACTIONS, change_budgets
from ._budgets import add_arguments as add_budget_arguments
from ._console import integer, money, table
from ._progress import Progress
from ._render import amount, budget_table, group_table, period_line, render_summary

__all__ = ["main", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_MISSING_DEPENDENCY"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_MISSING_DEPENDENCY = 0, 1, 2, 3
REPORTS = ("summary", "costs", "forecast", "anomalies", "what-if", "allocation", "daily",
           "weekly", "monthly")


class _Usage(Exception):
    """A wrong argument found after parsing (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # one line and a pointer to --help, instead of argparse's full usage block
        raise _Usage(f"{message}\n(see '{self.prog} --help')")


# -- parser ---------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    # (parents are _Parsers too: the sub-parsers, made by _Parser, take parents of their class)
    common = _Parser(add_help=False)
    # SUPPRESS: an option given before the command is not reset by the sub-parser default
    common.add_argument("--db", default=argparse.SUPPRESS,
                        help="database URL or SQLite file (default: $BUDGETKIT_DB or "
                             "~/.budgetkit/budgetkit.db)")
    common.add_argument("--budgets", default=argparse.SUPPRESS, metavar="FILE",
                        help="budget definitions, TOML or JSON (default: $BUDGETKIT_BUDGETS "
                             "or budgets.toml next to the database)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON for scripts instead of tables")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars or progress lines on stderr")

    span = _Parser(add_help=False)
    span.add_argument("--days", type=int, help="the last N days (default 30)")
    span.add_argument("--start", metavar="DATE", help="first day, e.g. 2024-01-01")
    span.add_argument("--end", metavar="DATE", help="last day (inclusive)")
    span.add_argument("--model")
    span.add_argument("--user", dest="user_id")
    span.add_argument("--operation", dest="operation_type")
    span.add_argument("--project")
    span.add_argument("--tag")

    parser = _Parser(prog="budgetkit", parents=[common],
                     description="See where LLM money goes, bound it, and spend less.",
                     epilog="exit codes: 0 ok, 1 the work failed (e.g. database unreachable), "
                            "2 wrong argument or input, 3 optional dependency missing")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    report = sub.add_parser("report", parents=[common, span], help="usage and cost reports")
    report.add_argument("kind", nargs="?", default="summary", choices=REPORTS)
    report.add_argument("--by", default=None,
                        help="group by: model, operation, user, session, project, tag, "
                             "day, week, month, metadata.<key> (comma separated)")
    report.add_argument("--target", help="what-if: the model to re-price with")
    report.add_argument("--threshold", type=float, default=2.0,
                        help="anomalies: standard deviations (default 2)")
    report.add_argument("--unit", choices=("day", "hour"), default="day",
                        help="anomalies: day or hour buckets")
    report.add_argument("--period", choices=("day", "week", "month"), default="month",
                        help="forecast: the calendar period to project")

    budgets = sub.add_parser("budgets", parents=[common], help="budgets and their status")
    budgets.add_argument("action", nargs="?", default="status",
                         choices=("list", "status", *CHANGE_ACTIONS))
    budgets.add_argument("--budget", help="only this budget")
    add_budget_arguments(budgets)  # add|set|remove: the budgets stored in the ledger

    alerts = sub.add_parser("alerts", parents=[common], help="recent budget alerts")
    alerts.add_argument("--limit", type=int, default=20)
    alerts.add_argument("--budget", help="only this budget")

    approve = sub.add_parser("approve", parents=[common],
                             help="lift a budget's critical stop for its current window")
    approve.add_argument("budget")
    approve.add_argument("--key", help="which user / model / tag of a per-scope budget")
    approve.add_argument("--run-id", help="the run of a per-run budget")
    approve.add_argument("--extra", type=float, help="raise the stop by this amount only")
    approve.add_argument("--expires-in", type=float, metavar="HOURS",
                         help="the approval lapses after this many hours")
    approve.add_argument("--by", default=os.environ.get("USER"), help="who approves")
    approve.add_argument("--reason")

    export = sub.add_parser("export", parents=[common, span], help="export usage rows")
    export.add_argument("-o", "--output", default="-", help="file (default: stdout)")
    export.add_argument("--format", choices=("csv", "json", "jsonl"),
                        help="default: from the file name, else csv")

    prices = sub.add_parser("prices", parents=[common], help="look up model prices")
    prices.add_argument("models", nargs="*", metavar="MODEL")
    prices.add_argument("--search", help="list catalog models whose name contains this")

    purge = sub.add_parser("purge", parents=[common], help="delete old usage rows")
    purge.add_argument("--older-than", type=int, required=True, metavar="DAYS")
    purge.add_argument("--dry-run", action="store_true", help="only count")

    rollup = sub.add_parser("rollup", parents=[common],
                            help="state of the report rollup; --rebuild recomputes it")
    rollup.add_argument("--rebuild", action="store_true",
                        help="recompute the hourly/daily rollup from every usage row (needed "
                             "once for a ledger older than the rollup, or after rows were "
                             "written around budgetkit; on SQLite it locks the database "
                             "while it runs, about 11 s per million rows)")

    serve = sub.add_parser("serve", parents=[common], help="HTTP API and dashboard")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token", action="append", metavar="TOKEN[:USER]",
                       help="API token (repeatable); TOKEN:USER is scoped to one user. "
                            "Visible to other users in `ps`: prefer $BUDGETKIT_API_TOKENS. "
                            "Default: $BUDGETKIT_API_TOKENS, else the admin token in "
                            "--token-file")
    serve.add_argument("--token-file", metavar="PATH",
                       help="where the admin token is kept when no token is given, created "
                            "with a random token, mode 0600, if missing; never printed "
                            "(default: $BUDGETKIT_API_TOKEN_FILE or ~/.budgetkit/api-token)")

    demo = sub.add_parser("demo", parents=[common],
                          help="run an offline demo workload and print the report")
    demo.add_argument("--calls", type=int, default=300)
    demo.add_argument("--users", type=int, default=5)
    demo.add_argument("--seed", type=int, default=7)
    return parser


# -- shared helpers -------------------------------------------------------------------------
def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    _stop_waiting(args)  # the result replaces the "reading the ledger" bar
    if args.json:
        print(json.dumps(data, indent=2, default=str, allow_nan=False))
    else:
        print(text)


def _progress(args: argparse.Namespace, label: str, total: int | None = None, *,
              unit: str = "") -> Progress:
    """A stage's progress on stderr: a bar on a terminal, else one line if it took a while;
    nothing with ``--quiet``."""
    return Progress(label, total, unit=unit, quiet=args.quiet)


def _stop_waiting(args: argparse.Namespace) -> None:
    waiting: Progress | None = getattr(args, "waiting", None)
    if waiting is not None:
        waiting.close()


def _budget_file(args: argparse.Namespace, db_url: str) -> Path | None:
    if args.budgets:
        return Path(args.budgets)
    env = os.environ.get("BUDGETKIT_BUDGETS")
    if env:
        return Path(env)
    if db_url.startswith("sqlite:///"):
        candidate = Path(db_url[len("sqlite:///"):]).parent / "budgets.toml"
        if candidate.is_file():
            return candidate
    return None


def open_engine(args: argparse.Namespace) -> Any:
    """The engine of ``--db`` with the budgets of ``--budgets`` loaded."""
    from budgetkit.engine import Engine

    engine = Engine(db=args.db)
    path = _budget_file(args, engine.store.url)
    if path is not None:
        try:  # to read with, not to store: `budgets add --file` stores a file's budgets
            engine.load_budgets(path, shared=False)
        except BaseException:
            engine.close()
            raise
    return engine


def _span(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"days": args.days, "start_date": args.start, "end_date": args.end}
    for name in ("model", "user_id", "operation_type", "project", "tag"):
        if getattr(args, name, None):
            out[name] = getattr(args, name)
    return out


def cmd_report(args: argparse.Namespace, engine: Any) -> int:
    from budgetkit.reports import (
        allocate_costs,
        cost_analysis,
        detect_anomalies,
        forecast,
        periodic_report,
        summarize,
        what_if,
    )

    span = _span(args)
    kind = args.kind
    if kind == "summary" and args.by:
        dims = [d.strip() for d in args.by.split(",") if d.strip()]
        summary = summarize(engine, group_by=dims, **span)
        data = summary.to_dict()
        text = (f"budgetkit report by {', '.join(summary.group_by)}  "
                f"{period_line(data['period'])}\n\n"
                + group_table(data["groups"], list(summary.group_by))
                + f"\n\ntotal {money(summary.totals.cost)} over "
                  f"{integer(summary.totals.calls)} calls")
        _emit(args, data, text)
    elif kind == "summary":
        data, text = render_summary(engine, span)
        _emit(args, data, text)
    elif kind == "costs":
        analysis = cost_analysis(engine, **span).to_dict()
        rows = [[op, integer(v["operation_count"]), integer(v["total_tokens"]),
                 money(v["total_cost"]), money(v["cost_per_operation"]),
                 f"${v['cost_per_token'] * 1e6:.4f}"]
                for op, v in analysis["operation_costs"].items()]
        text = "\n".join([
            f"Cost analysis  {period_line(analysis['period'])}", "",
            f"total {money(analysis['total_cost_usd'])}  tokens "
            f"{integer(analysis['total_tokens'])}  per 1M tokens "
            f"${analysis['cost_per_token'] * 1e6:.4f}", "",
            table(rows, ["operation", "calls", "tokens", "cost", "per call", "per 1M tok"],
                  "lrrrrr"), "",
            "Recommendations", *([f"  - {m}" for m in analysis["recommendations"]]
                                 or ["  (none: nothing stands out)"])])
        _emit(args, analysis, text)
    elif kind == "forecast":
        filters = {k: v for k, v in span.items() if k not in ("days", "start_date", "end_date")}
        result = forecast(engine, period=args.period, **filters).to_dict()
        text = (f"Forecast for the {args.period} {period_line(result['period'])}\n"
                f"  spent so far     {money(result['spent_usd'])}\n"
                f"  projected total  {money(result['projected_total_usd'])}\n"
                f"  daily rate       {money(result['daily_rate_usd'])}\n"
                f"  method           {result['method']}")
        _emit(args, result, text)
    elif kind == "anomalies":
        found = [a.to_dict() for a in detect_anomalies(
            engine, unit=args.unit, threshold=args.threshold, **span)]
        text = "\n".join([a["description"] for a in found]) or (
            f"No {args.unit} with cost more than {args.threshold:g} standard deviations "
            "from the recent mean.")
        _emit(args, found, text)
    elif kind == "what-if":
        if not args.target:
            raise _Usage("report what-if needs --target MODEL")
        result = what_if(engine, args.target, **span).to_dict()
        rows = [[r["model"], integer(r["calls"]), money(r["actual_cost_usd"]),
                 money(r["repriced_cost_usd"]), money(r["difference_usd"])]
                for r in result["models"]]
        text = (f"What if {result['target']} had answered every call "
                f"({period_line(result['period'])})\n\n"
                + table(rows, ["model", "calls", "actual", f"as {result['target']}",
                               "difference"], "lrrrr")
                + f"\n\ntotal {money(result['actual_cost_usd'])} → "
                  f"{money(result['repriced_cost_usd'])}"
                + (f"\nskipped (different mode or unpriced): "
                   f"{', '.join(result['skipped_models'])}" if result["skipped_models"] else ""))
        _emit(args, result, text)
    elif kind == "allocation":
        dim = args.by or "project"
        rows_data = allocate_costs(engine, by=dim, **span)
        key = next((k for k in rows_data[0] if k not in ("calls", "total_tokens", "cost_usd",
                                                         "share")), dim) if rows_data else dim
        rows = [[r.get(key) if r.get(key) is not None else "(none)", integer(r["calls"]),
                 money(r["cost_usd"]), f"{r['share']:.1%}"] for r in rows_data]
        _emit(args, rows_data, f"Cost allocation by {key}\n\n"
              + table(rows, [key, "calls", "cost", "share"], "lrrr"))
    else:
        period = {"daily": "day", "weekly": "week", "monthly": "month"}[kind]
        filters = {k: v for k, v in span.items() if k not in ("days", "start_date", "end_date")}
        report = periodic_report(engine, period, **filters)
        _emit(args, report, _render_periodic(report))
    return EXIT_OK


def _render_periodic(report: dict[str, Any]) -> str:
    totals = report["totals"]
    lines = [f"{report['report'].capitalize()} report  {period_line(report['period'])}", "",
             f"calls {integer(totals['calls'])}  tokens {integer(totals['total_tokens'])}  "
             f"cost {money(totals['cost_usd'])}  saved {money(totals['saved_usd'])}", "",
             "By model", group_table(report["by_model"], ["model"]), "",
             "By operation", group_table(report["by_operation"], ["operation_type"]), "",
             "Budgets", budget_table(report["budgets"]), ""]
    lines += ["Alerts", *([f"  {a['created_at'][:16]}  {a['message']}" for a in report["alerts"]]
                          or ["  (none)"])]
    if "forecast" in report:
        f = report["forecast"]
        lines += ["", f"Forecast: {money(f['projected_total_usd'])} by "
                      f"{f['period']['end'][:10]} ({f['method']})"]
    for a in report.get("anomalies", []):
        lines.append(f"Anomaly: {a['description']}")
    if report.get("recommendations"):
        lines += ["", "Recommendations",
                  *[f"  - {r['message']}" for r in report["recommendations"]]]
    return "\n".join(lines)


# -- budgets, alerts, approve ----------------------------------------------------------------
def _no_budgets_hint(engine: Any) -> str:
    return ("No budgets loaded. Give a budget file with --budgets FILE (or BUDGETKIT_BUDGETS); "
            "budgets.toml next to the database is read too.")


def cmd_budgets(args: argparse.Namespace, engine: Any) -> int:
    from budgetkit.reports import as_plain, budget_rows

    if args.action in CHANGE_ACTIONS:
        payload, text = change_budgets(args, engine.store)
        _emit(args, payload, text)
        return EXIT_OK
    if args.action == "list":
        budgets = [as_plain(b) for b in engine.budgets()
                   if args.budget is None or b.name == args.budget]
        cells = [[b["name"], b["scope"] + (f"={b['match']}" if b.get("match") else ""),
                  b["period"], amount(b["limit"], b["unit"]), b["unit"],
                  ", ".join(f"{x:g}" for x in b["alert_at"])] for b in budgets]
        text = (table(cells, ["budget", "scope", "period", "limit", "unit", "alerts at"],
                      "lllrll") if budgets else _no_budgets_hint(engine))
        _emit(args, budgets, text)
        return EXIT_OK
    rows = budget_rows(engine)
    if args.budget is not None:
        if args.budget not in {b.name for b in engine.budgets()}:
            raise ConfigurationError(f"unknown budget {args.budget!r}")
        rows = [r for r in rows if r["budget"] == args.budget]
    text = budget_table(rows) if engine.budgets() else _no_budgets_hint(engine)
    _emit(args, rows, text)
    return EXIT_OK


def cmd_alerts(args: argparse.Namespace, engine: Any) -> int:
    from budgetkit.reports import alert_rows

    if args.limit < 1:
        raise _Usage(f"--limit must be >= 1, got {args.limit}")
    rows = alert_rows(engine, limit=args.limit,
                      budgets={args.budget} if args.budget else None)
    text = "\n".join(f"{a['created_at'][:19].replace('T', ' ')}  {a['level']:<8}  {a['message']}"
                     for a in rows) or "No budget alerts."
    _emit(args, rows, text)
    return EXIT_OK


def cmd_approve(args: argparse.Namespace, engine: Any) -> int:
    from budgetkit.reports import as_plain

    if args.budget not in {b.name for b in engine.budgets()}:
        raise ConfigurationError(
            f"unknown budget {args.budget!r}; load its definition with --budgets FILE")
    if args.expires_in is not None and args.expires_in <= 0:
        raise _Usage(f"--expires-in must be > 0 hours, got {args.expires_in:g}")
    approval = engine.approve(
        args.budget, extra=args.extra, by=args.by, key=args.key, run_id=args.run_id,
        reason=args.reason,
        expires=dt.timedelta(hours=args.expires_in) if args.expires_in else None)
    data = as_plain(approval)
    cap = "no cap" if data["extra"] is None else f"+{data['extra']:g}"
    until = f" until {data['expires_at'][:16]}" if data["expires_at"] else ""
    _emit(args, data, f"Approved {args.budget!r} for the window starting "
                      f"{data['window_start'][:16]} ({cap}{until}).")
    return EXIT_OK


# -- export, prices, purge ---------------------------------------------------------------------
def cmd_export(args: argparse.Namespace, engine: Any) -> int:
    from budgetkit.reports import export_usage

    span = _span(args)
    # rows printed to a terminal would scribble over the bar
    to_screen = args.output == "-" and sys.stdout.isatty()
    with Progress("export", unit="rows", quiet=args.quiet or to_screen) as progress:
        if args.output == "-":
            count = export_usage(engine, sys.stdout, format=args.format or "csv",
                                 progress=progress.update, **span)
        else:
            count = export_usage(engine, args.output, format=args.format,
                                 progress=progress.update, **span)
    if args.output != "-":
        message = {"rows": count, "file": args.output}
        if args.json:
            print(json.dumps(message))
        else:
            print(f"Exported {count:,} rows to {args.output}", file=sys.stderr)
    return EXIT_OK


def cmd_prices(args: argparse.Namespace) -> int:
    from budgetkit.pricing import default_catalog

    catalog = default_catalog()
    if args.search:
        needle = args.search.lower()
        entries = [p for p in catalog if needle in p.name.lower()]
    elif args.models:
        entries = [catalog.get(m) for m in args.models]  # UnknownModelError names it
    else:
        raise _Usage("give a MODEL (e.g. budgetkit prices gpt-4o) or --search TEXT")

    def per_m(picos: int | None) -> float | None:
        return None if picos is None else picos / 1e6

    data: list[dict[str, Any]] = [{"model": p.name, "provider": p.provider, "mode": p.mode,
             "input_per_1m_usd": per_m(p.input_picos), "output_per_1m_usd": per_m(p.output_picos),
             "cached_input_per_1m_usd": per_m(p.cached_input_picos),
             "context_window": p.context_window, "max_output_tokens": p.max_output_tokens,
             "source_date": p.source_date} for p in sorted(entries, key=lambda e: e.name)]
    rows = [[d["model"], d["provider"], d["mode"], money(d["input_per_1m_usd"]),
             money(d["output_per_1m_usd"]), money(d["cached_input_per_1m_usd"]),
             integer(d["context_window"]), integer(d["max_output_tokens"])] for d in data]
    _emit(args, data, "Prices per 1M tokens\n\n" + table(
        rows, ["model", "provider", "mode", "input", "output", "cached in", "context",
               "max out"], "lllrrrrr"))
    return EXIT_OK


def cmd_purge(args: argparse.Namespace, engine: Any) -> int:
    from sqlalchemy import func, select

    from budgetkit.ledger import UsageRow, table_of

    if args.older_than < 1:
        raise _Usage(f"--older-than must be >= 1 day, got {args.older_than}")
    engine.flush()
    cutoff = engine.now() - dt.timedelta(days=args.older_than)
    table_ = table_of(UsageRow)
    with engine.store.engine.connect() as conn:
        total, oldest = conn.execute(select(func.count(), func.min(table_.c.created_at))
                                     .where(table_.c.created_at < cutoff)).one()
    if args.dry_run or not total:
        verb = "Would delete" if args.dry_run else "Deleted"
        _emit(args, {"rows": int(total), "before": cutoff.isoformat(), "dry_run": args.dry_run},
              f"{verb} {int(total):,} usage rows older than {cutoff:%Y-%m-%d %H:%M} UTC.")
        return EXIT_OK
    # delete a day at a time, oldest first: short transactions and a progress bar
    if isinstance(oldest, str):
        oldest = dt.datetime.fromisoformat(oldest)
    deleted = 0
    step = max(dt.timedelta(days=1), (cutoff - oldest) / 200)
    with _progress(args, "purge", total, unit="rows") as progress:
        edge = oldest
        while edge < cutoff:
            edge = min(edge + step, cutoff)
            deleted += engine.store.purge_usage(edge)
            progress.update(deleted)
    _emit(args, {"rows": deleted, "before": cutoff.isoformat(), "dry_run": False},
          f"Deleted {deleted:,} usage rows older than {cutoff:%Y-%m-%d %H:%M} UTC.")
    return EXIT_OK


def cmd_rollup(args: argparse.Namespace, engine: Any) -> int:
    engine.flush()
    if args.rebuild:
        with _progress(args, "rollup rebuild", unit="tables") as progress:
            state = engine.store.rebuild_rollup(progress=progress.update)
    else:
        state = engine.store.rollup_status()
    data = state.to_dict()
    counts = ", ".join(f"{name.removeprefix('budgetkit_usage_')} {integer(n)}"
                       for name, n in state.buckets.items())
    if args.rebuild:
        text = f"Rebuilt the rollup in {state.seconds:.1f} s ({counts} buckets)."
    elif state.ready:
        built = state.built_at.strftime("%Y-%m-%d %H:%M") if state.built_at else "?"
        text = (f"Rollup ready (version {state.version}, trusted since {built} UTC; "
                f"{counts} buckets): reports read it.")
    else:
        text = ("Rollup not built: reports read the usage rows directly (slower on large "
                "ledgers). Run 'budgetkit rollup --rebuild'.")
    _emit(args, data, text)
    return EXIT_OK


# -- serve, demo ------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace, engine: Any) -> int:
    try:
        import uvicorn

        from budgetkit.server import (
            DEFAULT_TOKEN_FILE,
            TOKEN_FILE_ENV,
            TOKENS_ENV,
            admin_token_from_file,
            create_app,
            parse_tokens,
        )
    except ImportError as exc:
        print(f"budgetkit serve needs the server extra: pip install 'budgetkit[server]' "
              f"({exc.name} is missing)", file=sys.stderr)
        return EXIT_MISSING_DEPENDENCY
    # Tokens are secrets: refused at start when malformed, and never printed (terminals,
    # CI logs and process supervisors keep stdout).
    base = f"http://{args.host}:{args.port}"
    if args.token:
        tokens = parse_tokens(args.token)
        where = f"{len(tokens)} token(s) from --token (not shown)"
    elif os.environ.get(TOKENS_ENV, "").strip():
        tokens = parse_tokens(os.environ[TOKENS_ENV])
        where = f"{len(tokens)} token(s) from ${TOKENS_ENV} (not shown)"
    else:
        path = Path(args.token_file or os.environ.get(TOKEN_FILE_ENV)
                    or DEFAULT_TOKEN_FILE).expanduser()
        token, created = admin_token_from_file(path)
        tokens = {token: None}
        where = (f"the admin token is in {path} ({'created, ' if created else ''}readable by "
                 f"you only): paste it into the dashboard, or send "
                 f"'Authorization: Bearer $(cat {path})'")
    app = create_app(engine, tokens=tokens)
    print(f"budgetkit dashboard: {base}/dashboard")
    print(f"access: {where}")
    print(f"API reference: {base}/docs")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from ._demo import run_demo
    except ImportError as exc:  # pragma: no cover - the module itself has no extra imports
        print(f"budgetkit demo is unavailable: {exc}", file=sys.stderr)
        return EXIT_MISSING_DEPENDENCY
    if args.calls < 1 or args.users < 1:
        raise _Usage("--calls and --users must be >= 1")
    return run_demo(db=args.db, calls=args.calls, users=args.users, seed=args.seed,
                    as_json=args.json, quiet=args.quiet)


# -- main -----------------------------------------------------------------------------------
_ENGINE_COMMANDS = {"report": cmd_report, "budgets": cmd_budgets, "alerts": cmd_alerts,
                    "approve": cmd_approve, "export": cmd_export, "purge": cmd_purge,
                    "rollup": cmd_rollup, "serve": cmd_serve}
_READ_COMMANDS = frozenset({"report", "budgets", "alerts"})
# Commands that only make sense on a ledger that exists: a mistyped --db must not quietly
# create (and report on) an empty one. approve writes a new approval, so it may create it.
_NEEDS_EXISTING_LEDGER = frozenset({"report", "budgets", "alerts", "export", "serve", "purge",
                                    "rollup"})


def missing_ledger(db: str | None) -> Path | None:
    """The SQLite file ``db`` names (default ``BUDGETKIT_DB``, else the home ledger) when it
    does not exist; ``None`` when it exists or ``db`` is not a SQLite file (a server URL,
    ``:memory:``). Nothing is created while looking."""
    text = db if db is not None else (os.environ.get("BUDGETKIT_DB")
                                      or str(Path.home() / ".budgetkit" / "budgetkit.db"))
    if "://" in text:
        from sqlalchemy.engine import make_url

        url = make_url(text)
        if not url.drivername.startswith("sqlite") or url.database in (None, "", ":memory:"):
            return None
        path = Path(url.database)
    elif text == ":memory:":
        return None
    else:
        path = Path(text)
    path = path.expanduser()
    return None if path.exists() else path


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        # not parser.set_defaults: it would reset the shared --db action's SUPPRESS default
        for name, default in (("db", None), ("budgets", None), ("json", False),
                              ("quiet", False)):
            if not hasattr(args, name):
                setattr(args, name, default)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        if args.command == "prices":
            return cmd_prices(args)
        if args.command == "demo":
            return cmd_demo(args)
        if args.command in _NEEDS_EXISTING_LEDGER and (absent := missing_ledger(args.db)):
            raise _Usage(f"no ledger at {absent}: {args.command} reads an existing one (check "
                         "--db or BUDGETKIT_DB; a ledger is created by the first call an "
                         "application records)")
        engine = open_engine(args)
        if args.command in _READ_COMMANDS:  # a query over a large ledger can take a while
            args.waiting = _progress(args, f"{args.command}: reading the ledger")
        try:
            return _ENGINE_COMMANDS[args.command](args, engine)
        finally:
            _stop_waiting(args)
            engine.close()
    except _Usage as exc:
        print(f"budgetkit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help and --version
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    except (ConfigurationError, UnknownModelError) as exc:
        print(f"budgetkit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreUnavailable as exc:
        print(f"budgetkit: database unavailable: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BudgetkitError as exc:
        print(f"budgetkit: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("budgetkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `budgetkit export | head`
        return EXIT_OK
    except OSError as exc:
        print(f"budgetkit: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # database drivers: one line, not a traceback
        from sqlalchemy.exc import ArgumentError, SQLAlchemyError

        if isinstance(exc, ArgumentError):
            print(f"budgetkit: error: bad --db URL: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(exc, SQLAlchemyError):
            detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            print(f"budgetkit: database error: {detail}", file=sys.stderr)
            return EXIT_FAILED
        raise
