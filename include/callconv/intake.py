"""Stages 1 to 3 for one account-day: read, validate, normalise, store.

Each file is taken in one transaction: its sales, its quarantine rows and the
record of its checksum commit together or not at all, so a rerun, a backfill
or the same file dropped twice never doubles a sale.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime

import pandas as pd
import sqlalchemy as sa

from callconv import normalise
from callconv.config import Account, Settings
from callconv.extract import CrmExtract, frame_from_query, imported_checksums, landing_files, read_crm_file
from callconv.schema import crm_imports, crm_sales, quarantine
from callconv.validate import ExtractRejected, validate_extract

log = logging.getLogger(__name__)


@dataclass
class IntakeOutcome:
    files_seen: int = 0
    files_skipped: int = 0
    rows_read: int = 0
    sales: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    data_docs: list[str] = field(default_factory=list)

    def as_counts(self) -> dict:
        return {
            "files_seen": self.files_seen,
            "files_already_imported": self.files_skipped,
            "read": self.rows_read,
            "normalised": self.sales,
            "quarantined": dict(sorted(self.quarantined.items())),
            "warnings": self.warnings,
        }


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
) -> IntakeOutcome:
    """Take in the day's extracts: files from the landing area, or one CRM query's result.

    ``query_crm`` runs the configured query with the window as parameters; the
    DAG passes one built on the CRM's Airflow connection (common-sql).
    """
    business_date = business_date_of(account, window_start)
    outcome = IntakeOutcome()
    if settings.crm_source.kind == "sql":
        if query_crm is None:
            raise ValueError("crm_source.kind is 'sql' but no CRM query runner was given")
        parameters = {"window_start": window_start, "window_end": window_end, "account_id": account.id}
        label = f"sql:{settings.crm_source.conn_id}:{account.id}:{business_date}"
        extracts = [frame_from_query(query_crm(parameters), settings.crm_source, label)]
    else:
        files = landing_files(landing_root, account.id, business_date)
        extracts = (read_crm_file(path, settings.crm_source) for path in files)
    for extract in extracts:
        outcome.files_seen += 1
        with engine.connect() as connection:
            seen = imported_checksums(connection, account.id, [extract.checksum])
        if seen and not reimport:
            outcome.files_skipped += 1
            log.info("intake: extract %s already imported, skipped", extract.checksum[:12])
            continue
        _take_in_file(engine, settings, account, extract, business_date, window_end, run_id, data_docs_root, outcome)
    if not outcome.files_seen and settings.validation.expect_data:
        outcome.warnings.append(f"no CRM extract for {business_date} in the landing area")
    for warning in outcome.warnings:
        log.warning("intake: %s", warning)
    log.info(
        "intake: %d files (%d already imported), %d rows read, %d sales normalised, quarantined %s",
        outcome.files_seen,
        outcome.files_skipped,
        outcome.rows_read,
        outcome.sales,
        outcome.quarantined or "{}",
    )
    return outcome


def _take_in_file(
    engine, settings, account, extract: CrmExtract, business_date, window_end, run_id, docs_root, outcome
):
    frame = extract.frame
    rules = settings.validation
    docs_dir = docs_root / account.id / business_date.isoformat() if docs_root is not None else None
    report = validate_extract(
        frame,
        known_outcomes=set(account.conversion_actions),
        decimal=settings.crm_source.decimal,
        rules=rules,
        data_docs_dir=docs_dir,
        run_name=f"{extract.checksum[:12]}",
    )
    outcome.warnings.extend(report.warnings)
    if report.data_docs_path:
        outcome.data_docs.append(report.data_docs_path)
    reasons = {row: list(found) for row, found in report.row_reasons.items()}
    sales, normalise_reasons = normalise_sales(report.good_rows(frame), account, settings, window_end)
    for row, reason in normalise_reasons.items():
        reasons.setdefault(row, []).append(reason)

    bad_share = len(reasons) / len(frame) if len(frame) else 0.0
    if bad_share > rules.max_bad_row_share:
        counts = _count_first_reasons(reasons)
        raise ExtractRejected(
            f"{extract.checksum[:12]}: {bad_share:.1%} of {len(frame)} rows are bad, above the "
            f"{rules.max_bad_row_share:.1%} limit; reasons {counts}. Nothing from this file was imported"
        )

    sale_rows = _sale_records(sales, account, extract, business_date)
    quarantine_rows = _quarantine_records(frame, reasons, account, extract, business_date, run_id)
    with engine.begin() as connection:
        _upsert(connection, crm_sales, ("account_id", "sale_key"), sale_rows)
        _upsert(connection, quarantine, ("account_id", "import_checksum", "source_row"), quarantine_rows)
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
                row_count=len(frame),
                run_id=run_id,
                imported_at=window_end,
            )
        )
    outcome.rows_read += len(frame)
    outcome.sales += len(sale_rows)
    for reason, count in _count_first_reasons(reasons).items():
        outcome.quarantined[reason] = outcome.quarantined.get(reason, 0) + count


def normalise_sales(
    good: pd.DataFrame, account: Account, settings: Settings, window_end: datetime
) -> tuple[pd.DataFrame, dict[int, str]]:
    """Normalise the validated rows; return the clean sales and a reason per rejected row."""
    phones = normalise.normalise_phones(good["caller_phone"], account.default_region)
    times = normalise.parse_local_times(good["conversion_time"], account.tz)
    empty = pd.Series([None] * len(good), index=good.index, dtype=object)
    values = normalise.parse_values(good.get("value", empty), settings.crm_source.decimal)
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


def sale_key(account_id: str, crm_id: str | None, row: dict) -> str:
    """The CRM id when there is one; otherwise the sale's own content."""
    if crm_id:
        identity = f"{account_id}|crm|{crm_id.strip()}"
    else:
        identity = "|".join(
            str(part)
            for part in (
                account_id,
                row["caller_e164"],
                row["conversion_time"].isoformat(),
                row["outcome"],
                row["conversion_value"],
            )
        )
    return hashlib.sha256(identity.encode()).hexdigest()


def _sale_records(sales: pd.DataFrame, account: Account, extract: CrmExtract, business_date: date) -> list[dict]:
    records = []
    for source_row, sale in zip(sales.index, sales.to_dict("records"), strict=True):
        crm_id = sale["crm_id"] if isinstance(sale["crm_id"], str) and sale["crm_id"].strip() else None
        call_start = sale["crm_call_start"]
        records.append(
            {
                "account_id": account.id,
                "sale_key": sale_key(account.id, crm_id, sale),
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
    # The same sale twice in one extract: the later row wins, as a CRM export update would.
    return list({record["sale_key"]: record for record in records}.values())


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
                "crm_id": crm_id if isinstance(crm_id, str) else None,
                "raw_record": json.loads(raw.to_json()),
                "run_id": run_id,
            }
        )
    return records


def _count_first_reasons(reasons: dict[int, list[str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for found in reasons.values():
        counts[found[0]] = counts.get(found[0], 0) + 1
    return counts


def _upsert(connection, table: sa.Table, key: tuple[str, ...], rows: list[dict], chunk: int = 2000) -> None:
    """Delete-then-insert by primary key: portable, and a rerun leaves one row per key."""
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        keys = [tuple(row[name] for name in key) for row in part]
        connection.execute(table.delete().where(sa.tuple_(*(table.c[name] for name in key)).in_(keys)))
        connection.execute(table.insert(), part)
