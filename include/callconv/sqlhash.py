"""SHA-256 in SQL, hex encoded, for keys that must equal the ones Python computes.

PostgreSQL and BigQuery have it built in; SQLite gets a Python function
registered on the connection that needs it.
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement

SQLITE_FUNCTION = "callconv_sha256_hex"


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


def _hex_digest(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()


def enable_on(connection: sa.Connection) -> None:
    """Give a SQLite connection the function; other warehouses need nothing."""
    if connection.dialect.name == "sqlite":
        connection.connection.driver_connection.create_function(SQLITE_FUNCTION, 1, _hex_digest, deterministic=True)
