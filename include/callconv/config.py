"""The one validated configuration object, loaded once per task.

A mistake in the YAML must surface as one actionable line that names the key
(``accounts[acme].timezone: unknown time zone 'Europe/Olso'``), never as a
stack trace deep inside a task.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_ENV_VAR = "CALL_CONVERSIONS_CONFIG"
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "config" / "call_conversions.yaml"

CONSENT_VALUES = ("GRANTED", "DENIED", "UNKNOWN")


class ConfigError(ValueError):
    """A configuration mistake, with a message that says what to fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _known_currency(code: str) -> str:
    from callconv.intake.currencies import ISO_4217

    code = code.strip().upper()
    if code not in ISO_4217:
        raise ValueError(f"unknown ISO 4217 currency {code!r}")
    return code


class CrmColumns(_Strict):
    """Maps the CRM's column names to ours."""

    caller_phone: str
    conversion_time: str
    outcome: str
    value: str | None = None
    currency: str | None = None
    crm_id: str | None = None
    call_start: str | None = None


class CrmSource(_Strict):
    kind: Literal["file", "sql"] = "file"
    # Landing URI: local folder, file:// or gs://. Files live under
    # {landing_uri}/{account_id}/{YYYY-MM-DD}/*.csv[.gz].
    landing_uri: str = "var/landing"
    delimiter: str = ","
    encoding: Literal["utf-8", "utf-8-sig", "latin-1", "cp1252"] = "utf-8-sig"
    decimal: Literal[".", ","] = "."
    columns: CrmColumns
    # Hostile or broken files fail with a clear error instead of exhausting memory: a file
    # larger than this (after decryption and gunzip) is refused, and files are read, validated
    # and stored chunk_rows rows at a time. The row limit is validation.max_rows.
    max_file_mb: int = Field(1024, ge=1)
    chunk_rows: int = Field(100_000, ge=1)
    # For kind=sql: a common-sql connection and a query taking
    # :window_start, :window_end and :account_id.
    conn_id: str | None = None
    query: str | None = None

    @field_validator("delimiter")
    @classmethod
    def _one_char(cls, value: str) -> str:
        if len(value) != 1:
            raise ValueError("must be a single character")
        return value

    @model_validator(mode="after")
    def _sql_needs_query(self) -> CrmSource:
        if self.kind == "sql" and not (self.conn_id and self.query):
            raise ValueError("kind 'sql' needs both conn_id and query")
        return self


class CrmSourceOverride(_Strict):
    """An account's own ``crm_source`` keys, laid over the deployment's ``crm_source``.

    Why: one deployment may serve accounts whose CRMs export differently (a Norwegian
    Latin-1 ``;`` file with decimal comma beside a US UTF-8 ``,`` file). Every key is
    optional; an unknown key is refused here, so a typo fails at load time, not at intake.
    ``columns`` is merged key by key over the default columns.
    """

    kind: Literal["file", "sql"] | None = None
    landing_uri: str | None = None
    delimiter: str | None = None
    encoding: Literal["utf-8", "utf-8-sig", "latin-1", "cp1252"] | None = None
    decimal: Literal[".", ","] | None = None
    columns: dict[str, str | None] | None = None
    max_file_mb: int | None = Field(None, ge=1)
    chunk_rows: int | None = Field(None, ge=1)
    conn_id: str | None = None
    query: str | None = None


class MatchRules(_Strict):
    window_days: int = Field(30, ge=1, le=90)
    attribution: Literal["last", "first"] = "last"
    min_duration_seconds: int = Field(0, ge=0)
    forwarded_only: bool = True
    crm_call_start_tolerance_seconds: int = Field(120, ge=0)
    # How several sales on one call under one action become one conversion.
    merge_rule: Literal["sum", "latest"] = "sum"
    # A sale that reaches a conversion already sent to Google (which can never be changed
    # or retracted): a recorded conflict, or a conversion of its own. See callconv.matching.match.
    late_sale: Literal["conflict", "new_conversion"] = "conflict"


class ValidationRules(_Strict):
    min_rows: int = Field(0, ge=0)
    max_rows: int = Field(5_000_000, ge=1)
    max_bad_row_share: float = Field(0.2, ge=0, le=1)
    expect_data: bool = True


