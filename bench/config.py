"""Shared settings of the benchmark: paths, the bench account, the warehouse URL, sizes.

The bench never reads ``config/call_conversions.yaml`` (others may change it);
it builds its own validated :class:`callconv.config.Settings`, with the same
CRM column names, delimiter and decimal comma as the project's example config.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
DATA_DIR = Path(os.environ.get("BENCH_DATA_DIR", BENCH_DIR / ".data"))
DOCS_DIR = PROJECT_ROOT / "docs"

# Import the pipeline from the working tree, also when the venv has no editable install.
if str(PROJECT_ROOT / "include") not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT / "include"))

DEFAULT_PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"

# The pseudonym keyring of the bench's synthetic data (no real number is ever keyed with it):
# fixed, so repeated runs make the same keys and their checksums compare.
PSEUDONYM_CONN_ID = "call_conversions_pseudonym"
PSEUDONYM_KEYRING = json.dumps(
    {
        "primary": "bench",
        "keys": {"bench": base64.urlsafe_b64encode(hashlib.sha256(b"bench: synthetic data only").digest()).decode()},
    }
)
PSEUDONYM_CONNECTION = json.dumps({"conn_type": "generic", "password": PSEUDONYM_KEYRING})
# Migrating a bench schema that holds rows re-keys them (migration 0007): it reads this connection.
os.environ.setdefault(f"AIRFLOW_CONN_{PSEUDONYM_CONN_ID.upper()}", PSEUDONYM_CONNECTION)


def pseudonym_keys():
    from callconv.protection.pseudonyms import PseudonymKeys

    return PseudonymKeys.from_text(PSEUDONYM_KEYRING)


ACCOUNT_ID = "bench_se"
HOME_REGION = "SE"
TIMEZONE = "Europe/Stockholm"
BUSINESS_DATE = date(2026, 11, 27)  # a Friday, outside any DST change
CUSTOMER_ID = "123-456-7890"
ACTIONS = {"sale": {"id": "555000111", "name": "Phone sale"}, "upsell": {"id": "555000222", "name": "Support upsell"}}

# Quick sizes by default; --full goes to 10^6 CRM rows against 10^7 call rows.
QUICK_SIZES = (10_000, 100_000)
FULL_SIZES = (10_000, 100_000, 1_000_000)
UPLOAD_SIZES = (10_000, 50_000, 100_000)
CALLS_PER_SALE_ROW = 10

# The targets the brief set; never lowered here.
TARGET_NORMALISE_SPEEDUP = 3.0
TARGET_MATCH_SECONDS_1E6 = 60.0
TARGET_FLAT_MEMORY = 0.20  # peak RSS may vary by at most 20% across sizes


def pg_url() -> str:
    return os.environ.get("BENCH_WAREHOUSE_URL") or os.environ.get("WAREHOUSE_TEST_URL") or DEFAULT_PG_URL


def schema_name(size: int) -> str:
    return f"bench_n{size_label(size)}"


def size_label(size: int) -> str:
    """10000 -> '1e4', 50000 -> '5e4'; anything else as digits."""
    text = f"{size:.0e}".replace("e+0", "e").replace("e+", "e")
    return text if float(text) == size else str(size)


def parse_size(text: str) -> int:
    value = float(text)
    if value != int(value) or value < 100:
        raise ValueError(f"size must be a whole number of at least 100, got {text!r}")
    return int(value)


def schema_url(schema: str) -> str:
    import sqlalchemy as sa

    url = sa.make_url(pg_url()).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


def settings_dict(landing_uri: str = "var/landing", export_uri: str = "var/export") -> dict:
    return {
        "export_uri": export_uri,
        "data_docs_uri": str(DATA_DIR / "data_docs"),
        "crm_source": {
            "kind": "file",
            "landing_uri": landing_uri,
            "delimiter": ";",
            "encoding": "utf-8-sig",
            "decimal": ",",
            "columns": {
                "caller_phone": "Telefon",
                "conversion_time": "Salgstidspunkt",
                "outcome": "Utfall",
                "value": "Beløp",
                "currency": "Valuta",
                "crm_id": "Sak",
                "call_start": "Samtalestart",
            },
        },
        "match": {
            "window_days": 30,
            "attribution": "last",
            "min_duration_seconds": 30,
            "forwarded_only": True,
            "crm_call_start_tolerance_seconds": 120,
            "merge_rule": "sum",
        },
        "validation": {"min_rows": 0, "max_rows": 5_000_000, "max_bad_row_share": 0.2, "expect_data": True},
        "accounts": [
            {
                "id": ACCOUNT_ID,
                "customer_id": CUSTOMER_ID,
                "timezone": TIMEZONE,
                "default_region": HOME_REGION,
                "default_currency": "SEK",
                "delivery": "api",
                "conversion_actions": ACTIONS,
                "consent": {"ad_user_data": "GRANTED", "ad_personalization": "DENIED"},
            }
        ],
    }


def settings(**kwargs):
    from callconv.config import parse_settings

    return parse_settings(settings_dict(**kwargs), source="bench")


def day_window() -> tuple[datetime, datetime]:
    """The business day's data interval, as the DAG would pass it (aware, UTC)."""
    from zoneinfo import ZoneInfo

    tz = ZoneInfo(TIMEZONE)
    start = datetime.combine(BUSINESS_DATE, time(0), tzinfo=tz)
    end = datetime.combine(BUSINESS_DATE + timedelta(days=1), time(0), tzinfo=tz)
    return start.astimezone(UTC), end.astimezone(UTC)
