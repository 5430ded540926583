"""Data Manager delivery and settling on PostgreSQL against the HTTPS sandbox, through the real client.

Through the DAGs: test_data_manager_dag.py.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import sqlalchemy as sa
from test_data_manager_claim import ACCOUNT, START, rows

from callconv.delivery.data_manager.client import build_service, token_credentials
from callconv.delivery.data_manager.deliver import _claim, deliver_pending
from callconv.delivery.data_manager.hashing import hash_phone
from callconv.delivery.data_manager.settle import settle_requests
from callconv.sandbox.data_manager import DataManagerSandbox, DmAction
from callconv.schema import data_manager_requests, upload_ledger

pytestmark = pytest.mark.integration

END = START + timedelta(days=1)


@pytest.fixture()
def dm(tmp_path):
    box = DataManagerSandbox([DmAction("1234567890", "555")], cert_dir=tmp_path / "certs")
    endpoint = box.start()
    yield box, build_service(token_credentials("sandbox-token"), api_endpoint=endpoint, ca_certs=str(box.cert_path))
    box.stop()


def seed(engine, seeded):
    with engine.begin() as connection:
        connection.execute(upload_ledger.insert(), seeded)
    return seeded


def states(engine) -> dict[str, str]:
    with engine.connect() as connection:
        return dict(connection.execute(sa.select(upload_ledger.c.conversion_key, upload_ledger.c.state)).all())


def run(engine, service, now=END, **kwargs):
    return deliver_pending(engine, ACCOUNT, service, window_end=now, run_id="run", now=now, **kwargs)


def no_numbers_left_unhashed(box, seeded):
    for body in box.received:
        for row in seeded:
            assert row["caller_e164"].encode() not in body and row["caller_e164"][1:].encode() not in body


def test_plain_day_then_rerun_sends_nothing_and_settles_after_processing(warehouse, dm):
    box, service = dm
    seeded = seed(warehouse, rows(5))
    assert run(warehouse, service).sent == 5
    assert run(warehouse, service).sent == 0  # a rerun re-sends nothing
    assert settle_requests(warehouse, ACCOUNT, service, now=END)["still_processing"] == 1
    assert set(states(warehouse).values()) == {"processing"}
    assert settle_requests(warehouse, ACCOUNT, service, now=END)["delivered"] == 5  # the next run
    assert set(states(warehouse).values()) == {"delivered"} and len(box.received) == 1
    no_numbers_left_unhashed(box, seeded)


def test_crash_after_send_is_resent_once_as_identical_bytes(warehouse, dm):
    box, service = dm
    seeded = seed(warehouse, rows(3))
    with warehouse.connect() as connection:
        due = connection.execute(sa.select(upload_ledger).order_by(upload_ledger.c.conversion_key)).all()
    _, body = _claim(
        warehouse,
        ACCOUNT,
        due,
        action_id="555",
        run_id="dead",
        claim_id="c1",
        now=END,
        lease=timedelta(minutes=60),
        window_end=END,
    )
    service.events().ingest(body=json.loads(body)).execute()  # reached Google; the sender died before recording
    outcome = run(warehouse, service, now=END + timedelta(hours=2))
    assert outcome.resent_requests == 1 and outcome.sent == 3
    assert run(warehouse, service, now=END + timedelta(hours=4)).sent == 0
    assert len(box.received) == 2 and box.received[0] == box.received[1] == body
    for _ in range(2):
        settle_requests(warehouse, ACCOUNT, service, now=END + timedelta(hours=4))
    assert len(box.accepted) == 3 and set(states(warehouse).values()) == {"delivered"}
    no_numbers_left_unhashed(box, seeded)


def test_503_is_retried_and_429_parks_until_the_next_run(warehouse, dm):
    box, service = dm
    seed(warehouse, rows(4))
    box.faults.extend(["503"])
    assert run(warehouse, service).sent == 4
    seed(warehouse, [dict(r, conversion_key=f"q{n}", caller_e164=f"+4792{n:06d}") for n, r in enumerate(rows(2))])
    box.faults.extend(["429"])
    outcome = run(warehouse, service, quota_wait=timedelta(hours=1))
    assert outcome.parked == 2 and {states(warehouse)[k] for k in ("q0", "q1")} == {"parked"}
    assert run(warehouse, service, now=END + timedelta(days=1)).sent == 2


def test_one_invalid_event_in_2000_fails_only_that_one(warehouse, dm):
    box, service = dm
    seeded = rows(2000)
    seeded[1234]["currency_code"] = "nok"  # passes our checks, refused by Google's
    seed(warehouse, seeded)
    outcome = run(warehouse, service)
    assert outcome.failed == {"INVALID_CURRENCY_CODE": 1} and outcome.sent == 1999
    final = states(warehouse)
    assert final.pop("k1234") == "failed" and set(final.values()) == {"processing"}
    assert len(box.received) == 2  # the request, then once more without the event Google named
    no_numbers_left_unhashed(box, seeded)


def test_processing_failures_are_settled_from_request_status(warehouse, dm):
    box, service = dm
    seeded = seed(warehouse, rows(3))
    box.processing_failures[hash_phone(seeded[0]["caller_e164"])] = "EXPIRED_CALL"
    box.processing_failures[hash_phone(seeded[1]["caller_e164"])] = "TOO_RECENT_CALL"
    run(warehouse, service)
    for _ in range(2):
        settle_requests(warehouse, ACCOUNT, service, now=END)
    assert states(warehouse) == {"k0000": "failed", "k0001": "parked", "k0002": "delivered"}
    with warehouse.connect() as connection:
        assert connection.scalar(sa.select(data_manager_requests.c.state)) == "partial"


def test_dry_run_is_validate_only_and_changes_nothing(warehouse, dm):
    box, service = dm
    seed(warehouse, rows(3))
    outcome = run(warehouse, service, dry_run=True)
    assert outcome.validated == 3 and box.requests == {} and len(box.received) == 1
    assert json.loads(box.received[0])["validateOnly"] is True
    assert set(states(warehouse).values()) == {"pending"}
