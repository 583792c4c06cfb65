"""The pgoutput v1 decoder over hand-built messages and the golden captures (no database)."""

from __future__ import annotations

import copy
import importlib.util
import pickle
import struct
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import pytest

from agent.errors import PermanentError
from connectors.postgres.pgoutput import (
    UNCHANGED,
    Begin,
    Column,
    Commit,
    Decoder,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    PgOutputDecodeError,
    Relation,
    Truncate,
    TypeInfo,
    Update,
    lsn_to_str,
    str_to_lsn,
)

CAPTURE_DIR = Path(__file__).resolve().parents[1] / "data" / "pgoutput"
PG_EPOCH_MICROS = 946_684_800_000_000  # 2000-01-01 in Unix microseconds


# --- builders for wire messages -------------------------------------------------------------


def cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def ts(dt: datetime) -> int:
    return int(dt.timestamp() * 1_000_000) - PG_EPOCH_MICROS


def tuple_data(*values: object) -> bytes:
    out = struct.pack(">H", len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif v is UNCHANGED:
            out += b"u"
        elif isinstance(v, bytes):
            out += b"b" + struct.pack(">I", len(v)) + v
        else:
            raw = str(v).encode()
            out += b"t" + struct.pack(">I", len(raw)) + raw
    return out


def relation_msg(
    relid: int, ns: str, name: str, cols: list[tuple[str, int, bool]], ident: str = "d"
) -> bytes:
    out = (
        b"R"
        + struct.pack(">I", relid)
        + cstr(ns)
        + cstr(name)
        + ident.encode()
        + struct.pack(">H", len(cols))
    )
    for colname, oid, key in cols:
        out += bytes([1 if key else 0]) + cstr(colname) + struct.pack(">Ii", oid, -1)
    return out


def insert_msg(relid: int, *values: object) -> bytes:
    return b"I" + struct.pack(">I", relid) + b"N" + tuple_data(*values)


def update_msg(
    relid: int, new: tuple[object, ...], old: tuple[object, ...] | None = None, kind: bytes = b"K"
) -> bytes:
    head = b"U" + struct.pack(">I", relid)
    if old is not None:
        head += kind + tuple_data(*old)
    return head + b"N" + tuple_data(*new)


def delete_msg(relid: int, old: tuple[object, ...], kind: bytes = b"K") -> bytes:
    return b"D" + struct.pack(">I", relid) + kind + tuple_data(*old)


WHEN = datetime(2026, 12, 1, 7, 50, 30, 123456, tzinfo=UTC)
BEGIN = b"B" + struct.pack(">QqI", 0x16B3748, ts(WHEN), 4242)
COMMIT = b"C" + struct.pack(">BQQq", 0, 0x16B3748, 0x16B3778, ts(WHEN))
ORIGIN = b"O" + struct.pack(">Q", 0xDEADBEEF) + cstr("syncagent")
TYPE = b"Y" + struct.pack(">I", 16387) + cstr("app") + cstr("mood")
CUSTOMER = relation_msg(
    16393, "app", "customer", [("id", 20, True), ("name", 25, False), ("notes", 25, False)]
)
LEDGER = relation_msg(16408, "app", "ledger", [("id", 20, True), ("amount", 1700, True)], ident="f")
TRUNCATE = b"T" + struct.pack(">IB", 2, 3) + struct.pack(">II", 16393, 16408)
MESSAGE = b"M" + struct.pack(">BQ", 1, 0x16B3760) + cstr("syncagent") + struct.pack(">I", 3) + b"\x00hi"


@pytest.fixture
def decoder() -> Decoder:
    d = Decoder()
    d.decode(CUSTOMER)
    d.decode(LEDGER)
    return d


# --- message types -------------------------------------------------------------------------


def test_decode_returns_begin_with_aware_utc_timestamp_when_given_begin():
    msg = Decoder().decode(BEGIN)
    assert msg == Begin(final_lsn=0x16B3748, commit_ts=WHEN, xid=4242)
    assert msg.commit_ts.tzinfo is UTC


def test_decode_returns_commit_when_given_commit():
    assert Decoder().decode(COMMIT) == Commit(
        flags=0, commit_lsn=0x16B3748, end_lsn=0x16B3778, commit_ts=WHEN
    )


def test_decode_returns_origin_name_and_lsn_when_given_origin():
    assert Decoder().decode(ORIGIN) == Origin(origin_lsn=0xDEADBEEF, name="syncagent")


def test_decode_remembers_type_when_given_type_message():
    d = Decoder()
    assert d.decode(TYPE) == TypeInfo(oid=16387, namespace="app", name="mood")
    assert d.types[16387].name == "mood"


def test_decode_reports_pg_catalog_when_namespace_is_empty():
    d = Decoder()
    rel = d.decode(relation_msg(5, "", "pg_thing", [("a", 23, False)]))
    assert isinstance(rel, Relation)
    assert rel.qualified_name == "pg_catalog.pg_thing"


def test_decode_returns_relation_with_key_flags_when_given_relation():
    d = Decoder()
    rel = d.decode(CUSTOMER)
    assert rel == Relation(
        relid=16393,
        namespace="app",
        name="customer",
        replident="d",
        columns=(
            Column("id", 20, -1, True),
            Column("name", 25, -1, False),
            Column("notes", 25, -1, False),
        ),
    )
    assert rel.qualified_name == "app.customer"
    assert d.relations[16393] is rel


def test_relations_view_is_read_only_when_caller_tries_to_write(decoder: Decoder):
    with pytest.raises(TypeError):
        decoder.relations[1] = decoder.relations[16393]  # type: ignore[index]


def test_decode_keeps_every_tuple_kind_when_insert_has_null_unchanged_text_and_binary(decoder: Decoder):
    msg = decoder.decode(insert_msg(16393, None, UNCHANGED, b"\x00\x01"))
    assert msg == Insert(decoder.relations[16393], (None, UNCHANGED, b"\x00\x01"))
    msg = decoder.decode(insert_msg(16393, "7", "Zoë", ""))
    assert isinstance(msg, Insert)
    assert msg.new == ("7", "Zoë", "")


def test_decode_never_turns_unchanged_into_none_when_update_omits_toast(decoder: Decoder):
    msg = decoder.decode(update_msg(16393, ("7", "new name", UNCHANGED)))
    assert isinstance(msg, Update)
    assert msg.new[2] is UNCHANGED
    assert msg.new[2] is not None
    assert repr(msg.new[2]) == "<unchanged>"


@pytest.mark.parametrize(
    ("old", "kind", "expected_kind"),
    [(None, b"K", None), (("7", None, None), b"K", "K"), (("7", "old", "text"), b"O", "O")],
)
def test_decode_returns_update_old_tuple_when_server_sent_one(decoder: Decoder, old, kind, expected_kind):
    msg = decoder.decode(update_msg(16393, ("7", "n", "t"), old, kind))
    assert msg == Update(decoder.relations[16393], old, expected_kind, ("7", "n", "t"))


@pytest.mark.parametrize(("kind", "expected"), [(b"K", "K"), (b"O", "O")])
def test_decode_returns_delete_with_old_kind_when_given_delete(decoder: Decoder, kind, expected):
    msg = decoder.decode(delete_msg(16393, ("7", None, None), kind))
    assert msg == Delete(decoder.relations[16393], ("7", None, None), expected)


@pytest.mark.parametrize(
    ("options", "cascade", "restart"),
    [(0, False, False), (1, True, False), (2, False, True), (3, True, True)],
)
def test_decode_reads_truncate_options_when_given_truncate(decoder: Decoder, options, cascade, restart):
    data = b"T" + struct.pack(">IB", 2, options) + struct.pack(">II", 16393, 16408)
    msg = decoder.decode(data)
    assert msg == Truncate((decoder.relations[16393], decoder.relations[16408]), cascade, restart)


@pytest.mark.parametrize("flags", [0, 1])
def test_decode_returns_logical_message_when_given_message(flags):
    data = b"M" + struct.pack(">BQ", flags, 99) + cstr("syncagent") + struct.pack(">I", 3) + b"\x00hi"
    assert Decoder().decode(data) == LogicalMessage(bool(flags), 99, "syncagent", b"\x00hi")


@pytest.mark.parametrize("wrap", [bytearray, memoryview])
def test_decode_accepts_buffer_types_when_given_non_bytes(decoder: Decoder, wrap):
    msg = decoder.decode(wrap(insert_msg(16393, "1", "a", "b")))
    assert isinstance(msg, Insert)
    assert msg.new == ("1", "a", "b")


def test_decode_row_decodes_like_decode_when_used_on_the_hot_path(decoder: Decoder):
    data = insert_msg(16393, "1", "a", UNCHANGED)
    assert decoder.decode_row(data) == decoder.decode(data)


# --- relation metadata across the stream ----------------------------------------------------


def test_decode_uses_the_newest_relation_when_relation_changes_mid_stream():
    d = Decoder()
    old_rel = d.decode(relation_msg(7, "app", "ledger", [("id", 20, True), ("amount", 1700, False)]))
    before = d.decode(insert_msg(7, "1", "2.00"))
    new_rel = d.decode(
        relation_msg(7, "app", "ledger", [("id", 20, True), ("amount", 1700, False), ("memo", 25, False)])
    )
    after = d.decode(insert_msg(7, "2", "3.00", "hello"))
    assert isinstance(before, Insert) and isinstance(after, Insert)
    assert before.relation is old_rel
    assert after.relation is new_rel
    assert [c.name for c in after.relation.columns] == ["id", "amount", "memo"]
    assert d.relations[7] is new_rel
    with pytest.raises(PgOutputDecodeError, match="2 columns, relation 7 has 3"):
        d.decode(insert_msg(7, "3", "4.00"))


def test_decode_keeps_relations_across_calls_when_dml_has_no_relation_before_it(decoder: Decoder):
    for i in range(3):
        msg = decoder.decode(insert_msg(16408, str(i), "1.00"))
        assert isinstance(msg, Insert)
        assert msg.relation.name == "ledger"


@pytest.mark.parametrize(
    "data",
    [
        insert_msg(99, "1"),
        update_msg(99, ("1",)),
        delete_msg(99, ("1",)),
        b"T" + struct.pack(">IB", 1, 0) + struct.pack(">I", 99),
    ],
    ids=["insert", "update", "delete", "truncate"],
)
def test_decode_raises_when_relation_id_is_unknown(decoder: Decoder, data):
    with pytest.raises(PgOutputDecodeError, match="unknown relation id 99") as info:
        decoder.decode(data)
    assert info.value.offset in (1, 6)


# --- malformed input ------------------------------------------------------------------------

VALID = {
    "begin": BEGIN,
    "commit": COMMIT,
    "origin": ORIGIN,
    "type": TYPE,
    "relation": CUSTOMER,
    "insert": insert_msg(16393, "1", None, UNCHANGED),
    "insert_binary": insert_msg(16393, "1", b"\x01\x02", "x"),
    "update": update_msg(16393, ("1", "a", "b")),
    "update_key": update_msg(16393, ("2", "a", "b"), ("1", None, None)),
    "delete": delete_msg(16393, ("1", None, None)),
    "truncate": TRUNCATE,
    "message": MESSAGE,
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_decode_raises_decode_error_when_message_is_truncated_anywhere(decoder: Decoder, name):
    data = VALID[name]
    decoder.decode(data)  # the whole message is fine
    for cut in range(len(data)):
        with pytest.raises(PgOutputDecodeError) as info:
            decoder.decode(data[:cut])
        assert 0 <= info.value.offset <= cut


@pytest.mark.parametrize("name", sorted(VALID))
def test_decode_raises_decode_error_when_bytes_trail_the_message(decoder: Decoder, name):
    with pytest.raises(PgOutputDecodeError, match="trailing|bytes, expected|truncated"):
        decoder.decode(VALID[name] + b"\x00")


@pytest.mark.parametrize(
    ("data", "match", "offset"),
    [
        (b"", "empty message", 0),
        (b"S\x00\x00\x00\x01", r"unknown message tag 0x53 \('S'\)", 0),
        (b"\x00", "unknown message tag 0x00", 0),
        (b"I" + struct.pack(">I", 16393) + b"X" + tuple_data("1", "2", "3"), "without 'N'", 5),
        (b"U" + struct.pack(">I", 16393) + b"X" + tuple_data("1", "2", "3"), "Update without", 5),
        (b"D" + struct.pack(">I", 16393) + b"N" + tuple_data("1", "2", "3"), "Delete without", 5),
        (
            b"U"
            + struct.pack(">I", 16393)
            + b"K"
            + tuple_data("1", None, None)
            + b"X"
            + tuple_data("1", "2", "3"),
            "Update without 'N'",
            16,
        ),
        (b"I" + struct.pack(">I", 16393) + b"N" + struct.pack(">H", 1) + b"z", "column kind 0x7a", 8),
        (insert_msg(16393, "1", "ok", "x") + b"", None, None),
        (relation_msg(1, "a", "b", [("c", 23, False)], ident="z"), "unknown replica identity", None),
        (b"R" + struct.pack(">I", 1) + b"app", "unterminated relation namespace", 5),
    ],
    ids=lambda v: None if isinstance(v, bytes) else str(v),
)
def test_decode_raises_decode_error_with_offset_when_message_is_malformed(
    decoder: Decoder, data, match, offset
):
    if match is None:
        assert isinstance(decoder.decode(data), Insert)
        return
    with pytest.raises(PgOutputDecodeError, match=match) as info:
        decoder.decode(data)
    if offset is not None:
        assert info.value.offset == offset
    assert f"at byte offset {info.value.offset}" in str(info.value)


def test_decode_raises_decode_error_with_offset_when_text_is_not_utf8(decoder: Decoder):
    data = insert_msg(16393, "1", "ok", "x")[:-1] + b"\xff"
    with pytest.raises(PgOutputDecodeError, match="not valid UTF-8") as info:
        decoder.decode(data)
    assert info.value.offset == len(data) - 1


def test_decode_raises_decode_error_when_relation_name_is_not_utf8():
    with pytest.raises(PgOutputDecodeError, match="relation name is not valid UTF-8"):
        Decoder().decode(b"R" + struct.pack(">I", 1) + cstr("app") + b"\xc3(\0d\0\0")


def test_decode_raises_decode_error_when_timestamp_is_out_of_range():
    with pytest.raises(PgOutputDecodeError, match="timestamp out of range") as info:
        Decoder().decode(b"B" + struct.pack(">QqI", 1, 2**62, 1))
    assert info.value.offset == 9


def test_decode_error_is_a_permanent_error_when_caught_by_the_connector():
    with pytest.raises(PermanentError):
        Decoder().decode(b"?")


# --- sentinel and LSN text ------------------------------------------------------------------


def test_unchanged_keeps_identity_when_pickled_or_copied():
    assert pickle.loads(pickle.dumps(UNCHANGED)) is UNCHANGED
    assert copy.deepcopy((UNCHANGED,))[0] is UNCHANGED
    assert repr(UNCHANGED) == "<unchanged>"


@pytest.mark.parametrize(
    ("lsn", "text"),
    [
        (0, "0/0"),
        (0x16B3748, "0/16B3748"),
        (0xDEADBEEF, "0/DEADBEEF"),
        ((1 << 32) | 0x1A, "1/1A"),
        ((1 << 64) - 1, "FFFFFFFF/FFFFFFFF"),
    ],
)
def test_lsn_text_matches_postgres_when_formatted_and_parsed(lsn, text):
    assert lsn_to_str(lsn) == text
    assert str_to_lsn(text) == lsn
    assert str_to_lsn(text.lower()) == lsn


@pytest.mark.parametrize("text", ["", "0", "/1", "1/", "0/123456789", "g/1", "0/-1", "0/ 1", "0/1/2", "０/1"])
def test_str_to_lsn_raises_value_error_when_text_is_not_an_lsn(text):
    with pytest.raises(ValueError):
        str_to_lsn(text)


@pytest.mark.parametrize("lsn", [-1, 1 << 64])
def test_lsn_to_str_raises_value_error_when_lsn_is_out_of_range(lsn):
    with pytest.raises(ValueError):
        lsn_to_str(lsn)


# --- golden captures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def capture() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pgoutput_capture", CAPTURE_DIR / "capture.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def golden(capture: ModuleType) -> list[tuple[str, object]]:
    d = Decoder()
    return [(lsn, d.decode(data)) for lsn, _xid, data in capture.read_capture(capture.GOLDEN)]


def _kinds(golden: list[tuple[str, object]]) -> str:
    letters = {
        Begin: "B",
        Commit: "C",
        Origin: "O",
        TypeInfo: "Y",
        Relation: "R",
        Insert: "I",
        Update: "U",
        Delete: "D",
        Truncate: "T",
    }
    return "".join(letters[type(m)] for _lsn, m in golden)


def test_golden_decodes_every_message_when_read_without_a_database(golden):
    assert _kinds(golden) == (
        "BYRIIC"  # customers: Type for the enum, Relation, two inserts
        "BYRIIC"  # arrays: Type for the enum array
        "BUC"
        "BUC"
        "BDC"  # unchanged TOAST, key change, delete
        "BRIIUDC"  # ledger, REPLICA IDENTITY FULL
        "BIRIUC"  # ADD COLUMN mid-transaction: a new Relation between inserts
        "BRIUUDC"  # contact, REPLICA IDENTITY USING INDEX
        "BOIC"  # written under the replication origin
        "BIC"  # the transactional logical message is not sent without 'messages'
        "BRYRTC"  # TRUNCATE of two tables
        "BRTC"
    )


def test_golden_transactions_pair_begin_and_commit_lsns_when_decoded(golden):
    begins = [m for _lsn, m in golden if isinstance(m, Begin)]
    commits = [(lsn, m) for lsn, m in golden if isinstance(m, Commit)]
    assert len(begins) == len(commits) == 12
    for begin, (lsn, commit) in zip(begins, commits, strict=True):
        assert begin.final_lsn == commit.commit_lsn
        assert begin.commit_ts == commit.commit_ts
        assert lsn == lsn_to_str(commit.end_lsn)  # the row's lsn is the advance target
        assert commit.end_lsn > commit.commit_lsn
    assert [b.xid for b in begins] == sorted(b.xid for b in begins)


def test_golden_keeps_unchanged_toast_when_update_leaves_the_note_alone(golden, capture):
    updates = [m for _lsn, m in golden if isinstance(m, Update) and m.relation.name == "customer"]
    inserted = next(m for _lsn, m in golden if isinstance(m, Insert) and m.relation.name == "customer")
    assert inserted.new[-1] == capture.long_note()
    for u in updates:
        assert u.new[-1] is UNCHANGED
    assert updates[0].old is None and updates[0].old_kind is None
    assert updates[0].new[:2] == ("1", "Acme GmbH")
    assert updates[0].new[6] == "43"


def test_golden_sends_only_the_key_when_the_primary_key_changes(golden):
    key_change = [m for _lsn, m in golden if isinstance(m, Update) and m.relation.name == "customer"][1]
    assert key_change.old_kind == "K"
    assert key_change.old is not None
    assert key_change.old[0] == "1" and set(key_change.old[1:]) == {None}
    assert key_change.new[0] == "100"
    delete = next(m for _lsn, m in golden if isinstance(m, Delete) and m.relation.name == "customer")
    assert delete.old_kind == "K" and delete.old[0] == "2" and set(delete.old[1:]) == {None}


def test_golden_sends_the_full_old_row_when_replica_identity_is_full(golden):
    ledger = [m for _lsn, m in golden if isinstance(m, Update | Delete) and m.relation.name == "ledger"]
    first_update, delete, second_update = ledger
    assert isinstance(first_update, Update) and isinstance(second_update, Update)
    assert first_update.relation.replident == "f"
    assert all(c.is_key for c in first_update.relation.columns)
    assert first_update.old_kind == "O"
    assert first_update.old == ("1", "4000", "100.00", "2026-11-30")
    assert first_update.new == ("1", "4000", "100.01", "2026-11-30")
    assert delete.old_kind == "O" and delete.old == ("2", "4010", "-5.25", None)
    assert second_update.old == ("3", "5000", "1.00", None, None)
    assert second_update.new == ("3", "5000", "1.00", None, "patched")


def test_golden_replaces_the_relation_when_a_column_is_added_mid_transaction(golden):
    inserts = [m for _lsn, m in golden if isinstance(m, Insert) and m.relation.name == "ledger"]
    assert [len(m.relation.columns) for m in inserts] == [4, 4, 4, 5]
    assert inserts[2].new == ("3", "5000", "1.00", None)
    assert inserts[3].new == ("4", "5010", "2.00", None, "after alter")
    assert inserts[3].relation.columns[-1] == Column("memo", 25, -1, True)


def test_golden_marks_the_index_key_when_replica_identity_uses_an_index(golden):
    contact = [m for _lsn, m in golden if isinstance(m, Update | Delete) and m.relation.name == "contact"]
    assert contact[0].relation.replident == "i"
    assert [c.is_key for c in contact[0].relation.columns] == [False, True, False]
    assert contact[0].old_kind == "K" and contact[0].old == (None, "a@example.com", None)
    assert contact[1].old is None
    assert contact[2].old == (None, "ann@example.com", None)


def test_golden_tags_the_transaction_when_written_under_a_replication_origin(golden):
    i = next(i for i, (_lsn, m) in enumerate(golden) if isinstance(m, Origin))
    assert isinstance(golden[i - 1][1], Begin)
    assert golden[i][1] == Origin(origin_lsn=0xDEADBEEF, name="syncagent")
    assert golden[i + 1][1].new[:2] == ("3", "written by the agent")
    assert sum(isinstance(m, Origin) for _lsn, m in golden) == 1


def test_golden_reports_truncate_flags_and_types_when_decoded(golden):
    truncates = [m for _lsn, m in golden if isinstance(m, Truncate)]
    assert [(tuple(r.name for r in t.relations), t.cascade, t.restart_identity) for t in truncates] == [
        (("ledger", "arrays"), True, True),
        (("contact",), False, False),
    ]
    assert {(m.namespace, m.name) for _lsn, m in golden if isinstance(m, TypeInfo)} == {
        ("app", "mood"),
        ("app", "_mood"),
    }


def test_golden_decodes_logical_messages_when_captured_with_messages_on(capture):
    d = Decoder()
    decoded = [d.decode(data) for _lsn, _xid, data in capture.read_capture(capture.MESSAGES)]
    msgs = [m for m in decoded if isinstance(m, LogicalMessage)]
    assert len(msgs) == len(decoded)
    assert [(m.transactional, m.prefix, m.content) for m in msgs] == [
        (True, "syncagent", b"in-transaction"),
        (False, "syncagent", b"\x00\xff"),
    ]
