"""Files sealed with Tink's Streaming AEAD and bound to what they are (issue 13, hole 6).

Why
    The old hand-written format (``CCENC``, :mod:`callconv.protection.crypto`) authenticated only its own
    header, so an encrypted file could be copied over another account's file, moved to another
    day or rolled back to an older copy, and it still decrypted. Here the format is Tink's
    Streaming AEAD (key template ``AES256_GCM_HKDF_1MB``: 1 MiB segments, each authenticated
    with its index and a last-segment flag, so truncation, reordering and bit flips fail), and
    the associated data names the file: the account id, the data class (``landing``,
    ``archive``, ``quarantine``, ``docs``, ``export``), the logical path relative to the
    account's folder (``2026-11-27/call_conversions_x.csv``, without ``.enc``) and a generation
    number. A file read under any other binding does not decrypt.

Rollback
    "Rollback" means an older ciphertext of the same logical path put back in place of the
    newest one. Every write of a path takes the next generation; the newest is kept in the
    warehouse table ``sealed_generations`` (:class:`Generations`), outside the file area, so
    rolling back the files cannot roll back the counter. The order, chosen so that a crash
    never bricks a file:

    1. in one transaction of its own, lock the path (a PostgreSQL advisory lock, so two writers
       of one path take turns) and read its generation ``g`` (0 if it was never written);
    2. seal the data under ``g + 1`` into a temporary sibling and rename it over the target;
    3. upsert ``g + 1`` into the table and commit.

    A reader accepts the table's ``g`` or ``g + 1`` and nothing else: a crash (or a rollback of
    the transaction) between the rename and the commit leaves a file at ``g + 1`` with the table
    at ``g``, which still reads, and the read moves the table on to ``g + 1`` (so the copy at
    ``g`` is refused from then on). Every older copy is refused. Writers of different paths never
    contend (one row each), so the rerun DAG's parallel days cannot lose each other's updates.

Landing files
    The CRM writes the landing area, not the pipeline, so no counter covers it. A landing file is
    read as dropped: plaintext, or, if its name ends in ``.enc``, sealed by the exporter with
    ``python -m callconv.protection.sealed seal`` under class ``landing`` and generation 0. A landing file
    put back after it was taken in is recognised by its checksum (``crm_imports``) and skipped.

Keys
    A Tink keyset (JSON keyset format) in the environment variable
    ``CALL_CONVERSIONS_ENCRYPTION_KEYS`` or the password of the Airflow connection named by
    ``encryption.keys_conn_id``. Rotation adds a new primary key to the keyset
    (``python -m callconv.protection.sealed rotate``); files written under older keys still decrypt while
    those keys stay in the keyset. In production the keyset is wrapped by a Cloud KMS key
    (envelope encryption, see the README's data-protection section).

Old files
    Files in the old ``CCENC`` format are read only by ``python -m callconv.protection.sealed migrate``,
    which decrypts each with the old keyring (``CALL_CONVERSIONS_LEGACY_KEYS``) and rewrites it
    sealed and bound. A sealed reader never falls back to plaintext or to the old format.

Errors are one line naming the account, the class and the logical path, never file content.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import sqlalchemy as sa
import tink
from sqlalchemy.dialects import postgresql, sqlite
from tink import cleartext_keyset_handle, secret_key_access, streaming_aead
from tink.proto import tink_pb2

from callconv.protection.crypto import CryptoError, Keyring
from callconv.schema import sealed_generations

log = logging.getLogger(__name__)

KEYSET_ENV_VAR = "CALL_CONVERSIONS_ENCRYPTION_KEYS"
LEGACY_KEYS_ENV_VAR = "CALL_CONVERSIONS_LEGACY_KEYS"
DATA_CLASSES = frozenset({"landing", "archive", "quarantine", "docs", "export"})
SEGMENT = 1024 * 1024
_PROBE = 64 * 1024

streaming_aead.register()


class SealError(Exception):
    """A sealed file could not be read or written; the message holds no file content."""


@dataclass(frozen=True)
class Binding:
    """What a sealed file is: whose, which class, where (relative to the account's folder), which write."""

    account_id: str
    data_class: str
    logical_path: str
    generation: int

    def __post_init__(self) -> None:
        if self.data_class not in DATA_CLASSES:
            raise SealError(f"unknown data class {self.data_class!r}")
        if not self.account_id or "/" in self.account_id:
            raise SealError("account id must be non-empty and hold no '/'")
        path = PurePosixPath(self.logical_path)
        if not path.parts or path.is_absolute() or ".." in path.parts or "\\" in self.logical_path:
            raise SealError(f"logical path {self.logical_path!r} must be relative and stay in its folder")
        if self.generation < 1 and not (self.data_class == "landing" and self.generation == 0):
            raise SealError("generation starts at 1 (0 only for landing files, which the CRM writes)")

    def associated_data(self) -> bytes:
        """Canonical JSON, so no two bindings share associated data."""
        fields = [1, self.account_id, self.data_class, PurePosixPath(self.logical_path).as_posix(), self.generation]
        return json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    def describe(self) -> str:
        return f"{self.data_class} file {self.logical_path!r} of account {self.account_id!r}"


# --------------------------------------------------------------------------- keysets


def new_keyset() -> tink.KeysetHandle:
    return tink.new_keyset_handle(streaming_aead.streaming_aead_key_templates.AES256_GCM_HKDF_1MB)


def keyset_to_json(handle: tink.KeysetHandle) -> str:
    return tink.json_proto_keyset_format.serialize(handle, secret_key_access.TOKEN)


def keyset_from_json(text: str, *, source: str = "keyset") -> tink.KeysetHandle:
    try:
        handle = tink.json_proto_keyset_format.parse(text, secret_key_access.TOKEN)
        handle.primitive(streaming_aead.StreamingAead)  # a keyset of another primitive is an error here
    except (tink.TinkError, ValueError) as error:
        raise SealError(f"{source} is not a Tink Streaming AEAD JSON keyset ({type(error).__name__})") from None
    _mask_key_material(text)
    return handle


def keyset_from_env(var: str = KEYSET_ENV_VAR) -> tink.KeysetHandle:
    text = os.environ.get(var, "")
    if not text.strip():
        raise SealError(f"environment variable {var} is not set; it must hold a Tink JSON keyset")
    return keyset_from_json(text, source=f"environment variable {var}")


KMS_KEYSET_AD = b"callconv sealed keyset"


def keyset_from_wrapped(text: str, master, *, source: str = "wrapped keyset") -> tink.KeysetHandle:
    """A keyset encrypted by ``master`` (a Tink AEAD: in production a Cloud KMS key), as ``wrap`` writes it."""
    try:
        handle = tink.json_proto_keyset_format.parse_encrypted(text, master, KMS_KEYSET_AD)
        handle.primitive(streaming_aead.StreamingAead)
        return handle
    except (tink.TinkError, ValueError) as error:
        raise SealError(f"{source} does not unwrap to a Streaming AEAD keyset ({type(error).__name__})") from None


def kms_aead(key_uri: str, credentials_path: str | None = None):
    """The Cloud KMS key ``gcp-kms://projects/.../cryptoKeys/...`` as a Tink AEAD (Tink's GCP KMS integration).

    Without ``credentials_path`` the worker's application-default credentials are used.
    """
    from tink import aead
    from tink.integration import gcpkms

    aead.register()
    return gcpkms.GcpKmsClient(key_uri, credentials_path).get_aead(key_uri)


def keyset_from_airflow(conn_id: str) -> tink.KeysetHandle | None:
    """The keyset in the connection's password; None if there is no such connection.

    With ``kms_key_uri`` in the connection's extras (production), the password holds the keyset
    wrapped by that Cloud KMS key (``python -m callconv.protection.sealed wrap``), unwrapped here; the
    extras may name ``credentials_path``, else application-default credentials are used.
    Without it the password holds the plain JSON keyset. Airflow is imported here only.
    """
    try:
        from airflow.sdk import Connection
        from airflow.sdk.exceptions import AirflowNotFoundException
    except ImportError:  # outside Airflow there are no connections
        return None
    try:
        conn = Connection.get(conn_id)
    except AirflowNotFoundException:
        return None
    if not conn.password:
        raise SealError(f"Airflow connection {conn_id!r} holds no keyset in its password")
    extra = conn.extra_dejson or {}
    source = f"Airflow connection {conn_id!r}"
    if extra.get("kms_key_uri"):
        master = kms_aead(extra["kms_key_uri"], extra.get("credentials_path"))
        return keyset_from_wrapped(conn.password, master, source=source)
    return keyset_from_json(conn.password, source=source)


def _mask_key_material(text: str) -> None:
    """Have Airflow's log masker hide the keyset's key values (a no-op outside Airflow)."""
    try:
        from airflow.sdk.log import mask_secret
    except ImportError:
        return
    with suppress(ValueError, TypeError, AttributeError):
        for key in json.loads(text).get("key", []):
            mask_secret(key["keyData"]["value"])


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


class _Unclosed(io.RawIOBase):
    """Tink closes its sink when the stream ends; the caller still has to flush and rename it."""

    def __init__(self, sink: BinaryIO):
        super().__init__()
        self._sink = sink

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._sink.write(data)
        return len(data)


def seal_stream(source: BinaryIO, sink: BinaryIO, handle: tink.KeysetHandle, binding: Binding) -> None:
    """Seal everything readable from ``source`` into ``sink`` (left open), a segment at a time."""
    with _primitive(handle).new_encrypting_stream(_Unclosed(sink), binding.associated_data()) as stream:
        shutil.copyfileobj(source, stream, SEGMENT)


def seal_bytes(data: bytes, handle: tink.KeysetHandle, binding: Binding) -> bytes:
    sink = io.BytesIO()
    seal_stream(io.BytesIO(data), sink, handle, binding)
    return sink.getvalue()


def _refused(binding: Binding, generations: str) -> SealError:
    return SealError(
        f"{binding.describe()} does not decrypt as generation {generations}: tampered, truncated, "
        "not encrypted, moved, swapped with another file, rolled back to an older copy, or sealed with "
        "a key not in the keyset"
    )


class _SealedReader(io.RawIOBase):
    """The plaintext of a Tink decrypting stream, its first bytes already read; Tink errors become SealError."""

    def __init__(self, stream, source: BinaryIO, first: bytes, binding: Binding, name: str | None):
        super().__init__()
        self._stream, self._source, self._binding = stream, source, binding
        self._pending = memoryview(first)
        self.at_end: Callable[[], None] | None = None  # called once the whole file has authenticated
        if name is not None:
            self.name = name

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self._pending:
            try:
                data = self._stream.read(max(len(buffer), SEGMENT))
            except tink.TinkError:
                raise _refused(self._binding, str(self._binding.generation)) from None
            if not data:
                if self.at_end is not None:
                    at_end, self.at_end = self.at_end, None
                    at_end()
                return 0
            self._pending = memoryview(data)
        count = min(len(buffer), len(self._pending))
        memoryview(buffer).cast("B")[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def close(self) -> None:
        if not self.closed:
            with suppress(Exception):
                self._stream.close()
            self._source.close()
        super().close()


def open_sealed(
    opener: Callable[[], BinaryIO], handle: tink.KeysetHandle, bindings: list[Binding], name: str | None = None
) -> tuple[io.BufferedReader, Binding]:
    """The plaintext of the file ``opener`` opens, as a stream, and the binding it was sealed under.

    Each binding is tried in turn on the file's first segment (Tink authenticates the header
    with it); none fitting is a :class:`SealError`. Later segments are checked as they are read,
    so a stream that ends in :class:`SealError` is incomplete: discard what was read from it.
    """
    for binding in bindings:
        source = opener()
        try:
            stream = _primitive(handle).new_decrypting_stream(source, binding.associated_data())
            first = stream.read(_PROBE)
        except tink.TinkError:
            source.close()
            continue
        except BaseException:
            source.close()
            raise
        raw = _SealedReader(stream, source, first or b"", binding, name)
        return io.BufferedReader(raw, buffer_size=SEGMENT), binding
    raise _refused(bindings[0], " or ".join(str(b.generation) for b in bindings))


def open_sealed_bytes(blob: bytes, handle: tink.KeysetHandle, binding: Binding) -> bytes:
    reader, _ = open_sealed(lambda: io.BytesIO(blob), handle, [binding])
    with reader:
        return reader.read()


# --------------------------------------------------------------------------- generations


class Generations:
    """The newest generation of each sealed path, in the warehouse table ``sealed_generations``.

    ``bind`` is the warehouse engine (each write advances the counter in a transaction of its
    own) or a connection in a transaction (the counter commits with it: used for Data Docs,
    written inside the intake's transaction, which on SQLite holds the only write lock).
    """

    def __init__(self, bind: sa.Engine | sa.Connection):
        self.bind = bind

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sa.Connection]:
        if isinstance(self.bind, sa.Connection):
            # the caller's transaction: the counter commits (or rolls back) with it
            with contextlib.nullcontext() if self.bind.in_transaction() else self.bind.begin():
                yield self.bind
        else:
            with self.bind.begin() as connection:
                yield connection

    @staticmethod
    def _where(account_id: str, data_class: str, logical_path: str):
        table = sealed_generations.c
        return sa.and_(
            table.account_id == account_id, table.data_class == data_class, table.logical_path == logical_path
        )

    def current(self, account_id: str, data_class: str, logical_path: str, connection=None) -> int:
        """The path's newest recorded generation; 0 if it was never written."""
        query = sa.select(sealed_generations.c.generation).where(self._where(account_id, data_class, logical_path))
        if connection is not None:
            return connection.scalar(query) or 0
        if isinstance(self.bind, sa.Connection):
            return self.bind.scalar(query) or 0
        with self.bind.connect() as own:
            return own.scalar(query) or 0

    def _record(self, connection, account_id: str, data_class: str, logical_path: str, generation: int) -> None:
        """Upsert: the row takes ``generation`` unless it already holds a newer one."""
        values = dict(account_id=account_id, data_class=data_class, logical_path=logical_path, generation=generation)
        dialect = connection.dialect.name
        if dialect in ("postgresql", "sqlite"):
            insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
            statement = insert(sealed_generations).values(**values)
            connection.execute(
                statement.on_conflict_do_update(
                    index_elements=["account_id", "data_class", "logical_path"],
                    set_={"generation": sa.func.greatest(sealed_generations.c.generation, generation)}
                    if dialect == "postgresql"
                    else {"generation": sa.func.max(sealed_generations.c.generation, generation)},
                )
            )
            return
        held = self.current(account_id, data_class, logical_path, connection)  # under the caller's lock
        connection.execute(sealed_generations.delete().where(self._where(account_id, data_class, logical_path)))
        connection.execute(sealed_generations.insert().values(**{**values, "generation": max(held, generation)}))

    @contextlib.contextmanager
    def next(self, account_id: str, data_class: str, logical_path: str) -> Iterator[Binding]:
        """The binding of the path's next write; it is recorded when the block ends without error.

        The block seals the file and renames it into place; the path is locked meanwhile.
        """
        with self._transaction() as connection:
            if connection.dialect.name == "postgresql":
                name = "|".join(("sealed", account_id, data_class, logical_path))
                connection.execute(sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtextextended(name, 0))))
            generation = self.current(account_id, data_class, logical_path, connection) + 1
            yield Binding(account_id, data_class, logical_path, generation)
            self._record(connection, account_id, data_class, logical_path, generation)

    def accepted(self, account_id: str, data_class: str, logical_path: str) -> tuple[int, list[Binding]]:
        """The recorded generation ``g`` and the bindings a reader accepts: ``g``, then ``g + 1`` (module doc)."""
        held = self.current(account_id, data_class, logical_path)
        generations = [held, held + 1] if held else [1]
        return held, [Binding(account_id, data_class, logical_path, g) for g in generations]

    def caught_up(self, binding: Binding) -> None:
        """A read found the file one generation ahead (a write that crashed before its commit): record it."""
        with self._transaction() as connection:
            self._record(connection, binding.account_id, binding.data_class, binding.logical_path, binding.generation)
        log.info("sealed: %s was one generation ahead of its counter; the counter caught up", binding.describe())


