"""The anomaly rules, with concrete numbers, on an embedded SQLite warehouse built from the schema."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from callconv.monitoring.anomalies import (
    DELIVERY_CONFLICTS,
    MATCH_RATE_DROP,
    NO_DATA,
    PARKED_PILE_UP,
    Thresholds,
    check_run,
    evaluate,
    latest_per_day,
)
from callconv.schema import metadata, run_summary, upload_ledger

ACCOUNT = "acme"
DAY = date(2026, 11, 27)
RUN = "scheduled__2026-11-27T23:00:00+00:00"
REPORTED = datetime(2026, 11, 28, 1, 0, tzinfo=UTC)


def intake(read: int, already: int = 0) -> dict:
    return {
        "files_seen": 1 if read or already else 0,
        "files_already_imported": already,
        "read": read,
        "normalised": read,
        "quarantined": {},
        "warnings": [],
    }


def matched(sales: int, hits: int) -> dict:
    return {
        "sales": sales,
        "matched": hits,
        "unmatched": {"no_call_from_number": sales - hits} if sales > hits else {},
        "match_rate": round(hits / sales, 4) if sales else None,
        "conversions": hits,
        "new_pending": hits,
    }


def day_counts(rate: float | None, read: int = 100, sales: int = 100) -> dict:
    """A day with ``read`` CRM rows and ``sales`` sales matched at ``rate`` (None: no sales)."""
    if rate is None:
        return {"intake": intake(read), "match": matched(0, 0)}
    return {"intake": intake(read), "match": matched(sales, round(rate * sales))}


def history(rates: list[float | None], read: int = 100) -> dict:
    """Summaries for the days before DAY, the first rate being yesterday's."""
    rows = [
        SimpleNamespace(
            business_date=DAY - timedelta(days=offset),
            run_id=f"scheduled__{DAY - timedelta(days=offset)}",
            counts=day_counts(rate, read),
            updated_at=REPORTED - timedelta(days=offset),
        )
        for offset, rate in enumerate(rates, start=1)
    ]
    return latest_per_day(rows)


def codes(anomalies) -> list[str]:
    return [anomaly.code for anomaly in anomalies]


# ------------------------------------------------------------------ match rate: median and threshold

SEVEN = [0.80, 0.82, 0.78, 0.90, 0.60, 0.85, 0.81]  # median 0.81


def test_a_drop_of_more_than_15_points_below_the_median_of_seven_days_warns():
    [anomaly] = evaluate(ACCOUNT, DAY, day_counts(0.65), history(SEVEN), parked=0)
    assert anomaly.code == MATCH_RATE_DROP
    assert anomaly.account_id == ACCOUNT and anomaly.business_date == DAY
    assert anomaly.values["median_match_rate"] == pytest.approx(0.81)
    assert anomaly.values["match_rate"] == pytest.approx(0.65)
    assert anomaly.values["drop_points"] == pytest.approx(16.0)
    assert anomaly.values["prior_runs"] == 7
    assert anomaly.values["sales"] == 100 and anomaly.values["matched"] == 65
    assert anomaly.message == (
        "match rate 65% is 16.0 points below the median 81% of the last 7 days (alert above 15 points)"
    )


def test_exactly_15_points_below_is_not_more_than_15():
    assert evaluate(ACCOUNT, DAY, day_counts(0.66), history(SEVEN), parked=0) == []


def test_just_over_15_points_warns():
    counts = day_counts(0.659, sales=1000)
    assert codes(evaluate(ACCOUNT, DAY, counts, history(SEVEN), parked=0)) == [MATCH_RATE_DROP]


def test_the_median_not_the_mean_one_bad_day_does_not_drag_the_baseline():
    # Mean of these is 0.7143; median 0.85. 0.69 is 16 points under the median, 2.4 under the mean.
    rates = [0.85, 0.86, 0.84, 0.85, 0.10, 0.85, 0.65]
    [anomaly] = evaluate(ACCOUNT, DAY, day_counts(0.69), history(rates), parked=0)
    assert anomaly.values["median_match_rate"] == pytest.approx(0.85)
    assert anomaly.values["drop_points"] == pytest.approx(16.0)


def test_an_even_number_of_prior_runs_takes_the_middle_two():
    [anomaly] = evaluate(ACCOUNT, DAY, day_counts(0.69), history([0.70, 0.80, 0.90, 1.00]), parked=0)
    assert anomaly.values["median_match_rate"] == pytest.approx(0.85)
    assert anomaly.values["prior_runs"] == 4


def test_only_the_last_seven_runs_count():
    # Last 7: four at 0.9, three at 0.7 -> median 0.9. With the three older 0.5 days it would be 0.8.
    rates = [0.9, 0.7, 0.9, 0.7, 0.9, 0.7, 0.9, 0.5, 0.5, 0.5]
    [anomaly] = evaluate(ACCOUNT, DAY, day_counts(0.74), history(rates), parked=0)
    assert anomaly.values["median_match_rate"] == pytest.approx(0.9)
    assert anomaly.values["prior_runs"] == 7


