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
from callconv.delivery.conversion_file import TEMPLATE_HEADER, render
from callconv.delivery.file_delivery import (
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


# Not yet confirmed, so in the file: today's rows and one left from the day before (the file is
# cumulative). By conversion time the order is 4, 1, 3, 2, so the file's order is not the key order.
DUE = [
    ledger_row(1, business_date=DAY - timedelta(days=1)),
    ledger_row(2, conversion_time=CALL_BASE + timedelta(hours=9)),
    ledger_row(3, conversion_action_id="222", conversion_value=None, currency_code=None),
    ledger_row(4, conversion_time=CALL_BASE + timedelta(hours=3), conversion_value=Decimal("99.9000")),
]
EARLIER_PUBLICATION = WINDOW_END - timedelta(days=1)
NOT_DUE = [
    ledger_row(
        5, state="uploaded", delivered_by="api", delivered_at=WINDOW_END - timedelta(days=3)
    ),  # went by API before the account switched to file
    ledger_row(6, state="failed", error_code="EXPIRED_BY_RETENTION"),
    ledger_row(  # confirmed by an earlier publication
        10,
        business_date=DAY - timedelta(days=62),
        state="delivered",
        delivered_by="file",
        delivered_at=EARLIER_PUBLICATION,
        sent_at=EARLIER_PUBLICATION - timedelta(days=60),
        last_published_at=EARLIER_PUBLICATION - timedelta(days=1),
        sends=60,
    ),
]
API_ROWS = [ledger_row(7, account_id=API_ACCOUNT), ledger_row(8, account_id=API_ACCOUNT)]
PUBLICATION = ("sent_at", "last_published_at", "sends")


def expected_file(rows: list[dict]) -> bytes:
    ordered = sorted(rows, key=lambda r: (r["conversion_time"], r["conversion_key"]))
    return render(make_account(), ordered)


def ledger(engine) -> dict[str, dict]:
    with engine.connect() as connection:
        rows = connection.execute(sa.select(upload_ledger).order_by(upload_ledger.c.conversion_key)).mappings()
        return {row["conversion_key"]: dict(row) for row in rows}


def seed(engine, rows: list[dict]) -> None:
    # One statement per row: an executemany would take its columns from the first row alone.
    with engine.begin() as connection:
        for row in rows:
            connection.execute(upload_ledger.insert(), row)


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


def publication(row: dict) -> tuple:
    return tuple(row[name] for name in PUBLICATION)


def assert_frozen_but_not_published(before: dict, after: dict, window_end: datetime) -> None:
    """A failed publish: the rows it would have carried first are frozen, nothing else changed."""
    for key, row in after.items():
        if key in {r["conversion_key"] for r in DUE}:
            assert publication(row) == (window_end, None, 0)
            assert {k: v for k, v in row.items() if k != "sent_at"} == {
                k: v for k, v in before[key].items() if k != "sent_at"
            }
        else:
            assert row == before[key]


def test_publishes_every_unconfirmed_row_over_sftp_and_freezes_them(seeded, sftp, remote_dir, capfd):
    before = ledger(seeded)
    # Airflow reconfigures logging when the hook first loads, so listen on our logger itself.
    collected = _Collect()
    module_log = logging.getLogger("callconv.delivery.file_delivery")
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
        f"\t{caller(1)},2026-03-01 08:37:00+01:00,Phone sale,2026-03-01 11:37:00+01:00,1500.5,NOK,Granted,Denied"
    )
    assert lines[4] == (
        f"\t{caller(3)},2026-03-01 09:51:00+01:00,Support upsell,2026-03-01 12:51:00+01:00,,,Granted,Denied"
    )
    assert lines[5] == (
        f"\t{caller(2)},2026-03-01 09:14:00+01:00,Phone sale,2026-03-01 17:00:00+01:00,1500.5,NOK,Granted,Denied"
    )
    assert lines[6:] == [""]  # four conversions, nothing else

    assert list_remote(sftp, remote_dir) == [FILE_NAME]  # the temporary file is gone
    assert counts == {
        "file": FILE_NAME,
        "conversions": 4,
        "newly_published": 4,
        "already_published": 0,
        "changed_meanwhile": 0,
        "newly_delivered": 0,
        "outside_lookback": 0,
        "redacted": 0,
        "lookback_days": 60,
        "bytes": len(published),
    }

    after = ledger(seeded)
    for row in DUE:  # published, frozen, and still waiting for the rule to confirm them
        marked = after[row["conversion_key"]]
        assert (marked["state"], marked["delivered_by"], marked["delivered_at"]) == ("pending", None, None)
        assert publication(marked) == (WINDOW_END, WINDOW_END, 1)
        assert marked["sent_payload"] is None  # API request bytes only
        unchanged = ("caller_e164", "conversion_time", "conversion_value", "attempts", "run_id")
        assert {k: marked[k] for k in unchanged} == {k: before[row["conversion_key"]][k] for k in unchanged}
    for row in NOT_DUE + API_ROWS:  # other states, the API account: untouched
        assert after[row["conversion_key"]] == before[row["conversion_key"]]

    assert any("file published with 4 conversions (4 for the first time" in m for m in collected.messages)
    assert not any("posix-rename" in message for message in collected.messages)  # OpenSSH renamed atomically
    everything = "\n".join(collected.messages) + "".join(capfd.readouterr())  # Airflow's and paramiko's output too
    assert not any(caller(n) in everything or caller(n)[1:] in everything for n in range(1, 11))