# --------------------------------------------------------------------------- files


def atomic_write(path, fill: Callable[[BinaryIO], None]) -> None:
    """Have ``fill`` write a temporary sibling of ``path``, then rename it over ``path``.

    On any error the temporary file is removed and ``path`` is left as it was. A local file is
    created readable by its owner only. ``path`` is a ``pathlib.Path`` or an ObjectStoragePath.
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


def write_sealed(path, source: BinaryIO, handle, generations: Generations, account_id, data_class, logical_path):
    """Seal ``source`` to ``path`` under the logical path's next generation (module doc, steps 1-3)."""
    with generations.next(account_id, data_class, logical_path) as binding:
        atomic_write(path, lambda out: seal_stream(source, out, handle, binding))
    return binding


def read_sealed(path, handle, generations: Generations, account_id, data_class, logical_path) -> io.BufferedReader:
    """The plaintext stream of ``path``, only if it is the logical path's newest write."""
    if isinstance(path, str):
        path = Path(path)
    if data_class == "landing":
        held, bindings = 0, [Binding(account_id, data_class, logical_path, 0)]
    else:
        held, bindings = generations.accepted(account_id, data_class, logical_path)
    reader, binding = open_sealed(lambda: path.open("rb"), handle, bindings, name=str(path))
    if binding.generation > held:  # a write that crashed before its commit (also the very first one)
        reader.raw.at_end = lambda: generations.caught_up(binding)  # once all of it has authenticated
    return reader


