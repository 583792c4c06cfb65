"""connectors.postgres.rows: compiled readers agree with the general decoder, or step aside."""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.model import Change
from connectors.postgres.pgoutput import Decoder, Delete, Insert, Update
from connectors.postgres.rows import compile_reader
from connectors.postgres.values import convert_row, converter_for

# id int8, name text, amount numeric, at timestamptz, flag bool
OIDS = (20, 25, 1700, 1184, 16)
NAMES = ("id", "name", "amount", "at", "flag")
FAST = ("int", None, "decimal", "memo", None)
CONVERTERS = tuple(converter_for(o) for o in OIDS)


def _col(value: str | None) -> bytes:
    if value is None:
        return b"n"
    raw = value.encode()
    return b"t" + struct.pack(">I", len(raw)) + raw


def _tuple(values: tuple[str | None, ...]) -> bytes:
    return struct.pack(">H", len(values)) + b"".join(_col(v) for v in values)


def _relation() -> bytes:
    cols = b"".join(
        bytes([1 if n == "id" else 0]) + n.encode() + b"\0" + struct.pack(">Ii", oid, -1)
        for n, oid in zip(NAMES, OIDS, strict=True)
    )
    return b"R" + struct.pack(">I", 7) + b"public\0t\0d" + struct.pack(">H", len(NAMES)) + cols


def _reader():  # type: ignore[no-untyped-def]
    return compile_reader(
        source="erp", stream="wal", object_name="public.t", names=NAMES, converters=CONVERTERS,
        fast=FAST, key=(0,), identity=(0,),
    )  # fmt: skip


def _general(data: bytes) -> tuple[str, dict[str, object]]:
    """What the general path makes of the same message: op and converted fields."""
    d = Decoder()
    d.decode(_relation())
    msg = d.decode(data)
    if isinstance(msg, Delete):
        old = convert_row(CONVERTERS, msg.old)
        cols = (0,) if msg.old_kind == "K" else range(len(NAMES))
        return "delete", {NAMES[i]: old[i] for i in cols}
    assert isinstance(msg, Insert | Update)
    return ("insert" if isinstance(msg, Insert) else "update"), dict(
        zip(NAMES, convert_row(CONVERTERS, msg.new), strict=True)
    )


ROW = ("12", "Ünïcode ✓", "10.50", "2024-05-01 12:00:00.5+02", "t")


@pytest.mark.parametrize(
    ("data", "op"),
    [
        (b"I" + struct.pack(">I", 7) + b"N" + _tuple(ROW), "insert"),
        (b"U" + struct.pack(">I", 7) + b"N" + _tuple(ROW), "update"),
        (b"D" + struct.pack(">I", 7) + b"K" + _tuple(("12", None, None, None, None)), "delete"),
        (b"D" + struct.pack(">I", 7) + b"O" + _tuple(ROW), "delete"),
        (b"I" + struct.pack(">I", 7) + b"N" + _tuple(("12", None, None, None, None)), "insert"),
    ],
)
def test_rows_reader_builds_the_change_the_general_path_builds_when_row_is_plain(
    data: bytes, op: str
) -> None:
    ts = datetime(2024, 5, 1, tzinfo=UTC)
    change = _reader()(data, "0/10:3", "0/10", ts, "syncagent", "trace")
    general_op, general_fields = _general(data)
    assert general_op == op
    assert change == Change(
        source="erp", stream="wal", object_name="public.t", op=op, key={"id": 12}, fields=general_fields,
        position="0/10:3", version="0/10", source_ts=ts, origin="syncagent", trace_id="trace",
    )  # fmt: skip


def test_rows_reader_converts_values_to_python_types_when_columns_have_converters() -> None:
    data = b"I" + struct.pack(">I", 7) + b"N" + _tuple(ROW)
    change = _reader()(data, "p", "v", None, None, "t")
    assert change is not None
    assert change.fields == {
        "id": 12,
        "name": "Ünïcode ✓",
        "amount": Decimal("10.50"),
        "at": datetime(2024, 5, 1, 10, 0, 0, 500000, tzinfo=UTC),
        "flag": True,
    }
    assert change.key == {"id": 12} and change.unchanged == frozenset() and change.old_key is None


