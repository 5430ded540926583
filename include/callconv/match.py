"""Stage 4: match each sale to the call it came from, inside the warehouse.

Everything here is set-based SQLAlchemy Core, so it runs in PostgreSQL, SQLite
or BigQuery and never pulls the call log into Python.

The rule, per sale: the calls from the same E.164 caller that started before
the conversion time and within the window (default 30 days), optionally only
calls of at least N seconds and only calls through a Google forwarding number.
Where the CRM recorded its own call start, a call within the tolerance of it
wins. Otherwise the last call wins (or the first, by config). Ties at the same
second go to the lowest source call id, so the choice is deterministic.

Several sales on one call under one conversion action become one conversion:
``sum`` adds their values (when they share a currency; otherwise the latest
sale's value stands), ``latest`` keeps the latest sale's value. Either way the
conversion time is the latest sale's time.

A conversion that has been delivered is frozen: a rematch never moves its
sales or changes what was sent.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime

import sqlalchemy as sa

from callconv.config import MatchRules
from callconv.schema import call_logs, crm_sales, matches, upload_ledger
from callconv.sqltime import shift_seconds

log = logging.getLogger(__name__)

DELIVERED_STATES = ("uploaded", "delivered")
CHUNK_ROWS = 5000
UNMATCHED_REASONS = (
    "no_call_from_number",
    "calls_outside_window",
    "calls_too_short",
    "only_non_forwarded_calls",
)


@dataclass(frozen=True)
class MatchOutcome:
    sales: int
    matched: int
    unmatched: dict[str, int]
    conversions: int
    frozen: int
    new_pending: int

    def as_counts(self) -> dict:
        return {
            "sales": self.sales,
            "matched": self.matched,
            "unmatched": self.unmatched,
            "match_rate": round(self.matched / self.sales, 4) if self.sales else None,
            "conversions": self.conversions,
            "new_pending": self.new_pending,
        }


def conversion_key(account_id: str, caller_e164: str, call_start: datetime, action_id: str) -> str:
    """Stable identity of one conversion: one call (as Google sees it) and one action."""
    start = as_utc(call_start).strftime("%Y-%m-%dT%H:%M:%SZ")
    return hashlib.sha256(f"{account_id}|{caller_e164}|{start}|{action_id}".encode()).hexdigest()


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive UTC datetimes; everything else keeps its zone."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _delivered_keys():
    return sa.select(upload_ledger.c.conversion_key).where(upload_ledger.c.state.in_(DELIVERED_STATES))


def _day_sales(account_id: str, business_date: date):
    return sa.and_(crm_sales.c.account_id == account_id, crm_sales.c.business_date == business_date)


def _is_delivered(key_column):
    """NOT EXISTS, not NOT IN: a long ledger history must stay an index probe, not a rescan."""
    return sa.exists().where(upload_ledger.c.conversion_key == key_column, upload_ledger.c.state.in_(DELIVERED_STATES))


def _not_frozen():
    return sa.or_(crm_sales.c.conversion_key.is_(None), ~_is_delivered(crm_sales.c.conversion_key))


def _eligible_calls_join(rules: MatchRules):
    """Join condition of a sale to the calls that may have produced it."""
    sale, call = crm_sales, call_logs
    conditions = [
        call.c.account_id == sale.c.account_id,
        call.c.caller_e164 == sale.c.caller_e164,
        call.c.call_start < sale.c.conversion_time,
        call.c.call_start >= shift_seconds(sale.c.conversion_time, -rules.window_days * 86400),
    ]
    if rules.min_duration_seconds:
        conditions.append(call.c.duration_seconds >= rules.min_duration_seconds)
    if rules.forwarded_only:
        conditions.append(call.c.via_google_forwarding.is_(True))
    return sa.and_(*conditions)


def _rank_calls(account_id: str, business_date: date, rules: MatchRules):
    sale, call = crm_sales, call_logs
    tolerance = rules.crm_call_start_tolerance_seconds
    near_crm_start = sa.case(
        (
            sa.and_(
                sale.c.crm_call_start.is_not(None),
                call.c.call_start >= shift_seconds(sale.c.crm_call_start, -tolerance),
                call.c.call_start <= shift_seconds(sale.c.crm_call_start, tolerance),
            ),
            0,
        ),
        else_=1,
    )
    by_time = call.c.call_start.desc() if rules.attribution == "last" else call.c.call_start.asc()
    rank = sa.func.row_number().over(
        partition_by=(sale.c.account_id, sale.c.sale_key),
        order_by=(near_crm_start, by_time, call.c.source_call_id.asc()),
    )
    return (
        sa.select(
            sale.c.account_id,
            sale.c.sale_key,
            call.c.source_call_id,
            call.c.call_start,
            rank.label("call_rank"),
        )
        .select_from(sale.join(call, _eligible_calls_join(rules)))
        .where(_day_sales(account_id, business_date), sale.c.matched_call_id.is_(None))
        .subquery("ranked")
    )


def _unmatched_reasons(account_id: str, business_date: date, rules: MatchRules):
    """Why each still-unmatched sale found no call, from one aggregate over its caller's calls."""
    sale, call = crm_sales, call_logs
    in_window = sa.and_(
        call.c.call_start < sale.c.conversion_time,
        call.c.call_start >= shift_seconds(sale.c.conversion_time, -rules.window_days * 86400),
    )
    long_enough = call.c.duration_seconds >= rules.min_duration_seconds

    def count_where(condition):
        return sa.func.sum(sa.case((condition, 1), else_=0))

    return (
        sa.select(
            sale.c.account_id,
            sale.c.sale_key,
            sa.func.count(call.c.source_call_id).label("any_calls"),
            count_where(in_window).label("in_window"),
            count_where(sa.and_(in_window, long_enough)).label("long_enough"),
        )
        .select_from(
            sale.outerjoin(
                call,
                sa.and_(call.c.account_id == sale.c.account_id, call.c.caller_e164 == sale.c.caller_e164),
            )
        )
        .where(_day_sales(account_id, business_date), sale.c.matched_call_id.is_(None))
        .group_by(sale.c.account_id, sale.c.sale_key)
        .subquery("evidence")
    )


