"""PostgreSQL text-format values to Python, chosen by type OID.

pgoutput sends every column in its type's text output form, rendered with the reading
session's settings. These converters expect what the capture session sets:
``DateStyle=ISO``, ``IntervalStyle=postgres``, ``bytea_output=hex`` (escape is read too)
and any ``TimeZone`` (timestamptz comes back as aware UTC whatever the offset printed).

Numbers never become floats: numeric, float4 and float8 are exact ``Decimal``. Values
Python cannot hold (infinity, BC dates, years past 9999) stay as PostgreSQL's text.
Malformed text raises :class:`PgValueError` and nothing else; its message never
includes the value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

from agent.errors import DataError

if TYPE_CHECKING:
    from connectors.postgres.pgoutput import Column, TypeInfo

__all__ = [
    "ARRAY_ELEMENT_OIDS",
    "Converter",
    "PgValueError",
    "SCALAR_OIDS",
    "convert_row",
    "converter_for",
    "row_converters",
    "unchecked_converter_for",
]

Converter = Callable[[str], object]

# First OID PostgreSQL hands to user-created objects; below it, OIDs are fixed built-ins.
_FIRST_NORMAL_OID: Final = 16384
# array_in rejects more dimensions than this (MAXDIM).
_MAX_DIMS: Final = 6

# Built-in scalar types that convert to something other than str, by OID (as in pg_type).
SCALAR_OIDS: Final[Mapping[int, str]] = MappingProxyType(
    {
        16: "bool",
        17: "bytea",
        20: "int8",
        21: "int2",
        23: "int4",
        26: "oid",
        28: "xid",
        29: "cid",
        114: "json",
        700: "float4",
        701: "float8",
        1082: "date",
        1114: "timestamp",
        1184: "timestamptz",
        1700: "numeric",
        3802: "jsonb",
        5069: "xid8",
    }
)

# Built-in array type OID -> its element type OID (pg_type.typelem).
ARRAY_ELEMENT_OIDS: Final[Mapping[int, int]] = MappingProxyType(
    {
        143: 142,  # xml
        199: 114,  # json
        271: 5069,  # xid8
        629: 628,  # line
        651: 650,  # cidr
        719: 718,  # circle
        775: 774,  # macaddr8
        791: 790,  # money
        1000: 16,  # bool
        1001: 17,  # bytea
        1002: 18,  # char
        1003: 19,  # name
        1005: 21,  # int2
        1006: 22,  # int2vector
        1007: 23,  # int4
        1008: 24,  # regproc
        1009: 25,  # text
        1010: 27,  # tid
        1011: 28,  # xid
        1012: 29,  # cid
        1013: 30,  # oidvector
        1014: 1042,  # bpchar
        1015: 1043,  # varchar
        1016: 20,  # int8
        1017: 600,  # point
        1018: 601,  # lseg
        1019: 602,  # path
        1020: 603,  # box
        1021: 700,  # float4
        1022: 701,  # float8
        1027: 604,  # polygon
        1028: 26,  # oid
        1034: 1033,  # aclitem
        1040: 829,  # macaddr
        1041: 869,  # inet
        1115: 1114,  # timestamp
        1182: 1082,  # date
        1183: 1083,  # time
        1185: 1184,  # timestamptz
        1187: 1186,  # interval
        1231: 1700,  # numeric
        1263: 2275,  # cstring
        1270: 1266,  # timetz
        1561: 1560,  # bit
        1563: 1562,  # varbit
        2201: 1790,  # refcursor
        2207: 2202,  # regprocedure
        2208: 2203,  # regoper
        2209: 2204,  # regoperator
        2210: 2205,  # regclass
        2211: 2206,  # regtype
        2287: 2249,  # record
        2949: 2970,  # txid_snapshot
        2951: 2950,  # uuid
        3221: 3220,  # pg_lsn
        3643: 3614,  # tsvector
        3644: 3642,  # gtsvector
        3645: 3615,  # tsquery
        3735: 3734,  # regconfig
        3770: 3769,  # regdictionary
        3807: 3802,  # jsonb
        3905: 3904,  # int4range
        3907: 3906,  # numrange
        3909: 3908,  # tsrange
        3911: 3910,  # tstzrange
        3913: 3912,  # daterange
        3927: 3926,  # int8range
        4073: 4072,  # jsonpath
        4090: 4089,  # regnamespace
        4097: 4096,  # regrole
        4192: 4191,  # regcollation
        5039: 5038,  # pg_snapshot
        6150: 4451,  # int4multirange
        6151: 4532,  # nummultirange
        6152: 4533,  # tsmultirange
        6153: 4534,  # tstzmultirange
        6155: 4535,  # datemultirange
        6157: 4536,  # int8multirange
    }
)

# Every built-in array uses ',' between elements except box, whose values contain commas.
_ARRAY_DELIMITERS: Final = {1020: ";"}

# Valid output that Python's date and datetime cannot hold: kept as PostgreSQL's text.
_TS_BODY = r"\d{4,}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(\.\d{1,6})?"
_NOT_PYTHON = r"(?=\d{5}|.* BC\Z)"  # a year past 9999, or before year 1
_DATE_KEPT = re.compile(rf"-?infinity|{_NOT_PYTHON}\d{{4,}}-\d{{2}}-\d{{2}}( BC)?", re.ASCII)
_TIMESTAMP_KEPT = re.compile(rf"-?infinity|{_NOT_PYTHON}{_TS_BODY}( BC)?", re.ASCII)
_TIMESTAMPTZ_KEPT = re.compile(
    rf"-?infinity|{_NOT_PYTHON}{_TS_BODY}[+-]\d{{2}}(:\d{{2}}){{0,2}}( BC)?", re.ASCII
)
_STRICT_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
_DIMENSIONS = re.compile(r"((?:\[-?\d{1,10}:-?\d{1,10}\]){1,6})=", re.ASCII)
_PLAIN_ARRAY = re.compile(r'\{[^"\\{}\s]+\}')
_DIMENSION = re.compile(r"\[(-?\d+):(-?\d+)\]", re.ASCII)


class PgValueError(DataError):
    """A column's text is not valid output of its type; names the record and field, never the value."""


