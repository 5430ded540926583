"""The preflight: before an import spends a day's work, is each account's delivery set up?

Why: a conversion action switched off in Google Ads, an action of the wrong type, a
customer id with a typo or a connection without credentials used to surface only at the
upload, after intake and matching, as a stack of row errors. The preflight asks Google
the cheap questions first and answers with one line per account: ``ok``, or what to fix.

- ``api``: the customer's conversion actions, read with GAQL through
  ``GoogleAdsService.search``, exist, are of type ``UPLOAD_CALLS`` and ``ENABLED``; then a
  ``validate_only`` ``UploadCallConversions`` with one synthetic conversion is accepted.
- ``data_manager``: per conversion action, a ``validateOnly`` ``events:ingest`` with one
  synthetic event is accepted (which also proves the credentials reach the API).
- ``file``: the SFTP connection the file is published through is configured.

The synthetic caller is a number reserved for fiction (NANP 555-01xx); it is never
printed or logged, and on the Data Manager path it leaves hashed. Google may well answer
it with ``CALL_NOT_FOUND``: that and the other answers about the call itself are expected,
so they pass. An outage (unreachable, 5xx, quota) is not a set-up problem: the verdict
says so, and the DAG task leaves it to Airflow's retries instead of failing at once.

``python -m callconv.preflight`` checks every configured account; the import DAGs run
:func:`check_account` as their first task.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from callconv.config import Account, ConfigError, Settings, load_settings

log = logging.getLogger(__name__)

SYNTHETIC_CALLER = "+12025550100"  # NANP 555-0100: reserved for fictional use
RPC_TIMEOUT_SECONDS = 60.0
# Row answers to the synthetic conversion that are about the made-up call, not the set-up.
SYNTHETIC_CALL_ANSWERS = frozenset(
    {
        "CALL_NOT_FOUND",
        "EXPIRED_CALL",
        "TOO_RECENT_CALL",
        "CALL_CONVERSION_ALREADY_EXISTS",
        "CONVERSION_TRACKING_NOT_ENABLED_AT_CALL_TIME",
        "TOO_RECENT_CONVERSION_ACTION",
    }
)
ACTION_FIX = "each configured action must exist in the customer, be of type UPLOAD_CALLS and ENABLED"


@dataclass(frozen=True)
class Verdict:
    """One account's answer. ``problem`` says what to fix (None: ok); ``outage`` marks a
    problem that is Google's or the network's, which a later try may not meet."""

    account_id: str
    problem: str | None = None
    outage: bool = False

    @property
    def ok(self) -> bool:
        return self.problem is None

    def line(self) -> str:
        return f"{self.account_id}: {'ok' if self.ok else self.problem}"


def _customer(account: Account) -> str:
    digits = account.customer_id
    return f"{digits[:3]}-{digits[3:6]}-{digits[6:]}"


def _first_line(error: BaseException) -> str:
    from callconv.delivery.ads_client import mask_phone_numbers

    text = (str(error).strip().splitlines() or [""])[0][:200]
    return mask_phone_numbers(f"{type(error).__name__}: {text}" if text else type(error).__name__)


def _credentials_refused(error: BaseException) -> bool:
    """google-auth could not get a token with the connection's credentials (revoked, expired, incomplete)."""
    from google.auth.exceptions import DefaultCredentialsError, RefreshError

    return isinstance(error, (RefreshError, DefaultCredentialsError))


def _missing_credentials(account: Account, conn_id: str, what: str, error: BaseException) -> Verdict:
    return Verdict(
        account.id,
        f"no usable {what} credentials: the Airflow connection '{conn_id}' could not be used "
        f"({_first_line(error)}); create it, or fix its credentials",
    )


# ------------------------------------------------------------------ delivery 'api'


def _synthetic_times(account: Account, now: datetime) -> tuple[datetime, datetime]:
    """A call a day before ``now`` and its sale an hour later: inside any lookback, not too recent."""
    call_start = (now - timedelta(days=1)).astimezone(account.tz).replace(microsecond=0)
    return call_start, call_start + timedelta(hours=1)


