"""What the call-conversions page in the Airflow UI shows, read from the warehouse.

Pure SQLAlchemy Core and plain Python, no Airflow, so it runs the same on
PostgreSQL, SQLite and BigQuery and is tested without a server.

Per account and account-local day (``run_summary.business_date``) the page shows:

* intake: rows read, normalised and quarantined by reason, **added up over the
  day's runs** (a run counts only the files it took in; ``reimport`` counts again);
* match: sales, matched, unmatched by reason and the match rate, **from the day's
  latest run that matched** (matching recomputes the whole day, so the latest run is
  the day's state);
* upload: uploaded (accepted by Google), already existed, parked by reason and failed
  by code, **added up over the day's runs** (dry runs are left out). A run uploads
  every due conversion of its account, so these are what the day's runs sent, which
  can include parked conversions of earlier days;
* the run ids, for links to the DAG runs.

Upload-ledger rows that are parked or failed are shown by error code and conversion
action: never a phone number, its hash, any part of a conversion key (an HMAC of
the number) or Google's message.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import sqlalchemy as sa

from callconv.schema import run_summary, upload_ledger

IMPORT_DAG_PREFIX = "call_conversions_import__"
PROBLEM_STATES = ("parked", "failed")
DEFAULT_DAYS = 90


def import_dag_id(account_id: str) -> str:
    """The id of an account's import DAG (see dags/call_conversion_import.py)."""
    return f"{IMPORT_DAG_PREFIX}{account_id}"


@dataclass(frozen=True)
class RunRef:
    run_id: str
    updated_at: datetime


@dataclass
class DaySummary:
    """One account's counts for one account-local day, over all of that day's runs."""

    account_id: str
    business_date: date
    runs: list[RunRef] = field(default_factory=list)  # latest first
    read: int = 0
    normalised: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    sales: int | None = None
    matched: int | None = None
    unmatched: dict[str, int] = field(default_factory=dict)
    conversions: int | None = None
    conflicts: dict[str, int] = field(default_factory=dict)  # changes recorded after a send, by reason
    uploaded: int = 0
    already_existed: int = 0
    parked: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    upload_runs: int = 0

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())

    @property
    def unmatched_total(self) -> int | None:
        if self.sales is None:
            return None
        return sum(self.unmatched.values())

    @property
    def match_rate(self) -> float | None:
        """Matched share of the day's sales, 0..1; None when the day had no sale or no match step."""
        if not self.sales or self.matched is None:
            return None
        return self.matched / self.sales

    @property
    def conflicts_total(self) -> int:
        return sum(self.conflicts.values())

    @property
    def parked_total(self) -> int:
        return sum(self.parked.values())

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())


@dataclass(frozen=True)
class ChartPoint:
    day: date
    match_rate: float | None  # None: no match result that day
    uploaded: int | None  # None: no upload that day


@dataclass(frozen=True)
class LedgerCodeCount:
    """Parked or failed ledger rows of one account, state and error code."""

    account_id: str
    state: str
    error_code: str | None
    rows: int
    first_business_date: date
    last_business_date: date
    next_park_until: datetime | None


@dataclass(frozen=True)
class LedgerProblem:
    """One parked or failed conversion, without anything that identifies the caller."""

    account_id: str
    state: str
    error_code: str | None
    conversion_action_id: str
    business_date: date
    park_until: datetime | None
    attempts: int
    run_id: str


# ------------------------------------------------------------------ run_summary


def daily_summaries(
    connectable: sa.Engine | sa.Connection,
    account_ids: list[str] | tuple[str, ...],
    first_day: date,
    last_day: date,
) -> list[DaySummary]:
    """The accounts' days in ``[first_day, last_day]`` that have a run, by account, newest day first."""
    if not account_ids:
        return []
    query = (
        sa.select(
            run_summary.c.account_id,
            run_summary.c.business_date,
            run_summary.c.run_id,
            run_summary.c.updated_at,
            run_summary.c.counts,
        )
        .where(
            run_summary.c.account_id.in_(list(account_ids)),
            run_summary.c.business_date >= first_day,
            run_summary.c.business_date <= last_day,
        )
        .order_by(
            run_summary.c.account_id,
            run_summary.c.business_date.desc(),
            run_summary.c.updated_at.desc(),
            run_summary.c.run_id.desc(),
        )
    )
    days: dict[tuple[str, date], DaySummary] = {}
    matched_from: set[tuple[str, date]] = set()
    for row in _rows(connectable, query):
        key = (row.account_id, _as_date(row.business_date))
        day = days.get(key)
        if day is None:
            day = days[key] = DaySummary(account_id=row.account_id, business_date=key[1])
        day.runs.append(RunRef(run_id=row.run_id, updated_at=_as_utc(row.updated_at)))
        counts = _as_dict(row.counts)
        _add_intake(day, counts.get("intake"))
        if key not in matched_from and isinstance(counts.get("match"), dict):
            # Rows come latest first: the first run with a match result is the day's state.
            _set_match(day, counts["match"])
            matched_from.add(key)
        _add_upload(day, counts.get("upload"))
    return list(days.values())


