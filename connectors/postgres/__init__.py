"""PostgreSQL connector: logical decoding (pgoutput v1 over SQL) for capture, and its setup."""

from __future__ import annotations

from connectors.postgres.errors import classify_pg
from connectors.postgres.filters import check_row_filter
from connectors.postgres.slot import SlotLag, TableSpec, advance, drop, ensure, slot_lag
from connectors.postgres.source import PostgresSource

__all__ = [
    "PostgresSource",
    "SlotLag",
    "TableSpec",
    "advance",
    "check_row_filter",
    "classify_pg",
    "drop",
    "ensure",
    "slot_lag",
]
