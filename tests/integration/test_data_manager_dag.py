"""The Data Manager path through the DAGs, on PostgreSQL, against the HTTPS Data Manager sandbox.

One account delivers with ``delivery: data_manager``. Its import DAG (and once the rerun DAG)
runs through ``dag.test()`` with the real google-api-python-client, over six days, with the
sandbox (playing Google) given a fault on chosen days. The whole journey runs once per module,
which keeps it to nine DAG runs; a snapshot after each run (the run's state and counts, ledger
states by caller, what the sandbox received) is what the tests below assert, one scenario each:

1. a dry run (``validateOnly``), the plain day, then the same day again: nothing is sent again
   and the request is still processing;
2. a 503 on the first send, retried; day 1's request is settled on this next run;
3. a 429: the day's rows are parked; day 2's processing failure is settled from requestStatus;
4. the answer is lost twice (httplib2 itself resends once): the task fails, rows in ``sending``;
5. the abandoned request is resent once, as its stored bytes, then the day's own rows are sent;
   then the rerun DAG over days 4 and 5 settles both requests and sends nothing again;
6. 2,000 sales in one request, one of which Google refuses at ingest: only that one fails.

At the end Google finishes processing every request it took, the lost ones included, and must
hold exactly one event per conversion that was not refused.

Each import run starts with its preflight, which sends one validateOnly test event: those bodies
are told apart (:func:`is_preflight`), so the counts below are of the delivery's own requests.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import intake_project
import pytest
import sqlalchemy as sa
import yaml

from callconv.delivery.data_manager.hashing import hash_phone
from callconv.preflight import SYNTHETIC_CALLER
from callconv.protection.sealed import KEYSET_ENV_VAR, keyset_to_json, new_keyset
from callconv.sandbox.data_manager import DataManagerSandbox, DmAction
from callconv.schema import call_logs, data_manager_requests, metadata, run_summary, upload_ledger

pytestmark = pytest.mark.integration

OSLO = ZoneInfo("Europe/Oslo")
ACCOUNT, CUSTOMER, ACTION = "dm_shop", "3334445555", "901"
DAYS = [date(2026, 11, 23) + timedelta(days=n) for n in range(6)]
SALES = {day: 2 for day in DAYS[:5]} | {DAYS[5]: 2000}
# The CRM file's header: the shared test CRM's names, without a call start (matching finds the call).
HEADER = ["id", "phone", "sold_at", "outcome", "amount", "currency"]
# Day 2's first caller fails in Google's processing; one of day 6's callers is refused at ingest.
EXPIRED, REFUSED = (1, 0), (5, 1234)
REFUSAL = "A_RULE_WE_DO_NOT_CHECK"


def national(day_index: int, n: int) -> str:
    """A Norwegian mobile number of its own for each sale: 9, the day, six digits."""
    return f"9{day_index + 1}{n:06d}"


def e164(day_index: int, n: int) -> str:
    return "+47" + national(day_index, n)


def local(day: date, at: time) -> datetime:
    return datetime.combine(day, at, tzinfo=OSLO)


def callers(day_index: int) -> list[str]:
    return [e164(day_index, n) for n in range(SALES[DAYS[day_index]])]


def is_preflight(body: bytes) -> bool:
    """The preflight's validateOnly test event: one event, the synthetic caller's hash."""
    request = json.loads(body)
    phones = [event["userData"]["userIdentifiers"][0]["phoneNumber"] for event in request["events"]]
    return request["validateOnly"] is True and phones == [hash_phone(SYNTHETIC_CALLER)]


def deliveries(box) -> list[bytes]:
    """The bodies the Data Manager task sent, without the preflights'."""
    return [body for body in box.received if not is_preflight(body)]


@dataclass
class Snapshot:
    """What one DAG run left: its state, its Data Manager counts, the ledger and the sandbox."""

    state: str
    counts: dict  # the Data Manager task's counts of the run's last day
    ledger: dict[str, tuple]  # E.164 -> (state, error_code, sends)
    received: int  # request bodies the delivery had sent by then (not the preflight's)
    requests: list[tuple]  # data_manager_requests: (state, events, sends, body), oldest first
    tasks: dict[str, str] = field(default_factory=dict)  # task id -> state
    labels: set[str] = field(default_factory=set)  # rendered map indices of the Data Manager task


@dataclass
class Journey:
    box: DataManagerSandbox
    runs: dict[str, Snapshot]
    bodies: list[bytes]  # the delivery's
    preflights: list[bytes]  # each import run's validateOnly test event
    accepted: Counter  # phone hash -> events Google counted, once it processed everything


