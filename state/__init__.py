"""The state store: the only code that knows SQLite.

Open the file with ``open_state(path)``, then call the store modules with the ``State`` first:
``journal.append(st, changes)``, ``checkpoints.advance(st, owner, stream, cursor)``,
``outbox.claim_due(st, target, now=..., limit=...)``. Group calls that must commit together
in ``with st.write_txn():``; each function joins an open transaction or opens its own.
"""

from __future__ import annotations

from state import (
    audit,
    checkpoints,
    codec,
    exceptions,
    health,
    journal,
    migrations,
    outbox,
    shadow,
    workflows,
    xref,
)
from state.audit import AuditRecord
from state.checkpoints import Checkpoint, CheckpointMove
from state.db import State, classify_sqlite, open_state
from state.exceptions import ExceptionItem, ExceptionStats
from state.health import ConnectorHealth
from state.journal import JournalRow, JournalStats
from state.migrations import schema_version
from state.outbox import OutboxDepth, OutboxRow
from state.shadow import ShadowValue

__all__ = [
    "AuditRecord",
    "Checkpoint",
    "CheckpointMove",
    "ConnectorHealth",
    "ExceptionItem",
    "ExceptionStats",
    "JournalRow",
    "JournalStats",
    "OutboxDepth",
    "OutboxRow",
    "ShadowValue",
    "State",
    "audit",
    "checkpoints",
    "classify_sqlite",
    "codec",
    "exceptions",
    "health",
    "journal",
    "migrations",
    "open_state",
    "outbox",
    "schema_version",
    "shadow",
    "workflows",
    "xref",
]
