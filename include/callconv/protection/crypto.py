"""The retired ``CCENC`` file format: read only, for ``python -m callconv.protection.sealed migrate``.

Files are no longer written in this format: every stored file is sealed with Tink's Streaming
AEAD and bound to what it is (:mod:`callconv.protection.sealed`). This format authenticated its own
header and chunks but not *which* file it was, so a copy could be swapped, moved or rolled
back unnoticed; that is why it was replaced. What is left here reads old files once, so the
migration can rewrite them sealed; the pipeline itself never reads them (a ``.enc`` file that
does not decrypt as a sealed file is refused).

Keys
    A :class:`Keyring` of named AES-256 keys, JSON, from ``CALL_CONVERSIONS_LEGACY_KEYS`` when
    migrating::

        {"primary": "2026-11", "keys": {"2026-11": "<urlsafe base64 of 32 bytes>", "2026-01": "..."}}

File format (version 1)
    header  = b"CCENC\\x01" | key id length (1 byte) | key id (UTF-8) | file id (16 random bytes)
    chunk*  = ciphertext length (4 bytes, big endian) | AES-GCM ciphertext with its 16-byte tag

    Each chunk held up to 1 MiB of plaintext, with at least one chunk. The file's AES-256 key is
    derived with HKDF-SHA256 from the keyring key and the file id; the nonce is the chunk counter;
    each chunk's associated data is ``header | chunk index (8 bytes) | final flag (1 byte)``, so a
    changed header, a dropped, duplicated or reordered chunk, a cut-off end or data appended after
    the final chunk raise :class:`DecryptionError`.

:func:`open_decrypted` reads a file as a stream, one chunk in memory at a time. Plaintext handed
out before an error was authenticated, but a stream that ends in :class:`DecryptionError` is
incomplete: discard what was read from it.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePath
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_KEYS_ENV_VAR",
    "MAGIC",
    "CryptoError",
    "DecryptionError",
    "Keyring",
    "KeyringError",
    "NotEncryptedError",
    "UnknownKeyError",
    "decrypt_bytes",
    "decrypt_stream",
    "is_encrypted",
    "open_decrypted",
]

DEFAULT_KEYS_ENV_VAR = "CALL_CONVERSIONS_LEGACY_KEYS"

MAGIC = b"CCENC\x01"
_MAGIC_PREFIX = MAGIC[:-1]
FORMAT_VERSION = MAGIC[-1]
KEY_BYTES = 32
FILE_ID_BYTES = 16
TAG_BYTES = 16
CHUNK_SIZE = 1024 * 1024
_MAX_CIPHERTEXT = CHUNK_SIZE + TAG_BYTES
_LENGTH = struct.Struct(">I")
_INDEX = struct.Struct(">Q")
_HKDF_INFO = b"callconv.protection.crypto v1 file key"
_NEW_KEY_HINT = "the keys are those the old files were written with"


class CryptoError(Exception):
    """Base class for every error this module raises on purpose."""


class KeyringError(CryptoError, ValueError):
    """The keyring is missing or malformed. The message never contains key material."""


class DecryptionError(CryptoError):
    """An encrypted file cannot be decrypted: wrong key, corrupted, tampered with or truncated."""


class UnknownKeyError(DecryptionError):
    """The file names a key id that the keyring does not hold."""


class NotEncryptedError(DecryptionError):
    """The data does not start with the encrypted-file header."""


# --------------------------------------------------------------------------- keys


class Keyring:
    """Named AES-256 keys of the old format; ``primary`` is the one old files were last written with."""

    __slots__ = ("_keys", "_primary")

    def __init__(self, keys: Mapping[str, bytes], primary: str):
        if not keys:
            raise KeyringError(f"encryption keyring has no keys; {_NEW_KEY_HINT}")
        checked: dict[str, bytes] = {}
        for key_id, key in keys.items():
            _check_key_id(key_id)
            if not isinstance(key, bytes | bytearray | memoryview):
                raise KeyringError(f"key {key_id!r} must be bytes, not {type(key).__name__}")
            if len(key) != KEY_BYTES:
                raise KeyringError(
                    f"key {key_id!r} is {len(key)} bytes; AES-256 keys are {KEY_BYTES} bytes ({_NEW_KEY_HINT})"
                )
            checked[key_id] = bytes(key)
        if primary not in checked:
            raise KeyringError(f"primary key {primary!r} is not among the keyring's keys {sorted(checked)}")
        self._keys = checked
        self._primary = primary

    @property
    def primary(self) -> str:
        return self._primary

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def key(self, key_id: str) -> bytes:
        try:
            return self._keys[key_id]
        except KeyError:
            raise UnknownKeyError(
                f"file was written with key {key_id!r}, which is not in the keyring (it has {self.key_ids})"
            ) from None

    def __repr__(self) -> str:  # never show key material
        return f"Keyring(primary={self._primary!r}, key_ids={self.key_ids!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Keyring):
            return NotImplemented
        return self._primary == other._primary and self._keys == other._keys

    __hash__ = None  # type: ignore[assignment]

    # ---- parsing

    @classmethod
    def from_text(cls, text: str, *, source: str = "encryption keyring") -> Keyring:
        """Parse the keyring JSON: ``{"primary": id, "keys": {id: base64 key, ...}}``."""
        if not isinstance(text, str) or not text.strip():
            raise KeyringError(f"{source} is empty; expected JSON like {_SHAPE}")
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            # error.msg and the position only: the document itself holds keys
            raise KeyringError(
                f"{source} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); "
                f"expected {_SHAPE}"
            ) from None
        return cls.from_mapping(raw, source=source)

    @classmethod
    def from_mapping(cls, raw: Any, *, source: str = "encryption keyring") -> Keyring:
        """Build a keyring from the parsed JSON (a mapping with ``keys`` and ``primary``)."""
        if not isinstance(raw, Mapping):
            raise KeyringError(f"{source} must be a JSON object like {_SHAPE}, not {type(raw).__name__}")
        unknown = sorted(set(raw) - {"keys", "primary"})
        if unknown:
            raise KeyringError(f"{source} has unknown field(s) {unknown}; expected only 'keys' and 'primary'")
        keys_raw = raw.get("keys")
        if isinstance(keys_raw, str):  # an Airflow extra may hold the mapping as a JSON string
            try:
                keys_raw = json.loads(keys_raw)
            except json.JSONDecodeError as error:
                raise KeyringError(f"{source}: 'keys' is a string but not valid JSON ({error.msg})") from None
        if not isinstance(keys_raw, Mapping) or not keys_raw:
            raise KeyringError(f"{source} needs a non-empty object 'keys' mapping key id to base64 key")
        keys = {}
        for key_id, text in keys_raw.items():
            try:
                _check_key_id(key_id)
            except KeyringError as error:
                raise KeyringError(f"{source}: {error}") from None
            keys[key_id] = _decode_key(key_id, text, source)
        primary = raw.get("primary")
        if primary is None:
            if len(keys) != 1:
                raise KeyringError(f"{source} has {len(keys)} keys but no 'primary' saying which to encrypt with")
            primary = next(iter(keys))
        if not isinstance(primary, str):
            raise KeyringError(f"{source}: 'primary' must be a key id string")
        try:
            return cls(keys, primary)
        except KeyringError as error:
            raise KeyringError(f"{source}: {error}") from None

    @classmethod
    def from_env(cls, var: str = DEFAULT_KEYS_ENV_VAR) -> Keyring:
        """The keyring JSON held in environment variable ``var``."""
        text = os.environ.get(var, "")
        if not text.strip():
            raise KeyringError(f"environment variable {var} is not set; it must hold the keyring JSON {_SHAPE}")
        return cls.from_text(text, source=f"keyring in environment variable {var}")

    def to_text(self) -> str:
        """The keyring as JSON (contains the keys: treat it as a secret)."""
        keys = {key_id: base64.urlsafe_b64encode(key).decode("ascii") for key_id, key in sorted(self._keys.items())}
        return json.dumps({"primary": self._primary, "keys": keys}, indent=2)


_SHAPE = '{"primary": "<key id>", "keys": {"<key id>": "<urlsafe base64 of 32 bytes>"}}'


def _check_key_id(key_id: Any) -> None:
    if not isinstance(key_id, str) or not key_id.strip():
        raise KeyringError(f"key ids must be non-empty strings, got {key_id!r}")
    if len(key_id.encode("utf-8")) > 255:
        raise KeyringError(f"key id {key_id[:40]!r}... is longer than 255 bytes")


def _decode_key(key_id: str, text: Any, source: str) -> bytes:
    if not isinstance(text, str):
        raise KeyringError(f"{source}: key {key_id!r} must be a base64 string, not {type(text).__name__}")
    compact = "".join(text.split())
    # urlsafe is the documented alphabet; standard base64 (openssl rand -base64 32) is accepted too
    normalised = compact.replace("-", "+").replace("_", "/")
    normalised += "=" * (-len(normalised) % 4)
    try:
        key = base64.b64decode(normalised, validate=True)
    except (binascii.Error, ValueError):
        raise KeyringError(f"{source}: key {key_id!r} is not valid base64 ({_NEW_KEY_HINT})") from None
    if len(key) != KEY_BYTES:
        raise KeyringError(
            f"{source}: key {key_id!r} decodes to {len(key)} bytes; AES-256 keys are {KEY_BYTES} bytes "
            f"({_NEW_KEY_HINT})"
        )
    return key


# --------------------------------------------------------------------------- format


def _file_aead(key: bytes, file_id: bytes) -> AESGCM:
    file_key = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=file_id, info=_HKDF_INFO).derive(key)
    return AESGCM(file_key)


def _nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")


def _associated_data(header: bytes, index: int, final: bool) -> bytes:
    return header + _INDEX.pack(index) + (b"\x01" if final else b"\x00")


def _read_exactly(src: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes, fewer only at end of stream (copes with short reads from pipes)."""
    data = src.read(size)
    if data is None:
        data = b""
    if len(data) == size or not data:
        return bytes(data)
    parts = [data]
    missing = size - len(data)
    while missing:
        more = src.read(missing)
        if not more:
            break
        parts.append(more)
        missing -= len(more)
    return b"".join(parts)


