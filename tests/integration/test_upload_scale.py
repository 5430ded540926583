"""upload_pending at scale: streaming memory, concurrent batches, quota and errors under concurrency.

Real PostgreSQL, the real google-ads client, TLS gRPC to the sandbox. Rows are
seeded with one INSERT ... SELECT generate_series, so seeding costs neither time
nor memory in the test process. The sandbox is instrumented from the outside
(its RPC handler wrapped before it starts) to see how many requests it serves
at once and which conversions each one carries; the sandbox itself is unchanged.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import threading
import time
import tracemalloc
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from test_upload import ACCESS_TOKEN, ACTION, CALL_BASE, CUSTOMER, DAY_END, DEV_TOKEN, make_account

from callconv.delivery.ads_client import client_from_settings
from callconv.delivery.upload import UploadConfigError, due_rows_paged, ledger_counts, upload_pending
from callconv.sandbox import ActionSpec, SandboxServer
from callconv.schema import call_logs, upload_ledger

pytestmark = pytest.mark.integration

OTHER_ACTION = "222"
SANDBOX_NOW = DAY_END + timedelta(hours=1)
# Calls go back one second per row from CALL_BASE: 60,000 rows reach ~17 h back,
# all older than the 12 h "too recent" limit and inside the 60-day lookback.


def seed(engine, count: int, *, start: int = 0, action: str = ACTION, twin_every: int = 0) -> None:
    """``count`` pending ledger rows k{n:06d} and their forwarded calls in call_logs, in one statement each.

    Row n's call is from +4791{n:06d} at CALL_BASE - n s, converted 2 h later.
    With ``twin_every`` = t, row n is given row (n mod t)'s caller and times:
    rows t apart are other conversion keys with the same Google key.
    """
    source = "n % :twin" if twin_every else "n"
    params = {"start": start, "end": start + count - 1, "base": CALL_BASE, "action": action, "twin": twin_every}
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                f"""
                insert into upload_ledger (conversion_key, account_id, business_date, state, caller_e164,
                    call_start, conversion_action_id, conversion_time, conversion_value, currency_code,
                    attempts, run_id)
                select 'k' || lpad(n::text, 6, '0'), 'acme', date '2026-03-01', 'pending',
                    '+4791' || lpad(({source})::text, 6, '0'),
                    :base - make_interval(secs => ({source})), :action,
                    :base - make_interval(secs => ({source})) + interval '2 hours', 1500.5, 'NOK', 0, 'match-run'
                from generate_series(:start, :end) as n
                """
            ),
            params,
        )
        connection.execute(
            sa.text(
                """
                insert into call_logs (account_id, source_call_id, caller_number, caller_e164, call_start,
                    duration_seconds, via_google_forwarding)
                select 'acme', 'c' || n, '+4791' || lpad(n::text, 6, '0'), '+4791' || lpad(n::text, 6, '0'),
                    :base - make_interval(secs => n), 60, true
                from generate_series(:start, :end) as n
                on conflict do nothing
                """
            ),
            params,
        )


def states(engine) -> dict[str, int]:
    return {state: count for state, count in ledger_counts(engine, "acme").items() if count}


def run(engine, client, window_end=DAY_END, account=None, **kwargs):
    kwargs.setdefault("sleep", lambda seconds: None)
    return upload_pending(engine, account or make_account(), client, window_end, "run-1", **kwargs)


class Instrumented:
    """Wraps the sandbox's RPC handler: requests in flight, their peak, and Google-key overlaps."""

    def __init__(self, server: SandboxServer):
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.keys_in_flight: set[tuple] = set()
        self.overlaps: list[tuple] = []
        handler = server._upload_call_conversions

        def wrapped(request, context):
            keys = [(c.caller_id, c.conversion_date_time, c.conversion_action) for c in request.conversions]
            with self.lock:
                self.active += 1
                self.peak = max(self.peak, self.active)
                self.overlaps.extend(key for key in keys if key in self.keys_in_flight)
                self.keys_in_flight.update(keys)
            try:
                return handler(request, context)
            finally:
                with self.lock:
                    self.active -= 1
                    self.keys_in_flight.difference_update(keys)

        # start() registers self._upload_call_conversions: an instance attribute set first wins.
        server._upload_call_conversions = wrapped


