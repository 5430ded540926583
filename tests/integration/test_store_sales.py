"""A re-export that brings back known sales beside new ones: one insert, every row's match state right.

The upsert re-inserts unsent sales with the match state they had, and inserts new ones. Both go
in one executemany, whose statement SQLAlchemy builds from the first row's keys: rows that differ
in keys either crash ("A value is required for bind parameter 'matched_call_id'", a new sale
after a known one) or, worse, lose the known sale's match state in silence (a new sale first).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
import sqlalchemy as sa

from callconv.intake.take_in import _store_sales
from callconv.schema import crm_sales

pytestmark = pytest.mark.integration

ACCOUNT = "store_shop"
DAY = date(2026, 11, 27)


def sale(key: str, row: int, checksum: str = "first") -> dict:
    return {
        "account_id": ACCOUNT,
        "sale_key": key,
        "sale_key_id": "k1",
        "crm_id": f"crm-{key}",
        "import_checksum": checksum,
        "source_row": row,
        "business_date": DAY,
        "caller_e164": None,
        "caller_hmac": None,
        "conversion_time": datetime(2026, 11, 27, 10, row, tzinfo=UTC),
        "crm_call_start": None,
        "outcome": "sale",
        "conversion_action_id": "111",
        "conversion_value": Decimal("100.00"),
        "currency_code": "NOK",
    }


def match_state(engine) -> dict[str, str | None]:
    with engine.connect() as connection:
        return dict(connection.execute(sa.select(crm_sales.c.sale_key, crm_sales.c.matched_call_id)).all())


@pytest.mark.parametrize("new_first", [False, True], ids=["known_sale_first", "new_sale_first"])
def test_a_reexport_with_known_and_new_sales_keeps_every_match_state(warehouse, new_first):
    with warehouse.begin() as connection:
        _store_sales(connection, ACCOUNT, [sale("a", 1)], "run-1")
        connection.execute(
            crm_sales.update()
            .where(crm_sales.c.sale_key == "a")
            .values(matched_call_id="call-1", matched_call_start=datetime(2026, 11, 27, 9, tzinfo=UTC))
        )
    again = [sale("a", 1, "second"), sale("b", 2, "second")]
    if new_first:
        again.reverse()
    with warehouse.begin() as connection:
        _store_sales(connection, ACCOUNT, again, "run-2")
    assert match_state(warehouse) == {"a": "call-1", "b": None}
