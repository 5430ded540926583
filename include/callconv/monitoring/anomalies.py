"""Day-over-day checks on the per-run summary: warnings a person should look at, not failures.

Three rules, each judged for one account and one business day:

* ``match_rate_drop``: the day's match rate is more than ``match_rate_drop_points``
  percentage points (15) below the median of the account's last ``match_rate_runs``
  (7) earlier days that had a match rate. Needs at least ``match_rate_min_runs`` (3)
  such days, so a new account does not alert on its second day.
* ``no_data``: the day read no CRM rows while at least ``no_data_min_days`` (5) of the
  ``no_data_days`` (7) calendar days before it did.
* ``parked_pile_up``: more than ``parked_max`` (500) conversions of the account wait
  in the upload ledger in state ``parked``.
* ``delivery_conflicts``: the day has changes that arrived after a conversion was sent
  to Google (``changed_after_send``, ``late_sale_on_delivered_call``). They were
  recorded, not applied, and only a person can decide what they mean: any one alerts.

History comes from ``run_summary`` (one row per run, account and business day). A day
can have several runs (reruns, backfills, the rerun DAG); the latest row of each
(account, business_date) by ``updated_at`` speaks for that day, stage by stage: a
rerun that ran only some stages replaces only those. The run being checked is read by
its own ``run_id`` and day.

A rerun of a day reads no rows because its files were already imported
(``files_already_imported``); such a day still *had* data, so it neither raises
``no_data`` nor counts as an empty day in the history.

Pure SQLAlchemy Core, no Airflow: messages and values carry counts, rates and codes,
never a phone number.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import date, timedelta
from typing import Any

import sqlalchemy as sa

from callconv.schema import run_summary, upload_ledger

MATCH_RATE_DROP = "match_rate_drop"
NO_DATA = "no_data"
PARKED_PILE_UP = "parked_pile_up"
DELIVERY_CONFLICTS = "delivery_conflicts"


@dataclass(frozen=True)
class Thresholds:
    """When a day is unusual. Defaults are the documented ones; ``from_settings`` reads ``settings.alerts``."""

    match_rate_drop_points: float = 15.0
    match_rate_runs: int = 7
    match_rate_min_runs: int = 3
    no_data_days: int = 7
    no_data_min_days: int = 5
    parked_max: int = 500
    # How far back run_summary is read for the match-rate median (calendar days).
    history_days: int = 60

    @classmethod
    def from_settings(cls, settings: Any = None) -> Thresholds:
        """Take any field of the same name from ``settings.alerts`` (or from ``settings`` itself)."""
        source = getattr(settings, "alerts", None) or settings
        if source is None:
            return cls()
        values = {}
        for item in fields(cls):
            value = source.get(item.name) if isinstance(source, Mapping) else getattr(source, item.name, None)
            if value is not None:
                values[item.name] = value
        return cls(**values)


@dataclass(frozen=True)
class Anomaly:
    code: str
    message: str
    values: dict[str, Any] = field(default_factory=dict)
    account_id: str | None = None
    business_date: date | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "values": dict(self.values),
            "account_id": self.account_id,
            "business_date": self.business_date.isoformat() if self.business_date else None,
        }


@dataclass(frozen=True)
class DaySummary:
    """The counts that speak for one business day (the latest run of that day)."""

    business_date: date
    run_id: str
    counts: dict


# ------------------------------------------------------------------ reading counts


def match_rate_of(counts: Mapping | None) -> float | None:
    """The day's match rate as a fraction, or None when the day had no sales (or was not matched)."""
    match = (counts or {}).get("match")
    if not isinstance(match, Mapping):
        return None
    sales = match.get("sales")
    if not sales:
        return None
    rate = match.get("match_rate")
    if rate is None and match.get("matched") is not None:
        rate = match["matched"] / sales
    return float(rate) if rate is not None else None


