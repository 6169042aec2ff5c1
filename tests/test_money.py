"""Integer money and its one display format (pricing/_money)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path

import pytest

from budgetkit import Engine
from budgetkit.ledger import UsageRow
from budgetkit.pricing import format_usd, nanos_to_usd


@pytest.mark.parametrize(("amount", "text"), [
    (None, "-"), (0, "$0"), (0.0, "$0"), (Decimal("0"), "$0"),
    (1234.5, "$1,234.50"), (12.345, "$12.35"), (Decimal("12.345"), "$12.35"),
    (0.042, "$0.0420"), (0.00421, "$0.004210"), (0.0000154, "$0.000015"),
    (-2.5, "-$2.50"), (99.999, "$100.00"), (1_234_567.891, "$1,234,567.89"),
])
def test_format_usd(amount: Decimal | float | None, text: str) -> None:
    assert format_usd(amount) == text


def test_format_usd_refuses_what_is_not_an_amount() -> None:
    with pytest.raises(ValueError, match="finite"):
        format_usd(float("nan"))


def test_float_and_exact_amounts_print_the_same() -> None:
    for nanos in (0, 1, 499, 500, 4_210_000, 12_345_000_000, 987_654_321_123):
        row = UsageRow(id="x", created_at=dt.datetime(2025, 1, 1), model="m", cost_nanos=nanos)
        assert format_usd(row.cost) == format_usd(nanos_to_usd(nanos))


def test_rows_and_records_carry_exact_decimal_usd(tmp_path: Path) -> None:
    with Engine(db=str(tmp_path / "money.db")) as engine:
        record = engine.record("gpt-4o", input_tokens=1234, output_tokens=567)
        hit = engine.record("gpt-4o", input_tokens=1234, output_tokens=567, status="cached",
                            saved_nanos=record.cost_nanos)
        engine.flush()
        rows = {row.id: row for row in engine.usage()}
    assert isinstance(record.cost, Decimal)
    assert record.cost == Decimal(record.cost_nanos) / 10**9  # exact, no float in between
    assert record.cost * 10**9 == record.cost_nanos and hit.saved == record.cost
    row = rows[record.id]
    assert isinstance(row.cost, Decimal) and row.cost == record.cost
    assert rows[hit.id].saved == record.cost and rows[hit.id].cost == 0
    # Sums of exact amounts do not drift: a million rows of 1 nano-dollar make 0.001 USD.
    assert sum([UsageRow(id="y", created_at=dt.datetime(2025, 1, 1), model="m",
                         cost_nanos=1).cost] * 1_000_000, Decimal(0)) == Decimal("0.001")
