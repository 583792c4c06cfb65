"""Pure decoder for pgoutput protocol version 1: one message's bytes in, a frozen message out.

Each row of ``pg_logical_slot_peek_binary_changes(..., 'proto_version', '1', ...)`` carries
one message, its first byte the tag. Integers are big-endian, strings are NUL-terminated
UTF-8, timestamps are microseconds since 2000-01-01 UTC. DML messages name their table only
by relation id, so a :class:`Decoder` remembers every Relation it has seen; the server sends
a Relation before the first change of each table in every SQL call, and again whenever the
table's columns change, and the newer one replaces the older from then on.

TupleData columns are ``None`` ('n'), :data:`UNCHANGED` ('u': an out-of-line TOAST value the
server did not send, never a NULL), ``str`` ('t') or ``bytes`` ('b', binary mode only).
Anything malformed raises :class:`PgOutputDecodeError`, and nothing else, naming the byte
offset. No I/O happens here.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Final

from agent.errors import PermanentError
from connectors.postgres.lsn import lsn_to_str, str_to_lsn

__all__ = [
    "UNCHANGED",
    "Begin",
    "Column",
    "Commit",
    "Decoder",
    "Delete",
    "Insert",
    "LogicalMessage",
    "Message",
    "Origin",
    "PgOutputDecodeError",
    "Relation",
    "RowChange",
    "Truncate",
    "TypeInfo",
    "Update",
    "lsn_to_str",
    "str_to_lsn",
]


class _Unchanged:
    """Type of :data:`UNCHANGED`: a TOASTed value that the server did not send."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<unchanged>"

    def __reduce__(self) -> str:
        # Pickling and copying return the one module-level instance, so `is` keeps working.
        return "UNCHANGED"


UNCHANGED: Final = _Unchanged()

# Timestamps on the wire count microseconds from PostgreSQL's epoch.
_PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
# Wire timestamps that a datetime can hold: 0001-01-01 .. 9999-12-31T23:59:59.999999 UTC.
_TS_MIN: Final = -63_082_281_600_000_000
_TS_MAX: Final = 252_455_615_999_999_999

_H = struct.Struct(">H").unpack_from
_I = struct.Struct(">I").unpack_from
_BEGIN = struct.Struct(">QqI").unpack_from  # final_lsn, commit_ts, xid
_COMMIT = struct.Struct(">BQQq").unpack_from  # flags, commit_lsn, end_lsn, commit_ts
_ORIGIN = struct.Struct(">Q").unpack_from  # origin_lsn
_MESSAGE = struct.Struct(">BQ").unpack_from  # flags, lsn
_TRUNCATE = struct.Struct(">IB").unpack_from  # nrels, options
_RELHEAD = struct.Struct(">BH").unpack_from  # replident, ncols
_COLTAIL = struct.Struct(">Ii").unpack_from  # type oid, typmod

_REPLIDENTS: Final = frozenset("dnfi")
_TRUNCATE_CASCADE: Final = 1
_TRUNCATE_RESTART_IDENTITY: Final = 2
_MESSAGE_TRANSACTIONAL: Final = 1

_TAG_NAMES: Final = {
    66: "Begin",
    67: "Commit",
    68: "Delete",
    73: "Insert",
    77: "Message",
    79: "Origin",
    82: "Relation",
    84: "Truncate",
    85: "Update",
    89: "Type",
}


class PgOutputDecodeError(PermanentError):
    """A pgoutput message could not be decoded; says what and at which byte offset."""

    def __init__(self, reason: str, offset: int) -> None:
        self.reason = reason
        self.offset = offset
        super().__init__(f"pgoutput: {reason} at byte offset {offset}")


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a published table, as the Relation message describes it."""

    name: str
    type_oid: int
    typmod: int
    is_key: bool


@dataclass(frozen=True, slots=True)
class Relation:
    """A published table's identity and columns; replident is 'd', 'n', 'f' or 'i'."""

    relid: int
    namespace: str
    name: str
    replident: str
    columns: tuple[Column, ...]

    @property
    def qualified_name(self) -> str:
        """Return ``namespace.name``."""
        return f"{self.namespace}.{self.name}"


