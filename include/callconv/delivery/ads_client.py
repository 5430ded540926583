"""Building the real ``GoogleAdsClient``, and the few helpers that read its answers.

This is the only module that knows how a client is made. Two ways in:

* :func:`client_from_settings` builds it from a plain dict with a static access
  token. It is for the local sandbox (``callconv.sandbox``) and for tests; a
  static token never asks Google's token endpoint for anything.
* :func:`client_from_airflow_connection` builds it from an Airflow connection,
  through the Google provider's ``GoogleAdsHook``. A connection whose extras
  say ``"sandbox": true`` goes through :func:`client_from_settings` instead,
  since the hook's OAuth refresh would call Google.

The client always opens a TLS channel. To reach the sandbox, point
``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH`` at the sandbox's certificate *before the
first TLS channel of the process is opened* (gRPC reads the roots once), or
give ``ssl_roots_file`` in the settings dict, which sets it.

No developer token is needed. Google sunset developer tokens on 2026-09-09: API
access now belongs to the Google Cloud project that owns the OAuth client or
service account, at that project's access level (Test, Explorer, Basic or
Standard). A ``developer_token`` in the settings or the connection is still
passed on, as the optional ``developer-token`` header, which Google ignores.
:func:`access_problem` turns Google's answers about access into one line that
says what to do.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

# The one place the Google Ads API version is chosen; the sandbox serves the
# same version. v26 is the default of google-ads 34.
API_VERSION = "v26"

UPLOAD_SERVICE = "ConversionUploadService"
SEARCH_SERVICE = "GoogleAdsService"
SSL_ROOTS_ENV_VAR = "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"

# The google-ads library logs through this logger; at INFO it dumps the whole
# request (every caller id) of a failed call, at DEBUG of every call.
LIBRARY_LOGGER = "google.ads.googleads.client"

# A "+" and at least six more digits, separators allowed: E.164 and its
# printed forms ("+47 912 34 567", "+1 (650) 253-1234"), but not a UTC offset.
_PHONE = re.compile(r"\+\s?\d(?:[\s().-]{0,2}\d){5,}")
PHONE_MASK = "+***"


def mask_phone_numbers(text: str | None, known: Iterable[str | None] = ()) -> str:
    """``text`` with every phone number replaced by ``+***``.

    ``known`` numbers (the caller ids just sent) are masked wherever they
    appear, with or without their leading ``+``.
    """
    if not text:
        return ""
    for number in known:
        if number:
            text = text.replace(number, PHONE_MASK)
            digits = number.lstrip("+")
            if len(digits) >= 6:
                text = text.replace(digits, PHONE_MASK)
    return _PHONE.sub(PHONE_MASK, text)


class PhoneMaskingFilter(logging.Filter):
    """Masks phone numbers in every record of the logger it is attached to."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_phone_numbers(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def protect_library_logging() -> None:
    """Keep caller ids out of the google-ads library's own log lines.

    Adds a masking filter to its logger (once), and unless someone set that
    logger's level explicitly, lifts it to WARNING so the full request dumps of
    INFO and DEBUG are not written at all.
    """
    library = logging.getLogger(LIBRARY_LOGGER)
    if not any(isinstance(f, PhoneMaskingFilter) for f in library.filters):
        library.addFilter(PhoneMaskingFilter())
    if library.level == logging.NOTSET:
        library.setLevel(logging.WARNING)


# Keys a sandbox / static-token settings dict may hold.
_SETTINGS_KEYS = frozenset(
    {
        "developer_token",
        "access_token",
        "endpoint",
        "login_customer_id",
        "ssl_roots_file",
        "sandbox",
        "use_proto_plus",
    }
)


def _clean_customer_id(value: object) -> str | None:
    if value is None or value == "":
        return None
    text = str(value).strip().replace("-", "")
    if not (text.isdigit() and len(text) == 10):
        raise ValueError(f"login_customer_id must be 10 digits like 123-456-7890, got {value!r}")
    return text


