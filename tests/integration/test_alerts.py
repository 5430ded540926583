"""Alerts end to end: a real SMTP server (aiosmtpd) and webhook on 127.0.0.1, Airflow connections from
env vars, DAGs run with ``dag.test()``, the warehouse on PostgreSQL.

The leak checks search the raw message, its decoded headers and its decoded body for the
phone number in every form the error message carried it.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from smtp_sink import SmtpSink, WebhookSink

from callconv.monitoring.alerts import (
    AlertConfig,
    AlertDeliveryError,
    check_anomalies,
    failure_message,
    failure_notifier,
    sanitise,
    send_anomaly_alert,
)
from callconv.monitoring.anomalies import MATCH_RATE_DROP, PARKED_PILE_UP, Thresholds, check_run
from callconv.monitoring.reporting import record_stage
from callconv.schema import run_summary, upload_ledger

ACCOUNT = "test_shop"
DAY = date(2026, 11, 27)
PHONE_FORMS = ("+4791234567", "91234567", "912 34 567", "4791234567")
BASE_URL = "https://airflow.example.test"
ALERT_TO = ("oncall@example.test", "data@example.test")


def assert_no_phone(text: str) -> None:
    leaked = [form for form in PHONE_FORMS if form in text]
    assert leaked == [], f"phone number leaked into the alert: {leaked}"


# ------------------------------------------------------------------ fixtures


@pytest.fixture()
def smtp_sink(monkeypatch):
    sink = SmtpSink().start()
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_ALERTS", sink.connection_json(from_email="airflow@example.test"))
    yield sink
    sink.stop()


@pytest.fixture()
def webhook_sink(monkeypatch):
    sink = WebhookSink().start()
    # The URL is a secret for Slack: it lives in the password, which Airflow masks.
    monkeypatch.setenv("AIRFLOW_CONN_ALERTS_WEBHOOK", json.dumps({"conn_type": "http", "password": sink.url}))
    yield sink
    sink.stop()


@pytest.fixture()
def ui_base_url(monkeypatch):
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", BASE_URL)
    return BASE_URL


@pytest.fixture()
def alerts_warehouse(warehouse, warehouse_conn):
    warehouse_conn("alerts_warehouse")
    return warehouse


def smtp_config(**overrides) -> AlertConfig:
    values = {
        "channels": ("smtp",),
        "smtp_conn_id": "smtp_alerts",
        "email_to": ALERT_TO,
        "warehouse_conn_id": "alerts_warehouse",
        **overrides,
    }
    return AlertConfig(**values)


# ------------------------------------------------------------------ a failed task, by e-mail, through dag.test()


def run_test_dag(dag, **kwargs):
    """``dag.test()`` for a DAG defined in a test: Airflow 3 only runs DAGs it finds serialized in a bundle,
    so the DAG is written to the metadata DB under the dags-folder bundle first."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    DagBundlesManager().sync_bundles_to_db()  # a fresh metadata DB has no bundle rows yet
    bag = DagBag(collect_dags=False)
    bag.bag_dag(dag)
    sync_bag_to_db(bag, "dags-folder", None)
    return dag.test(**kwargs)


def build_failing_dag(notifier, engine):
    from airflow.sdk import dag, task

    @dag(
        dag_id=f"alerts_probe__{ACCOUNT}",
        schedule=None,
        catchup=False,
        # retries=0: dag.test() would otherwise sit out the retry delays.
        default_args={"owner": "tests", "retries": 0, "on_failure_callback": notifier},
    )
    def alerts_probe():
        @task
        def match_sales(**context):
            start = datetime(2026, 11, 26, 23, tzinfo=UTC)
            record_stage(
                engine,
                context["run_id"],
                ACCOUNT,
                DAY,
                (start, start + timedelta(days=1)),
                "intake",
                # Strings in the counts (warnings, paths) never reach an alert; numbers do.
                {"read": 17, "quarantined": {"phone_too_short": 2}, "warnings": ["caller +4791234567 odd"]},
            )
            raise ValueError(
                "Google rejected caller +4791234567 (national 91234567, printed 912 34 567) "
                "for the call at 2026-11-27 10:00:00"
            )

        match_sales()

    return alerts_probe()


