"""publish_day_file end to end: real PostgreSQL, a real OpenSSH sftp server on loopback, Airflow's SFTPHook.

The server is started by the session fixture (sshd is installed with apt-get
when missing); if it cannot be started the tests fail, they never skip. What
was published is read back with paramiko directly, not through the code under
test.
"""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sftp_server import SftpServerError, sftp_server

from callconv.config import Account
from callconv.conversion_file import TEMPLATE_HEADER, render
from callconv.file_delivery import (
    FileDeliveryError,
    LocalFolderPublisher,
    SftpPublisher,
    publish_day_file,
    remote_file_name,
    sftp_publisher,
)
from callconv.schema import upload_ledger

pytestmark = pytest.mark.integration

CONN_ID = "callconv_test_sftp"
DAY = date(2026, 3, 1)
WINDOW_END = datetime(2026, 3, 1, 23, 0, tzinfo=UTC)  # Oslo midnight after DAY
CALL_BASE = datetime(2026, 3, 1, 7, 0, tzinfo=UTC)
FILE_ACCOUNT = "fileco"
API_ACCOUNT = "apico"
FILE_NAME = remote_file_name(FILE_ACCOUNT)


def make_account(account_id: str = FILE_ACCOUNT, delivery: str = "file") -> Account:
    return Account.model_validate(
        {
            "id": account_id,
            "customer_id": "123-456-7890",
            "timezone": "Europe/Oslo",
            "default_region": "NO",
            "default_currency": "NOK",
            "delivery": delivery,
            "conversion_actions": {
                "sale": {"id": "111", "name": "Phone sale"},
                "upsell": {"id": "222", "name": "Support upsell"},
            },
            "consent": {"ad_user_data": "GRANTED", "ad_personalization": "DENIED"},
        }
    )


def caller(n: int) -> str:
    return f"+4791{n:06d}"


def ledger_row(n: int, account_id: str = FILE_ACCOUNT, **overrides) -> dict:
    start = CALL_BASE + timedelta(minutes=37 * n)
    row = {
        "conversion_key": f"{account_id}-{n:04d}",
        "account_id": account_id,
        "business_date": DAY,
        "state": "pending",
        "caller_e164": caller(n),
        "call_start": start,
        "conversion_action_id": "111",
        "conversion_time": start + timedelta(hours=3),
        "conversion_value": Decimal("1500.5000"),
        "currency_code": "NOK",
        "run_id": "match-run",
    }
    row.update(overrides)
    return row


# Due today for the file account: by conversion time the order is 4, 3, 2, so the file's order is not the key order.
DUE = [
    ledger_row(2, conversion_time=CALL_BASE + timedelta(hours=9)),
    ledger_row(3, conversion_action_id="222", conversion_value=None, currency_code=None),
    ledger_row(4, conversion_time=CALL_BASE + timedelta(hours=3), conversion_value=Decimal("99.9000")),
]
NOT_DUE = [
    ledger_row(1, business_date=DAY - timedelta(days=1)),  # another day
    ledger_row(
        5, state="uploaded", delivered_by="api", delivered_at=WINDOW_END - timedelta(days=3)
    ),  # went by API before the account switched to file
    ledger_row(6, state="failed", error_code="EXPIRED_BY_RETENTION"),
]
API_ROWS = [ledger_row(7, account_id=API_ACCOUNT), ledger_row(8, account_id=API_ACCOUNT)]


def expected_file(rows: list[dict]) -> bytes:
    ordered = sorted(rows, key=lambda r: (r["conversion_time"], r["conversion_key"]))
    return render(make_account(), ordered)


def ledger(engine) -> dict[str, dict]:
    with engine.connect() as connection:
        rows = connection.execute(sa.select(upload_ledger).order_by(upload_ledger.c.conversion_key)).mappings()
        return {row["conversion_key"]: dict(row) for row in rows}


def seed(engine, rows: list[dict]) -> None:
    with engine.begin() as connection:
        connection.execute(upload_ledger.insert(), rows)


# -------------------------------------------------------------------- fixtures


@contextlib.contextmanager
def airflow_connection(conn_id: str, server):
    variable = f"AIRFLOW_CONN_{conn_id.upper()}"
    before = os.environ.get(variable)
    os.environ[variable] = server.airflow_connection_json()
    try:
        yield conn_id
    finally:
        if before is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = before


