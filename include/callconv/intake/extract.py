"""Stage 1: find and read one day's CRM extracts, as a stream.

Files land under ``{landing_uri}/{account_id}/{YYYY-MM-DD}/`` as ``*.csv`` or
``*.csv.gz``, in plaintext, or sealed by the exporter (``python -m callconv.protection.sealed seal``,
class ``landing``, generation 0) and then named ``*.enc``: the name decides, and a ``.enc``
file that does not decrypt is refused, never read as plaintext. Each
is read as text only (no cell is ever evaluated), its CRM column names mapped to
ours, and identified by the SHA-256 of its plaintext bytes (decrypted, still
gzipped), so a file dropped again is recognised, sealed or not.

Hostile input: a file name, or a symlink, that leads out of its day folder, or out of
its account's folder, is refused. A file is never held whole in memory: :class:`CrmFileReader` first scans
it (checksum, row count, header, and guards against lines or fields that run on
for megabytes, such as an unterminated quote) and then hands it on in chunks of
``crm_source.chunk_rows`` rows. A file larger than ``crm_source.max_file_mb`` once
decrypted and unzipped, or with more than ``validation.max_rows`` rows, is refused
with a clear :class:`ExtractError`, as is one that is not a readable CSV.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import logging
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

from callconv.config import CrmSource
from callconv.protection.sealed import SealError
from callconv.protection.storage import (
    Area,
    OutsideAccountFolder,
    Sealer,
    StorageError,
    check_in_account,
    open_for_read,
    plain_name,
)
from callconv.schema import crm_imports

log = logging.getLogger(__name__)

CRM_FILE_SUFFIXES = (".csv", ".csv.gz")
REQUIRED_COLUMNS = ("caller_phone", "conversion_time", "outcome")
MIB = 1024 * 1024
# No CRM row comes near this; a longer line means a file that is not a CRM export.
MAX_LINE_BYTES = MIB
_READ_BLOCK = MIB


class ExtractError(ValueError):
    """The extract cannot be read as configured; the message says what to fix."""


@dataclass(frozen=True)
class CrmExtract:
    source_uri: str
    checksum: str
    frame: pd.DataFrame  # our column names, text values, index = data row number (1-based)


@dataclass(frozen=True)
class ExtractScan:
    """What a first streaming pass over a file found, before any row is used."""

    checksum: str  # SHA-256 of the plaintext bytes (decrypted, still gzipped)
    rows: int  # data rows
    columns: list[str]  # our names of the mapped columns present


def day_folder(landing_root, account_id: str, business_date: date):
    return landing_root / account_id / business_date.isoformat()


def is_crm_file_name(name: str) -> bool:
    return plain_name(name).lower().endswith(CRM_FILE_SUFFIXES)


def landing_files(landing_root, account_id: str, business_date: date) -> list:
    """The day's extract files, sorted by name; other files are ignored.

    A name that could lead elsewhere, a local symlink (the account folder, the day folder)
    that resolves outside the account's own folder, or a file that resolves outside its day
    folder, is refused with a one-line :class:`ExtractError` before any file is read: the
    day folder ``landing/other/D -> ../acme/D`` never hands account "other" acme's files.
    """
    folder = day_folder(landing_root, account_id, business_date)
    _check_in_account(folder, landing_root, account_id, "day folder")
    if not folder.exists():
        return []
    files = []
    for path in folder.iterdir():
        if not is_crm_file_name(path.name):
            continue
        if "/" in path.name or "\\" in path.name or path.name.startswith(".."):
            raise ExtractError(f"refusing landing file name outside its folder: {path.name!r}")
        _check_in_account(path, landing_root, account_id, "landing file")
        _check_inside(path, folder, "landing file")
        if path.is_file():
            files.append(path)
    return sorted(files, key=lambda p: p.name)


def _check_in_account(path, landing_root, account_id: str, what: str) -> None:
    try:
        check_in_account(path, landing_root, account_id, what)
    except OutsideAccountFolder as error:
        raise ExtractError(str(error)) from None


def _check_inside(path, folder, what: str) -> None:
    """Refuse a local path that resolves (through symlinks) outside ``folder``."""
    if not isinstance(path, Path):  # object storage: no symlinks, and names were checked
        return
    real_folder = folder.resolve()
    if not path.resolve().is_relative_to(real_folder):
        raise ExtractError(
            f"refusing {what} {path.name!r}: it resolves to a place outside {folder} (a symlink?); "
            "only files inside the landing area are read"
        )


class CrmFileReader:
    """Reads one stored CRM file as a stream: decrypt, checksum, gunzip, parse.

    :meth:`scan` reads it once to check it and count its rows; :meth:`chunks` reads it again,
    ``crm_source.chunk_rows`` rows at a time, and checks it is still the file scanned.
    """

    def __init__(self, path, source: CrmSource, sealer: Sealer | None = None, area: Area | None = None):
        self.path = Path(path) if isinstance(path, str) else path
        self.source = source
        self.sealer, self.area = sealer, area
        self.label = self.path.name
        self._gzipped = plain_name(self.path.name).lower().endswith(".gz")

    def scan(self, max_rows: int) -> ExtractScan:
        """Checksum, header and row count in one pass with the csv module, in constant memory.

        Its field size limit stops a quoted field that runs on (an unterminated quote) long
        before it fills memory; rows with more fields than the header are refused.
        """
        with self._read_errors(), self._opened() as (stored, feed):
            text = io.TextIOWrapper(feed, encoding=self.source.encoding, newline="")
            records = csv.reader(text, delimiter=self.source.delimiter, skipinitialspace=True)
            header = next((row for row in records if not _blank(row)), None)
            if header is None:
                raise ExtractError(f"{self.label}: not a readable CSV (No columns to parse from file)")
            header[0] = header[0].removeprefix("\ufeff")  # a BOM read as utf-8
            columns = list(map_columns(pd.DataFrame(columns=_unique(header)), self.source, self.label).columns)
            rows = 0
            for row in records:
                if _blank(row):
                    continue
                rows += 1
                if rows > max_rows:
                    raise ExtractError(
                        f"{self.label}: more than {max_rows} rows, the limit set by validation.max_rows; "
                        "nothing was imported"
                    )
                if len(row) > len(header) and any(cell.strip() for cell in row[len(header) :]):
                    raise ExtractError(
                        f"{self.label}: not a readable CSV (Expected {len(header)} fields in line "
                        f"{records.line_num}, saw {len(row)})"
                    )
            _drain(stored)
        return ExtractScan(checksum=stored.hexdigest(), rows=rows, columns=columns)

    def chunks(self, checksum: str | None = None) -> Iterator[pd.DataFrame]:
        """The file's rows in chunks, mapped to our columns, indexed by 1-based data row number.

        With ``checksum`` (from :meth:`scan`), a file that changed in between is an error at the end.
        A header-only file gives one empty chunk.
        """
        with self._read_errors(), self._opened() as (stored, feed):
            with warnings.catch_warnings():
                # index_col=False: trailing delimiters never shift the columns
                warnings.simplefilter("ignore", pd.errors.ParserWarning)
                reader = pd.read_csv(
                    feed,
                    sep=self.source.delimiter,
                    encoding=self.source.encoding,
                    dtype=str,
                    keep_default_na=False,
                    na_values=[""],
                    skipinitialspace=True,
                    index_col=False,
                    chunksize=self.source.chunk_rows,
                )
            first_row = 1
            with reader:
                while True:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", pd.errors.ParserWarning)
                        chunk = next(reader, None)
                    if chunk is None:
                        break
                    frame = map_columns(chunk, self.source, self.label, first_row=first_row)
                    first_row += len(frame)
                    yield frame
            _drain(stored)
            if checksum is not None and stored.hexdigest() != checksum:
                raise ExtractError(f"{self.label}: the file changed while it was being read; nothing was imported")

    def read(self, max_rows: int = 5_000_000) -> CrmExtract:
        """The whole file as one frame: for small files and tests. The intake streams instead."""
        scan = self.scan(max_rows)
        frame = pd.concat(list(self.chunks(scan.checksum)))
        return CrmExtract(source_uri=str(self.path), checksum=scan.checksum, frame=frame)

    @contextmanager
    def _opened(self):
        """(hashing stream of the stored plaintext, metered and guarded stream the parser reads)."""
        limit = self.source.max_file_mb * MIB
        with open_for_read(self.path, self.area, self.sealer) as raw:
            if self._gzipped:
                stored = _Meter(raw, self.label, digest=True)
                feed = _Meter(gzip.GzipFile(fileobj=stored, mode="rb"), self.label, limit=limit, line_guard=True)
            else:
                stored = feed = _Meter(raw, self.label, digest=True, limit=limit, line_guard=True)
            yield stored, io.BufferedReader(feed, buffer_size=_READ_BLOCK)

    @contextmanager
    def _read_errors(self):
        label = self.label
        try:
            yield
        except ExtractError:
            raise
        except UnicodeDecodeError:
            raise ExtractError(f"{label}: not readable as {self.source.encoding}; set crm_source.encoding") from None
        except (gzip.BadGzipFile, EOFError, zlib.error) as error:
            raise ExtractError(f"{label}: not a valid gzip file ({error})") from None
        except (csv.Error, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
            reason = str(error).strip().splitlines()[0].removeprefix("Error tokenizing data. C error: ")
            if "field larger than field limit" in reason:
                reason = f"a field longer than {csv.field_size_limit()} characters: an unterminated quote?"
            raise ExtractError(f"{label}: not a readable CSV ({reason})") from None
        except (SealError, StorageError) as error:
            raise ExtractError(f"{label}: {error}") from None


def read_crm_file(path, source: CrmSource, sealer: Sealer | None = None, area: Area | None = None) -> CrmExtract:
    """One file, whole: see :meth:`CrmFileReader.read`."""
    return CrmFileReader(path, source, sealer, area).read()


class _Meter(io.RawIOBase):
    """Passes a binary stream through, hashing it, counting it against a limit, guarding its lines."""

    def __init__(self, source, label: str, *, digest=False, limit: int | None = None, line_guard=False):
        super().__init__()
        self._source = source
        self._label = label
        self._hash = hashlib.sha256() if digest else None
        self._limit = limit
        self._line_guard = line_guard
        self.count = 0
        self._line_start = 0  # offset where the current line began

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        target = memoryview(buffer).cast("B")
        data = self._source.read(len(target))
        if not data:
            return 0
        size = len(data)
        target[:size] = data
        start = self.count
        self.count += size
        if self._hash is not None:
            self._hash.update(data)
        if self._limit is not None and self.count > self._limit:
            raise ExtractError(
                f"{self._label}: larger than {self._limit // MIB} MiB once decrypted and unzipped, the limit set "
                "by crm_source.max_file_mb; nothing was imported"
            )
        if self._line_guard:
            self._check_lines(data, start)
        return size

    def _check_lines(self, data: bytes, start: int) -> None:
        block = np.frombuffer(data, dtype=np.uint8)
        breaks = np.flatnonzero((block == 10) | (block == 13))
        longest = 0
        if breaks.size:
            longest = start + int(breaks[0]) - self._line_start
            if breaks.size > 1:
                longest = max(longest, int(np.diff(breaks).max()))
            self._line_start = start + int(breaks[-1]) + 1
        if max(longest, self.count - self._line_start) > MAX_LINE_BYTES:
            raise ExtractError(
                f"{self._label}: not a readable CSV (a line runs on for more than {MAX_LINE_BYTES // MIB} MiB "
                "without a line break); nothing was imported"
            )

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _drain(stream) -> None:
    """Read to the end, so the checksum covers every byte."""
    while stream.read(_READ_BLOCK):
        pass


def _blank(row: list[str]) -> bool:
    return not row or (len(row) == 1 and not row[0].strip())


def _unique(names: list[str]) -> list[str]:
    """Repeated header names made unique the way pandas does it (``a``, ``a.1``)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        out.append(f"{name}.{count}" if count else name)
    return out


