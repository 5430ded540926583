"""The sandbox speaks Google's protocol: checked with the real client over TLS, no database."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from callconv.config import parse_settings
from callconv.delivery.ads_client import (
    API_VERSION,
    SSL_ROOTS_ENV_VAR,
    access_problem,
    client_from_settings,
    decode_partial_failure,
    error_code_name,
    get_search_service,
    get_upload_service,
    is_empty_result,
)
from callconv.sandbox import ActionSpec
from callconv.sandbox.server import ACCESS_DENIALS

CUSTOMER = "1234567890"
NOW = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)
CALL = ("+4791000001", datetime(2026, 3, 1, 7, 0, tzinfo=UTC))
# The same caller again, half an hour later: another call.
SECOND_CALL = (CALL[0], datetime(2026, 3, 1, 7, 30, tzinfo=UTC))


@pytest.fixture()
def sandbox(make_sandbox):
    return make_sandbox(
        customers={
            CUSTOMER: [
                ActionSpec(id="111", name="Phone sale"),
                ActionSpec(id="222", name="Paused", status="PAUSED"),
                ActionSpec(id="333", name="Web", type="WEBPAGE"),
                ActionSpec(id="444", name="New", created_at=NOW - timedelta(hours=2)),
                ActionSpec(id="555", name="Late", tracking_since=NOW - timedelta(hours=13)),
            ]
        },
        calls=[CALL, SECOND_CALL],
        clock=lambda: NOW,
    ).start()


def conversion(client, caller=CALL[0], start="2026-03-01 08:00:00+01:00", at="2026-03-01 10:00:00+01:00", action="111"):
    row = client.get_type("CallConversion")
    row.caller_id = caller
    row.call_start_date_time = start
    row.conversion_date_time = at
    row.conversion_action = f"customers/{CUSTOMER}/conversionActions/{action}"
    row.conversion_value = 10.0
    row.currency_code = "NOK"
    return row


def upload(client, rows, *, customer=CUSTOMER, partial_failure=True, validate_only=False):
    request = client.get_type("UploadCallConversionsRequest")
    request.customer_id = customer
    request.conversions.extend(rows)
    request.partial_failure = partial_failure
    request.validate_only = validate_only
    return get_upload_service(client).upload_call_conversions(request=request)


def test_accepts_a_known_call_over_tls(sandbox, client):
    response = upload(client, [conversion(client)])

    assert len(response.results) == 1 and not is_empty_result(response.results[0])
    assert response.results[0].caller_id == CALL[0]
    assert decode_partial_failure(client, response) == {}
    (accepted,) = sandbox.accepted()
    assert accepted.call_start == CALL[1]
    assert sandbox.endpoint.startswith("localhost:")


def test_row_errors_come_back_as_partial_failure_with_row_indexes(sandbox, client):
    rows = [
        conversion(client, at="2026-03-01 11:00:00+01:00"),
        conversion(client, at="2026-03-01 11:00:00+01:00"),  # the same again
        conversion(client, action="222"),
        conversion(client, action="333"),
        conversion(client, action="444"),
        conversion(client, action="555"),
        conversion(client, start="2026-03-01T08:00:00"),
        conversion(client, caller="0047 91"),
        conversion(client, at="2026-03-01 07:59:59+01:00"),
        conversion(client, start="2026-03-01 23:00:00+01:00", at="2026-03-02 01:30:00+01:00"),
        conversion(client, start="2025-12-01 08:00:00+01:00", at="2025-12-01 10:00:00+01:00"),
        conversion(client, start="2026-03-01 08:00:01+01:00"),
    ]

    response = upload(client, rows)

    errors = {index: code for index, (code, _message) in decode_partial_failure(client, response).items()}
    assert errors == {
        1: "DUPLICATE_CALL_CONVERSION_IN_REQUEST",
        2: "NO_CONVERSION_ACTION_FOUND",
        3: "INVALID_CONVERSION_ACTION_TYPE",
        4: "TOO_RECENT_CONVERSION_ACTION",
        5: "CONVERSION_TRACKING_NOT_ENABLED_AT_CALL_TIME",
        6: "INVALID_STRING_DATE_TIME_SECONDS_WITH_OFFSET",
        7: "UNPARSEABLE_CALLERS_PHONE_NUMBER",
        8: "CONVERSION_PRECEDES_CALL",
        9: "TOO_RECENT_CALL",
        10: "EXPIRED_CALL",
        11: "CALL_NOT_FOUND",
    }
    assert len(response.results) == len(rows)
    assert [is_empty_result(r) for r in response.results] == [False] + [True] * 11
    assert len(sandbox.accepted()) == 1

    again = upload(client, [conversion(client, at="2026-03-01 11:00:00+01:00")])
    assert decode_partial_failure(client, again)[0][0] == "CALL_CONVERSION_ALREADY_EXISTS"


def test_google_keys_a_call_conversion_on_caller_conversion_time_and_action(sandbox, client):
    """Google's documented rule, not ours: the call start is not part of the key."""
    first = conversion(client, start="2026-03-01 08:00:00+01:00", at="2026-03-01 10:00:00+01:00")
    second = conversion(client, start="2026-03-01 08:30:00+01:00", at="2026-03-01 10:00:00+01:00")

    response = upload(client, [first, second])

    assert decode_partial_failure(client, response) == {
        1: ("DUPLICATE_CALL_CONVERSION_IN_REQUEST", "Multiple events have the same call and conversion_date_time.")
    }
    assert len(sandbox.accepted()) == 1
    # Another call, the same caller, conversion time and action: already there.
    again = upload(client, [conversion(client, start="2026-03-01 08:30:00+01:00", at="2026-03-01 10:00:00+01:00")])
    assert decode_partial_failure(client, again)[0][0] == "CALL_CONVERSION_ALREADY_EXISTS"
    # Another conversion time on the same call is another conversion.
    later = upload(client, [conversion(client, start="2026-03-01 08:00:00+01:00", at="2026-03-01 10:00:01+01:00")])
    assert decode_partial_failure(client, later) == {}
    assert len(sandbox.accepted()) == 2


