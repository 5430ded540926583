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

A conversion whose request may have reached Google (its ledger row has
``sent_at``, or is ``sending``, ``uploaded`` or ``delivered``) is frozen: a
rematch never moves its sales or changes what was sent. A sale that reaches a
frozen conversion afterwards (a later sale on a delivered call, a sale
re-exported or rematched onto it) is never merged into it. The account's
``match.late_sale`` policy decides what it becomes:

* ``conflict`` (the default): no conversion; the sale keeps its call, and a
  ``delivery_conflicts`` row with reason ``late_sale_on_delivered_call`` says why,
  counted in the run summary and alerted;
* ``new_conversion``: a conversion of its own, with its own conversion time and
  value, keyed by the call, the action and the sale. Google counts it as another
  conversion of the call (its duplicate key is caller, conversion time and
  action), so choose it only where one call can really bring several sales.

How it runs: one aggregate pass over the day's sales joined to their callers'
calls in reach of the day gives, per sale, the best call start and the counts
that explain a miss; in caller order, the chosen call id is then one index probe
per matched sale; each sale is written once, in the order it was stored, its
conversion key an HMAC computed in SQL under the pseudonym key
(:mod:`callconv.protection.pseudonyms`), its key id beside it. Matches and ledger rows are rebuilt only for the
(call, action) groups the day touched, before or after.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ClauseElement, Executable

from callconv import sqlhash
from callconv.config import MatchRules
from callconv.protection.pseudonyms import (
    PseudonymKey,
    PseudonymKeys,
    as_utc,
    conversion_text,
    conversion_text_sql,
    require_current,
)
from callconv.schema import (
    CONVERSION_PAYLOAD,
    UTC_TIME,
    call_logs,
    crm_sales,
    delivery_conflicts,
    matches,
    upload_ledger,
)
from callconv.sqlorder import byte_order
from callconv.sqltime import shift_seconds
from callconv.warehouse import Analyze, serialise

log = logging.getLogger(__name__)

# Ledger states whose payload may have reached Google, whatever sent_at says.
SENT_STATES = ("sending", "uploaded", "delivered")
LATE_SALE = "late_sale_on_delivered_call"
CALL_CHANGED = "call_changed_after_send"
# Per sort or hash in the match transaction (PostgreSQL): a day of 10^6 sales
# aggregates in memory instead of spilling to disk.
POSTGRES_WORK_MEM = "256MB"
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
    conflicts: dict[str, int] | None = None

    def as_counts(self) -> dict:
        return {
            "sales": self.sales,
            "matched": self.matched,
            "unmatched": self.unmatched,
            "match_rate": round(self.matched / self.sales, 4) if self.sales else None,
            "conversions": self.conversions,
            "new_pending": self.new_pending,
            "conflicts": dict(self.conflicts or {}),
        }


def conversion_key(key: PseudonymKey, account_id: str, caller_e164: str, call_start: datetime, action_id: str) -> str:
    """Stable identity of one conversion: one call (as Google sees it) and one action, keyed."""
    return key.hexdigest(conversion_text(account_id, caller_e164, call_start, action_id))


def _day_sales(account_id: str, business_date: date):
    return sa.and_(crm_sales.c.account_id == account_id, crm_sales.c.business_date == business_date)


def conversion_sent(key_column):
    """The conversion may have reached Google: frozen.

    NOT EXISTS, not NOT IN: a long ledger history must stay an index probe, not a rescan.
    """
    ledger = upload_ledger
    return sa.exists().where(
        ledger.c.conversion_key == key_column,
        sa.or_(ledger.c.sent_at.is_not(None), ledger.c.state.in_(SENT_STATES)),
    )


def _not_frozen():
    return sa.or_(crm_sales.c.conversion_key.is_(None), ~conversion_sent(crm_sales.c.conversion_key))


def _in_window(rules: MatchRules):
    call, sale = call_logs, crm_sales
    return sa.and_(
        call.c.call_start < sale.c.conversion_time,
        call.c.call_start >= shift_seconds(sale.c.conversion_time, -rules.window_days * 86400),
    )


def _call_filters(rules: MatchRules) -> list:
    """What a call must be, beyond its time, to count: long enough, through a forwarding number."""
    filters = []
    if rules.min_duration_seconds:
        filters.append(call_logs.c.duration_seconds >= rules.min_duration_seconds)
    if rules.forwarded_only:
        filters.append(call_logs.c.via_google_forwarding.is_(True))
    return filters


