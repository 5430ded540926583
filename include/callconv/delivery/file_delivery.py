"""Stage 5 (file delivery): publish the account's conversions where Google Ads' scheduled upload fetches them.

For an account with ``delivery: file``, Google Ads runs a *scheduled upload*
that fetches one fixed file from an SFTP server on its own clock (daily, or
every few hours). :func:`publish_day_file` renders that file in Google's
template (:func:`callconv.delivery.conversion_file.render`) from the upload ledger and
publishes it through a :class:`Publisher`.

**The file is cumulative.** It holds every ledger row of the account that is
not yet confirmed (``state='pending'``), of whatever day, whose call started
within the lookback: ``call_start >= window_end - file_delivery.lookback_days``
(default 60 days, Google's limit for the account's call conversion actions),
measured from the run's data-interval end, never from the wall clock. Rows are
ordered by conversion time and key. Rows that went through the API
(``uploaded``) or were confirmed, failed or parked never appear. Rows whose
phone number retention has already redacted cannot be published; they are left
out and counted as ``redacted``. With nothing to carry the file still holds the
time-zone and header rows, so Google never imports an older file again.

**When a row counts as delivered (the rule).** No run can see when Google
fetched the file, and a backfill publishes its days' files within minutes, of
which Google may fetch only the last. So no publication is assumed to have been
fetched before the next one replaced it. Instead a published row stays in
every later file for as long as Google would still accept it:

* the first publication that carries a row sets its ``sent_at`` (and
  ``last_published_at``) to the run's window end; every later publication with
  a later window end carries it again, with the same payload, and sets
  ``last_published_at`` and adds one to ``sends``;
* a publication whose window end puts the row's call outside the lookback
  (``call_start < window_end - lookback``) no longer needs it: after that
  publication succeeded, the row becomes ``delivered`` (``delivered_by='file'``,
  ``delivered_at`` = that window end). It has been in every file published since
  its first publication, up to the last one Google could still take it from;
* a row whose call falls outside the lookback before any publication carried it
  (``last_published_at`` is null) is never called delivered: it becomes
  ``failed`` with ``error_code='OUTSIDE_LOOKBACK'``.

Why leaving is safe: a run's window end is never later than the wall clock when
it runs, so a call outside the lookback for the run is outside it for Google
too, and Google would refuse it (``EXPIRED_CALL``). Why repeating is safe:
Google keys a call conversion on caller id, conversion date time and conversion
action, and a second import of that key is a duplicate, not a new conversion.
From its first publication a row's payload is frozen (``sent_at``; matching
never rewrites it, :mod:`callconv.matching.match`), so every file carries it byte for
byte the same. The price is a bigger file, holding up to ``lookback_days`` of
conversions, and repeats that Google's upload report may list as duplicates.
``sent_payload`` stays null for rows delivered by file: it holds API request
bytes only.

**Frozen before published.** A row's payload may reach Google as soon as the
file is written remotely (a rename may succeed although its answer is lost), so
the rows a publication carries for the first time get ``sent_at`` in their own
committed transaction *before* the file is written; only rows that still hold
the payload that was read are frozen. A row a concurrent rematch changed in
between is left out of this file and counted as ``changed_meanwhile``; the next
publication carries its new payload. If the publish then fails, the rows stay
frozen and pending, with no publication recorded, and a retry carries them.

**Reruns.** The file depends only on the ledger, the account's settings and
the window end, so a rerun of the same run gives the same bytes, and changes no
table: ``sent_at`` is set only once, ``sends`` grows only for a later window
end, and nothing new falls out of the lookback. A rerun of an earlier day
publishes every row still unconfirmed (later days' rows too) and confirms
nothing that a later run did not already confirm.

One publication per account at a time: on PostgreSQL a transaction-scoped
advisory lock (:func:`callconv.warehouse.serialise`) is held from reading the
ledger to recording the publication, so two runs (the daily import and a
rerun) never interleave their files and marks. SQLite has one writer.

The remote name is stable per account, :func:`remote_file_name`:
``call_conversions_{account_id}.csv``; it is what the Google Ads schedule is
set up to fetch, and every run replaces it. No dated copy is kept remotely:
files there would hold phone numbers outside the retention DAG's reach, and the
dated local copy of the day's matches (``write_conversion_file``) already
exists under ``export_uri``.

Atomic replace: :class:`SftpPublisher` writes to a hidden temporary name in
the same remote folder, checks its size, then renames it over the target with
OpenSSH's ``posix-rename`` (an atomic ``rename(2)`` on the server). A server
without that extension gets remove-then-rename: Google may then find no file
for an instant, never half a file. On any failure the temporary file is
removed and :class:`FileDeliveryError` is raised; no publication is recorded.

"Delivered" here means *offered to Google for as long as Google would take it*:
Google imports the file on its own schedule and reports per-row results only
in its UI.

Logs carry counts only, never a phone number.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Protocol

import sqlalchemy as sa

from callconv.config import Account
from callconv.delivery.conversion_file import render
from callconv.schema import CONVERSION_PAYLOAD, upload_ledger
from callconv.warehouse import serialise

log = logging.getLogger(__name__)

DELIVERED_BY_FILE = "file"
PAYLOAD_COLUMNS = CONVERSION_PAYLOAD


class FileDeliveryError(RuntimeError):
    """The day's file could not be published; the ledger was left as it was."""


