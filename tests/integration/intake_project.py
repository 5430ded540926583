"""The intake project the intake tests share: settings on a test's own folders, a CRM file, its drop
into the landing area, and one run of the real intake.

Why one module: the intake tests each carried a copy of this setup, and the copies differed only in
what each test is about (the account, its window, the CRM's header, extra settings). Those stay in the
test files, as their constants, and are passed in here as keyword arguments.
"""

from __future__ import annotations

import csv
import io
from datetime import date
from pathlib import Path

from callconv.config import Settings, parse_settings
from callconv.intake.take_in import IntakeOutcome, take_in_day
from callconv.protection.pseudonyms import DEFAULT_CONN_ID, PseudonymKeys, keys_from_airflow

# The names the tests' CRM files give their columns, by the field each one fills. A header
# maps the fields whose names it has; any other column of it is left unmapped, as a CRM's extras are.
CRM_COLUMNS = {
    "crm_id": "id",
    "caller_phone": "phone",
    "conversion_time": "sold_at",
    "outcome": "outcome",
    "value": "amount",
    "currency": "currency",
    "call_start": "call_at",
}


def account(
    account_id: str,
    *,
    customer_id: str = "1112223333",
    timezone: str = "UTC",
    default_region: str = "NO",
    default_currency: str = "NOK",
    conversion_actions: dict | None = None,
    **fields,
) -> dict:
    """One account's settings: a Norwegian account on UTC with one "sale" action, unless told otherwise.

    ``fields`` are any other account settings (``delivery``, an account's own ``crm_source``).
    """
    return {
        "id": account_id,
        "customer_id": customer_id,
        "timezone": timezone,
        "default_region": default_region,
        "default_currency": default_currency,
        "conversion_actions": conversion_actions or {"sale": {"id": "1", "name": "Phone sale"}},
        **fields,
    }


def config(tmp_path: Path, *, header, accounts: list[dict], crm_source: dict | None = None, **sections) -> dict:
    """The settings file's content, with every area (landing, archive, docs, quarantine, export) under ``tmp_path``.

    The CRM's columns are those :data:`CRM_COLUMNS` names in ``header``; ``crm_source`` adds to the
    CRM source (a delimiter, ``chunk_rows``); ``sections`` are top-level sections (``validation``, ``match``).
    """
    columns = {field: name for field, name in CRM_COLUMNS.items() if name in header}
    return {
        "export_uri": str(tmp_path / "export"),
        "data_docs_uri": str(tmp_path / "docs"),
        "archive_uri": str(tmp_path / "archive"),
        "quarantine_uri": str(tmp_path / "quarantine"),
        "crm_source": {"landing_uri": str(tmp_path / "landing"), "columns": columns, **(crm_source or {})},
        "accounts": accounts,
        **sections,
    }


def make_settings(
    tmp_path: Path, *, header, accounts: list[dict], crm_source: dict | None = None, **sections
) -> Settings:
    """The parsed settings of :func:`config`, as a task loads them."""
    return parse_settings(config(tmp_path, header=header, accounts=accounts, crm_source=crm_source, **sections))


def csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    """A CRM export: ``header`` and ``rows`` as UTF-8 CSV with CRLF line ends."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows([header, *rows])
    return out.getvalue().encode("utf-8")


def drop(tmp_path: Path, account_id: str, day: date, name: str, payload: bytes) -> Path:
    """Put a file into the account's landing folder for ``day``, as the CRM's exporter does; its path."""
    folder = tmp_path / "landing" / account_id / day.isoformat()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(payload)
    return folder / name


def take_in(
    engine,
    settings: Settings,
    tmp_path: Path,
    keyset,
    *,
    account_id: str,
    window: tuple,
    keys: PseudonymKeys | None = None,
    **options,
) -> IntakeOutcome:
    """One intake run ("run-1") of the account's ``window``, every area under ``tmp_path``.

    ``keys`` are the pseudonym keys of the Airflow connection unless given, as in the DAG. ``options``
    go to :func:`take_in_day` as they are: ``reimport=True``, or an area's root (``None`` leaves it out).
    """
    roots = {
        "landing_root": tmp_path / "landing",
        "data_docs_root": tmp_path / "docs",
        "archive_root": tmp_path / "archive",
        "quarantine_root": tmp_path / "quarantine",
    }
    return take_in_day(
        engine,
        settings,
        settings.account(account_id),
        *window,
        "run-1",
        keyset=keyset,
        keys=keys_from_airflow(DEFAULT_CONN_ID) if keys is None else keys,
        **(roots | options),
    )
