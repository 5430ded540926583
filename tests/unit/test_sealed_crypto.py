"""Tampering tests for sealed files (issue 13, hole 6): each attack must fail with a clean error."""

from __future__ import annotations

import os
import shutil

import pytest

from callconv import crypto, sealed

# 3 MiB and a bit: four 1 MiB segments, so reordering and truncation hit real segment borders.
PLAINTEXT = b"caller_phone,conversion_time\n+4791234567,2026-11-20 10:00:00\n" * 52_000
NUMBER = "+4791234567"


@pytest.fixture(scope="module")
def keyset():
    return sealed.new_keyset()


def _write(tmp_path, keyset, account="acme", data_class="archive", logical="2026-11-20/sales.csv.enc", data=PLAINTEXT):
    area = tmp_path / account
    sealed.write_sealed(area, account, data_class, logical, data, keyset)
    return area, area / data_class / logical


def _assert_refused(call):
    with pytest.raises(sealed.SealError) as caught:
        call()
    assert NUMBER not in str(caught.value)
    assert "does not decrypt" in str(caught.value)


def test_round_trip_and_binding(tmp_path, keyset):
    area, path = _write(tmp_path, keyset)
    assert sealed.read_sealed(area, "acme", "archive", "2026-11-20/sales.csv.enc", keyset) == PLAINTEXT
    assert NUMBER.encode() not in path.read_bytes()


def test_truncation(tmp_path, keyset):
    area, path = _write(tmp_path, keyset)
    blob = path.read_bytes()
    for cut in (len(blob) - 1, len(blob) - 16, 1 << 20, 40):
        path.write_bytes(blob[:cut])
        _assert_refused(lambda: sealed.read_sealed(area, "acme", "archive", "2026-11-20/sales.csv.enc", keyset))


def test_segment_reordering(tmp_path, keyset):
    area, path = _write(tmp_path, keyset)
    blob = path.read_bytes()
    # Tink's 1 MiB segments: the first is shorter by the header; swap the 2nd and 3rd segments.
    segment = 1 << 20
    header_len = blob[0]
    first_end = segment - header_len
    second, third = blob[first_end : first_end + segment], blob[first_end + segment : first_end + 2 * segment]
    assert len(second) == len(third) == segment
    path.write_bytes(blob[:first_end] + third + second + blob[first_end + 2 * segment :])
    _assert_refused(lambda: sealed.read_sealed(area, "acme", "archive", "2026-11-20/sales.csv.enc", keyset))


@pytest.mark.parametrize("offset", [0, 5, 100, 1 << 20, -1])
def test_bit_flip(tmp_path, keyset, offset):
    area, path = _write(tmp_path, keyset)
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x01
    path.write_bytes(bytes(blob))
    _assert_refused(lambda: sealed.read_sealed(area, "acme", "archive", "2026-11-20/sales.csv.enc", keyset))


def test_swapping_two_accounts_files(tmp_path, keyset):
    acme, acme_file = _write(tmp_path, keyset, account="acme")
    other, other_file = _write(tmp_path, keyset, account="other", data=b"other's data\n")
    acme_blob = acme_file.read_bytes()
    acme_file.write_bytes(other_file.read_bytes())
    other_file.write_bytes(acme_blob)
    _assert_refused(lambda: sealed.read_sealed(acme, "acme", "archive", "2026-11-20/sales.csv.enc", keyset))
    _assert_refused(lambda: sealed.read_sealed(other, "other", "archive", "2026-11-20/sales.csv.enc", keyset))
    # the ledgers are bound to their accounts too
    shutil.copy(other / sealed.LEDGER_NAME, acme / sealed.LEDGER_NAME)
    _assert_refused(lambda: sealed.GenerationLedger(acme, "acme", keyset))


def test_move_to_another_day_or_class(tmp_path, keyset):
    area, path = _write(tmp_path, keyset)
    sealed.write_sealed(area, "acme", "archive", "2026-11-21/sales.csv.enc", b"next day\n", keyset)
    sealed.write_sealed(area, "acme", "quarantine", "2026-11-20/sales.csv.enc", b"q\n", keyset)
    shutil.copy(path, area / "archive/2026-11-21/sales.csv.enc")
    shutil.copy(path, area / "quarantine/2026-11-20/sales.csv.enc")
    _assert_refused(lambda: sealed.read_sealed(area, "acme", "archive", "2026-11-21/sales.csv.enc", keyset))
    _assert_refused(lambda: sealed.read_sealed(area, "acme", "quarantine", "2026-11-20/sales.csv.enc", keyset))


