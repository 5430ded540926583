"""Stage 4 matching statements, compiled (not run) for every supported warehouse dialect."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, date, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy_bigquery import BigQueryDialect

from callconv.config import MatchRules
from callconv.match import _rank_calls, _unmatched_reasons, as_utc, conversion_key
from callconv.schema import crm_sales
from callconv.sqltime import shift_seconds

DAY = date(2026, 3, 2)
DIALECTS = {
    "postgresql": postgresql.dialect(),
    "sqlite": sqlite.dialect(),
    "bigquery": BigQueryDialect(),
}
SHIFT_MARK = {"postgresql": "make_interval(secs =>", "sqlite": "strftime(", "bigquery": "TIMESTAMP_ADD("}


def compiled(statement, dialect_name: str) -> sa.sql.compiler.SQLCompiler:
    return sa.select(statement).compile(dialect=DIALECTS[dialect_name])


def sql_of(statement, dialect_name: str) -> str:
    return str(compiled(statement, dialect_name))


def normalised(sql: str) -> str:
    """One line, lower case, no identifier quoting: easier to assert on across dialects."""
    return re.sub(r"\s+", " ", sql.replace("`", "").replace('"', "")).lower()


def rank_order(sql: str) -> str:
    """The ORDER BY inside row_number() OVER (...)."""
    found = re.search(r"row_number\(\) over \(partition by (.*?) order by (.*?)\) as call_rank", normalised(sql))
    assert found, sql
    return found.group(2)


# --- shift_seconds ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("dialect_name", "expected"),
    [
        ("postgresql", "(crm_sales.conversion_time + make_interval(secs => -60))"),
        ("sqlite", "strftime('%Y-%m-%d %H:%M:%f000', crm_sales.conversion_time, (-60) || ' seconds')"),
        ("bigquery", "TIMESTAMP_ADD(`crm_sales`.`conversion_time`, INTERVAL -60 SECOND)"),
    ],
)
def test_shift_seconds_renders_per_dialect(dialect_name, expected):
    statement = sa.select(shift_seconds(crm_sales.c.conversion_time, -60))
    sql = str(statement.compile(dialect=DIALECTS[dialect_name], compile_kwargs={"literal_binds": True}))
    assert expected in sql


def test_shift_seconds_is_a_timezone_aware_datetime():
    element = shift_seconds(crm_sales.c.conversion_time, 5)
    assert isinstance(element.type, sa.DateTime)
    assert element.type.timezone is True


def test_shift_seconds_binds_the_number_as_an_integer():
    params = sa.select(shift_seconds(crm_sales.c.conversion_time, 7.9)).compile(dialect=DIALECTS["postgresql"]).params
    assert list(params.values()) == [7]


# --- the ranking statement --------------------------------------------------------------


@pytest.mark.parametrize("dialect_name", list(DIALECTS))
def test_rank_calls_compiles_for_every_dialect(dialect_name):
    sql = sql_of(_rank_calls("acme", DAY, MatchRules()), dialect_name)
    flat = normalised(sql)
    assert SHIFT_MARK[dialect_name] in sql
    assert "row_number() over (partition by crm_sales.account_id, crm_sales.sale_key order by" in flat
    assert "from crm_sales join call_logs on call_logs.account_id = crm_sales.account_id" in flat
    assert "call_logs.caller_e164 = crm_sales.caller_e164" in flat
    assert "call_logs.call_start < crm_sales.conversion_time" in flat
    assert "crm_sales.matched_call_id is null" in flat


def test_rank_calls_bigquery_specifics():
    sql = sql_of(_rank_calls("acme", DAY, MatchRules()), "bigquery")
    assert "TIMESTAMP_ADD(" in sql
    assert "INTERVAL" in sql and "SECOND)" in sql
    assert "row_number() over (partition by" in sql.lower()
    assert "make_interval" not in sql and "strftime" not in sql


def test_rank_calls_postgres_and_sqlite_specifics():
    pg = sql_of(_rank_calls("acme", DAY, MatchRules()), "postgresql")
    lite = sql_of(_rank_calls("acme", DAY, MatchRules()), "sqlite")
    assert "make_interval(secs =>" in pg and "TIMESTAMP_ADD" not in pg
    assert "strftime('%Y-%m-%d %H:%M:%f000'" in lite and "make_interval" not in lite


@pytest.mark.parametrize("dialect_name", list(DIALECTS))
def test_window_and_tolerance_are_bound_in_seconds(dialect_name):
    rules = MatchRules(window_days=7, crm_call_start_tolerance_seconds=90)
    params = compiled(_rank_calls("acme", DAY, rules), dialect_name).params
    values = list(params.values())
    assert -7 * 86400 in values  # calls from up to 7 days before the sale
    assert -90 in values and 90 in values  # CRM call start tolerance either side
    assert "acme" in values and DAY in values


@pytest.mark.parametrize("dialect_name", list(DIALECTS))
def test_attribution_last_orders_latest_call_first(dialect_name):
    order = rank_order(sql_of(_rank_calls("acme", DAY, MatchRules(attribution="last")), dialect_name))
    assert order.startswith("case when")  # a call near the CRM's own call start wins first
    assert order.endswith("end, call_logs.call_start desc, call_logs.source_call_id asc")


@pytest.mark.parametrize("dialect_name", list(DIALECTS))
def test_attribution_first_orders_earliest_call_first(dialect_name):
    order = rank_order(sql_of(_rank_calls("acme", DAY, MatchRules(attribution="first")), dialect_name))
    assert order.startswith("case when")
    assert order.endswith("end, call_logs.call_start asc, call_logs.source_call_id asc")


@pytest.mark.parametrize("dialect_name", list(DIALECTS))
def test_forwarded_only_adds_the_forwarding_filter(dialect_name):
    on = normalised(sql_of(_rank_calls("acme", DAY, MatchRules(forwarded_only=True)), dialect_name))
    off = normalised(sql_of(_rank_calls("acme", DAY, MatchRules(forwarded_only=False)), dialect_name))
    expected = (
        "call_logs.via_google_forwarding is 1"
        if dialect_name == "sqlite"
        else ("call_logs.via_google_forwarding is true")
    )
    assert expected in on
    assert "via_google_forwarding" not in off


@pytest.mark.parametrize("dialect_name", list(DIALECTS))
def test_min_duration_adds_the_duration_filter(dialect_name):
    on = compiled(_rank_calls("acme", DAY, MatchRules(min_duration_seconds=45)), dialect_name)
    off = compiled(_rank_calls("acme", DAY, MatchRules(min_duration_seconds=0)), dialect_name)
    assert "call_logs.duration_seconds >=" in normalised(str(on))
    assert 45 in on.params.values()
    assert "duration_seconds" not in normalised(str(off))


# --- the unmatched-reason statement ------------------------------------------------------


@pytest.mark.parametrize("dialect_name", list(DIALECTS))
def test_unmatched_reasons_compiles_for_every_dialect(dialect_name):
    rules = MatchRules(window_days=30, min_duration_seconds=20)
    statement = compiled(_unmatched_reasons("acme", DAY, rules), dialect_name)
    sql = str(statement)
    flat = normalised(sql)
    assert SHIFT_MARK[dialect_name] in sql
    assert "from crm_sales left outer join call_logs" in flat
    assert "count(call_logs.source_call_id) as any_calls" in flat
    assert " as in_window" in flat and " as long_enough" in flat
    assert "call_logs.duration_seconds >=" in flat
    assert "group by crm_sales.account_id, crm_sales.sale_key" in flat
    assert -30 * 86400 in statement.params.values()
    assert 20 in statement.params.values()


def test_unmatched_reasons_bigquery_uses_timestamp_add():
    sql = sql_of(_unmatched_reasons("acme", DAY, MatchRules()), "bigquery")
    assert sql.count("TIMESTAMP_ADD(") == 2  # once per windowed count


# --- conversion keys ---------------------------------------------------------------------

START = datetime(2026, 3, 2, 9, 0, 0, tzinfo=UTC)


def test_conversion_key_is_stable_and_pinned():
    key = conversion_key("acme", "+4791234567", START, "555000111")
    assert key == conversion_key("acme", "+4791234567", START, "555000111")
    # The key is stored in the ledger: its recipe must not drift.
    assert key == hashlib.sha256(b"acme|+4791234567|2026-03-02T09:00:00Z|555000111").hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", key)


def test_conversion_key_differs_by_action_account_caller_and_second():
    base = conversion_key("acme", "+4791234567", START, "555000111")
    assert conversion_key("acme", "+4791234567", START, "555000222") != base
    assert conversion_key("other", "+4791234567", START, "555000111") != base
    assert conversion_key("acme", "+4791234568", START, "555000111") != base
    assert conversion_key("acme", "+4791234567", START + timedelta(seconds=1), "555000111") != base


def test_conversion_key_ignores_sub_second_parts():
    base = conversion_key("acme", "+4791234567", START, "555000111")
    assert conversion_key("acme", "+4791234567", START.replace(microsecond=999_999), "555000111") == base


def test_conversion_key_naive_time_is_utc():
    naive = datetime(2026, 3, 2, 9, 0, 0)
    assert conversion_key("acme", "+4791234567", naive, "555000111") == conversion_key(
        "acme", "+4791234567", START, "555000111"
    )


def test_conversion_key_aware_offset_is_the_same_instant():
    plus_one = datetime(2026, 3, 2, 10, 0, 0, tzinfo=timezone(timedelta(hours=1)))
    assert conversion_key("acme", "+4791234567", plus_one, "555000111") == conversion_key(
        "acme", "+4791234567", START, "555000111"
    )
    # The same wall time at +01:00 is a different instant, so a different key.
    wall = datetime(2026, 3, 2, 9, 0, 0, tzinfo=timezone(timedelta(hours=1)))
    assert conversion_key("acme", "+4791234567", wall, "555000111") != conversion_key(
        "acme", "+4791234567", START, "555000111"
    )


def test_as_utc():
    assert as_utc(datetime(2026, 3, 2, 9, 0)) == START
    assert as_utc(datetime(2026, 3, 2, 9, 0)).tzinfo is UTC
    converted = as_utc(datetime(2026, 3, 2, 11, 0, tzinfo=timezone(timedelta(hours=2))))
    assert converted == START
    assert converted.utcoffset() == timedelta(0)
    assert converted.hour == 9
