"""The storage helpers every stored file goes through: sealing, binding, generations, rotation, key lookup.

The generation counter lives in a warehouse table; here it is a SQLite file with the
project's schema (the integration tests run the same code on PostgreSQL).
"""

from __future__ import annotations

import io
import json
import logging

import pytest
import sqlalchemy as sa

from callconv.config import parse_settings
from callconv.protection import sealed
from callconv.protection.sealed import SealError
from callconv.protection.storage import (
    Area,
    EncryptionKeyMissing,
    StorageError,
    keyset_for,
    open_for_read,
    plain_name,
    sealer_for,
    store,
    store_as,
    store_tree,
    stored_name,
)
from callconv.schema import metadata, sealed_generations

PHONE = b"+4791234567"
ROW = PHONE + b",2026-11-27 09:00:00,Phone sale,2026-11-27 10:00:00,1234.5,NOK\r\n"
DAY = "2026-11-27"
TINK_HEADER_LENGTH = 40


@pytest.fixture(scope="module")
def keyset():
    return sealed.new_keyset()


@pytest.fixture()
def engine(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'warehouse.db'}")
    metadata.create_all(engine, tables=[sealed_generations])
    yield engine
    engine.dispose()


@pytest.fixture()
def sealer(keyset, engine):
    return sealer_for(keyset, engine)


def export_area(tmp_path, account="acme"):
    return Area(tmp_path / "export", account, "export")


def read(path, area, sealer) -> bytes:
    with open_for_read(path, area, sealer) as stream:
        return stream.read()


def generation(engine, area, logical) -> int:
    with engine.connect() as connection:
        return connection.scalar(
            sa.select(sealed_generations.c.generation).where(
                sealed_generations.c.account_id == area.account_id,
                sealed_generations.c.data_class == area.data_class,
                sealed_generations.c.logical_path == logical,
            )
        )


def settings(**encryption):
    raw = {
        "crm_source": {"columns": {"caller_phone": "p", "conversion_time": "t", "outcome": "o"}},
        "accounts": [
            {
                "id": "acme",
                "customer_id": "1112223333",
                "timezone": "UTC",
                "default_region": "NO",
                "default_currency": "NOK",
                "conversion_actions": {"sale": {"id": "1", "name": "Sale"}},
            }
        ],
    }
    if encryption:
        raw["encryption"] = encryption
    return parse_settings(raw)


# --------------------------------------------------------------------------- store and read


@pytest.mark.parametrize("form", ["bytes", "stream", "iterable"])
def test_store_seals_and_open_for_read_streams_it_back(tmp_path, sealer, engine, form):
    data = ROW * 50_000  # about 3.5 MB: several 1 MiB segments
    given = {
        "bytes": data,
        "stream": io.BytesIO(data),
        "iterable": (data[start : start + 70_000] for start in range(0, len(data), 70_000)),
    }[form]
    area = export_area(tmp_path)

    path = store(area, f"{DAY}/conversions.csv", given, sealer)

    assert path == tmp_path / "export" / "acme" / DAY / "conversions.csv.enc"
    assert plain_name(path.name) == "conversions.csv" and area.logical(path) == f"{DAY}/conversions.csv"
    blob = path.read_bytes()
    assert blob[0] == TINK_HEADER_LENGTH and PHONE not in blob
    with open_for_read(path, area, sealer) as stream:
        assert stream.read(len(ROW)) == ROW  # a stream: the first row before the rest
        assert stream.read() == data[len(ROW) :]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    assert generation(engine, area, f"{DAY}/conversions.csv") == 1
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_without_a_keyset_files_are_stored_as_they_are(tmp_path):
    area = export_area(tmp_path)
    path = store(area, f"{DAY}/conversions.csv", ROW, None)
    assert path.name == stored_name("conversions.csv", None) == "conversions.csv"
    assert path.read_bytes() == ROW
    assert read(path, area, None) == ROW


def test_a_plainly_named_file_is_read_as_it_is_even_with_a_keyset(tmp_path, sealer):
    path = tmp_path / "landing" / "acme" / DAY / "dropped.csv"
    path.parent.mkdir(parents=True)
    path.write_bytes(ROW)
    assert read(path, Area(tmp_path / "landing", "acme", "landing"), sealer) == ROW