def test_fewer_than_three_prior_runs_never_warn_on_match_rate():
    assert evaluate(ACCOUNT, DAY, day_counts(0.10), history([0.9, 0.9]), parked=0) == []
    assert codes(evaluate(ACCOUNT, DAY, day_counts(0.10), history([0.9, 0.9, 0.9]), parked=0)) == [MATCH_RATE_DROP]


def test_days_without_sales_have_no_match_rate_and_do_not_count_as_prior_runs():
    # Five earlier days, but only two of them had sales.
    rates = [0.9, None, None, 0.9, None]
    assert evaluate(ACCOUNT, DAY, day_counts(0.10), history(rates), parked=0) == []
    # A day without sales has no rate of its own to compare.
    assert evaluate(ACCOUNT, DAY, day_counts(None), history(SEVEN), parked=0) == []


def test_the_threshold_comes_from_the_settings():
    loose = Thresholds.from_settings(SimpleNamespace(alerts=SimpleNamespace(match_rate_drop_points=20)))
    strict = Thresholds.from_settings({"match_rate_drop_points": 10, "match_rate_min_runs": 8})
    assert loose.match_rate_drop_points == 20 and loose.parked_max == 500
    assert evaluate(ACCOUNT, DAY, day_counts(0.65), history(SEVEN), parked=0, thresholds=loose) == []
    # 16 points is over 10, but 8 prior runs are asked for and there are 7.
    assert evaluate(ACCOUNT, DAY, day_counts(0.65), history(SEVEN), parked=0, thresholds=strict) == []
    assert Thresholds.from_settings(None) == Thresholds()


# ------------------------------------------------------------------ a day without data


def no_read() -> dict:
    return {"intake": intake(0), "match": matched(0, 0)}


def test_no_rows_on_a_day_when_five_of_the_last_seven_had_data_warns():
    days = history([0.8] * 7)
    # Days -2 and -5 were empty: 5 of 7 had data.
    for offset in (2, 5):
        days[DAY - timedelta(days=offset)].counts["intake"] = intake(0)
    [anomaly] = evaluate(ACCOUNT, DAY, no_read(), days, parked=0)
    assert anomaly.code == NO_DATA
    assert anomaly.values == {
        "read": 0,
        "files_seen": 0,
        "days_with_data": 5,
        "days_looked_at": 7,
        "threshold_days": 5,
    }
    assert anomaly.message == "no CRM rows read for the day, while 5 of the previous 7 days had data"


def test_only_four_of_seven_days_with_data_is_not_unusual():
    days = history([0.8] * 7)
    for offset in (1, 2, 5):
        days[DAY - timedelta(days=offset)].counts["intake"] = intake(0)
    assert evaluate(ACCOUNT, DAY, no_read(), days, parked=0) == []


def test_a_missing_day_in_the_history_counts_as_a_day_without_data():
    days = history([0.8] * 8)
    for offset in (3, 4, 6):
        days.pop(DAY - timedelta(days=offset))
    # Days -1, -2, -5 and -7 had data: 4 of the last 7. Day -8 had data too, but is not among them.
    assert evaluate(ACCOUNT, DAY, no_read(), days, parked=0) == []


def test_a_rerun_that_finds_its_files_already_imported_had_data():
    rerun = {"intake": intake(0, already=1), "match": matched(100, 80)}
    assert evaluate(ACCOUNT, DAY, rerun, history([0.8] * 7), parked=0) == []
    # ... and a rerun in the history counts as a day with data.
    days = history([0.8] * 7)
    for offset in (1, 2, 3):
        days[DAY - timedelta(days=offset)].counts["intake"] = intake(0, already=2)
    assert codes(evaluate(ACCOUNT, DAY, no_read(), days, parked=0)) == [NO_DATA]


def test_a_run_whose_intake_has_not_reported_is_not_called_empty():
    assert evaluate(ACCOUNT, DAY, {}, history([0.8] * 7), parked=0) == []


# ------------------------------------------------------------------ parked rows


def test_parked_rows_warn_past_the_threshold():
    assert evaluate(ACCOUNT, DAY, {}, {}, parked=500) == []
    [anomaly] = evaluate(ACCOUNT, DAY, {}, {}, parked=501)
    assert anomaly.code == PARKED_PILE_UP
    assert anomaly.values == {"parked": 501, "threshold": 500}
    assert anomaly.message == "501 conversions are parked in the upload ledger (alert above 500)"
    assert evaluate(ACCOUNT, DAY, {}, {}, parked=120, thresholds=Thresholds(parked_max=100))[0].values["parked"] == 120


