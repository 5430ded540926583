"""Encryption at rest for every file the pipeline stores, with key rotation and streaming reads.

Keys
    A :class:`Keyring` holds named AES-256 keys and says which one is *primary*. New files are
    always written with the primary key; the key id is recorded in each file's header, so files
    written with an older key still decrypt as long as that key stays in the keyring. Rotating
    means: add a new key, make it primary, keep the old ones until no stored file uses them.

    The keyring is JSON, from an environment variable or an Airflow connection::

        {"primary": "2026-11", "keys": {"2026-11": "<urlsafe base64 of 32 bytes>", "2026-01": "..."}}

    Make a key with ``python -m callconv.crypto new-key``.

File format (version 1)
    header  = b"CCENC\\x01" | key id length (1 byte) | key id (UTF-8) | file id (16 random bytes)
    chunk*  = ciphertext length (4 bytes, big endian) | AES-GCM ciphertext with its 16-byte tag

    Each chunk holds up to 1 MiB of plaintext; there is always at least one chunk (an empty
    plaintext gives one empty final chunk). Every file gets its own AES-256 key, derived with
    HKDF-SHA256 from the keyring key and the file id, so the 12-byte nonce can simply be the
    chunk counter and never repeats under one key. Each chunk's associated data is
    ``header | chunk index (8 bytes) | final flag (1 byte)``: a changed header, a dropped,
    duplicated or reordered chunk, a cut-off end or data appended after the final chunk all fail
    authentication and raise :class:`DecryptionError`.

Reading is a stream: :func:`open_decrypted` gives a file object that decrypts one chunk at a
time, so ``pandas.read_csv(open_decrypted(path, keyring), chunksize=...)`` or
``csv.reader(io.TextIOWrapper(open_decrypted(path, keyring), encoding="utf-8", newline=""))``
never hold more than a couple of MiB, whatever the file size.

Plaintext handed out before an error was authenticated, but a stream that ends in
:class:`DecryptionError` is incomplete: discard what was read from it.

Command line (keys from ``CALL_CONVERSIONS_ENCRYPTION_KEYS`` or an Airflow connection)::

    python -m callconv.crypto decrypt conversions.csv.enc conversions.csv
    python -m callconv.crypto decrypt var/data_docs/ACCOUNT/DAY /tmp/docs   # a folder, file by file
    python -m callconv.crypto decrypt --conn-id call_conversions_encryption IN OUT
    python -m callconv.crypto encrypt IN OUT
    python -m callconv.crypto new-key [--key-id 2026-11 [--rotate]]

Airflow is imported only inside :func:`keyring_from_airflow`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import os
import struct
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import suppress
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
    "atomic_write",
    "decrypt_bytes",
    "decrypt_stream",
    "encrypt_bytes",
    "encrypt_stream",
    "generate_key",
    "is_encrypted",
    "keyring_from_airflow",
    "main",
    "open_decrypted",
    "register_with_log_masker",
    "write_encrypted",
]

DEFAULT_KEYS_ENV_VAR = "CALL_CONVERSIONS_ENCRYPTION_KEYS"

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
_HKDF_INFO = b"callconv.crypto v1 file key"
_NEW_KEY_HINT = "make one with: python -m callconv.crypto new-key"


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


def generate_key() -> str:
    """A new random AES-256 key as urlsafe base64 text, ready to paste into a keyring."""
    return base64.urlsafe_b64encode(AESGCM.generate_key(bit_length=256)).decode("ascii")


class Keyring:
    """Named AES-256 keys; ``primary`` is the one new files are written with."""

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

    # ---- rotation helpers

    def rotated(self, key_id: str, key: bytes | None = None) -> Keyring:
        """This keyring plus a new key (random unless given) that becomes primary."""
        if key_id in self._keys:
            raise KeyringError(f"key id {key_id!r} is already in the keyring; pick a new one")
        new_key = key if key is not None else AESGCM.generate_key(bit_length=256)
        return Keyring({**self._keys, key_id: new_key}, key_id)

    def to_text(self) -> str:
        """The keyring as JSON (contains the keys: treat it as a secret)."""
        keys = {key_id: base64.urlsafe_b64encode(key).decode("ascii") for key_id, key in sorted(self._keys.items())}
        return json.dumps({"primary": self._primary, "keys": keys}, indent=2)

    def _secret_texts(self) -> set[str]:
        """Every spelling a key is likely to have had in the source, for the log masker."""
        texts = set()
        for key in self._keys.values():
            for encoded in (base64.urlsafe_b64encode(key), base64.standard_b64encode(key)):
                text = encoded.decode("ascii")
                texts.update((text, text.rstrip("=")))
        return texts


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


def keyring_from_airflow(conn_id: str) -> Keyring:
    """The keyring held by Airflow connection ``conn_id``, its keys registered with the log masker.

    The connection's password holds the keyring JSON; or, with no password, its extras hold
    ``keys`` (an object, or a JSON string of one) and ``primary``.
    """
    from airflow.sdk import Connection

    conn = Connection.get(conn_id)
    source = f"keyring in Airflow connection {conn_id!r}"
    if conn.password:
        keyring = Keyring.from_text(conn.password, source=f"{source} (password)")
    else:
        extra = conn.extra_dejson or {}
        if not extra.get("keys"):
            raise KeyringError(
                f"Airflow connection {conn_id!r} holds no keyring: put the keyring JSON {_SHAPE} in its "
                "password, or 'keys' and 'primary' in its extras"
            )
        fields = {name: extra[name] for name in ("keys", "primary") if name in extra}
        keyring = Keyring.from_mapping(fields, source=f"{source} (extras)")
    _mask_secrets(keyring._secret_texts())
    return keyring


def register_with_log_masker(keyring: Keyring) -> None:
    """Have Airflow's log masker hide the keyring's keys (a no-op outside Airflow)."""
    _mask_secrets(keyring._secret_texts())


def _mask_secrets(texts: set[str]) -> None:
    try:
        from airflow.sdk.log import mask_secret
    except ImportError:
        try:
            from airflow.sdk.execution_time.secrets_masker import mask_secret
        except ImportError:  # outside Airflow there is no masker to feed
            return
    for text in sorted(texts):
        mask_secret(text)


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


class _Encryptor:
    def __init__(self, dst: BinaryIO, keyring: Keyring):
        key_id = keyring.primary.encode("utf-8")
        file_id = os.urandom(FILE_ID_BYTES)
        self._header = MAGIC + bytes([len(key_id)]) + key_id + file_id
        self._aead = _file_aead(keyring.key(keyring.primary), file_id)
        self._dst = dst
        self._index = 0
        dst.write(self._header)

    def write_chunk(self, plaintext: bytes, final: bool) -> None:
        ad = _associated_data(self._header, self._index, final)
        ciphertext = self._aead.encrypt(_nonce(self._index), plaintext, ad)
        self._dst.write(_LENGTH.pack(len(ciphertext)))
        self._dst.write(ciphertext)
        self._index += 1


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


def encrypt_stream(src: BinaryIO, dst: BinaryIO, keyring: Keyring) -> None:
    """Encrypt everything readable from ``src`` into ``dst`` with the keyring's primary key."""
    encryptor = _Encryptor(dst, keyring)
    pending = _read_exactly(src, CHUNK_SIZE)
    while True:
        following = _read_exactly(src, CHUNK_SIZE) if len(pending) == CHUNK_SIZE else b""
        encryptor.write_chunk(pending, final=not following)
        if not following:
            return
        pending = following


