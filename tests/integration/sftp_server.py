"""A real OpenSSH SFTP server on loopback, for tests.

:func:`sftp_server` starts ``/usr/sbin/sshd -D`` with a configuration, host key
and client key of its own under a temporary folder, listening on 127.0.0.1 at
a free port, and stops it on exit. It serves SFTP with ``internal-sftp`` to the
current user (root in CI) by public key only. When sshd is missing it installs
Debian's ``openssh-server`` with apt-get (running ``apt-get update`` first if
the install fails). Anything that goes wrong raises :class:`SftpServerError`
with a message saying what, so a test can fail (never skip) on it.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")
SSH_KEYGEN = "ssh-keygen"
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without it
APT_TIMEOUT_SECONDS = 600


class SftpServerError(RuntimeError):
    """The test SFTP server could not be installed, configured or started."""


@dataclass(frozen=True)
class SftpServer:
    host: str
    port: int
    user: str
    client_key: Path  # private key the server accepts
    remote_root: Path  # an empty folder on the server, for the test's files
    log_file: Path
    process: subprocess.Popen

    def airflow_connection_json(self) -> str:
        """The value of an ``AIRFLOW_CONN_<ID>`` variable for an SFTP connection to this server."""
        return json.dumps(
            {
                "conn_type": "sftp",
                "host": self.host,
                "port": self.port,
                "login": self.user,
                "extra": {"key_file": str(self.client_key), "no_host_key_check": "true", "look_for_keys": "false"},
            }
        )

    @contextmanager
    def sftp_client(self):
        """A plain paramiko SFTP client on this server (no Airflow in between)."""
        import paramiko

        transport = paramiko.Transport((self.host, self.port))
        try:
            transport.connect(username=self.user, pkey=paramiko.Ed25519Key.from_private_key_file(str(self.client_key)))
            client = paramiko.SFTPClient.from_transport(transport)
            try:
                yield client
            finally:
                client.close()
        finally:
            transport.close()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no sshd log)"


def _run(command: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def ensure_sshd() -> Path:
    """Make sure /usr/sbin/sshd exists, installing Debian's openssh-server if it does not."""
    if SSHD.exists():
        return SSHD
    if shutil.which("apt-get") is None:
        raise SftpServerError(f"{SSHD} is missing and apt-get is not available to install openssh-server")
    if os.geteuid() != 0:
        raise SftpServerError(f"{SSHD} is missing; installing openssh-server with apt-get needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Wait for the dpkg lock rather than fail when another install is running.
    lock_wait = ["-o", f"DPkg::Lock::Timeout={APT_TIMEOUT_SECONDS // 2}"]
    install = ["apt-get", *lock_wait, "install", "-y", "--no-install-recommends", "openssh-server"]
    try:
        result = _run(install, APT_TIMEOUT_SECONDS, env)
        if result.returncode != 0:
            update = _run(["apt-get", *lock_wait, "update"], APT_TIMEOUT_SECONDS, env)
            if update.returncode != 0:
                raise SftpServerError(
                    f"{SSHD} is missing, 'apt-get install openssh-server' failed and 'apt-get update' failed "
                    f"too (exit {update.returncode}):\n{_tail(update.stderr or update.stdout)}"
                )
            result = _run(install, APT_TIMEOUT_SECONDS, env)
    except subprocess.TimeoutExpired as error:
        raise SftpServerError(f"{SSHD} is missing and installing openssh-server timed out: {error}") from None
    if result.returncode != 0 or not SSHD.exists():
        raise SftpServerError(
            f"{SSHD} is missing and 'apt-get install -y openssh-server' failed (exit {result.returncode}):\n"
            f"{_tail(result.stderr or result.stdout)}"
        )
    return SSHD


def _keygen(path: Path) -> None:
    if shutil.which(SSH_KEYGEN) is None:
        raise SftpServerError("ssh-keygen is not installed (it comes with openssh-client)")
    result = _run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "callconv-test", "-f", str(path)], 30)
    if result.returncode != 0:
        raise SftpServerError(f"ssh-keygen failed for {path}: {_tail(result.stderr)}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_banner(server: SftpServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise SftpServerError(
                f"sshd exited with code {server.process.returncode} right after starting; its log "
                f"({server.log_file}):\n{server.log_tail()}"
            )
        try:
            with socket.create_connection((server.host, server.port), timeout=1) as connection:
                if connection.recv(64).startswith(b"SSH-2.0"):
                    return
                last_error = "no SSH banner"
        except OSError as error:
            last_error = str(error)
        time.sleep(0.05)
    raise SftpServerError(
        f"sshd did not answer on {server.host}:{server.port} within {timeout:.0f} s ({last_error}); "
        f"its log:\n{server.log_tail()}"
    )


def stop(server: SftpServer) -> None:
    """Stop the listening sshd; sessions it forked end when their clients disconnect."""
    process = server.process
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@contextmanager
def sftp_server(workdir: Path, *, start_timeout: float = 10.0) -> Iterator[SftpServer]:
    """Run a loopback sshd serving SFTP under ``workdir``; stop it on exit."""
    sshd = ensure_sshd()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if not PRIVSEP_DIR.is_dir():
        try:
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True)
        except OSError as error:
            raise SftpServerError(f"sshd needs the privilege separation folder {PRIVSEP_DIR}: {error}") from None

    host_key = workdir / "ssh_host_ed25519_key"
    client_key = workdir / "client_ed25519_key"
    authorized_keys = workdir / "authorized_keys"
    remote_root = workdir / "remote"
    log_file = workdir / "sshd.log"
    config = workdir / "sshd_config"
    for key in (host_key, client_key):
        _keygen(key)
    authorized_keys.write_text(client_key.with_suffix(".pub").read_text())
    remote_root.mkdir(exist_ok=True)

    user = pwd.getpwuid(os.getuid()).pw_name
    port = free_port()
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key}",
                f"PidFile {workdir / 'sshd.pid'}",
                f"AuthorizedKeysFile {authorized_keys}",
                "StrictModes no",
                "UsePAM no",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                f"AllowUsers {user}",
                "Subsystem sftp internal-sftp",
                "LogLevel VERBOSE",
                "",
            ]
        )
    )
    check = _run([str(sshd), "-t", "-f", str(config)], 30)
    if check.returncode != 0:
        raise SftpServerError(f"sshd rejected its test configuration {config}: {_tail(check.stderr)}")

    process = subprocess.Popen(
        [str(sshd), "-D", "-f", str(config), "-p", str(port), "-E", str(log_file)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # keep terminal signals of the test run away from it
    )
    server = SftpServer(
        host="127.0.0.1",
        port=port,
        user=user,
        client_key=client_key,
        remote_root=remote_root,
        log_file=log_file,
        process=process,
    )
    try:
        _wait_for_banner(server, start_timeout)
        yield server
    finally:
        stop(server)
