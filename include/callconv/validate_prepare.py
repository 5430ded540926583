"""The frames that Great Expectations validates for one CRM extract, computed in pandas.

GX is handed only trimmed values and helper columns, never a phone number:
``caller_phone`` becomes the flag ``present`` / ``missing``. Helper columns turn
checks that GX has no expectation for into simple ones:

* ``conversion_time_unparseable``: the raw time where it cannot be read, else null;
* ``value_amount``: the value as a float where it is a well-formed number, else null;
* ``crm_id_repeat``: the CRM id where an earlier row (in file order) already had it, else null.
"""

from __future__ import annotations

import re

import pandas as pd

REQUIRED_COLUMNS = ("caller_phone", "conversion_time", "outcome")
OPTIONAL_COLUMNS = ("value", "currency", "crm_id", "call_start")
CANONICAL_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS

PHONE_PRESENT = "present"
PHONE_MISSING = "missing"

# Digit-group separators accepted beside each decimal separator.
_GROUP_SEPARATORS = {
    ".": (",", " ", "\u00a0", "\u202f", "'"),
    ",": (".", " ", "\u00a0", "\u202f"),
}

# Vectorised formats tried before the slow per-value "mixed" parser. They only
# decide whether a time is readable; which reading is right (day or month first,
# which time zone) is for the normalisation stage.
_FAST_TIME_FORMATS = ("ISO8601", "%d.%m.%Y %H:%M:%S", "%d.%m.%Y %H:%M", "%d.%m.%Y")


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


def value_pattern(decimal: str) -> re.Pattern[str]:
    """A plain number, optionally signed, with digit groups and the given decimal separator."""
    grouped = "|".join(rf"\d{{1,3}}(?:{re.escape(sep)}\d{{3}})+" for sep in _GROUP_SEPARATORS[decimal])
    return re.compile(rf"^[+-]?(?:\d+|{grouped})(?:{re.escape(decimal)}\d+)?$")


def parse_amounts(values: pd.Series, decimal: str) -> pd.Series:
    """Floats for the values matching :func:`value_pattern`, NaN elsewhere (and for None)."""
    amounts = pd.Series(float("nan"), index=values.index, dtype=float)
    text = values[values.notna()].astype(str)
    text = text[text.str.match(value_pattern(decimal))]
    if text.empty:
        return amounts
    separators = "".join(re.escape(sep) for sep in _GROUP_SEPARATORS[decimal])
    plain = text.str.replace(f"[{separators}]", "", regex=True)
    if decimal == ",":
        plain = plain.str.replace(",", ".", regex=False)
    amounts.loc[plain.index] = pd.to_numeric(plain, errors="coerce").to_numpy(dtype=float)
    return amounts


def readable_times(values: pd.Series) -> pd.Series:
    """True where a (trimmed, non-null) value reads as a date and time, with or without offset.

    Words pandas would accept alone ("now", "today") are not times in an extract: a
    value needs at least one digit.
    """
    unique = pd.Series(pd.unique(values.dropna().astype(str)), dtype=object)
    readable: set[str] = set()
    pending = unique[unique.str.contains(r"\d", regex=True)]
    for time_format in (*_FAST_TIME_FORMATS, "mixed"):
        if pending.empty:
            break
        parsed = pd.to_datetime(pending, format=time_format, utc=True, errors="coerce")
        done = parsed.notna().to_numpy()
        readable.update(pending[done])
        pending = pending[~done]
    return values.isin(readable)


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
    columns: dict[str, pd.Series] = {
        "caller_phone": pd.Series(PHONE_MISSING, index=frame.index, dtype=object).where(phone.isna(), PHONE_PRESENT),
        "conversion_time": time,
        "conversion_time_unparseable": time.where(~readable_times(time) & time.notna(), None),
        "outcome": clean_text(frame["outcome"]),
    }
    if "value" in frame.columns:
        value = clean_text(frame["value"])
        columns["value"] = value
        columns["value_amount"] = parse_amounts(value, decimal)
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