def _write_landing(root, calls: list[dict]) -> None:
    """Each day's CRM file into ``root``'s landing area, and each sale's call into ``calls``."""
    for index, day in enumerate(DAYS):
        rows = []
        for n in range(SALES[day]):
            call_start = local(day, time(6)) + timedelta(seconds=10 * n)
            sold_at = call_start + timedelta(hours=1)
            rows.append([f"{day}-{n}", national(index, n), f"{sold_at:%Y-%m-%d %H:%M:%S}", "sale", "100", "NOK"])
            calls.append(
                {
                    "account_id": ACCOUNT,
                    "source_call_id": f"{day}-{n}",
                    "caller_number": national(index, n),
                    "call_start": call_start.astimezone(UTC),
                    "duration_seconds": 120,
                    "via_google_forwarding": True,
                }
            )
        intake_project.drop(root, ACCOUNT, day, "sales.csv", intake_project.csv_bytes(HEADER, rows))


def _snapshot(engine, box, dag_run, stage: str = "data_manager") -> Snapshot:
    with engine.connect() as connection:
        counts = connection.scalars(
            sa.select(run_summary.c.counts)
            .where(run_summary.c.run_id == dag_run.run_id)
            .order_by(run_summary.c.business_date)
        ).all()
        ledger = connection.execute(
            sa.select(
                upload_ledger.c.caller_e164, upload_ledger.c.state, upload_ledger.c.error_code, upload_ledger.c.sends
            )
        ).all()
        requests = connection.execute(
            sa.select(
                data_manager_requests.c.state,
                data_manager_requests.c.events,
                data_manager_requests.c.sends,
                data_manager_requests.c.body,
            ).order_by(data_manager_requests.c.sent_at, data_manager_requests.c.events)
        ).all()
    tis = dag_run.get_task_instances()
    return Snapshot(
        state=dag_run.state,
        counts=([c[stage] for c in counts if stage in c] or [{}])[-1],
        ledger={row.caller_e164: (row.state, row.error_code, row.sends) for row in ledger},
        received=len(deliveries(box)),
        requests=[tuple(row) for row in requests],
        tasks={ti.task_id: ti.state for ti in tis},
        labels={ti.rendered_map_index for ti in tis if ti.task_id.endswith("deliver_through_data_manager")},
    )


def _import(day: date, **conf):
    from dags.call_conversion_import import build_import_dag

    dag = build_import_dag(ACCOUNT, "Europe/Oslo")
    for task in dag.tasks:
        task.retries = 0  # dag.test() would wait out the real retry delay; a failure shows at once
    return dag.test(logical_date=local(day + timedelta(days=1), time(0)), run_conf=conf or None)


def _rerun(first: date, last: date):
    from dags.call_conversions_rerun import build_rerun_dag

    dag = build_rerun_dag()
    for task in dag.tasks:
        task.retries = 0
    return dag.test(run_conf={"start_date": first.isoformat(), "end_date": last.isoformat(), "accounts": [ACCOUNT]})


@pytest.fixture(scope="module")
def journey(tmp_path_factory, pg_schema_url, airflow_db, session_pseudonym_keys, sandbox_cert) -> Journey:
    box = DataManagerSandbox([DmAction(CUSTOMER, ACTION)], cert_dir=sandbox_cert.parent, processing_polls=1)
    endpoint = box.start()
    engine = sa.create_engine(pg_schema_url)
    try:
        yield _journey(tmp_path_factory.mktemp("dm_dag"), box, endpoint, engine, pg_schema_url, session_pseudonym_keys)
    finally:
        box.stop()
        _empty(engine)
        engine.dispose()


def _empty(engine) -> None:
    with engine.begin() as connection:
        for table in reversed(metadata.sorted_tables):
            connection.execute(table.delete())


