"""Prototype fixes for the problems the bench found, measured as stage variants (``--variant proto``).

Nothing here changes ``include/``: each prototype is a drop-in for one function
of the pipeline, with the same inputs and the same database result, so the
harness can measure the difference and check the result is the same. See
docs/benchmarks.md ("Problems found") for what each fixes.
"""

from __future__ import annotations

import csv
import io
import re
from datetime import date

import sqlalchemy as sa

CHUNK = 5000


# ----------------------------------------------------------------- match: conversions


def _build_conversions_streaming(connection, account_id: str, business_date: date, rules, run_id: str) -> int:
    """match._build_conversions, streamed in chunks, with one set-based key update.

    The original keeps every conversion (``batch``) and every key update
    (``keys_by_sale``) in Python lists, reads all of the account's delivered keys
    into a set, and sends the key updates as one UPDATE per (call, action)
    through executemany: one round trip each. Here the member rows stream from a
    server-side cursor; per chunk, the delivered keys are looked up for that chunk
    only, the matches are upserted, and the keys go to a temporary table; one
    UPDATE ... FROM that table sets every sale's conversion_key at the end.
    """
    from callconv import match
    from callconv.schema import crm_sales, upload_ledger

    sale = crm_sales
    today = (
        sa.select(sale.c.matched_call_id, sale.c.conversion_action_id)
        .where(match._day_sales(account_id, business_date), sale.c.matched_call_id.is_not(None))
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
    keys = sa.Table(
        "bench_conversion_keys",
        sa.MetaData(),
        sa.Column("call_id", sa.String(128)),
        sa.Column("action_id", sa.String(32)),
        sa.Column("conversion_key", sa.String(64)),
        prefixes=["TEMPORARY"],
        postgresql_on_commit="DROP",
    )
    keys.create(connection)
    # Per statement: Connection.execution_options() would make every later statement stream too.
    result = connection.execute(
        sa.select(members).where(members.c.recency == 1).order_by(members.c.matched_call_id),
        execution_options={"stream_results": True, "yield_per": CHUNK},
    )
    written = 0
    for chunk in result.mappings().partitions(CHUNK):
        batch, key_rows = [], []
        for row in chunk:
            key = match.conversion_key(
                account_id, row["caller_e164"], row["matched_call_start"], row["conversion_action_id"]
            )
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
                    "call_start": match.as_utc(row["matched_call_start"]),
                    "conversion_action_id": row["conversion_action_id"],
                    "conversion_time": match.as_utc(row["conversion_time"]),
                    "conversion_value": value,
                    "currency_code": row["currency_code"],
                    "sale_count": row["sale_count"],
                    "run_id": run_id,
                }
            )
        delivered = set(
            connection.scalars(
                sa.select(upload_ledger.c.conversion_key).where(
                    upload_ledger.c.conversion_key.in_([r["conversion_key"] for r in batch]),
                    upload_ledger.c.state.in_(match.DELIVERED_STATES),
                )
            )
        )
        batch = [r for r in batch if r["conversion_key"] not in delivered]
        match._replace_matches(connection, account_id, batch)
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
    return written


def install_streaming_build_conversions() -> None:
    from callconv import match

    match._build_conversions = _build_conversions_streaming


# ------------------------------------------------------------------ conversion file


