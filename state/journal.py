"""The journal: every captured change, once, in capture order, with what became of it.

Append-only; ``seq`` increases and is never reused, with gaps (a skipped duplicate consumes
a number). ``(source, position)`` is unique, so re-reading a batch after a crash (or an
API poll's look-back overlap) inserts nothing twice. A row starts ``pending`` with no fate;
the resolver gives it a fate and ``resolved`` status. Fates only move forward: the open fates
``queued`` (an op waits in the outbox) and ``exception`` (a person must act) may still become
anything else, while a settled fate (``applied``, ``echo``, ``ignored``, ``conflict``,
``reverted``, ``noop``, ``skipped``) is final, so replaying the journal after a rewind cannot
overwrite what happened the first time.

Stored values are JSON (see ``state.codec``): a change read back has plain JSON types in
``key``/``fields`` (a ``Decimal`` comes back as ``str``, a datetime as ISO text). A row keeps
``source``, ``position``, ``op``, ``captured_at`` and the fate columns as columns, and the rest
of the change in one JSON array, ``body`` (schema m003).

A source may hand over row changes undecoded (``RawChange``: a PostgreSQL row message and its
table version's ``RowShape``). Those are kept as they came, in ``raw`` (schema m005), with
the shape stored once in ``journal_shapes``; a reader passes ``formats`` (format name ->
decoder, ``agent.pipeline.ROW_FORMATS``) and gets the same Change, with the same JSON values,
as if the row had been decoded at capture. Decoding is most of capture's cost, and the
resolver, which reads each row once, is far slower per change than capture anyway.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent.errors import PermanentError
from agent.model import Change, JournalEntry, RawChange, RowImage, RowShape, utcnow
from state import checkpoints, codec
from state.db import State, classify_sqlite, fetch_all, fetch_one

# Given a shape's definition, returns the function that decodes one raw row message of that
# shape into a row image.
RowDecoder = Callable[[Mapping[str, Any]], Callable[[bytes], RowImage]]

RESOLVER_OWNER = "resolver"
RESOLVER_STREAM = "journal"

OPEN_FATES = frozenset({"queued", "exception"})
SETTLED_FATES = frozenset({"applied", "echo", "ignored", "conflict", "reverted", "noop", "skipped"})
FATES = OPEN_FATES | SETTLED_FATES

_PRUNE_CHUNK = 10_000

# One row per captured change, and capture writes them as fast as the ERP produces them: the
# row holds only what queries filter or order on, and the rest of the change as one JSON array
# in ``body`` (one encoder call and five bound values per row, instead of 14 values and two
# JSON texts). Its elements, in order: the format number, stream, object_name, key, fields,
# unchanged (a sorted list, or null for none), old_key, version, source_ts (``format_ts``
# text), origin, trace_id. A reader meeting another format number was written by a newer
# syncagent; migration m003 builds the same array from the older, wide rows.
_BODY_FORMAT = 1
_COLUMNS = "source, position, op, body, captured_at, raw"
_WIDTH = 6
# A row change kept as its source sent it (m005): the body is [format, stream, object_name,
# shape id, version, source_ts, origin, trace_id] and ``raw`` holds the message; a decoder
# for the shape's format, given by the reader, rebuilds key, fields, unchanged and old_key.
_RAW_FORMAT = 2
# Rows per INSERT. One multi-row statement costs less per row than executemany (one statement
# per row), but preparing one is slow (~3 us a row here), so statements come in a few fixed
# sizes that the connection's statement cache keeps: full blocks, then the remainder as a sum
# of powers of two.
_BLOCK_ROWS = 512
# Only a duplicate source position is skipped; a NOT NULL or CHECK violation still raises
# (INSERT OR IGNORE would silently drop such a row too).
_ON_CONFLICT = " ON CONFLICT (source, position) DO NOTHING"


def _insert_sql(rows: int) -> str:
    one = "(" + ", ".join("?" * _WIDTH) + ")"
    return f"INSERT INTO journal ({_COLUMNS}) VALUES " + ", ".join([one] * rows) + _ON_CONFLICT


def _statement_rows(total: int) -> list[int]:
    """Split ``total`` rows into statement sizes: full blocks, then descending powers of two."""
    sizes = [_BLOCK_ROWS] * (total // _BLOCK_ROWS)
    rest = total % _BLOCK_ROWS
    size = _BLOCK_ROWS
    while rest:
        size //= 2
        if rest >= size:
            sizes.append(size)
            rest -= size
    return sizes


_SET_FATE = (
    "UPDATE journal SET status = 'resolved', fate = ?, fate_detail = ?"
    " WHERE seq = ? AND (fate IS NULL OR fate IN ('queued', 'exception'))"
)


@dataclass(frozen=True, slots=True)
class JournalRow:
    """A journal entry together with its fate, for listing and inspection."""

    entry: JournalEntry
    fate: str | None
    fate_detail: str | None


@dataclass(frozen=True, slots=True)
class JournalStats:
    """Per-source journal figures for ``status``."""

    count: int
    pending: int
    oldest_pending_at: datetime | None


def append(st: State, changes: Sequence[Change | RawChange], *, captured_at: datetime | None = None) -> int:
    """Append changes in one statement batch; return how many were new (duplicates skipped).

    A ``RawChange`` is stored as it came (``raw``), with a format-2 body naming its shape;
    each shape not yet in ``journal_shapes`` is added in the same transaction.

    Runs inside the caller's ``write_txn`` when there is one, so the batch and its source
    cursor commit together.
    """
    if not changes:
        return 0
    at = codec.format_ts(captured_at or utcnow())
    body = codec.dumps_bytes
    fmt = codec.format_ts
    # Encode before taking the write lock, so the lock is held only for the inserts. The
    # changes of one transaction share their commit time: format it once.
    params: list[object] = []
    extend = params.extend
    last_ts: datetime | None = None
    last_ts_text: str | None = None
    shapes: dict[str, tuple[str, RowShape]] = {}  # id -> (source, shape)
    last_shape: RowShape | None = None
    for c in changes:
        ts = c.source_ts
        if ts is not last_ts:
            last_ts = ts
            last_ts_text = None if ts is None else fmt(ts)
        if c.__class__ is RawChange:
            raw: RawChange = c  # type: ignore[assignment]
            shape = raw.shape
            if shape is not last_shape:
                shapes[shape.id] = (raw.source, shape)
                last_shape = shape
            extend((
                raw.source, raw.position, raw.op,
                body((
                    _RAW_FORMAT, raw.stream, raw.object_name, shape.id, raw.version, last_ts_text,
                    raw.origin, raw.trace_id,
                )),
                at, raw.data,
            ))  # fmt: skip
            continue
        unchanged = c.unchanged
        extend((
            c.source, c.position, c.op,
            body((
                _BODY_FORMAT, c.stream, c.object_name, c.key, c.fields,
                sorted(unchanged) if unchanged else None, c.old_key, c.version, last_ts_text,
                c.origin, c.trace_id,
            )),
            at, None,
        ))  # fmt: skip
    added = 0
    with st.write_txn(), classify_sqlite(st.path):
        execute = st.conn.execute
        if shapes:
            st.conn.executemany(
                "INSERT INTO journal_shapes (id, source, format, definition) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (id) DO NOTHING",
                [
                    (sid, source, sh.format, codec.dumps(sh.definition))
                    for sid, (source, sh) in shapes.items()
                ],
            )
        start = 0
        for rows in _statement_rows(len(changes)):
            end = start + rows * _WIDTH
            added += execute(_insert_sql(rows), params[start:end]).rowcount
            start = end
    return added


def _entry(r: sqlite3.Row, ctx: _ReadContext) -> JournalEntry:
    body = codec.loads(r["body"])
    captured = r["captured_at"]
    # A batch shares one capture time: parse each distinct text once per read.
    captured_at = ctx.times.get(captured)
    if captured_at is None:
        captured_at = ctx.times[captured] = codec.parse_ts(captured)
    if body[0] == _RAW_FORMAT:
        _, stream, object_name, shape_id, version, source_ts, origin, trace_id = body
        key, fields, unchanged, old_key = ctx.decode(r["seq"], shape_id, r["raw"])
    elif body[0] == _BODY_FORMAT:
        _, stream, object_name, key, fields, unchanged, old_key, version, source_ts, origin, trace_id = body
    else:
        raise PermanentError(
            f"journal row {r['seq']} has body format {body[0]!r}, which this syncagent does not know: "
            "it was written by a newer version; upgrade syncagent"
        )
    change = Change(
        source=r["source"],
        stream=stream,
        object_name=object_name,
        op=r["op"],
        key=key,
        fields=fields,
        position=r["position"],
        version=version,
        source_ts=None if source_ts is None else codec.parse_ts(source_ts),
        origin=origin,
        unchanged=frozenset(unchanged) if unchanged else frozenset(),
        old_key=old_key,
        trace_id=trace_id,
    )
    return JournalEntry(seq=r["seq"], change=change, captured_at=captured_at, status=r["status"])


class _ReadContext:
    """What one journal read shares across its rows: parsed times, shapes, row decoders."""

    __slots__ = ("formats", "shapes", "st", "times")

    def __init__(self, st: State, formats: Mapping[str, RowDecoder] | None) -> None:
        self.st = st
        self.formats = formats or {}
        self.times: dict[str, datetime] = {}
        self.shapes: dict[str, Callable[[bytes], RowImage]] = {}

    def decode(self, seq: int, shape_id: str, raw: bytes) -> tuple[Any, Any, Any, Any]:
        """Rebuild a raw row's key, fields, unchanged and old_key, as plain JSON values."""
        decode = self.shapes.get(shape_id)
        if decode is None:
            row = fetch_one(
                self.st, "SELECT format, definition FROM journal_shapes WHERE id = ?", (shape_id,)
            )
            if row is None:
                raise PermanentError(f"journal row {seq} names shape {shape_id}, which journal_shapes lacks")
            make = self.formats.get(row["format"])
            if make is None:
                raise PermanentError(
                    f"journal row {seq} holds a raw {row['format']} row, and this reader was given no "
                    "decoder for it"
                )
            decode = self.shapes[shape_id] = make(codec.loads(row["definition"]))
        key, fields, unchanged, old_key = decode(raw)
        # Through the journal's own encoding, so the values read back as a format-1 row's do.
        plain_key, plain_fields, plain_old_key = codec.loads(codec.dumps_bytes((key, fields, old_key)))
        return plain_key, plain_fields, unchanged, plain_old_key


