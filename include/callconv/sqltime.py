"""Portable time arithmetic for SQLAlchemy Core.

``shift_seconds(column, n)`` renders as interval arithmetic in PostgreSQL,
``TIMESTAMP_ADD`` in BigQuery and ``datetime(..., '+n seconds')`` in SQLite,
so the matching statement stays one expression for every warehouse.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ColumnElement, FunctionElement


class shift_seconds(FunctionElement):  # noqa: N801 - reads like a SQL function
    type = sa.DateTime(timezone=True)
    inherit_cache = True

    def __init__(self, expression: ColumnElement, seconds: int) -> None:
        super().__init__(expression, sa.literal(int(seconds), sa.Integer))


@compiles(shift_seconds)
def _shift_default(element, compiler, **kw):
    expression, seconds = list(element.clauses)
    return f"({compiler.process(expression, **kw)} + make_interval(secs => {compiler.process(seconds, **kw)}))"


@compiles(shift_seconds, "sqlite")
def _shift_sqlite(element, compiler, **kw):
    # SQLAlchemy stores SQLite datetimes as 'YYYY-MM-DD HH:MM:SS.ffffff' text in UTC;
    # strftime keeps that shape so text comparison stays chronological.
    expression, seconds = list(element.clauses)
    return (
        f"strftime('%Y-%m-%d %H:%M:%f000', {compiler.process(expression, **kw)}, "
        f"({compiler.process(seconds, **kw)}) || ' seconds')"
    )


@compiles(shift_seconds, "bigquery")
def _shift_bigquery(element, compiler, **kw):
    expression, seconds = list(element.clauses)
    return f"TIMESTAMP_ADD({compiler.process(expression, **kw)}, INTERVAL {compiler.process(seconds, **kw)} SECOND)"


class utc_second_text(FunctionElement):  # noqa: N801 - reads like a SQL function
    """An instant as 'YYYY-MM-DDTHH:MM:SSZ' in UTC, fractions dropped: match.conversion_key's text."""

    type = sa.String()
    inherit_cache = True


@compiles(utc_second_text)
def _utc_text_default(element, compiler, **kw):
    (expression,) = list(element.clauses)
    return f"to_char(timezone('UTC', {compiler.process(expression, **kw)}), 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"


@compiles(utc_second_text, "sqlite")
def _utc_text_sqlite(element, compiler, **kw):
    (expression,) = list(element.clauses)
    return f"strftime('%Y-%m-%dT%H:%M:%SZ', {compiler.process(expression, **kw)})"


@compiles(utc_second_text, "bigquery")
def _utc_text_bigquery(element, compiler, **kw):
    (expression,) = list(element.clauses)
    return f"FORMAT_TIMESTAMP('%Y-%m-%dT%H:%M:%SZ', {compiler.process(expression, **kw)}, 'UTC')"
