"""Shared fixtures. The warehouse is always a real PostgreSQL.

Each test session gets a schema of its own, dropped afterwards. A server that
cannot be reached fails the run with a message saying so; it never skips.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Airflow reads its home at import: keep tests off ~/airflow and away from the demo's.
os.environ.setdefault("AIRFLOW_HOME", str(PROJECT_ROOT / ".airflow" / "test"))
# Under pytest-xdist every worker is a session of its own: its own Airflow home (a SQLite
# metadata DB is one writer), as it has its own warehouse schema (pg_schema_url).
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if XDIST_WORKER:
    os.environ["AIRFLOW_HOME"] = str(Path(os.environ["AIRFLOW_HOME"]) / f"xdist-{XDIST_WORKER}")
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(PROJECT_ROOT / "dags"))

DEFAULT_WAREHOUSE_TEST_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
PSEUDONYM_CONN_ENV_VAR = "AIRFLOW_CONN_CALL_CONVERSIONS_PSEUDONYM"


def warehouse_test_url() -> str:
    return os.environ.get("WAREHOUSE_TEST_URL") or DEFAULT_WAREHOUSE_TEST_URL


@pytest.fixture(scope="session")
def session_pseudonym_keys():
    """A random pseudonym keyring for the session: what keys a test's conversions and sales."""
    from callconv.protection.pseudonyms import PseudonymKeys

    return PseudonymKeys.generate("test-2026-12")


@pytest.fixture()
def pseudonym_keys(session_pseudonym_keys):
    return session_pseudonym_keys


@pytest.fixture(autouse=True)
def _pseudonym_connection(session_pseudonym_keys, monkeypatch) -> None:
    """Every test (and every Airflow process it starts) finds the keyring where a DAG looks for it."""
    import json

    connection = {"conn_type": "generic", "password": session_pseudonym_keys.to_text()}
    monkeypatch.setenv(PSEUDONYM_CONN_ENV_VAR, json.dumps(connection))


@pytest.fixture(scope="session")
def pg_admin_engine():
    import sqlalchemy as sa

    url = warehouse_test_url()
    engine = sa.create_engine(url, pool_pre_ping=True)
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("select 1"))
    except Exception as error:  # noqa: BLE001 - turned into a clear failure
        pytest.fail(
            f"PostgreSQL is required for integration tests and could not be reached at "
            f"{engine.url.render_as_string(hide_password=True)} (WAREHOUSE_TEST_URL): "
            f"{type(error).__name__}: {str(error).splitlines()[0]}",
            pytrace=False,
        )
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def pg_schema_url(pg_admin_engine):
    """A fresh schema with the project's migrations applied; its URL pins search_path."""
    import sqlalchemy as sa

    from callconv.warehouse import migrate

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with pg_admin_engine.begin() as connection:
        connection.execute(sa.text(f'create schema "{schema}"'))
    url = pg_admin_engine.url.update_query_dict({"options": f"-csearch_path={schema}"})
    url_text = url.render_as_string(hide_password=False)
    migrate(url_text)
    yield url_text
    with pg_admin_engine.begin() as connection:
        connection.execute(sa.text(f'drop schema "{schema}" cascade'))


@pytest.fixture()
def warehouse(pg_schema_url):
    """An engine on the session schema, with every table emptied before the test."""
    import sqlalchemy as sa

    from callconv.schema import metadata

    engine = sa.create_engine(pg_schema_url)
    with engine.begin() as connection:
        for table in reversed(metadata.sorted_tables):
            connection.execute(table.delete())
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def airflow_db():
    """Airflow's own metadata DB (SQLite under AIRFLOW_HOME), migrated once per run."""
    import subprocess
    import sys

    home = Path(os.environ["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"airflow db migrate failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return home
