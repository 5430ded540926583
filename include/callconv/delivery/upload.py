"""Deliver the ledger's due conversions to Google Ads, exactly once.

:func:`upload_pending` sends an account's ``pending`` rows, and its ``parked``
rows whose ``park_until`` has come (judged against the run's window end, never
the wall clock), in batches of at most 2,000, with ``partial_failure`` on. Each
batch's outcome is written in one transaction:

* a non-empty result, or ``CALL_CONVERSION_ALREADY_EXISTS`` -> ``uploaded``;
* ``TOO_RECENT_CALL`` / ``TOO_RECENT_CONVERSION_ACTION`` -> ``parked`` for 12 h / 6 h;
* configuration errors (wrong action, wrong customer, credentials) ->
  :class:`UploadConfigError`, the rows stay as they were;
* any other row error -> ``failed`` with its code and a masked message.

Exactly once, by claims and frozen payloads (never by guessing Google's key):

* **Claim before send.** Before a batch leaves, one transaction claims its rows:
  ``state='sending'``, the claiming run, a request id and a lease, and, the
  first time, ``sent_at`` and ``sent_payload`` (the serialized
  ``CallConversion``). Only rows still due are claimed (on PostgreSQL the
  candidates are locked with ``FOR UPDATE SKIP LOCKED``; SQLite has one writer),
  so two runs can never send the same row at once.
* **Frozen once sent.** From ``sent_at`` on, the row's payload is never changed
  (matching leaves it alone, see :mod:`callconv.matching.match`), and every request that
  carries it again is built from ``sent_payload``: the same bytes.
* **Settled after.** The answer is written by a second transaction, only on the
  rows this request claimed. An RPC that fails releases the claim (the row is
  due again, its payload frozen). A process killed mid-request leaves its rows
  ``sending``; once the lease runs out, a later run takes them over and resends
  the identical bytes.
* **Why an identical resend is safe.** Google keys a call conversion on caller
  id, conversion date time and conversion action, and answers a second upload of
  that key with ``CALL_CONVERSION_ALREADY_EXISTS`` ("The imported call has the
  same conversion_date_time as an existing conversion"): nothing is counted
  twice, and the row becomes ``uploaded``. A *changed* payload would be a new
  conversion to Google, which is why a sent payload never changes.

Transient RPC errors are retried with bounded, jittered exponential backoff,
then re-raised for Airflow to retry the task. Quota exhaustion parks what is
left until the next run and returns normally. No phone number is ever logged.

Memory does not grow with the number of due rows: they are read in keyset
pages of ``batch_size`` (ordered by ``conversion_key``) and planned into
batches as they stream (:class:`BatchPlanner`), so at most a page, a bounded
look-ahead of deferred rows and the batches in flight are held at once.

Up to ``max_concurrent_batches`` batches of an account are in flight at once
(default 1). Batches are disjoint sets of conversion keys, each one's outcome is
written by its own transaction, and a batch holding a row whose Google key is
also in a batch still in flight waits for that batch to finish, so Google never
sees two requests with the same conversion at the same time. Quota exhaustion
stops new batches; once the batches in flight are recorded, every due row that
was not sent in this run, read or not yet read, is parked with one UPDATE.
A configuration or request error also stops new batches and is raised once the
batches in flight are recorded.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

import grpc
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from callconv.delivery.ads_client import (
    access_problem,
    decode_partial_failure,
    error_category,
    error_code_name,
    get_upload_service,
    is_empty_result,
    mask_phone_numbers,
)
from callconv.schema import LEDGER_STATES, upload_ledger

log = logging.getLogger(__name__)

MAX_BATCH = 2000
ERROR_MESSAGE_LENGTH = upload_ledger.c.error_message.type.length or 512

# Row errors that mean "try again later", with how long to wait.
PARK_DELAYS: Mapping[str, timedelta] = {
    "TOO_RECENT_CALL": timedelta(hours=12),
    "TOO_RECENT_CONVERSION_ACTION": timedelta(hours=6),
}
ALREADY_DELIVERED = frozenset({"CALL_CONVERSION_ALREADY_EXISTS"})
# Row errors that are our set-up's fault, not the row's: fail the task loudly.
ACTION_CONFIG_ERRORS = frozenset({"NO_CONVERSION_ACTION_FOUND", "INVALID_CONVERSION_ACTION_TYPE"})
CUSTOMER_CONFIG_ERRORS = frozenset(
    {
        "INVALID_CUSTOMER_FOR_CALL",
        "UNAUTHORIZED_CUSTOMER",
        "USER_PERMISSION_DENIED",
        "CUSTOMER_NOT_ENABLED",
        "CUSTOMER_NOT_FOUND",
        "INVALID_CUSTOMER_ID",
        "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS",
    }
)
CONFIG_ROW_ERRORS = ACTION_CONFIG_ERRORS | CUSTOMER_CONFIG_ERRORS
# Our own bug (we deduplicate before sending): leave the row due, resend it.
RESEND_ERRORS = frozenset({"DUPLICATE_CALL_CONVERSION_IN_REQUEST"})
TRANSIENT_STATUS = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL})
AUTH_STATUS = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
QUOTA_CODE = "RESOURCE_EXHAUSTED"

BACKOFF_BASE_SECONDS = 2.0
BACKOFF_CAP_SECONDS = 60.0
# How long a claim holds: longer than a request can take with all its retries
# (5 attempts of at most 300 s, plus backoff), so a live sender never loses its rows.
DEFAULT_LEASE = timedelta(minutes=60)


def wall_clock() -> datetime:
    """Claims and leases are about processes, not business days: they use the real clock."""
    return datetime.now(UTC)


class UploadError(RuntimeError):
    """The upload stopped for a reason that is not a row's data."""


