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

Exactly once: Google keys a call conversion on (caller id, conversion time,
action). If the process dies after Google accepted a batch but before the
ledger commit, the rows are still pending; the next run resends them, Google
answers ``CALL_CONVERSION_ALREADY_EXISTS`` and they become ``uploaded``.

Transient RPC errors are retried with bounded, jittered exponential backoff,
then re-raised for Airflow to retry the task. Quota exhaustion parks what is
left until the next run and returns normally. No phone number is ever logged.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

import grpc
import sqlalchemy as sa

from callconv.ads_client import (
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
    same_identity: int = 0  # rows sharing Google's key with another, sent in a later batch

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
        }


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


def plan_batches(rows: Sequence, batch_size: int = MAX_BATCH) -> tuple[list[list], int]:
    """Rows deduplicated by conversion_key, in batches where Google's key is unique.

    A second row with the same (caller, conversion time, action) as another
    goes to a later batch (it would be ``DUPLICATE_CALL_CONVERSION_IN_REQUEST``
    in the same one). Returns ``(batches, rows moved to a later batch)``.
    """
    layers: list[list] = []
    seen_keys: set[str] = set()
    occurrences: Counter = Counter()
    for row in rows:
        if row.conversion_key in seen_keys:
            continue
        seen_keys.add(row.conversion_key)
        identity = _identity(row)
        layer = occurrences[identity]
        occurrences[identity] += 1
        if layer == len(layers):
            layers.append([])
        layers[layer].append(row)
    batches = [layer[i : i + batch_size] for layer in layers for i in range(0, len(layer), batch_size)]
    moved = sum(len(layer) for layer in layers[1:])
    return batches, moved


def _build_request(client, account, batch: Sequence, dry_run: bool):
    consent_status = client.enums.ConsentStatusEnum
    conversions = []
    for row in batch:
        conversion = client.get_type("CallConversion")
        conversion.caller_id = row.caller_e164 or ""
        conversion.call_start_date_time = format_ads_time(row.call_start, account.tz)
        conversion.conversion_date_time = format_ads_time(row.conversion_time, account.tz)
        conversion.conversion_action = account.action_resource(row.conversion_action_id)
        if row.conversion_value is not None:
            conversion.conversion_value = float(row.conversion_value)
            conversion.currency_code = row.currency_code or account.default_currency
        conversion.consent.ad_user_data = getattr(consent_status, account.consent.ad_user_data)
        conversion.consent.ad_personalization = getattr(consent_status, account.consent.ad_personalization)
        conversions.append(conversion)
    request = client.get_type("UploadCallConversionsRequest")
    request.customer_id = account.customer_id
    request.conversions.extend(conversions)
    request.partial_failure = True
    request.validate_only = dry_run
    return request


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
        f"Google Ads rejected the credentials for account '{account.id}' ({code}): check the developer "
        "token and the OAuth credentials (or service account) of the Google Ads Airflow connection"
    )


def _request_level_error(exc: BaseException, account) -> UploadError | None:
    """An UploadConfigError / UploadError for a non-transient, non-quota RPC failure."""
    code = status_code(exc)
    errors = _failure_errors(exc)
    request_id = getattr(exc, "request_id", None)
    suffix = f" (Google Ads request id {request_id})" if request_id else ""
    for error in errors:
        name, category = error_code_name(error), error_category(error)
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


def _due_rows(engine, account_id: str, window_end: datetime) -> list:
    ledger = upload_ledger
    query = (
        sa.select(ledger)
        .where(
            ledger.c.account_id == account_id,
            sa.or_(
                ledger.c.state == "pending",
                sa.and_(
                    ledger.c.state == "parked",
                    sa.or_(ledger.c.park_until.is_(None), ledger.c.park_until <= window_end),
                ),
            ),
        )
        .order_by(ledger.c.conversion_key)
    )
    with engine.connect() as connection:
        return list(connection.execute(query))


