"""Wait for the call logs to cover the day before matching against them.

Matching a day whose late calls have not been loaded yet would file good
sales as unmatched. The import therefore waits until the latest call start for
the account is at or after the window end, less a configured grace.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from callconv.matching.match import as_utc
from callconv.schema import call_logs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Coverage:
    covered: bool
    latest_call_start: datetime | None
    needed: datetime

    def describe(self) -> str:
        latest = self.latest_call_start.isoformat() if self.latest_call_start else "no calls at all"
        state = "cover" if self.covered else "do not yet cover"
        return f"call logs {state} the window: latest call start {latest}, needed {self.needed.isoformat()}"


def call_log_coverage(engine: sa.Engine, account_id: str, window_end: datetime, grace: timedelta) -> Coverage:
    with engine.connect() as connection:
        latest = connection.scalar(
            sa.select(sa.func.max(call_logs.c.call_start)).where(call_logs.c.account_id == account_id)
        )
    needed = as_utc(window_end) - grace
    latest = as_utc(latest) if latest is not None else None
    return Coverage(covered=latest is not None and latest >= needed, latest_call_start=latest, needed=needed)
