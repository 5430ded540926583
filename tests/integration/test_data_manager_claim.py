"""The Data Manager path's claim: committed before the send, body frozen, rows claimed once."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from callconv.delivery.data_manager.deliver import _claim
from callconv.delivery.data_manager.hashing import hash_phone
from callconv.schema import data_manager_requests, upload_ledger

pytestmark = pytest.mark.integration

START = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
ACCOUNT = SimpleNamespace(
    id="acme",
    customer_id="1234567890",
    login_customer_id=None,
    default_currency="NOK",
    consent=SimpleNamespace(ad_user_data="GRANTED", ad_personalization="DENIED"),
)


def rows(count: int) -> list[dict]:
    return [
        {
            "conversion_key": f"k{n:04d}",
            "account_id": "acme",
            "business_date": START.date(),
            "state": "pending",
            "caller_e164": f"+4791{n:06d}",
            "call_start": START + timedelta(minutes=n),
            "conversion_action_id": "555",
            "conversion_time": START + timedelta(minutes=n, hours=1),
            "conversion_value": Decimal("10.5000"),
            "currency_code": "NOK",
            "run_id": "match",
        }
        for n in range(count)
    ]


def test_claim_freezes_body_with_hashed_numbers_and_claims_each_row_once(warehouse):
    seeded = rows(3)
    with warehouse.begin() as connection:
        connection.execute(upload_ledger.insert(), seeded)
    with warehouse.connect() as connection:
        due = connection.execute(sa.select(upload_ledger).order_by(upload_ledger.c.conversion_key)).all()
    kwargs = dict(
        action_id="555",
        run_id="r1",
        now=START + timedelta(days=1),
        lease=timedelta(minutes=60),
        window_end=START + timedelta(days=1),
    )
    claimed, body = _claim(warehouse, ACCOUNT, due, claim_id="c1", **kwargs)
    again, nothing = _claim(warehouse, ACCOUNT, due, claim_id="c2", **kwargs)
    assert len(claimed) == 3 and again == [] and nothing == b""
    sent = json.loads(body)
    assert [e["userData"]["userIdentifiers"][0]["phoneNumber"] for e in sent["events"]] == [
        hash_phone(row["caller_e164"]) for row in seeded
    ]
    assert not any(row["caller_e164"].encode() in body for row in seeded)
    with warehouse.connect() as connection:
        stored = connection.execute(sa.select(data_manager_requests)).one()
        indices = dict(
            connection.execute(sa.select(upload_ledger.c.conversion_key, upload_ledger.c.record_index)).all()
        )
    assert stored.body == body and stored.state == "sending" and stored.events == 3
    assert indices == {"k0000": 0, "k0001": 1, "k0002": 2}