@pytest.fixture()
def sandbox(warehouse, make_sandbox):
    server = make_sandbox(
        customers={CUSTOMER: [ActionSpec(id=ACTION, name="Phone sale")]},
        clock=lambda: SANDBOX_NOW,
        access_token=ACCESS_TOKEN,
        developer_token=DEV_TOKEN,
        max_workers=16,
    )
    server.probe = Instrumented(server)
    return server.start()


# ----------------------------------------------------------------- concurrency


def test_20000_rows_in_four_concurrent_batches_each_accepted_exactly_once(warehouse, sandbox, client):
    seed(warehouse, 20_000)
    assert sandbox.add_calls_from_warehouse(warehouse, "acme") == 20_000
    # Each request takes 2 s at the sandbox: one after the other, ten take 20 s at least.
    delay = 2.0
    sandbox.set_delay(delay)

    outcome = run(warehouse, client, max_concurrent_batches=4)

    assert (outcome.selected, outcome.sent, outcome.batches) == (20_000, 20_000, 10)
    assert (outcome.accepted, outcome.already_existed) == (20_000, 0)
    assert not outcome.failed and not outcome.parked and outcome.left_for_quota == 0
    assert outcome.max_concurrent_batches == 4 and outcome.as_dict()["max_concurrent_batches"] == 4
    assert states(warehouse) == {"uploaded": 20_000}
    accepted = sandbox.accepted()
    assert len(accepted) == 20_000
    assert len({a.caller_id for a in accepted}) == 20_000
    assert sorted(r["rows"] for r in sandbox.requests) == [2000] * 10
    # Concurrent, and never more than allowed: the sandbox saw four requests in flight at
    # once, never five. (How long that takes is measured in bench/, not asserted here.)
    assert sandbox.probe.peak == 4
    assert sandbox.probe.overlaps == []

    again = run(warehouse, client, window_end=DAY_END + timedelta(days=1), max_concurrent_batches=4)
    assert (again.selected, again.sent) == (0, 0)
    assert len(sandbox.requests) == 10


def test_rows_sharing_a_google_key_are_never_in_flight_together(warehouse, sandbox, client):
    # Row n and row n + 10 are the same conversion for Google: every batch of 10
    # shares all its keys with the next one, which must wait for it.
    seed(warehouse, 100, twin_every=10)
    sandbox.add_calls_from_warehouse(warehouse, "acme")
    sandbox.set_delay(0.05)

    outcome = run(warehouse, client, batch_size=10, max_concurrent_batches=4)

    assert sandbox.probe.overlaps == []
    assert (outcome.sent, outcome.batches) == (100, 10)
    assert (outcome.accepted, outcome.already_existed) == (10, 90)
    assert states(warehouse) == {"uploaded": 100}
    assert len(sandbox.accepted()) == 10
    assert "DUPLICATE_CALL_CONVERSION_IN_REQUEST" not in outcome.failed


def test_unrelated_batches_still_overlap_next_to_shared_keys(warehouse, sandbox, client):
    seed(warehouse, 40)
    seed(warehouse, 10, start=40, twin_every=40)  # k000040..49: the same conversions as k000000..09
    sandbox.add_calls_from_warehouse(warehouse, "acme")
    sandbox.set_delay(0.5)  # long enough for four to be in flight at once on a loaded machine

    outcome = run(warehouse, client, batch_size=10, max_concurrent_batches=4)

    assert sandbox.probe.overlaps == []
    assert sandbox.probe.peak == 4
    assert (outcome.accepted, outcome.already_existed) == (40, 10)
    assert states(warehouse) == {"uploaded": 50}


def test_transient_failures_are_retried_per_batch_under_concurrency(warehouse, sandbox, client):
    seed(warehouse, 1000)
    sandbox.add_calls_from_warehouse(warehouse, "acme")
    sandbox.fail_next(3, grpc.StatusCode.UNAVAILABLE)
    sleeps: list[float] = []

    outcome = run(warehouse, client, batch_size=100, max_concurrent_batches=4, sleep=sleeps.append)

    assert len(sleeps) == 3
    assert (outcome.batches, outcome.accepted) == (10, 1000)
    assert states(warehouse) == {"uploaded": 1000}
    assert len(sandbox.accepted()) == 1000