def rows_read(counts: Mapping | None) -> int | None:
    """Rows read by intake, or None when intake has not reported (it failed, or has not run)."""
    intake = (counts or {}).get("intake")
    if not isinstance(intake, Mapping) or intake.get("read") is None:
        return None
    return int(intake["read"])


def had_data(counts: Mapping | None) -> bool:
    """The day had CRM rows: read now, or read by an earlier run (files already imported)."""
    intake = (counts or {}).get("intake")
    if not isinstance(intake, Mapping):
        return False
    return bool(intake.get("read")) or bool(intake.get("files_already_imported"))


def latest_per_day(rows: Iterable) -> dict[date, DaySummary]:
    """Each business_date's counts, stage by stage from the latest run (by updated_at, then run_id) reporting it.

    Usually the latest run reported every stage and simply speaks for the day. A rerun
    that ran only some stages (an upload retry, say) replaces only those, so the day
    keeps the match counts of the latest run that matched.
    """
    by_day: dict[date, list] = defaultdict(list)
    for row in rows:
        by_day[row.business_date].append(row)
    days = {}
    for day, day_rows in by_day.items():
        ordered = sorted(day_rows, key=lambda row: (row.updated_at, row.run_id))
        counts: dict = {}
        for row in ordered:  # oldest first: a later run overwrites the stages it reported
            counts.update(row.counts or {})
        days[day] = DaySummary(business_date=day, run_id=ordered[-1].run_id, counts=counts)
    return days


# ------------------------------------------------------------------ the rules (pure)


def _points(fraction: float) -> float:
    return round(fraction * 100, 2)


def match_rate_rule(
    current: Mapping | None, history: Mapping[date, DaySummary], thresholds: Thresholds
) -> Anomaly | None:
    rate = match_rate_of(current)
    if rate is None:
        return None
    prior = [
        (day, match_rate_of(summary.counts))
        for day, summary in sorted(history.items(), key=lambda item: item[0], reverse=True)
    ]
    rates = [r for _, r in prior if r is not None][: thresholds.match_rate_runs]
    if len(rates) < thresholds.match_rate_min_runs:
        return None
    median = statistics.median(rates)
    # In points, rounded, so exactly 15.0 points is "not more than 15" despite float noise.
    drop = round((median - rate) * 100, 6)
    if drop <= thresholds.match_rate_drop_points:
        return None
    return Anomaly(
        code=MATCH_RATE_DROP,
        message=(
            f"match rate {_points(rate):g}% is {drop:.1f} points below the median {_points(median):g}% "
            f"of the last {len(rates)} days (alert above {thresholds.match_rate_drop_points:g} points)"
        ),
        values={
            "match_rate": rate,
            "median_match_rate": median,
            "drop_points": round(drop, 2),
            "prior_runs": len(rates),
            "threshold_points": thresholds.match_rate_drop_points,
            "sales": (current or {}).get("match", {}).get("sales"),
            "matched": (current or {}).get("match", {}).get("matched"),
        },
    )


def no_data_rule(
    current: Mapping | None, history: Mapping[date, DaySummary], business_date: date, thresholds: Thresholds
) -> Anomaly | None:
    read = rows_read(current)
    if read is None or had_data(current):
        return None
    window = [business_date - timedelta(days=n) for n in range(1, thresholds.no_data_days + 1)]
    days_with_data = sum(1 for day in window if day in history and had_data(history[day].counts))
    if days_with_data < thresholds.no_data_min_days:
        return None
    return Anomaly(
        code=NO_DATA,
        message=(
            f"no CRM rows read for the day, while {days_with_data} of the previous "
            f"{thresholds.no_data_days} days had data"
        ),
        values={
            "read": read,
            "files_seen": (current or {}).get("intake", {}).get("files_seen"),
            "days_with_data": days_with_data,
            "days_looked_at": thresholds.no_data_days,
            "threshold_days": thresholds.no_data_min_days,
        },
    )


