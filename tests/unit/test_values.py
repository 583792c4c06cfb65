"""Text-format PostgreSQL values to Python: scalars, arrays, errors, and the golden capture rows."""

from __future__ import annotations

import importlib.util
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from types import ModuleType

import pytest

from agent.errors import DataError
from connectors.postgres.pgoutput import UNCHANGED, Column, Decoder, Delete, Insert, TypeInfo, Update
from connectors.postgres.values import (
    ARRAY_ELEMENT_OIDS,
    SCALAR_OIDS,
    PgValueError,
    convert_row,
    converter_for,
    row_converters,
)

CAPTURE_DIR = Path(__file__).resolve().parents[1] / "data" / "pgoutput"
IST = timezone(timedelta(hours=5, minutes=30))


def convert(oid: int, text: str, typname: str | None = None) -> object:
    conv = converter_for(oid, typname)
    assert conv is not None
    return conv(text)


@pytest.mark.parametrize(
    ("oid", "text", "expected"),
    [
        (21, "-7", -7),
        (23, "42", 42),
        (20, "9007199254740993", 9007199254740993),
        (26, "4294967295", 4294967295),
        (16, "t", True),
        (16, "f", False),
        (1700, "1234.50", Decimal("1234.50")),
        (1700, "-0.000001", Decimal("-0.000001")),
        (1700, "Infinity", Decimal("Infinity")),
        (1700, "-Infinity", Decimal("-Infinity")),
        (701, "0.1", Decimal("0.1")),
        (701, "1e+30", Decimal("1e+30")),
        (701, "-Infinity", Decimal("-Infinity")),
        (700, "1.5", Decimal("1.5")),
        (1082, "2024-02-29", date(2024, 2, 29)),
        (1082, "infinity", "infinity"),
        (1082, "-infinity", "-infinity"),
        (1082, "4713-01-01 BC", "4713-01-01 BC"),
        (1082, "5874897-12-31", "5874897-12-31"),
        (1114, "2026-12-01 07:50:30", datetime(2026, 12, 1, 7, 50, 30)),
        (1114, "2026-12-01 07:50:30.5", datetime(2026, 12, 1, 7, 50, 30, 500000)),
        (1114, "2026-12-01 07:50:30.000001", datetime(2026, 12, 1, 7, 50, 30, 1)),
        (1114, "0044-03-15 12:00:00 BC", "0044-03-15 12:00:00 BC"),
        (1114, "294276-12-31 23:59:59", "294276-12-31 23:59:59"),
        (1114, "-infinity", "-infinity"),
        (1184, "2026-12-01 07:50:30.123456+00", datetime(2026, 12, 1, 7, 50, 30, 123456, tzinfo=UTC)),
        (1184, "2026-12-01 13:20:30+05:30", datetime(2026, 12, 1, 7, 50, 30, tzinfo=UTC)),
        (1184, "2026-12-01 04:50:30-03", datetime(2026, 12, 1, 7, 50, 30, tzinfo=UTC)),
        (1184, "1800-01-01 05:53:28+05:53:28", datetime(1800, 1, 1, tzinfo=UTC)),
        (1184, "0001-01-01 00:00:00+05:30", "0001-01-01 00:00:00+05:30"),
        (1184, "0044-03-15 17:53:28+05:53:28 BC", "0044-03-15 17:53:28+05:53:28 BC"),
        (1184, "10000-01-01 05:30:00+05:30", "10000-01-01 05:30:00+05:30"),
        (1184, "infinity", "infinity"),
        (114, '{"a" : 1}', {"a": 1}),
        (
            3802,
            '{"limit": 1000.10, "ok": true, "n": null}',
            {"limit": Decimal("1000.10"), "ok": True, "n": None},
        ),
        (3802, '[1, 2.5, "x"]', [1, Decimal("2.5"), "x"]),
        (3802, "1" * 5000, Decimal("1" * 5000)),
        (17, "\\x00ff10", b"\x00\xff\x10"),
        (17, "\\x", b""),
        (17, "\\000\\377\\\\A \\012", b"\x00\xff\\A \n"),
        (17, "plain", b"plain"),
    ],
)
def test_converter_returns_python_value_when_text_is_postgres_output(oid, text, expected):
    value = convert(oid, text)
    assert value == expected
    assert type(value) is type(expected)