class Publisher(Protocol):
    """Puts ``payload`` under ``name`` where Google fetches it, atomically, or raises."""

    def publish(self, name: str, payload: bytes) -> None: ...


def remote_file_name(account_id: str) -> str:
    """The fixed file name Google's scheduled upload fetches for the account."""
    return f"call_conversions_{account_id}.csv"


def _temporary_name(name: str) -> str:
    # Hidden, unique per attempt: concurrent publishes never write into each other's file.
    return f".{name}.{uuid.uuid4().hex[:12]}.partial"


# ----------------------------------------------------------------- publishers


class LocalFolderPublisher:
    """Publishes into a local folder (a mounted share, or tests): temp file, then ``os.replace``."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def publish(self, name: str, payload: bytes) -> None:
        target = self.folder / name
        temporary = self.folder / _temporary_name(name)
        try:
            temporary.write_bytes(payload)
            os.replace(temporary, target)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise FileDeliveryError(
                f"could not publish {name} to folder {self.folder}: {error.strerror or error}"
            ) from error


class SftpPublisher:
    """Publishes through an Airflow ``SFTPHook`` into ``remote_dir`` on the server.

    The folder must exist (it is what the Google Ads schedule points at); it is
    never created here, so a wrong path fails loudly instead of publishing
    where Google does not look.
    """

    def __init__(self, hook, remote_dir: str):
        self.hook = hook
        self.remote_dir = remote_dir

    @property
    def where(self) -> str:
        conn_id = getattr(self.hook, "ssh_conn_id", None) or "sftp"
        return f"{conn_id}:{self.remote_dir}"

    def publish(self, name: str, payload: bytes) -> None:
        target = posixpath.join(self.remote_dir, name)
        temporary = posixpath.join(self.remote_dir, _temporary_name(name))
        try:
            with self.hook.get_managed_conn() as sftp:
                try:
                    sftp.putfo(io.BytesIO(payload), temporary, file_size=len(payload), confirm=True)
                    _replace(sftp, temporary, target)
                except BaseException:
                    _remove_quietly(sftp, temporary)
                    raise
        except Exception as error:
            hint = ""
            if isinstance(error, FileNotFoundError):
                hint = f" (does the remote folder {self.remote_dir!r} exist?)"
            elif isinstance(error, PermissionError):
                hint = f" (may the connection's user write to {self.remote_dir!r}?)"
            raise FileDeliveryError(
                f"could not publish {name} over SFTP to {self.where}: {type(error).__name__}: {error}{hint}"
            ) from error


def _replace(sftp, temporary: str, target: str) -> None:
    """Move ``temporary`` over ``target``: posix-rename if the server has it, else remove and rename."""
    try:
        sftp.posix_rename(temporary, target)
        return
    except OSError as error:
        # paramiko maps "no such file" and "permission denied" to errno; an unsupported
        # extension comes back as a bare IOError without one.
        if error.errno is not None:
            raise
        log.info("SFTP server refused posix-rename (%s); replacing by remove and rename", error)
    try:
        sftp.remove(target)
    except FileNotFoundError:
        pass
    sftp.rename(temporary, target)


def _remove_quietly(sftp, path: str) -> None:
    try:
        sftp.remove(path)
    except Exception:  # noqa: BLE001 - best effort: the temp file may not exist, or the link is down
        log.debug("temporary file not removed (it may never have been created)")


def sftp_publisher(conn_id: str, remote_dir: str) -> SftpPublisher:
    """An :class:`SftpPublisher` on the Airflow SFTP connection ``conn_id``."""
    from airflow.providers.sftp.hooks.sftp import SFTPHook

    return SftpPublisher(SFTPHook(ssh_conn_id=conn_id), remote_dir)


# ---------------------------------------------------------------------- ledger

OUTSIDE_LOOKBACK = "OUTSIDE_LOOKBACK"
DEFAULT_LOOKBACK_DAYS = 60
_CHUNK = 5000


def lookback_cutoff(window_end: datetime, lookback_days: int) -> datetime:
    """The earliest call start a publication at ``window_end`` still carries."""
    return window_end.astimezone(UTC) - timedelta(days=lookback_days)


def _unconfirmed(account_id: str, cutoff: datetime):
    """What the file carries: the account's rows not yet confirmed, calls within the lookback."""
    ledger = upload_ledger
    return (
        sa.select(
            ledger.c.conversion_key,
            ledger.c.sent_at,
            ledger.c.last_published_at,
            *(ledger.c[name] for name in PAYLOAD_COLUMNS),
        )
        .where(ledger.c.account_id == account_id, ledger.c.state == "pending", ledger.c.call_start >= cutoff)
        .order_by(ledger.c.conversion_time, ledger.c.conversion_key)
    )


