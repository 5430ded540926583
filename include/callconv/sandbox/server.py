"""A local gRPC server that behaves like Google Ads' ``UploadCallConversions``.

It speaks the real wire protocol of
``google.ads.googleads.{API_VERSION}.services.ConversionUploadService``, so the
unmodified ``GoogleAdsClient`` (interceptors, partial-failure details and
``GoogleAdsException`` included) talks to it exactly as it would to Google.

What it knows, and checks like Google does:

* forwarded calls, as ``(caller_e164, call start instant)`` pairs, given as a
  list or read from the warehouse ``call_logs`` (:func:`load_calls_from_warehouse`);
* conversion actions per customer (:class:`ActionSpec`: type, status, lookback);
* its own notion of "now", a ``clock`` callable that tests move forward.

Request-level errors (wrong access token, unknown customer, ``partial_failure`` not
set, more than 2,000 rows) come back as RPC errors with a ``GoogleAdsFailure``
in the trailing metadata, which the client raises as ``GoogleAdsException``.
Row errors come back in ``partial_failure_error`` with an empty result for the
row. Some row messages echo the caller id on purpose, so the pipeline's
masking of phone numbers is exercised.

Faults can be injected at runtime: transient failures, quota exhaustion,
delay, "die after accept" (the batch is recorded, then the RPC fails), and
Google's answers about API access (:meth:`SandboxServer.deny_access`).

Like Google since the developer-token sunset (2026-09-09), it needs no
``developer-token`` header. A sandbox given a ``developer_token`` still refuses
a request that sends a different one, as a check that the header is passed on.

TLS: the server serves on 127.0.0.1 only with a self-signed certificate
(SAN ``localhost`` and ``127.0.0.1``) written to ``cert_dir``. Clients trust it
through ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``; gRPC reads that file once per
process, so a certificate already in ``cert_dir`` is reused, never replaced.
"""

from __future__ import annotations

import contextlib
import importlib
import ipaddress
import itertools
import logging
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import grpc

from callconv.delivery.ads_client import API_VERSION

log = logging.getLogger(__name__)

MAX_CONVERSIONS_PER_REQUEST = 2000
CERT_FILE = "sandbox-cert.pem"
KEY_FILE = "sandbox-key.pem"

_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}[+-]\d{2}:\d{2}$")
_ACTION_RESOURCE = re.compile(r"^customers/(\d+)/conversionActions/(\d+)$")
# The one GAQL shape Search answers (the preflight's): fields of conversion_action, an id filter.
_GAQL = re.compile(
    r"^\s*SELECT\s+(?P<fields>.+?)\s+FROM\s+(?P<resource>\w+)(?:\s+WHERE\s+(?P<where>.+?))?\s*$",
    re.IGNORECASE | re.DOTALL,
)
_ID_FILTER = re.compile(r"^conversion_action\.id\s*(?:IN\s*\((?P<list>[^)]*)\)|=\s*(?P<one>\d+))$", re.IGNORECASE)
_ACTION_FIELDS = frozenset(f"conversion_action.{name}" for name in ("resource_name", "id", "name", "type", "status"))

Clock = Callable[[], datetime]

# Google's answers about API access that deny_access() can inject: code -> (error category, message).
ACCESS_DENIALS: dict[str, tuple[str, str]] = {
    "CLOUD_PROJECT_NOT_APPROVED_FOR_PRODUCTION": (
        "authorization_error",
        "The Google Cloud project is only approved for use with test accounts. To access non-test "
        "accounts, apply for Explorer, Basic or Standard access.",
    ),
    "CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE": (
        "not_allowlisted_error",
        "Customer is not allowlisted for accessing this feature.",
    ),
    "ACTION_NOT_PERMITTED": (
        "authorization_error",
        "The user does not have permission to perform this action (for example, ADD, UPDATE, REMOVE) "
        "on the resource or call a method.",
    ),
    "USER_PERMISSION_DENIED": (
        "authorization_error",
        "User doesn't have permission to access customer. Note: If you're accessing a client customer, "
        "the manager's customer id must be set in the 'login-customer-id' header.",
    ),
}


