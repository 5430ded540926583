"""The pure parts of callconv.delivery.upload: time format, batching, outcome, argument checks."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import grpc
import pytest

from callconv.config import Account
from callconv.delivery.upload import (
    MAX_BATCH,
    BatchPlanner,
    UploadOutcome,
    _action_problem,
    _build_request,
    _conversion_bytes,
    _customer_problem,
    _identity,
    format_ads_time,
    plan_batches,
    status_code,
    upload_pending,
)

OSLO = ZoneInfo("Europe/Oslo")


def account(**overrides) -> Account:
    raw = {
        "id": "acme",
        "customer_id": "1234567890",
        "timezone": "Europe/Oslo",
        "default_region": "NO",
        "default_currency": "NOK",
        "conversion_actions": {"sale": {"id": "111", "name": "Phone sale"}},
    }
    return Account.model_validate({**raw, **overrides})


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (datetime(2026, 1, 15, 12, 0, 5, 999_000, tzinfo=UTC), "2026-01-15 13:00:05+01:00"),
        (datetime(2026, 7, 15, 12, 0, 5, tzinfo=UTC), "2026-07-15 14:00:05+02:00"),
        (datetime(2026, 7, 15, 12, 0, 5), "2026-07-15 14:00:05+02:00"),  # naive is UTC
    ],
)
def test_format_ads_time_uses_the_account_zone_with_an_offset(moment, expected):
    assert format_ads_time(moment, OSLO) == expected


def test_format_ads_time_in_a_negative_offset_zone():
    assert format_ads_time(datetime(2026, 1, 1, 0, 30, tzinfo=UTC), ZoneInfo("America/New_York")) == (
        "2025-12-31 19:30:00-05:00"
    )


def row(key: str, caller: str = "+4791000001", minute: int = 0, action: str = "111"):
    return SimpleNamespace(
        conversion_key=key,
        caller_e164=caller,
        conversion_time=datetime(2026, 3, 1, 10, minute, tzinfo=UTC),
        conversion_action_id=action,
    )


def test_plan_batches_splits_at_the_batch_size():
    rows = [row(f"k{i:05d}", caller=f"+47910{i:05d}") for i in range(4500)]

    batches, moved = plan_batches(rows, MAX_BATCH)

    assert [len(b) for b in batches] == [2000, 2000, 500]
    assert moved == 0
    assert [r.conversion_key for b in batches for r in b] == [r.conversion_key for r in rows]


def test_plan_batches_deduplicates_keys_and_keeps_google_keys_unique_per_batch():
    rows = [
        row("a"),
        row("a"),  # the same ledger row twice
        row("b"),  # same caller, time and action as "a"
        row("c", action="222"),  # another action: a different conversion
        row("d", minute=1),
        row("e"),  # a third one like "a"
    ]

    batches, moved = plan_batches(rows, 10)

    assert [[r.conversion_key for r in b] for b in batches] == [["a", "c", "d"], ["b"], ["e"]]
    assert moved == 2


def test_batch_planner_reads_its_rows_lazily():
    pulled = 0

    def source():
        nonlocal pulled
        for i in range(10_000):
            pulled += 1
            yield row(f"k{i:05d}", caller=f"+47910{i:05d}")

    planner = iter(BatchPlanner(source(), batch_size=100))
    first, identities = next(planner)

    assert len(first) == len(identities) == 100
    assert pulled <= 101  # a batch, and at most one row beyond it
    assert sum(len(batch) for batch, _ in planner) == 9_900
    assert pulled == 10_000


def test_batch_planner_bounds_the_rows_it_defers():
    # Ten rows that are all the same conversion for Google: one per batch.
    rows = [row(f"k{i}") for i in range(10)]
    planner = BatchPlanner(rows, batch_size=3, lookahead=2)

    batches, most_deferred = [], 0
    for batch, _ in planner:
        batches.append([r.conversion_key for r in batch])
        most_deferred = max(most_deferred, planner.deferred)

    assert batches == [[f"k{i}"] for i in range(10)]
    assert most_deferred <= 2
    assert (planner.read, planner.moved) == (10, 9)


def test_batch_planner_sends_every_row_once_never_two_of_a_google_key_together():
    generator = random.Random(7)
    # Keys in order, with Google keys drawn from a small pool so clashes are common.
    rows = [
        row(f"k{i:05d}", caller=f"+4791000{generator.randrange(30):03d}", minute=generator.randrange(3))
        for i in range(3000)
    ]

    planned = [(list(batch), identities) for batch, identities in BatchPlanner(rows, batch_size=50)]
    again = [[r.conversion_key for r in batch] for batch, _ in BatchPlanner(rows, batch_size=50)]

    assert [[r.conversion_key for r in batch] for batch, _ in planned] == again  # deterministic
    sent = [r.conversion_key for batch, _ in planned for r in batch]
    assert sorted(sent) == [r.conversion_key for r in rows] and len(set(sent)) == len(rows)
    for batch, identities in planned:
        assert 1 <= len(batch) <= 50
        assert identities == [_identity(r) for r in batch]
        assert len(set(identities)) == len(batch)


def test_build_request_matches_the_proto_plus_message_byte_for_byte():
    from callconv.delivery.ads_client import client_from_settings

    client = client_from_settings({"developer_token": "d", "access_token": "a", "endpoint": "localhost:1"})
    acme = account(consent={"ad_user_data": "GRANTED", "ad_personalization": "DENIED"})
    start = datetime(2026, 3, 1, 7, 0, tzinfo=UTC)
    batch = [
        SimpleNamespace(
            caller_e164="+4791000001",
            call_start=start,
            conversion_time=start + timedelta(hours=2),
            conversion_action_id="111",
            conversion_value=Decimal("1500.5000"),
            currency_code=None,
        ),
        SimpleNamespace(
            caller_e164=None,
            call_start=start,
            conversion_time=start + timedelta(minutes=5),
            conversion_action_id="111",
            conversion_value=None,
            currency_code=None,
        ),
    ]

    expected = client.get_type("UploadCallConversionsRequest")
    expected.customer_id = "1234567890"
    expected.partial_failure = True
    expected.validate_only = True
    for item, value in zip(batch, (1500.5, None), strict=True):
        conversion = client.get_type("CallConversion")
        conversion.caller_id = item.caller_e164 or ""
        conversion.call_start_date_time = format_ads_time(item.call_start, OSLO)
        conversion.conversion_date_time = format_ads_time(item.conversion_time, OSLO)
        conversion.conversion_action = "customers/1234567890/conversionActions/111"
        if value is not None:
            conversion.conversion_value = value
            conversion.currency_code = "NOK"
        conversion.consent.ad_user_data = client.enums.ConsentStatusEnum.GRANTED
        conversion.consent.ad_personalization = client.enums.ConsentStatusEnum.DENIED
        expected.conversions.append(conversion)

    built = _build_request(client, acme, [_conversion_bytes(client, acme, item) for item in batch], dry_run=True)

    assert type(built).serialize(built) == type(expected).serialize(expected)
    assert "conversion_value" in built.conversions[0] and "conversion_value" not in built.conversions[1]
    assert built.conversions[0].currency_code == "NOK"


def test_outcome_add_sums_batches():
    total = UploadOutcome(account_id="acme", run_id="r", max_concurrent_batches=4)
    for accepted, parked_at in ((3, datetime(2026, 3, 2, 12, tzinfo=UTC)), (2, datetime(2026, 3, 2, 13, tzinfo=UTC))):
        batch = UploadOutcome(account_id="acme", run_id="r", sent=5, batches=1, accepted=accepted)
        batch.parked["TOO_RECENT_CALL"] += 1
        batch.retry_after["TOO_RECENT_CALL"] = parked_at
        batch.failed["CALL_NOT_FOUND"] += 5 - accepted - 1
        total.add(batch)

    assert (total.sent, total.batches, total.accepted) == (10, 2, 5)
    assert total.parked == {"TOO_RECENT_CALL": 2}
    assert total.failed == {"CALL_NOT_FOUND": 3}
    assert total.retry_after == {"TOO_RECENT_CALL": datetime(2026, 3, 2, 13, tzinfo=UTC)}
    assert total.as_dict()["max_concurrent_batches"] == 4


def test_outcome_as_dict_is_json_ready():
    import json

    outcome = UploadOutcome(account_id="acme", run_id="r")
    outcome.parked["TOO_RECENT_CALL"] += 2
    outcome.retry_after["TOO_RECENT_CALL"] = datetime(2026, 3, 2, 12, tzinfo=UTC)
    outcome.failed["CALL_NOT_FOUND"] += 1
    outcome.accepted, outcome.already_existed = 5, 1

    counts = json.loads(json.dumps(outcome.as_dict()))

    assert counts["parked"] == {"TOO_RECENT_CALL": 2}
    assert counts["retry_after"] == {"TOO_RECENT_CALL": "2026-03-02T12:00:00+00:00"}
    assert counts["failed"] == {"CALL_NOT_FOUND": 1}
    assert outcome.uploaded == 6


def test_status_code_reads_every_wrapping():
    from google.api_core.exceptions import ServiceUnavailable

    assert status_code(ServiceUnavailable("down")) == grpc.StatusCode.UNAVAILABLE
    assert status_code(ValueError("no")) is None


def test_config_messages_say_what_to_fix():
    plain = _customer_problem(account(), "USER_PERMISSION_DENIED")
    assert "123-456-7890" in plain and "accounts[acme].customer_id" in plain
    assert "set accounts[acme].login_customer_id" in plain

    managed = _customer_problem(account(login_customer_id="9998887777"), "UNAUTHORIZED_CUSTOMER")
    assert "(9998887777) manages it" in managed

    action = _action_problem(account(), "NO_CONVERSION_ACTION_FOUND", {"111", "999"})
    assert "111 (Phone sale), 999 (not in config)" in action
    assert "accounts[acme].conversion_actions" in action


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window_end": datetime(2026, 3, 2)}, "timezone-aware"),
        ({"batch_size": MAX_BATCH + 1}, "batch_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_concurrent_batches": 0}, "max_concurrent_batches"),
        ({"max_concurrent_batches": -2}, "max_concurrent_batches"),
        ({"max_concurrent_batches": 2.5}, "max_concurrent_batches"),
        ({"max_concurrent_batches": True}, "max_concurrent_batches"),
    ],
)
def test_upload_pending_checks_its_arguments_before_touching_anything(kwargs, message):
    arguments = {"window_end": datetime(2026, 3, 2, tzinfo=UTC) + timedelta(0)}
    arguments.update(kwargs)
    window_end = arguments.pop("window_end")
    with pytest.raises(ValueError, match=message):
        upload_pending(None, account(), None, window_end, "run", **arguments)
