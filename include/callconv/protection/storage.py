"""Every file the pipeline stores is written and read here, so every one is sealed at rest.

Where files go, each under ``{root}/{account}/{YYYY-MM-DD}/``:

* ``archive_uri`` (data class ``archive``): the CRM extracts as taken in, ``{name}.enc``.
  After a file is taken in (or recognised by its checksum as already imported) its landing
  copy is removed;
* ``quarantine_uri`` (``quarantine``): the day's quarantined rows, ``quarantine_{account}_{day}.csv.enc``;
* ``export_uri`` (``export``): the conversion file, ``call_conversions_{account}_{day}.csv.enc``;
* ``data_docs_uri`` (``docs``): Great Expectations Data Docs, every file with ``.enc`` appended.

Files are sealed with Tink's Streaming AEAD (:mod:`callconv.protection.sealed`), bound to the account,
the data class and the logical path (the place under the account's folder without ``.enc``,
``2026-11-27/call_conversions_x.csv``) and a generation kept in the warehouse, and written
atomically: a temporary sibling renamed over the target. Reading is a stream checked one
segment at a time. A ``.enc`` file that does not decrypt under its binding is refused, never
read as plaintext or in the old format (old files: ``python -m callconv.protection.sealed migrate``).

Landing files (``landing``) are written by the CRM: read as dropped, plaintext, or sealed by
the exporter (``python -m callconv.protection.sealed seal``) if named ``.enc``.

Without a keyset (only when the config says ``encryption.required: false``) files are stored in
plaintext under their plain names, with a warning.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from callconv.protection.sealed import (
    KEYSET_ENV_VAR,
    Generations,
    SealError,
    atomic_write,
    keyset_from_airflow,
    keyset_from_env,
    read_sealed,
    write_sealed,
)

log = logging.getLogger(__name__)

ENCRYPTED_SUFFIX = ".enc"
_OLD_FORMAT_MAGIC = b"CCENC\x01"


class StorageError(RuntimeError):
    """A stored file cannot be written or read as asked; the message says what to fix."""


class EncryptionKeyMissing(StorageError):
    """Encryption is required by the config, but no keyset is set."""


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


@dataclass(frozen=True)
class Sealer:
    """What sealing a file needs: the Tink keyset and the warehouse's generation counter."""

    keyset: object
    generations: Generations

    def within(self, connection) -> Sealer:
        """The same keyset, its counter advanced in ``connection``'s transaction (see :class:`Generations`)."""
        return replace(self, generations=Generations(connection))


def sealer_for(keyset, warehouse) -> Sealer | None:
    """A :class:`Sealer` over the warehouse engine (or a connection); ``None`` without a keyset (plaintext)."""
    return None if keyset is None else Sealer(keyset, Generations(warehouse))


@dataclass(frozen=True)
class Area:
    """One account's folder of one data class: ``{root}/{account_id}``; logical paths are relative to it."""

    root: object
    account_id: str
    data_class: str

    @property
    def folder(self):
        root = Path(self.root) if isinstance(self.root, str) else self.root
        return root / self.account_id

    def logical(self, path) -> str:
        """The logical path of a stored ``path`` in this area: relative to the account's folder, no ``.enc``."""
        base, full = PurePosixPath(str(self.folder)), PurePosixPath(str(path))
        try:
            relative = full.relative_to(base)
        except ValueError:
            raise StorageError(
                f"{full.name!r} is not in the {self.data_class} folder of account {self.account_id!r}"
            ) from None
        return plain_name(relative.as_posix())


def keyset_for(settings):
    """The Tink keyset to store files with: from the Airflow connection, else the environment variable.

    ``None`` only when the config allows plaintext (``encryption.required: false``) and no
    keyset is set; that is logged as a warning on every call. A keyset that is set but
    malformed is always an error (:class:`callconv.protection.sealed.SealError`).
    """
    encryption = settings.encryption
    keyset = keyset_from_airflow(encryption.keys_conn_id)
    if keyset is None and os.environ.get(KEYSET_ENV_VAR, "").strip():
        keyset = keyset_from_env(KEYSET_ENV_VAR)
    if keyset is not None:
        return keyset
    if encryption.required:
        raise EncryptionKeyMissing(
            f"encryption is required (encryption.required: true) but no keyset is set: put the Tink keyset JSON "
            f"in the password of Airflow connection {encryption.keys_conn_id!r} or in the environment variable "
            f"{KEYSET_ENV_VAR} (make one with: python -m callconv.protection.sealed new-keyset)"
        )
    log.warning(
        "storage: files are stored in plaintext because encryption is disabled in the config "
        "(encryption.required: false) and no keyset is set (Airflow connection %r or %s)",
        encryption.keys_conn_id,
        KEYSET_ENV_VAR,
    )
    return None