class UploadConfigError(UploadError):
    """Google refused the set-up (action, customer, credentials). The message says what to fix."""

    def __init__(self, message: str, code: str, outcome: UploadOutcome | None = None):
        super().__init__(message)
        self.code = code
        self.outcome = outcome


@dataclass
class UploadOutcome:
    account_id: str
    run_id: str
    dry_run: bool = False
    selected: int = 0
    sent: int = 0
    batches: int = 0
    accepted: int = 0
    already_existed: int = 0
    parked: Counter = field(default_factory=Counter)  # reason -> rows
    retry_after: dict[str, datetime] = field(default_factory=dict)  # reason -> park_until
    failed: Counter = field(default_factory=Counter)  # error code -> rows
    left_for_quota: int = 0
    validated: int = 0  # dry run: rows that passed Google's checks
    unanswered: int = 0  # neither result nor error: left due, resent next run
    resend: int = 0  # RESEND_ERRORS: left due
    same_identity: int = 0  # rows sharing Google's key with another row of the batch being filled, sent later
    max_concurrent_batches: int = 1  # how many batches this run allowed in flight at once
    resent: int = 0  # rows sent again from their frozen bytes (an earlier request may have reached Google)
    claimed_elsewhere: int = 0  # rows read as due that another run claimed first: not sent by this one

    @property
    def uploaded(self) -> int:
        return self.accepted + self.already_existed

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready counts, for run_summary."""
        return {
            "dry_run": self.dry_run,
            "selected": self.selected,
            "sent": self.sent,
            "batches": self.batches,
            "accepted": self.accepted,
            "already_existed": self.already_existed,
            "parked": dict(self.parked),
            "retry_after": {reason: at.isoformat() for reason, at in self.retry_after.items()},
            "failed": dict(self.failed),
            "left_for_quota": self.left_for_quota,
            "validated": self.validated,
            "unanswered": self.unanswered,
            "resend": self.resend,
            "same_identity": self.same_identity,
            "max_concurrent_batches": self.max_concurrent_batches,
            "resent": self.resent,
            "claimed_elsewhere": self.claimed_elsewhere,
        }

    def add(self, other: UploadOutcome) -> None:
        """Add the counts of ``other`` (one batch's) to these."""
        for name in (
            "sent",
            "batches",
            "accepted",
            "already_existed",
            "validated",
            "unanswered",
            "resend",
            "resent",
            "claimed_elsewhere",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.parked.update(other.parked)
        self.failed.update(other.failed)
        for reason, until in other.retry_after.items():
            self.retry_after[reason] = max(until, self.retry_after.get(reason, until))


# ------------------------------------------------------------------ formatting


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def format_ads_time(value: datetime, tz: tzinfo) -> str:
    """``yyyy-mm-dd hh:mm:ss+hh:mm`` in ``tz`` (naive values are taken as UTC)."""
    return _aware(value).astimezone(tz).isoformat(sep=" ", timespec="seconds")


def _identity(row) -> tuple:
    """Google's key for a call conversion: (caller id, conversion instant to the second, action)."""
    instant = _aware(row.conversion_time).astimezone(UTC).replace(microsecond=0)
    return (row.caller_e164, instant, row.conversion_action_id)


class BatchPlanner:
    """Rows ordered by ``conversion_key``, streamed into batches where Google's key is unique.

    Iterating yields ``(rows, identities)`` batches of at most ``batch_size``.
    A row whose (caller, conversion time, action) is already in the batch being
    filled would be ``DUPLICATE_CALL_CONVERSION_IN_REQUEST``: it is deferred and
    goes first into the next batch. At most ``lookahead`` rows wait deferred;
    when that many do, the batch goes out as it is, so memory stays bounded
    whatever the input. A repeated ``conversion_key`` (the same ledger row
    twice in a row) is dropped. The plan depends only on the rows, never on
    timing. ``read`` counts the rows taken in, ``moved`` the rows deferred.
    """

    def __init__(self, rows: Iterable, batch_size: int = MAX_BATCH, lookahead: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self._rows = iter(rows)
        self.batch_size = batch_size
        self.lookahead = max(1, lookahead if lookahead is not None else batch_size)
        self._deferred: deque = deque()
        self._last_key: str | None = None
        self._exhausted = False
        self.read = 0
        self.moved = 0

    @property
    def deferred(self) -> int:
        return len(self._deferred)

    def _next_row(self):
        for row in self._rows:
            if row.conversion_key == self._last_key:
                continue
            self._last_key = row.conversion_key
            self.read += 1
            return row
        self._exhausted = True
        return None

    def __iter__(self) -> Iterator[tuple[list, list[tuple]]]:
        while True:
            batch: list = []
            identities: dict[tuple, None] = {}
            waiting: deque = deque()
            while self._deferred and len(batch) < self.batch_size:
                row = self._deferred.popleft()
                identity = _identity(row)
                if identity in identities:
                    waiting.append(row)
                else:
                    identities[identity] = None
                    batch.append(row)
            waiting.extend(self._deferred)
            self._deferred = waiting
            while len(batch) < self.batch_size and len(self._deferred) < self.lookahead and not self._exhausted:
                row = self._next_row()
                if row is None:
                    break
                identity = _identity(row)
                if identity in identities:
                    self._deferred.append(row)
                    self.moved += 1
                else:
                    identities[identity] = None
                    batch.append(row)
            if not batch:  # nothing deferred (one always fits an empty batch) and nothing left to read
                return
            yield batch, list(identities)


def plan_batches(rows: Sequence, batch_size: int = MAX_BATCH) -> tuple[list[list], int]:
    """All of :class:`BatchPlanner`'s batches for an in-memory list (deduplicated by conversion_key).

    A second row with the same (caller, conversion time, action) as another
    goes to a later batch (it would be ``DUPLICATE_CALL_CONVERSION_IN_REQUEST``
    in the same one). Returns ``(batches, rows moved to a later batch)``.
    """
    seen: set[str] = set()
    unique = []
    for row in rows:
        if row.conversion_key not in seen:
            seen.add(row.conversion_key)
            unique.append(row)
    planner = BatchPlanner(unique, batch_size)
    batches = [batch for batch, _ in planner]
    return batches, planner.moved


def _conversion_bytes(client, account, row) -> bytes:
    """One ``CallConversion`` as it goes on the wire, serialized.

    Filled through the raw protobuf message under the proto-plus wrapper: the
    same bytes on the wire, at a tenth of the CPU per row (proto-plus converts
    on every field set, which dominated the upload's client-side time).
    """
    consent_status = client.enums.ConsentStatusEnum
    conversion = type(client.get_type("CallConversion")).pb()()
    conversion.caller_id = row.caller_e164 or ""
    conversion.call_start_date_time = format_ads_time(row.call_start, account.tz)
    conversion.conversion_date_time = format_ads_time(row.conversion_time, account.tz)
    conversion.conversion_action = account.action_resource(row.conversion_action_id)
    if row.conversion_value is not None:
        conversion.conversion_value = float(row.conversion_value)
        conversion.currency_code = row.currency_code or account.default_currency
    conversion.consent.ad_user_data = getattr(consent_status, account.consent.ad_user_data)
    conversion.consent.ad_personalization = getattr(consent_status, account.consent.ad_personalization)
    return conversion.SerializeToString(deterministic=True)


def _payload(client, account, row) -> bytes:
    """The bytes to send for ``row``: those first sent, if it ever was; else built now."""
    frozen = getattr(row, "sent_payload", None)
    return bytes(frozen) if frozen is not None else _conversion_bytes(client, account, row)


def _build_request(client, account, payloads: Sequence[bytes], dry_run: bool):
    """The ``UploadCallConversionsRequest`` carrying these serialized conversions, in order."""
    request_type = type(client.get_type("UploadCallConversionsRequest"))
    raw = request_type.pb()(customer_id=account.customer_id, partial_failure=True, validate_only=dry_run)
    for payload in payloads:
        raw.conversions.add().MergeFromString(payload)
    return request_type.wrap(raw)


# --------------------------------------------------------------------- errors


def status_code(exc: BaseException) -> grpc.StatusCode | None:
    """The gRPC status of an RPC failure, however the client wrapped it."""
    from google.ads.googleads.errors import GoogleAdsException

    if isinstance(exc, GoogleAdsException):
        return exc.error.code()
    code = getattr(exc, "grpc_status_code", None)  # google.api_core exceptions
    if code is not None:
        return code
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        return exc.code()
    return None


def _failure_errors(exc: BaseException) -> list:
    failure = getattr(exc, "failure", None)
    return list(failure.errors) if failure is not None else []


def _is_quota(exc: BaseException) -> bool:
    if status_code(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return True
    return any(error_category(error) == "quota_error" for error in _failure_errors(exc))


def _customer_text(account) -> str:
    return f"{account.customer_id[:3]}-{account.customer_id[3:6]}-{account.customer_id[6:]}"


def _customer_problem(account, code: str) -> str:
    login = (
        f" and that the manager account in accounts[{account.id}].login_customer_id "
        f"({account.login_customer_id}) manages it"
        if account.login_customer_id
        else f"; if access goes through a manager account, set accounts[{account.id}].login_customer_id"
    )
    return (
        f"Google Ads refused customer {_customer_text(account)} for account '{account.id}' ({code}): "
        f"check that accounts[{account.id}].customer_id is the conversion customer that received the "
        f"forwarded calls{login}"
    )


def _action_problem(account, code: str, action_ids: set[str]) -> str:
    names = {action.id: action.name for action in account.conversion_actions.values()}
    listed = ", ".join(f"{aid} ({names.get(aid, 'not in config')})" for aid in sorted(action_ids))
    if code == "INVALID_CONVERSION_ACTION_TYPE":
        fix = "use conversion actions of type UPLOAD_CALLS (imported call conversions)"
    else:
        fix = "check the action ids and that the actions are ENABLED in Google Ads"
    return (
        f"Google Ads rejected conversion action(s) {listed} of account '{account.id}' in customer "
        f"{_customer_text(account)} ({code}): {fix}, then fix accounts[{account.id}].conversion_actions"
    )


def _auth_problem(account, code: str) -> str:
    return (
        f"Google Ads rejected the credentials for account '{account.id}' ({code}): check the OAuth "
        "credentials (or service account) of the Google Ads Airflow connection; since 2026-09-09 no "
        "developer token is needed"
    )


def _request_level_error(exc: BaseException, account) -> UploadError | None:
    """An UploadConfigError / UploadError for a non-transient, non-quota RPC failure."""
    code = status_code(exc)
    errors = _failure_errors(exc)
    request_id = getattr(exc, "request_id", None)
    suffix = f" (Google Ads request id {request_id})" if request_id else ""
    for error in errors:
        name, category = error_code_name(error), error_category(error)
        access = access_problem(name, account)
        if access:
            return UploadConfigError(access + suffix, name)
        if name in CUSTOMER_CONFIG_ERRORS:
            return UploadConfigError(_customer_problem(account, name) + suffix, name)
        if name in ACTION_CONFIG_ERRORS:
            ids = set(account_action_ids(account))
            return UploadConfigError(_action_problem(account, name, ids) + suffix, name)
        if category in ("authentication_error", "authorization_error"):
            return UploadConfigError(_auth_problem(account, name) + suffix, name)
    if code in AUTH_STATUS and not errors:
        name = code.name
        return UploadConfigError(_auth_problem(account, name) + suffix, name)
    if errors:
        first = errors[0]
        return UploadError(
            f"Google Ads rejected the upload request of account '{account.id}': "
            f"{error_code_name(first)}: {mask_phone_numbers(first.message)}{suffix}"
        )
    return None


def account_action_ids(account) -> list[str]:
    return [action.id for action in account.conversion_actions.values()]


def _send(service, request, *, account_id: str, max_retries: int, sleep: Callable, timeout: float | None):
    attempt = 0
    while True:
        try:
            return service.upload_call_conversions(request=request, timeout=timeout)
        except Exception as exc:
            code = status_code(exc)
            if code not in TRANSIENT_STATUS or attempt >= max_retries:
                raise
            ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**attempt)
            delay = ceiling / 2 + random.uniform(0, ceiling / 2)
            attempt += 1
            log.warning(
                "account %s: Google Ads answered %s; retry %d of %d in %.1f s",
                account_id,
                code.name,
                attempt,
                max_retries,
                delay,
            )
            sleep(delay)


# ---------------------------------------------------------------------- ledger


def _due(account_id: str, window_end: datetime, now: datetime | None = None):
    """The ledger rows of ``account_id`` that are due: pending, or parked until no later than ``window_end``.

    With ``now``, also the rows whose claim's lease ran out before it: their sender died
    mid-request, and they are resent from their frozen bytes.
    """
    ledger = upload_ledger
    due = [
        ledger.c.state == "pending",
        sa.and_(
            ledger.c.state == "parked",
            sa.or_(ledger.c.park_until.is_(None), ledger.c.park_until <= window_end),
        ),
    ]
    if now is not None:
        due.append(sa.and_(ledger.c.state == "sending", ledger.c.lease_until < now))
    return sa.and_(ledger.c.account_id == account_id, sa.or_(*due))


def due_rows_paged(
    engine, account_id: str, window_end: datetime, page_size: int = MAX_BATCH, now: datetime | None = None
) -> Iterator:
    """The due rows in ``conversion_key`` order, read ``page_size`` at a time (keyset pagination).

    Each page is one short query on its own connection, so no transaction or
    cursor stays open while batches are sent, and at most one page is held.
    Rows already passed are never read again, whatever this run writes to them.
    """
    ledger = upload_ledger
    after: str | None = None
    while True:
        query = sa.select(ledger).where(_due(account_id, window_end, now)).order_by(ledger.c.conversion_key)
        if after is not None:
            query = query.where(ledger.c.conversion_key > after)
        with engine.connect() as connection:
            page = connection.execute(query.limit(page_size)).all()
        if not page:
            return
        after = page[-1].conversion_key
        yield from page
        if len(page) < page_size:
            return
        del page


def _count_due(engine, account_id: str, window_end: datetime) -> int:
    query = sa.select(sa.func.count()).select_from(upload_ledger).where(_due(account_id, window_end))
    with engine.connect() as connection:
        return connection.execute(query).scalar_one()


# Keys per UPDATE ... WHERE conversion_key IN (...): well under every driver's parameter limit.
WRITE_CHUNK = 500


def _change(row, state: str, *, attempt: int = 1, park_until=None, code=None, message=None, delivered_at=None):
    return {
        "b_key": row.conversion_key,
        "b_state": state,
        "b_attempt": attempt,
        "b_park_until": park_until,
        "b_error_code": code,
        "b_error_message": message[:ERROR_MESSAGE_LENGTH] if message else None,
        "b_delivered_at": delivered_at,
        "b_delivered_by": "api" if delivered_at is not None else None,
    }


def _write(engine, changes: list[dict], request_id: str) -> None:
    """Settle one batch's rows in one transaction, and release their claim.

    Rows with the same new values (usually all the uploaded ones) share one
    ``UPDATE ... WHERE conversion_key IN (...)``, so a batch costs a few
    statements, not one round trip per row. Only rows this request claimed
    (``state='sending'`` under ``request_id``) change: a row another run took
    over after a lapsed lease is that run's to settle.
    """
    if not changes:
        return
    groups: dict[tuple, list[str]] = {}
    for change in changes:
        values = tuple(value for name, value in change.items() if name != "b_key")
        groups.setdefault(values, []).append(change["b_key"])
    names = [name for name in changes[0] if name != "b_key"]
    ledger = upload_ledger
    with engine.begin() as connection:
        for values, keys in groups.items():
            new = dict(zip(names, values, strict=True))
            statement = (
                sa.update(ledger)
                .where(ledger.c.state == "sending", ledger.c.request_id == request_id)
                .values(
                    state=new["b_state"],
                    attempts=ledger.c.attempts + new["b_attempt"],
                    park_until=new["b_park_until"],
                    error_code=new["b_error_code"],
                    error_message=new["b_error_message"],
                    delivered_at=new["b_delivered_at"],
                    delivered_by=new["b_delivered_by"],
                    claimed_by=None,
                    lease_until=None,
                )
            )
            statement = statement.where(ledger.c.conversion_key.in_(_KEYS))
            for start in range(0, len(keys), WRITE_CHUNK):
                connection.execute(statement, {"keys": keys[start : start + WRITE_CHUNK]})


# Keys go in as an expanding parameter given at execution, never inside the statement:
# SQLAlchemy constructs hold reference cycles, and a list baked into one would keep a
# whole batch's keys alive until a full garbage collection, rare in a worker with a large heap.
_KEYS = sa.bindparam("keys", expanding=True)


def mark_sending(connection, account_id: str, keys: Sequence[str], *, due_by, now, run_id, claim_id, lease) -> None:
    """Claim those of ``keys`` that are still due: state ``sending``, ``claim_id`` in ``request_id``, a lease.

    The one claim both API paths make (the Data Manager path imports it). ``FOR UPDATE SKIP
    LOCKED`` leaves a row another run holds to that run; a row sent before keeps its
    ``sent_at``, and every claim counts in ``sends``. Run it in the transaction that
    commits before the send.
    """
    ledger = upload_ledger
    candidates = (
        sa.select(ledger.c.conversion_key)
        .where(ledger.c.conversion_key.in_(_KEYS), _due(account_id, due_by, now))
        .with_for_update(skip_locked=True)
    )
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
        {"keys": list(keys)},
    )


def _claim(engine, client, account, rows: Sequence, *, due_by, run_id, request_id, now, lease) -> list:
    """Claim the rows of a batch that are still due, in one transaction that commits before the send.

    Returns the claimed rows, as stored once claimed, in the batch's order. A row
    another run claimed (or settled) since it was read is left out. A row sent
    for the first time gets ``sent_at`` and its serialized payload, frozen from
    here on; a row sent before keeps both.
    """
    ledger = upload_ledger
    keys = [row.conversion_key for row in rows]
    with engine.begin() as connection:
        mark_sending(
            connection, account.id, keys, due_by=due_by, now=now, run_id=run_id, claim_id=request_id, lease=lease
        )
        claimed = {
            row.conversion_key: row
            for row in connection.execute(
                # By key first: the primary key finds the batch; request_id is not indexed.
                sa.select(ledger).where(ledger.c.conversion_key.in_(_KEYS), ledger.c.request_id == request_id),
                {"keys": keys},
            )
        }
        fresh = [
            {"b_key": key, "b_payload": _conversion_bytes(client, account, row)}
            for key, row in claimed.items()
            if row.sent_payload is None
        ]
        if fresh:
            _store_payloads(connection, fresh)
            claimed.update(
                {
                    row.conversion_key: row
                    for row in connection.execute(
                        sa.select(ledger).where(ledger.c.conversion_key.in_(_KEYS)),
                        {"keys": [item["b_key"] for item in fresh]},
                    )
                }
            )
    return [claimed[key] for key in keys if key in claimed]


def _store_payloads(connection, payloads: list[dict]) -> None:
    """Write each row's first-sent bytes (``b_key``, ``b_payload``).

    On PostgreSQL one ``UPDATE ... FROM unnest(keys, payloads)`` per chunk: psycopg2 runs an
    executemany as a round trip per row. SQLite's executemany stays in process.
    """
    ledger = upload_ledger
    if connection.dialect.name != "postgresql":
        connection.execute(
            sa.update(ledger)
            .where(ledger.c.conversion_key == sa.bindparam("b_key"))
            .values(sent_payload=sa.bindparam("b_payload")),
            payloads,
        )
        return
    for start in range(0, len(payloads), WRITE_CHUNK):
        part = payloads[start : start + WRITE_CHUNK]
        connection.execute(
            _STORE_PAYLOADS_PG,
            {"keys": [item["b_key"] for item in part], "payloads": [item["b_payload"] for item in part]},
        )


# Two arrays, not a ``sa.values()`` construct: that construct holds its rows in reference
# cycles, so each batch's bytes waited for a full garbage collection, which a long-lived
# worker with a large heap runs rarely (60k rows peaked at 19.9 MiB against 11.7 for 10k).
_STORE_PAYLOADS_PG = sa.text(
    "UPDATE upload_ledger AS ledger SET sent_payload = frozen.payload"
    " FROM unnest(:keys, :payloads) AS frozen(conversion_key, payload)"
    " WHERE ledger.conversion_key = frozen.conversion_key"
).bindparams(
    sa.bindparam("keys", type_=postgresql.ARRAY(sa.String)),
    sa.bindparam("payloads", type_=postgresql.ARRAY(sa.LargeBinary)),
)


def _release(engine, account_id: str, request_id: str) -> None:
    """Give back a claim whose request failed: the rows are due again, their payload still frozen."""
    ledger = upload_ledger
    with engine.begin() as connection:
        connection.execute(
            sa.update(ledger)
            .where(ledger.c.account_id == account_id, ledger.c.state == "sending", ledger.c.request_id == request_id)
            .values(state="pending", claimed_by=None, lease_until=None)
        )


def _judge_batch(batch, response, row_errors, window_end, outcome: UploadOutcome, dry_run: bool):
    """Ledger changes for one answered batch, and the config errors found: code -> action ids."""
    changes: list[dict] = []
    config: dict[str, set[str]] = {}
    results = list(response.results)
    for index, row in enumerate(batch):
        error = row_errors.get(index)
        if error is not None:
            code, raw_message = error
            message = mask_phone_numbers(raw_message, known=[row.caller_e164])
            if code in ALREADY_DELIVERED:
                outcome.already_existed += 1
                changes.append(_change(row, "uploaded", delivered_at=window_end))
            elif code in PARK_DELAYS:
                until = window_end + PARK_DELAYS[code]
                outcome.parked[code] += 1
                outcome.retry_after[code] = until
                changes.append(_change(row, "parked", park_until=until, code=code, message=message))
            elif code in CONFIG_ROW_ERRORS:
                config.setdefault(code, set()).add(row.conversion_action_id)
                changes.append(_change(row, row.state, park_until=row.park_until, code=code, message=message))
            elif code in RESEND_ERRORS:
                outcome.resend += 1
                changes.append(_change(row, row.state, park_until=row.park_until, code=code, message=message))
            else:
                outcome.failed[code] += 1
                changes.append(_change(row, "failed", code=code, message=message))
        elif dry_run:
            outcome.validated += 1
        elif index < len(results) and not is_empty_result(results[index]):
            outcome.accepted += 1
            changes.append(_change(row, "uploaded", delivered_at=window_end))
        else:
            outcome.unanswered += 1
            changes.append(_change(row, row.state, park_until=row.park_until))
    return changes, config


QUOTA_MESSAGE = "Google Ads quota exhausted; retried in the next run"


def _park_unsent_for_quota(engine, account_id: str, window_end: datetime, sent_but_due: Iterable[str]) -> int:
    """Park every due row not sent in this run until ``window_end``; returns how many.

    Called once no batch is in flight: rows of answered batches are no longer
    due, except those left as they were (``sent_but_due``: unanswered or to be
    resent), which keep their state. Rows never read are parked as well.
    """
    ledger = upload_ledger
    statement = (
        sa.update(ledger)
        .where(_due(account_id, window_end))
        .values(
            state="parked",
            park_until=window_end,
            error_code=QUOTA_CODE,
            error_message=QUOTA_MESSAGE,
            delivered_at=None,
            delivered_by=None,
        )
    )
    keep = sorted(set(sent_but_due))
    if keep:
        statement = statement.where(ledger.c.conversion_key.not_in(keep))
    with engine.begin() as connection:
        return connection.execute(statement).rowcount


# -------------------------------------------------------------------- batches


@dataclass
class _BatchResult:
    """What one answered (or quota-refused) batch did; merged by the coordinating thread."""

    outcome: UploadOutcome
    config: dict[str, set[str]] = field(default_factory=dict)  # config row error code -> action ids
    sent_but_due: list[str] = field(default_factory=list)  # keys sent but left due (resend, unanswered)
    quota: bool = False


@dataclass
class _Batch:
    number: int
    rows: list
    identities: list[tuple]


def _run_batch(
    batch: _Batch, *, engine, client, service, account, window_end, due_by, run_id, dry_run, send, clock, lease
) -> _BatchResult:
    """Claim one batch's rows, send them, and settle the answer. Runs in a worker thread.

    Touches nothing shared: it counts into its own :class:`UploadOutcome`.
    Quota exhaustion is returned, not raised (the claimed rows are parked); any
    other failure releases the claim and is raised. A dry run claims nothing.
    """
    delta = UploadOutcome(account_id=account.id, run_id=run_id, dry_run=dry_run)
    if dry_run:
        rows, request_id = batch.rows, None
    else:
        request_id = uuid.uuid4().hex
        rows = _claim(
            engine,
            client,
            account,
            batch.rows,
            due_by=due_by,
            run_id=run_id,
            request_id=request_id,
            now=clock(),
            lease=lease,
        )
        delta.claimed_elsewhere = len(batch.rows) - len(rows)
        if not rows:
            return _BatchResult(delta)
        delta.resent = sum(1 for row in rows if row.sends > 1)
    request = _build_request(client, account, [_payload(client, account, row) for row in rows], dry_run)
    try:
        response = send(service, request)
    except Exception as exc:
        if _is_quota(exc):
            if request_id is not None:
                parked = [_change(row, "parked", attempt=0, park_until=window_end, code=QUOTA_CODE) for row in rows]
                for change in parked:
                    change["b_error_message"] = QUOTA_MESSAGE
                _write(engine, parked, request_id)
            return _BatchResult(delta, quota=True)
        if request_id is not None:
            _release(engine, account.id, request_id)
        raise
    del request
    delta.sent, delta.batches = len(rows), 1
    row_errors = decode_partial_failure(client, response)
    if -1 in row_errors:
        log.warning("account %s: Google Ads reported an error that names no row", account.id)
    before = {row.conversion_key: row.state for row in batch.rows}
    changes, config = _judge_batch(rows, response, row_errors, window_end, delta, dry_run)
    if dry_run:
        return _BatchResult(delta, config)
    for change in changes:
        if change["b_state"] == "sending":  # left as it was before the claim: due again
            earlier = before.get(change["b_key"], "pending")
            change["b_state"] = earlier if earlier != "sending" else "pending"
    _write(engine, changes, request_id)
    sent_but_due = [
        change["b_key"]
        for change in changes
        if change["b_state"] in ("pending", "parked") and change["b_error_code"] not in PARK_DELAYS
    ]
    return _BatchResult(delta, config, sent_but_due)


class _Run:
    """The coordinating thread's view of one upload: batches in flight, and why it stopped."""

    def __init__(self, outcome: UploadOutcome):
        self.outcome = outcome
        self.in_flight: dict[Future, _Batch] = {}
        self.busy: dict[tuple, Future] = {}  # Google key -> the in-flight batch holding it
        self.errors: list[tuple[int, BaseException]] = []
        self.config: dict[str, set[str]] = {}
        self.quota = False
        self.sent_but_due: list[str] = []

    @property
    def stopped(self) -> bool:
        return bool(self.errors or self.config or self.quota)

    def launch(self, pool: ThreadPoolExecutor, batch: _Batch, work: Callable[[_Batch], _BatchResult]) -> None:
        future = pool.submit(work, batch)
        self.in_flight[future] = batch
        for identity in batch.identities:
            self.busy[identity] = future

    def _collect(self, future: Future) -> None:
        batch = self.in_flight.pop(future)
        for identity in batch.identities:
            if self.busy.get(identity) is future:
                del self.busy[identity]
        error = future.exception()
        if error is not None:
            self.errors.append((batch.number, error))
            return
        result = future.result()
        self.outcome.add(result.outcome)
        self.sent_but_due.extend(result.sent_but_due)
        self.quota = self.quota or result.quota
        for code, actions in result.config.items():
            self.config.setdefault(code, set()).update(actions)

    def collect_done(self) -> None:
        for future in [future for future in self.in_flight if future.done()]:
            self._collect(future)

    def wait_one(self) -> None:
        done, _ = wait(list(self.in_flight), return_when=FIRST_COMPLETED)
        for future in done:
            self._collect(future)

    def wait_for_slot(self, batch: _Batch, limit: int) -> None:
        """Until fewer than ``limit`` batches are in flight and none holds a Google key of ``batch``."""
        self.collect_done()
        while self.in_flight and not self.stopped:
            if len(self.in_flight) < limit and not any(identity in self.busy for identity in batch.identities):
                return
            self.wait_one()

    def drain(self) -> None:
        while self.in_flight:
            self.wait_one()


# ------------------------------------------------------------------------ API


def upload_pending(
    engine,
    account,
    client,
    window_end: datetime,
    run_id: str,
    *,
    batch_size: int = MAX_BATCH,
    dry_run: bool = False,
    max_transient_retries: int = 4,
    sleep: Callable[[float], None] = time.sleep,
    timeout: float | None = 300.0,
    max_concurrent_batches: int = 1,
    clock: Callable[[], datetime] = wall_clock,
    lease: timedelta = DEFAULT_LEASE,
    parked_wait: timedelta = timedelta(0),
) -> UploadOutcome:
    """Upload ``account``'s due ledger rows through ``client``; see the module doc.

    ``window_end`` is the run's data-interval end (aware): it decides which
    parked rows are due and stamps ``delivered_at`` / ``park_until``.
    ``dry_run`` sends ``validate_only`` requests and records nothing.
    ``max_concurrent_batches`` bounds the batches in flight at once (1: one
    after the other); each in-flight batch holds at most ``batch_size`` rows.
    ``clock`` and ``lease`` time the claims: a row claimed by a run that died
    is taken over once its lease has run out by ``clock``. ``parked_wait`` lets
    this run also take parked rows due by ``window_end + parked_wait``, so a
    rerun of a day, or the last day of a backfill, retries what the day parked
    (still judged by the run's window, never the wall clock).
    """
    if window_end.tzinfo is None:
        raise ValueError("window_end must be timezone-aware")
    if not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch_size must be between 1 and {MAX_BATCH}, got {batch_size}")
    if isinstance(max_concurrent_batches, bool) or not (
        isinstance(max_concurrent_batches, int) and max_concurrent_batches >= 1
    ):
        raise ValueError(f"max_concurrent_batches must be an integer of at least 1, got {max_concurrent_batches!r}")
    window_end = window_end.astimezone(UTC)
    outcome = UploadOutcome(
        account_id=account.id, run_id=run_id, dry_run=dry_run, max_concurrent_batches=max_concurrent_batches
    )
    service = get_upload_service(client, account.login_customer_id)

    def send(service_, request):
        return _send(
            service_, request, account_id=account.id, max_retries=max_transient_retries, sleep=sleep, timeout=timeout
        )

    def work(batch: _Batch) -> _BatchResult:
        return _run_batch(
            batch,
            engine=engine,
            client=client,
            service=service,
            account=account,
            window_end=window_end,
            due_by=window_end + parked_wait,
            run_id=run_id,
            dry_run=dry_run,
            send=send,
            clock=clock,
            lease=lease,
        )

    # Claims lapsed before this run started are taken over (never in a dry run: it claims nothing).
    lapsed_before = None if dry_run else clock()
    due_by = window_end + parked_wait
    planner = BatchPlanner(due_rows_paged(engine, account.id, due_by, batch_size, lapsed_before), batch_size)
    state = _Run(outcome)
    log.info(
        "account %s run %s%s: uploading due conversions in batches of up to %d, %d batch(es) in flight at most",
        account.id,
        run_id,
        " (dry run)" if dry_run else "",
        batch_size,
        max_concurrent_batches,
    )
    with ThreadPoolExecutor(max_workers=max_concurrent_batches, thread_name_prefix=f"upload-{account.id}") as pool:
        try:
            for number, (rows, identities) in enumerate(planner):
                batch = _Batch(number, rows, identities)
                state.wait_for_slot(batch, max_concurrent_batches)
                if state.stopped:
                    break
                state.launch(pool, batch, work)
                del batch, rows, identities
        finally:
            # Whatever happens here, every batch already sent is answered and recorded.
            state.drain()
    outcome.selected = planner.read
    outcome.same_identity = planner.moved
    if outcome.same_identity:
        log.warning(
            "account %s: %d conversions share caller, conversion time and action with another; sent in later batches",
            account.id,
            outcome.same_identity,
        )

    if state.errors:
        _log_outcome(outcome)
        _, exc = min(state.errors, key=lambda item: item[0])
        problem = _request_level_error(exc, account)
        if problem is None:
            raise exc
        if isinstance(problem, UploadConfigError):
            problem.outcome = outcome
        log.error("account %s run %s: %s", account.id, run_id, problem)
        raise problem from None
    if state.config:
        code = sorted(state.config)[0]
        if code in ACTION_CONFIG_ERRORS:
            message = _action_problem(account, code, state.config[code])
        else:
            message = _customer_problem(account, code)
        log.error("account %s run %s: %s", account.id, run_id, message)
        _log_outcome(outcome)
        raise UploadConfigError(message, code, outcome)
    if state.quota:
        if dry_run:
            outcome.left_for_quota = max(0, _count_due(engine, account.id, window_end) - outcome.sent)
        else:
            outcome.left_for_quota = _park_unsent_for_quota(engine, account.id, window_end, state.sent_but_due)
        # Rows never read were due too.
        outcome.selected = max(outcome.selected, outcome.sent + outcome.left_for_quota)
        log.warning(
            "account %s run %s: Google Ads quota exhausted; %d conversions parked for the next run",
            account.id,
            run_id,
            outcome.left_for_quota,
        )
    if not outcome.selected:
        log.info("account %s run %s: nothing due for upload", account.id, run_id)
        return outcome
    _log_outcome(outcome)
    return outcome


def _log_outcome(outcome: UploadOutcome) -> None:
    log.info(
        "account %s run %s%s: %d due, %d sent in %d batches (up to %d at once), %d accepted, %d already existed, "
        "%d parked, %d failed, %d left for quota",
        outcome.account_id,
        outcome.run_id,
        " (dry run)" if outcome.dry_run else "",
        outcome.selected,
        outcome.sent,
        outcome.batches,
        outcome.max_concurrent_batches,
        outcome.accepted,
        outcome.already_existed,
        sum(outcome.parked.values()),
        sum(outcome.failed.values()),
        outcome.left_for_quota,
    )
    if outcome.parked:
        log.info(
            "account %s: parked by reason: %s",
            outcome.account_id,
            ", ".join(f"{code}={count}" for code, count in sorted(outcome.parked.items())),
        )
    if outcome.failed:
        log.warning(
            "account %s: failed permanently by code: %s",
            outcome.account_id,
            ", ".join(f"{code}={count}" for code, count in sorted(outcome.failed.items())),
        )


def ledger_counts(engine, account_id: str) -> dict[str, int]:
    """Rows per ledger state for an account, every known state included."""
    query = (
        sa.select(upload_ledger.c.state, sa.func.count())
        .where(upload_ledger.c.account_id == account_id)
        .group_by(upload_ledger.c.state)
    )
    counts = dict.fromkeys(LEDGER_STATES, 0)
    with engine.connect() as connection:
        counts.update({state: count for state, count in connection.execute(query)})
    return counts
