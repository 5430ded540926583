"""Stages 1 to 3 for one account-day: read, validate, normalise, store.

Each file is taken in one transaction: its sales, its quarantine rows and the
record of its checksum commit together or not at all, so a rerun, a backfill
or the same file dropped twice never doubles a sale. A file is read, validated,
normalised and stored ``crm_source.chunk_rows`` rows at a time inside that
transaction, so memory does not grow with its size (see :mod:`callconv.intake.extract`).

After a landing file is taken in, or recognised by its checksum in
``crm_imports`` as imported before, a sealed copy is kept in the archive,
``{archive_uri}/{account}/{YYYY-MM-DD}/{name}.enc``, and the plaintext landing
file is removed. A file dropped again is still recognised by its checksum; a
reimport reads the day's archived copies. A file that fails (unreadable,
rejected) stays in the landing area, so it can be fixed and taken in again.

After the day's files, the day's quarantined rows (reason codes and the raw
record) are written as one sealed CSV for debugging,
``{quarantine_uri}/{account}/{YYYY-MM-DD}/quarantine_{account}_{day}.csv.enc``.

A row that repeats an earlier row of the same extract exactly (a CRM that
exported it twice) is dropped before validation and counted as
``identical_duplicates``: it is neither a sale nor a bad row, so it never counts
toward ``validation.max_bad_row_share``. The same CRM id with other content is
still quarantined as ``duplicate_crm_id``, and the first row keeps the id.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from dataclasses import replace as with_changes
from datetime import date, datetime
from decimal import Decimal
from functools import partial

import pandas as pd
import sqlalchemy as sa

from callconv.config import Account, Settings
from callconv.delivery.conversion_file import safe_text
from callconv.intake import normalise
from callconv.intake.extract import CrmFileReader, frame_from_query, imported_checksums, landing_files
from callconv.intake.validate import ExtractRejected, ExtractValidator
from callconv.intake.validate_prepare import CANONICAL_COLUMNS, CRM_ID_MAX_LENGTH, IdenticalRows
from callconv.matching.match import as_utc, conversion_sent
from callconv.protection.pseudonyms import PseudonymKey, PseudonymKeys, crm_text, require_current, sale_text
from callconv.protection.storage import (
    Area,
    Sealer,
    check_in_account,
    open_for_read,
    plain_name,
    remove,
    sealer_for,
    store_as,
    stored_name,
)
from callconv.schema import crm_imports, crm_sales, delivery_conflicts, quarantine

log = logging.getLogger(__name__)


@dataclass
class IntakeOutcome:
    files_seen: int = 0
    files_skipped: int = 0
    rows_read: int = 0  # every data row of the extracts taken in, identical copies included
    sales: int = 0
    identical_duplicates: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    data_docs: list[str] = field(default_factory=list)
    archived: int = 0
    quarantine_export_rows: int = 0
    conflicts: dict[str, int] = field(default_factory=dict)

    def as_counts(self) -> dict:
        return {
            "files_seen": self.files_seen,
            "files_already_imported": self.files_skipped,
            "read": self.rows_read,
            "identical_duplicates": self.identical_duplicates,
            "normalised": self.sales,
            "quarantined": dict(sorted(self.quarantined.items())),
            "archived": self.archived,
            "quarantine_exported": self.quarantine_export_rows,
            "conflicts": dict(sorted(self.conflicts.items())),
            "warnings": self.warnings,
        }


@dataclass(frozen=True)
class _Extract:
    """One extract to take in: its identity, its size and its rows, chunk by chunk."""

    source_uri: str
    checksum: str
    row_count: int
    columns: list[str]
    chunks: Callable[[], Iterable[pd.DataFrame]]


@dataclass(frozen=True)
class _Day:
    """What taking in one account-day needs, besides the extract."""

    engine: sa.Engine
    settings: Settings
    account: Account
    business_date: date
    window_end: datetime
    run_id: str
    docs_dir: object
    docs_area: Area | None
    sealer: Sealer | None
    keys: PseudonymKeys


def business_date_of(account: Account, window_start: datetime) -> date:
    """The account-local day an import window stands for."""
    return window_start.astimezone(account.tz).date()


def take_in_day(
    engine: sa.Engine,
    settings: Settings,
    account: Account,
    window_start: datetime,
    window_end: datetime,
    run_id: str,
    landing_root=None,
    data_docs_root=None,
    reimport: bool = False,
    query_crm: Callable[[dict], pd.DataFrame] | None = None,
    *,
    archive_root=None,
    quarantine_root=None,
    keyset=None,
    keys: PseudonymKeys,
) -> IntakeOutcome:
    """Take in the day's extracts: files from the landing area, or one CRM query's result.

    ``query_crm`` runs the configured query with the window as parameters; the
    DAG passes one built on the CRM's Airflow connection (common-sql). Every file
    stored (archive copies, the quarantine export, Data Docs) is sealed with the Tink
    ``keyset``, bound to the account, its class and path, with its generation kept in the
    warehouse (:mod:`callconv.protection.sealed`); without one (allowed only by
    ``encryption.required: false``) in plaintext. Without ``archive_root`` landing files stay where they are. A sale
    without CRM id is keyed by an HMAC of its content under ``keys.primary``.
    """
    business_date = business_date_of(account, window_start)
    # Before anything is read: the day's folders the intake writes lie in the account's own.
    for root, what in (
        (archive_root, "archive folder"),
        (quarantine_root, "quarantine folder"),
        (data_docs_root, "Data Docs folder"),
    ):
        if root is not None:
            check_in_account(root / account.id / business_date.isoformat(), root, account.id, what)
    outcome = IntakeOutcome()
    docs_dir = data_docs_root / account.id / business_date.isoformat() if data_docs_root is not None else None
    docs_area = Area(data_docs_root, account.id, "docs") if data_docs_root is not None else None
    sealer = sealer_for(keyset, engine)
    day = _Day(engine, settings, account, business_date, window_end, run_id, docs_dir, docs_area, sealer, keys)
    crm_source = settings.crm_source_for(account)
    if crm_source.kind == "sql":
        if query_crm is None:
            raise ValueError("crm_source.kind is 'sql' but no CRM query runner was given")
        parameters = {"window_start": window_start, "window_end": window_end, "account_id": account.id}
        label = f"sql:{crm_source.conn_id}:{account.id}:{business_date}"
        queried = frame_from_query(query_crm(parameters), crm_source, label)
        extract = _Extract(
            queried.source_uri,
            queried.checksum,
            len(queried.frame),
            list(queried.frame.columns),
            lambda: [queried.frame],
        )
        outcome.files_seen += 1
        if _already_imported(engine, account, extract.checksum) and not reimport:
            outcome.files_skipped += 1
            log.info("intake: extract %s already imported, skipped", extract.checksum[:12])
        else:
            _take_in_first_copies(day, extract, outcome)
    else:
        for path, in_landing in _day_files(landing_root, archive_root, account.id, business_date):
            outcome.files_seen += 1
            if not in_landing and not reimport:
                outcome.files_skipped += 1  # archived only once taken in
                continue
            area = (
                Area(landing_root, account.id, "landing") if in_landing else Area(archive_root, account.id, "archive")
            )
            reader = CrmFileReader(path, crm_source, sealer, area)
            scan = reader.scan(settings.validation.max_rows)
            seen = _already_imported(engine, account, scan.checksum)
            if seen and not reimport:
                outcome.files_skipped += 1
                log.info("intake: extract %s already imported, skipped", scan.checksum[:12])
            else:
                chunks = partial(reader.chunks, scan.checksum)
                extract = _Extract(str(path), scan.checksum, scan.rows, scan.columns, chunks)
                _take_in_first_copies(day, extract, outcome)
            if in_landing and archive_root is not None:
                _archive(
                    path, scan.checksum, landing_root, archive_root, account, business_date, sealer, replace=not seen
                )
                outcome.archived += 1
    if quarantine_root is not None:
        outcome.quarantine_export_rows = export_quarantine(engine, account, business_date, quarantine_root, sealer)
    if not outcome.files_seen and settings.validation.expect_data:
        outcome.warnings.append(f"no CRM extract for {business_date} in the landing area")
    for warning in outcome.warnings:
        log.warning("intake: %s", warning)
    log.info(
        "intake: %d files (%d already imported), %d rows read, %d identical copies dropped, "
        "%d sales normalised, quarantined %s",
        outcome.files_seen,
        outcome.files_skipped,
        outcome.rows_read,
        outcome.identical_duplicates,
        outcome.sales,
        outcome.quarantined or "{}",
    )
    return outcome


def _take_in_first_copies(day: _Day, extract: _Extract, outcome: IntakeOutcome) -> None:
    """:func:`_take_in` of the extract without the rows that repeat an earlier row exactly.

    The copies are counted once the extract is taken in; they are rows read, and neither
    sales nor bad rows. The first copy of a row is the one taken in.
    """
    identical = IdenticalRows()

    def first_copies() -> Iterator[pd.DataFrame]:
        for chunk in extract.chunks():
            kept = identical.first_copies(chunk)
            if len(kept) or not len(chunk):  # a chunk of copies only is skipped; an empty file still passes
                yield kept

    _take_in(day, with_changes(extract, chunks=first_copies), outcome)
    if identical.dropped:
        outcome.rows_read += identical.dropped
        outcome.identical_duplicates += identical.dropped
        log.info("intake: extract %s: %d identical copies of rows dropped", extract.checksum[:12], identical.dropped)


def _already_imported(engine: sa.Engine, account: Account, checksum: str) -> bool:
    with engine.connect() as connection:
        return bool(imported_checksums(connection, account.id, [checksum]))


def _day_files(landing_root, archive_root, account_id: str, business_date: date) -> list[tuple]:
    """(path, in the landing area) for the day's files, by name: the landing files, and the
    archived copies of files no longer in the landing area.

    An archived copy stands for a file taken in before; it is read again only on a reimport.
    """
    landing = landing_files(landing_root, account_id, business_date) if landing_root is not None else []
    names = {plain_name(path.name) for path in landing}
    archived = []
    if archive_root is not None:
        archived = [
            path
            for path in landing_files(archive_root, account_id, business_date)
            if plain_name(path.name) not in names
        ]
    return sorted(
        [(path, True) for path in landing] + [(path, False) for path in archived],
        key=lambda item: plain_name(item[0].name),
    )


def _take_in(day: _Day, extract: _Extract, outcome: IntakeOutcome) -> None:
    """Validate, normalise and store one extract chunk by chunk, in one transaction."""
    settings, account, business_date = day.settings, day.account, day.business_date
    rules = settings.validation
    crm_source = settings.crm_source_for(account)
    several_chunks = extract.row_count > crm_source.chunk_rows
    bad_rows = 0
    first_reasons: dict[str, int] = {}
    with ExtractValidator(
        known_outcomes=set(account.conversion_actions),
        decimal=crm_source.decimal,
        rules=rules,
        data_docs_dir=day.docs_dir,
        run_name=extract.checksum[:12],
        sealer=day.sealer,
        docs_area=day.docs_area,
    ) as validator:
        validator.check_table(extract.columns, extract.row_count)
        rows_read = 0
        with day.engine.begin() as connection:
            validator.seal_within(connection)
            require_current(connection, account.id, day.keys)
            for chunk in extract.chunks():
                part = f"rows_{chunk.index[0]}-{chunk.index[-1]}" if several_chunks and len(chunk) else None
                reasons = validator.check_rows(chunk, part=part)
                good = chunk.loc[~chunk.index.isin(list(reasons))]
                sales, normalise_reasons = normalise_sales(good, account, settings, day.window_end)
                for row, reason in normalise_reasons.items():
                    reasons.setdefault(row, []).append(reason)
                rows_read += len(chunk)
                bad_rows += len(reasons)
                for reason, count in _count_first_reasons(reasons).items():
                    first_reasons[reason] = first_reasons.get(reason, 0) + count
                sale_rows = _sale_records(sales, account, extract, business_date, day.keys.primary)
                changed = _store_sales(connection, account.id, sale_rows, day.run_id)
                if changed:
                    outcome.conflicts[CHANGED_AFTER_SEND] = outcome.conflicts.get(CHANGED_AFTER_SEND, 0) + changed
                quarantine_rows = _quarantine_records(chunk, reasons, account, extract, business_date, day.run_id)
                _upsert(connection, quarantine, ("account_id", "import_checksum", "source_row"), quarantine_rows)
            report = validator.finish()
            outcome.warnings.extend(report.warnings)
            if report.data_docs_path:
                outcome.data_docs.append(report.data_docs_path)
            bad_share = bad_rows / rows_read if rows_read else 0.0
            if bad_share > rules.max_bad_row_share:
                raise ExtractRejected(
                    f"{extract.checksum[:12]}: {bad_share:.1%} of {rows_read} rows are bad, above the "
                    f"{rules.max_bad_row_share:.1%} limit; reasons {dict(sorted(first_reasons.items()))}. "
                    "Nothing from this file was imported",
                    kind="too_many_bad_rows",
                    data_docs_path=report.data_docs_path,
                )
            connection.execute(
                crm_imports.delete().where(
                    crm_imports.c.account_id == account.id, crm_imports.c.checksum == extract.checksum
                )
            )
            connection.execute(
                crm_imports.insert().values(
                    account_id=account.id,
                    checksum=extract.checksum,
                    source_uri=extract.source_uri,
                    business_date=business_date,
                    row_count=rows_read,
                    run_id=day.run_id,
                    imported_at=day.window_end,
                )
            )
            sales_stored = connection.scalar(
                sa.select(sa.func.count())
                .select_from(crm_sales)
                .where(crm_sales.c.account_id == account.id, crm_sales.c.import_checksum == extract.checksum)
            )
    outcome.rows_read += rows_read
    outcome.sales += sales_stored
    for reason, count in first_reasons.items():
        outcome.quarantined[reason] = outcome.quarantined.get(reason, 0) + count


def _archive(
    path, checksum: str, landing_root, archive_root, account: Account, business_date: date, sealer, *, replace: bool
):
    """Keep the landing file's (sealed) copy in the archive, then remove the landing file.

    The copy is checked against the checksum the file was taken in with. A file that was
    imported before (``replace=False``) does not replace an archived copy of the same name.
    Both places are checked again to lie in the account's own folders, right before use.
    """
    folder = archive_root / account.id / business_date.isoformat()
    check_in_account(folder, archive_root, account.id, "archive folder")
    check_in_account(path, landing_root, account.id, "landing file")
    target = folder / stored_name(plain_name(path.name), sealer)
    if replace or not target.exists():
        with open_for_read(path, Area(landing_root, account.id, "landing"), sealer) as plaintext:
            checked = io.BufferedReader(_Checked(plaintext, checksum, path.name), buffer_size=1024 * 1024)
            archive = Area(archive_root, account.id, "archive")
            store_as(archive, business_date.isoformat(), plain_name(path.name), checked, sealer)
    remove(path)
    log.info("intake: %s archived as %s and removed from the landing area", path.name, target.name)


class _Checked(io.RawIOBase):
    """Passes a stream through and fails at its end unless its SHA-256 is ``checksum``."""

    def __init__(self, source, checksum: str, label: str):
        super().__init__()
        self._source, self._checksum, self._label = source, checksum, label
        self._hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._source.read(len(buffer))
        if not data:
            if self._hash.hexdigest() != self._checksum:
                raise RuntimeError(f"{self._label} changed after it was taken in; it was left in the landing area")
            return 0
        self._hash.update(data)
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)


QUARANTINE_EXPORT_HEADER = ("import_checksum", "source_row", "reason", "all_reasons", *CANONICAL_COLUMNS)


def quarantine_export_name(account_id: str, business_date: date) -> str:
    return f"quarantine_{account_id}_{business_date.isoformat()}.csv"


def export_quarantine(engine: sa.Engine, account: Account, business_date: date, quarantine_root, sealer) -> int:
    """Write the day's quarantined rows as one CSV (sealed with ``sealer``); the number of rows.

    Columns: the file's checksum, its data row, the first reason, all reasons, and the raw
    record's cells. Cells a spreadsheet would run as a formula get a leading apostrophe.
    Rows are streamed from the warehouse; a day without quarantined rows writes nothing.
    """
    day = sa.and_(quarantine.c.account_id == account.id, quarantine.c.business_date == business_date)
    with engine.connect() as connection:
        count = connection.scalar(sa.select(sa.func.count()).select_from(quarantine).where(day))
    if not count:
        return 0
    folder = quarantine_root / account.id / business_date.isoformat()
    check_in_account(folder, quarantine_root, account.id, "quarantine folder")
    area = Area(quarantine_root, account.id, "quarantine")
    name = quarantine_export_name(account.id, business_date)
    target = store_as(area, business_date.isoformat(), name, _quarantine_csv(engine, day), sealer)
    log.info("intake: %d quarantined rows of the day exported to %s", count, target.name)
    return count


def _quarantine_csv(engine: sa.Engine, day) -> Iterator[bytes]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")

    def flush() -> bytes:
        text = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return text.encode("utf-8")

    writer.writerow(QUARANTINE_EXPORT_HEADER)
    query = (
        sa.select(quarantine.c.import_checksum, quarantine.c.source_row, quarantine.c.reason, quarantine.c.detail)
        .add_columns(quarantine.c.raw_record)
        .where(day)
        .order_by(quarantine.c.import_checksum, quarantine.c.source_row)
    )
    with engine.connect() as connection:
        for row in connection.execution_options(yield_per=2000).execute(query):
            raw = row.raw_record or {}
            cells = [raw.get(column) for column in CANONICAL_COLUMNS]
            writer.writerow(
                [
                    row.import_checksum,
                    row.source_row,
                    row.reason,
                    row.detail or row.reason,
                    *(safe_text(str(cell)) if cell is not None else "" for cell in cells),
                ]
            )
            if buffer.tell() > 1024 * 1024:
                yield flush()
    yield flush()


def normalise_sales(
    good: pd.DataFrame, account: Account, settings: Settings, window_end: datetime
) -> tuple[pd.DataFrame, dict[int, str]]:
    """Normalise the validated rows; return the clean sales and a reason per rejected row."""
    phones = normalise.normalise_phones(good["caller_phone"], account.default_region)
    times = normalise.parse_local_times(good["conversion_time"], account.tz)
    empty = pd.Series([None] * len(good), index=good.index, dtype=object)
    values = normalise.parse_values(good.get("value", empty), settings.crm_source_for(account).decimal)
    currencies = normalise.normalise_currencies(good.get("currency", empty), account.default_currency)
    call_starts = normalise.parse_local_times(good.get("call_start", empty), account.tz)

    reason = phones["reason"].copy()
    for extra in (times["reason"], values["reason"], currencies["reason"]):
        reason = reason.where(reason.notna(), extra)
    future = normalise.future_times(times["utc"], window_end)
    reason = reason.where(reason.notna() | ~future, "time_in_future")
    # A CRM call start is a hint only; an unreadable one is dropped, not a reason to reject.
    clean = pd.DataFrame(
        {
            "crm_id": good.get("crm_id", empty),
            "caller_e164": phones["e164"],
            "conversion_time": times["utc"],
            "crm_call_start": call_starts["utc"],
            "outcome": good["outcome"].str.strip(),
            "conversion_value": values["value"],
            "currency_code": currencies["currency"],
        },
        index=good.index,
    )
    rejected = reason[reason.notna()]
    return clean[reason.isna()], rejected.to_dict()


def sale_key(account_id: str, crm_id: str | None, row: dict, key: PseudonymKey) -> str:
    """An HMAC of the CRM id when there is one; otherwise of the sale's own content, which
    holds the caller's number (:mod:`callconv.protection.pseudonyms`)."""
    if crm_id:
        return key.hexdigest(crm_text(account_id, crm_id))
    text = sale_text(account_id, row["caller_e164"], row["conversion_time"], row["outcome"], row["conversion_value"])
    return key.hexdigest(text)


