"""Send due ledger rows through the Data Manager API's ``events:ingest``, exactly as safely as
:mod:`callconv.upload` sends through the Google Ads API.

The ledger protocol is upload.py's: rows are claimed in a transaction that commits before
the send (``FOR UPDATE SKIP LOCKED``, a claim id in ``request_id``, a lease); the request
body is frozen in ``data_manager_requests`` before it leaves, and Google's request id is
recorded after. A sender that died leaves a request in state ``sending`` whose lease ran
out: the next run resends its stored bytes, unchanged, and counts the resend (Google
deduplicates call conversions after processing; there is no duplicate error on this path).

The outcome of an accepted request is known later (:mod:`callconv.data_manager.settle`):
its rows wait in state ``processing``.

This module is deliberately separate from upload.py's claim/send code (see the package
docstring); it imports only upload.py's public helpers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa

from callconv.data_manager.hashing import UnhashablePhone, hash_phone
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
    from callconv.upload import _due  # the same 'due' as the Google Ads path, by import only

    ledger = upload_ledger
    keys = [row.conversion_key for row in rows]
    candidates = (
        sa.select(ledger.c.conversion_key)
        .where(ledger.c.conversion_key.in_(_KEYS), _due(account.id, window_end, now))
        .with_for_update(skip_locked=True)
    )
    with engine.begin() as connection:
        connection.execute(
            sa.update(ledger)
            .where(ledger.c.conversion_key.in_(candidates))
            .values(
                state="sending",
                claimed_by=run_id,
                request_id=claim_id,
                lease_until=now + lease,
                sent_at=sa.func.coalesce(ledger.c.sent_at, now),
                sends=ledger.c.sends + 1,
            ),
            {"keys": keys},
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
        events = []
        for index, row in enumerate(claimed):
            frozen = row.sent_payload or json.dumps(event_for(account, row)).encode()
            events.append(json.loads(frozen))
            connection.execute(
                sa.update(ledger)
                .where(ledger.c.conversion_key == row.conversion_key)
                .values(sent_payload=frozen, record_index=index)
            )
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
