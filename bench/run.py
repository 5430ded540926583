"""The benchmark harness: ``python -m bench`` (quick) or ``python -m bench --full``.

It generates (or reuses) the data under ``bench/.data``, loads each size's call
logs into a PostgreSQL schema of its own (``bench_n1e4`` ...), runs every stage
in a fresh interpreter per size and repeat (:mod:`bench.stages`), then the
end-to-end ``dag.test()`` (:mod:`bench.end_to_end`, also in its own process), and
writes ``docs/benchmarks.md`` with the PNG charts. It measures the pipeline's own
code in ``include/callconv`` and the naive baselines, nothing else. Raw results go
to ``bench/.data/results.json``; ``--report-only`` rebuilds the report from them.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import config, generate

log = logging.getLogger("bench")

ALL_STAGES = (
    "read_validate",
    "normalise",
    "match",
    "write_file",
    "upload",
    "normalise_call_logs",
    "ledger_history",
    "end_to_end",
)
# Delivered keys of earlier days: none, just above what fits work_mem's hash (~40k), and more.
LEDGER_HISTORY_ROWS = (0, 50_000, 200_000)
HISTORY_SALES = 10_000
# Never normalised call-log rows; those above 10x the biggest --sizes are skipped (3.4 s at 100k).
CALL_LOG_NORMALISE_ROWS = (2_000, 10_000, 30_000, 100_000, 1_000_000)


def _python() -> str:
    return sys.executable


def _run_json(command: list[str], out: Path, timeout: float) -> tuple[dict | None, str]:
    """Run ``command``, which writes its JSON result to ``out``; the result, or None and why not.

    The command gets a process group of its own, so a timeout kills what it started too
    (end_to_end's sandbox).
    """
    process = subprocess.Popen(
        command,
        cwd=config.PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        cancel_queries(process.pid)
        out.unlink(missing_ok=True)
        return None, f"timed out after {timeout:.0f} s"
    text = out.read_text() if out.is_file() else ""
    out.unlink(missing_ok=True)
    if text.strip():
        return json.loads(text), ""
    tail = stderr.strip().splitlines()[-12:]
    log.warning("  failed (exit code %s): %s", process.returncode, "\n".join(line[:300] for line in tail))
    return None, " | ".join(tail[-3:])[-600:] or f"exit code {process.returncode}"


def _out_file() -> Path:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        return Path(handle.name)


def run_stage(stage: str, size: int, timeout: float = 3600, **extra) -> dict:
    """One measurement in a fresh interpreter; an ``error`` entry when it failed or timed out."""
    out = _out_file()
    command = [_python(), "-m", "bench.stages", stage, "--size", str(size), "--out", str(out)]
    for key, value in extra.items():
        command += [f"--{key}", str(value)]
    started = time.perf_counter()
    log.info("  %s n=%s ...", stage, config.size_label(size))
    result, error = _run_json(command, out, timeout)
    if result is None:
        return {"stage": stage, "size": size, "error": error}
    result["wall_seconds"] = round(time.perf_counter() - started, 2)
    log.info(
        "  %s n=%s: %.2f s, %s rows/s, peak RSS %.0f MB",
        stage,
        config.size_label(size),
        result["seconds"],
        result.get("rows_per_s"),
        result["peak_rss_mb"],
    )
    return result


def run_end_to_end(size: int, timeout: float) -> dict:
    """``python -m bench.end_to_end`` (one ``dag.test()`` of the day), its JSON kept under ``end_to_end``.

    A process of its own: it must set AIRFLOW_HOME before Airflow is imported. A failed
    DAG run still writes its JSON (state not success): that is a measurement, and a FAIL.
    """
    out = _out_file()
    command = [_python(), "-m", "bench.end_to_end", "--size", str(size), "--out", str(out)]
    log.info("  end_to_end n=%s ...", config.size_label(size))
    e2e, error = _run_json(command, out, timeout)
    if e2e is None:
        return {"stage": "end_to_end", "size": size, "error": error}
    log.info(
        "  end_to_end n=%s: %s in %.1f s, peak RSS %.0f MB",
        config.size_label(size),
        e2e["state"],
        e2e["dag_test_seconds"],
        e2e["peak_rss_mb"],
    )
    return {
        "stage": "end_to_end",
        "size": size,
        "rows": size,
        "seconds": e2e["dag_test_seconds"],
        "rows_per_s": round(size / e2e["dag_test_seconds"], 1) if e2e["dag_test_seconds"] else None,
        "rss_before_mb": e2e["rss"]["rss_at_start_mb"],
        "peak_rss_mb": e2e["peak_rss_mb"],
        "end_to_end": e2e,
    }


def cancel_queries(pid: int) -> None:
    """Cancel what a killed stage process left running in PostgreSQL (its application_name names it)."""
    import sqlalchemy as sa

    engine = sa.create_engine(config.pg_url(), hide_parameters=True)
    with engine.connect() as connection:
        connection.execute(
            sa.text("select pg_cancel_backend(pid) from pg_stat_activity where application_name = :name"),
            {"name": f"bench-stage-{pid}"},
        )
    engine.dispose()


# ------------------------------------------------------------------ database set-up


def _engine(schema: str):
    import sqlalchemy as sa

    return sa.create_engine(config.schema_url(schema), hide_parameters=True)


def _copy(engine, table: str, columns, path: Path | None = None, text: str | None = None) -> None:
    raw = engine.raw_connection()
    try:
        with raw.driver_connection.cursor() as cursor:
            sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv)"
            if path is not None:
                with path.open("rb") as handle:
                    cursor.copy_expert(sql, handle)
            else:
                cursor.copy_expert(sql, io.StringIO(text))
        raw.driver_connection.commit()
    finally:
        raw.close()


def prepare_match(size: int) -> None:
    """Fresh crm_sales for the day (COPY of the extract's good rows), no matches, empty ledger."""
    import sqlalchemy as sa

    engine = _engine(config.schema_name(size))
    with engine.begin() as connection:
        connection.execute(sa.text("truncate crm_sales, matches, upload_ledger"))
    _copy(engine, "crm_sales", generate.CRM_SALES_COLUMNS, path=generate.data_dir(size) / "crm_sales.csv")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sa.text("vacuum (analyze) crm_sales"))
    engine.dispose()


def seed_ledger_history(size: int, rows: int) -> None:
    """``rows`` conversions of the 90 days before, already uploaded, as months of daily runs leave them."""
    import sqlalchemy as sa

    if not rows:
        return
    engine = _engine(config.schema_name(size))
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "insert into upload_ledger (conversion_key, account_id, business_date, state, caller_e164, "
                "call_start, conversion_action_id, conversion_time, conversion_value, currency_code, attempts, "
                "run_id, delivered_at, delivered_by) "
                "select encode(sha256(convert_to('history|' || i, 'UTF8')), 'hex'), :account, "
                "date '2026-11-26' - (i % 90), 'uploaded', '+4670' || lpad((i % 10000000)::text, 7, '0'), "
                "timestamptz '2026-08-28' + i * interval '2 seconds', '555000111', "
                "timestamptz '2026-08-28' + i * interval '2 seconds' + interval '1 hour', 100, 'SEK', 1, "
                "'history', timestamptz '2026-11-26', 'api' from generate_series(1, :rows) as i"
            ),
            {"account": config.ACCOUNT_ID, "rows": rows},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sa.text("vacuum (analyze) upload_ledger"))
    engine.dispose()