@pytest.mark.parametrize("max_concurrent", [1, 4])
def test_quota_with_concurrency_parks_every_unsent_row_and_the_next_run_finishes(
    warehouse, sandbox, client, caplog, max_concurrent
):
    seed(warehouse, 3000)
    sandbox.add_calls_from_warehouse(warehouse, "acme")
    sandbox.set_delay(0.05)
    sandbox.exhaust_quota(after_accepted=700)

    with caplog.at_level("WARNING", logger="callconv.delivery.upload"):
        first = run(warehouse, client, batch_size=100, max_concurrent_batches=max_concurrent)

    # The sandbox answers one request at a time: the first seven are accepted, then quota.
    assert (first.accepted, first.sent, first.batches) == (700, 700, 7)
    assert first.left_for_quota == 2300
    assert first.selected == 3000  # rows never read count as due
    assert "2300 conversions parked" in caplog.text
    # It stopped launching: nowhere near the 30 batches.
    assert len(sandbox.requests) <= 7 + 2 * max_concurrent
    assert states(warehouse) == {"uploaded": 700, "parked": 2300}
    with warehouse.connect() as connection:
        parked = connection.execute(
            sa.select(upload_ledger.c.park_until, upload_ledger.c.error_code, upload_ledger.c.attempts)
            .where(upload_ledger.c.state == "parked")
            .distinct()
        ).all()
    assert parked == [(DAY_END, "RESOURCE_EXHAUSTED", 0)]
    assert len(sandbox.accepted()) == 700

    sandbox.clear_faults()
    second = run(
        warehouse, client, window_end=DAY_END + timedelta(days=1), batch_size=100, max_concurrent_batches=max_concurrent
    )

    # Nothing accepted in the first run was parked: no row comes back as already existing.
    assert (second.selected, second.accepted, second.already_existed) == (2300, 2300, 0)
    assert states(warehouse) == {"uploaded": 3000}
    assert len(sandbox.accepted()) == 3000


def test_quota_in_a_dry_run_counts_the_unsent_rows_and_records_nothing(warehouse, sandbox, client):
    seed(warehouse, 500)
    sandbox.add_calls_from_warehouse(warehouse, "acme")
    sandbox.exhaust_quota(next_calls=1)

    outcome = run(warehouse, client, batch_size=100, max_concurrent_batches=1, dry_run=True)

    assert (outcome.sent, outcome.left_for_quota, outcome.selected) == (0, 500, 500)
    assert states(warehouse) == {"pending": 500}


def test_config_error_stops_new_batches_and_records_those_in_flight(warehouse, sandbox, client):
    account = make_account(
        conversion_actions={"sale": {"id": ACTION, "name": "Phone sale"}, "old": {"id": OTHER_ACTION, "name": "Old"}}
    )
    seed(warehouse, 300)
    seed(warehouse, 100, start=300, action=OTHER_ACTION)  # batch 3 (k000300..399): an action Google lacks
    seed(warehouse, 1600, start=400)
    sandbox.add_calls_from_warehouse(warehouse, "acme")
    sandbox.set_delay(0.1)

    with pytest.raises(UploadConfigError) as raised:
        run(warehouse, client, account=account, batch_size=100, max_concurrent_batches=4)

    assert raised.value.code == "NO_CONVERSION_ACTION_FOUND"
    assert f"{OTHER_ACTION} (Old)" in str(raised.value)
    outcome = raised.value.outcome
    # Batches 0-3 were in flight together; a few more may have started before batch 3 answered.
    assert 4 <= outcome.batches < 20
    assert len(sandbox.requests) == outcome.batches
    counts = states(warehouse)
    assert counts == {"uploaded": outcome.accepted, "pending": 2000 - outcome.accepted}
    assert outcome.accepted == (outcome.batches - 1) * 100
    assert len(sandbox.accepted()) == outcome.accepted
    with warehouse.connect() as connection:
        wrong = connection.execute(
            sa.select(upload_ledger.c.state, upload_ledger.c.error_code, sa.func.count())
            .where(upload_ledger.c.conversion_action_id == OTHER_ACTION)
            .group_by(upload_ledger.c.state, upload_ledger.c.error_code)
        ).all()
    assert wrong == [("pending", "NO_CONVERSION_ACTION_FOUND", 100)]