def decrypt_stream(src: BinaryIO, dst: BinaryIO, keyring: Keyring) -> None:
    """Decrypt ``src`` into ``dst`` chunk by chunk. On :class:`DecryptionError` discard ``dst``."""
    for plaintext in _Decryptor(src, keyring).chunks():
        dst.write(plaintext)


def encrypt_bytes(data: bytes, keyring: Keyring) -> bytes:
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(data), out, keyring)
    return out.getvalue()


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


def write_encrypted(path, data: bytes | BinaryIO, keyring: Keyring) -> None:
    """Encrypt ``data`` (bytes, or a binary file object streamed chunk by chunk) to ``path`` atomically.

    The ciphertext goes to a temporary sibling first and is renamed over ``path`` only once
    complete, so readers never see a partial file. ``path`` is a str, ``pathlib.Path``, or a
    UPath-like object (``open``, ``with_name``, ``rename``, ``unlink``) such as ObjectStoragePath.
    """
    source = data if hasattr(data, "read") else io.BytesIO(data)
    atomic_write(path, lambda out: encrypt_stream(source, out, keyring))


def atomic_write(path, fill: Callable[[BinaryIO], None]) -> None:
    """Have ``fill`` write a temporary sibling of ``path``, then rename it over ``path``.

    On any error the temporary file is removed and ``path`` is left as it was. A local file is
    created readable by its owner only.
    """
    if isinstance(path, str):
        path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    local = isinstance(path, Path)
    try:
        if local:
            out = os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
        else:
            out = temporary.open("wb")
        with out:
            fill(out)
            if local:
                out.flush()
                os.fsync(out.fileno())
        if local:
            os.replace(temporary, path)
            _fsync_directory(path.parent)
        else:
            temporary.rename(path)
    except BaseException:
        with suppress(Exception):
            temporary.unlink()
        raise


