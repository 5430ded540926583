"""The Data Manager sandbox answers the real google-api-python-client as Google would."""

from __future__ import annotations

import json

import pytest
from googleapiclient.errors import HttpError

from callconv.delivery.data_manager.client import build_service, discovery_has_call_info, token_credentials
from callconv.delivery.data_manager.hashing import hash_phone
from callconv.sandbox.data_manager import DataManagerSandbox, DmAction

pytestmark = pytest.mark.integration

CUSTOMER, ACTION = "1234567890", "555"


@pytest.fixture()
def sandbox(tmp_path):
    box = DataManagerSandbox(
        [
            DmAction(CUSTOMER, ACTION),
            DmAction(CUSTOMER, "556", status="REMOVED"),
            DmAction(CUSTOMER, "557", type="WEBPAGE"),
        ],
        cert_dir=tmp_path / "certs",
    )
    endpoint = box.start()
    yield box, endpoint
    box.stop()


def service(box, endpoint, token="sandbox-token"):
    return build_service(token_credentials(token), api_endpoint=endpoint, ca_certs=str(box.cert_path))


def event(number="+4722334455", at="2026-11-02T12:00:00Z", start="2026-11-02T11:00:00Z", **extra):
    body = {
        "eventTimestamp": at,
        "callInfo": {"startTimestamp": start},
        "userData": {"userIdentifiers": [{"phoneNumber": hash_phone(number) if number.startswith("+") else number}]},
        "conversionValue": 100.0,
        "currency": "NOK",
        "consent": {"adUserData": "CONSENT_GRANTED", "adPersonalization": "CONSENT_DENIED"},
    }
    body.update(extra)
    return body


def request(events, action=ACTION, validate_only=False):
    return {
        "destinations": [
            {"operatingAccount": {"accountType": "GOOGLE_ADS", "accountId": CUSTOMER}, "productDestinationId": action}
        ],
        "events": events,
        "encoding": "HEX",
        "validateOnly": validate_only,
    }


def test_pinned_discovery_document_has_call_info():
    assert discovery_has_call_info()


def test_ingest_then_processing_then_success_and_dedup_after_processing(sandbox):
    box, endpoint = sandbox
    api = service(box, endpoint)
    first = api.events().ingest(body=request([event()])).execute()
    status = api.requestStatus().retrieve(requestId=first["requestId"]).execute()
    assert status["requestStatusPerDestination"][0]["requestStatus"] == "PROCESSING"
    status = api.requestStatus().retrieve(requestId=first["requestId"]).execute()
    assert status["requestStatusPerDestination"][0]["requestStatus"] == "SUCCESS"
    again = api.events().ingest(body=request([event()])).execute()  # a duplicate is accepted
    for _ in range(2):
        api.requestStatus().retrieve(requestId=again["requestId"]).execute()
    assert len(box.accepted) == 1 and box.duplicates == 1


def test_fast_fail_names_the_record_and_records_nothing(sandbox):
    box, endpoint = sandbox
    api = service(box, endpoint)
    with pytest.raises(HttpError) as caught:
        api.events().ingest(body=request([event(), event(number="+4799999999"), event(number="deadbeef")])).execute()
    assert caught.value.resp.status == 400
    violations = json.loads(caught.value.content)["error"]["details"][1]["fieldViolations"]
    assert [v["field"] for v in violations] == ["events[2].userData.userIdentifiers.phoneNumber"]
    assert violations[0]["reason"] == "INVALID_SHA256_FORMAT" and box.requests == {}


def test_validate_only_records_nothing(sandbox):
    box, endpoint = sandbox
    answer = service(box, endpoint).events().ingest(body=request([event()], validate_only=True)).execute()
    assert "requestId" not in answer and box.requests == {}


@pytest.mark.parametrize("action", ["556", "557", "999"])
def test_disabled_wrong_type_or_unknown_action_is_refused(sandbox, action):
    box, endpoint = sandbox
    with pytest.raises(HttpError) as caught:
        service(box, endpoint).events().ingest(body=request([event()], action=action)).execute()
    assert b"INVALID_CONVERSION_ACTION_ID" in caught.value.content


