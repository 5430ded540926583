"""One measurement per process: ``python -m bench.stages STAGE --size N --out result.json``.

The harness (:mod:`bench.run`) starts a fresh interpreter for every stage, size and
repeat, so each peak RSS (VmHWM, see :func:`_peak_mb`) is that stage's alone and
never carries over from a bigger run or from the harness. ``rss_before_mb`` is the resident
size just before the timed call (imports and set-up), so ``peak - before`` is what
the stage itself added. Set-up that the harness does in the database (loading
``crm_sales``, resetting tables) happens in the harness, not here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from datetime import time as dtime
from pathlib import Path

from bench import config

log = logging.getLogger(__name__)

RUN_ID = "bench-run"


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_mb() -> float:
    """This process's peak resident set size: VmHWM of /proc/self/status, in MB.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: on Linux that keeps the maximum over
    every memory map the process had, and a child started by vfork + exec (what
    subprocess does) begins with its parent's, so it reports the harness's peak
    whenever that is higher than the stage's own (measured: a child of a parent
    holding 800 MB reports 810 MB, VmHWM 10 MB). VmHWM belongs to the current map
    only. ru_maxrss is still recorded, as ``ru_maxrss_mb``.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _ru_maxrss_mb()


def _ru_maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class Timer:
    """Times the block and notes the RSS before it."""

    def __enter__(self) -> Timer:
        self.rss_before = _rss_mb()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started


def code_version() -> dict:
    """Which pipeline code was measured: a digest of include/callconv/**/*.py and its newest change.

    Other people change include/ while benchmarks run; results with different
    digests measured different code.
    """
    root = config.PROJECT_ROOT / "include" / "callconv"
    files = sorted(root.rglob("*.py"))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]
    newest = max(files, key=lambda f: f.stat().st_mtime)
    changed = datetime.fromtimestamp(newest.stat().st_mtime, UTC).isoformat(timespec="seconds")
    return {"digest": digest, "newest_file": str(newest.relative_to(root)), "newest_change": changed}


def _result(rows: int, timer: Timer, **extra) -> dict:
    return {
        "rows": rows,
        "seconds": round(timer.seconds, 4),
        "rows_per_s": round(rows / timer.seconds, 1) if timer.seconds else None,
        "rss_before_mb": round(timer.rss_before, 1),
        "peak_rss_mb": round(_peak_mb(), 1),
        "ru_maxrss_mb": round(_ru_maxrss_mb(), 1),
        **extra,
    }


def _engine(size: int | None = None, schema: str | None = None):
    import sqlalchemy as sa

    from callconv.warehouse import create_engine

    # Named after this process, so the harness can cancel its queries when it times out.
    url = sa.make_url(config.schema_url(schema or config.schema_name(size)))
    url = url.update_query_dict({"application_name": f"bench-stage-{os.getpid()}"})
    return create_engine(url.render_as_string(hide_password=False))


def _statement_log(engine) -> dict:
    """Per-statement wall time, keyed by the statement's first words; executemany marked."""
    import sqlalchemy as sa

    totals: dict[str, list] = defaultdict(lambda: [0, 0.0, 0])

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _before(conn, cursor, statement, parameters, context, executemany):
        conn.info.setdefault("bench_started", []).append(time.perf_counter())

    @sa.event.listens_for(engine, "after_cursor_execute")
    def _after(conn, cursor, statement, parameters, context, executemany):
        elapsed = time.perf_counter() - conn.info["bench_started"].pop()
        words = " ".join(statement.split()[:4])
        label = (words[:48] + (" [executemany]" if executemany else "")).strip()
        entry = totals[label]
        entry[0] += 1
        entry[1] += elapsed
        entry[2] += len(parameters) if executemany and isinstance(parameters, list | tuple) else 1

    return totals


def _statements(totals: dict) -> list[dict]:
    ranked = sorted(totals.items(), key=lambda item: -item[1][1])
    return [
        {"statement": label, "calls": calls, "param_sets": sets, "seconds": round(seconds, 3)}
        for label, (calls, seconds, sets) in ranked[:12]
    ]


# ------------------------------------------------------------------------- stages


def stage_read_validate(size: int, **_) -> dict:
    import great_expectations  # noqa: F401 - a one-off import per process, not per extract

    from bench.generate import crm_file
    from callconv.intake.extract import read_crm_file
    from callconv.intake.validate import validate_extract

    settings = config.settings()
    account = settings.accounts[0]
    path = crm_file(size)
    with Timer() as timer:
        extract = read_crm_file(path, settings.crm_source)
        read_seconds = time.perf_counter() - timer.started
        report = validate_extract(
            extract.frame,
            known_outcomes=set(account.conversion_actions),
            decimal=settings.crm_source.decimal,
            rules=settings.validation,
        )
    return _result(
        len(extract.frame),
        timer,
        read_seconds=round(read_seconds, 3),
        validate_seconds=round(timer.seconds - read_seconds, 3),
        bad_rows=report.bad_row_count,
        reason_counts=report.reason_counts,
    )