@pytest.fixture(scope="session")
def sftp(tmp_path_factory):
    """A real sshd on 127.0.0.1 for the whole session, with an Airflow connection CONN_ID to it."""
    try:
        with sftp_server(tmp_path_factory.mktemp("sftp")) as server, airflow_connection(CONN_ID, server):
            yield server
    except SftpServerError as error:
        pytest.fail(f"file delivery tests need a local OpenSSH sftp server, and it failed: {error}", pytrace=False)


@pytest.fixture()
def remote_dir(sftp, request):
    """An empty folder on the server for one test (the server runs on this machine)."""
    folder = sftp.remote_root / request.node.name.replace("[", "_").replace("]", "")
    folder.mkdir()
    return str(folder)


@pytest.fixture()
def seeded(warehouse):
    seed(warehouse, DUE + NOT_DUE + API_ROWS)
    return warehouse


def read_remote(server, path: str) -> bytes:
    with server.sftp_client() as client, client.open(path, "rb") as handle:
        return handle.read()


def list_remote(server, folder: str) -> list[str]:
    with server.sftp_client() as client:
        return sorted(client.listdir(folder))


# ----------------------------------------------------------------------- tests


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_publishes_the_day_file_over_sftp_and_marks_its_rows_delivered(seeded, sftp, remote_dir, capfd):
    before = ledger(seeded)
    # Airflow reconfigures logging when the hook first loads, so listen on our logger itself.
    collected = _Collect()
    module_log = logging.getLogger("callconv.file_delivery")
    module_log.addHandler(collected)
    level = module_log.level
    module_log.setLevel(logging.DEBUG)
    try:
        counts = publish_day_file(seeded, make_account(), DAY, sftp_publisher(CONN_ID, remote_dir), WINDOW_END, "run-1")
    finally:
        module_log.removeHandler(collected)
        module_log.setLevel(level)

    published = read_remote(sftp, f"{remote_dir}/{FILE_NAME}")
    assert published == expected_file(DUE)
    lines = published.decode().split("\r\n")
    assert lines[0] == "Parameters:TimeZone=Europe/Oslo"
    assert lines[1] == ",".join(TEMPLATE_HEADER)
    assert lines[2] == (
        f"\t{caller(4)},2026-03-01 10:28:00+01:00,Phone sale,2026-03-01 11:00:00+01:00,99.9,NOK,Granted,Denied"
    )
    assert lines[3] == (
        f"\t{caller(3)},2026-03-01 09:51:00+01:00,Support upsell,2026-03-01 12:51:00+01:00,,,Granted,Denied"
    )
    assert lines[4] == (
        f"\t{caller(2)},2026-03-01 09:14:00+01:00,Phone sale,2026-03-01 17:00:00+01:00,1500.5,NOK,Granted,Denied"
    )
    assert lines[5:] == [""]  # three conversions, nothing else

    assert list_remote(sftp, remote_dir) == [FILE_NAME]  # the temporary file is gone
    assert counts == {
        "file": FILE_NAME,
        "conversions": 3,
        "newly_delivered": 3,
        "already_delivered": 0,
        "changed_meanwhile": 0,
        "redacted": 0,
        "bytes": len(published),
    }

    after = ledger(seeded)
    for row in DUE:
        marked = after[row["conversion_key"]]
        assert (marked["state"], marked["delivered_by"], marked["delivered_at"]) == ("delivered", "file", WINDOW_END)
        assert {k: marked[k] for k in ("caller_e164", "conversion_time", "attempts", "run_id")} == {
            k: before[row["conversion_key"]][k] for k in ("caller_e164", "conversion_time", "attempts", "run_id")
        }
    for row in NOT_DUE + API_ROWS:  # other days, other states, the API account: untouched
        assert after[row["conversion_key"]] == before[row["conversion_key"]]

    assert any("published with 3 conversions (3 newly delivered" in message for message in collected.messages)
    assert not any("posix-rename" in message for message in collected.messages)  # OpenSSH renamed atomically
    everything = "\n".join(collected.messages) + "".join(capfd.readouterr())  # Airflow's and paramiko's output too
    assert not any(caller(n) in everything or caller(n)[1:] in everything for n in range(1, 9))


