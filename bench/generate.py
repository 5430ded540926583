"""Synthetic, realistic data for the benchmark, cached under ``bench/.data``.

For a size ``n`` (CRM rows of one business day) it writes, in ``bench/.data/n<size>/``:

* ``landing/bench_se/<day>/crm_sales_<day>.csv``: the CRM extract as a Swedish CRM
  exports it (``;``, UTF-8 with BOM, decimal comma, the project's column names);
* ``call_logs.csv``: ``10 * n`` call-log rows over the 40 days up to the day, for COPY;
* ``crm_sales.csv``: the extract's good rows as the pipeline stores them in
  ``crm_sales`` (the match stage's input), for COPY;
* ``meta.json``: parameters, a fingerprint and what the data looks like.

and, once for the upload stage, ``upload/upload_ledger.csv`` + ``upload/calls.csv``
(100,000 pending conversions and the forwarded calls Google would know).

How the data is shaped, and why:

* **Callers** come from SE (the account's home, 70%), NO (12%), DE (8%), GB (6%)
  and US (4%), with valid national numbers (a sample is checked with phonenumbers).
* **Calls per caller** follow a Zipf law (exponent 2.1, at most 300 calls a month):
  most callers call once or twice, a few call every day. Half the buyers are picked
  by call (frequent callers buy more often: repeat callers), half by caller, so
  buying grows with calling but less than in proportion. A caller's number recurs
  in the extract, which is what makes parsing each distinct string once pay.
* **Call times** follow the hour of day (peaks 09-11 and 13-16 local) and the day of
  week (Saturday 45%, Sunday 25% of a weekday); durations are log-normal (median
  100 s, about 14% under the 30 s minimum). 80% of calls come through a Google
  forwarding number.
* **Sales** happen on the business day; 80% follow a forwarded call of the same
  caller minutes to days earlier (log-normal delay, median 40 min, 99th percentile
  about two days), the rest after a non-forwarded call (5%), a too-short call (4%),
  a call 31-39 days before (3%), or no call at all (8%). 8% of sales have a second
  CRM line (an upsell on the same call). Half the CRM rows record the call start,
  with up to a minute of clock skew.
* **Numbers are written the ways CRMs write them**: national with trunk 0
  (``070-123 45 67``, ``(08) 123 456 78``), ``+46 (0)70 ...``, ``0046 ...``, dots,
  brackets, dashes, extensions (``ext. 12``, ``x204``, ``#3``), US style
  (``+1 (650) 253-1234``), and now and then a foreign number written nationally,
  which cannot be read as the caller's. Each caller has a usual form (80% of rows).
  The telephony system writes E.164 (80%), ``00``-international (12%) or national
  (8%, home callers).
* **About 3% of CRM rows are bad**: missing or too short numbers, missing or
  unreadable times, times in the future, unknown outcomes or currencies,
  unreadable or negative values, repeated CRM ids.

Every number comes from a seeded generator, so a size always yields the same data.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import time as timer
from datetime import UTC, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np

from bench import config

log = logging.getLogger(__name__)

GENERATOR_VERSION = 3
SEED = 20261127

REGION_MIX = {"SE": 0.70, "NO": 0.12, "DE": 0.08, "GB": 0.06, "US": 0.04}
COUNTRY_CODE = {"SE": "46", "NO": "47", "DE": "49", "GB": "44", "US": "1"}
US_AREAS = ("650", "212", "415", "312", "617", "206", "303", "512")
# National significant number patterns: (prefixes, random digits after the prefix, weight).
NSN_PATTERNS = {
    "SE": [(["70", "72", "73", "76"], 7, 0.85), (["8" + str(d) for d in range(1, 10)], 7, 0.15)],
    "NO": [(["9" + str(d) for d in range(10)], 6, 0.7), (["40", "41", "46", "47", "48"], 6, 0.3)],
    "DE": [(["151", "152", "157", "159"], 8, 0.5), (["160", "170", "171", "172", "175", "176", "177"], 7, 0.5)],
    "GB": [(["74", "75", "78"], 8, 1.0)],
    "US": [
        ([a + str(d) for a in ("650", "212", "415", "312", "617", "206", "303", "512") for d in range(2, 10)], 6, 1.0)
    ],
}
ZIPF_EXPONENT = 2.1
MAX_CALLS_PER_CALLER = 300
HISTORY_DAYS = 40
FORWARDED_SHARE = 0.80
SECOND_LINE_SHARE = 0.08
CASE_KINDS = {  # how a sale relates to the calls
    "linked": 0.80,
    "not_forwarded": 0.05,
    "too_short": 0.04,
    "outside_window": 0.03,
    "no_call": 0.08,
}
BAD_ROW_KINDS = {  # share of all CRM rows, about 3% in total
    "phone_missing": 0.005,
    "phone_too_short": 0.004,
    "time_missing": 0.003,
    "time_unparseable": 0.005,
    "time_in_future": 0.001,
    "outcome_unknown": 0.004,
    "value_unparseable": 0.003,
    "value_negative": 0.002,
    "currency_unknown": 0.002,
    "duplicate_crm_id": 0.001,
}
# Local hour-of-day weights for calls and for sales.
CALL_HOURS = np.array(
    [
        0.2,
        0.1,
        0.1,
        0.1,
        0.1,
        0.3,
        0.8,
        2.0,
        5.5,
        8.0,
        8.5,
        8.0,
        6.5,
        7.5,
        8.0,
        7.5,
        6.5,
        5.0,
        3.5,
        2.5,
        1.8,
        1.2,
        0.7,
        0.4,
    ]
)
SALE_HOURS = np.array(
    [
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.2,
        1.0,
        5.0,
        8.0,
        9.0,
        8.5,
        6.0,
        8.0,
        9.0,
        8.5,
        7.0,
        5.0,
        2.5,
        1.5,
        1.0,
        0.6,
        0.3,
        0.1,
    ]
)
WEEKDAY_WEIGHT = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.45, 0.25])  # Monday first
FORWARDING_NUMBERS = np.array(["+46 8 520 100 00", "+46 8 520 100 01", "+46 31 760 200 00", "+46 40 660 300 00"])
UPLOAD_ROWS = 100_000


def data_dir(size: int) -> Path:
    return config.DATA_DIR / f"n{config.size_label(size)}"


def fingerprint(size: int) -> str:
    text = f"v{GENERATOR_VERSION}|seed{SEED}|n{size}|{config.BUSINESS_DATE}|{config.ACCOUNT_ID}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def crm_file(size: int) -> Path:
    day = config.BUSINESS_DATE
    return data_dir(size) / "landing" / config.ACCOUNT_ID / day.isoformat() / f"crm_sales_{day:%Y%m%d}.csv"


def is_generated(size: int) -> bool:
    meta = data_dir(size) / "meta.json"
    if not meta.is_file():
        return False
    return json.loads(meta.read_text()).get("fingerprint") == fingerprint(size)


def read_meta(size: int) -> dict:
    return json.loads((data_dir(size) / "meta.json").read_text())


# --------------------------------------------------------------------------- callers


def _nsns(rng: np.random.Generator, region: str, count: int) -> list[str]:
    """``count`` distinct national significant numbers of ``region``."""
    patterns = NSN_PATTERNS[region]
    weights = np.array([w for _, _, w in patterns])
    found: dict[str, None] = {}
    while len(found) < count:
        want = int((count - len(found)) * 1.05) + 16
        which = rng.choice(len(patterns), size=want, p=weights / weights.sum())
        for index, (prefixes, digits, _) in enumerate(patterns):
            chosen = which == index
            n = int(chosen.sum())
            if not n:
                continue
            prefix = np.array(prefixes, dtype=object)[rng.integers(0, len(prefixes), n)]
            tail = rng.integers(0, 10**digits, n)
            for p, t in zip(prefix, tail, strict=True):
                found.setdefault(f"{p}{t:0{digits}d}")
                if len(found) >= count:
                    break
    return list(found)[:count]


def _group(nsn: str, region: str) -> str:
    """The NSN split the way people read it out in that country."""
    if region == "SE":
        if nsn.startswith("8"):
            return f"{nsn[:1]}-{nsn[1:4]} {nsn[4:6]} {nsn[6:]}"
        return f"{nsn[:2]}-{nsn[2:5]} {nsn[5:7]} {nsn[7:]}"
    if region == "NO":
        return f"{nsn[:3]} {nsn[3:5]} {nsn[5:]}"
    if region == "DE":
        return f"{nsn[:3]} {nsn[3:]}"
    if region == "GB":
        return f"{nsn[:4]} {nsn[4:]}"
    return f"({nsn[:3]}) {nsn[3:6]}-{nsn[6:]}"  # US


def _crm_forms(nsn: str, region: str) -> list[str]:
    """How a CRM user writes this caller's number; the first is the usual one."""
    cc = COUNTRY_CODE[region]
    grouped = _group(nsn, region)
    spaced = grouped.replace("-", " ")
    if region == "SE":
        area, rest = (nsn[:1], nsn[1:]) if nsn.startswith("8") else (nsn[:2], nsn[2:])
        return [
            f"0{grouped}",  # 070-123 45 67
            f"0{nsn}",  # 0701234567
            f"+46 {spaced}",  # +46 70 123 45 67
            f"+46 (0){area} {rest}",  # +46 (0)70 1234567
            f"0046{nsn}",  # 0046701234567
            f"(0{area}) {rest[:3]} {rest[3:5]} {rest[5:]}",  # (070) 123 45 67
            f"0{area}.{rest[:3]}.{rest[3:5]}.{rest[5:]}",  # 070.123.45.67
            f"0{grouped} ext. {len(nsn) * 3}",  # with an extension
        ]
    if region == "US":
        return [
            f"+1 ({nsn[:3]}) {nsn[3:6]}-{nsn[6:]}",
            f"+1.{nsn[:3]}.{nsn[3:6]}.{nsn[6:]}",
            f"001-{nsn[:3]}-{nsn[3:6]}-{nsn[6:]}",
            f"+1 {nsn[:3]} {nsn[3:6]} {nsn[6:]} x{nsn[-3:]}",
            f"+1{nsn}",
            f"({nsn[:3]}) {nsn[3:6]}-{nsn[6:]}",  # written nationally: not readable as US here
        ]
    trunk = "" if region == "NO" else "(0)"
    return [
        f"+{cc} {spaced}",
        f"00{cc} {nsn}",
        f"+{cc}-{nsn}",
        f"+{cc} {trunk}{spaced}",
        f"(+{cc}) {'.'.join(nsn[i : i + 2] for i in range(0, len(nsn), 2))}",
        f"00{cc} {grouped} #{nsn[-1]}",
        ("0" if region != "NO" else "") + spaced,  # written nationally: read as a home number, or not at all
    ]


