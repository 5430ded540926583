"""Stage 5 (file delivery): publish the day's conversions where Google Ads' scheduled uploads fetch them.

For an account with ``delivery: file``, Google Ads runs a *scheduled upload*
that fetches one fixed file from an SFTP server. :func:`publish_day_file`
renders the day's file in Google's template
(:func:`callconv.conversion_file.render`) from the upload ledger, publishes it
through a :class:`Publisher`, and only then marks the rows it carried as
delivered.

What the day's file holds: the account's ledger rows with ``business_date`` =
the day that are ``pending``, or ``delivered`` by file (``delivered_by =
'file'``), ordered by conversion time and key. So a republish of a day gives
byte-identical content, a late conversion queued by a rematch is added to it,
and rows that went through the API (``uploaded``) never appear. Rows whose
phone number retention has already redacted cannot be published and are
counted as ``redacted``. A day with no conversions is still published, with
just the time-zone and header rows, so Google never fetches the previous
day's file again.

The remote name is stable per account, :func:`remote_file_name`:
``call_conversions_{account_id}.csv``; it is what the Google Ads schedule is
set up to fetch, and every run replaces it. No dated copy is kept remotely:
files there would hold phone numbers outside the retention DAG's reach, and the
dated local copy (``write_conversion_file``) already exists under
``export_uri``.

Atomic replace: :class:`SftpPublisher` writes to a hidden temporary name in
the same remote folder, checks its size, then renames it over the target with
OpenSSH's ``posix-rename`` (an atomic ``rename(2)`` on the server). A server
without that extension gets remove-then-rename: Google may then find no file
for an instant, never half a file. On any failure the temporary file is
removed and :class:`FileDeliveryError` is raised with nothing marked.

Ledger: after a successful publish, one transaction sets the published
``pending`` rows to ``state='delivered'``, ``delivered_by='file'``,
``delivered_at=window_end`` (the run's data-interval end, never the wall
clock). A row whose payload changed between reading and marking (a
concurrent rematch) is left pending and counted as ``changed_meanwhile``; the
next publish of the day carries its new payload. Rows already delivered by
file are not touched again, so a rerun changes nothing in the ledger.

"Delivered" here means *published for Google to fetch*: Google imports the
file on its own schedule and reports per-row results only in its UI.

Logs carry counts only, never a phone number.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Protocol

import sqlalchemy as sa

from callconv.config import Account
from callconv.conversion_file import render
from callconv.schema import CONVERSION_PAYLOAD, upload_ledger

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


def _due_for_file(account_id: str, business_date: date):
    ledger = upload_ledger
    return (
        sa.select(ledger.c.conversion_key, ledger.c.state, *(ledger.c[name] for name in PAYLOAD_COLUMNS))
        .where(
            ledger.c.account_id == account_id,
            ledger.c.business_date == business_date,
            sa.or_(
                ledger.c.state == "pending",
                sa.and_(ledger.c.state == "delivered", ledger.c.delivered_by == DELIVERED_BY_FILE),
            ),
        )
        .order_by(ledger.c.conversion_time, ledger.c.conversion_key)
    )


# A pending row is marked only if it still holds the payload that was published.
_MARK = (
    sa.update(upload_ledger)
    .where(
        upload_ledger.c.conversion_key == sa.bindparam("b_key"),
        upload_ledger.c.state == "pending",
        *(upload_ledger.c[name].is_not_distinct_from(sa.bindparam(f"b_{name}")) for name in PAYLOAD_COLUMNS),
    )
    .values(
        state="delivered",
        delivered_by=DELIVERED_BY_FILE,
        delivered_at=sa.bindparam("b_delivered_at"),
    )
)


def _count_delivered_by_file(connection, keys: list[str]) -> int:
    counted = 0
    for start in range(0, len(keys), 5000):
        chunk = keys[start : start + 5000]
        counted += connection.scalar(
            sa.select(sa.func.count())
            .select_from(upload_ledger)
            .where(
                upload_ledger.c.conversion_key.in_(chunk),
                upload_ledger.c.state == "delivered",
                upload_ledger.c.delivered_by == DELIVERED_BY_FILE,
            )
        )
    return counted


# ------------------------------------------------------------------------- API


def publish_day_file(
    engine: sa.Engine,
    account: Account,
    business_date: date,
    publisher: Publisher,
    window_end: datetime,
    run_id: str,
) -> dict:
    """Publish ``account``'s file for ``business_date`` and mark what it carried; see the module doc.

    Returns counts: ``conversions`` in the file, ``newly_delivered``,
    ``already_delivered`` (by an earlier publish of the day),
    ``changed_meanwhile`` (left pending), ``redacted`` (left out), ``bytes``
    and the remote ``file`` name. Raises :class:`FileDeliveryError` when the
    publish fails, with the ledger unchanged.
    """
    if account.delivery != "file":
        raise ValueError(
            f"account {account.id!r} has delivery {account.delivery!r}; only accounts with delivery 'file' "
            "publish a conversion file for Google's scheduled uploads"
        )
    if window_end.tzinfo is None:
        raise ValueError("window_end must be timezone-aware")
    window_end = window_end.astimezone(UTC)

    with engine.connect() as connection:
        due = [dict(row) for row in connection.execute(_due_for_file(account.id, business_date)).mappings()]
    rows = [row for row in due if row["caller_e164"]]
    redacted = len(due) - len(rows)
    known_actions = {action.id for action in account.conversion_actions.values()}
    unknown = sorted({row["conversion_action_id"] for row in rows} - known_actions)
    if unknown:
        raise FileDeliveryError(
            f"account {account.id!r}: the ledger holds conversions for action id(s) {', '.join(unknown)}, "
            f"which accounts[{account.id}].conversion_actions does not name; the file needs each action's name"
        )

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

    pending = [row for row in rows if row["state"] == "pending"]
    already = len(rows) - len(pending)
    newly = 0
    if pending:
        changes = [
            {
                "b_key": row["conversion_key"],
                "b_delivered_at": window_end,
                **{f"b_{name}": row[name] for name in PAYLOAD_COLUMNS},
            }
            for row in pending
        ]
        with engine.begin() as connection:
            connection.execute(_MARK, changes)
            newly = _count_delivered_by_file(connection, [row["conversion_key"] for row in rows]) - already
    changed = len(pending) - newly

    counts = {
        "file": name,
        "conversions": len(rows),
        "newly_delivered": newly,
        "already_delivered": already,
        "changed_meanwhile": changed,
        "redacted": redacted,
        "bytes": len(payload),
    }
    log.info(
        "account %s run %s: file for %s published with %d conversions (%d newly delivered, %d already "
        "delivered by file), %d bytes",
        account.id,
        run_id,
        business_date.isoformat(),
        len(rows),
        newly,
        already,
        len(payload),
    )
    if changed:
        log.warning(
            "account %s: %d conversions changed while the file was published; left pending for the next publish",
            account.id,
            changed,
        )
    if redacted:
        log.warning(
            "account %s: %d conversions of %s have no phone number any more (retention) and were left out",
            account.id,
            redacted,
            business_date.isoformat(),
        )
    return counts
