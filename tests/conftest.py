"""Shared fixtures: a throwaway PostgreSQL cluster (wal_level=logical) and fresh databases."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.localpg import LocalCluster, LocalPgError, start_cluster

_db_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[LocalCluster]:
    """One throwaway cluster for the whole test session; with CI=true a failure fails the run.

    It lives outside pytest's temp folder, whose permissions pytest resets to 0700 (the
    server runs as the postgres user and must reach its folder).
    """
    root = Path(tempfile.mkdtemp(prefix="syncagent-test-pg-"))
    os.chmod(root, 0o755)
    try:
        cluster = start_cluster(root / "cluster")
    except LocalPgError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is required in CI: {exc}")
        pytest.skip(f"no PostgreSQL: {exc}")
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_dsn(pg_cluster: LocalCluster) -> Iterator[str]:
    """A fresh, empty database in the session cluster; its DSN.

    Slots and origins are cluster-wide and limited: the ones a test made in its database
    (and origins named after it) are given back afterwards.
    """
    name = f"t{os.getpid()}_{next(_db_counter)}"
    pg_cluster.createdb(name)
    yield pg_cluster.dsn(name)
    _release_replication(pg_cluster, name)


def _release_replication(cluster: LocalCluster, dbname: str) -> None:
    import psycopg

    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        for slot, active_pid in conn.execute(
            "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = %s", (dbname,)
        ).fetchall():
            if active_pid:
                conn.execute("SELECT pg_terminate_backend(%s)", (active_pid,))
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        for (origin,) in conn.execute(
            "SELECT roname FROM pg_replication_origin WHERE roname = %s", (dbname,)
        ).fetchall():
            try:
                conn.execute("SELECT pg_replication_origin_drop(%s)", (origin,))
            except psycopg.Error:
                pass  # still held by a lingering session: harmless, origins are cheap
