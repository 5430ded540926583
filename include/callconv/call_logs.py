"""Give the window's call-log rows an E.164 caller, once, before matching.

The telephony system writes numbers as it likes. Only rows never looked at
(``caller_parse_status`` is null) are read, distinct numbers are parsed once,
and numbers that cannot be parsed are marked so they are not tried again.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from callconv.normalise import normalise_distinct
from callconv.schema import call_logs

log = logging.getLogger(__name__)


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
    counts = {"numbers": 0, "rows": 0, "unparseable_numbers": 0}
    while True:
        with engine.begin() as connection:
            numbers = connection.scalars(
                sa.select(call_logs.c.caller_number)
                .where(pending)
                .distinct()
                .order_by(call_logs.c.caller_number)
                .limit(batch_size)
            ).all()
            if not numbers:
                break
            parsed = normalise_distinct(numbers, region)
            updates = [
                {"_number": number, "_e164": e164, "_status": reason or "ok"}
                for number, (e164, reason) in parsed.items()
            ]
            result = connection.execute(
                call_logs.update()
                .where(pending, call_logs.c.caller_number == sa.bindparam("_number"))
                .values(caller_e164=sa.bindparam("_e164"), caller_parse_status=sa.bindparam("_status")),
                updates,
            )
            counts["numbers"] += len(numbers)
            counts["rows"] += max(result.rowcount or 0, 0)
            counts["unparseable_numbers"] += sum(1 for e164, _ in parsed.values() if e164 is None)
    log.info(
        "call logs: %d rows normalised from %d distinct numbers, %d numbers unparseable",
        counts["rows"],
        counts["numbers"],
        counts["unparseable_numbers"],
    )
    return counts
