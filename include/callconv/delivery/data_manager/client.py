"""The Data Manager API client: google-api-python-client's own, from its static discovery document.

Why this library: it ships Google's discovery document ``datamanager v1`` (revision
20261106 in the pinned 2.202.0, whose ``Event`` has ``callInfo``), so requests are built
and encoded by Google's code, not by a hand-written HTTP client. ``google-ads-datamanager``
(the gRPC client, 0.9.4) has no ``CallInfo`` yet. ``client_options.api_endpoint`` points the
same client at the local sandbox (:mod:`callconv.sandbox.data_manager`).
"""

from __future__ import annotations

import json
from importlib import resources

SCOPE = "https://www.googleapis.com/auth/datamanager"


def discovery_has_call_info() -> bool:
    """True when the pinned library's static discovery document knows ``Event.callInfo``."""
    doc = resources.files("googleapiclient").joinpath("discovery_cache/documents/datamanager.v1.json")
    schemas = json.loads(doc.read_text(encoding="utf-8"))["schemas"]
    return "callInfo" in schemas["Event"]["properties"] and "CallInfo" in schemas


def build_service(credentials, api_endpoint: str | None = None, ca_certs: str | None = None):
    """A ``datamanager v1`` service object from static discovery.

    ``credentials``: google-auth credentials carrying the datamanager scope (from an Airflow
    Google connection in production). ``ca_certs``: a certificate to trust, for the sandbox.
    """
    import google_auth_httplib2
    import httplib2
    from googleapiclient.discovery import build

    # httplib2 resends a request whose connection dropped (RETRIES, a module global, 2 by
    # default). The ledger decides resends, so RETRIES is 1; httplib2 still resends once when
    # the connection drops before the status line (it takes that for a stale connection).
    # That resend is the same bytes, which Google deduplicates after processing.
    httplib2.RETRIES = 1
    if not discovery_has_call_info():
        raise RuntimeError("google-api-python-client's datamanager v1 discovery document lacks Event.callInfo")
    options = {"api_endpoint": api_endpoint} if api_endpoint else None
    http = google_auth_httplib2.AuthorizedHttp(credentials, http=httplib2.Http(ca_certs=ca_certs, timeout=60))
    return build("datamanager", "v1", static_discovery=True, http=http, client_options=options, cache_discovery=False)


def token_credentials(token: str):
    """Credentials holding a bare access token (the sandbox's bearer token)."""
    from google.oauth2.credentials import Credentials

    return Credentials(token=token, scopes=[SCOPE])


def service_from_airflow_connection(conn_id: str, api_endpoint: str | None = None):
    """The service, with credentials from an Airflow Google connection.

    A connection whose extra has ``access_token`` (the sandbox's bearer token) and
    optionally ``ca_certs`` uses that token; any other is read by the Google provider's
    hook (service account key or authorised user), asking for the datamanager scope.
    Such a token connection may also name its ``api_endpoint`` (the demo's sandbox listens
    on a port chosen at start, so the connection points at it, as the Google Ads one does);
    ``api_endpoint`` given here, from the config, wins.
    """
    from airflow.sdk import BaseHook

    connection = BaseHook.get_connection(conn_id)
    extra = connection.extra_dejson
    if extra.get("access_token"):
        endpoint = api_endpoint or extra.get("api_endpoint")
        return build_service(token_credentials(extra["access_token"]), endpoint, extra.get("ca_certs"))
    from airflow.providers.google.common.hooks.base_google import GoogleBaseHook

    hook = GoogleBaseHook(gcp_conn_id=conn_id)
    credentials, _ = hook.get_credentials_and_project_id()
    if hasattr(credentials, "with_scopes"):
        credentials = credentials.with_scopes([SCOPE])
    return build_service(credentials, api_endpoint)
