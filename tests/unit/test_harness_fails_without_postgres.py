"""The integration tests fail, loudly, when PostgreSQL cannot be reached; they never skip."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again once the probe is gone


def test_an_unreachable_warehouse_fails_the_run_and_says_why():
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{closed_port()}/test"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rs",
            "tests/integration/test_migrations.py::test_postgres_schema_matches_the_code_and_migrating_twice_is_harmless",
        ],
        env={**os.environ, "WAREHOUSE_TEST_URL": url},
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "PostgreSQL is required for integration tests and could not be reached" in result.stdout
    assert url in result.stdout
    assert "skipped" not in result.stdout.lower()
