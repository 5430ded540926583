"""upload_pending end to end: real PostgreSQL, the real google-ads client, TLS gRPC to the sandbox.

Nothing here is mocked: the client goes through the library's interceptors,
partial-failure decoding and GoogleAdsException over a real TLS channel.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import grpc
import pytest
import sqlalchemy as sa

from callconv.config import Account
from callconv.delivery.ads_client import client_from_settings
from callconv.delivery.upload import UploadConfigError, ledger_counts, upload_pending
from callconv.sandbox import ActionSpec
from callconv.schema import call_logs, upload_ledger

pytestmark = pytest.mark.integration

CUSTOMER = "1234567890"
ACTION = "111"
DEV_TOKEN = "dev-token-for-tests"
ACCESS_TOKEN = "static-access-token"
DAY_END = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)  # the run's data-interval end
CALL_BASE = datetime(2026, 3, 1, 7, 0, tzinfo=UTC)


def make_account(**overrides) -> Account:
    raw = {
        "id": "acme",
        "customer_id": "123-456-7890",
        "timezone": "Europe/Oslo",
        "default_region": "NO",
        "default_currency": "NOK",
        "conversion_actions": {"sale": {"id": ACTION, "name": "Phone sale"}},
        "consent": {"ad_user_data": "GRANTED", "ad_personalization": "DENIED"},
    }
    raw.update(overrides)
    return Account.model_validate(raw)


class Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture()
def clock() -> Clock:
    return Clock(DAY_END + timedelta(hours=1))


@pytest.fixture()
def sandbox(make_sandbox, clock):
    return make_sandbox(
        customers={CUSTOMER: [ActionSpec(id=ACTION, name="Phone sale")]},
        other_customers=["5555555555"],
        clock=clock,
        access_token=ACCESS_TOKEN,
        developer_token=DEV_TOKEN,
    ).start()


def caller(n: int) -> str:
    return f"+4791{n:06d}"


def ledger_row(n: int, *, call_start: datetime | None = None, **overrides) -> dict:
    start = call_start or CALL_BASE + timedelta(minutes=7 * n)
    row = {
        "conversion_key": f"k{n:06d}",
        "account_id": "acme",
        "business_date": start.date(),
        "state": "pending",
        "caller_e164": caller(n),
        "call_start": start,
        "conversion_action_id": ACTION,
        "conversion_time": start + timedelta(hours=2),
        "conversion_value": Decimal("1500.5000"),
        "currency_code": "NOK",
        "park_until": None,
        "run_id": "match-run",
    }
    row.update(overrides)
    return row


def seed(engine, sandbox, rows: list[dict], *, known: bool = True) -> list[dict]:
    with engine.begin() as connection:
        connection.execute(upload_ledger.insert(), rows)
    if known:
        sandbox.add_calls((row["caller_e164"], row["call_start"]) for row in rows)
    return rows


def ledger(engine) -> dict[str, dict]:
    with engine.connect() as connection:
        rows = connection.execute(sa.select(upload_ledger).order_by(upload_ledger.c.conversion_key))
        return {row.conversion_key: row._asdict() for row in rows}


def run(engine, client, window_end=DAY_END, account=None, **kwargs):
    kwargs.setdefault("sleep", lambda seconds: None)
    return upload_pending(engine, account or make_account(), client, window_end, "run-1", **kwargs)


def accepted_keys(sandbox) -> list[tuple]:
    return sorted((a.caller_id, a.conversion_time, a.action_id) for a in sandbox.accepted())


# ------------------------------------------------------------------ clean days


def test_clean_day_uploads_every_conversion_exactly_once(warehouse, sandbox, client):
    rows = seed(warehouse, sandbox, [ledger_row(n) for n in range(5)])

    outcome = run(warehouse, client)

    assert (outcome.sent, outcome.accepted, outcome.batches) == (5, 5, 1)
    assert not outcome.failed and not outcome.parked and outcome.left_for_quota == 0
    state = ledger(warehouse)
    assert {r["state"] for r in state.values()} == {"uploaded"}
    assert {r["delivered_at"] for r in state.values()} == {DAY_END}
    assert {r["delivered_by"] for r in state.values()} == {"api"}
    assert {r["attempts"] for r in state.values()} == {1}
    assert len(sandbox.accepted()) == 5

    first = min(sandbox.accepted(), key=lambda a: a.call_start)
    assert first.caller_id == rows[0]["caller_e164"]
    # 07:00 UTC is 08:00 in Oslo (CET, +01:00) on 1 March.
    assert first.conversion_date_time == "2026-03-01 10:00:00+01:00"
    assert first.conversion_action == f"customers/{CUSTOMER}/conversionActions/{ACTION}"
    assert (first.conversion_value, first.currency_code) == (1500.5, "NOK")
    assert (first.ad_user_data, first.ad_personalization) == ("GRANTED", "DENIED")
    assert sandbox.requests[-1]["developer_token"] == DEV_TOKEN
    assert ledger_counts(warehouse, "acme") == {
        "pending": 0,
        "sending": 0,
        "uploaded": 5,
        "parked": 0,
        "failed": 0,
        "delivered": 0,
    }


def test_second_run_uploads_nothing_new(warehouse, sandbox, client):
    seed(warehouse, sandbox, [ledger_row(n) for n in range(4)])
    run(warehouse, client)
    requests_after_first = len(sandbox.requests)

    again = run(warehouse, client, window_end=DAY_END + timedelta(days=1))

    assert (again.selected, again.sent, again.accepted) == (0, 0, 0)
    assert len(sandbox.requests) == requests_after_first
    assert len(sandbox.accepted()) == 4


def test_calls_known_from_the_warehouse_call_logs(warehouse, sandbox, client):
    rows = [ledger_row(n) for n in range(3)]
    with warehouse.begin() as connection:
        connection.execute(
            call_logs.insert(),
            [
                {
                    "account_id": "acme",
                    "source_call_id": f"c{i}",
                    "caller_number": row["caller_e164"],
                    "caller_e164": row["caller_e164"],
                    "call_start": row["call_start"],
                    "duration_seconds": 60,
                    # The last call did not come through Google forwarding.
                    "via_google_forwarding": i < 2,
                }
                for i, row in enumerate(rows)
            ],
        )
    seed(warehouse, sandbox, rows, known=False)
    assert sandbox.add_calls_from_warehouse(warehouse, "acme") == 2

    outcome = run(warehouse, client)

    assert outcome.accepted == 2
    assert outcome.failed == {"CALL_NOT_FOUND": 1}


def test_login_customer_id_is_sent_for_a_manager_account(warehouse, sandbox, client):
    seed(warehouse, sandbox, [ledger_row(1)])

    run(warehouse, client, account=make_account(login_customer_id="999-888-7777"))

    assert sandbox.requests[-1]["login_customer_id"] == "9998887777"
    assert len(sandbox.accepted()) == 1


# --------------------------------------------------------------- row outcomes


def test_too_recent_call_is_parked_then_uploaded_in_a_later_run(warehouse, sandbox, client, clock):
    late = ledger_row(1, call_start=DAY_END - timedelta(hours=3))  # 4 h before the sandbox's now
    seed(warehouse, sandbox, [ledger_row(0), late])

    first = run(warehouse, client)

    assert first.accepted == 1
    assert first.parked == {"TOO_RECENT_CALL": 1}
    assert first.retry_after == {"TOO_RECENT_CALL": DAY_END + timedelta(hours=12)}
    parked = ledger(warehouse)[late["conversion_key"]]
    assert parked["state"] == "parked"
    assert parked["park_until"] == DAY_END + timedelta(hours=12)
    assert parked["error_code"] == "TOO_RECENT_CALL"

    # A rerun of the same window does not pick the parked row up again.
    assert run(warehouse, client).selected == 0

    clock.now += timedelta(days=1)
    second = run(warehouse, client, window_end=DAY_END + timedelta(days=1))

    assert (second.selected, second.accepted) == (1, 1)
    done = ledger(warehouse)[late["conversion_key"]]
    assert done["state"] == "uploaded"
    assert done["delivered_at"] == DAY_END + timedelta(days=1)
    assert done["attempts"] == 2
    assert done["error_code"] is None
    assert len(sandbox.accepted()) == 2


def test_a_rerun_of_the_same_window_retries_what_it_parked_within_the_wait(warehouse, sandbox, client, clock):
    """The last day of a backfill has no later run: with parked_wait its rerun takes the parked rows."""
    late = ledger_row(1, call_start=DAY_END - timedelta(hours=3))
    seed(warehouse, sandbox, [late])
    assert run(warehouse, client).parked == {"TOO_RECENT_CALL": 1}

    # Not yet due by this window alone, nor by a wait shorter than the park.
    assert run(warehouse, client, parked_wait=timedelta(hours=11)).selected == 0
    clock.now += timedelta(days=1)  # Google's clock moved on; the run's window did not
    rerun = run(warehouse, client, parked_wait=timedelta(hours=12))

    assert (rerun.selected, rerun.accepted) == (1, 1)
    assert ledger(warehouse)[late["conversion_key"]]["delivered_at"] == DAY_END  # the rerun's own window


def test_permanent_errors_are_recorded_while_the_others_succeed(warehouse, sandbox, client, caplog):
    caplog.set_level(logging.DEBUG)
    # The library's own logger at DEBUG dumps every request: it must come out masked.
    caplog.set_level(logging.DEBUG, logger="google.ads.googleads.client")
    good = [ledger_row(0), ledger_row(1)]
    unknown_call = ledger_row(2)
    precedes = ledger_row(3, conversion_time=CALL_BASE - timedelta(hours=1))
    bad_number = ledger_row(4, caller_e164="+12")
    expired = ledger_row(5, call_start=DAY_END - timedelta(days=70))
    seed(warehouse, sandbox, good + [precedes, bad_number, expired])
    seed(warehouse, sandbox, [unknown_call], known=False)

    outcome = run(warehouse, client)

    assert outcome.accepted == 2
    assert outcome.failed == {
        "CALL_NOT_FOUND": 1,
        "CONVERSION_PRECEDES_CALL": 1,
        "UNPARSEABLE_CALLERS_PHONE_NUMBER": 1,
        "EXPIRED_CALL": 1,
    }
    state = ledger(warehouse)
    assert [state[r["conversion_key"]]["state"] for r in good] == ["uploaded", "uploaded"]
    failed = state[unknown_call["conversion_key"]]
    assert (failed["state"], failed["error_code"], failed["attempts"]) == ("failed", "CALL_NOT_FOUND", 1)
    # The sandbox echoes the caller id in this message, as Google may: it is masked.
    assert "+***" in failed["error_message"]
    assert unknown_call["caller_e164"] not in failed["error_message"]
    assert state[expired["conversion_key"]]["error_code"] == "EXPIRED_CALL"
    assert state[bad_number["conversion_key"]]["error_code"] == "UNPARSEABLE_CALLERS_PHONE_NUMBER"

    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "Request made" in logged  # the library did log
    for row in good + [unknown_call, precedes, expired]:
        assert row["caller_e164"] not in logged
        assert row["caller_e164"].lstrip("+") not in logged


def test_a_parked_row_that_is_not_due_is_left_alone(warehouse, sandbox, client):
    seed(
        warehouse,
        sandbox,
        [ledger_row(1, state="parked", park_until=DAY_END + timedelta(hours=1)), ledger_row(2)],
    )

    outcome = run(warehouse, client)

    assert (outcome.selected, outcome.accepted) == (1, 1)
    assert ledger(warehouse)["k000001"]["state"] == "parked"


# -------------------------------------------------------------- RPC failures


def test_unavailable_twice_then_success_uploads_all(warehouse, sandbox, client):
    seed(warehouse, sandbox, [ledger_row(n) for n in range(3)])
    sandbox.fail_next(2, grpc.StatusCode.UNAVAILABLE)
    sleeps: list[float] = []

    outcome = run(warehouse, client, sleep=sleeps.append)

    assert outcome.accepted == 3
    assert len(sleeps) == 2
    assert 1.0 <= sleeps[0] <= 2.0 and 2.0 <= sleeps[1] <= 4.0  # jittered, doubling
    assert {r["state"] for r in ledger(warehouse).values()} == {"uploaded"}
    assert len(sandbox.accepted()) == 3


def test_transient_errors_beyond_the_retries_are_raised_for_airflow(warehouse, sandbox, client):
    from google.api_core.exceptions import ServiceUnavailable

    seed(warehouse, sandbox, [ledger_row(n) for n in range(2)])
    sandbox.fail_next(5, grpc.StatusCode.UNAVAILABLE)
    sleeps: list[float] = []

    with pytest.raises(ServiceUnavailable):
        run(warehouse, client, max_transient_retries=2, sleep=sleeps.append)

    assert len(sleeps) == 2
    assert {(r["state"], r["attempts"]) for r in ledger(warehouse).values()} == {("pending", 0)}


def test_deadline_exceeded_is_retried_then_raised(warehouse, sandbox, client):
    from google.api_core.exceptions import DeadlineExceeded

    seed(warehouse, sandbox, [ledger_row(1)])
    sandbox.set_delay(0.5)
    sleeps: list[float] = []

    with pytest.raises(DeadlineExceeded):
        run(warehouse, client, timeout=0.1, max_transient_retries=1, sleep=sleeps.append)

    assert len(sleeps) == 1
    assert ledger(warehouse)["k000001"]["state"] == "pending"
    # The timed-out calls still went through on the server, as they may at Google.
    sandbox.set_delay(0)
    time.sleep(1.5)
    outcome = run(warehouse, client, window_end=DAY_END + timedelta(days=1))
    assert outcome.already_existed == 1
    assert ledger(warehouse)["k000001"]["state"] == "uploaded"
    assert len(sandbox.accepted()) == 1


@pytest.mark.parametrize("mode", ["after_accepted", "next_calls"])
def test_quota_exhaustion_parks_the_rest_and_the_next_run_finishes(warehouse, sandbox, client, caplog, mode):
    seed(warehouse, sandbox, [ledger_row(n) for n in range(8)])
    if mode == "after_accepted":
        sandbox.exhaust_quota(after_accepted=3)
    else:
        sandbox.exhaust_quota(next_calls=1)
    expected_first = 3 if mode == "after_accepted" else 0

    with caplog.at_level(logging.WARNING, logger="callconv.delivery.upload"):
        first = run(warehouse, client, batch_size=3)

    assert first.accepted == expected_first
    assert first.left_for_quota == 8 - expected_first
    assert f"{8 - expected_first} conversions parked" in caplog.text
    state = ledger(warehouse)
    parked = [r for r in state.values() if r["state"] == "parked"]
    assert len(parked) == 8 - expected_first
    assert {r["park_until"] for r in parked} == {DAY_END}
    assert {r["error_code"] for r in parked} == {"RESOURCE_EXHAUSTED"}

    sandbox.clear_faults()
    second = run(warehouse, client, window_end=DAY_END + timedelta(days=1), batch_size=3)

    assert second.accepted == 8 - expected_first
    assert {r["state"] for r in ledger(warehouse).values()} == {"uploaded"}
    assert len(sandbox.accepted()) == 8


def test_die_after_accept_is_resolved_by_the_retry(warehouse, sandbox, client):
    rows = seed(warehouse, sandbox, [ledger_row(n) for n in range(4)])
    sandbox.die_after_accept(1)

    outcome = run(warehouse, client)

    # The first attempt was recorded by Google but looked failed; the retry finds them.
    assert (outcome.accepted, outcome.already_existed) == (0, 4)
    assert {r["state"] for r in ledger(warehouse).values()} == {"uploaded"}
    assert accepted_keys(sandbox) == sorted((r["caller_e164"], r["conversion_time"], ACTION) for r in rows)


def test_die_after_accept_then_next_run_holds_each_exactly_once(warehouse, sandbox, client):
    from google.api_core.exceptions import ServiceUnavailable

    rows = seed(warehouse, sandbox, [ledger_row(n) for n in range(4)])
    sandbox.die_after_accept(1)

    with pytest.raises(ServiceUnavailable):
        run(warehouse, client, max_transient_retries=0)
    assert len(sandbox.accepted()) == 4
    assert {r["state"] for r in ledger(warehouse).values()} == {"pending"}

    outcome = run(warehouse, client, window_end=DAY_END + timedelta(days=1))

    assert outcome.already_existed == 4
    assert {r["state"] for r in ledger(warehouse).values()} == {"uploaded"}
    assert len(sandbox.accepted()) == 4
    assert accepted_keys(sandbox) == sorted((r["caller_e164"], r["conversion_time"], ACTION) for r in rows)


def test_crash_before_the_ledger_commit_is_healed_by_the_next_run(warehouse, sandbox, client):
    seed(warehouse, sandbox, [ledger_row(n) for n in range(3)])
    run(warehouse, client)
    # As if the task died after Google's answer, before the batch's transaction committed.
    with warehouse.begin() as connection:
        connection.execute(
            upload_ledger.update().values(state="pending", delivered_at=None, delivered_by=None, attempts=0)
        )

    outcome = run(warehouse, client, window_end=DAY_END + timedelta(days=1))

    assert (outcome.accepted, outcome.already_existed) == (0, 3)
    assert {r["state"] for r in ledger(warehouse).values()} == {"uploaded"}
    assert len(sandbox.accepted()) == 3


# ------------------------------------------------------------ configuration


def test_wrong_action_id_raises_an_actionable_config_error(warehouse, sandbox, client):
    account = make_account(
        conversion_actions={
            "sale": {"id": ACTION, "name": "Phone sale"},
            "old": {"id": "999", "name": "Old action"},
        }
    )
    good = ledger_row(0)
    wrong = ledger_row(1, conversion_action_id="999")
    seed(warehouse, sandbox, [good, wrong])

    with pytest.raises(UploadConfigError) as raised:
        run(warehouse, client, account=account)

    message = str(raised.value)
    assert raised.value.code == "NO_CONVERSION_ACTION_FOUND"
    assert "999 (Old action)" in message
    assert "accounts[acme].conversion_actions" in message
    assert "ENABLED" in message
    assert "+47" not in message
    state = ledger(warehouse)
    assert state[good["conversion_key"]]["state"] == "uploaded"  # the good row of the batch is kept
    assert state[wrong["conversion_key"]]["state"] == "pending"  # never marked failed


def test_action_of_the_wrong_type_raises_a_config_error(warehouse, sandbox, client):
    sandbox.set_action(CUSTOMER, ActionSpec(id=ACTION, name="Web", type="WEBPAGE"))
    seed(warehouse, sandbox, [ledger_row(0)])

    with pytest.raises(UploadConfigError, match="UPLOAD_CALLS") as raised:
        run(warehouse, client)

    assert raised.value.code == "INVALID_CONVERSION_ACTION_TYPE"
    assert {r["state"] for r in ledger(warehouse).values()} == {"pending"}


@pytest.mark.parametrize(
    ("customer_id", "code"),
    [("999-999-9999", "USER_PERMISSION_DENIED"), ("555-555-5555", "INVALID_CUSTOMER_FOR_CALL")],
)
def test_wrong_customer_raises_an_actionable_config_error(warehouse, sandbox, client, customer_id, code):
    seed(warehouse, sandbox, [ledger_row(n) for n in range(2)])

    with pytest.raises(UploadConfigError) as raised:
        run(warehouse, client, account=make_account(customer_id=customer_id))

    message = str(raised.value)
    assert raised.value.code == code
    assert customer_id in message
    assert "accounts[acme].customer_id" in message
    assert "login_customer_id" in message
    assert "+47" not in message
    assert {(r["state"], r["attempts"]) for r in ledger(warehouse).values()} == {("pending", 0)}
    assert sandbox.accepted() == []


def test_rejected_credentials_raise_a_config_error(warehouse, sandbox):
    seed(warehouse, sandbox, [ledger_row(0)])
    wrong = client_from_settings(
        {"developer_token": DEV_TOKEN, "access_token": "expired", "endpoint": sandbox.endpoint}
    )

    with pytest.raises(UploadConfigError, match="check the OAuth credentials") as raised:
        run(warehouse, wrong)

    assert raised.value.code == "OAUTH_TOKEN_INVALID"
    assert {r["state"] for r in ledger(warehouse).values()} == {"pending"}


# --------------------------------------------------------------- dry run, size


def test_dry_run_validates_and_records_nothing(warehouse, sandbox, client):
    rows = seed(warehouse, sandbox, [ledger_row(n) for n in range(3)])
    seed(warehouse, sandbox, [ledger_row(9)], known=False)
    before = ledger(warehouse)

    outcome = run(warehouse, client, dry_run=True)

    assert outcome.dry_run
    assert (outcome.sent, outcome.validated, outcome.accepted) == (4, 3, 0)
    assert outcome.failed == {"CALL_NOT_FOUND": 1}
    assert ledger(warehouse) == before
    assert sandbox.accepted() == []
    assert sandbox.requests[-1]["validate_only"] is True

    # And the real run afterwards sends them for real.
    real = run(warehouse, client)
    assert real.accepted == len(rows)


def test_more_than_2000_rows_are_split_into_batches(warehouse, sandbox, client):
    rows = [ledger_row(n, call_start=CALL_BASE + timedelta(seconds=10 * n)) for n in range(2150)]
    seed(warehouse, sandbox, rows)

    outcome = run(warehouse, client)

    assert outcome.batches == 2
    assert [r["rows"] for r in sandbox.requests] == [2000, 150]
    assert outcome.accepted == 2150
    assert ledger_counts(warehouse, "acme")["uploaded"] == 2150
    assert len(sandbox.accepted()) == 2150


def test_rows_with_the_same_google_key_never_share_a_request(warehouse, sandbox, client):
    first = ledger_row(1)
    # Another conversion key, but the same caller, conversion time and action.
    twin = ledger_row(2, caller_e164=first["caller_e164"], conversion_time=first["conversion_time"])
    seed(warehouse, sandbox, [first, twin])

    outcome = run(warehouse, client)

    assert outcome.same_identity == 1
    assert [r["rows"] for r in sandbox.requests] == [1, 1]
    # Google keys a call conversion on caller, conversion time and action, not the call's
    # start: the twin, though from another call, is the same conversion to Google.
    assert first["call_start"] != twin["call_start"]
    assert (outcome.accepted, outcome.already_existed) == (1, 1)
    assert "DUPLICATE_CALL_CONVERSION_IN_REQUEST" not in outcome.failed


def test_upload_through_an_airflow_sandbox_connection(warehouse, sandbox, monkeypatch):
    import json

    from callconv.delivery.ads_client import client_from_airflow_connection

    extra = {"sandbox": True, **sandbox.client_settings(developer_token=DEV_TOKEN)}
    monkeypatch.setenv("AIRFLOW_CONN_ADS_SANDBOX", json.dumps({"conn_type": "google_ads", "extra": extra}))
    seed(warehouse, sandbox, [ledger_row(n) for n in range(2)])

    outcome = run(warehouse, client_from_airflow_connection("ads_sandbox"))

    assert outcome.accepted == 2
    assert len(sandbox.accepted()) == 2


@pytest.mark.parametrize(
    "code",
    [
        "CLOUD_PROJECT_NOT_APPROVED_FOR_PRODUCTION",
        "CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE",
        "ACTION_NOT_PERMITTED",
        "USER_PERMISSION_DENIED",
    ],
)
def test_access_denials_fail_the_upload_with_what_to_do(warehouse, sandbox, client, code):
    from callconv.delivery.ads_client import access_problem

    seed(warehouse, sandbox, [ledger_row(0)])
    sandbox.deny_access(code)

    with pytest.raises(UploadConfigError) as raised:
        run(warehouse, client)

    assert raised.value.code == code
    assert str(raised.value).startswith(access_problem(code, make_account()))
    assert {r["state"] for r in ledger(warehouse).values()} == {"pending"}  # claim given back, nothing lost
    assert sandbox.accepted() == []
