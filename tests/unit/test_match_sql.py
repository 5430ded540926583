"""Stage 4 matching statements, compiled (not run) for every supported warehouse dialect."""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import UTC, date, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy_bigquery import BigQueryDialect

from callconv.config import MatchRules
from callconv.matching.match import (
    UNMATCHED_REASONS,
    CreateTemporaryTableAs,
    _call_evidence,
    _chosen_call_id,
    _ordered_evidence,
    _unmatched_reason,
    as_utc,
    conversion_key,
    conversion_key_sql,
)
from callconv.protection.pseudonyms import PseudonymKey
from callconv.schema import crm_sales
from callconv.sqltime import shift_seconds

DAY = date(2026, 3, 2)
KEY = PseudonymKey("unit-1", bytes(range(32)))
OTHER_KEY = PseudonymKey("unit-2", bytes(range(1, 33)))
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


# --- the evidence statement: best call start and miss counts per sale -------------------


def evidence(rules: MatchRules | None = None):
    return _call_evidence("acme", DAY, rules or MatchRules())


@pytest.mark.parametrize("dialect_name", list(DIALECTS))
def test_call_evidence_compiles_for_every_dialect(dialect_name):
    sql = sql_of(evidence(), dialect_name)
    flat = normalised(sql)
    assert SHIFT_MARK[dialect_name] in sql
    assert "from crm_sales left outer join call_logs on call_logs.account_id = crm_sales.account_id" in flat
    assert "call_logs.caller_e164 = crm_sales.caller_e164" in flat
    assert "call_logs.call_start < crm_sales.conversion_time" in flat
    assert "crm_sales.matched_call_id is null" in flat
    assert "group by crm_sales.sale_key" in flat
    assert " as in_window" in flat and " as long_enough" in flat
    assert " as near_start" in flat and " as best_start" in flat


def test_call_evidence_bigquery_specifics():
    sql = sql_of(evidence(), "bigquery")
    # The window's lower edge in each windowed count and each best start; the tolerance twice.
    assert sql.count("TIMESTAMP_ADD(") == 6
    assert "INTERVAL" in sql and "SECOND)" in sql
    assert "make_interval" not in sql and "strftime" not in sql


def test_call_evidence_postgres_and_sqlite_specifics():
    pg = sql_of(evidence(), "postgresql")
    lite = sql_of(evidence(), "sqlite")
    assert "make_interval(secs =>" in pg and "TIMESTAMP_ADD" not in pg
    assert "strftime('%Y-%m-%d %H:%M:%f000'" in lite and "make_interval" not in lite


@pytest.mark.parametrize("dialect_name", list(DIALECTS))
def test_window_and_tolerance_are_bound_in_seconds(dialect_name):
    rules = MatchRules(window_days=7, crm_call_start_tolerance_seconds=90)
    values = list(compiled(evidence(rules), dialect_name).params.values())
    assert -7 * 86400 in values  # calls from up to 7 days before the sale
    assert -90 in values and 90 in values  # CRM call start tolerance either side
    assert "acme" in values and DAY in values


@pytest.mark.parametrize("dialect_name", list(DIALECTS))
def test_attribution_last_takes_the_latest_eligible_start(dialect_name):
    flat = normalised(sql_of(evidence(MatchRules(attribution="last")), dialect_name))
    assert flat.count("max(case when") == 2 and "min(case when" not in flat


@pytest.mark.parametrize("dialect_name", list(DIALECTS))
def test_attribution_first_takes_the_earliest_eligible_start(dialect_name):
    flat = normalised(sql_of(evidence(MatchRules(attribution="first")), dialect_name))
    assert flat.count("min(case when") == 2 and "max(case when" not in flat


@pytest.mark.parametrize("dialect_name", list(DIALECTS))
def test_near_start_prefers_calls_near_the_crm_call_start(dialect_name):
    flat = normalised(sql_of(evidence(), dialect_name))
    near = flat[: flat.index(" as near_start")]
    assert "crm_sales.crm_call_start is not null" in near[near.rindex("case when") :]


@pytest.mark.parametrize("dialect_name", list(DIALECTS))
def test_forwarded_only_adds_the_forwarding_filter(dialect_name):
    on = normalised(sql_of(evidence(MatchRules(forwarded_only=True)), dialect_name))
    off = normalised(sql_of(evidence(MatchRules(forwarded_only=False)), dialect_name))
    expected = "call_logs.via_google_forwarding is 1" if dialect_name == "sqlite" else "via_google_forwarding is true"
    assert expected in on
    assert "via_google_forwarding" not in off


