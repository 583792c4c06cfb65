"""Start and stop a throwaway PostgreSQL cluster with ``wal_level=logical``.

Used by the demo, ``bench/`` and the test fixtures: never by the agent against a real ERP.
It runs the installed server binaries (``/usr/lib/postgresql/*/bin`` or ``pg_config
--bindir``). PostgreSQL refuses to run as root, so as root the cluster is initialised and
run as the ``postgres`` system user, in a folder that user owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SERVER_OPTIONS = (
    "-c wal_level=logical -c max_replication_slots=64 -c max_wal_senders=10 "
    "-c listen_addresses=127.0.0.1 -c max_connections=100"
)


class LocalPgError(RuntimeError):
    """The throwaway cluster could not be started."""


def find_bindir() -> Path:
    """Return the folder of the newest installed PostgreSQL server binaries."""
    env = os.environ.get("SYNCAGENT_PG_BINDIR")
    candidates = [env] if env else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(out.stdout.strip())
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    raise LocalPgError(
        "no PostgreSQL server binaries found (initdb, pg_ctl): install the distribution's "
        "postgresql package, or set SYNCAGENT_PG_BINDIR"
    )


def _version_key(path: str) -> float:
    try:
        return float(Path(path).parent.name)
    except ValueError:
        return 0.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalCluster:
    """A running throwaway cluster: its folder, port and how to reach it."""

    root: Path
    port: int
    bindir: Path
    user: str = "postgres"

    @property
    def socket_dir(self) -> Path:
        """Folder holding the server's unix socket."""
        return self.root / "sock"

    def dsn(self, dbname: str = "postgres") -> str:
        """Return a libpq connection string for ``dbname`` over loopback TCP."""
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={dbname}"

    def createdb(self, name: str) -> None:
        """Create database ``name`` (no error if it exists)."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def restart(self) -> None:
        """Restart the server in place (same folder, same port)."""
        _run_as(
            self._owner(),
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.root / "data"),
                "-m",
                "fast",
                "-w",
                "-l",
                str(self.root / "server.log"),
                "restart",
                "-o",
                self._options(),
            ],
        )

    def stop(self) -> None:
        """Stop the server and remove its folder."""
        if (self.root / "data" / "postmaster.pid").exists():
            _run_as(
                self._owner(),
                [str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop"],
                check=False,
            )
        shutil.rmtree(self.root, ignore_errors=True)

    def _options(self) -> str:
        return f"{SERVER_OPTIONS} -c fsync=off -p {self.port} -c unix_socket_directories={self.socket_dir}"

    def _owner(self) -> str | None:
        return "postgres" if os.geteuid() == 0 else None

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _run_as(user: str | None, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    if "restart" in argv or "start" in argv:
        # The server outlives pg_ctl and would hold captured pipes open forever: it logs to
        # server.log (pg_ctl -l) and gets no pipes of ours.
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
        )
        if check and done.returncode != 0:
            raise LocalPgError(f"{' '.join(argv[:6])}... failed (exit {done.returncode}); see server.log")
        return done
    out = subprocess.run(argv, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise LocalPgError(f"{' '.join(argv[:6])}... failed: {out.stderr.strip() or out.stdout.strip()}")
    return out


def start_cluster(root: Path | None = None, port: int | None = None) -> LocalCluster:
    """Initialise and start a new cluster; the caller stops it (or uses ``with``)."""
    bindir = find_bindir()
    root = Path(root or tempfile.mkdtemp(prefix="syncagent-pg-"))
    root.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(root=root, port=port or free_port(), bindir=bindir)
    owner = cluster._owner()
    cluster.socket_dir.mkdir(exist_ok=True)
    if owner:
        pw = pwd.getpwnam(owner)
        for p in (root, cluster.socket_dir):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        # The server user must be able to reach the folder through its parents.
        parent = root.parent
        if not os.access(parent, os.X_OK):
            raise LocalPgError(f"{parent} is not searchable by the postgres user")
    _run_as(
        owner,
        [
            str(bindir / "initdb"),
            "-D",
            str(root / "data"),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-instructions",
        ],
    )
    _run_as(
        owner,
        [
            str(bindir / "pg_ctl"),
            "-D",
            str(root / "data"),
            "-l",
            str(root / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            cluster._options(),
            "start",
        ],
    )
    _wait_ready(cluster)
    return cluster


def _wait_ready(cluster: LocalCluster, timeout: float = 30.0) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(cluster.dsn(), connect_timeout=2):
                return
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                raise LocalPgError(f"server on port {cluster.port} did not become ready: {exc}") from exc
            time.sleep(0.1)
