"""After retention, no redacted row can be joined back to a phone number, over every table.

A warehouse is built by the real matching on PostgreSQL, with each way rows of one
person are tied together: a call with two actions (one sent long ago, one young), a
conversion gathering sales of an old and a young day, a late sale recorded against a
sent conversion, a call whose conversion still waits for upload (and a sibling on it
that was sent), an unmatched sale, a call nobody bought on, an old call a young sale
matched, a repeat caller, a CRM record exported again and quarantined, and rows an
earlier retention redacted while leaving their call ids. Then the retention DAG runs.

The attacker holds every table and follows every identifier the rows share (call
ids, conversion and sale keys, CRM ids, extract rows, caller hashes, call and
conversion instants) from every redacted row, as far as they lead, and reads every
column of every row reached. Before the fix (the redaction as it was: numbers nulled
in sales, matches and the ledger, nothing else) that gives every redacted row its
number back; after it, none.
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, date, datetime, time, timedelta

import pytest
import sqlalchemy as sa

from callconv.config import MatchRules
from callconv.intake.take_in import sale_key
from callconv.matching.match import match_day
from callconv.protection.pseudonyms import DEFAULT_CONN_ID, keys_from_airflow
from callconv.protection.retention import caller_hmac
from callconv.schema import (
    call_logs,
    crm_sales,
    delivery_conflicts,
    matches,
    metadata,
    quarantine,
    upload_ledger,
)

pytestmark = pytest.mark.integration

ACCOUNT = "reident"
AS_OF = date(2026, 11, 28)  # the retention run's data interval ends here
CUTOFF = AS_OF - timedelta(days=91)  # 90 days kept: this day and before are past the window
OLD = CUTOFF - timedelta(days=5)
YOUNG = AS_OF - timedelta(days=10)
HMAC_KEY = "reidentification-test-hmac-key"
SALE, UPSELL = "1", "2"
RULES = MatchRules(min_duration_seconds=0, forwarded_only=False)
PEOPLE = {name: f"+479100000{index}" for index, name in enumerate("ABCDEFGHI", start=1)}
WAITING = ("pending", "parked")


def at(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime.combine(day, time(hour, minute), tzinfo=UTC)


# ------------------------------------------------------------------ the warehouse


def add_call(connection, call_id: str, person: str, start: datetime) -> None:
    connection.execute(
        call_logs.insert().values(
            account_id=ACCOUNT,
            source_call_id=call_id,
            caller_number=PEOPLE[person][3:],
            caller_e164=PEOPLE[person],
            caller_parse_status="ok",
            call_start=start,
            duration_seconds=90,
            via_google_forwarding=True,
        )
    )


def add_sale(connection, keys, person: str, day: date, sold: datetime, action: str = SALE, crm_id=None, row=0):
    content = {"caller_e164": PEOPLE[person], "conversion_time": sold, "outcome": action, "conversion_value": None}
    connection.execute(
        crm_sales.insert().values(
            account_id=ACCOUNT,
            sale_key=sale_key(ACCOUNT, crm_id, content, keys.primary),
            sale_key_id=keys.primary.key_id,
            crm_id=crm_id,
            import_checksum=f"extract-{day}",
            source_row=row,
            business_date=day,
            caller_e164=PEOPLE[person],
            conversion_time=sold,
            outcome=action,
            conversion_action_id=action,
        )
    )


def match(engine, keys, day: date) -> None:
    match_day(engine, ACCOUNT, day, RULES, f"run-{day}", keys=keys)


def mark_sent(engine, *, except_caller_action=None) -> None:
    """Every conversion still pending is sent (its payload holds the number), but one."""
    with engine.begin() as connection:
        for row in connection.execute(sa.select(upload_ledger).where(upload_ledger.c.state == "pending")).all():
            if (row.caller_e164, row.conversion_action_id) == except_caller_action:
                continue
            connection.execute(
                upload_ledger.update()
                .where(upload_ledger.c.conversion_key == row.conversion_key)
                .values(
                    state="uploaded",
                    sent_at=row.conversion_time + timedelta(days=1),
                    sent_payload=f"caller_id: {row.caller_e164}".encode(),
                    sends=1,
                )
            )


@pytest.fixture()
def built(warehouse, write_settings, warehouse_conn, airflow_db, monkeypatch, tmp_path):
    write_settings(
        {
            "id": ACCOUNT,
            "customer_id": "1112223333",
            "timezone": "UTC",
            "conversion_actions": {"sale": {"id": SALE, "name": "Sale"}, "upsell": {"id": UPSELL, "name": "Upsell"}},
        },
        warehouse_conn_id=warehouse_conn("reident_warehouse"),
        hmac_conn_id="reident_hmac",
        match={"min_duration_seconds": 0, "forwarded_only": False},
    )
    monkeypatch.setenv("AIRFLOW_CONN_REIDENT_HMAC", json.dumps({"conn_type": "generic", "password": HMAC_KEY}))
    keys = keys_from_airflow(DEFAULT_CONN_ID)
    with warehouse.begin() as connection:
        add_call(connection, "A-old", "A", at(OLD, 8))
        add_sale(connection, keys, "A", OLD, at(OLD, 9), crm_id="CRM-A", row=1)
        add_call(connection, "B", "B", at(OLD, 10))
        add_sale(connection, keys, "B", OLD, at(OLD, 11), row=2)
        add_sale(connection, keys, "B", OLD + timedelta(days=10), at(OLD + timedelta(days=10), 9), UPSELL, row=3)
        add_call(connection, "C", "C", at(OLD, 12))
        add_sale(connection, keys, "C", OLD, at(OLD, 13), crm_id="CRM-C1", row=4)
        add_sale(connection, keys, "C", OLD + timedelta(days=8), at(OLD + timedelta(days=8), 10), row=5)
        add_call(connection, "D", "D", at(OLD, 14))
        add_sale(connection, keys, "D", OLD, at(OLD, 15), row=6)
        add_sale(connection, keys, "D", OLD + timedelta(days=9), at(OLD + timedelta(days=9), 10), crm_id="D2", row=7)
        add_call(connection, "E", "E", at(OLD, 16))
        add_sale(connection, keys, "E", OLD, at(OLD, 17), row=8)
        add_sale(connection, keys, "E", OLD, at(OLD, 17, 30), UPSELL, row=9)
        add_sale(connection, keys, "F", OLD, at(OLD, 18), row=10)  # no call: unmatched
        add_call(connection, "G", "G", at(OLD - timedelta(days=1), 8))  # nobody bought
        add_call(connection, "H-old", "H", at(CUTOFF - timedelta(days=2), 8))
        add_sale(connection, keys, "H", CUTOFF + timedelta(days=3), at(CUTOFF + timedelta(days=3), 9), row=11)
        add_call(connection, "A-young", "A", at(YOUNG, 8))
        add_sale(connection, keys, "A", YOUNG, at(YOUNG, 9), crm_id="CRM-A2", row=12)
    match(warehouse, keys, OLD)
    with warehouse.begin() as connection:  # D's conversion goes out before D's next sale comes
        connection.execute(
            upload_ledger.update()
            .where(upload_ledger.c.caller_e164 == PEOPLE["D"])
            .values(state="uploaded", sent_at=at(OLD, 23), sent_payload=f"caller_id: {PEOPLE['D']}".encode(), sends=1)
        )
    for offset in (8, 9, 10):
        match(warehouse, keys, OLD + timedelta(days=offset))
    match(warehouse, keys, CUTOFF + timedelta(days=3))
    match(warehouse, keys, YOUNG)
    mark_sent(warehouse, except_caller_action=(PEOPLE["E"], SALE))

    legacy_day = CUTOFF - timedelta(days=200)
    with warehouse.begin() as connection:
        # Redacted by the retention as it was: numbers gone from sales, matches and ledger, nothing else.
        add_call(connection, "I", "I", at(legacy_day, 8))
        common = {"account_id": ACCOUNT, "business_date": legacy_day, "caller_hmac": "f" * 64}
        connection.execute(
            crm_sales.insert().values(
                **common,
                sale_key="i" * 64,
                crm_id="CRM-I",
                import_checksum="legacy",
                source_row=1,
                conversion_time=at(legacy_day, 9),
                outcome=SALE,
                conversion_action_id=SALE,
                matched_call_id="I",
                matched_call_start=at(legacy_day, 8),
                conversion_key="j" * 64,
            )
        )
        conversion = {
            **common,
            "conversion_key": "j" * 64,
            "call_start": at(legacy_day, 8),
            "conversion_action_id": SALE,
            "conversion_time": at(legacy_day, 9),
            "run_id": "legacy",
        }
        connection.execute(matches.insert().values(**conversion, source_call_id="I", sale_count=1))
        connection.execute(upload_ledger.insert().values(**conversion, state="uploaded", attempts=1))
        # A CRM record exported again lately and quarantined: its raw record holds A's number.
        connection.execute(
            quarantine.insert().values(
                account_id=ACCOUNT,
                import_checksum=f"extract-{YOUNG}",
                source_row=99,
                business_date=YOUNG,
                reason="duplicate_crm_id",
                crm_id="CRM-A",
                raw_record={"crm_id": "CRM-A", "caller_phone": PEOPLE["A"][3:]},
                run_id="young",
            )
        )
    return keys


def run_retention():
    from dags.call_conversions_retention import call_conversions_retention

    dag = call_conversions_retention()
    for task in dag.tasks:
        task.retries = 0
    return dag.test(logical_date=datetime.combine(AS_OF, time(0), tzinfo=UTC))


# ------------------------------------------------------------------ the attacker


# Columns that name the same person, event or record wherever they appear (with the account).
LINKS = {
    "call id": [(call_logs, ("source_call_id",)), (crm_sales, ("matched_call_id",)), (matches, ("source_call_id",))],
    "conversion key": [
        (crm_sales, ("conversion_key",)),
        (matches, ("conversion_key",)),
        (upload_ledger, ("conversion_key",)),
        (delivery_conflicts, ("conversion_key",)),
    ],
    "sale key": [(crm_sales, ("sale_key",)), (delivery_conflicts, ("sale_key",))],
    "crm id": [(crm_sales, ("crm_id",)), (quarantine, ("crm_id",))],
    "extract row": [(crm_sales, ("import_checksum", "source_row")), (quarantine, ("import_checksum", "source_row"))],
    "caller hash": [(crm_sales, ("caller_hmac",)), (matches, ("caller_hmac",)), (upload_ledger, ("caller_hmac",))],
    "call instant": [
        (call_logs, ("call_start",)),
        (crm_sales, ("matched_call_start",)),
        (crm_sales, ("crm_call_start",)),
        (matches, ("call_start",)),
        (upload_ledger, ("call_start",)),
    ],
    "conversion instant": [
        (crm_sales, ("conversion_time",)),
        (matches, ("conversion_time",)),
        (upload_ledger, ("conversion_time",)),
    ],
}


def snapshot(engine) -> dict[str, list[dict]]:
    """Every row of every table of the warehouse."""
    with engine.connect() as connection:
        return {
            table.name: [dict(row._mapping) for row in connection.execute(sa.select(table))]
            for table in metadata.sorted_tables
        }


def _text(value) -> str:
    if isinstance(value, bytes | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, dict | list):
        return json.dumps(value)
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return "" if value is None else str(value)


def numbers_in(row: dict) -> set[str]:
    """The people whose number (E.164 or national) any column of the row shows."""
    cells = " ".join(_text(value) for value in row.values())
    return {person for person, e164 in PEOPLE.items() if e164 in cells or e164[3:] in cells}


def redacted_rows(tables) -> list[tuple[str, int]]:
    found = [
        (name, index)
        for name in (crm_sales.name, matches.name, upload_ledger.name)
        for index, row in enumerate(tables[name])
        if row["caller_e164"] is None
    ]
    found += [(call_logs.name, i) for i, row in enumerate(tables[call_logs.name]) if row["caller_e164"] is None]
    return found


def reidentify(tables) -> dict[tuple[str, int], set[str]]:
    """For each redacted row, whose numbers the rows it leads to show (following links as far as they go)."""
    by_value: dict[tuple, set[tuple[str, int]]] = defaultdict(set)
    values_of: dict[tuple[str, int], list[tuple]] = defaultdict(list)
    for link, places in LINKS.items():
        for table, columns in places:
            for index, row in enumerate(tables[table.name]):
                value = tuple(_text(row[column]) for column in columns)
                if any(part in ("", "redacted") for part in value):
                    continue
                key = (link, row["account_id"], value)
                by_value[key].add((table.name, index))
                values_of[(table.name, index)].append(key)
    found = {}
    for start in redacted_rows(tables):
        seen, frontier = {start}, [start]
        while frontier:
            place = frontier.pop()
            for key in values_of[place]:
                for other in by_value[key] - seen:
                    seen.add(other)
                    frontier.append(other)
        found[start] = set().union(*(numbers_in(tables[name][index]) for name, index in seen))
    return found


def redact_as_before(tables) -> dict[str, list[dict]]:
    """The retention as it was: numbers nulled in sales, matches and the ledger past the window,
    the sent bytes dropped, waiting conversions kept; call logs and call ids untouched."""
    waiting = {row["conversion_key"] for row in tables[upload_ledger.name] if row["state"] in WAITING}
    copy = {name: [dict(row) for row in rows] for name, rows in tables.items()}
    for name in (crm_sales.name, matches.name, upload_ledger.name):
        for row in copy[name]:
            if row["business_date"] <= CUTOFF and row["caller_e164"] and row["conversion_key"] not in waiting:
                row.update(caller_e164=None, caller_hmac=caller_hmac(HMAC_KEY.encode(), row["caller_e164"]))
                if "sent_payload" in row:
                    row["sent_payload"] = None
    return copy


# ------------------------------------------------------------------ the test


@pytest.mark.parametrize("call_logs_mode", ["redact", "drop"])
def test_no_redacted_row_joins_back_to_a_number(built, warehouse, write_settings, warehouse_conn, call_logs_mode):
    if call_logs_mode == "drop":
        write_settings(
            {
                "id": ACCOUNT,
                "customer_id": "1112223333",
                "timezone": "UTC",
                "conversion_actions": {"sale": {"id": SALE, "name": "Sale"}, "upsell": {"id": UPSELL, "name": "Up"}},
            },
            warehouse_conn_id=warehouse_conn("reident_warehouse"),
            hmac_conn_id="reident_hmac",
            match={"min_duration_seconds": 0, "forwarded_only": False},
            retention={"call_logs": "drop"},
        )
    before = snapshot(warehouse)
    assert before[delivery_conflicts.name] and before[quarantine.name]  # the scenario has every kind of link

    # The attack works: against the redaction as it was, every redacted row with a call gets
    # its own number back (F's sale had no call: nothing led anywhere).
    def person(name: str, index: int) -> str:
        caller = before[name][index]["caller_e164"]
        return "I" if caller is None else next(p for p, e164 in PEOPLE.items() if e164 == caller)

    as_before = reidentify(redact_as_before(before))
    own_number = {place for place, people in as_before.items() if person(*place) in people}
    assert len(as_before) >= 12
    assert set(as_before) - own_number == {(name, index) for name, index in as_before if person(name, index) == "F"}

    dag_run = run_retention()
    assert dag_run.state == "success"
    after = snapshot(warehouse)
    found = reidentify(after)
    reidentified = {place: people for place, people in found.items() if people}
    assert reidentified == {}
    # It did redact: A's old call, B's call (both actions, the young one too), C's conversion
    # (its young sale too), D (its late sale too), F's unmatched sale, G's unused call, I's leftovers.
    redacted_sales = {row["caller_hmac"] for row in after[crm_sales.name] if row["caller_e164"] is None}
    assert len([row for row in after[crm_sales.name] if row["caller_e164"] is None]) == 9
    assert len(redacted_sales) == 6  # A, B, C, D, F and the legacy I: one hash per person
    assert sorted(row["conversion_action_id"] for row in after[upload_ledger.name] if row["caller_e164"] is None) == [
        SALE,
        SALE,
        SALE,
        SALE,
        SALE,
        UPSELL,
    ]
    remaining_calls = {row["source_call_id"]: row for row in after[call_logs.name]}
    if call_logs_mode == "drop":
        assert sorted(remaining_calls) == ["A-young", "E", "H-old"]
    else:
        assert sorted(name for name, row in remaining_calls.items() if row["caller_e164"] is None) == [
            "A-old",
            "B",
            "C",
            "D",
            "G",
            "I",
        ]
        assert all(
            row["caller_number"] is None and row["caller_parse_status"] == "redacted"
            for row in remaining_calls.values()
            if row["caller_e164"] is None
        )
    # What is young, or still waiting, keeps its number: E's call with its sent sibling, H's old
    # call that a young sale matched, A's young call and sale.
    for call_id, person in (("E", "E"), ("H-old", "H"), ("A-young", "A")):
        assert remaining_calls[call_id]["caller_e164"] == PEOPLE[person]
    kept = {(row["caller_e164"], row["conversion_action_id"]) for row in after[upload_ledger.name]}
    assert {(PEOPLE["E"], SALE), (PEOPLE["E"], UPSELL), (PEOPLE["H"], SALE), (PEOPLE["A"], SALE)} <= kept
    # Tables no identifier reaches hold no number at all.
    linked = {table.name for places in LINKS.values() for table, _ in places}
    for name, rows in after.items():
        if name not in linked:
            assert not set().union(*(numbers_in(row) for row in rows)), name
