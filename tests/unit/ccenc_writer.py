"""A writer of the retired CCENC v1 format, for tests only: the pipeline no longer writes it.

The old files still exist in deployments until ``python -m callconv.protection.sealed migrate`` has
converted them, so the reader (:mod:`callconv.protection.crypto`) and the migration are tested on
files made here, byte for byte in the format the old writer produced.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from callconv.protection.crypto import CHUNK_SIZE, MAGIC, Keyring

_HKDF_INFO = b"callconv.protection.crypto v1 file key"


def encrypt_stream(src: BinaryIO, dst: BinaryIO, keyring: Keyring) -> None:
    key_id = keyring.primary.encode("utf-8")
    file_id = os.urandom(16)
    header = MAGIC + bytes([len(key_id)]) + key_id + file_id
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=file_id, info=_HKDF_INFO).derive(keyring.key(keyring.primary))
    aead = AESGCM(key)
    dst.write(header)
    pending, index = _read(src), 0
    while True:
        following = _read(src) if len(pending) == CHUNK_SIZE else b""
        final = not following
        associated = header + index.to_bytes(8, "big") + (b"\x01" if final else b"\x00")
        ciphertext = aead.encrypt(index.to_bytes(12, "big"), pending, associated)
        dst.write(len(ciphertext).to_bytes(4, "big") + ciphertext)
        if final:
            return
        pending, index = following, index + 1


def _read(src: BinaryIO) -> bytes:
    parts, missing = [], CHUNK_SIZE
    while missing:
        data = src.read(missing)
        if not data:
            break
        parts.append(data)
        missing -= len(data)
    return b"".join(parts)


def encrypt_bytes(data: bytes, keyring: Keyring) -> bytes:
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(data), out, keyring)
    return out.getvalue()


def write_encrypted(path, data: bytes | BinaryIO, keyring: Keyring) -> None:
    source = data if hasattr(data, "read") else io.BytesIO(data)
    with path.open("wb") as out:
        encrypt_stream(source, out, keyring)
