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
* the run ids and their DAGs, for links to the DAG runs;
* the day's state, **from Airflow's own runs** (:func:`apply_airflow_runs`): ``failed``,
  ``running`` or ``done``, from the latest run that covers the day. The page reads those
  runs from Airflow's database and hands them here as :class:`AirflowRun`.

Upload-ledger rows that are parked or failed are shown by error code and conversion
action: never a phone number, its hash, any part of a conversion key (an HMAC of
the number) or Google's message.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from callconv.schema import run_summary, upload_ledger

IMPORT_DAG_PREFIX = "call_conversions_import__"
RERUN_DAG_ID = "call_conversions_rerun"
PROBLEM_STATES = ("parked", "failed")
DEFAULT_DAYS = 90


def import_dag_id(account_id: str) -> str:
    """The id of an account's import DAG (see dags/call_conversion_import.py)."""
    return f"{IMPORT_DAG_PREFIX}{account_id}"


def account_of_import_dag(dag_id: str) -> str | None:
    """The account of an import DAG's id; None for any other DAG."""
    return dag_id.removeprefix(IMPORT_DAG_PREFIX) if dag_id.startswith(IMPORT_DAG_PREFIX) else None


@dataclass(frozen=True)
class RunRef:
    run_id: str
    updated_at: datetime | None  # None: the run wrote no summary for the day (yet)
    dag_id: str | None = None  # None: written before the summary kept it, and not found in Airflow


# Task-instance states that end a day's run as failed: the task failed, or could not run because of one.
FAILED_TASK_STATES = ("failed", "upstream_failed")
ACTIVE_RUN_STATES = ("queued", "running")
# The last task of a day, in the import DAG and in each mapped day of the rerun DAG.
LAST_TASK = "check_anomalies"


@dataclass(frozen=True)
class TaskState:
    """One task instance of a run: its id (without group), state and rendered map index."""

    task_id: str
    state: str | None
    label: str | None = None  # the rerun's "<account> <day>"; None for unmapped tasks or before they start


@dataclass(frozen=True)
class AirflowRun:
    """A DAG run as Airflow's database has it, with the (account, day) pairs it covers."""

    dag_id: str
    run_id: str
    state: str  # queued, running, success or failed
    started: datetime  # when it started, or was queued or due: orders the runs of a day
    covers: tuple[tuple[str, date], ...]
    tasks: tuple[TaskState, ...] = ()


@dataclass(frozen=True)
class DayState:
    """Where a day stands, by the latest run that covers it."""

    state: str  # failed, running or done
    dag_id: str
    run_id: str
    failed_tasks: tuple[str, ...] = ()


@dataclass
class DaySummary:
    """One account's counts for one account-local day, over all of that day's runs."""

    account_id: str
    business_date: date
    runs: list[RunRef] = field(default_factory=list)  # latest first
    state: DayState | None = None  # None: no run of the day in Airflow's database
    intake_runs: int = 0  # runs whose intake reported: 0 shows read and quarantined as unknown
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
            run_summary.c.dag_id,
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
        day.runs.append(RunRef(run_id=row.run_id, updated_at=_as_utc(row.updated_at), dag_id=row.dag_id))
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
    day.intake_runs += 1
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


# ------------------------------------------------------------------ Airflow's runs


def days_covered(
    dag_id: str,
    data_interval_start: datetime | None,
    conf: dict | None,
    timezones: dict[str, ZoneInfo],
) -> tuple[tuple[str, date], ...]:
    """The (account, account-local day) pairs a run of one of our DAGs covers, among the given accounts.

    An import run covers the local day its data interval starts on; a rerun covers the days and
    accounts of its trigger form (none when the form's values do not make a plan).
    """
    account_id = account_of_import_dag(dag_id)
    if account_id is not None:
        if account_id not in timezones or data_interval_start is None:
            return ()
        return ((account_id, _as_utc(data_interval_start).astimezone(timezones[account_id]).date()),)
    if dag_id != RERUN_DAG_ID or not isinstance(conf, dict):
        return ()
    from callconv.rerun import RerunRequestError, plan_days

    accounts = conf.get("accounts")
    if not isinstance(accounts, list) or not all(isinstance(a, str) for a in accounts):
        return ()
    try:
        plan = plan_days(conf.get("start_date"), conf.get("end_date"), accounts, accounts)
    except RerunRequestError:
        return ()
    return tuple(
        (item["account_id"], date.fromisoformat(item["day"])) for item in plan if item["account_id"] in timezones
    )