def _near_crm_call_start(rules: MatchRules):
    sale, call = crm_sales, call_logs
    tolerance = rules.crm_call_start_tolerance_seconds
    return sa.and_(
        sale.c.crm_call_start.is_not(None),
        call.c.call_start >= shift_seconds(sale.c.crm_call_start, -tolerance),
        call.c.call_start <= shift_seconds(sale.c.crm_call_start, tolerance),
    )


def _conversion_span(connection, account_id: str, business_date: date) -> tuple | None:
    """The earliest and latest conversion time among the day's unmatched sales, if any.

    Every sale's window lies in [earliest - window, latest), so only those calls are
    joined: the call log keeps months of history that no sale of the day can reach.
    """
    span = connection.execute(
        sa.select(sa.func.min(crm_sales.c.conversion_time), sa.func.max(crm_sales.c.conversion_time)).where(
            _day_sales(account_id, business_date), crm_sales.c.matched_call_id.is_(None)
        )
    ).one()
    return None if span[0] is None else (as_utc(span[0]), as_utc(span[1]))


def _call_evidence(account_id: str, business_date: date, rules: MatchRules, span: tuple | None = None):
    """Per unmatched sale of the day, in one pass over its caller's calls in reach: the best
    eligible call start (near the CRM's own call start first) and the counts that explain a miss."""
    sale, call = crm_sales, call_logs
    in_window = _in_window(rules)
    eligible = sa.and_(in_window, *_call_filters(rules))
    best = sa.func.max if rules.attribution == "last" else sa.func.min
    in_reach = []
    if span is not None:
        earliest, latest = span
        in_reach = [
            call.c.call_start >= sa.literal(earliest - timedelta(days=rules.window_days), UTC_TIME),
            call.c.call_start < sa.literal(latest, UTC_TIME),
        ]

    def count_where(condition):
        return sa.func.sum(sa.case((condition, 1), else_=0))

    return (
        sa.select(
            sale.c.sale_key,
            sa.func.max(sale.c.caller_e164).label("caller_e164"),
            sa.func.max(sale.c.conversion_action_id).label("action_id"),
            sa.func.max(sale.c.source_row).label("source_row"),
            count_where(in_window).label("in_window"),
            count_where(sa.and_(in_window, call.c.duration_seconds >= rules.min_duration_seconds)).label("long_enough"),
            best(sa.case((sa.and_(eligible, _near_crm_call_start(rules)), call.c.call_start))).label("near_start"),
            best(sa.case((eligible, call.c.call_start))).label("best_start"),
        )
        .select_from(
            sale.outerjoin(
                call,
                sa.and_(call.c.account_id == sale.c.account_id, call.c.caller_e164 == sale.c.caller_e164, *in_reach),
            )
        )
        .where(_day_sales(account_id, business_date), sale.c.matched_call_id.is_(None))
        .group_by(sale.c.sale_key)
        .subquery("evidence")
    )


def _has_any_call(account_id: str, caller_e164):
    return sa.exists().where(call_logs.c.account_id == account_id, call_logs.c.caller_e164 == caller_e164)


def _ordered_evidence(account_id: str, business_date: date, rules: MatchRules, span: tuple | None = None):
    """Each sale's chosen call start (none for a miss) and its miss counts, in caller and start order.

    The probes that follow (tie-break, any call at all) then walk the call index in
    its own order, so each index page is read once instead of once per sale.
    """
    evidence = _call_evidence(account_id, business_date, rules, span)
    chosen_start = sa.func.coalesce(evidence.c.near_start, evidence.c.best_start)
    return (
        sa.select(
            evidence.c.sale_key,
            evidence.c.caller_e164,
            evidence.c.action_id,
            evidence.c.source_row,
            chosen_start.label("call_start"),
            evidence.c.in_window,
            evidence.c.long_enough,
        )
        .order_by(byte_order(evidence.c.caller_e164), chosen_start)
        .subquery("chosen")
    )


