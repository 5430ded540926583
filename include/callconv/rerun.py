"""Which (account, day) pairs a rerun covers: checked before anything runs."""

from __future__ import annotations

from datetime import date, timedelta

MAX_DAYS = 366
# Every delivery the rerun DAG has a mapped group for (the config allows no other).
DELIVERIES = ("api", "file", "data_manager")


class RerunRequestError(ValueError):
    """The trigger form's values do not make a valid rerun; the message says which."""


def plan_days(start: str, end: str, accounts: list[str], known_accounts: list[str]) -> list[dict]:
    """Every day from start to end (inclusive), for each chosen account, oldest first."""
    try:
        first, last = date.fromisoformat(start), date.fromisoformat(end)
    except (TypeError, ValueError):
        raise RerunRequestError(f"start_date and end_date must be dates like 2026-11-27: {start!r}, {end!r}") from None
    if last < first:
        raise RerunRequestError(f"end_date {last} is before start_date {first}")
    if (last - first).days + 1 > MAX_DAYS:
        raise RerunRequestError(f"a rerun covers at most {MAX_DAYS} days; split {first} to {last} into parts")
    unknown = sorted(set(accounts) - set(known_accounts))
    if unknown or not accounts:
        raise RerunRequestError(
            f"unknown or no accounts {unknown or accounts}; configured accounts: {', '.join(known_accounts)}"
        )
    days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
    return [{"account_id": account, "day": day.isoformat()} for day in days for account in sorted(set(accounts))]


def split_by_delivery(plan: list[dict], deliveries: dict[str, str]) -> dict[str, list[dict]]:
    """The plan's (account, day) pairs by the accounts' delivery, each in the plan's order.

    The rerun DAG maps one task group per delivery over these lists, so each day gets only the
    delivery task that applies to its account. Every delivery's key is always there, empty or not.
    """
    split: dict[str, list[dict]] = {delivery: [] for delivery in DELIVERIES}
    for item in plan:
        split[deliveries[item["account_id"]]].append(item)
    return split
