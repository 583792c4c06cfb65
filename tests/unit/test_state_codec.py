"""state.codec: JSON conversions, orjson/stdlib agreement, timestamp columns."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from types import MappingProxyType

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from state import codec


class Colour(enum.Enum):
    RED = "red"


PLUS2 = timezone(timedelta(hours=2))

ROUND_TRIPS = [
    (Decimal("1234.50"), "1234.50"),
    (Decimal("-0.000001"), "-0.000001"),
    (datetime(2024, 5, 1, 12, 30, 0, 250000, tzinfo=PLUS2), "2024-05-01T12:30:00.250000+02:00"),
    (datetime(2024, 5, 1, 12, 30, tzinfo=UTC), "2024-05-01T12:30:00+00:00"),
    (datetime(2024, 5, 1, 12, 30), "2024-05-01T12:30:00"),
    (date(2024, 2, 29), "2024-02-29"),
    (time(8, 15, 1), "08:15:01"),
    (uuid.UUID("12345678-1234-5678-1234-567812345678"), "12345678-1234-5678-1234-567812345678"),
    (b"\x00\xffab", "\\x00ff6162"),
    (bytearray(b"\x01"), "\\x01"),
    ({3, 1, 2}, [1, 2, 3]),
    (frozenset({"b", "a"}), ["a", "b"]),
    (MappingProxyType({"a": Decimal("1")}), {"a": "1"}),
    (Colour.RED, "red"),
    (
        {"nested": [{"amount": Decimal("2.5"), "when": date(2024, 1, 1)}]},
        {"nested": [{"amount": "2.5", "when": "2024-01-01"}]},
    ),
]


@pytest.mark.parametrize(("value", "expected"), ROUND_TRIPS)
def test_codec_dumps_converts_value_to_json_type_when_not_native_json(
    value: object, expected: object
) -> None:
    assert codec.loads(codec.dumps(value)) == expected


EQUALITY_CASES = [
    *[v for v, _ in ROUND_TRIPS],
    {"id": 1, "name": "Zoë ✓", "ok": True, "none": None, "list": [1, 2.5, "x"]},
    {"big": 2**70},
    {1: "int key"},
    time(8, 0, tzinfo=UTC),
    [frozenset({1, "a"})],
    'line\nbreak "quoted" \\ back',
    0.1,
    -2.25,
]


@pytest.mark.parametrize("value", EQUALITY_CASES)
def test_codec_orjson_and_stdlib_write_equal_text_when_same_input(value: object) -> None:
    assert codec.dumps_orjson(value) == codec.dumps_stdlib(value)


def test_codec_uses_orjson_when_installed() -> None:
    pytest.importorskip("orjson")
    assert codec.HAS_ORJSON
    assert codec.dumps is codec.dumps_orjson


@pytest.mark.parametrize("encode", [codec.dumps_orjson, codec.dumps_stdlib])
def test_codec_dumps_raises_type_error_when_value_unsupported(encode: object) -> None:
    with pytest.raises(TypeError):
        encode(object())  # type: ignore[operator]


def test_codec_dumps_keeps_insertion_order_when_encoding_objects() -> None:
    assert codec.dumps({"b": 1, "a": 2}) == '{"b":1,"a":2}'


def test_codec_format_ts_renders_fixed_width_utc_when_offset_or_zero_fraction() -> None:
    assert codec.format_ts(datetime(2024, 5, 1, 14, 0, tzinfo=PLUS2)) == "2024-05-01T12:00:00.000000+00:00"
    assert (
        codec.format_ts(datetime(2024, 5, 1, 12, 0, 0, 7, tzinfo=UTC)) == "2024-05-01T12:00:00.000007+00:00"
    )


def test_codec_format_ts_raises_when_datetime_naive() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        codec.format_ts(datetime(2024, 5, 1))


@given(hs.datetimes(min_value=datetime(1970, 1, 1), timezones=hs.just(UTC)))
def test_codec_parse_ts_returns_same_instant_when_round_tripped(value: datetime) -> None:
    assert codec.parse_ts(codec.format_ts(value)) == value


@given(
    hs.lists(
        hs.datetimes(min_value=datetime(1970, 1, 1), timezones=hs.sampled_from([UTC, PLUS2])), min_size=2
    )
)
def test_codec_format_ts_text_sorts_in_time_order_when_compared(values: list[datetime]) -> None:
    texts = [codec.format_ts(v) for v in values]
    assert [codec.parse_ts(t) for t in sorted(texts)] == sorted(values)


def test_codec_optional_ts_helpers_pass_none_through_when_null_column() -> None:
    assert codec.format_ts_or_none(None) is None
    assert codec.parse_ts_or_none(None) is None