def map_columns(frame: pd.DataFrame, source: CrmSource, label: str, first_row: int = 1) -> pd.DataFrame:
    """Rename the CRM's columns to ours; a missing required one is a clear error."""
    frame.columns = [str(name).strip() for name in frame.columns]
    mapping = {crm: ours for ours, crm in source.columns.model_dump().items() if crm}
    missing = [
        f"{crm!r} (for {ours})" for crm, ours in mapping.items() if ours in REQUIRED_COLUMNS and crm not in frame
    ]
    if missing:
        raise ExtractError(
            f"{label}: required column {', '.join(missing)} not found; the file has "
            f"{_shown_columns(list(frame.columns))}{_delimiter_hint(list(frame.columns), source.delimiter)}. "
            "Fix the export or crm_source.columns"
        )
    present = {crm: ours for crm, ours in mapping.items() if crm in frame}
    mapped = frame[list(present)].rename(columns=present)
    mapped.index = pd.RangeIndex(first_row, first_row + len(mapped))
    return mapped


def _shown_columns(columns: list[str], most: int = 12) -> str:
    """The file's column names for an error message: a name with many digits (a data row read
    as the header, say) is not shown, long names are cut."""
    shown = []
    for name in columns[:most]:
        if sum(ch.isdigit() for ch in name) >= 5:
            shown.append("<a name with digits, not shown>")
        else:
            shown.append(repr(name if len(name) <= 40 else f"{name[:40]}..."))
    more = f" and {len(columns) - most} more" if len(columns) > most else ""
    return ", ".join(shown) + more


def _delimiter_hint(columns: list[str], delimiter: str) -> str:
    if len(columns) != 1 or not columns[0].isprintable():
        return ""
    for other in (",", ";", "\t", "|"):
        if other != delimiter and len(columns[0].split(other)) >= 3:
            return f" (one column only: the file looks {other!r}-separated; check crm_source.delimiter)"
    return ""


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