def test_rollback_to_an_older_copy(tmp_path, keyset):
    area, path = _write(tmp_path, keyset, data=b"first version\n")
    old_blob = path.read_bytes()
    sealed.write_sealed(area, "acme", "archive", "2026-11-20/sales.csv.enc", b"second version\n", keyset)
    assert sealed.read_sealed(area, "acme", "archive", "2026-11-20/sales.csv.enc", keyset) == b"second version\n"
    path.write_bytes(old_blob)
    _assert_refused(lambda: sealed.read_sealed(area, "acme", "archive", "2026-11-20/sales.csv.enc", keyset))


def test_plaintext_named_enc(tmp_path, keyset):
    area, path = _write(tmp_path, keyset)
    path.write_bytes(PLAINTEXT)
    _assert_refused(lambda: sealed.read_sealed(area, "acme", "archive", "2026-11-20/sales.csv.enc", keyset))


def test_rotation_keeps_old_files_readable(tmp_path, keyset):
    area, _ = _write(tmp_path, keyset, data=b"under the old key\n")
    rotated = sealed.keyset_from_json(sealed.keyset_to_json(sealed.rotate_keyset(keyset)))
    old_info, new_info = keyset.keyset_info(), rotated.keyset_info()
    assert new_info.primary_key_id != old_info.primary_key_id
    assert len(new_info.key_info) == 2
    assert sealed.read_sealed(area, "acme", "archive", "2026-11-20/sales.csv.enc", rotated) == b"under the old key\n"
    sealed.write_sealed(area, "acme", "export", "2026-11-20/conversions.csv.enc", b"new\n", rotated)
    assert sealed.read_sealed(area, "acme", "export", "2026-11-20/conversions.csv.enc", rotated) == b"new\n"
    # the old keyset alone cannot read what the new primary wrote
    _assert_refused(lambda: sealed.read_sealed(area, "acme", "export", "2026-11-20/conversions.csv.enc", keyset))
    assert {info.key_id for info in new_info.key_info} >= {old_info.primary_key_id}


def test_keyset_from_env_and_bad_keyset(monkeypatch, keyset):
    monkeypatch.setenv(sealed.KEYSET_ENV_VAR, sealed.keyset_to_json(keyset))
    blob = sealed.seal_bytes(b"x", keyset, sealed.Binding("acme", "docs", "a.html", 1))
    assert sealed.open_sealed_bytes(blob, sealed.keyset_from_env(), sealed.Binding("acme", "docs", "a.html", 1)) == b"x"
    monkeypatch.setenv(sealed.KEYSET_ENV_VAR, '{"primary": "k", "keys": {}}')
    with pytest.raises(sealed.SealError, match="not a Tink JSON keyset"):
        sealed.keyset_from_env()


def test_binding_refuses_paths_leaving_the_area():
    with pytest.raises(sealed.SealError):
        sealed.Binding("acme", "archive", "../other/x.enc", 1)
    with pytest.raises(sealed.SealError):
        sealed.Binding("acme", "secret", "x.enc", 1)


def test_migrate_command_rewrites_old_files(tmp_path, monkeypatch, keyset):
    legacy = crypto.Keyring({"2026-01": os.urandom(32)}, "2026-01")
    area = tmp_path / "acme"
    old = area / "archive/2026-11-20/sales.csv.enc"
    old.parent.mkdir(parents=True)
    old.write_bytes(crypto.encrypt_bytes(PLAINTEXT, legacy))
    monkeypatch.setenv(sealed.KEYSET_ENV_VAR, sealed.keyset_to_json(keyset))
    monkeypatch.setenv(sealed.LEGACY_KEYS_ENV_VAR, legacy.to_text())
    assert sealed.main(["migrate", "--area", str(area), "--account", "acme", "--data-class", "archive"]) == 0
    assert not crypto.is_encrypted(old)
    assert sealed.read_sealed(area, "acme", "archive", "2026-11-20/sales.csv.enc", keyset) == PLAINTEXT
    # a second run finds nothing left in the old format and changes nothing
    assert sealed.migrate(area, "acme", "archive", keyset, legacy) == []
    assert sealed.read_sealed(area, "acme", "archive", "2026-11-20/sales.csv.enc", keyset) == PLAINTEXT
