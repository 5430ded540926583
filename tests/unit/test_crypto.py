"""The retired CCENC format's reader (kept for ``python -m callconv.protection.sealed migrate`` only): keyring
parsing, the chunked file format, tamper detection, streaming. Old files are made by the test-only
writer :mod:`ccenc_writer`; the pipeline no longer writes this format."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from ccenc_writer import encrypt_bytes, encrypt_stream, write_encrypted

from callconv.protection.crypto import (
    CHUNK_SIZE,
    MAGIC,
    DecryptionError,
    Keyring,
    KeyringError,
    NotEncryptedError,
    UnknownKeyError,
    decrypt_bytes,
    decrypt_stream,
    is_encrypted,
    open_decrypted,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
OLD_KEY = bytes(range(32))
NEW_KEY = bytes(range(100, 132))
PHONE = b"+4791234567"


def b64(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode()


def keyring_json(primary: str, keys: dict[str, bytes]) -> str:
    return json.dumps({"primary": primary, "keys": {key_id: b64(key) for key_id, key in keys.items()}})


@pytest.fixture()
def keyring() -> Keyring:
    return Keyring({"2026-01": OLD_KEY}, "2026-01")


def split(blob: bytes) -> tuple[bytes, list[bytes]]:
    """Header and the framed chunks (each with its 4-byte length prefix) of an encrypted blob."""
    key_id_length = blob[len(MAGIC)]
    header_end = len(MAGIC) + 1 + key_id_length + 16
    header, rest, frames = blob[:header_end], blob[header_end:], []
    while rest:
        (length,) = struct.unpack(">I", rest[:4])
        frames.append(rest[: 4 + length])
        rest = rest[4 + length :]
    return header, frames


def header_key_id(blob: bytes) -> str:
    return blob[len(MAGIC) + 1 : len(MAGIC) + 1 + blob[len(MAGIC)]].decode()


def multi_chunk_data() -> bytes:
    """3.5 MiB of distinct, non-repeating bytes: four chunks, the last one half full."""
    return hashlib.shake_256(b"call conversions").digest(CHUNK_SIZE * 7 // 2)


# --------------------------------------------------------------------------- round trips and format


@pytest.mark.parametrize(
    "data",
    [b"", b"x", PHONE + b",2026-11-03T09:15:00+01:00,Phone sale,1200.00,NOK\n", b"\x00" * CHUNK_SIZE],
    ids=["empty", "one-byte", "csv-row", "exactly-one-chunk"],
)
def test_small_round_trip(keyring, data):
    blob = encrypt_bytes(data, keyring)
    header, frames = split(blob)
    assert blob.startswith(MAGIC)
    assert len(frames) == 1
    assert len(blob) == len(header) + 4 + len(data) + 16
    assert decrypt_bytes(blob, keyring) == data


def test_multi_chunk_round_trip(keyring):
    data = multi_chunk_data()
    blob = encrypt_bytes(data, keyring)
    _, frames = split(blob)
    assert [len(frame) - 4 - 16 for frame in frames] == [CHUNK_SIZE, CHUNK_SIZE, CHUNK_SIZE, CHUNK_SIZE // 2]
    assert decrypt_bytes(blob, keyring) == data

    out = io.BytesIO()
    decrypt_stream(io.BytesIO(blob), out, keyring)
    assert out.getvalue() == data


def test_each_encryption_is_fresh(keyring):
    first, second = encrypt_bytes(b"same", keyring), encrypt_bytes(b"same", keyring)
    assert first != second
    assert split(first)[0][-16:] != split(second)[0][-16:]  # random file ids


def test_plaintext_does_not_appear_in_ciphertext(keyring):
    data = b"caller,conversion_time\n" + b"".join(PHONE + b",2026-11-03 09:15:00\n" for _ in range(50_000))
    blob = encrypt_bytes(data, keyring)
    assert PHONE not in blob
    assert b"caller" not in blob
    assert b"2026-11-03" not in blob


def test_short_reads_from_a_pipe_like_source(keyring):
    class Trickle(io.RawIOBase):
        def __init__(self, data):
            self._data = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, buffer):
            piece = self._data.read(min(len(buffer), 1000))
            buffer[: len(piece)] = piece
            return len(piece)

    data = multi_chunk_data()[: CHUNK_SIZE + 5000]
    out = io.BytesIO()
    encrypt_stream(Trickle(data), out, keyring)
    assert len(split(out.getvalue())[1]) == 2
    back = io.BytesIO()
    decrypt_stream(Trickle(out.getvalue()), back, keyring)
    assert back.getvalue() == data


# --------------------------------------------------------------------------- rotation


def test_rotation_old_files_decrypt_and_new_files_use_new_key():
    old_ring = Keyring.from_text(keyring_json("2026-01", {"2026-01": OLD_KEY}))
    old_blob = encrypt_bytes(b"written in January", old_ring)
    assert header_key_id(old_blob) == "2026-01"

    rotated = Keyring.from_text(keyring_json("2026-11", {"2026-11": NEW_KEY, "2026-01": OLD_KEY}))
    assert rotated.primary == "2026-11"
    assert decrypt_bytes(old_blob, rotated) == b"written in January"

    new_blob = encrypt_bytes(b"written in November", rotated)
    assert header_key_id(new_blob) == "2026-11"
    assert decrypt_bytes(new_blob, rotated) == b"written in November"
    with pytest.raises(UnknownKeyError):
        decrypt_bytes(new_blob, old_ring)


def test_unknown_key_id(keyring):
    blob = encrypt_bytes(b"data", keyring)
    other = Keyring({"2026-11": NEW_KEY}, "2026-11")
    with pytest.raises(UnknownKeyError) as caught:
        decrypt_bytes(blob, other)
    assert str(caught.value).startswith("file was written with key '2026-01', which is not in the keyring")
    assert isinstance(caught.value, DecryptionError)


def test_same_key_id_but_different_key_fails_authentication(keyring):
    blob = encrypt_bytes(b"data", keyring)
    with pytest.raises(DecryptionError, match="chunk 0 .* failed authentication"):
        decrypt_bytes(blob, Keyring({"2026-01": NEW_KEY}, "2026-01"))


# --------------------------------------------------------------------------- tampering


@pytest.fixture(scope="module")
def sealed() -> tuple[Keyring, bytes]:
    ring = Keyring({"2026-01": OLD_KEY, "2026-02": NEW_KEY}, "2026-01")
    return ring, encrypt_bytes(multi_chunk_data(), ring)


def flip(blob: bytes, position: int) -> bytes:
    return blob[:position] + bytes([blob[position] ^ 0x01]) + blob[position + 1 :]


def test_untampered_fixture_decrypts(sealed):
    ring, blob = sealed
    assert decrypt_bytes(blob, ring) == multi_chunk_data()


def test_one_flipped_ciphertext_byte(sealed):
    ring, blob = sealed
    header, frames = split(blob)
    position = len(header) + len(frames[0]) + 4 + 12345  # inside chunk 1's ciphertext
    with pytest.raises(DecryptionError, match="chunk 1 of the encrypted file failed authentication"):
        decrypt_bytes(flip(blob, position), ring)


def test_flipped_tag_byte(sealed):
    ring, blob = sealed
    with pytest.raises(DecryptionError, match="failed authentication"):
        decrypt_bytes(flip(blob, len(blob) - 1), ring)


def test_truncated_inside_last_chunk(sealed):
    ring, blob = sealed
    with pytest.raises(DecryptionError, match="truncated"):
        decrypt_bytes(blob[:-100], ring)


def test_last_chunk_dropped_entirely(sealed):
    ring, blob = sealed
    header, frames = split(blob)
    with pytest.raises(DecryptionError, match=r"truncated \(it ends after chunk 2, which is not the final chunk\)"):
        decrypt_bytes(header + b"".join(frames[:-1]), ring)


def test_cut_inside_a_length_field(sealed):
    ring, blob = sealed
    header, frames = split(blob)
    with pytest.raises(DecryptionError, match="truncated"):
        decrypt_bytes(header + frames[0] + frames[1][:2], ring)


def test_header_only(sealed):
    ring, blob = sealed
    header, _ = split(blob)
    with pytest.raises(DecryptionError, match="no data chunks"):
        decrypt_bytes(header, ring)


def test_middle_chunk_dropped(sealed):
    ring, blob = sealed
    header, frames = split(blob)
    with pytest.raises(DecryptionError, match="chunk 1 .* failed authentication"):
        decrypt_bytes(header + frames[0] + frames[2] + frames[3], ring)


def test_chunks_swapped(sealed):
    ring, blob = sealed
    header, frames = split(blob)
    with pytest.raises(DecryptionError, match="chunk 0 .* failed authentication"):
        decrypt_bytes(header + frames[1] + frames[0] + frames[2] + frames[3], ring)


def test_chunk_duplicated(sealed):
    ring, blob = sealed
    header, frames = split(blob)
    with pytest.raises(DecryptionError, match="chunk 1 .* failed authentication"):
        decrypt_bytes(header + frames[0] + frames[0] + frames[1] + frames[2] + frames[3], ring)


def test_data_appended_after_final_chunk(sealed):
    ring, blob = sealed
    _, frames = split(blob)
    with pytest.raises(DecryptionError, match="after its final chunk 3"):
        decrypt_bytes(blob + frames[1], ring)


def test_chunk_from_another_file(sealed):
    ring, blob = sealed
    header, frames = split(blob)
    _, other_frames = split(encrypt_bytes(multi_chunk_data(), ring))
    with pytest.raises(DecryptionError, match="chunk 1 .* failed authentication"):
        decrypt_bytes(header + frames[0] + other_frames[1] + frames[2] + frames[3], ring)


def test_header_file_id_changed(sealed):
    ring, blob = sealed
    header, _ = split(blob)
    with pytest.raises(DecryptionError, match="chunk 0 .* failed authentication"):
        decrypt_bytes(flip(blob, len(header) - 1), ring)


def test_header_key_id_changed_to_another_known_key(sealed):
    ring, blob = sealed
    forged = blob.replace(b"2026-01", b"2026-02", 1)
    assert header_key_id(forged) == "2026-02"
    with pytest.raises(DecryptionError, match="chunk 0 .* failed authentication"):
        decrypt_bytes(forged, ring)


def test_header_key_id_changed_to_unknown_key(sealed):
    ring, blob = sealed
    with pytest.raises(UnknownKeyError, match="'2026-09', which is not in the keyring"):
        decrypt_bytes(blob.replace(b"2026-01", b"2026-09", 1), ring)


def test_header_magic_and_version(sealed):
    ring, blob = sealed
    with pytest.raises(NotEncryptedError, match="not an encrypted call-conversions file"):
        decrypt_bytes(b"X" + blob[1:], ring)
    with pytest.raises(DecryptionError, match="format version 2"):
        decrypt_bytes(blob[:5] + b"\x02" + blob[6:], ring)
    with pytest.raises(NotEncryptedError):
        decrypt_bytes(b"conversion_action,gclid\n", ring)
    with pytest.raises(DecryptionError, match="header is truncated"):
        decrypt_bytes(blob[:12], ring)


def test_tampering_is_detected_while_streaming(sealed, tmp_path):
    ring, blob = sealed
    header, frames = split(blob)
    path = tmp_path / "tampered.enc"
    path.write_bytes(flip(blob, len(header) + len(frames[0]) + len(frames[1]) + 50))
    with open_decrypted(path, ring) as reader:
        assert reader.read(CHUNK_SIZE) == multi_chunk_data()[:CHUNK_SIZE]
        with pytest.raises(DecryptionError, match="chunk 2"):
            reader.read()


# --------------------------------------------------------------------------- streaming reads


class GeneratedCsv(io.RawIOBase):
    """A large CSV made on the fly, hashed as it goes, never held in memory."""

    def __init__(self, size: int):
        self.digest = hashlib.sha256()
        self.lines = 0
        rows = b"".join(b"+47912%05d,2026-11-03T09:15:00+01:00,Phone sale,1200.00,NOK\n" % n for n in range(4000))
        self._rows, self._row_count = rows, 4000
        self._left = size - size % len(rows)
        self._pending = b""

    def readable(self):
        return True

    def readinto(self, buffer):
        if not self._pending and self._left:
            self._pending, self._left = self._rows, self._left - len(self._rows)
            self.lines += self._row_count
            self.digest.update(self._rows)
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


def test_open_decrypted_streams_a_large_file_in_bounded_memory(tmp_path, keyring):
    source = GeneratedCsv(50 * 1024 * 1024)
    path = tmp_path / "conversions.csv.enc"
    with path.open("wb") as out:
        encrypt_stream(source, out, keyring)
    size = path.stat().st_size
    assert size > 49 * 1024 * 1024

    digest, lines = hashlib.sha256(), 0
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        with open_decrypted(path, keyring) as reader:
            while block := reader.read(256 * 1024):
                digest.update(block)
                lines += block.count(b"\n")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert digest.hexdigest() == source.digest.hexdigest()
    assert lines == source.lines
    assert peak - baseline < 16 * 1024 * 1024, f"decrypting held {(peak - baseline) / 2**20:.1f} MiB"


def test_open_decrypted_feeds_csv_and_pandas_chunk_by_chunk(tmp_path, keyring):
    pd = pytest.importorskip("pandas")
    rows = [(f"+47912{n:05d}", f"2026-11-03T09:{n % 60:02d}:00+01:00", "Phone sale", f"{n}.00") for n in range(60_000)]
    text = "caller,conversion_time,conversion_name,value\n" + "".join(",".join(row) + "\n" for row in rows)
    path = tmp_path / "conversions.csv.enc"
    write_encrypted(path, text.encode(), keyring)
    assert len(split(path.read_bytes())[1]) > 2  # really several chunks

    with open_decrypted(str(path), keyring) as raw:
        reader = csv.reader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
        assert next(reader) == ["caller", "conversion_time", "conversion_name", "value"]
        assert [tuple(row) for row in reader] == rows

    with open_decrypted(path, keyring) as raw:
        pieces = list(pd.read_csv(raw, chunksize=7000, dtype=str))
    assert len(pieces) == 9
    assert sum(len(piece) for piece in pieces) == 60_000
    assert pieces[-1]["caller"].iloc[-1] == "+4791259999"


def test_open_decrypted_file_objects_and_upath(keyring):
    blob = encrypt_bytes(b"hello", keyring)
    source = io.BytesIO(blob)
    with open_decrypted(source, keyring) as reader:
        assert reader.read() == b"hello"
    assert not source.closed  # a caller's file object stays the caller's

    upath = pytest.importorskip("upath")
    remote = upath.UPath("memory:///callconv-test/landing/calls.csv.enc")
    write_encrypted(remote, b"caller\n" + PHONE + b"\n", keyring)
    assert is_encrypted(remote)
    assert PHONE not in remote.read_bytes()
    assert sorted(child.name for child in remote.parent.iterdir()) == ["calls.csv.enc"]
    with open_decrypted(remote, keyring) as reader:
        assert reader.read() == b"caller\n" + PHONE + b"\n"


def test_open_decrypted_checks_the_key_at_open(tmp_path, keyring):
    path = tmp_path / "x.enc"
    write_encrypted(path, b"data", keyring)
    with pytest.raises(UnknownKeyError, match="'2026-01'"):
        open_decrypted(path, Keyring({"other": NEW_KEY}, "other"))


# --------------------------------------------------------------------------- files on disk (made by the test writer)


def test_a_streamed_old_file_decrypts(tmp_path, keyring):
    data = multi_chunk_data()
    path = tmp_path / "landing.enc"
    write_encrypted(path, io.BytesIO(data), keyring)
    assert decrypt_bytes(path.read_bytes(), keyring) == data


def test_is_encrypted(tmp_path, keyring):
    blob = encrypt_bytes(b"x", keyring)
    assert is_encrypted(blob)
    assert is_encrypted(bytearray(blob))
    assert not is_encrypted(b"caller,conversion_time\n")
    assert not is_encrypted(b"")
    encrypted, plain = tmp_path / "a.enc", tmp_path / "a.csv"
    encrypted.write_bytes(blob)
    plain.write_bytes(b"caller\n")
    assert is_encrypted(encrypted) and is_encrypted(str(encrypted))
    assert not is_encrypted(plain)
    stream = io.BytesIO(blob)
    stream.seek(0)
    assert is_encrypted(stream) and stream.tell() == 0


# --------------------------------------------------------------------------- keyring parsing


def test_keyring_from_text_and_env(monkeypatch):
    text = keyring_json("2026-11", {"2026-11": NEW_KEY, "2026-01": OLD_KEY})
    ring = Keyring.from_text(text)
    assert ring.primary == "2026-11"
    assert ring.key_ids == ["2026-01", "2026-11"]
    assert ring.key("2026-01") == OLD_KEY

    monkeypatch.setenv("CALL_CONVERSIONS_LEGACY_KEYS", text)
    assert Keyring.from_env() == ring
    monkeypatch.setenv("OTHER_KEYS", text)
    assert Keyring.from_env("OTHER_KEYS") == ring


def test_keyring_accepts_standard_and_unpadded_base64():
    standard = base64.standard_b64encode(b"\xfb\xff" * 16).decode()
    assert "+" in standard or "/" in standard
    ring = Keyring.from_text(json.dumps({"primary": "a", "keys": {"a": standard, "b": b64(OLD_KEY).rstrip("=")}}))
    assert ring.key("a") == b"\xfb\xff" * 16
    assert ring.key("b") == OLD_KEY


def test_single_key_needs_no_primary():
    assert Keyring.from_text(json.dumps({"keys": {"only": b64(OLD_KEY)}})).primary == "only"


def test_repr_hides_keys():
    ring = Keyring({"2026-01": OLD_KEY}, "2026-01")
    assert repr(ring) == "Keyring(primary='2026-01', key_ids=['2026-01'])"
    assert b64(OLD_KEY) not in repr(ring)


SECRET_TEXT = b64(b"S" * 16)  # valid base64, but a 16-byte key
SECRET_JUNK = "s3cr3t!!not*base64"


@pytest.mark.parametrize(
    ("text", "message", "secret"),
    [
        (json.dumps({"primary": "a", "keys": {"a": SECRET_JUNK}}), "key 'a' is not valid base64", SECRET_JUNK),
        (json.dumps({"primary": "a", "keys": {"a": SECRET_TEXT}}), "key 'a' decodes to 16 bytes", SECRET_TEXT),
        ('{"primary": "a", "keys": {"a": "' + b64(OLD_KEY) + '"', "not valid JSON", b64(OLD_KEY)),
        (json.dumps({"primary": "b", "keys": {"a": b64(OLD_KEY)}}), "primary key 'b' is not among", b64(OLD_KEY)),
        (json.dumps({"keys": {"a": b64(OLD_KEY), "b": b64(NEW_KEY)}}), "has 2 keys but no 'primary'", b64(OLD_KEY)),
        (json.dumps({"primary": "a", "keys": {"a": 123}}), "key 'a' must be a base64 string", "123"),
        (json.dumps({"primary": "a", "keys": {}}), "non-empty object 'keys'", None),
        (json.dumps({"primary": "a", "kyes": {"a": b64(OLD_KEY)}}), "unknown field", b64(OLD_KEY)),
        (json.dumps([b64(OLD_KEY)]), "must be a JSON object", b64(OLD_KEY)),
        ("   ", "is empty", None),
    ],
    ids=["bad-base64", "short-key", "bad-json", "unknown-primary", "no-primary", "not-string", "no-keys",
         "typo", "not-object", "empty"],
)  # fmt: skip
def test_keyring_errors_are_one_clear_line_without_key_material(text, message, secret):
    with pytest.raises(KeyringError) as caught:
        Keyring.from_text(text)
    rendered = str(caught.value)
    assert message in rendered
    assert "\n" not in rendered
    if secret:
        assert secret not in rendered
        assert secret.rstrip("=") not in rendered
    error = caught.value  # no chained exception (a JSON or base64 error) is shown with it
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_keyring_constructor_errors():
    with pytest.raises(KeyringError, match="is 31 bytes; AES-256 keys are 32 bytes"):
        Keyring({"a": b"k" * 31}, "a")
    with pytest.raises(KeyringError, match="no keys"):
        Keyring({}, "a")
    with pytest.raises(KeyringError, match="non-empty strings"):
        Keyring({"": OLD_KEY}, "")


def test_missing_env_var(monkeypatch):
    monkeypatch.delenv("CALL_CONVERSIONS_LEGACY_KEYS", raising=False)
    with pytest.raises(KeyringError, match="environment variable CALL_CONVERSIONS_LEGACY_KEYS is not set"):
        Keyring.from_env()
    monkeypatch.setenv("CALL_CONVERSIONS_LEGACY_KEYS", '{"keys": {"a": "' + SECRET_TEXT + '"}}')
    with pytest.raises(KeyringError, match="in environment variable CALL_CONVERSIONS_LEGACY_KEYS") as caught:
        Keyring.from_env()
    assert SECRET_TEXT not in str(caught.value)


def test_module_does_not_import_airflow():
    code = "import sys, callconv.protection.crypto; print(any(m.startswith('airflow') for m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "include")},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
