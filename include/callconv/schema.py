"""Warehouse tables, as SQLAlchemy Core, shared by every stage and by Alembic.

The same definitions run on PostgreSQL, SQLite and BigQuery (through its
SQLAlchemy dialect), so the types stay portable: timezone-aware DateTime,
Numeric for money, String for codes. Every time column holds UTC.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

UTC_TIME = sa.DateTime(timezone=True)
MONEY = sa.Numeric(18, 4)

# The input contract: filled by the telephony or call-tracking system.
# The pipeline writes caller_e164 and caller_parse_status; retention, past the window,
# empties caller_number and caller_e164 (status 'redacted') or deletes the row.
call_logs = sa.Table(
    "call_logs",
    metadata,
    sa.Column("account_id", sa.String(64), primary_key=True),
    sa.Column("source_call_id", sa.String(128), primary_key=True),
    sa.Column("caller_number", sa.String(64)),
    sa.Column("caller_e164", sa.String(20)),
    sa.Column("caller_parse_status", sa.String(32)),
    sa.Column("call_start", UTC_TIME, nullable=False),
    sa.Column("duration_seconds", sa.Integer, nullable=False),
    sa.Column("dialled_number", sa.String(64)),
    sa.Column("via_google_forwarding", sa.Boolean, nullable=False),
    # Matching reads only these columns: an index-only scan per sale on PostgreSQL.
    sa.Index(
        "ix_call_logs_match",
        "account_id",
        "caller_e164",
        "call_start",
        postgresql_include=["source_call_id", "duration_seconds", "via_google_forwarding"],
    ),
    sa.Index("ix_call_logs_unnormalised", "account_id", "caller_parse_status"),
)

# One row per CRM file (or query result) taken in, so nothing is imported twice.
crm_imports = sa.Table(
    "crm_imports",
    metadata,
    sa.Column("account_id", sa.String(64), primary_key=True),
    sa.Column("checksum", sa.String(64), primary_key=True),
    sa.Column("source_uri", sa.String(1024), nullable=False),
    sa.Column("business_date", sa.Date, nullable=False),
    sa.Column("row_count", sa.Integer, nullable=False),
    sa.Column("run_id", sa.String(250), nullable=False),
    sa.Column("imported_at", UTC_TIME, nullable=False),
)

# Normalised sales, one per CRM record; the sale_key is an HMAC of the CRM id when
# it has one, else of the row's content (callconv.protection.pseudonyms), so a re-import
# upserts in place. A *_key_id names the pseudonym key an HMAC is under.
crm_sales = sa.Table(
    "crm_sales",
    metadata,
    sa.Column("account_id", sa.String(64), primary_key=True),
    sa.Column("sale_key", sa.String(64), primary_key=True),
    sa.Column("sale_key_id", sa.String(32)),
    sa.Column("crm_id", sa.String(128)),
    sa.Column("import_checksum", sa.String(64), nullable=False),
    sa.Column("source_row", sa.Integer, nullable=False),
    sa.Column("business_date", sa.Date, nullable=False),
    sa.Column("caller_e164", sa.String(20)),
    sa.Column("caller_hmac", sa.String(64)),
    sa.Column("conversion_time", UTC_TIME, nullable=False),
    sa.Column("crm_call_start", UTC_TIME),
    sa.Column("outcome", sa.String(128), nullable=False),
    sa.Column("conversion_action_id", sa.String(32), nullable=False),
    sa.Column("conversion_value", MONEY),
    sa.Column("currency_code", sa.String(3)),
    sa.Column("matched_call_id", sa.String(128)),
    sa.Column("matched_call_start", UTC_TIME),
    sa.Column("conversion_key", sa.String(64)),
    sa.Column("conversion_key_id", sa.String(32)),
    sa.Column("unmatched_reason", sa.String(32)),
    sa.Index("ix_crm_sales_day", "account_id", "business_date"),
    # Nothing matching writes is indexed, so its one UPDATE per sale can stay on the
    # row's page (a HOT update, PostgreSQL; migration 0004 sets fillfactor 40 to leave room).
    # Sales on one call are found through their caller, who never changes.
    sa.Index("ix_crm_sales_caller", "account_id", "caller_e164"),
)

# Rows that failed validation or normalisation, with the reason.
quarantine = sa.Table(
    "quarantine",
    metadata,
    sa.Column("account_id", sa.String(64), primary_key=True),
    sa.Column("import_checksum", sa.String(64), primary_key=True),
    sa.Column("source_row", sa.Integer, primary_key=True),
    sa.Column("business_date", sa.Date, nullable=False),
    sa.Column("reason", sa.String(48), nullable=False),
    sa.Column("detail", sa.String(256)),
    sa.Column("crm_id", sa.String(128)),
    sa.Column("raw_record", sa.JSON),
    sa.Column("run_id", sa.String(250), nullable=False),
    sa.Index("ix_quarantine_day", "account_id", "business_date"),
)

# One conversion per (call, conversion action): what will be sent to Google.
matches = sa.Table(
    "matches",
    metadata,
    sa.Column("conversion_key", sa.String(64), primary_key=True),
    sa.Column("conversion_key_id", sa.String(32)),
    sa.Column("account_id", sa.String(64), nullable=False),
    sa.Column("business_date", sa.Date, nullable=False),
    sa.Column("source_call_id", sa.String(128), nullable=False),
    sa.Column("caller_e164", sa.String(20)),
    sa.Column("caller_hmac", sa.String(64)),
    sa.Column("call_start", UTC_TIME, nullable=False),
    sa.Column("conversion_action_id", sa.String(32), nullable=False),
    sa.Column("conversion_time", UTC_TIME, nullable=False),
    sa.Column("conversion_value", MONEY),
    sa.Column("currency_code", sa.String(3)),
    sa.Column("sale_count", sa.Integer, nullable=False),
    sa.Column("run_id", sa.String(250), nullable=False),
    # Keyed by conversion_key alone, like the ledger: a call id reused for another caller
    # or start is another conversion, never a unique-key crash that every retry repeats.
    sa.Index("ix_matches_call_action", "account_id", "source_call_id", "conversion_action_id"),
    sa.Index("ix_matches_day", "account_id", "business_date"),
)

# What Google is sent for a conversion: the ledger keeps it as it was (or will be) sent.
CONVERSION_PAYLOAD = (
    "caller_e164",
    "call_start",
    "conversion_action_id",
    "conversion_time",
    "conversion_value",
    "currency_code",
)

# Delivery state per conversion. The payload is copied in when the row turns
# pending and may change until it is first sent (``sent_at``); from then on it
# is frozen, and every resend carries ``sent_payload``, the bytes first sent.
upload_ledger = sa.Table(
    "upload_ledger",
    metadata,
    sa.Column("conversion_key", sa.String(64), primary_key=True),
    sa.Column("conversion_key_id", sa.String(32)),
    sa.Column("account_id", sa.String(64), nullable=False),
    sa.Column("business_date", sa.Date, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("caller_e164", sa.String(20)),
    sa.Column("caller_hmac", sa.String(64)),
    sa.Column("call_start", UTC_TIME, nullable=False),
    sa.Column("conversion_action_id", sa.String(32), nullable=False),
    sa.Column("conversion_time", UTC_TIME, nullable=False),
    sa.Column("conversion_value", MONEY),
    sa.Column("currency_code", sa.String(3)),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("park_until", UTC_TIME),
    sa.Column("error_code", sa.String(64)),
    sa.Column("error_message", sa.String(512)),
    sa.Column("delivered_at", UTC_TIME),
    sa.Column("delivered_by", sa.String(8)),
    sa.Column("run_id", sa.String(250), nullable=False),
    # Set in its own transaction before the request leaves: the payload may have reached Google.
    sa.Column("sent_at", UTC_TIME),
    sa.Column("sent_payload", sa.LargeBinary),
    # The claim of the run sending it (state 'sending'); a lease run out means the sender died.
    sa.Column("claimed_by", sa.String(250)),
    sa.Column("request_id", sa.String(64)),
    sa.Column("lease_until", UTC_TIME),
    sa.Column("sends", sa.Integer, nullable=False, server_default="0"),
    # Delivery by file: the data-interval end of the latest publication that carried the row
    # (sent_at is the first). See callconv.delivery.file_delivery for when such a row counts as delivered.
    sa.Column("last_published_at", UTC_TIME),
    # Delivery through the Data Manager API: the row's index in its request's events, so
    # per-record diagnostics from requestStatus:retrieve settle exactly this row.
    sa.Column("record_index", sa.Integer),
    sa.Index("ix_upload_ledger_state", "account_id", "state"),
)

# Data Manager API ingest requests (callconv.delivery.data_manager): recorded before the send (claim_id,
# the ledger rows' request_id) and after (Google's request id), settled later from
# requestStatus:retrieve. state: sending -> processing -> success | failure | partial; or rejected.
data_manager_requests = sa.Table(
    "data_manager_requests",
    metadata,
    sa.Column("claim_id", sa.String(64), primary_key=True),
    sa.Column("account_id", sa.String(64), nullable=False),
    sa.Column("run_id", sa.String(250), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("events", sa.Integer, nullable=False),
    # The request body as first sent; a resend after a crash sends exactly these bytes.
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("google_request_id", sa.String(128)),
    sa.Column("sent_at", UTC_TIME),
    sa.Column("answered_at", UTC_TIME),
    sa.Column("settled_at", UTC_TIME),
    sa.Column("sends", sa.Integer, nullable=False, server_default="0"),
    sa.Column("status_detail", sa.String(512)),
    sa.Index("ix_data_manager_requests_state", "account_id", "state"),
)

# Changes that arrived after a conversion was sent, and were recorded instead of
# applied (a sent payload is never changed): one row per sale and reason.
delivery_conflicts = sa.Table(
    "delivery_conflicts",
    metadata,
    sa.Column("account_id", sa.String(64), primary_key=True),
    sa.Column("sale_key", sa.String(64), primary_key=True),
    sa.Column("reason", sa.String(48), primary_key=True),
    sa.Column("business_date", sa.Date, nullable=False),
    sa.Column("conversion_key", sa.String(64)),
    sa.Column("detail", sa.String(256)),
    sa.Column("run_id", sa.String(250), nullable=False),
    sa.Index("ix_delivery_conflicts_day", "account_id", "business_date"),
)

# One row per (DAG run, account, day): counts by stage, for reports and alerts.
run_summary = sa.Table(
    "run_summary",
    metadata,
    sa.Column("run_id", sa.String(250), primary_key=True),
    sa.Column("account_id", sa.String(64), primary_key=True),
    sa.Column("business_date", sa.Date, primary_key=True),
    sa.Column("window_start", UTC_TIME, nullable=False),
    sa.Column("window_end", UTC_TIME, nullable=False),
    sa.Column("counts", sa.JSON, nullable=False),
    sa.Column("updated_at", UTC_TIME, nullable=False),
    # The DAG of the run (an import DAG or the rerun DAG); empty on rows written before revision 0008.
    sa.Column("dag_id", sa.String(250)),
)

# One row per purge: what the retention DAG removed or redacted, and up to when.
retention_audit = sa.Table(
    "retention_audit",
    metadata,
    sa.Column("run_id", sa.String(250), primary_key=True),
    sa.Column("account_id", sa.String(64), primary_key=True),
    sa.Column("data_class", sa.String(32), primary_key=True),
    sa.Column("cutoff", sa.Date, nullable=False),
    sa.Column("affected", sa.Integer, nullable=False),
    sa.Column("forced", sa.Integer, nullable=False, server_default="0"),
    sa.Column("recorded_at", UTC_TIME, nullable=False),
)

# Per account, the pseudonym key its rows are keyed under (callconv.protection.pseudonyms): intake and
# matching refuse another, so a rotation is a re-key of the account, never a mixture.
pseudonym_key_state = sa.Table(
    "pseudonym_key_state",
    metadata,
    sa.Column("account_id", sa.String(64), primary_key=True),
    sa.Column("key_id", sa.String(32), nullable=False),
)

# The newest generation of every sealed file (callconv.protection.sealed): a file's associated data
# names its generation, so an older copy put back in its place does not decrypt.
sealed_generations = sa.Table(
    "sealed_generations",
    metadata,
    sa.Column("account_id", sa.String(64), primary_key=True),
    sa.Column("data_class", sa.String(16), primary_key=True),
    sa.Column("logical_path", sa.String(512), primary_key=True),
    sa.Column("generation", sa.BigInteger, nullable=False),
)

LEDGER_STATES = ("pending", "sending", "uploaded", "parked", "failed", "delivered")