def _sale_records(
    sales: pd.DataFrame, account: Account, extract: _Extract, business_date: date, key: PseudonymKey
) -> list[dict]:
    records = []
    for source_row, sale in zip(sales.index, sales.to_dict("records"), strict=True):
        crm_id = sale["crm_id"] if isinstance(sale["crm_id"], str) and sale["crm_id"].strip() else None
        call_start = sale["crm_call_start"]
        records.append(
            {
                "account_id": account.id,
                "sale_key": sale_key(account.id, crm_id, sale, key),
                "sale_key_id": key.key_id,
                "crm_id": crm_id,
                "import_checksum": extract.checksum,
                "source_row": int(source_row),
                "business_date": business_date,
                "caller_e164": sale["caller_e164"],
                "conversion_time": sale["conversion_time"].to_pydatetime(),
                "crm_call_start": None if pd.isna(call_start) else call_start.to_pydatetime(),
                "outcome": sale["outcome"],
                "conversion_action_id": account.conversion_actions[sale["outcome"]].id,
                "conversion_value": sale["conversion_value"],
                "currency_code": sale["currency_code"],
            }
        )
    # The same sale twice in one chunk (no CRM id, the same content once normalised): the first
    # row keeps it, as the validator keeps the first row of a repeated CRM id.
    first: dict[str, dict] = {}
    for record in records:
        first.setdefault(record["sale_key"], record)
    return list(first.values())


