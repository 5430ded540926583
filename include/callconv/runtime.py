"""What a task needs from Airflow, in one place: its window, the warehouse and storage.

Airflow is imported inside the functions, so the rest of the package stays
importable and testable without it.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from pathlib import Path
from time import monotonic

from callconv.config import Account, Settings, load_settings

log = logging.getLogger(__name__)

WAREHOUSE_URL_EXTRA = "sqlalchemy_url"


@dataclass(frozen=True)
class TaskWindow:
    """The run's data interval: the only notion of 'now' that business logic may use."""

    start: datetime
    end: datetime
    run_id: str
    dag_id: str | None = None  # the run's DAG, for the run summary (a run id is unique only within it)

    @classmethod
    def from_context(cls, context) -> TaskWindow:
        start, end = context["data_interval_start"], context["data_interval_end"]
        if start is None or end is None or start >= end:
            raise ValueError(
                f"run {context['run_id']} has no usable data interval ({start} to {end}); "
                "the import DAGs need a data-interval timetable"
            )
        return cls(start=_plain_utc(start), end=_plain_utc(end), run_id=context["run_id"], dag_id=dag_id_of(context))

    @classmethod
    def for_local_day(cls, account: Account, day: date, run_id: str, dag_id: str | None = None) -> TaskWindow:
        """Local midnight to local midnight, however long the day is (23 or 25 hours at DST changes)."""
        start = datetime.combine(day, time(0), tzinfo=account.tz)
        end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=account.tz)
        return cls(start=_plain_utc(start), end=_plain_utc(end), run_id=run_id, dag_id=dag_id)


def dag_id_of(context) -> str | None:
    """The id of the task's DAG, from whichever of the context's objects carries it."""
    for name in ("ti", "task_instance", "dag_run", "dag"):
        dag_id = getattr(context.get(name), "dag_id", None)
        if isinstance(dag_id, str) and dag_id:
            return dag_id
    return None


def _plain_utc(moment) -> datetime:
    return datetime.fromtimestamp(moment.timestamp(), tz=UTC)


def warehouse_url_from_connection(conn) -> str:
    """SQLAlchemy URL for an Airflow connection: postgres, sqlite or an explicit URL extra."""
    extra = conn.extra_dejson or {}
    if extra.get(WAREHOUSE_URL_EXTRA):
        return extra[WAREHOUSE_URL_EXTRA]
    if conn.conn_type in ("postgres", "postgresql"):
        from sqlalchemy.engine import URL

        return URL.create(
            "postgresql+psycopg2",
            username=conn.login or None,
            password=conn.password or None,
            host=conn.host or None,
            port=conn.port or None,
            database=conn.schema or None,
        ).render_as_string(hide_password=False)
    if conn.conn_type == "sqlite":
        return f"sqlite:///{conn.host}"
    raise ValueError(
        f"connection {conn.conn_id!r} has type {conn.conn_type!r}; use postgres, sqlite, "
        f"or set the extra {WAREHOUSE_URL_EXTRA!r} (for example bigquery://project/dataset)"
    )


def warehouse_engine(conn_id: str):
    from airflow.sdk import Connection

    return _engine_for(warehouse_url_from_connection(Connection.get(conn_id)))


@lru_cache(maxsize=4)
def _engine_for(url: str):
    from callconv.warehouse import create_engine

    return create_engine(url)


def storage_root(uri: str, settings: Settings, conn_id: str | None = None):
    """A local folder as a Path; anything else through Airflow's ObjectStoragePath."""
    resolved = settings.resolve_uri(uri)
    if "://" not in resolved or resolved.startswith("file://"):
        return Path(resolved.removeprefix("file://"))
    from airflow.sdk import ObjectStoragePath

    return ObjectStoragePath(resolved, conn_id=conn_id or os.environ.get("CALL_CONVERSIONS_STORAGE_CONN_ID"))


@dataclass(frozen=True)
class TaskScope:
    settings: Settings
    account: Account
    window: TaskWindow
    started: float = field(default_factory=monotonic)

    def seconds_so_far(self) -> float:
        """How long the stage has taken, for the run summary (monitoring, not business logic)."""
        return round(monotonic() - self.started, 3)

    @property
    def engine(self):
        return warehouse_engine(self.settings.warehouse_conn_id)


def task_scope(account_id: str, context, day: str | None = None) -> TaskScope:
    settings = load_settings()
    account = settings.account(account_id)
    if day is None:
        window = TaskWindow.from_context(context)
    else:
        window = TaskWindow.for_local_day(account, date.fromisoformat(day), context["run_id"], dag_id_of(context))
    return TaskScope(settings=settings, account=account, window=window)


def register_secret(secret: str) -> None:
    """Have Airflow's log masker hide a secret we read, as it does connection passwords."""
    try:
        from airflow.sdk.log import mask_secret
    except ImportError:  # pragma: no cover - outside Airflow there is no masker to feed
        return
    mask_secret(secret)


@contextmanager
def log_group(title: str):
    """Fold a stage's log lines into one section of the Airflow task log."""
    print(f"::group::{title}", flush=True)
    try:
        yield
    finally:
        print("::endgroup::", flush=True)
