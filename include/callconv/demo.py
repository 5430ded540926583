"""A small, realistic, synthetic data set for the demo, and a summary of what a run did.

``python -m callconv.demo seed --date 2026-11-27`` fills the warehouse's call
logs for the 30 days before that date and drops one CRM extract for the day in
the landing area, for each account in the config. ``python -m callconv.demo summary --date ...``
prints the outcome. ``run`` does both around an ``airflow dags test`` of each account's day
(``make demo``): the shipped config's first account uploads to the Google Ads sandbox, its
second sends through the Data Manager sandbox (:mod:`callconv.demo_dm`). ``ui`` runs every
account's day in a local Airflow (scheduler, api-server, FAB) instead, with the same sandboxes
(``make ui-demo``, :mod:`callconv.demo_ui`). Every number comes from a seeded generator, so each seed is the same.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

import sqlalchemy as sa

from callconv.config import Account, Settings, load_settings
from callconv.schema import call_logs, crm_sales, quarantine, run_summary, upload_ledger


@dataclass(frozen=True)
class Region:
    """How a country's CRM and switchboard write its mobile numbers, for one demo account's data."""

    forms: tuple[Callable[[str], str], ...]  # written forms of a national significant number
    mobile: Callable[[random.Random], str]  # a candidate mobile number, national significant
    dialled: str  # the shop's own number, which the calls went to
    bad: tuple[str, str, str, str]  # the bad rows' numbers: unreadable time, unknown outcome, negative, unknown


REGIONS = {
    # National and international ways a Norwegian CRM and switchboard write numbers.
    "NO": Region(
        forms=(
            lambda n: f"+47 {n[:3]} {n[3:5]} {n[5:]}",
            lambda n: f"0047{n}",
            lambda n: f"{n[:3]} {n[3:5]} {n[5:]}",
            lambda n: f"(+47) {n[:2]}.{n[2:4]}.{n[4:6]}.{n[6:]}",
            lambda n: f"+47-{n}",
        ),
        mobile=lambda rng: f"{rng.choice('49')}{rng.randrange(10**6, 10**7):07d}",
        dialled="+4721000000",
        bad=("+47 400 00 000", "+47 400 00 001", "+47 912 00 000", "+47 915 55 555"),
    ),
    # And Swedish ones: the trunk 0 nationally, 070-123 45 67 as Swedes write it.
    "SE": Region(
        forms=(
            lambda n: f"+46 {n[:2]} {n[2:5]} {n[5:7]} {n[7:]}",
            lambda n: f"0046{n}",
            lambda n: f"0{n[:2]}-{n[2:5]} {n[5:7]} {n[7:]}",
            lambda n: f"0{n}",
            lambda n: f"+46{n}",
        ),
        mobile=lambda rng: f"7{rng.choice('02369')}{rng.randrange(10**7):07d}",
        dialled="+46812000000",
        bad=("+46 70 000 00 00", "+46 70 000 00 01", "+46 70 912 00 00", "+46 70 915 55 55"),
    ),
}
WRITTEN_FORMS = REGIONS["NO"].forms


def _callers(rng: random.Random, count: int, region: str = "NO") -> list[str]:
    """Valid mobile numbers of the region, as national significant numbers."""
    import phonenumbers

    callers: list[str] = []
    while len(callers) < count:
        candidate = REGIONS[region].mobile(rng)
        if phonenumbers.is_valid_number(phonenumbers.parse(candidate, region)):
            callers.append(candidate)
    return callers


def make_call_logs(account: Account, business_date: date, seed_value: int | str, callers: list[str]) -> list[dict]:
    """About 40 calls a day over the match window, a fifth of them not forwarded.

    Each day's calls come from a generator seeded by that day alone, so a call id
    always names the same call, whichever demo day asked for it: seeding another
    day adds calls, it never gives an existing call id another caller.
    """
    tz = account.tz
    region = REGIONS[account.default_region]
    rows = []
    for day_offset in range(30, -1, -1):
        day = business_date - timedelta(days=day_offset)
        rng = random.Random(f"{seed_value}-calls-{day.isoformat()}")
        for index in range(40):
            local = datetime.combine(day, time(8)) + timedelta(seconds=rng.randrange(0, 10 * 3600))
            rows.append(
                {
                    "account_id": account.id,
                    "source_call_id": f"call-{day:%Y%m%d}-{index:03d}",
                    "caller_number": rng.choice(region.forms)(rng.choice(callers)),
                    "call_start": local.replace(tzinfo=tz).astimezone(UTC),
                    "duration_seconds": rng.choice((12, 45, 95, 180, 420, 900)),
                    "dialled_number": region.dialled,
                    "via_google_forwarding": rng.random() < 0.8,
                }
            )
    return rows


def make_crm_extract(settings: Settings, account: Account, business_date: date, calls: list[dict], rng) -> bytes:
    """Sales after about a third of the day's and the week's calls, plus a few bad rows."""
    crm_source = settings.crm_source_for(account)
    columns = crm_source.columns
    header = [
        columns.crm_id,
        columns.caller_phone,
        columns.call_start,
        columns.conversion_time,
        columns.outcome,
        columns.value,
        columns.currency,
    ]
    tz = account.tz
    region = REGIONS[account.default_region]
    currency = account.default_currency
    day_start = datetime.combine(business_date, time(0), tzinfo=tz)
    recent = [c for c in calls if c["call_start"] >= (day_start - timedelta(days=7)).astimezone(UTC)]
    out = io.StringIO()
    writer = csv.writer(out, delimiter=crm_source.delimiter, lineterminator="\r\n")
    writer.writerow(header)
    case = 1000
    for call in rng.sample(recent, k=len(recent) // 3):
        start_local = call["call_start"].astimezone(tz)
        sold_at = start_local + timedelta(minutes=rng.randrange(5, 90))
        if sold_at.date() != business_date:
            sold_at = datetime.combine(business_date, time(rng.randrange(8, 18), rng.randrange(60)), tzinfo=tz)
        if sold_at <= start_local:
            continue
        case += 1
        amount = f"{rng.randrange(500, 25000)},{rng.randrange(100):02d}"
        writer.writerow(
            [
                f"S-{business_date:%Y%m%d}-{case}",  # a deal id of its own day: another day never reuses it
                rng.choice(region.forms)(_national(call["caller_number"], account.default_region)),
                start_local.strftime("%Y-%m-%d %H:%M:%S") if rng.random() < 0.5 else "",
                sold_at.strftime("%Y-%m-%d %H:%M:%S"),
                rng.choice(("sale", "sale", "upsell")),
                amount,
                rng.choice((currency, "", currency.lower())),
            ]
        )
    noon = f"{business_date} 12:00:00"
    bad = f"S-{business_date:%Y%m%d}"
    late, refund, negative, stranger = region.bad
    writer.writerow([f"{bad}-{case + 1}", "12", "", noon, "sale", "100,00", currency])  # too short a number
    writer.writerow([f"{bad}-{case + 2}", late, "", "yesterday", "sale", "", ""])  # unreadable time
    writer.writerow([f"{bad}-{case + 3}", refund, "", noon, "refund", "", ""])  # unknown outcome
    writer.writerow([f"{bad}-{case + 4}", negative, "", noon, "sale", "-50,00", currency])  # negative value
    writer.writerow([f"{bad}-{case + 5}", stranger, "", noon, "sale", "990,00", currency])  # no such caller
    return out.getvalue().encode("utf-8-sig")


def _national(written: str, region: str) -> str:
    """The national significant number of a number as the switchboard wrote it."""
    import phonenumbers

    return str(phonenumbers.parse(written, region).national_number)


def seed(
    engine: sa.Engine,
    settings: Settings,
    landing_root,
    business_date: date,
    seed_value: int = 7,
    account: Account | None = None,
) -> dict:
    """Add a demo account's call logs for the day's window and drop the day's CRM extract.

    The account is the config's first unless named. Idempotent, and safe for any day in any
    order: calls already there are kept as they are (normalised or not), only missing ones are added.
    """
    account = account or settings.accounts[0]
    # The first account keeps the plain seed (its demo data is what it always was); any other
    # adds its id, so its calls and deals are its own.
    first = account.id == settings.accounts[0].id
    key = str(seed_value) if first else f"{seed_value}-{account.id}"
    callers = _callers(random.Random(seed_value if first else key), 120, account.default_region)
    calls = make_call_logs(account, business_date, key, callers)
    rng = random.Random(f"{key}-crm-{business_date.isoformat()}")
    with engine.begin() as connection:
        known = set(
            connection.scalars(
                sa.select(call_logs.c.source_call_id).where(
                    call_logs.c.account_id == account.id,
                    call_logs.c.source_call_id.in_([call["source_call_id"] for call in calls]),
                )
            )
        )
        missing = [call for call in calls if call["source_call_id"] not in known]
        if missing:
            connection.execute(call_logs.insert(), missing)
    folder = landing_root / account.id / business_date.isoformat()
    folder.mkdir(parents=True, exist_ok=True)
    extract = folder / f"crm_sales_{business_date:%Y%m%d}.csv"
    extract.write_bytes(make_crm_extract(settings, account, business_date, calls, rng))
    return {"account": account.id, "call_logs": len(calls), "extract": str(extract), "calls": calls}


def _sandbox(settings: Settings, business_date: date, cert_dir):
    """Google Ads as a local sandbox whose clock stands two days after the sales, so no call is too recent."""
    from callconv.sandbox.server import SandboxServer, customers_from_settings

    sandbox_now = datetime.combine(business_date + timedelta(days=2), time(12), tzinfo=settings.accounts[0].tz)
    return SandboxServer(customers=customers_from_settings(settings), clock=lambda: sandbox_now, cert_dir=cert_dir)


def start_sandbox(settings: Settings, calls: list[dict], business_date: date, cert_dir):
    """The sandbox, knowing the seeded forwarded calls (of any account: each in its own region)."""
    from callconv.intake.normalise import normalise_phone

    regions = {account.id: account.default_region for account in settings.accounts}
    forwarded = [
        (normalise_phone(call["caller_number"], regions[call["account_id"]])[0], call["call_start"])
        for call in calls
        if call["via_google_forwarding"]
    ]
    sandbox = _sandbox(settings, business_date, cert_dir)
    sandbox.add_calls((e164, start) for e164, start in forwarded if e164)
    return sandbox.start()


def start_sandbox_from_warehouse(settings: Settings, engine: sa.Engine, business_date: date, cert_dir):
    """The sandbox, knowing the forwarded calls in the warehouse, as ``--calls-from-warehouse`` loads
    them: the call logs not yet normalised are normalised first. Returns it and the calls loaded.

    Only the accounts that upload through the Google Ads API: no other account's conversions reach
    this sandbox, and their call logs are left for their own run's ``normalise_call_logs``."""
    from callconv.matching.call_logs import normalise_pending_call_logs

    sandbox = _sandbox(settings, business_date, cert_dir)
    loaded = 0
    for account in [account for account in settings.accounts if account.delivery == "api"]:
        normalise_pending_call_logs(engine, account.id, account.default_region)
        loaded += sandbox.add_calls_from_warehouse(engine, account.id)
    return sandbox.start(), loaded