def write_conversion_file_streaming(engine, account, business_date: date, export_root):
    """conversion_file.write_conversion_file, streaming rows to the staging file: same bytes."""
    from callconv import conversion_file as cf
    from callconv.match import as_utc
    from callconv.schema import matches

    folder = export_root / account.id / business_date.isoformat()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / cf.file_name(account.id, business_date)
    staging = folder / f".{target.name}.partial"
    names = {action.id: action.name for action in account.conversion_actions.values()}
    consent = (account.consent.ad_user_data.title(), account.consent.ad_personalization.title())
    tz = account.tz
    rows = 0
    query = (
        sa.select(matches)
        .where(matches.c.account_id == account.id, matches.c.business_date == business_date)
        .order_by(matches.c.conversion_time, matches.c.conversion_key)
    )
    with engine.connect() as connection, staging.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\r\n")
        writer.writerow([f"Parameters:TimeZone={account.timezone}"])
        writer.writerow(cf.TEMPLATE_HEADER)
        result = connection.execute(query, execution_options={"stream_results": True, "yield_per": CHUNK})
        for row in result.mappings():
            writer.writerow(
                [
                    cf.phone_cell(row["caller_e164"]),
                    as_utc(row["call_start"]).astimezone(tz).strftime(cf.TIME_FORMAT),
                    cf.safe_text(names[row["conversion_action_id"]]),
                    as_utc(row["conversion_time"]).astimezone(tz).strftime(cf.TIME_FORMAT),
                    cf.format_value(row["conversion_value"]),
                    cf.safe_text(row["currency_code"] or ""),
                    *consent,
                ]
            )
            rows += 1
    staging.rename(target)
    return cf.ConversionFile(path=str(target), rows=rows)


# ----------------------------------------------------------------------- call logs


def normalise_call_logs_set_based(engine, account_id, region, window_start, window_end, lookback, batch_size=20_000):
    """call_logs.normalise_call_logs with one scan for the distinct numbers and one UPDATE ... FROM.

    The original runs, per distinct number, an UPDATE ... WHERE caller_number = :n
    through executemany: one round trip and one scan of the not-yet-normalised
    rows per number (there is no index on caller_number), so its cost grows with
    numbers x rows. Here the distinct numbers go to a temporary table in one scan,
    are parsed once each in pages (memory stays flat), and one join UPDATE writes
    every row.
    """
    from datetime import UTC

    from callconv.normalise import normalise_distinct
    from callconv.schema import call_logs

    window_start, window_end = (moment.astimezone(UTC) for moment in (window_start, window_end))
    pending = sa.and_(
        call_logs.c.account_id == account_id,
        call_logs.c.caller_parse_status.is_(None),
        call_logs.c.call_start >= window_start - lookback,
        call_logs.c.call_start < window_end,
    )
    counts = {"numbers": 0, "rows": 0, "unparseable_numbers": 0}
    with engine.begin() as connection:
        numbers = sa.select(call_logs.c.caller_number.label("number")).where(pending).distinct().subquery()
        connection.execute(sa.text("create temporary table bench_numbers (number text primary key) on commit drop"))
        connection.execute(
            sa.insert(sa.table("bench_numbers", sa.column("number"))).from_select(["number"], sa.select(numbers))
        )
        connection.execute(
            sa.text(
                "create temporary table bench_parsed (number text primary key, e164 text, status text) on commit drop"
            )
        )
        raw = connection.connection.driver_connection
        after = ""
        while True:
            page = connection.scalars(
                sa.text("select number from bench_numbers where number > :after order by number limit :n"),
                {"after": after, "n": batch_size},
            ).all()
            if not page:
                break
            after = page[-1]
            parsed = normalise_distinct(page, region)
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            for number, (e164, reason) in parsed.items():
                writer.writerow([number, e164 or "", reason or "ok"])
                counts["unparseable_numbers"] += e164 is None
            buffer.seek(0)
            with raw.cursor() as cursor:
                cursor.copy_expert("COPY bench_parsed (number, e164, status) FROM STDIN WITH (FORMAT csv)", buffer)
            counts["numbers"] += len(page)
        parsed_table = sa.table("bench_parsed", sa.column("number"), sa.column("e164"), sa.column("status"))
        result = connection.execute(
            call_logs.update()
            .where(pending, call_logs.c.caller_number == parsed_table.c.number)
            .values(
                caller_e164=sa.func.nullif(parsed_table.c.e164, ""),
                caller_parse_status=parsed_table.c.status,
            )
        )
        counts["rows"] = max(result.rowcount or 0, 0)
    return counts


# ------------------------------------------------------------- match: one rewrite per sale


