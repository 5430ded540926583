"""Every file the pipeline stores is written and read here, so every one is encrypted at rest.

Where files go, each under ``{root}/{account}/{YYYY-MM-DD}/``:

* ``archive_uri``: the CRM extracts as taken in, ``{name}.enc``. After a file is taken in (or
  recognised by its checksum as already imported) its plaintext landing copy is removed;
* ``quarantine_uri``: the day's quarantined rows, ``quarantine_{account}_{day}.csv.enc``;
* ``export_uri``: the conversion file, ``call_conversions_{account}_{day}.csv.enc``;
* ``data_docs_uri``: Great Expectations Data Docs, every file with ``.enc`` appended.

Files are written with the keyring's primary key (see :mod:`callconv.crypto`) and atomically:
a temporary sibling renamed over the target. Reading is a stream that decrypts one chunk at a
time, and a file that is not encrypted (a CRM export dropped in plaintext) is read as it is,
unless it is named ``.enc``: that name promises encryption, so such a file is refused.
Without a keyring (only when the config says ``encryption.required: false``) files are stored
in plaintext under their plain names.

``python -m callconv.crypto decrypt IN OUT`` gives back the plaintext of one file, or of a folder.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from callconv.crypto import (
    DEFAULT_KEYS_ENV_VAR,
    Keyring,
    atomic_write,
    is_encrypted,
    keyring_from_airflow,
    open_decrypted,
    register_with_log_masker,
    write_encrypted,
)

log = logging.getLogger(__name__)

ENCRYPTED_SUFFIX = ".enc"


class StorageError(RuntimeError):
    """A stored file cannot be written or read as asked; the message says what to fix."""


class EncryptionKeyMissing(StorageError):
    """Encryption is required by the config, but no keyring is set."""


class OutsideAccountFolder(StorageError):
    """A path of one account's resolves, through a symlink, outside that account's folder."""


def check_in_account(path, root, account_id: str, what: str) -> None:
    """Refuse a local ``path`` under ``{root}/{account_id}`` that resolves outside that folder.

    Each account's files must resolve inside its own folder. The account folder must be the
    real folder of that name under the (resolved) root, not a symlink; below it a symlink
    (a day folder, a file) that leads out of the account's folder is refused, one that stays
    inside is followed. The path need not exist yet (a folder about to be written). Object
    storage has no symlinks and is not checked. The error is one line and names no file content.
    """
    if isinstance(root, str):
        root = Path(root)
    if isinstance(path, str):
        path = Path(path)
    if not isinstance(path, Path) or not isinstance(root, Path):
        return
    own = root.resolve() / account_id
    account_folder = root / account_id
    if account_folder.is_symlink() or account_folder.resolve() != own or not path.resolve().is_relative_to(own):
        raise OutsideAccountFolder(
            f"refusing {what} {path.name!r}: it resolves to a place outside {account_folder}, the folder of "
            f"account {account_id!r} (a symlink?); only the account's own files are read, stored or removed"
        )


def keyring_for(settings) -> Keyring | None:
    """The keyring to store files with: from the Airflow connection, else the environment variable.

    ``None`` only when the config allows plaintext (``encryption.required: false``) and no
    keyring is set; that is logged as a warning on every call. A keyring that is set but
    malformed is always an error (:class:`callconv.crypto.KeyringError`).
    """
    encryption = settings.encryption
    keyring = _keyring_from_connection(encryption.keys_conn_id)
    if keyring is None and os.environ.get(DEFAULT_KEYS_ENV_VAR, "").strip():
        keyring = Keyring.from_env(DEFAULT_KEYS_ENV_VAR)
        register_with_log_masker(keyring)
    if keyring is not None:
        return keyring
    if encryption.required:
        raise EncryptionKeyMissing(
            f"encryption is required (encryption.required: true) but no keyring is set: put the keyring JSON "
            f"in the password of Airflow connection {encryption.keys_conn_id!r} or in the environment variable "
            f"{DEFAULT_KEYS_ENV_VAR} (make one with: python -m callconv.crypto new-key --key-id <id>)"
        )
    log.warning(
        "storage: files are stored in plaintext because encryption is disabled in the config "
        "(encryption.required: false) and no keyring is set (Airflow connection %r or %s)",
        encryption.keys_conn_id,
        DEFAULT_KEYS_ENV_VAR,
    )
    return None


def _keyring_from_connection(conn_id: str) -> Keyring | None:
    try:
        from airflow.sdk.exceptions import AirflowNotFoundException
    except ImportError:  # outside Airflow there are no connections
        return None
    try:
        return keyring_from_airflow(conn_id)
    except AirflowNotFoundException:
        return None


def stored_name(name: str, keyring: Keyring | None) -> str:
    """The name a file is stored under: ``.enc`` appended when it is encrypted."""
    return f"{name}{ENCRYPTED_SUFFIX}" if keyring is not None else name


def plain_name(name: str) -> str:
    """The name without the ``.enc`` that storing it encrypted added."""
    return name.removesuffix(ENCRYPTED_SUFFIX)


def store(path, data: bytes | BinaryIO | Iterable[bytes], keyring: Keyring | None) -> None:
    """Write ``data`` to ``path`` atomically: encrypted with ``keyring``, or as it is without one.

    ``data`` is bytes, a binary file object, or an iterable of bytes (both streamed, never
    held whole). ``path`` is a ``pathlib.Path`` or an ObjectStoragePath; its folder is created.
    """
    if isinstance(path, str):
        path = Path(path)
    if isinstance(data, bytes | bytearray | memoryview):
        source: BinaryIO = io.BytesIO(data)
    elif hasattr(data, "read"):
        source = data
    else:
        source = io.BufferedReader(_IterableReader(data), buffer_size=1024 * 1024)
    path.parent.mkdir(parents=True, exist_ok=True)
    if keyring is not None:
        write_encrypted(path, source, keyring)
    else:
        atomic_write(path, lambda out: shutil.copyfileobj(source, out, 1024 * 1024))


def store_as(folder, name: str, data: bytes | BinaryIO | Iterable[bytes], keyring: Keyring | None):
    """:func:`store` under ``folder / stored_name(name, keyring)``; the path written.

    The same file in the other form (plaintext left from before encryption was turned
    on, say) is removed, so a folder never holds both.
    """
    target = folder / stored_name(name, keyring)
    store(target, data, keyring)
    remove(folder / (name if keyring is not None else f"{name}{ENCRYPTED_SUFFIX}"))
    return target


def open_for_read(path, keyring: Keyring | None) -> BinaryIO:
    """The file's plaintext as a binary stream: decrypted chunk by chunk if it is encrypted.

    A file that is not encrypted is opened as it is, unless its name ends in ``.enc``: such a
    file (plaintext, or cut short before its header) is refused, never read as plaintext.
    An encrypted one without a keyring, or with a keyring lacking its key, is a clear error
    (:class:`callconv.crypto.DecryptionError`).
    """
    if isinstance(path, str):
        path = Path(path)
    if is_encrypted(path):
        if keyring is None:
            raise StorageError(
                f"{path.name} is encrypted but no encryption keyring is set "
                f"(Airflow connection of encryption.keys_conn_id, or {DEFAULT_KEYS_ENV_VAR})"
            )
        return open_decrypted(path, keyring)
    if path.name.endswith(ENCRYPTED_SUFFIX):
        raise StorageError(
            f"{path.name} is named as encrypted but is not an encrypted file (plaintext, or cut short); "
            "a .enc file is never read as plaintext"
        )
    return path.open("rb")


def store_tree(source: Path, target, keyring: Keyring | None) -> int:
    """Store every file under the local folder ``source`` at the same place under ``target``."""
    count = 0
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        relative = path.relative_to(source)
        with path.open("rb") as handle:
            store_as(target.joinpath(*relative.parent.parts), relative.name, handle, keyring)
        count += 1
    return count


def remove(path) -> None:
    """Delete one stored file (a no-op when it is already gone)."""
    if path.exists():
        path.unlink()


class _IterableReader(io.RawIOBase):
    """A binary stream over an iterable of byte strings, so generated content is streamed."""

    def __init__(self, parts: Iterable[bytes]):
        super().__init__()
        self._parts: Iterator[bytes] = iter(parts)
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            try:
                self._pending = memoryview(next(self._parts))
            except StopIteration:
                return 0
        count = min(len(buffer), len(self._pending))
        memoryview(buffer).cast("B")[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


__all__ = [
    "ENCRYPTED_SUFFIX",
    "EncryptionKeyMissing",
    "OutsideAccountFolder",
    "StorageError",
    "check_in_account",
    "keyring_for",
    "open_for_read",
    "plain_name",
    "remove",
    "store",
    "store_as",
    "store_tree",
    "stored_name",
]
