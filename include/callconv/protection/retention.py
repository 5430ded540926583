"""Keep personal data no longer than needed, and leave nothing that joins it back.

Each data class has a retention period per account (default 90 days, as in
Google's statement for debug data). Files are kept per account and day under
the roots of :func:`stored_file_roots`: the archive's encrypted CRM copies are
landing data, the quarantine exports quarantine data. Classes whose files hold
numbers (landing, quarantine, conversion files) are never kept longer than the
warehouse keeps numbers. Age is counted in account-local days from the day the
data belongs to, up to the retention run's own day, never from the clock. Files
older than that are deleted; quarantined rows are deleted.

In the warehouse the unit is the call (:func:`redact_warehouse`): the call-log row
and every sale, conversion and ledger row on it are redacted together. The number
is replaced by a keyed hash (HMAC-SHA256, ``caller_hmac``), so deduplication and
per-day aggregates survive; the call id, the CRM id and the bytes sent to Google go;
the call-log row loses its caller or is deleted (``retention.call_logs``). No column
left on a redacted row (call id, conversion or sale key, CRM id, time) then leads to a
row that still holds the number.

A conversion still pending or parked for upload is never touched, nor is anything
on its call, unless it is older than the configured hard maximum: then it is given
up (state ``failed``, code ``EXPIRED_BY_RETENTION``), redacted, and counted as forced.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import shutil
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import sqlalchemy as sa

from callconv.config import Account, Retention
from callconv.protection.storage import check_in_account
from callconv.schema import (
    call_logs,
    crm_sales,
    data_manager_requests,
    delivery_conflicts,
    matches,
    quarantine,
    retention_audit,
    upload_ledger,
)

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


def stored_file_roots(settings, data_class: str, account: Account | None = None) -> tuple[str, ...]:
    """The storage URIs whose ``{account}/{YYYY-MM-DD}/`` folders hold a data class's files.

    Encrypted archive copies of CRM files are landing data; the quarantine exports are
    quarantine data, so they go with the quarantined rows. An account with a landing folder
    of its own (its ``crm_source.landing_uri``) is purged there, not in the default one.
    """
    crm_source = settings.crm_source_for(account) if account is not None else settings.crm_source
    return {
        "landing": (crm_source.landing_uri, settings.archive_uri),
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
    call_logs_mode: str = "redact",
) -> Purge:
    """Redact the account's personal data of ``last_day`` and before, so nothing joins it back.

    The unit is the call: a call and every sale, conversion and ledger row on it are
    redacted together, in one transaction, once any of them is past the window and none
    is still waiting for upload. Redacted means: the caller's number replaced by its keyed
    hash (``caller_hmac``), the call id replaced by ``redacted`` (``matched_call_id``,
    ``source_call_id``), the CRM id and the bytes sent to Google removed, and the call-log
    row emptied of its caller (``call_logs_mode`` ``redact``) or deleted (``drop``).
    Sales without a call are redacted by their own day; calls no unredacted sale or
    conversion uses, by their own day. What is left of a redacted row (times, action,
    value, pseudonymous keys) names nobody and leads to no row that does.
    """
    forced = _give_up_waiting(engine, account, hard_last_day, as_of)
    scope = _Scope(account.id, last_day, _day_end(account, last_day), hmac_key, call_logs_mode)
    redacted = _redact_expired_calls(engine, scope, batch_size)
    redacted += _redact_leftovers(engine, scope, batch_size)
    redacted += _redact_unused_calls(engine, scope, batch_size)
    redacted += _purge_request_bodies(engine, scope, _day_end(account, hard_last_day))
    log.info(
        "retention: warehouse for %s: %d rows redacted up to %s (call logs: %s), %d waiting conversions given up",
        account.id,
        redacted,
        last_day,
        call_logs_mode,
        forced,
    )
    if forced:
        log.warning(
            "retention: %d conversions for %s were still pending or parked past the hard maximum and were given up",
            forced,
            account.id,
        )
    return Purge("warehouse", account.id, last_day, redacted, forced)


# A Data Manager request still needed: its bytes are resent after a crash ('sending'), or its
# status is still to be settled ('processing').
OPEN_REQUEST_STATES = ("sending", "processing")


def _purge_request_bodies(engine: sa.Engine, scope: _Scope, hard_before: datetime) -> int:
    """Delete the account's Data Manager requests sent before the window's end, once settled.

    A request's stored body holds each caller as the SHA-256 of the number that Google's
    format asks for: an unkeyed hash, which a brute force over a country's numbering plan
    reverses. Kept only while the request may still be resent or settled, and never past
    the hard maximum.
    """
    requests = data_manager_requests
    with engine.begin() as connection:
        deleted = connection.execute(
            requests.delete().where(
                requests.c.account_id == scope.account_id,
                requests.c.sent_at < scope.before,
                sa.or_(requests.c.state.not_in(OPEN_REQUEST_STATES), requests.c.sent_at < hard_before),
            )
        ).rowcount
    if deleted:
        log.info("retention: %d Data Manager request bodies of %s deleted", deleted, scope.account_id)
    return deleted


REDACTED_CALL_ID = "redacted"
REDACTED_PARSE_STATUS = "redacted"


@dataclass(frozen=True)
class _Scope:
    account_id: str
    last_day: date
    before: datetime  # the first instant after last_day, account-local
    hmac_key: bytes
    call_logs_mode: str


def _day_end(account: Account, last_day: date) -> datetime:
    return datetime.combine(last_day + timedelta(days=1), time(0), tzinfo=account.tz).astimezone(UTC)


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


def _waiting_on_call(account_id: str, call_id):
    """A conversion on this call is still pending or parked: the call and all on it stay whole."""
    on_call, waiting = matches.alias("on_call"), upload_ledger.alias("waiting")
    return sa.exists().where(
        on_call.c.account_id == account_id,
        on_call.c.source_call_id == call_id,
        waiting.c.conversion_key == on_call.c.conversion_key,
        waiting.c.state.in_(WAITING_STATES),
    )


def _waiting(account_id: str, conversion_key):
    waiting = upload_ledger.alias("waiting")
    return sa.exists().where(
        waiting.c.conversion_key == conversion_key,
        waiting.c.account_id == account_id,
        waiting.c.state.in_(WAITING_STATES),
    )


def _call_ids(column):
    return sa.and_(column.is_not(None), column != REDACTED_CALL_ID)


def _redact_expired_calls(engine: sa.Engine, scope: _Scope, batch_size: int) -> int:
    """Calls of sales or conversions past the window, each with all on it, a batch per transaction."""
    account_id = scope.account_id
    from_conversions = sa.select(matches.c.source_call_id.label("call_id")).where(
        matches.c.account_id == account_id,
        matches.c.business_date <= scope.last_day,
        _call_ids(matches.c.source_call_id),
        ~_waiting_on_call(account_id, matches.c.source_call_id),
    )
    from_sales = sa.select(crm_sales.c.matched_call_id.label("call_id")).where(
        crm_sales.c.account_id == account_id,
        crm_sales.c.business_date <= scope.last_day,
        _call_ids(crm_sales.c.matched_call_id),
        ~_waiting_on_call(account_id, crm_sales.c.matched_call_id),
    )
    expired = sa.union(from_conversions, from_sales).subquery("expired")
    done = 0
    while True:
        with engine.begin() as connection:
            calls = list(connection.scalars(sa.select(expired.c.call_id).order_by(expired.c.call_id).limit(batch_size)))
            if not calls:
                return done
            keys = sa.select(matches.c.conversion_key).where(
                matches.c.account_id == account_id, matches.c.source_call_id.in_(calls)
            )
            # Late sales recorded against a conversion on these calls go with it.
            linked = sa.select(delivery_conflicts.c.sale_key).where(
                delivery_conflicts.c.account_id == account_id, delivery_conflicts.c.conversion_key.in_(keys)
            )
            on_calls = sa.or_(
                crm_sales.c.matched_call_id.in_(calls),
                crm_sales.c.conversion_key.in_(keys),
                crm_sales.c.sale_key.in_(linked),
            )
            done += _redact_rows(connection, scope, crm_sales, ("account_id", "sale_key"), on_calls)
            done += _redact_rows(
                connection, scope, upload_ledger, ("conversion_key",), upload_ledger.c.conversion_key.in_(keys)
            )
            done += _redact_rows(connection, scope, matches, ("conversion_key",), matches.c.source_call_id.in_(calls))
            done += _redact_calls(connection, scope, call_logs.c.source_call_id.in_(calls))


def _redact_leftovers(engine: sa.Engine, scope: _Scope, batch_size: int) -> int:
    """Sales without a call (unmatched), and any other row past the window still holding something."""
    account_id = scope.account_id
    done = 0
    for table, key_columns in (
        (crm_sales, ("account_id", "sale_key")),
        (matches, ("conversion_key",)),
        (upload_ledger, ("conversion_key",)),
    ):
        due = sa.and_(
            table.c.account_id == account_id,
            table.c.business_date <= scope.last_day,
            _holds_something(table),
            ~_kept_whole(account_id, table),
        )
        keys = [table.c[name] for name in key_columns]
        while True:
            with engine.begin() as connection:
                rows = connection.execute(sa.select(*keys).where(due).limit(batch_size)).all()
                if not rows:
                    break
                chosen = sa.tuple_(*keys).in_([tuple(row) for row in rows])
                done += _redact_rows(connection, scope, table, key_columns, chosen)
    return done


def _kept_whole(account_id: str, table: sa.Table):
    """The row's conversion is waiting, or a conversion on its call is: its call stays whole."""
    own_conversion = matches.alias("own_conversion")
    kept = [
        _waiting(account_id, table.c.conversion_key),
        sa.exists().where(
            own_conversion.c.account_id == account_id,
            own_conversion.c.conversion_key == table.c.conversion_key,
            _waiting_on_call(account_id, own_conversion.c.source_call_id),
        ),
    ]
    for name in ("matched_call_id", "source_call_id"):
        if name in table.c:
            kept.append(sa.and_(_call_ids(table.c[name]), _waiting_on_call(account_id, table.c[name])))
    return sa.or_(*kept)