def match_fingerprint(size: int) -> dict:
    """What matching wrote, as digests: a record of the run (same data and code, same digests)."""
    import sqlalchemy as sa

    engine = _engine(config.schema_name(size))
    with engine.connect() as connection:
        sales = connection.scalar(
            sa.text(
                "select md5(string_agg(concat_ws('|', sale_key, matched_call_id, conversion_key, unmatched_reason), "
                "',' order by sale_key)) from crm_sales"
            )
        )
        matches = connection.scalar(
            sa.text(
                "select md5(string_agg(concat_ws('|', conversion_key, source_call_id, conversion_value, sale_count, "
                "business_date), ',' order by conversion_key)) from matches"
            )
        )
        ledger = connection.scalar(sa.text("select count(*) from upload_ledger where state = 'pending'"))
    engine.dispose()
    return {"crm_sales": sales, "matches": matches, "pending": ledger}


def prepare_upload(rows: int) -> None:
    """Schema bench_upload: the sandbox's known calls and the first ``rows`` pending conversions."""
    import sqlalchemy as sa

    folder = generate.generate_upload()
    generate.ensure_schema(UPLOAD_SCHEMA)
    engine = _engine(UPLOAD_SCHEMA)
    with engine.begin() as connection:
        connection.execute(sa.text("truncate upload_ledger, call_logs"))
    _copy(engine, "call_logs", generate.CALL_LOG_COLUMNS, path=folder / "calls.csv")
    head = config.DATA_DIR / "upload_ledger_head.csv"
    with (folder / "upload_ledger.csv").open() as source, head.open("w") as target:
        target.writelines(itertools.islice(source, rows))
    _copy(engine, "upload_ledger", generate.LEDGER_COLUMNS, path=head)
    head.unlink()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sa.text("vacuum (analyze) upload_ledger"))
    engine.dispose()


