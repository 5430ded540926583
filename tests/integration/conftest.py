"""Integration tests run as production does: encryption required, with a test keyring.

Every test gets the keyring in ``CALL_CONVERSIONS_ENCRYPTION_KEYS`` (a test that
wants none removes it); ``test_keyring`` is the same keyring, to decrypt with.
"""

from __future__ import annotations

import os

import pytest

from callconv.crypto import DEFAULT_KEYS_ENV_VAR, Keyring

_SESSION_KEYRING = Keyring({"test-2026-11": os.urandom(32)}, "test-2026-11")


@pytest.fixture()
def test_keyring() -> Keyring:
    return _SESSION_KEYRING


@pytest.fixture(autouse=True)
def _encryption_keys(monkeypatch) -> None:
    monkeypatch.setenv(DEFAULT_KEYS_ENV_VAR, _SESSION_KEYRING.to_text())