def test_republishing_the_same_window_gives_the_same_bytes_and_the_same_tables(seeded, sftp, remote_dir):
    account = make_account()
    publish_day_file(seeded, account, DAY, sftp_publisher(CONN_ID, remote_dir), WINDOW_END, "run-1")
    first_bytes = read_remote(sftp, f"{remote_dir}/{FILE_NAME}")
    first_ledger = ledger(seeded)

    counts = publish_day_file(seeded, account, DAY, sftp_publisher(CONN_ID, remote_dir), WINDOW_END, "run-1-again")

    assert read_remote(sftp, f"{remote_dir}/{FILE_NAME}") == first_bytes == expected_file(DUE)
    assert ledger(seeded) == first_ledger
    assert (counts["conversions"], counts["newly_published"], counts["already_published"]) == (4, 0, 4)
    assert list_remote(sftp, remote_dir) == [FILE_NAME]


def test_a_later_publication_carries_the_earlier_rows_again_with_a_late_one(seeded, sftp, remote_dir):
    account = make_account()
    publish_day_file(seeded, account, DAY, sftp_publisher(CONN_ID, remote_dir), WINDOW_END, "run-1")
    late = ledger_row(9, business_date=DAY + timedelta(days=1), conversion_time=CALL_BASE + timedelta(hours=30))
    seed(seeded, [late])
    next_end = WINDOW_END + timedelta(days=1)

    counts = publish_day_file(seeded, account, DAY, sftp_publisher(CONN_ID, remote_dir), next_end, "run-2")

    # Nothing has left the lookback, so nothing is confirmed: the file still holds every row.
    assert read_remote(sftp, f"{remote_dir}/{FILE_NAME}") == expected_file([*DUE, late])
    assert (counts["conversions"], counts["newly_published"], counts["already_published"]) == (5, 1, 4)
    assert counts["newly_delivered"] == 0
    after = ledger(seeded)
    assert publication(after[late["conversion_key"]]) == (next_end, next_end, 1)
    assert {publication(after[row["conversion_key"]]) for row in DUE} == {(WINDOW_END, next_end, 2)}
    assert {after[row["conversion_key"]]["state"] for row in [*DUE, late]} == {"pending"}