class _Decryptor:
    """Reads and checks the header on creation; :meth:`chunks` yields authenticated plaintext."""

    def __init__(self, src: BinaryIO, keyring: Keyring):
        self._src = src
        start = _read_exactly(src, len(MAGIC) + 1)
        if len(start) < len(MAGIC) or not start.startswith(_MAGIC_PREFIX):
            raise NotEncryptedError("data is not an encrypted call-conversions file (no CCENC header)")
        if start[len(_MAGIC_PREFIX)] != FORMAT_VERSION:
            raise DecryptionError(
                f"encrypted file has format version {start[len(_MAGIC_PREFIX)]}; this code reads version "
                f"{FORMAT_VERSION}"
            )
        if len(start) < len(MAGIC) + 1 or start[-1] == 0:
            raise DecryptionError("encrypted file header is truncated or corrupt (no key id)")
        rest = _read_exactly(src, start[-1] + FILE_ID_BYTES)
        if len(rest) < start[-1] + FILE_ID_BYTES:
            raise DecryptionError("encrypted file header is truncated")
        self._header = start + rest
        raw_id, file_id = rest[: start[-1]], rest[start[-1] :]
        try:
            key_id = raw_id.decode("utf-8")
        except UnicodeDecodeError:
            raise DecryptionError("encrypted file header is corrupt (key id is not UTF-8)") from None
        self.key_id = key_id
        self._aead = _file_aead(keyring.key(key_id), file_id)

    def _read_length(self, after: int) -> int | None:
        raw = _read_exactly(self._src, _LENGTH.size)
        if not raw:
            return None
        if len(raw) < _LENGTH.size:
            raise DecryptionError(f"encrypted file is truncated (cut off after chunk {after})")
        (length,) = _LENGTH.unpack(raw)
        if not TAG_BYTES <= length <= _MAX_CIPHERTEXT:
            raise DecryptionError(f"encrypted file is corrupt: chunk {after + 1} claims {length} bytes")
        return length

    def _open(self, index: int, ciphertext: bytes, final: bool) -> bytes | None:
        try:
            return self._aead.decrypt(_nonce(index), ciphertext, _associated_data(self._header, index, final))
        except InvalidTag:
            return None

    def chunks(self) -> Iterator[bytes]:
        length = self._read_length(after=-1)
        if length is None:
            raise DecryptionError("encrypted file is truncated (header only, no data chunks)")
        index = 0
        while True:
            ciphertext = _read_exactly(self._src, length)
            if len(ciphertext) < length:
                raise DecryptionError(f"encrypted file is truncated (chunk {index} is incomplete)")
            length = self._read_length(after=index)
            at_end = length is None
            plaintext = self._open(index, ciphertext, final=at_end)
            if plaintext is None:
                # only on failure: find out which way round the final flag would have fitted
                if self._open(index, ciphertext, final=not at_end) is not None:
                    if at_end:
                        raise DecryptionError(
                            f"encrypted file is truncated (it ends after chunk {index}, which is not the final chunk)"
                        )
                    raise DecryptionError(f"encrypted file has unexpected data after its final chunk {index}")
                raise DecryptionError(
                    f"chunk {index} of the encrypted file failed authentication: the file is corrupted, "
                    f"was tampered with (changed, reordered or missing chunks, or an altered header), "
                    f"or key {self.key_id!r} is not the key it was written with"
                )
            yield plaintext
            if at_end:
                return
            index += 1