def test_republishing_the_day_gives_the_same_bytes_and_changes_no_ledger_row(seeded, sftp, remote_dir):
    account = make_account()
    publish_day_file(seeded, account, DAY, sftp_publisher(CONN_ID, remote_dir), WINDOW_END, "run-1")
    first_bytes = read_remote(sftp, f"{remote_dir}/{FILE_NAME}")
    first_ledger = ledger(seeded)

    # A rerun (here even with a later window end, as a manual rerun could have) republishes the same file.
    counts = publish_day_file(
        seeded, account, DAY, sftp_publisher(CONN_ID, remote_dir), WINDOW_END + timedelta(days=2), "run-2"
    )

    assert read_remote(sftp, f"{remote_dir}/{FILE_NAME}") == first_bytes == expected_file(DUE)
    assert ledger(seeded) == first_ledger
    assert counts["conversions"] == 3
    assert (counts["newly_delivered"], counts["already_delivered"]) == (0, 3)
    assert list_remote(sftp, remote_dir) == [FILE_NAME]


def test_a_late_conversion_joins_the_day_file_and_only_it_is_newly_marked(seeded, sftp, remote_dir):
    account = make_account()
    publish_day_file(seeded, account, DAY, sftp_publisher(CONN_ID, remote_dir), WINDOW_END, "run-1")
    late = ledger_row(9, conversion_time=CALL_BASE + timedelta(hours=12))
    seed(seeded, [late])
    later_end = WINDOW_END + timedelta(hours=5)

    counts = publish_day_file(seeded, account, DAY, sftp_publisher(CONN_ID, remote_dir), later_end, "rerun")

    assert read_remote(sftp, f"{remote_dir}/{FILE_NAME}") == expected_file([*DUE, late])
    assert (counts["conversions"], counts["newly_delivered"], counts["already_delivered"]) == (4, 1, 3)
    after = ledger(seeded)
    assert after[late["conversion_key"]]["delivered_at"] == later_end
    assert {after[row["conversion_key"]]["delivered_at"] for row in DUE} == {WINDOW_END}


def test_an_api_account_is_refused_and_its_pending_rows_stay_pending(seeded, sftp, remote_dir):
    before = ledger(seeded)

    with pytest.raises(ValueError, match="has delivery 'api'"):
        publish_day_file(
            seeded, make_account(API_ACCOUNT, "api"), DAY, sftp_publisher(CONN_ID, remote_dir), WINDOW_END, "run-1"
        )
    publish_day_file(seeded, make_account(), DAY, sftp_publisher(CONN_ID, remote_dir), WINDOW_END, "run-1")

    after = ledger(seeded)
    assert {after[row["conversion_key"]]["state"] for row in API_ROWS} == {"pending"}
    assert all(after[row["conversion_key"]] == before[row["conversion_key"]] for row in API_ROWS)
    assert caller(7).encode() not in read_remote(sftp, f"{remote_dir}/{FILE_NAME}")
    assert list_remote(sftp, remote_dir) == [FILE_NAME]


def test_a_wrong_remote_folder_fails_clearly_and_marks_nothing(seeded, sftp, remote_dir):
    before = ledger(seeded)
    missing = f"{remote_dir}/no/such/folder"

    with pytest.raises(FileDeliveryError, match="does the remote folder .*no/such/folder.* exist"):
        publish_day_file(seeded, make_account(), DAY, sftp_publisher(CONN_ID, missing), WINDOW_END, "run-1")

    assert ledger(seeded) == before
    assert list_remote(sftp, remote_dir) == []


def test_a_stopped_server_fails_clearly_and_marks_nothing(seeded, tmp_path):
    before = ledger(seeded)
    with sftp_server(tmp_path / "short-lived") as server, airflow_connection("callconv_test_sftp_down", server):
        from airflow.providers.sftp.hooks.sftp import SFTPHook

        server.process.terminate()
        server.process.wait(timeout=5)
        # One connection attempt: the hook's default retries would only make the test slower.
        hook = SFTPHook(ssh_conn_id="callconv_test_sftp_down", conn_retry_attempts=1)
        publisher = SftpPublisher(hook, str(server.remote_root))

        with pytest.raises(FileDeliveryError, match="could not publish .* over SFTP to callconv_test_sftp_down:"):
            publish_day_file(seeded, make_account(), DAY, publisher, WINDOW_END, "run-1")

    assert ledger(seeded) == before
    assert sorted(p.name for p in server.remote_root.iterdir()) == []


