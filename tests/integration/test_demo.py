"""The demo a newcomer runs (``make demo``), end to end on a copy of the shipped config.

The shipped config has two accounts, one per delivery path: nordic_plumbing uploads to the
Google Ads sandbox, svea_heat_pumps sends through the Data Manager sandbox. The demo runs the
default day and then another one once per module (two ``make demo`` runs, each two
``airflow dags test``); the tests below read what it printed and what the warehouse holds.

It must end with a summary per account; the Google Ads account's conversion file must be a
valid call conversion import template; the Data Manager account's events must leave hashed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from callconv.delivery.conversion_file import TEMPLATE_HEADER
from callconv.schema import data_manager_requests, upload_ledger

pytestmark = pytest.mark.integration

PROJECT = Path(__file__).resolve().parents[2]
TIME = r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}[+-]\d{2}:\d{2}"  # with its offset
ADS, DM = "nordic_plumbing", "svea_heat_pumps"
FIRST, SECOND = "2026-11-27", "2026-11-26"


def demo_config(tmp_path) -> dict:
    config = yaml.safe_load((PROJECT / "config" / "call_conversions.yaml").read_text())
    for key in ("export_uri", "data_docs_uri", "archive_uri", "quarantine_uri"):
        config[key] = str(tmp_path / key)
    config["crm_source"]["landing_uri"] = str(tmp_path / "landing")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    return config


def run_demo(tmp_path, day: str) -> subprocess.CompletedProcess:
    warehouse_url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    env = {
        **os.environ,
        "CALL_CONVERSIONS_CONFIG": str(tmp_path / "config.yaml"),
        "AIRFLOW_CONN_CALL_CONVERSIONS_WAREHOUSE": json.dumps(
            {"conn_type": "generic", "extra": {"sqlalchemy_url": warehouse_url}}
        ),
    }
    env.pop("CALL_CONVERSIONS_ENCRYPTION_KEYS", None)  # the demo opts out of encryption, and says so
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "callconv.demo",
            "run",
            "--date",
            day,
            "--warehouse-url",
            warehouse_url,
            "--log",
            str(tmp_path / f"run-{day}.log"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PROJECT,
    )
    assert result.returncode == 0, (
        result.stdout[-3000:] + result.stderr[-3000:] + (tmp_path / f"run-{day}.log").read_text()[-3000:]
    )
    return result


@dataclass
class Demo:
    root: Path
    config: dict
    first: dict[str, str]  # account -> its summary of the default day
    second: dict[str, str]  # account -> its summary of the other day, run after
    engine: sa.Engine


def summaries(stdout: str) -> dict[str, str]:
    """Each account's summary block, from its 'Account ...' line to the next run or the end."""
    blocks = re.split(r"^(?=Account |Running )", stdout, flags=re.MULTILINE)
    return {block.split()[1].rstrip(","): block for block in blocks if block.startswith("Account ")}


@pytest.fixture(scope="module")
def demo(tmp_path_factory, airflow_db):
    root = tmp_path_factory.mktemp("demo")
    config = demo_config(root)
    first = summaries(run_demo(root, FIRST).stdout)
    second = summaries(run_demo(root, SECOND).stdout)
    engine = sa.create_engine(f"sqlite:///{root / 'warehouse.db'}")
    yield Demo(root, config, first, second, engine)
    engine.dispose()


def number(pattern: str, text: str, group: int = 1) -> int:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in:\n{text}"
    return int(found.group(group))


def test_both_accounts_run_each_through_its_own_path(demo):
    assert set(demo.first) == set(demo.second) == {ADS, DM}
    assert f"Account {ADS}, day {FIRST} (Europe/Oslo), through the Google Ads API" in demo.first[ADS]
    assert f"Account {DM}, day {FIRST} (Europe/Stockholm), through the Data Manager API" in demo.first[DM]
    assert "this run uploaded:" in demo.first[ADS] and "this run sent:" not in demo.first[ADS]
    assert "this run sent:" in demo.first[DM] and "this run uploaded:" not in demo.first[DM]
    assert "encryption is disabled in the config" in (demo.root / f"run-{FIRST}.log").read_text()


def test_demo_runs_the_day_uploads_and_writes_a_valid_template(demo):
    summary = demo.first[ADS]
    accepted = number(r"this run uploaded:\s+sent (\d+), accepted (\d+)", summary, 2)
    assert accepted > 50
    assert f"sandbox holds:      {accepted} accepted conversions" in summary

    files = list((demo.root / "export_uri" / ADS / FIRST).glob("*.csv"))
    assert len(files) == 1
    rows = list(csv.reader(files[0].read_text(encoding="utf-8").splitlines()))
    assert rows[0] == ["Parameters:TimeZone=Europe/Oslo"]
    assert tuple(rows[1]) == TEMPLATE_HEADER
    assert len(rows) - 2 == accepted
    names = {action["name"] for action in demo.config["accounts"][0]["conversion_actions"].values()}
    for phone, call_start, name, conversion_time, value, currency, user_data, personalization in rows[2:]:
        assert re.fullmatch(r"\t\+47\d{8}", phone)
        assert re.fullmatch(TIME, call_start) and re.fullmatch(TIME, conversion_time)
        assert call_start < conversion_time
        assert name in names
        assert re.fullmatch(r"\d+(\.\d+)?", value) and currency == "NOK"
        assert (user_data, personalization) == ("Granted", "Denied")