# ------------------------------------------------------------------------ generation


def _local_to_utc(local: np.ndarray, tz: str) -> np.ndarray:
    """Naive local datetime64[s] -> UTC datetime64[s]; DST as the pipeline reads it."""
    import pandas as pd

    index = pd.DatetimeIndex(local).tz_localize(
        tz, ambiguous=np.ones(len(local), dtype=bool), nonexistent="shift_forward"
    )
    return index.tz_convert("UTC").tz_localize(None).to_numpy().astype("datetime64[s]")


def _draw_times(rng, days: np.ndarray, hours_weights: np.ndarray, count: int) -> np.ndarray:
    """Naive local times: a day from ``days`` (weighted by weekday), an hour by weight."""
    weekday = np.array([(np.datetime64(d, "D").astype(int) + 3) % 7 for d in days])  # 1970-01-01 was a Thursday
    day_p = WEEKDAY_WEIGHT[weekday]
    day = days[rng.choice(len(days), size=count, p=day_p / day_p.sum())]
    hour = rng.choice(24, size=count, p=hours_weights / hours_weights.sum())
    second = rng.integers(0, 3600, count)
    return day.astype("datetime64[s]") + (hour * 3600 + second).astype("timedelta64[s]")


def _zipf_counts(rng, total: int) -> np.ndarray:
    counts: list[np.ndarray] = []
    have = 0
    while have < total:
        draw = rng.zipf(ZIPF_EXPONENT, size=max(1024, int((total - have) / 2.5)))
        too_many = draw > MAX_CALLS_PER_CALLER
        while too_many.any():
            draw[too_many] = rng.zipf(ZIPF_EXPONENT, size=int(too_many.sum()))
            too_many = draw > MAX_CALLS_PER_CALLER
        cumulative = np.cumsum(draw)
        keep = int(np.searchsorted(cumulative, total - have, side="left")) + 1
        counts.append(draw[:keep])
        have += int(cumulative[min(keep, len(draw)) - 1])
    result = np.concatenate(counts)
    result[-1] -= int(result.sum()) - total
    return result