def test_two_requests_with_the_same_conversion_in_flight_record_it_once(sandbox, client):
    """No global lock serialises requests: the insert-if-absent on Google's key decides."""
    from concurrent.futures import ThreadPoolExecutor

    sandbox.set_delay(0.3)
    same = [conversion(client, at="2026-03-01 10:00:00+01:00") for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda row: upload(client, [row]), same))

    codes = sorted(decode_partial_failure(client, answer).get(0, ("ok",))[0] for answer in answers)
    assert codes == ["CALL_CONVERSION_ALREADY_EXISTS", "ok"]
    assert len(sandbox.accepted()) == 1


def test_validate_only_checks_but_records_nothing(sandbox, client):
    response = upload(client, [conversion(client), conversion(client, action="222")], validate_only=True)

    assert list(response.results) == []
    assert set(decode_partial_failure(client, response)) == {1}
    assert sandbox.accepted() == []


def test_request_level_errors_raise_google_ads_exception(sandbox, client):
    from google.ads.googleads.errors import GoogleAdsException

    cases = [
        ({"partial_failure": False}, [conversion(client)], "PARTIAL_FAILURE_MODE_REQUIRED"),
        ({}, [conversion(client)] * 2001, "TOO_MANY_CONVERSIONS_IN_REQUEST"),
        ({"customer": "9999999999"}, [conversion(client)], "USER_PERMISSION_DENIED"),
    ]
    for kwargs, rows, code in cases:
        with pytest.raises(GoogleAdsException) as raised:
            upload(client, rows, **kwargs)
        assert [error_code_name(e) for e in raised.value.failure.errors] == [code]
        assert raised.value.request_id.startswith("sandbox-")
    assert sandbox.accepted() == []


def test_quota_exhaustion_carries_a_google_ads_failure_in_trailing_metadata(sandbox, client):
    from google.api_core.exceptions import ResourceExhausted

    sandbox.exhaust_quota(next_calls=1)
    with pytest.raises(ResourceExhausted) as raised:
        upload(client, [conversion(client)])

    trailing = dict(raised.value.response.trailing_metadata())
    failure_type = type(client.get_type("GoogleAdsFailure"))
    failure = failure_type.deserialize(trailing[f"google.ads.googleads.{API_VERSION}.errors.googleadsfailure-bin"])
    assert error_code_name(failure.errors[0]) == "RESOURCE_EXHAUSTED"
    assert len(upload(client, [conversion(client)]).results) == 1  # only the next call


def test_die_after_accept_records_then_fails(sandbox, client):
    from google.api_core.exceptions import ServiceUnavailable

    sandbox.die_after_accept()
    with pytest.raises(ServiceUnavailable):
        upload(client, [conversion(client)])
    assert len(sandbox.accepted()) == 1


