"""A file named ``.enc`` is never read as plaintext, in the landing area or in the archive.

The name promises a file sealed with our keyset and bound to its place. A plaintext file
under that name (put over an archived copy, or dropped by a CRM export that was never
sealed) is refused with a one-line error, nothing of it is taken in, and it is left where it was.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest
import sqlalchemy as sa

from callconv.config import parse_settings
from callconv.intake.extract import ExtractError
from callconv.intake.take_in import take_in_day
from callconv.protection.pseudonyms import DEFAULT_CONN_ID, keys_from_airflow
from callconv.schema import crm_imports, crm_sales

pytestmark = pytest.mark.integration

ACCOUNT = "acme"
DAY = date(2026, 11, 27)
WINDOW = (datetime(2026, 11, 27, tzinfo=UTC), datetime(2026, 11, 28, tzinfo=UTC))
PAYLOAD = b"id;phone;sold_at;outcome\r\nA-1;+47 912 34 567;2026-11-27 10:00:00;sale\r\n"
FORGED = b"id;phone;sold_at;outcome\r\nF-1;+47 913 45 678;2026-11-27 11:00:00;sale\r\n"


def take_in(tmp_path, warehouse, keyset, **kwargs):
    settings = parse_settings(
        {
            "export_uri": str(tmp_path / "export"),
            "data_docs_uri": str(tmp_path / "docs"),
            "archive_uri": str(tmp_path / "archive"),
            "quarantine_uri": str(tmp_path / "quarantine"),
            "crm_source": {
                "landing_uri": str(tmp_path / "landing"),
                "delimiter": ";",
                "columns": {
                    "crm_id": "id",
                    "caller_phone": "phone",
                    "conversion_time": "sold_at",
                    "outcome": "outcome",
                },
            },
            "accounts": [
                {
                    "id": ACCOUNT,
                    "customer_id": "1112223333",
                    "timezone": "UTC",
                    "default_region": "NO",
                    "default_currency": "NOK",
                    "conversion_actions": {"sale": {"id": "1", "name": "Phone sale"}},
                }
            ],
        }
    )
    return take_in_day(
        warehouse,
        settings,
        settings.account(ACCOUNT),
        *WINDOW,
        "run-1",
        landing_root=tmp_path / "landing",
        data_docs_root=tmp_path / "docs",
        archive_root=tmp_path / "archive",
        quarantine_root=tmp_path / "quarantine",
        keyset=keyset,
        keys=keys_from_airflow(DEFAULT_CONN_ID),
        **kwargs,
    )


def sale_ids(warehouse) -> list[str]:
    with warehouse.connect() as connection:
        return sorted(connection.execute(sa.select(crm_sales.c.crm_id)).scalars())


def test_a_plaintext_landing_file_named_enc_is_refused_and_left_in_place(tmp_path, warehouse, test_keyset):
    dropped = tmp_path / "landing" / ACCOUNT / DAY.isoformat() / "deals.csv.enc"
    dropped.parent.mkdir(parents=True)
    dropped.write_bytes(PAYLOAD)

    with pytest.raises(ExtractError) as caught:
        take_in(tmp_path, warehouse, test_keyset)

    message = str(caught.value)
    assert message.startswith(
        "deals.csv.enc: landing file '2026-11-27/deals.csv' of account 'acme' does not decrypt as generation 0: "
        "tampered, truncated, not encrypted"
    )
    assert "\n" not in message and "912" not in message
    assert sale_ids(warehouse) == []
    with warehouse.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(crm_imports)) == 0
    assert dropped.read_bytes() == PAYLOAD


def test_a_plaintext_file_put_over_an_archived_copy_is_refused_on_reimport(tmp_path, warehouse, test_keyset):
    landing = tmp_path / "landing" / ACCOUNT / DAY.isoformat() / "deals.csv"
    landing.parent.mkdir(parents=True)
    landing.write_bytes(PAYLOAD)
    take_in(tmp_path, warehouse, test_keyset)
    archived = tmp_path / "archive" / ACCOUNT / DAY.isoformat() / "deals.csv.enc"
    assert sale_ids(warehouse) == ["A-1"] and archived.exists()
    archived.write_bytes(FORGED)  # someone replaces the encrypted copy with a plaintext one

    refused = r"^deals\.csv\.enc: archive file '2026-11-27/deals\.csv' of account 'acme' does not decrypt"
    with pytest.raises(ExtractError, match=refused):
        take_in(tmp_path, warehouse, test_keyset, reimport=True)

    assert sale_ids(warehouse) == ["A-1"]  # the forged sale was not taken in
    assert archived.read_bytes() == FORGED
