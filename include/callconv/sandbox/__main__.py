"""Run the Google Ads sandbox for a demo.

    python -m callconv.sandbox --port 50051 --calls-from-warehouse sqlite:///var/demo.db

Without ``--customer`` the customers and conversion actions come from the
pipeline config (``callconv.config.load_settings()``); with it, from the
command line: ``--customer 123-456-7890 --action 111:Phone sale --action 222:Visit``.
It prints the environment variable and the Airflow connection that reach it.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
from datetime import datetime, timedelta

from callconv.delivery.ads_client import API_VERSION, SSL_ROOTS_ENV_VAR
from callconv.sandbox.server import (
    ActionSpec,
    SandboxServer,
    customers_from_settings,
    load_calls_from_warehouse,
)


def _action(text: str) -> ActionSpec:
    action_id, _, name = text.partition(":")
    if not action_id.strip().isdigit():
        raise argparse.ArgumentTypeError(f"--action takes id:name with a numeric id, got {text!r}")
    return ActionSpec(id=action_id.strip(), name=name.strip())


def _parser() -> argparse.ArgumentParser:
    from callconv.config import PROJECT_ROOT

    parser = argparse.ArgumentParser(prog="python -m callconv.sandbox", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--cert-dir", default=str(PROJECT_ROOT / "var" / "sandbox"), help="TLS certificate dir")
    parser.add_argument("--config", help="pipeline config file (default: CALL_CONVERSIONS_CONFIG)")
    parser.add_argument("--customer", help="customer id; then give its actions with --action")
    parser.add_argument("--action", action="append", type=_action, default=[], help="id:name, repeatable")
    parser.add_argument("--calls-from-warehouse", metavar="URL", help="load forwarded calls from call_logs")
    parser.add_argument("--account", action="append", default=[], help="account ids whose calls to load")
    parser.add_argument(
        "--region",
        help="region for call-log numbers written without a country code (default: the account's default_region)",
    )
    parser.add_argument("--now", help="fixed sandbox time, ISO 8601 with offset (default: real time)")
    parser.add_argument("--too-recent-hours", type=float, default=12.0)
    parser.add_argument(
        "--developer-token",
        help="optional, as at Google since 2026-09-09: when given, a request that sends another one is refused",
    )
    parser.add_argument("--access-token", default="sandbox-token")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    settings = None
    if args.customer:
        if not args.action:
            raise SystemExit("--customer needs at least one --action id:name")
        customers = {args.customer.replace("-", ""): args.action}
    else:
        from callconv.config import load_settings

        settings = load_settings(args.config)
        customers = customers_from_settings(settings)

    server = SandboxServer(
        customers=customers,
        too_recent_call=timedelta(hours=args.too_recent_hours),
        access_token=args.access_token,
        developer_token=args.developer_token,
        port=args.port,
        cert_dir=args.cert_dir,
    )
    if args.now:
        server.set_clock(datetime.fromisoformat(args.now))

    if args.calls_from_warehouse:
        import sqlalchemy as sa

        from callconv.matching.call_logs import normalise_pending_call_logs
        from callconv.schema import call_logs

        engine = sa.create_engine(args.calls_from_warehouse, hide_parameters=True)
        accounts = args.account or ([a.id for a in settings.accounts] if settings else [])
        if not accounts:
            with engine.connect() as connection:
                accounts = list(connection.execute(sa.select(call_logs.c.account_id).distinct()).scalars())
        regions = {a.id: a.default_region for a in settings.accounts} if settings else {}
        for account_id in accounts:
            # Calls are known by their E.164 caller, which the import DAG fills only when it runs.
            region = args.region or regions.get(account_id)
            if region:
                normalised = normalise_pending_call_logs(engine, account_id, region)
                print(f"account {account_id}: {normalised['rows']} call-log rows normalised ({region})")
            else:
                print(f"account {account_id}: no --region, so only calls already normalised are loaded")
            added = server.add_calls(load_calls_from_warehouse(engine, account_id))
            print(f"account {account_id}: {added} forwarded calls loaded")
        engine.dispose()

    server.start()
    connection = {
        "conn_type": "google_ads",
        # ssl_roots_file makes the task trust the sandbox certificate itself.
        "extra": {"sandbox": True, **server.client_settings()},
    }
    print(f"Google Ads sandbox ({API_VERSION}) serving on {server.endpoint}")
    print(f"customers: {', '.join(sorted(customers))}")
    print(f"export {SSL_ROOTS_ENV_VAR}={server.cert_path}")  # for any other client process
    print(f"export AIRFLOW_CONN_GOOGLE_ADS_DEFAULT='{json.dumps(connection)}'")
    print("Ctrl-C stops it.", flush=True)

    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop()
        print(f"stopped; {len(server.accepted())} conversions were accepted")


if __name__ == "__main__":
    main()