@pytest.mark.integration
def test_a_failed_task_sends_an_email_without_the_phone_number(airflow_db, alerts_warehouse, smtp_sink, ui_base_url):
    dag = build_failing_dag(failure_notifier(config=smtp_config()), alerts_warehouse)
    dag_run = run_test_dag(dag)
    assert dag_run.state == "failed"

    [mail] = smtp_sink.wait_for(1)
    assert f"alerts_probe__{ACCOUNT}" in mail.subject and "failed" in mail.subject
    assert mail.subject == f"[call-conversions] alerts_probe__{ACCOUNT} failed: task match_sales (account {ACCOUNT})"
    assert set(mail.rcpt_tos) == set(ALERT_TO)
    assert mail.mail_from == "airflow@example.test"
    assert_no_phone(mail.everything())

    body = mail.body()
    assert "ValueError" in body
    assert "Google rejected caller +*** (national +***, printed +***) for the call at 2026-11-27 10:00:00" in body
    assert dag_run.run_id in body and "match_sales" in body and ACCOUNT in body
    assert "intake.read: 17" in body and "intake.quarantined.phone_too_short: 2" in body
    assert "odd" not in body  # the warning text stayed out
    link = f"{BASE_URL}/dags/alerts_probe__{ACCOUNT}/runs/"
    assert link in body and "/tasks/match_sales?try_number=1" in body


def build_rerun_like_dag(notifier, engine):
    """Like the rerun DAG: one run, mapped over (account, day); the second day fails."""
    from airflow.sdk import dag, task

    @dag(dag_id="alerts_rerun_probe", schedule=None, catchup=False, default_args={"retries": 0})
    def alerts_rerun_probe():
        @task(on_failure_callback=notifier)
        def match_sales(account_id: str, day: str, **context):
            start = datetime.fromisoformat(day).replace(tzinfo=UTC)
            window = (start, start + timedelta(days=1))
            business_date = date.fromisoformat(day)
            record_stage(engine, context["run_id"], account_id, business_date, window, "intake", {"read": 5})
            if day == "2026-11-27":
                raise KeyError("no sale for 0047 912 34 567")

        match_sales.expand_kwargs(
            [{"account_id": ACCOUNT, "day": "2026-11-26"}, {"account_id": ACCOUNT, "day": "2026-11-27"}]
        )

    return alerts_rerun_probe()


@pytest.mark.integration
def test_a_mapped_rerun_task_names_its_account_and_day(airflow_db, alerts_warehouse, smtp_sink, ui_base_url):
    dag_run = run_test_dag(build_rerun_like_dag(failure_notifier(config=smtp_config()), alerts_warehouse))
    assert dag_run.state == "failed"
    [mail] = smtp_sink.wait_for(1)
    assert mail.subject == f"[call-conversions] alerts_rerun_probe failed: task match_sales (account {ACCOUNT})"
    body = mail.body()
    assert "2026-11-27" in body and "KeyError" in body and "no sale for +***" in body
    assert "2026-11-27 intake.read: 5" in body and "2026-11-26 intake.read" not in body
    assert "/tasks/match_sales/mapped/1?try_number=1" in body
    assert_no_phone(mail.everything())


@pytest.mark.integration
def test_a_broken_alert_channel_is_logged_and_does_not_raise(airflow_db, smtp_sink, caplog, monkeypatch):
    sink = SmtpSink()  # never started: nothing listens on its port
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_ALERTS", sink.connection_json())
    notifier = failure_notifier(config=smtp_config(warehouse_conn_id=None))
    context = {
        "ti": SimpleNamespace(dag_id="d__acme", task_id="t", run_id="r", try_number=1, map_index=-1),
        "exception": RuntimeError("caller +4791234567"),
    }
    notifier(context)  # the callback must not raise
    assert "failure alert not sent" in caplog.text
    assert_no_phone(caplog.text)
    assert smtp_sink.messages == []


# ------------------------------------------------------------------ anomalies


def summary(day: date, run_id: str, rate: float | None, read: int = 200, updated: datetime | None = None) -> dict:
    sales = 100 if rate is not None else 0
    hits = round((rate or 0) * sales)
    start = datetime.combine(day, datetime.min.time(), tzinfo=UTC)
    counts = {
        "intake": {"files_seen": 1, "files_already_imported": 0, "read": read, "quarantined": {}},
        "match": {
            "sales": sales,
            "matched": hits,
            "unmatched": {},
            "match_rate": hits / sales if sales else None,
        },
    }
    return {
        "run_id": run_id,
        "account_id": ACCOUNT,
        "business_date": day,
        "window_start": start,
        "window_end": start + timedelta(days=1),
        "counts": counts,
        "updated_at": updated or start + timedelta(days=1, hours=1),
    }


def parked(count: int) -> list[dict]:
    moment = datetime(2026, 11, 26, 9, tzinfo=UTC)
    return [
        {
            "conversion_key": f"parked-{n}",
            "account_id": ACCOUNT,
            "business_date": DAY,
            "state": "parked",
            "caller_e164": f"+47912345{n:02d}",
            "call_start": moment,
            "conversion_action_id": "111",
            "conversion_time": moment,
            "park_until": moment + timedelta(days=2),
            "run_id": "earlier",
        }
        for n in range(count)
    ]


