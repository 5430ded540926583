"""Exactly once under SIGKILL: uploaders killed mid-request, sometimes two at once.

Jepsen-style: the history is checked, not a happy path. 10^4 conversions are
uploaded by uploader processes (the real google-ads client, TLS gRPC to the
sandbox) that are killed with SIGKILL at random points while requests are in
flight, with two uploaders racing in every other round. A short lease lets
later rounds take over what a killed uploader had claimed. A last uploader
finishes the job. Then the sandbox (playing Google, whose duplicate key is
caller, conversion time and action) must hold every conversion exactly once,
and any conversion it received more than once must have come as the same bytes
every time: an identical recovery resend, never a changed payload.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from test_upload import ACCESS_TOKEN, ACTION, CUSTOMER, DEV_TOKEN
from test_upload_scale import SANDBOX_NOW, seed, states

from callconv.delivery.ads_client import API_VERSION
from callconv.sandbox import ActionSpec

pytestmark = pytest.mark.integration

CONVERSIONS = 10_000
ROUNDS = 12
LEASE_SECONDS = 1.5
HERE = Path(__file__).resolve().parent

UPLOADER = """
import json, sys
from datetime import timedelta

import sqlalchemy as sa

sys.path.insert(0, sys.argv[5])
from test_upload import DAY_END, make_account

from callconv.delivery.ads_client import client_from_settings
from callconv.delivery.upload import upload_pending

url, settings, name, concurrent = sys.argv[1:5]
engine = sa.create_engine(url, hide_parameters=True)
outcome = upload_pending(
    engine, make_account(), client_from_settings(json.loads(settings)), DAY_END, name,
    batch_size=200, max_concurrent_batches=int(concurrent), lease=timedelta(seconds=float(sys.argv[6])),
    sleep=lambda seconds: None,
)
print(json.dumps(outcome.as_dict()), flush=True)
"""


def start_uploader(url: str, settings: dict, name: str, concurrent: int) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            UPLOADER,
            url,
            json.dumps(settings),
            name,
            str(concurrent),
            str(HERE),
            str(LEASE_SECONDS),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_requests(sandbox, seen: int, processes: list[subprocess.Popen], limit: float = 60) -> bool:
    """Until the sandbox has had a request beyond ``seen``; False if every uploader ended first."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if len(sandbox.requests) > seen:
            return True
        if all(process.poll() is not None for process in processes):
            return False
        time.sleep(0.02)
    return False


@pytest.fixture()
def sandbox(warehouse, make_sandbox):
    server = make_sandbox(
        customers={CUSTOMER: [ActionSpec(id=ACTION, name="Phone sale")]},
        clock=lambda: SANDBOX_NOW,
        access_token=ACCESS_TOKEN,
        developer_token=DEV_TOKEN,
        max_workers=16,
    )
    return server


def test_sigkilled_racing_uploaders_leave_every_conversion_exactly_once(warehouse, pg_schema_url, sandbox):
    seed(warehouse, CONVERSIONS)
    assert sandbox.add_calls_from_warehouse(warehouse, "acme") == CONVERSIONS
    sandbox.set_delay(0.4)  # each request is in flight long enough to be killed in it
    sandbox.start()
    settings = sandbox.client_settings(developer_token=DEV_TOKEN, access_token=ACCESS_TOKEN)
    rng = random.Random(int(os.environ.get("KILL_TEST_SEED", "20261204")))

    kills = mid_request_kills = racing_rounds = 0
    for number in range(ROUNDS):
        racing = number % 2 == 1
        racing_rounds += racing
        processes = [
            start_uploader(pg_schema_url, settings, f"round-{number}-{n}", rng.choice((1, 2)))
            for n in range(2 if racing else 1)
        ]
        if wait_for_requests(sandbox, len(sandbox.requests), processes):
            time.sleep(rng.uniform(0.0, 1.2))
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills += 1
                # Still serving what it sent: Google records it, nobody hears the answer.
                mid_request_kills += sandbox.in_flight() > 0
            process.wait(timeout=30)

    time.sleep(LEASE_SECONDS + 0.5)  # the last killed claims run out
    sandbox.set_delay(0)
    final = start_uploader(pg_schema_url, settings, "final", 2)
    out, err = final.communicate(timeout=600)
    assert final.returncode == 0, err[-3000:]
    final_outcome = json.loads(out.strip().splitlines()[-1])

    # The history: every row the sandbox received, by conversion (each seeded one has its own caller).
    call_conversion = importlib.import_module(
        f"google.ads.googleads.{API_VERSION}.services.types.conversion_upload_service"
    ).CallConversion
    received: dict[str, set[bytes]] = defaultdict(set)
    rows_received = 0
    for request in sandbox.requests:
        for payload in request["payloads"]:
            received[call_conversion.deserialize(payload).caller_id].add(payload)
            rows_received += 1
    accepted = sandbox.accepted()
    changed = {caller: payloads for caller, payloads in received.items() if len(payloads) > 1}
    expected = {f"+4791{n:06d}" for n in range(CONVERSIONS)}
    accepted_callers = [a.caller_id for a in accepted]
    duplicates = len(accepted_callers) - len(set(accepted_callers))
    lost = len(expected - set(accepted_callers))
    resent = rows_received - len(received)
    print(
        f"kill test: {ROUNDS} rounds ({racing_rounds} with two uploaders), {kills} SIGKILLs "
        f"({mid_request_kills} with a request in flight), {len(sandbox.requests)} requests, "
        f"{rows_received} rows received for {CONVERSIONS} conversions, {resent} identical resends, "
        f"{final_outcome['accepted']} accepted by the final run; lost {lost}, duplicated {duplicates}, "
        f"changed payloads {len(changed)}"
    )

    assert kills >= 10
    assert (lost, duplicates, len(changed)) == (0, 0, 0)
    assert set(accepted_callers) == expected
    assert states(warehouse) == {"uploaded": CONVERSIONS}


def test_two_uploaders_at_once_send_every_row_once(warehouse, pg_schema_url, sandbox):
    """Without kills there is nothing to recover: two racing uploaders send each row once, between them."""
    seed(warehouse, CONVERSIONS)
    sandbox.add_calls_from_warehouse(warehouse, "acme")
    sandbox.set_delay(0.2)  # 50 requests of 200: long enough that both are sending at once
    sandbox.start()
    settings = sandbox.client_settings(developer_token=DEV_TOKEN, access_token=ACCESS_TOKEN)

    racers = [
        subprocess.Popen(
            [sys.executable, "-c", UPLOADER, pg_schema_url, json.dumps(settings), f"racer-{n}", "2", str(HERE), "3600"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(2)
    ]
    outcomes = []
    for racer in racers:
        out, err = racer.communicate(timeout=600)
        assert racer.returncode == 0, err[-3000:]
        outcomes.append(json.loads(out.strip().splitlines()[-1]))

    rows_received = sum(len(request["payloads"]) for request in sandbox.requests)
    print(
        "two uploaders: sent "
        + " + ".join(str(o["sent"]) for o in outcomes)
        + f" = {rows_received} rows for {CONVERSIONS} conversions; "
        + "claimed by the other first: "
        + " + ".join(str(o["claimed_elsewhere"]) for o in outcomes)
    )
    assert rows_received == CONVERSIONS
    assert sum(o["accepted"] for o in outcomes) == CONVERSIONS
    assert all(o["already_existed"] == 0 for o in outcomes)
    assert all(o["sent"] > 0 for o in outcomes)  # they really raced
    assert states(warehouse) == {"uploaded": CONVERSIONS}
