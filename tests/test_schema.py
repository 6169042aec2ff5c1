"""A database made by an older budgetkit is brought up to date: missing columns and indexes
are added (existing rows keep working), and what cannot be added is a clear error that
changes nothing. A real SQLite file, and PostgreSQL when BUDGETKIT_TEST_POSTGRES_URL is set."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import create_engine, inspect, text

from budgetkit import ConfigurationError, Engine
from budgetkit.ledger._store import Store


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'old.db'}"
    return request.getfixturevalue("pg_url").replace("postgresql://", "postgresql+psycopg://")


def make_old(url: str, *statements: str) -> None:
    """Today's schema with what an older build lacked taken away again."""
    Store(url).create_tables()
    engine = create_engine(url)
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))
    engine.dispose()


def test_missing_columns_and_indexes_are_added_and_old_rows_still_read(url, caplog):
    make_old(url,
             "DROP INDEX ix_budgetkit_usage_prompt_hash",
             "ALTER TABLE budgetkit_usage DROP COLUMN prompt_hash",
             "ALTER TABLE budgetkit_usage DROP COLUMN route_reason",
             "INSERT INTO budgetkit_usage (id, created_at, operation_type, model, "
             "input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, "
             "reasoning_tokens, total_tokens, cost_nanos, saved_nanos, status, "
             "usage_source, tags, metadata) VALUES ('old-row', '2026-01-01 00:00:00', "
             "'chat_completion', 'gpt-4o-mini', 10, 1, 0, 0, 0, 11, 2100, 0, 'ok', "
             "'provider', '[]', '{}')")
    with caplog.at_level(logging.WARNING, logger="budgetkit"), Engine(db=url) as engine:
        ticket = engine.admit("gpt-4o-mini", prompt="hello", route_reason="cheap first")
        engine.settle(ticket, input_tokens=10, output_tokens=1)
        rows = {row.id: row for row in engine.usage()}
    assert rows["old-row"].route_reason is None and rows["old-row"].prompt_hash is None
    assert rows[ticket.id].route_reason == "cheap first" and rows[ticket.id].prompt_hash
    assert "budgetkit_usage.prompt_hash" in caplog.text
    assert "ix_budgetkit_usage_prompt_hash" in caplog.text
    engine = create_engine(url)
    names = {index["name"] for index in inspect(engine).get_indexes("budgetkit_usage")}
    engine.dispose()
    assert "ix_budgetkit_usage_prompt_hash" in names


def test_a_column_that_cannot_be_filled_is_a_clear_error_that_changes_nothing(url):
    make_old(url, "DROP INDEX ix_budgetkit_cache_entry_partition_id",
             "ALTER TABLE budgetkit_cache_entry DROP COLUMN partition_id",
             "ALTER TABLE budgetkit_usage DROP COLUMN route_reason")
    with pytest.raises(ConfigurationError, match="budgetkit_cache_entry.*partition_id"):
        Engine(db=url)
    engine = create_engine(url)
    columns = {column["name"] for column in inspect(engine).get_columns("budgetkit_usage")}
    engine.dispose()
    assert "route_reason" not in columns  # nothing was changed