DELIVERIES = {"api": "the Google Ads API", "data_manager": "the Data Manager API", "file": "a file over SFTP"}


def seed_accounts(engine: sa.Engine, settings: Settings, business_date: date) -> dict[str, list[dict]]:
    """Seed the day of every account in the config, each in its own CRM source's landing area,
    and say so. ``seed`` alone seeds the first account only. Returns each account's seeded calls."""
    from callconv.runtime import storage_root

    calls: dict[str, list[dict]] = {}
    for account in settings.accounts:
        landing = storage_root(settings.crm_source_for(account).landing_uri, settings)
        seeded = seed(engine, settings, landing, business_date, account=account)
        calls[account.id] = seeded["calls"]
        print(f"Seeded {seeded['call_logs']} call-log rows and one CRM extract for {account.id}, {business_date}")
    return calls


def runnable_accounts(settings: Settings) -> list[Account]:
    """The accounts the demo runs, in config order. A 'file' account is left out, and said so:
    its delivery needs an SFTP server, which the demo does not start."""
    for account in settings.accounts:
        if account.delivery == "file":
            print(f"Skipping {account.id}: delivery 'file' needs an SFTP server, which the demo does not start")
    return [account for account in settings.accounts if account.delivery != "file"]


def start_data_manager(settings: Settings, engine: sa.Engine, cert_dir, env: dict[str, str]):
    """The Data Manager sandbox when an account delivers through that API, else None.

    Its connection goes into ``env``, the environment Airflow's tasks get, so the account's
    ``deliver_through_data_manager`` reaches the sandbox and never Google.
    """
    from callconv import demo_dm

    if not any(account.delivery == "data_manager" for account in settings.accounts):
        return None
    dm = demo_dm.start(settings, engine, cert_dir)
    env[f"AIRFLOW_CONN_{settings.data_manager.conn_id.upper()}"] = dm.connection()
    print(f"Data Manager sandbox serving on {dm.endpoint} (HTTPS, test certificate)")
    return dm


