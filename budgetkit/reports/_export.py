"""Export usage rows to CSV or JSON, streamed from the database in chunks.

Rows are read with a server-side cursor / ``fetchmany`` and written as they come, so an
export of millions of rows needs little memory. Money is written in USD (exact decimal
text from the integer nano-dollars) next to the raw ``*_nanos`` integers.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
from pathlib import Path
from typing import IO, Any

from sqlalchemy import and_, func, select
from sqlalchemy.exc import OperationalError, ProgrammingError

from budgetkit.errors import ConfigurationError, StoreUnavailable
from budgetkit.pricing import nanos_to_decimal
from budgetkit.progress import ProgressCallback

from ._reports import USAGE, Period, _filters, as_source

__all__ = ["export_usage", "EXPORT_COLUMNS", "EXPORT_FORMATS"]

EXPORT_FORMATS = ("csv", "json", "jsonl")
EXPORT_COLUMNS = (
    "id", "created_at", "model", "provider", "operation_type", "status", "input_tokens",
    "output_tokens", "cached_input_tokens", "cache_write_tokens", "reasoning_tokens",
    "total_tokens", "cost_usd", "saved_usd", "cost_nanos", "saved_nanos", "latency_ms",
    "usage_source", "error_type", "user_id", "session_id", "project", "request_id", "run_id",
    "parent_run_id", "root_run_id", "task_type", "attempt", "route_reason", "tags", "metadata",
    "prompt_hash",
)
_CHUNK = 5_000


def _plain(row: Any) -> dict[str, Any]:
    m = row._mapping
    out: dict[str, Any] = {}
    for name in EXPORT_COLUMNS:
        if name == "cost_usd":
            out[name] = str(nanos_to_decimal(int(m["cost_nanos"])))
        elif name == "saved_usd":
            out[name] = str(nanos_to_decimal(int(m["saved_nanos"])))
        else:
            value = m[name]
            if isinstance(value, dt.datetime):
                value = value.isoformat()
            out[name] = value
    return out


def export_usage(source: Any, destination: str | os.PathLike[str] | IO[str], *,
                 format: str | None = None, days: int | None = None, start_date: Any = None,
                 end_date: Any = None, now: dt.datetime | None = None,
                 progress: ProgressCallback | None = None,
                 **filters: Any) -> int:
    """Write the period's usage rows (oldest first) to ``destination``; returns the count.

    ``format`` is csv, json (one array) or jsonl (a row per line); by default it follows
    the file's suffix. ``progress(done, total)`` is called after each chunk of rows (see
    :mod:`budgetkit.progress`).
    """
    if format is None:
        suffix = Path(os.fspath(destination)).suffix.lower().lstrip(".") if isinstance(
            destination, (str, os.PathLike)) else ""
        format = suffix if suffix in EXPORT_FORMATS else "csv"
    if format not in EXPORT_FORMATS:
        raise ConfigurationError(
            f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    src = as_source(source, now=now)
    period = Period.resolve(days=days, start_date=start_date, end_date=end_date, now=src.now)
    where = and_(*_filters(src, period, filters))
    columns = [USAGE.c[name] for name in EXPORT_COLUMNS if name in USAGE.c]
    query = select(*columns).where(where).order_by(USAGE.c.created_at, USAGE.c.id)
    if isinstance(destination, (str, os.PathLike)):
        with open(destination, "w", encoding="utf-8", newline="") as handle:
            return _write(src, query, where, handle, format, progress)
    return _write(src, query, where, destination, format, progress)


def _write(src: Any, query: Any, where: Any, out: IO[str], format: str,
           progress: ProgressCallback | None) -> int:
    done = 0
    try:
        with src.store.engine.connect() as conn:
            total = int(conn.execute(select(func.count()).select_from(USAGE).where(where))
                        .scalar_one())
            result = conn.execution_options(stream_results=True, yield_per=_CHUNK).execute(query)
            writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS) if format == "csv" else None
            if writer is not None:
                writer.writeheader()
            elif format == "json":
                out.write("[")
            for chunk in result.partitions(_CHUNK):
                for row in chunk:
                    record = _plain(row)
                    if writer is not None:
                        record["tags"] = json.dumps(record["tags"] or [])
                        record["metadata"] = json.dumps(record["metadata"] or {})
                        writer.writerow(record)
                    else:
                        text = json.dumps(record, separators=(",", ":"))
                        if format == "json":
                            out.write(("\n" if done == 0 else ",\n") + text)
                        else:
                            out.write(text + "\n")
                    done += 1
                if progress is not None:
                    progress(done, total)
            if format == "json":
                out.write("\n]\n" if done else "]\n")
    except (OperationalError, ProgrammingError) as exc:
        raise StoreUnavailable(f"cannot read usage from {src.store.engine.url!r}: "
                               f"{exc.orig or exc}") from exc
    if progress is not None and done == 0:
        progress(0, 0)
    return done


def export_text(source: Any, *, format: str = "csv", **kwargs: Any) -> str:
    """:func:`export_usage` into a string (small exports, tests)."""
    buffer = io.StringIO()
    export_usage(source, buffer, format=format, **kwargs)
    return buffer.getvalue()