def test_wrong_token_is_refused_and_nothing_recorded(sandbox):
    from google.auth.exceptions import RefreshError

    box, endpoint = sandbox
    # The sandbox answers 401; a bare token cannot be refreshed, so the client gives up.
    with pytest.raises(RefreshError):
        service(box, endpoint, token="nope").events().ingest(body=request([event()])).execute()
    assert box.requests == {} and len(box.received) == 1


def test_bad_formats_are_each_named(sandbox):
    box, endpoint = sandbox
    bad = event(at="2026-11-02 12:00:00", currency="nok", consent={"adUserData": "YES"})
    with pytest.raises(HttpError) as caught:
        service(box, endpoint).events().ingest(body=request([bad])).execute()
    reasons = {v["reason"] for v in json.loads(caught.value.content)["error"]["details"][1]["fieldViolations"]}
    assert reasons == {"INVALID_TIMESTAMP", "INVALID_CURRENCY_CODE", "INVALID_CONSENT"}


def test_faults_503_429_and_processing_failures(sandbox):
    box, endpoint = sandbox
    api = service(box, endpoint)
    box.faults.extend(["503", "429"])
    for code in (503, 429):
        with pytest.raises(HttpError) as caught:
            api.events().ingest(body=request([event()])).execute(num_retries=0)
        assert caught.value.resp.status == code
    box.processing_failures[hash_phone("+4711111111")] = "TOO_RECENT_CALL"
    answer = api.events().ingest(body=request([event(), event(number="+4711111111")])).execute()
    for _ in range(2):
        status = api.requestStatus().retrieve(requestId=answer["requestId"]).execute()
    per = status["requestStatusPerDestination"][0]
    assert per["requestStatus"] == "PARTIAL_SUCCESS"
    assert per["errorInfo"]["errorCounts"] == [
        {"reason": "PROCESSING_ERROR_REASON_TOO_RECENT_CALL", "recordCount": "1", "recordIndices": [1]}
    ]


def test_lost_response_still_records_the_request(sandbox):
    box, endpoint = sandbox
    box.faults.append("lost")
    # httplib2 resends once, whatever RETRIES says, when a connection drops before the status
    # line (it takes it for a stale connection). The resend is the identical bytes, which
    # Google deduplicates after processing; the sandbox counts the conversion once.
    api = service(box, endpoint)
    answer = api.events().ingest(body=request([event()])).execute(num_retries=0)
    assert len(box.received) == 2 and box.received[0] == box.received[1]
    for request_id in list(box.requests):
        for _ in range(2):
            api.requestStatus().retrieve(requestId=request_id).execute()
    assert answer["requestId"] in box.requests and len(box.accepted) == 1 and box.duplicates == 1


def test_a_sandbox_started_again_resumes_a_request_the_warehouse_still_waits_on(sandbox, tmp_path):
    """The demo's next day starts a new sandbox: it must answer requestStatus for a request an
    earlier one took (from the stored body), or that day's settle would meet NOT_FOUND."""
    box, endpoint = sandbox
    body = request([event()])
    taken = service(box, endpoint).events().ingest(body=body).execute()["requestId"]
    again = DataManagerSandbox([DmAction(CUSTOMER, ACTION)], cert_dir=tmp_path / "certs")
    again_endpoint = again.start()
    try:
        api = service(again, again_endpoint)
        with pytest.raises(HttpError) as unknown:
            api.requestStatus().retrieve(requestId="never-taken").execute()
        assert unknown.value.resp.status == 404
        again.resume(taken, json.loads(json.dumps(body)))
        states = [
            api.requestStatus().retrieve(requestId=taken).execute()["requestStatusPerDestination"][0]["requestStatus"]
            for _ in range(2)
        ]
        assert states == ["PROCESSING", "SUCCESS"] and len(again.accepted) == 1
    finally:
        again.stop()