def test_a_sealed_file_without_a_keyset_is_a_clear_error(tmp_path, sealer):
    area = export_area(tmp_path)
    path = store(area, f"{DAY}/conversions.csv", ROW, sealer)
    with pytest.raises(StorageError, match=r"conversions\.csv\.enc is sealed but no encryption keyset is set"):
        open_for_read(path, area, None)


@pytest.mark.parametrize(
    "content", [ROW, b"", b"CCENC\x01" + bytes(40)], ids=["plaintext", "empty", "old_ccenc_format"]
)
def test_a_file_named_enc_is_never_read_as_plaintext_or_in_the_old_format(tmp_path, sealer, content):
    area = export_area(tmp_path)
    store(area, f"{DAY}/conversions.csv", ROW, sealer)  # the path has a generation: 1
    path = tmp_path / "export" / "acme" / DAY / "conversions.csv.enc"
    path.write_bytes(content)
    with pytest.raises(SealError) as caught:
        read(path, area, sealer)
    message = str(caught.value)
    assert "\n" not in message and PHONE.decode() not in message
    assert message.startswith(f"export file '{DAY}/conversions.csv' of account 'acme' ")
    if content.startswith(b"CCENC"):
        assert "old CCENC format" in message and "python -m callconv.protection.sealed migrate" in message
    else:
        assert "does not decrypt as generation 1 or 2" in message
    assert path.read_bytes() == content  # refused, not removed


def test_store_tree_binds_every_file_to_its_relative_path(tmp_path, sealer, engine):
    site = tmp_path / "site"
    (site / "validations" / "run").mkdir(parents=True)
    (site / "index.html").write_text("<html>index</html>")
    (site / "validations" / "run" / "page.html").write_text("<html>refund</html>")
    area = Area(tmp_path / "docs", "acme", "docs")

    assert store_tree(site, area, DAY, sealer) == 2

    folder = tmp_path / "docs" / "acme" / DAY
    stored = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert stored == ["index.html.enc", "validations/run/page.html.enc"]
    page, index = folder / "validations" / "run" / "page.html.enc", folder / "index.html.enc"
    assert read(page, area, sealer) == b"<html>refund</html>"
    assert generation(engine, area, f"{DAY}/validations/run/page.html") == 1
    index.write_bytes(page.read_bytes())  # one page of the site over another: refused
    with pytest.raises(SealError, match=f"docs file '{DAY}/index.html' of account 'acme' does not decrypt"):
        read(index, area, sealer)


def test_store_as_replaces_the_file_left_in_the_other_form(tmp_path, sealer):
    area = Area(tmp_path / "quarantine", "acme", "quarantine")
    plain = store_as(area, DAY, "quarantine.csv", ROW, None)  # while encryption was off
    assert plain.name == "quarantine.csv"
    sealed_path = store_as(area, DAY, "quarantine.csv", ROW, sealer)  # once it is on
    assert [p.name for p in sealed_path.parent.iterdir()] == ["quarantine.csv.enc"] == [sealed_path.name]


def test_the_landing_area_is_never_written(tmp_path, sealer):
    with pytest.raises(StorageError, match="the landing area is the CRM's"):
        store(Area(tmp_path, "acme", "landing"), f"{DAY}/deals.csv", ROW, sealer)


# --------------------------------------------------------------------------- generations


def test_each_write_takes_the_next_generation_and_an_older_copy_is_refused(tmp_path, sealer, engine):
    area = export_area(tmp_path)
    path = store(area, f"{DAY}/conversions.csv", ROW, sealer)
    first = path.read_bytes()
    store(area, f"{DAY}/conversions.csv", ROW * 2, sealer)
    assert generation(engine, area, f"{DAY}/conversions.csv") == 2
    assert read(path, area, sealer) == ROW * 2

    path.write_bytes(first)  # rolled back to the copy of generation 1
    with pytest.raises(SealError, match="does not decrypt as generation 2 or 3: .*rolled back"):
        read(path, area, sealer)
    assert path.read_bytes() == first