@pytest.mark.parametrize(
    "data",
    [
        # unchanged TOAST ('u') in the new tuple
        b"U" + struct.pack(">I", 7) + b"N" + struct.pack(">H", 5) + _col("1") + b"u" + b"".join(_col(v) for v in ROW[2:]),
        # an old key tuple (the key changed)
        b"U" + struct.pack(">I", 7) + b"K" + _tuple(("1", None, None, None, None)) + b"N" + _tuple(ROW),
        # a value its converter rejects (the general path keeps the text and says so)
        b"I" + struct.pack(">I", 7) + b"N" + _tuple(("x1", *ROW[1:])),
        b"I" + struct.pack(">I", 7) + b"N" + _tuple((*ROW[:4], "maybe")),
        # wrong column count, truncated, trailing bytes, invalid UTF-8, unknown marker
        b"I" + struct.pack(">I", 7) + b"N" + _tuple(ROW[:4]),
        (b"I" + struct.pack(">I", 7) + b"N" + _tuple(ROW))[:-3],
        b"I" + struct.pack(">I", 7) + b"N" + _tuple(ROW) + b"x",
        b"I" + struct.pack(">I", 7) + b"N" + _tuple(("1", None, None, None, None)).replace(b"\x00\x00\x00\x011", b"\x00\x00\x00\x01\xff"),
        b"I" + struct.pack(">I", 7) + b"X" + _tuple(ROW),
        b"I",
        b"",
    ],
)  # fmt: skip
def test_rows_reader_returns_none_when_message_needs_the_general_path(data: bytes) -> None:
    assert _reader()(data, "p", "v", None, None, "t") is None


def test_rows_compile_reader_refuses_repeated_column_names_when_compiling() -> None:
    with pytest.raises(ValueError, match="distinct"):
        compile_reader(source="s", stream="wal", object_name="a.b", names=("a", "a"),
                       converters=(None, None), fast=(None, None), key=(0,), identity=(0,))  # fmt: skip


def test_rows_reader_never_puts_column_names_into_its_code_when_names_look_like_code() -> None:
    names = ("id", "x}: 1, **{'y", "__import__('os')")
    reader = compile_reader(source="s", stream="wal", object_name="a.b", names=names,
                            converters=(None, None, None), fast=(None, None, None), key=(0,), identity=(0,))  # fmt: skip
    data = b"I" + struct.pack(">I", 7) + b"N" + _tuple(("1", "a", "b"))
    change = reader(data, "p", "v", None, None, "t")
    assert change is not None and list(change.fields) == list(names)


@given(
    st.lists(
        st.tuples(
            st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1).map(str)),
            st.one_of(st.none(), st.text(max_size=40)),
            st.one_of(st.none(), st.decimals(allow_nan=False, allow_infinity=False, places=3).map(str)),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_rows_reader_agrees_with_decoder_and_converters_when_values_are_arbitrary(
    rows: list[tuple[str | None, str | None, str | None]],
) -> None:
    names, oids = ("id", "t", "n"), (20, 25, 1700)
    converters = tuple(converter_for(o) for o in oids)
    reader = compile_reader(source="s", stream="wal", object_name="a.b", names=names, converters=converters,
                            fast=("int", None, "decimal"), key=(0,), identity=(0,))  # fmt: skip
    for values in rows:
        data = b"I" + struct.pack(">I", 7) + b"N" + _tuple(values)
        change = reader(data, "p", "v", None, None, "t")
        assert change is not None
        expected = [
            None if v is None else conv(v) if conv else v for v, conv in zip(values, converters, strict=True)
        ]
        assert list(change.fields.values()) == expected