def test_converter_returns_aware_utc_when_timestamptz_has_any_offset():
    value = convert(1184, "2026-12-01 13:20:30.5+05:30")
    assert isinstance(value, datetime)
    assert value.tzinfo is UTC
    assert value == datetime(2026, 12, 1, 13, 20, 30, 500000, tzinfo=IST)


def test_converter_returns_naive_datetime_when_type_is_timestamp():
    value = convert(1114, "2026-12-01 07:50:30")
    assert isinstance(value, datetime) and value.tzinfo is None


@pytest.mark.parametrize("oid", [700, 701, 1700])
def test_converter_never_returns_float_when_type_is_numeric_or_floating(oid):
    value = convert(oid, "0.1")
    assert isinstance(value, Decimal)
    assert value + Decimal("0.2") == Decimal("0.3")


def test_converter_keeps_nan_when_numeric_text_is_nan():
    value = convert(1700, "NaN")
    assert isinstance(value, Decimal) and value.is_nan()


def test_json_converter_parses_floats_as_decimal_when_nested():
    assert convert(3802, '{"k": [1, {"z": 2.50}]}') == {"k": [1, {"z": Decimal("2.50")}]}


@pytest.mark.parametrize(
    ("oid", "typname"),
    [
        (25, None),  # text
        (1043, None),  # varchar
        (1042, None),  # bpchar
        (19, None),  # name
        (2950, None),  # uuid: the canonical text is the value
        (1083, None),  # time
        (1186, None),  # interval
        (790, None),  # money
        (22, None),  # int2vector prints space-separated, not as an array literal
        (16387, "mood"),  # an enum
        (99999, None),  # anything unknown
    ],
)
def test_converter_for_returns_none_when_text_is_the_value(oid, typname):
    assert converter_for(oid, typname) is None


# --- arrays ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("oid", "text", "expected"),
    [
        (1007, "{1,NULL,3}", [1, None, 3]),
        (1007, "{}", []),
        (1007, "{{1,2},{3,4}}", [[1, 2], [3, 4]]),
        (1007, "[0:2]={7,8,9}", [7, 8, 9]),
        (1007, "[1:2][0:0]={{5},{6}}", [[5], [6]]),
        (1007, "{ 1 , 2 }", [1, 2]),
        (1016, "{9007199254740993}", [9007199254740993]),
        (1231, "{1.10,NaN,-2}", [Decimal("1.10"), Decimal("NaN"), Decimal("-2")]),
        (1000, "{t,f,NULL}", [True, False, None]),
        (1015, '{"NULL",NULL,"","a,b"}', ["NULL", None, "", "a,b"]),
        (
            1009,
            '{"say \\"hi\\"","back\\\\slash","{braces}"," padded ",Zoë}',
            ['say "hi"', "back\\slash", "{braces}", " padded ", "Zoë"],
        ),
        (1009, '{{"a b",NULL},{"NULL","x\\\\y"}}', [["a b", None], ["NULL", "x\\y"]]),
        (1009, '{""}', [""]),
        (1009, "{null,Null}", [None, None]),
        (1009, "{a\\,b,c\\ }", ["a,b", "c "]),
        (2951, "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}", ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
        (1182, "{2024-02-29,infinity}", [date(2024, 2, 29), "infinity"]),
        (1185, '{"2026-12-01 13:20:30+05:30",NULL}', [datetime(2026, 12, 1, 7, 50, 30, tzinfo=UTC), None]),
        (3807, '{"{\\"k\\": [1, {\\"z\\": 2.50}]}",null}', [{"k": [1, {"z": Decimal("2.50")}]}, None]),
        (1001, '{"\\\\x01ff"}', [b"\x01\xff"]),
        (1020, "{(3,4),(1,2);(1,1),(0,0)}", ["(3,4),(1,2)", "(1,1),(0,0)"]),
    ],
)
def test_array_converter_returns_nested_lists_when_text_is_an_array_literal(oid, text, expected):
    assert repr(convert(oid, text)) == repr(expected)