def _trust_roots_file(path: str) -> None:
    """Make gRPC trust the certificate at ``path`` (the sandbox's)."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"ssl_roots_file {path!r} does not exist; start the sandbox first")
    current = os.environ.get(SSL_ROOTS_ENV_VAR)
    if current and os.path.abspath(current) != path:
        # gRPC reads the roots once per process: this only takes effect if no
        # TLS channel has been opened yet.
        log.warning("%s was %s; now trusting only %s", SSL_ROOTS_ENV_VAR, current, path)
    os.environ[SSL_ROOTS_ENV_VAR] = path


def client_from_settings(settings: Mapping[str, Any]):
    """A ``GoogleAdsClient`` with a static access token (no OAuth refresh, no Google call).

    Keys: ``access_token`` (required), ``endpoint`` (``host:port``; default
    Google's), ``login_customer_id`` (when one login reaches several accounts),
    ``ssl_roots_file`` (a PEM the channel must trust, for the sandbox) and
    ``developer_token`` (optional since Google's sunset; sent as given).
    """
    import google.oauth2.credentials
    from google.ads.googleads.client import GoogleAdsClient

    unknown = sorted(set(settings) - _SETTINGS_KEYS)
    if unknown:
        raise ValueError(f"unknown Google Ads settings key(s): {', '.join(unknown)}")
    if not settings.get("access_token"):
        raise ValueError("Google Ads settings need access_token")
    if settings.get("ssl_roots_file"):
        _trust_roots_file(str(settings["ssl_roots_file"]))
    protect_library_logging()
    credentials = google.oauth2.credentials.Credentials(token=str(settings["access_token"]))
    return GoogleAdsClient(
        credentials=credentials,
        developer_token=str(settings["developer_token"]) if settings.get("developer_token") else None,
        endpoint=settings.get("endpoint") or None,
        login_customer_id=_clean_customer_id(settings.get("login_customer_id")),
        use_proto_plus=True,
        version=API_VERSION,
    )


def _connection_extras(hook) -> dict[str, Any]:
    extras = dict(hook.get_connection(hook.google_ads_conn_id).extra_dejson or {})
    # The hook still reads a legacy nested "google_ads_client" block.
    nested = extras.get("google_ads_client")
    return dict(nested) if isinstance(nested, dict) else extras


def client_from_airflow_connection(conn_id: str = "google_ads_default"):
    """A ``GoogleAdsClient`` built from the Airflow connection ``conn_id``.

    A production connection goes through ``GoogleAdsHook``: an OAuth client
    (``client_id``, ``client_secret``, ``refresh_token``) in the extras, or a
    service account via ``gcp_conn_id``; ``developer_token`` is optional and,
    when given, sent as Google's ignored header. A connection with
    ``"sandbox": true`` and a static ``access_token`` is built by
    :func:`client_from_settings`.
    """
    from airflow.providers.google.ads.hooks.ads import GoogleAdsHook

    hook = GoogleAdsHook(google_ads_conn_id=conn_id, api_version=API_VERSION)
    extras = _connection_extras(hook)
    if str(extras.get("sandbox", "")).lower() in ("1", "true", "yes") or extras.get("sandbox") is True:
        settings = {key: value for key, value in extras.items() if key in _SETTINGS_KEYS}
        settings.pop("sandbox", None)
        settings.pop("use_proto_plus", None)
        return client_from_settings(settings)
    # The hook has no public client getter; this is the one place that reads
    # its private, cached one. It loads the connection's extras (endpoint and
    # login_customer_id included) with GoogleAdsClient.load_from_dict.
    protect_library_logging()
    client = hook._get_client
    if not client.version:
        client.version = API_VERSION
    return client


# Google's answers about API access, and what to do about each. Since the developer-token
# sunset, access belongs to the Google Cloud project of the OAuth client or service account;
# ACTION_NOT_PERMITTED is what API versions before v25 answer a Test-level project.
ACCESS_ERRORS = (
    "CLOUD_PROJECT_NOT_APPROVED_FOR_PRODUCTION",
    "CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE",
    "ACTION_NOT_PERMITTED",
    "USER_PERMISSION_DENIED",
)


def _customer_text(customer_id: str) -> str:
    digits = str(customer_id).replace("-", "")
    return f"{digits[:3]}-{digits[3:6]}-{digits[6:]}" if len(digits) == 10 else digits


def access_problem(code: str, account) -> str | None:
    """One line saying what to do about an access error ``code`` for ``account``; None for other codes.

    ``account`` is a :class:`callconv.config.Account` (``id``, ``customer_id``,
    ``login_customer_id``). The line names no phone number and no secret.
    """
    if code not in ACCESS_ERRORS:
        return None
    customer = _customer_text(account.customer_id)
    head = f"Google Ads refused access to customer {customer} for account '{account.id}' ({code}): "
    if code == "CLOUD_PROJECT_NOT_APPROVED_FOR_PRODUCTION":
        fix = (
            "the Google Cloud project of the connection's OAuth client or service account has Test access, "
            "which reaches test accounts only; get Explorer access (granted automatically in most cases) or "
            "Basic access (needs a brand-verified project) for that project, or use a project that has it"
        )
    elif code == "CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE":
        fix = (
            "Google does not let this customer import conversions through the Google Ads API; set "
            f"accounts[{account.id}].delivery to 'file' (a Google Ads scheduled upload of the conversion "
            "file), or ask your Google Ads contact to allowlist the customer"
        )
    elif code == "ACTION_NOT_PERMITTED":
        fix = (
            "the connection's Google login may not upload conversions there; give that user or service "
            "account an Admin or Standard user role (not Read only) on the customer in Google Ads, and check "
            "that its Cloud project has more than Test access (API versions before v25 answer a Test-level "
            "project this way)"
        )
    else:  # USER_PERMISSION_DENIED
        check = f"check that accounts[{account.id}].customer_id is the customer that received the calls"
        login = account.login_customer_id
        if login:
            fix = (
                f"{check}, that the manager account {_customer_text(login)} in "
                f"accounts[{account.id}].login_customer_id manages it, and that the connection's Google login "
                "may use that manager"
            )
        else:
            fix = (
                f"{check} and give the connection's Google login (user or service account) access to it; if "
                f"access goes through a manager account, set accounts[{account.id}].login_customer_id to it"
            )
    return head + fix


def get_upload_service(client, login_customer_id: str | None = None):
    """The ``ConversionUploadService`` client, optionally for another manager account."""
    return _service(client, UPLOAD_SERVICE, login_customer_id)


def get_search_service(client, login_customer_id: str | None = None):
    """The ``GoogleAdsService`` client (GAQL ``search``), optionally for another manager account."""
    return _service(client, SEARCH_SERVICE, login_customer_id)


def _service(client, name: str, login_customer_id: str | None):
    protect_library_logging()
    login = _clean_customer_id(login_customer_id)
    if login and login != client.login_customer_id:
        client = copy.copy(client)
        client.login_customer_id = login
    return client.get_service(name, version=API_VERSION)


def error_code_name(error) -> str:
    """The enum name of a ``GoogleAdsError``'s code, e.g. ``CALL_NOT_FOUND``."""
    code = error.error_code
    pb = type(code).pb(code)
    field = pb.WhichOneof("error_code")
    if field is None:
        return "UNKNOWN"
    value = getattr(code, field)
    return getattr(value, "name", str(value))


def error_category(error) -> str:
    """The oneof field of a ``GoogleAdsError``'s code, e.g. ``conversion_upload_error``."""
    code = error.error_code
    return type(code).pb(code).WhichOneof("error_code") or "unknown"


def _row_index(error) -> int:
    elements = list(error.location.field_path_elements) if error.location else []
    for element in elements:
        if element.field_name == "conversions" and "index" in element:
            return int(element.index)
    return -1


def decode_failure_details(client, status) -> list:
    """The ``GoogleAdsError`` messages inside a ``google.rpc.Status``'s details."""
    failure_type = type(client.get_type("GoogleAdsFailure", version=API_VERSION))
    errors = []
    for detail in status.details:
        if not detail.type_url.endswith("GoogleAdsFailure"):
            continue
        errors.extend(failure_type.deserialize(detail.value).errors)
    return errors


def decode_partial_failure(client, response) -> dict[int, tuple[str, str]]:
    """Row errors of an upload response: request index -> (error code name, message).

    A row with several errors keeps the first. Errors that name no row are
    returned under index ``-1``.
    """
    if "partial_failure_error" not in response:
        return {}
    found: dict[int, tuple[str, str]] = {}
    for error in decode_failure_details(client, response.partial_failure_error):
        index = _row_index(error)
        found.setdefault(index, (error_code_name(error), error.message))
    return found


def is_empty_result(result) -> bool:
    """True for the empty ``CallConversionResult`` Google returns for a failed row."""
    return type(result).pb(result).ByteSize() == 0