def parked_rule(parked: int, thresholds: Thresholds) -> Anomaly | None:
    if parked <= thresholds.parked_max:
        return None
    return Anomaly(
        code=PARKED_PILE_UP,
        message=f"{parked} conversions are parked in the upload ledger (alert above {thresholds.parked_max})",
        values={"parked": parked, "threshold": thresholds.parked_max},
    )


def conflicts_rule(current: Mapping | None) -> Anomaly | None:
    """Any change recorded after a send, by reason: the day's total, as the match counted it."""
    match = (current or {}).get("match") if isinstance(current, Mapping) else None
    counts = match.get("conflicts") if isinstance(match, Mapping) else None
    if not counts:
        return None
    total = sum(int(n) for n in counts.values())
    reasons = ", ".join(f"{reason}={n}" for reason, n in sorted(counts.items()))
    return Anomaly(
        code=DELIVERY_CONFLICTS,
        message=(
            f"{total} changes arrived after their conversion was sent to Google and were not applied ({reasons}); "
            "see delivery_conflicts"
        ),
        values={"conflicts": total, **{str(reason): int(n) for reason, n in counts.items()}},
    )


def evaluate(
    account_id: str,
    business_date: date,
    current: Mapping | None,
    history: Mapping[date, DaySummary],
    parked: int,
    thresholds: Thresholds | None = None,
) -> list[Anomaly]:
    """All rules on already-read numbers. ``history`` holds earlier days only, one summary per day."""
    thresholds = thresholds or Thresholds()
    history = {day: summary for day, summary in history.items() if day < business_date}
    found = [
        match_rate_rule(current, history, thresholds),
        no_data_rule(current, history, business_date, thresholds),
        parked_rule(parked, thresholds),
        conflicts_rule(current),
    ]
    return [
        Anomaly(a.code, a.message, a.values, account_id=account_id, business_date=business_date)
        for a in found
        if a is not None
    ]


# ------------------------------------------------------------------ reading the warehouse


def load_history(
    engine: sa.Engine, account_id: str, run_id: str, business_date: date, thresholds: Thresholds
) -> tuple[dict, dict[date, DaySummary]]:
    """(this run's counts, the latest summary of each earlier day within ``history_days``)."""
    oldest = business_date - timedelta(days=max(thresholds.history_days, thresholds.no_data_days))
    columns = (run_summary.c.run_id, run_summary.c.business_date, run_summary.c.counts, run_summary.c.updated_at)
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(*columns).where(
                run_summary.c.account_id == account_id,
                run_summary.c.business_date >= oldest,
                run_summary.c.business_date <= business_date,
            )
        ).all()
    # A run of the rerun DAG covers several days: its row for this day.
    own = [row for row in rows if row.run_id == run_id and row.business_date == business_date]
    if own:
        current = own[0].counts or {}
    else:
        # The run has not reported (yet): the latest run of the same day stands in for it.
        same_day = latest_per_day(row for row in rows if row.business_date == business_date)
        current = same_day[business_date].counts if same_day else {}
    history = latest_per_day(row for row in rows if row.business_date < business_date)
    return current, history


def parked_count(engine: sa.Engine, account_id: str) -> int:
    query = sa.select(sa.func.count()).where(
        upload_ledger.c.account_id == account_id, upload_ledger.c.state == "parked"
    )
    with engine.connect() as connection:
        return int(connection.scalar(query) or 0)


def check_run(
    engine: sa.Engine,
    account_id: str,
    run_id: str,
    business_date: date,
    thresholds: Thresholds | None = None,
) -> list[Anomaly]:
    """The anomalies of one run of one account's day, in rule order (empty when all is usual)."""
    thresholds = thresholds or Thresholds()
    current, history = load_history(engine, account_id, run_id, business_date, thresholds)
    return evaluate(account_id, business_date, current, history, parked_count(engine, account_id), thresholds)