def seed_history(engine, *, with_today: str | None = None) -> None:
    """Seven usual days at 85-90%, one of them rerun; plus, if named, today's run at 50%."""
    rows = [
        summary(DAY - timedelta(days=n), f"scheduled__d{n}", rate)
        for n, rate in enumerate((0.88, 0.90, 0.85, 0.87, 0.86, 0.89, 0.90), start=1)
    ]
    # The day before yesterday also has an earlier run at 20%: the later run speaks for the day.
    rows.append(
        summary(DAY - timedelta(days=2), "manual__a_rerun", 0.20, updated=datetime(2026, 11, 25, 0, tzinfo=UTC))
    )
    if with_today:
        rows.append(summary(DAY, with_today, 0.50))
    with engine.begin() as connection:
        connection.execute(run_summary.insert(), rows)
        connection.execute(upload_ledger.insert(), parked(3))


@pytest.mark.integration
def test_anomalies_are_emailed_with_their_numbers(airflow_db, warehouse, smtp_sink, ui_base_url):
    run_id = "scheduled__2026-11-27T23:00:00+00:00"
    seed_history(warehouse, with_today=run_id)
    anomalies = check_run(warehouse, ACCOUNT, run_id, DAY, Thresholds(parked_max=2))
    assert [a.code for a in anomalies] == [MATCH_RATE_DROP, PARKED_PILE_UP]
    assert anomalies[0].values["median_match_rate"] == pytest.approx(0.88)

    delivered = send_anomaly_alert(
        anomalies,
        smtp_config(),
        dag_id=f"call_conversions_import__{ACCOUNT}",
        run_id=run_id,
        log_url=f"{BASE_URL}/dags/call_conversions_import__{ACCOUNT}/runs/x/tasks/check_anomalies",
    )
    assert delivered == ["smtp"]
    [mail] = smtp_sink.wait_for(1)
    assert mail.subject == (
        f"[call-conversions] 2 anomalies (match_rate_drop, parked_pile_up) for account {ACCOUNT} 2026-11-27"
    )
    body = mail.body()
    assert "match rate 50% is 38.0 points below the median 88% of the last 7 days" in body
    assert "3 conversions are parked in the upload ledger (alert above 2)" in body
    assert "drop_points=38.0" in body and "parked=3" in body
    assert f"{BASE_URL}/dags/call_conversions_import__{ACCOUNT}/runs/x/tasks/check_anomalies" in body
    assert_no_phone(mail.everything())
    assert "+47912345" not in mail.everything()


def test_no_anomalies_send_nothing(smtp_sink):
    assert send_anomaly_alert([], smtp_config()) == []
    assert smtp_sink.messages == []


def test_without_a_channel_an_alert_is_only_logged(caplog):
    anomaly = SimpleNamespace(code="no_data", message="no rows", values={}, account_id=ACCOUNT, business_date=DAY)
    assert send_anomaly_alert([anomaly], AlertConfig()) == []
    assert "no alert channel configured" in caplog.text


def build_anomaly_dag(config: AlertConfig):
    from airflow.sdk import dag, task
    from airflow.timetables.interval import CronDataIntervalTimetable

    @dag(
        dag_id=f"alerts_anomaly_probe__{ACCOUNT}",
        schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
        catchup=False,
        default_args={"retries": 0},
    )
    def alerts_anomaly_probe():
        @task
        def match_sales(**context):
            """Stands in for the import's stages: today's counts, as they would have recorded them."""
            row = summary(DAY, context["run_id"], 0.50)
            record_stage(
                _engine(),
                context["run_id"],
                ACCOUNT,
                DAY,
                (row["window_start"], row["window_end"]),
                "match",
                row["counts"]["match"],
            )
            record_stage(
                _engine(),
                context["run_id"],
                ACCOUNT,
                DAY,
                (row["window_start"], row["window_end"]),
                "intake",
                row["counts"]["intake"],
            )

        @task
        def check(**context):
            return check_anomalies(ACCOUNT, context, config=config, thresholds=Thresholds(parked_max=2))

        match_sales() >> check()

    return alerts_anomaly_probe()


def _engine():
    from callconv.runtime import warehouse_engine

    return warehouse_engine("alerts_warehouse")