@dataclass(frozen=True, slots=True)
class Begin:
    """Start of a transaction; ``final_lsn`` is its commit record's LSN."""

    final_lsn: int
    commit_ts: datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    """End of a transaction; ``end_lsn`` is where the next one may start (the advance target)."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts: datetime


@dataclass(frozen=True, slots=True)
class Origin:
    """The replication origin of the current transaction (sent right after Begin)."""

    origin_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class TypeInfo:
    """Name of a non-built-in type (enum, domain, ...) used by a following Relation."""

    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    """A new row; ``new`` has one value per column of ``relation``."""

    relation: Relation
    new: tuple[object, ...]


@dataclass(frozen=True, slots=True)
class Update:
    """A changed row; ``old`` is the key ('K') or full ('O') old row when the server sent one."""

    relation: Relation
    old: tuple[object, ...] | None
    old_kind: str | None
    new: tuple[object, ...]


@dataclass(frozen=True, slots=True)
class Delete:
    """A deleted row: its key columns ('K', others None) or the full old row ('O')."""

    relation: Relation
    old: tuple[object, ...]
    old_kind: str


@dataclass(frozen=True, slots=True)
class Truncate:
    """One TRUNCATE statement over one or more published tables."""

    relations: tuple[Relation, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """A ``pg_logical_emit_message`` payload (only with the 'messages' option)."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


# Everything Decoder.decode can return.
Message = Begin | Commit | Origin | Relation | TypeInfo | Insert | Update | Delete | Truncate | LogicalMessage

# What Decoder.row_change returns: (tag, relation, old, old_kind, new).
RowChange = tuple[int, Relation, tuple[object, ...] | None, str | None, tuple[object, ...] | None]

# What indexing past the end and short struct reads raise on a truncated buffer.
_DECODE_FAILURES = (IndexError, struct.error)


def _tuple(data: bytes, pos: int, _H=_H, _I=_I, _U=UNCHANGED) -> tuple[tuple[object, ...], int]:
    """Parse one TupleData at ``pos``; return its values and the offset after it."""
    start = pos
    try:
        ncols = _H(data, pos)[0]
        pos += 2
        vals: list[object] = []
        app = vals.append
        for _ in range(ncols):
            kind = data[pos]
            pos += 1
            if kind == 116:  # 't'
                ln = _I(data, pos)[0]
                pos += 4
                end = pos + ln
                app(data[pos:end].decode())
                pos = end
            elif kind == 110:  # 'n'
                app(None)
            elif kind == 117:  # 'u'
                app(_U)
            elif kind == 98:  # 'b'
                ln = _I(data, pos)[0]
                pos += 4
                end = pos + ln
                app(data[pos:end])
                pos = end
            else:
                raise PgOutputDecodeError(f"unknown TupleData column kind 0x{kind:02x}", pos - 1)
    except UnicodeDecodeError as exc:
        raise PgOutputDecodeError("text column value is not valid UTF-8", pos + exc.start) from None
    except _DECODE_FAILURES:
        raise PgOutputDecodeError(f"truncated TupleData (started at {start})", len(data)) from None
    # A short slice does not raise, so a value running past the end shows up here.
    if pos > len(data):
        raise PgOutputDecodeError(f"truncated TupleData (started at {start})", len(data))
    return tuple(vals), pos


def _cstring(data: bytes, pos: int, what: str) -> tuple[str, int]:
    """Parse a NUL-terminated UTF-8 string at ``pos``; return it and the offset after the NUL."""
    end = data.find(0, pos)
    if end < 0 or pos > len(data):
        raise PgOutputDecodeError(f"unterminated {what} string", pos)
    try:
        return data[pos:end].decode(), end + 1
    except UnicodeDecodeError as exc:
        raise PgOutputDecodeError(f"{what} is not valid UTF-8", pos + exc.start) from None


