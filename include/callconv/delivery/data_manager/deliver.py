"""Send due ledger rows through the Data Manager API's ``events:ingest``, exactly as safely as
:mod:`callconv.delivery.upload` sends through the Google Ads API.

The ledger protocol is upload.py's: rows are claimed in a transaction that commits before
the send (``FOR UPDATE SKIP LOCKED``, a claim id in ``request_id``, a lease); the request
body is frozen in ``data_manager_requests`` before it leaves, and Google's request id is
recorded after. A sender that died leaves a request in state ``sending`` whose lease ran
out: the next run resends its stored bytes, unchanged, and counts the resend (Google
deduplicates call conversions after processing; there is no duplicate error on this path).

The outcome of an accepted request is known later (:mod:`callconv.delivery.data_manager.settle`):
its rows wait in state ``processing``.

This module is deliberately separate from upload.py's claim/send code (see the package
docstring); it imports only upload.py's public helpers.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from callconv.delivery.data_manager.hashing import UnhashablePhone, hash_phone
from callconv.delivery.upload import WRITE_CHUNK, due_rows_paged, mark_sending
from callconv.schema import data_manager_requests, upload_ledger

log = logging.getLogger(__name__)

_KEYS = sa.bindparam("keys", expanding=True)
_CONSENT = {"GRANTED": "CONSENT_GRANTED", "DENIED": "CONSENT_DENIED", "UNKNOWN": "CONSENT_STATUS_UNSPECIFIED"}


@dataclass
class DeliveryOutcome:
    """Counts for the run summary and logs; never a number or key."""

    sent: int = 0
    requests: int = 0
    resent_requests: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    parked: int = 0
    validated: int = 0


def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_for(account, row) -> dict:
    """The ``Event`` of one ledger row: hashed phone, times in RFC 3339, value, consent."""
    event: dict = {
        "eventTimestamp": _rfc3339(row.conversion_time),
        "callInfo": {"startTimestamp": _rfc3339(row.call_start)},
        "userData": {"userIdentifiers": [{"phoneNumber": hash_phone(row.caller_e164 or "")}]},
        "eventSource": "PHONE",
    }
    if row.conversion_value is not None:
        event["conversionValue"] = float(row.conversion_value)
        event["currency"] = row.currency_code or account.default_currency
    consent = account.consent
    event["consent"] = {
        "adUserData": _CONSENT[str(getattr(consent, "ad_user_data", "UNKNOWN"))],
        "adPersonalization": _CONSENT[str(getattr(consent, "ad_personalization", "UNKNOWN"))],
    }
    return event


def local_problem(account, row) -> str | None:
    """Google's rules checked before sending, so one bad event does not fail a request."""
    if not row.caller_e164:
        return "MISSING_USER_IDENTIFIER"
    try:
        hash_phone(row.caller_e164)
    except UnhashablePhone:
        return "INVALID_PHONE_NUMBER"
    if row.conversion_time < row.call_start:
        return "CONVERSION_PRECEDES_CALL"
    if row.conversion_value is not None and row.conversion_value < 0:
        return "INVALID_CONVERSION_VALUE"
    return None


def request_body(account, action_id: str, events: list[dict], validate_only: bool = False) -> dict:
    destination: dict = {
        "operatingAccount": {"accountType": "GOOGLE_ADS", "accountId": account.customer_id},
        "productDestinationId": action_id,
    }
    if account.login_customer_id:
        destination["loginAccount"] = {"accountType": "GOOGLE_ADS", "accountId": account.login_customer_id}
    return {"destinations": [destination], "events": events, "encoding": "HEX", "validateOnly": validate_only}


def _claim(engine, account, rows, *, action_id, run_id, claim_id, now, lease, window_end) -> tuple[list, bytes]:
    """Claim still-due rows and freeze the request body, in one transaction committed before the send."""
    ledger = upload_ledger
    keys = [row.conversion_key for row in rows]
    with engine.begin() as connection:
        mark_sending(
            connection, account.id, keys, due_by=window_end, now=now, run_id=run_id, claim_id=claim_id, lease=lease
        )
        claimed = list(
            connection.execute(
                sa.select(ledger)
                .where(ledger.c.conversion_key.in_(_KEYS), ledger.c.request_id == claim_id)
                .order_by(ledger.c.conversion_key),
                {"keys": keys},
            )
        )
        if not claimed:
            return [], b""
        frozen = [row.sent_payload or json.dumps(event_for(account, row)).encode() for row in claimed]
        events = [json.loads(payload) for payload in frozen]
        _store_claimed(connection, [row.conversion_key for row in claimed], frozen)
        body = json.dumps(request_body(account, action_id, events)).encode()
        connection.execute(
            data_manager_requests.insert().values(
                claim_id=claim_id,
                account_id=account.id,
                run_id=run_id,
                state="sending",
                events=len(claimed),
                body=body,
                sent_at=now,
                sends=1,
            )
        )
    return claimed, body


