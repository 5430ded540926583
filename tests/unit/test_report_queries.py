"""The call-conversions page's queries, on a SQLite warehouse migrated by Alembic, with known answers.

Also renders the page from those rows (without a server) to check that no phone
number, caller hash or Google message reaches the HTML.
"""

from __future__ import annotations

import importlib.util
import json
import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy_bigquery import BigQueryDialect

from callconv.monitoring import report_queries as q
from callconv.schema import run_summary, upload_ledger
from callconv.warehouse import create_engine, migrate

PROJECT_ROOT = Path(__file__).resolve().parents[2]
D1, D2, D3 = date(2026, 11, 25), date(2026, 11, 26), date(2026, 11, 27)
FIRST, LAST = q.default_window(date(2026, 11, 28))  # 2026-08-31 .. 2026-11-28
PHONE, HMAC = "+4791234567", "f00dfeedcafe" * 5
MESSAGE = "The call is too recent for +4791234567"


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def intake(read, normalised, quarantined, **extra):
    return {
        "files_seen": 1,
        "read": read,
        "normalised": normalised,
        "quarantined": quarantined,
        "warnings": [],
        **extra,
    }


def match(sales, matched, unmatched, conversions=0):
    return {
        "sales": sales,
        "matched": matched,
        "unmatched": unmatched,
        "match_rate": round(matched / sales, 4) if sales else None,
        "conversions": conversions,
        "new_pending": conversions,
    }


def upload(accepted, already_existed=0, parked=None, failed=None, dry_run=False):
    return {
        "dry_run": dry_run,
        "selected": accepted,
        "accepted": accepted,
        "already_existed": already_existed,
        "parked": parked or {},
        "failed": failed or {},
        "ledger": {"pending": 0, "uploaded": accepted, "parked": 0, "failed": 0, "delivered": 0},
    }


# (run_id, account, business date, updated_at, counts)
RUNS = [
    (
        "scheduled__2026-11-24T23:00:00+00:00",
        "shop_a",
        D1,
        "2026-11-26T00:10:00",
        {
            "intake": intake(10, 8, {"value_negative": 1, "phone_too_short": 1}),
            "match": match(8, 6, {"no_call_from_number": 1, "calls_outside_window": 1}, 6),
            "upload": upload(5, already_existed=1, parked={"TOO_RECENT_CALL": 2}),
        },
    ),
    (
        "scheduled__2026-11-25T23:00:00+00:00",
        "shop_a",
        D2,
        "2026-11-27T01:00:00",
        {
            "intake": intake(20, 19, {"time_unparseable": 1}),
            "match": match(19, 15, {"no_call_from_number": 4}, 15),
            "upload": upload(10, parked={"TOO_RECENT_CALL": 3}, failed={"INVALID_CONVERSION_ACTION": 1}),
        },
    ),
    (
        # A later manual rerun of the same day: files already taken in, a better match, a second upload.
        "manual__2026-11-27T09:00:00+00:00",
        "shop_a",
        D2,
        "2026-11-27T09:05:00",
        {
            "intake": intake(0, 0, {}, files_already_imported=1),
            "match": match(19, 17, {"no_call_from_number": 2}, 2),
            "upload": upload(3, already_existed=2, failed={"EXPIRED_EVENT": 1}),
            "upload_dry_run": upload(99, dry_run=True),
        },
    ),
    (
        # A day whose upload has not run, and whose CRM file had no sale.
        "scheduled__2026-11-26T23:00:00+00:00",
        "shop_a",
        D3,
        "2026-11-28T00:05:00",
        {"intake": intake(0, 0, {}), "match": match(0, 0, {})},
    ),
    (
        "scheduled__2026-07-31T22:00:00+00:00",
        "shop_a",
        date(2026, 8, 1),
        "2026-08-02T00:00:00",
        {"intake": intake(5, 5, {})},
    ),
    (
        "scheduled__2026-11-25T23:00:00+00:00",
        "shop_b",
        D2,
        "2026-11-27T00:30:00",
        {
            "intake": intake(4, 4, {}),
            "match": match(4, 1, {"calls_too_short": 2, "only_non_forwarded_calls": 1}, 1),
            "upload": {"skipped": "delivery is file"},
        },
    ),
    ("scheduled__2026-11-25T23:00:00+00:00", "shop_c", D2, "2026-11-27T00:30:00", {"intake": intake(7, 7, {})}),
]