def _ads_request_problem(account: Account, error: BaseException, conn_id: str, step: str) -> Verdict:
    """A Google Ads RPC failure as a verdict: an outage, or one line saying what to fix."""
    import grpc

    from callconv.delivery.ads_client import access_problem, error_category, error_code_name
    from callconv.delivery.upload import ACTION_CONFIG_ERRORS, CUSTOMER_CONFIG_ERRORS, TRANSIENT_STATUS, status_code

    if _credentials_refused(error):
        return _missing_credentials(account, conn_id, "Google Ads", error)
    code = status_code(error)
    failure = getattr(error, "failure", None)
    errors = list(failure.errors) if failure is not None else []
    names = [error_code_name(e) for e in errors]
    if code in TRANSIENT_STATUS or code == grpc.StatusCode.RESOURCE_EXHAUSTED or (code is None and not errors):
        what = code.name if code is not None else _first_line(error)
        return Verdict(account.id, f"Google Ads could not be reached at the {step} ({what}); try again later", True)
    for name, item in zip(names, errors, strict=True):
        access = access_problem(name, account)
        if access:
            return Verdict(account.id, access)
        if name in CUSTOMER_CONFIG_ERRORS:
            return Verdict(
                account.id,
                f"Google Ads refused customer {_customer(account)} ({name}): check accounts[{account.id}].customer_id"
                + (f" and login_customer_id {account.login_customer_id}" if account.login_customer_id else ""),
            )
        if name in ACTION_CONFIG_ERRORS:
            return Verdict(account.id, f"Google Ads refused the conversion action at the {step} ({name}): {ACTION_FIX}")
        if error_category(item) in ("authentication_error", "authorization_error"):
            return Verdict(
                account.id,
                f"Google Ads rejected the credentials of the Airflow connection '{conn_id}' ({name}): "
                "renew its OAuth credentials or service account",
            )
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return Verdict(
            account.id, f"Google Ads rejected the credentials of the Airflow connection '{conn_id}' ({code.name})"
        )
    reason = names[0] if names else (code.name if code is not None else "UNKNOWN")
    return Verdict(account.id, f"Google Ads refused the {step} ({reason})")


def _action_query(account: Account) -> str:
    """GAQL has no bound parameters: the ids go in as text, so only digits are let in."""
    ids = sorted({action.id for action in account.conversion_actions.values()}, key=int)
    if not all(action_id.isascii() and action_id.isdigit() for action_id in ids):
        raise ValueError(f"accounts[{account.id}]: a conversion action id that is not digits")
    ids = ", ".join(ids)
    return (
        "SELECT conversion_action.id, conversion_action.name, conversion_action.type, conversion_action.status "
        f"FROM conversion_action WHERE conversion_action.id IN ({ids})"
    )


def action_problems(account: Account, found: dict[str, tuple[str, str]]) -> list[str]:
    """What is wrong with the configured actions, given ``found``: action id -> (type, status)."""
    problems = []
    for key, action in sorted(account.conversion_actions.items()):
        where = f"conversion action {action.id} ({action.name}, accounts[{account.id}].conversion_actions.{key})"
        if action.id not in found:
            problems.append(f"{where} does not exist in customer {_customer(account)}: fix its id")
            continue
        action_type, status = found[action.id]
        if action_type != "UPLOAD_CALLS":
            problems.append(
                f"{where} is of type {action_type}, not UPLOAD_CALLS: use an action that imports calls from clicks"
                " (Import > Phone calls)"
            )
        if status != "ENABLED":
            problems.append(f"{where} is {status}, not ENABLED: enable it in Google Ads or configure another action")
    return problems


