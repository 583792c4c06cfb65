"""JSON and timestamp encoding for the state file: the one place values become text.

Values are written as JSON with these conversions: ``Decimal`` -> its ``str``, ``datetime``
-> ISO 8601 (an aware one keeps its offset, a naive one stays naive), ``date``/``time`` ->
ISO 8601, ``UUID`` -> its canonical string, ``bytes`` -> ``"\\x"`` plus hex (PostgreSQL's
bytea text form), ``set``/``frozenset`` -> a sorted list, any other ``Mapping`` -> an object,
an ``Enum`` -> its value. Decoding gives plain JSON types back: a ``Decimal`` returns as a
``str``, a datetime as an ISO string. Callers that need the typed value convert it where they
know the field's type (the sink or the resolver); the journal does not keep a type tag.

orjson is used when it is installed (about 1 us per change instead of 4), with the stdlib as
the fallback. Both give identical text for the same input, except for floats written with an
exponent (orjson ``1e-7``, stdlib ``1e-07``; both decode to the same float) and NaN/Infinity,
which are not JSON (stdlib raises ``ValueError``, orjson writes ``null``). Money and numeric
values are ``Decimal`` in this project, never float, so neither case arises for them.

Timestamp *columns* use ``format_ts``/``parse_ts``: always UTC, always microseconds, so the
text sorts in time order and SQL range comparisons on it are correct.
"""

from __future__ import annotations

import datetime as _dt
import enum
import json
import uuid
from collections.abc import Mapping
from decimal import Decimal
from types import ModuleType
from typing import Any

_orjson: ModuleType | None
try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised only where orjson is absent
    _orjson = None

_UTC = _dt.UTC


def _default(obj: Any) -> Any:
    """Convert the non-JSON types we accept; shared by both encoders so they agree."""
    if isinstance(obj, Decimal):
        return str(obj)
    if isinstance(obj, _dt.datetime | _dt.date | _dt.time):
        return obj.isoformat()
    if isinstance(obj, uuid.UUID):
        return str(obj)
    if isinstance(obj, bytes | bytearray | memoryview):
        return "\\x" + bytes(obj).hex()
    if isinstance(obj, set | frozenset):
        try:
            return sorted(obj)
        except TypeError:
            # Mixed types do not order; sort by their encoded form so the output is stable.
            return sorted(obj, key=dumps_stdlib)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


_stdlib_encoder = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_default
)


def dumps_stdlib(obj: object) -> str:
    """Encode ``obj`` as compact JSON text with the stdlib encoder."""
    return _stdlib_encoder.encode(obj)


if _orjson is not None:
    _orjson_dumps = _orjson.dumps
    _orjson_loads = _orjson.loads
    # Dataclasses and Enums go through _default so both encoders treat them alike.
    _ORJSON_OPTS = _orjson.OPT_PASSTHROUGH_DATACLASS

    def dumps_orjson(obj: object) -> str:
        """Encode ``obj`` as compact JSON text with orjson (stdlib for what orjson refuses)."""
        try:
            return _orjson_dumps(obj, default=_default, option=_ORJSON_OPTS).decode()
        except TypeError:
            # orjson refuses integers beyond 64 bits, non-str keys, tz-aware times and lone
            # surrogates; the stdlib accepts or rejects them itself, keeping the two equal.
            return dumps_stdlib(obj)

    def dumps_bytes(obj: object) -> bytes:
        """Encode ``obj`` as compact UTF-8 JSON bytes: the text ``dumps`` gives, not decoded."""
        try:
            return _orjson_dumps(obj, default=_default, option=_ORJSON_OPTS)
        except TypeError:
            return dumps_stdlib(obj).encode()

    def loads(s: str | bytes) -> Any:
        """Decode JSON text written by ``dumps`` into plain JSON types."""
        return _orjson_loads(s)

    dumps = dumps_orjson
    HAS_ORJSON = True
else:  # pragma: no cover - exercised only where orjson is absent

    def dumps_orjson(obj: object) -> str:
        """Encode with orjson; here orjson is not installed, so this is the stdlib encoder."""
        return dumps_stdlib(obj)

    def dumps_bytes(obj: object) -> bytes:
        """Encode ``obj`` as compact UTF-8 JSON bytes: the text ``dumps`` gives, not decoded."""
        return dumps_stdlib(obj).encode()

    def loads(s: str | bytes) -> Any:
        """Decode JSON text written by ``dumps`` into plain JSON types."""
        return json.loads(s)

    dumps = dumps_stdlib
    HAS_ORJSON = False


def format_ts(value: _dt.datetime) -> str:
    """Render an aware datetime as fixed-width UTC ISO 8601 text for a timestamp column."""
    tz = value.tzinfo
    if tz is None:
        raise ValueError("timestamps stored in the state file must be timezone-aware")
    if tz is not _UTC:
        value = value.astimezone(_UTC)
    if _orjson is None:  # pragma: no cover - exercised only where orjson is absent
        return value.isoformat(timespec="microseconds")
    # orjson renders a datetime ~5x faster than isoformat() (this runs once per captured
    # change); it omits a zero fraction, which we put back to keep the width fixed.
    text = _orjson.dumps(value)
    if value.microsecond:
        return text[1:-1].decode()
    return text[1:20].decode() + ".000000+00:00"


def format_ts_or_none(value: _dt.datetime | None) -> str | None:
    """Like ``format_ts``, passing ``None`` through (nullable columns)."""
    return None if value is None else format_ts(value)


def parse_ts(text: str) -> _dt.datetime:
    """Read a timestamp column written by ``format_ts`` back as an aware UTC datetime."""
    return _dt.datetime.fromisoformat(text)


def parse_ts_or_none(text: str | None) -> _dt.datetime | None:
    """Like ``parse_ts``, passing ``None`` through (nullable columns)."""
    return None if text is None else _dt.datetime.fromisoformat(text)