# A row is frozen only if it still holds the payload that was read, and was never frozen before.
_FREEZE = (
    sa.update(upload_ledger)
    .where(
        upload_ledger.c.conversion_key == sa.bindparam("b_key"),
        upload_ledger.c.state == "pending",
        upload_ledger.c.sent_at.is_(None),
        *(upload_ledger.c[name].is_not_distinct_from(sa.bindparam(f"b_{name}")) for name in PAYLOAD_COLUMNS),
    )
    .values(sent_at=sa.bindparam("b_sent_at"))
)


def _chunks(keys: list[str]):
    for start in range(0, len(keys), _CHUNK):
        yield keys[start : start + _CHUNK]


def _freeze(engine: sa.Engine, rows: list[dict], window_end: datetime) -> set[str]:
    """Set ``sent_at`` on rows never published, in a committed transaction; returns the keys frozen
    with the payload in ``rows`` (by this run or, before it, by a publication that failed)."""
    fresh = [row for row in rows if row["sent_at"] is None]
    frozen = {row["conversion_key"] for row in rows if row["sent_at"] is not None}
    if not fresh:
        return frozen
    read = {row["conversion_key"]: tuple(row[name] for name in PAYLOAD_COLUMNS) for row in fresh}
    with engine.begin() as connection:
        connection.execute(
            _FREEZE,
            [
                {
                    "b_key": key,
                    "b_sent_at": window_end,
                    **{f"b_{name}": value for name, value in zip(PAYLOAD_COLUMNS, payload, strict=True)},
                }
                for key, payload in read.items()
            ],
        )
        for chunk in _chunks(list(read)):
            now_frozen = connection.execute(
                sa.select(upload_ledger.c.conversion_key, *(upload_ledger.c[name] for name in PAYLOAD_COLUMNS)).where(
                    upload_ledger.c.conversion_key.in_(chunk),
                    upload_ledger.c.state == "pending",
                    upload_ledger.c.sent_at.is_not(None),
                )
            )
            frozen.update(key for key, *payload in now_frozen if tuple(payload) == read[key])
    return frozen


def _record_publication(connection, keys: list[str], window_end: datetime) -> None:
    """The rows carried by a publication at ``window_end``: ``last_published_at``, and one more send
    unless a publication with this window end or a later one already carried them (a rerun)."""
    ledger = upload_ledger
    for chunk in _chunks(keys):
        connection.execute(
            ledger.update()
            .where(
                ledger.c.conversion_key.in_(chunk),
                ledger.c.state == "pending",
                sa.or_(ledger.c.last_published_at.is_(None), ledger.c.last_published_at < window_end),
            )
            .values(last_published_at=window_end, sends=ledger.c.sends + 1)
        )


def _settle_outside_lookback(connection, account_id: str, cutoff: datetime, window_end: datetime, days: int):
    """Rows the publication no longer carries because their call left the lookback: delivered if an
    earlier publication carried them, else failed. Returns (delivered, failed)."""
    ledger = upload_ledger
    gone = sa.and_(ledger.c.account_id == account_id, ledger.c.state == "pending", ledger.c.call_start < cutoff)
    delivered = connection.execute(
        ledger.update()
        .where(gone, ledger.c.last_published_at.is_not(None))
        .values(state="delivered", delivered_by=DELIVERED_BY_FILE, delivered_at=window_end)
    ).rowcount
    failed = connection.execute(
        ledger.update()
        .where(gone, ledger.c.last_published_at.is_(None))
        .values(
            state="failed",
            error_code=OUTSIDE_LOOKBACK,
            error_message=f"the call left the {days}-day lookback before any published file carried it",
        )
    ).rowcount
    return max(delivered or 0, 0), max(failed or 0, 0)


