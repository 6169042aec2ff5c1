"""Versioned schema migrations: a database made by budgetkit 0.1.0 (its exact DDL, kept in
tests/data) is upgraded step by step to today's schema, and the result is the schema a new
database gets; a newer schema is refused; a failing step changes nothing; processes
upgrading at once upgrade once. A real SQLite file, and PostgreSQL when
BUDGETKIT_TEST_POSTGRES_URL is set."""

from __future__ import annotations

import importlib
import logging
import threading
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlmodel import SQLModel

from budgetkit import Budget, ConfigurationError, Engine
from budgetkit.ledger._schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    VERSION_TABLE,
    Migration,
    add_column,
    migrate,
    schema_version,
)
from budgetkit.ledger._store import TABLE_MODULES, Store

DATA = Path(__file__).parent / "data"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'old.db'}"
    return str(request.getfixturevalue("pg_url")).replace("postgresql://",
                                                          "postgresql+psycopg://")


def make_0_1_0(url: str) -> None:
    """A database exactly as budgetkit 0.1.0 made it, with a usage row and a budget window."""
    dialect = "postgresql" if url.startswith("postgresql") else "sqlite"
    ddl = "\n".join(line for line in (DATA / f"schema-0.1.0-{dialect}.sql").read_text()
                    .splitlines() if not line.startswith("--"))
    engine = create_engine(url)
    with engine.begin() as conn:
        for statement in ddl.split(";"):
            if statement.strip():
                conn.exec_driver_sql(statement)
        conn.execute(text(
            "INSERT INTO budgetkit_usage (id, created_at, operation_type, model, "
            "input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, "
            "reasoning_tokens, total_tokens, cost_nanos, saved_nanos, status, usage_source, "
            "tags, metadata) VALUES ('old-row', '2026-01-01 00:00:00', 'chat_completion', "
            "'gpt-4o-mini', 10, 1, 0, 0, 0, 11, 2100, 0, 'ok', 'provider', '[]', '{}')"))
        conn.execute(text(
            "INSERT INTO budgetkit_budget_window (budget, period, unit, scope_key, "
            "window_start, spent, reserved, created_at) VALUES ('old', 'total', 'usd', '', "
            "'2026-01-01 00:00:00', 5000, 0, '2026-01-01 00:00:00')"))
    engine.dispose()


def described(url: str) -> dict[str, object]:
    """Every budgetkit table's columns (name, type, nullable) and indexes."""
    engine = create_engine(url)
    inspector = inspect(engine)
    out: dict[str, object] = {}
    for table in sorted(inspector.get_table_names()):
        if not table.startswith("budgetkit_"):
            continue
        columns = sorted((c["name"], str(c["type"]), c["nullable"])
                         for c in inspector.get_columns(table))
        indexes = sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                         for i in inspector.get_indexes(table))
        out[table] = (columns, indexes)
    engine.dispose()
    return out


def test_a_0_1_0_database_is_upgraded_to_exactly_todays_schema(url, tmp_path, caplog):
    make_0_1_0(url)
    assert schema_version(create_engine(url)) == 1  # tables, no version table: 0.1.0
    with caplog.at_level(logging.WARNING, logger="budgetkit"), Engine(db=url) as engine:
        rows = {row.id: row for row in engine.usage()}
        engine.add_budget(Budget(name="after-upgrade", limit=1.0))  # a table 0.1.0 lacked
        engine.settle(engine.admit("gpt-4o-mini", input_tokens=10), output_tokens=1)
        assert [b.name for b in engine.budgets()] == ["after-upgrade"]
    assert rows["old-row"].cost_nanos == 2100 and rows["old-row"].route_reason is None
    assert f"upgraded to version {SCHEMA_VERSION}" in caplog.text
    assert schema_version(create_engine(url)) == SCHEMA_VERSION
    if url.startswith("sqlite"):
        fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
        Store(fresh).create_tables()
        assert described(url) == described(fresh)  # a table changed without a step fails
    else:  # one PostgreSQL database per test: compare with the metadata's own tables
        for module in TABLE_MODULES:
            importlib.import_module(module)
        tables = described(url)
        expected = {name for name in SQLModel.metadata.tables if name.startswith("budgetkit_")}
        assert set(tables) == expected | {VERSION_TABLE}
        for name in expected:
            columns, indexes = tables[name]  # type: ignore[misc]
            table = SQLModel.metadata.tables[name]
            assert {c[0] for c in columns} == {c.name for c in table.columns}, name
            assert {i[0] for i in indexes} >= {i.name for i in table.indexes}, name
    with Engine(db=url) as again:  # a second start has nothing to do
        assert len(again.usage()) == 2


def test_a_new_database_starts_at_the_latest_version(tmp_path):
    url = f"sqlite:///{tmp_path / 'new.db'}"
    Store(url).create_tables()
    assert schema_version(create_engine(url)) == SCHEMA_VERSION
    assert migrate(create_engine(url), SQLModel.metadata) == []  # idempotent


def test_a_newer_schema_is_refused_and_left_alone(url):
    Store(url).create_tables()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version = :v"),
                     {"v": SCHEMA_VERSION + 5})
    with pytest.raises(ConfigurationError, match="made by a newer budgetkit"):
        Engine(db=url)
    assert schema_version(engine) == SCHEMA_VERSION + 5
    engine.dispose()


def test_a_failing_step_changes_nothing(url):
    make_0_1_0(url)
    engine = create_engine(url)
    for module in TABLE_MODULES:
        importlib.import_module(module)

    def step_that_fails(conn, metadata):
        MIGRATIONS[0].apply(conn, metadata)  # creates tables, then:
        add_column(conn, metadata, "budgetkit_usage", "id")  # NOT NULL, no default

    steps = (Migration(2, "test", "fails halfway", step_that_fails),)
    with pytest.raises(ConfigurationError, match="cannot add column 'id'"):
        migrate(engine, SQLModel.metadata, steps)
    assert schema_version(engine) == 1
    assert "budgetkit_budget_definition" not in inspect(engine).get_table_names()
    engine.dispose()


def test_processes_starting_together_upgrade_once(url, caplog):
    make_0_1_0(url)
    errors: list[BaseException] = []

    def start() -> None:
        try:
            Store(url).create_tables()
        except BaseException as exc:  # reported below
            errors.append(exc)

    with caplog.at_level(logging.WARNING, logger="budgetkit"):
        threads = [threading.Thread(target=start) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert errors == []
    assert caplog.text.count(f"upgraded to version {SCHEMA_VERSION}") == 1
    assert schema_version(create_engine(url)) == SCHEMA_VERSION
