"""A local stand-in for Google's Data Manager API: HTTPS REST, ``v1/events:ingest`` and
``v1/requestStatus:retrieve``, as the real ``google-api-python-client`` calls them.

Why a server of our own: nothing may call Google at test time, and the delivery code must
be exercised through the real client library (its discovery document, its JSON encoding
and its error handling), not a mock. The sandbox checks what Google checks before it
accepts a request, and behaves as Google does after:

- the bearer token; the destination (``operatingAccount`` GOOGLE_ADS with a known
  customer, ``loginAccount`` when given, ``productDestinationId`` a known ``UPLOAD_CALLS``
  action that is enabled);
- each event's formats: RFC 3339 times, ``callInfo.startTimestamp`` before
  ``eventTimestamp``, an ISO 4217 currency, a hex SHA-256 phone identifier, consent values;
- fast-fail: one invalid event rejects the whole request with HTTP 400 and Google's
  error details (``ErrorInfo`` and ``BadRequest.fieldViolations`` naming ``events[i]``);
- ``validateOnly``: checked, nothing recorded, no request id;
- a status that is ``PROCESSING`` for ``processing_polls`` retrievals, then ``SUCCESS``,
  ``PARTIAL_SUCCESS`` or ``FAILED`` with per-reason record indices;
- duplicates accepted without an error and counted once after processing;
- injected faults: 503, 429, a lost response (the request is taken, the answer is not
  sent), records that fail in processing, and records refused at ingest for a reason of
  Google's own (``ingest_rejections``, a rule the local checks do not know).

Every request body received is kept (``received``) so that tests can check that no phone
number left the process unhashed.
"""

from __future__ import annotations

import json
import re
import ssl
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from callconv.sandbox.server import ensure_certificate

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")
_CONSENT = {"CONSENT_GRANTED", "CONSENT_DENIED", "CONSENT_STATUS_UNSPECIFIED"}


@dataclass
class DmAction:
    """A conversion action as the sandbox knows it (type and status as Google reports them)."""

    customer_id: str
    action_id: str
    type: str = "UPLOAD_CALLS"
    status: str = "ENABLED"


@dataclass
class _Request:
    request_id: str
    destination: tuple[str, str]
    events: list[dict]
    polls: int = 0
    failures: dict[int, str] = field(default_factory=dict)
    status: str = "PROCESSING"
    diagnostics: list[dict] = field(default_factory=list)


class RequestRejected(Exception):
    """A fast-fail: HTTP status, Google's reason and the field violations."""

    def __init__(self, status: int, reason: str, violations: list[tuple[str, str]]):
        super().__init__(reason)
        self.status, self.reason, self.violations = status, reason, violations


def _validate_only(raw: bytes) -> bool:
    try:
        body = json.loads(raw)
    except ValueError:
        return False
    return isinstance(body, dict) and bool(body.get("validateOnly"))


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not _RFC3339.match(value):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


