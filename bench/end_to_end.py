"""End to end: one ``dag.test()`` of the import DAG for one day, on PostgreSQL, timed.

Why: the issue's target is "an end-to-end ``dag.test()`` run of one day with
10^5 sales in under 3 minutes" on a 2-core machine. The stage benchmarks
(:mod:`bench.stages`) time each function alone; this runs the real DAG
(``dags/call_conversion_import.py``) through Airflow's own ``dag.test()``,
in-process, exactly as ``tests/integration/test_import_dag.py`` does, so the
number includes everything a run does: the freshness sensor, normalising the
call logs, reading + validating (Great Expectations) + normalising + storing the
CRM extract, encrypted archive and quarantine export, matching, the encrypted
conversion file, the upload through the real google-ads client over TLS to the
project's sandbox, the anomaly check, and Airflow's own bookkeeping.

Run it (PostgreSQL of ``make test``: 127.0.0.1:5432, database ``test``, user ``postgres``;
``BENCH_WAREHOUSE_URL`` points elsewhere)::

    .venv/bin/python -m bench.end_to_end                      # 10^5 sales
    .venv/bin/python -m bench.end_to_end --size 1e4 --out /tmp/e2e-1e4.json
    .venv/bin/python -m bench.end_to_end --call-logs steady   # only the day's calls left to normalise

What it sets up (none of it is timed), idempotently, every run:

* **Data**: the generator's day (:mod:`bench.generate`, ``bench/.data/n<size>/``; generated
  if missing): the Swedish CRM extract (``n`` rows, about 3% bad) is copied into the landing
  folder; the ``10 n`` call-log rows over 40 days are COPYed into ``call_logs`` of schema
  ``bench_e2e`` (dropped, created, migrated with ``callconv.warehouse.migrate``). With
  ``--call-logs raw`` (the default) they are loaded as a telephony export leaves them,
  ``caller_e164`` and ``caller_parse_status`` empty, so the DAG's ``normalise_call_logs``
  parses every one of them (the first run of an account: the 60-day lookback covers all
  40 days). With ``--call-logs steady`` the pipeline's own ``normalise_call_logs`` first
  runs (untimed) for the day before, as yesterday's run would have, so the measured run
  only normalises the business day's calls. The table is then ``VACUUM ANALYZE``d, as
  autovacuum would have done to a table that size.
* **Config**: :func:`bench.config.settings_dict` (the bench account ``bench_se``,
  Europe/Stockholm, the project's CRM columns) with every folder under the work dir,
  ``encryption.required: true`` and a Tink keyset freshly generated into the work dir and
  passed in ``CALL_CONVERSIONS_ENCRYPTION_KEYS`` (as ``tests/integration/conftest.py``
  does), so every stored file is encrypted as in production. Upload batch size and
  concurrency are the production defaults.
* **Google Ads**: the project's sandbox (``callconv.sandbox.SandboxServer``, TLS with a
  test certificate) in a child process of its own (``--serve-sandbox``), knowing every
  forwarded call of the generator by its true E.164 caller, its clock two days after
  the business day. The DAG reaches it through ``AIRFLOW_CONN_GOOGLE_ADS_DEFAULT``.
* **Airflow**: its own home (``--airflow-home``, default ``/tmp/bench-e2e-airflow``,
  removed and ``airflow db migrate``d each run; SQLite metadata DB), the project's
  ``dags/`` folder, connections as ``AIRFLOW_CONN_*`` environment variables.

What it measures: the wall time of ``dag.test(logical_date=<day after, local midnight>)``
(whose data interval must be the account-local business day), each task instance's
duration and the seconds each stage recorded in ``run_summary``, the counts (sales
read, quarantined, matched, conversions, uploaded; cross-checked against the tables
and the sandbox), and the process's peak RSS: ``VmHWM`` from ``/proc/self/status``,
reset through ``/proc/self/clear_refs`` just before ``dag.test()``, so it is the
run's peak (tasks run in this process under ``dag.test()``), not the set-up's.
The sandbox's own peak RSS is reported apart. The DAG run's log goes to
``<work-dir>/dag_test.log``; the JSON result to stdout and ``--out``.

To find where the time goes: ``--statements`` times every warehouse statement (a
SQLAlchemy cursor-execute listener, PostgreSQL only) and reports them by task and
statement shape; ``--profile PATH`` runs ``dag.test()`` under cProfile with a wall-clock
timer (stats to PATH, the top functions in the result; it slows Python-heavy code).
Neither is on by default, so the plain run is the measurement.

Caveats, stated in the result too: ``dag.test()`` runs the tasks one after another
in one process, so the CRM intake and the call-log normalisation, which a scheduler
could run side by side, are serial here; and the result records the load average,
since other benchmarks on the same two cores slow this one down.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from datetime import time as dtime
from pathlib import Path

from bench import config, generate

SCHEMA = "bench_e2e"
WORK_DIR = Path("/tmp/bench-e2e")
AIRFLOW_HOME = Path("/tmp/bench-e2e-airflow")
WAREHOUSE_CONN_ID = "bench_e2e_warehouse"
TARGET_SECONDS = 180.0  # the target for 10^5 sales; never lowered here
RAW_CALL_COLUMNS = tuple(c for c in generate.CALL_LOG_COLUMNS if c not in ("caller_e164", "caller_parse_status"))
STAGES = ("intake", "call_logs", "match", "conversion_file", "upload")


# ----------------------------------------------------------------------------- helpers


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM (kB) of a process, from /proc."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def reset_peak_rss() -> bool:
    """Set VmHWM back to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def code_digest() -> dict:
    """Which pipeline and DAG code was measured (include/ and dags/ change while others work)."""
    digest = hashlib.sha256()
    newest = 0.0
    files = sorted((config.PROJECT_ROOT / "include" / "callconv").rglob("*.py"))
    files += sorted((config.PROJECT_ROOT / "dags").glob("*.py"))
    for path in files:
        digest.update(str(path.relative_to(config.PROJECT_ROOT)).encode())
        digest.update(path.read_bytes())
        newest = max(newest, path.stat().st_mtime)
    return {
        "sha256": digest.hexdigest()[:16],
        "files": len(files),
        "newest_change": datetime.fromtimestamp(newest, UTC).isoformat(timespec="seconds"),
    }