def _format_amount(rng, value: float) -> str:
    whole, cents = int(value), int(round((value - int(value)) * 100)) % 100
    grouped = f"{whole:,}".replace(",", " ")
    style = rng.integers(0, 10)
    if style < 4:
        return f"{whole},{cents:02d}"
    if style < 6:
        return f"{grouped},{cents:02d}"
    if style < 7:
        return f"{whole:,}".replace(",", ".") + f",{cents:02d}"
    if style < 8:
        return f"kr {grouped},{cents:02d}"
    if style < 9:
        return f"{whole}"
    return f"SEK {whole},{cents:02d}"


def _amount_value(text: str) -> str:
    """The amount as the pipeline reads it (decimal comma), as a plain decimal string."""
    digits = "".join(ch for ch in text if ch.isdigit() or ch in ",.")
    digits = digits.replace(".", "").replace(",", ".")
    return digits


def generate(size: int) -> dict:
    """Write the data set for ``size`` CRM rows; returns its meta."""
    import pandas as pd

    from callconv.intake.normalise import normalise_distinct, normalise_phone
    from callconv.intake.take_in import sale_key

    started = timer.perf_counter()
    rng = np.random.default_rng([SEED, size])
    tz_name = config.TIMEZONE
    tz = ZoneInfo(tz_name)
    day = config.BUSINESS_DATE
    n_rows = size
    n_calls = size * config.CALLS_PER_SALE_ROW
    out = data_dir(size)
    out.mkdir(parents=True, exist_ok=True)

    # 1. Sale cases and their CRM lines.
    n_cases = int(n_rows / (1 + SECOND_LINE_SHARE)) + 1
    lines = np.where(rng.random(n_cases) < SECOND_LINE_SHARE, 2, 1)
    lines = lines[: int(np.searchsorted(np.cumsum(lines), n_rows)) + 1]
    lines[-1] -= int(lines.sum()) - n_rows
    lines = lines[lines > 0]
    n_cases = len(lines)
    kinds = np.array(list(CASE_KINDS))
    case_kind = kinds[rng.choice(len(kinds), size=n_cases, p=list(CASE_KINDS.values()))]
    has_call = case_kind != "no_call"
    n_linked = int(has_call.sum())

    # 2. Callers: calls per caller from a Zipf law; fresh callers for sales without a call.
    n_background = n_calls - n_linked
    counts = _zipf_counts(rng, n_background)
    n_callers_calling = len(counts)
    n_fresh = int((~has_call).sum())
    n_callers = n_callers_calling + n_fresh
    regions = np.array(list(REGION_MIX))
    caller_region = regions[rng.choice(len(regions), size=n_callers, p=list(REGION_MIX.values()))]
    caller_nsn = np.empty(n_callers, dtype=object)
    for region in regions:
        where = np.flatnonzero(caller_region == region)
        caller_nsn[where] = _nsns(rng, region, len(where))
    cc = np.array([COUNTRY_CODE[r] for r in caller_region], dtype=object)
    caller_e164 = np.array(["+" + c + n for c, n in zip(cc, caller_nsn, strict=True)], dtype=object)
    log.info("n=%d: %d callers (%d with calls)", size, n_callers, n_callers_calling)

    # 3. Background calls.
    history = np.arange(
        np.datetime64(day - timedelta(days=HISTORY_DAYS)), np.datetime64(day + timedelta(days=1)), dtype="datetime64[D]"
    )
    bg_caller = np.repeat(np.arange(n_callers_calling), counts)
    rng.shuffle(bg_caller)
    bg_local = _draw_times(rng, history, CALL_HOURS, n_background)
    bg_duration = np.maximum(1, rng.lognormal(np.log(100), 1.1, n_background)).astype(np.int32)
    bg_forwarded = rng.random(n_background) < FORWARDED_SHARE

    # 4. Sales on the business day, and the calls they came from.
    case_caller = np.empty(n_cases, dtype=np.int64)
    # Half the buyers are drawn by calls made (frequent callers buy more), half by caller:
    # buying grows with calling, but less than in proportion.
    by_calls = rng.random(n_linked) < 0.5
    buyers = rng.integers(0, n_callers_calling, n_linked)
    buyers[by_calls] = bg_caller[rng.integers(0, n_background, int(by_calls.sum()))]
    case_caller[has_call] = buyers
    case_caller[~has_call] = np.arange(n_callers_calling, n_callers)
    sale_local = _draw_times(rng, np.array([np.datetime64(day)]), SALE_HOURS, n_cases)
    minute_only = rng.random(n_cases) < 0.10  # "2026-11-27 14:03" has no seconds
    sale_local[minute_only] = sale_local[minute_only].astype("datetime64[m]").astype("datetime64[s]")
    delay = np.clip(rng.lognormal(np.log(40 * 60), 1.8, n_cases), 60, 29 * 86400).astype(np.int64)
    outside = case_kind == "outside_window"
    delay[outside] = rng.integers(31 * 86400, 39 * 86400, int(outside.sum()))
    linked_local = (sale_local - delay.astype("timedelta64[s]"))[has_call]
    linked_kind = case_kind[has_call]
    linked_duration = np.maximum(30, rng.lognormal(np.log(240), 0.9, n_linked)).astype(np.int32)
    short = linked_kind == "too_short"
    linked_duration[short] = rng.integers(5, 30, int(short.sum()))
    linked_forwarded = linked_kind != "not_forwarded"

    # 5. All calls, in time order, with ids and written numbers.
    call_caller = np.concatenate([bg_caller, case_caller[has_call]])
    call_utc = _local_to_utc(np.concatenate([bg_local, linked_local]), tz_name)
    order = np.argsort(call_utc, kind="stable")
    call_caller, call_utc = call_caller[order], call_utc[order]
    call_duration = np.concatenate([bg_duration, linked_duration])[order]
    call_forwarded = np.concatenate([bg_forwarded, linked_forwarded])[order]
    inverse = np.empty_like(order)  # where each case's call ended up
    inverse[order] = np.arange(len(order))
    linked_position = inverse[n_background:]
    case_call = np.full(n_cases, -1, dtype=np.int64)
    case_call[has_call] = linked_position
    if not (call_caller[linked_position] == case_caller[has_call]).all():
        raise RuntimeError("a sale's call is not its caller's")

    home = caller_region == config.HOME_REGION
    form = rng.choice(3, size=n_calls, p=[0.80, 0.12, 0.08])
    form[(form == 2) & ~home[call_caller]] = 0  # only home numbers are written nationally
    written_e164 = caller_e164[call_caller]
    intl00 = np.array(["00" + e[1:] for e in caller_e164], dtype=object)[call_caller]
    national = np.array(["0" + n for n in caller_nsn], dtype=object)[call_caller]
    call_number = np.where(form == 0, written_e164, np.where(form == 1, intl00, national))

    # The pipeline's parse of a sample of call-log numbers must give the same caller.
    sample = rng.choice(n_calls, size=min(n_calls, 20_000), replace=False)
    wrong = sum(normalise_phone(call_number[i], config.HOME_REGION)[0] != written_e164[i] for i in sample.tolist())
    if wrong > len(sample) * 0.001:
        raise RuntimeError(f"{wrong} of {len(sample)} sampled call-log numbers do not parse to their caller")

    _write_call_logs(
        out / "call_logs.csv", call_caller, call_utc, call_duration, call_forwarded, call_number, caller_e164, rng
    )

    # 6. CRM rows.
    row_case = np.repeat(np.arange(n_cases), lines)
    row_line = np.concatenate([np.arange(k) for k in lines]) if n_cases else np.array([], dtype=int)
    row_caller = case_caller[row_case]
    row_local = sale_local[row_case] + np.where(row_line > 0, rng.integers(0, 120, n_rows), 0).astype("timedelta64[s]")
    usual = rng.random(n_rows) < 0.80
    phone_text = np.empty(n_rows, dtype=object)
    for i in range(n_rows):
        caller = row_caller[i]
        forms = _crm_forms(caller_nsn[caller], caller_region[caller])
        # The last form writes a foreign number nationally: rare (about 0.5% of foreign rows' forms).
        pool = forms if caller_region[caller] == config.HOME_REGION else forms[:-1]
        if caller_region[caller] != config.HOME_REGION and rng.random() < 0.03:
            phone_text[i] = forms[-1]
        elif usual[i]:
            phone_text[i] = pool[caller % len(pool)]
        else:
            phone_text[i] = pool[rng.integers(0, len(pool))]
    # Rows written in the time formats CRMs use; "%Y-%m-%d %H:%M" for the cases without seconds.
    time_style = rng.choice(4, size=n_rows, p=[0.78, 0.11, 0.055, 0.055])
    time_style[minute_only[row_case]] = 4
    row_local[time_style == 4] = row_local[time_style == 4].astype("datetime64[m]").astype("datetime64[s]")
    row_dt = row_local.astype(datetime)
    time_text = np.empty(n_rows, dtype=object)
    for i in range(n_rows):
        moment = row_dt[i]
        style = time_style[i]
        if style == 0:
            time_text[i] = moment.strftime("%Y-%m-%d %H:%M:%S")
        elif style == 1:
            time_text[i] = moment.strftime("%Y-%m-%dT%H:%M:%S")
        elif style == 2:
            time_text[i] = moment.replace(tzinfo=tz).isoformat(timespec="seconds")
        elif style == 3:
            time_text[i] = moment.strftime("%Y/%m/%d %H:%M:%S")
        else:
            time_text[i] = moment.strftime("%Y-%m-%d %H:%M")
    # The CRM's own record of the call start, with clock skew, on half the rows with a call.
    crm_call_start = np.full(n_rows, "", dtype=object)
    row_call = case_call[row_case]
    record_start = (row_call >= 0) & (rng.random(n_rows) < 0.5)
    if record_start.any():
        skew = rng.integers(-60, 61, int(record_start.sum())).astype("timedelta64[s]")
        utc_start = call_utc[row_call[record_start]] + skew
        local = pd.DatetimeIndex(utc_start).tz_localize("UTC").tz_convert(tz_name).tz_localize(None)
        crm_call_start[record_start] = local.strftime("%Y-%m-%d %H:%M:%S").to_numpy(dtype=object)
    outcome = np.where(row_line > 0, "upsell", np.where(rng.random(n_rows) < 0.12, "upsell", "sale")).astype(object)
    amounts = np.round(rng.lognormal(np.log(1500), 0.9, n_rows), 2)
    value_text = np.array([_format_amount(rng, a) for a in amounts], dtype=object)
    value_text[rng.random(n_rows) < 0.10] = ""
    currency = np.array(["SEK", "", "sek", "EUR", "NOK"], dtype=object)[
        rng.choice(5, size=n_rows, p=[0.60, 0.25, 0.10, 0.03, 0.02])
    ]
    crm_id = np.array([f"S{c:08d}-{ln}" for c, ln in zip(row_case, row_line, strict=True)], dtype=object)

    # 7. About 3% bad rows.
    bad_kind = np.full(n_rows, "", dtype=object)
    pick = rng.permutation(n_rows)
    start = 0
    for kind, share in BAD_ROW_KINDS.items():
        count = int(round(n_rows * share))
        bad_kind[pick[start : start + count]] = kind
        start += count
    for i in np.flatnonzero(bad_kind != ""):
        kind = bad_kind[i]
        if kind == "phone_missing":
            phone_text[i] = rng.choice(["", " ", ""])
        elif kind == "phone_too_short":
            phone_text[i] = rng.choice(["12 34", "070-12", "+46 70", "5551"])
        elif kind == "time_missing":
            time_text[i] = ""
        elif kind == "time_unparseable":
            time_text[i] = rng.choice(["igår 14:00", "27/11/2026 14:03", "2026-13-45 10:00", "fredag", "14:03"])
        elif kind == "time_in_future":
            time_text[i] = (row_dt[i] + timedelta(days=2)).strftime("%Y-%m-%d %H:%M:%S")
        elif kind == "outcome_unknown":
            outcome[i] = rng.choice(["refund", "", "Sale?", "offert"])
        elif kind == "value_unparseable":
            value_text[i] = rng.choice(["ca 500", "1,2,3", "gratis", "12,50,00"])
        elif kind == "value_negative":
            value_text[i] = "-" + (value_text[i] or "100,00")
        elif kind == "currency_unknown":
            currency[i] = rng.choice(["KRONOR", "XXY", "S3K"])
        elif kind == "duplicate_crm_id":
            crm_id[i] = crm_id[(i + 1) % n_rows if i == 0 else i - 1]

    header = ["Sak", "Telefon", "Samtalestart", "Salgstidspunkt", "Utfall", "Beløp", "Valuta"]
    path = crm_file(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.writer(handle, delimiter=";", lineterminator="\r\n")
        writer.writerow(header)
        writer.writerows(zip(crm_id, phone_text, crm_call_start, time_text, outcome, value_text, currency, strict=True))
    checksum = hashlib.sha256(path.read_bytes()).hexdigest()

    # 8. The good rows as crm_sales holds them (the match stage's input).
    parsed = normalise_distinct([str(p).strip() for p in phone_text], config.HOME_REGION)
    row_utc = _local_to_utc(row_local, tz_name)
    call_start_utc = np.full(n_rows, "", dtype=object)
    if record_start.any():
        call_start_utc[record_start] = [
            f"{t}Z".replace("T", " ") for t in (call_utc[row_call[record_start]] + skew).astype(str)
        ]
    actions = {name: spec["id"] for name, spec in config.ACTIONS.items()}
    crm_ids_seen: set[str] = set()
    stored = 0
    unreadable_phones = 0
    with (out / "crm_sales.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        for i in range(n_rows):
            if bad_kind[i]:
                continue
            e164, reason = parsed[str(phone_text[i]).strip()]
            if reason:
                unreadable_phones += 1
                continue
            if crm_id[i] in crm_ids_seen:
                continue
            crm_ids_seen.add(crm_id[i])
            value = _amount_value(value_text[i]) if value_text[i] else ""
            writer.writerow(
                [
                    config.ACCOUNT_ID,
                    sale_key(config.ACCOUNT_ID, crm_id[i], {}, config.pseudonym_keys().primary),
                    crm_id[i],
                    checksum,
                    i + 1,
                    day.isoformat(),
                    e164,
                    f"{row_utc[i]}Z".replace("T", " "),
                    call_start_utc[i],
                    outcome[i],
                    actions[outcome[i]],
                    value,
                    (currency[i] or "SEK").upper(),
                ]
            )
            stored += 1

    # 9. What the data looks like.
    distinct_phones = len({str(p).strip() for p in phone_text})
    calls_per_sale = np.bincount(call_caller, minlength=n_callers)[row_caller]
    meta = {
        "fingerprint": fingerprint(size),
        "generator_version": GENERATOR_VERSION,
        "seed": SEED,
        "crm_rows": n_rows,
        "call_rows": n_calls,
        "sale_cases": n_cases,
        "callers": n_callers,
        "callers_with_calls": n_callers_calling,
        "max_calls_per_caller": int(counts.max()) if len(counts) else 0,
        "bad_rows_planted": int((bad_kind != "").sum()),
        "bad_row_share_planted": round(float((bad_kind != "").mean()), 4),
        "crm_phone_unreadable_good_rows": unreadable_phones,
        "crm_sales_rows": stored,
        "distinct_phone_strings": distinct_phones,
        "distinct_phone_share": round(distinct_phones / n_rows, 4),
        "mean_calls_per_sale_caller": round(float(calls_per_sale.mean()), 2),
        "p99_calls_per_sale_caller": int(np.percentile(calls_per_sale, 99)),
        "case_kinds": {k: int((case_kind == k).sum()) for k in CASE_KINDS},
        "crm_checksum": checksum,
        "seconds": round(timer.perf_counter() - started, 1),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    log.info("n=%d generated in %.1f s", size, meta["seconds"])
    return meta


def _write_call_logs(path, call_caller, call_utc, duration, forwarded, number, caller_e164, rng) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    n = len(call_caller)
    ids = pc.binary_join_element_wise(
        "c", pc.utf8_lpad(pc.cast(pa.array(np.arange(n)), pa.string()), width=10, padding="0"), ""
    )
    table = pa.table(
        {
            "account_id": pa.array(np.full(n, config.ACCOUNT_ID, dtype=object), pa.string()),
            "source_call_id": ids,
            "caller_number": pa.array(number, pa.string()),
            "caller_e164": pa.array(caller_e164[call_caller], pa.string()),
            "caller_parse_status": pa.array(np.full(n, "ok", dtype=object), pa.string()),
            "call_start": pa.array(call_utc).cast(pa.timestamp("s", tz="UTC")),
            "duration_seconds": pa.array(duration),
            "dialled_number": pa.array(FORWARDING_NUMBERS[rng.integers(0, len(FORWARDING_NUMBERS), n)], pa.string()),
            "via_google_forwarding": pa.array(forwarded),
        }
    )
    pacsv.write_csv(table, str(path), pacsv.WriteOptions(include_header=False))


CALL_LOG_COLUMNS = (
    "account_id",
    "source_call_id",
    "caller_number",
    "caller_e164",
    "caller_parse_status",
    "call_start",
    "duration_seconds",
    "dialled_number",
    "via_google_forwarding",
)
CRM_SALES_COLUMNS = (
    "account_id",
    "sale_key",
    "crm_id",
    "import_checksum",
    "source_row",
    "business_date",
    "caller_e164",
    "conversion_time",
    "crm_call_start",
    "outcome",
    "conversion_action_id",
    "conversion_value",
    "currency_code",
)
LEDGER_COLUMNS = (
    "conversion_key",
    "account_id",
    "business_date",
    "state",
    "caller_e164",
    "call_start",
    "conversion_action_id",
    "conversion_time",
    "conversion_value",
    "currency_code",
    "attempts",
    "run_id",
)


# ------------------------------------------------------------------------ upload data


def upload_dir() -> Path:
    return config.DATA_DIR / "upload"


def upload_fingerprint() -> str:
    return hashlib.sha256(f"upload-v{GENERATOR_VERSION}|{SEED}|{UPLOAD_ROWS}".encode()).hexdigest()[:16]


def generate_upload() -> Path:
    """100,000 pending conversions and the forwarded calls behind them (1% unknown to Google)."""
    folder = upload_dir()
    meta = folder / "meta.json"
    if meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == upload_fingerprint():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([SEED, 7])
    day = config.BUSINESS_DATE
    tz = ZoneInfo(config.TIMEZONE)
    nsns = _nsns(rng, "SE", UPLOAD_ROWS)
    day_start = datetime.combine(day, dtime(7), tzinfo=tz).astimezone(UTC)
    offsets = rng.integers(0, 12 * 3600, UPLOAD_ROWS)
    delays = np.clip(rng.lognormal(np.log(40 * 60), 1.2, UPLOAD_ROWS), 60, 20 * 3600).astype(int)
    known = rng.random(UPLOAD_ROWS) >= 0.01
    with (
        (folder / "upload_ledger.csv").open("w", newline="") as ledger,
        (folder / "calls.csv").open("w", newline="") as calls,
    ):
        ledger_writer, calls_writer = csv.writer(ledger), csv.writer(calls)
        for i in range(UPLOAD_ROWS):
            start = day_start + timedelta(seconds=int(offsets[i]))
            e164 = f"+46{nsns[i]}"
            action = "555000111" if i % 7 else "555000222"
            key = hashlib.sha256(f"{config.ACCOUNT_ID}|{e164}|{start:%Y-%m-%dT%H:%M:%SZ}|{action}".encode()).hexdigest()
            value = f"{rng.integers(100, 50_000)}.{rng.integers(0, 100):02d}" if i % 10 else ""
            ledger_writer.writerow(
                [
                    key,
                    config.ACCOUNT_ID,
                    day.isoformat(),
                    "pending",
                    e164,
                    start.strftime("%Y-%m-%d %H:%M:%S+00"),
                    action,
                    (start + timedelta(seconds=int(delays[i]))).strftime("%Y-%m-%d %H:%M:%S+00"),
                    value,
                    "SEK" if value else "",
                    0,
                    "bench-match",
                ]
            )
            if known[i]:
                calls_writer.writerow(
                    [
                        config.ACCOUNT_ID,
                        f"u{i:07d}",
                        e164,
                        e164,
                        "ok",
                        start.strftime("%Y-%m-%d %H:%M:%S+00"),
                        int(rng.integers(30, 900)),
                        FORWARDING_NUMBERS[0],
                        "true",
                    ]
                )
    meta.write_text(json.dumps({"fingerprint": upload_fingerprint(), "rows": UPLOAD_ROWS, "known": int(known.sum())}))
    return folder


# ---------------------------------------------------------------------- PostgreSQL


def copy_file(raw_connection, table: str, columns: tuple[str, ...], path: Path) -> None:
    """COPY a CSV file into ``table`` (psycopg2 copy_expert, streamed in 8 kB reads)."""
    with path.open("rb") as handle, raw_connection.cursor() as cursor:
        cursor.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv)", handle)


def ensure_schema(schema: str) -> str:
    """Create ``schema`` if needed and bring it to the project's migrations; its URL."""
    import sqlalchemy as sa

    from callconv.warehouse import migrate

    admin = sa.create_engine(config.pg_url(), hide_parameters=True)
    with admin.begin() as connection:
        connection.execute(sa.text(f'create schema if not exists "{schema}"'))
        connection.execute(sa.text(f'create table if not exists "{schema}".bench_meta (fingerprint text)'))
    admin.dispose()
    url = config.schema_url(schema)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    migrate(url)
    return url


def loaded_fingerprint(schema: str) -> str | None:
    import sqlalchemy as sa

    engine = sa.create_engine(config.pg_url(), hide_parameters=True)
    try:
        with engine.connect() as connection:
            exists = connection.scalar(
                sa.text(
                    "select 1 from information_schema.tables where table_schema = :s and table_name = 'bench_meta'"
                ),
                {"s": schema},
            )
            if not exists:
                return None
            return connection.scalar(sa.text(f'select fingerprint from "{schema}".bench_meta'))
    finally:
        engine.dispose()


def load_call_logs(size: int) -> dict:
    """The size's call logs in schema ``bench_n<size>``, indexed and analysed; reused when loaded."""
    import sqlalchemy as sa

    from callconv.schema import call_logs

    schema = config.schema_name(size)
    started = timer.perf_counter()
    # Migrate first: a reused schema still gets the project's newest tables and indexes.
    url = ensure_schema(schema)
    # The marker names the exact files loaded, so regenerated data is always reloaded.
    marker = f"{fingerprint(size)}:{read_meta(size)['crm_checksum'][:16]}"
    if loaded_fingerprint(schema) == marker:
        return {"schema": schema, "loaded": False, "seconds": round(timer.perf_counter() - started, 1)}
    engine = sa.create_engine(url, hide_parameters=True)
    with engine.begin() as connection:
        connection.execute(sa.text("truncate call_logs, crm_sales, matches, upload_ledger, quarantine, crm_imports"))
        connection.execute(sa.text("delete from bench_meta"))
        for index in call_logs.indexes:
            connection.execute(sa.text(f'drop index if exists "{index.name}"'))
    raw = engine.raw_connection()
    try:
        copy_file(raw.driver_connection, "call_logs", CALL_LOG_COLUMNS, data_dir(size) / "call_logs.csv")
        raw.driver_connection.commit()
    finally:
        raw.close()
    copied = timer.perf_counter()
    with engine.begin() as connection:
        connection.execute(sa.text("set local maintenance_work_mem = '512MB'"))
        for index in call_logs.indexes:
            index.create(connection)
        connection.execute(sa.text("insert into bench_meta values (:f)"), {"f": marker})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sa.text("vacuum (analyze) call_logs"))
    engine.dispose()
    done = timer.perf_counter()
    log.info(
        "schema %s: call logs copied in %.1f s, indexed and analysed in %.1f s", schema, copied - started, done - copied
    )
    return {
        "schema": schema,
        "loaded": True,
        "copy_seconds": round(copied - started, 1),
        "index_seconds": round(done - copied, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.generate", description="generate and load bench data")
    parser.add_argument("--sizes", default="1e4", help="comma-separated CRM row counts, e.g. 1e4,1e5")
    parser.add_argument("--load", action="store_true", help="also COPY the call logs into PostgreSQL")
    parser.add_argument("--force", action="store_true", help="regenerate even if cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for size in (config.parse_size(s) for s in args.sizes.split(",")):
        if args.force or not is_generated(size):
            print(json.dumps(generate(size)))
        if args.load:
            print(json.dumps(load_call_logs(size)))


if __name__ == "__main__":
    main()
