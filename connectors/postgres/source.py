"""PostgreSQL capture: one pgoutput peek per poll, handed over chunk by chunk.

Row changes (Insert/Update/Delete of mapped tables) leave as ``RawChange``: the message as
the slot sent it, with its table version's shape, decoded only when the journal is read
(``connectors.postgres.rowformat``). Truncates are Changes. Begin, Commit, Origin, Relation
and Type messages are read here for positions, commit times, origins and shapes.

A poll opens one ``pg_logical_slot_peek_binary_changes`` call through a named cursor and
hands the pipeline one chunk per ``read``; the next ``read`` continues the same server
cursor (a new SQL call would re-decode everything from the slot's restart_lsn). The cursor
returned with a chunk is the end LSN of the last *complete* transaction, so the slot is
only ever advanced to a commit boundary, and only from ``commit``, after the journal has
the changes. A huge transaction therefore spans many chunks without being held in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

import psycopg

from agent.errors import CursorUnavailable
from agent.model import Batch, Change, ChangeOp, Cursor, Problem, RawChange, RowShape, new_trace_ids, utcnow
from connectors.postgres import slot as slots
from connectors.postgres.checks import check
from connectors.postgres.errors import classify_pg
from connectors.postgres.lookup import RowLookup
from connectors.postgres.pgoutput import (
    Begin,
    Commit,
    Decoder,
    Origin,
    Relation,
    Truncate,
    lsn_to_str,
    str_to_lsn,
)
from connectors.postgres.resync import CURSOR_VERSION, resync_batches
from connectors.postgres.rowformat import RowPlan, build_plan
from connectors.postgres.slot import SlotLag, TableSpec

logger = logging.getLogger(__name__)

STREAM = "wal"
_MAX_UNCONSUMED_MARKS = 10_000
_OPS: dict[int, ChangeOp] = {73: "insert", 85: "update", 68: "delete"}
_MISSING: Any = object()


class _Poll:
    """State of the open peek: decoder, transaction in progress, and the last whole one."""

    __slots__ = (
        "commit_ts", "decoder", "final_lsn", "index", "last_complete", "origin", "peek", "returned_lsn",
        "start_lsn", "version",
    )  # fmt: skip

    def __init__(self, peek: slots.PeekCursor, start_lsn: int) -> None:
        self.peek = peek
        self.decoder = Decoder()
        self.start_lsn = start_lsn
        self.last_complete = start_lsn
        self.returned_lsn = start_lsn
        self.version: str | None = None
        self.final_lsn = 0
        self.commit_ts: datetime | None = None
        self.origin: str | None = None
        self.index = 0


class PostgresSource:
    """Captures changes of the mapped tables from a logical slot (pgoutput v1) over SQL."""

    def __init__(
        self,
        name: str,
        connect: Callable[[], psycopg.Connection],
        *,
        slot: str,
        publication: str,
        origin: str,
        tables: Sequence[TableSpec],
        max_poll_bytes: int = 256 * 2**20,
        chunk_rows: int = 10_000,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.name = name
        self._connect = connect
        self.slot = slot
        self.publication = publication
        self.origin = origin
        self.tables = tuple(tables)
        self._by_name = {t.qualified_name: t for t in self.tables}
        self._max_poll_bytes = max_poll_bytes
        self._chunk_rows = chunk_rows
        self._clock = clock
        self._conn: psycopg.Connection | None = None
        self._poll: _Poll | None = None
        self._pending_advance: int | None = None
        self._plans: dict[int, tuple[Relation, RowPlan | None]] = {}
        self._keys: dict[str, tuple[str, ...]] = {}
        self._unconsumed: list[tuple[int, datetime]] = []
        self._lookup = RowLookup(connect, self.tables)

    # -- Source protocol -------------------------------------------------------------------

    def streams(self) -> Sequence[str]:
        """Return the one stream of this source: the slot's WAL."""
        return (STREAM,)

    def read(self, stream: str, cursor: Cursor | None, *, limit: int) -> Batch:
        """Return the next chunk of the current poll (opening a new peek when none is open)."""
        _check_stream(stream)
        cursor_lsn = _cursor_lsn(cursor)
        if self._poll is not None and cursor_lsn is not None and cursor_lsn != self._poll.returned_lsn:
            logger.info("event=pg_peek_restarted slot=%s reason=cursor_moved", self.slot)
            self._close_poll(advance=True)
        try:
            if self._poll is None:
                self._poll = self._open_poll(cursor_lsn)
            poll = self._poll
            size = max(1, min(limit, self._chunk_rows))
            rows = poll.peek.fetch(size)
            changes = self._decode(poll, rows)
            if changes and changes[0].source_ts is not None:
                # The oldest transaction this chunk delivered changes of (oldest_unconsumed_at).
                self._mark(str_to_lsn(changes[0].version), changes[0].source_ts)
            exhausted = len(rows) < size
            lsn = poll.last_complete
            capped = exhausted and poll.peek.capped
            if exhausted:
                # Every transaction committed before upto_lsn was in this peek, so the slot may
                # move there even when nothing was captured: idle mapped tables must not make
                # the ERP keep its WAL.
                lsn = max(lsn, poll.peek.upto_lsn)
                self._close_poll()
            else:
                if poll.version is not None and poll.commit_ts is not None:
                    self._mark(poll.final_lsn, poll.commit_ts)  # the transaction still open
                poll.returned_lsn = lsn
        except BaseException:
            self._discard()
            raise
        logger.debug(
            "event=pg_chunk_read slot=%s rows=%d changes=%d lsn=%s more=%s",
            self.slot, len(rows), len(changes), lsn_to_str(lsn), not exhausted,
        )  # fmt: skip
        # A capped poll says "more": the same cycle goes on with a new peek after the slot
        # moved, so a transaction larger than max_poll_mb is captured in one run, not stalled.
        return Batch(changes, _cursor(lsn), more=not exhausted or capped)

    def commit(self, stream: str, cursor: Cursor) -> None:
        """Advance the slot to the cursor's LSN (deferred while the peek is still open)."""
        _check_stream(stream)
        if "resync_table" in cursor.data:
            return  # a resync batch: the slot is not involved
        lsn = _cursor_lsn(cursor)
        if lsn is None:
            return
        self._unconsumed = [m for m in self._unconsumed if m[0] >= lsn]
        target = max(self._pending_advance or 0, lsn)
        if self._poll is not None:
            self._pending_advance = target
            return
        # One advance for everything committed during the poll: each one re-decodes the WAL
        # from the slot's restart_lsn on the server.
        self._pending_advance = None
        try:
            slots.advance(self._connection(), self.slot, target)
        except BaseException:
            self._discard()
            raise

    def check(self) -> list[Problem]:
        """Return what is wrong with the server, tables, privileges, publication and slot."""
        return check(
            self._connect,
            slot=self.slot,
            publication=self.publication,
            origin=self.origin,
            tables=self.tables,
        )

    # -- status ------------------------------------------------------------------------------

    def lag(self) -> SlotLag:
        """Return the slot's lag (own short-lived connection, safe from a status thread)."""
        with classify_pg(f"connect for slot {self.slot} lag"):
            conn = self._connect()
        with conn:
            return slots.slot_lag(conn, self.slot)

    def oldest_unconsumed_at(self) -> datetime | None:
        """Return the commit time of the oldest transaction seen but not yet committed, if any."""
        return min((ts for _, ts in self._unconsumed), default=None)

    def fetch(self, object_name: str, ids: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        """Return the current rows of table ``object_name`` with these keys (None: no such row)."""
        return self._lookup.fetch(object_name, ids)

    def fetch_by(
        self, object_name: str, field: str, values: Sequence[str]
    ) -> dict[str, dict[str, Any] | None]:
        """Return the current rows of table ``object_name`` whose column ``field`` holds each value."""
        return self._lookup.fetch_by(object_name, field, values)

    def close(self) -> None:
        """Close the peek (if open), the connection and the lookup session."""
        self._close_poll(advance=True)
        self._lookup.close()
        if self._conn is not None and not self._conn.closed:
            self._conn.close()
        self._conn = None

    # -- the poll ----------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = slots.open_session(self._connect, f"connect for slot {self.slot}")
        return self._conn

    def _open_poll(self, cursor_lsn: int | None) -> _Poll:
        conn = self._connection()
        confirmed = slots.confirmed_flush(conn, self.slot)
        if cursor_lsn is not None and cursor_lsn > confirmed:
            # The journal already holds everything before cursor_lsn (a crash came between the
            # journal commit and the advance): move the slot first rather than re-decode it.
            slots.advance(conn, self.slot, cursor_lsn)
            confirmed = cursor_lsn
        elif cursor_lsn is not None and cursor_lsn < confirmed:
            raise CursorUnavailable(
                f"replication slot {self.slot!r} is at {lsn_to_str(confirmed)}, past the checkpoint "
                f"{lsn_to_str(cursor_lsn)}: a slot cannot move back, so the changes between are not "
                "available. Fix: resync the mapped tables (`syncagent checkpoint rewind`)"
            )
        self._load_keys(conn)
        peek = slots.PeekCursor(
            conn, slot=self.slot, publication=self.publication, max_poll_bytes=self._max_poll_bytes
        )
        logger.debug(
            "event=pg_peek_opened slot=%s from=%s upto=%s",
            self.slot, lsn_to_str(peek.confirmed_flush), lsn_to_str(peek.upto_lsn),
        )  # fmt: skip
        return _Poll(peek, start_lsn=max(confirmed, peek.confirmed_flush))

    def _close_poll(self, *, advance: bool = False) -> None:
        """Close the peek; with ``advance``, also move the slot for what was committed meanwhile.

        Otherwise that advance waits for the next ``commit``: the last chunk of a poll is
        always followed by one, and one advance is cheaper than two. (Should it never come,
        the next poll moves the slot to the journal's checkpoint before peeking.)
        """
        poll, self._poll = self._poll, None
        if poll is None:
            return
        poll.peek.close()
        pending, self._pending_advance = self._pending_advance, None
        if pending is not None and advance:
            slots.advance(self._connection(), self.slot, pending)
        else:
            self._pending_advance = pending

    def _discard(self) -> None:
        """Drop the poll and the connection after a failure; the next read starts afresh."""
        self._poll = None
        self._pending_advance = None
        if self._conn is not None and not self._conn.closed:
            try:
                self._conn.close()
            except Exception:  # pragma: no cover - closing a broken connection
                logger.debug("event=pg_close_failed slot=%s", self.slot)
        self._conn = None

    def _mark(self, final_lsn: int, ts: datetime) -> None:
        marks = self._unconsumed
        if (not marks or marks[-1][0] != final_lsn) and len(marks) < _MAX_UNCONSUMED_MARKS:
            marks.append((final_lsn, ts))

    def _load_keys(self, conn: psycopg.Connection) -> None:
        for spec in self.tables:
            if spec.key_columns:
                self._keys[spec.qualified_name] = spec.key_columns
            elif spec.qualified_name not in self._keys:
                info = slots.describe_table(conn, spec.schema, spec.table)
                if info is not None:
                    self._keys[spec.qualified_name] = info.primary_key

    def _plan(self, rel: Relation, poll: _Poll) -> RowPlan | None:
        cached = self._plans.get(rel.relid)
        if cached is not None and cached[0] is rel:
            return cached[1]
        plan = None
        if rel.qualified_name in self._by_name:
            plan = build_plan(rel, poll.decoder.types, self._keys.get(rel.qualified_name))
        self._plans[rel.relid] = (rel, plan)
        return plan

    def _decode(self, poll: _Poll, rows: Sequence[bytes]) -> list[Change | RawChange]:
        """Turn one chunk of messages into changes: row changes stay raw (``RawChange``)."""
        out: list[Change | RawChange] = []
        append = out.append
        decoder = poll.decoder
        relations = decoder.relations
        decode, begin_fields, commit_end_lsn = decoder.decode, decoder.begin_fields, decoder.commit_end_lsn
        # Per relation id (its 4 wire bytes): (object name, shape), or None for a table that
        # is not mapped. Emptied at every Relation message.
        plans: dict[bytes, tuple[str, RowShape] | None] = {}
        index = poll.index
        ts, origin = poll.commit_ts, poll.origin
        text = poll.version or ""
        source = self.name
        # One urandom call per chunk instead of a uuid4 per change: same 16-hex-digit trace id.
        for data, trace_id in zip(rows, new_trace_ids(len(rows)), strict=True):
            tag = data[0] if data else -1
            if tag == 73 or tag == 85 or tag == 68:
                relid = data[1:5]
                found = plans.get(relid, _MISSING)
                if found is _MISSING:
                    rel = relations.get(int.from_bytes(relid, "big"))
                    if rel is None:
                        decode(data)  # raises: unknown relation id, or a truncated message
                        continue  # pragma: no cover - decode raised
                    plan = self._plan(rel, poll)
                    found = plans[relid] = None if plan is None else (plan.object_name, plan.shape)
                if found is not None:
                    append(RawChange(source, STREAM, found[0], _OPS[tag], f"{text}:{index}", text, ts, origin,
                                     trace_id, found[1], data))  # fmt: skip
                index += 1
            elif tag == 66 and (begin := begin_fields(data)) is not None:
                poll.final_lsn, ts = begin
                poll.commit_ts = ts
                poll.version = text = lsn_to_str(poll.final_lsn)
                poll.origin = origin = None
                index = 0
            elif tag == 67 and (end_lsn := commit_end_lsn(data)) is not None:
                poll.last_complete = end_lsn
                poll.version = poll.commit_ts = ts = None
                text = ""
            else:
                msg = decode(data)
                if isinstance(msg, Begin):  # pragma: no cover - begin_fields reads every valid one
                    poll.final_lsn, poll.commit_ts = msg.final_lsn, msg.commit_ts
                    poll.version = text = lsn_to_str(msg.final_lsn)
                    ts, poll.origin, origin, index = msg.commit_ts, None, None, 0
                elif isinstance(msg, Commit):  # pragma: no cover - as above, commit_end_lsn
                    poll.last_complete = msg.end_lsn
                    poll.version = poll.commit_ts = ts = None
                    text = ""
                elif isinstance(msg, Origin):
                    poll.origin = origin = msg.name
                elif isinstance(msg, Relation):
                    plans.clear()
                elif isinstance(msg, Truncate):
                    for rel in msg.relations:
                        tplan = self._plan(rel, poll)
                        if tplan is not None:
                            append(self._truncate(poll, tplan, index))
                        index += 1
        poll.index = index
        return out

    def _truncate(self, poll: _Poll, plan: RowPlan, index: int) -> Change:
        return Change(
            source=self.name,
            stream=STREAM,
            object_name=plan.object_name,
            op="truncate",
            key={},
            fields={},
            position=f"{poll.version}:{index}",
            version=poll.version or "",
            source_ts=poll.commit_ts,
            origin=poll.origin,
        )

    # -- Resync ------------------------------------------------------------------------------

    def resync(
        self, stream: str, *, since: datetime | None, after_key: str | None, chunk: int = 5000
    ) -> Iterator[Batch]:
        """Re-read mapped tables ("schema.table" or "*") as ``read`` changes, keyset-chunked.

        ``after_key`` resumes a run: pass the ``after_key`` of the last journaled batch's
        cursor (for "*", it names the table too).
        """
        return resync_batches(
            self._connect,
            source=self.name,
            change_stream=STREAM,
            tables=self.tables,
            stream=stream,
            since=since,
            after_key=after_key,
            chunk=chunk,
        )


def _check_stream(stream: str) -> None:
    if stream != STREAM:
        raise ValueError(f"PostgresSource has one stream, {STREAM!r}, not {stream!r}")


def _cursor(lsn: int) -> Cursor:
    return Cursor({"v": CURSOR_VERSION, "lsn": lsn_to_str(lsn)})


def _cursor_lsn(cursor: Cursor | None) -> int | None:
    if cursor is None:
        return None
    data = cursor.data
    if data.get("v") != CURSOR_VERSION or not isinstance(data.get("lsn"), str):
        raise CursorUnavailable(
            f"cursor {dict(data)!r} is not a PostgreSQL WAL cursor of format {CURSOR_VERSION}. "
            "Fix: rewind the checkpoint to a resync (`syncagent checkpoint rewind`)"
        )
    try:
        return str_to_lsn(data["lsn"])
    except ValueError:
        raise CursorUnavailable(f"cursor LSN {data['lsn']!r} is not an LSN. Fix: resync") from None
