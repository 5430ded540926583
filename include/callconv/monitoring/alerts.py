"""Alerts for failed tasks and unusual days, by e-mail (the SMTP provider) or a webhook (Slack or any JSON).

Three entry points:

* :func:`failure_notifier` returns a callable for ``on_failure_callback`` (in the
  DAG's ``default_args`` for one alert per failed task, or on the DAG itself for one
  per failed run).
* :func:`send_anomaly_alert` sends the anomalies of :mod:`callconv.monitoring.anomalies`.
* :func:`check_anomalies` is the body of a DAG task: check the run, alert, record.

Channels, by name in :attr:`AlertConfig.channels`:

* ``smtp``: through the SMTP provider's ``SmtpHook`` and the connection
  ``smtp_conn_id`` (host, port, login/password; extras ``from_email``,
  ``disable_tls``, ``disable_ssl``, ...), to ``email_to``.
* ``slack``: a Slack incoming webhook; POSTs ``{"text": ...}``.
* ``webhook``: any endpoint taking JSON; POSTs the event with its fields.

Both webhooks read their URL from the connection ``webhook_conn_id``: its password
when that is a URL (kept secret and masked like any password), else the extra
``url``, else the host when it is a full URL. Only http(s) URLs are used.

An alert never carries personal data: ids (DAG, task, run, account), the error's
class name, the error message with every phone-like number masked
(:func:`sanitise`), counts, and a link to the task log in the Airflow UI when
``[api] base_url`` is configured.

Airflow is imported inside the functions, so this module imports without it.
"""

from __future__ import annotations

import html
import json
import logging
import re
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import date
from typing import Any
from urllib.parse import quote

from callconv.delivery.ads_client import PHONE_MASK, mask_phone_numbers

log = logging.getLogger(__name__)

CHANNELS = ("smtp", "slack", "webhook")
WEBHOOK_TIMEOUT_SECONDS = 10
MAX_ERROR_CHARS = 500