# (conversion key, account, state, business date, error code, park_until)
LEDGER = [
    ("a1" * 32, "shop_a", "parked", D2, "TOO_RECENT_CALL", at("2026-11-27T12:00:00")),
    ("b2" * 32, "shop_a", "parked", D1, "TOO_RECENT_CALL", at("2026-11-27T06:00:00")),
    ("c3" * 32, "shop_a", "failed", D2, "EXPIRED_EVENT", None),
    ("d4" * 32, "shop_a", "uploaded", D2, None, None),
    ("e5" * 32, "shop_a", "parked", D3, "RESOURCE_EXHAUSTED", at("2026-11-28T23:00:00")),
    ("f6" * 32, "shop_b", "pending", D2, None, None),
    ("07" * 32, "shop_c", "failed", D2, "EXPIRED_EVENT", None),
]


@pytest.fixture()
def engine(tmp_path):
    url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    migrate(url)
    engine = create_engine(url)
    with engine.begin() as connection:
        for run_id, account_id, day, updated_at, counts in RUNS:
            connection.execute(
                run_summary.insert().values(
                    run_id=run_id,
                    account_id=account_id,
                    business_date=day,
                    window_start=at(f"{day}T00:00:00") - timedelta(hours=1),
                    window_end=at(f"{day}T23:00:00"),
                    counts=counts,
                    updated_at=at(updated_at),
                )
            )
        for key, account_id, state, day, code, park_until in LEDGER:
            connection.execute(
                upload_ledger.insert().values(
                    conversion_key=key,
                    account_id=account_id,
                    business_date=day,
                    state=state,
                    caller_e164=PHONE,
                    caller_hmac=HMAC,
                    call_start=at(f"{day}T08:00:00"),
                    conversion_action_id="555000111",
                    conversion_time=at(f"{day}T10:00:00"),
                    attempts=2 if state == "parked" else 1,
                    park_until=park_until,
                    error_code=code,
                    error_message=MESSAGE if code else None,
                    run_id=f"run-{key[:2]}",
                )
            )
    yield engine
    engine.dispose()


def summaries(engine, accounts=("shop_a", "shop_b")):
    return {(s.account_id, s.business_date): s for s in q.daily_summaries(engine, list(accounts), FIRST, LAST)}


def test_window_is_ninety_days_up_to_today():
    assert (FIRST, LAST) == (date(2026, 8, 31), date(2026, 11, 28))


def test_days_are_listed_per_account_newest_first_within_the_window(engine):
    rows = q.daily_summaries(engine, ["shop_a", "shop_b"], FIRST, LAST)
    assert [(s.account_id, s.business_date) for s in rows] == [
        ("shop_a", D3),
        ("shop_a", D2),
        ("shop_a", D1),
        ("shop_b", D2),
    ]


def test_a_day_with_one_run(engine):
    day = summaries(engine)[("shop_a", D1)]
    assert [r.run_id for r in day.runs] == ["scheduled__2026-11-24T23:00:00+00:00"]
    assert (day.read, day.normalised) == (10, 8)
    assert day.quarantined == {"phone_too_short": 1, "value_negative": 1}
    assert day.quarantined_total == 2
    assert (day.sales, day.matched, day.unmatched_total) == (8, 6, 2)
    assert day.unmatched == {"calls_outside_window": 1, "no_call_from_number": 1}
    assert day.match_rate == pytest.approx(0.75)
    assert (day.uploaded, day.already_existed, day.upload_runs) == (5, 1, 1)
    assert day.parked == {"TOO_RECENT_CALL": 2}
    assert (day.parked_total, day.failed, day.failed_total) == (2, {}, 0)


def test_a_rerun_day_adds_intake_and_uploads_and_takes_the_latest_match(engine):
    day = summaries(engine)[("shop_a", D2)]
    assert [r.run_id for r in day.runs] == [
        "manual__2026-11-27T09:00:00+00:00",
        "scheduled__2026-11-25T23:00:00+00:00",
    ]
    assert day.runs[0].updated_at == at("2026-11-27T09:05:00")
    assert (day.read, day.normalised, day.quarantined) == (20, 19, {"time_unparseable": 1})
    assert (day.sales, day.matched, day.unmatched) == (19, 17, {"no_call_from_number": 2})
    assert day.match_rate == pytest.approx(17 / 19)
    assert day.conversions == 2
    # The dry run's 99 are left out.
    assert (day.uploaded, day.already_existed, day.upload_runs) == (13, 2, 2)
    assert day.parked == {"TOO_RECENT_CALL": 3}
    assert day.failed == {"EXPIRED_EVENT": 1, "INVALID_CONVERSION_ACTION": 1}
    assert (day.parked_total, day.failed_total) == (3, 2)


def test_a_day_without_sales_or_upload_has_no_rate(engine):
    day = summaries(engine)[("shop_a", D3)]
    assert (day.sales, day.matched, day.unmatched_total, day.match_rate) == (0, 0, 0, None)
    assert (day.uploaded, day.upload_runs) == (0, 0)