def _store_claimed(connection, keys: list[str], payloads: list[bytes]) -> None:
    """Write each claimed row's frozen event and its index in the request body.

    On PostgreSQL one ``UPDATE ... FROM unnest(...)`` per chunk, as upload.py's
    ``_store_payloads`` does: psycopg2 runs an executemany as a round trip per row, and a
    request holds up to 2,000 events. SQLite's executemany stays in process.
    """
    if connection.dialect.name != "postgresql":
        connection.execute(
            sa.update(upload_ledger)
            .where(upload_ledger.c.conversion_key == sa.bindparam("b_key"))
            .values(sent_payload=sa.bindparam("b_payload"), record_index=sa.bindparam("b_index")),
            [{"b_key": k, "b_payload": p, "b_index": i} for i, (k, p) in enumerate(zip(keys, payloads, strict=True))],
        )
        return
    for start in range(0, len(keys), WRITE_CHUNK):
        end = min(start + WRITE_CHUNK, len(keys))
        connection.execute(
            _STORE_CLAIMED_PG,
            {"keys": keys[start:end], "payloads": payloads[start:end], "indices": list(range(start, end))},
        )


_STORE_CLAIMED_PG = sa.text(
    "UPDATE upload_ledger AS ledger SET sent_payload = frozen.payload, record_index = frozen.record_index"
    " FROM unnest(:keys, :payloads, :indices) AS frozen(conversion_key, payload, record_index)"
    " WHERE ledger.conversion_key = frozen.conversion_key"
).bindparams(
    sa.bindparam("keys", type_=postgresql.ARRAY(sa.String)),
    sa.bindparam("payloads", type_=postgresql.ARRAY(sa.LargeBinary)),
    sa.bindparam("indices", type_=postgresql.ARRAY(sa.Integer)),
)


_FIELD_INDEX = re.compile(r"^events\[(\d+)\]")


def _violations(error) -> list[tuple[int | None, str]]:
    """(event index or None, reason) from Google's BadRequest details of a fast-fail."""
    try:
        details = json.loads(error.content)["error"].get("details", [])
    except (ValueError, KeyError, TypeError, AttributeError):
        return [(None, "UNREADABLE_ERROR")]
    found: list[tuple[int | None, str]] = []
    for detail in details:
        for violation in detail.get("fieldViolations", []):
            match = _FIELD_INDEX.match(violation.get("field", ""))
            found.append((int(match.group(1)) if match else None, violation.get("reason") or "INVALID_ARGUMENT"))
    return found or [(None, "INVALID_ARGUMENT")]


def _set_rows(connection, keys: list[str], **values) -> None:
    if keys:
        connection.execute(
            sa.update(upload_ledger).where(upload_ledger.c.conversion_key.in_(_KEYS)).values(**values), {"keys": keys}
        )


def _ingest(service, body: bytes, *, max_retries: int, sleep):
    """One ingest of frozen bytes; 503 retried with backoff, anything else raised."""
    from googleapiclient.errors import HttpError

    for attempt in range(max_retries + 1):
        try:
            return service.events().ingest(body=json.loads(body)).execute(num_retries=0)
        except HttpError as error:
            if error.resp.status != 503 or attempt == max_retries:
                raise
            sleep(min(60.0, 2.0 * 2**attempt))
    raise AssertionError("unreachable")