def _unmatched_reason(chosen, account_id: str):
    """Why a sale has no call: the first missing piece of evidence names it.

    Calls in the window, long enough and forwarded would have matched, so a sale
    that had long-enough calls in its window had none through a forwarding number.
    Whether the caller ever called is asked only of the sales with no call in reach.
    """
    return sa.case(
        (chosen.c.call_start.is_not(None), sa.null()),
        (
            chosen.c.in_window == 0,
            sa.case(
                (_has_any_call(account_id, chosen.c.caller_e164), "calls_outside_window"),
                else_="no_call_from_number",
            ),
        ),
        (chosen.c.long_enough == 0, "calls_too_short"),
        else_="only_non_forwarded_calls",
    )


def _chosen_call_id(outcome, account_id: str, rules: MatchRules):
    """Ties at the chosen second go to the lowest source call id: one index probe per sale.

    ``outcome`` is any table or subquery with the sale's caller_e164 and chosen call_start.
    """
    call = call_logs
    return (
        sa.select(sa.func.min(call.c.source_call_id))
        .where(
            call.c.account_id == account_id,
            call.c.caller_e164 == outcome.c.caller_e164,
            call.c.call_start == outcome.c.call_start,
            *_call_filters(rules),
        )
        .scalar_subquery()
    )


def conversion_key_sql(key: PseudonymKey, account_id: str, caller, call_start, action_id):
    """conversion_key computed by the warehouse: the same text, the same HMAC."""
    return key.sql(conversion_text_sql(account_id, caller, call_start, action_id))


def separate_key_sql(key: PseudonymKey, account_id: str, caller, call_start, action_id, sale_key):
    """The key of a late sale's own conversion (policy ``new_conversion``): its call, action and sale."""
    return key.sql(conversion_text_sql(account_id, caller, call_start, action_id) + "|sale|" + sale_key)


def _analyze(connection, table: sa.Table) -> None:
    # Autovacuum never sees temporary tables; without statistics the planner guesses.
    if connection.dialect.name == "postgresql":
        connection.execute(Analyze(table))


def _prepare(connection) -> None:
    sqlhash.enable_on(connection)
    if connection.dialect.name == "postgresql":
        connection.execute(sa.select(sa.func.set_config("work_mem", POSTGRES_WORK_MEM, True)))  # SET LOCAL
        # JIT-compiled expressions pay here; LLVM's optimise and inline passes cost about
        # a second per process, more than they gain (10^5 sales: 6.3 s -> 4.9 s; 10^6: even).
        for setting in ("jit_optimize_above_cost", "jit_inline_above_cost"):
            connection.execute(sa.select(sa.func.set_config(setting, "-1", True)))


def match_day(
    engine: sa.Engine,
    account_id: str,
    business_date: date,
    rules: MatchRules,
    run_id: str,
    rematch: bool = True,
    *,
    keys: PseudonymKeys,
) -> MatchOutcome:
    """Match one account-day in one transaction; rerunning it gives the same tables.

    With ``rematch`` (the default) every sale of the day not yet delivered is matched
    afresh, so late call logs or changed rules take effect. Without it, only sales
    never matched are looked at, and earlier matches stand.

    Conversion keys are HMACs under ``keys.primary``, which must be the key the
    account's rows are under (:func:`callconv.protection.pseudonyms.require_current`).
    """
    key = keys.primary
    with engine.begin() as connection:
        # A conversion can gather sales of several days: one match per account at a time.
        serialise(connection, "match", account_id)
        require_current(connection, account_id, keys)
        _prepare(connection)
        # A temporary table can outlive a rolled-back transaction on its pooled connection
        # (SQLite): a retry must not meet "table already exists".
        for leftover in (TOUCHED, OUTCOME):
            leftover.drop(connection, checkfirst=True)
        touched = TOUCHED
        touched.create(connection)
        _forget_earlier_matches(connection, touched, account_id, business_date, rematch)
        frozen = connection.scalar(
            sa.select(sa.func.count())
            .select_from(crm_sales)
            .where(_day_sales(account_id, business_date), crm_sales.c.matched_call_id.is_not(None))
        )
        _match_sales(connection, account_id, business_date, rules, key)
        late = _late_sales(connection, account_id, business_date, rules, run_id, key)
        _changed_calls(connection, account_id, business_date, run_id)
        _write_outcome(connection, account_id, key)
        # The groups the new matches joined (frozen sales' groups are delivered: nothing to rebuild).
        connection.execute(
            touched.insert().from_select(
                ["call_id", "action_id", "conversion_key", "caller_e164"],
                sa.select(OUTCOME.c.call_id, OUTCOME.c.action_id, OUTCOME.c.conversion_key, OUTCOME.c.caller_e164)
                .where(OUTCOME.c.call_id.is_not(None))
                .distinct(),
            )
        )
        OUTCOME.drop(connection)
        _analyze(connection, touched)
        conversions = _rebuild_conversions(connection, touched, account_id, rules, run_id, key)
        new_pending = _queue_for_delivery(connection, touched, account_id, run_id)
        outcome = _day_counts(connection, account_id, business_date, conversions, frozen, new_pending)
        outcome = dataclasses.replace(outcome, conflicts=_day_conflicts(connection, account_id, business_date))
        touched.drop(connection)

    if late:
        log.warning(
            "match: %d sales reached a conversion already sent and were not merged into it (policy %s, reason %s)",
            late,
            rules.late_sale,
            LATE_SALE,
        )
    if outcome.conflicts:
        log.warning("match: the day's recorded delivery conflicts by reason: %s", outcome.conflicts)
    log.info(
        "match: %d sales, %d matched, %d unmatched %s, %d conversions (%d frozen as sent), %d newly pending",
        outcome.sales,
        outcome.matched,
        sum(outcome.unmatched.values()),
        outcome.unmatched,
        outcome.conversions,
        outcome.frozen,
        outcome.new_pending,
    )
    return outcome