def _rows(
    st: State, sql: str, params: tuple[object, ...], formats: Mapping[str, RowDecoder] | None
) -> list[JournalRow]:
    ctx = _ReadContext(st, formats)
    return [
        JournalRow(entry=_entry(r, ctx), fate=r["fate"], fate_detail=r["fate_detail"])
        for r in fetch_all(st, sql, params)
    ]


def read_pending(
    st: State, after_seq: int, limit: int, *, formats: Mapping[str, RowDecoder] | None = None
) -> list[JournalEntry]:
    """Return up to ``limit`` entries with ``seq > after_seq`` in order, whatever their status.

    The resolver's position is its checkpoint, not the status column: after a rewind it
    re-reads resolved rows too. ``formats`` decodes raw rows (format name -> decoder).
    """
    rows = fetch_all(st, "SELECT * FROM journal WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit))
    ctx = _ReadContext(st, formats)
    return [_entry(r, ctx) for r in rows]


def set_fate(st: State, fates: Sequence[tuple[int, str, str | None]]) -> int:
    """Record ``(seq, fate, detail)`` outcomes and mark those rows resolved; return rows changed.

    A row whose fate is already settled is left as it is (fates only move forward).

    Raises:
        ValueError: a fate is not one of ``FATES``.
    """
    for _, fate, _ in fates:
        if fate not in FATES:
            raise ValueError(f"unknown journal fate {fate!r}")
    if not fates:
        return 0
    params = [(fate, detail, seq) for seq, fate, detail in fates]
    with st.write_txn(), classify_sqlite(st.path):
        cur = st.conn.executemany(_SET_FATE, params)
    return cur.rowcount


def list_entries(
    st: State,
    *,
    since_seq: int = 0,
    limit: int = 100,
    source: str | None = None,
    formats: Mapping[str, RowDecoder] | None = None,
) -> list[JournalRow]:
    """Return up to ``limit`` rows with ``seq > since_seq`` in order, optionally of one source."""
    if source is None:
        sql = "SELECT * FROM journal WHERE seq > ? ORDER BY seq LIMIT ?"
        params: tuple[object, ...] = (since_seq, limit)
    else:
        # '+source' keeps the planner on the seq order (a bounded scan) rather than
        # sorting every row of the source found through the (source, position) index.
        sql = "SELECT * FROM journal WHERE +source = ? AND seq > ? ORDER BY seq LIMIT ?"
        params = (source, since_seq, limit)
    return _rows(st, sql, params, formats)


def get(st: State, seq: int, *, formats: Mapping[str, RowDecoder] | None = None) -> JournalRow | None:
    """Return the journal row ``seq``, or ``None`` if there is none (never written or pruned)."""
    found = _rows(st, "SELECT * FROM journal WHERE seq = ?", (seq,), formats)
    return found[0] if found else None


def last_seq(st: State) -> int:
    """Return the highest sequence number in the journal (0 when it has never had a row)."""
    # An emptied (fully pruned) journal falls back to the AUTOINCREMENT counter, which may be
    # a little higher: skipped duplicates also consume numbers, so seqs have gaps.
    r = fetch_one(
        st,
        "SELECT coalesce((SELECT max(seq) FROM journal),"
        " (SELECT seq FROM sqlite_sequence WHERE name = 'journal'), 0) AS seq",
    )
    return 0 if r is None else int(r["seq"])


def stats(st: State) -> dict[str, JournalStats]:
    """Return row count, pending count and oldest pending capture time per source.

    "Pending" counts rows after the resolver's checkpoint that have no fate yet: the rows
    still waiting for it. (A row an operator skipped by moving the resolver past it is not
    waiting, although it stays pending and is kept by ``prune``.)
    """
    totals = fetch_all(st, "SELECT source, count(*) AS n FROM journal GROUP BY source")
    # A seq range rather than an index on status: the backlog after the resolver is short,
    # and an index would be paid for on every append and every set_fate.
    pending = {
        r["source"]: (r["n"], r["oldest"])
        for r in fetch_all(
            st,
            "SELECT source, count(*) AS n, min(captured_at) AS oldest FROM journal"
            " WHERE seq > ? AND status = 'pending' GROUP BY source",
            (resolver_seq(st) or 0,),
        )
    }
    out: dict[str, JournalStats] = {}
    for r in totals:
        n_pending, oldest = pending.get(r["source"], (0, None))
        out[r["source"]] = JournalStats(r["n"], n_pending, codec.parse_ts_or_none(oldest))
    return out


def resolver_seq(st: State) -> int | None:
    """Return the resolver's checkpoint (the last journal seq it handled), if it has one."""
    cp = checkpoints.get(st, RESOLVER_OWNER, RESOLVER_STREAM)
    if cp is None:
        return None
    seq = cp.cursor.data.get("seq")
    return int(seq) if seq is not None else None


def prune(st: State, *, older_than: datetime) -> int:
    """Delete settled rows captured before ``older_than``; return how many.

    Never removes a pending row, a row with an open fate (``queued``, ``exception``), nor a
    row at or after the resolver's checkpoint. Deletes in chunks, each its own transaction
    unless the caller holds one, so the agent's writers are not blocked for long.
    """
    cutoff = codec.format_ts(older_than)
    # Capture times rise with seq (barring clock steps), so the first row at or after the
    # cutoff bounds the scan; the captured_at test below keeps it exact when they do not.
    bounds = [b for b in (resolver_seq(st), first_seq_at_or_after(st, older_than)) if b is not None]
    bound = min(bounds) if bounds else last_seq(st) + 1
    sql = (
        "DELETE FROM journal WHERE seq IN (SELECT seq FROM journal WHERE seq < ?"
        " AND captured_at < ? AND status = 'resolved' AND fate NOT IN ('queued', 'exception')"
        " ORDER BY seq LIMIT ?)"
    )
    total = 0
    while True:
        with st.write_txn(), classify_sqlite(st.path):
            n = st.conn.execute(sql, (bound, cutoff, _PRUNE_CHUNK)).rowcount
        total += n
        if n < _PRUNE_CHUNK:
            return total


def first_seq_at_or_after(st: State, when: datetime) -> int | None:
    """Return the lowest seq captured at or after ``when`` (to rewind the resolver by time).

    Scans in seq order from the oldest row (no index on capture time, to keep appends fast),
    so its cost grows with the rows captured before ``when``: an operator's query.
    """
    r = fetch_one(
        st,
        "SELECT seq FROM journal WHERE captured_at >= ? ORDER BY seq LIMIT 1",
        (codec.format_ts(when),),
    )
    return None if r is None else int(r["seq"])


def fate_counts(st: State) -> dict[str, int]:
    """How many journal entries (within retention) met each fate; unresolved ones as 'pending'."""
    rows = fetch_all(st, "SELECT coalesce(fate, 'pending') AS fate, count(*) AS n FROM journal GROUP BY 1")
    return {r["fate"]: int(r["n"]) for r in rows}
