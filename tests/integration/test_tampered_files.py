"""Tampering with the files a real run stored: every attack is refused, in one line, and nothing is deleted.

One setup for the module: the intake (archive, quarantine export, Data Docs) and the
conversion file, for two accounts on PostgreSQL and real files, each stage run twice so
every path has an older copy (generation 1) beside the newest (generation 2). Then each
test tampers with the stored files and restores them:

* truncation, a bit flip, a plaintext file and an old-format (``CCENC``) file under the
  ``.enc`` name, for the archive, the quarantine export and the conversion file;
* 1 MiB segments reordered in the archive copy (the only file of the run big enough);
* the two accounts' files swapped, class by class;
* rollback: the older copy of the same path put back.

The archive is read by the pipeline itself (a reimport); the quarantine export and the
conversion file through :func:`callconv.protection.storage.open_for_read`, the reader of
``python -m callconv.protection.sealed open``.
"""

from __future__ import annotations

import csv
import io
import shutil
from datetime import UTC, date, datetime
from pathlib import Path

import intake_project
import pytest
import sqlalchemy as sa

from callconv.delivery.conversion_file import write_conversion_file
from callconv.intake.extract import ExtractError
from callconv.protection.sealed import SealError, new_keyset
from callconv.protection.storage import Area, open_for_read, sealer_for
from callconv.schema import crm_sales, metadata, sealed_generations
from callconv.warehouse import create_engine

pytestmark = pytest.mark.integration

ACCOUNTS = ("acme", "other")
DAY = date(2026, 11, 27)
WINDOW = (datetime(2026, 11, 27, tzinfo=UTC), datetime(2026, 11, 28, tzinfo=UTC))
HEADER = ["id", "phone", "sold_at", "outcome", "notes"]
NUMBERS = ("+4791234567", "91234567", "+4791299999")
FILLER = "x" * 8000  # an unmapped column: 400 rows make the archive copy 3 MiB, four Tink segments
CLASSES = ("archive", "quarantine", "export")


def crm_file(account: str, extra_rows: int = 0) -> bytes:
    ids = f"{account}-{extra_rows}"  # a changed extract carries other CRM ids
    rows = [[f"{ids}-{n}", NUMBERS[n % 2], "2026-11-27 10:00:00", "sale", FILLER] for n in range(400 + extra_rows)]
    rows[3][1] = "12"  # too short: quarantined
    rows[5][2] = "whenever"  # unparseable: quarantined
    return intake_project.csv_bytes(HEADER, rows)


def make_settings(root: Path):
    return intake_project.make_settings(
        root,
        header=HEADER,
        validation={"max_bad_row_share": 1.0},
        accounts=[intake_project.account(name) for name in ACCOUNTS],
    )


class Run:
    """The stored files of the run, their newest bytes (to restore) and their older copies."""

    def __init__(self, root: Path, engine, settings, keyset, keys):
        self.root, self.engine, self.settings, self.keyset, self.keys = root, engine, settings, keyset, keys
        self.paths = {
            (account, data_class): root / data_class / account / DAY.isoformat() / name
            for account in ACCOUNTS
            for data_class, name in (
                ("archive", "deals.csv.enc"),
                ("quarantine", f"quarantine_{account}_{DAY}.csv.enc"),
                ("export", f"call_conversions_{account}_{DAY}.csv.enc"),
            )
        }
        self.older: dict = {}
        self.newest: dict = {}

    def stage(self, account: str, landing: bytes | None, **kwargs):
        if landing is not None:
            intake_project.drop(self.root, account, DAY, "deals.csv", landing)
        outcome = intake_project.take_in(
            self.engine,
            self.settings,
            self.root,
            self.keyset,
            account_id=account,
            window=WINDOW,
            keys=self.keys,
            **kwargs,
        )
        write_conversion_file(self.engine, self.settings.account(account), DAY, self.root / "export", self.keyset)
        return outcome

    def read(self, account: str, data_class: str, *, reimport: bool = True) -> bytes:
        """The file as the pipeline reads it: a reimport for the archive, the storage reader for the others.

        Only a reimport that fails is left to run: one that passes would write the day's files again.
        """
        if data_class == "archive" and reimport:
            self.stage(account, None, reimport=True)
            raise AssertionError("the reimport passed")
        area = Area(self.root / data_class, account, data_class)
        with open_for_read(self.paths[account, data_class], area, sealer_for(self.keyset, self.engine)) as stream:
            return stream.read()

    def restore(self) -> None:
        for key, blob in self.newest.items():
            self.paths[key].write_bytes(blob)


@pytest.fixture(scope="module")
def run(tmp_path_factory, pg_schema_url, session_pseudonym_keys):
    root = tmp_path_factory.mktemp("tampered")
    engine = create_engine(pg_schema_url)
    with engine.begin() as connection:  # other modules' rows out of the way
        for table in reversed(metadata.sorted_tables):
            connection.execute(table.delete())
    stored = Run(root, engine, make_settings(root), new_keyset(), session_pseudonym_keys)
    for account in ACCOUNTS:
        stored.stage(account, crm_file(account))
    stored.older = {key: path.read_bytes() for key, path in stored.paths.items()}
    for account in ACCOUNTS:  # the same day again: a changed extract of the same name, a rerun's files
        assert stored.stage(account, crm_file(account, extra_rows=1)).sales == 399
    stored.newest = {key: path.read_bytes() for key, path in stored.paths.items()}
    yield stored
    engine.dispose()


@pytest.fixture()
def stored(run):
    yield run
    run.restore()