def _forget_earlier_matches(connection, touched: sa.Table, account_id: str, business_date: date, rematch: bool):
    """Clear what an earlier run wrote on the day's sales, except matches already delivered.

    Only rows that hold something are rewritten, and the groups they pointed at are
    remembered, so their conversions are rebuilt (or dropped) with the new matches.
    """
    sale = crm_sales
    day = _day_sales(account_id, business_date)
    if rematch:
        holds_something = sa.or_(sale.c.matched_call_id.is_not(None), sale.c.unmatched_reason.is_not(None))
        forget = sa.and_(holds_something, _not_frozen())
    else:
        forget = sale.c.unmatched_reason.is_not(None)
    _remember_groups(connection, touched, sa.and_(day, forget))
    # Their late-sale conflicts are decided again by this match.
    connection.execute(
        delivery_conflicts.delete().where(
            delivery_conflicts.c.account_id == account_id,
            delivery_conflicts.c.reason == LATE_SALE,
            delivery_conflicts.c.sale_key.in_(sa.select(sale.c.sale_key).where(day, forget)),
        )
    )
    connection.execute(
        sale.update()
        .where(day, forget)
        .values(
            matched_call_id=None,
            matched_call_start=None,
            conversion_key=None,
            conversion_key_id=None,
            unmatched_reason=None,
        )
    )


def _remember_groups(connection, touched: sa.Table, sales) -> None:
    """Note the (call, action) groups these sales are matched to, with key and caller."""
    sale = crm_sales
    connection.execute(
        touched.insert().from_select(
            ["call_id", "action_id", "conversion_key", "caller_e164"],
            sa.select(sale.c.matched_call_id, sale.c.conversion_action_id, sale.c.conversion_key, sale.c.caller_e164)
            .where(sales, sale.c.matched_call_id.is_not(None))
            .distinct(),
        )
    )


def _match_sales(connection, account_id: str, business_date: date, rules: MatchRules, key: PseudonymKey) -> None:
    """Choose each unmatched sale's call (or reason) into tmp_sale_outcome.

    CREATE TABLE AS, unlike INSERT, may run its query in parallel on PostgreSQL.
    """
    span = _conversion_span(connection, account_id, business_date)
    chosen = _ordered_evidence(account_id, business_date, rules, span)
    conversion = conversion_key_sql(key, account_id, chosen.c.caller_e164, chosen.c.call_start, chosen.c.action_id)
    connection.execute(
        CreateTemporaryTableAs(
            OUTCOME.name,
            sa.select(
                chosen.c.sale_key,
                chosen.c.caller_e164,
                chosen.c.action_id,
                chosen.c.call_start,
                _chosen_call_id(chosen, account_id, rules).label("call_id"),
                sa.case((chosen.c.call_start.is_not(None), conversion)).label("conversion_key"),
                _unmatched_reason(chosen, account_id).label("reason"),
                chosen.c.source_row,
                sa.cast(sa.null(), sa.String(48)).label("conflict"),
                sa.cast(sa.null(), sa.String(64)).label("sent_key"),
            ),
        )
    )
    _analyze(connection, OUTCOME)