def test_array_converter_reads_strings_when_user_array_type_is_named_with_underscore():
    assert convert(16386, "{happy,sad,NULL}", "_mood") == ["happy", "sad", None]


@pytest.mark.parametrize("oid", [1000, 1007, 1009, 1015, 1016, 1182, 1185, 1231, 2951, 3807])
def test_array_table_knows_the_element_type_when_array_is_listed_in_the_brief(oid):
    assert oid in ARRAY_ELEMENT_OIDS
    assert converter_for(oid) is not None


# --- malformed text -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("oid", "text"),
    [
        (23, "forty-two"),
        (23, ""),
        (20, "1.5"),
        (16, "true"),
        (16, ""),
        (1700, "12,50"),
        (701, "one"),
        (1082, "2023-02-29"),
        (1082, "01/02/2026"),
        (1082, "2026-W01-1"),
        (1114, "2026-12-01T07:50:30+00"),
        (1114, "2026-12-01 07:50:30+00"),
        (1114, "2026-13-01 07:50:30"),
        (1184, "2026-12-01 07:50:30"),
        (1184, "2026-12-01 07:50:30+24"),
        (114, "{not json"),
        (3802, "NaN"),
        (3802, "[" * 100_000),
        (17, "\\xzz"),
        (17, "\\x0"),
        (17, "bad\\9escape"),
        (17, "\u20ac"),
        (1007, "1,2"),
        (1007, "{1,2"),
        (1007, "{1,,2}"),
        (1007, "{1,x}"),
        (1007, "{{1,2},{3}}"),
        (1007, "{1,{2}}"),
        (1007, "{1} trailing"),
        (1007, "[1:3]={1,2}"),
        (1007, "[2:1]={}"),
        (1007, "[1:2={1,2}"),
        (1009, '{"unterminated}'),
        (1009, '{a"b}'),
        (1009, "{{{{{{{1}}}}}}}"),
        (1009, "{a\\"),
    ],
)
def test_converter_raises_pg_value_error_without_the_value_when_text_is_malformed(oid, text):
    conv = converter_for(oid)
    assert conv is not None
    with pytest.raises(PgValueError) as info:
        conv(text)
    assert isinstance(info.value, DataError)
    if len(text) > 3:
        assert text not in str(info.value)


# --- rows -----------------------------------------------------------------------------------

COLUMNS = (
    Column("id", 20, -1, True),
    Column("amount", 1700, -1, False),
    Column("notes", 25, -1, False),
    Column("blob", 17, -1, False),
    Column("mood", 16387, -1, False),
)


def test_row_converters_picks_one_per_column_when_given_a_relation():
    convs = row_converters(COLUMNS, {16387: TypeInfo(16387, "app", "mood")})
    assert len(convs) == 5
    assert convs[2] is None and convs[4] is None
    assert convs[0] is converter_for(20)


def test_convert_row_passes_none_unchanged_and_binary_through_when_converting():
    convs = row_converters(COLUMNS)
    row = convert_row(convs, ("7", None, UNCHANGED, b"\x01", "happy"), record="app.t")
    assert row == (7, None, UNCHANGED, b"\x01", "happy")
    assert row[2] is UNCHANGED


def test_convert_row_names_record_and_field_when_a_value_is_malformed():
    convs = row_converters(COLUMNS)
    with pytest.raises(PgValueError) as info:
        convert_row(
            convs,
            ("7", "12,50 secret", None, None, None),
            record="app.ledger",
            fields=[c.name for c in COLUMNS],
        )
    assert info.value.record == "app.ledger"
    assert info.value.field == "amount"
    assert "secret" not in str(info.value)


def test_convert_row_raises_pg_value_error_when_widths_differ():
    with pytest.raises(PgValueError, match="2 values for 5 columns"):
        convert_row(row_converters(COLUMNS), ("1", "2"), record="app.t")