def _crm_frame(size: int):
    from bench.generate import crm_file
    from callconv.intake.extract import read_crm_file

    return read_crm_file(crm_file(size), config.settings().crm_source).frame


def stage_normalise(size: int, **_) -> dict:
    """intake.normalise_sales over the extract (all rows: the planted bad ones get reasons)."""
    from callconv.intake.take_in import normalise_sales

    settings = config.settings()
    account = settings.accounts[0]
    frame = _crm_frame(size)
    _, window_end = config.day_window()
    with Timer() as timer:
        sales, rejected = normalise_sales(frame, account, settings, window_end)
    return _result(
        len(frame),
        timer,
        sales=len(sales),
        rejected=len(rejected),
        distinct_phone_strings=int(frame["caller_phone"].astype(str).str.strip().nunique()),
    )


def stage_normalise_phones(size: int, **_) -> dict:
    """normalise.normalise_phones alone, and both naive loops on the same values.

    The naive loops run in the same process, so the ratios (``ratio_vs_*``, what the
    normalisation target is judged on) hold even when other work slows the machine
    between processes. Each function's first pass pays the process's one-time costs
    (phonenumbers loads a region's metadata on first use, and whichever ran second got
    that free; the fast path compiles its tables) and is reported apart, as
    ``first_pass_*``. The ratios are of the per-row work after it: the best of three
    passes below 10^6 rows, where a pass takes milliseconds and any pause shows.
    """
    from callconv.intake import normalise

    raw = _crm_frame(size)["caller_phone"]
    values = raw.tolist()

    phones = None

    def ours() -> float:
        nonlocal phones
        normalise.clear_phone_cache()  # each pass parses every distinct string afresh
        started = time.perf_counter()
        phones = normalise.normalise_phones(raw, config.HOME_REGION)
        return time.perf_counter() - started

    def timed(loop) -> Callable[[], float]:
        def run() -> float:
            started = time.perf_counter()
            loop(values, config.HOME_REGION)
            return time.perf_counter() - started

        return run

    passes = {"ours": ours, "parse_format": timed(naive_parse_format), "parse_valid_format": timed(naive_normalise)}
    timer = Timer()
    timer.rss_before = _rss_mb()
    first = {name: run() for name, run in passes.items()}
    repeats = 3 if size < 1_000_000 else 1
    best = {name: min(run() for _ in range(repeats)) for name, run in passes.items()}
    timer.seconds = best["ours"]
    extra = {"passes": repeats, "first_pass_seconds": round(first["ours"], 4)}
    extra["first_pass_ratio"] = round(first["parse_format"] / first["ours"], 2)
    for name in ("parse_format", "parse_valid_format"):
        extra[f"naive_{name}_first_pass_seconds"] = round(first[name], 4)
        extra[f"naive_{name}_seconds"] = round(best[name], 4)
        extra[f"ratio_vs_{name}"] = round(best[name] / best["ours"], 2)
    extra["phone_paths"] = _phone_paths(raw)
    return _result(len(raw), timer, phones_ok=int(phones["reason"].isna().sum()), **extra)


def _phone_paths(raw) -> dict:
    """How many distinct numbers (as phonenumbers is given them) the fast path answers, and how many fall back."""
    from callconv.intake import normalise
    from callconv.intake.phone_fast import read_plain

    texts = {normalise._fold(key) for key in normalise._keys(raw).unique().tolist() if key}
    fast = sum(read_plain(text, config.HOME_REGION) is not None for text in texts)
    return {"distinct_texts": len(texts), "fast_path": fast, "fallback": len(texts) - fast}


def _naive_loop(values, region: str, validate: bool) -> list:
    import phonenumbers

    out = []
    for raw in values:
        if raw is None or raw != raw:  # None or NaN
            out.append(None)
            continue
        try:
            number = phonenumbers.parse(raw, region)
        except phonenumbers.NumberParseException:
            out.append(None)
            continue
        if validate and not phonenumbers.is_valid_number(number):
            out.append(None)
            continue
        out.append(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))
    return out


def naive_parse_format(values, region: str) -> list:
    """The issue's baseline: parse and format every row, repeats included; no validation."""
    return _naive_loop(values, region, validate=False)


def naive_normalise(values, region: str) -> list:
    """The stricter baseline: parse, validate and format every row, repeats included."""
    return _naive_loop(values, region, validate=True)