def match_day(
    engine: sa.Engine, account_id: str, business_date: date, rules: MatchRules, run_id: str, rematch: bool = True
) -> MatchOutcome:
    """Match one account-day in one transaction; rerunning it gives the same tables.

    With ``rematch`` (the default) every sale of the day not yet delivered is matched
    afresh, so late call logs or changed rules take effect. Without it, only sales
    never matched are looked at, and earlier matches stand.
    """
    with engine.begin() as connection:
        # Forget earlier matches of this day, except those whose conversion was delivered.
        forget = _not_frozen() if rematch else crm_sales.c.unmatched_reason.is_not(None)
        connection.execute(
            crm_sales.update()
            .where(_day_sales(account_id, business_date), forget)
            .values(matched_call_id=None, matched_call_start=None, conversion_key=None, unmatched_reason=None)
        )
        frozen = connection.scalar(
            sa.select(sa.func.count())
            .select_from(crm_sales)
            .where(_day_sales(account_id, business_date), crm_sales.c.matched_call_id.is_not(None))
        )

        ranked = _rank_calls(account_id, business_date, rules)
        connection.execute(
            crm_sales.update()
            .where(
                crm_sales.c.account_id == ranked.c.account_id,
                crm_sales.c.sale_key == ranked.c.sale_key,
                ranked.c.call_rank == 1,
            )
            .values(matched_call_id=ranked.c.source_call_id, matched_call_start=ranked.c.call_start)
        )

        _record_unmatched_reasons(connection, account_id, business_date, rules)
        conversions = _build_conversions(connection, account_id, business_date, rules, run_id)
        _drop_orphans(connection, account_id)
        new_pending = _queue_for_delivery(connection, account_id, business_date, run_id)
        outcome = _day_counts(connection, account_id, business_date, conversions, frozen, new_pending)

    log.info(
        "match: %d sales, %d matched, %d unmatched %s, %d conversions (%d frozen as delivered), %d newly pending",
        outcome.sales,
        outcome.matched,
        sum(outcome.unmatched.values()),
        outcome.unmatched,
        outcome.conversions,
        outcome.frozen,
        outcome.new_pending,
    )
    return outcome


