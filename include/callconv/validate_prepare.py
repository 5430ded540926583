"""The frames that Great Expectations validates for one CRM extract, computed in pandas.

GX is handed only trimmed values and helper columns, never a phone number:
``caller_phone`` becomes the flag ``present`` / ``missing``. Helper columns hold
the raw value where a row fails a check GX has no expectation for, else null:

* ``conversion_time_unparseable``: a time that cannot be read;
* ``value_unparseable`` / ``value_negative``: a value that is not an amount, or is below zero;
* ``crm_id_repeat``: a CRM id that an earlier row (in file order) already had.

Times and values are judged by the normalisation stage's own parsers
(:mod:`callconv.normalise`), so validation never quarantines a row that
normalisation would accept, nor passes one it would refuse as unreadable.
"""

from __future__ import annotations

from datetime import UTC

import pandas as pd

from callconv import normalise

REQUIRED_COLUMNS = ("caller_phone", "conversion_time", "outcome")
OPTIONAL_COLUMNS = ("value", "currency", "crm_id", "call_start")
CANONICAL_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS

PHONE_PRESENT = "present"
PHONE_MISSING = "missing"


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
    return pd.DataFrame(columns, index=frame.index)