def test_a_crash_between_the_rename_and_the_commit_leaves_the_file_readable(tmp_path, sealer, engine):
    """Step 3 (the counter's commit) lost: the file is one generation ahead; it reads, and the counter catches up."""
    area = export_area(tmp_path)
    logical = f"{DAY}/conversions.csv"
    path = store(area, logical, ROW, sealer)
    older = path.read_bytes()
    store(area, logical, ROW * 20_000, sealer)  # two 1 MiB segments
    with engine.begin() as connection:  # as if the second write's commit never happened
        connection.execute(sealed_generations.update().values(generation=1))

    newest = path.read_bytes()
    path.write_bytes(newest[:-1])  # its end cut off: its first segment opens, the last is refused
    with pytest.raises(SealError, match="does not decrypt as generation 2:"):
        read(path, area, sealer)
    assert generation(engine, area, logical) == 1  # and the counter did not move
    path.write_bytes(newest)
    assert read(path, area, sealer) == ROW * 20_000
    assert generation(engine, area, logical) == 2  # caught up by the read
    path.write_bytes(older)
    with pytest.raises(SealError, match="rolled back"):
        read(path, area, sealer)

    first = store(area, f"{DAY}/first.csv", ROW, sealer)
    with engine.begin() as connection:  # the very first write's commit lost: no row at all
        connection.execute(sealed_generations.delete().where(sealed_generations.c.logical_path == f"{DAY}/first.csv"))
    assert read(first, area, sealer) == ROW
    assert generation(engine, area, f"{DAY}/first.csv") == 1


def test_a_failed_write_leaves_the_file_and_its_generation_as_they_were(tmp_path, sealer, engine):
    area = export_area(tmp_path)
    logical = f"{DAY}/conversions.csv"
    path = store(area, logical, ROW, sealer)

    def exploding():
        yield ROW
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store(area, logical, exploding(), sealer)
    assert generation(engine, area, logical) == 1
    assert read(path, area, sealer) == ROW
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_within_a_transaction_the_generation_commits_or_rolls_back_with_it(tmp_path, sealer, engine):
    """Data Docs are stored inside the intake's transaction: on SQLite a transaction of their own would
    wait for its write lock. Rolled back, the file is one generation ahead and still reads."""
    area = Area(tmp_path / "docs", "acme", "docs")
    logical = f"{DAY}/index.html"
    with engine.begin() as connection:
        connection.execute(
            sealed_generations.insert().values(account_id="x", data_class="docs", logical_path="y", generation=1)
        )
        path = store(area, logical, b"<html>1</html>", sealer.within(connection))  # the lock is already ours
    assert generation(engine, area, logical) == 1

    with pytest.raises(RuntimeError, match="extract rejected"), engine.begin() as connection:
        store(area, logical, b"<html>2</html>", sealer.within(connection))
        raise RuntimeError("extract rejected")  # the intake's transaction rolls back
    assert generation(engine, area, logical) == 1
    assert read(path, area, sealer) == b"<html>2</html>"  # generation 2 on disk, 1 recorded: accepted
    assert generation(engine, area, logical) == 2  # and the counter caught up


# --------------------------------------------------------------------------- key rotation


def test_rotation_keeps_old_files_readable_and_new_files_use_the_new_primary(tmp_path, keyset, engine):
    area = export_area(tmp_path)
    old_file = store(area, f"{DAY}/old.csv", ROW, sealer_for(keyset, engine))

    rotated = sealed.rotate_keyset(keyset)  # a new primary key; the old one stays for reading
    new_file = store(area, f"{DAY}/new.csv", ROW * 2, sealer_for(rotated, engine))

    assert read(old_file, area, sealer_for(rotated, engine)) == ROW
    assert read(new_file, area, sealer_for(rotated, engine)) == ROW * 2
    # A keyset from before the rotation cannot read the new files.
    with pytest.raises(SealError, match="sealed with a key not in the keyset"):
        read(new_file, area, sealer_for(keyset, engine))


# --------------------------------------------------------------------------- finding the keyset