def chart_points(summaries: list[DaySummary], account_id: str, first_day: date, last_day: date) -> list[ChartPoint]:
    """One point per calendar day from first_day to last_day, for one account; days without runs are gaps."""
    by_day = {s.business_date: s for s in summaries if s.account_id == account_id}
    points = []
    day = first_day
    while day <= last_day:
        summary = by_day.get(day)
        points.append(
            ChartPoint(
                day=day,
                match_rate=summary.match_rate if summary else None,
                uploaded=summary.uploaded if summary and summary.upload_runs else None,
            )
        )
        day += timedelta(days=1)
    return points


def _add_intake(day: DaySummary, intake) -> None:
    if not isinstance(intake, dict):
        return
    day.read += _int(intake.get("read"))
    day.normalised += _int(intake.get("normalised"))
    day.quarantined = _add_counter(day.quarantined, intake.get("quarantined"))


def _set_match(day: DaySummary, match: dict) -> None:
    day.sales = _int(match.get("sales"))
    day.matched = _int(match.get("matched"))
    day.unmatched = _add_counter({}, match.get("unmatched"))
    day.conversions = _int(match.get("conversions"))
    day.conflicts = _add_counter({}, match.get("conflicts"))


def _add_upload(day: DaySummary, upload) -> None:
    if not isinstance(upload, dict) or "skipped" in upload or upload.get("dry_run"):
        return
    day.upload_runs += 1
    day.uploaded += _int(upload.get("accepted"))
    day.already_existed += _int(upload.get("already_existed"))
    day.parked = _add_counter(day.parked, upload.get("parked"))
    day.failed = _add_counter(day.failed, upload.get("failed"))


# ------------------------------------------------------------------ upload_ledger


def ledger_problem_counts(
    connectable: sa.Engine | sa.Connection, account_ids: list[str] | tuple[str, ...]
) -> list[LedgerCodeCount]:
    """Parked and failed ledger rows counted per account, state and error code."""
    if not account_ids:
        return []
    ledger = upload_ledger
    query = (
        sa.select(
            ledger.c.account_id,
            ledger.c.state,
            ledger.c.error_code,
            sa.func.count().label("rows"),
            sa.func.min(ledger.c.business_date).label("first_day"),
            sa.func.max(ledger.c.business_date).label("last_day"),
            sa.func.min(ledger.c.park_until).label("next_park_until"),
        )
        .where(ledger.c.account_id.in_(list(account_ids)), ledger.c.state.in_(PROBLEM_STATES))
        .group_by(ledger.c.account_id, ledger.c.state, ledger.c.error_code)
    )
    counts = [
        LedgerCodeCount(
            account_id=row.account_id,
            state=row.state,
            error_code=row.error_code,
            rows=int(row.rows),
            first_business_date=_as_date(row.first_day),
            last_business_date=_as_date(row.last_day),
            next_park_until=_as_utc(row.next_park_until),
        )
        for row in _rows(connectable, query)
    ]
    # Sorted here, not in SQL: NULL codes sort differently from one database to the next.
    return sorted(counts, key=lambda c: (c.account_id, c.state, -c.rows, c.error_code or ""))


def recent_ledger_problems(
    connectable: sa.Engine | sa.Connection, account_ids: list[str] | tuple[str, ...], limit: int = 50
) -> list[LedgerProblem]:
    """The latest parked and failed conversions (newest business date first), without caller data."""
    if not account_ids:
        return []
    ledger = upload_ledger
    # Only these columns leave the warehouse: no caller_e164, caller_hmac, error_message or key.
    query = (
        sa.select(
            ledger.c.account_id,
            ledger.c.state,
            ledger.c.error_code,
            ledger.c.conversion_action_id,
            ledger.c.business_date,
            ledger.c.park_until,
            ledger.c.attempts,
            ledger.c.run_id,
        )
        .where(ledger.c.account_id.in_(list(account_ids)), ledger.c.state.in_(PROBLEM_STATES))
        .order_by(ledger.c.business_date.desc(), ledger.c.account_id, ledger.c.conversion_key)
        .limit(limit)
    )
    return [
        LedgerProblem(
            account_id=row.account_id,
            state=row.state,
            error_code=row.error_code,
            conversion_action_id=row.conversion_action_id,
            business_date=_as_date(row.business_date),
            park_until=_as_utc(row.park_until),
            attempts=int(row.attempts or 0),
            run_id=row.run_id,
        )
        for row in _rows(connectable, query)
    ]


def default_window(today: date, days: int = DEFAULT_DAYS) -> tuple[date, date]:
    """The last ``days`` days up to and including today."""
    return today - timedelta(days=days - 1), today


# ------------------------------------------------------------------ helpers


def _rows(connectable, query):
    if isinstance(connectable, sa.Engine):
        with connectable.connect() as connection:
            return list(connection.execute(query))
    return list(connectable.execute(query))


def _as_dict(value) -> dict:
    if isinstance(value, str | bytes):
        value = json.loads(value)
    return value if isinstance(value, dict) else {}


def _int(value) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _add_counter(current: dict[str, int], more) -> dict[str, int]:
    if not isinstance(more, dict):
        return dict(current)
    total = Counter(current)
    for reason, count in more.items():
        total[str(reason)] += _int(count)
    return dict(sorted(total.items()))


def _as_date(value) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, str):
        return date.fromisoformat(value[:10])
    return value


def _as_utc(value) -> datetime | None:
    """SQLite hands back naive UTC datetimes (or text); everything else keeps its zone."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