def _late_sales(
    connection, account_id: str, business_date: date, rules: MatchRules, run_id: str, key: PseudonymKey
) -> int:
    """Sales matched now onto a conversion already sent: never merged into it (see the module doc).

    Under ``conflict`` they lose their conversion key; under ``new_conversion`` they get a
    key of their own. Either way a ``delivery_conflicts`` row records it. Returns how many.
    """
    late = sa.and_(OUTCOME.c.conversion_key.is_not(None), conversion_sent(OUTCOME.c.conversion_key))
    if rules.late_sale == "new_conversion":
        new_key = separate_key_sql(
            key, account_id, OUTCOME.c.caller_e164, OUTCOME.c.call_start, OUTCOME.c.action_id, OUTCOME.c.sale_key
        )
    else:
        new_key = sa.null()
    connection.execute(
        OUTCOME.update()
        .where(late)
        .values(conflict=LATE_SALE, sent_key=OUTCOME.c.conversion_key, conversion_key=new_key)
    )
    count = connection.execute(
        delivery_conflicts.insert().from_select(
            ["account_id", "sale_key", "reason", "business_date", "conversion_key", "detail", "run_id"],
            sa.select(
                sa.literal(account_id),
                OUTCOME.c.sale_key,
                OUTCOME.c.conflict,
                sa.literal(business_date, sa.Date),
                OUTCOME.c.sent_key,
                sa.literal(f"its call's conversion was already sent; policy {rules.late_sale}"),
                sa.literal(run_id),
            ).where(OUTCOME.c.conflict.is_not(None)),
        )
    ).rowcount
    return max(count or 0, 0)


def _day_conflicts(connection, account_id: str, business_date: date) -> dict[str, int]:
    """The day's recorded conflicts by reason: the same figure whichever run counts it."""
    rows = connection.execute(
        sa.select(delivery_conflicts.c.reason, sa.func.count())
        .where(delivery_conflicts.c.account_id == account_id, delivery_conflicts.c.business_date == business_date)
        .group_by(delivery_conflicts.c.reason)
    ).all()
    return dict(sorted(rows))


def _changed_calls(connection, account_id: str, business_date: date, run_id: str) -> None:
    """Sent sales whose call-log row now names another caller or start under the same id.

    The telephony system may rewrite a call it already reported. What was sent stays as
    it was; the change is recorded with ``call_changed_after_send``, decided afresh by
    every match of the day.
    """
    sale, call = crm_sales, call_logs
    connection.execute(
        delivery_conflicts.delete().where(
            delivery_conflicts.c.account_id == account_id,
            delivery_conflicts.c.business_date == business_date,
            delivery_conflicts.c.reason == CALL_CHANGED,
        )
    )
    changed = (
        sa.select(
            sa.literal(account_id),
            sale.c.sale_key,
            sa.literal(CALL_CHANGED),
            sa.literal(business_date, sa.Date),
            sale.c.conversion_key,
            sa.literal("its call-log row changed caller or start after the conversion was sent"),
            sa.literal(run_id),
        )
        .join(call, sa.and_(call.c.account_id == sale.c.account_id, call.c.source_call_id == sale.c.matched_call_id))
        .where(
            _day_sales(account_id, business_date),
            sale.c.conversion_key.is_not(None),
            conversion_sent(sale.c.conversion_key),
            sale.c.caller_e164.is_not(None),  # redacted by retention: nothing left to compare
            call.c.caller_parse_status.is_distinct_from("redacted"),
            sa.or_(
                call.c.call_start != sale.c.matched_call_start,
                call.c.caller_e164.is_distinct_from(sale.c.caller_e164),
            ),
        )
    )
    connection.execute(
        delivery_conflicts.insert().from_select(
            ["account_id", "sale_key", "reason", "business_date", "conversion_key", "detail", "run_id"], changed
        )
    )