def test_file_delivery_accounts_have_no_upload(engine):
    day = summaries(engine)[("shop_b", D2)]
    assert (day.read, day.sales, day.matched) == (4, 4, 1)
    assert day.unmatched == {"calls_too_short": 2, "only_non_forwarded_calls": 1}
    assert day.match_rate == pytest.approx(0.25)
    assert (day.uploaded, day.upload_runs, day.parked, day.failed) == (0, 0, {}, {})


def test_accounts_not_asked_for_stay_out(engine):
    assert q.daily_summaries(engine, [], FIRST, LAST) == []
    assert {s.account_id for s in q.daily_summaries(engine, ["shop_c"], FIRST, LAST)} == {"shop_c"}
    assert "shop_c" not in {account for account, _ in summaries(engine)}


def test_chart_has_one_point_per_day_with_gaps(engine):
    rows = q.daily_summaries(engine, ["shop_a"], FIRST, LAST)
    points = q.chart_points(rows, "shop_a", FIRST, LAST)
    assert len(points) == 90
    assert (points[0].day, points[-1].day) == (FIRST, LAST)
    by_day = {p.day: p for p in points}
    assert (by_day[D1].match_rate, by_day[D1].uploaded) == (pytest.approx(0.75), 5)
    assert (by_day[D2].match_rate, by_day[D2].uploaded) == (pytest.approx(17 / 19), 13)
    assert (by_day[D3].match_rate, by_day[D3].uploaded) == (None, None)
    assert (by_day[LAST].match_rate, by_day[LAST].uploaded) == (None, None)
    assert sum(1 for p in points if p.uploaded is not None) == 2


def test_ledger_problems_are_counted_per_state_and_code(engine):
    assert q.ledger_problem_counts(engine, ["shop_a", "shop_b"]) == [
        q.LedgerCodeCount("shop_a", "failed", "EXPIRED_EVENT", 1, D2, D2, None),
        q.LedgerCodeCount("shop_a", "parked", "TOO_RECENT_CALL", 2, D1, D2, at("2026-11-27T06:00:00")),
        q.LedgerCodeCount("shop_a", "parked", "RESOURCE_EXHAUSTED", 1, D3, D3, at("2026-11-28T23:00:00")),
    ]


def test_recent_ledger_problems_carry_no_caller_data(engine):
    problems = q.recent_ledger_problems(engine, ["shop_a", "shop_b"])
    assert [(p.run_id, p.state, p.error_code, p.business_date, p.park_until, p.attempts) for p in problems] == [
        ("run-e5", "parked", "RESOURCE_EXHAUSTED", D3, at("2026-11-28T23:00:00"), 2),
        ("run-a1", "parked", "TOO_RECENT_CALL", D2, at("2026-11-27T12:00:00"), 2),
        ("run-c3", "failed", "EXPIRED_EVENT", D2, None, 1),
        ("run-b2", "parked", "TOO_RECENT_CALL", D1, at("2026-11-27T06:00:00"), 2),
    ]
    assert {p.conversion_action_id for p in problems} == {"555000111"}
    assert q.recent_ledger_problems(engine, ["shop_a"], limit=2)[-1].run_id == "run-a1"
    for problem in problems:
        assert PHONE not in repr(problem) and HMAC not in repr(problem) and MESSAGE not in repr(problem)
        assert not key_parts_in(repr(problem).replace(problem.run_id, ""))


def key_parts_in(text: str, width: int = 8) -> list[str]:
    """Every stretch of ``width`` characters of a ledger key that the text shows."""
    return sorted({key[i : i + width] for key, *_ in LEDGER for i in range(64 - width + 1)} & _windows(text, width))


def _windows(text: str, width: int) -> set[str]:
    return {text[i : i + width] for i in range(len(text) - width + 1)}


@pytest.mark.parametrize("build", [q.ledger_problem_counts, q.recent_ledger_problems])
def test_ledger_queries_never_select_caller_columns(build):
    """Whatever the warehouse, the statements sent do not name the caller or Google's message."""
    seen = []

    class Recorder:
        def execute(self, statement):
            seen.append(statement)
            return []

    build(Recorder(), ["shop_a"])
    (statement,) = seen
    for dialect in (sa.dialects.sqlite.dialect(), sa.dialects.postgresql.dialect(), BigQueryDialect()):
        sql = str(statement.compile(dialect=dialect)).lower()
        assert "caller_e164" not in sql and "caller_hmac" not in sql and "error_message" not in sql
        # The key is an HMAC of the number: no part of it is selected (it may order rows).
        assert "conversion_key" not in re.split(r"\sfrom\s", sql)[0]


def test_import_dag_id_matches_the_dag_file():
    assert q.import_dag_id("nordic_plumbing") == "call_conversions_import__nordic_plumbing"
    assert (
        'dag_id=f"call_conversions_import__{account_id}"'
        in (PROJECT_ROOT / "dags/call_conversion_import.py").read_text()
    )


