"""Tampering tests for sealed files (issue 13, hole 6): each attack fails with a clean one-line error.

The generation counter is the warehouse table ``sealed_generations``, here in a SQLite file.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from ccenc_writer import encrypt_bytes as legacy_encrypt

from callconv.protection import crypto, sealed
from callconv.schema import metadata, sealed_generations

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# 3 MiB and a bit: four 1 MiB segments, so reordering and truncation hit real segment borders.
PLAINTEXT = b"caller_phone,conversion_time\n+4791234567,2026-11-20 10:00:00\n" * 52_000
NUMBER = "+4791234567"
LOGICAL = "2026-11-20/sales.csv"


@pytest.fixture(scope="module")
def keyset():
    return sealed.new_keyset()


@pytest.fixture()
def generations(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'warehouse.db'}")
    metadata.create_all(engine, tables=[sealed_generations])
    yield sealed.Generations(engine)
    engine.dispose()


def path_of(tmp_path, account, data_class, logical):
    return tmp_path / data_class / account / f"{logical}.enc"


def _write(tmp_path, keyset, generations, account="acme", data_class="archive", logical=LOGICAL, data=PLAINTEXT):
    path = path_of(tmp_path, account, data_class, logical)
    path.parent.mkdir(parents=True, exist_ok=True)
    sealed.write_sealed(path, io.BytesIO(data), keyset, generations, account, data_class, logical)
    return path


def _read(tmp_path, keyset, generations, account="acme", data_class="archive", logical=LOGICAL):
    path = path_of(tmp_path, account, data_class, logical)
    with sealed.read_sealed(path, keyset, generations, account, data_class, logical) as stream:
        return stream.read()


def _assert_refused(call):
    with pytest.raises(sealed.SealError) as caught:
        call()
    message = str(caught.value)
    assert NUMBER not in message and "\n" not in message
    assert "does not decrypt" in message


def test_round_trip_and_binding(tmp_path, keyset, generations):
    path = _write(tmp_path, keyset, generations)
    assert _read(tmp_path, keyset, generations) == PLAINTEXT
    assert NUMBER.encode() not in path.read_bytes()
    assert generations.current("acme", "archive", LOGICAL) == 1


def test_truncation(tmp_path, keyset, generations):
    path = _write(tmp_path, keyset, generations)
    blob = path.read_bytes()
    for cut in (len(blob) - 1, len(blob) - 16, 1 << 20, 40, 0):
        path.write_bytes(blob[:cut])
        _assert_refused(lambda: _read(tmp_path, keyset, generations))


def test_segment_reordering(tmp_path, keyset, generations):
    path = _write(tmp_path, keyset, generations)
    blob = path.read_bytes()
    # Tink's 1 MiB segments: the first is shorter by the header; swap the 2nd and 3rd segments.
    segment = 1 << 20
    header_len = blob[0]
    first_end = segment - header_len
    second, third = blob[first_end : first_end + segment], blob[first_end + segment : first_end + 2 * segment]
    assert len(second) == len(third) == segment
    path.write_bytes(blob[:first_end] + third + second + blob[first_end + 2 * segment :])
    _assert_refused(lambda: _read(tmp_path, keyset, generations))


@pytest.mark.parametrize("offset", [0, 5, 100, 1 << 20, -1])
def test_bit_flip(tmp_path, keyset, generations, offset):
    path = _write(tmp_path, keyset, generations)
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x01
    path.write_bytes(bytes(blob))
    _assert_refused(lambda: _read(tmp_path, keyset, generations))


def test_swapping_two_accounts_files(tmp_path, keyset, generations):
    acme_file = _write(tmp_path, keyset, generations, account="acme")
    other_file = _write(tmp_path, keyset, generations, account="other", data=b"other's data\n")
    acme_blob = acme_file.read_bytes()
    acme_file.write_bytes(other_file.read_bytes())
    other_file.write_bytes(acme_blob)
    _assert_refused(lambda: _read(tmp_path, keyset, generations, account="acme"))
    _assert_refused(lambda: _read(tmp_path, keyset, generations, account="other"))


def test_move_to_another_day_or_class(tmp_path, keyset, generations):
    path = _write(tmp_path, keyset, generations)
    _write(tmp_path, keyset, generations, logical="2026-11-21/sales.csv", data=b"next day\n")
    _write(tmp_path, keyset, generations, data_class="quarantine", data=b"q\n")
    shutil.copy(path, path_of(tmp_path, "acme", "archive", "2026-11-21/sales.csv"))
    shutil.copy(path, path_of(tmp_path, "acme", "quarantine", LOGICAL))
    _assert_refused(lambda: _read(tmp_path, keyset, generations, logical="2026-11-21/sales.csv"))
    _assert_refused(lambda: _read(tmp_path, keyset, generations, data_class="quarantine"))


def test_rollback_to_an_older_copy(tmp_path, keyset, generations):
    path = _write(tmp_path, keyset, generations, data=b"first version\n")
    old_blob = path.read_bytes()
    _write(tmp_path, keyset, generations, data=b"second version\n")
    _write(tmp_path, keyset, generations, data=b"third version\n")
    assert _read(tmp_path, keyset, generations) == b"third version\n"
    path.write_bytes(old_blob)
    _assert_refused(lambda: _read(tmp_path, keyset, generations))


def test_plaintext_named_enc(tmp_path, keyset, generations):
    path = _write(tmp_path, keyset, generations)
    path.write_bytes(PLAINTEXT)
    _assert_refused(lambda: _read(tmp_path, keyset, generations))


def test_landing_files_are_bound_with_generation_zero(tmp_path, keyset, generations, monkeypatch):
    """The CRM's exporter seals landing files (``seal`` command): no counter, the account and path still bind."""
    source, path = tmp_path / "deals.csv", path_of(tmp_path, "acme", "landing", LOGICAL)
    source.write_bytes(PLAINTEXT)
    path.parent.mkdir(parents=True)
    monkeypatch.setenv(sealed.KEYSET_ENV_VAR, sealed.keyset_to_json(keyset))
    assert sealed.main(["seal", "--account", "acme", "--logical-path", LOGICAL, str(source), str(path)]) == 0
    assert _read(tmp_path, keyset, generations, data_class="landing") == PLAINTEXT
    elsewhere = path_of(tmp_path, "other", "landing", LOGICAL)
    elsewhere.parent.mkdir(parents=True)
    shutil.copy(path, elsewhere)  # dropped into another account's landing folder
    _assert_refused(lambda: _read(tmp_path, keyset, generations, account="other", data_class="landing"))
    assert generations.current("acme", "landing", LOGICAL) == 0  # never counted


