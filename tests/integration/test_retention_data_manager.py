"""Retention deletes Data Manager request bodies past the window, once nothing needs them.

A stored body is the exact bytes sent, and Google's format puts each caller in it as the
SHA-256 of the number: an unkeyed hash, reversed by trying a country's numbering plan. The
body is kept while a crash may still need it resent (``sending``) or its status is still to
be settled (``processing``), and never past the hard maximum.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, date, datetime

import pytest
import sqlalchemy as sa

from callconv.config import parse_settings
from callconv.protection.retention import redact_warehouse
from callconv.schema import data_manager_requests, metadata

pytestmark = pytest.mark.integration

ACCOUNT = "dm_keep"
LAST_DAY = date(2026, 9, 1)  # the window's last expired day
HARD_LAST_DAY = date(2026, 6, 1)
AS_OF = datetime(2026, 12, 1, tzinfo=UTC)


def account():
    return parse_settings(
        {
            "crm_source": {"columns": {"caller_phone": "p", "conversion_time": "t", "outcome": "o"}},
            "accounts": [
                {
                    "id": ACCOUNT,
                    "customer_id": "1112223333",
                    "timezone": "UTC",
                    "default_region": "NO",
                    "default_currency": "NOK",
                    "delivery": "data_manager",
                    "conversion_actions": {"sale": {"id": "1", "name": "Phone sale"}},
                }
            ],
        }
    ).account(ACCOUNT)


def hashed(number: str) -> str:
    return hashlib.sha256(number.encode()).hexdigest()


# claim id: (state, sent at, the number in its body)
REQUESTS = {
    "old-settled": ("success", datetime(2026, 8, 20, tzinfo=UTC), "+4791000001"),
    "old-failed": ("failure", datetime(2026, 8, 31, 23, tzinfo=UTC), "+4791000002"),
    "old-processing": ("processing", datetime(2026, 8, 25, tzinfo=UTC), "+4791000003"),
    "old-sending": ("sending", datetime(2026, 8, 26, tzinfo=UTC), "+4791000004"),
    "ancient-processing": ("processing", datetime(2026, 5, 1, tzinfo=UTC), "+4791000005"),
    "recent-settled": ("success", datetime(2026, 9, 2, 0, 30, tzinfo=UTC), "+4791000006"),
}


def test_settled_bodies_past_the_window_go_open_ones_stay_until_the_hard_maximum(warehouse):
    with warehouse.begin() as connection:
        for claim_id, (state, sent_at, number) in REQUESTS.items():
            body = json.dumps({"events": [{"userData": {"userIdentifiers": [{"phoneNumber": hashed(number)}]}}]})
            connection.execute(
                data_manager_requests.insert().values(
                    claim_id=claim_id,
                    account_id=ACCOUNT,
                    run_id="r",
                    state=state,
                    events=1,
                    body=body.encode(),
                    sent_at=sent_at,
                )
            )
        connection.execute(
            data_manager_requests.insert().values(
                claim_id="other-account", account_id="someone_else", run_id="r", state="success", events=1,
                body=b"{}", sent_at=datetime(2026, 1, 1, tzinfo=UTC),
            )
        )  # fmt: skip

    purge = redact_warehouse(warehouse, account(), LAST_DAY, HARD_LAST_DAY, b"k" * 32, AS_OF)

    with warehouse.connect() as connection:
        left = set(connection.scalars(sa.select(data_manager_requests.c.claim_id)))
        everything = " ".join(
            str(value)
            for table in metadata.sorted_tables
            for row in connection.execute(sa.select(table))
            for value in (bytes(v).decode("utf-8", "replace") if isinstance(v, bytes | memoryview) else v for v in row)
        )
    assert left == {"old-processing", "old-sending", "recent-settled", "other-account"}
    assert purge.affected >= 3
    for claim_id in ("old-settled", "old-failed", "ancient-processing"):
        assert hashed(REQUESTS[claim_id][2]) not in everything
    assert hashed(REQUESTS["recent-settled"][2]) in everything  # the scan would see a body left behind


def test_a_second_retention_run_deletes_nothing_more(warehouse):
    test_settled_bodies_past_the_window_go_open_ones_stay_until_the_hard_maximum(warehouse)
    purge = redact_warehouse(warehouse, account(), LAST_DAY, HARD_LAST_DAY, b"k" * 32, AS_OF)
    assert purge.affected == 0
