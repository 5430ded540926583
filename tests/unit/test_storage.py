"""The storage helpers every stored file goes through: encryption, key rotation, key lookup."""

from __future__ import annotations

import io
import json
import logging

import pytest

from callconv.config import parse_settings
from callconv.crypto import MAGIC, DecryptionError, Keyring, KeyringError, UnknownKeyError, decrypt_bytes
from callconv.storage import (
    EncryptionKeyMissing,
    StorageError,
    keyring_for,
    open_for_read,
    plain_name,
    store,
    store_tree,
    stored_name,
)

OLD_KEY = bytes(range(32))
NEW_KEY = bytes(range(100, 132))
PHONE = b"+4791234567"
ROW = PHONE + b",2026-11-27 09:00:00,Phone sale,2026-11-27 10:00:00,1234.5,NOK\r\n"


@pytest.fixture()
def old_keyring() -> Keyring:
    return Keyring({"2026-01": OLD_KEY}, "2026-01")


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


def header_key_id(blob: bytes) -> str:
    return blob[len(MAGIC) + 1 : len(MAGIC) + 1 + blob[len(MAGIC)]].decode()


# --------------------------------------------------------------------------- store and read


@pytest.mark.parametrize("form", ["bytes", "stream", "iterable"])
def test_store_encrypts_and_open_for_read_streams_it_back(tmp_path, old_keyring, form):
    data = ROW * 50_000  # about 3.5 MB: several encrypted chunks
    given = {
        "bytes": data,
        "stream": io.BytesIO(data),
        "iterable": (data[start : start + 70_000] for start in range(0, len(data), 70_000)),
    }[form]
    path = tmp_path / "acme" / "2026-11-27" / stored_name("conversions.csv", old_keyring)

    store(path, given, old_keyring)

    assert path.name == "conversions.csv.enc" and plain_name(path.name) == "conversions.csv"
    blob = path.read_bytes()
    assert blob.startswith(MAGIC) and PHONE not in blob
    with open_for_read(path, old_keyring) as stream:
        assert stream.read(len(ROW)) == ROW  # a stream: the first row before the rest
        assert stream.read() == data[len(ROW) :]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


def test_without_a_keyring_files_are_stored_as_they_are(tmp_path):
    path = tmp_path / stored_name("conversions.csv", None)
    store(path, ROW, None)
    assert path.name == "conversions.csv"
    assert path.read_bytes() == ROW
    with open_for_read(path, None) as stream:
        assert stream.read() == ROW


def test_a_plaintext_file_is_read_as_it_is_even_with_a_keyring(tmp_path, old_keyring):
    path = tmp_path / "dropped.csv"
    path.write_bytes(ROW)
    with open_for_read(path, old_keyring) as stream:
        assert stream.read() == ROW


def test_an_encrypted_file_without_a_keyring_is_a_clear_error(tmp_path, old_keyring):
    path = tmp_path / "conversions.csv.enc"
    store(path, ROW, old_keyring)
    with pytest.raises(StorageError, match=r"conversions\.csv\.enc is encrypted but no encryption keyring is set"):
        open_for_read(path, None)


@pytest.mark.parametrize("content", [ROW, b"", MAGIC[:3]], ids=["plaintext", "empty", "cut_in_the_header"])
@pytest.mark.parametrize("with_keyring", [True, False])
def test_a_file_named_enc_that_is_not_encrypted_is_never_read_as_plaintext(
    tmp_path, old_keyring, content, with_keyring
):
    path = tmp_path / "conversions.csv.enc"
    path.write_bytes(content)
    with pytest.raises(StorageError) as caught:
        open_for_read(path, old_keyring if with_keyring else None)
    message = str(caught.value)
    assert message.startswith("conversions.csv.enc is named as encrypted but is not an encrypted file")
    assert "\n" not in message and PHONE.decode() not in message