def stored_name(name: str, sealer: Sealer | None) -> str:
    """The name a file is stored under: ``.enc`` appended when it is sealed."""
    return f"{name}{ENCRYPTED_SUFFIX}" if sealer is not None else name


def plain_name(name: str) -> str:
    """The name without the ``.enc`` that storing it sealed added."""
    return name.removesuffix(ENCRYPTED_SUFFIX)


def _as_stream(data) -> BinaryIO:
    if isinstance(data, bytes | bytearray | memoryview):
        return io.BytesIO(data)
    if hasattr(data, "read"):
        return data
    return io.BufferedReader(_IterableReader(data), buffer_size=1024 * 1024)


def store(area: Area, logical_path: str, data: bytes | BinaryIO | Iterable[bytes], sealer: Sealer | None):
    """Write ``data`` at ``logical_path`` of ``area`` atomically, sealed (``.enc``) or, without a sealer, as it is.

    ``data`` is bytes, a binary file object, or an iterable of bytes (both streamed, never
    held whole). The folder is created. Returns the path written.
    """
    if area.data_class == "landing":
        raise StorageError("the landing area is the CRM's: the pipeline never writes it")
    logical = PurePosixPath(logical_path)
    target = area.folder.joinpath(*logical.parent.parts) / stored_name(logical.name, sealer)
    target.parent.mkdir(parents=True, exist_ok=True)
    source = _as_stream(data)
    if sealer is None:
        atomic_write(target, lambda out: shutil.copyfileobj(source, out, 1024 * 1024))
    else:
        write_sealed(
            target, source, sealer.keyset, sealer.generations, area.account_id, area.data_class, logical.as_posix()
        )
    return target


def store_as(area: Area, folder: str, name: str, data, sealer: Sealer | None):
    """:func:`store` at ``folder/name`` of the area (``folder`` a day, ``2026-11-27``); the path written.

    The same file in the other form (plaintext left from before encryption was turned
    on, say) is removed, so a folder never holds both.
    """
    target = store(area, f"{folder}/{name}", data, sealer)
    remove(target.parent / (name if sealer is not None else f"{name}{ENCRYPTED_SUFFIX}"))
    return target


def open_for_read(path, area: Area | None, sealer: Sealer | None) -> BinaryIO:
    """The plaintext of the stored file ``path`` of ``area``, as a binary stream.

    A file named ``.enc`` is opened only if it decrypts under its binding (account, class,
    logical path, newest generation; generation 0 for landing files), checked one segment at a
    time: anything else (plaintext, the old format, another file's ciphertext, an older copy)
    is refused with a one-line :class:`callconv.protection.sealed.SealError` naming no content. A file with
    a plain name is plaintext, opened as it is.
    """
    if isinstance(path, str):
        path = Path(path)
    if not path.name.endswith(ENCRYPTED_SUFFIX):
        return path.open("rb")
    if sealer is None:
        raise StorageError(
            f"{path.name} is sealed but no encryption keyset is set "
            f"(Airflow connection of encryption.keys_conn_id, or {KEYSET_ENV_VAR})"
        )
    if area is None:
        raise StorageError(f"{path.name} is sealed, but it was not read as a file of a known account and class")
    logical = area.logical(path)
    try:
        return read_sealed(path, sealer.keyset, sealer.generations, area.account_id, area.data_class, logical)
    except SealError as error:
        with path.open("rb") as head:
            if head.read(len(_OLD_FORMAT_MAGIC)) == _OLD_FORMAT_MAGIC:
                raise SealError(
                    f"{area.data_class} file {logical!r} of account {area.account_id!r} is in the old CCENC format, "
                    "which is no longer read here: convert it once with python -m callconv.protection.sealed migrate"
                ) from None
        raise error from None


def store_tree(source: Path, area: Area, folder: str, sealer: Sealer | None) -> int:
    """Store every file under the local folder ``source`` at the same place under ``folder`` of the area."""
    count = 0
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        relative = path.relative_to(source)
        with path.open("rb") as handle:
            store_as(area, PurePosixPath(folder, *relative.parent.parts).as_posix(), relative.name, handle, sealer)
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
    "Area",
    "Sealer",
    "sealer_for",
    "keyset_for",
    "EncryptionKeyMissing",
    "OutsideAccountFolder",
    "StorageError",
    "check_in_account",
    "open_for_read",
    "plain_name",
    "remove",
    "store",
    "store_as",
    "store_tree",
    "stored_name",
]
