"""A real PostgreSQL server for the test session: initdb into a temporary folder, listening
on a unix socket in that folder only (no TCP port), stopped and removed at the end.

PostgreSQL refuses to run as root, so as root (CI, containers) the server runs as the
unprivileged user ``nobody``, which owns the folder. Durability is off (fsync and friends):
the data lives as long as the session.

Example::

    with PostgresServer.start() as server:
        url = server.create_database("t1")     # postgresql://postgres@/t1?host=/tmp/ragdec-pg-x1y2
        ...
        server.drop_database("t1")
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

SUPERUSER = "postgres"
# a role that must give its password (the other roles are trusted on the socket), for the
# tests of a wrong password
PASSWORD_USER = "ragdec_password"
PASSWORD = "right-password"
SERVER_SETTINGS = {
    "listen_addresses": "''",  # the unix socket only: nothing else on the machine can reach it
    "fsync": "off",  # the data dies with the session: durability buys nothing here
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "16MB",
    "max_connections": "60",  # the tests' processes, each database's connections, and room
}
HBA = f"local all {PASSWORD_USER} scram-sha-256\nlocal all all trust\n"


class MissingBinaries(RuntimeError):
    """initdb or pg_ctl is not installed."""


def find_binaries() -> Path:
    """The folder of initdb and pg_ctl: on PATH, else Debian's versioned folder."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    raise MissingBinaries("PostgreSQL's server binaries (initdb, pg_ctl) are not installed: run `make postgres`")


class PostgresServer:
    """One running server; ``url(database)`` reaches it as the superuser over its socket."""

    def __init__(self, folder: Path, binaries: Path, run_as: str | None):
        self.folder = folder  # data in folder/data, the socket in folder itself
        self.binaries = binaries
        self.run_as = run_as  # the OS user the server runs as; None: this one

    @classmethod
    def start(cls, binaries: Path | None = None) -> "PostgresServer":
        """A server from the ``binaries`` folder (initdb, pg_ctl; default: ``find_binaries``)."""
        binaries = binaries or find_binaries()
        run_as = "nobody" if os.geteuid() == 0 else None
        folder = Path(tempfile.mkdtemp(prefix="ragdec-pg-"))  # short: a socket path has 107 bytes at most
        if run_as:
            shutil.chown(folder, run_as)
        server = cls(folder, binaries, run_as)
        try:
            server._pg("initdb", "-D", str(folder / "data"), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync")
            (folder / "data" / "pg_hba.conf").write_text(HBA)
            options = " ".join(f"-c {key}={value}" for key, value in {**SERVER_SETTINGS, "unix_socket_directories": str(folder)}.items())
            server._pg("pg_ctl", "-D", str(folder / "data"), "-o", options, "-l", str(folder / "server.log"), "-w", "-t", "60", "start")
            server.sql(f"CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD '{PASSWORD}'")
        except BaseException:
            server.stop()
            raise
        return server

    def _pg(self, program: str, *args: str) -> None:
        user = pwd.getpwnam(self.run_as) if self.run_as else None
        as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
        done = subprocess.run([str(self.binaries / program), *args], capture_output=True, text=True, cwd=self.folder, **as_user)
        if done.returncode != 0:
            log = self.folder / "server.log"
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stderr.strip()}"
                               + (f"\nserver log:\n{log.read_text()[-2000:]}" if log.exists() else ""))

    def url(self, database: str = "postgres", user: str = SUPERUSER, password: str | None = None) -> str:
        secret = f":{password}" if password is not None else ""
        return f"postgresql://{user}{secret}@/{database}?host={self.folder}"

    def sql(self, statement: str) -> None:
        """Run one statement as the superuser, outside a transaction (CREATE DATABASE needs that)."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(statement)

    def create_database(self, name: str, owner: str = SUPERUSER) -> str:
        """A new empty database (a copy of template0's few MB, tens of milliseconds); its URL,
        as ``owner`` (with its password, for ``PASSWORD_USER``)."""
        self.sql(f'CREATE DATABASE "{name}" OWNER {owner} TEMPLATE template0')
        return self.url(name, owner, PASSWORD if owner == PASSWORD_USER else None)

    def drop_database(self, name: str) -> None:
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # FORCE: a test that left a connection open

    def stop(self) -> None:
        pid_file = self.folder / "data" / "postmaster.pid"
        if pid_file.exists():
            try:
                self._pg("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")
            except RuntimeError:  # pg_ctl could not stop it: no server may outlive the session
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