@pytest.mark.parametrize("dialect_name", list(DIALECTS))
def test_min_duration_adds_the_duration_filter(dialect_name):
    on = compiled(evidence(MatchRules(min_duration_seconds=45)), dialect_name)
    off = compiled(evidence(MatchRules(min_duration_seconds=0)), dialect_name)
    # long_enough always counts by duration; with a minimum, eligibility does too.
    assert normalised(str(on)).count("call_logs.duration_seconds >=") == 3
    assert normalised(str(off)).count("call_logs.duration_seconds >=") == 1
    assert 45 in on.params.values()


def join_condition(statement) -> str:
    return normalised(str(statement)).split(" left outer join call_logs on ", 1)[1].split(" where ", 1)[0]


@pytest.mark.parametrize("dialect_name", list(DIALECTS))
def test_calls_out_of_every_sale_s_reach_are_not_joined(dialect_name):
    earliest = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
    latest = datetime(2026, 3, 2, 23, 0, tzinfo=UTC)
    statement = compiled(_call_evidence("acme", DAY, MatchRules(window_days=7), (earliest, latest)), dialect_name)
    join = join_condition(statement)
    assert "call_logs.call_start >=" in join and "call_logs.call_start <" in join
    values = list(statement.params.values())
    assert earliest - timedelta(days=7) in values and latest in values
    # Without a span (no unmatched sale) nothing narrows the join.
    assert "call_start" not in join_condition(compiled(evidence(), dialect_name))


@pytest.mark.parametrize("dialect_name", list(DIALECTS))
def test_outcome_reasons_in_order_of_evidence(dialect_name):
    reason = _unmatched_reason(_ordered_evidence("acme", DAY, MatchRules()), "acme")
    statement = compiled(reason, dialect_name)
    assert "coalesce(evidence.near_start, evidence.best_start)" in normalised(str(statement))
    values = list(statement.params.values())
    # The first missing piece of evidence names the reason, so the checks go in this order;
    # with no call in the window, one probe tells an old caller from a new one.
    order = ["calls_outside_window", "no_call_from_number", "calls_too_short", "only_non_forwarded_calls"]
    assert sorted(order) == sorted(UNMATCHED_REASONS)
    assert [value for value in values if value in UNMATCHED_REASONS] == order
    assert "exists (select * from call_logs" in normalised(str(statement))


@pytest.mark.parametrize(
    ("dialect_name", "sort_key"),
    [
        ("postgresql", 'ORDER BY evidence.caller_e164 COLLATE "C"'),
        ("sqlite", "ORDER BY evidence.caller_e164,"),
        ("bigquery", "ORDER BY `evidence`.`caller_e164`,"),
    ],
)
def test_evidence_comes_in_caller_byte_order(dialect_name, sort_key):
    sql = " ".join(sql_of(_ordered_evidence("acme", DAY, MatchRules()), dialect_name).split())
    assert sort_key.replace("(", "") in sql.replace("(", "")


@pytest.mark.parametrize("dialect_name", list(DIALECTS))
def test_chosen_call_is_the_lowest_id_at_the_chosen_second(dialect_name):
    outcome = sa.table("tmp_sale_outcome", sa.column("caller_e164"), sa.column("call_start"))
    flat = normalised(
        str(
            sa.select(_chosen_call_id(outcome, "acme", MatchRules(min_duration_seconds=30))).compile(
                dialect=DIALECTS[dialect_name]
            )
        )
    )
    assert "min(call_logs.source_call_id)" in flat
    assert "call_logs.call_start = tmp_sale_outcome.call_start" in flat
    assert "call_logs.caller_e164 = tmp_sale_outcome.caller_e164" in flat
    assert "call_logs.duration_seconds >=" in flat and "via_google_forwarding" in flat


@pytest.mark.parametrize(
    ("dialect_name", "marks"),
    [
        ("postgresql", ("encode(sha256(%(param_2)s || sha256(%(param_1)s || convert_to(", "to_char(timezone('UTC',")),
        ("sqlite", ("callconv_hmac_sha256_hex(?, ?, ", "strftime('%Y-%m-%dT%H:%M:%SZ',")),
        (
            "bigquery",
            ("TO_HEX(SHA256(CONCAT(", "SHA256(CONCAT(", "CAST(", "AS BYTES)", "FORMAT_TIMESTAMP('%Y-%m-%dT%H:%M:%SZ',"),
        ),
    ],
)
def test_conversion_key_sql_per_dialect(dialect_name, marks):
    key = conversion_key_sql(
        KEY, "acme", crm_sales.c.caller_e164, crm_sales.c.matched_call_start, crm_sales.c.conversion_action_id
    )
    sql = sql_of(key, dialect_name)
    assert all(mark in sql for mark in marks), sql


