"""Fuzzing: whatever bytes or text arrive, only PgOutputDecodeError / PgValueError escape."""

from __future__ import annotations

import importlib.util
import struct
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.postgres.pgoutput import UNCHANGED, Decoder, Insert, PgOutputDecodeError
from connectors.postgres.values import ARRAY_ELEMENT_OIDS, SCALAR_OIDS, PgValueError, converter_for

CAPTURE_DIR = Path(__file__).resolve().parents[1] / "data" / "pgoutput"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _golden_messages() -> list[bytes]:
    spec = importlib.util.spec_from_file_location("pgoutput_capture", CAPTURE_DIR / "capture.py")
    assert spec is not None and spec.loader is not None
    capture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(capture)
    return [data for _lsn, _xid, data in capture.read_capture(capture.GOLDEN)]


GOLDEN = _golden_messages()


def _primed_decoder() -> Decoder:
    """A decoder that has seen every Relation and Type of the golden stream."""
    d = Decoder()
    for data in GOLDEN:
        if data[:1] in (b"R", b"Y"):
            d.decode(data)
    return d


def _decode_or_decode_error(d: Decoder, data: bytes) -> None:
    try:
        d.decode(data)
    except PgOutputDecodeError as exc:
        assert 0 <= exc.offset <= len(data)


TAGS = st.sampled_from(b"BCDIMORTUY")


@FUZZ
@given(tag=TAGS, body=st.binary(max_size=64))
def test_decode_raises_only_decode_error_when_bytes_are_random(tag, body):
    d = _primed_decoder()
    _decode_or_decode_error(d, bytes([tag]) + body)


@FUZZ
@given(data=st.binary(max_size=32))
def test_decode_raises_only_decode_error_when_even_the_tag_is_random(data):
    _decode_or_decode_error(_primed_decoder(), data)


@st.composite
def mutated_golden(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(GOLDEN)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            del data[pos : pos + draw(st.integers(1, 8))]
    return bytes(data)


@FUZZ
@given(data=mutated_golden())
def test_decode_raises_only_decode_error_when_valid_messages_are_mutated(data):
    _decode_or_decode_error(_primed_decoder(), data)


COLUMN_VALUES = st.one_of(
    st.none(),
    st.just(UNCHANGED),
    st.text(max_size=20),
    st.binary(max_size=20),
)


@FUZZ
@given(values=st.lists(COLUMN_VALUES, min_size=1, max_size=12))
def test_decode_round_trips_tuple_values_when_insert_is_well_formed(values):
    ncols = len(values)
    rel = b"R" + struct.pack(">I", 1) + b"s\0t\0d" + struct.pack(">H", ncols)
    rel += b"".join(b"\0c%d\0" % i + struct.pack(">Ii", 25, -1) for i in range(ncols))
    tup = struct.pack(">H", ncols)
    for v in values:
        if v is None:
            tup += b"n"
        elif v is UNCHANGED:
            tup += b"u"
        elif isinstance(v, bytes):
            tup += b"b" + struct.pack(">I", len(v)) + v
        else:
            raw = v.encode()
            tup += b"t" + struct.pack(">I", len(raw)) + raw
    d = Decoder()
    d.decode(rel)
    msg = d.decode(b"I" + struct.pack(">I", 1) + b"N" + tup)
    assert isinstance(msg, Insert)
    assert len(msg.new) == ncols
    for got, want in zip(msg.new, values, strict=True):
        assert got is want if want is None or want is UNCHANGED else got == want


# --- converters -----------------------------------------------------------------------------

CONVERTED_OIDS = sorted(set(SCALAR_OIDS) | {1000, 1007, 1009, 1016, 1182, 1185, 1231, 1020, 3807, 1001})
ARRAYISH = st.text(alphabet='{},;"\\ NULnul0123456789.-[]:=abctf\u00eb', max_size=40)


def _convert_or_value_error(oid: int, text: str) -> None:
    conv = converter_for(oid)
    assert conv is not None
    try:
        conv(text)
    except PgValueError:
        pass


@FUZZ
@given(oid=st.sampled_from(CONVERTED_OIDS), text=st.text(max_size=40))
def test_converters_raise_only_pg_value_error_when_text_is_random(oid, text):
    _convert_or_value_error(oid, text)


@FUZZ
@given(oid=st.sampled_from(sorted(ARRAY_ELEMENT_OIDS)), text=ARRAYISH)
def test_array_converters_raise_only_pg_value_error_when_literal_is_random(oid, text):
    _convert_or_value_error(oid, text)


def _quote(v: str | None) -> str:
    if v is None:
        return "NULL"
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _literal(items: list) -> str:
    return "{" + ",".join(_literal(i) if isinstance(i, list) else _quote(i) for i in items) + "}"


ELEMENTS = st.one_of(st.none(), st.text(max_size=8))
RECTANGULAR = st.one_of(
    st.lists(ELEMENTS, min_size=1, max_size=5),
    st.integers(1, 3).flatmap(
        lambda n: st.lists(st.lists(ELEMENTS, min_size=n, max_size=n), min_size=1, max_size=4)
    ),
)


@FUZZ
@given(items=RECTANGULAR)
def test_text_array_round_trips_when_every_element_is_quoted(items):
    conv = converter_for(1009)
    assert conv is not None
    assert conv(_literal(items)) == items


@pytest.mark.parametrize("oid", [1184, 1114, 1082])
@FUZZ
@given(when=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)))
def test_time_converters_round_trip_when_text_is_iso(oid, when):
    text = {1184: when.isoformat(" ") + "+00", 1114: when.isoformat(" "), 1082: when.date().isoformat()}[oid]
    conv = converter_for(oid)
    assert conv is not None
    value = conv(text)
    assert value == {1184: when.replace(tzinfo=UTC), 1114: when, 1082: when.date()}[oid]
