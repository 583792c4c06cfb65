"""Shared fixtures: a throwaway PostgreSQL cluster (wal_level=logical) and fresh databases."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from agent.localpg import LocalCluster, LocalPgError, start_cluster

_db_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One throwaway cluster for the whole test session; with CI=true a failure fails the run."""
    root = tmp_path_factory.mktemp("pg")
    os.chmod(root, 0o755)
    for parent in root.parents:
        if str(parent) in ("/", "/tmp"):
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o011)
    try:
        cluster = start_cluster(root / "cluster")
    except LocalPgError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is required in CI: {exc}")
        pytest.skip(f"no PostgreSQL: {exc}")
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_dsn(pg_cluster: LocalCluster) -> str:
    """A fresh, empty database in the session cluster; its DSN."""
    name = f"t{os.getpid()}_{next(_db_counter)}"
    pg_cluster.createdb(name)
    return pg_cluster.dsn(name)