def test_store_tree_encrypts_every_file_under_its_relative_name(tmp_path, old_keyring):
    site = tmp_path / "site"
    (site / "validations" / "run").mkdir(parents=True)
    (site / "index.html").write_text("<html>index</html>")
    (site / "validations" / "run" / "page.html").write_text("<html>refund</html>")

    assert store_tree(site, tmp_path / "docs", old_keyring) == 2

    stored = sorted(p.relative_to(tmp_path / "docs").as_posix() for p in (tmp_path / "docs").rglob("*") if p.is_file())
    assert stored == ["index.html.enc", "validations/run/page.html.enc"]
    page = tmp_path / "docs" / "validations" / "run" / "page.html.enc"
    assert page.read_bytes().startswith(MAGIC)
    assert decrypt_bytes(page.read_bytes(), old_keyring) == b"<html>refund</html>"


def test_store_as_replaces_the_file_left_in_the_other_form(tmp_path, old_keyring):
    from callconv.storage import store_as

    plain = store_as(tmp_path, "quarantine.csv", ROW, None)  # while encryption was off
    assert plain.name == "quarantine.csv"
    sealed = store_as(tmp_path, "quarantine.csv", ROW, old_keyring)  # once it is on
    assert [p.name for p in tmp_path.iterdir()] == ["quarantine.csv.enc"] == [sealed.name]


# --------------------------------------------------------------------------- key rotation


def test_files_written_with_the_old_key_still_read_after_a_new_primary_is_added(tmp_path, old_keyring):
    old_file = tmp_path / "old.csv.enc"
    store(old_file, ROW, old_keyring)

    rotated = old_keyring.rotated("2026-11", NEW_KEY)  # the new key becomes primary, the old one stays
    new_file = tmp_path / "new.csv.enc"
    store(new_file, ROW * 2, rotated)

    assert rotated.primary == "2026-11"
    assert header_key_id(old_file.read_bytes()) == "2026-01"
    assert header_key_id(new_file.read_bytes()) == "2026-11"
    with open_for_read(old_file, rotated) as stream:
        assert stream.read() == ROW
    with open_for_read(new_file, rotated) as stream:
        assert stream.read() == ROW * 2
    # Keys may leave the keyring only once no stored file uses them; one that is gone says which.
    with pytest.raises(UnknownKeyError, match="'2026-01'"):
        open_for_read(old_file, Keyring({"2026-11": NEW_KEY}, "2026-11"))
    # A keyring from before the rotation cannot read the new files.
    with pytest.raises(UnknownKeyError, match="'2026-11'"):
        open_for_read(new_file, old_keyring)


def test_a_file_rewritten_after_rotation_uses_the_new_key(tmp_path, old_keyring):
    path = tmp_path / "conversions.csv.enc"
    store(path, ROW, old_keyring)
    rotated = old_keyring.rotated("2026-11", NEW_KEY)
    with open_for_read(path, rotated) as stream:
        store(path, stream.read(), rotated)
    assert header_key_id(path.read_bytes()) == "2026-11"
    with pytest.raises(DecryptionError):
        open_for_read(path, old_keyring)


# --------------------------------------------------------------------------- finding the keyring


def test_encryption_is_required_unless_the_config_opts_out_as_the_demo_does():
    from callconv.config import DEFAULT_CONFIG_PATH, load_settings

    default = settings()
    assert (default.encryption.required, default.encryption.keys_conn_id) == (True, "call_conversions_encryption")
    assert (default.archive_uri, default.quarantine_uri) == ("var/archive", "var/quarantine")
    assert (default.crm_source.max_file_mb, default.crm_source.chunk_rows) == (1024, 100_000)
    demo = load_settings(DEFAULT_CONFIG_PATH)
    assert demo.encryption.required is False
    assert "required: false" in DEFAULT_CONFIG_PATH.read_text(encoding="utf-8")  # explicit, not a default


