"""SHA-256 and HMAC-SHA256 in SQL, hex encoded, for keys that must equal the ones Python computes.

PostgreSQL and BigQuery have SHA-256 over bytes built in; SQLite gets Python
functions registered on the connection that needs them.

HMAC needs no extension (pgcrypto's ``hmac`` is not assumed): it is SHA-256 twice,
``H((K ^ opad) || H((K ^ ipad) || m))`` (RFC 2104), with the two padded key blocks
passed as bound byte parameters (:attr:`callconv.protection.pseudonyms.PseudonymKey.pads`).
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement

SQLITE_FUNCTION = "callconv_sha256_hex"
SQLITE_HMAC_FUNCTION = "callconv_hmac_sha256_hex"


class sha256_hex(FunctionElement):  # noqa: N801 - reads like a SQL function
    type = sa.String()
    inherit_cache = True


@compiles(sha256_hex)
def _sha256_default(element, compiler, **kw):
    (text,) = list(element.clauses)
    return f"encode(sha256(convert_to({compiler.process(text, **kw)}, 'UTF8')), 'hex')"


@compiles(sha256_hex, "sqlite")
def _sha256_sqlite(element, compiler, **kw):
    (text,) = list(element.clauses)
    return f"{SQLITE_FUNCTION}({compiler.process(text, **kw)})"


@compiles(sha256_hex, "bigquery")
def _sha256_bigquery(element, compiler, **kw):
    (text,) = list(element.clauses)
    return f"TO_HEX(SHA256({compiler.process(text, **kw)}))"


class hmac_sha256_hex(FunctionElement):  # noqa: N801 - reads like a SQL function
    """HMAC-SHA256 of a text (its UTF-8 bytes), hex encoded, from the key's two padded blocks."""

    type = sa.String()
    inherit_cache = True

    def __init__(self, inner_pad: bytes, outer_pad: bytes, text) -> None:
        super().__init__(sa.literal(inner_pad, sa.LargeBinary), sa.literal(outer_pad, sa.LargeBinary), text)


@compiles(hmac_sha256_hex)
def _hmac_default(element, compiler, **kw):
    inner, outer, text = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"encode(sha256({outer} || sha256({inner} || convert_to({text}, 'UTF8'))), 'hex')"


@compiles(hmac_sha256_hex, "sqlite")
def _hmac_sqlite(element, compiler, **kw):
    inner, outer, text = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"{SQLITE_HMAC_FUNCTION}({inner}, {outer}, {text})"


@compiles(hmac_sha256_hex, "bigquery")
def _hmac_bigquery(element, compiler, **kw):
    inner, outer, text = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"TO_HEX(SHA256(CONCAT({outer}, SHA256(CONCAT({inner}, CAST({text} AS BYTES))))))"


def _hex_digest(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()


def hmac_from_pads(inner_pad: bytes, outer_pad: bytes, text: str | None) -> str | None:
    """The same construction in Python (SQLite's function; tests compare it with hmac.new)."""
    if text is None:
        return None
    inner = hashlib.sha256(bytes(inner_pad) + text.encode()).digest()
    return hashlib.sha256(bytes(outer_pad) + inner).hexdigest()


def enable_on(connection: sa.Connection) -> None:
    """Give a SQLite connection the functions; other warehouses need nothing."""
    if connection.dialect.name == "sqlite":
        raw = connection.connection.driver_connection
        raw.create_function(SQLITE_FUNCTION, 1, _hex_digest, deterministic=True)
        raw.create_function(SQLITE_HMAC_FUNCTION, 3, hmac_from_pads, deterministic=True)
