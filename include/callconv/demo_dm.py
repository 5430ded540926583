"""The Data Manager half of ``make demo`` and ``make ui-demo``: its sandbox, its connection, what it says of a run.

Why apart from :mod:`callconv.demo`: an account with ``delivery: data_manager`` ends its run with
its rows in ``processing``; Google reports a request's outcome between 30 minutes and 24 hours
later, and the import DAG settles it on a later run. The demo shows that honestly: it asks
``requestStatus`` once after the run (the sandbox, like Google, is still processing), then runs
the settle step a later run would start with (by then the sandbox has finished), so a newcomer
sees both the wait and the outcome without waiting for another day.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

import sqlalchemy as sa

from callconv.config import Account, Settings
from callconv.delivery.data_manager.hashing import is_hashed_phone
from callconv.schema import data_manager_requests, upload_ledger

log = logging.getLogger(__name__)


@dataclass
class DmSandbox:
    """The running Data Manager sandbox and where it listens."""

    box: object  # callconv.sandbox.data_manager.DataManagerSandbox
    endpoint: str
    resumed: int  # requests an earlier demo run left processing, known to this sandbox again

    def connection(self) -> str:
        """The Airflow Google connection (``AIRFLOW_CONN_...``) that reaches the sandbox."""
        extra = {"access_token": self.box.token, "ca_certs": str(self.box.cert_path), "api_endpoint": self.endpoint}
        return json.dumps({"conn_type": "google_cloud_platform", "extra": extra})

    def service(self):
        """The real google-api-python-client service, as the DAG's task builds it from the connection."""
        from callconv.delivery.data_manager.client import build_service, token_credentials

        return build_service(token_credentials(self.box.token), self.endpoint, str(self.box.cert_path))

    def events_received(self, account: Account) -> int:
        """The events of the account's ingest requests (validateOnly ones carry none) since it started."""
        return _received(self.box, account)[1]

    def stop(self) -> None:
        self.box.stop()


def start(settings: Settings, engine: sa.Engine, cert_dir) -> DmSandbox:
    """The sandbox, knowing every data_manager account's conversion actions (so a real ingest and a
    ``validateOnly`` one pass) and the requests the warehouse still waits on from an earlier run."""
    from callconv.sandbox.data_manager import DataManagerSandbox, DmAction, RequestRejected

    actions = [
        DmAction(account.customer_id, action.id)
        for account in settings.accounts
        if account.delivery == "data_manager"
        for action in account.conversion_actions.values()
    ]
    # processing_polls=1: the first requestStatus of a request says PROCESSING, the next one the outcome.
    box = DataManagerSandbox(actions, token=secrets.token_hex(16), processing_polls=1, cert_dir=cert_dir)
    resumed = 0
    with engine.connect() as connection:
        waiting = connection.execute(
            sa.select(data_manager_requests.c.google_request_id, data_manager_requests.c.body).where(
                data_manager_requests.c.state == "processing", data_manager_requests.c.google_request_id.is_not(None)
            )
        ).all()
    for google_id, body in waiting:
        try:
            box.resume(google_id, json.loads(body))
            resumed += 1
        except RequestRejected:  # its destination left the config: its settle will say so
            log.warning("a request still processing names a destination the config no longer has")
    return DmSandbox(box, box.start(), resumed)


def _received(box, account: Account) -> tuple[int, int, int, bool]:
    """(requests, events, of which validateOnly requests, every phone identifier hashed) sent to the account."""
    requests = events = validate_only = 0
    hashed = True
    for raw in list(box.received):
        try:
            body = json.loads(raw)
            customer = body["destinations"][0]["operatingAccount"]["accountId"]
        except (ValueError, KeyError, IndexError, TypeError):
            continue
        if customer != account.customer_id:
            continue
        requests += 1
        validate_only += bool(body.get("validateOnly"))
        events += 0 if body.get("validateOnly") else len(body.get("events") or [])
        for event in body.get("events") or []:
            for identifier in (event.get("userData") or {}).get("userIdentifiers") or []:
                hashed = hashed and is_hashed_phone(str(identifier.get("phoneNumber", "")))
    return requests, events, validate_only, hashed


def _ledger(engine: sa.Engine, account: Account, business_date: date) -> dict:
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(upload_ledger.c.state, sa.func.count())
            .where(upload_ledger.c.account_id == account.id, upload_ledger.c.business_date == business_date)
            .group_by(upload_ledger.c.state)
        ).all()
    return dict(sorted(rows))


def after_run(engine: sa.Engine, account: Account, business_date: date, dm: DmSandbox) -> list[str]:
    """Lines for the account's summary: what the sandbox received, what requestStatus says now,
    and the outcome once the settle step of a later run has asked again."""
    from callconv.delivery.data_manager.settle import settle_requests

    requests, events, validate_only, hashed = _received(dm.box, account)
    lines = [
        f"  sandbox received:   {requests - validate_only} ingest request(s) with {events} events"
        + (f", and {validate_only} validateOnly request(s)" if validate_only else "")
        + ("" if not requests else "; every phone number a SHA-256 hash" if hashed else "; NOT all hashed")
    ]
    service = dm.service()
    with engine.connect() as connection:
        waiting = connection.execute(
            sa.select(data_manager_requests.c.google_request_id, data_manager_requests.c.events).where(
                data_manager_requests.c.account_id == account.id, data_manager_requests.c.state == "processing"
            )
        ).all()
    if not waiting:
        lines.append("  requestStatus:      no request waits for its outcome")
        return lines
    statuses: dict[str, list[int]] = {}
    for google_id, count in waiting:
        answer = service.requestStatus().retrieve(requestId=google_id).execute()
        status = (answer.get("requestStatusPerDestination") or [{}])[0].get("requestStatus", "REQUEST_STATUS_UNKNOWN")
        statuses.setdefault(status, []).append(count)
    said = ", ".join(f"{s} for {len(n)} request(s) of {sum(n)} events" for s, n in sorted(statuses.items()))
    lines.append(
        f"  requestStatus now:  {said}; their rows stay in 'processing' until a run settles them "
        "(Google answers within 30 minutes to 24 hours)"
    )
    # The settle step a later run starts with, on that run's clock (the next day's end), asked now:
    # the sandbox has finished processing by its second status check.
    next_end = datetime.combine(business_date + timedelta(days=2), time(0), tzinfo=account.tz).astimezone(UTC)
    settled = settle_requests(engine, account, service, now=next_end)
    lines.append(
        f"  settled as a later run starts (requestStatus asked again; the sandbox has finished): "
        f"delivered {settled['delivered']}, failed {settled['failed']}, parked {settled['parked']}, "
        f"still processing {settled['still_processing']}"
    )
    lines.append(f"  upload ledger now:  {_ledger(engine, account, business_date)}")
    return lines
