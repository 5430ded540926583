"""Two accounts whose CRMs export differently, from one config file, through the real intake on PostgreSQL.

Why: ``crm_source`` used to be one for the whole deployment, so a Norwegian CRM's Latin-1,
``;``-separated file with decimal commas and a US CRM's UTF-8 ``,`` file with decimal points
could not share a deployment. Each account's file is read with its own merged settings, from
its own landing folder.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import intake_project
import pytest
import sqlalchemy as sa

from callconv.config import load_settings
from callconv.runtime import storage_root
from callconv.schema import crm_sales, quarantine

pytestmark = pytest.mark.integration

OSLO_DAY = date(2026, 11, 27)
OSLO_WINDOW = (datetime(2026, 11, 26, 23, tzinfo=UTC), datetime(2026, 11, 27, 23, tzinfo=UTC))
AUSTIN_WINDOW = (datetime(2026, 11, 27, 6, tzinfo=UTC), datetime(2026, 11, 28, 6, tzinfo=UTC))


def write_config(tmp_path, monkeypatch):
    import yaml

    config = intake_project.config(
        tmp_path,
        # The deployment default: a US-style CRM (UTF-8, comma-separated, decimal point).
        header=["id", "phone", "sold_at", "outcome", "amount"],
        crm_source={"delimiter": ",", "encoding": "utf-8", "decimal": "."},
        validation={"max_bad_row_share": 1.0},
        accounts=[
            intake_project.account(
                "oslo",
                timezone="Europe/Oslo",
                conversion_actions={"salg": {"id": "1", "name": "Telefonsalg"}},
                # A Norwegian CRM: Latin-1, semicolons, decimal comma, Norwegian headers.
                crm_source={
                    "landing_uri": str(tmp_path / "landing-no"),
                    "delimiter": ";",
                    "encoding": "latin-1",
                    "decimal": ",",
                    "columns": {"caller_phone": "Telefon", "outcome": "Utfall", "value": "Beløp"},
                },
            ),
            intake_project.account(
                "austin",
                customer_id="4445556666",
                timezone="America/Chicago",
                default_region="US",
                default_currency="USD",
                conversion_actions={"sale": {"id": "2", "name": "Phone sale"}},
            ),
        ],
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    monkeypatch.setenv("CALL_CONVERSIONS_CONFIG", str(path))
    return load_settings()


def land(root, account_id: str, day: date, name: str, payload: bytes) -> None:
    folder = root / account_id / day.isoformat()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(payload)


def test_a_norwegian_and_a_us_account_with_different_crm_files_share_one_config(
    tmp_path, monkeypatch, warehouse, test_keyset
):
    settings = write_config(tmp_path, monkeypatch)
    oslo, austin = settings.account("oslo"), settings.account("austin")
    assert settings.crm_source_for(oslo).columns.conversion_time == "sold_at"  # merged key by key

    norwegian = (
        "id;Telefon;sold_at;Utfall;Beløp\r\n"
        "no-1;912 34 567;2026-11-27 10:15:00;salg;1 234,50\r\n"
        "no-2;+47 400 00 000;2026-11-27 14:00:00;salg;99,90\r\n"
    ).encode("latin-1")
    american = (
        b"id,phone,sold_at,outcome,amount\r\n"
        b"us-1,(512) 253-4567,2026-11-27 09:30:00,sale,1234.50\r\n"
        b"us-2,+1 312 555 2368,2026-11-27 16:45:00,sale,19.99\r\n"
    )
    land(tmp_path / "landing-no", "oslo", OSLO_DAY, "salg.csv", norwegian)
    land(tmp_path / "landing", "austin", OSLO_DAY, "sales.csv", american)

    for account, window in ((oslo, OSLO_WINDOW), (austin, AUSTIN_WINDOW)):
        outcome = intake_project.take_in(
            warehouse,
            settings,
            tmp_path,
            test_keyset,
            account_id=account.id,
            window=window,
            landing_root=storage_root(settings.crm_source_for(account).landing_uri, settings),
        )
        assert outcome.files_seen == 1, account.id

    with warehouse.connect() as connection:
        rows = connection.execute(
            sa.select(
                crm_sales.c.account_id,
                crm_sales.c.crm_id,
                crm_sales.c.conversion_value,
                crm_sales.c.currency_code,
                crm_sales.c.conversion_time,
            ).order_by(crm_sales.c.crm_id)
        ).all()
        quarantined = connection.execute(sa.select(sa.func.count()).select_from(quarantine)).scalar()
    assert quarantined == 0
    by_id = {row.crm_id: row for row in rows}
    assert set(by_id) == {"no-1", "no-2", "us-1", "us-2"}
    assert by_id["no-1"].account_id == "oslo" and by_id["us-1"].account_id == "austin"
    assert by_id["no-1"].conversion_value == Decimal("1234.50")
    assert by_id["no-2"].conversion_value == Decimal("99.90")
    assert by_id["us-1"].conversion_value == Decimal("1234.50")
    assert by_id["us-2"].conversion_value == Decimal("19.99")
    assert {by_id["no-1"].currency_code, by_id["us-1"].currency_code} == {"NOK", "USD"}
    # each account's local time zone: 10:15 in Oslo is 09:15 UTC; 09:30 in Chicago is 15:30 UTC
    assert by_id["no-1"].conversion_time == datetime(2026, 11, 27, 9, 15, tzinfo=UTC)
    assert by_id["us-1"].conversion_time == datetime(2026, 11, 27, 15, 30, tzinfo=UTC)