@pytest.fixture()
def project_config(write_settings):
    write_settings(
        {
            "id": ACCOUNT,
            "customer_id": "1112223333",
            "timezone": "UTC",
            "conversion_actions": {"sale": {"id": "111", "name": "Sale"}},
        },
        warehouse_conn_id="alerts_warehouse",
    )


@pytest.mark.integration
def test_the_anomaly_task_alerts_by_email_and_webhook_and_records_what_it_found(
    airflow_db, alerts_warehouse, project_config, smtp_sink, webhook_sink, ui_base_url
):
    seed_history(alerts_warehouse)
    config = smtp_config(channels=("smtp", "webhook"), webhook_conn_id="alerts_webhook")
    dag_run = run_test_dag(build_anomaly_dag(config), logical_date=datetime(2026, 11, 28, tzinfo=UTC))
    assert dag_run.state == "success"
    assert dag_run.data_interval_start == datetime(2026, 11, 27, tzinfo=UTC)

    [mail] = smtp_sink.wait_for(1)
    assert "2 anomalies" in mail.subject and ACCOUNT in mail.subject
    assert f"{BASE_URL}/dags/alerts_anomaly_probe__{ACCOUNT}/runs/" in mail.body()
    assert "/tasks/check?try_number=1" in mail.body()
    assert_no_phone(mail.everything())

    [post] = webhook_sink.posts
    assert post["content_type"].startswith("application/json")
    payload = post["json"]
    assert payload["event"] == "anomalies"
    assert payload["account_id"] == ACCOUNT and payload["business_date"] == "2026-11-27"
    assert payload["run_id"] == dag_run.run_id
    assert [a["code"] for a in payload["anomalies"]] == [MATCH_RATE_DROP, PARKED_PILE_UP]
    assert payload["anomalies"][1]["values"] == {"parked": 3, "threshold": 2}
    assert_no_phone(json.dumps(payload))

    with alerts_warehouse.connect() as connection:
        counts = connection.scalar(sa.select(run_summary.c.counts).where(run_summary.c.run_id == dag_run.run_id))
    assert counts["anomalies"]["found"] == [MATCH_RATE_DROP, PARKED_PILE_UP]
    assert counts["anomalies"]["alerted"] == ["smtp", "webhook"] and counts["anomalies"]["alert_failed"] is False
    assert counts["anomalies"]["values"][PARKED_PILE_UP] == {"parked": 3, "threshold": 2}


@pytest.mark.integration
def test_the_anomaly_task_records_its_findings_then_fails_when_no_channel_takes_the_alert(
    airflow_db, alerts_warehouse, project_config, monkeypatch
):
    seed_history(alerts_warehouse)
    run_id = "scheduled__2026-11-28T00:00:00+00:00"
    record_stage(
        alerts_warehouse,
        run_id,
        ACCOUNT,
        DAY,
        (datetime(2026, 11, 27, tzinfo=UTC), datetime(2026, 11, 28, tzinfo=UTC)),
        "match",
        summary(DAY, run_id, 0.50)["counts"]["match"],
    )
    sink = WebhookSink(status=503).start()
    try:
        monkeypatch.setenv("AIRFLOW_CONN_ALERTS_WEBHOOK", json.dumps({"conn_type": "http", "host": sink.url}))
        context = {
            "run_id": run_id,
            "data_interval_start": datetime(2026, 11, 27, tzinfo=UTC),
            "data_interval_end": datetime(2026, 11, 28, tzinfo=UTC),
        }
        config = AlertConfig(channels=("webhook",), webhook_conn_id="alerts_webhook")
        with pytest.raises(AlertDeliveryError, match="HTTP 503"):
            check_anomalies(ACCOUNT, context, config=config)
    finally:
        sink.stop()
    with alerts_warehouse.connect() as connection:
        counts = connection.scalar(sa.select(run_summary.c.counts).where(run_summary.c.run_id == run_id))
    assert counts["anomalies"]["found"] == [MATCH_RATE_DROP]  # 3 parked is under the default 500
    assert counts["anomalies"]["alerted"] == [] and counts["anomalies"]["alert_failed"] is True


# ------------------------------------------------------------------ webhooks