def _quarantine_records(frame, reasons, account, extract, business_date, run_id) -> list[dict]:
    records = []
    for source_row, found in sorted(reasons.items()):
        raw = frame.loc[source_row]
        crm_id = raw.get("crm_id") if "crm_id" in frame else None
        records.append(
            {
                "account_id": account.id,
                "import_checksum": extract.checksum,
                "source_row": int(source_row),
                "business_date": business_date,
                "reason": found[0],
                "detail": ",".join(found)[:256],
                # the raw record keeps a CRM id the column cannot (too long, a NUL)
                "crm_id": crm_id if isinstance(crm_id, str) and _fits_crm_id(crm_id) else None,
                "raw_record": json.loads(raw.to_json()),
                "run_id": run_id,
            }
        )
    return records


def _fits_crm_id(crm_id: str) -> bool:
    return len(crm_id) <= CRM_ID_MAX_LENGTH and "\x00" not in crm_id


def _count_first_reasons(reasons: dict[int, list[str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for found in reasons.values():
        counts[found[0]] = counts.get(found[0], 0) + 1
    return counts


CHANGED_AFTER_SEND = "changed_after_send"
# What matching wrote on a sale: it belongs to the sale's key, not to the row an extract brought.
MATCH_STATE = ("matched_call_id", "matched_call_start", "conversion_key", "conversion_key_id", "unmatched_reason")
# What a sale contributes to the conversion sent to Google.
SALE_PAYLOAD = (
    "caller_e164",
    "conversion_time",
    "crm_call_start",
    "outcome",
    "conversion_action_id",
    "conversion_value",
    "currency_code",
)


def _comparable(name: str, value):
    if value is None:
        return None
    if name in ("conversion_time", "crm_call_start"):
        return as_utc(value)
    if name == "conversion_value":
        return Decimal(str(value)).quantize(Decimal("0.0001"))
    return value


def _changed_fields(stored, record: dict) -> list[str]:
    """The payload fields in which a re-exported sale differs from the stored one.

    A caller redacted by retention is unknown, not different.
    """
    names = [name for name in SALE_PAYLOAD if not (name == "caller_e164" and stored.caller_e164 is None)]
    return [name for name in names if _comparable(name, getattr(stored, name)) != _comparable(name, record[name])]


def _store_sales(connection, account_id: str, records: list[dict], run_id: str, chunk: int = 2000) -> int:
    """Upsert the sales by key; a re-export never loses what matching and delivery know of them.

    * A sale not seen before is inserted.
    * A sale seen before, whose conversion was never sent, takes the new content and keeps
      its match state, so the next match sees the group it was in and rebuilds it.
    * A sale whose conversion may have reached Google is frozen: its stored content stays
      (it is what was sent); it is only re-pointed at this import. If the export changed
      its payload, a ``changed_after_send`` conflict names the fields.

    Returns how many frozen sales came back changed.
    """
    sale = crm_sales
    changed_after_send = 0
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        keys = [record["sale_key"] for record in part]
        sent = sa.and_(sale.c.conversion_key.is_not(None), conversion_sent(sale.c.conversion_key))
        stored = {
            row.sale_key: row
            for row in connection.execute(
                sa.select(
                    sale.c.sale_key,
                    sale.c.business_date,
                    *(sale.c[name] for name in SALE_PAYLOAD),
                    *(sale.c[name] for name in MATCH_STATE),
                    sa.case((sent, True), else_=False).label("sent"),
                ).where(sale.c.account_id == account_id, sale.c.sale_key.in_(keys))
            )
        }
        replace, frozen, conflicts = [], [], []
        for record in part:
            old = stored.get(record["sale_key"])
            if old is None:
                # Every row of one executemany needs the same keys: a new sale's match state is empty.
                replace.append({**dict.fromkeys(MATCH_STATE), **record})
            elif old.sent:
                frozen.append(
                    {
                        "b_key": record["sale_key"],
                        "b_checksum": record["import_checksum"],
                        "b_row": record["source_row"],
                    }
                )
                fields = _changed_fields(old, record)
                if fields:
                    conflicts.append(
                        {
                            "account_id": account_id,
                            "sale_key": record["sale_key"],
                            "reason": CHANGED_AFTER_SEND,
                            "business_date": old.business_date,
                            "conversion_key": old.conversion_key,
                            "detail": ("changed after its conversion was sent: " + ", ".join(fields))[:256],
                            "run_id": run_id,
                        }
                    )
            else:
                replace.append({**record, **{name: getattr(old, name) for name in MATCH_STATE}})
        if replace:
            connection.execute(
                sale.delete().where(
                    sale.c.account_id == account_id, sale.c.sale_key.in_([r["sale_key"] for r in replace])
                )
            )
            connection.execute(sale.insert(), replace)
        if frozen:
            connection.execute(
                sale.update()
                .where(sale.c.account_id == account_id, sale.c.sale_key == sa.bindparam("b_key"))
                .values(import_checksum=sa.bindparam("b_checksum"), source_row=sa.bindparam("b_row")),
                frozen,
            )
        if conflicts:
            connection.execute(
                delivery_conflicts.delete().where(
                    delivery_conflicts.c.account_id == account_id,
                    delivery_conflicts.c.reason == CHANGED_AFTER_SEND,
                    delivery_conflicts.c.sale_key.in_([c["sale_key"] for c in conflicts]),
                )
            )
            connection.execute(delivery_conflicts.insert(), conflicts)
            changed_after_send += len(conflicts)
    if changed_after_send:
        log.warning(
            "intake: %d sales of account %s changed after their conversion was sent; kept as sent (%s)",
            changed_after_send,
            account_id,
            CHANGED_AFTER_SEND,
        )
    return changed_after_send


def _upsert(connection, table: sa.Table, key: tuple[str, ...], rows: list[dict], chunk: int = 2000) -> None:
    """Delete-then-insert by primary key: portable, and a rerun leaves one row per key.

    The delete names the leading key columns by value and the last one by list.
    PostgreSQL probes the primary key with that (``= ANY``); a list of row tuples
    became an OR tested against every row of the account, so a day of 10^5 sales
    spent minutes here, growing with the square of its size.
    """
    *leading, last = key
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        by_leading: dict[tuple, list] = {}
        for row in part:
            by_leading.setdefault(tuple(row[name] for name in leading), []).append(row[last])
        for values, lasts in by_leading.items():
            same_leading = [table.c[name] == value for name, value in zip(leading, values, strict=True)]
            connection.execute(table.delete().where(*same_leading, table.c[last].in_(lasts)))
        connection.execute(table.insert(), part)
