"""Schema of the state file: sqlite-utils ``Migrations("syncagent")``, one function per change.

The ``_sqlite_migrations`` rows of the ``syncagent`` set *are* the schema version: the
version is the number of applied migrations, and a file with a migration name this code
does not know was written by a newer syncagent. Migrations only ever append to ``_STEPS``;
an applied step is never edited. Tables are created with explicit DDL so constraints
(composite UNIQUE keys, CHECKs on status values) are visible in one place; nothing creates
or alters tables at runtime.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from agent.errors import PermanentError

if TYPE_CHECKING:
    from state.db import State

MIGRATION_SET = "syncagent"
# 'SYNC' in ASCII: marks the file as ours, so we never add tables to someone else's database.
APPLICATION_ID = 0x53594E43

# CHECKs spell allowed values as OR chains, not IN lists: SQLite builds an ephemeral table
# for an IN list on every row it checks, which made journal appends 40% slower.
# The journal has no index beyond its keys: each extra index cost ~15% of append throughput,
# and its time and pending queries are served by seq ranges instead (see state.journal).
_INITIAL_DDL = (
    """
    CREATE TABLE checkpoints (
        owner      TEXT NOT NULL,
        stream     TEXT NOT NULL,
        cursor     TEXT NOT NULL,
        generation INTEGER NOT NULL CHECK (generation >= 1),
        updated_at TEXT NOT NULL,
        reason     TEXT NOT NULL,
        actor      TEXT NOT NULL,
        PRIMARY KEY (owner, stream)
    )
    """,
    """
    CREATE TABLE checkpoint_history (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        owner      TEXT NOT NULL,
        stream     TEXT NOT NULL,
        previous   TEXT,
        cursor     TEXT NOT NULL,
        generation INTEGER NOT NULL,
        reason     TEXT NOT NULL,
        actor      TEXT NOT NULL,
        at         TEXT NOT NULL,
        FOREIGN KEY (owner, stream) REFERENCES checkpoints (owner, stream)
    )
    """,
    "CREATE INDEX checkpoint_history_stream ON checkpoint_history (owner, stream, id)",
    "CREATE INDEX checkpoint_history_at ON checkpoint_history (at)",
    # AUTOINCREMENT: a pruned sequence number must never be handed out again, because the
    # resolver's checkpoint and operators' rewinds refer to journal positions by seq.
    """
    CREATE TABLE journal (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        source      TEXT NOT NULL,
        stream      TEXT NOT NULL,
        object_name TEXT NOT NULL,
        op          TEXT NOT NULL
                    CHECK (op = 'insert' OR op = 'update' OR op = 'delete' OR op = 'read'
                           OR op = 'truncate'),
        key         TEXT NOT NULL,
        fields      TEXT NOT NULL,
        unchanged   TEXT NOT NULL,
        old_key     TEXT,
        position    TEXT NOT NULL,
        version     TEXT NOT NULL,
        source_ts   TEXT,
        origin      TEXT,
        trace_id    TEXT NOT NULL,
        captured_at TEXT NOT NULL,
        status      TEXT NOT NULL DEFAULT 'pending' CHECK (status = 'pending' OR status = 'resolved'),
        fate        TEXT CHECK (fate = 'queued' OR fate = 'applied' OR fate = 'echo'
                                OR fate = 'ignored' OR fate = 'conflict' OR fate = 'reverted'
                                OR fate = 'exception' OR fate = 'noop' OR fate = 'skipped'),
        fate_detail TEXT,
        UNIQUE (source, position)
    )
    """,
    """
    CREATE TABLE xref (
        entity       TEXT NOT NULL,
        canonical_id TEXT NOT NULL,
        system       TEXT NOT NULL,
        external_id  TEXT NOT NULL,
        linked_at    TEXT NOT NULL,
        PRIMARY KEY (entity, canonical_id, system),
        UNIQUE (entity, system, external_id)
    )
    """,
    """
    CREATE TABLE xref_natural (
        entity       TEXT NOT NULL,
        field        TEXT NOT NULL,
        value        TEXT NOT NULL,
        canonical_id TEXT NOT NULL,
        noted_at     TEXT NOT NULL,
        PRIMARY KEY (entity, field, value),
        UNIQUE (entity, field, canonical_id)
    )
    """,
    """
    CREATE TABLE shadow (
        entity           TEXT NOT NULL,
        canonical_id     TEXT NOT NULL,
        system           TEXT NOT NULL,
        field            TEXT NOT NULL,
        value            TEXT NOT NULL,
        written_by_agent INTEGER NOT NULL CHECK (written_by_agent = 0 OR written_by_agent = 1),
        source_ts        TEXT,
        updated_at       TEXT NOT NULL,
        PRIMARY KEY (entity, canonical_id, system, field)
    )
    """,
    """
    CREATE TABLE outbox (
        op_id           INTEGER PRIMARY KEY AUTOINCREMENT,
        idempotency_key TEXT NOT NULL UNIQUE,
        target          TEXT NOT NULL,
        entity          TEXT NOT NULL,
        canonical_id    TEXT NOT NULL,
        object_name     TEXT NOT NULL,
        action          TEXT NOT NULL CHECK (action = 'upsert' OR action = 'delete'),
        key             TEXT NOT NULL,
        fields          TEXT NOT NULL,
        canonical       TEXT NOT NULL,
        trace_id        TEXT NOT NULL,
        source_seq      INTEGER,
        status          TEXT NOT NULL DEFAULT 'pending'
                        CHECK (status = 'pending' OR status = 'applied' OR status = 'rejected'
                               OR status = 'cancelled'),
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TEXT NOT NULL,
        last_error      TEXT,
        created_at      TEXT NOT NULL,
        updated_at      TEXT NOT NULL,
        external_id     TEXT,
        version         TEXT
    )
    """,
    "CREATE INDEX outbox_due ON outbox (target, op_id) WHERE status = 'pending'",
    "CREATE INDEX outbox_record ON outbox (entity, canonical_id) WHERE status = 'pending'",
    "CREATE INDEX outbox_done ON outbox (updated_at) WHERE status IN ('applied', 'cancelled')",
    """
    CREATE TABLE exceptions (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at   TEXT NOT NULL,
        updated_at   TEXT NOT NULL,
        status       TEXT NOT NULL DEFAULT 'open'
                     CHECK (status = 'open' OR status = 'retrying' OR status = 'resolved'),
        kind         TEXT NOT NULL,
        reason       TEXT NOT NULL,
        detail       TEXT NOT NULL,
        trace_id     TEXT NOT NULL,
        source       TEXT,
        entity       TEXT,
        canonical_id TEXT,
        record       TEXT,
        field        TEXT,
        journal_seq  INTEGER,
        op_id        INTEGER,
        attempts     INTEGER NOT NULL DEFAULT 1,
        blocking_ref TEXT,
        resolved_by  TEXT,
        resolution   TEXT,
        resolved_at  TEXT
    )
    """,
    "CREATE INDEX exceptions_status ON exceptions (status, id)",
    """
    CREATE INDEX exceptions_dedup ON exceptions (kind, reason, journal_seq, op_id)
        WHERE status != 'resolved'
    """,
    "CREATE INDEX exceptions_blocking ON exceptions (blocking_ref) WHERE status != 'resolved'",
    """
    CREATE TABLE audit (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        at           TEXT NOT NULL,
        action       TEXT NOT NULL,
        actor        TEXT NOT NULL,
        trace_id     TEXT,
        entity       TEXT,
        canonical_id TEXT,
        detail       TEXT NOT NULL
    )
    """,
    "CREATE INDEX audit_action ON audit (action, id)",
    "CREATE INDEX audit_trace ON audit (trace_id) WHERE trace_id IS NOT NULL",
    """
    CREATE TABLE connector_health (
        connector            TEXT NOT NULL,
        stream               TEXT NOT NULL,
        state                TEXT NOT NULL
                             CHECK (state = 'ok' OR state = 'error' OR state = 'stopped'
                                    OR state = 'deferred'),
        last_success_at      TEXT,
        last_error           TEXT,
        last_error_at        TEXT,
        changes_total        INTEGER NOT NULL DEFAULT 0,
        lag_bytes            INTEGER,
        oldest_unconsumed_at TEXT,
        detail               TEXT,
        updated_at           TEXT NOT NULL,
        PRIMARY KEY (connector, stream)
    )
    """,
)


def m001_initial_tables(db: Database) -> None:
    """Create every table of the first schema, with the indexes its queries use."""
    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    for ddl in _INITIAL_DDL:
        db.execute(ddl)


# m002: workflows. The outbox is rebuilt (SQLite cannot alter a CHECK) to accept ``unit`` ops
# and to say which workflow instance an op belongs to; its AUTOINCREMENT counter is carried
# over, because exception items refer to op ids and a pruned id must never come back.
_OUTBOX_COLUMNS = (
    "op_id, idempotency_key, target, entity, canonical_id, object_name, action, key, fields,"
    " canonical, trace_id, source_seq, status, attempts, next_attempt_at, last_error, created_at,"
    " updated_at, external_id, version"
)
_WORKFLOW_DDL = (
    """
    CREATE TABLE outbox_m002 (
        op_id           INTEGER PRIMARY KEY AUTOINCREMENT,
        idempotency_key TEXT NOT NULL UNIQUE,
        target          TEXT NOT NULL,
        entity          TEXT NOT NULL,
        canonical_id    TEXT NOT NULL,
        object_name     TEXT NOT NULL,
        action          TEXT NOT NULL CHECK (action = 'upsert' OR action = 'delete' OR action = 'unit'),
        key             TEXT NOT NULL,
        fields          TEXT NOT NULL,
        canonical       TEXT NOT NULL,
        trace_id        TEXT NOT NULL,
        source_seq      INTEGER,
        status          TEXT NOT NULL DEFAULT 'pending'
                        CHECK (status = 'pending' OR status = 'applied' OR status = 'rejected'
                               OR status = 'cancelled'),
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TEXT NOT NULL,
        last_error      TEXT,
        created_at      TEXT NOT NULL,
        updated_at      TEXT NOT NULL,
        external_id     TEXT,
        version         TEXT,
        workflow        TEXT
    )
    """,
    f"INSERT INTO outbox_m002 ({_OUTBOX_COLUMNS}) SELECT {_OUTBOX_COLUMNS} FROM outbox",
    """
    INSERT INTO sqlite_sequence (name, seq)
    SELECT 'outbox_m002', seq FROM sqlite_sequence
    WHERE name = 'outbox' AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'outbox_m002')
    """,
    """
    UPDATE sqlite_sequence
    SET seq = max(seq, coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0))
    WHERE name = 'outbox_m002'
    """,
    "DROP TABLE outbox",
    "ALTER TABLE outbox_m002 RENAME TO outbox",
    "CREATE INDEX outbox_due ON outbox (target, op_id) WHERE status = 'pending'",
    "CREATE INDEX outbox_record ON outbox (entity, canonical_id) WHERE status = 'pending'",
    "CREATE INDEX outbox_done ON outbox (updated_at) WHERE status IN ('applied', 'cancelled')",
    "CREATE INDEX outbox_workflow ON outbox (workflow) WHERE status = 'pending' AND workflow IS NOT NULL",
    # One row per workflow instance; ``instance_key`` is derived from the trigger (the deal, the
    # change order, the journal entry), so a replay finds the instance instead of adding one.
    """
    CREATE TABLE workflow_instances (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        workflow      TEXT NOT NULL,
        instance_key  TEXT NOT NULL UNIQUE,
        entity        TEXT NOT NULL,
        canonical_id  TEXT NOT NULL,
        trigger_seq   INTEGER,
        trace_id      TEXT NOT NULL,
        status        TEXT NOT NULL
                      CHECK (status = 'running' OR status = 'completed' OR status = 'parked'
                             OR status = 'failed'),
        trigger       TEXT NOT NULL,
        trigger_ts    TEXT,
        steps         TEXT NOT NULL DEFAULT '[]',
        exception_ids TEXT NOT NULL DEFAULT '[]',
        detail        TEXT,
        started_at    TEXT NOT NULL,
        updated_at    TEXT NOT NULL,
        completed_at  TEXT
    )
    """,
    "CREATE INDEX workflow_instances_recent ON workflow_instances (workflow, id)",
    "CREATE INDEX workflow_instances_parked ON workflow_instances (trigger_seq) WHERE status = 'parked'",
    # Aggregates (a contract's posted invoices, a project's approved hours) look records up by
    # the value of one short field, typically a reference; long values are left out of the index.
    "CREATE INDEX shadow_by_value ON shadow (entity, system, field, value) WHERE length(value) <= 80",
)


def m002_workflows(db: Database) -> None:
    """Add workflow instances, ``unit`` ops and the outbox's workflow column, and the value index."""
    for ddl in _WORKFLOW_DDL:
        db.execute(ddl)