def local_midnight(day) -> datetime:
    from zoneinfo import ZoneInfo

    return datetime.combine(day, dtime(0), tzinfo=ZoneInfo(config.TIMEZONE))


def sandbox_now() -> datetime:
    """The sandbox's clock: two days after the business day, at noon local (as bench.stages)."""
    return local_midnight(config.BUSINESS_DATE + timedelta(days=2)) + timedelta(hours=12)


def log(message: str) -> None:
    print(f"[bench.end_to_end {datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ set-up


def ensure_data(size: int) -> dict:
    if not generate.is_generated(size):
        log(f"generating the n={config.size_label(size)} data set (once; cached in bench/.data)")
        generate.generate(size)
    return generate.read_meta(size)


def prepare_files(size: int, work: Path) -> dict:
    """Fresh work dir: the landing folder with the day's extract, the config, the Tink keyset."""
    from callconv.protection.sealed import keyset_to_json, new_keyset

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    day = config.BUSINESS_DATE
    landing = work / "landing"
    folder = landing / config.ACCOUNT_ID / day.isoformat()
    folder.mkdir(parents=True)
    extract = generate.crm_file(size)
    # A copy, not a link: intake archives the file (encrypted) and removes it from landing.
    shutil.copyfile(extract, folder / extract.name)

    raw = config.settings_dict(landing_uri=str(landing), export_uri=str(work / "export"))
    raw.update(
        warehouse_conn_id=WAREHOUSE_CONN_ID,
        google_ads_conn_id="google_ads_default",
        data_docs_uri=str(work / "data_docs"),
        archive_uri=str(work / "archive"),
        quarantine_uri=str(work / "quarantine"),
        encryption={"keys_conn_id": "bench_e2e_encryption", "required": True},
        # The generator's last call of the day starts at 23:59:57 local; a production-like grace.
        freshness={"grace_minutes": 60, "poke_minutes": 10, "timeout_hours": 12},
    )
    import yaml

    from callconv.config import parse_settings

    parse_settings(raw, source="bench.end_to_end")  # fail here, not inside a task
    config_path = work / "call_conversions.yaml"
    config_path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")

    keyset = new_keyset()
    key_path = work / "keyset.json"
    key_path.touch(mode=0o600)
    key_path.write_text(keyset_to_json(keyset))
    return {"config": config_path, "keyset_path": key_path, "keyset": keyset, "landing_file": folder / extract.name}


def prepare_schema(size: int, call_logs_mode: str) -> tuple[str, dict]:
    """Drop and recreate the schema, migrate it, load the call logs; the schema's URL and timings."""
    import sqlalchemy as sa

    from callconv.warehouse import migrate

    timings = {}
    started = time.perf_counter()
    admin = sa.create_engine(config.pg_url(), hide_parameters=True)
    with admin.begin() as connection:
        connection.execute(sa.text(f'drop schema if exists "{SCHEMA}" cascade'))
        connection.execute(sa.text(f'create schema "{SCHEMA}"'))
    admin.dispose()
    url = config.schema_url(SCHEMA)
    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)
    migrate(url)
    timings["migrate"] = round(time.perf_counter() - started, 2)

    started = time.perf_counter()
    engine = sa.create_engine(url, hide_parameters=True)
    raw = engine.raw_connection()
    try:
        connection = raw.driver_connection
        with connection.cursor() as cursor:
            # The generator's file carries the true E.164 caller; the warehouse gets the raw export only.
            cursor.execute("create temporary table call_logs_csv (like call_logs) on commit drop")
            with (generate.data_dir(size) / "call_logs.csv").open("rb") as handle:
                cursor.copy_expert(
                    f"COPY call_logs_csv ({', '.join(generate.CALL_LOG_COLUMNS)}) FROM STDIN WITH (FORMAT csv)",
                    handle,
                )
            columns = ", ".join(RAW_CALL_COLUMNS)
            cursor.execute(f"insert into call_logs ({columns}) select {columns} from call_logs_csv")
        connection.commit()
    finally:
        raw.close()
    timings["copy_call_logs"] = round(time.perf_counter() - started, 2)

    prior = None
    if call_logs_mode == "steady":
        from callconv.matching.call_logs import normalise_call_logs

        started = time.perf_counter()
        day_start = local_midnight(config.BUSINESS_DATE)
        # Yesterday's run, with the DAG's lookback (twice the 30-day match window).
        prior = normalise_call_logs(
            engine,
            config.ACCOUNT_ID,
            config.HOME_REGION,
            day_start - timedelta(days=1),
            day_start,
            timedelta(days=2 * config.settings_dict()["match"]["window_days"]),
        )
        timings["prior_normalise"] = round(time.perf_counter() - started, 2)

    started = time.perf_counter()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sa.text("vacuum (analyze) call_logs"))
        rows = connection.scalar(sa.text("select count(*) from call_logs"))
        pending = connection.scalar(sa.text("select count(*) from call_logs where caller_parse_status is null"))
        latest = connection.scalar(sa.text("select max(call_start) from call_logs"))
    engine.dispose()
    timings["analyze"] = round(time.perf_counter() - started, 2)
    return url, {
        "timings": timings,
        "call_log_rows": rows,
        "call_log_rows_unnormalised": pending,
        "latest_call_start": latest.isoformat() if latest else None,
        "prior_normalise": prior,
    }