def stage_normalise_naive(size: int, **_) -> dict:
    """The naive loops. ``seconds``/``rows_per_s`` are parse + format, the issue's baseline and
    what the report divides by; parse + validate + format is reported beside it."""
    frame = _crm_frame(size)
    values = frame["caller_phone"].tolist()
    with Timer() as timer:
        parsed = naive_parse_format(values, config.HOME_REGION)
    started = time.perf_counter()
    valid = naive_normalise(values, config.HOME_REGION)
    strict = time.perf_counter() - started
    return _result(
        len(values),
        timer,
        baseline="parse+format",
        phones_ok=sum(p is not None for p in parsed),
        parse_valid_format_seconds=round(strict, 4),
        parse_valid_format_rows_per_s=round(len(values) / strict, 1) if strict else None,
        parse_valid_format_phones_ok=sum(p is not None for p in valid),
    )


def stage_phone_repeats(size: int, **_) -> dict:
    """normalise_phones vs the naive loops on 100k rows drawn from fewer or more distinct strings.

    ``naive_rows_per_s`` and ``ratio`` are parse + format (the issue's baseline);
    the ``*_valid`` pair is parse + validate + format.
    """
    import numpy as np
    import pandas as pd

    from callconv.intake.normalise import clear_phone_cache, normalise_phones

    frame = _crm_frame(size)
    pool = frame["caller_phone"].dropna().astype(str).str.strip().unique()
    normalise_phones(pd.Series(pool), config.HOME_REGION)  # one-time loading, as in stage_normalise_phones
    naive_parse_format(pool.tolist(), config.HOME_REGION)
    rng = np.random.default_rng(5)
    rows = 100_000
    points = []
    for share in (1.0, 0.8, 0.5, 0.3, 0.2, 0.1):
        distinct = max(1, int(rows * share))
        if distinct > len(pool):
            continue
        chosen = pool[rng.choice(len(pool), distinct, replace=False)]
        sample = pd.Series(np.concatenate([chosen, chosen[rng.integers(0, distinct, rows - distinct)]]))
        rng.shuffle(sample.values)
        values = sample.tolist()
        clear_phone_cache()  # no point may reuse an earlier point's parses
        started = time.perf_counter()
        normalise_phones(sample, config.HOME_REGION)
        ours = time.perf_counter() - started
        started = time.perf_counter()
        naive_parse_format(values, config.HOME_REGION)
        naive = time.perf_counter() - started
        started = time.perf_counter()
        naive_normalise(values, config.HOME_REGION)
        naive_valid = time.perf_counter() - started
        points.append(
            {
                "distinct_share": share,
                "rows": rows,
                "normalise_rows_per_s": round(rows / ours, 1),
                "naive_rows_per_s": round(rows / naive, 1),
                "ratio": round(naive / ours, 2),
                "naive_valid_rows_per_s": round(rows / naive_valid, 1),
                "ratio_valid": round(naive_valid / ours, 2),
            }
        )
    timer = Timer()
    timer.rss_before, timer.seconds = _rss_mb(), 1.0
    return _result(rows, timer, points=points)


def stage_match(size: int, **_) -> dict:
    from callconv.matching.match import match_day

    settings = config.settings()
    account = settings.accounts[0]
    engine = _engine(size)
    totals = _statement_log(engine)
    with Timer() as timer:
        outcome = match_day(
            engine,
            account.id,
            config.BUSINESS_DATE,
            settings.match_rules(account),
            RUN_ID,
            keys=config.pseudonym_keys(),
        )
    engine.dispose()
    return _result(outcome.sales, timer, outcome=outcome.as_counts(), statements=_statements(totals))