# m003: the compact journal row (see state.journal). The columns that queries filter or order
# on stay columns; stream, object_name, key, fields, unchanged, old_key, version, source_ts,
# origin and trace_id move into ``body``, one JSON array, built here from the stored JSON texts
# as they are (so no value is re-encoded). The AUTOINCREMENT counter is carried over: the
# resolver's checkpoint and rewinds refer to seqs, and a pruned seq must never come back.
_JOURNAL_M003_DDL = """
    CREATE TABLE journal_m003 (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        source      TEXT NOT NULL,
        position    TEXT NOT NULL,
        op          TEXT NOT NULL
                    CHECK (op = 'insert' OR op = 'update' OR op = 'delete' OR op = 'read'
                           OR op = 'truncate'),
        body        BLOB NOT NULL,
        captured_at TEXT NOT NULL,
        status      TEXT NOT NULL DEFAULT 'pending' CHECK (status = 'pending' OR status = 'resolved'),
        fate        TEXT CHECK (fate = 'queued' OR fate = 'applied' OR fate = 'echo'
                                OR fate = 'ignored' OR fate = 'conflict' OR fate = 'reverted'
                                OR fate = 'exception' OR fate = 'noop' OR fate = 'skipped'),
        fate_detail TEXT,
        UNIQUE (source, position)
    )
"""
_JOURNAL_M003_COPY = 10_000