def deliver_pending(
    engine,
    account,
    service,
    *,
    window_end: datetime,
    run_id: str,
    now: datetime,
    batch_size: int = 2000,
    lease: timedelta = timedelta(minutes=60),
    quota_wait: timedelta = timedelta(minutes=60),
    max_retries: int = 3,
    sleep=lambda seconds: None,
    dry_run: bool = False,
) -> DeliveryOutcome:
    """Send the account's due rows, one request per conversion action and batch.

    ``now`` is the run's clock for leases (the data interval's end in the DAG), never
    wall time in business logic. With ``dry_run`` every batch goes as ``validateOnly``
    and nothing in the ledger changes.
    """
    from googleapiclient.errors import HttpError

    outcome = DeliveryOutcome()
    _resend_abandoned(
        engine, account, service, now=now, lease=lease, outcome=outcome, max_retries=max_retries, sleep=sleep
    )
    by_action: dict[str, list] = {}
    bad: dict[str, list[str]] = {}
    for row in due_rows_paged(engine, account.id, window_end, now=now):
        problem = local_problem(account, row)
        if problem:
            bad.setdefault(problem, []).append(row.conversion_key)
        else:
            by_action.setdefault(row.conversion_action_id, []).append(row)
    if not dry_run:
        with engine.begin() as connection:
            for code, keys in bad.items():
                _set_rows(connection, keys, state="failed", error_code=code, error_message="refused before sending")
                outcome.failed[code] = outcome.failed.get(code, 0) + len(keys)
    for action_id, rows in by_action.items():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            if dry_run:
                body = request_body(account, action_id, [event_for(account, r) for r in batch], validate_only=True)
                service.events().ingest(body=body).execute(num_retries=0)
                outcome.validated += len(batch)
                continue
            for _ in range(2):  # the batch, then at most once more without the events Google named
                claim_id = uuid.uuid4().hex
                claimed, body = _claim(
                    engine,
                    account,
                    batch,
                    action_id=action_id,
                    run_id=run_id,
                    claim_id=claim_id,
                    now=now,
                    lease=lease,
                    window_end=window_end,
                )
                if not claimed:
                    break
                keys = [row.conversion_key for row in claimed]
                try:
                    answer = _ingest(service, body, max_retries=max_retries, sleep=sleep)
                except HttpError as error:
                    if error.resp.status == 429:
                        _give_back(
                            engine,
                            claim_id,
                            keys,
                            state="parked",
                            park_until=window_end + quota_wait,
                            code="RESOURCE_EXHAUSTED",
                            request_state="rejected",
                        )
                        outcome.parked += len(keys)
                        log.warning("Data Manager quota exhausted for %s: %d rows parked", account.id, len(keys))
                        return outcome
                    if error.resp.status != 400:
                        _give_back(engine, claim_id, keys, state="pending", request_state="rejected")
                        raise
                    named = {index: reason for index, reason in _violations(error) if index is not None}
                    if not named:
                        _give_back(engine, claim_id, keys, state="pending", request_state="rejected")
                        raise
                    failed_keys = {keys[i]: reason for i, reason in named.items() if i < len(keys)}
                    with engine.begin() as connection:
                        for key, reason in failed_keys.items():
                            _set_rows(
                                connection,
                                [key],
                                state="failed",
                                error_code=reason[:64],
                                error_message="rejected by the Data Manager API",
                                claimed_by=None,
                                lease_until=None,
                            )
                            outcome.failed[reason] = outcome.failed.get(reason, 0) + 1
                    # The others were never accepted: they are pending again, their bytes unchanged.
                    _give_back(
                        engine,
                        claim_id,
                        [k for k in keys if k not in failed_keys],
                        state="pending",
                        request_state="rejected",
                    )
                    batch = [row for row in batch if row.conversion_key not in failed_keys]
                    continue
                _accepted(engine, claim_id, keys, answer.get("requestId"), now)
                outcome.sent += len(keys)
                outcome.requests += 1
                break
    log.info(
        "Data Manager delivery for %s: sent=%d requests=%d resent_requests=%d failed=%s parked=%d validated=%d",
        account.id,
        outcome.sent,
        outcome.requests,
        outcome.resent_requests,
        outcome.failed,
        outcome.parked,
        outcome.validated,
    )
    return outcome


def _give_back(
    engine, claim_id: str, keys: list[str], *, state: str, request_state: str, park_until=None, code=None
) -> None:
    with engine.begin() as connection:
        _set_rows(
            connection, keys, state=state, claimed_by=None, lease_until=None, park_until=park_until, error_code=code
        )
        connection.execute(
            sa.update(data_manager_requests)
            .where(data_manager_requests.c.claim_id == claim_id)
            .values(state=request_state)
        )


def _accepted(engine, claim_id: str, keys: list[str], google_request_id: str | None, now: datetime) -> None:
    """Recorded after the send: Google's request id; the rows wait for requestStatus."""
    with engine.begin() as connection:
        connection.execute(
            sa.update(data_manager_requests)
            .where(data_manager_requests.c.claim_id == claim_id)
            .values(state="processing", google_request_id=google_request_id, answered_at=now)
        )
        _set_rows(connection, keys, state="processing", lease_until=None)


def _resend_abandoned(engine, account, service, *, now, lease, outcome, max_retries, sleep) -> None:
    """Requests whose sender died after the claim: resent once as their stored bytes."""
    ledger = upload_ledger
    with engine.connect() as connection:
        stuck = connection.execute(
            sa.select(data_manager_requests.c.claim_id, data_manager_requests.c.body)
            .where(data_manager_requests.c.account_id == account.id, data_manager_requests.c.state == "sending")
            .where(
                sa.exists().where(
                    ledger.c.request_id == data_manager_requests.c.claim_id,
                    ledger.c.state == "sending",
                    ledger.c.lease_until < now,
                )
            )
        ).all()
    for claim_id, body in stuck:
        with engine.begin() as connection:
            keys = list(
                connection.scalars(
                    sa.select(ledger.c.conversion_key)
                    .where(ledger.c.request_id == claim_id, ledger.c.state == "sending")
                    .with_for_update(skip_locked=True)
                )
            )
            if not keys:
                continue
            _set_rows(connection, keys, lease_until=now + lease, sends=ledger.c.sends + 1)
            connection.execute(
                sa.update(data_manager_requests)
                .where(data_manager_requests.c.claim_id == claim_id)
                .values(sends=data_manager_requests.c.sends + 1)
            )
        answer = _ingest(service, body, max_retries=max_retries, sleep=sleep)
        _accepted(engine, claim_id, keys, answer.get("requestId"), now)
        outcome.resent_requests += 1
        outcome.sent += len(keys)