def test_oid_tables_name_builtin_types_when_read():
    assert SCALAR_OIDS[1184] == "timestamptz"
    assert ARRAY_ELEMENT_OIDS[1185] == 1184


# --- golden capture, converted --------------------------------------------------------------


@pytest.fixture(scope="module")
def golden_rows() -> list[tuple[str, tuple[object, ...] | None, tuple[object, ...]]]:
    spec = importlib.util.spec_from_file_location("pgoutput_capture", CAPTURE_DIR / "capture.py")
    assert spec is not None and spec.loader is not None
    capture: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(capture)
    d = Decoder()
    out = []
    for _lsn, _xid, data in capture.read_capture(capture.GOLDEN):
        msg = d.decode(data)
        if isinstance(msg, Insert | Update | Delete):
            rel = msg.relation
            convs = row_converters(rel.columns, d.types)
            names = [c.name for c in rel.columns]
            old = getattr(msg, "old", None)
            new = msg.old if isinstance(msg, Delete) else msg.new
            conv_old = convert_row(convs, old, record=rel.qualified_name, fields=names) if old else None
            out.append((rel.name, conv_old, convert_row(convs, new, record=rel.qualified_name, fields=names)))
    return out


def test_golden_converts_every_customer_type_when_decoded(golden_rows):
    _name, _old, first = golden_rows[0]
    assert first[:-1] == (
        1,
        "Acme GmbH",
        "AC-1",
        "A  ",
        True,
        -7,
        42,
        9007199254740993,
        Decimal("1234.50"),
        Decimal("0.1"),
        Decimal("1.5"),
        date(2024, 2, 29),
        datetime(2026, 12, 1, 7, 50, 30, 500000),
        datetime(2026, 12, 1, 7, 50, 30, 123456, tzinfo=UTC),
        "08:30:00",
        "1 day 02:03:04",
        "$12.34",
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        {"tier": "gold", "limit": Decimal("1000.10"), "tags": ["a", "b"], "ok": True, "none": None},
        {"a": 1},
        b"\x00\xff\x10",
        "happy",
    )
    assert isinstance(first[-1], str) and len(first[-1]) == 5000


def test_golden_keeps_edge_values_when_python_cannot_hold_them(golden_rows):
    _name, _old, second = golden_rows[1]
    assert second[1] == 'Zoë "Q" O\'Brien, {x}\\'
    assert second[2] == ""
    price, ratio, ratio4 = second[8:11]
    assert isinstance(price, Decimal) and price.is_nan()
    assert (ratio, ratio4) == (Decimal("Infinity"), Decimal("-Infinity"))
    assert second[11:14] == ("infinity", "0044-03-15 12:00:00 BC", "-infinity")
    assert second[18] == {
        "nested": {"list": [1, Decimal("2.5"), None, True, "x"]},
        "big": 123456789012345678901234567890,
    }
    assert second[20] == b""


def test_golden_converts_arrays_when_decoded(golden_rows):
    _name, _old, row = golden_rows[2]
    assert repr(row) == repr(
        (
            1,
            [1, None, 3],
            [9007199254740993],
            [Decimal("1.10"), Decimal("NaN"), Decimal("-2")],
            [True, False, None],
            ["NULL", None, "", "a,b"],
            ['say "hi"', "back\\slash", "{braces}", " padded ", "Zoë"],
            ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"],
            [date(2024, 2, 29), "infinity"],
            [datetime(2026, 12, 1, 7, 50, 30, tzinfo=UTC), None],
            [{"k": [1, {"z": Decimal("2.50")}]}, None],
            ["happy", "sad"],
            [[1, 2], [3, 4]],
        )
    )
    _name, _old, decorated = golden_rows[3]
    assert decorated == (2, [7, 8, 9], None, [], None, None, [], None, None, None, None, None, [[5], [6]])


def test_golden_converts_offset_timestamps_to_utc_when_written_with_an_offset(golden_rows):
    _name, old, updated = golden_rows[4]
    assert old is None
    assert updated[13] == datetime(2026, 12, 1, 6, 50, 30, 500000, tzinfo=UTC)
    assert updated[6] == 43
    assert updated[-1] is UNCHANGED
