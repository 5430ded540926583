"""Keys derived from phone numbers are HMACs: a stolen table does not give the numbers back.

A day goes through the real intake (sales without CRM ids, so their sale keys are the
content's HMAC) and the real match on PostgreSQL. An attacker who has every table but
the callers' numbers, knows the recipes, and tries 10^5 Norwegian 8-digit numbers
(the block that holds the callers) finds none of them without the pseudonym key; with
it, every one (so the test can fail: with today's plain SHA-256 the first search would
succeed). Then: keys are stable across reruns, and a rotation re-keys the account
without losing deduplication.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, date, datetime, timedelta

import intake_project
import pytest
import sqlalchemy as sa

from callconv.intake.take_in import sale_key
from callconv.matching.match import conversion_key, match_day
from callconv.protection.pseudonyms import PseudonymKeyRotated, PseudonymKeys, conversion_text, rekey, sale_text
from callconv.schema import call_logs, crm_sales, delivery_conflicts, matches, pseudonym_key_state, upload_ledger

pytestmark = pytest.mark.integration

ACCOUNT = "keyed"
DAY = date(2026, 11, 27)
WINDOW = (datetime(2026, 11, 27, tzinfo=UTC), datetime(2026, 11, 28, tzinfo=UTC))
ACTION = "555000111"
# The attacker's search: 10^5 numbers of the Norwegian mobile range, the callers among them.
FIRST_GUESS = 91230000
GUESSES = 100_000
CALLERS = [f"+47{FIRST_GUESS + offset}" for offset in (17, 4_242, 31_337, 77_001, 99_999)]
HEADER = ["phone", "sold_at", "outcome", "amount"]


def make_settings(tmp_path):
    return intake_project.make_settings(
        tmp_path,
        header=HEADER,
        accounts=[intake_project.account(ACCOUNT, conversion_actions={"sale": {"id": ACTION, "name": "Phone sale"}})],
    )


def call_start(index: int) -> datetime:
    return datetime(2026, 11, 27, 8, tzinfo=UTC) + timedelta(minutes=7 * index)


def drop_extract(tmp_path, rows: list[list[str]], name: str = "deals.csv") -> None:
    intake_project.drop(tmp_path, ACCOUNT, DAY, name, intake_project.csv_bytes(HEADER, rows))


def sale_rows() -> list[list[str]]:
    """One sale per caller, written as a CRM writes numbers (no CRM id: the content is the key)."""
    rows = []
    for index, caller in enumerate(CALLERS):
        national = caller[3:]
        sold = call_start(index) + timedelta(hours=1)
        rows.append(
            [f"{national[:3]} {national[3:5]} {national[5:]}", f"{sold:%Y-%m-%d %H:%M:%S}", "sale", f"{index}99.50"]
        )
    return rows


def take_in(engine, settings, tmp_path, keys, keyset, reimport=False):
    """The intake under ``keys``, writing no Data Docs and no quarantine export."""
    return intake_project.take_in(
        engine,
        settings,
        tmp_path,
        keyset,
        account_id=ACCOUNT,
        window=WINDOW,
        keys=keys,
        reimport=reimport,
        data_docs_root=None,
        quarantine_root=None,
    )


def match(engine, settings, keys):
    return match_day(engine, ACCOUNT, DAY, settings.match_rules(settings.account(ACCOUNT)), "run-1", keys=keys)


@pytest.fixture()
def day(tmp_path, warehouse, pseudonym_keys, test_keyset):
    settings = make_settings(tmp_path)
    with warehouse.begin() as connection:
        connection.execute(
            call_logs.insert(),
            [
                {
                    "account_id": ACCOUNT,
                    "source_call_id": f"call-{index}",
                    "caller_number": caller,
                    "caller_e164": caller,
                    "caller_parse_status": "ok",
                    "call_start": call_start(index),
                    "duration_seconds": 120,
                    "via_google_forwarding": True,
                }
                for index, caller in enumerate(CALLERS)
            ],
        )
    drop_extract(tmp_path, sale_rows())
    assert take_in(warehouse, settings, tmp_path, pseudonym_keys, test_keyset).sales == len(CALLERS)
    outcome = match(warehouse, settings, pseudonym_keys)
    assert (outcome.matched, outcome.conversions) == (len(CALLERS), len(CALLERS))
    return settings


def stolen_rows(engine) -> list[tuple[str, str]]:
    """What an attacker with the tables but no number holds: each key and the recipe's text
    with the number left out, as (key, text with '{}' for the number)."""
    targets = []
    with engine.connect() as connection:
        for row in connection.execute(sa.select(crm_sales).where(crm_sales.c.account_id == ACCOUNT)):
            assert row.crm_id is None
            text = sale_text(ACCOUNT, "\0", row.conversion_time, row.outcome, row.conversion_value)
            targets.append((row.sale_key, text.replace("\0", "{}")))
            text = conversion_text(ACCOUNT, "\0", row.matched_call_start, row.conversion_action_id)
            targets.append((row.conversion_key, text.replace("\0", "{}")))
        for table in (matches, upload_ledger):
            for row in connection.execute(sa.select(table).where(table.c.account_id == ACCOUNT)):
                text = conversion_text(ACCOUNT, "\0", row.call_start, row.conversion_action_id)
                targets.append((row.conversion_key, text.replace("\0", "{}")))
    return sorted(set(targets))


def brute_force(targets, digest) -> dict[str, str]:
    """Try every number of the block against every stolen key: {key: number found}."""
    found = {}
    for key, recipe in targets:
        for offset in range(GUESSES):
            number = f"+47{FIRST_GUESS + offset}"
            if digest(recipe.format(number)) == key:
                found[key] = number
                break
    return found


def keyed(secret: bytes):
    base = hmac.new(secret, digestmod=hashlib.sha256)

    def digest(text: str) -> str:
        attempt = base.copy()
        attempt.update(text.encode())
        return attempt.hexdigest()

    return digest


def test_no_stored_key_gives_its_number_back_without_the_key(day, warehouse, pseudonym_keys):
    targets = stolen_rows(warehouse)
    assert len({key for key, _ in targets}) == 2 * len(CALLERS)  # a sale key and a conversion key per caller
    assert all(FIRST_GUESS <= int(caller[3:]) < FIRST_GUESS + GUESSES for caller in CALLERS)

    # Without the key: the plain SHA-256 recipe, and an HMAC under a key of the attacker's own.
    assert brute_force(targets, lambda text: hashlib.sha256(text.encode()).hexdigest()) == {}
    assert brute_force(targets, keyed(PseudonymKeys.generate("guess").primary.secret)) == {}

    # With it, the same search finds every caller: the search would catch unkeyed hashes.
    found = brute_force(targets, keyed(pseudonym_keys.primary.secret))
    assert len(found) == len(targets) and set(found.values()) == set(CALLERS)


def test_keys_are_the_keyed_recipes_and_stable_across_reruns(day, warehouse, pseudonym_keys, tmp_path, test_keyset):
    def snapshot():
        with warehouse.connect() as connection:
            return {
                table.name: sorted(
                    tuple(row)
                    for row in connection.execute(
                        sa.select(*(c for c in table.c if c.name.endswith(("key", "key_id")))).where(
                            table.c.account_id == ACCOUNT
                        )
                    )
                )
                for table in (crm_sales, matches, upload_ledger)
            }

    first = snapshot()
    key = pseudonym_keys.primary
    with warehouse.connect() as connection:
        for row in connection.execute(sa.select(crm_sales)):
            content = {
                "caller_e164": row.caller_e164,
                "conversion_time": row.conversion_time,
                "outcome": row.outcome,
                "conversion_value": row.conversion_value,
            }
            assert row.sale_key == sale_key(ACCOUNT, None, content, key) and row.sale_key_id == key.key_id
            assert row.conversion_key == conversion_key(
                key, ACCOUNT, row.caller_e164, row.matched_call_start, row.conversion_action_id
            )
            assert row.conversion_key_id == key.key_id
        assert set(connection.scalars(sa.select(upload_ledger.c.conversion_key_id))) == {key.key_id}
        assert connection.execute(sa.select(pseudonym_key_state)).all() == [(ACCOUNT, key.key_id)]

    take_in(warehouse, day, tmp_path, pseudonym_keys, test_keyset, reimport=True)
    match(warehouse, day, pseudonym_keys)
    match(warehouse, day, pseudonym_keys)
    assert snapshot() == first


def test_a_rotation_rekeys_the_account_and_deduplication_holds(
    day, warehouse, pseudonym_keys, tmp_path, test_keyset, monkeypatch
):
    old = pseudonym_keys.primary
    sent_at = datetime(2026, 11, 28, 6, tzinfo=UTC)
    with warehouse.begin() as connection:
        keys_by_caller = dict(
            connection.execute(sa.select(upload_ledger.c.caller_e164, upload_ledger.c.conversion_key)).all()
        )
        # The first caller's conversion was sent; the last one's was redacted by retention.
        connection.execute(
            upload_ledger.update()
            .where(upload_ledger.c.conversion_key == keys_by_caller[CALLERS[0]])
            .values(state="uploaded", sent_at=sent_at, sends=1)
        )
        redacted = keys_by_caller[CALLERS[-1]]
        connection.execute(
            upload_ledger.update().where(upload_ledger.c.conversion_key == redacted).values(state="uploaded")
        )
        for table in (upload_ledger, matches, crm_sales):
            connection.execute(
                table.update().where(table.c.conversion_key == redacted).values(caller_e164=None, caller_hmac="h" * 64)
            )
        redacted_sale = connection.scalar(sa.select(crm_sales.c.sale_key).where(crm_sales.c.conversion_key == redacted))

    rotated = pseudonym_keys.rotated("test-2027-01")
    new = rotated.primary
    monkeypatch.setenv(
        "AIRFLOW_CONN_CALL_CONVERSIONS_PSEUDONYM", json.dumps({"conn_type": "generic", "password": rotated.to_text()})
    )
    # Until the account is re-keyed, nothing makes keys under the new primary.
    with pytest.raises(PseudonymKeyRotated, match="re-key them first"):
        match(warehouse, day, rotated)
    with pytest.raises(PseudonymKeyRotated, match="re-key them first"):
        take_in(warehouse, day, tmp_path, rotated, test_keyset, reimport=True)

    [outcome] = rekey(warehouse, rotated)
    assert (outcome.sale_keys, outcome.conversion_keys, outcome.wrapped) == (4, 4, 0)

    with warehouse.connect() as connection:
        sales = {row.caller_e164: row for row in connection.execute(sa.select(crm_sales))}
        ledger = {row.conversion_key: row for row in connection.execute(sa.select(upload_ledger))}
        assert connection.execute(sa.select(pseudonym_key_state)).all() == [(ACCOUNT, new.key_id)]
    for caller in CALLERS[:-1]:
        sale = sales[caller]
        assert sale.conversion_key == conversion_key(new, ACCOUNT, caller, sale.matched_call_start, ACTION)
        assert (sale.sale_key_id, sale.conversion_key_id) == (new.key_id, new.key_id)
        assert ledger[sale.conversion_key].conversion_key_id == new.key_id
    # The redacted conversion keeps its key and the old key id: it still identifies its rows.
    assert ledger[redacted].conversion_key_id == old.key_id and ledger[redacted].caller_e164 is None
    assert sales[None].conversion_key == redacted and sales[None].sale_key == redacted_sale

    # Deduplication holds under the new key, without the old one: the CRM exporting the
    # sales again adds no sale, a rematch no conversion, and the sent one stays as sent.
    keys = rotated.without(old.key_id)
    drop_extract(tmp_path, sale_rows()[:-1], "again.csv")
    assert take_in(warehouse, day, tmp_path, keys, test_keyset).sales == len(CALLERS) - 1
    again = match(warehouse, day, keys)
    assert again.new_pending == 0
    with warehouse.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(crm_sales)) == len(CALLERS)
        rows = connection.execute(sa.select(upload_ledger.c.conversion_key, upload_ledger.c.sent_at)).all()
    assert len(rows) == len(CALLERS) and dict(rows)[sales[CALLERS[0]].conversion_key] == sent_at

    # A later sale on the sent conversion's call is still recognised as late.
    drop_extract(
        tmp_path,
        [sale_rows()[0][:1] + [f"{call_start(0) + timedelta(hours=3):%Y-%m-%d %H:%M:%S}", "sale", "5.00"]],
        "late.csv",
    )
    take_in(warehouse, day, tmp_path, keys, test_keyset)
    late = match(warehouse, day, keys)
    assert late.conflicts == {"late_sale_on_delivered_call": 1} and late.new_pending == 0
    with warehouse.connect() as connection:
        conflict = connection.execute(sa.select(delivery_conflicts)).one()
    assert conflict.conversion_key == sales[CALLERS[0]].conversion_key
