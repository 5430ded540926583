"""Real local endpoints for alert tests: an SMTP server (aiosmtpd) and a JSON webhook (http.server).

Both listen on 127.0.0.1 only, keep what they receive in memory, and stop with the test.
"""

from __future__ import annotations

import email
import email.policy
import json
import socket
import threading
import time
from dataclasses import dataclass
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class ReceivedMail:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes

    @property
    def message(self) -> EmailMessage:
        return email.message_from_bytes(self.raw, policy=email.policy.default)

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    def body(self) -> str:
        """Every text part, decoded (base64 and quoted-printable undone)."""
        parts = [part.get_content() for part in self.message.walk() if part.get_content_maintype() == "text"]
        return "\n".join(parts)

    def everything(self) -> str:
        """The raw message, its decoded headers and its decoded text: what a leak check must search."""
        headers = "\n".join(f"{key}: {value}" for key, value in self.message.items())
        return "\n".join([self.raw.decode("utf-8", "replace"), headers, self.body()])


class _Handler:
    def __init__(self, sink: SmtpSink):
        self.sink = sink

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        self.sink._received(ReceivedMail(envelope.mail_from, tuple(envelope.rcpt_tos), bytes(envelope.content)))
        return "250 Message accepted for delivery"


class SmtpSink:
    """An SMTP server on 127.0.0.1 that accepts every message and keeps it."""

    def __init__(self, hostname: str = "127.0.0.1"):
        self.hostname = hostname
        self.port = free_port()
        self.messages: list[ReceivedMail] = []
        self._arrived = threading.Condition()
        self._controller = None

    def _received(self, mail: ReceivedMail) -> None:
        with self._arrived:
            self.messages.append(mail)
            self._arrived.notify_all()

    def start(self) -> SmtpSink:
        from aiosmtpd.controller import Controller

        self._controller = Controller(_Handler(self), hostname=self.hostname, port=self.port)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def wait_for(self, count: int = 1, timeout: float = 15.0) -> list[ReceivedMail]:
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {count} message(s) at the SMTP sink, got {len(self.messages)}")
                self._arrived.wait(left)
            return list(self.messages)

    def connection_json(self, **extra) -> str:
        """An Airflow SMTP connection (for AIRFLOW_CONN_*) to this sink: plain SMTP, no TLS."""
        return json.dumps(
            {
                "conn_type": "smtp",
                "host": self.hostname,
                "port": self.port,
                "extra": {"disable_tls": True, "disable_ssl": True, "retry_limit": 0, "timeout": 10, **extra},
            }
        )


class WebhookSink:
    """An HTTP server on 127.0.0.1 that keeps every POSTed JSON body and answers ``status``."""

    def __init__(self, status: int = 200):
        self.status = status
        self.posts: list[dict] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's hook name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                sink.posts.append(
                    {"path": self.path, "content_type": self.headers.get("Content-Type"), "json": json.loads(body)}
                )
                self.send_response(sink.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):  # keep the test output quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/alerts"

    def start(self) -> WebhookSink:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