# --- conversion keys ---------------------------------------------------------------------

START = datetime(2026, 3, 2, 9, 0, 0, tzinfo=UTC)


def test_conversion_key_is_stable_and_pinned():
    key = conversion_key(KEY, "acme", "+4791234567", START, "555000111")
    assert key == conversion_key(KEY, "acme", "+4791234567", START, "555000111")
    # The key is stored in the ledger: its recipe must not drift. It is keyed: the plain
    # SHA-256 of the same text (number, call start and action, all stored beside it) is not it.
    text = b"acme|+4791234567|2026-03-02T09:00:00Z|555000111"
    assert key == hmac.new(KEY.secret, text, hashlib.sha256).hexdigest()
    assert key != hashlib.sha256(text).hexdigest()
    assert conversion_key(OTHER_KEY, "acme", "+4791234567", START, "555000111") != key
    assert re.fullmatch(r"[0-9a-f]{64}", key)


def test_conversion_key_differs_by_action_account_caller_and_second():
    base = conversion_key(KEY, "acme", "+4791234567", START, "555000111")
    assert conversion_key(KEY, "acme", "+4791234567", START, "555000222") != base
    assert conversion_key(KEY, "other", "+4791234567", START, "555000111") != base
    assert conversion_key(KEY, "acme", "+4791234568", START, "555000111") != base
    assert conversion_key(KEY, "acme", "+4791234567", START + timedelta(seconds=1), "555000111") != base


def test_conversion_key_ignores_sub_second_parts():
    base = conversion_key(KEY, "acme", "+4791234567", START, "555000111")
    assert conversion_key(KEY, "acme", "+4791234567", START.replace(microsecond=999_999), "555000111") == base


def test_conversion_key_naive_time_is_utc():
    naive = datetime(2026, 3, 2, 9, 0, 0)
    assert conversion_key(KEY, "acme", "+4791234567", naive, "555000111") == conversion_key(
        KEY, "acme", "+4791234567", START, "555000111"
    )


def test_conversion_key_aware_offset_is_the_same_instant():
    plus_one = datetime(2026, 3, 2, 10, 0, 0, tzinfo=timezone(timedelta(hours=1)))
    assert conversion_key(KEY, "acme", "+4791234567", plus_one, "555000111") == conversion_key(
        KEY, "acme", "+4791234567", START, "555000111"
    )
    # The same wall time at +01:00 is a different instant, so a different key.
    wall = datetime(2026, 3, 2, 9, 0, 0, tzinfo=timezone(timedelta(hours=1)))
    assert conversion_key(KEY, "acme", "+4791234567", wall, "555000111") != conversion_key(
        KEY, "acme", "+4791234567", START, "555000111"
    )


def test_as_utc():
    assert as_utc(datetime(2026, 3, 2, 9, 0)) == START
    assert as_utc(datetime(2026, 3, 2, 9, 0)).tzinfo is UTC
    converted = as_utc(datetime(2026, 3, 2, 11, 0, tzinfo=timezone(timedelta(hours=2))))
    assert converted == START
    assert converted.utcoffset() == timedelta(0)
    assert converted.hour == 9


@pytest.mark.parametrize("dialect_name", list(DIALECTS))
def test_the_outcome_table_is_created_from_one_query(dialect_name):
    chosen = _ordered_evidence("acme", DAY, MatchRules())
    query = sa.select(chosen.c.sale_key, _chosen_call_id(chosen, "acme", MatchRules()).label("call_id"))
    statement = CreateTemporaryTableAs("tmp_sale_outcome", query).compile(dialect=DIALECTS[dialect_name])
    flat = normalised(str(statement))
    assert flat.startswith("create temporary table tmp_sale_outcome as select chosen.sale_key, (select min(")
    assert SHIFT_MARK[dialect_name] in str(statement)
    assert "acme" in statement.params.values() and DAY in statement.params.values()


@pytest.mark.parametrize("dialect_name", list(DIALECTS))
def test_the_key_is_bound_never_written_into_the_statement(dialect_name):
    key = conversion_key_sql(
        KEY, "acme", crm_sales.c.caller_e164, crm_sales.c.matched_call_start, crm_sales.c.conversion_action_id
    )
    statement = compiled(key, dialect_name)
    inner, outer = KEY.pads
    assert inner.hex() not in str(statement) and KEY.secret.hex() not in str(statement)
    assert {inner, outer} <= {value for value in statement.params.values() if isinstance(value, bytes)}
