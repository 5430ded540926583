"""Keep personal data no longer than needed.

Each data class has a retention period per account (default 90 days, as in
Google's statement for debug data). Files are kept per account and day under
the roots of :func:`stored_file_roots`: the archive's encrypted CRM copies are
landing data, the quarantine exports quarantine data. Age is counted in account-local days from
the day the data belongs to, up to the retention run's own day, never from
the clock. Files older than that are deleted; in the warehouse, quarantined
rows are deleted and phone numbers are replaced by a keyed hash
(HMAC-SHA256), so deduplication and per-day aggregates survive.

A conversion still pending or parked for upload is never touched, unless it is
older than the configured hard maximum: then it is given up (state ``failed``,
code ``EXPIRED_BY_RETENTION``), redacted, and counted as forced.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import shutil
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from callconv.config import Account, Retention
from callconv.schema import crm_sales, matches, quarantine, retention_audit, upload_ledger
from callconv.storage import check_in_account

log = logging.getLogger(__name__)

FILE_CLASSES = ("landing", "data_docs", "conversion_files")
WAREHOUSE_CLASSES = ("quarantine", "warehouse")
WAITING_STATES = ("pending", "parked")


@dataclass(frozen=True)
class Purge:
    data_class: str
    account_id: str
    cutoff: date  # data of this day and earlier is gone
    affected: int
    forced: int = 0


def caller_hmac(key: bytes, e164: str) -> str:
    return hmac.new(key, e164.encode(), hashlib.sha256).hexdigest()


def cutoff(retention: Retention, data_class: str, as_of: date) -> date:
    """The last day whose data has outlived its period: kept while age <= days."""
    return as_of - timedelta(days=retention.days(data_class) + 1)


def stored_file_roots(settings, data_class: str) -> tuple[str, ...]:
    """The storage URIs whose ``{account}/{YYYY-MM-DD}/`` folders hold a data class's files.

    Encrypted archive copies of CRM files are landing data; the quarantine exports are
    quarantine data, so they go with the quarantined rows.
    """
    return {
        "landing": (settings.crm_source.landing_uri, settings.archive_uri),
        "data_docs": (settings.data_docs_uri,),
        "conversion_files": (settings.export_uri,),
        "quarantine": (settings.quarantine_uri,),
    }.get(data_class, ())


def purge_stored_files(roots, account: Account, data_class: str, last_day: date) -> Purge:
    """:func:`purge_day_folders` over every root of a data class, counted as one purge."""
    removed = sum(purge_day_folders(root, account, data_class, last_day).affected for root in roots)
    return Purge(data_class, account.id, last_day, removed)


def purge_day_folders(root, account: Account, data_class: str, last_day: date) -> Purge:
    """Delete ``{root}/{account}/{YYYY-MM-DD}/`` folders up to and including ``last_day``.

    A symlink that leads out of the account's folder (the account folder itself, a day
    folder) is refused before anything is deleted: another account's files are never removed.
    """
    folder = root / account.id
    check_in_account(folder, root, account.id, "account folder")
    removed = 0
    if folder.exists():
        due = []
        for day_folder in sorted(folder.iterdir(), key=lambda p: p.name):
            try:
                day = date.fromisoformat(day_folder.name)
            except ValueError:
                continue
            if day <= last_day:
                check_in_account(day_folder, root, account.id, "day folder")
                due.append(day_folder)
        for day_folder in due:
            if not day_folder.is_dir():
                continue
            removed += sum(1 for p in day_folder.rglob("*") if p.is_file())
            _remove_tree(day_folder)
    log.info("retention: %s for %s: %d files removed up to %s", data_class, account.id, removed, last_day)
    return Purge(data_class, account.id, last_day, removed)


def _remove_tree(path) -> None:
    if isinstance(path, Path):
        shutil.rmtree(path)
    else:  # an object-storage path
        path.fs.rm(path.path, recursive=True)


def purge_quarantine(engine: sa.Engine, account: Account, last_day: date, batch_size: int = 5000) -> Purge:
    old = sa.and_(quarantine.c.account_id == account.id, quarantine.c.business_date <= last_day)
    key = (quarantine.c.account_id, quarantine.c.import_checksum, quarantine.c.source_row)
    removed = 0
    while True:
        with engine.begin() as connection:
            batch = connection.execute(sa.select(*key).where(old).limit(batch_size)).all()
            if not batch:
                break
            connection.execute(quarantine.delete().where(sa.tuple_(*key).in_([tuple(row) for row in batch])))
        removed += len(batch)
    log.info("retention: quarantine for %s: %d rows deleted up to %s", account.id, removed, last_day)
    return Purge("quarantine", account.id, last_day, removed)


def redact_warehouse(
    engine: sa.Engine,
    account: Account,
    last_day: date,
    hard_last_day: date,
    hmac_key: bytes,
    as_of: datetime,
    batch_size: int = 5000,
) -> Purge:
    """Replace phone numbers with their keyed hash in sales, matches and the ledger."""
    forced = _give_up_waiting(engine, account, hard_last_day, as_of)
    # NOT EXISTS, not NOT IN: PostgreSQL plans it as an anti-join. The ledger's key is
    # never NULL, so the two agree, and a row without a conversion is never waiting.
    waiting = upload_ledger.alias("waiting")
    redacted = 0
    for table, key_columns in (
        (crm_sales, ("account_id", "sale_key")),
        (matches, ("conversion_key",)),
        (upload_ledger, ("conversion_key",)),
    ):
        expired = sa.and_(
            table.c.account_id == account.id,
            table.c.business_date <= last_day,
            table.c.caller_e164.is_not(None),
            ~sa.exists().where(
                waiting.c.conversion_key == table.c.conversion_key,
                waiting.c.account_id == account.id,
                waiting.c.state.in_(WAITING_STATES),
            ),
        )
        redacted += _redact_in_batches(engine, table, key_columns, expired, hmac_key, batch_size)
    log.info(
        "retention: warehouse for %s: %d phone numbers redacted up to %s, %d waiting conversions given up",
        account.id,
        redacted,
        last_day,
        forced,
    )
    if forced:
        log.warning(
            "retention: %d conversions for %s were still pending or parked past the hard maximum and were given up",
            forced,
            account.id,
        )
    return Purge("warehouse", account.id, last_day, redacted, forced)


def _give_up_waiting(engine: sa.Engine, account: Account, hard_last_day: date, as_of: datetime) -> int:
    with engine.begin() as connection:
        return connection.execute(
            upload_ledger.update()
            .where(
                upload_ledger.c.account_id == account.id,
                upload_ledger.c.state.in_(WAITING_STATES),
                upload_ledger.c.business_date <= hard_last_day,
            )
            .values(state="failed", error_code="EXPIRED_BY_RETENTION", park_until=None)
        ).rowcount


def _redact_in_batches(engine, table, key_columns, expired, hmac_key: bytes, batch_size: int) -> int:
    keys = [table.c[name] for name in key_columns]
    done = 0
    while True:
        with engine.begin() as connection:
            rows = connection.execute(sa.select(*keys, table.c.caller_e164).where(expired).limit(batch_size)).all()
            if not rows:
                return done
            # The ledger also holds the number inside the bytes first sent to Google.
            payload = {"sent_payload": None} if "sent_payload" in table.c else {}
            connection.execute(
                table.update()
                .where(*(column == sa.bindparam(f"k_{column.name}") for column in keys))
                .values(caller_e164=None, caller_hmac=sa.bindparam("hashed"), **payload),
                [
                    {
                        **{f"k_{name}": value for name, value in zip(key_columns, row[:-1], strict=True)},
                        "hashed": caller_hmac(hmac_key, row[-1]),
                    }
                    for row in rows
                ],
            )
        done += len(rows)


def record_audit(engine: sa.Engine, run_id: str, purge: Purge, recorded_at: datetime) -> None:
    """One audit row per (run, account, class); a retried task adds to its own row."""
    key = sa.and_(
        retention_audit.c.run_id == run_id,
        retention_audit.c.account_id == purge.account_id,
        retention_audit.c.data_class == purge.data_class,
    )
    with engine.begin() as connection:
        before = connection.execute(sa.select(retention_audit.c.affected, retention_audit.c.forced).where(key)).first()
        connection.execute(retention_audit.delete().where(key))
        connection.execute(
            retention_audit.insert().values(
                run_id=run_id,
                account_id=purge.account_id,
                data_class=purge.data_class,
                cutoff=purge.cutoff,
                affected=purge.affected + (before.affected if before else 0),
                forced=purge.forced + (before.forced if before else 0),
                recorded_at=recorded_at,
            )
        )