def test_request_error_under_concurrency_is_raised_after_the_others_are_recorded(warehouse, sandbox, client):
    from google.api_core.exceptions import ServiceUnavailable

    seed(warehouse, 800)
    sandbox.add_calls_from_warehouse(warehouse, "acme")
    sandbox.set_delay(0.1)
    sandbox.fail_next(1, grpc.StatusCode.UNAVAILABLE)

    with pytest.raises(ServiceUnavailable):
        run(warehouse, client, batch_size=100, max_concurrent_batches=4, max_transient_retries=0)

    counts = states(warehouse)
    accepted = len(sandbox.accepted())
    # Every batch Google answered is in the ledger; the rest is still pending for Airflow's retry.
    assert counts.get("uploaded", 0) == accepted
    assert counts.get("pending", 0) == 800 - accepted
    assert accepted % 100 == 0 and accepted < 800  # whole batches, and it stopped early
    outcome = run(warehouse, client, window_end=DAY_END + timedelta(days=1), batch_size=100, max_concurrent_batches=4)
    assert (outcome.accepted, outcome.already_existed) == (800 - accepted, 0)
    assert states(warehouse) == {"uploaded": 800}


# ---------------------------------------------------------------------- memory

# A sandbox in another process, so its memory (every accepted conversion) is
# not in this process's tracemalloc figures. It loads the forwarded calls from
# the warehouse, prints its port, and answers "count" with its accepted rows.
SANDBOX_SCRIPT = """
import sys
from datetime import datetime

import sqlalchemy as sa

from callconv.sandbox import ActionSpec, SandboxServer

url, cert_dir, now, customer, action, access_token, developer_token = sys.argv[1:]
server = SandboxServer(
    customers={customer: [ActionSpec(id=action)]},
    access_token=access_token,
    developer_token=developer_token,
    cert_dir=cert_dir,
)
server.set_clock(datetime.fromisoformat(now))
engine = sa.create_engine(url)
server.add_calls_from_warehouse(engine, "acme")
engine.dispose()
server.start()
print(server.port, flush=True)
for line in sys.stdin:
    if line.strip() == "count":
        print(len(server.accepted()), flush=True)
    else:
        break
server.stop()
"""


