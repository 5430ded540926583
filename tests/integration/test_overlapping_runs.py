"""The daily import and an analyst's rerun of the same account-day, at the same time.

Two Airflow processes (each with its own metadata database, as two workers of
one deployment would have their own task processes) run the import DAG and the
rerun DAG for one day against the same warehouse and the same Google (the
sandbox). The final tables must be those of the import run alone, computed in a
second schema, and Google must have received each conversion once.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from callconv.sandbox import ActionSpec
from callconv.schema import (
    call_logs,
    crm_imports,
    crm_sales,
    delivery_conflicts,
    matches,
    quarantine,
    upload_ledger,
)

pytestmark = pytest.mark.integration

OSLO = ZoneInfo("Europe/Oslo")
ACCOUNT = "overlap"
CUSTOMER = "3334445555"
ACTION = "55"
DAY = "2026-11-27"
SALES = 300
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Which run wrote a row, and the bookkeeping of claims, differ by nature between runs.
VOLATILE = {"run_id", "sent_at", "request_id", "claimed_by", "lease_until"}

RUNNER = """
import sys
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

sys.path.insert(0, sys.argv[3])
kind, account = sys.argv[1:3]
if kind == "import":
    from dags.call_conversion_import import build_import_dag

    dag = build_import_dag(account, "Europe/Oslo")
    for task in dag.tasks:
        task.retries = 0
    run = dag.test(logical_date=datetime(2026, 11, 28, tzinfo=ZoneInfo("Europe/Oslo")))
else:
    from dags.call_conversions_rerun import build_rerun_dag

    dag = build_rerun_dag()
    for task in dag.tasks:
        task.retries = 0
    run = dag.test(run_conf={"start_date": "2026-11-27", "end_date": "2026-11-27", "accounts": [account]})
print("STATE", run.state, flush=True)
"""


def oslo(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=OSLO).astimezone(UTC)


def caller(n: int) -> str:
    return f"9{n:07d}"


def load_day(engine, landing: Path) -> list[tuple[str, datetime]]:
    """SALES sales, each on its own caller's forwarded call an hour before; returns the calls."""
    calls = [
        {
            "account_id": ACCOUNT,
            "source_call_id": f"c{n}",
            "caller_number": caller(n),
            "call_start": oslo("2026-11-27 08:00:00") + timedelta(seconds=n),
            "duration_seconds": 90,
            "via_google_forwarding": True,
        }
        for n in range(SALES)
    ]
    calls.append({**calls[0], "source_call_id": "late", "call_start": oslo("2026-11-27 23:59:00")})
    with engine.begin() as connection:
        connection.execute(call_logs.insert(), calls)
    folder = landing / ACCOUNT / DAY
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "deals.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "phone", "sold_at", "outcome", "value"])
        for n in range(SALES):
            writer.writerow([f"D{n}", caller(n), "2026-11-27 09:00:00", "sale", n % 7 * 10])
    return [(f"+47{caller(n)}", call["call_start"]) for n, call in enumerate(calls)]


def snapshot(engine) -> dict:
    tables = {}
    with engine.connect() as connection:
        for table in (crm_imports, crm_sales, quarantine, matches, upload_ledger, delivery_conflicts, call_logs):
            rows = connection.execute(sa.select(table).order_by(*table.primary_key.columns)).mappings().all()
            tables[table.name] = [{k: v for k, v in row.items() if k not in VOLATILE} for row in rows]
    return tables


@pytest.fixture()
def setting(tmp_path, write_settings, monkeypatch):
    def write(warehouse_url: str) -> None:
        monkeypatch.setenv(
            "AIRFLOW_CONN_OVERLAP_WAREHOUSE",
            json.dumps({"conn_type": "generic", "extra": {"sqlalchemy_url": warehouse_url}}),
        )
        write_settings(
            {
                "id": ACCOUNT,
                "customer_id": CUSTOMER,
                "timezone": "Europe/Oslo",
                "conversion_actions": {"sale": {"id": ACTION, "name": "Phone sale"}},
            },
            columns={"crm_id": "id", "caller_phone": "phone", "conversion_time": "sold_at", "outcome": "outcome"}
            | {"value": "value"},
            warehouse_conn_id="overlap_warehouse",
            upload={"batch_size": 25},
            freshness={"grace_minutes": 60},
        )

    return write


@pytest.fixture()
def second_schema(pg_admin_engine):
    from callconv.warehouse import migrate

    schema = f"t_{uuid.uuid4().hex[:12]}_ref"
    with pg_admin_engine.begin() as connection:
        connection.execute(sa.text(f'create schema "{schema}"'))
    url = pg_admin_engine.url.update_query_dict({"options": f"-csearch_path={schema}"})
    url_text = url.render_as_string(hide_password=False)
    migrate(url_text)
    engine = sa.create_engine(url_text)
    yield url_text, engine
    engine.dispose()
    with pg_admin_engine.begin() as connection:
        connection.execute(sa.text(f'drop schema "{schema}" cascade'))


def airflow_process(kind: str, home: Path, source_db: Path) -> subprocess.Popen:
    home.mkdir(parents=True)
    shutil.copy(source_db, home / "airflow.db")
    env = {**os.environ, "AIRFLOW_HOME": str(home)}
    env.pop("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", None)
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, kind, ACCOUNT, str(PROJECT_ROOT)],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_the_import_and_a_rerun_of_one_day_at_once_end_as_one_run_alone(
    tmp_path, warehouse, pg_schema_url, second_schema, airflow_db, setting, make_sandbox, sandbox_conn
):
    # Both at once, on the test schema.
    setting(pg_schema_url)
    calls = load_day(warehouse, tmp_path / "landing")
    both = make_sandbox(
        customers={CUSTOMER: [ActionSpec(id=ACTION, name="Phone sale")]},
        calls=calls,
        clock=lambda: oslo("2026-11-29 12:00:00"),
    )
    both.set_delay(0.1)  # 12 requests each way: the uploads have time to meet
    sandbox_conn(both.start())
    processes = [
        airflow_process(kind, tmp_path / f"airflow-{kind}", airflow_db / "airflow.db") for kind in ("import", "rerun")
    ]
    for process in processes:
        output, _ = process.communicate(timeout=900)
        assert "STATE success" in output, output[-4000:]
    together = snapshot(warehouse)

    # The import alone, on a fresh schema and a fresh Google.
    reference_url, reference = second_schema
    setting(reference_url)
    shutil.rmtree(tmp_path / "archive", ignore_errors=True)
    load_day(reference, tmp_path / "landing")
    alone = make_sandbox(
        customers={CUSTOMER: [ActionSpec(id=ACTION, name="Phone sale")]},
        calls=calls,
        clock=lambda: oslo("2026-11-29 12:00:00"),
    )
    sandbox_conn(alone.start())
    from dags.call_conversion_import import build_import_dag

    assert build_import_dag(ACCOUNT, "Europe/Oslo").test(logical_date=oslo("2026-11-28 00:00:00")).state == "success"
    reference_tables = snapshot(reference)

    sent_together = sum(len(request["payloads"]) for request in both.uploads())  # not the preflight's test
    print(f"overlapping runs: {sent_together} rows sent for {len(together['upload_ledger'])} conversions")
    assert len(reference_tables["upload_ledger"]) == SALES
    assert {row["state"] for row in together["upload_ledger"]} == {"uploaded"}
    assert together == reference_tables
    assert sent_together == SALES  # each conversion sent once, whichever run sent it
    assert {a.key for a in both.accepted()} == {a.key for a in alone.accepted()}