# ------------------------------------------------------------------------- API


def publish_day_file(
    engine: sa.Engine,
    account: Account,
    business_date: date,
    publisher: Publisher,
    window_end: datetime,
    run_id: str,
    lookback_days: int = DEFAULT_LOOKBACK_DAYS,
) -> dict:
    """Publish ``account``'s cumulative file as of ``window_end`` and record it; see the module doc.

    ``business_date`` is the run's day, for the log; the file's content does not depend on it.
    Returns counts: ``conversions`` in the file, of which ``newly_published`` (first time in a
    published file) and ``already_published``; ``changed_meanwhile`` (left out, still pending);
    ``newly_delivered`` (left the lookback after being published), ``outside_lookback`` (left it
    unpublished: failed); ``redacted`` (left out); ``lookback_days``, ``bytes`` and the remote
    ``file`` name. Raises :class:`FileDeliveryError` when the publish fails, with no publication
    recorded (rows carried for the first time stay frozen).
    """
    if account.delivery != "file":
        raise ValueError(
            f"account {account.id!r} has delivery {account.delivery!r}; only accounts with delivery 'file' "
            "publish a conversion file for Google's scheduled uploads"
        )
    if window_end.tzinfo is None:
        raise ValueError("window_end must be timezone-aware")
    window_end = window_end.astimezone(UTC)
    cutoff = lookback_cutoff(window_end, lookback_days)

    with engine.connect() as guard, guard.begin():
        serialise(guard, "file_delivery", account.id)
        return _publish(engine, account, business_date, publisher, window_end, cutoff, lookback_days, run_id)


def _publish(engine, account, business_date, publisher, window_end, cutoff, lookback_days, run_id) -> dict:
    with engine.connect() as connection:
        due = [dict(row) for row in connection.execute(_unconfirmed(account.id, cutoff)).mappings()]
    rows = [row for row in due if row["caller_e164"]]
    redacted = len(due) - len(rows)
    known_actions = {action.id for action in account.conversion_actions.values()}
    unknown = sorted({row["conversion_action_id"] for row in rows} - known_actions)
    if unknown:
        raise FileDeliveryError(
            f"account {account.id!r}: the ledger holds conversions for action id(s) {', '.join(unknown)}, "
            f"which accounts[{account.id}].conversion_actions does not name; the file needs each action's name"
        )

    frozen = _freeze(engine, rows, window_end)
    changed = sum(1 for row in rows if row["conversion_key"] not in frozen)
    rows = [row for row in rows if row["conversion_key"] in frozen]

    name = remote_file_name(account.id)
    payload = render(account, rows)
    try:
        publisher.publish(name, payload)
    except FileDeliveryError as error:
        log.error("account %s run %s: %d conversions not published: %s", account.id, run_id, len(rows), error)
        raise
    except Exception as error:
        log.error("account %s run %s: %d conversions not published", account.id, run_id, len(rows))
        raise FileDeliveryError(f"could not publish {name}: {type(error).__name__}: {error}") from error

    newly_published = sum(1 for row in rows if row["last_published_at"] is None)
    with engine.begin() as connection:
        _record_publication(connection, [row["conversion_key"] for row in rows], window_end)
        delivered, expired = _settle_outside_lookback(connection, account.id, cutoff, window_end, lookback_days)

    counts = {
        "file": name,
        "conversions": len(rows),
        "newly_published": newly_published,
        "already_published": len(rows) - newly_published,
        "changed_meanwhile": changed,
        "newly_delivered": delivered,
        "outside_lookback": expired,
        "redacted": redacted,
        "lookback_days": lookback_days,
        "bytes": len(payload),
    }
    log.info(
        "account %s run %s (%s): file published with %d conversions (%d for the first time, %d again); "
        "%d left the %d-day lookback and count as delivered; %d bytes",
        account.id,
        run_id,
        business_date.isoformat(),
        len(rows),
        newly_published,
        len(rows) - newly_published,
        delivered,
        lookback_days,
        len(payload),
    )
    if changed:
        log.warning(
            "account %s: %d conversions changed while the file was prepared; left out, the next publication "
            "carries them",
            account.id,
            changed,
        )
    if expired:
        log.warning(
            "account %s: %d conversions left the %d-day lookback before any file carried them: failed (%s)",
            account.id,
            expired,
            lookback_days,
            OUTSIDE_LOOKBACK,
        )
    if redacted:
        log.warning(
            "account %s: %d conversions not yet confirmed have no phone number any more (retention) and were left out",
            account.id,
            redacted,
        )
    return counts