# --------------------------------------------------------------------------- streams


def decrypt_stream(src: BinaryIO, dst: BinaryIO, keyring: Keyring) -> None:
    """Decrypt ``src`` into ``dst`` chunk by chunk. On :class:`DecryptionError` discard ``dst``."""
    for plaintext in _Decryptor(src, keyring).chunks():
        dst.write(plaintext)


def decrypt_bytes(blob: bytes, keyring: Keyring) -> bytes:
    out = io.BytesIO()
    decrypt_stream(io.BytesIO(blob), out, keyring)
    return out.getvalue()


class _DecryptingReader(io.RawIOBase):
    """Raw binary reader over an encrypted stream; decrypts one chunk whenever it runs dry."""

    def __init__(self, src: BinaryIO, keyring: Keyring, *, close_source: bool, name: str | None = None):
        super().__init__()
        self._src = src
        self._close_source = close_source
        self._decryptor = _Decryptor(src, keyring)
        self._chunks = self._decryptor.chunks()
        self._buffer = memoryview(b"")
        self._done = False
        if name is not None:
            self.name = name

    @property
    def key_id(self) -> str:
        return self._decryptor.key_id

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        while not self._buffer:
            if self._done:
                return 0
            try:
                self._buffer = memoryview(next(self._chunks))
            except StopIteration:
                self._done = True
                self._buffer = memoryview(b"")
                return 0
        target = memoryview(buffer).cast("B")
        count = min(len(target), len(self._buffer))
        target[:count] = self._buffer[:count]
        self._buffer = self._buffer[count:]
        return count

    def close(self) -> None:
        if not self.closed:
            self._chunks.close()
            self._buffer = memoryview(b"")
            if self._close_source:
                self._src.close()
        super().close()