@pytest.mark.integration
def test_a_failure_goes_to_slack_as_text_without_the_phone_number(airflow_db, webhook_sink, ui_base_url):
    config = AlertConfig(channels=("slack",), webhook_conn_id="alerts_webhook")
    context = {
        "ti": SimpleNamespace(
            dag_id=f"call_conversions_import__{ACCOUNT}",
            task_id="upload_conversions",
            run_id="scheduled__2026-11-27T23:00:00+00:00",
            try_number=3,
            map_index=-1,
        ),
        "exception": ConnectionError("upload of +47 912 34 567 refused; retry 91234567 later"),
    }
    assert failure_notifier(config=config).notify(context) == ["slack"]
    [post] = webhook_sink.posts
    assert list(post["json"]) == ["text"]
    text = post["json"]["text"]
    assert text.startswith(f"*[call-conversions] call_conversions_import__{ACCOUNT} failed: task upload_conversions")
    assert "ConnectionError" in text and "upload of +*** refused; retry +*** later" in text
    assert (
        f"{BASE_URL}/dags/call_conversions_import__{ACCOUNT}/runs/scheduled__2026-11-27T23%3A00%3A00%2B00%3A00/" in text
    )
    assert "/tasks/upload_conversions?try_number=3" in text
    assert_no_phone(text)


@pytest.mark.integration
def test_a_webhook_that_answers_an_error_fails_without_showing_its_url(airflow_db, monkeypatch):
    sink = WebhookSink(status=500).start()
    try:
        monkeypatch.setenv("AIRFLOW_CONN_ALERTS_WEBHOOK", json.dumps({"conn_type": "http", "extra": {"url": sink.url}}))
        anomaly = SimpleNamespace(
            code="no_data", message="no CRM rows read", values={"read": 0}, account_id=ACCOUNT, business_date=DAY
        )
        with pytest.raises(AlertDeliveryError) as raised:
            send_anomaly_alert([anomaly], AlertConfig(channels=("webhook",), webhook_conn_id="alerts_webhook"))
        assert "HTTP 500" in str(raised.value)
        assert str(sink.port) not in str(raised.value)
        assert len(sink.posts) == 1
    finally:
        sink.stop()


# ------------------------------------------------------------------ the text of an alert (no services)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("caller +4791234567 rejected", "caller +*** rejected"),
        ("caller 91234567 rejected", "caller +*** rejected"),
        ("caller 912 34 567 rejected", "caller +*** rejected"),
        ("caller (+47) 93.45.67.89", "caller (+***"),
        ("call at 2026-11-27 10:00:00+01:00 failed", "call at 2026-11-27 10:00:00+01:00 failed"),
        ("row 12 of 345 rows", "row 12 of 345 rows"),
        ("customer 123456 ok", "customer 123456 ok"),
        ("checksum ab1234567cd", "checksum ab1234567cd"),
        ("line one\n  line two", "line one line two"),
    ],
)
def test_sanitise_masks_phone_numbers_and_keeps_the_rest(raw, expected):
    assert sanitise(raw) == expected


def test_sanitise_cuts_long_messages():
    assert len(sanitise("x" * 2000)) == 500


def test_a_failed_run_without_a_task_still_makes_a_message():
    context = {
        "dag_run": SimpleNamespace(dag_id="call_conversions_import__acme", run_id="r1"),
        "reason": "task_failure",
    }
    message = failure_message(context)
    assert message.event == "dag_failed"
    assert message.subject == "[call-conversions] call_conversions_import__acme failed: run (account acme)"
    assert message.fields["error_message"] == "task_failure"


def test_a_pydantic_alerts_section_gives_the_config_and_the_thresholds():
    from callconv.config import Alerts

    settings = SimpleNamespace(
        warehouse_conn_id="wh",
        alerts=Alerts(channels=["smtp"], email_to=["oncall@example.test"], parked_max=50),
    )
    config = AlertConfig.from_settings(settings)
    assert config == AlertConfig(channels=("smtp",), email_to=("oncall@example.test",), warehouse_conn_id="wh")
    assert Thresholds.from_settings(settings) == Thresholds(parked_max=50)
    assert AlertConfig.from_settings(SimpleNamespace(warehouse_conn_id="wh", alerts=Alerts())).channels == ()


def test_the_alert_config_comes_from_the_settings_alerts_section():
    settings = SimpleNamespace(
        warehouse_conn_id="wh",
        alerts=SimpleNamespace(channels=["smtp", "slack"], email_to=["a@example.test"], smtp_conn_id="mail"),
    )
    config = AlertConfig.from_settings(settings)
    assert config.channels == ("smtp", "slack") and config.email_to == ("a@example.test",)
    assert config.smtp_conn_id == "mail" and config.warehouse_conn_id == "wh"
    assert AlertConfig.from_settings(SimpleNamespace(warehouse_conn_id="wh")).channels == ()
    assert AlertConfig.from_settings(config, smtp_conn_id="other").smtp_conn_id == "other"
    with pytest.raises(ValueError, match="email_to"):
        AlertConfig(channels=("smtp",))
    with pytest.raises(ValueError, match="unknown alert channel"):
        AlertConfig(channels=("pager",))
