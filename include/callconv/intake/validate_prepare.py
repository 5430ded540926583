"""The frames that Great Expectations validates for one CRM extract, computed in pandas.

GX is handed only trimmed values and helper columns, never a phone number:
``caller_phone`` becomes the flag ``present`` / ``missing``. Helper columns hold
the raw value where a row fails a check GX has no expectation for, else null:

* ``conversion_time_unparseable``: a time that cannot be read;
* ``value_unparseable`` / ``value_negative``: a value that is not an amount, or is below zero;
* ``crm_id_repeat``: a CRM id that an earlier row (in file order) already had;
* ``conversion_time_out_of_range``: a time outside the years any sale lies in (year 1, 9999);
* ``crm_id_too_long``: the length of a CRM id longer than the warehouse column holds;
* ``nul_byte``: the names of the row's cells that hold a NUL character (never their values).

The last three hold what the warehouse or Python's dates would refuse: such a row is one quarantined row,
not a database error that fails the whole file.

Before any of this, :class:`IdenticalRows` takes out rows that repeat an earlier
row exactly: a CRM that exports the same row twice made one sale, not a bad
row, so the copy is dropped and counted, never quarantined. A CRM id that
repeats with different content is still a ``duplicate_crm_id``.

Times and values are judged by the normalisation stage's own parsers
(:mod:`callconv.intake.normalise`), so validation never quarantines a row that
normalisation would accept, nor passes one it would refuse as unreadable.
"""

from __future__ import annotations

from datetime import UTC

import numpy as np
import pandas as pd

from callconv.intake import normalise
from callconv.schema import crm_sales

REQUIRED_COLUMNS = ("caller_phone", "conversion_time", "outcome")
OPTIONAL_COLUMNS = ("value", "currency", "crm_id", "call_start")
CANONICAL_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS

PHONE_PRESENT = "present"
PHONE_MISSING = "missing"
CRM_ID_MAX_LENGTH = crm_sales.c.crm_id.type.length

# A row's fingerprint: two 64-bit hashes of its cells under different keys, 16 bytes a row.
_FINGERPRINT = np.dtype((np.void, 16))
_HASH_KEYS = ("callconv-rows-01", "callconv-rows-02")


def clean_text(series: pd.Series) -> pd.Series:
    """Trimmed strings as an object Series; blank and missing values become None."""
    out = pd.Series(None, index=series.index, dtype=object)
    present = series[series.notna()]
    if present.empty:
        return out
    stripped = present.map(str).str.strip()
    stripped = stripped[stripped != ""]
    out.loc[stripped.index] = stripped.to_numpy(dtype=object)
    return out


def _where_reason(values: pd.Series, reasons: pd.Series, reason: str) -> pd.Series:
    """``values`` (an object Series) where the row has ``reason``, else None."""
    hit = values.notna() & (reasons == reason).fillna(False).astype(bool)
    return values.where(hit, None)


