"""match_day's rules, one small scenario each, on a real PostgreSQL and on SQLite.

The import DAG's known-answer test covers a whole day; these pin the rules one
by one, including the ones a day rarely shows: ties, merges across days,
rematches that move a sale, and conversions frozen once delivered.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa

from callconv.config import MatchRules
from callconv.matching.match import _prepare, conversion_key, match_day
from callconv.protection.pseudonyms import DEFAULT_CONN_ID, keys_from_airflow
from callconv.schema import call_logs, crm_sales, matches, metadata, upload_ledger
from callconv.warehouse import create_engine, migrate

ACCOUNT = "acme"
DAY = date(2026, 11, 27)
SALE_TIME = datetime(2026, 11, 27, 15, 0, tzinfo=UTC)
CALLER = "+4791234567"
ACTION = "555000111"
RULES = MatchRules(window_days=30, min_duration_seconds=30, forwarded_only=True, crm_call_start_tolerance_seconds=120)


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request, tmp_path):
    if request.param == "postgresql":
        engine = request.getfixturevalue("warehouse")
        yield engine
        return
    url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    migrate(url)
    engine = create_engine(url)
    yield engine
    engine.dispose()


def add_call(engine, call_id: str, start: datetime, caller: str = CALLER, seconds: int = 60, forwarded: bool = True):
    with engine.begin() as connection:
        connection.execute(
            call_logs.insert(),
            {
                "account_id": ACCOUNT,
                "source_call_id": call_id,
                "caller_number": caller,
                "caller_e164": caller,
                "caller_parse_status": "ok",
                "call_start": start,
                "duration_seconds": seconds,
                "via_google_forwarding": forwarded,
            },
        )


def add_sale(
    engine,
    sale_key: str,
    at: datetime = SALE_TIME,
    day: date = DAY,
    caller: str = CALLER,
    value: str = "100",
    currency: str = "NOK",
    crm_call_start: datetime | None = None,
    action: str = ACTION,
):
    with engine.begin() as connection:
        connection.execute(
            crm_sales.insert(),
            {
                "account_id": ACCOUNT,
                "sale_key": sale_key,
                "import_checksum": "c" * 64,
                "source_row": len(sale_key),
                "business_date": day,
                "caller_e164": caller,
                "conversion_time": at,
                "crm_call_start": crm_call_start,
                "outcome": "sale",
                "conversion_action_id": action,
                "conversion_value": Decimal(value),
                "currency_code": currency,
            },
        )


def run(engine, day: date = DAY, rules: MatchRules = RULES, rematch: bool = True):
    return match_day(
        engine, ACCOUNT, day, rules, run_id="run-1", rematch=rematch, keys=keys_from_airflow(DEFAULT_CONN_ID)
    )


def sale_row(engine, sale_key: str):
    with engine.connect() as connection:
        return connection.execute(sa.select(crm_sales).where(crm_sales.c.sale_key == sale_key)).one()


def all_matches(engine) -> list:
    with engine.connect() as connection:
        return connection.execute(sa.select(matches).order_by(matches.c.source_call_id)).all()


def ledger(engine) -> dict[str, str]:
    with engine.connect() as connection:
        return dict(connection.execute(sa.select(upload_ledger.c.conversion_key, upload_ledger.c.state)).all())


def tables(engine) -> dict:
    """Every row match_day writes, to compare two runs."""
    found = {}
    with engine.connect() as connection:
        for table in (crm_sales, matches, upload_ledger):
            columns = [c for c in table.columns if c.name not in ("run_id", "updated_at")]
            found[table.name] = sorted(tuple(map(str, row)) for row in connection.execute(sa.select(*columns)))
    return found


def utc(moment) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def test_last_call_in_the_window_wins_and_later_or_older_calls_do_not(engine):
    add_call(engine, "too-old", SALE_TIME - timedelta(days=31))
    add_call(engine, "early", SALE_TIME - timedelta(days=3))
    add_call(engine, "latest", SALE_TIME - timedelta(hours=2))
    add_call(engine, "after-sale", SALE_TIME + timedelta(minutes=5))
    add_sale(engine, "s1")
    outcome = run(engine)
    sale = sale_row(engine, "s1")
    assert (outcome.sales, outcome.matched, outcome.conversions, outcome.new_pending) == (1, 1, 1, 1)
    assert sale.matched_call_id == "latest"
    assert utc(sale.matched_call_start) == SALE_TIME - timedelta(hours=2)
    key = keys_from_airflow(DEFAULT_CONN_ID).primary
    assert sale.conversion_key == conversion_key(key, ACCOUNT, CALLER, SALE_TIME - timedelta(hours=2), ACTION)
    assert sale.conversion_key_id == key.key_id
    assert sale.unmatched_reason is None


def test_first_attribution_takes_the_earliest_call(engine):
    add_call(engine, "early", SALE_TIME - timedelta(days=3))
    add_call(engine, "latest", SALE_TIME - timedelta(hours=2))
    add_sale(engine, "s1")
    run(engine, rules=RULES.model_copy(update={"attribution": "first"}))
    assert sale_row(engine, "s1").matched_call_id == "early"


def test_a_call_near_the_crm_call_start_beats_a_later_one(engine):
    crm_start = SALE_TIME - timedelta(days=2)
    add_call(engine, "near", crm_start + timedelta(seconds=90))
    add_call(engine, "outside-tolerance", crm_start + timedelta(seconds=300))
    add_call(engine, "latest", SALE_TIME - timedelta(hours=1))
    add_sale(engine, "s1", crm_call_start=crm_start)
    run(engine)
    assert sale_row(engine, "s1").matched_call_id == "near"


def test_a_tie_at_one_second_goes_to_the_lowest_call_id(engine):
    start = SALE_TIME - timedelta(hours=1)
    add_call(engine, "call-b", start)
    add_call(engine, "call-a", start)
    add_call(engine, "call-0-short", start, seconds=5)  # lower id, but not eligible
    add_sale(engine, "s1")
    run(engine)
    assert sale_row(engine, "s1").matched_call_id == "call-a"


@pytest.mark.parametrize(
    ("calls", "reason"),
    [
        ([], "no_call_from_number"),
        ([{"start": SALE_TIME - timedelta(days=40)}], "calls_outside_window"),
        ([{"start": SALE_TIME + timedelta(hours=1)}], "calls_outside_window"),
        ([{"start": SALE_TIME - timedelta(hours=1), "seconds": 10}], "calls_too_short"),
        ([{"start": SALE_TIME - timedelta(hours=1), "forwarded": False}], "only_non_forwarded_calls"),
    ],
)
def test_each_unmatched_sale_gets_the_first_missing_piece_as_reason(engine, calls, reason):
    add_call(engine, "someone-else", SALE_TIME - timedelta(hours=1), caller="+4799999999")
    for index, call in enumerate(calls):
        add_call(engine, f"call-{index}", **call)
    add_sale(engine, "s1")
    outcome = run(engine)
    sale = sale_row(engine, "s1")
    assert (sale.matched_call_id, sale.conversion_key, sale.unmatched_reason) == (None, None, reason)
    assert outcome.unmatched == {reason: 1} and outcome.conversions == 0
    assert all_matches(engine) == [] and ledger(engine) == {}


def test_sales_on_one_call_across_days_merge_into_one_conversion(engine):
    start = SALE_TIME - timedelta(days=1, hours=2)
    add_call(engine, "call-1", start)
    add_sale(engine, "yesterday", at=SALE_TIME - timedelta(days=1), day=DAY - timedelta(days=1), value="100")
    run(engine, day=DAY - timedelta(days=1))
    add_sale(engine, "today", value="50.5")
    outcome = run(engine)
    [conversion] = all_matches(engine)
    assert outcome.conversions == 1
    assert conversion.conversion_value == Decimal("150.5")
    assert conversion.sale_count == 2
    assert utc(conversion.conversion_time) == SALE_TIME  # the latest sale's time
    assert conversion.business_date == DAY - timedelta(days=1)  # the group's first day
    assert ledger(engine) == {conversion.conversion_key: "pending"}


def test_values_in_two_currencies_are_not_added(engine):
    add_call(engine, "call-1", SALE_TIME - timedelta(hours=3))
    add_sale(engine, "s1", at=SALE_TIME - timedelta(hours=1), value="100", currency="NOK")
    add_sale(engine, "s2", value="20", currency="EUR")
    run(engine)
    [conversion] = all_matches(engine)
    assert (conversion.conversion_value, conversion.currency_code, conversion.sale_count) == (Decimal("20"), "EUR", 2)


def test_a_rematch_moves_the_sale_and_drops_the_old_conversion(engine):
    add_call(engine, "first-call", SALE_TIME - timedelta(hours=5))
    add_sale(engine, "s1")
    run(engine)
    [old] = all_matches(engine)
    assert ledger(engine) == {old.conversion_key: "pending"}

    add_call(engine, "late-logged-call", SALE_TIME - timedelta(hours=1))  # the call log arrived late
    outcome = run(engine)
    [new] = all_matches(engine)
    assert new.source_call_id == "late-logged-call"
    assert ledger(engine) == {new.conversion_key: "pending"}  # the old pending row is gone
    assert outcome.new_pending == 1


def test_a_rematch_rebuilds_a_shared_conversion_it_leaves(engine):
    add_call(engine, "shared", SALE_TIME - timedelta(days=1, hours=3))
    add_sale(engine, "yesterday", at=SALE_TIME - timedelta(days=1), day=DAY - timedelta(days=1), value="100")
    add_sale(engine, "today", value="40")
    run(engine, day=DAY - timedelta(days=1))
    run(engine)
    assert [m.conversion_value for m in all_matches(engine)] == [Decimal("140")]

    add_call(engine, "today-call", SALE_TIME - timedelta(hours=1))
    run(engine)
    by_call = {m.source_call_id: m for m in all_matches(engine)}
    assert by_call["shared"].conversion_value == Decimal("100") and by_call["shared"].sale_count == 1
    assert by_call["today-call"].conversion_value == Decimal("40")
    pending = ledger(engine)
    assert set(pending) == {m.conversion_key for m in by_call.values()}
    with engine.connect() as connection:
        refreshed = connection.scalar(
            sa.select(upload_ledger.c.conversion_value).where(
                upload_ledger.c.conversion_key == by_call["shared"].conversion_key
            )
        )
    assert refreshed == Decimal("100")  # the pending payload follows the rebuilt conversion


def test_a_delivered_conversion_is_frozen(engine):
    add_call(engine, "first-call", SALE_TIME - timedelta(hours=5))
    add_sale(engine, "s1")
    run(engine)
    [sent] = all_matches(engine)
    with engine.begin() as connection:
        connection.execute(upload_ledger.update().values(state="uploaded"))

    add_call(engine, "late-logged-call", SALE_TIME - timedelta(hours=1))
    outcome = run(engine)
    assert sale_row(engine, "s1").matched_call_id == "first-call"
    assert all_matches(engine) == [sent]
    assert ledger(engine) == {sent.conversion_key: "uploaded"}
    assert (outcome.frozen, outcome.new_pending) == (1, 0)


def test_without_rematch_earlier_matches_stand_and_misses_are_retried(engine):
    add_call(engine, "first-call", SALE_TIME - timedelta(hours=5))
    add_sale(engine, "matched")
    add_sale(engine, "missed", caller="+4798888888")
    run(engine)
    add_call(engine, "late-call", SALE_TIME - timedelta(hours=1))
    add_call(engine, "late-call-for-missed", SALE_TIME - timedelta(hours=1), caller="+4798888888")
    run(engine, rematch=False)
    assert sale_row(engine, "matched").matched_call_id == "first-call"
    assert sale_row(engine, "missed").matched_call_id == "late-call-for-missed"
    assert sale_row(engine, "missed").unmatched_reason is None


def test_each_sale_reaches_back_its_own_window_from_a_day_of_far_apart_sales(engine):
    # The calls joined are those in reach of the day's earliest and latest sale.
    add_call(engine, "call-old", SALE_TIME - timedelta(days=40))
    add_call(engine, "call-late", SALE_TIME + timedelta(hours=2))
    add_sale(engine, "s-late-entry", at=SALE_TIME - timedelta(days=25))
    add_sale(engine, "s-today", at=SALE_TIME)
    add_sale(engine, "s-after-call", at=SALE_TIME + timedelta(hours=3))
    run(engine)
    assert sale_row(engine, "s-late-entry").matched_call_id == "call-old"
    assert sale_row(engine, "s-today").matched_call_id is None
    assert sale_row(engine, "s-today").unmatched_reason == "calls_outside_window"
    assert sale_row(engine, "s-after-call").matched_call_id == "call-late"


def test_the_match_settings_end_with_its_transaction(warehouse):
    """work_mem and the JIT limits are SET LOCAL: a pooled connection goes back as it came."""
    names = ("work_mem", "jit_optimize_above_cost", "jit_inline_above_cost")
    engine = sa.create_engine(warehouse.url, poolclass=sa.pool.StaticPool)  # one connection for every checkout

    def settings(connection) -> dict:
        return {name: connection.scalar(sa.select(sa.func.current_setting(name))) for name in names}

    try:
        with engine.connect() as connection:
            before = settings(connection)
        with engine.begin() as connection:
            _prepare(connection)
            during = settings(connection)
        assert during == {"work_mem": "256MB", "jit_optimize_above_cost": "-1", "jit_inline_above_cost": "-1"}
        assert during != before
        add_call(engine, "call-1", SALE_TIME - timedelta(hours=1))
        add_sale(engine, "s1")
        assert run(engine).matched == 1
        with engine.connect() as connection:
            assert settings(connection) == before
    finally:
        engine.dispose()


def test_running_a_day_twice_leaves_identical_tables(engine):
    add_call(engine, "call-1", SALE_TIME - timedelta(hours=5))
    add_call(engine, "call-2", SALE_TIME - timedelta(hours=1), caller="+4798888888")
    add_sale(engine, "s1")
    add_sale(engine, "s2", at=SALE_TIME + timedelta(minutes=1))
    add_sale(engine, "s3", caller="+4798888888")
    add_sale(engine, "s4", caller="+4797777777")
    first = run(engine)
    before = tables(engine)
    second = run(engine)
    assert tables(engine) == before
    assert first.as_counts() == second.as_counts() | {"new_pending": first.new_pending}
    assert second.new_pending == 0


def test_the_warehouse_tables_are_empty_before_each_scenario(engine):
    # Guards the fixtures: a scenario must never see another's rows.
    with engine.connect() as connection:
        assert all(connection.scalar(sa.select(sa.func.count()).select_from(t)) == 0 for t in metadata.sorted_tables)