class Encryption(_Strict):
    """Every file the pipeline stores is sealed with the Tink keyset from this Airflow connection
    (its password holds the keyset JSON, or with ``kms_key_uri`` in its extras the keyset wrapped
    by that Cloud KMS key) or from $CALL_CONVERSIONS_ENCRYPTION_KEYS (:mod:`callconv.protection.sealed`).

    With ``required: true`` a task refuses to run without a keyset; ``required: false`` (the
    demo) stores files in plaintext when there is none, and says so in the task log.
    """

    keys_conn_id: str = "call_conversions_encryption"
    required: bool = True


class Freshness(_Strict):
    """When the call logs count as covering a day: the latest call start is at or after the
    window end minus the grace. The import waits (without holding a worker slot) until then."""

    grace_minutes: int = Field(0, ge=0)
    poke_minutes: int = Field(10, ge=1)
    timeout_hours: float = Field(12, gt=0)


class Upload(_Strict):
    batch_size: int = Field(2000, ge=1, le=2000)
    # Batches in flight at once per account; the ledger stays exactly-once either way.
    max_concurrent_batches: int = Field(1, ge=1, le=16)
    # How long a claim on ledger rows holds before another run may take over and resend
    # them (identical bytes): longer than one request with all its retries can take.
    lease_minutes: float = Field(60, gt=0)
    # A run also retries parked rows due by its window end plus this wait, so a rerun of a
    # day or a backfill's last day does not leave what it parked for a later day's run.
    parked_wait_hours: float = Field(12, ge=0)


class FileDelivery(_Strict):
    """Where Google Ads' scheduled uploads fetch the file, for accounts with delivery 'file'.

    ``lookback_days``: Google's lookback for the account's call conversion actions (their
    click-through conversion window, at most 90 days). The file carries every conversion not
    yet confirmed whose call started within that many days before the run's data-interval end;
    a published conversion counts as delivered once its call falls out of it
    (see callconv.delivery.file_delivery).
    """

    conn_id: str = "call_conversions_sftp"
    remote_dir: str = "."
    lookback_days: int = Field(60, ge=1, le=90)


class DataManager(_Strict):
    """The Data Manager API, for accounts with delivery 'data_manager' (callconv.delivery.data_manager).

    ``conn_id``: an Airflow Google connection (service account, or authorised user with the
    datamanager scope). ``api_endpoint``: empty for Google; the local sandbox in the tests (the
    demo's sandbox is named by the connection instead, see callconv.delivery.data_manager.client).
    ``batch_size``: events per ingest request (Google's limit is 2,000).
    ``quota_wait_minutes``: how long a request refused with 429 parks its rows.
    """

    conn_id: str = "google_data_manager"
    api_endpoint: str | None = None
    batch_size: int = Field(2000, ge=1, le=2000)
    quota_wait_minutes: float = Field(60, ge=0)


class Alerts(_Strict):
    channels: list[Literal["smtp", "slack", "webhook"]] = []  # empty: alerts are only logged
    smtp_conn_id: str = "smtp_alerts"
    email_to: list[str] = []
    email_from: str | None = None
    webhook_conn_id: str = "call_conversions_alerts_webhook"
    subject_prefix: str = "[call-conversions]"
    match_rate_drop_points: float = Field(15, gt=0, le=100)
    match_rate_runs: int = Field(7, ge=1)
    match_rate_min_runs: int = Field(3, ge=1)
    no_data_days: int = Field(7, ge=1)
    no_data_min_days: int = Field(5, ge=1)
    parked_max: int = Field(500, ge=0)
    history_days: int = Field(60, ge=7)

    @model_validator(mode="after")
    def _smtp_needs_recipients(self) -> Alerts:
        if "smtp" in self.channels and not self.email_to:
            raise ValueError("channel 'smtp' needs at least one address in email_to")
        return self


# Data classes whose stores hold phone numbers beside the fields the warehouse keeps after
# redaction (times, actions, values, CRM ids): kept no longer than the warehouse keeps numbers,
# or a redacted row could be joined back to its number through them.
NUMBER_HOLDING_CLASSES = ("landing", "quarantine", "conversion_files")