def _record_unmatched_reasons(connection, account_id: str, business_date: date, rules: MatchRules) -> None:
    # Calls in the window, long enough and forwarded would have matched, so a sale
    # that had long-enough calls in its window had none through a forwarding number.
    evidence = _unmatched_reasons(account_id, business_date, rules)
    reason = sa.case(
        (evidence.c.any_calls == 0, "no_call_from_number"),
        (evidence.c.in_window == 0, "calls_outside_window"),
        (evidence.c.long_enough == 0, "calls_too_short"),
        else_="only_non_forwarded_calls",
    )
    connection.execute(
        crm_sales.update()
        .where(
            crm_sales.c.account_id == evidence.c.account_id,
            crm_sales.c.sale_key == evidence.c.sale_key,
        )
        .values(unmatched_reason=reason)
    )


def _build_conversions(connection, account_id: str, business_date: date, rules: MatchRules, run_id: str) -> int:
    """Merge the sales on each (call, action) touched today into one conversion row."""
    sale = crm_sales
    today = (
        sa.select(sale.c.matched_call_id, sale.c.conversion_action_id)
        .where(_day_sales(account_id, business_date), sale.c.matched_call_id.is_not(None))
        .distinct()
        .subquery("today")
    )
    latest_first = (sale.c.conversion_time.desc(), sale.c.sale_key.desc())
    group = (sale.c.matched_call_id, sale.c.conversion_action_id)
    members = (
        sa.select(
            sale.c.sale_key,
            sale.c.business_date,
            sale.c.caller_e164,
            sale.c.matched_call_id,
            sale.c.matched_call_start,
            sale.c.conversion_action_id,
            sale.c.conversion_time,
            sale.c.conversion_value,
            sale.c.currency_code,
            sa.func.row_number().over(partition_by=group, order_by=latest_first).label("recency"),
            sa.func.count().over(partition_by=group).label("sale_count"),
            sa.func.sum(sale.c.conversion_value).over(partition_by=group).label("value_sum"),
            sa.func.min(sale.c.currency_code).over(partition_by=group).label("currency_min"),
            sa.func.max(sale.c.currency_code).over(partition_by=group).label("currency_max"),
            sa.func.min(sale.c.business_date).over(partition_by=group).label("first_day"),
        )
        .join(
            today,
            sa.and_(
                today.c.matched_call_id == sale.c.matched_call_id,
                today.c.conversion_action_id == sale.c.conversion_action_id,
            ),
        )
        .where(sale.c.account_id == account_id)
        .subquery("members")
    )
    # The sale -> conversion keys go to a temporary table and one joined UPDATE sets them,
    # and the conversions stream in chunks, so memory stays flat however big the day is.
    keys = sa.Table(
        "tmp_conversion_keys",
        sa.MetaData(),
        sa.Column("call_id", sa.String(128)),
        sa.Column("action_id", sa.String(32)),
        sa.Column("conversion_key", sa.String(64)),
        prefixes=["TEMPORARY"],
    )
    keys.create(connection)
    result = connection.execute(
        sa.select(members)
        .where(members.c.recency == 1)
        .order_by(members.c.matched_call_id)
        .execution_options(yield_per=CHUNK_ROWS)
    )
    written = 0
    for chunk in result.mappings().partitions():
        batch, key_rows = [], []
        for row in chunk:
            key = conversion_key(account_id, row["caller_e164"], row["matched_call_start"], row["conversion_action_id"])
            key_rows.append(
                {"call_id": row["matched_call_id"], "action_id": row["conversion_action_id"], "conversion_key": key}
            )
            one_currency = row["currency_min"] == row["currency_max"]
            value = row["value_sum"] if rules.merge_rule == "sum" and one_currency else row["conversion_value"]
            batch.append(
                {
                    "conversion_key": key,
                    "account_id": account_id,
                    "business_date": row["first_day"],
                    "source_call_id": row["matched_call_id"],
                    "caller_e164": row["caller_e164"],
                    "call_start": as_utc(row["matched_call_start"]),
                    "conversion_action_id": row["conversion_action_id"],
                    "conversion_time": as_utc(row["conversion_time"]),
                    "conversion_value": value,
                    "currency_code": row["currency_code"],
                    "sale_count": row["sale_count"],
                    "run_id": run_id,
                }
            )
        delivered = set(
            connection.scalars(
                _delivered_keys().where(upload_ledger.c.conversion_key.in_([r["conversion_key"] for r in batch]))
            )
        )
        batch = [r for r in batch if r["conversion_key"] not in delivered]
        _replace_matches(connection, account_id, batch)
        connection.execute(keys.insert(), key_rows)
        written += len(batch)
    connection.execute(
        crm_sales.update()
        .where(
            crm_sales.c.account_id == account_id,
            crm_sales.c.matched_call_id == keys.c.call_id,
            crm_sales.c.conversion_action_id == keys.c.action_id,
        )
        .values(conversion_key=keys.c.conversion_key)
    )
    keys.drop(connection)
    return written