def open_decrypted(
    path_or_fileobj, keyring: Keyring, *, buffer_size: int = io.DEFAULT_BUFFER_SIZE
) -> io.BufferedReader:
    """A binary file object yielding the plaintext lazily, one chunk (1 MiB) in memory at a time.

    Accepts a path (str, ``pathlib.Path``, a UPath/ObjectStoragePath - anything with ``open()``)
    or an already open binary file object (left open when the reader is closed). The header is
    checked at once, so a missing key fails here rather than at the first read. Wrap it in
    ``io.TextIOWrapper(..., encoding="utf-8", newline="")`` for the csv module.
    """
    src, owned = _open_source(path_or_fileobj)
    try:
        raw = _DecryptingReader(src, keyring, close_source=owned, name=_display_name(path_or_fileobj))
    except BaseException:
        if owned:
            src.close()
        raise
    return io.BufferedReader(raw, buffer_size=buffer_size)


def _open_source(path_or_fileobj) -> tuple[BinaryIO, bool]:
    if hasattr(path_or_fileobj, "read"):
        return path_or_fileobj, False
    if isinstance(path_or_fileobj, str):
        path_or_fileobj = Path(path_or_fileobj)
    if hasattr(path_or_fileobj, "open"):
        return path_or_fileobj.open("rb"), True
    if isinstance(path_or_fileobj, os.PathLike):
        return open(path_or_fileobj, "rb"), True  # noqa: SIM115 - handed to the caller
    raise TypeError(f"expected a path or a binary file object, not {type(path_or_fileobj).__name__}")


def _display_name(path_or_fileobj) -> str | None:
    if isinstance(path_or_fileobj, str | PurePath) or hasattr(path_or_fileobj, "open"):
        return str(path_or_fileobj)
    return None


def is_encrypted(path_or_bytes) -> bool:
    """Whether the bytes, file or path start with the encrypted-file magic.

    A file object is peeked at and put back where it was (it must be seekable).
    """
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        return bytes(path_or_bytes[: len(MAGIC)]) == MAGIC
    if hasattr(path_or_bytes, "read"):
        position = path_or_bytes.tell()
        try:
            return _read_exactly(path_or_bytes, len(MAGIC)) == MAGIC
        finally:
            path_or_bytes.seek(position)
    src, _ = _open_source(path_or_bytes)
    with src:
        return _read_exactly(src, len(MAGIC)) == MAGIC