def prepare_table_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The canonical columns that are present, with no values at all: enough for table checks."""
    present = [column for column in CANONICAL_COLUMNS if column in frame.columns]
    return pd.DataFrame(index=frame.index, columns=present, dtype=object)


def prepare_row_frame(frame: pd.DataFrame, decimal: str) -> pd.DataFrame:
    """The frame the row checks run on; it never holds a phone number.

    Every required column must be present (the table checks come first).
    """
    phone = clean_text(frame["caller_phone"])
    time = clean_text(frame["conversion_time"])
    # Only readability matters here; the zone is applied when normalising.
    time_reasons = normalise.parse_local_times(time, UTC)["reason"]
    columns: dict[str, pd.Series] = {
        "caller_phone": pd.Series(PHONE_MISSING, index=frame.index, dtype=object).where(phone.isna(), PHONE_PRESENT),
        "conversion_time": time,
        "conversion_time_unparseable": _where_reason(time, time_reasons, "time_unparseable"),
        "conversion_time_out_of_range": _where_reason(time, time_reasons, "time_out_of_range"),
        "outcome": clean_text(frame["outcome"]),
    }
    if "value" in frame.columns:
        value = clean_text(frame["value"])
        value_reasons = normalise.parse_values(value, decimal)["reason"]
        columns["value_unparseable"] = _where_reason(value, value_reasons, "value_unparseable")
        columns["value_negative"] = _where_reason(value, value_reasons, "value_negative")
    if "currency" in frame.columns:
        currency = clean_text(frame["currency"])
        upper = currency[currency.notna()].str.upper()
        currency.loc[upper.index] = upper.to_numpy(dtype=object)
        columns["currency"] = currency
    if "crm_id" in frame.columns:
        crm_id = clean_text(frame["crm_id"])
        repeat = crm_id.notna() & crm_id.duplicated(keep="first")
        columns["crm_id_repeat"] = crm_id.where(repeat, None)
        # measured as stored: the CRM id is kept as read, not trimmed
        lengths = frame["crm_id"].astype(object).str.len()
        too_long = lengths[lengths > CRM_ID_MAX_LENGTH]
        lengths_shown = pd.Series(None, index=frame.index, dtype=object)
        lengths_shown.loc[too_long.index] = [f"{int(length)} characters" for length in too_long]
        columns["crm_id_too_long"] = lengths_shown
    columns["nul_byte"] = nul_byte_columns(frame)
    return pd.DataFrame(columns, index=frame.index)


def row_fingerprints(frame: pd.DataFrame) -> np.ndarray:
    """One 128-bit fingerprint per row of ``frame``, from its cells as the checks read them.

    Cells are trimmed and a blank cell is the same as a missing one; columns are taken in
    name order, so two reads of one file agree whatever order the columns come in.
    """
    columns = sorted(frame.columns)
    # "=" before every value and "" for a missing one: no value can pass for a missing cell.
    cells = pd.DataFrame(
        {column: ("=" + clean_text(frame[column])).fillna("") for column in columns}, index=frame.index
    )
    halves = [pd.util.hash_pandas_object(cells, index=False, hash_key=key).to_numpy() for key in _HASH_KEYS]
    return np.ascontiguousarray(np.stack(halves, axis=1)).view(_FINGERPRINT).ravel()


class IdenticalRows:
    """Finds the rows of one extract that repeat an earlier row exactly, chunk by chunk.

    The first copy stays; every later identical copy is dropped and counted in
    :attr:`dropped`. Identical means the same value in every column the pipeline reads
    (the CRM's mapped columns), after trimming. Rows already seen are remembered as 128-bit
    fingerprints, 16 bytes a row, so a file read in chunks drops the same rows as one read
    whole. Use one instance per extract.
    """

    def __init__(self) -> None:
        self._seen = np.empty(0, dtype=_FINGERPRINT)
        self.dropped = 0

    def first_copies(self, chunk: pd.DataFrame) -> pd.DataFrame:
        """``chunk`` without the rows that repeat a row of this or an earlier chunk."""
        if chunk.empty:
            return chunk
        prints = row_fingerprints(chunk)
        unique, first = np.unique(prints, return_index=True)
        repeat = np.ones(len(prints), dtype=bool)
        repeat[first] = False
        repeat |= np.isin(prints, self._seen)
        self._seen = np.union1d(self._seen, unique)
        self.dropped += int(repeat.sum())
        return chunk.loc[~repeat]


def nul_byte_columns(frame: pd.DataFrame) -> pd.Series:
    """Per row, the names of its canonical cells holding a NUL character, else None.

    No text column in the warehouse can hold one (PostgreSQL refuses it in any string).
    """
    found = pd.Series(None, index=frame.index, dtype=object)
    for column in CANONICAL_COLUMNS:
        if column not in frame.columns:
            continue
        hit = frame[column].astype(object).str.contains("\x00", regex=False).eq(True)
        if hit.any():
            rows = hit[hit].index
            found.loc[rows] = [f"{before},{column}" if before else column for before in found.loc[rows]]
    return found