def _conversion_key_sql(account_id: str, caller, call_start, action):
    """match.conversion_key in PostgreSQL: sha256 of 'account|caller|start (UTC, to the second)|action'."""
    start = sa.func.to_char(sa.func.timezone("UTC", call_start), 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
    text = sa.func.concat_ws("|", sa.literal(account_id), caller, start, action)
    return sa.func.encode(sa.func.sha256(sa.func.convert_to(text, "UTF8")), "hex")


def _lateral_picks(account_id: str, business_date: date, rules) -> sa.TextClause:
    """The chosen call per sale by two index probes on (caller_e164, call_start) instead of a ranked join.

    Per sale: the best call within the CRM's call start tolerance, else the best
    call in the window; "best" is match._rank_calls' order (last or first call,
    then lowest source_call_id). PostgreSQL only, like the temporary tables here.
    """
    order = "desc" if rules.attribution == "last" else "asc"
    extra = ""
    if rules.min_duration_seconds:
        extra += f" and c.duration_seconds >= {int(rules.min_duration_seconds)}"
    if rules.forwarded_only:
        extra += " and c.via_google_forwarding is true"
    window = f"make_interval(secs => {-int(rules.window_days) * 86400})"
    tolerance = int(rules.crm_call_start_tolerance_seconds)
    eligible = (
        "c.account_id = s.account_id and c.caller_e164 = s.caller_e164 and c.call_start < s.conversion_time "
        f"and c.call_start >= s.conversion_time + {window}{extra}"
    )
    return sa.text(
        f"""
        insert into bench_sale_outcome (sale_key, call_id, call_start, conversion_key)
        select s.sale_key, pick.source_call_id, pick.call_start,
               encode(sha256(convert_to(concat_ws('|', s.account_id, s.caller_e164,
                   to_char(pick.call_start at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                   s.conversion_action_id), 'UTF8')), 'hex')
        from crm_sales s
        cross join lateral (
            select source_call_id, call_start from (
                (select c.source_call_id, c.call_start, 0 as near from call_logs c
                 where {eligible} and s.crm_call_start is not null
                   and c.call_start >= s.crm_call_start + make_interval(secs => {-tolerance})
                   and c.call_start <= s.crm_call_start + make_interval(secs => {tolerance})
                 order by c.call_start {order}, c.source_call_id asc limit 1)
                union all
                (select c.source_call_id, c.call_start, 1 as near from call_logs c
                 where {eligible}
                 order by c.call_start {order}, c.source_call_id asc limit 1)
            ) as candidates
            order by near limit 1
        ) as pick
        where s.account_id = :account and s.business_date = :day and s.matched_call_id is null
        """
    ).bindparams(account=account_id, day=business_date)


def match_day_set_based(engine, account_id: str, business_date: date, rules, run_id: str, picks: str = "window"):
    """match.match_day for PostgreSQL, writing each of the day's sales once.

    match_day rewrites every sale of the day up to four times (a reset that also
    rewrites rows that hold nothing, the chosen call, the unmatched reason, the
    conversion key: one UPDATE per (call, action) through executemany), and the
    last two statements read the sales back into Python. Here the reset only
    touches rows that hold an earlier match; the chosen call, its conversion key
    (sha256 in SQL, same text as match.conversion_key) and the unmatched reasons
    go to a temporary table, and one UPDATE ... FROM writes them; matches are
    built by one INSERT ... SELECT. The orphan, ledger and count steps are the
    pipeline's own. A conversion's key only depends on (caller, call start,
    action), so every sale of a (call, action) group gets the same key, as in
    match_day.
    """
    from callconv import match
    from callconv.schema import call_logs, crm_sales, upload_ledger

    sale, call = crm_sales, call_logs
    day = match._day_sales(account_id, business_date)
    delivered = sa.exists().where(
        upload_ledger.c.conversion_key == sale.c.conversion_key, upload_ledger.c.state.in_(match.DELIVERED_STATES)
    )
    with engine.begin() as connection:
        connection.execute(
            sale.update()
            .where(
                day,
                sa.or_(sale.c.conversion_key.is_(None), ~delivered),
                sa.or_(
                    sale.c.matched_call_id.is_not(None),
                    sale.c.matched_call_start.is_not(None),
                    sale.c.conversion_key.is_not(None),
                    sale.c.unmatched_reason.is_not(None),
                ),
            )
            .values(matched_call_id=None, matched_call_start=None, conversion_key=None, unmatched_reason=None)
        )
        frozen = connection.scalar(
            sa.select(sa.func.count()).select_from(sale).where(day, sale.c.matched_call_id.is_not(None))
        )
        outcome = sa.Table(
            "bench_sale_outcome",
            sa.MetaData(),
            sa.Column("sale_key", sa.String(64), primary_key=True),
            sa.Column("call_id", sa.String(128)),
            sa.Column("call_start", sa.DateTime(timezone=True)),
            sa.Column("conversion_key", sa.String(64)),
            sa.Column("reason", sa.String(32)),
            prefixes=["TEMPORARY"],
            postgresql_on_commit="DROP",
        )
        outcome.create(connection)
        if picks == "lateral":
            connection.execute(_lateral_picks(account_id, business_date, rules))
        ranked = match._rank_calls(account_id, business_date, rules)
        picked = (
            sa.select(
                ranked.c.sale_key,
                ranked.c.source_call_id,
                ranked.c.call_start,
                _conversion_key_sql(account_id, sale.c.caller_e164, ranked.c.call_start, sale.c.conversion_action_id),
            )
            .join(sale, sa.and_(sale.c.account_id == ranked.c.account_id, sale.c.sale_key == ranked.c.sale_key))
            .where(ranked.c.call_rank == 1)
        )
        if picks != "lateral":
            connection.execute(
                outcome.insert().from_select(["sale_key", "call_id", "call_start", "conversion_key"], picked)
            )
        connection.execute(sa.text("analyze bench_sale_outcome"))

        # Why the others found no call: match._unmatched_reasons, for the sales not picked.
        in_window = sa.and_(
            call.c.call_start < sale.c.conversion_time,
            call.c.call_start >= match.shift_seconds(sale.c.conversion_time, -rules.window_days * 86400),
        )
        long_enough = call.c.duration_seconds >= rules.min_duration_seconds

        def count_where(condition):
            return sa.func.sum(sa.case((condition, 1), else_=0))

        evidence = (
            sa.select(
                sale.c.sale_key,
                sa.func.count(call.c.source_call_id).label("any_calls"),
                count_where(in_window).label("in_window"),
                count_where(sa.and_(in_window, long_enough)).label("long_enough"),
            )
            .select_from(
                sale.outerjoin(
                    call, sa.and_(call.c.account_id == sale.c.account_id, call.c.caller_e164 == sale.c.caller_e164)
                )
            )
            .where(day, sale.c.matched_call_id.is_(None), ~sa.exists().where(outcome.c.sale_key == sale.c.sale_key))
            .group_by(sale.c.sale_key)
            .subquery("evidence")
        )
        reason = sa.case(
            (evidence.c.any_calls == 0, "no_call_from_number"),
            (evidence.c.in_window == 0, "calls_outside_window"),
            (evidence.c.long_enough == 0, "calls_too_short"),
            else_="only_non_forwarded_calls",
        )
        connection.execute(outcome.insert().from_select(["sale_key", "reason"], sa.select(evidence.c.sale_key, reason)))
        connection.execute(
            sale.update()
            .where(sale.c.account_id == account_id, sale.c.sale_key == outcome.c.sale_key)
            .values(
                matched_call_id=outcome.c.call_id,
                matched_call_start=outcome.c.call_start,
                conversion_key=outcome.c.conversion_key,
                unmatched_reason=outcome.c.reason,
            )
        )
        conversions = _insert_matches(connection, account_id, business_date, rules, run_id)
        _drop_orphans(connection, account_id)
        new_pending = _queue_for_delivery(connection, account_id, business_date, run_id)
        result = match._day_counts(connection, account_id, business_date, conversions, frozen, new_pending)
    return result


def _insert_matches(connection, account_id: str, business_date: date, rules, run_id: str) -> int:
    """match._build_conversions as one DELETE and one INSERT ... SELECT."""
    from callconv import match
    from callconv.schema import crm_sales, matches, upload_ledger

    sale = crm_sales
    today = (
        sa.select(sale.c.matched_call_id, sale.c.conversion_action_id)
        .where(match._day_sales(account_id, business_date), sale.c.matched_call_id.is_not(None))
        .distinct()
        .subquery("today")
    )
    group = (sale.c.matched_call_id, sale.c.conversion_action_id)
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
            today,
            sa.and_(
                today.c.matched_call_id == sale.c.matched_call_id,
                today.c.conversion_action_id == sale.c.conversion_action_id,
            ),
        )
        .where(sale.c.account_id == account_id)
        .subquery("members")
    )
    if rules.merge_rule == "sum":
        value = sa.case(
            (members.c.currency_min == members.c.currency_max, members.c.value_sum), else_=members.c.conversion_value
        )
    else:
        value = members.c.conversion_value
    delivered = sa.exists().where(
        upload_ledger.c.conversion_key == members.c.conversion_key,
        upload_ledger.c.state.in_(match.DELIVERED_STATES),
    )
    rows = sa.select(
        members.c.conversion_key,
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
    ).where(members.c.recency == 1, ~delivered)
    keys = sa.select(sale.c.conversion_key).where(
        match._day_sales(account_id, business_date), sale.c.conversion_key.is_not(None)
    )
    kept = sa.exists().where(
        upload_ledger.c.conversion_key == matches.c.conversion_key, upload_ledger.c.state.in_(match.DELIVERED_STATES)
    )
    connection.execute(matches.delete().where(matches.c.conversion_key.in_(keys), ~kept))
    inserted = connection.execute(
        matches.insert().from_select(
            [
                "conversion_key",
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
    )
    return max(inserted.rowcount or 0, 0)


def _queue_for_delivery(connection, account_id: str, business_date: date, run_id: str) -> int:
    """match._queue_for_delivery, but the refresh of pending rows skips rows whose payload is unchanged.

    The original's UPDATE rewrites every pending row of the day, including the
    ones the INSERT just before it created from the same matches rows.
    """
    from callconv import match
    from callconv.schema import crm_sales, matches, upload_ledger

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
            match._day_sales(account_id, business_date), crm_sales.c.conversion_key.is_not(None)
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
    changed = sa.or_(*(upload_ledger.c[name].is_distinct_from(matches.c[name]) for name in payload))
    connection.execute(
        upload_ledger.update()
        .where(
            upload_ledger.c.state == "pending",
            upload_ledger.c.conversion_key == matches.c.conversion_key,
            todays,
            changed,
        )
        .values({name: matches.c[name] for name in payload})
    )
    return max(inserted or 0, 0)


# ------------------------------------------------------------------ phone numbers


def _fast_phone_setup():
    import phonenumbers
    from phonenumbers import PhoneMetadata

    known_codes = set(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)
    trunks = {}
    for region in phonenumbers.SUPPORTED_REGIONS:
        metadata = PhoneMetadata.metadata_for_region(region)
        prefix = metadata.national_prefix_for_parsing if metadata else None
        plain = metadata.national_prefix if metadata else None
        # Only regions whose national prefix is a plain digit string (0 for SE/DE/GB, 1 for US, none for NO).
        if prefix is None or (plain and prefix == plain):
            trunks[region] = (phonenumbers.country_code_for_region(region), plain or "")
    return known_codes, trunks


_FAST: dict = {}


def normalise_phone_fast(raw: object, region: str):
    """normalise.normalise_phone with a fast path that skips phonenumbers.parse for plain numbers.

    ``phonenumbers.parse`` is about 80% of the cost of one number. For text that
    is only digits and separators, written internationally (``+``/``00`` and a
    known country code, an optional ``(0)``) or nationally with the region's
    plain trunk prefix, the country code and national number are read directly
    and only ``is_possible_number_with_reason`` and ``is_valid_number`` run. Any
    other text, and any number the fast path does not find valid, goes through
    normalise_phone unchanged, so the answers are the same (the bench checks
    every distinct string of the data set).
    """
    import phonenumbers

    from callconv.normalise import _POSSIBLE, normalise_phone

    if not _FAST:
        _FAST["codes"], _FAST["trunks"] = _fast_phone_setup()
    text = raw.strip() if isinstance(raw, str) else ""
    if not text or _SIMPLE.fullmatch(text) is None:
        return normalise_phone(raw, region)
    if text.startswith(("+", "00", "(+", "(00")):
        digits = _NON_DIGITS.sub("", text.replace("(0)", ""))
        if not text.lstrip("(").startswith("+"):
            digits = digits[2:]
        for size in (1, 2, 3):
            if int(digits[:size] or 0) in _FAST["codes"]:
                code, national = int(digits[:size]), digits[size:]
                break
        else:
            return normalise_phone(raw, region)
    else:
        trunk = _FAST["trunks"].get(region)
        if trunk is None:
            return normalise_phone(raw, region)
        code, prefix = trunk
        digits = _NON_DIGITS.sub("", text)
        if not prefix or not digits.startswith(prefix):
            return normalise_phone(raw, region)
        national = digits[len(prefix) :]
    if not national or national.startswith("0") or len(national) > 17:
        return normalise_phone(raw, region)
    number = phonenumbers.PhoneNumber(country_code=code, national_number=int(national))
    if _POSSIBLE.get(phonenumbers.is_possible_number_with_reason(number), "x") is None and (
        phonenumbers.is_valid_number(number)
    ):
        return f"+{code}{national}", None
    return normalise_phone(raw, region)


_SIMPLE = re.compile(r"\(?(?:\+|00)?[\d\s\-./()]+")
_NON_DIGITS = re.compile(r"\D")


def normalise_phones_fast(raw, default_region: str):
    """normalise.normalise_phones with normalise_phone_fast per distinct string."""
    from callconv.normalise import _map_distinct

    return _map_distinct(raw, lambda key: normalise_phone_fast(key, default_region), ("e164", "reason"))


def _drop_orphans(connection, account_id: str) -> int:
    """match._drop_orphans with NOT EXISTS where it has NOT IN (subquery).

    PostgreSQL cannot turn ``NOT IN (SELECT ...)`` into an anti-join (NULL
    semantics); it hashes the subquery only while it fits in work_mem (4 MB by
    default, about 40,000 keys), else it rescans the materialised list for every
    row. With a ledger of delivered keys from earlier days, the original's
    ``matches.conversion_key NOT IN (delivered keys)`` runs as a filter on every
    match of the account before the anti-join: today's matches x all delivered keys.
    """
    from callconv import match
    from callconv.schema import crm_sales, matches, upload_ledger

    orphan = sa.and_(
        matches.c.account_id == account_id,
        ~sa.exists().where(
            crm_sales.c.account_id == account_id, crm_sales.c.conversion_key == matches.c.conversion_key
        ),
    )
    delivered = sa.exists().where(
        upload_ledger.c.conversion_key == matches.c.conversion_key, upload_ledger.c.state.in_(match.DELIVERED_STATES)
    )
    orphan_keys = sa.select(matches.c.conversion_key).where(orphan)
    connection.execute(
        upload_ledger.delete().where(
            upload_ledger.c.conversion_key.in_(orphan_keys), upload_ledger.c.state.in_(("pending", "parked"))
        )
    )
    return connection.execute(matches.delete().where(orphan, ~delivered)).rowcount