_UPDATE = (
    sa.update(upload_ledger)
    .where(
        upload_ledger.c.conversion_key == sa.bindparam("b_key"),
        sa.or_(upload_ledger.c.state == "pending", upload_ledger.c.state == "parked"),
    )
    .values(
        state=sa.bindparam("b_state"),
        attempts=upload_ledger.c.attempts + sa.bindparam("b_attempt"),
        park_until=sa.bindparam("b_park_until"),
        error_code=sa.bindparam("b_error_code"),
        error_message=sa.bindparam("b_error_message"),
        delivered_at=sa.bindparam("b_delivered_at"),
        delivered_by=sa.bindparam("b_delivered_by"),
    )
)


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


def _write(engine, changes: list[dict]) -> None:
    if changes:
        with engine.begin() as connection:
            connection.execute(_UPDATE, changes)


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


def _park_for_quota(engine, rows: Sequence, window_end: datetime) -> None:
    message = "Google Ads quota exhausted; retried in the next run"
    _write(
        engine,
        [_change(row, "parked", attempt=0, park_until=window_end, code=QUOTA_CODE, message=message) for row in rows],
    )


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
) -> UploadOutcome:
    """Upload ``account``'s due ledger rows through ``client``; see the module doc.

    ``window_end`` is the run's data-interval end (aware): it decides which
    parked rows are due and stamps ``delivered_at`` / ``park_until``.
    ``dry_run`` sends ``validate_only`` requests and records nothing.
    """
    if window_end.tzinfo is None:
        raise ValueError("window_end must be timezone-aware")
    if not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch_size must be between 1 and {MAX_BATCH}, got {batch_size}")
    window_end = window_end.astimezone(UTC)
    outcome = UploadOutcome(account_id=account.id, run_id=run_id, dry_run=dry_run)

    rows = _due_rows(engine, account.id, window_end)
    outcome.selected = len(rows)
    if not rows:
        log.info("account %s run %s: nothing due for upload", account.id, run_id)
        return outcome
    batches, outcome.same_identity = plan_batches(rows, batch_size)
    if outcome.same_identity:
        log.warning(
            "account %s: %d conversions share caller, conversion time and action with another; sent in later batches",
            account.id,
            outcome.same_identity,
        )

    service = get_upload_service(client, account.login_customer_id)
    for number, batch in enumerate(batches):
        request = _build_request(client, account, batch, dry_run)
        try:
            response = _send(
                service,
                request,
                account_id=account.id,
                max_retries=max_transient_retries,
                sleep=sleep,
                timeout=timeout,
            )
        except Exception as exc:
            if _is_quota(exc):
                left = [row for later in batches[number:] for row in later]
                outcome.left_for_quota = len(left)
                if not dry_run:
                    _park_for_quota(engine, left, window_end)
                log.warning(
                    "account %s run %s: Google Ads quota exhausted; %d conversions parked for the next run",
                    account.id,
                    run_id,
                    len(left),
                )
                break
            problem = _request_level_error(exc, account)
            if problem is None:
                raise
            if isinstance(problem, UploadConfigError):
                problem.outcome = outcome
            log.error("account %s run %s: %s", account.id, run_id, problem)
            raise problem from None

        outcome.sent += len(batch)
        outcome.batches += 1
        row_errors = decode_partial_failure(client, response)
        if -1 in row_errors:
            log.warning("account %s: Google Ads reported an error that names no row", account.id)
        changes, config = _judge_batch(batch, response, row_errors, window_end, outcome, dry_run)
        if not dry_run:
            _write(engine, changes)
        if config:
            code = sorted(config)[0]
            if code in ACTION_CONFIG_ERRORS:
                message = _action_problem(account, code, config[code])
            else:
                message = _customer_problem(account, code)
            log.error("account %s run %s: %s", account.id, run_id, message)
            _log_outcome(outcome)
            raise UploadConfigError(message, code, outcome)

    _log_outcome(outcome)
    return outcome


def _log_outcome(outcome: UploadOutcome) -> None:
    log.info(
        "account %s run %s%s: %d due, %d sent in %d batches, %d accepted, %d already existed, "
        "%d parked, %d failed, %d left for quota",
        outcome.account_id,
        outcome.run_id,
        " (dry run)" if outcome.dry_run else "",
        outcome.selected,
        outcome.sent,
        outcome.batches,
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