def report(engine: sa.Engine, account: Account, business_date: date, sandbox, dm, succeeded: bool) -> str:
    """The account's summary once its run has ended, and what its sandbox holds: the Google Ads
    sandbox's accepted conversions, or (after a run that succeeded) what the Data Manager sandbox
    received, what its requestStatus says, and the outcome a later run's settle step records."""
    from callconv import demo_dm

    lines = [summary(engine, account, business_date)]
    if account.delivery == "api":
        lines.append(f"  sandbox holds:      {len(sandbox.accepted(account.customer_id))} accepted conversions")
    elif account.delivery == "data_manager" and succeeded:
        lines.extend(demo_dm.after_run(engine, account, business_date, dm))
    return "\n".join(lines)


def run(settings: Settings, warehouse_url: str, business_date: date, log_path) -> int:
    """Seed the day of every account, serve the sandboxes, run each account's import DAG
    through Airflow (one ``airflow dags test`` each, in config order), print what happened."""
    import json
    import os

    from callconv.config import PROJECT_ROOT
    from callconv.delivery.ads_client import SSL_ROOTS_ENV_VAR
    from callconv.protection.pseudonyms import local_connection
    from callconv.warehouse import create_engine, migrate

    # The demo's pseudonym keyring, kept in var/ beside its data unless a connection is set.
    pseudonym_env = f"AIRFLOW_CONN_{settings.pseudonym_conn_id.upper()}"
    if not os.environ.get(pseudonym_env):
        os.environ[pseudonym_env] = local_connection(PROJECT_ROOT / "var" / "demo-pseudonym-keyring.json")
    migrate(warehouse_url)
    engine = create_engine(warehouse_url)
    calls = seed_accounts(engine, settings, business_date)
    cert_dir = PROJECT_ROOT / "var" / "sandbox"
    ads_calls = [call for a in settings.accounts if a.delivery == "api" for call in calls[a.id]]
    sandbox = start_sandbox(settings, ads_calls, business_date, cert_dir)
    print(f"Google Ads sandbox serving on {sandbox.endpoint} (TLS, test certificate)")
    env = {
        **os.environ,
        SSL_ROOTS_ENV_VAR: str(sandbox.cert_path),
        f"AIRFLOW_CONN_{settings.google_ads_conn_id.upper()}": json.dumps(
            {"conn_type": "google_ads", "extra": {"sandbox": True, **sandbox.client_settings()}}
        ),
    }
    dm = None
    code = 0
    open(log_path, "w").close()  # one log for the day's runs, each appended
    try:
        dm = start_data_manager(settings, engine, cert_dir, env)
        for account in runnable_accounts(settings):
            code = _dags_test(account, business_date, env, log_path)
            print(report(engine, account, business_date, sandbox, dm, code == 0))
            if code != 0:
                print(f"The Airflow run of {account.id} failed; see {log_path}")
                break
    finally:
        sandbox.stop()
        if dm is not None:
            dm.stop()
        engine.dispose()
    return code