def test_rules_together_come_in_rule_order():
    found = evaluate(ACCOUNT, DAY, {"intake": intake(0), "match": matched(10, 1)}, history([0.9] * 7), parked=900)
    assert codes(found) == [MATCH_RATE_DROP, NO_DATA, PARKED_PILE_UP]


# ------------------------------------------------------------------ check_run on a warehouse


@pytest.fixture()
def engine(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'warehouse.db'}")
    metadata.create_all(engine)
    yield engine
    engine.dispose()


def summary_row(day: date, run_id: str, counts: dict, updated_at: datetime, account: str = ACCOUNT) -> dict:
    start = datetime.combine(day, datetime.min.time(), tzinfo=UTC)
    return {
        "run_id": run_id,
        "account_id": account,
        "business_date": day,
        "window_start": start,
        "window_end": start + timedelta(days=1),
        "counts": counts,
        "updated_at": updated_at,
    }


def ledger_row(key: str, state: str, account: str = ACCOUNT) -> dict:
    moment = datetime(2026, 11, 20, 12, tzinfo=UTC)
    return {
        "conversion_key": key,
        "account_id": account,
        "business_date": DAY,
        "state": state,
        "caller_hmac": "h" * 64,
        "call_start": moment,
        "conversion_action_id": "1",
        "conversion_time": moment,
        "run_id": "r",
    }


def seed(engine, rows: list[dict], ledger: list[dict] = ()) -> None:
    with engine.begin() as connection:
        connection.execute(run_summary.insert(), rows)
        if ledger:
            connection.execute(upload_ledger.insert(), list(ledger))


def scheduled(day: date) -> str:
    return f"scheduled__{day}"


def test_check_run_uses_the_latest_rerun_of_each_earlier_day(engine):
    rows = []
    for offset in range(1, 4):
        day = DAY - timedelta(days=offset)
        # The scheduled run found a poor rate; a rerun (later updated_at, and a run id that
        # sorts *before* the scheduled one) fixed the day. The rerun speaks for the day.
        rows.append(summary_row(day, f"scheduled__{day}", day_counts(0.20), REPORTED - timedelta(days=offset)))
        rows.append(summary_row(day, f"manual__{day}", day_counts(0.90), REPORTED - timedelta(days=offset, hours=-12)))
    rows.append(summary_row(DAY, RUN, day_counts(0.70), REPORTED))
    seed(engine, rows)

    [anomaly] = check_run(engine, ACCOUNT, RUN, DAY)
    assert anomaly.code == MATCH_RATE_DROP
    assert anomaly.values["median_match_rate"] == pytest.approx(0.90)
    assert anomaly.values["drop_points"] == pytest.approx(20.0)
    assert anomaly.values["prior_runs"] == 3  # three days, not six runs


def test_check_run_with_an_older_rerun_keeps_the_later_scheduled_run(engine):
    rows = []
    for offset in range(1, 4):
        day = DAY - timedelta(days=offset)
        rows.append(summary_row(day, f"manual__{day}", day_counts(0.20), REPORTED - timedelta(days=offset, hours=1)))
        rows.append(summary_row(day, f"scheduled__{day}", day_counts(0.90), REPORTED - timedelta(days=offset)))
    rows.append(summary_row(DAY, RUN, day_counts(0.80), REPORTED))
    seed(engine, rows)
    assert check_run(engine, ACCOUNT, RUN, DAY) == []


def test_check_run_reads_the_run_it_is_given_even_if_another_run_of_the_day_is_newer(engine):
    rows = [
        summary_row(DAY - timedelta(days=n), f"s{n}", day_counts(0.9), REPORTED - timedelta(days=n)) for n in (1, 2, 3)
    ]
    rows.append(summary_row(DAY, RUN, day_counts(0.50), REPORTED))
    rows.append(summary_row(DAY, "manual__later", day_counts(0.90), REPORTED + timedelta(hours=3)))
    seed(engine, rows)
    assert codes(check_run(engine, ACCOUNT, RUN, DAY)) == [MATCH_RATE_DROP]
    assert check_run(engine, ACCOUNT, "manual__later", DAY) == []
    # A run that has not reported yet is judged by the latest run of its day.
    assert check_run(engine, ACCOUNT, "not_reported", DAY) == []


def test_check_run_ignores_other_accounts_later_days_and_fewer_than_three_days(engine):
    rows = [
        summary_row(DAY - timedelta(days=1), "s1", day_counts(0.9), REPORTED - timedelta(days=1)),
        summary_row(DAY - timedelta(days=2), "s2", day_counts(0.9), REPORTED - timedelta(days=2)),
        # Not this account's, and a later day (a backfill of DAY must not compare with the future).
        summary_row(DAY - timedelta(days=3), "o3", day_counts(0.9), REPORTED, account="other"),
        summary_row(DAY + timedelta(days=1), "f1", day_counts(0.9), REPORTED + timedelta(days=1)),
        summary_row(DAY, RUN, day_counts(0.10), REPORTED),
    ]
    seed(engine, rows)
    assert check_run(engine, ACCOUNT, RUN, DAY) == []


