"""Building the Google Ads client, decoding its answers, and keeping phone numbers out of logs."""

from __future__ import annotations

import json
import logging

import pytest

from callconv.delivery import ads_client
from callconv.delivery.ads_client import (
    ACCESS_ERRORS,
    API_VERSION,
    PHONE_MASK,
    SSL_ROOTS_ENV_VAR,
    PhoneMaskingFilter,
    access_problem,
    client_from_airflow_connection,
    client_from_settings,
    decode_partial_failure,
    get_upload_service,
    is_empty_result,
    mask_phone_numbers,
    protect_library_logging,
)

SETTINGS = {"developer_token": "dev", "access_token": "tok", "endpoint": "localhost:50051"}


def test_api_version_is_one_the_library_serves():
    from google.ads.googleads.client import _VALID_API_VERSIONS

    assert API_VERSION in _VALID_API_VERSIONS


def test_client_from_settings_builds_a_real_client_with_a_static_token():
    from google.ads.googleads.client import GoogleAdsClient

    client = client_from_settings({**SETTINGS, "login_customer_id": "111-222-3333"})

    assert isinstance(client, GoogleAdsClient)
    assert client.endpoint == "localhost:50051"
    assert client.developer_token == "dev"
    assert client.login_customer_id == "1112223333"
    assert client.use_proto_plus is True
    assert client.version == API_VERSION
    assert client.credentials.token == "tok"
    assert client.credentials.valid  # nothing to refresh, so nothing calls Google
    assert client.credentials.refresh_token is None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"developer_token": "dev"}, "access_token"),
        ({**SETTINGS, "refresh_token": "x"}, "unknown Google Ads settings key"),
        ({**SETTINGS, "login_customer_id": "12"}, "10 digits"),
        ({**SETTINGS, "ssl_roots_file": "/nonexistent/cert.pem"}, "does not exist"),
    ],
)
def test_client_from_settings_rejects_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        client_from_settings(settings)


def test_client_from_settings_needs_no_developer_token():
    # Google sunset developer tokens on 2026-09-09; the header is optional and ignored.
    client = client_from_settings({"access_token": "tok", "endpoint": "localhost:50051"})

    assert client.developer_token is None
    assert client.credentials.token == "tok"
    assert client_from_settings({**SETTINGS, "developer_token": ""}).developer_token is None


def test_ssl_roots_file_points_grpc_at_the_sandbox_certificate(tmp_path, monkeypatch):
    cert = tmp_path / "cert.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv(SSL_ROOTS_ENV_VAR, "/etc/ssl/certs/ca-certificates.crt")

    client_from_settings({**SETTINGS, "ssl_roots_file": str(cert)})

    import os

    assert os.environ[SSL_ROOTS_ENV_VAR] == str(cert)


def test_get_upload_service_can_switch_the_manager_account_without_touching_the_client():
    client = client_from_settings(SETTINGS)

    service = get_upload_service(client, login_customer_id="999-888-7777")

    assert type(service).__name__ == "ConversionUploadServiceClient"
    assert client.login_customer_id is None


def _airflow_connection(monkeypatch, conn_id: str, extra: dict) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "google_ads", "extra": extra}))


def test_sandbox_connection_uses_the_static_token(monkeypatch):
    # No refresh token: the hook's own path would refuse this connection.
    _airflow_connection(
        monkeypatch,
        "ads_sandbox",
        {"sandbox": True, "developer_token": "dev", "access_token": "tok", "endpoint": "localhost:1234"},
    )

    client = client_from_airflow_connection("ads_sandbox")

    assert client.endpoint == "localhost:1234"
    assert client.credentials.token == "tok"
    assert client.version == API_VERSION


def test_legacy_nested_sandbox_connection(monkeypatch):
    _airflow_connection(
        monkeypatch,
        "ads_nested",
        {"google_ads_client": {"sandbox": "true", "developer_token": "dev", "access_token": "tok"}},
    )

    assert client_from_airflow_connection("ads_nested").credentials.token == "tok"