def _journey(root, box, endpoint, engine, pg_schema_url, pseudonym_keys) -> Journey:
    """The six days, each run recorded as a snapshot; then Google processes what it took."""
    calls: list[dict] = []
    _write_landing(root, calls)
    _empty(engine)
    with engine.begin() as connection:
        connection.execute(call_logs.insert(), calls)
    account = intake_project.account(
        ACCOUNT,
        customer_id=CUSTOMER,
        timezone="Europe/Oslo",
        delivery="data_manager",
        conversion_actions={"sale": {"id": ACTION, "name": "Phone sale"}},
        consent={"ad_user_data": "GRANTED", "ad_personalization": "DENIED"},
    )
    config = intake_project.config(
        root,
        header=HEADER,
        accounts=[account],
        warehouse_conn_id="dm_dag_warehouse",
        # The call logs are loaded for every day up front: they cover each window at once.
        freshness={"grace_minutes": 60 * 24 * 10},
        data_manager={"conn_id": "dm_dag_google", "api_endpoint": endpoint},
    )
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    google = {
        "conn_type": "google_cloud_platform",
        "extra": {"access_token": box.token, "ca_certs": str(box.cert_path)},
    }
    runs: dict[str, Snapshot] = {}

    def record(name: str, dag_run, stage: str = "data_manager") -> None:
        runs[name] = _snapshot(engine, box, dag_run, stage)

    with pytest.MonkeyPatch.context() as env:
        env.setenv("CALL_CONVERSIONS_CONFIG", str(root / "config.yaml"))
        env.setenv(KEYSET_ENV_VAR, keyset_to_json(new_keyset()))
        env.setenv(
            "AIRFLOW_CONN_CALL_CONVERSIONS_PSEUDONYM",
            json.dumps({"conn_type": "generic", "password": pseudonym_keys.to_text()}),
        )
        env.setenv(
            "AIRFLOW_CONN_DM_DAG_WAREHOUSE",
            json.dumps({"conn_type": "generic", "extra": {"sqlalchemy_url": pg_schema_url}}),
        )
        env.setenv("AIRFLOW_CONN_DM_DAG_GOOGLE", json.dumps(google))

        record("day 1 dry run", _import(DAYS[0], dry_run=True), stage="data_manager_dry_run")
        record("day 1", _import(DAYS[0]))
        record("day 1 again", _import(DAYS[0], reimport=True))
        box.processing_polls = 0  # from here on, Google has finished by the next poll
        box.faults.append("503")
        box.processing_failures[hash_phone(e164(*EXPIRED))] = "EXPIRED_CALL"
        record("day 2", _import(DAYS[1]))
        box.faults.append("429")
        record("day 3", _import(DAYS[2]))
        box.faults.extend(["lost", "lost"])
        record("day 4", _import(DAYS[3]))
        record("day 5", _import(DAYS[4]))
        record("rerun of days 4 and 5", _rerun(DAYS[3], DAYS[4]))
        box.ingest_rejections[hash_phone(e164(*REFUSED))] = REFUSAL
        record("day 6", _import(DAYS[5]))

    # Google processes every request it took, including those whose answer never arrived.
    for request_id in list(box.requests):
        box.retrieve(request_id)
    accepted = Counter(key[2] for key in box.accepted)
    preflights = [body for body in box.received if is_preflight(body)]
    return Journey(box, runs, deliveries(box), preflights, accepted)


def states(snapshot: Snapshot, day_index: int) -> list[str]:
    return [snapshot.ledger[number][0] for number in callers(day_index)]


def test_a_dry_run_is_validate_only_and_records_nothing(journey):
    dry = journey.runs["day 1 dry run"]
    assert dry.state == "success"
    assert dry.counts["validated"] == 2 and dry.counts["sent"] == 0
    assert states(dry, 0) == ["pending", "pending"] and dry.requests == []
    assert dry.received == 1 and json.loads(journey.bodies[0])["validateOnly"] is True


def test_a_plain_day_sends_each_conversion_once_and_waits_for_processing(journey):
    day = journey.runs["day 1"]
    assert day.state == "success"
    assert (day.counts["sent"], day.counts["requests"], day.counts["resent_requests"]) == (2, 1, 0)
    assert states(day, 0) == ["processing", "processing"]
    assert day.received == 2 and [r[:3] for r in day.requests] == [("processing", 2, 1)]
    sent = json.loads(journey.bodies[1])
    assert sent["validateOnly"] is False
    assert sorted(e["userData"]["userIdentifiers"][0]["phoneNumber"] for e in sent["events"]) == sorted(
        hash_phone(number) for number in callers(0)
    )


def test_a_rerun_of_the_day_sends_nothing_and_a_status_still_processing_is_settled_next_run(journey):
    again, next_day = journey.runs["day 1 again"], journey.runs["day 2"]
    assert again.state == "success"
    assert again.counts["sent"] == 0 and again.received == 2  # nothing re-sent
    assert again.counts["settled"]["still_processing"] == 1
    assert states(again, 0) == ["processing", "processing"]
    assert next_day.counts["settled"]["delivered"] == 2
    assert states(next_day, 0) == ["delivered", "delivered"]
    assert next_day.requests[0][0] == "success"


def test_a_503_is_retried_with_the_same_bytes(journey):
    day = journey.runs["day 2"]
    assert day.state == "success" and day.counts["sent"] == 2
    assert day.received == 4 and journey.bodies[2] == journey.bodies[3]  # the 503, then its retry
    assert [r[:3] for r in day.requests[1:]] == [("processing", 2, 1)]
    assert [snapshot[2] for snapshot in (day.ledger[n] for n in callers(1))] == [1, 1]