def test_check_run_finds_a_day_without_data(engine):
    rows = [
        summary_row(DAY - timedelta(days=n), f"s{n}", day_counts(0.8, read=40 if n != 3 else 0), REPORTED)
        for n in range(1, 8)
    ]
    rows.append(summary_row(DAY, RUN, {"intake": intake(0), "match": matched(0, 0)}, REPORTED))
    seed(engine, rows)
    [anomaly] = check_run(engine, ACCOUNT, RUN, DAY)
    assert anomaly.code == NO_DATA
    assert anomaly.values["days_with_data"] == 6


def test_check_run_counts_parked_rows_of_the_account_only(engine):
    seed(
        engine,
        [summary_row(DAY, RUN, day_counts(0.8), REPORTED)],
        ledger=[ledger_row(f"p{n}", "parked") for n in range(4)]
        + [ledger_row(f"u{n}", "uploaded") for n in range(5)]
        + [ledger_row(f"o{n}", "parked", account="other") for n in range(5)],
    )
    assert check_run(engine, ACCOUNT, RUN, DAY, Thresholds(parked_max=4)) == []
    [anomaly] = check_run(engine, ACCOUNT, RUN, DAY, Thresholds(parked_max=3))
    assert anomaly.code == PARKED_PILE_UP and anomaly.values == {"parked": 4, "threshold": 3}


def test_anomaly_messages_carry_numbers_and_codes_only():
    found = evaluate(ACCOUNT, DAY, {"intake": intake(0), "match": matched(10, 1)}, history([0.9] * 7), parked=900)
    for anomaly in found:
        assert "+" not in anomaly.message
        assert all(isinstance(value, int | float) for value in anomaly.values.values() if value is not None)
        assert anomaly.as_dict()["business_date"] == DAY.isoformat()


def test_a_later_rerun_of_some_stages_replaces_only_those(engine):
    rows = []
    for offset in range(1, 4):
        day = DAY - timedelta(days=offset)
        rows.append(summary_row(day, f"scheduled__{day}", day_counts(0.90), REPORTED - timedelta(days=offset)))
        # A later run of the day that only retried the upload: the day keeps its match counts.
        rows.append(
            summary_row(day, f"retry__{day}", {"upload": {"accepted": 3}}, REPORTED - timedelta(days=offset, hours=-2))
        )
    rows.append(summary_row(DAY, RUN, day_counts(0.70), REPORTED))
    seed(engine, rows)
    [anomaly] = check_run(engine, ACCOUNT, RUN, DAY)
    assert anomaly.values["median_match_rate"] == pytest.approx(0.90) and anomaly.values["prior_runs"] == 3


def test_a_run_covering_several_days_is_read_for_the_day_checked(engine):
    """The rerun DAG records one row per (run, account, day) under one run id."""
    rows = [
        summary_row(DAY - timedelta(days=n), f"s{n}", day_counts(0.9), REPORTED - timedelta(days=n)) for n in (2, 3, 4)
    ]
    rows.append(summary_row(DAY - timedelta(days=1), "manual__rerun", day_counts(0.9), REPORTED))
    rows.append(summary_row(DAY, "manual__rerun", day_counts(0.5), REPORTED))
    seed(engine, rows)
    assert codes(check_run(engine, ACCOUNT, "manual__rerun", DAY)) == [MATCH_RATE_DROP]
    assert check_run(engine, ACCOUNT, "manual__rerun", DAY - timedelta(days=1)) == []


# ------------------------------------------------------------------ conflicts recorded after a send


def test_a_change_recorded_after_a_send_alerts_with_its_reasons():
    current = {
        "intake": intake(10),
        "match": {
            **matched(10, 9),
            "conflicts": {"late_sale_on_delivered_call": 2, "changed_after_send": 1},
        },
    }
    found = evaluate(ACCOUNT, DAY, current, {}, parked=0)
    assert codes(found) == [DELIVERY_CONFLICTS]
    assert found[0].values == {"conflicts": 3, "late_sale_on_delivered_call": 2, "changed_after_send": 1}
    assert "changed_after_send=1, late_sale_on_delivered_call=2" in found[0].message


def test_a_day_without_conflicts_does_not_alert_on_them():
    current = {"intake": intake(10), "match": {**matched(10, 9), "conflicts": {}}}
    assert DELIVERY_CONFLICTS not in codes(evaluate(ACCOUNT, DAY, current, {}, parked=0))