def _utc(value: datetime) -> datetime:
    """An aware UTC instant, to the second (naive values are taken as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).replace(microsecond=0)


def _real_clock() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------- TLS


def ensure_certificate(cert_dir: str | Path) -> tuple[Path, Path]:
    """A self-signed certificate and key for ``localhost`` / ``127.0.0.1`` in ``cert_dir``.

    An existing pair is reused (gRPC caches the trusted roots per process).
    Returns ``(cert_path, key_path)``; trust ``cert_path`` on the client side.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(cert_dir)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    if cert_path.is_file() and key_path.is_file():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if cert.not_valid_after_utc > datetime.now(UTC) + timedelta(days=1):
            return cert_path, key_path

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "callconv sandbox")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


# ------------------------------------------------------------------ what it knows


@dataclass(frozen=True)
class ActionSpec:
    """A conversion action as the sandbox's Google Ads account holds it."""

    id: str
    name: str = ""
    type: str = "UPLOAD_CALLS"
    status: str = "ENABLED"
    lookback_days: int = 60
    created_at: datetime | None = None  # TOO_RECENT_CONVERSION_ACTION within 6 h of it
    tracking_since: datetime | None = None  # calls before it: CONVERSION_TRACKING_NOT_ENABLED_AT_CALL_TIME


@dataclass(frozen=True)
class AcceptedConversion:
    customer_id: str
    caller_id: str
    call_start: datetime
    action_id: str
    conversion_action: str
    conversion_date_time: str
    conversion_time: datetime
    conversion_value: float | None
    currency_code: str | None
    ad_user_data: str
    ad_personalization: str
    accepted_at: datetime

    @property
    def key(self) -> tuple[str, str, datetime, str]:
        """Google's duplicate rule: caller id, conversion date time and conversion action
        ("The imported call has the same conversion_date_time as an existing conversion")."""
        return (self.customer_id, self.caller_id, self.conversion_time, self.action_id)


def load_calls_from_warehouse(engine, account_id: str) -> set[tuple[str, datetime]]:
    """Forwarded calls of ``account_id`` in ``call_logs``: ``{(caller_e164, call_start UTC)}``."""
    import sqlalchemy as sa

    from callconv.schema import call_logs

    query = sa.select(call_logs.c.caller_e164, call_logs.c.call_start).where(
        call_logs.c.account_id == account_id,
        call_logs.c.via_google_forwarding.is_(True),
        call_logs.c.caller_e164.is_not(None),
    )
    with engine.connect() as connection:
        return {(caller, _utc(start)) for caller, start in connection.execute(query)}


def customers_from_settings(settings) -> dict[str, list[ActionSpec]]:
    """Each configured account's customer and its conversion actions (all UPLOAD_CALLS, enabled)."""
    customers: dict[str, list[ActionSpec]] = {}
    for account in settings.accounts:
        actions = customers.setdefault(account.customer_id, [])
        for action in account.conversion_actions.values():
            actions.append(ActionSpec(id=action.id, name=action.name))
    return customers


def _types(version: str) -> SimpleNamespace:
    base = f"google.ads.googleads.{version}"

    def module(path: str):
        return importlib.import_module(f"{base}.{path}")

    service = module("services.types.conversion_upload_service")
    search = module("services.types.google_ads_service")
    errors = module("errors.types.errors")
    return SimpleNamespace(
        Request=service.UploadCallConversionsRequest,
        Response=service.UploadCallConversionsResponse,
        Result=service.CallConversionResult,
        SearchRequest=search.SearchGoogleAdsRequest,
        SearchResponse=search.SearchGoogleAdsResponse,
        Row=search.GoogleAdsRow,
        ConversionAction=module("resources.types.conversion_action").ConversionAction,
        ActionType=module("enums.types.conversion_action_type").ConversionActionTypeEnum.ConversionActionType,
        ActionStatus=module("enums.types.conversion_action_status").ConversionActionStatusEnum.ConversionActionStatus,
        Query=module("errors.types.query_error").QueryErrorEnum,
        Failure=errors.GoogleAdsFailure,
        Error=errors.GoogleAdsError,
        ErrorCode=errors.ErrorCode,
        Location=errors.ErrorLocation,
        ConversionUpload=module("errors.types.conversion_upload_error").ConversionUploadErrorEnum,
        Quota=module("errors.types.quota_error").QuotaErrorEnum,
        Authentication=module("errors.types.authentication_error").AuthenticationErrorEnum,
        Authorization=module("errors.types.authorization_error").AuthorizationErrorEnum,
        PartialFailure=module("errors.types.partial_failure_error").PartialFailureErrorEnum,
        Date=module("errors.types.date_error").DateErrorEnum,
        NotAllowlisted=module("errors.types.not_allowlisted_error").NotAllowlistedErrorEnum,
        service_name=f"{base}.services.ConversionUploadService",
        search_service_name=f"{base}.services.GoogleAdsService",
        failure_key=f"{base}.errors.googleadsfailure-bin",
        failure_type_url=f"type.googleapis.com/{base}.errors.GoogleAdsFailure",
    )