def test_rotation_keeps_old_files_readable(tmp_path, keyset, generations):
    _write(tmp_path, keyset, generations, data=b"under the old key\n")
    rotated = sealed.keyset_from_json(sealed.keyset_to_json(sealed.rotate_keyset(keyset)))
    old_info, new_info = keyset.keyset_info(), rotated.keyset_info()
    assert new_info.primary_key_id != old_info.primary_key_id
    assert len(new_info.key_info) == 2
    assert _read(tmp_path, rotated, generations) == b"under the old key\n"
    _write(tmp_path, rotated, generations, data_class="export", logical="2026-11-20/conversions.csv", data=b"new\n")
    assert _read(tmp_path, rotated, generations, data_class="export", logical="2026-11-20/conversions.csv") == b"new\n"
    # the old keyset alone cannot read what the new primary wrote
    _assert_refused(
        lambda: _read(tmp_path, keyset, generations, data_class="export", logical="2026-11-20/conversions.csv")
    )
    assert {info.key_id for info in new_info.key_info} >= {old_info.primary_key_id}


def test_keyset_from_env_and_bad_keyset(monkeypatch, keyset):
    monkeypatch.setenv(sealed.KEYSET_ENV_VAR, sealed.keyset_to_json(keyset))
    binding = sealed.Binding("acme", "docs", "a.html", 1)
    blob = sealed.seal_bytes(b"x", keyset, binding)
    assert sealed.open_sealed_bytes(blob, sealed.keyset_from_env(), binding) == b"x"
    monkeypatch.setenv(sealed.KEYSET_ENV_VAR, '{"primary": "k", "keys": {}}')
    with pytest.raises(sealed.SealError, match="not a Tink Streaming AEAD JSON keyset"):
        sealed.keyset_from_env()


def test_a_keyset_wrapped_by_a_master_key_unwraps(keyset):
    """Envelope encryption: production wraps the keyset with a Cloud KMS key (``wrap``); any Tink AEAD
    unwraps the same way, so a local one stands in for KMS here."""
    import tink
    from tink import aead

    aead.register()
    master = tink.new_keyset_handle(aead.aead_key_templates.AES256_GCM).primitive(aead.Aead)
    wrapped = tink.json_proto_keyset_format.serialize_encrypted(keyset, master, sealed.KMS_KEYSET_AD)
    assert sealed.keyset_to_json(keyset) not in wrapped
    binding = sealed.Binding("acme", "export", "x.csv", 1)
    unwrapped = sealed.keyset_from_wrapped(wrapped, master)
    assert sealed.open_sealed_bytes(sealed.seal_bytes(b"x", keyset, binding), unwrapped, binding) == b"x"
    other = tink.new_keyset_handle(aead.aead_key_templates.AES256_GCM).primitive(aead.Aead)
    with pytest.raises(sealed.SealError, match="does not unwrap"):
        sealed.keyset_from_wrapped(wrapped, other)