def sales(run, account: str) -> int:
    with run.engine.connect() as connection:
        return connection.scalar(
            sa.select(sa.func.count()).select_from(crm_sales).where(crm_sales.c.account_id == account)
        )


def assert_refused(run, account: str, data_class: str, expected: str = "does not decrypt") -> str:
    """Refused with one line naming the file but no content; the file and the account's sales stay."""
    before = {path: path.read_bytes() for path in run.root.rglob("*") if path.is_file()}
    sales_before = sales(run, account)
    with pytest.raises((SealError, ExtractError)) as caught:
        run.read(account, data_class)
    message = str(caught.value)
    assert "\n" not in message and expected in message, message
    assert f"{data_class} file '{DAY.isoformat()}/" in message and f"of account '{account}'" in message
    assert not any(number in message for number in NUMBERS) and FILLER[:20] not in message
    after = {path: path.read_bytes() for path in run.root.rglob("*") if path.is_file()}
    assert after == before  # nothing deleted, moved or rewritten
    assert sales(run, account) == sales_before
    return message


def test_the_run_stored_every_file_sealed_at_generation_2_and_each_reads(stored):
    table = sealed_generations.c
    with stored.engine.connect() as connection:
        rows = connection.execute(
            sa.select(table.account_id, table.data_class, table.generation).where(table.data_class.in_(CLASSES))
        ).all()
    generations = {(account, data_class): generation for account, data_class, generation in rows}
    assert len(rows) == len(generations) and generations == {
        (account, data_class): 2 for account in ACCOUNTS for data_class in CLASSES
    }
    for key, path in stored.paths.items():
        assert stored.older[key] != stored.newest[key] and not any(n.encode() in path.read_bytes() for n in NUMBERS)
    assert len(stored.newest["acme", "archive"]) > 3 * 1024 * 1024
    exported = stored.read("acme", "export").decode()
    assert exported.startswith("Parameters:TimeZone=UTC")
    quarantined = list(csv.DictReader(io.StringIO(stored.read("other", "quarantine").decode())))
    reasons = sorted(row["reason"] for row in quarantined)  # the bad rows of both extracts
    assert reasons == ["phone_too_short", "phone_too_short", "time_unparseable", "time_unparseable"]
    assert stored.read("acme", "archive", reimport=False) == crm_file("acme", extra_rows=1)
    assert sales(stored, "acme") == 398 + 399  # both extracts' sales


@pytest.mark.parametrize("data_class", CLASSES)
def test_truncation_is_refused(stored, data_class):
    for account in ACCOUNTS:
        blob = stored.newest[account, data_class]
        for cut in (len(blob) - 1, len(blob) // 2, 40, 0):
            stored.paths[account, data_class].write_bytes(blob[:cut])
            assert_refused(stored, account, data_class)


@pytest.mark.parametrize("data_class", CLASSES)
def test_a_bit_flip_is_refused(stored, data_class):
    blob = bytearray(stored.newest["acme", data_class])
    for position in (0, 20, len(blob) // 2, len(blob) - 1):
        flipped = bytearray(blob)
        flipped[position] ^= 0x01
        stored.paths["acme", data_class].write_bytes(bytes(flipped))
        assert_refused(stored, "acme", data_class)


def test_reordered_segments_are_refused(stored):
    blob = stored.newest["acme", "archive"]
    segment, header = 1 << 20, blob[0]
    first_end = segment - header  # Tink's first segment is shorter by the header
    second, third = blob[first_end : first_end + segment], blob[first_end + segment : first_end + 2 * segment]
    assert len(second) == len(third) == segment and second != third
    stored.paths["acme", "archive"].write_bytes(blob[:first_end] + third + second + blob[first_end + 2 * segment :])
    assert_refused(stored, "acme", "archive")


@pytest.mark.parametrize("data_class", CLASSES)
def test_swapping_two_accounts_files_is_refused(stored, data_class):
    acme, other = stored.paths["acme", data_class], stored.paths["other", data_class]
    acme.write_bytes(stored.newest["other", data_class])
    other.write_bytes(stored.newest["acme", data_class])
    assert_refused(stored, "acme", data_class)
    assert_refused(stored, "other", data_class)


@pytest.mark.parametrize("data_class", CLASSES)
def test_rollback_to_an_older_copy_of_the_same_path_is_refused(stored, data_class):
    stored.paths["acme", data_class].write_bytes(stored.older["acme", data_class])
    assert_refused(stored, "acme", data_class, "does not decrypt as generation 2 or 3")


@pytest.mark.parametrize("data_class", CLASSES)
def test_plaintext_or_the_old_format_under_enc_is_refused(stored, data_class):
    path = stored.paths["acme", data_class]
    path.write_bytes(crm_file("acme"))  # plaintext with phone numbers
    assert_refused(stored, "acme", data_class)
    path.write_bytes(b"CCENC\x01\x07legacy1" + bytes(64))  # the retired format: migrate it first
    message = assert_refused(stored, "acme", data_class, "old CCENC format")
    assert "python -m callconv.protection.sealed migrate" in message


def test_a_file_moved_to_another_day_is_refused(stored):
    moved = stored.root / "export" / "acme" / "2026-11-28" / f"call_conversions_acme_{DAY}.csv.enc"
    moved.parent.mkdir(parents=True)
    shutil.copy(stored.paths["acme", "export"], moved)
    with pytest.raises(SealError, match="export file '2026-11-28/call_conversions_acme_2026-11-27.csv'"):
        area = Area(stored.root / "export", "acme", "export")
        open_for_read(moved, area, sealer_for(stored.keyset, stored.engine))
    assert moved.exists()
    moved.unlink()
