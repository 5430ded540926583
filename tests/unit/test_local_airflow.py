"""``make airflow`` and ``make ui-demo`` make their admin user through ``airflow users create``."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

from callconv import local_airflow


def test_an_admin_password_that_starts_with_a_dash_reaches_airflow_whole(tmp_path, monkeypatch):
    # secrets.token_urlsafe draws "-" as a first character about once in 64 homes.
    monkeypatch.setattr(local_airflow.secrets, "token_urlsafe", lambda size: "-Kq3_x9Zt0Lm")
    monkeypatch.setattr(local_airflow, "account_roles", lambda: [])
    calls: list[tuple[str, ...]] = []

    def airflow(env, *args, check=True):
        calls.append(args)
        return SimpleNamespace(stdout="", stderr="", returncode=0)

    monkeypatch.setattr(local_airflow, "_airflow", airflow)
    password = local_airflow.prepare({}, tmp_path)
    assert password == "-Kq3_x9Zt0Lm"

    # Parsed as Airflow's CLI parses it: the FAB provider's own definition of `users create`.
    from airflow.providers.fab.cli.definition import USERS_COMMANDS

    create = next(command for command in USERS_COMMANDS if command.name == "create")
    parser = argparse.ArgumentParser(exit_on_error=False)
    for arg in create.args:
        arg.add_to_parser(parser)
    (args,) = [call for call in calls if call[:2] == ("users", "create")]
    parsed = parser.parse_args(list(args[2:]))
    assert parsed.password == password
    assert parsed.username == local_airflow.ADMIN_USER and parsed.role == "Admin"
