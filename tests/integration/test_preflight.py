"""The preflight against both sandboxes, through the real clients: one line per account, ok or what to fix.

One Google Ads sandbox plays a customer whose actions are an enabled call import, a removed
one and a web action; one Data Manager sandbox plays the same customer for the Data Manager
API. The config has an account for each case, and the command runs once over all of them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

from callconv.delivery.ads_client import mask_phone_numbers
from callconv.preflight import SYNTHETIC_CALLER
from callconv.sandbox import ActionSpec, SandboxServer
from callconv.sandbox.data_manager import DataManagerSandbox, DmAction

pytestmark = pytest.mark.integration

PROJECT = Path(__file__).resolve().parents[2]
CUSTOMER = "1112223333"
ADS_TOKEN, DM_TOKEN = "preflight-ads-token", "preflight-dm-token"
# account id -> (customer, delivery, action id)
ACCOUNTS = {
    "good": (CUSTOMER, "api", "111"),
    "disabled": (CUSTOMER, "api", "222"),
    "wrong_type": (CUSTOMER, "api", "333"),
    "wrong_customer": ("9998887777", "api", "111"),
    "dm_good": (CUSTOMER, "data_manager", "444"),
    "dm_disabled": (CUSTOMER, "data_manager", "445"),
    "by_file": (CUSTOMER, "file", "111"),
}
OSLO = ZoneInfo("Europe/Oslo")
RUN_END = datetime(2026, 11, 28, tzinfo=OSLO)  # the end of an Oslo day


def connections(ads: SandboxServer, dm_endpoint_cert: str, ads_token: str = ADS_TOKEN) -> dict[str, str]:
    ads_extra = {"sandbox": True, **ads.client_settings(), "access_token": ads_token}
    return {
        "AIRFLOW_CONN_GOOGLE_ADS_DEFAULT": json.dumps({"conn_type": "google_ads", "extra": ads_extra}),
        "AIRFLOW_CONN_GOOGLE_DATA_MANAGER": json.dumps(
            {"conn_type": "google_cloud_platform", "extra": {"access_token": DM_TOKEN, "ca_certs": dm_endpoint_cert}}
        ),
        "AIRFLOW_CONN_CALL_CONVERSIONS_SFTP": json.dumps({"conn_type": "sftp", "host": "127.0.0.1", "login": "g"}),
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory, sandbox_cert):
    """Both sandboxes, the config of every case and the connections that reach them, for the module."""
    ads = SandboxServer(
        customers={
            CUSTOMER: [
                ActionSpec(id="111", name="Phone sale"),
                ActionSpec(id="222", name="Old phone sale", status="REMOVED"),
                ActionSpec(id="333", name="Web sale", type="WEBPAGE"),
            ]
        },
        access_token=ADS_TOKEN,
        cert_dir=sandbox_cert.parent,
    ).start()
    dm = DataManagerSandbox(
        [DmAction(CUSTOMER, "444"), DmAction(CUSTOMER, "445", status="REMOVED")],
        token=DM_TOKEN,
        cert_dir=sandbox_cert.parent,
    )
    dm_endpoint = dm.start()
    folder = tmp_path_factory.mktemp("preflight")
    config = {
        "export_uri": str(folder / "export"),
        "data_docs_uri": str(folder / "docs"),
        "archive_uri": str(folder / "archive"),
        "quarantine_uri": str(folder / "quarantine"),
        "crm_source": {
            "landing_uri": str(folder / "landing"),
            "columns": {"caller_phone": "p", "conversion_time": "t", "outcome": "o"},
        },
        "data_manager": {"api_endpoint": dm_endpoint},
        "accounts": [
            {
                "id": account_id,
                "customer_id": customer,
                "timezone": "Europe/Oslo",
                "default_region": "NO",
                "default_currency": "NOK",
                "delivery": delivery,
                "conversion_actions": {"sale": {"id": action, "name": f"Action {action}"}},
            }
            for account_id, (customer, delivery, action) in ACCOUNTS.items()
        ],
    }
    path = folder / "call_conversions.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {"CALL_CONVERSIONS_CONFIG": str(path), **connections(ads, str(dm.cert_path))}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        yield ads, dm, env
    ads.stop()
    dm.stop()


@pytest.fixture(scope="module")
def command(world):
    """``python -m callconv.preflight`` over every account, run once as an operator would."""
    ads, dm, env = world
    result = subprocess.run(
        [sys.executable, "-m", "callconv.preflight"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PROJECT,
    )
    lines = result.stdout.splitlines()
    return result, dict(line.split(": ", 1) for line in lines), lines


def test_the_command_prints_one_line_per_account_and_fails_when_one_is_not_ok(command):
    result, by_account, lines = command
    assert result.returncode == 1, result.stdout + result.stderr
    assert [line.split(": ", 1)[0] for line in lines] == list(ACCOUNTS)


def test_a_good_account_is_ok(command):
    _, by_account, _ = command
    assert by_account["good"] == "ok"
    assert by_account["dm_good"] == "ok"
    assert by_account["by_file"] == "ok"


def test_each_set_up_problem_is_one_line_naming_what_to_fix(command):
    _, by_account, _ = command
    disabled = by_account["disabled"]
    assert "conversion action 222" in disabled and "REMOVED, not ENABLED" in disabled and "enable it" in disabled
    wrong_type = by_account["wrong_type"]
    assert "conversion action 333" in wrong_type and "of type WEBPAGE, not UPLOAD_CALLS" in wrong_type
    wrong_customer = by_account["wrong_customer"]
    assert "999-888-7777" in wrong_customer and "accounts[wrong_customer].customer_id" in wrong_customer
    assert "USER_PERMISSION_DENIED" in wrong_customer
    dm_disabled = by_account["dm_disabled"]
    assert "conversion action 445" in dm_disabled and "INVALID_CONVERSION_ACTION_ID" in dm_disabled


def test_no_phone_number_is_printed(command):
    result, _, _ = command
    output = result.stdout + result.stderr
    assert SYNTHETIC_CALLER.lstrip("+") not in output
    assert mask_phone_numbers(output) == output


def test_google_ads_is_asked_by_gaql_then_with_one_validate_only_conversion(command, world):
    ads, _, _ = world
    queried = {(search["customer_id"], search["query"]) for search in ads.searches}
    assert {customer for customer, _ in queried} == {CUSTOMER, "9998887777"}
    assert all(re.match(r"SELECT conversion_action\.id, .+ FROM conversion_action WHERE", q) for _, q in queried)
    # Only the account whose actions passed goes on to the test upload, which records nothing.
    assert [(r["customer_id"], r["rows"], r["validate_only"]) for r in ads.requests] == [(CUSTOMER, 1, True)]
    assert ads.uploads() == [] and ads.accepted() == []


def test_the_data_manager_check_is_one_validate_only_event_sent_hashed(command, world):
    _, dm, _ = world
    bodies = [json.loads(raw) for raw in dm.received]
    assert sorted(body["destinations"][0]["productDestinationId"] for body in bodies) == ["444", "445"]
    for raw, body in zip(dm.received, bodies, strict=True):
        assert body["validateOnly"] is True and len(body["events"]) == 1
        phone = body["events"][0]["userData"]["userIdentifiers"][0]["phoneNumber"]
        assert re.fullmatch(r"[0-9a-f]{64}", phone)
        assert SYNTHETIC_CALLER.lstrip("+").encode() not in raw
    assert dm.requests == {} and dm.ingests == 0  # validateOnly: nothing taken in


def test_missing_or_refused_credentials_are_one_line_each(world, monkeypatch, capsys):
    from callconv.preflight import main

    ads, dm, env = world
    searches = len(ads.searches)
    monkeypatch.delenv("AIRFLOW_CONN_GOOGLE_ADS_DEFAULT")
    monkeypatch.delenv("AIRFLOW_CONN_GOOGLE_DATA_MANAGER")
    assert main([]) == 1
    missing = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    for account_id, (_, delivery, _) in ACCOUNTS.items():
        if delivery == "api":
            assert missing[account_id].startswith("no usable Google Ads credentials"), missing[account_id]
            assert "'google_ads_default'" in missing[account_id]
        elif delivery == "data_manager":
            assert missing[account_id].startswith("no usable Data Manager credentials"), missing[account_id]
            assert "'google_data_manager'" in missing[account_id]
    assert len(ads.searches) == searches  # nothing was asked without credentials

    monkeypatch.setenv(
        "AIRFLOW_CONN_GOOGLE_ADS_DEFAULT",
        connections(ads, str(dm.cert_path), "expired")["AIRFLOW_CONN_GOOGLE_ADS_DEFAULT"],
    )
    assert main([]) == 1
    refused = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert "rejected the credentials of the Airflow connection 'google_ads_default'" in refused["good"]
    assert "OAUTH_TOKEN_INVALID" in refused["good"]


def test_an_outage_is_left_to_retries_not_failed_at_once(world, make_sandbox, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    from callconv.steps import PreflightUnreachable, preflight

    ads, dm, _ = world
    gone = make_sandbox(customers={CUSTOMER: [ActionSpec(id="111", name="Phone sale")]}, access_token=ADS_TOKEN)
    gone.start()
    env = connections(gone, str(dm.cert_path))
    gone.stop()
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_ADS_DEFAULT", env["AIRFLOW_CONN_GOOGLE_ADS_DEFAULT"])
    context = {"data_interval_start": RUN_END - timedelta(days=1), "data_interval_end": RUN_END, "run_id": "t"}
    with pytest.raises(PreflightUnreachable, match="could not be reached") as raised:
        preflight("good", context)
    assert not isinstance(raised.value, AirflowFailException)


def test_the_import_dag_fails_at_once_on_a_set_up_problem(world, airflow_db):
    """The first task fails without a retry, and none of the day's work starts."""
    from dags.call_conversion_import import build_import_dag

    dag = build_import_dag("disabled", "Europe/Oslo")
    # Were the failure retried, it would be quickly: three tries, not one, would show it.
    dag.get_task("preflight").retry_delay = timedelta(seconds=1)
    dag.get_task("preflight").retry_exponential_backoff = False
    run = dag.test(logical_date=RUN_END)
    assert run.state == "failed"
    states = {ti.task_id: (ti.state, ti.try_number) for ti in run.get_task_instances()}
    assert states["preflight"] == ("failed", 1)
    assert {state for task_id, (state, _) in states.items() if task_id != "preflight"} == {"upstream_failed"}
