"""Integration tests run as production does: encryption required, with a test Tink keyset.

Every test gets the session's keyset in ``CALL_CONVERSIONS_ENCRYPTION_KEYS`` (a test that
wants none removes it); ``test_keyset`` is the same keyset, to decrypt with
(:func:`stored.read_stored`).

Also shared here: the Google Ads sandbox and its certificate, the settings file,
and the Airflow connections the DAGs look up.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from callconv.delivery.ads_client import SSL_ROOTS_ENV_VAR, client_from_settings
from callconv.protection.sealed import KEYSET_ENV_VAR, keyset_to_json, new_keyset
from callconv.sandbox import SandboxServer, ensure_certificate

_SESSION_KEYSET = new_keyset()
_SESSION_KEYSET_JSON = keyset_to_json(_SESSION_KEYSET)

# gRPC reads its trusted roots once per process, when the first TLS channel is
# made, so the sandbox certificate is trusted before any test runs.
SANDBOX_CERT_DIR = Path(tempfile.gettempdir()) / (
    f"callconv-sandbox-tests-{os.getuid()}{os.environ.get('PYTEST_XDIST_WORKER', '')}"
)
SANDBOX_CERT, _ = ensure_certificate(SANDBOX_CERT_DIR)
os.environ[SSL_ROOTS_ENV_VAR] = str(SANDBOX_CERT)

# The CRM columns the settings require; enough where no CRM file is read.
REQUIRED_COLUMNS = {"caller_phone": "p", "conversion_time": "t", "outcome": "o"}


@pytest.fixture()
def test_keyset():
    return _SESSION_KEYSET


@pytest.fixture(autouse=True)
def _encryption_keys(monkeypatch) -> None:
    monkeypatch.setenv(KEYSET_ENV_VAR, _SESSION_KEYSET_JSON)


# ------------------------------------------------------------------ the Google Ads sandbox


@pytest.fixture(scope="session")
def sandbox_cert() -> Path:
    """The certificate every sandbox serves, already trusted by this process."""
    return SANDBOX_CERT


@pytest.fixture()
def make_sandbox():
    """Builds sandboxes on the trusted certificate; the test starts them, they are stopped after it."""
    servers: list[SandboxServer] = []

    def make(**options) -> SandboxServer:
        servers.append(SandboxServer(cert_dir=SANDBOX_CERT_DIR, **options))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


@pytest.fixture()
def client(sandbox):
    """The real google-ads client, over TLS to the test module's ``sandbox``."""
    return client_from_settings(sandbox.client_settings())


# ------------------------------------------------------------------ config and connections, as the DAGs read them


def _set_connection(monkeypatch, conn_id: str, connection: dict) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(connection))


@pytest.fixture()
def sandbox_conn(monkeypatch):
    """Points ``google_ads_default``, the DAGs' connection, at a started sandbox."""

    def point(server: SandboxServer) -> None:
        extra = {"sandbox": True, **server.client_settings()}
        _set_connection(monkeypatch, "google_ads_default", {"conn_type": "google_ads", "extra": extra})

    return point


@pytest.fixture()
def warehouse_conn(pg_schema_url, monkeypatch):
    """Points the named Airflow connection at the test schema; returns the conn id."""

    def point(conn_id: str) -> str:
        _set_connection(monkeypatch, conn_id, {"conn_type": "generic", "extra": {"sqlalchemy_url": pg_schema_url}})
        return conn_id

    return point


@pytest.fixture()
def write_settings(tmp_path, monkeypatch):
    """Writes a one-account settings file with every storage root under ``tmp_path`` and makes it the config.

    The account defaults to Norway and NOK; other top-level sections come as keyword arguments.
    """

    def write(
        account: dict,
        *,
        columns: dict = REQUIRED_COLUMNS,
        crm_source: dict | None = None,
        name: str = "config.yaml",
        **sections,
    ) -> Path:
        config = {
            "export_uri": str(tmp_path / "export"),
            "data_docs_uri": str(tmp_path / "docs"),
            "archive_uri": str(tmp_path / "archive"),
            "quarantine_uri": str(tmp_path / "quarantine"),
            "crm_source": {"landing_uri": str(tmp_path / "landing"), **(crm_source or {}), "columns": columns},
            "accounts": [{"default_region": "NO", "default_currency": "NOK", **account}],
            **sections,
        }
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config))
        monkeypatch.setenv("CALL_CONVERSIONS_CONFIG", str(path))
        return path

    return write


@pytest.fixture()
def metadata_database(pg_admin_engine):
    """A fresh PostgreSQL database for a real Airflow's metadata (and Celery's results), dropped
    afterwards. Not SQLite: there a CLI write beside a busy scheduler meets the file lock, and
    pysqlite's savepoints commit each backfill day on its own, so a lock half-way through
    ``backfill create`` leaves a backfill with only some of its days."""
    name = f"airflow_meta_{uuid.uuid4().hex[:12]}"
    admin = pg_admin_engine.execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'create database "{name}"'))
    try:
        yield pg_admin_engine.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'drop database if exists "{name}" with (force)'))