def _timestamp(micros: int, offset: int) -> datetime:
    """Convert wire microseconds since 2000-01-01 UTC into an aware UTC datetime."""
    try:
        return _PG_EPOCH + timedelta(microseconds=micros)
    except OverflowError:
        raise PgOutputDecodeError("timestamp out of range", offset) from None


def _end(data: bytes, pos: int, what: str) -> None:
    """Check that the message ended exactly at ``pos``."""
    if pos != len(data):
        if pos > len(data):
            raise PgOutputDecodeError(f"truncated {what} message", len(data))
        raise PgOutputDecodeError(f"{len(data) - pos} trailing bytes after {what} message", pos)


class Decoder:
    """Decodes pgoutput v1 messages one at a time, remembering Relation and Type messages."""

    __slots__ = ("_relations", "_relations_view", "_types", "_types_view")

    def __init__(self) -> None:
        self._relations: dict[int, Relation] = {}
        self._types: dict[int, TypeInfo] = {}
        self._relations_view = MappingProxyType(self._relations)
        self._types_view = MappingProxyType(self._types)

    @property
    def relations(self) -> Mapping[int, Relation]:
        """Read-only view of the newest Relation seen per relation id."""
        return self._relations_view

    @property
    def types(self) -> Mapping[int, TypeInfo]:
        """Read-only view of the Type messages seen, by type OID."""
        return self._types_view

    def remember(self, rel: Relation) -> None:
        """Take ``rel`` as if its Relation message had been decoded (for journaled rows)."""
        self._relations[rel.relid] = rel

    def decode(self, data: bytes) -> Message:
        """Decode one message; raises PgOutputDecodeError, and only that, on bad input."""
        if type(data) is not bytes:
            data = bytes(data)
        try:
            tag = data[0]
        except IndexError:
            raise PgOutputDecodeError("empty message", 0) from None
        # Row changes dominate the stream, so they are tested first.
        if tag == 73 or tag == 85 or tag == 68:
            _, rel, old, old_kind, new = self.row_change(data)
            if tag == 73:
                return Insert(rel, new)  # type: ignore[arg-type]
            if tag == 85:
                return Update(rel, old, old_kind, new)  # type: ignore[arg-type]
            return Delete(rel, old, old_kind)  # type: ignore[arg-type]
        if tag == 66:
            return self._begin(data)
        if tag == 67:
            return self._commit(data)
        if tag == 82:
            return self._relation(data)
        if tag == 79:
            return self._origin(data)
        if tag == 89:
            return self._type(data)
        if tag == 84:
            return self._truncate(data)
        if tag == 77:
            return self._message(data)
        shown = f" ({chr(tag)!r})" if 32 < tag < 127 else ""
        raise PgOutputDecodeError(f"unknown message tag 0x{tag:02x}{shown} for proto_version 1", 0)

    decode_row = decode

    def row_change(self, data: bytes) -> RowChange:
        """Decode an Insert, Update or Delete without building its message object.

        Returns ``(tag, relation, old, old_kind, new)``: tag 73 ('I'), 85 ('U') or 68 ('D');
        ``old``/``old_kind`` are None where the message has no old tuple, ``new`` is None for
        a Delete. :meth:`decode` is built on it, so both accept and reject exactly the same
        bytes.
        """
        if type(data) is not bytes:
            data = bytes(data)
        try:
            tag = data[0]
            rel = self._relations[_I(data, 1)[0]]
            marker = data[5]
        except KeyError:
            raise PgOutputDecodeError(f"unknown relation id {_I(data, 1)[0]}", 1) from None
        except (IndexError, struct.error):
            if not data:
                raise PgOutputDecodeError("empty message", 0) from None
            what = _TAG_NAMES.get(data[0])
            if what not in ("Insert", "Update", "Delete"):
                raise PgOutputDecodeError(f"message tag 0x{data[0]:02x} is not a row change", 0) from None
            raise PgOutputDecodeError(f"truncated {what} message", len(data)) from None
        ncols = len(rel.columns)
        if tag == 73:
            if marker != 78:
                raise PgOutputDecodeError("Insert without 'N' tuple", 5)
            new, pos = _tuple(data, 6)
            if pos != len(data) or len(new) != ncols:
                self._check_row(data, pos, "Insert", rel, new, 6)
            return 73, rel, None, None, new
        if tag == 85:
            if marker == 78:
                new, pos = _tuple(data, 6)
                if pos != len(data) or len(new) != ncols:
                    self._check_row(data, pos, "Update", rel, new, 6)
                return 85, rel, None, None, new
            if marker != 75 and marker != 79:
                raise PgOutputDecodeError("Update without 'K', 'O' or 'N' tuple", 5)
            old, pos = _tuple(data, 6)
            if len(old) != ncols:
                self._check_row(data, pos, "Update", rel, old, 6)
            try:
                if data[pos] != 78:
                    raise PgOutputDecodeError("Update without 'N' tuple", pos)
            except IndexError:
                raise PgOutputDecodeError("truncated Update message", len(data)) from None
            new, end = _tuple(data, pos + 1)
            if end != len(data) or len(new) != ncols:
                self._check_row(data, end, "Update", rel, new, pos + 1)
            return 85, rel, old, "K" if marker == 75 else "O", new
        if tag != 68:
            raise PgOutputDecodeError(f"message tag 0x{tag:02x} is not a row change", 0)
        if marker != 75 and marker != 79:
            raise PgOutputDecodeError("Delete without 'K' or 'O' tuple", 5)
        old, pos = _tuple(data, 6)
        if pos != len(data) or len(old) != ncols:
            self._check_row(data, pos, "Delete", rel, old, 6)
        return 68, rel, old, "K" if marker == 75 else "O", None

    def begin_fields(self, data: bytes) -> tuple[int, datetime] | None:
        """Return a Begin message's ``(final_lsn, commit_ts)`` without building it; None otherwise.

        None also for a malformed Begin, which :meth:`decode` then reports.
        """
        if type(data) is not bytes or len(data) != 21 or data[0] != 66:
            return None
        final_lsn, ts, _ = _BEGIN(data, 1)
        if not _TS_MIN <= ts <= _TS_MAX:
            return None
        return final_lsn, _PG_EPOCH + timedelta(microseconds=ts)

    def commit_end_lsn(self, data: bytes) -> int | None:
        """Return a Commit message's ``end_lsn`` without building it; None for anything else.

        None also for a malformed Commit, which :meth:`decode` then reports.
        """
        if type(data) is not bytes or len(data) != 26 or data[0] != 67:
            return None
        _, _, end_lsn, ts = _COMMIT(data, 1)
        if not _TS_MIN <= ts <= _TS_MAX:
            return None
        return end_lsn

    @staticmethod
    def _check_row(
        data: bytes, pos: int, what: str, rel: Relation, values: tuple[object, ...], at: int
    ) -> None:
        """Raise for a tuple whose width disagrees with its Relation, or a bad message end."""
        if len(values) != len(rel.columns):
            raise PgOutputDecodeError(
                f"{what} tuple has {len(values)} columns, relation {rel.relid} has {len(rel.columns)}", at
            )
        _end(data, pos, what)

    def _begin(self, data: bytes) -> Begin:
        if len(data) != 21:
            raise PgOutputDecodeError(f"Begin message is {len(data)} bytes, expected 21", min(len(data), 21))
        final_lsn, ts, xid = _BEGIN(data, 1)
        return Begin(final_lsn, _timestamp(ts, 9), xid)

    def _commit(self, data: bytes) -> Commit:
        if len(data) != 26:
            raise PgOutputDecodeError(f"Commit message is {len(data)} bytes, expected 26", min(len(data), 26))
        flags, commit_lsn, end_lsn, ts = _COMMIT(data, 1)
        return Commit(flags, commit_lsn, end_lsn, _timestamp(ts, 18))

    def _origin(self, data: bytes) -> Origin:
        if len(data) < 10:
            raise PgOutputDecodeError("truncated Origin message", len(data))
        name, pos = _cstring(data, 9, "origin name")
        _end(data, pos, "Origin")
        return Origin(_ORIGIN(data, 1)[0], name)

    def _type(self, data: bytes) -> TypeInfo:
        if len(data) < 6:
            raise PgOutputDecodeError("truncated Type message", len(data))
        oid = _I(data, 1)[0]
        namespace, pos = _cstring(data, 5, "type namespace")
        name, pos = _cstring(data, pos, "type name")
        _end(data, pos, "Type")
        info = TypeInfo(oid, namespace or "pg_catalog", name)
        self._types[oid] = info
        return info

    def _relation(self, data: bytes) -> Relation:
        if len(data) < 6:
            raise PgOutputDecodeError("truncated Relation message", len(data))
        relid = _I(data, 1)[0]
        # pgoutput sends an empty namespace for pg_catalog.
        namespace, pos = _cstring(data, 5, "relation namespace")
        name, pos = _cstring(data, pos, "relation name")
        try:
            replident_byte, ncols = _RELHEAD(data, pos)
        except struct.error:
            raise PgOutputDecodeError("truncated Relation message", len(data)) from None
        replident = chr(replident_byte)
        if replident not in _REPLIDENTS:
            raise PgOutputDecodeError(f"unknown replica identity 0x{replident_byte:02x}", pos)
        pos += 3
        columns = []
        for _ in range(ncols):
            try:
                flags = data[pos]
            except IndexError:
                raise PgOutputDecodeError("truncated Relation message", len(data)) from None
            colname, pos = _cstring(data, pos + 1, "column name")
            try:
                type_oid, typmod = _COLTAIL(data, pos)
            except struct.error:
                raise PgOutputDecodeError("truncated Relation message", len(data)) from None
            pos += 8
            columns.append(Column(colname, type_oid, typmod, bool(flags & 1)))
        _end(data, pos, "Relation")
        rel = Relation(relid, namespace or "pg_catalog", name, replident, tuple(columns))
        self._relations[relid] = rel
        return rel

    def _truncate(self, data: bytes) -> Truncate:
        try:
            nrels, options = _TRUNCATE(data, 1)
        except struct.error:
            raise PgOutputDecodeError("truncated Truncate message", len(data)) from None
        if len(data) != 6 + 4 * nrels:
            raise PgOutputDecodeError(
                f"Truncate of {nrels} relations is {len(data)} bytes, expected {6 + 4 * nrels}",
                min(len(data), 6 + 4 * nrels),
            )
        rels = []
        for i in range(nrels):
            relid = _I(data, 6 + 4 * i)[0]
            try:
                rels.append(self._relations[relid])
            except KeyError:
                raise PgOutputDecodeError(f"unknown relation id {relid}", 6 + 4 * i) from None
        return Truncate(
            tuple(rels),
            bool(options & _TRUNCATE_CASCADE),
            bool(options & _TRUNCATE_RESTART_IDENTITY),
        )

    def _message(self, data: bytes) -> LogicalMessage:
        if len(data) < 11:
            raise PgOutputDecodeError("truncated Message message", len(data))
        flags, lsn = _MESSAGE(data, 1)
        prefix, pos = _cstring(data, 10, "message prefix")
        try:
            ln = _I(data, pos)[0]
        except struct.error:
            raise PgOutputDecodeError("truncated Message message", len(data)) from None
        pos += 4
        _end(data, pos + ln, "Message")
        return LogicalMessage(bool(flags & _MESSAGE_TRANSACTIONAL), lsn, prefix, data[pos:])