def test_plaintext_clients_are_refused(sandbox):
    channel = grpc.insecure_channel(f"127.0.0.1:{sandbox.port}")
    call = channel.unary_unary(
        f"/google.ads.googleads.{API_VERSION}.services.ConversionUploadService/UploadCallConversions",
        request_serializer=lambda message: b"",
        response_deserializer=lambda data: data,
    )
    with pytest.raises(grpc.RpcError) as raised:
        call(b"", timeout=2)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()


def command_line_sandbox(sandbox_cert, *options: str) -> tuple[subprocess.Popen, list[str]]:
    """``python -m callconv.sandbox`` for customer 123-456-7890, started: the process and its lines up to Ctrl-C."""
    command = [
        sys.executable,
        "-m",
        "callconv.sandbox",
        "--customer",
        "123-456-7890",
        "--action",
        "111:Phone sale",
        "--cert-dir",
        str(sandbox_cert.parent),
        "--now",
        NOW.isoformat(),
        *options,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(["include", os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=Path(__file__).parents[2]
    )
    lines = []
    for line in process.stdout:
        lines.append(line.strip())
        if line.startswith("Ctrl-C"):
            break
    return process, lines


def test_command_line_sandbox_serves_the_real_client(sandbox_cert):
    process, lines = command_line_sandbox(sandbox_cert)
    try:
        endpoint = next(line for line in lines if "serving on" in line).rsplit(" ", 1)[1]
        assert f"export {SSL_ROOTS_ENV_VAR}={sandbox_cert}" in lines
        # A new user's settings: no developer token, as with Google since 2026-09-09.
        client = client_from_settings({"access_token": "sandbox-token", "endpoint": endpoint})
        response = upload(client, [conversion(client)])
        # The sandbox knows no calls here: Google's answer for an unknown call.
        assert decode_partial_failure(client, response)[0][0] == "CALL_NOT_FOUND"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_calls_from_a_warehouse_not_yet_normalised_are_loaded(sandbox_cert, warehouse, pg_schema_url):
    """A demo warehouse fresh from its seed: numbers as the switchboard wrote them, no E.164 yet.
    The sandbox normalises them first; it used to load 0 calls, and every upload got CALL_NOT_FOUND."""
    import sqlalchemy as sa

    from callconv.schema import call_logs

    written = {CALL: "0047 910 00 001", SECOND_CALL: "(+47) 91.00.00.01", ("+4791000002", NOW): "910 00 002"}
    rows = [
        {
            "account_id": "acme",
            "source_call_id": f"call-{index}",
            "caller_number": written[call],
            "call_start": call[1],
            "duration_seconds": 120,
            "via_google_forwarding": index < 2,  # the third did not come through Google forwarding
        }
        for index, call in enumerate(written)
    ]
    with warehouse.begin() as connection:
        connection.execute(call_logs.insert(), rows)
    options = ["--calls-from-warehouse", pg_schema_url, "--account", "acme", "--region", "NO"]
    process, lines = command_line_sandbox(sandbox_cert, *options)
    try:
        assert "account acme: 3 call-log rows normalised (NO)" in lines
        assert "account acme: 2 forwarded calls loaded" in lines
        endpoint = next(line for line in lines if "serving on" in line).rsplit(" ", 1)[1]
        client = client_from_settings({"access_token": "sandbox-token", "endpoint": endpoint})
        response = upload(client, [conversion(client)])
        assert decode_partial_failure(client, response) == {}
        assert response.results[0].caller_id == CALL[0]
    finally:
        process.terminate()
        process.wait(timeout=10)
    with warehouse.connect() as connection:
        stored = dict(connection.execute(sa.select(call_logs.c.source_call_id, call_logs.c.caller_e164)).all())
    assert stored == {"call-0": "+4791000001", "call-1": "+4791000001", "call-2": "+4791000002"}


# --------------------------------------------------------------- access since the developer-token sunset


def test_requests_without_a_developer_token_are_served(make_sandbox):
    """Google ignores the header now; a sandbox told a token only refuses a different one that is sent."""
    from google.ads.googleads.errors import GoogleAdsException

    customers = {CUSTOMER: [ActionSpec(id="111")]}
    sandbox = make_sandbox(customers=customers, calls=[CALL], clock=lambda: NOW, developer_token="configured-token")
    sandbox.start()
    settings = {key: value for key, value in sandbox.client_settings().items() if key != "developer_token"}
    without = client_from_settings(settings)
    assert without.developer_token is None

    response = upload(without, [conversion(without)])

    assert decode_partial_failure(without, response) == {} and len(sandbox.accepted()) == 1
    assert sandbox.requests[-1]["developer_token"] is None
    wrong = client_from_settings({**settings, "developer_token": "another-token"})
    with pytest.raises(GoogleAdsException) as raised:
        upload(wrong, [conversion(wrong, at="2026-03-01 10:30:00+01:00")])
    assert [error_code_name(e) for e in raised.value.failure.errors] == ["DEVELOPER_TOKEN_INVALID"]
    assert sandbox.client_settings()["developer_token"] == "configured-token"


ACCESS_HINTS = {
    "CLOUD_PROJECT_NOT_APPROVED_FOR_PRODUCTION": "get Explorer access",
    "CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE": "accounts[acme].delivery to 'file'",
    "ACTION_NOT_PERMITTED": "an Admin or Standard user role",
    "USER_PERMISSION_DENIED": "set accounts[acme].login_customer_id",
}


def test_access_hints_cover_every_denial_the_sandbox_can_inject():
    assert set(ACCESS_HINTS) == set(ACCESS_DENIALS)


@pytest.mark.parametrize("code", sorted(ACCESS_HINTS))
def test_access_denials_reach_the_real_client_and_map_to_what_to_do(sandbox, client, code):
    from google.ads.googleads.errors import GoogleAdsException

    account = parse_settings(
        {
            "crm_source": {"columns": {"caller_phone": "Tel", "conversion_time": "Tid", "outcome": "Utfall"}},
            "accounts": [
                {
                    "id": "acme",
                    "customer_id": CUSTOMER,
                    "timezone": "Europe/Oslo",
                    "default_region": "NO",
                    "default_currency": "NOK",
                    "conversion_actions": {"sale": {"id": "111", "name": "Phone sale"}},
                }
            ],
        }
    ).accounts[0]
    sandbox.deny_access(code, next_calls=1)

    with pytest.raises(GoogleAdsException) as raised:
        upload(client, [conversion(client)])

    assert raised.value.error.code() == grpc.StatusCode.PERMISSION_DENIED
    (error,) = raised.value.failure.errors
    received = error_code_name(error)
    assert received == code
    message = access_problem(received, account)
    assert message is not None and "\n" not in message
    assert f"({code})" in message and "123-456-7890" in message and ACCESS_HINTS[code] in message
    assert sandbox.accepted() == []
    # Only the next call was denied.
    assert len(upload(client, [conversion(client)]).results) == 1


ACTIONS_QUERY = (
    "SELECT conversion_action.id, conversion_action.type, conversion_action.status "
    "FROM conversion_action WHERE conversion_action.id IN (111, 222, 333)"
)


def search(client, query=ACTIONS_QUERY, customer=CUSTOMER) -> list[tuple]:
    rows = get_search_service(client).search(customer_id=customer, query=query)
    return [(r.conversion_action.id, r.conversion_action.type_.name, r.conversion_action.status.name) for r in rows]


def test_search_answers_the_configured_actions_with_the_uploads_caller_checks(sandbox, client):
    """What the preflight asks: GAQL on conversion_action, answered from the configured actions."""
    from google.ads.googleads.errors import GoogleAdsException

    assert search(client) == [
        (111, "UPLOAD_CALLS", "ENABLED"),
        (222, "UPLOAD_CALLS", "UNKNOWN"),
        (333, "WEBPAGE", "ENABLED"),
    ]
    sandbox.set_action(CUSTOMER, ActionSpec(id="111", name="Phone sale", status="REMOVED", type="AD_CALL"))
    assert search(client, ACTIONS_QUERY.replace("IN (111, 222, 333)", "= 111")) == [(111, "AD_CALL", "REMOVED")]

    def refused(**options) -> list[str]:
        with pytest.raises(GoogleAdsException) as raised:
            search(client, **options)
        return [error_code_name(e) for e in raised.value.failure.errors]

    assert refused(customer="9998887777") == ["USER_PERMISSION_DENIED"]
    assert refused(query="SELECT campaign.id FROM campaign") == ["PROHIBITED_RESOURCE_TYPE_IN_FROM_CLAUSE"]
    assert refused(query="SELECT conversion_action.tag_snippets FROM conversion_action") == ["UNRECOGNIZED_FIELD"]
    sandbox.deny_access("ACTION_NOT_PERMITTED", next_calls=1)
    assert refused() == ["ACTION_NOT_PERMITTED"]
    sandbox.access_token = "another-token"
    assert refused() == ["OAUTH_TOKEN_INVALID"]
    assert sandbox.requests == [] and len(sandbox.searches) == 7
