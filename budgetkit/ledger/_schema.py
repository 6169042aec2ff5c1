"""Bringing a database made by an older budgetkit up to date: additive changes only.

``create_all`` makes missing tables but never touches existing ones, so a ledger created by
an older build would lack the columns and indexes added since, and fail on its first
write. This adds them: a missing column that is nullable or has a default is added with
``ALTER TABLE ... ADD COLUMN`` (existing rows get NULL or the default), a missing index is
created. A missing column that can be neither (NOT NULL without a default) cannot be
filled for the rows already there: that is a clear error naming the table and column, and
nothing is changed. Columns are never dropped or retyped.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import MetaData, inspect, text

from budgetkit.errors import ConfigurationError

__all__ = ["add_missing_columns"]

logger = logging.getLogger("budgetkit")


def add_missing_columns(engine: Any, metadata: MetaData, prefix: str = "budgetkit_") -> list[str]:
    """Add the columns and indexes ``metadata`` has and the database's tables lack.

    Returns what was added (``table.column`` / ``index``), logged. Raises
    :class:`ConfigurationError` before changing anything if a missing column cannot be added.
    """
    inspector = inspect(engine)
    existing_tables = set(inspector.get_table_names())
    statements: list[tuple[str, str]] = []
    indexes: list[Any] = []
    for table in metadata.sorted_tables:
        if not table.name.startswith(prefix) or table.name not in existing_tables:
            continue
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            statements.append((f"{table.name}.{column.name}",
                               _add_column_sql(engine, table.name, column)))
        index_names = {index["name"] for index in inspector.get_indexes(table.name)}
        indexes.extend(index for index in table.indexes if index.name not in index_names)
    if not statements and not indexes:
        return []
    added = []
    with engine.begin() as conn:
        for name, sql in statements:
            conn.execute(text(sql))
            added.append(name)
        for index in indexes:
            index.create(conn)
            added.append(str(index.name))
    logger.warning("budgetkit: database made by an older version brought up to date: "
                   "added %s", ", ".join(added))
    return added


def _add_column_sql(engine: Any, table: str, column: Any) -> str:
    dialect = engine.dialect
    quote = dialect.identifier_preparer.quote
    sql = (f"ALTER TABLE {quote(table)} ADD COLUMN {quote(column.name)} "
           f"{column.type.compile(dialect=dialect)}")
    default = None
    if column.server_default is not None:
        default = str(column.server_default.arg)
    elif column.default is not None and getattr(column.default, "is_scalar", False):
        default = _literal(column.default.arg)
    if default is not None:
        sql += f" DEFAULT {default}"
    if not column.nullable:
        if default is None:
            raise ConfigurationError(
                f"the database's table {table!r} was made by an older budgetkit and lacks "
                f"column {column.name!r}, which cannot be filled for its existing rows; "
                f"move the old table aside (or drop it, if it only holds a cache) and start "
                f"again")
        sql += " NOT NULL"
    return sql


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise ConfigurationError(f"cannot write a default of {value!r} into a column definition")
