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
def pg_dsn(pg_cluster: LocalCluster) -> str:
    """A fresh, empty database in the session cluster; its DSN."""
    name = f"t{os.getpid()}_{next(_db_counter)}"
    pg_cluster.createdb(name)
    return pg_cluster.dsn(name)
