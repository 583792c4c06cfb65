"""Fixtures shared by the PostgreSQL integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from connectors.postgres import drop
from tests.integration.test_pg_source import SCHEMA, Erp


@pytest.fixture
def erp(pg_dsn: str) -> Iterator[Erp]:
    """A fresh database with the ERP test schema; the slot, publication and origin dropped after."""
    e = Erp(pg_dsn)
    e.sql(SCHEMA)
    yield e
    for src in e.sources:
        src.close()
    with e.conn() as conn:
        drop(conn, e.slot, e.publication, e.origin)