def test_the_data_manager_account_sends_hashed_events_that_wait_in_processing_then_settle(demo):
    summary = demo.first[DM]
    sent = number(r"this run sent:\s+(\d+) events in (\d+) ingest request", summary)
    requests = number(r"this run sent:\s+(\d+) events in (\d+) ingest request", summary, 2)
    assert sent > 50 and requests == 2  # one request per conversion action
    # (A validateOnly check before the send, if the DAG makes one, is named apart and carries no row.)
    assert re.search(
        rf"sandbox received:   {requests} ingest request\(s\) with {sent} events"
        r"(, and \d+ validateOnly request\(s\))?; every phone number a SHA-256 hash\n",
        summary,
    )
    # Right after the run Google (and the sandbox) is still processing: the rows wait.
    assert f"upload ledger:      {{'processing': {sent}}}" in summary
    assert f"requestStatus now:  PROCESSING for {requests} request(s) of {sent} events" in summary
    # The settle step a later run starts with asks again, and the sandbox has finished.
    assert re.search(
        rf"settled as a later run starts .*: delivered {sent}, failed 0, parked 0, still processing 0", summary
    )
    assert f"upload ledger now:  {{'delivered': {sent}}}" in summary


def test_the_data_manager_sandbox_received_exactly_the_ledgers_events_hashed(demo):
    """What left is in data_manager_requests.body (the bytes sent, frozen before the send):
    one event per ledger row, its phone identifier the SHA-256 of the row's Swedish number."""
    with demo.engine.connect() as connection:
        ledger = connection.execute(
            sa.select(upload_ledger.c.state, upload_ledger.c.caller_e164, upload_ledger.c.delivered_by).where(
                upload_ledger.c.account_id == DM, upload_ledger.c.business_date == date.fromisoformat(FIRST)
            )
        ).all()
        sent = connection.execute(
            sa.select(data_manager_requests.c.state, data_manager_requests.c.body).where(
                data_manager_requests.c.account_id == DM
            )
        ).all()
    assert {(state, by) for state, _, by in ledger} == {("delivered", "dm")}
    assert all(re.fullmatch(r"\+46\d{9}", e164) for _, e164, _ in ledger)
    assert {state for state, _ in sent} == {"success"}
    customer = demo.config["accounts"][1]["customer_id"].replace("-", "")
    identifiers = []
    for _, raw in sent:
        text = raw.decode()
        body = json.loads(text)
        assert body["validateOnly"] is False
        identifiers += [e["userData"]["userIdentifiers"][0]["phoneNumber"] for e in body["events"]]
        # Outside the hashes no run of digits long enough to be a number, only the customer id and action ids.
        actions = {a["id"] for a in demo.config["accounts"][1]["conversion_actions"].values()}
        assert set(re.findall(r"\d{7,}", re.sub(r"[0-9a-f]{64}", "", text))) <= {customer} | {str(a) for a in actions}
        assert not re.search(r"\+\d", text)
    # The day's events, and the other day's (sent by the second demo run).
    first_day = {hashlib.sha256(e164.encode()).hexdigest() for _, e164, _ in ledger}
    assert first_day <= set(identifiers) and all(re.fullmatch(r"[0-9a-f]{64}", i) for i in identifiers)


def test_the_demo_runs_on_another_day_after_the_first(demo):
    """Each demo day adds its own calls and deals: a call id never changes caller and a deal id
    never repeats, so a second day runs through (it used to crash on a unique key)."""
    second = demo.second[ADS]
    assert f"Account {ADS}, day {SECOND} (Europe/Oslo)" in second
    matched = re.search(r"this run matched:\s+(\d+) of (\d+) sales into (\d+) conversions", second)
    assert matched and int(matched.group(1)) > 20
    assert int(matched.group(3)) <= int(matched.group(1))  # merges explain matched > uploaded
    accepted = number(r"this run uploaded:\s+sent (\d+), accepted (\d+)", second, 2)
    assert 0 < accepted <= int(matched.group(3))

    dm = demo.second[DM]
    assert f"Account {DM}, day {SECOND} (Europe/Stockholm)" in dm
    sent = number(r"this run sent:\s+(\d+) events", dm)
    assert sent > 20
    # The first day's requests were settled by the first run: nothing waited for this one.
    assert "it settled earlier requests first: none waited" in dm
    assert f"upload ledger now:  {{'delivered': {sent}}}" in dm
