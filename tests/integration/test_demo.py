"""The demo a newcomer runs (``make demo``), end to end on a copy of the shipped config.

It must end with a summary, and its conversion file must be a valid call
conversion import template: the time-zone row, the header, rows in the format.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from callconv.delivery.conversion_file import TEMPLATE_HEADER

pytestmark = pytest.mark.integration

PROJECT = Path(__file__).resolve().parents[2]
TIME = r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}[+-]\d{2}:\d{2}"  # with its offset


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
            str(tmp_path / "run.log"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PROJECT,
    )
    assert result.returncode == 0, (
        result.stdout[-3000:] + result.stderr[-3000:] + (tmp_path / "run.log").read_text()[-3000:]
    )
    return result


def test_demo_runs_the_day_uploads_and_writes_a_valid_template(tmp_path, airflow_db):
    config = demo_config(tmp_path)
    summary = run_demo(tmp_path, "2026-11-27").stdout
    assert "Account nordic_plumbing, day 2026-11-27 (Europe/Oslo)" in summary
    accepted = int(re.search(r"this run uploaded:\s+sent (\d+), accepted (\d+)", summary).group(2))
    assert accepted > 50
    assert f"sandbox holds:      {accepted} accepted conversions" in summary
    assert "encryption is disabled in the config" in (tmp_path / "run.log").read_text()

    files = list((tmp_path / "export_uri" / "nordic_plumbing" / "2026-11-27").glob("*.csv"))
    assert len(files) == 1
    rows = list(csv.reader(files[0].read_text(encoding="utf-8").splitlines()))
    assert rows[0] == ["Parameters:TimeZone=Europe/Oslo"]
    assert tuple(rows[1]) == TEMPLATE_HEADER
    assert len(rows) - 2 == accepted
    names = {action["name"] for action in config["accounts"][0]["conversion_actions"].values()}
    for phone, call_start, name, conversion_time, value, currency, user_data, personalization in rows[2:]:
        assert re.fullmatch(r"\t\+47\d{8}", phone)
        assert re.fullmatch(TIME, call_start) and re.fullmatch(TIME, conversion_time)
        assert call_start < conversion_time
        assert name in names
        assert re.fullmatch(r"\d+(\.\d+)?", value) and currency == "NOK"
        assert (user_data, personalization) == ("Granted", "Denied")


def test_the_demo_runs_on_another_day_after_the_first(tmp_path, airflow_db):
    """Each demo day adds its own calls and deals: a call id never changes caller and a deal id
    never repeats, so a second day runs through (it used to crash on a unique key)."""
    demo_config(tmp_path)
    first = run_demo(tmp_path, "2026-11-27").stdout
    second = run_demo(tmp_path, "2026-11-26").stdout

    assert "Account nordic_plumbing, day 2026-11-26 (Europe/Oslo)" in second
    matched = re.search(r"this run matched:\s+(\d+) of (\d+) sales into (\d+) conversions", second)
    assert matched and int(matched.group(1)) > 20
    assert int(matched.group(3)) <= int(matched.group(1))  # merges explain matched > uploaded
    accepted = int(re.search(r"this run uploaded:\s+sent (\d+), accepted (\d+)", second).group(2))
    assert 0 < accepted <= int(matched.group(3))
    assert "this run uploaded:" in first