def _redact_unused_calls(engine: sa.Engine, scope: _Scope, batch_size: int) -> int:
    """Call-log rows of the window's end and before that no unredacted sale or conversion uses."""
    account_id, call = scope.account_id, call_logs
    # Probed by the caller (indexed): a sale matched to a call has the call's caller.
    used_by_sale = sa.exists().where(
        crm_sales.c.account_id == account_id,
        crm_sales.c.caller_e164 == call.c.caller_e164,
        crm_sales.c.matched_call_id == call.c.source_call_id,
    )
    used_by_conversion = sa.exists().where(
        matches.c.account_id == account_id,
        matches.c.source_call_id == call.c.source_call_id,
        matches.c.caller_e164.is_not(None),
    )
    due = sa.and_(
        call.c.account_id == account_id,
        call.c.call_start < scope.before,
        _call_holds_something(scope),
        ~used_by_sale,
        ~used_by_conversion,
    )
    done, after = 0, None
    while True:
        # In call-id order, each batch after the last: one walk of the account's calls per run.
        query = sa.select(call.c.source_call_id).where(due).order_by(call.c.source_call_id).limit(batch_size)
        if after is not None:
            query = query.where(call.c.source_call_id > after)
        with engine.begin() as connection:
            ids = list(connection.scalars(query))
            if not ids:
                return done
            done += _redact_calls(connection, scope, call.c.source_call_id.in_(ids))
        after = ids[-1]