def check_api(account: Account, client, now: datetime, conn_id: str = "google_ads_default") -> Verdict:
    """The customer's actions through GAQL, then one synthetic conversion with ``validate_only``."""
    from callconv.delivery.ads_client import decode_partial_failure, get_search_service, get_upload_service
    from callconv.delivery.upload import ACTION_CONFIG_ERRORS, format_ads_time

    try:
        search = get_search_service(client, account.login_customer_id)
        rows = search.search(customer_id=account.customer_id, query=_action_query(account), timeout=RPC_TIMEOUT_SECONDS)
        found = {
            str(row.conversion_action.id): (row.conversion_action.type_.name, row.conversion_action.status.name)
            for row in rows
        }
    except Exception as error:  # every RPC failure becomes a verdict; the DAG task decides what fails
        return _ads_request_problem(account, error, conn_id, "conversion action lookup")
    problems = action_problems(account, found)
    if problems:
        return Verdict(account.id, "; ".join(problems))

    action = min(account.conversion_actions.values(), key=lambda a: int(a.id))
    call_start, conversion_time = _synthetic_times(account, now)
    request = client.get_type("UploadCallConversionsRequest")
    request.customer_id = account.customer_id
    request.partial_failure = True
    request.validate_only = True
    conversion = client.get_type("CallConversion")
    conversion.caller_id = SYNTHETIC_CALLER
    conversion.call_start_date_time = format_ads_time(call_start, account.tz)
    conversion.conversion_date_time = format_ads_time(conversion_time, account.tz)
    conversion.conversion_action = account.action_resource(action.id)
    conversion.conversion_value = 1.0
    conversion.currency_code = account.default_currency
    request.conversions.append(conversion)
    try:
        upload = get_upload_service(client, account.login_customer_id)
        response = upload.upload_call_conversions(request=request, timeout=RPC_TIMEOUT_SECONDS)
    except Exception as error:  # as above
        return _ads_request_problem(account, error, conn_id, "validate_only upload")
    refused = sorted({code for code, _ in decode_partial_failure(client, response).values()} - SYNTHETIC_CALL_ANSWERS)
    if refused:
        where = f"conversion action {action.id} ({action.name})"
        fix = ACTION_FIX if set(refused) & ACTION_CONFIG_ERRORS else f"check {where} and customer {_customer(account)}"
        return Verdict(
            account.id, f"Google Ads refused a validate_only test conversion for {where} ({', '.join(refused)}): {fix}"
        )
    return Verdict(account.id)


# ------------------------------------------------------------------ delivery 'data_manager'


def _dm_reasons(error) -> list[str]:
    """Google's reasons in a Data Manager error body: ErrorInfo, then each field violation."""
    try:
        details = json.loads(error.content)["error"].get("details", [])
    except (ValueError, KeyError, TypeError, AttributeError):
        return []
    reasons = [d["reason"] for d in details if d.get("reason")]
    reasons += [v.get("reason", "") for d in details for v in d.get("fieldViolations", []) if v.get("reason")]
    return list(dict.fromkeys(reasons))


def _dm_problem(account: Account, action, error: BaseException, conn_id: str) -> Verdict:
    from googleapiclient.errors import HttpError

    if _credentials_refused(error):
        return _missing_credentials(account, conn_id, "Data Manager", error)
    if not isinstance(error, HttpError):  # refused connection, TLS, timeout: the API was not reached
        unreachable = f"the Data Manager API could not be reached ({_first_line(error)}); try again later"
        return Verdict(account.id, unreachable, True)
    status = error.resp.status
    reasons = _dm_reasons(error)
    if status == 429 or status >= 500:
        return Verdict(account.id, f"the Data Manager API answered {status}; try again later", True)
    if "INVALID_OPERATING_ACCOUNT" in reasons:
        return Verdict(
            account.id,
            f"the Data Manager API refused customer {_customer(account)} (INVALID_OPERATING_ACCOUNT): check "
            f"accounts[{account.id}].customer_id and that the connection '{conn_id}' may use it",
        )
    if "INVALID_CONVERSION_ACTION_ID" in reasons:
        return Verdict(
            account.id,
            f"the Data Manager API refused conversion action {action.id} ({action.name}) "
            f"(INVALID_CONVERSION_ACTION_ID): {ACTION_FIX}",
        )
    if status in (401, 403):
        return Verdict(
            account.id,
            f"the Data Manager API rejected the credentials of the Airflow connection '{conn_id}' ({status}): "
            "renew them, with the datamanager scope",
        )
    return Verdict(
        account.id, f"the Data Manager API refused a validateOnly test event ({', '.join(reasons) or status})"
    )