def _bad(type_name: str, reason: str) -> PgValueError:
    return PgValueError("value", None, f"invalid {type_name} text: {reason}")


def _to_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _bad("integer", f"{len(text)} characters that are not a number") from None


def _to_decimal(text: str) -> Decimal:
    try:
        return Decimal(text)
    except (InvalidOperation, ValueError):
        raise _bad("number", f"{len(text)} characters that are not a decimal") from None


def _to_bool(text: str) -> bool:
    if text == "t":
        return True
    if text == "f":
        return False
    raise _bad("bool", "expected 't' or 'f'")


def _to_date(text: str) -> date | str:
    if _STRICT_DATE.fullmatch(text):
        try:
            return date.fromisoformat(text)
        except ValueError:
            raise _bad("date", "no such day") from None
    if _DATE_KEPT.fullmatch(text):
        return text
    raise _bad("date", "expected ISO YYYY-MM-DD")


def _to_timestamp(text: str) -> datetime | str:
    # fromisoformat is the fast path; the space at offset 10 keeps it to PostgreSQL's ISO shape.
    if text[10:11] == " ":
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            if value.tzinfo is None:
                return value
    if _TIMESTAMP_KEPT.fullmatch(text):
        return text
    raise _bad("timestamp", "expected ISO 'YYYY-MM-DD HH:MM:SS[.ffffff]'")


def _to_timestamptz(text: str) -> datetime | str:
    if text[10:11] == " ":
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            if value.tzinfo is not None:
                try:
                    return value.astimezone(UTC)
                except OverflowError:
                    # Year 1 or 9999 pushed out of range by its offset: only the text holds it.
                    return text
    if _TIMESTAMPTZ_KEPT.fullmatch(text):
        return text
    raise _bad("timestamptz", "expected ISO 'YYYY-MM-DD HH:MM:SS[.ffffff]+HH[:MM[:SS]]'")


def _reject_constant(name: str) -> object:
    raise _bad("json", "NaN and Infinity are not JSON")


def _to_json(text: str) -> object:
    try:
        return json.loads(text, parse_float=Decimal, parse_constant=_reject_constant)
    except RecursionError:
        raise _bad("json", "nested too deeply") from None
    except ValueError:
        pass
    # Integers longer than Python's int-from-text limit are valid JSON: hold them as Decimal.
    try:
        return json.loads(text, parse_float=Decimal, parse_int=Decimal, parse_constant=_reject_constant)
    except RecursionError:
        raise _bad("json", "nested too deeply") from None
    except ValueError as exc:
        pos = getattr(exc, "pos", None)
        where = f" at offset {pos}" if pos is not None else ""
        raise _bad("json", f"not JSON{where}") from None


def _to_bytes(text: str) -> bytes:
    if text.startswith("\\x"):
        try:
            return bytes.fromhex(text[2:])
        except ValueError:
            raise _bad("bytea", "bad hex digits") from None
    return _bytea_escape(text)


def _bytea_escape(text: str) -> bytes:
    """Decode bytea's 'escape' output: ``\\\\`` is a backslash, ``\\ooo`` an octal byte."""
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise _bad("bytea", f"character outside bytea escape format at offset {exc.start}") from None
    if b"\\" not in raw:
        return raw
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        b = raw[i]
        if b != 92:
            out.append(b)
            i += 1
        elif raw[i + 1 : i + 2] == b"\\":
            out.append(92)
            i += 2
        else:
            digits = raw[i + 1 : i + 4]
            if len(digits) != 3 or any(d < 48 or d > 55 for d in digits) or digits[0] > 51:
                raise _bad("bytea", f"bad escape at offset {i}")
            out.append(int(digits, 8))
            i += 4
    return bytes(out)


