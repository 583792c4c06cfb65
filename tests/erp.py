"""Test helpers: the demo ERP schema in a fresh database, and configs pointing at it."""

from __future__ import annotations

from pathlib import Path

import psycopg

from agent.demo import erp_schema_sql


def load_erp(dsn: str) -> None:
    """Create the demo ERP schema (erp.*) in the database at ``dsn``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(erp_schema_sql())


def dsn_parts(dsn: str) -> dict[str, str]:
    """Split a ``key=value`` DSN into its parts."""
    return dict(part.split("=", 1) for part in dsn.split())


def erp_only_config(tmp_path: Path, dsn: str, *, slot: str | None = None, extra: str = "") -> Path:
    """A config that captures erp.customers and erp.contracts into a state file under tmp_path.

    Slots are cluster-wide, so each test database gets a slot named after it.
    """
    p = dsn_parts(dsn)
    slot = slot or p["dbname"]
    path = tmp_path / "config.toml"
    path.write_text(f"""
[agent]
state_path = "{tmp_path / 'state' / 'state.db'}"

[systems.erp]
type = "postgres"
host = "{p['host']}"
port = {p['port']}
dbname = "{p['dbname']}"
user = "{p['user']}"
slot = "{slot}"
publication = "{slot}"
origin = "{slot}"

[entities.customer.systems.erp]
object = "erp.customers"
key = "id"
updated_at = "updated_at"

[entities.customer.fields]
name = {{owner = "erp", erp = "name"}}
status = {{owner = "erp", erp = "status"}}

[entities.contract.systems.erp]
object = "erp.contracts"
key = "id"

[entities.contract.fields]
title = {{owner = "erp", erp = "title"}}
value = {{owner = "erp", type = "decimal", erp = "value"}}
{extra}
""")
    return path