def _dags_test(account: Account, business_date: date, env: dict, log_path) -> int:
    """``airflow dags test`` of the account's import DAG for the day, its output appended to the log."""
    import subprocess
    import sys

    run_after = (business_date + timedelta(days=1)).isoformat()
    command = [sys.executable, "-m", "airflow", "dags", "test", f"call_conversions_import__{account.id}", run_after]
    print(f"Running {' '.join(command[2:])} (log: {log_path})", flush=True)
    with open(log_path, "a") as log_file:
        log_file.write(f"===== {' '.join(command[2:])}\n")
        log_file.flush()
        return subprocess.run(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, check=False).returncode


def summary(engine: sa.Engine, account: Account, business_date: date) -> str:
    day = sa.and_(crm_sales.c.account_id == account.id, crm_sales.c.business_date == business_date)
    with engine.connect() as connection:
        sales = connection.scalar(sa.select(sa.func.count()).select_from(crm_sales).where(day))
        matched = connection.scalar(
            sa.select(sa.func.count()).select_from(crm_sales).where(day, crm_sales.c.matched_call_id.is_not(None))
        )
        unmatched = connection.execute(
            sa.select(crm_sales.c.unmatched_reason, sa.func.count())
            .where(day, crm_sales.c.unmatched_reason.is_not(None))
            .group_by(crm_sales.c.unmatched_reason)
        ).all()
        quarantined = connection.execute(
            sa.select(quarantine.c.reason, sa.func.count())
            .where(quarantine.c.account_id == account.id, quarantine.c.business_date == business_date)
            .group_by(quarantine.c.reason)
        ).all()
        ledger = connection.execute(
            sa.select(upload_ledger.c.state, sa.func.count())
            .where(upload_ledger.c.account_id == account.id, upload_ledger.c.business_date == business_date)
            .group_by(upload_ledger.c.state)
        ).all()
        last_run = connection.execute(
            sa.select(run_summary.c.counts)
            .where(run_summary.c.account_id == account.id, run_summary.c.business_date == business_date)
            .order_by(run_summary.c.updated_at.desc())
        ).first()
    lines = [
        f"Account {account.id}, day {business_date} ({account.timezone}), through "
        f"{DELIVERIES.get(account.delivery, account.delivery)}",
        f"  sales normalised:   {sales}",
        f"  quarantined:        {dict(sorted(quarantined))}",
        f"  matched to a call:  {matched}",
        f"  unmatched:          {dict(sorted(unmatched))}",
        f"  upload ledger:      {dict(sorted(ledger))}",
    ]
    counts = last_run[0] if last_run else {}
    lines.extend(_this_run(counts))
    if "conversion_file" in counts:
        lines.append(f"  conversion file:    {counts['conversion_file']['path']}")
    return "\n".join(lines)