def test_production_connection_goes_through_the_google_ads_hook(monkeypatch):
    import google.oauth2.credentials

    refreshed = []

    def no_network_refresh(self, request):  # the one thing that would call Google
        refreshed.append(self.refresh_token)
        self.token = "fresh-token"

    monkeypatch.setattr(google.oauth2.credentials.Credentials, "refresh", no_network_refresh)
    _airflow_connection(
        monkeypatch,
        "ads_prod",
        {
            "developer_token": "dev",
            "client_id": "cid",
            "client_secret": "secret",
            "refresh_token": "refresh",
            "login_customer_id": "1112223333",
            "endpoint": "localhost:4321",
        },
    )

    client = client_from_airflow_connection("ads_prod")

    assert refreshed == ["refresh"]
    assert client.credentials.token == "fresh-token"
    assert (client.developer_token, client.login_customer_id, client.endpoint) == (
        "dev",
        "1112223333",
        "localhost:4321",
    )
    assert client.use_proto_plus is True
    assert client.version == API_VERSION


def test_sandbox_connection_without_a_developer_token(monkeypatch):
    _airflow_connection(monkeypatch, "ads_sandbox_no_token", {"sandbox": True, "access_token": "tok"})

    client = client_from_airflow_connection("ads_sandbox_no_token")

    assert client.developer_token is None and client.credentials.token == "tok"


# --------------------------------------------------------------- access errors: what to do


def _account(login_customer_id: str | None = None):
    from callconv.config import parse_settings

    account = {
        "id": "acme",
        "customer_id": "123-456-7890",
        "timezone": "Europe/Oslo",
        "default_region": "NO",
        "default_currency": "NOK",
        "conversion_actions": {"sale": {"id": "555000111", "name": "Phone sale"}},
    }
    if login_customer_id:
        account["login_customer_id"] = login_customer_id
    raw = {
        "crm_source": {"columns": {"caller_phone": "Tel", "conversion_time": "Tid", "outcome": "Utfall"}},
        "accounts": [account],
    }
    return parse_settings(raw).accounts[0]


@pytest.mark.parametrize(
    ("code", "what_to_do"),
    [
        ("CLOUD_PROJECT_NOT_APPROVED_FOR_PRODUCTION", ["Test access", "Explorer access", "Basic access"]),
        ("CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE", ["accounts[acme].delivery to 'file'", "allowlist"]),
        ("ACTION_NOT_PERMITTED", ["Admin or Standard user role", "more than Test access"]),
        (
            "USER_PERMISSION_DENIED",
            ["accounts[acme].customer_id is the customer", "access to it", "set accounts[acme].login_customer_id"],
        ),
    ],
)
def test_access_problem_says_what_to_do_in_one_line(code, what_to_do):
    message = access_problem(code, _account())

    assert message.startswith(f"Google Ads refused access to customer 123-456-7890 for account 'acme' ({code}): ")
    assert "\n" not in message
    for words in what_to_do:
        assert words in message
    assert "developer token" not in message


def test_access_problem_names_the_manager_account_when_one_is_set():
    message = access_problem("USER_PERMISSION_DENIED", _account(login_customer_id="999-888-7777"))

    assert "manager account 999-888-7777" in message
    assert "accounts[acme].customer_id is the customer that received the calls" in message
    assert "set accounts[acme].login_customer_id" not in message


@pytest.mark.parametrize("code", ["CALL_NOT_FOUND", "OAUTH_TOKEN_INVALID", "INVALID_CUSTOMER_FOR_CALL", "UNKNOWN", ""])
def test_access_problem_leaves_other_codes_alone(code):
    assert access_problem(code, _account()) is None


def test_access_errors_are_codes_of_the_api_version():
    import importlib

    base = f"google.ads.googleads.{API_VERSION}.errors.types"
    enums = [
        importlib.import_module(f"{base}.authorization_error").AuthorizationErrorEnum.AuthorizationError,
        importlib.import_module(f"{base}.not_allowlisted_error").NotAllowlistedErrorEnum.NotAllowlistedError,
    ]
    names = {member.name for enum in enums for member in enum}
    assert set(ACCESS_ERRORS) <= names


