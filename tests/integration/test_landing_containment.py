"""Each account's files resolve inside its own folders: a symlink into another account's is refused.

Through the real intake on PostgreSQL and real folders. Account "other" is given a symlink
into acme's landing or archive area: the day folder, one file, or its whole account folder.
Each is refused with a one-line error before anything is read, and nothing is deleted from
(or written into) acme's folders. Retention refuses the same symlinks before deleting.
"""

from __future__ import annotations

import os
from datetime import UTC, date, datetime

import intake_project
import pytest
import sqlalchemy as sa

from callconv.intake.extract import ExtractError
from callconv.protection.retention import purge_day_folders
from callconv.protection.storage import OutsideAccountFolder
from callconv.schema import crm_imports, crm_sales, quarantine

pytestmark = pytest.mark.integration

DAY = date(2026, 11, 27)
WINDOW = (datetime(2026, 11, 27, tzinfo=UTC), datetime(2026, 11, 28, tzinfo=UTC))
HEADER = ["id", "phone", "sold_at", "outcome"]  # the first line of both files
ACME_FILE = b"id;phone;sold_at;outcome\r\nA-1;+47 912 34 567;2026-11-27 10:00:00;sale\r\n"
OTHER_FILE = b"id;phone;sold_at;outcome\r\nO-1;+47 913 45 678;2026-11-27 11:00:00;sale\r\n"


def make_settings(tmp_path):
    return intake_project.make_settings(
        tmp_path,
        header=HEADER,
        crm_source={"delimiter": ";"},
        accounts=[intake_project.account("acme"), intake_project.account("other", customer_id="4445556666")],
    )


def take_in(tmp_path, warehouse, keyset, account_id: str, **kwargs):
    settings = make_settings(tmp_path)
    return intake_project.take_in(warehouse, settings, tmp_path, keyset, account_id=account_id, window=WINDOW, **kwargs)


def acme_landing_file(tmp_path):
    return intake_project.drop(tmp_path, "acme", DAY, "deals.csv", ACME_FILE)


def refused_for_other(tmp_path, warehouse, keyset, error=ExtractError, **kwargs) -> str:
    """Other's intake fails with a one-line error naming other's folder, and reads nothing."""
    with pytest.raises(error) as caught:
        take_in(tmp_path, warehouse, keyset, "other", **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    assert "the folder of account 'other'" in message and "refusing" in message
    with warehouse.connect() as connection:
        for table in (crm_imports, crm_sales, quarantine):
            assert connection.scalar(sa.select(sa.func.count()).select_from(table)) == 0
    assert not (tmp_path / "archive" / "acme").exists()
    return message


def test_a_day_folder_symlinked_into_another_account_is_refused(tmp_path, warehouse, test_keyset):
    acme_file = acme_landing_file(tmp_path)
    (tmp_path / "landing" / "other").mkdir()
    (tmp_path / "landing" / "other" / DAY.isoformat()).symlink_to(f"../acme/{DAY}", target_is_directory=True)

    message = refused_for_other(tmp_path, warehouse, test_keyset)

    assert message.startswith(f"refusing day folder '{DAY}'")
    assert acme_file.read_bytes() == ACME_FILE  # not deleted from acme's landing folder
    # acme's own intake still takes its file in
    assert take_in(tmp_path, warehouse, test_keyset, "acme").sales == 1


def test_a_file_symlinked_into_another_account_is_refused(tmp_path, warehouse, test_keyset):
    acme_file = acme_landing_file(tmp_path)
    folder = tmp_path / "landing" / "other" / DAY.isoformat()
    folder.mkdir(parents=True)
    (folder / "deals.csv").symlink_to(f"../../acme/{DAY}/deals.csv")

    message = refused_for_other(tmp_path, warehouse, test_keyset)

    assert message.startswith("refusing landing file 'deals.csv'")
    assert acme_file.read_bytes() == ACME_FILE
    assert (folder / "deals.csv").is_symlink()  # left as found, for whoever looks into it


def test_an_account_folder_symlinked_to_another_account_is_refused(tmp_path, warehouse, test_keyset):
    acme_file = acme_landing_file(tmp_path)
    (tmp_path / "landing" / "other").symlink_to("acme", target_is_directory=True)

    refused_for_other(tmp_path, warehouse, test_keyset)

    assert acme_file.read_bytes() == ACME_FILE


def test_an_archive_day_folder_symlinked_into_another_account_is_refused_before_anything_is_read(
    tmp_path, warehouse, test_keyset
):
    """Other's own landing file would otherwise be archived over acme's archived copy of the same name."""
    acme_landing_file(tmp_path)
    take_in(tmp_path, warehouse, test_keyset, "acme")
    acme_archived = tmp_path / "archive" / "acme" / DAY.isoformat() / "deals.csv.enc"
    archived_bytes = acme_archived.read_bytes()
    with warehouse.begin() as connection:
        for table in (crm_imports, crm_sales, quarantine):
            connection.execute(table.delete())
    other_file = intake_project.drop(tmp_path, "other", DAY, "deals.csv", OTHER_FILE)
    (tmp_path / "archive" / "other").mkdir()
    (tmp_path / "archive" / "other" / DAY.isoformat()).symlink_to(f"../acme/{DAY}", target_is_directory=True)

    with pytest.raises(OutsideAccountFolder) as caught:
        take_in(tmp_path, warehouse, test_keyset, "other")

    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"refusing archive folder '{DAY}'")
    assert "the folder of account 'other'" in message
    assert acme_archived.read_bytes() == archived_bytes  # acme's archived copy untouched
    assert other_file.read_bytes() == OTHER_FILE  # other's file not removed
    with warehouse.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(crm_sales)) == 0


def test_retention_refuses_an_account_folder_symlinked_to_another_account(tmp_path):
    settings = make_settings(tmp_path)
    acme_file = acme_landing_file(tmp_path)
    os.symlink("acme", tmp_path / "landing" / "other", target_is_directory=True)

    with pytest.raises(OutsideAccountFolder, match="the folder of account 'other'"):
        purge_day_folders(tmp_path / "landing", settings.account("other"), "landing", DAY)

    assert acme_file.read_bytes() == ACME_FILE