def test_rows_leave_the_file_only_when_their_call_leaves_the_lookback(seeded, tmp_path):
    """lookback_days=2: the DUE calls (1 March, 07:00-09:30 UTC) leave it with the publication of 3 March."""
    account, publisher = make_account(), LocalFolderPublisher(tmp_path)
    publish_day_file(seeded, account, DAY, publisher, WINDOW_END, "run-1", lookback_days=2)
    # Queued after that: a call already 3 days old (never published), and one that starts at
    # 1 March 23:00 UTC, exactly on the cutoff of the 3 March publication.
    old = ledger_row(11, call_start=WINDOW_END - timedelta(days=3), conversion_time=WINDOW_END - timedelta(hours=1))
    edge = ledger_row(12, call_start=WINDOW_END, conversion_time=WINDOW_END + timedelta(hours=2))
    seed(seeded, [old, edge])

    second_end = WINDOW_END + timedelta(days=1)
    second = publish_day_file(seeded, account, DAY + timedelta(days=1), publisher, second_end, "run-2", lookback_days=2)
    assert (tmp_path / FILE_NAME).read_bytes() == expected_file([*DUE, edge])
    assert (second["newly_delivered"], second["outside_lookback"]) == (0, 1)
    after = ledger(seeded)
    assert (after[old["conversion_key"]]["state"], after[old["conversion_key"]]["error_code"]) == (
        "failed",
        "OUTSIDE_LOOKBACK",
    )
    assert publication(after[old["conversion_key"]]) == (None, None, 0)  # never in a file

    third_end = WINDOW_END + timedelta(days=2)
    third = publish_day_file(seeded, account, DAY + timedelta(days=2), publisher, third_end, "run-3", lookback_days=2)
    assert (tmp_path / FILE_NAME).read_bytes() == expected_file([edge])
    assert (third["conversions"], third["newly_delivered"], third["outside_lookback"]) == (1, 4, 0)
    after = ledger(seeded)
    for row in DUE:  # in the files of 1 and 2 March; the 3 March one no longer needs them
        confirmed = after[row["conversion_key"]]
        assert (confirmed["state"], confirmed["delivered_by"], confirmed["delivered_at"]) == (
            "delivered",
            "file",
            third_end,
        )
        assert publication(confirmed) == (WINDOW_END, second_end, 2)
    assert after[edge["conversion_key"]]["state"] == "pending"
    assert publication(after[edge["conversion_key"]]) == (second_end, third_end, 2)

    # A rerun of the last publication changes nothing; one of the first day confirms nothing
    # more, still carries what is unconfirmed, and counts no send for a window already passed.
    settled = ledger(seeded)
    again = publish_day_file(seeded, account, DAY + timedelta(days=2), publisher, third_end, "rerun-3", lookback_days=2)
    assert ledger(seeded) == settled
    assert (tmp_path / FILE_NAME).read_bytes() == expected_file([edge])
    assert (again["newly_delivered"], again["already_published"]) == (0, 1)
    publish_day_file(seeded, account, DAY, publisher, WINDOW_END, "rerun-1", lookback_days=2)
    assert ledger(seeded) == settled
    assert (tmp_path / FILE_NAME).read_bytes() == expected_file([edge])


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


def test_a_wrong_remote_folder_fails_clearly_and_records_no_publication(seeded, sftp, remote_dir):
    before = ledger(seeded)
    missing = f"{remote_dir}/no/such/folder"

    with pytest.raises(FileDeliveryError, match="does the remote folder .*no/such/folder.* exist"):
        publish_day_file(seeded, make_account(), DAY, sftp_publisher(CONN_ID, missing), WINDOW_END, "run-1")

    assert_frozen_but_not_published(before, ledger(seeded), WINDOW_END)
    assert list_remote(sftp, remote_dir) == []

    # The retry, a day later, carries the frozen rows; they keep the sent_at of their freeze.
    later = WINDOW_END + timedelta(days=1)
    counts = publish_day_file(seeded, make_account(), DAY, sftp_publisher(CONN_ID, remote_dir), later, "run-2")
    assert read_remote(sftp, f"{remote_dir}/{FILE_NAME}") == expected_file(DUE)
    assert counts["newly_published"] == 4  # first time in a file that was really published
    assert {publication(ledger(seeded)[row["conversion_key"]]) for row in DUE} == {(WINDOW_END, later, 1)}


def test_a_stopped_server_fails_clearly_and_records_no_publication(seeded, tmp_path):
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

    assert_frozen_but_not_published(before, ledger(seeded), WINDOW_END)
    assert sorted(p.name for p in server.remote_root.iterdir()) == []


def test_a_failed_rename_removes_the_temporary_file_and_records_no_publication(seeded, sftp, remote_dir):
    before = ledger(seeded)
    (sftp.remote_root / os.path.basename(remote_dir) / FILE_NAME).mkdir()  # the target name is taken by a folder

    with pytest.raises(FileDeliveryError, match=f"could not publish {FILE_NAME} over SFTP"):
        publish_day_file(seeded, make_account(), DAY, sftp_publisher(CONN_ID, remote_dir), WINDOW_END, "run-1")

    assert_frozen_but_not_published(before, ledger(seeded), WINDOW_END)
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
    assert counts["newly_published"] == 4