def test_binding_refuses_paths_leaving_the_area():
    with pytest.raises(sealed.SealError):
        sealed.Binding("acme", "archive", "../other/x.csv", 1)
    with pytest.raises(sealed.SealError):
        sealed.Binding("acme", "secret", "x.csv", 1)
    with pytest.raises(sealed.SealError, match="generation starts at 1"):
        sealed.Binding("acme", "archive", "x.csv", 0)


def test_migrate_command_rewrites_old_files(tmp_path, monkeypatch, keyset):
    legacy = crypto.Keyring({"2026-01": os.urandom(32)}, "2026-01")
    url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    engine = sa.create_engine(url)
    metadata.create_all(engine, tables=[sealed_generations])
    generations = sealed.Generations(engine)
    root = tmp_path / "archive"
    old = root / "acme" / "2026-11-20" / "sales.csv.enc"
    old.parent.mkdir(parents=True)
    old.write_bytes(legacy_encrypt(PLAINTEXT, legacy))
    monkeypatch.setenv(sealed.KEYSET_ENV_VAR, sealed.keyset_to_json(keyset))
    monkeypatch.setenv(sealed.LEGACY_KEYS_ENV_VAR, legacy.to_text())
    command = ["migrate", "--url", url, "--root", str(root), "--account", "acme", "--data-class", "archive"]
    assert sealed.main(command) == 0
    assert not crypto.is_encrypted(old)
    assert _read(tmp_path, keyset, generations) == PLAINTEXT
    # a second run finds nothing left in the old format and changes nothing
    assert sealed.migrate(root, "acme", "archive", keyset, legacy, generations) == []
    assert generations.current("acme", "archive", LOGICAL) == 1
    # an old file that does not decrypt stops the migration; the file and its counter stay as they were
    broken = root / "acme" / "2026-11-21" / "sales.csv.enc"
    broken.parent.mkdir()
    broken.write_bytes(legacy_encrypt(b"x" * 10, legacy)[:-1])
    assert sealed.main(command) == 1
    assert crypto.is_encrypted(broken) and generations.current("acme", "archive", "2026-11-21/sales.csv") == 0


def test_open_command_gives_the_plaintext_of_the_newest_copy_only(tmp_path, monkeypatch, keyset, capsys):
    url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    engine = sa.create_engine(url)
    metadata.create_all(engine, tables=[sealed_generations])
    path = _write(tmp_path, keyset, sealed.Generations(engine), data_class="export")
    monkeypatch.setenv(sealed.KEYSET_ENV_VAR, sealed.keyset_to_json(keyset))
    out = tmp_path / "for-upload.csv"
    command = ["open", "--url", url, "--account", "acme", "--data-class", "export", "--logical-path", LOGICAL]
    assert sealed.main([*command, str(path), str(out)]) == 0
    assert out.read_bytes() == PLAINTEXT
    assert sealed.main([*command, str(path), str(out)]) == 1  # never overwrites
    assert "exists; not overwritten" in capsys.readouterr().err
    wrong = ["open", "--url", url, "--account", "other", "--data-class", "export", "--logical-path", LOGICAL]
    assert sealed.main([*wrong, str(path), str(tmp_path / "other.csv")]) == 1
    error = capsys.readouterr().err
    assert "does not decrypt" in error and NUMBER not in error
    assert not (tmp_path / "other.csv").exists()


def test_module_does_not_import_airflow():
    code = (
        "import sys, callconv.protection.sealed, callconv.protection.storage; "
        "print(any(m.startswith('airflow') for m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "include")},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_the_cloud_kms_key_is_tinks_gcp_kms_aead_built_offline(tmp_path):
    """Production's path: the README's kms_key_uri and credentials_path give Tink's GCP KMS AEAD.

    Building it reads the service-account file and reaches no network (the first encrypt or
    decrypt would call KMS); a wrong URI is refused before any call.
    """
    import json

    import tink
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    account = {
        "type": "service_account",
        "project_id": "p",
        "private_key_id": "k",
        "private_key": private.decode(),
        "client_email": "workers@p.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    credentials = tmp_path / "workers.json"
    credentials.write_text(json.dumps(account))
    uri = "gcp-kms://projects/p/locations/global/keyRings/r/cryptoKeys/k"
    aead = sealed.kms_aead(uri, str(credentials))
    assert type(aead).__module__.startswith("tink.integration.gcpkms")
    with pytest.raises(tink.TinkError):
        sealed.kms_aead("aws-kms://arn:aws:kms:eu-west-1:1:key/k", str(credentials))
