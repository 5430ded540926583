"""Give the window's call-log rows an E.164 caller, once, before matching.

The telephony system writes numbers as it likes. Only rows never looked at
(``caller_parse_status`` is null) are read, distinct numbers are parsed once,
and numbers that cannot be parsed are marked so they are not tried again.
It all happens in one transaction, so a retried task starts clean.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from callconv.intake.normalise import normalise_distinct
from callconv.schema import call_logs
from callconv.warehouse import refresh_statistics

log = logging.getLogger(__name__)
# Below this many rewritten rows the old statistics are still close enough.
FRESH_STATISTICS_ROWS = 10_000


def normalise_call_logs(
    engine: sa.Engine,
    account_id: str,
    region: str,
    window_start: datetime,
    window_end: datetime,
    lookback: timedelta,
    batch_size: int = 5000,
) -> dict[str, int]:
    """Fill caller_e164 for calls that a sale in this window could match."""
    window_start, window_end = (moment.astimezone(UTC) for moment in (window_start, window_end))
    pending = sa.and_(
        call_logs.c.account_id == account_id,
        call_logs.c.caller_parse_status.is_(None),
        call_logs.c.call_start >= window_start - lookback,
        call_logs.c.call_start < window_end,
    )
    return _normalise(engine, pending, region, batch_size)


def normalise_pending_call_logs(engine: sa.Engine, account_id: str, region: str, batch_size: int = 5000) -> dict:
    """Fill caller_e164 for every call of the account never looked at, whatever its day.

    The Google Ads sandbox knows a call only by its E.164 caller. A demo warehouse fresh from
    its seed has none yet (the import DAG fills them only for its own window, when it runs),
    so the sandbox calls this before it loads its calls. The same parse as the DAG's, and
    only untouched rows: the DAG later finds them done and leaves them as they are.
    """
    pending = sa.and_(call_logs.c.account_id == account_id, call_logs.c.caller_parse_status.is_(None))
    return _normalise(engine, pending, region, batch_size)


def _normalise(engine: sa.Engine, pending, region: str, batch_size: int) -> dict[str, int]:
    counts = {"numbers": 0, "rows": 0, "unparseable_numbers": 0}
    parsed_numbers = sa.Table(
        "tmp_parsed_caller_numbers",
        sa.MetaData(),
        sa.Column("number", sa.String(64), primary_key=True),
        sa.Column("e164", sa.String(20)),
        sa.Column("status", sa.String(32)),
        prefixes=["TEMPORARY"],
    )
    with engine.begin() as connection:
        # One scan finds the distinct numbers; each is parsed once, in pages, into a temporary
        # table; one joined UPDATE then writes every row. Cost grows with rows, not rows x numbers.
        parsed_numbers.create(connection)
        distinct = connection.execute(
            sa.select(call_logs.c.caller_number).where(pending).distinct().execution_options(yield_per=batch_size)
        )
        for page in distinct.scalars().partitions():
            parsed = normalise_distinct(page, region)
            connection.execute(
                parsed_numbers.insert(),
                [{"number": n, "e164": e164, "status": reason or "ok"} for n, (e164, reason) in parsed.items()],
            )
            counts["numbers"] += len(parsed)
            counts["unparseable_numbers"] += sum(1 for e164, _ in parsed.values() if e164 is None)
        result = connection.execute(
            call_logs.update()
            .where(pending, call_logs.c.caller_number == parsed_numbers.c.number)
            .values(caller_e164=parsed_numbers.c.e164, caller_parse_status=parsed_numbers.c.status)
        )
        counts["rows"] = max(result.rowcount or 0, 0)
        parsed_numbers.drop(connection)
    if counts["rows"] >= FRESH_STATISTICS_ROWS:
        refresh_statistics(engine, call_logs)
    log.info(
        "call logs: %d rows normalised from %d distinct numbers, %d numbers unparseable",
        counts["rows"],
        counts["numbers"],
        counts["unparseable_numbers"],
    )
    return counts