def stage_match_pandas(size: int, **_) -> dict:
    """The baseline: pull the whole call log and the day's sales into pandas, then merge_asof."""
    import pandas as pd
    import sqlalchemy as sa

    settings = config.settings()
    rules = settings.match
    engine = _engine(size)
    with Timer() as timer:
        with engine.connect() as connection:
            calls = pd.read_sql_query(
                sa.text(
                    "select caller_e164, call_start, source_call_id, duration_seconds, via_google_forwarding "
                    "from call_logs where account_id = :a"
                ),
                connection,
                params={"a": config.ACCOUNT_ID},
            )
            sales = pd.read_sql_query(
                sa.text(
                    "select sale_key, caller_e164, conversion_time from crm_sales "
                    "where account_id = :a and business_date = :d"
                ),
                connection,
                params={"a": config.ACCOUNT_ID, "d": config.BUSINESS_DATE},
            )
        pulled = time.perf_counter() - timer.started
        # read_sql_query leaves a column of mixed-offset timestamps as objects; merge_asof needs one dtype.
        calls["call_start"] = pd.to_datetime(calls["call_start"], utc=True)
        sales["conversion_time"] = pd.to_datetime(sales["conversion_time"], utc=True)
        calls = calls[calls["via_google_forwarding"] & (calls["duration_seconds"] >= rules.min_duration_seconds)]
        calls = calls.dropna(subset=["caller_e164"]).sort_values("call_start")
        sales = sales.dropna(subset=["caller_e164"]).sort_values("conversion_time")
        matched = pd.merge_asof(
            sales,
            calls,
            left_on="conversion_time",
            right_on="call_start",
            by="caller_e164",
            direction="backward",
            allow_exact_matches=False,
            tolerance=pd.Timedelta(days=rules.window_days),
        )
    engine.dispose()
    call_rows = len(calls)
    return _result(
        len(sales),
        timer,
        pull_seconds=round(pulled, 3),
        merge_seconds=round(timer.seconds - pulled, 3),
        matched=int(matched["source_call_id"].notna().sum()),
        eligible_calls=call_rows,
    )


def stage_write_file(size: int, **_) -> dict:
    from callconv.delivery.conversion_file import write_conversion_file

    settings = config.settings()
    account = settings.accounts[0]
    engine = _engine(size)
    export_root = config.DATA_DIR / "export" / config.size_label(size)
    with Timer() as timer:
        written = write_conversion_file(engine, account, config.BUSINESS_DATE, export_root)
    engine.dispose()
    return _result(written.rows, timer, bytes=Path(written.path).stat().st_size)


def stage_upload(size: int, endpoint: str = "", cert: str = "", **_) -> dict:
    from callconv.delivery.ads_client import client_from_settings
    from callconv.delivery.upload import upload_pending

    settings = config.settings()
    account = settings.accounts[0]
    engine = _engine(schema=UPLOAD_SCHEMA)
    client = client_from_settings(
        {
            "developer_token": SANDBOX_DEV_TOKEN,
            "access_token": SANDBOX_ACCESS_TOKEN,
            "endpoint": endpoint,
            "ssl_roots_file": cert,
        }
    )
    _, window_end = config.day_window()
    window_end = window_end + timedelta(days=1)
    with Timer() as timer:
        outcome = upload_pending(engine, account, client, window_end, RUN_ID)
    engine.dispose()
    return _result(
        outcome.sent,
        timer,
        selected=outcome.selected,
        batches=outcome.batches,
        accepted=outcome.accepted,
        failed=dict(outcome.failed),
        parked=dict(outcome.parked),
    )


def stage_normalise_call_logs(size: int, **_) -> dict:
    """call_logs.normalise_call_logs over ``size`` never normalised call-log rows (loaded by the harness)."""
    from callconv.matching.call_logs import normalise_call_logs

    engine = _engine(schema=CALL_LOG_SCHEMA)
    start, end = config.day_window()
    totals = _statement_log(engine)
    with Timer() as timer:
        counts = normalise_call_logs(engine, config.ACCOUNT_ID, config.HOME_REGION, start, end, timedelta(days=45))
    engine.dispose()
    return _result(counts["rows"], timer, counts=counts, statements=_statements(totals))


UPLOAD_SCHEMA = "bench_upload"
CALL_LOG_SCHEMA = "bench_calllog_norm"
SANDBOX_DEV_TOKEN = "bench-dev-token"
SANDBOX_ACCESS_TOKEN = "bench-access-token"

STAGES = {
    "read_validate": stage_read_validate,
    "normalise": stage_normalise,
    "normalise_naive": stage_normalise_naive,
    "normalise_phones": stage_normalise_phones,
    "phone_repeats": stage_phone_repeats,
    "match": stage_match,
    "match_pandas": stage_match_pandas,
    "write_file": stage_write_file,
    "upload": stage_upload,
    "normalise_call_logs": stage_normalise_call_logs,
}


def sandbox_now() -> datetime:
    """The sandbox's clock: two days after the business day, at noon local."""
    from zoneinfo import ZoneInfo

    return datetime.combine(config.BUSINESS_DATE + timedelta(days=2), dtime(12), tzinfo=ZoneInfo(config.TIMEZONE))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stages")
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--size", type=config.parse_size, required=True)
    parser.add_argument("--endpoint", default="")
    parser.add_argument("--cert", default="")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    started = datetime.now(UTC)
    code = code_version()
    result = STAGES[args.stage](args.size, endpoint=args.endpoint, cert=args.cert)
    result.update(
        {
            "stage": args.stage,
            "size": args.size,
            "pid": os.getpid(),
            "started": started.isoformat(timespec="seconds"),
            "code": code,
        }
    )
    Path(args.out).write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