def test_encryption_is_required_unless_the_config_opts_out_as_the_demo_does():
    from callconv.config import DEFAULT_CONFIG_PATH, load_settings

    default = settings()
    assert (default.encryption.required, default.encryption.keys_conn_id) == (True, "call_conversions_encryption")
    assert (default.archive_uri, default.quarantine_uri) == ("var/archive", "var/quarantine")
    assert (default.crm_source.max_file_mb, default.crm_source.chunk_rows) == (1024, 100_000)
    demo = load_settings(DEFAULT_CONFIG_PATH)
    assert demo.encryption.required is False
    assert "required: false" in DEFAULT_CONFIG_PATH.read_text(encoding="utf-8")  # explicit, not a default


def test_required_encryption_without_a_keyset_refuses_with_one_line(monkeypatch):
    monkeypatch.delenv("CALL_CONVERSIONS_ENCRYPTION_KEYS", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_CALL_CONVERSIONS_ENCRYPTION", raising=False)
    with pytest.raises(EncryptionKeyMissing) as caught:
        keyset_for(settings())  # required is the default
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("encryption is required (encryption.required: true) but no keyset is set")
    assert "Airflow connection 'call_conversions_encryption'" in message
    assert "CALL_CONVERSIONS_ENCRYPTION_KEYS" in message


def test_plaintext_only_when_the_config_says_so_and_then_a_warning(monkeypatch, caplog):
    monkeypatch.delenv("CALL_CONVERSIONS_ENCRYPTION_KEYS", raising=False)
    caplog.set_level(logging.WARNING, logger="callconv")
    assert keyset_for(settings(required=False)) is None
    [record] = [r for r in caplog.records if r.name == "callconv.protection.storage"]
    assert record.levelno == logging.WARNING
    assert "files are stored in plaintext because encryption is disabled in the config" in record.getMessage()


def keyset_ids(handle) -> list[int]:
    return sorted(info.key_id for info in handle.keyset_info().key_info)


def test_keyset_from_the_environment_variable(monkeypatch, keyset):
    monkeypatch.setenv("CALL_CONVERSIONS_ENCRYPTION_KEYS", sealed.keyset_to_json(keyset))
    assert keyset_ids(keyset_for(settings())) == keyset_ids(keyset)
    assert keyset_ids(keyset_for(settings(required=False))) == keyset_ids(keyset)  # one that is set is always used


def test_keyset_from_the_airflow_connection_comes_first(monkeypatch, keyset):
    rotated = sealed.rotate_keyset(keyset)
    monkeypatch.setenv("CALL_CONVERSIONS_ENCRYPTION_KEYS", sealed.keyset_to_json(keyset))
    connection = {"conn_type": "generic", "password": sealed.keyset_to_json(rotated)}
    monkeypatch.setenv("AIRFLOW_CONN_PIPELINE_KEYS", json.dumps(connection))
    assert keyset_ids(keyset_for(settings(keys_conn_id="pipeline_keys"))) == keyset_ids(rotated)


def test_a_malformed_keyset_is_an_error_even_when_encryption_is_optional(monkeypatch):
    monkeypatch.setenv("CALL_CONVERSIONS_ENCRYPTION_KEYS", '{"primary": "a", "keys": {"a": "an old keyring"}}')
    with pytest.raises(SealError, match="CALL_CONVERSIONS_ENCRYPTION_KEYS is not a Tink Streaming AEAD JSON keyset"):
        keyset_for(settings(required=False))


# --------------------------------------------------------------------------- retention


def test_archive_copies_and_quarantine_exports_have_a_retention_class(tmp_path):
    from datetime import date

    from callconv.protection.retention import purge_stored_files, stored_file_roots

    shipped = settings()
    assert stored_file_roots(shipped, "landing") == ("var/landing", "var/archive")
    assert stored_file_roots(shipped, "quarantine") == ("var/quarantine",)
    assert stored_file_roots(shipped, "conversion_files") == ("var/export",)
    assert stored_file_roots(shipped, "warehouse") == ()

    roots = [tmp_path / "landing", tmp_path / "archive"]
    for root in roots:
        for day in ("2026-08-01", "2026-11-01"):
            (root / "acme" / day).mkdir(parents=True)
            (root / "acme" / day / "deals.csv.enc").write_bytes(b"x")
    purged = purge_stored_files(roots, shipped.account("acme"), "landing", date(2026, 9, 1))
    assert purged.affected == 2
    assert [sorted(p.name for p in (root / "acme").iterdir()) for root in roots] == [["2026-11-01"]] * 2