def _holds_something(table: sa.Table):
    """A row not yet fully redacted: a number, a call id, a CRM id or sent bytes left."""
    left = [table.c.caller_e164.is_not(None)]
    for name in ("matched_call_id", "source_call_id"):
        if name in table.c:
            left.append(_call_ids(table.c[name]))
    if "crm_id" in table.c:
        left.append(table.c.crm_id.is_not(None))
    if "sent_payload" in table.c:
        left.append(table.c.sent_payload.is_not(None))
    return sa.or_(*left)


def _call_holds_something(scope: _Scope):
    if scope.call_logs_mode == "drop":
        return sa.true()
    return sa.or_(call_logs.c.caller_number.is_not(None), call_logs.c.caller_e164.is_not(None))


def _redact_rows(connection, scope: _Scope, table: sa.Table, key_columns, which) -> int:
    """Redact the rows of ``table`` that ``which`` selects and still hold something; how many."""
    keys = [table.c[name] for name in key_columns]
    rows = connection.execute(
        sa.select(*keys, table.c.caller_e164).where(
            table.c.account_id == scope.account_id, which, _holds_something(table)
        )
    ).all()
    if not rows:
        return 0
    values = {"caller_e164": None, "caller_hmac": sa.func.coalesce(sa.bindparam("hashed"), table.c.caller_hmac)}
    for name, value in (
        ("matched_call_id", sa.case((table.c.get("matched_call_id", sa.null()).is_not(None), REDACTED_CALL_ID))),
        ("source_call_id", REDACTED_CALL_ID),
        ("crm_id", None),
        ("sent_payload", None),  # the bytes first sent to Google hold the number
    ):
        if name in table.c:
            values[name] = value
    connection.execute(
        table.update().where(*(column == sa.bindparam(f"k_{column.name}") for column in keys)).values(values),
        [
            {
                **{f"k_{name}": value for name, value in zip(key_columns, row[:-1], strict=True)},
                "hashed": caller_hmac(scope.hmac_key, row[-1]) if row[-1] is not None else None,
            }
            for row in rows
        ],
    )
    return len(rows)


def _redact_calls(connection, scope: _Scope, which) -> int:
    call = call_logs
    rows = sa.and_(call.c.account_id == scope.account_id, which, _call_holds_something(scope))
    if scope.call_logs_mode == "drop":
        return max(connection.execute(call.delete().where(rows)).rowcount or 0, 0)
    return max(
        connection.execute(
            call.update()
            .where(rows)
            .values(caller_number=None, caller_e164=None, caller_parse_status=REDACTED_PARSE_STATUS)
        ).rowcount
        or 0,
        0,
    )


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