def _this_run(counts: dict) -> list[str]:
    """What the latest run of the day did, next to the day's totals above."""
    intake, match, upload = counts.get("intake") or {}, counts.get("match") or {}, counts.get("upload") or {}
    if not counts:
        return ["  this run:           no run summary (the run failed before its first step finished)"]
    lines = [
        f"  this run read:      {intake.get('read', 0)} CRM rows ({intake.get('files_already_imported', 0)} "
        f"file(s) already imported), normalised {intake.get('normalised', 0)}",
    ]
    if match:
        lines.append(
            f"  this run matched:   {match.get('matched', 0)} of {match.get('sales', 0)} sales into "
            f"{match.get('conversions', 0)} conversions ({match.get('new_pending', 0)} new to send); "
            "several sales on one call and action merge into one conversion"
        )
        if match.get("conflicts"):
            lines.append(f"  conflicts:          {match['conflicts']} (recorded, never sent: see delivery_conflicts)")
    if "accepted" in upload:
        lines.append(
            f"  this run uploaded:  sent {upload['sent']}, accepted {upload['accepted']}, "
            f"already existed {upload['already_existed']}, parked {upload['parked']}, failed {upload['failed']}"
        )
    dm = counts.get("data_manager") or {}
    if "sent" in dm:
        settled = dm.get("settled") or {}
        first = [f"{state} {settled[state]}" for state in ("delivered", "failed", "parked") if settled.get(state)]
        if settled.get("still_processing"):
            first.append(f"{settled['still_processing']} request(s) still processing")
        lines.append(
            f"  this run sent:      {dm['sent']} events in {dm['requests']} ingest request(s) through the Data "
            f"Manager API (resent requests {dm.get('resent_requests', 0)}, refused {dm.get('failed') or {}}, "
            f"parked {dm.get('parked', 0)}); it settled earlier requests first: {', '.join(first) or 'none waited'}"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    from callconv.warehouse import create_engine

    parser = argparse.ArgumentParser(prog="python -m callconv.demo")
    parser.add_argument("command", choices=("run", "ui", "seed", "summary"))
    parser.add_argument("--date", type=date.fromisoformat, required=True, help="the account-local day")
    parser.add_argument("--warehouse-url", required=True)
    parser.add_argument("--log", default="var/demo-run.log", help="where the Airflow run's log goes")
    parser.add_argument("--var-dir", help="ui: the keyring, sandbox certificate and Airflow output (default: var/)")
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("AIRFLOW__API__PORT") or 8080),
        help="ui: the Airflow UI's port (default: AIRFLOW__API__PORT, else 8080)",
    )
    args = parser.parse_args(argv)
    settings = load_settings()
    if args.command == "run":
        raise SystemExit(run(settings, args.warehouse_url, args.date, args.log))
    if args.command == "ui":
        from pathlib import Path

        from callconv.config import PROJECT_ROOT
        from callconv.demo_ui import run_ui

        var_dir = Path(args.var_dir).resolve() if args.var_dir else PROJECT_ROOT / "var"
        raise SystemExit(run_ui(settings, args.warehouse_url, args.date, var_dir, args.port))
    engine = create_engine(args.warehouse_url)
    if args.command == "seed":
        seed_accounts(engine, settings, args.date)
        return
    for account in settings.accounts:
        print(summary(engine, account, args.date))


if __name__ == "__main__":
    main()
