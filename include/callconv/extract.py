"""Stage 1: find and read one day's CRM extracts.

Files land under ``{landing_uri}/{account_id}/{YYYY-MM-DD}/`` as ``*.csv`` or
``*.csv.gz``. Each is read as text only (no cell is ever evaluated), its CRM
column names mapped to ours, and identified by the SHA-256 of its bytes so a
file dropped again is recognised.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
from dataclasses import dataclass
from datetime import date
from decimal import Decimal

import pandas as pd
import sqlalchemy as sa

from callconv.config import CrmSource
from callconv.schema import crm_imports

log = logging.getLogger(__name__)

CRM_FILE_SUFFIXES = (".csv", ".csv.gz")
REQUIRED_COLUMNS = ("caller_phone", "conversion_time", "outcome")


class ExtractError(ValueError):
    """The extract cannot be read as configured; the message says what to fix."""


@dataclass(frozen=True)
class CrmExtract:
    source_uri: str
    checksum: str
    frame: pd.DataFrame  # our column names, text values, index = data row number (1-based)


def day_folder(landing_root, account_id: str, business_date: date):
    return landing_root / account_id / business_date.isoformat()


def landing_files(landing_root, account_id: str, business_date: date) -> list:
    """The day's extract files, sorted by name; other files are ignored."""
    folder = day_folder(landing_root, account_id, business_date)
    if not folder.exists():
        return []
    files = [p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(CRM_FILE_SUFFIXES)]
    for path in files:
        if "/" in path.name or "\\" in path.name or path.name.startswith(".."):
            raise ExtractError(f"refusing landing file name outside its folder: {path.name!r}")
    return sorted(files, key=lambda p: p.name)


def read_crm_file(path, source: CrmSource) -> CrmExtract:
    payload = path.read_bytes()
    checksum = hashlib.sha256(payload).hexdigest()
    if path.name.lower().endswith(".gz"):
        try:
            payload = gzip.decompress(payload)
        except (OSError, EOFError) as error:
            raise ExtractError(f"{path.name}: not a valid gzip file ({error})") from None
    frame = parse_crm_csv(payload, source, label=path.name)
    return CrmExtract(source_uri=str(path), checksum=checksum, frame=frame)


def parse_crm_csv(payload: bytes, source: CrmSource, label: str = "extract") -> pd.DataFrame:
    try:
        frame = pd.read_csv(
            io.BytesIO(payload),
            sep=source.delimiter,
            encoding=source.encoding,
            dtype=str,
            keep_default_na=False,
            na_values=[""],
            skipinitialspace=True,
        )
    except UnicodeDecodeError:
        raise ExtractError(f"{label}: not readable as {source.encoding}; set crm_source.encoding") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise ExtractError(f"{label}: not a readable CSV ({str(error).splitlines()[0]})") from None
    return map_columns(frame, source, label)


def map_columns(frame: pd.DataFrame, source: CrmSource, label: str) -> pd.DataFrame:
    """Rename the CRM's columns to ours; a missing required one is a clear error."""
    frame.columns = [str(name).strip() for name in frame.columns]
    mapping = {crm: ours for ours, crm in source.columns.model_dump().items() if crm}
    missing = [
        f"{crm!r} (for {ours})" for crm, ours in mapping.items() if ours in REQUIRED_COLUMNS and crm not in frame
    ]
    if missing:
        raise ExtractError(
            f"{label}: required column {', '.join(missing)} not found; the file has "
            f"{', '.join(repr(c) for c in frame.columns)}. Fix the export or crm_source.columns"
        )
    present = {crm: ours for crm, ours in mapping.items() if crm in frame}
    mapped = frame[list(present)].rename(columns=present)
    mapped.index = pd.RangeIndex(1, len(mapped) + 1)
    return mapped


def frame_from_query(rows: pd.DataFrame, source: CrmSource, label: str) -> CrmExtract:
    """A CRM query's result, as text like a file's, identified by the checksum of its content."""
    as_text = rows.astype(object).where(rows.notna(), None)
    for column in as_text.columns:
        as_text[column] = [_cell_text(value, source.decimal) for value in as_text[column]]
    canonical = as_text.to_csv(index=False).encode("utf-8")
    frame = map_columns(as_text.reset_index(drop=True), source, label)
    return CrmExtract(source_uri=label, checksum=hashlib.sha256(canonical).hexdigest(), frame=frame)


def _cell_text(value, decimal: str) -> str | None:
    if value is None:
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, float | Decimal) and not isinstance(value, bool):
        return format(value, "f").replace(".", decimal)
    return str(value)


def imported_checksums(connection, account_id: str, checksums: list[str]) -> set[str]:
    if not checksums:
        return set()
    rows = connection.execute(
        sa.select(crm_imports.c.checksum).where(
            crm_imports.c.account_id == account_id, crm_imports.c.checksum.in_(checksums)
        )
    )
    return set(rows.scalars())