def _fsync_directory(directory: Path) -> None:
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- command line


def _keyring_for_cli(args) -> Keyring:
    if args.conn_id:
        return keyring_from_airflow(args.conn_id)
    return Keyring.from_env(args.env)


def _transform(args, operation) -> None:
    keyring = _keyring_for_cli(args)
    if operation is decrypt_stream and args.input != "-" and Path(args.input).is_dir():
        _decrypt_tree(Path(args.input), Path(args.output), keyring, force=args.force)
        return
    if args.input != "-" and args.output != "-":
        if Path(args.input).resolve() == Path(args.output).resolve():
            raise CryptoError("input and output are the same file")
    if args.output != "-" and Path(args.output).exists() and not args.force:
        raise CryptoError(f"{args.output} exists; use --force to overwrite it")
    src = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")  # noqa: SIM115
    try:
        if args.output == "-":
            operation(src, sys.stdout.buffer, keyring)
            sys.stdout.buffer.flush()
            return
        output = Path(args.output)
        # a private temporary file: decrypted output holds personal data, and a failed run leaves nothing
        fd, temporary = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                operation(src, out, keyring)
            os.replace(temporary, output)
        except BaseException:
            with suppress(OSError):
                os.unlink(temporary)
            raise
    finally:
        if src is not sys.stdin.buffer:
            src.close()


def _decrypt_tree(source: Path, target: Path, keyring: Keyring, *, force: bool) -> None:
    """Decrypt every encrypted file under ``source`` into the same place under ``target``, minus ``.enc``.

    For folders such as a day's Great Expectations Data Docs; files that are not encrypted are left out.
    """
    if target.exists() and not force:
        raise CryptoError(f"{target} exists; use --force to write into it")
    if target.resolve().is_relative_to(source.resolve()):
        raise CryptoError("OUT must not be inside IN")
    decrypted = skipped = 0
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        if not is_encrypted(path):
            skipped += 1
            continue
        relative = path.relative_to(source)
        output = target / relative.parent / relative.name.removesuffix(".enc")
        output.parent.mkdir(parents=True, exist_ok=True)
        with path.open("rb") as src:
            atomic_write(output, lambda out, src=src: decrypt_stream(src, out, keyring))
        decrypted += 1
    print(f"decrypted {decrypted} files into {target} ({skipped} not encrypted, left out)", file=sys.stderr)


def _new_key(args) -> None:
    if args.rotate:
        if not args.key_id:
            raise CryptoError("--rotate needs --key-id for the new key")
        print(_keyring_for_cli(args).rotated(args.key_id).to_text())
    elif args.key_id:
        print(Keyring({args.key_id: AESGCM.generate_key(bit_length=256)}, args.key_id).to_text())
    else:
        print(generate_key())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m callconv.crypto",
        description="Encrypt or decrypt call-conversion pipeline files, or make a new key.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def keys_options(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--conn-id", help="read the keyring from this Airflow connection instead of the environment"
        )
        command.add_argument(
            "--env",
            default=DEFAULT_KEYS_ENV_VAR,
            help=f"environment variable holding the keyring JSON (default {DEFAULT_KEYS_ENV_VAR})",
        )

    for name, text in (
        (
            "decrypt",
            "decrypt IN into OUT (for example to upload a conversion file by hand); a folder IN "
            "(a day's Data Docs) is decrypted file by file into the folder OUT",
        ),
        ("encrypt", "encrypt IN into OUT with the keyring's primary key"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("input", metavar="IN", help="file to read, or - for stdin")
        command.add_argument("output", metavar="OUT", help="file to write, or - for stdout")
        command.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
        keys_options(command)

    new_key = commands.add_parser(
        "new-key",
        help="print a new random key",
        description="Print a new random AES-256 key; with --key-id a whole keyring JSON; "
        "with --rotate the current keyring plus the new key as primary.",
    )
    new_key.add_argument("--key-id", help="print a keyring JSON with the new key under this id, as primary")
    new_key.add_argument(
        "--rotate", action="store_true", help="add the new key to the current keyring (env or --conn-id) as primary"
    )
    keys_options(new_key)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "new-key":
            _new_key(args)
        elif args.command == "decrypt":
            _transform(args, decrypt_stream)
        else:
            _transform(args, encrypt_stream)
    except (CryptoError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