def test_required_encryption_without_a_keyring_refuses_with_one_line(monkeypatch):
    monkeypatch.delenv("CALL_CONVERSIONS_ENCRYPTION_KEYS", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_CALL_CONVERSIONS_ENCRYPTION", raising=False)
    with pytest.raises(EncryptionKeyMissing) as caught:
        keyring_for(settings())  # required is the default
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("encryption is required (encryption.required: true) but no keyring is set")
    assert "Airflow connection 'call_conversions_encryption'" in message
    assert "CALL_CONVERSIONS_ENCRYPTION_KEYS" in message


def test_plaintext_only_when_the_config_says_so_and_then_a_warning(monkeypatch, caplog):
    monkeypatch.delenv("CALL_CONVERSIONS_ENCRYPTION_KEYS", raising=False)
    caplog.set_level(logging.WARNING, logger="callconv")
    assert keyring_for(settings(required=False)) is None
    [record] = [r for r in caplog.records if r.name == "callconv.storage"]
    assert record.levelno == logging.WARNING
    assert "files are stored in plaintext because encryption is disabled in the config" in record.getMessage()


def test_keyring_from_the_environment_variable(monkeypatch, old_keyring):
    monkeypatch.setenv("CALL_CONVERSIONS_ENCRYPTION_KEYS", old_keyring.to_text())
    assert keyring_for(settings()) == old_keyring
    assert keyring_for(settings(required=False)) == old_keyring  # a keyring that is set is always used


def test_keyring_from_the_airflow_connection_comes_first(monkeypatch, old_keyring):
    rotated = old_keyring.rotated("2026-11", NEW_KEY)
    monkeypatch.setenv("CALL_CONVERSIONS_ENCRYPTION_KEYS", old_keyring.to_text())
    monkeypatch.setenv(
        "AIRFLOW_CONN_PIPELINE_KEYS", json.dumps({"conn_type": "generic", "password": rotated.to_text()})
    )
    assert keyring_for(settings(keys_conn_id="pipeline_keys")) == rotated


def test_a_malformed_keyring_is_an_error_even_when_encryption_is_optional(monkeypatch):
    monkeypatch.setenv("CALL_CONVERSIONS_ENCRYPTION_KEYS", '{"keys": {"a": "too-short"}}')
    with pytest.raises(KeyringError, match="CALL_CONVERSIONS_ENCRYPTION_KEYS"):
        keyring_for(settings(required=False))


# --------------------------------------------------------------------------- decrypting by hand, retention


def test_cli_decrypts_one_file_or_a_whole_folder(tmp_path, monkeypatch, old_keyring, capsys):
    from callconv.crypto import main

    monkeypatch.setenv("CALL_CONVERSIONS_ENCRYPTION_KEYS", old_keyring.to_text())
    export = tmp_path / "export" / "conversions.csv.enc"
    store(export, ROW, old_keyring)
    assert main(["decrypt", str(export), str(tmp_path / "for-upload.csv")]) == 0
    assert (tmp_path / "for-upload.csv").read_bytes() == ROW

    site = tmp_path / "site"
    (site / "static").mkdir(parents=True)
    (site / "index.html").write_text("<html>index</html>")
    (site / "static" / "style.css").write_text("body {}")
    store_tree(site, tmp_path / "docs", old_keyring)
    (tmp_path / "docs" / "README.txt").write_text("not encrypted")
    assert main(["decrypt", str(tmp_path / "docs"), str(tmp_path / "view")]) == 0
    assert (tmp_path / "view" / "index.html").read_text() == "<html>index</html>"
    assert (tmp_path / "view" / "static" / "style.css").read_text() == "body {}"
    assert not (tmp_path / "view" / "README.txt").exists()
    assert "decrypted 2 files" in capsys.readouterr().err
    assert oct((tmp_path / "view" / "index.html").stat().st_mode & 0o777) == "0o600"  # decrypted: owner only


def test_archive_copies_and_quarantine_exports_have_a_retention_class(tmp_path):
    from datetime import date

    from callconv.retention import purge_stored_files, stored_file_roots

    shipped = settings()
    assert stored_file_roots(shipped, "landing") == ("var/landing", "var/archive")
    assert stored_file_roots(shipped, "quarantine") == ("var/quarantine",)
    assert stored_file_roots(shipped, "conversion_files") == ("var/export",)
    assert stored_file_roots(shipped, "warehouse") == ()

    roots = [tmp_path / "landing", tmp_path / "archive"]
    for root in roots:
        for day in ("2026-08-01", "2026-11-01"):
            store(root / "acme" / day / "deals.csv.enc", b"x", None)
    purged = purge_stored_files(roots, shipped.account("acme"), "landing", date(2026, 9, 1))
    assert purged.affected == 2
    assert [sorted(p.name for p in (root / "acme").iterdir()) for root in roots] == [["2026-11-01"]] * 2