def check_data_manager(account: Account, service, now: datetime, conn_id: str = "google_data_manager") -> Verdict:
    """One ``validateOnly`` ingest per configured action, each with one synthetic (hashed) event."""
    from callconv.delivery.data_manager.deliver import event_for, request_body

    call_start, conversion_time = _synthetic_times(account, now)
    row = SimpleNamespace(
        caller_e164=SYNTHETIC_CALLER,
        call_start=call_start,
        conversion_time=conversion_time,
        conversion_value=1.0,
        currency_code=account.default_currency,
    )
    for action in sorted(account.conversion_actions.values(), key=lambda a: int(a.id)):
        body = request_body(account, action.id, [event_for(account, row)], validate_only=True)
        try:
            service.events().ingest(body=body).execute(num_retries=0)
        except Exception as error:  # every failure becomes a verdict; the DAG task decides what fails
            return _dm_problem(account, action, error, conn_id)
    return Verdict(account.id)


# ------------------------------------------------------------------ delivery 'file'


def check_file(settings: Settings, account: Account) -> Verdict:
    """Modest on purpose: the SFTP connection exists and names a host (no login is tried)."""
    from airflow.sdk import BaseHook

    target = settings.file_delivery_for(account)
    try:
        connection = BaseHook.get_connection(target.conn_id)
    except Exception as error:  # a missing connection is the problem this check exists for
        return Verdict(
            account.id,
            f"the SFTP connection '{target.conn_id}' for the file delivery is not configured "
            f"({_first_line(error)}): create it",
        )
    if not connection.host:
        return Verdict(account.id, f"the SFTP connection '{target.conn_id}' has no host: set it")
    return Verdict(account.id)


# ------------------------------------------------------------------ one account, every account


def check_account(settings: Settings, account: Account, now: datetime) -> Verdict:
    """The account's verdict, with credentials from its delivery's Airflow connection.

    ``now`` places the synthetic call: a DAG run passes its data interval's end.
    """
    if account.delivery == "file":
        return check_file(settings, account)
    if account.delivery == "data_manager":
        from callconv.delivery.data_manager.client import service_from_airflow_connection

        section = settings.data_manager
        try:
            service = service_from_airflow_connection(section.conn_id, section.api_endpoint)
        except Exception as error:  # no connection, or one without usable credentials
            return _missing_credentials(account, section.conn_id, "Data Manager", error)
        return check_data_manager(account, service, now, section.conn_id)
    from callconv.delivery.ads_client import client_from_airflow_connection

    try:
        client = client_from_airflow_connection(settings.google_ads_conn_id)
    except Exception as error:  # as above
        return _missing_credentials(account, settings.google_ads_conn_id, "Google Ads", error)
    return check_api(account, client, now, settings.google_ads_conn_id)


def check_all(settings: Settings, now: datetime) -> list[Verdict]:
    return [check_account(settings, account, now) for account in settings.accounts]


def main(argv: list[str] | None = None) -> int:
    """Prints one line per account; exits 0 when all are ok, 1 otherwise, 2 for a broken config."""
    parser = argparse.ArgumentParser(prog="python -m callconv.preflight", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="pipeline config file (default: CALL_CONVERSIONS_CONFIG)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as error:
        print(str(error).splitlines()[0])
        return 2
    # The command's own moment: where to place the synthetic call (not business logic).
    verdicts = check_all(settings, datetime.now(UTC))
    for verdict in verdicts:
        print(verdict.line(), flush=True)
    return 0 if all(verdict.ok for verdict in verdicts) else 1


def _quiet_logging() -> None:
    """The command's own logging: the verdicts say what went wrong, so the google-ads library's
    lines about each refused request would only repeat them between the lines."""
    from callconv.delivery.ads_client import LIBRARY_LOGGER

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger(LIBRARY_LOGGER).setLevel(logging.ERROR)


if __name__ == "__main__":
    _quiet_logging()
    sys.exit(main())