def _write_outcome(connection, account_id: str, key: PseudonymKey) -> None:
    """Write each sale's outcome once."""
    sale = crm_sales
    # In extract order, the order intake stored the sales: each table page is then
    # written once, not once per sale (10 s -> 4.5 s for 10^6 sales, 128 MB of shared buffers).
    outcome = sa.select(OUTCOME).order_by(OUTCOME.c.source_row).subquery("outcome")
    connection.execute(
        sale.update()
        .where(sale.c.account_id == account_id, sale.c.sale_key == outcome.c.sale_key)
        .values(
            matched_call_id=outcome.c.call_id,
            matched_call_start=outcome.c.call_start,
            conversion_key=outcome.c.conversion_key,
            conversion_key_id=sa.case((outcome.c.conversion_key.is_not(None), sa.literal(key.key_id))),
            unmatched_reason=outcome.c.reason,
        )
    )


# The (call, action) groups a day's match touched, before or after: theirs are the
# conversions to rebuild.
TOUCHED = sa.Table(
    "tmp_touched_groups",
    sa.MetaData(),
    sa.Column("call_id", sa.String(128)),
    sa.Column("action_id", sa.String(32)),
    sa.Column("conversion_key", sa.String(64)),
    sa.Column("caller_e164", sa.String(20)),
    prefixes=["TEMPORARY"],
)

# The shape CreateTemporaryTableAs gives tmp_sale_outcome, for the statements that read it.
OUTCOME = sa.Table(
    "tmp_sale_outcome",
    sa.MetaData(),
    sa.Column("sale_key", sa.String(64)),
    sa.Column("caller_e164", sa.String(20)),
    sa.Column("action_id", sa.String(32)),
    sa.Column("call_start", sa.DateTime(timezone=True)),
    sa.Column("call_id", sa.String(128)),
    sa.Column("conversion_key", sa.String(64)),
    sa.Column("reason", sa.String(32)),
    sa.Column("source_row", sa.Integer),
    sa.Column("conflict", sa.String(48)),  # why the sale is not merged into its call's conversion
    sa.Column("sent_key", sa.String(64)),  # the conversion already sent that it reached
    prefixes=["TEMPORARY"],
)


class CreateTemporaryTableAs(Executable, ClauseElement):
    inherit_cache = False

    def __init__(self, name: str, query: sa.Select) -> None:
        self.name = name
        self.query = query


@compiles(CreateTemporaryTableAs)
def _create_temporary_table_as(element, compiler, **kw):
    name = compiler.preparer.quote(element.name)
    return " ".join(("CREATE TEMPORARY TABLE", name, "AS", compiler.process(element.query, **kw)))


def _in_touched(touched: sa.Table, call_id, action_id):
    return sa.exists().where(touched.c.call_id == call_id, touched.c.action_id == action_id)


def _groups(touched: sa.Table):
    """The touched (call, action) pairs, once each.

    Statements start from these and probe the big tables by index: statistics
    taken before this transaction still say the day has no matches.
    """
    return sa.select(touched.c.call_id, touched.c.action_id, touched.c.caller_e164).distinct().subquery("touched")