def _json_text(value: str | None) -> str:
    """A TEXT column's value as a JSON string (or null), the way the journal encodes it."""
    return "null" if value is None else json.dumps(value, ensure_ascii=False)


def m003_compact_journal(db: Database) -> None:
    """Rebuild the journal with one JSON ``body`` per row instead of ten value columns."""
    conn = db.conn
    conn.execute(_JOURNAL_M003_DDL)
    rows = conn.execute(
        "SELECT seq, source, stream, object_name, op, key, fields, unchanged, old_key, position,"
        " version, source_ts, origin, trace_id, captured_at, status, fate, fate_detail"
        " FROM journal ORDER BY seq"
    )
    insert = (
        "INSERT INTO journal_m003 (seq, source, position, op, body, captured_at, status, fate,"
        " fate_detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    while batch := rows.fetchmany(_JOURNAL_M003_COPY):
        out = []
        for (seq, source, stream, object_name, op, key, fields, unchanged, old_key, position,
             version, source_ts, origin, trace_id, captured_at, status, fate, detail) in batch:  # fmt: skip
            body = ",".join((
                "[1", _json_text(stream), _json_text(object_name), key, fields,
                "null" if unchanged == "[]" else unchanged, old_key or "null", _json_text(version),
                _json_text(source_ts), _json_text(origin), _json_text(trace_id),
            )) + "]"  # fmt: skip
            out.append((seq, source, position, op, body.encode(), captured_at, status, fate, detail))
        conn.executemany(insert, out)
    conn.execute(
        "INSERT INTO sqlite_sequence (name, seq) SELECT 'journal_m003', seq FROM sqlite_sequence"
        " WHERE name = 'journal' AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'journal_m003')"
    )
    conn.execute(
        "UPDATE sqlite_sequence SET seq = max(seq, coalesce((SELECT seq FROM sqlite_sequence"
        " WHERE name = 'journal'), 0)) WHERE name = 'journal_m003'"
    )
    conn.execute("DROP TABLE journal")
    conn.execute("ALTER TABLE journal_m003 RENAME TO journal")


def m004_outbox_resend_check(db: Database) -> None:
    """Add what a resend is checked with: ``outbox.in_doubt`` and ``outbox.base``.

    ``in_doubt``: 0 settled, 1 sent and unanswered so far, 2 an earlier attempt may have
    landed, 3 applied while an earlier attempt may still land late (see ``state.outbox``).
    ``base``: the target's values the op was built to replace. Ops queued before start
    settled, with no base: the agent that wrote them kept neither.
    """
    db.execute(
        "ALTER TABLE outbox ADD COLUMN in_doubt INTEGER NOT NULL DEFAULT 0 CHECK (in_doubt IN (0, 1, 2, 3))"
    )
    db.execute("ALTER TABLE outbox ADD COLUMN base TEXT NOT NULL DEFAULT '{}'")
    # The resolver asks for these per captured change: without the index that is a scan of
    # every applied op.
    db.execute("CREATE INDEX outbox_late ON outbox (entity, canonical_id, target) WHERE in_doubt = 3")


def m005_raw_journal_rows(db: Database) -> None:
    """Let the journal keep row changes as their source sent them, decoded when read.

    ``journal.raw``: the row message (a PostgreSQL pgoutput Insert/Update/Delete), with a
    body of format 2 naming its shape; NULL for every other row. ``journal_shapes``: each
    table version's shape, once, by content digest (see ``state.journal``).
    """
    db.execute("ALTER TABLE journal ADD COLUMN raw BLOB")
    db.execute(
        """
        CREATE TABLE journal_shapes (
            id          TEXT PRIMARY KEY,
            source      TEXT NOT NULL,
            format      TEXT NOT NULL,
            definition  TEXT NOT NULL
        )
        """
    )


_STEPS = (
    m001_initial_tables,
    m002_workflows,
    m003_compact_journal,
    m004_outbox_resend_check,
    m005_raw_journal_rows,
)


def migration_set() -> Migrations:
    """Build the ``syncagent`` migration set (a fresh object each call: no module state)."""
    steps = Migrations(MIGRATION_SET)
    for fn in _STEPS:
        steps(name=fn.__name__)(fn)
    return steps


def _applied_names(st: State) -> list[str]:
    return [m.name for m in migration_set().applied(st.db)]


def _check_ownership(st: State) -> None:
    """Refuse a SQLite file that belongs to some other application."""
    app_id = st.conn.execute("PRAGMA application_id").fetchone()[0]
    if app_id == APPLICATION_ID:
        return
    tables = [
        r[0]
        for r in st.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    ]
    if app_id != 0 or tables:
        raise PermanentError(
            f"{st.path} is a SQLite database but not a syncagent state file; "
            "point the state path at a new file or an existing syncagent state file"
        )


def _check_not_newer(st: State) -> None:
    known = {fn.__name__ for fn in _STEPS}
    unknown = [name for name in _applied_names(st) if name not in known]
    if unknown:
        raise PermanentError(
            f"state file {st.path} has schema migrations this syncagent does not know "
            f"({', '.join(unknown)}): it was written by a newer version; upgrade syncagent "
            "or restore a state file from this version"
        )


def apply(st: State) -> list[str]:
    """Apply pending migrations (call inside ``write_txn``); return the names applied."""
    _check_ownership(st)
    _check_not_newer(st)
    steps = migration_set()
    pending = [m.name for m in steps.pending(st.db)]
    if pending:
        steps.apply(st.db)
    return pending


def check_current(st: State) -> None:
    """Verify, without writing, that the file is a syncagent state file at this code's schema."""
    _check_ownership(st)
    _check_not_newer(st)
    pending = [m.name for m in migration_set().pending(st.db)]
    if pending:
        raise PermanentError(
            f"state file {st.path} is at an older schema (pending: {', '.join(pending)}); "
            "start the agent once (or run `syncagent init`) to migrate it"
        )


def schema_version(st: State) -> int:
    """Return the schema version: the number of applied ``syncagent`` migrations."""
    return len(_applied_names(st))
