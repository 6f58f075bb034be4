"""A private, throwaway PostgreSQL cluster for the event store tests.

Built from the Debian server binaries (/usr/lib/postgresql/<version>/bin): ``initdb`` into
a temp directory under /var/tmp, ``postgres`` listening on 127.0.0.1 at a free port with
its unix socket in that directory, trust authentication for local and loopback
connections. A system cluster (pg_ctlcluster, /etc/postgresql) is never touched.

As root, the server runs as the ``postgres`` user (PostgreSQL refuses to run as root);
as any other user, as that user.

    with PgCluster() as pg:
        dsn = pg.create_database("events")     # postgresql://postgres@127.0.0.1:PORT/events
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from relay_milter.lab import free_port  # one port registry for every test server


def find_bindir() -> Path | None:
    """The newest installed server's bin directory, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]) if Path(p).parts[4].isdigit() else 0)
    return Path(found[-1]).parent if found else None


class PgCluster:
    """Start with ``start()`` (or ``with``), stop and delete with ``destroy()``."""

    def __init__(self, bindir: Path | None = None):
        bindir = bindir or find_bindir()
        if bindir is None:
            raise RuntimeError("no PostgreSQL server installed (/usr/lib/postgresql/*/bin/initdb): apt-get install postgresql")
        self.bindir = bindir
        self.base = Path(tempfile.mkdtemp(prefix="relay-pg-", dir="/var/tmp"))
        self.data = self.base / "data"
        self.sockets = self.base / "run"
        self.log = self.base / "postgres.log"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self._user: dict[str, Any] = {}
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
            self._user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        self.sockets.mkdir()
        if self._user:
            os.chown(self.sockets, self._user["user"], self._user["group"])

    @property
    def dsn(self) -> str:
        """The maintenance database (postgres) over loopback TCP."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        proc = subprocess.run(args, cwd=self.base, capture_output=True, text=True, **self._user)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")

    def start(self, timeout: float = 30) -> "PgCluster":
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
        )
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                    "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.sockets}",
                    # A test cluster: durability off buys speed, nothing else changes.
                    "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                    "-c", "max_connections=50", "-c", "shared_buffers=16MB",
                ],
                cwd=self.base, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **self._user,
            )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited ({self.proc.returncode}):\n{self.log.read_text(errors='replace')[-3000:]}")
            try:
                psycopg.connect(self.dsn, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres not ready after {timeout}s:\n{self.log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.1)

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its DSN."""
        return create_database(self.dsn, name)

    def stop(self, timeout: float = 20) -> None:
        """Fast shutdown (SIGINT: roll back sessions, then exit); SIGKILL if it hangs."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "PgCluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.destroy()


def create_database(dsn: str, name: str) -> str:
    """Create database ``name`` on the server ``dsn`` points at; return the new DSN."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))