def _rebuild_conversions(
    connection, touched: sa.Table, account_id: str, rules: MatchRules, run_id: str, key: PseudonymKey
) -> int:
    """Merge the sales on each touched (call, action) into one conversion row; skip delivered ones."""
    sale = crm_sales
    groups = _groups(touched)
    # A (call, action) group's sales share its conversion key, so the key partitions them;
    # in byte order, one sort serves the windows and the insert in key order.
    group = byte_order(sale.c.conversion_key)
    members = (
        sa.select(
            sale.c.conversion_key,
            sale.c.caller_e164,
            sale.c.matched_call_id,
            sale.c.matched_call_start,
            sale.c.conversion_action_id,
            sale.c.conversion_time,
            sale.c.conversion_value,
            sale.c.currency_code,
            sa.func.row_number()
            .over(partition_by=group, order_by=(sale.c.conversion_time.desc(), sale.c.sale_key.desc()))
            .label("recency"),
            sa.func.count().over(partition_by=group).label("sale_count"),
            sa.func.sum(sale.c.conversion_value).over(partition_by=group).label("value_sum"),
            sa.func.min(sale.c.currency_code).over(partition_by=group).label("currency_min"),
            sa.func.max(sale.c.currency_code).over(partition_by=group).label("currency_max"),
            sa.func.min(sale.c.business_date).over(partition_by=group).label("first_day"),
        )
        .join(
            groups,
            sa.and_(
                sale.c.account_id == account_id,
                sale.c.caller_e164 == groups.c.caller_e164,
                sale.c.matched_call_id == groups.c.call_id,
                sale.c.conversion_action_id == groups.c.action_id,
            ),
        )
        # A late sale under the conflict policy keeps its call but joins no conversion.
        .where(sale.c.conversion_key.is_not(None))
        .subquery("members")
    )
    value = members.c.conversion_value
    if rules.merge_rule == "sum":
        # Values in different currencies cannot be added: the latest sale's value stands.
        value = sa.case((members.c.currency_min == members.c.currency_max, members.c.value_sum), else_=value)
    rows = (
        sa.select(
            members.c.conversion_key,
            sa.literal(key.key_id),
            sa.literal(account_id),
            members.c.first_day,
            members.c.matched_call_id,
            members.c.caller_e164,
            members.c.matched_call_start,
            members.c.conversion_action_id,
            members.c.conversion_time,
            value,
            members.c.currency_code,
            members.c.sale_count,
            sa.literal(run_id),
        )
        .where(members.c.recency == 1, ~conversion_sent(members.c.conversion_key))
        # In key order the primary key index grows at its right edge instead of at random.
        .order_by(byte_order(members.c.conversion_key))
    )
    connection.execute(
        matches.delete().where(
            matches.c.account_id == account_id,
            _in_touched(touched, matches.c.source_call_id, matches.c.conversion_action_id),
            ~conversion_sent(matches.c.conversion_key),
        )
    )
    inserted = connection.execute(
        matches.insert().from_select(
            [
                "conversion_key",
                "conversion_key_id",
                "account_id",
                "business_date",
                "source_call_id",
                "caller_e164",
                "call_start",
                "conversion_action_id",
                "conversion_time",
                "conversion_value",
                "currency_code",
                "sale_count",
                "run_id",
            ],
            rows,
        )
    ).rowcount
    # A rematch can move every sale off a call: its conversion is gone and must not be sent
    # (unless it may have been sent already: then it stays, as it was).
    connection.execute(
        upload_ledger.delete().where(
            upload_ledger.c.state.in_(("pending", "parked")),
            upload_ledger.c.sent_at.is_(None),
            upload_ledger.c.conversion_key.in_(
                sa.select(touched.c.conversion_key).where(touched.c.conversion_key.is_not(None))
            ),
            ~sa.exists().where(matches.c.conversion_key == upload_ledger.c.conversion_key),
        )
    )
    return max(inserted or 0, 0)


def _queue_for_delivery(connection, touched: sa.Table, account_id: str, run_id: str) -> int:
    """Pending ledger rows never sent take the newest payload; new conversions enter as pending.

    The refresh runs first, so it never rewrites the rows the insert creates. A row
    with ``sent_at`` is never refreshed: what may have reached Google never changes.
    """
    groups = _groups(touched)
    todays = (
        sa.select(matches)
        .join(
            groups,
            sa.and_(
                matches.c.account_id == account_id,
                matches.c.source_call_id == groups.c.call_id,
                matches.c.conversion_action_id == groups.c.action_id,
            ),
        )
        .subquery("todays")
    )
    changed = sa.or_(*(upload_ledger.c[name].is_distinct_from(todays.c[name]) for name in CONVERSION_PAYLOAD))
    connection.execute(
        upload_ledger.update()
        .where(
            upload_ledger.c.state == "pending",
            upload_ledger.c.sent_at.is_(None),
            upload_ledger.c.conversion_key == todays.c.conversion_key,
            changed,
        )
        .values({name: todays.c[name] for name in CONVERSION_PAYLOAD})
    )
    new_rows = (
        sa.select(
            todays.c.conversion_key,
            todays.c.conversion_key_id,
            todays.c.account_id,
            todays.c.business_date,
            sa.literal("pending").label("state"),
            *(todays.c[name] for name in CONVERSION_PAYLOAD),
            sa.literal(0).label("attempts"),
            sa.literal(run_id).label("run_id"),
        )
        .where(~sa.exists().where(upload_ledger.c.conversion_key == todays.c.conversion_key))
        .order_by(byte_order(todays.c.conversion_key))
    )
    inserted = connection.execute(
        upload_ledger.insert().from_select(
            [
                "conversion_key",
                "conversion_key_id",
                "account_id",
                "business_date",
                "state",
                *CONVERSION_PAYLOAD,
                "attempts",
                "run_id",
            ],
            new_rows,
        )
    ).rowcount
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