# --------------------------------------------------------------------------- migration from CCENC


def migrate(root, account_id: str, data_class: str, handle, legacy_keyring, generations: Generations) -> list[str]:
    """Rewrite every old-format ``.enc`` file under ``root/account_id`` sealed and bound, in place.

    ``root`` is the class's storage root (``archive_uri`` and so on); the logical path of each
    file is its place under the account's folder, without ``.enc``. Files already sealed are left.
    """
    from callconv.protection.crypto import is_encrypted, open_decrypted

    moved = []
    folder = Path(root) / account_id
    for path in sorted(folder.rglob("*.enc")):
        if not is_encrypted(path):  # already sealed (or not ours): leave it
            continue
        logical = path.relative_to(folder).as_posix().removesuffix(".enc")
        # streamed: the old file stays in place until its sealed copy is renamed over it; an
        # old file that does not decrypt stops the migration with the file and counter unchanged
        with open_decrypted(path, legacy_keyring) as plaintext:
            write_sealed(path, plaintext, handle, generations, account_id, data_class, logical)
        moved.append(logical)
    log.info("migrated %d %s files of account %s to the sealed format", len(moved), data_class, account_id)
    return moved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m callconv.protection.sealed", description="Sealed files (README, data protection)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("new-keyset", help="print a new AES256_GCM_HKDF_1MB keyset (JSON)")
    commands.add_parser("rotate", help=f"print the keyset in ${KEYSET_ENV_VAR} with a new primary key")
    wrap = commands.add_parser("wrap", help=f"print the keyset in ${KEYSET_ENV_VAR} wrapped by a Cloud KMS key")
    wrap.add_argument("--kms-key-uri", required=True, help="gcp-kms://projects/P/locations/L/keyRings/R/cryptoKeys/K")
    wrap.add_argument("--credentials-path", help="a service account key file (default: application-default)")
    url_default = os.environ.get("CALL_CONVERSIONS_WAREHOUSE_URL")
    mig = commands.add_parser("migrate", help="rewrite old CCENC files of one account and class as sealed, bound files")
    opened = commands.add_parser("open", help="write the plaintext of one stored file (e.g. for a manual upload)")
    seal = commands.add_parser("seal", help="seal a CRM extract for the landing area (class landing, generation 0)")
    for command, classes in ((mig, DATA_CLASSES - {"landing"}), (opened, DATA_CLASSES)):
        command.add_argument(
            "--url", default=url_default, help="warehouse URL (default $CALL_CONVERSIONS_WAREHOUSE_URL)"
        )
        command.add_argument("--account", required=True)
        command.add_argument("--data-class", required=True, choices=sorted(classes))
    mig.add_argument("--root", required=True, type=Path, help="the class's storage root, e.g. var/archive")
    opened.add_argument("--logical-path", required=True, help="e.g. 2026-11-27/call_conversions_x.csv")
    opened.add_argument("input", type=Path, help="the stored .enc file")
    opened.add_argument("output", type=Path, help="where the plaintext goes (must not exist)")
    seal.add_argument("--account", required=True)
    seal.add_argument("--logical-path", required=True, help="its place under the account's landing folder, no .enc")
    seal.add_argument("input", type=Path)
    seal.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "new-keyset":
            print(keyset_to_json(new_keyset()))
        elif args.command == "rotate":
            print(keyset_to_json(rotate_keyset(keyset_from_env())))
        elif args.command == "wrap":
            master = kms_aead(args.kms_key_uri, args.credentials_path)
            print(tink.json_proto_keyset_format.serialize_encrypted(keyset_from_env(), master, KMS_KEYSET_AD))
        elif args.command == "seal":
            binding = Binding(args.account, "landing", args.logical_path, 0)
            with args.input.open("rb") as source:
                atomic_write(args.output, lambda out: seal_stream(source, out, keyset_from_env(), binding))
        else:
            if not args.url:
                parser.error("give --url or set CALL_CONVERSIONS_WAREHOUSE_URL")
            from callconv.warehouse import create_engine

            generations = Generations(create_engine(args.url))
            if args.command == "open":
                if args.output.exists():
                    raise SealError(f"{args.output} exists; not overwritten")
                reader = read_sealed(
                    args.input, keyset_from_env(), generations, args.account, args.data_class, args.logical_path
                )
                with reader:
                    atomic_write(args.output, lambda out: shutil.copyfileobj(reader, out, SEGMENT))
            else:
                moved = migrate(
                    args.root,
                    args.account,
                    args.data_class,
                    keyset_from_env(),
                    Keyring.from_env(LEGACY_KEYS_ENV_VAR),
                    generations,
                )
                print(f"migrated {len(moved)} files")
    except (SealError, CryptoError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