_SCALAR_CONVERTERS: Final[Mapping[str, Converter]] = MappingProxyType(
    {
        "bool": _to_bool,
        "bytea": _to_bytes,
        "int8": _to_int,
        "int2": _to_int,
        "int4": _to_int,
        "oid": _to_int,
        "xid": _to_int,
        "cid": _to_int,
        "xid8": _to_int,
        "json": _to_json,
        "jsonb": _to_json,
        "float4": _to_decimal,
        "float8": _to_decimal,
        "numeric": _to_decimal,
        "date": _to_date,
        "timestamp": _to_timestamp,
        "timestamptz": _to_timestamptz,
    }
)


def converter_for(type_oid: int, typname: str | None = None) -> Converter | None:
    """Return the text -> Python converter for a type, or None where the text is the value.

    ``typname`` (from a pgoutput Type message) only matters for user-defined types: a name
    starting with ``_`` is PostgreSQL's naming for an array type, read as a list of str.
    """
    name = SCALAR_OIDS.get(type_oid)
    if name is not None:
        return _SCALAR_CONVERTERS[name]
    element = ARRAY_ELEMENT_OIDS.get(type_oid)
    if element is not None:
        return _array_converter(converter_for(element), _ARRAY_DELIMITERS.get(type_oid, ","))
    if type_oid >= _FIRST_NORMAL_OID and typname is not None and typname.startswith("_"):
        return _array_converter(None, ",")
    return None


def unchecked_converter_for(type_oid: int) -> Converter | None:
    """Return the builtin that :func:`converter_for` wraps, for integer and numeric types.

    It gives the same value for valid text, but signals bad text with ``ValueError`` or
    ``ArithmeticError`` instead of :class:`PgValueError`; a caller uses it where it can
    fall back to :func:`converter_for` for the row. None for every other type.
    """
    name = SCALAR_OIDS.get(type_oid)
    converter = _SCALAR_CONVERTERS.get(name) if name is not None else None
    if converter is _to_int:
        return int
    if converter is _to_decimal:
        return Decimal
    return None


def row_converters(
    columns: Iterable[Column], types: Mapping[int, TypeInfo] | None = None
) -> tuple[Converter | None, ...]:
    """Return one converter (or None for identity) per column, for use with :func:`convert_row`."""
    types = types or {}
    out = []
    for col in columns:
        info = types.get(col.type_oid)
        out.append(converter_for(col.type_oid, info.name if info is not None else None))
    return tuple(out)


def convert_row(
    converters: Sequence[Converter | None],
    values: Sequence[object],
    *,
    record: str = "row",
    fields: Sequence[str] = (),
) -> tuple[object, ...]:
    """Convert a decoded tuple; None, unchanged-TOAST and binary values pass through untouched.

    Raises:
        PgValueError: naming ``record`` and the column (from ``fields``) whose text is bad.
    """
    try:
        return tuple(
            [
                v if conv is None or type(v) is not str else conv(v)
                for conv, v in zip(converters, values, strict=True)
            ]
        )
    except PgValueError as exc:
        for i, (conv, v) in enumerate(zip(converters, values, strict=True)):
            if conv is not None and type(v) is str:
                try:
                    conv(v)
                except PgValueError:
                    field = fields[i] if i < len(fields) else str(i)
                    raise PgValueError(record, field, exc.reason) from exc
        raise PgValueError(record, None, exc.reason) from exc
    except ValueError:
        raise PgValueError(record, None, f"{len(values)} values for {len(converters)} columns") from None


def _array_converter(element: Converter | None, delimiter: str) -> Converter:
    def convert(text: str) -> list[object]:
        return _parse_array(text, element, delimiter)

    return convert


def _parse_array(text: str, element: Converter | None, delim: str) -> list[object]:
    """Parse an array literal (``{...}``, optionally ``[lb:ub]...=`` first) into nested lists."""
    dims = None
    start = 0
    if text.startswith("["):
        m = _DIMENSIONS.match(text)
        if m is None:
            raise _bad("array", "bad dimension decoration at offset 0")
        dims = [int(hi) - int(lo) + 1 for lo, hi in _DIMENSION.findall(m.group(1))]
        if any(d < 1 for d in dims):
            raise _bad("array", "upper bound below lower bound in dimension decoration")
        start = m.end()
    body = text[start:]
    if not body.startswith("{"):
        raise _bad("array", f"expected '{{' at offset {start}")
    # The common shape, a flat list of plain elements, needs no character-by-character scan.
    if dims is None and _PLAIN_ARRAY.fullmatch(body):
        items: list[object] = []
        for token in body[1:-1].split(delim):
            if not token:
                raise _bad("array", "empty element")
            if len(token) == 4 and token.upper() == "NULL":
                items.append(None)
            else:
                items.append(token if element is None else _element(element, token, len(items)))
        return items
    parsed, pos = _parse_level(text, start, element, delim, 1)
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos != len(text):
        raise _bad("array", f"unexpected text after the closing brace at offset {pos}")
    shape = _shape(parsed)
    if dims is not None and shape != dims:
        raise _bad("array", "elements do not match the dimension decoration")
    return parsed