class DataManagerSandbox:
    """The sandbox's state and rules; :meth:`start` serves it over HTTPS on 127.0.0.1."""

    def __init__(
        self,
        actions: list[DmAction],
        token: str = "sandbox-token",
        processing_polls: int = 1,
        cert_dir: str | Path = "var/sandbox",
    ):
        self.actions = {(a.customer_id, a.action_id): a for a in actions}
        self.customers = {a.customer_id for a in actions}
        self.token = token
        self.processing_polls = processing_polls
        self.cert_dir = Path(cert_dir)
        self.received: list[bytes] = []  # every body, as it arrived
        # '503', '429', 'lost': one per ingest request that would take events, in order. A validateOnly
        # request (a preflight's test event, a dry run) is never faulted, so a fault meant for a send
        # still meets that send when a preflight checks the set-up first.
        self.faults: deque[str] = deque()
        self.processing_failures: dict[str, str] = {}  # phone hash -> reason, applied at processing
        # phone hash -> reason, refused at ingest: a rule of Google's that we do not check locally
        self.ingest_rejections: dict[str, str] = {}
        self.requests: dict[str, _Request] = {}
        self.accepted: dict[tuple, str] = {}  # dedup key -> request id that counted it
        self.duplicates = 0
        self.ingests = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.cert_path: Path | None = None

    # --- rules -----------------------------------------------------------------------------

    def _check_destination(self, body: dict) -> tuple[str, str]:
        destinations = body.get("destinations") or []
        if len(destinations) != 1:
            raise RequestRejected(400, "INVALID_ARGUMENT", [("destinations", "exactly one destination expected")])
        dest = destinations[0]
        operating = dest.get("operatingAccount") or {}
        customer = str(operating.get("accountId", ""))
        if operating.get("accountType") != "GOOGLE_ADS" or customer not in self.customers:
            raise RequestRejected(
                403, "PERMISSION_DENIED", [("destinations[0].operatingAccount", "INVALID_OPERATING_ACCOUNT")]
            )
        login = dest.get("loginAccount")
        if login is not None and (
            login.get("accountType") != "GOOGLE_ADS" or not str(login.get("accountId", "")).isdigit()
        ):
            raise RequestRejected(400, "INVALID_ARGUMENT", [("destinations[0].loginAccount", "INVALID_LOGIN_ACCOUNT")])
        action = self.actions.get((customer, str(dest.get("productDestinationId", ""))))
        if action is None or action.type != "UPLOAD_CALLS" or action.status != "ENABLED":
            raise RequestRejected(
                400, "INVALID_ARGUMENT", [("destinations[0].productDestinationId", "INVALID_CONVERSION_ACTION_ID")]
            )
        return customer, action.action_id

    @staticmethod
    def _event_violations(index: int, event: dict) -> list[tuple[str, str]]:
        where = f"events[{index}]"
        found: list[tuple[str, str]] = []
        at = _parse_time(event.get("eventTimestamp"))
        start = _parse_time((event.get("callInfo") or {}).get("startTimestamp"))
        if at is None:
            found.append((f"{where}.eventTimestamp", "INVALID_TIMESTAMP"))
        if start is None:
            found.append((f"{where}.callInfo.startTimestamp", "INVALID_TIMESTAMP"))
        if at is not None and start is not None and at < start:
            found.append((f"{where}.eventTimestamp", "CONVERSION_PRECEDES_CALL"))
        identifiers = (event.get("userData") or {}).get("userIdentifiers") or []
        phones = [ident.get("phoneNumber") for ident in identifiers if "phoneNumber" in ident]
        if not phones:
            found.append((f"{where}.userData", "MISSING_USER_IDENTIFIER"))
        for phone in phones:
            if not isinstance(phone, str) or not _HEX64.match(phone):
                found.append((f"{where}.userData.userIdentifiers.phoneNumber", "INVALID_SHA256_FORMAT"))
        if "conversionValue" in event:
            value = event["conversionValue"]
            if not isinstance(value, (int, float)) or value < 0:
                found.append((f"{where}.conversionValue", "INVALID_CONVERSION_VALUE"))
            if not _CURRENCY.match(str(event.get("currency", ""))):
                found.append((f"{where}.currency", "INVALID_CURRENCY_CODE"))
        consent = event.get("consent") or {}
        for key in ("adUserData", "adPersonalization"):
            if key in consent and consent[key] not in _CONSENT:
                found.append((f"{where}.consent.{key}", "INVALID_CONSENT"))
        return found

    def ingest(self, body: dict) -> dict:
        """Check a request as Google would, then record it (unless validateOnly)."""
        destination = self._check_destination(body)
        events = body.get("events") or []
        if not events or len(events) > 2000:
            raise RequestRejected(400, "INVALID_ARGUMENT", [("events", "TOO_MANY_EVENTS" if events else "NO_EVENTS")])
        if body.get("encoding") != "HEX":
            raise RequestRejected(400, "INVALID_ARGUMENT", [("encoding", "INVALID_HEX_ENCODING")])
        consent = body.get("consent") or {}
        violations = [
            (f"consent.{k}", "INVALID_CONSENT")
            for k in ("adUserData", "adPersonalization")
            if k in consent and consent[k] not in _CONSENT
        ]
        for index, event in enumerate(events):
            violations.extend(self._event_violations(index, event))
            for ident in (event.get("userData") or {}).get("userIdentifiers") or []:
                if ident.get("phoneNumber") in self.ingest_rejections:
                    reason = self.ingest_rejections[ident["phoneNumber"]]
                    violations.append((f"events[{index}].userData.userIdentifiers.phoneNumber", reason))
        if violations:
            raise RequestRejected(400, "INVALID_ARGUMENT", violations)
        if body.get("validateOnly"):
            return {}
        request_id = uuid.uuid4().hex
        with self._lock:
            self.requests[request_id] = _Request(request_id, destination, events)
        return {"requestId": request_id}

    def resume(self, request_id: str, body: dict) -> None:
        """Know a request an earlier run of the sandbox took (its id and its stored body).

        Why: Google keeps a request's status after the ingest; a sandbox started again (the
        demo's next day) must answer ``requestStatus`` for what the warehouse still waits on.
        """
        destination = self._check_destination(body)
        with self._lock:
            self.requests.setdefault(request_id, _Request(request_id, destination, body.get("events") or []))

    def _process(self, request: _Request) -> None:
        """What Google does between the ingest and a final status: fail, deduplicate, count."""
        counts: dict[str, list[int]] = {}
        for index, event in enumerate(request.events):
            phone = event["userData"]["userIdentifiers"][0]["phoneNumber"]
            reason = self.processing_failures.get(phone)
            if reason:
                counts.setdefault(reason, []).append(index)
                continue
            key = (*request.destination, phone, event["eventTimestamp"], event["callInfo"]["startTimestamp"])
            if key in self.accepted:
                self.duplicates += 1
            else:
                self.accepted[key] = request.request_id
        failed = sum(len(v) for v in counts.values())
        request.status = "SUCCESS" if not failed else ("FAILED" if failed == len(request.events) else "PARTIAL_SUCCESS")
        request.diagnostics = [
            {"reason": f"PROCESSING_ERROR_REASON_{reason}", "recordCount": str(len(indices)), "recordIndices": indices}
            for reason, indices in sorted(counts.items())
        ]

    def retrieve(self, request_id: str) -> dict:
        with self._lock:
            request = self.requests.get(request_id)
            if request is None:
                raise RequestRejected(404, "NOT_FOUND", [("requestId", "REQUEST_ID_NOT_FOUND")])
            request.polls += 1
            if request.status == "PROCESSING" and request.polls > self.processing_polls:
                self._process(request)
            customer, action_id = request.destination
            status: dict = {
                "destination": {
                    "operatingAccount": {"accountType": "GOOGLE_ADS", "accountId": customer},
                    "productDestinationId": action_id,
                },
                "requestStatus": request.status,
                "eventsIngestionStatus": {"recordCount": str(len(request.events))},
            }
            if request.diagnostics:
                status["errorInfo"] = {"errorCounts": request.diagnostics}
            return {"requestStatusPerDestination": [status]}

    # --- HTTP ------------------------------------------------------------------------------

    def start(self) -> str:
        """Serve on an ephemeral port of 127.0.0.1 over TLS; returns the endpoint URL."""
        cert_path, key_path = ensure_certificate(self.cert_dir)
        self.cert_path = cert_path
        sandbox = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # noqa: A002 - no request lines in logs
                return

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, reason: str, violations: list[tuple[str, str]]) -> None:
                names = {
                    400: "INVALID_ARGUMENT",
                    401: "UNAUTHENTICATED",
                    403: "PERMISSION_DENIED",
                    404: "NOT_FOUND",
                    429: "RESOURCE_EXHAUSTED",
                    503: "UNAVAILABLE",
                }
                details: list[dict] = [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": violations[0][1] if violations else reason,
                        "domain": "datamanager.googleapis.com",
                    }
                ]
                if violations:
                    details.append(
                        {
                            "@type": "type.googleapis.com/google.rpc.BadRequest",
                            "fieldViolations": [{"field": f, "description": d, "reason": d} for f, d in violations],
                        }
                    )
                self._send(
                    status,
                    {
                        "error": {
                            "code": status,
                            "message": reason,
                            "status": names.get(status, reason),
                            "details": details,
                        }
                    },
                )

            def _authorised(self) -> bool:
                if self.headers.get("Authorization") != f"Bearer {sandbox.token}":
                    self._error(401, "UNAUTHENTICATED", [])
                    return False
                return True

            def do_POST(self):  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                url = urlparse(self.path)
                if url.path != "/v1/events:ingest":
                    return self._error(404, "NOT_FOUND", [])
                with sandbox._lock:
                    sandbox.received.append(raw)
                if not self._authorised():
                    return None
                with sandbox._lock:
                    fault = sandbox.faults.popleft() if sandbox.faults and not _validate_only(raw) else None
                if fault == "503":
                    return self._error(503, "UNAVAILABLE", [])
                if fault == "429":
                    return self._error(429, "RESOURCE_EXHAUSTED", [])
                try:
                    body = json.loads(raw)
                    answer = sandbox.ingest(body)
                except RequestRejected as rejected:
                    return self._error(rejected.status, rejected.reason, rejected.violations)
                except (ValueError, AttributeError, TypeError):
                    return self._error(400, "INVALID_ARGUMENT", [("body", "MALFORMED_REQUEST")])
                with sandbox._lock:
                    sandbox.ingests += 0 if body.get("validateOnly") else 1
                if fault == "lost":  # taken and recorded, but the answer never arrives
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return None
                return self._send(200, answer)

            def do_GET(self):  # noqa: N802
                url = urlparse(self.path)
                if url.path != "/v1/requestStatus:retrieve":
                    return self._error(404, "NOT_FOUND", [])
                if not self._authorised():
                    return None
                request_id = (parse_qs(url.query).get("requestId") or [""])[0]
                try:
                    return self._send(200, sandbox.retrieve(request_id))
                except RequestRejected as rejected:
                    return self._error(rejected.status, rejected.reason, rejected.violations)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, name="dm-sandbox", daemon=True).start()
        return f"https://127.0.0.1:{server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