def day_state(run: AirflowRun, account_id: str, day: date) -> DayState:
    """The state of one day in one run: failed as soon as one of the day's tasks failed for good.

    An import run's tasks are all the day's. In a rerun a day's tasks are those labelled
    "<account> <day>" (a task is labelled when it starts, so one that could not run because of a
    failed one is not, but the failed one is). Otherwise: running while the run is, then done if the
    day's last task succeeded (a whole import run: if the run succeeded).
    """
    if account_of_import_dag(run.dag_id) is not None:
        tasks = list(run.tasks)
        finished = run.state == "success"
    else:
        label = f"{account_id} {day.isoformat()}"
        tasks = [task for task in run.tasks if task.label == label]
        finished = any(task.task_id == LAST_TASK and task.state == "success" for task in tasks) or (
            not tasks and run.state == "success"
        )
    failed = tuple(sorted({task.task_id for task in tasks if task.state == "failed"}))
    if failed or any(task.state in FAILED_TASK_STATES for task in tasks):
        state = "failed"
    elif finished:
        state = "done"
    elif run.state in ACTIVE_RUN_STATES:
        state = "running"
    else:
        state = "failed"  # the run ended without finishing the day (failed elsewhere, or marked so)
    return DayState(state=state, dag_id=run.dag_id, run_id=run.run_id, failed_tasks=failed)


def apply_airflow_runs(
    summaries: list[DaySummary],
    runs: list[AirflowRun],
    account_ids: list[str] | tuple[str, ...],
    first_day: date,
    last_day: date,
) -> list[DaySummary]:
    """The summaries with each day's state and DAG ids from Airflow's runs, plus the days only Airflow knows.

    A day that a run covers but that has no summary yet (its run is queued, or failed before its
    first stage reported) is added with no counts, and such runs join the day's list of runs. A run
    id without a DAG in the summary (rows written before the summary kept it) takes the DAG of the
    covering run with that id. A day's runs are listed latest first, by when Airflow started them.
    Returned by account (in ``account_ids`` order), newest day first.
    """
    days = {(s.account_id, s.business_date): s for s in summaries}
    covering: dict[tuple[str, date], list[AirflowRun]] = {}
    for run in runs:
        for account_id, day in run.covers:
            if account_id in account_ids and first_day <= day <= last_day:
                covering.setdefault((account_id, day), []).append(run)
    for key, day_runs in covering.items():
        day_runs.sort(key=lambda run: (_as_utc(run.started), run.run_id), reverse=True)
        summary = days.get(key)
        if summary is None:
            summary = days[key] = DaySummary(account_id=key[0], business_date=key[1])
        by_run_id: dict[str, list[AirflowRun]] = {}
        for run in day_runs:
            by_run_id.setdefault(run.run_id, []).append(run)
        listed: list[tuple[datetime, RunRef]] = []
        seen: set[tuple[str | None, str]] = set()
        for ref in summary.runs:
            matches = [run for run in by_run_id.get(ref.run_id, []) if ref.dag_id in (None, run.dag_id)]
            if len(matches) > 1:
                continue  # one id in both DAGs, and the summary does not say which: both are listed below
            if len(matches) == 1:
                ref = RunRef(run_id=ref.run_id, updated_at=ref.updated_at, dag_id=matches[0].dag_id)
            when = _as_utc(matches[0].started) if len(matches) == 1 else ref.updated_at
            listed.append((when or datetime.min.replace(tzinfo=UTC), ref))
            seen.add((ref.dag_id, ref.run_id))
        for run in day_runs:
            if (run.dag_id, run.run_id) not in seen:
                listed.append((_as_utc(run.started), RunRef(run_id=run.run_id, updated_at=None, dag_id=run.dag_id)))
        # Latest first, by when Airflow started each run (when its summary was written, for one Airflow forgot).
        summary.runs = [ref for _, ref in sorted(listed, key=lambda pair: (pair[0], pair[1].run_id), reverse=True)]
        summary.state = day_state(day_runs[0], key[0], key[1])
    order = {account_id: index for index, account_id in enumerate(account_ids)}
    return sorted(
        days.values(),
        key=lambda s: (order.get(s.account_id, len(order)), -s.business_date.toordinal()),
    )


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
