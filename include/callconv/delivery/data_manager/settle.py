"""Settle Data Manager requests from ``requestStatus:retrieve``.

An accepted ingest says nothing about its events; Google reports, between 30 minutes and
24 hours later, a status per destination with per-reason record indices. Rows of a
request still ``PROCESSING`` stay as they are and are checked again on the next run;
otherwise each row is delivered, or failed with its reason, or parked when the reason is
one Google asks to retry later (``TOO_RECENT_CALL``). Record indices map to rows through
``upload_ledger.record_index``, stored with the frozen body at the claim.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import sqlalchemy as sa

from callconv.schema import data_manager_requests, upload_ledger

log = logging.getLogger(__name__)

_KEYS = sa.bindparam("keys", expanding=True)

PREFIX = "PROCESSING_ERROR_REASON_"
RETRY_LATER = frozenset({"TOO_RECENT_CALL"})


def settle_requests(engine, account, service, *, now: datetime, park_for: timedelta = timedelta(hours=12)) -> dict:
    """Ask for the status of every request in ``processing``; returns counts by outcome."""
    counts = {"delivered": 0, "failed": 0, "parked": 0, "still_processing": 0}
    with engine.connect() as connection:
        pending = connection.execute(
            sa.select(data_manager_requests.c.claim_id, data_manager_requests.c.google_request_id).where(
                data_manager_requests.c.account_id == account.id, data_manager_requests.c.state == "processing"
            )
        ).all()
    ledger = upload_ledger
    for claim_id, google_id in pending:
        answer = service.requestStatus().retrieve(requestId=google_id).execute()
        per = (answer.get("requestStatusPerDestination") or [{}])[0]
        status = per.get("requestStatus", "REQUEST_STATUS_UNKNOWN")
        if status in ("PROCESSING", "REQUEST_STATUS_UNKNOWN"):
            counts["still_processing"] += 1
            continue
        reasons: dict[int, str] = {}
        for error in (per.get("errorInfo") or {}).get("errorCounts", []):
            reason = str(error.get("reason", "")).removeprefix(PREFIX) or "UNSPECIFIED"
            for index in error.get("recordIndices", []):
                reasons[int(index)] = reason
        with engine.begin() as connection:
            rows = connection.execute(
                sa.select(ledger.c.conversion_key, ledger.c.record_index)
                .where(ledger.c.request_id == claim_id, ledger.c.state == "processing")
                .with_for_update()
            ).all()
            failed_all = status == "FAILED" and not reasons
            # One UPDATE per outcome, not per row: a request holds up to 2,000 events.
            outcomes: dict[tuple[str, str | None], list[str]] = {}
            for key, index in rows:
                reason = reasons.get(index)
                if reason is None and not failed_all:
                    outcome = ("delivered", None)
                elif reason in RETRY_LATER:
                    outcome = ("parked", reason)
                else:
                    outcome = ("failed", (reason or "FAILED")[:64])
                outcomes.setdefault(outcome, []).append(key)
            for (state, code), keys in outcomes.items():
                if state == "delivered":
                    values = {"state": "delivered", "delivered_at": now, "delivered_by": "dm"}
                elif state == "parked":
                    values = {"state": "parked", "park_until": now + park_for, "error_code": code}
                else:
                    values = {
                        "state": "failed",
                        "error_code": code,
                        "error_message": "reported by requestStatus:retrieve",
                    }
                connection.execute(
                    sa.update(ledger).where(ledger.c.conversion_key.in_(_KEYS)).values(**values), {"keys": keys}
                )
                counts[state] += len(keys)
            connection.execute(
                sa.update(data_manager_requests)
                .where(data_manager_requests.c.claim_id == claim_id)
                .values(
                    state={"SUCCESS": "success", "FAILED": "failure"}.get(status, "partial"),
                    settled_at=now,
                    status_detail=status,
                )
            )
    log.info("Data Manager settle for %s: %s", account.id, counts)
    return counts