# ------------------------------------------------------------------ the page, rendered without a server


@pytest.fixture(scope="module")
def page_module():
    spec = importlib.util.spec_from_file_location(
        "call_conversions_page_under_test", PROJECT_ROOT / "plugins" / "call_conversions_page.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def day_row(page: str, day: str) -> str:
    match = re.search(rf'<tr data-day="{day}">(.*?)</tr>', page, re.S)
    assert match, f"no row for {day}"
    return match.group(1)


def cell(row: str, column: str) -> str:
    match = re.search(rf'<td[^>]*data-col="{column}"[^>]*>(.*?)</td>', row, re.S)
    assert match, f"no {column} cell"
    return re.sub(r"<[^>]+>", " ", match.group(1)).split()[0] if match.group(1).strip() else ""


def chart_specs(page: str) -> dict[str, dict]:
    return {
        account: json.loads(text)
        for account, text in re.findall(r'<script type="application/json" id="chart-spec-([^"]+)">(.*?)</script>', page)
    }


def chart_values(spec: dict) -> list[dict]:
    return spec["data"]["values"]


def test_page_shows_the_counts_and_no_caller_data(engine, page_module, monkeypatch):
    monkeypatch.setattr(page_module, "warehouse_engine", lambda conn_id: engine)
    data = page_module.load_page_data("any_conn", ["shop_a", "shop_b"], LAST, 90)
    page = page_module.render_page(data, all_accounts=["shop_a", "shop_b"], selected=None, root="/")
    for secret in (PHONE, PHONE[3:], HMAC, MESSAGE, "a1" * 32):
        assert secret not in page
    specs = chart_specs(page)
    assert set(specs) == {"shop_a", "shop_b"}
    assert page.count('<div class="chart" id="chart-') == 2
    uploaded = {a: [v["day"] for v in chart_values(spec) if v["uploaded"] is not None] for a, spec in specs.items()}
    rated = {a: [v["day"] for v in chart_values(spec) if v["match_rate"] is not None] for a, spec in specs.items()}
    assert uploaded == {"shop_a": [str(D1), str(D2)], "shop_b": []}  # shop_b delivers by file
    assert rated == {"shop_a": [str(D1), str(D2)], "shop_b": [str(D2)]}  # D3 had no sale
    row = day_row(page, "2026-11-26")
    assert "<td>2026-11-26</td>" in row
    assert (cell(row, "uploaded"), cell(row, "match_rate")) == ("13", "89.5%")
    assert "/dags/call_conversions_import__shop_a/runs/manual__2026-11-27T09%3A00%3A00%2B00%3A00" in page
    # No part of any conversion key: 8 characters of one would already narrow the number down.
    assert key_parts_in(page) == []
    assert '<th class="text">Conversion action</th>' in page and "<code>555000111</code>" in page
    assert "shop_c" not in page


def test_a_value_from_the_warehouse_is_escaped(page_module):
    day = q.DaySummary("shop_a", D1, runs=[q.RunRef('<script>alert("x")</script>', None, "call_conversions_rerun")])
    day.quarantined = {"<b>reason</b>": 1}
    html = page_module._templates().get_template("tables.html").module.days([day], "shop_a", "/")
    assert "<script>" not in str(html) and "<b>reason" not in str(html)
    assert "&lt;script&gt;" in str(html)


def test_chart_of_an_empty_period_says_so(page_module):
    points = q.chart_points([], "shop_a", FIRST, LAST)
    data = {
        "first_day": FIRST,
        "last_day": LAST,
        "accounts": [{"id": "shop_a", "dag_id": "d", "days": [], "chart": points, "code_counts": [], "problems": []}],
    }
    page = page_module.render_page(data, all_accounts=["shop_a"], selected=None)
    assert "No runs in this period" in page
    values = chart_values(chart_specs(page)["shop_a"])
    assert len(values) == 90 and all(v["uploaded"] is None and v["match_rate"] is None for v in values)


def test_a_days_conflicts_come_from_its_latest_match_and_reach_the_page(page_module):
    day = q.DaySummary("shop_a", D1)
    q._set_match(day, {**match(8, 8, {}), "conflicts": {"late_sale_on_delivered_call": 2}})
    assert (day.conflicts, day.conflicts_total) == ({"late_sale_on_delivered_call": 2}, 2)
    q._set_match(day, match(8, 8, {}))  # an older summary without conflicts counts none
    assert day.conflicts_total == 0

    q._set_match(day, {**match(8, 8, {}), "conflicts": {"changed_after_send": 1}})
    html = str(page_module._templates().get_template("tables.html").module.days([day], "shop_a", "/"))
    assert cell(html, "conflicts") == "1" and "changed_after_send" in html