def test_processing_failures_are_settled_from_request_status(journey):
    day = journey.runs["day 3"]
    assert day.counts["settled"] == {"delivered": 1, "failed": 1, "parked": 0, "still_processing": 0}
    assert day.ledger[e164(*EXPIRED)][:2] == ("failed", "EXPIRED_CALL")
    assert day.ledger[e164(1, 1)][0] == "delivered"
    assert day.requests[1][0] == "partial"


def test_a_429_parks_the_rows_until_the_next_run_delivers_them(journey):
    parked, later = journey.runs["day 3"], journey.runs["rerun of days 4 and 5"]
    assert parked.state == "success"
    assert parked.counts["parked"] == 2 and parked.counts["sent"] == 0
    assert [parked.ledger[n][:2] for n in callers(2)] == [("parked", "RESOURCE_EXHAUSTED")] * 2
    assert parked.received == 5 and parked.requests[-1][0] == "rejected"
    # Day 4 sends them with its own rows (that answer is lost); they are delivered once settled.
    assert states(later, 2) == ["delivered", "delivered"]


def test_a_crash_after_the_send_is_resent_once_as_identical_bytes(journey):
    crashed, resent = journey.runs["day 4"], journey.runs["day 5"]
    assert crashed.state == "failed"
    assert crashed.tasks["deliver_through_data_manager"] == "failed"
    assert states(crashed, 2) + states(crashed, 3) == ["sending"] * 4
    lost = crashed.requests[-1]
    assert lost[:3] == ("sending", 4, 1)
    assert crashed.received == 7 and journey.bodies[5] == journey.bodies[6] == lost[3]

    assert resent.state == "success"
    assert resent.counts["resent_requests"] == 1 and resent.counts["sent"] == 4 + 2
    assert journey.bodies[7] == lost[3]  # the resend: the stored bytes, unchanged
    assert ("processing", 4, 2, lost[3]) in resent.requests
    # Each claim counts a send: day 3's rows were claimed for the 429, the lost request and the resend.
    assert [resent.ledger[n][::2] for n in callers(2) + callers(3)] == [("processing", 3)] * 2 + [("processing", 2)] * 2
    assert resent.received == 9
    # Google took that request three times and counts each of its events once.
    assert journey.box.duplicates == 2 * 4


def test_the_rerun_dag_settles_and_sends_nothing_again(journey):
    rerun = journey.runs["rerun of days 4 and 5"]
    assert rerun.state == "success"
    assert rerun.labels == {f"{ACCOUNT} {DAYS[3]}", f"{ACCOUNT} {DAYS[4]}"}
    assert rerun.received == journey.runs["day 5"].received  # nothing re-sent
    assert rerun.counts["sent"] == 0
    for index in (2, 3, 4):
        assert states(rerun, index) == ["delivered", "delivered"]
    assert [r[0] for r in rerun.requests if r[0] != "rejected"] == ["success", "partial", "success", "success"]


def test_one_invalid_event_in_a_batch_of_2000_fails_alone(journey):
    day = journey.runs["day 6"]
    assert day.state == "success"
    assert day.counts["failed"] == {REFUSAL: 1} and day.counts["sent"] == 1999
    assert day.ledger[e164(*REFUSED)][:2] == ("failed", REFUSAL)
    assert Counter(states(day, 5)) == {"processing": 1999, "failed": 1}
    # The request, then once more without the event Google named: nothing else.
    assert day.received == journey.runs["rerun of days 4 and 5"].received + 2
    first, second = (json.loads(body) for body in journey.bodies[-2:])
    assert (len(first["events"]), len(second["events"])) == (2000, 1999)


def test_google_holds_exactly_one_event_per_conversion_not_refused(journey):
    final = journey.runs["day 6"]
    refused = {e164(*EXPIRED), e164(*REFUSED)}
    expected = {hash_phone(n) for n in final.ledger if n not in refused}
    assert len(expected) == 5 * 2 + 2000 - 2
    assert set(journey.accepted) == expected
    assert set(journey.accepted.values()) == {1}
    assert {final.ledger[n][:2] for n in refused} == {("failed", "EXPIRED_CALL"), ("failed", REFUSAL)}


def test_no_request_body_holds_an_unhashed_phone_number(journey):
    assert len(journey.bodies) == journey.runs["day 6"].received == 11
    assert len(journey.preflights) == 8 + 2  # one per import run, and one per day of the rerun (days 4 and 5)
    for body in journey.bodies + journey.preflights:
        text = body.decode()
        hashes = re.findall(r"[0-9a-f]{64}", text)
        assert len(hashes) == len(json.loads(text)["events"])  # one hashed identifier per event
        # Outside the hashes, no run of digits long enough to be a phone number: only the customer id.
        assert set(re.findall(r"\d{7,}", re.sub(r"[0-9a-f]{64}", "", text))) <= {CUSTOMER}
        assert not re.search(r"\+\d", text)