def start_sandbox(size: int, work: Path) -> tuple[subprocess.Popen, dict]:
    """The sandbox in its own process; returns it and its first line (endpoint, certificate)."""
    command = [
        sys.executable,
        "-m",
        "bench.end_to_end",
        "--serve-sandbox",
        str(generate.data_dir(size) / "call_logs.csv"),
        "--sandbox-cert-dir",
        str(work / "sandbox"),
    ]
    process = subprocess.Popen(
        command, cwd=config.PROJECT_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    line = process.stdout.readline()
    if not line:
        process.wait(timeout=30)
        raise RuntimeError(f"the sandbox did not start (exit code {process.returncode})")
    return process, json.loads(line)


def stop_sandbox(process: subprocess.Popen) -> dict:
    """Ask the sandbox what it accepted, then let it stop."""
    try:
        process.stdin.write("stop\n")
        process.stdin.flush()
        line = process.stdout.readline()
        process.wait(timeout=30)
        return json.loads(line) if line else {"error": f"no answer (exit code {process.returncode})"}
    except (OSError, subprocess.TimeoutExpired, ValueError) as error:
        process.kill()
        process.wait()
        return {"error": f"{type(error).__name__}: {error}"}


def serve_sandbox(calls_csv: str, cert_dir: str) -> None:
    """Child process: Google Ads as the sandbox, knowing every forwarded call by its true caller."""
    import csv

    from callconv.sandbox.server import SandboxServer, customers_from_settings

    started = time.perf_counter()
    calls = []
    with open(calls_csv, newline="") as handle:
        for row in csv.reader(handle):
            # account, id, number, caller_e164, status, call_start, duration, dialled, forwarded
            if row[8] == "true" and row[3]:
                calls.append((row[3], datetime.fromisoformat(row[5])))
    server = SandboxServer(
        customers=customers_from_settings(config.settings()),
        calls=calls,
        clock=sandbox_now,
        cert_dir=cert_dir,
    ).start()
    known = len(calls)
    del calls
    settings = server.client_settings()
    print(
        json.dumps({**settings, "known_calls": known, "load_seconds": round(time.perf_counter() - started, 2)}),
        flush=True,
    )
    sys.stdin.readline()  # the parent writes a line (or dies) when the run is over
    accepted = server.accepted()
    print(
        json.dumps(
            {
                "accepted": len(accepted),
                "requests": len(server.requests),
                "peak_rss_mb": round(proc_status()["VmHWM"] / 1024, 1),
            }
        ),
        flush=True,
    )
    server.stop()


def airflow_environment(work: Path, airflow_home: Path, url: str, sandbox: dict, files: dict) -> dict:
    from callconv.config import CONFIG_ENV_VAR
    from callconv.delivery.ads_client import SSL_ROOTS_ENV_VAR
    from callconv.protection.sealed import KEYSET_ENV_VAR as DEFAULT_KEYS_ENV_VAR

    return {
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(config.PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(config.PROJECT_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        CONFIG_ENV_VAR: str(files["config"]),
        DEFAULT_KEYS_ENV_VAR: files["keyset_path"].read_text(),
        SSL_ROOTS_ENV_VAR: sandbox["ssl_roots_file"],
        f"AIRFLOW_CONN_{config.PSEUDONYM_CONN_ID.upper()}": config.PSEUDONYM_CONNECTION,
        f"AIRFLOW_CONN_{WAREHOUSE_CONN_ID.upper()}": json.dumps(
            {"conn_type": "generic", "extra": {"sqlalchemy_url": url}}
        ),
        "AIRFLOW_CONN_GOOGLE_ADS_DEFAULT": json.dumps(
            {
                "conn_type": "google_ads",
                "extra": {"sandbox": True, **{k: v for k, v in sandbox.items() if k in SANDBOX_SETTINGS}},
            }
        ),
    }


SANDBOX_SETTINGS = ("developer_token", "access_token", "endpoint", "ssl_roots_file")


def migrate_airflow(airflow_home: Path) -> float:
    shutil.rmtree(airflow_home, ignore_errors=True)
    airflow_home.mkdir(parents=True)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        cwd=config.PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return round(time.perf_counter() - started, 2)


# ------------------------------------------------------------------------- the run


class _Redirected:
    """Send this process's stdout and stderr (fds 1 and 2: task logs, prints) to a file."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        self._file = open(self.path, "wb")  # closed in __exit__
        os.dup2(self._file.fileno(), 1)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *_):
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._file.close()


class StatementTimer:
    """Wall time of every warehouse (PostgreSQL) statement the run executes, by statement shape.

    A class-level listener on SQLAlchemy's Engine, so it sees the engines the tasks create;
    Airflow's own metadata DB (SQLite) is left out. Statements are given to the task whose
    run covers their start.
    """

    def __init__(self):
        self.records: list[tuple[float, float, str]] = []

    def install(self) -> None:
        import sqlalchemy as sa

        sa.event.listen(sa.engine.Engine, "before_cursor_execute", self._before)
        sa.event.listen(sa.engine.Engine, "after_cursor_execute", self._after)

    def _before(self, conn, cursor, statement, parameters, context, executemany):
        if conn.dialect.name == "postgresql":
            conn.info.setdefault("_bench_started", []).append(time.perf_counter())

    def _after(self, conn, cursor, statement, parameters, context, executemany):
        started = conn.info.get("_bench_started")
        if conn.dialect.name != "postgresql" or not started:
            return
        begin = started.pop()
        shape = " ".join(statement.split())
        if " IN (" in shape:
            shape = shape[: shape.index(" IN (") + 5] + "...)"
        shape = shape[:140] + (" (executemany)" if executemany else "")
        self.records.append((begin, time.perf_counter() - begin, shape))

    def by_task(self, tis: list[dict], run_started: float, run_seconds: float, top: int = 8) -> dict:
        out: dict[str, dict] = {}
        for begin, seconds, shape in self.records:
            offset = begin - run_started
            if offset > run_seconds:
                continue  # this module's own queries after the run
            task = next(
                (
                    t["task_id"]
                    for t in tis
                    if t["start_offset_seconds"] is not None
                    and t["start_offset_seconds"] - 0.05 <= offset <= (t["end_offset_seconds"] or 1e9) + 0.05
                ),
                "(outside tasks)",
            )
            entry = out.setdefault(task, {"statements": 0, "seconds": 0.0, "shapes": {}})
            entry["statements"] += 1
            entry["seconds"] += seconds
            shape_entry = entry["shapes"].setdefault(shape, [0, 0.0])
            shape_entry[0] += 1
            shape_entry[1] += seconds
        for entry in out.values():
            entry["seconds"] = round(entry["seconds"], 2)
            ranked = sorted(entry["shapes"].items(), key=lambda item: -item[1][1])[:top]
            entry["shapes"] = [{"sql": sql, "count": n, "seconds": round(sec, 2)} for sql, (n, sec) in ranked]
        return out


def run_dag(work: Path, profile: str | None = None, statements: StatementTimer | None = None) -> dict:
    """Build the account's DAG and time ``dag.test()`` for the business day, in this process.

    With ``profile`` the call runs under cProfile (wall-clock timer, so time spent waiting
    for PostgreSQL counts) and the stats are dumped there; that slows Python-heavy code.
    """
    log_path = work / "dag_test.log"
    with _Redirected(log_path):  # what importing the DAG file logs goes to the run's log too
        started = time.perf_counter()
        from dags.call_conversion_import import build_import_dag

        dag = build_import_dag(config.ACCOUNT_ID, config.TIMEZONE)
        build_seconds = time.perf_counter() - started
        logical_date = local_midnight(config.BUSINESS_DATE + timedelta(days=1))

        before = proc_status()
        reset = reset_peak_rss()
        at_reset = proc_status()
        profiler = None
        if profile:
            import cProfile

            profiler = cProfile.Profile(time.perf_counter)
        if statements:
            statements.install()
        started = time.perf_counter()
        started_at = datetime.now(UTC)
        if profiler:
            profiler.enable()
        try:
            dag_run = dag.test(logical_date=logical_date)
        finally:
            if profiler:
                profiler.disable()
        wall = time.perf_counter() - started
    if profiler:
        profiler.dump_stats(profile)
    after = proc_status()
    return {
        "dag_id": dag.dag_id,
        "logical_date": logical_date.isoformat(),
        "dag_run": dag_run,
        "started_at": started_at,
        "dag_test_seconds": round(wall, 2),
        "perf_started": started,
        "import_and_build_seconds": round(build_seconds, 2),
        "rss": {
            "peak_rss_mb": round(after["VmHWM"] / 1024, 1),
            "peak_reset_before_run": reset,
            "rss_at_start_mb": round(at_reset["VmRSS"] / 1024, 1),
            "peak_before_run_mb": round(before["VmHWM"] / 1024, 1),
            "rss_after_run_mb": round(after["VmRSS"] / 1024, 1),
        },
        "log": str(log_path),
        "profile": profile_summary(profile) if profile else None,
    }


def profile_summary(path: str, top: int = 40) -> dict:
    """The functions with the most cumulative wall time: the pipeline's own, and what they wait on."""
    import pstats

    stats = pstats.Stats(path)
    rows = []
    for (filename, line, name), (_, calls, own, cumulative, _) in stats.stats.items():
        where = filename.split("site-packages/")[-1].split("/work/main/")[-1]
        rows.append(
            {
                "function": f"{where}:{line}({name})",
                "calls": calls,
                "own_seconds": round(own, 2),
                "cumulative_seconds": round(cumulative, 2),
            }
        )
    ours = [r for r in rows if r["function"].startswith("include/callconv/")]
    return {
        "stats_file": path,
        "callconv_by_cumulative": sorted(ours, key=lambda r: -r["cumulative_seconds"])[:top],
        "all_by_own": sorted(rows, key=lambda r: -r["own_seconds"])[:top],
    }


def task_instances(dag_run, started_at: datetime) -> list[dict]:
    import sqlalchemy as sa
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.scalars(
            sa.select(TaskInstance).where(TaskInstance.dag_id == dag_run.dag_id, TaskInstance.run_id == dag_run.run_id)
        ).all()
        out = []
        for ti in rows:
            out.append(
                {
                    "task_id": ti.task_id,
                    "state": str(ti.state.value if hasattr(ti.state, "value") else ti.state),
                    "try_number": ti.try_number,
                    "seconds": round(ti.duration, 2) if ti.duration is not None else None,
                    "start_offset_seconds": (
                        round((ti.start_date - started_at).total_seconds(), 2) if ti.start_date else None
                    ),
                    "end_offset_seconds": round((ti.end_date - started_at).total_seconds(), 2) if ti.end_date else None,
                }
            )
    return sorted(out, key=lambda t: (t["start_offset_seconds"] is None, t["start_offset_seconds"] or 0))


def warehouse_facts(url: str, run_id: str) -> dict:
    """The run's summary row and the day's tables, to cross-check the summary's counts."""
    import sqlalchemy as sa

    day = config.BUSINESS_DATE
    engine = sa.create_engine(url, hide_parameters=True)
    params = {"a": config.ACCOUNT_ID, "d": day}
    with engine.connect() as connection:
        summary = connection.scalar(
            sa.text("select counts from run_summary where run_id = :r and account_id = :a and business_date = :d"),
            {**params, "r": run_id},
        )
        if isinstance(summary, str):
            summary = json.loads(summary)
        facts = {
            "crm_sales": connection.scalar(
                sa.text("select count(*) from crm_sales where account_id = :a and business_date = :d"), params
            ),
            "crm_sales_matched": connection.scalar(
                sa.text(
                    "select count(*) from crm_sales where account_id = :a and business_date = :d"
                    " and matched_call_id is not null"
                ),
                params,
            ),
            "quarantine": connection.scalar(
                sa.text("select count(*) from quarantine where account_id = :a and business_date = :d"), params
            ),
            "matches": connection.scalar(
                sa.text("select count(*) from matches where account_id = :a and business_date = :d"), params
            ),
            "upload_ledger": dict(
                connection.execute(
                    sa.text(
                        "select state, count(*) from upload_ledger where account_id = :a and business_date = :d"
                        " group by state order by state"
                    ),
                    params,
                ).all()
            ),
            "call_logs_by_status": dict(
                connection.execute(
                    sa.text(
                        "select coalesce(caller_parse_status, '(null)'), count(*) from call_logs"
                        " group by 1 order by 2 desc"
                    )
                ).all()
            ),
        }
    engine.dispose()
    return {"run_summary": summary or {}, "tables": facts}


def log_findings(path: Path) -> dict:
    """Warnings and errors in the run's log (levels only; the log has no phone numbers)."""
    counts = {"WARNING": 0, "ERROR": 0, "CRITICAL": 0}
    samples: list[str] = []
    with path.open(errors="replace") as handle:
        for line in handle:
            for level in counts:
                if f" {level} " in line or f"[{level.lower()}" in line.lower() or f"level={level.lower()}" in line:
                    counts[level] += 1
                    text = line.strip()[:300]
                    if len(samples) < 15 and text not in samples:
                        samples.append(text)
                    break
    return {"counts": counts, "samples": samples}


def summarise(meta: dict, facts: dict, accepted: dict) -> dict:
    summary = facts["run_summary"]
    intake = summary.get("intake", {})
    match = summary.get("match", {})
    upload = summary.get("upload", {})
    quarantined = intake.get("quarantined") or {}
    return {
        "sales_read": intake.get("read"),
        "sales_normalised": intake.get("normalised"),
        "quarantined": sum(quarantined.values()) if isinstance(quarantined, dict) else quarantined,
        "quarantined_by_reason": quarantined,
        "matched": match.get("matched"),
        "unmatched": match.get("unmatched"),
        "match_rate": match.get("match_rate"),
        "conversions": match.get("conversions"),
        "uploaded": upload.get("accepted"),
        "upload_already_existed": upload.get("already_existed"),
        "upload_sent": upload.get("sent"),
        "upload_batches": upload.get("batches"),
        "upload_failed": upload.get("failed"),
        "upload_parked": upload.get("parked"),
        "sandbox_accepted": accepted.get("accepted"),
        "call_log_rows_normalised": summary.get("call_logs", {}).get("rows"),
        "call_log_numbers_parsed": summary.get("call_logs", {}).get("numbers"),
        "crm_rows_in_extract": meta.get("crm_rows"),
        "bad_rows_planted": meta.get("bad_rows_planted"),
    }


def measure(args) -> dict:
    size = args.size
    work = Path(args.work_dir)
    airflow_home = Path(args.airflow_home)
    load_before = os.getloadavg()
    meta = ensure_data(size)
    log(f"n={config.size_label(size)}: preparing files in {work} and schema {SCHEMA}")
    files = prepare_files(size, work)
    url, schema = prepare_schema(size, args.call_logs)
    log(f"call logs loaded: {schema['call_log_rows']} rows, {schema['call_log_rows_unnormalised']} to normalise")
    process, sandbox = start_sandbox(size, work)
    result: dict = {}
    try:
        log(f"sandbox on {sandbox['endpoint']} knows {sandbox['known_calls']} forwarded calls")
        os.environ.update(airflow_environment(work, airflow_home, url, sandbox, files))
        airflow_migrate = migrate_airflow(airflow_home)
        log(f"airflow db migrated in {airflow_migrate} s; running dag.test() (log: {work / 'dag_test.log'})")
        load_at_start = os.getloadavg()
        code_before = code_digest()
        timer = StatementTimer() if args.statements else None
        run = run_dag(work, args.profile, timer)
        load_after = os.getloadavg()
    finally:
        accepted = stop_sandbox(process)
    dag_run = run["dag_run"]
    log(f"dag.test() finished: {dag_run.state} in {run['dag_test_seconds']} s")
    tis = task_instances(dag_run, run["started_at"])
    facts = warehouse_facts(url, dag_run.run_id)
    window = (dag_run.data_interval_start, dag_run.data_interval_end)
    expected_window = config.day_window()
    run_summary = facts["run_summary"]
    result = {
        "benchmark": "end_to_end dag.test()",
        "how": "in-process dag.test(logical_date=...) of dags/call_conversion_import.py (Airflow "
        f"{_airflow_version()}, tasks run serially in this process)",
        "size": size,
        "size_label": config.size_label(size),
        "call_logs_mode": args.call_logs,
        "dag_id": run["dag_id"],
        "run_id": dag_run.run_id,
        "state": str(dag_run.state),
        "logical_date": run["logical_date"],
        "data_interval": [w.isoformat() for w in window],
        "data_interval_is_local_day": tuple(w.timestamp() for w in window)
        == tuple(w.timestamp() for w in expected_window),
        "business_date": config.BUSINESS_DATE.isoformat(),
        "timezone": config.TIMEZONE,
        "dag_test_seconds": run["dag_test_seconds"],
        "target_seconds": TARGET_SECONDS,
        "meets_target": dag_run.state == "success" and run["dag_test_seconds"] < TARGET_SECONDS,
        "task_seconds": {t["task_id"]: t["seconds"] for t in tis},
        "task_instances": tis,
        "tasks_total_seconds": round(sum(t["seconds"] or 0 for t in tis), 2),
        "airflow_overhead_seconds": round(run["dag_test_seconds"] - sum(t["seconds"] or 0 for t in tis), 2),
        "stage_seconds": {s: run_summary[s].get("seconds") for s in STAGES if isinstance(run_summary.get(s), dict)},
        "counts": summarise(meta, facts, accepted),
        "peak_rss_mb": run["rss"]["peak_rss_mb"],
        "rss": run["rss"],
        "sandbox": {
            "known_calls": sandbox["known_calls"],
            "load_seconds": sandbox["load_seconds"],
            **accepted,
        },
        "run_summary": run_summary,
        "tables": facts["tables"],
        "setup": {
            **schema,
            "airflow_db_migrate_seconds": airflow_migrate,
            "import_and_build_dag_seconds": run["import_and_build_seconds"],
        },
        "log": run["log"],
        "log_findings": log_findings(Path(run["log"])),
        "profile": run["profile"],
        "warehouse_statements": timer.by_task(tis, run["perf_started"], run["dag_test_seconds"]) if timer else None,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before_setup": [round(x, 2) for x in load_before],
            "load_average_at_run_start": [round(x, 2) for x in load_at_start],
            "load_average_after_run": [round(x, 2) for x in load_after],
            "python": sys.version.split()[0],
            "postgres": _postgres_version(),
        },
        "code": {**code_before, "changed_during_run": code_digest() != code_before},
        "started": run["started_at"].isoformat(timespec="seconds"),
        "command": "python -m bench.end_to_end " + " ".join(args.argv),
    }
    if not args.keep:
        _drop_schema()
    return result


def _airflow_version() -> str:
    import airflow

    return airflow.__version__


def _postgres_version() -> str:
    import sqlalchemy as sa

    engine = sa.create_engine(config.pg_url(), hide_parameters=True)
    with engine.connect() as connection:
        version = connection.scalar(sa.text("show server_version"))
    engine.dispose()
    return version


def _drop_schema() -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(config.pg_url(), hide_parameters=True)
    with engine.begin() as connection:
        connection.execute(sa.text(f'drop schema if exists "{SCHEMA}" cascade'))
    engine.dispose()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.end_to_end", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=config.parse_size, default=100_000, help="CRM rows of the day (default 1e5)")
    parser.add_argument("--out", help="also write the JSON result here")
    parser.add_argument("--keep", action="store_true", help=f"keep schema {SCHEMA} afterwards (to inspect it)")
    parser.add_argument(
        "--call-logs",
        choices=("raw", "steady"),
        default="raw",
        help="raw: every call-log row still to normalise (default); steady: only the day's",
    )
    parser.add_argument("--work-dir", default=str(WORK_DIR), help="landing, export, archive, keyset, log")
    parser.add_argument("--airflow-home", default=str(AIRFLOW_HOME), help="this run's own AIRFLOW_HOME")
    parser.add_argument("--profile", metavar="PSTATS", help="run dag.test() under cProfile; stats to this file")
    parser.add_argument(
        "--statements", action="store_true", help="time every warehouse statement, by task and statement shape"
    )
    parser.add_argument("--serve-sandbox", metavar="CALLS_CSV", help=argparse.SUPPRESS)
    parser.add_argument("--sandbox-cert-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.serve_sandbox:
        serve_sandbox(args.serve_sandbox, args.sandbox_cert_dir)
        return 0
    if "airflow" in sys.modules:
        raise RuntimeError("airflow was imported before AIRFLOW_HOME was set; run this as python -m bench.end_to_end")
    result = measure(args)
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0 if result["state"] == "success" else 1


if __name__ == "__main__":
    raise SystemExit(main())