def start_sandbox() -> tuple[subprocess.Popen, str, str]:
    """The project's sandbox CLI in its own process (its memory is not the upload's)."""
    from bench.stages import SANDBOX_ACCESS_TOKEN, SANDBOX_DEV_TOKEN, sandbox_now

    actions = [f"{spec['id']}:{spec['name']}" for spec in config.ACTIONS.values()]
    command = [
        _python(), "-m", "callconv.sandbox",
        "--customer", config.CUSTOMER_ID,
        *itertools.chain.from_iterable(("--action", a) for a in actions),
        "--calls-from-warehouse", config.schema_url(UPLOAD_SCHEMA),
        "--account", config.ACCOUNT_ID,
        "--now", sandbox_now().isoformat(),
        "--cert-dir", str(config.DATA_DIR / "sandbox"),
        "--developer-token", SANDBOX_DEV_TOKEN,
        "--access-token", SANDBOX_ACCESS_TOKEN,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(config.PROJECT_ROOT / "include")}
    process = subprocess.Popen(
        command, cwd=config.PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    endpoint = cert = ""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (endpoint and cert):
        line = process.stdout.readline()
        if not line:
            break
        if found := re.search(r"serving on (\S+)", line):
            endpoint = found.group(1)
        if found := re.search(r"GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=(\S+)", line):
            cert = found.group(1)
    if not (endpoint and cert):
        process.terminate()
        raise RuntimeError("the sandbox did not start")
    return process, endpoint, cert


def stop_sandbox(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def prepare_call_log_normalise(rows: int) -> None:
    """Schema bench_calllog_norm: the first ``rows`` call-log rows of the 1e5 data set, never normalised."""
    import sqlalchemy as sa

    source = 100_000 if rows <= 1_000_000 else rows // 10
    if not generate.is_generated(source):
        generate.generate(source)
    generate.ensure_schema(CALL_LOG_SCHEMA)
    engine = _engine(CALL_LOG_SCHEMA)
    with engine.begin() as connection:
        connection.execute(sa.text("truncate call_logs"))
    # caller_e164 and caller_parse_status left empty, as the telephony system delivers them.
    blanked = config.DATA_DIR / "call_logs_blanked.csv"
    with (generate.data_dir(source) / "call_logs.csv").open() as handle, blanked.open("w") as target:
        for line in itertools.islice(handle, rows):
            fields = line.split(",")
            target.write(",".join(fields[:3] + ["", ""] + fields[5:]))
    _copy(engine, "call_logs", generate.CALL_LOG_COLUMNS, path=blanked)
    blanked.unlink()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sa.text("vacuum (analyze) call_logs"))
    engine.dispose()


def call_log_digest() -> str:
    import sqlalchemy as sa

    engine = _engine(CALL_LOG_SCHEMA)
    with engine.connect() as connection:
        digest = connection.scalar(
            sa.text(
                "select md5(string_agg(concat_ws('|', source_call_id, caller_e164, caller_parse_status), ',' "
                "order by source_call_id)) from call_logs"
            )
        )
    engine.dispose()
    return digest


UPLOAD_SCHEMA = "bench_upload"
CALL_LOG_SCHEMA = "bench_calllog_norm"


def file_digest(size: int) -> str:
    folder = config.DATA_DIR / "export" / config.size_label(size)
    files = sorted(folder.rglob("*.csv"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16] if files else ""


# ------------------------------------------------------------------------ the run


def machine() -> dict:
    import platform

    import sqlalchemy as sa

    info: dict = {"nproc": os.cpu_count(), "python": platform.python_version()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = re.search(r"model name\s*:\s*(.+)", text).group(1).strip()
    except (OSError, AttributeError):
        info["cpu"] = platform.processor() or "unknown"
    try:
        total = re.search(r"MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text()).group(1)
        info["memory_gib"] = round(int(total) / 2**20, 1)
    except (OSError, AttributeError):
        info["memory_gib"] = None
    engine = sa.create_engine(config.pg_url(), hide_parameters=True)
    with engine.connect() as connection:
        info["postgresql"] = connection.scalar(sa.text("select version()")).split(" on ")[0]
        info["pg_settings"] = {
            name: connection.scalar(sa.text(f"show {name}"))
            for name in (
                "shared_buffers",
                "work_mem",
                "maintenance_work_mem",
                "max_parallel_workers_per_gather",
                "jit",
                "synchronous_commit",
            )
        }
    engine.dispose()
    from importlib.metadata import version

    info["packages"] = {
        name: version(name)
        for name in (
            "pandas",
            "numpy",
            "phonenumbers",
            "SQLAlchemy",
            "psycopg2-binary",
            "great-expectations",
            "google-ads",
            "grpcio",
            "matplotlib",
        )
    }
    return info


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        default=",".join(config.size_label(s) for s in config.QUICK_SIZES),
        help="CRM rows per size, comma-separated (default 1e4,1e5); call logs are 10x",
    )
    parser.add_argument("--full", action="store_true", help="sizes 1e4,1e5,1e6 (10^7 call rows at the top)")
    parser.add_argument("--stages", default=",".join(ALL_STAGES), help=f"subset of {','.join(ALL_STAGES)}")
    parser.add_argument("--repeat", type=int, default=3, help="runs per stage and size (1 at sizes >= 1e6)")
    parser.add_argument("--upload-sizes", default="1e4,5e4,1e5", help="conversions per upload run")
    parser.add_argument("--e2e-sizes", default="1e5", help="sales per end-to-end dag.test() run (once each)")
    parser.add_argument("--append", action="store_true", help="add to --results instead of starting afresh")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per stage run")
    parser.add_argument("--results", default=str(config.DATA_DIR / "results.json"))
    parser.add_argument("--out", default=str(config.DOCS_DIR / "benchmarks.md"))
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from --results")
    parser.add_argument("--drop-schemas", action="store_true", help="drop the bench_* schemas afterwards")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)

    from bench import report

    results_path = Path(args.results)
    if args.report_only:
        report.write(json.loads(results_path.read_text()), Path(args.out))
        return

    sizes = list(config.FULL_SIZES) if args.full else [config.parse_size(s) for s in args.sizes.split(",")]
    stages = set(args.stages.split(","))
    unknown = stages - set(ALL_STAGES)
    if unknown:
        parser.error(f"unknown stage(s): {', '.join(sorted(unknown))}")
    command = ("python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    previous = json.loads(results_path.read_text()) if args.append and results_path.is_file() else None
    run = {
        "command": command,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_before": _load(),
        "machine": machine(),
        "sizes": sizes,
        "repeat": args.repeat,
        "data": {},
        "loads": {},
        "results": [],
        "checks": {},
    }
    if previous:
        run = {**previous, "command": f"{previous['command']}\n.venv/bin/{command}"}
        run.pop("finished", None)
        earlier = run["results"]
        run["results"] = []
    config.DATA_DIR.mkdir(parents=True, exist_ok=True)
    results = run["results"]

    def key(result: dict) -> tuple:
        return (result.get("stage"), result.get("variant", ""), result.get("size"))

    def record(result: dict) -> dict:
        results.append(result)
        if previous:  # what this run measures again replaces the earlier results of the same key
            fresh = {key(r) for r in results}
            run["all"] = [r for r in earlier if key(r) not in fresh] + results
        results_path.write_text(json.dumps({**run, "results": run.get("all", results)}, indent=1, default=str))
        return result

    for size in sizes:
        label = config.size_label(size)
        repeat = 1 if size >= 1_000_000 else args.repeat
        log.info("size %s: %d CRM rows, %d call-log rows", label, size, size * config.CALLS_PER_SALE_ROW)
        if not generate.is_generated(size):
            generated = subprocess.run(
                [_python(), "-m", "bench.generate", "--sizes", str(size)],
                cwd=config.PROJECT_ROOT,
                check=True,
                capture_output=True,
                text=True,
            )
            log.info("  generated: %s", generated.stdout.strip().splitlines()[-1][:200])
        run["data"][label] = generate.read_meta(size)
        if stages & {"match", "write_file"}:
            run["loads"][label] = generate.load_call_logs(size)
            log.info("  call logs in PostgreSQL: %s", run["loads"][label])

        if "read_validate" in stages:
            for _ in range(repeat):
                record(run_stage("read_validate", size, timeout=args.timeout))
        if "normalise" in stages:
            for _ in range(repeat):
                record(run_stage("normalise", size, timeout=args.timeout))
                record(run_stage("normalise_phones", size, timeout=args.timeout))
                record(run_stage("normalise_naive", size, timeout=args.timeout))
        if stages & {"match", "write_file"}:
            # write_file writes what match_day left, so the day is matched first either way.
            for _ in range(repeat if "match" in stages else 1):
                prepare_match(size)
                result = run_stage("match", size, timeout=args.timeout)
                if "match" in stages:
                    record(result)
            run["checks"][f"match_tables_{label}"] = match_fingerprint(size)
            if "write_file" in stages:
                for _ in range(repeat):
                    record(run_stage("write_file", size, timeout=args.timeout))
                run["checks"][f"file_{label}"] = file_digest(size)
            if "match" in stages:
                for _ in range(repeat):
                    record(run_stage("match_pandas", size, timeout=args.timeout))

    if "normalise" in stages:
        probe = max(sizes)  # the biggest extract has the most distinct strings to draw from
        record(run_stage("phone_repeats", probe, timeout=args.timeout))

    if "upload" in stages:
        for rows in (config.parse_size(s) for s in args.upload_sizes.split(",")):
            prepare_upload(rows)
            sandbox, endpoint, cert = start_sandbox()
            try:
                record(run_stage("upload", rows, timeout=args.timeout, endpoint=endpoint, cert=cert))
            finally:
                stop_sandbox(sandbox)

    if "normalise_call_logs" in stages:
        for rows in CALL_LOG_NORMALISE_ROWS:
            if rows > max(sizes) * config.CALLS_PER_SALE_ROW:
                continue
            prepare_call_log_normalise(rows)
            record(run_stage("normalise_call_logs", rows, timeout=min(args.timeout, 900)))
            run["checks"][f"call_logs_{config.size_label(rows)}"] = call_log_digest()

    if "ledger_history" in stages:
        # Matching one day of HISTORY_SALES sales with months of uploaded conversions in the ledger:
        # the first run of the day, and a rerun of it (an Airflow retry, clear or backfill).
        size = HISTORY_SALES
        if not generate.is_generated(size):
            generate.generate(size)
        generate.load_call_logs(size)
        for history in LEDGER_HISTORY_ROWS:
            log.info("ledger history: %d uploaded conversions of earlier days", history)
            prepare_match(size)
            seed_ledger_history(size, history)
            tag = f"history{history}"
            first = run_stage("match", size, timeout=min(args.timeout, 300))
            record({**first, "stage": "match_history", "variant": tag, "history": history})
            again = run_stage("match", size, timeout=min(args.timeout, 300))
            record({**again, "stage": "match_rerun", "variant": tag, "history": history})

    if "end_to_end" in stages:
        for size in (config.parse_size(s) for s in args.e2e_sizes.split(",")):
            record(run_end_to_end(size, timeout=args.timeout))

    run["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    run["load_after"] = _load()
    if previous:
        fresh = {key(r) for r in results}
        run["results"] = [r for r in earlier if key(r) not in fresh] + results
        run.pop("all", None)
    results_path.write_text(json.dumps(run, indent=1, default=str))
    report.write(run, Path(args.out))
    log.info("wrote %s and %s", args.out, results_path)
    if args.drop_schemas:
        drop_schemas()


def drop_schemas() -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(config.pg_url(), hide_parameters=True)
    with engine.begin() as connection:
        names = connection.scalars(
            sa.text("select schema_name from information_schema.schemata where schema_name like 'bench\\_%'")
        ).all()
        for name in names:
            connection.execute(sa.text(f'drop schema "{name}" cascade'))
    engine.dispose()
    log.info("dropped schemas: %s", ", ".join(names) or "none")


def median(values):
    return statistics.median(values) if values else None


if __name__ == "__main__":
    main()