def _replace_matches(connection, account_id: str, rows: list[dict]) -> None:
    """Upsert by conversion key, as delete-then-insert inside the caller's transaction."""
    for start in range(0, len(rows), 5000):
        chunk = rows[start : start + 5000]
        connection.execute(matches.delete().where(matches.c.conversion_key.in_([r["conversion_key"] for r in chunk])))
        connection.execute(matches.insert(), chunk)


def _drop_orphans(connection, account_id: str) -> int:
    """A rematch can move a sale to another call: its old conversion must not be sent."""
    orphan = sa.and_(
        matches.c.account_id == account_id,
        ~sa.exists().where(
            crm_sales.c.account_id == account_id, crm_sales.c.conversion_key == matches.c.conversion_key
        ),
    )
    orphan_keys = sa.select(matches.c.conversion_key).where(orphan)
    connection.execute(
        upload_ledger.delete().where(
            upload_ledger.c.conversion_key.in_(orphan_keys), upload_ledger.c.state.in_(("pending", "parked"))
        )
    )
    return connection.execute(matches.delete().where(orphan, ~_is_delivered(matches.c.conversion_key))).rowcount


def _queue_for_delivery(connection, account_id: str, business_date: date, run_id: str) -> int:
    """New conversions enter the ledger as pending; pending ones take the newest payload."""
    payload = (
        "caller_e164",
        "call_start",
        "conversion_action_id",
        "conversion_time",
        "conversion_value",
        "currency_code",
    )
    todays = matches.c.conversion_key.in_(
        sa.select(crm_sales.c.conversion_key).where(
            _day_sales(account_id, business_date), crm_sales.c.conversion_key.is_not(None)
        )
    )
    new_rows = sa.select(
        matches.c.conversion_key,
        matches.c.account_id,
        matches.c.business_date,
        sa.literal("pending").label("state"),
        *(matches.c[name] for name in payload),
        sa.literal(0).label("attempts"),
        sa.literal(run_id).label("run_id"),
    ).where(todays, ~sa.exists().where(upload_ledger.c.conversion_key == matches.c.conversion_key))
    inserted = connection.execute(
        upload_ledger.insert().from_select(
            ["conversion_key", "account_id", "business_date", "state", *payload, "attempts", "run_id"], new_rows
        )
    ).rowcount
    connection.execute(
        upload_ledger.update()
        .where(upload_ledger.c.state == "pending", upload_ledger.c.conversion_key == matches.c.conversion_key, todays)
        .values({name: matches.c[name] for name in payload})
    )
    return max(inserted or 0, 0)


def _day_counts(connection, account_id, business_date, conversions, frozen, new_pending) -> MatchOutcome:
    rows = connection.execute(
        sa.select(
            crm_sales.c.unmatched_reason,
            sa.func.count().label("sales"),
            sa.func.count(crm_sales.c.matched_call_id).label("matched"),
        )
        .where(_day_sales(account_id, business_date))
        .group_by(crm_sales.c.unmatched_reason)
    ).all()
    unmatched = {reason: count for reason, count, _ in rows if reason}
    return MatchOutcome(
        sales=sum(count for _, count, _ in rows),
        matched=sum(matched for _, _, matched in rows),
        unmatched={reason: unmatched.get(reason, 0) for reason in UNMATCHED_REASONS if reason in unmatched},
        conversions=conversions,
        frozen=frozen,
        new_pending=new_pending,
    )