# An ISO date or date-time is kept as it is: it is when, not who.
_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}(?:[ T]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?")
# Seven or more digits, alone or in groups ("91234567", "912 34 567", "(0)91-23-45-67"):
# a national phone number looks like this; so do a few harmless ids, masked all the same.
_DIGIT_RUN = re.compile(r"(?<![\w])\d(?:[\s().\-/]{0,2}\d){6,}")


def sanitise(text: object, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` safe for an alert: phone numbers (``+`` and 6+ digits, or any 7+ digits) masked, secrets redacted.

    Dates and date-times survive; the result is cut to ``limit`` characters.
    """
    text = "" if text is None else str(text)
    kept: list[str] = []

    def _keep(found: re.Match) -> str:
        kept.append(found.group(0))
        return f"\x00{len(kept) - 1}\x00"

    text = _DATE_TIME.sub(_keep, text)
    text = mask_phone_numbers(text)
    text = _DIGIT_RUN.sub(PHONE_MASK, text)
    text = re.sub(r"\x00(\d+)\x00", lambda found: kept[int(found.group(1))], text)
    text = _redact_secrets(text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _redact_secrets(text: str) -> str:
    """Airflow's masker hides registered secrets (connection passwords, our HMAC key)."""
    try:
        from airflow.sdk.log import redact
    except ImportError:  # pragma: no cover - outside Airflow there is nothing registered
        return text
    try:
        redacted = redact(text)
    except Exception:  # noqa: BLE001 - masking must never stop an alert
        return text
    return redacted if isinstance(redacted, str) else text


# ------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class AlertConfig:
    """Where alerts go. ``from_settings`` reads ``settings.alerts`` (fields of the same names)."""

    # Empty: alerts are only logged. Any of "smtp", "slack", "webhook".
    channels: tuple[str, ...] = ()
    smtp_conn_id: str = "smtp_alerts"
    email_to: tuple[str, ...] = ()
    email_from: str | None = None  # else the connection's extra from_email
    webhook_conn_id: str = "call_conversions_alerts_webhook"
    subject_prefix: str = "[call-conversions]"
    # Failure alerts add the run's counts from run_summary, read through this connection.
    warehouse_conn_id: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "email_to", _address_list(self.email_to))
        unknown = [name for name in self.channels if name not in CHANNELS]
        if unknown:
            raise ValueError(f"unknown alert channel(s) {unknown}; use {', '.join(CHANNELS)}")
        if "smtp" in self.channels and not self.email_to:
            raise ValueError("alert channel 'smtp' needs at least one address in email_to")

    @classmethod
    def from_settings(cls, settings: Any = None, **overrides: Any) -> AlertConfig:
        """From project ``Settings`` (its ``alerts`` section and ``warehouse_conn_id``), a mapping, or a config."""
        overrides = {key: value for key, value in overrides.items() if value is not None}
        if isinstance(settings, AlertConfig):
            return replace(settings, **overrides)
        source = settings if isinstance(settings, Mapping) else getattr(settings, "alerts", None)
        values: dict[str, Any] = {}
        if source is not None:
            for item in fields(cls):
                value = source.get(item.name) if isinstance(source, Mapping) else getattr(source, item.name, None)
                if value is not None:
                    values[item.name] = value
        if settings is not None and not isinstance(settings, Mapping) and "warehouse_conn_id" not in values:
            values["warehouse_conn_id"] = getattr(settings, "warehouse_conn_id", None)
        values.update(overrides)
        return cls(**values)


def _address_list(addresses: str | Iterable[str] | None) -> tuple[str, ...]:
    if not addresses:
        return ()
    if isinstance(addresses, str):
        addresses = re.split(r"\s*[,;]\s*", addresses)
    return tuple(a.strip() for a in addresses if a and a.strip())


class AlertDeliveryError(RuntimeError):
    """At least one configured channel could not take the alert (the others were still tried)."""


# ------------------------------------------------------------------ the message


@dataclass(frozen=True)
class AlertMessage:
    event: str  # task_failed | dag_failed | anomalies
    subject: str
    summary: str
    fields: dict[str, Any]
    details: list[str] = field(default_factory=list)
    link: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # machine-readable, for the JSON webhook only

    def text(self) -> str:
        lines = [self.summary, ""]
        lines += [f"{_label(key)}: {value}" for key, value in self.fields.items() if value not in (None, "")]
        if self.details:
            lines += ["", *self.details]
        if self.link:
            lines += ["", f"Task log: {self.link}"]
        return "\n".join(lines)

    def html(self) -> str:
        rows = "".join(
            f"<tr><th align='left'>{html.escape(_label(key))}</th><td>{html.escape(str(value))}</td></tr>"
            for key, value in self.fields.items()
            if value not in (None, "")
        )
        parts = [f"<p>{html.escape(self.summary)}</p>", f"<table>{rows}</table>"]
        if self.details:
            parts.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in self.details) + "</ul>")
        if self.link:
            link = html.escape(self.link, quote=True)
            parts.append(f'<p><a href="{link}">Task log</a>: {link}</p>')
        return "<html><body>" + "".join(parts) + "</body></html>"

    def payload(self, style: str) -> dict[str, Any]:
        if style == "slack":
            # Slack reads &, < and > as markup: escaped, as its message formatting asks.
            return {"text": _slack_escape(f"*{self.subject}*\n{self.text()}")}
        return {
            "event": self.event,
            "subject": self.subject,
            "summary": self.summary,
            **{key: value for key, value in self.fields.items()},
            "details": list(self.details),
            "log_url": self.link,
            **self.extra,
            "text": self.text(),
        }


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _label(key: str) -> str:
    return key.replace("_", " ")


def account_of_dag(dag_id: str | None) -> str | None:
    """``call_conversions_import__acme`` → ``acme``: the DAGs carry their account after a double underscore."""
    if dag_id and "__" in dag_id:
        return dag_id.rsplit("__", 1)[1] or None
    return None


def flat_counts(counts: Mapping | None, prefix: str = "") -> dict[str, int | float]:
    """Numeric leaves of a run_summary counts dict as ``stage.key.sub``: no strings, so nothing personal."""
    flat: dict[str, int | float] = {}
    for key, value in (counts or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_counts(value, f"{name}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = value
    return flat


def ui_base_url() -> str | None:
    """``[api] base_url`` when it is configured; no guessed localhost link otherwise."""
    try:
        from airflow.sdk.configuration import conf
    except ImportError:  # pragma: no cover - Airflow older than the SDK's config
        try:
            from airflow.configuration import conf
        except ImportError:
            return None
    try:
        value = conf.get("api", "base_url", fallback=None)
    except Exception:  # noqa: BLE001 - a config problem must not stop an alert
        return None
    return value.rstrip("/") if value else None


def task_log_url(
    dag_id: str | None,
    run_id: str | None,
    task_id: str | None = None,
    try_number: int | None = None,
    map_index: int | None = None,
    base_url: str | None = None,
) -> str | None:
    """The Airflow 3 UI page of a task try (or of the run), as ``RuntimeTaskInstance.log_url`` builds it."""
    base_url = base_url or ui_base_url()
    if not (base_url and dag_id and run_id):
        return None
    url = f"{base_url.rstrip('/')}/dags/{quote(dag_id)}/runs/{quote(run_id, safe='')}"
    if task_id:
        url += f"/tasks/{quote(task_id)}"
        if map_index is not None and map_index >= 0:
            url += f"/mapped/{map_index}"
        if try_number:
            url += f"?try_number={try_number}"
    return url


_ACCOUNT_ID = re.compile(r"^[a-z0-9_]{1,64}$")
_ISO_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _context_ids(context: Mapping) -> dict[str, Any]:
    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    dag = context.get("dag")
    # The rerun DAG's mapped tasks take account_id and day as arguments.
    arguments = getattr(context.get("task"), "op_kwargs", None)
    arguments = arguments if isinstance(arguments, Mapping) else {}
    account_id, day = arguments.get("account_id"), arguments.get("day")
    return {
        "dag_id": getattr(ti, "dag_id", None) or getattr(dag, "dag_id", None) or getattr(dag_run, "dag_id", None),
        "task_id": getattr(ti, "task_id", None),
        "run_id": context.get("run_id") or getattr(ti, "run_id", None) or getattr(dag_run, "run_id", None),
        "try_number": getattr(ti, "try_number", None),
        "map_index": getattr(ti, "map_index", None),
        "account_id": account_id if isinstance(account_id, str) and _ACCOUNT_ID.match(account_id) else None,
        "day": day if isinstance(day, str) and _ISO_DAY.match(day) else None,
    }


def context_log_url(context: Mapping) -> str | None:
    ids = _context_ids(context)
    return task_log_url(ids["dag_id"], ids["run_id"], ids["task_id"], ids["try_number"], ids["map_index"])


def failure_message(
    context: Mapping,
    account_id: str | None = None,
    counts_by_day: Mapping | None = None,
    subject_prefix: str = AlertConfig.subject_prefix,
) -> AlertMessage:
    """The alert for a failed task (context with ``ti`` and ``exception``) or a failed run (``reason``).

    ``counts_by_day``: the run's run_summary counts per business day; only their numbers are shown.
    """
    ids = _context_ids(context)
    dag_id, task_id = ids["dag_id"] or "unknown_dag", ids["task_id"]
    account_id = account_id or ids["account_id"] or account_of_dag(dag_id)
    error = context.get("exception")
    if isinstance(error, BaseException):
        error_class, error_message = type(error).__name__, sanitise(error)
    elif error:
        error_class, error_message = "Error", sanitise(error)
    else:
        error_class, error_message = None, sanitise(context.get("reason")) or None
    what = f"task {task_id}" if task_id else "run"
    subject = f"{subject_prefix} {dag_id} failed: {what}" + (f" (account {account_id})" if account_id else "")
    flat = {str(day): flat_counts(counts) for day, counts in (counts_by_day or {}).items()}
    return AlertMessage(
        event="task_failed" if task_id else "dag_failed",
        subject=subject.strip(),
        summary=f"{dag_id} failed in {what}" + (f" for account {account_id}." if account_id else "."),
        fields={
            "dag_id": dag_id,
            "task_id": task_id,
            "run_id": ids["run_id"],
            "try_number": ids["try_number"],
            "account_id": account_id,
            "business_date": ids["day"],
            "error_class": error_class,
            "error_message": error_message,
        },
        details=[f"{day} {key}: {value}" for day, numbers in flat.items() for key, value in numbers.items()],
        link=task_log_url(dag_id, ids["run_id"], task_id, ids["try_number"], ids["map_index"]),
        extra={"counts": flat},
    )


def anomaly_message(
    anomalies: Sequence,
    *,
    dag_id: str | None = None,
    run_id: str | None = None,
    account_id: str | None = None,
    business_date: date | str | None = None,
    log_url: str | None = None,
    subject_prefix: str = AlertConfig.subject_prefix,
) -> AlertMessage:
    first = anomalies[0]
    account_id = account_id or getattr(first, "account_id", None) or account_of_dag(dag_id)
    business_date = business_date or getattr(first, "business_date", None)
    day = business_date.isoformat() if isinstance(business_date, date) else business_date
    codes = ", ".join(dict.fromkeys(a.code for a in anomalies))
    noun = "anomaly" if len(anomalies) == 1 else "anomalies"
    where = " ".join(part for part in (f"account {account_id}" if account_id else "", day or "") if part)
    details = []
    for anomaly in anomalies:
        values = ", ".join(f"{key}={_plain(value)}" for key, value in anomaly.values.items() if value is not None)
        details.append(f"{anomaly.code}: {sanitise(anomaly.message)}" + (f" [{values}]" if values else ""))
    return AlertMessage(
        event="anomalies",
        subject=f"{subject_prefix} {len(anomalies)} {noun} ({codes})" + (f" for {where}" if where else ""),
        summary=f"The call-conversion import found {len(anomalies)} {noun}" + (f" for {where}." if where else "."),
        fields={"dag_id": dag_id, "run_id": run_id, "account_id": account_id, "business_date": day, "codes": codes},
        details=details,
        link=log_url,
        extra={
            "anomalies": [
                {"code": a.code, "message": sanitise(a.message), "values": {k: _plain(v) for k, v in a.values.items()}}
                for a in anomalies
            ]
        },
    )


def _plain(value: Any) -> Any:
    """A value for an alert: numbers and dates as they are, anything else sanitised text."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, date):
        return value.isoformat()
    return sanitise(value, limit=120)


# ------------------------------------------------------------------ delivery


def deliver(message: AlertMessage, config: AlertConfig) -> list[str]:
    """Send ``message`` to every configured channel; returns the channels that took it.

    Every channel is tried; if any failed, :class:`AlertDeliveryError` names them
    (class names and sanitised messages only; never a webhook URL).
    """
    if not config.channels:
        log.warning("alert not sent, no alert channel configured: %s", message.subject)
        return []
    delivered, failures = [], []
    for channel in config.channels:
        try:
            if channel == "smtp":
                _send_email(message, config)
            else:
                _post_webhook(message, config, style=channel)
        except Exception as error:  # noqa: BLE001 - try the other channels, then report all
            failures.append(f"{channel}: {type(error).__name__}: {sanitise(error, limit=200)}")
            log.warning("alert channel %s failed: %s", channel, failures[-1])
        else:
            delivered.append(channel)
    if failures:
        raise AlertDeliveryError(
            f"alert {message.subject!r} not delivered on {'; '.join(failures)}"
            + (f" (delivered on {', '.join(delivered)})" if delivered else "")
        )
    log.info("alert sent on %s: %s", ", ".join(delivered), message.subject)
    return delivered


def _send_email(message: AlertMessage, config: AlertConfig) -> None:
    from airflow.providers.smtp.hooks.smtp import SmtpHook

    with SmtpHook(smtp_conn_id=config.smtp_conn_id) as hook:
        hook.send_email_smtp(
            to=list(config.email_to),
            from_email=config.email_from or hook.from_email or "call-conversions-alerts@localhost",
            subject=message.subject,
            html_content=message.html(),
            mime_charset="utf-8",
            custom_headers={"X-Call-Conversions-Event": message.event},
        )


def webhook_url(conn_id: str) -> str:
    from airflow.sdk import Connection

    conn = Connection.get(conn_id)
    extra = conn.extra_dejson or {}
    for candidate in (conn.password, extra.get("url"), conn.host):
        if candidate and "://" in candidate:
            url = candidate.strip()
            break
    else:
        raise ValueError(
            f"connection {conn_id!r} holds no webhook URL: put it in the password, the extra 'url' or the host"
        )
    if not url.lower().startswith(("https://", "http://")):
        raise ValueError(f"connection {conn_id!r}: the webhook URL must be http(s)")
    return url


def post_json(url: str, payload: Mapping, timeout: float = WEBHOOK_TIMEOUT_SECONDS) -> int:
    """POST ``payload`` as JSON; the HTTP status, or an error that does not show the URL."""
    request = urllib.request.Request(
        url,
        data=json.dumps(payload, default=str).encode("utf-8"),
        headers={"Content-Type": "application/json; charset=utf-8", "User-Agent": "callconv-alerts"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) checked above
            return response.status
    except urllib.error.HTTPError as error:
        raise AlertDeliveryError(f"webhook answered HTTP {error.code}") from None
    except urllib.error.URLError as error:
        reason = error.reason
        raise AlertDeliveryError(f"webhook unreachable ({type(reason).__name__})") from None


def _post_webhook(message: AlertMessage, config: AlertConfig, style: str) -> None:
    post_json(webhook_url(config.webhook_conn_id), message.payload(style))


# ------------------------------------------------------------------ failures


def run_counts_by_day(engine, run_id: str, account_id: str) -> dict[str, dict]:
    """A run's run_summary counts for one account, per business day (ISO date): one day, or several for a rerun."""
    import sqlalchemy as sa

    from callconv.schema import run_summary

    query = (
        sa.select(run_summary.c.business_date, run_summary.c.counts)
        .where(run_summary.c.run_id == run_id, run_summary.c.account_id == account_id)
        .order_by(run_summary.c.business_date)
    )
    with engine.connect() as connection:
        return {day.isoformat(): counts or {} for day, counts in connection.execute(query)}


class FailureNotifier:
    """An ``on_failure_callback``: one alert per call, never raising (a broken channel is logged)."""

    def __init__(self, config: AlertConfig | None = None, account_id: str | None = None, settings: Any = None):
        self.config = config
        self.account_id = account_id
        self._settings = settings

    def _config(self) -> AlertConfig:
        if self.config is None:
            settings = self._settings
            if settings is None:
                from callconv.config import load_settings

                settings = load_settings()
            self.config = AlertConfig.from_settings(settings)
        return self.config

    def _counts(self, config: AlertConfig, run_id: str | None, account_id: str | None, day: str | None) -> dict:
        if not (config.warehouse_conn_id and run_id and account_id):
            return {}
        try:
            from callconv.runtime import warehouse_engine

            counts = run_counts_by_day(warehouse_engine(config.warehouse_conn_id), run_id, account_id)
            return {key: value for key, value in counts.items() if day is None or key == day}
        except Exception as error:  # noqa: BLE001 - the alert goes out without counts
            log.warning("failure alert without counts: %s: %s", type(error).__name__, sanitise(error, limit=200))
            return {}

    def notify(self, context: Mapping) -> list[str]:
        config = self._config()
        ids = _context_ids(context)
        account_id = self.account_id or ids["account_id"] or account_of_dag(ids["dag_id"])
        counts = self._counts(config, ids["run_id"], account_id, ids["day"])
        message = failure_message(context, account_id, counts, subject_prefix=config.subject_prefix)
        return deliver(message, config)

    def __call__(self, context: Mapping) -> None:
        try:
            self.notify(context)
        except Exception as error:  # noqa: BLE001 - a callback must not hide the task's own failure
            log.error("failure alert not sent: %s: %s", type(error).__name__, sanitise(error, limit=300))

    def __repr__(self) -> str:
        return f"FailureNotifier(account_id={self.account_id!r})"


def failure_notifier(
    settings: Any = None, *, account_id: str | None = None, config: AlertConfig | None = None
) -> FailureNotifier:
    """For ``on_failure_callback``. ``settings`` (or ``config``) now, or the config file when the callback runs."""
    if config is None and settings is not None:
        config = AlertConfig.from_settings(settings)
    return FailureNotifier(config=config, account_id=account_id, settings=settings)


# ------------------------------------------------------------------ anomalies


def send_anomaly_alert(
    anomalies: Sequence,
    config: AlertConfig | None = None,
    *,
    settings: Any = None,
    dag_id: str | None = None,
    run_id: str | None = None,
    account_id: str | None = None,
    business_date: date | str | None = None,
    log_url: str | None = None,
) -> list[str]:
    """One alert for all of a run's anomalies; returns the channels that took it (none for no anomalies)."""
    if not anomalies:
        return []
    config = config or AlertConfig.from_settings(settings)
    message = anomaly_message(
        list(anomalies),
        dag_id=dag_id,
        run_id=run_id,
        account_id=account_id,
        business_date=business_date,
        log_url=log_url,
        subject_prefix=config.subject_prefix,
    )
    return deliver(message, config)


def check_anomalies(
    account_id: str,
    context,
    day: str | None = None,
    *,
    config: AlertConfig | None = None,
    thresholds=None,
) -> dict:
    """DAG task body: check this run of the account's day, alert on anomalies, record them in run_summary."""
    from callconv.intake.take_in import business_date_of
    from callconv.monitoring.anomalies import Thresholds, check_run
    from callconv.monitoring.reporting import record_stage
    from callconv.runtime import task_scope

    scope = task_scope(account_id, context, day)
    window = scope.window
    business_date = business_date_of(scope.account, window.start)
    thresholds = thresholds or Thresholds.from_settings(scope.settings)
    config = config or AlertConfig.from_settings(scope.settings)
    engine = scope.engine
    anomalies = check_run(engine, account_id, window.run_id, business_date, thresholds)
    for anomaly in anomalies:
        log.warning("anomaly %s for %s on %s: %s", anomaly.code, account_id, business_date, anomaly.message)
    if not anomalies:
        log.info("no anomalies for %s on %s", account_id, business_date)
    ids = _context_ids(context)
    failed: AlertDeliveryError | None = None
    try:
        delivered = send_anomaly_alert(
            anomalies,
            config,
            dag_id=ids["dag_id"],
            run_id=window.run_id,
            account_id=account_id,
            business_date=business_date,
            log_url=context_log_url(context),
        )
    except AlertDeliveryError as error:
        delivered, failed = [], error
    counts = {
        "found": [anomaly.code for anomaly in anomalies],
        "values": {anomaly.code: flat_counts(anomaly.values) for anomaly in anomalies},
        "alerted": delivered,
        "alert_failed": failed is not None,
    }
    record_stage(
        engine,
        window.run_id,
        account_id,
        business_date,
        (window.start, window.end),
        "anomalies",
        counts,
        dag_id=window.dag_id,
    )
    if failed is not None:
        # The anomalies are recorded; the task fails so that a broken alert channel is seen.
        raise failed
    return counts