class SandboxProcess:
    def __init__(self, url: str, cert_dir: Path):
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SANDBOX_SCRIPT,
                url,
                str(cert_dir),
                SANDBOX_NOW.isoformat(),
                CUSTOMER,
                ACTION,
                ACCESS_TOKEN,
                DEV_TOKEN,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.port = int(self.process.stdout.readline())

    def accepted(self) -> int:
        self.process.stdin.write("count\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def _clear(engine) -> None:
    with engine.begin() as connection:
        connection.execute(upload_ledger.delete())
        connection.execute(call_logs.delete())


# Each figure is taken in a fresh process of its own, and tracemalloc is never stopped there:
# the process prints its figures and leaves with os._exit. In-process, once a pytest worker
# hung after an upload (a gRPC native thread spinning while holding the GIL), and once a
# measuring process crashed (SIGSEGV); the likeliest cause is tracemalloc.stop() racing
# threads that allocate meanwhile, which gRPC's do (a race fixed in later CPythons, gh-128679).
# A fresh process also has the small heap the figures are meant for, not the leftovers of
# the worker's earlier tests. The upload warms up (imports, descriptors, channel code) with
# 50 untraced rows first.
MEASURE_SCRIPT = """
import json
import os
import sys
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, sys.argv[1])
import test_upload_scale as scale

what, url, cert_dir, rows, options = sys.argv[2], sys.argv[3], Path(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
engine = sa.create_engine(url)
if what == "upload":
    scale.measure_upload(engine, url, cert_dir, 50, trace=False, **json.loads(options))
    peak, seconds, outcome = scale.measure_upload(engine, url, cert_dir, rows, **json.loads(options))
    figures = {"peak": peak, "seconds": seconds, "batches": outcome.batches}
else:
    figures = {"peak": scale.measure_held(engine, rows)}
print(json.dumps(figures), flush=True)
os._exit(0)
"""


def _measure(what: str, url: str, cert_dir: Path, rows: int, **options) -> dict:
    command = [sys.executable, "-X", "faulthandler", "-c", MEASURE_SCRIPT, str(Path(__file__).parent), what, url]
    command += [str(cert_dir), str(rows), json.dumps(options)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"the {what} measurement ended with {done.returncode}: {done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _upload_peak(url: str, cert_dir: Path, rows: int, **options) -> tuple[int, float, int]:
    """``measure_upload`` of ``rows`` in a fresh process; returns (peak bytes, seconds, batches)."""
    figures = _measure("upload", url, cert_dir, rows, **options)
    return figures["peak"], figures["seconds"], figures["batches"]


def _held_peak(url: str, cert_dir: Path) -> int:
    """``measure_held`` of the 60,000 uploaded rows, in a fresh process; peak bytes."""
    return _measure("held", url, cert_dir, 60_000)["peak"]


def measure_upload(engine, url: str, cert_dir: Path, rows: int, trace: bool = True, **kwargs):
    """Seed ``rows``, upload them to a sandbox process; returns (tracemalloc peak bytes, seconds, outcome).

    With ``trace``, tracing starts here and is left running (see MEASURE_SCRIPT), as is the
    cyclic collector left off: in a worker with a large heap full collections are rare, so
    anything a batch leaves in a reference cycle piles up there; with it off, such leftovers
    show in the peak too.
    """
    _clear(engine)
    seed(engine, rows)
    sandbox = SandboxProcess(url, cert_dir)
    try:
        client = client_from_settings(
            {"developer_token": DEV_TOKEN, "access_token": ACCESS_TOKEN, "endpoint": f"localhost:{sandbox.port}"}
        )
        peak = 0
        if trace:
            gc.collect()
            gc.disable()
            tracemalloc.start()
        started = time.monotonic()
        outcome = run(engine, client, **kwargs)
        if trace:
            _, peak = tracemalloc.get_traced_memory()
        seconds = time.monotonic() - started
        assert outcome.accepted == rows
        assert sandbox.accepted() == rows
        assert states(engine) == {"uploaded": rows}
    finally:
        sandbox.stop()
    return peak, seconds, outcome


def measure_held(engine, rows: int) -> int:
    """tracemalloc peak of merely reading every due row into one list, as the old upload did first."""
    with engine.begin() as connection:
        connection.execute(upload_ledger.update().values(state="pending"))
    gc.collect()
    tracemalloc.start()
    held_rows = len(list(due_rows_paged(engine, "acme", DAY_END)))
    _, held = tracemalloc.get_traced_memory()
    assert held_rows == rows
    return held


def test_upload_memory_does_not_grow_with_the_number_of_due_rows(warehouse, pg_schema_url, sandbox_cert):
    cert_dir = sandbox_cert.parent
    small, small_seconds, _ = _upload_peak(pg_schema_url, cert_dir, 10_000, batch_size=2000)
    large, large_seconds, batches = _upload_peak(pg_schema_url, cert_dir, 60_000, batch_size=2000)
    held = _held_peak(pg_schema_url, cert_dir)

    report = (
        f"one batch in flight, tracemalloc peak: 10k rows {small / 2**20:.1f} MiB in {small_seconds:.1f} s, "
        f"60k rows {large / 2**20:.1f} MiB in {large_seconds:.1f} s; 60k rows merely held: {held / 2**20:.1f} MiB"
    )
    print(report)
    assert batches == 30
    assert large < 1.5 * small, report
    assert large < held / 2, report


def test_upload_memory_stays_bounded_with_four_batches_in_flight(warehouse, pg_schema_url, sandbox_cert):
    cert_dir = sandbox_cert.parent
    peak, seconds, batches = _upload_peak(pg_schema_url, cert_dir, 60_000, max_concurrent_batches=4)
    held = _held_peak(pg_schema_url, cert_dir)

    report = (
        f"four batches in flight, tracemalloc peak: 60k rows {peak / 2**20:.1f} MiB in {seconds:.1f} s; "
        f"60k rows merely held: {held / 2**20:.1f} MiB"
    )
    print(report)
    assert batches == 30
    # Four batches of 2,000 in flight, one planned and one page read: a few batches, far from all 30.
    assert peak < held / 2, report
