"""The pure parts of callconv.upload: time format, batching, outcome, argument checks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import grpc
import pytest

from callconv.config import Account
from callconv.upload import (
    MAX_BATCH,
    UploadOutcome,
    _action_problem,
    _customer_problem,
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
    ],
)
def test_upload_pending_checks_its_arguments_before_touching_anything(kwargs, message):
    arguments = {"window_end": datetime(2026, 3, 2, tzinfo=UTC) + timedelta(0)}
    arguments.update(kwargs)
    window_end = arguments.pop("window_end")
    with pytest.raises(ValueError, match=message):
        upload_pending(None, account(), None, window_end, "run", **arguments)