def test_nothing_unconfirmed_still_replaces_the_old_file_with_the_header_only(warehouse, sftp, remote_dir):
    (sftp.remote_root / os.path.basename(remote_dir) / FILE_NAME).write_bytes(b"yesterday's file\r\n")
    seed(warehouse, NOT_DUE)

    counts = publish_day_file(warehouse, make_account(), DAY, sftp_publisher(CONN_ID, remote_dir), WINDOW_END, "r")

    assert read_remote(sftp, f"{remote_dir}/{FILE_NAME}") == render(make_account(), [])
    assert (counts["conversions"], counts["newly_published"], counts["newly_delivered"]) == (0, 0, 0)


def test_the_local_folder_publisher_replaces_the_file_atomically(seeded, tmp_path):
    (tmp_path / FILE_NAME).write_bytes(b"old")

    publish_day_file(seeded, make_account(), DAY, LocalFolderPublisher(tmp_path), WINDOW_END, "run-1")

    assert (tmp_path / FILE_NAME).read_bytes() == expected_file(DUE)
    assert [p.name for p in tmp_path.iterdir()] == [FILE_NAME]
    assert {ledger(seeded)[row["conversion_key"]]["last_published_at"] for row in DUE} == {WINDOW_END}


def test_a_row_rematched_before_it_is_frozen_is_left_out_until_the_next_publication(seeded, tmp_path, monkeypatch):
    from callconv.delivery import file_delivery

    changed_key = DUE[0]["conversion_key"]
    freeze = file_delivery._freeze

    def rematch_first(engine, rows, window_end):
        # A concurrent match run commits a new value after the ledger was read, before the freeze.
        with engine.begin() as connection:
            connection.execute(
                upload_ledger.update()
                .where(upload_ledger.c.conversion_key == changed_key, upload_ledger.c.sent_at.is_(None))
                .values(conversion_value=Decimal("2000"))
            )
        return freeze(engine, rows, window_end)

    monkeypatch.setattr(file_delivery, "_freeze", rematch_first)
    counts = publish_day_file(seeded, make_account(), DAY, LocalFolderPublisher(tmp_path), WINDOW_END, "run-1")

    assert (counts["conversions"], counts["newly_published"], counts["changed_meanwhile"]) == (3, 3, 1)
    assert (tmp_path / FILE_NAME).read_bytes() == expected_file(DUE[1:])
    after = ledger(seeded)
    assert (after[changed_key]["state"], publication(after[changed_key])) == ("pending", (None, None, 0))

    monkeypatch.setattr(file_delivery, "_freeze", freeze)
    counts = publish_day_file(seeded, make_account(), DAY, LocalFolderPublisher(tmp_path), WINDOW_END, "run-1b")
    assert (counts["newly_published"], counts["changed_meanwhile"]) == (1, 0)
    assert (tmp_path / FILE_NAME).read_bytes() == expected_file(
        [{**DUE[0], "conversion_value": Decimal("2000")}, *DUE[1:]]
    )


def test_every_row_is_frozen_before_the_file_is_written(seeded, tmp_path):
    seen: dict[str, tuple] = {}

    class Watching(LocalFolderPublisher):
        def publish(self, name: str, payload: bytes) -> None:
            seen.update({key: publication(row) for key, row in ledger(seeded).items()})
            super().publish(name, payload)

    publish_day_file(seeded, make_account(), DAY, Watching(tmp_path), WINDOW_END, "run-1")

    # Committed before the payload left: a rematch can no longer change what Google may fetch.
    assert {seen[row["conversion_key"]] for row in DUE} == {(WINDOW_END, None, 0)}


def test_one_publication_per_account_at_a_time(seeded, tmp_path):
    def lock_taken(account_id: str) -> bool:
        with seeded.connect() as connection, connection.begin():
            name = f"file_delivery|{account_id}"
            free = connection.scalar(sa.select(sa.func.pg_try_advisory_xact_lock(sa.func.hashtextextended(name, 0))))
            return not free

    held: dict[str, bool] = {}

    class Probing(LocalFolderPublisher):
        def publish(self, name: str, payload: bytes) -> None:
            held.update(own=lock_taken(FILE_ACCOUNT), other=lock_taken("another_account"))
            super().publish(name, payload)

    publish_day_file(seeded, make_account(), DAY, Probing(tmp_path), WINDOW_END, "run-1")

    assert held == {"own": True, "other": False}
    assert not lock_taken(FILE_ACCOUNT)  # released with the publication