def _response_with_errors(client, errors):
    """An UploadCallConversionsResponse as Google builds it, with row errors."""
    from google.protobuf import any_pb2
    from google.rpc import status_pb2

    failure_type = type(client.get_type("GoogleAdsFailure"))
    error_type = type(client.get_type("GoogleAdsError"))
    codes = type(client.get_type("ConversionUploadErrorEnum")).ConversionUploadError
    failure = failure_type()
    for index, code, message in errors:
        error = error_type(message=message)
        error.error_code.conversion_upload_error = codes[code]
        if index is not None:
            element = client.get_type("ErrorLocation").FieldPathElement(field_name="conversions", index=index)
            error.location.field_path_elements.append(element)
        failure.errors.append(error)
    response = client.get_type("UploadCallConversionsResponse")
    response.partial_failure_error = status_pb2.Status(
        code=3,
        details=[
            any_pb2.Any(
                type_url=f"type.googleapis.com/google.ads.googleads.{API_VERSION}.errors.GoogleAdsFailure",
                value=failure_type.serialize(failure),
            )
        ],
    )
    result = client.get_type("CallConversionResult")
    result.caller_id = "+4791234567"
    response.results.extend([result, client.get_type("CallConversionResult")])
    return response


def test_decode_partial_failure_maps_rows_to_codes():
    client = client_from_settings(SETTINGS)
    response = _response_with_errors(
        client,
        [
            (1, "CALL_NOT_FOUND", "not found"),
            (1, "EXPIRED_CALL", "second error on the same row"),
            (3, "TOO_RECENT_CALL", "too recent"),
            (None, "UNKNOWN", "names no row"),
        ],
    )

    assert decode_partial_failure(client, response) == {
        1: ("CALL_NOT_FOUND", "not found"),
        3: ("TOO_RECENT_CALL", "too recent"),
        -1: ("UNKNOWN", "names no row"),
    }
    assert [is_empty_result(r) for r in response.results] == [False, True]
    assert decode_partial_failure(client, client.get_type("UploadCallConversionsResponse")) == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The call from +4791234567 was not found", f"The call from {PHONE_MASK} was not found"),
        ('caller_id: "+16502531234"', f'caller_id: "{PHONE_MASK}"'),
        ("dial +1 (650) 253-1234 now", f"dial {PHONE_MASK} now"),
        ("+47 912 34 567", PHONE_MASK),
        ("2026-03-01 08:00:00+01:00 stays", "2026-03-01 08:00:00+01:00 stays"),
        ("customers/1234567890/conversionActions/111", "customers/1234567890/conversionActions/111"),
        ("", ""),
        (None, ""),
    ],
)
def test_mask_phone_numbers(text, expected):
    assert mask_phone_numbers(text) == expected


def test_mask_phone_numbers_also_masks_known_numbers_without_their_plus():
    assert mask_phone_numbers("number 4791234567 unknown", known=["+4791234567"]) == f"number {PHONE_MASK} unknown"


def test_library_log_records_are_masked(caplog):
    logger = logging.getLogger("callconv.tests.masked")
    logger.addFilter(PhoneMaskingFilter())
    with caplog.at_level(logging.INFO, logger="callconv.tests.masked"):
        logger.info("request %s for %s", 'caller_id: "+4791234567"', "acme")

    assert caplog.records[0].getMessage() == f'request caller_id: "{PHONE_MASK}" for acme'


def test_protect_library_logging_quiets_the_request_dumps():
    library = logging.getLogger(ads_client.LIBRARY_LOGGER)
    saved_level, saved_filters = library.level, list(library.filters)
    try:
        library.filters.clear()
        library.setLevel(logging.NOTSET)

        protect_library_logging()
        protect_library_logging()

        assert library.level == logging.WARNING
        assert sum(isinstance(f, PhoneMaskingFilter) for f in library.filters) == 1

        library.setLevel(logging.DEBUG)  # an operator's explicit choice is kept, still masked
        protect_library_logging()
        assert library.level == logging.DEBUG
    finally:
        library.filters[:] = saved_filters
        library.setLevel(saved_level)