class Retention(_Strict):
    default_days: int = Field(90, ge=1)
    landing_days: int | None = Field(None, ge=1)
    quarantine_days: int | None = Field(None, ge=1)
    data_docs_days: int | None = Field(None, ge=1)
    conversion_files_days: int | None = Field(None, ge=1)
    warehouse_days: int | None = Field(None, ge=1)
    hard_max_days: int = Field(400, ge=1)
    # Past the warehouse period, call-log rows lose their caller columns (redact) or go (drop).
    call_logs: Literal["redact", "drop"] = "redact"

    def days(self, data_class: str) -> int:
        days = getattr(self, f"{data_class}_days") or self.default_days
        if data_class in NUMBER_HOLDING_CLASSES:
            return min(days, self.warehouse_days or self.default_days)
        return days


class ConversionAction(_Strict):
    id: str
    name: str

    @field_validator("id", mode="before")
    @classmethod
    def _numeric_id(cls, value: object) -> str:
        text = str(value).strip() if value is not None else ""
        if not (text.isascii() and text.isdigit()):
            raise ValueError(f"conversion action id must be digits, got {value!r}")
        return text


class Consent(_Strict):
    ad_user_data: Literal[CONSENT_VALUES] = "UNKNOWN"  # type: ignore[valid-type]
    ad_personalization: Literal[CONSENT_VALUES] = "UNKNOWN"  # type: ignore[valid-type]


_CUSTOMER_ID = re.compile(r"^[0-9]{3}-?[0-9]{3}-?[0-9]{4}$")


class Account(_Strict):
    id: str = Field(pattern=r"^[a-z0-9_]{1,64}$")
    customer_id: str
    login_customer_id: str | None = None
    timezone: str
    default_region: str
    default_currency: str
    delivery: Literal["api", "file", "data_manager"] = "api"
    conversion_actions: dict[str, ConversionAction] = Field(min_length=1)
    consent: Consent = Consent()
    match: MatchRules | None = None
    retention: Retention | None = None
    file_delivery: FileDelivery | None = None
    crm_source: CrmSourceOverride | None = None
    # An Airflow role (FAB auth manager) that alone may see and run this account's DAG.
    access_role: str | None = None

    @field_validator("customer_id", "login_customer_id", mode="before")
    @classmethod
    def _customer_id(cls, value: object) -> str | None:
        if value is None:
            return None
        text = str(value).strip()
        if not _CUSTOMER_ID.match(text):
            raise ValueError(f"customer id must be 10 digits like 123-456-7890, got {text!r}")
        return text.replace("-", "")

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @field_validator("default_region")
    @classmethod
    def _region(cls, value: str) -> str:
        region = value.strip().upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown phone region {value!r} (use an ISO 3166 code such as NO)")
        return region

    @field_validator("default_currency")
    @classmethod
    def _currency(cls, value: str) -> str:
        return _known_currency(value)

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def action_resource(self, action_id: str) -> str:
        return f"customers/{self.customer_id}/conversionActions/{action_id}"


