"""Configuration loading: the shipped file, and one clear line for every mistake."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from callconv.config import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG_PATH,
    ConfigError,
    config_path,
    load_settings,
    parse_settings,
)

ACCOUNT = "nordic_plumbing"
DM_ACCOUNT = "svea_heat_pumps"  # the shipped second demo account, on the Data Manager path


@pytest.fixture(scope="module")
def shipped_raw() -> dict:
    return yaml.safe_load(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))


def write_config(tmp_path: Path, raw: dict, name: str = "call_conversions.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def broken_message(tmp_path: Path, raw: dict, mutate) -> tuple[Path, str]:
    """Apply ``mutate`` to a copy of the shipped config, load it from disk, return the error text."""
    changed = copy.deepcopy(raw)
    mutate(changed)
    path = write_config(tmp_path, changed)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message
    return path, message


def first_account(raw: dict) -> dict:
    return raw["accounts"][0]


# --- the shipped file -------------------------------------------------------------


def test_shipped_config_loads_with_its_values():
    settings = load_settings(DEFAULT_CONFIG_PATH)

    assert settings.warehouse_conn_id == "call_conversions_warehouse"
    assert settings.google_ads_conn_id == "google_ads_default"
    assert settings.crm_source.kind == "file"
    assert settings.crm_source.delimiter == ";"
    assert settings.crm_source.decimal == ","
    assert settings.crm_source.encoding == "utf-8-sig"
    assert settings.crm_source.columns.caller_phone == "Telefon"
    assert settings.crm_source.columns.value == "Beløp"
    assert settings.match.attribution == "last"
    assert settings.match.min_duration_seconds == 30
    assert settings.match.forwarded_only is True
    assert settings.retention.days("landing") == 90

    account = settings.account(ACCOUNT)
    assert [a.id for a in settings.accounts] == [ACCOUNT, DM_ACCOUNT]
    assert account.delivery == "api"
    assert account.customer_id == "1234567890"  # dashes dropped
    assert account.timezone == "Europe/Oslo"
    assert str(account.tz) == "Europe/Oslo"
    assert account.default_region == "NO"  # quoted in YAML, so not the boolean false
    assert account.default_currency == "NOK"
    assert {key: (a.id, a.name) for key, a in account.conversion_actions.items()} == {
        "sale": ("555000111", "Phone sale"),
        "upsell": ("555000222", "Support upsell"),
    }
    assert account.consent.ad_user_data == "GRANTED"
    assert account.consent.ad_personalization == "DENIED"
    assert account.action_resource("555000111") == "customers/1234567890/conversionActions/555000111"
    assert settings.match_rules(account) is settings.match
    assert settings.match_window(account).days == 30


def test_shipped_second_account_delivers_through_the_data_manager_api():
    settings = load_settings(DEFAULT_CONFIG_PATH)
    account = settings.account(DM_ACCOUNT)
    assert account.delivery == "data_manager"
    assert (account.timezone, account.default_region, account.default_currency) == ("Europe/Stockholm", "SE", "SEK")
    assert account.customer_id == "2345678901"
    assert {key: a.id for key, a in account.conversion_actions.items()} == {"sale": "555000333", "upsell": "555000444"}
    assert settings.data_manager.conn_id == "google_data_manager" and settings.data_manager.api_endpoint is None
    # Its CRM's own column names over the deployment's; the file format is the deployment's.
    source = settings.crm_source_for(account)
    assert (source.columns.conversion_time, source.columns.value, source.columns.crm_id) == (
        "Försäljningstid",
        "Belopp",
        "Ärende",
    )
    assert (source.delimiter, source.decimal, source.landing_uri) == (";", ",", settings.crm_source.landing_uri)


def test_unknown_account_names_the_configured_ones():
    settings = load_settings(DEFAULT_CONFIG_PATH)
    with pytest.raises(
        ConfigError, match=r"unknown account 'acme'; configured accounts: nordic_plumbing, svea_heat_pumps$"
    ):
        settings.account("acme")


# --- one line per mistake ---------------------------------------------------------


def test_unknown_time_zone(tmp_path, shipped_raw):
    path, message = broken_message(tmp_path, shipped_raw, lambda r: first_account(r).update(timezone="Europe/Olso"))
    assert message == f"{path}: accounts[nordic_plumbing].timezone: unknown time zone 'Europe/Olso'"
    assert "accounts[nordic_plumbing].timezone" in message
    assert "unknown time zone 'Europe/Olso'" in message


def test_time_zone_that_is_a_path_is_refused(tmp_path, shipped_raw):
    _, message = broken_message(tmp_path, shipped_raw, lambda r: first_account(r).update(timezone="../etc/passwd"))
    assert message.endswith("accounts[nordic_plumbing].timezone: unknown time zone '../etc/passwd'")


@pytest.mark.parametrize("customer_id", ["123-456-789", "123-456-78901", "abc-def-ghij", "123 456 7890"])
def test_bad_customer_id(tmp_path, shipped_raw, customer_id):
    path, message = broken_message(tmp_path, shipped_raw, lambda r: first_account(r).update(customer_id=customer_id))
    assert message == (
        f"{path}: accounts[nordic_plumbing].customer_id: "
        f"customer id must be 10 digits like 123-456-7890, got {customer_id!r}"
    )


def test_bad_login_customer_id_names_that_key(tmp_path, shipped_raw):
    _, message = broken_message(tmp_path, shipped_raw, lambda r: first_account(r).update(login_customer_id="42"))
    assert "accounts[nordic_plumbing].login_customer_id: customer id must be 10 digits" in message


@pytest.mark.parametrize("customer_id", [1234567890, "1234567890", "123-4567890"])
def test_customer_id_forms_that_are_accepted(customer_id, shipped_raw):
    raw = copy.deepcopy(shipped_raw)
    first_account(raw)["customer_id"] = customer_id
    assert parse_settings(raw).accounts[0].customer_id == "1234567890"


def test_conversion_action_id_missing(tmp_path, shipped_raw):
    path, message = broken_message(
        tmp_path, shipped_raw, lambda r: first_account(r)["conversion_actions"]["sale"].pop("id")
    )
    assert message == f"{path}: accounts[nordic_plumbing].conversion_actions.sale.id: required key is missing"


@pytest.mark.parametrize("action_id", ["55a", "", "555-000", "5.5"])
def test_conversion_action_id_not_numeric(tmp_path, shipped_raw, action_id):
    path, message = broken_message(
        tmp_path, shipped_raw, lambda r: first_account(r)["conversion_actions"]["sale"].update(id=action_id)
    )
    assert message == (
        f"{path}: accounts[nordic_plumbing].conversion_actions.sale.id: "
        f"conversion action id must be digits, got {action_id!r}"
    )


def test_conversion_action_id_as_yaml_int_becomes_text(shipped_raw):
    raw = copy.deepcopy(shipped_raw)
    first_account(raw)["conversion_actions"]["sale"]["id"] = 555000111
    action = parse_settings(raw).accounts[0].conversion_actions["sale"]
    assert action.id == "555000111"
    assert isinstance(action.id, str)


@pytest.mark.parametrize(
    "action_id",
    [
        "²",
        "５５５０００１１１",
    ],
)
def test_conversion_action_id_must_be_ascii_digits(shipped_raw, action_id):
    raw = copy.deepcopy(shipped_raw)
    first_account(raw)["conversion_actions"]["sale"]["id"] = action_id
    with pytest.raises(ConfigError, match=r"accounts\[nordic_plumbing\]\.conversion_actions\.sale\.id"):
        parse_settings(raw)


def test_customer_id_must_be_ascii_digits(shipped_raw):
    raw = copy.deepcopy(shipped_raw)
    first_account(raw)["customer_id"] = "١٢٣-٤٥٦-٧٨٩٠"  # Arabic-Indic digits
    with pytest.raises(ConfigError, match=r"accounts\[nordic_plumbing\]\.customer_id"):
        parse_settings(raw)


def test_unknown_currency(tmp_path, shipped_raw):
    path, message = broken_message(tmp_path, shipped_raw, lambda r: first_account(r).update(default_currency="XYZ"))
    assert message == f"{path}: accounts[nordic_plumbing].default_currency: unknown ISO 4217 currency 'XYZ'"


def test_currency_and_region_are_upper_cased(shipped_raw):
    raw = copy.deepcopy(shipped_raw)
    first_account(raw).update(default_currency=" eur ", default_region="de")
    account = parse_settings(raw).accounts[0]
    assert account.default_currency == "EUR"
    assert account.default_region == "DE"


def test_unknown_phone_region(tmp_path, shipped_raw):
    path, message = broken_message(tmp_path, shipped_raw, lambda r: first_account(r).update(default_region="XX"))
    assert message == (
        f"{path}: accounts[nordic_plumbing].default_region: unknown phone region 'XX' (use an ISO 3166 code such as NO)"
    )


def test_unknown_top_level_key(tmp_path, shipped_raw):
    path, message = broken_message(tmp_path, shipped_raw, lambda r: r.update(warehouse_url="sqlite://"))
    assert message == f"{path}: warehouse_url: unknown key"


def test_unknown_account_key_names_the_account(tmp_path, shipped_raw):
    path, message = broken_message(tmp_path, shipped_raw, lambda r: first_account(r).update(time_zone="Europe/Oslo"))
    assert message == f"{path}: accounts[nordic_plumbing].time_zone: unknown key"


def test_missing_caller_phone_column(tmp_path, shipped_raw):
    path, message = broken_message(tmp_path, shipped_raw, lambda r: r["crm_source"]["columns"].pop("caller_phone"))
    assert message == f"{path}: crm_source.columns.caller_phone: required key is missing"


def test_duplicate_account_ids(tmp_path, shipped_raw):
    def duplicate(raw):
        twin = copy.deepcopy(first_account(raw))
        twin["customer_id"] = "999-888-7777"
        raw["accounts"].append(twin)

    path, message = broken_message(tmp_path, shipped_raw, duplicate)
    assert message.startswith(f"{path}: ")
    assert "account id 'nordic_plumbing' appears twice" in message


def test_second_account_is_named_by_its_id(tmp_path, shipped_raw):
    def add_broken(raw):
        other = copy.deepcopy(first_account(raw))
        other.update(id="acme", timezone="Mars/Olympus")
        raw["accounts"].append(other)

    _, message = broken_message(tmp_path, shipped_raw, add_broken)
    assert message.endswith("accounts[acme].timezone: unknown time zone 'Mars/Olympus'")


def test_several_mistakes_report_the_first_and_count_the_rest(tmp_path, shipped_raw):
    _, message = broken_message(
        tmp_path, shipped_raw, lambda r: first_account(r).update(customer_id="x", timezone="Europe/Olso")
    )
    assert "accounts[nordic_plumbing].customer_id: customer id must be 10 digits like 123-456-7890, got 'x'" in message
    assert message.endswith(" (and 1 more)")


def test_sql_source_needs_conn_id_and_query(tmp_path, shipped_raw):
    _, message = broken_message(tmp_path, shipped_raw, lambda r: r["crm_source"].update(kind="sql"))
    assert message.endswith("crm_source: kind 'sql' needs both conn_id and query")


def test_delimiter_must_be_one_character(tmp_path, shipped_raw):
    _, message = broken_message(tmp_path, shipped_raw, lambda r: r["crm_source"].update(delimiter=";;"))
    assert message.endswith("crm_source.delimiter: must be a single character")


def test_message_is_one_line_even_for_a_key_with_a_newline(shipped_raw):
    raw = copy.deepcopy(shipped_raw)
    first_account(raw)["time\nzone"] = "Europe/Oslo"
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw)
    assert "\n" not in str(caught.value)


# --- the file itself ------------------------------------------------------------


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("export_uri: var/export\ncrm_source: [1, 2\naccounts: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value) == f"{path}: not valid YAML at line 3"


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value) == f"{path}: the file must hold a mapping at the top level"


def test_empty_file_is_not_a_mapping(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="must hold a mapping at the top level"):
        load_settings(path)


def test_file_not_found_mentions_the_env_var(tmp_path):
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert message == f"{path}: config file not found (set CALL_CONVERSIONS_CONFIG)"
    assert CONFIG_ENV_VAR == "CALL_CONVERSIONS_CONFIG"


def test_config_saved_as_latin1_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8").encode("latin-1"))  # 'Beløp' -> 0xF8
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_settings(path)


def test_config_path_that_is_a_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path))):
        load_settings(tmp_path)


def test_env_var_points_at_the_file(tmp_path, monkeypatch, shipped_raw):
    raw = copy.deepcopy(shipped_raw)
    first_account(raw).update(id="acme", timezone="America/New_York", default_region="US", default_currency="USD")
    path = write_config(tmp_path, raw, name="from_env.yaml")
    monkeypatch.setenv(CONFIG_ENV_VAR, str(path))

    assert config_path() == path
    settings = load_settings()
    assert [a.id for a in settings.accounts] == ["acme", DM_ACCOUNT]  # the first renamed, the second as shipped
    assert settings.account("acme").timezone == "America/New_York"
    assert settings.account("acme").default_currency == "USD"


def test_env_var_naming_a_missing_file(tmp_path, monkeypatch):
    path = tmp_path / "missing.yaml"
    monkeypatch.setenv(CONFIG_ENV_VAR, str(path))
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value) == f"{path}: config file not found (set CALL_CONVERSIONS_CONFIG)"


def test_empty_env_var_falls_back_to_the_shipped_file(monkeypatch):
    monkeypatch.setenv(CONFIG_ENV_VAR, "")
    assert config_path() == DEFAULT_CONFIG_PATH
    monkeypatch.delenv(CONFIG_ENV_VAR)
    assert config_path() == DEFAULT_CONFIG_PATH
    assert load_settings().accounts[0].id == ACCOUNT


def test_warehouse_retention_shorter_than_the_match_window_is_refused(tmp_path, shipped_raw):
    def shorten(raw):
        raw.setdefault("retention", {})["warehouse_days"] = 10
        raw.setdefault("match", {})["window_days"] = 30

    path, message = broken_message(tmp_path, shipped_raw, shorten)
    assert "account 'nordic_plumbing'" in message
    assert "keeps warehouse data 10 days, less than the 30-day match window" in message


def test_warehouse_retention_equal_to_the_match_window_is_accepted(tmp_path, shipped_raw):
    changed = copy.deepcopy(shipped_raw)
    changed.setdefault("retention", {})["warehouse_days"] = 30
    changed.setdefault("match", {})["window_days"] = 30
    settings = load_settings(write_config(tmp_path, changed))
    assert settings.retention.days("warehouse") == 30


def test_files_holding_numbers_never_outlive_the_warehouses_numbers():
    """A conversion file, CRM extract or quarantine export kept longer than the warehouse keeps
    numbers would give a redacted row (its times, action, value, CRM id) its number back."""
    from callconv.config import Retention

    retention = Retention(default_days=90, warehouse_days=60, landing_days=120, conversion_files_days=365)
    assert [retention.days(name) for name in ("landing", "quarantine", "conversion_files")] == [60, 60, 60]
    assert retention.days("data_docs") == 90  # Data Docs show no value
    assert Retention(landing_days=30).days("landing") == 30  # shorter stays shorter
    assert Retention().call_logs == "redact" and Retention(call_logs="drop").call_logs == "drop"


def test_file_delivery_lookback_defaults_to_60_days_and_an_account_may_override_it(shipped_raw):
    changed = copy.deepcopy(shipped_raw)
    changed["file_delivery"] = {"conn_id": "sftp_main", "remote_dir": "/in"}
    second = {**copy.deepcopy(first_account(changed)), "id": "short_lookback", "delivery": "file"}
    second["file_delivery"] = {"conn_id": "sftp_other", "remote_dir": "/other", "lookback_days": 30}
    changed["accounts"].append(second)
    settings = parse_settings(changed)

    assert settings.file_delivery_for(settings.account(ACCOUNT)).lookback_days == 60
    override = settings.file_delivery_for(settings.account("short_lookback"))
    assert (override.conn_id, override.lookback_days) == ("sftp_other", 30)


@pytest.mark.parametrize(("days", "complaint"), [(0, "greater than or equal to 1"), (91, "less than or equal to 90")])
def test_file_delivery_lookback_beyond_googles_range_is_refused(tmp_path, shipped_raw, days, complaint):
    _, message = broken_message(
        tmp_path, shipped_raw, lambda raw: raw.__setitem__("file_delivery", {"lookback_days": days})
    )
    assert message.endswith(f"file_delivery.lookback_days: Input should be {complaint}")


def test_delivery_data_manager_is_accepted_with_its_section(shipped_raw):
    raw = copy.deepcopy(shipped_raw)
    raw["accounts"][0]["delivery"] = "data_manager"
    raw["data_manager"] = {"conn_id": "dm", "api_endpoint": "https://127.0.0.1:9443", "batch_size": 500}
    settings = parse_settings(raw)
    assert settings.accounts[0].delivery == "data_manager"
    assert settings.data_manager.batch_size == 500 and settings.data_manager.conn_id == "dm"


def test_data_manager_batch_over_googles_limit_is_refused(tmp_path, shipped_raw):
    def mutate(raw):
        raw["data_manager"] = {"batch_size": 2001}

    _, message = broken_message(tmp_path, shipped_raw, mutate)
    assert "data_manager.batch_size" in message


def test_unknown_delivery_names_the_choices(tmp_path, shipped_raw):
    def mutate(raw):
        raw["accounts"][0]["delivery"] = "fax"

    _, message = broken_message(tmp_path, shipped_raw, mutate)
    assert "delivery" in message and "data_manager" in message


# --- an account's own crm_source -------------------------------------------------


def test_account_crm_source_is_laid_over_the_deployment_default(shipped_raw):
    raw = copy.deepcopy(shipped_raw)
    first_account(raw)["crm_source"] = {"encoding": "utf-8", "delimiter": ",", "columns": {"outcome": "Result"}}
    settings = parse_settings(raw)
    account = settings.account(ACCOUNT)
    merged = settings.crm_source_for(account)
    assert (merged.encoding, merged.delimiter) == ("utf-8", ",")
    assert merged.columns.outcome == "Result"
    # keys the account does not name come from the deployment
    assert merged.decimal == settings.crm_source.decimal
    assert merged.columns.caller_phone == settings.crm_source.columns.caller_phone
    assert merged.landing_uri == settings.crm_source.landing_uri
    assert settings.crm_source.delimiter == ";"  # the default itself is unchanged


def test_unknown_key_in_an_account_crm_source(tmp_path, shipped_raw):
    path, message = broken_message(
        tmp_path, shipped_raw, lambda r: first_account(r).update(crm_source={"delimeter": ","})
    )
    assert message == f"{path}: accounts[nordic_plumbing].crm_source.delimeter: unknown key"


def test_unknown_column_in_an_account_crm_source(tmp_path, shipped_raw):
    path, message = broken_message(
        tmp_path, shipped_raw, lambda r: first_account(r).update(crm_source={"columns": {"phone_nr": "x"}})
    )
    assert "account 'nordic_plumbing': crm_source.columns.phone_nr: unknown key" in message


def test_bad_delimiter_in_an_account_crm_source(tmp_path, shipped_raw):
    path, message = broken_message(
        tmp_path, shipped_raw, lambda r: first_account(r).update(crm_source={"delimiter": ";;"})
    )
    assert "account 'nordic_plumbing': crm_source.delimiter" in message
    assert "single character" in message