class _Abort(Exception):
    """Ends the RPC with a status code, and a GoogleAdsFailure when given."""

    def __init__(self, code: grpc.StatusCode, message: str, errors: list | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.errors = errors or []


# ----------------------------------------------------------------------- server


class SandboxServer:
    """The sandbox: ``start()`` it, point a client at :attr:`endpoint`, ``stop()`` it.

    ``customers`` maps a customer id (10 digits) to its conversion actions.
    ``other_customers`` are reachable customers that did not receive the calls
    (uploading to them gives ``INVALID_CUSTOMER_FOR_CALL``); any other customer
    id gives ``USER_PERMISSION_DENIED``. ``access_token``, when set, must match
    what the client sends; ``developer_token``, when set, must match the
    ``developer-token`` header if the client sends one (Google ignores it, and
    a request without it is accepted).
    """

    def __init__(
        self,
        *,
        customers: Mapping[str, Iterable[ActionSpec]] | None = None,
        calls: Iterable[tuple[str, datetime]] = (),
        other_customers: Iterable[str] = (),
        clock: Clock | None = None,
        too_recent_call: timedelta = timedelta(hours=12),
        access_token: str | None = None,
        developer_token: str | None = None,
        port: int = 0,
        cert_dir: str | Path | None = None,
        api_version: str = API_VERSION,
        max_workers: int = 8,
    ):
        self.api_version = api_version
        self._t = _types(api_version)
        self._lock = threading.RLock()
        self._customers: dict[str, dict[str, ActionSpec]] = {}
        for customer_id, actions in (customers or {}).items():
            self.add_customer(customer_id, actions)
        self._other_customers = {str(c).replace("-", "") for c in other_customers}
        self._calls: set[tuple[str, datetime]] = set()
        self.add_calls(calls)
        self.clock: Clock = clock or _real_clock
        self.too_recent_call = too_recent_call
        self.access_token = access_token
        self.developer_token = developer_token
        self._requested_port = port
        self._cert_dir = Path(cert_dir) if cert_dir else None
        self._max_workers = max_workers
        self._server: grpc.Server | None = None
        self.port: int | None = None
        self.cert_path: Path | None = None
        self._accepted: dict[tuple, AcceptedConversion] = {}
        self._request_ids = itertools.count(1)
        self.requests: list[dict] = []  # per RPC: metadata (no token) and row count
        self.searches: list[dict] = []  # per GoogleAdsService.Search: customer and query
        self._in_flight = 0
        self.clear_faults()

    # -- set-up ---------------------------------------------------------------

    def add_customer(self, customer_id: str, actions: Iterable[ActionSpec]) -> None:
        with self._lock:
            self._customers[str(customer_id).replace("-", "")] = {str(a.id): a for a in actions}

    def set_action(self, customer_id: str, action: ActionSpec) -> None:
        with self._lock:
            self._customers.setdefault(str(customer_id).replace("-", ""), {})[str(action.id)] = action

    def add_calls(self, calls: Iterable[tuple[str, datetime]]) -> int:
        with self._lock:
            before = len(self._calls)
            self._calls.update((caller, _utc(start)) for caller, start in calls)
            return len(self._calls) - before

    def add_calls_from_warehouse(self, engine, account_id: str) -> int:
        return self.add_calls(load_calls_from_warehouse(engine, account_id))

    def set_clock(self, clock: Clock | datetime) -> None:
        """A callable, or a fixed instant."""
        if isinstance(clock, datetime):
            fixed = _utc(clock)
            self.clock = lambda: fixed
        else:
            self.clock = clock

    def now(self) -> datetime:
        return _utc(self.clock())

    # -- faults ---------------------------------------------------------------

    def clear_faults(self) -> None:
        with self._lock:
            self._fail_next = 0
            self._fail_code = grpc.StatusCode.UNAVAILABLE
            self._quota_next = 0
            self._quota_after_accepted: int | None = None
            self._delay = 0.0
            self._die_after_accept = 0
            self._access_denial: str | None = None
            self._access_denials_left: int | None = None

    def deny_access(self, code: str, next_calls: int | None = None) -> None:
        """Google's answer about API access for the next ``next_calls`` calls (every call when None).

        ``code`` is one of :data:`ACCESS_DENIALS`, e.g. ``CLOUD_PROJECT_NOT_APPROVED_FOR_PRODUCTION``
        (a Test-level Cloud project calling a production account). Nothing is recorded.
        """
        if code not in ACCESS_DENIALS:
            raise ValueError(f"unknown access denial {code!r}; one of {', '.join(ACCESS_DENIALS)}")
        with self._lock:
            self._access_denial, self._access_denials_left = code, next_calls

    def fail_next(self, count: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        """The next ``count`` calls fail with ``code`` (no GoogleAdsFailure), recording nothing."""
        with self._lock:
            self._fail_next, self._fail_code = count, code

    def exhaust_quota(self, next_calls: int = 0, after_accepted: int | None = None) -> None:
        """RESOURCE_EXHAUSTED for the next ``next_calls`` calls, and/or for every
        call once ``after_accepted`` rows have been accepted in total."""
        with self._lock:
            self._quota_next = next_calls
            self._quota_after_accepted = after_accepted

    def set_delay(self, seconds: float) -> None:
        with self._lock:
            self._delay = seconds

    def die_after_accept(self, count: int = 1) -> None:
        """The next ``count`` non-validate-only calls record their rows, then fail UNAVAILABLE."""
        with self._lock:
            self._die_after_accept = count

    # -- inspection -----------------------------------------------------------

    def accepted(self, customer_id: str | None = None) -> list[AcceptedConversion]:
        with self._lock:
            rows = list(self._accepted.values())
        return [r for r in rows if customer_id is None or r.customer_id == customer_id]

    def uploads(self) -> list[dict]:
        """The logged upload requests that could record conversions: those with ``validate_only``
        (a preflight's synthetic conversion, a dry run) are left out."""
        with self._lock:
            return [request for request in self.requests if not request["validate_only"]]

    def in_flight(self) -> int:
        """Requests being served right now (a client killed mid-request leaves its request here)."""
        with self._lock:
            return self._in_flight

    def reset(self) -> None:
        """Forget accepted conversions, the request log and faults (calls/actions stay)."""
        with self._lock:
            self._accepted.clear()
            self.requests.clear()
            self.searches.clear()
        self.clear_faults()

    # -- life cycle -----------------------------------------------------------

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("the sandbox is not started")
        return f"localhost:{self.port}"

    def client_settings(self, developer_token: str | None = None, **extra) -> dict:
        """Settings for ``callconv.delivery.ads_client.client_from_settings`` that reach this sandbox.

        They hold a developer token only when the sandbox checks one or ``developer_token`` is given.
        """
        settings = {
            "access_token": self.access_token or "sandbox-token",
            "endpoint": self.endpoint,
            "ssl_roots_file": str(self.cert_path),
        }
        if self.developer_token or developer_token:
            settings["developer_token"] = self.developer_token or developer_token
        return {**settings, **extra}

    def start(self) -> SandboxServer:
        if self._server is not None:
            return self
        cert_dir = self._cert_dir or Path(tempfile.mkdtemp(prefix="callconv-sandbox-"))
        self.cert_path, key_path = ensure_certificate(cert_dir)
        credentials = grpc.ssl_server_credentials([(key_path.read_bytes(), self.cert_path.read_bytes())])
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self._max_workers))
        handler = grpc.method_handlers_generic_handler(
            self._t.service_name,
            {
                "UploadCallConversions": grpc.unary_unary_rpc_method_handler(
                    self._upload_call_conversions,
                    request_deserializer=self._t.Request.deserialize,
                    response_serializer=self._t.Response.serialize,
                )
            },
        )
        search = grpc.method_handlers_generic_handler(
            self._t.search_service_name,
            {
                "Search": grpc.unary_unary_rpc_method_handler(
                    self._search,
                    request_deserializer=self._t.SearchRequest.deserialize,
                    response_serializer=self._t.SearchResponse.serialize,
                )
            },
        )
        server.add_generic_rpc_handlers((handler, search))
        port = server.add_secure_port(f"127.0.0.1:{self._requested_port}", credentials)
        if not port:
            raise RuntimeError(f"the sandbox could not bind 127.0.0.1:{self._requested_port}")
        server.start()
        self._server, self.port = server, port
        log.info("Google Ads sandbox (%s) serving on %s", self.api_version, self.endpoint)
        return self

    def stop(self, grace: float | None = 0.5) -> None:
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None

    def wait(self) -> None:
        if self._server is not None:
            self._server.wait_for_termination()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the RPC --------------------------------------------------------------

    def _error(self, category: str, code_name: str, message: str, *path: tuple[str, int | None]):
        t = self._t
        enum = {
            "conversion_upload_error": t.ConversionUpload.ConversionUploadError,
            "quota_error": t.Quota.QuotaError,
            "authentication_error": t.Authentication.AuthenticationError,
            "authorization_error": t.Authorization.AuthorizationError,
            "partial_failure_error": t.PartialFailure.PartialFailureError,
            "date_error": t.Date.DateError,
            "not_allowlisted_error": t.NotAllowlisted.NotAllowlistedError,
            "query_error": t.Query.QueryError,
        }[category]
        elements = []
        for name, index in path:
            element = t.Location.FieldPathElement(field_name=name)
            if index is not None:
                element.index = index
            elements.append(element)
        error = t.Error(error_code=t.ErrorCode(**{category: enum[code_name]}), message=message)
        if elements:
            error.location = t.Location(field_path_elements=elements)
        return error

    def _abort(self, context: grpc.ServicerContext, request_id: str, abort: _Abort):
        metadata = [("request-id", request_id)]
        if abort.errors:
            failure = self._t.Failure(errors=abort.errors, request_id=request_id)
            metadata.append((self._t.failure_key, self._t.Failure.serialize(failure)))
        context.set_trailing_metadata(tuple(metadata))
        context.abort(abort.code, abort.message)

    def _quota_abort(self) -> _Abort:
        return _Abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "Resource has been exhausted (e.g. check quota).",
            [
                self._error(
                    "quota_error",
                    "RESOURCE_EXHAUSTED",
                    "Too many requests. Retry in 86400 seconds.",
                )
            ],
        )

    def _upload_call_conversions(self, request, context: grpc.ServicerContext):
        request_id = f"sandbox-{next(self._request_ids)}-{uuid.uuid4().hex[:8]}"
        metadata = {key: value for key, value in context.invocation_metadata()}
        with self._lock:
            self.requests.append(
                {
                    "request_id": request_id,
                    "customer_id": request.customer_id,
                    "rows": len(request.conversions),
                    "validate_only": request.validate_only,
                    # Each row as it came on the wire: tests tell identical resends from changed ones.
                    "payloads": [type(c).serialize(c) for c in request.conversions],
                    "developer_token": metadata.get("developer-token"),
                    "login_customer_id": metadata.get("login-customer-id"),
                }
            )
            delay = self._delay
            self._in_flight += 1
        try:
            if delay:
                time.sleep(delay)
            response, die = self._handle(request, metadata)
        except _Abort as abort:
            self._abort(context, request_id, abort)
        finally:
            with self._lock:
                self._in_flight -= 1
        context.set_trailing_metadata((("request-id", request_id),))
        if die:
            context.abort(grpc.StatusCode.UNAVAILABLE, "sandbox: connection lost after the upload was recorded")
        return response

    def _check_caller(self, metadata: Mapping[str, str]) -> None:
        """Who is calling, checked the same way for every method: the OAuth token, the optional
        developer token and any injected answer about API access. Call it holding the lock."""
        if self.access_token and metadata.get("authorization") != f"Bearer {self.access_token}":
            raise _Abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "Request is missing required authentication credential.",
                [self._error("authentication_error", "OAUTH_TOKEN_INVALID", "OAuth token is invalid.")],
            )
        sent_token = metadata.get("developer-token")
        if self.developer_token and sent_token is not None and sent_token != self.developer_token:
            raise _Abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "The developer token is not valid.",
                [self._error("authentication_error", "DEVELOPER_TOKEN_INVALID", "The developer token is not valid.")],
            )
        if self._access_denial is not None:
            denial = self._access_denial
            if self._access_denials_left is not None:
                self._access_denials_left -= 1
                if self._access_denials_left <= 0:
                    self._access_denial = self._access_denials_left = None
            category, message = ACCESS_DENIALS[denial]
            raise _Abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "The caller does not have permission",
                [self._error(category, denial, message, ("customer_id", None))],
            )

    def _no_access_to_customer(self) -> _Abort:
        return _Abort(
            grpc.StatusCode.PERMISSION_DENIED,
            "The caller does not have permission",
            [
                self._error(
                    "authorization_error",
                    "USER_PERMISSION_DENIED",
                    "User doesn't have permission to access customer. Note: If you're accessing "
                    "a client customer, the manager's customer id must be set in the "
                    "'login-customer-id' header.",
                    ("customer_id", None),
                )
            ],
        )

    def _search(self, request, context: grpc.ServicerContext):
        """``GoogleAdsService.Search`` over ``conversion_action``: what the preflight asks.

        The caller is checked as for uploads (token, developer token, access answers, the
        customer); injected faults and quotas are the upload's alone. A request is logged in
        :attr:`searches`, not in :attr:`requests`, so upload counts stay what tests expect.
        """
        request_id = f"sandbox-{next(self._request_ids)}-{uuid.uuid4().hex[:8]}"
        metadata = {key: value for key, value in context.invocation_metadata()}
        try:
            with self._lock:
                self.searches.append(
                    {"request_id": request_id, "customer_id": request.customer_id, "query": request.query}
                )
                self._check_caller(metadata)
                actions = self._customers.get(request.customer_id.replace("-", ""))
                if actions is None and request.customer_id.replace("-", "") not in self._other_customers:
                    raise self._no_access_to_customer()
                fields, ids = self._parse_query(request.query)
                found = [a for a in (actions or {}).values() if ids is None or a.id in ids]
        except _Abort as abort:
            self._abort(context, request_id, abort)
        context.set_trailing_metadata((("request-id", request_id),))
        return self._search_response(request.customer_id.replace("-", ""), found, fields)

    def _parse_query(self, query: str) -> tuple[list[str], set[str] | None]:
        """The selected fields and the ids filtered on, from the one GAQL shape the sandbox knows:
        ``SELECT conversion_action.<field>, ... FROM conversion_action [WHERE conversion_action.id
        IN (...) | = ...]``. Anything else is a QueryError, as Google answers a query it cannot run."""

        def refuse(code: str, message: str) -> _Abort:
            return _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "Request contains an invalid argument.",
                [self._error("query_error", code, message, ("query", None))],
            )

        shape = _GAQL.match(query or "")
        if shape is None:
            raise refuse("UNEXPECTED_INPUT", "The sandbox answers SELECT ... FROM conversion_action [WHERE id].")
        if shape["resource"].lower() != "conversion_action":
            raise refuse("PROHIBITED_RESOURCE_TYPE_IN_FROM_CLAUSE", "The sandbox serves conversion_action only.")
        fields = [field.strip() for field in shape["fields"].split(",")]
        for field in fields:
            if field not in _ACTION_FIELDS:
                raise refuse("UNRECOGNIZED_FIELD", f"Unrecognized field in the query: '{field}'.")
        if shape["where"] is None:
            return fields, None
        condition = _ID_FILTER.match(shape["where"])
        if condition is None:
            raise refuse("PROHIBITED_FIELD_IN_WHERE_CLAUSE", "The sandbox filters on conversion_action.id only.")
        values = condition["list"] if condition["list"] is not None else condition["one"]
        ids = {value.strip() for value in values.split(",")}
        if not all(value.isdigit() for value in ids):
            raise refuse("BAD_NUMBER", "Invalid number in the filter on conversion_action.id.")
        return fields, ids

    def _search_response(self, customer_id: str, actions: list[ActionSpec], fields: list[str]):
        """Rows carrying only the selected fields (and the resource name), as Google returns them."""
        from google.protobuf import field_mask_pb2

        t = self._t
        rows = []
        for action in sorted(actions, key=lambda a: int(a.id)):
            resource = t.ConversionAction(resource_name=f"customers/{customer_id}/conversionActions/{action.id}")
            if "conversion_action.id" in fields:
                resource.id = int(action.id)
            if "conversion_action.name" in fields:
                resource.name = action.name
            # A type or status Google does not have (a test's "PAUSED") reads as UNKNOWN, as from a newer API.
            if "conversion_action.type" in fields:
                resource.type_ = getattr(t.ActionType, action.type, t.ActionType.UNKNOWN)
            if "conversion_action.status" in fields:
                resource.status = getattr(t.ActionStatus, action.status, t.ActionStatus.UNKNOWN)
            rows.append(t.Row(conversion_action=resource))
        return t.SearchResponse(results=rows, field_mask=field_mask_pb2.FieldMask(paths=fields))

    def _handle(self, request, metadata: Mapping[str, str]):
        t = self._t
        with self._lock:
            if self._fail_next > 0:
                self._fail_next -= 1
                raise _Abort(self._fail_code, "sandbox: injected transient failure")
            if self._quota_next > 0:
                self._quota_next -= 1
                raise self._quota_abort()
            if self._quota_after_accepted is not None and len(self._accepted) >= self._quota_after_accepted:
                raise self._quota_abort()

            self._check_caller(metadata)
            customer_id = request.customer_id.replace("-", "")
            actions = self._customers.get(customer_id)
            if actions is None:
                if customer_id in self._other_customers:
                    raise _Abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "Request contains an invalid argument.",
                        [
                            self._error(
                                "conversion_upload_error",
                                "INVALID_CUSTOMER_FOR_CALL",
                                "The call is associated with a different Google Ads account; "
                                "import to the conversion customer.",
                                ("customer_id", None),
                            )
                        ],
                    )
                raise self._no_access_to_customer()
            if not request.partial_failure:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "Request contains an invalid argument.",
                    [
                        self._error(
                            "partial_failure_error",
                            "PARTIAL_FAILURE_MODE_REQUIRED",
                            "The partial failure field was false in the request.",
                            ("partial_failure", None),
                        )
                    ],
                )
            if len(request.conversions) > MAX_CONVERSIONS_PER_REQUEST:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "Request contains an invalid argument.",
                    [
                        self._error(
                            "conversion_upload_error",
                            "TOO_MANY_CONVERSIONS_IN_REQUEST",
                            f"The request contained more than {MAX_CONVERSIONS_PER_REQUEST} conversions.",
                            ("conversions", None),
                        )
                    ],
                )

            now = self.now()
            die = False
            if not request.validate_only and self._die_after_accept > 0:
                self._die_after_accept -= 1
                die = True

        # Rows are checked and recorded outside the server's lock, as Google serves requests
        # side by side: a conversion is recorded by one atomic insert-if-absent on its key,
        # so two requests in flight with the same conversion record it once.
        errors, results = [], []
        seen: set[tuple] = set()
        # A daily quota counts what was accepted: its check and the recording are one step,
        # so requests in flight together cannot both slip under it.
        counted = self._quota_after_accepted is not None and not request.validate_only
        with self._lock if counted else contextlib.nullcontext():
            if counted and len(self._accepted) >= self._quota_after_accepted:
                raise self._quota_abort()
            for index, conversion in enumerate(request.conversions):
                self._judge_row(customer_id, actions, index, conversion, now, seen, request, errors, results, t)
        return self._response(request, errors, results, die, t)

    def _judge_row(self, customer_id, actions, index, conversion, now, seen, request, errors, results, t) -> None:
        """Check one row and record it if accepted: an atomic insert-if-absent on Google's key."""
        outcome = self._check_row(customer_id, actions, index, conversion, now, seen)
        if isinstance(outcome, AcceptedConversion) and not request.validate_only:
            if self._accepted.setdefault(outcome.key, outcome) is not outcome:
                outcome = self._error(
                    "conversion_upload_error",
                    "CALL_CONVERSION_ALREADY_EXISTS",
                    "The imported call has the same conversion_date_time as an existing conversion.",
                    ("conversions", index),
                    ("conversion_date_time", None),
                )
        if isinstance(outcome, AcceptedConversion):
            results.append(
                t.Result(
                    caller_id=conversion.caller_id,
                    call_start_date_time=conversion.call_start_date_time,
                    conversion_action=conversion.conversion_action,
                    conversion_date_time=conversion.conversion_date_time,
                )
            )
        else:
            errors.append(outcome)
            results.append(t.Result())

    def _response(self, request, errors, results, die, t):
        """The answer to a request whose rows are judged: results and the partial failure."""
        response = t.Response()
        if errors:
            from google.protobuf import any_pb2
            from google.rpc import code_pb2, status_pb2

            failure = t.Failure(errors=errors)
            response.partial_failure_error = status_pb2.Status(
                code=code_pb2.INVALID_ARGUMENT,
                message=f"{len(errors)} of {len(request.conversions)} conversions failed.",
                details=[any_pb2.Any(type_url=t.failure_type_url, value=t.Failure.serialize(failure))],
            )
        if request.validate_only:
            return response, False
        response.results.extend(results)
        return response, die

    def _check_row(self, customer_id, actions, index, conversion, now, seen):
        """An AcceptedConversion, or the GoogleAdsError for the row."""

        def fail(code: str, message: str, field_name: str, category: str = "conversion_upload_error"):
            return self._error(category, code, message, ("conversions", index), (field_name, None))

        caller = conversion.caller_id
        if not _E164.match(caller or ""):
            return fail(
                "UNPARSEABLE_CALLERS_PHONE_NUMBER",
                f"The caller's phone number {caller!r} could not be parsed; use E.164 (+16502531234).",
                "caller_id",
            )
        times = {}
        for field_name in ("call_start_date_time", "conversion_date_time"):
            text = getattr(conversion, field_name)
            if not _DATE_TIME.match(text or ""):
                return fail(
                    "INVALID_STRING_DATE_TIME_SECONDS_WITH_OFFSET",
                    "The string date time's format should be yyyy-mm-dd hh:mm:ss+|-hh:mm.",
                    field_name,
                    "date_error",
                )
            try:
                times[field_name] = _utc(datetime.strptime(text, "%Y-%m-%d %H:%M:%S%z"))
            except ValueError:
                return fail(
                    "INVALID_FIELD_VALUES_IN_DATE_TIME",
                    "The field values in the date time are invalid.",
                    field_name,
                    "date_error",
                )
        call_start, conversion_time = times["call_start_date_time"], times["conversion_date_time"]

        match = _ACTION_RESOURCE.match(conversion.conversion_action or "")
        # As the API documents: the customer id in the resource name is ignored.
        action = actions.get(match.group(2)) if match else None
        if action is None or action.status != "ENABLED":
            return fail(
                "NO_CONVERSION_ACTION_FOUND",
                "The conversion action specified in the upload request cannot be found. "
                "Make sure it's available in this account.",
                "conversion_action",
            )
        if action.type != "UPLOAD_CALLS":
            return fail(
                "INVALID_CONVERSION_ACTION_TYPE",
                "The conversion action specified in the upload request isn't set up for uploading call conversions.",
                "conversion_action",
            )
        if action.created_at is not None and now - _utc(action.created_at) < timedelta(hours=6):
            return fail(
                "TOO_RECENT_CONVERSION_ACTION",
                "Can't import events to a conversion action that was just created. Try again in 6 hours.",
                "conversion_action",
            )
        if conversion_time <= call_start:
            return fail(
                "CONVERSION_PRECEDES_CALL",
                "The conversion_date_time precedes the call. Make sure conversion_date_time is correct.",
                "conversion_date_time",
            )
        # Google's key for a call conversion: caller id, conversion date time and action.
        key = (customer_id, caller, conversion_time, action.id)
        if key in seen:
            return fail(
                "DUPLICATE_CALL_CONVERSION_IN_REQUEST",
                "Multiple events have the same call and conversion_date_time.",
                "conversion_date_time",
            )
        seen.add(key)
        if key in self._accepted:
            return fail(
                "CALL_CONVERSION_ALREADY_EXISTS",
                "The imported call has the same conversion_date_time as an existing conversion.",
                "conversion_date_time",
            )
        if now - call_start < self.too_recent_call:
            return fail(
                "TOO_RECENT_CALL",
                "Can't import calls that occurred less than 6 hours ago. Try uploading again in 6 hours.",
                "call_start_date_time",
            )
        if now - call_start > timedelta(days=action.lookback_days):
            return fail(
                "EXPIRED_CALL",
                "The call occurred before this conversion action's lookback window.",
                "call_start_date_time",
            )
        if (caller, call_start) not in self._calls:
            return fail(
                "CALL_NOT_FOUND",
                f"The call from {caller} at {conversion.call_start_date_time} can't be found.",
                "call_start_date_time",
            )
        if action.tracking_since is not None and call_start < _utc(action.tracking_since):
            return fail(
                "CONVERSION_TRACKING_NOT_ENABLED_AT_CALL_TIME",
                "Conversion tracking was not enabled at the time of the call.",
                "call_start_date_time",
            )
        consent = conversion.consent
        return AcceptedConversion(
            customer_id=customer_id,
            caller_id=caller,
            call_start=call_start,
            action_id=action.id,
            conversion_action=conversion.conversion_action,
            conversion_date_time=conversion.conversion_date_time,
            conversion_time=conversion_time,
            conversion_value=conversion.conversion_value if "conversion_value" in conversion else None,
            currency_code=conversion.currency_code if "currency_code" in conversion else None,
            ad_user_data=consent.ad_user_data.name,
            ad_personalization=consent.ad_personalization.name,
            accepted_at=now,
        )