def test_a_failed_rename_removes_the_temporary_file_and_marks_nothing(seeded, sftp, remote_dir):
    before = ledger(seeded)
    (sftp.remote_root / os.path.basename(remote_dir) / FILE_NAME).mkdir()  # the target name is taken by a folder

    with pytest.raises(FileDeliveryError, match=f"could not publish {FILE_NAME} over SFTP"):
        publish_day_file(seeded, make_account(), DAY, sftp_publisher(CONN_ID, remote_dir), WINDOW_END, "run-1")

    assert ledger(seeded) == before
    assert list_remote(sftp, remote_dir) == [FILE_NAME]  # only the folder; no .partial left behind


class _NoPosixRename:
    """An SFTP client that behaves like a server without the posix-rename extension."""

    def __init__(self, client):
        self._client = client

    def posix_rename(self, oldpath, newpath):
        raise OSError("Operation unsupported")  # what paramiko raises for SSH_FX_OP_UNSUPPORTED

    def __getattr__(self, name):
        return getattr(self._client, name)


class _HookWithoutPosixRename:
    def __init__(self, hook):
        self.hook = hook
        self.ssh_conn_id = hook.ssh_conn_id

    @contextlib.contextmanager
    def get_managed_conn(self):
        with self.hook.get_managed_conn() as client:
            yield _NoPosixRename(client)


def test_without_posix_rename_the_file_is_replaced_by_remove_and_rename(seeded, sftp, remote_dir):
    from airflow.providers.sftp.hooks.sftp import SFTPHook

    (sftp.remote_root / os.path.basename(remote_dir) / FILE_NAME).write_bytes(b"yesterday's file\r\n")
    publisher = SftpPublisher(_HookWithoutPosixRename(SFTPHook(ssh_conn_id=CONN_ID)), remote_dir)

    counts = publish_day_file(seeded, make_account(), DAY, publisher, WINDOW_END, "run-1")

    assert read_remote(sftp, f"{remote_dir}/{FILE_NAME}") == expected_file(DUE)
    assert list_remote(sftp, remote_dir) == [FILE_NAME]
    assert counts["newly_delivered"] == 3


def test_an_empty_day_still_replaces_yesterdays_file_with_the_header_only(warehouse, sftp, remote_dir):
    (sftp.remote_root / os.path.basename(remote_dir) / FILE_NAME).write_bytes(b"yesterday's file\r\n")

    counts = publish_day_file(warehouse, make_account(), DAY, sftp_publisher(CONN_ID, remote_dir), WINDOW_END, "r")

    assert read_remote(sftp, f"{remote_dir}/{FILE_NAME}") == render(make_account(), [])
    assert (counts["conversions"], counts["newly_delivered"]) == (0, 0)


def test_the_local_folder_publisher_replaces_the_file_atomically(seeded, tmp_path):
    (tmp_path / FILE_NAME).write_bytes(b"old")

    publish_day_file(seeded, make_account(), DAY, LocalFolderPublisher(tmp_path), WINDOW_END, "run-1")

    assert (tmp_path / FILE_NAME).read_bytes() == expected_file(DUE)
    assert [p.name for p in tmp_path.iterdir()] == [FILE_NAME]
    assert {ledger(seeded)[row["conversion_key"]]["delivered_by"] for row in DUE} == {"file"}


def test_a_row_rematched_during_the_publish_stays_pending(seeded, tmp_path):
    changed_key = DUE[0]["conversion_key"]

    class RematchWhilePublishing(LocalFolderPublisher):
        def publish(self, name: str, payload: bytes) -> None:
            super().publish(name, payload)
            with seeded.begin() as connection:  # a concurrent match run gives the row a new value
                connection.execute(
                    upload_ledger.update()
                    .where(upload_ledger.c.conversion_key == changed_key)
                    .values(conversion_value=Decimal("2000"))
                )

    counts = publish_day_file(seeded, make_account(), DAY, RematchWhilePublishing(tmp_path), WINDOW_END, "run-1")

    assert (counts["newly_delivered"], counts["changed_meanwhile"]) == (2, 1)
    after = ledger(seeded)
    assert (after[changed_key]["state"], after[changed_key]["delivered_at"]) == ("pending", None)
    assert {after[row["conversion_key"]]["state"] for row in DUE[1:]} == {"delivered"}