class Settings(_Strict):
    warehouse_conn_id: str = "call_conversions_warehouse"
    google_ads_conn_id: str = "google_ads_default"
    # Secrets, each from an Airflow connection's password (or AIRFLOW_CONN_* env var).
    # The retention key: replaces a redacted caller's number with its HMAC (caller_hmac).
    hmac_conn_id: str = "call_conversions_hmac"
    # The pseudonym keyring: conversion and sale keys are HMACs under it (callconv.protection.pseudonyms).
    pseudonym_conn_id: str = "call_conversions_pseudonym"
    export_uri: str = "var/export"
    data_docs_uri: str = "var/data_docs"
    # Encrypted copies of the CRM files taken in: {archive_uri}/{account}/{YYYY-MM-DD}/{name}.enc
    archive_uri: str = "var/archive"
    # The day's quarantined rows, for debugging: {quarantine_uri}/{account}/{YYYY-MM-DD}/*.csv.enc
    quarantine_uri: str = "var/quarantine"
    encryption: Encryption = Encryption()
    crm_source: CrmSource
    match: MatchRules = MatchRules()
    validation: ValidationRules = ValidationRules()
    freshness: Freshness = Freshness()
    upload: Upload = Upload()
    file_delivery: FileDelivery = FileDelivery()
    data_manager: DataManager = DataManager()
    alerts: Alerts = Alerts()
    retention: Retention = Retention()
    accounts: list[Account] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_accounts(self) -> Settings:
        seen: set[str] = set()
        for account in self.accounts:
            if account.id in seen:
                raise ValueError(f"account id {account.id!r} appears twice")
            seen.add(account.id)
        return self

    @model_validator(mode="after")
    def _numbers_outlive_the_match_window(self) -> Settings:
        # Matching (and merging sales on one call) needs the callers' numbers of the
        # whole window; the warehouse purge replaces them with a keyed hash.
        for account in self.accounts:
            window = self.match_rules(account).window_days
            kept = self.retention_for(account).days("warehouse")
            if kept < window:
                raise ValueError(
                    f"account {account.id!r}: retention keeps warehouse data {kept} days, "
                    f"less than the {window}-day match window"
                )
        return self

    @model_validator(mode="after")
    def _account_crm_sources(self) -> Settings:
        # Each merged crm_source must itself be valid (columns, kind sql with its query).
        for account in self.accounts:
            try:
                self.crm_source_for(account)
            except ValidationError as error:
                first = error.errors()[0]
                where = ".".join(str(step) for step in first["loc"]) or "(top level)"
                message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
                raise ValueError(f"account {account.id!r}: crm_source.{where}: {message}") from None
        return self

    def crm_source_for(self, account: Account) -> CrmSource:
        """The deployment's crm_source with the account's own keys laid over it."""
        if account.crm_source is None:
            return self.crm_source
        override = account.crm_source.model_dump(exclude_unset=True)
        if not override:
            return self.crm_source
        merged = self.crm_source.model_dump()
        columns = override.pop("columns", None)
        if columns is not None:
            merged["columns"] = {**merged["columns"], **columns}
        merged.update(override)
        return CrmSource.model_validate(merged)

    def account(self, account_id: str) -> Account:
        for account in self.accounts:
            if account.id == account_id:
                return account
        known = ", ".join(a.id for a in self.accounts)
        raise ConfigError(f"unknown account {account_id!r}; configured accounts: {known}")

    def file_delivery_for(self, account: Account) -> FileDelivery:
        return account.file_delivery or self.file_delivery

    def match_rules(self, account: Account) -> MatchRules:
        return account.match or self.match

    def retention_for(self, account: Account) -> Retention:
        return account.retention or self.retention

    def match_window(self, account: Account) -> timedelta:
        return timedelta(days=self.match_rules(account).window_days)

    def resolve_uri(self, uri: str) -> str:
        """Relative local paths are taken from the project root."""
        if "://" in uri or os.path.isabs(uri):
            return uri
        return str(PROJECT_ROOT / uri)


def _location(loc: tuple, raw: dict) -> str:
    """Render a pydantic error location as ``accounts[acme].timezone``."""
    parts: list[str] = []
    node: object = raw
    for step in loc:
        if isinstance(step, int):
            label = step
            if isinstance(node, list) and step < len(node) and isinstance(node[step], dict):
                label = node[step].get("id", step)
            parts[-1] = f"{parts[-1]}[{label}]" if parts else f"[{label}]"
            node = node[step] if isinstance(node, list) and step < len(node) else None
        else:
            parts.append(" ".join(str(step).split()))
            node = node.get(step) if isinstance(node, dict) else None
    return ".".join(parts) or "(top level)"


def parse_settings(raw: object, source: str = "config") -> Settings:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the file must hold a mapping at the top level")
    try:
        return Settings.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            message = "required key is missing"
        elif first["type"] == "extra_forbidden":
            message = "unknown key"
        more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
        raise ConfigError(f"{source}: {_location(first['loc'], raw)}: {message}{more}") from None


def config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH)


def load_settings(path: str | os.PathLike | None = None) -> Settings:
    path = Path(path) if path else config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (set {CONFIG_ENV_VAR})") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file (set {CONFIG_ENV_VAR})") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}); save the file as UTF-8") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    return parse_settings(raw, source=str(path))
