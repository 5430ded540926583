"""A file named ``.enc`` is never read as plaintext, in the landing area or in the archive.

The name promises a file sealed with our keyset and bound to its place. A plaintext file
under that name (put over an archived copy, or dropped by a CRM export that was never
sealed) is refused with a one-line error, nothing of it is taken in, and it is left where it was.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

import intake_project
import pytest
import sqlalchemy as sa

from callconv.intake.extract import ExtractError
from callconv.schema import crm_imports, crm_sales

pytestmark = pytest.mark.integration

ACCOUNT = "acme"
DAY = date(2026, 11, 27)
WINDOW = (datetime(2026, 11, 27, tzinfo=UTC), datetime(2026, 11, 28, tzinfo=UTC))
HEADER = ["id", "phone", "sold_at", "outcome"]  # the first line of both files
PAYLOAD = b"id;phone;sold_at;outcome\r\nA-1;+47 912 34 567;2026-11-27 10:00:00;sale\r\n"
FORGED = b"id;phone;sold_at;outcome\r\nF-1;+47 913 45 678;2026-11-27 11:00:00;sale\r\n"


def take_in(tmp_path, warehouse, keyset, **kwargs):
    settings = intake_project.make_settings(
        tmp_path, header=HEADER, crm_source={"delimiter": ";"}, accounts=[intake_project.account(ACCOUNT)]
    )
    return intake_project.take_in(warehouse, settings, tmp_path, keyset, account_id=ACCOUNT, window=WINDOW, **kwargs)


def sale_ids(warehouse) -> list[str]:
    with warehouse.connect() as connection:
        return sorted(connection.execute(sa.select(crm_sales.c.crm_id)).scalars())


def test_a_plaintext_landing_file_named_enc_is_refused_and_left_in_place(tmp_path, warehouse, test_keyset):
    dropped = intake_project.drop(tmp_path, ACCOUNT, DAY, "deals.csv.enc", PAYLOAD)

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
    intake_project.drop(tmp_path, ACCOUNT, DAY, "deals.csv", PAYLOAD)
    take_in(tmp_path, warehouse, test_keyset)
    archived = tmp_path / "archive" / ACCOUNT / DAY.isoformat() / "deals.csv.enc"
    assert sale_ids(warehouse) == ["A-1"] and archived.exists()
    archived.write_bytes(FORGED)  # someone replaces the encrypted copy with a plaintext one

    refused = r"^deals\.csv\.enc: archive file '2026-11-27/deals\.csv' of account 'acme' does not decrypt"
    with pytest.raises(ExtractError, match=refused):
        take_in(tmp_path, warehouse, test_keyset, reimport=True)

    assert sale_ids(warehouse) == ["A-1"]  # the forged sale was not taken in
    assert archived.read_bytes() == FORGED