def _element(element: Converter, token: str, index: int) -> object:
    try:
        return element(token)
    except PgValueError as exc:
        raise PgValueError(exc.record, exc.field, f"array element {index}: {exc.reason}") from None


def _parse_level(
    text: str, pos: int, element: Converter | None, delim: str, depth: int
) -> tuple[list[object], int]:
    """Parse one ``{...}`` level starting at ``pos``; return its items and the offset after it."""
    if depth > _MAX_DIMS:
        raise _bad("array", f"more than {_MAX_DIMS} dimensions at offset {pos}")
    n = len(text)
    pos += 1  # the '{'
    items: list[object] = []
    nested: bool | None = None
    value: object
    while pos < n and text[pos].isspace():
        pos += 1
    if pos < n and text[pos] == "}":
        return items, pos + 1
    while True:
        while pos < n and text[pos].isspace():
            pos += 1
        if pos >= n:
            raise _bad("array", f"unterminated array at offset {pos}")
        c = text[pos]
        if c == "{":
            value, pos = _parse_level(text, pos, element, delim, depth + 1)
            is_sub = True
        elif c == '"':
            token, pos = _quoted(text, pos)
            value = token if element is None else _element(element, token, len(items))
            is_sub = False
        elif c in delim or c == "}":
            raise _bad("array", f"missing element at offset {pos}")
        else:
            token, raw, pos = _unquoted(text, pos, delim)
            if raw and token.upper() == "NULL":
                value = None
            else:
                value = token if element is None else _element(element, token, len(items))
            is_sub = False
        if nested is None:
            nested = is_sub
        elif nested != is_sub:
            raise _bad("array", f"elements and sub-arrays mixed at offset {pos}")
        items.append(value)
        while pos < n and text[pos].isspace():
            pos += 1
        if pos >= n:
            raise _bad("array", f"unterminated array at offset {pos}")
        c = text[pos]
        pos += 1
        if c == "}":
            return items, pos
        if c != delim:
            raise _bad("array", f"expected '{delim}' or '}}' at offset {pos - 1}")


def _quoted(text: str, pos: int) -> tuple[str, int]:
    """Read a double-quoted element at ``pos``; backslash escapes the next character."""
    n = len(text)
    pos += 1
    chunks = []
    begin = pos
    while pos < n:
        c = text[pos]
        if c == '"':
            chunks.append(text[begin:pos])
            return "".join(chunks), pos + 1
        if c == "\\":
            if pos + 1 >= n:
                break
            chunks.append(text[begin:pos])
            chunks.append(text[pos + 1])
            pos += 2
            begin = pos
        else:
            pos += 1
    raise _bad("array", f"unterminated quoted element at offset {n}")


def _unquoted(text: str, pos: int, delim: str) -> tuple[str, bool, int]:
    """Read an unquoted element; return it, whether it had no escapes, and the offset after it.

    Surrounding whitespace is not part of the element, but escaped whitespace is.
    """
    n = len(text)
    chars = []
    keep = 0  # length of chars up to the last character that must be kept
    raw = True
    while pos < n:
        c = text[pos]
        if c == "\\":
            if pos + 1 >= n:
                raise _bad("array", f"backslash at end of text at offset {pos}")
            chars.append(text[pos + 1])
            keep = len(chars)
            raw = False
            pos += 2
            continue
        if c in delim or c == "}" or c == "{" or c == '"':
            if c == "{" or c == '"':
                raise _bad("array", f"unexpected {c!r} inside an element at offset {pos}")
            break
        chars.append(c)
        if not c.isspace():
            keep = len(chars)
        pos += 1
    return "".join(chars[:keep]), raw, pos


def _shape(items: list[object]) -> list[int]:
    """Return the dimension lengths of a nested list, checking that it is rectangular."""
    if not items:
        return []
    if not isinstance(items[0], list):
        return [len(items)]
    inner = [_shape(sub) for sub in items]  # type: ignore[arg-type]
    if any(s != inner[0] for s in inner):
        raise _bad("array", "sub-arrays of different sizes")
    return [len(items), *inner[0]]
