"""Files sealed with Tink's Streaming AEAD and bound to what they are (issue 13, hole 6).

Why
    The hand-written format in :mod:`callconv.crypto` authenticates only its own header, so an
    encrypted file can be copied over another account's file, moved to another day or rolled
    back to an older copy, and it still decrypts. Here the format is Tink's Streaming AEAD
    (key template ``AES256_GCM_HKDF_1MB``: 1 MiB segments, each authenticated with its index
    and a last-segment flag, so truncation, reordering and bit flips fail), and the associated
    data names the file: the account id, the data class (``landing``, ``archive``,
    ``quarantine``, ``docs``, ``export``), the logical path relative to the account's area and
    a generation number. A file read under any other binding does not decrypt.

Rollback
    "Rollback" means: an older ciphertext of the same logical path put back in place of the
    newest one. Every write of a logical path takes the next generation, recorded in a
    :class:`GenerationLedger` (a JSON file per account area, itself sealed and bound to the
    account, so it cannot be swapped with another account's ledger). Reading asks the ledger
    for the expected generation; an older copy carries an older generation in its associated
    data and fails. Limit: rolling back the ledger together with every file of the area is not
    detected here; that needs a counter outside the area (a warehouse table), left for later.

Keys
    A Tink keyset (JSON keyset format), from the same secret path as the old keyring: the
    environment variable ``CALL_CONVERSIONS_ENCRYPTION_KEYS`` or the password of the Airflow
    connection ``call_conversions_encryption``. Rotation adds a new primary key to the keyset
    (:func:`rotate_keyset`, ``python -m callconv.sealed rotate``); files written under older
    keys still decrypt while those keys stay in the keyset. In production the keyset is
    wrapped by a Cloud KMS key (envelope encryption, see the README's data-protection section).

Old files
    Files in the old ``CCENC`` format are read only by ``python -m callconv.sealed migrate``,
    which decrypts each with the old keyring (``CALL_CONVERSIONS_LEGACY_KEYS``) and rewrites
    it sealed and bound. A sealed reader never falls back to plaintext or to the old format.

Errors name the logical path and the reason class, never file content.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import tink
from tink import cleartext_keyset_handle, secret_key_access, streaming_aead
from tink.proto import tink_pb2

log = logging.getLogger(__name__)

KEYSET_ENV_VAR = "CALL_CONVERSIONS_ENCRYPTION_KEYS"
LEGACY_KEYS_ENV_VAR = "CALL_CONVERSIONS_LEGACY_KEYS"
DATA_CLASSES = frozenset({"landing", "archive", "quarantine", "docs", "export", "ledger"})
LEDGER_NAME = ".generations.sealed"

streaming_aead.register()


class SealError(Exception):
    """A sealed file could not be read or written; the message holds no file content."""


@dataclass(frozen=True)
class Binding:
    """What a sealed file is: whose, which class, where (relative to the account's area), which write."""

    account_id: str
    data_class: str
    logical_path: str
    generation: int

    def __post_init__(self) -> None:
        if self.data_class not in DATA_CLASSES:
            raise SealError(f"unknown data class {self.data_class!r}")
        if not self.account_id or "/" in self.account_id:
            raise SealError("account id must be non-empty and hold no '/'")
        parts = Path(self.logical_path).parts
        if not parts or Path(self.logical_path).is_absolute() or ".." in parts:
            raise SealError(f"logical path {self.logical_path!r} must be relative and stay in its area")
        if self.generation < 1:
            raise SealError("generation starts at 1")

    def associated_data(self) -> bytes:
        """Canonical JSON, so no two bindings share associated data."""
        fields = [1, self.account_id, self.data_class, Path(self.logical_path).as_posix(), self.generation]
        return json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# --------------------------------------------------------------------------- keysets


def new_keyset() -> tink.KeysetHandle:
    return tink.new_keyset_handle(streaming_aead.streaming_aead_key_templates.AES256_GCM_HKDF_1MB)


def keyset_to_json(handle: tink.KeysetHandle) -> str:
    return tink.json_proto_keyset_format.serialize(handle, secret_key_access.TOKEN)


def keyset_from_json(text: str, *, source: str = "keyset") -> tink.KeysetHandle:
    try:
        return tink.json_proto_keyset_format.parse(text, secret_key_access.TOKEN)
    except (tink.TinkError, ValueError) as error:
        raise SealError(f"{source} is not a Tink JSON keyset ({type(error).__name__})") from None


def keyset_from_env(var: str = KEYSET_ENV_VAR) -> tink.KeysetHandle:
    text = os.environ.get(var, "")
    if not text.strip():
        raise SealError(f"environment variable {var} is not set; it must hold a Tink JSON keyset")
    return keyset_from_json(text, source=f"environment variable {var}")


def keyset_from_airflow(conn_id: str = "call_conversions_encryption") -> tink.KeysetHandle:
    """The keyset in the connection's password (Airflow imported only here)."""
    from airflow.sdk import Connection

    conn = Connection.get(conn_id)
    if not conn.password:
        raise SealError(f"Airflow connection {conn_id!r} holds no keyset in its password")
    return keyset_from_json(conn.password, source=f"Airflow connection {conn_id!r}")


def rotate_keyset(handle: tink.KeysetHandle) -> tink.KeysetHandle:
    """A keyset with one new AES256_GCM_HKDF_1MB key as primary; the old keys stay for reading."""
    keyset = _keyset_proto(handle)
    fresh = _keyset_proto(new_keyset()).key[0]
    taken = {key.key_id for key in keyset.key}
    while fresh.key_id in taken:  # 32-bit random ids: a clash is possible, if unlikely
        fresh = _keyset_proto(new_keyset()).key[0]
    keyset.key.append(fresh)
    keyset.primary_key_id = fresh.key_id
    return cleartext_keyset_handle.from_keyset(keyset)


def _keyset_proto(handle: tink.KeysetHandle) -> tink_pb2.Keyset:
    return tink_pb2.Keyset.FromString(tink.proto_keyset_format.serialize(handle, secret_key_access.TOKEN))


# --------------------------------------------------------------------------- sealing


def _primitive(handle: tink.KeysetHandle):
    return handle.primitive(streaming_aead.StreamingAead)


def seal_bytes(data: bytes, handle: tink.KeysetHandle, binding: Binding) -> bytes:
    sink = _KeptBytesIO()
    with _primitive(handle).new_encrypting_stream(sink, binding.associated_data()) as stream:
        stream.write(data)
    return sink.kept


def open_sealed_bytes(blob: bytes, handle: tink.KeysetHandle, binding: Binding) -> bytes:
    try:
        with _primitive(handle).new_decrypting_stream(io.BytesIO(blob), binding.associated_data()) as stream:
            return stream.read()
    except tink.TinkError:
        raise SealError(
            f"{binding.data_class} file {binding.logical_path!r} of account {binding.account_id!r} "
            f"(generation {binding.generation}) does not decrypt: tampered, truncated, not encrypted, "
            "moved, swapped with another file, rolled back, or sealed with a key not in the keyset"
        ) from None


class _KeptBytesIO(io.BytesIO):
    """Tink closes its sink on exit; keep the bytes written."""

    kept = b""

    def close(self) -> None:
        self.kept = self.getvalue()
        super().close()


# --------------------------------------------------------------------------- rollback ledger


class GenerationLedger:
    """The newest generation of every logical path in one account's area, kept sealed in the area."""

    def __init__(self, area: Path, account_id: str, handle: tink.KeysetHandle):
        self.area, self.account_id, self.handle = Path(area), account_id, handle
        self._path = self.area / LEDGER_NAME
        self._binding = Binding(account_id, "ledger", LEDGER_NAME, 1)
        self._generations: dict[str, int] = {}
        if self._path.exists():
            raw = open_sealed_bytes(self._path.read_bytes(), handle, self._binding)
            self._generations = json.loads(raw)

    def current(self, data_class: str, logical_path: str) -> Binding:
        key = f"{data_class}/{Path(logical_path).as_posix()}"
        if key not in self._generations:
            raise SealError(f"{data_class} file {logical_path!r} of account {self.account_id!r} was never sealed here")
        return Binding(self.account_id, data_class, logical_path, self._generations[key])

    def next(self, data_class: str, logical_path: str) -> Binding:
        key = f"{data_class}/{Path(logical_path).as_posix()}"
        generation = self._generations.get(key, 0) + 1
        self._generations[key] = generation
        return Binding(self.account_id, data_class, logical_path, generation)

    def save(self) -> None:
        blob = seal_bytes(json.dumps(self._generations, sort_keys=True).encode(), self.handle, self._binding)
        _atomic_write(self._path, blob)


def _atomic_write(path: Path, blob: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)


def write_sealed(area: Path, account_id: str, data_class: str, logical_path: str, data: bytes, handle) -> Binding:
    """Seal ``data`` at ``area/data_class/logical_path`` under the path's next generation."""
    ledger = GenerationLedger(area, account_id, handle)
    binding = ledger.next(data_class, logical_path)
    _atomic_write(Path(area) / data_class / logical_path, seal_bytes(data, handle, binding))
    ledger.save()
    return binding


def read_sealed(area: Path, account_id: str, data_class: str, logical_path: str, handle) -> bytes:
    """The plaintext of ``area/data_class/logical_path``, only if it is that path's newest write."""
    binding = GenerationLedger(area, account_id, handle).current(data_class, logical_path)
    blob = (Path(area) / data_class / logical_path).read_bytes()
    return open_sealed_bytes(blob, handle, binding)


# --------------------------------------------------------------------------- migration from CCENC


def migrate(area: Path, account_id: str, data_class: str, handle, legacy_keyring) -> list[str]:
    """Rewrite every old-format ``.enc`` file under ``area/data_class`` sealed and bound, in place."""
    from callconv.crypto import decrypt_bytes, is_encrypted

    moved = []
    ledger = GenerationLedger(area, account_id, handle)
    root = Path(area) / data_class
    for path in sorted(root.rglob("*.enc")):
        if not is_encrypted(path):  # already sealed (or not ours): leave it
            continue
        logical = path.relative_to(root).as_posix()
        plaintext = decrypt_bytes(path.read_bytes(), legacy_keyring)
        binding = ledger.next(data_class, logical)
        _atomic_write(path, seal_bytes(plaintext, handle, binding))
        moved.append(logical)
    ledger.save()
    log.info("migrated %d %s files of account %s to the sealed format", len(moved), data_class, account_id)
    return moved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m callconv.sealed")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("new-keyset", help="print a new AES256_GCM_HKDF_1MB keyset (JSON)")
    commands.add_parser("rotate", help=f"print the keyset in ${KEYSET_ENV_VAR} with a new primary key")
    mig = commands.add_parser("migrate", help="rewrite old CCENC files as sealed, bound files")
    mig.add_argument("--area", required=True, type=Path, help="the account's area (holds one folder per class)")
    mig.add_argument("--account", required=True)
    mig.add_argument("--data-class", required=True, choices=sorted(DATA_CLASSES - {"ledger"}))
    args = parser.parse_args(argv)
    if args.command == "new-keyset":
        print(keyset_to_json(new_keyset()))
    elif args.command == "rotate":
        print(keyset_to_json(rotate_keyset(keyset_from_env())))
    else:
        from callconv.crypto import Keyring

        moved = migrate(
            args.area, args.account, args.data_class, keyset_from_env(), Keyring.from_env(LEGACY_KEYS_ENV_VAR)
        )
        print(f"migrated {len(moved)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
