"""Typed values for the HubSpot emulator: property definitions, write coercion, search filters.

Private to ``connectors/hubspot/_store.py``. HubSpot keeps every value as a string; these
helpers turn strings into comparable values (epoch ms, Decimal, text) only to validate a
write, evaluate a filter or sort, and render them back in HubSpot's formats.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

HitT = TypeVar("HitT", bound=tuple[Any, Mapping[str, str]])

FIELD_TYPES = {
    "string": "text",
    "number": "number",
    "datetime": "date",
    "date": "date",
    "enumeration": "select",
    "bool": "booleancheckbox",
}
_MAX_GROUPS, _MAX_FILTERS_PER_GROUP, _MAX_FILTERS = 5, 6, 18
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def stamp(moment: datetime) -> str:
    """Render a datetime the way HubSpot does: ISO-8601 UTC with milliseconds and ``Z``."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def error_body(category: str, message: str, **extra: Any) -> dict[str, Any]:
    """Build HubSpot's error body: ``status``, ``message``, ``correlationId``, ``category`` always."""
    return {
        "status": "error",
        "message": message,
        "correlationId": str(uuid.uuid4()),
        "category": category,
        **extra,
    }


class StoreError(Exception):
    """A request the store refuses: carries the HTTP status and HubSpot's error body."""

    def __init__(self, status: int, category: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(category, message, **extra)


@dataclass(slots=True)
class Prop:
    """One property definition."""

    name: str
    type: str
    read_only: bool = False
    unique: bool = False
    options: tuple[str, ...] = ()
    custom: bool = False


def invalid_message(items: Sequence[Mapping[str, Any]]) -> str:
    """HubSpot's 400 message for invalid property values: the details as embedded JSON."""
    return "Property values were not valid: " + json.dumps(list(items), separators=(",", ":"))


def check_shape(props: Mapping[str, Prop], body: Mapping[str, Any]) -> None:
    """Refuse a search body beyond HubSpot's filter limits, with two sorts or unknown properties."""
    groups = body.get("filterGroups") or []
    counts = [len(g.get("filters") or []) for g in groups]
    too_many = any(c > _MAX_FILTERS_PER_GROUP for c in counts) or sum(counts) > _MAX_FILTERS
    if len(groups) > _MAX_GROUPS or too_many:
        raise StoreError(400, "VALIDATION_ERROR", "Too many filter groups or filters")
    if len(body.get("sorts") or []) > 1:
        raise StoreError(400, "VALIDATION_ERROR", "Only one sort is supported")
    for g in groups:
        for f in g.get("filters") or []:
            known(props, f.get("propertyName"))


def matches(props: Mapping[str, Prop], view: Mapping[str, str], groups: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a record view passes the filter groups (filters ANDed, groups ORed)."""
    return not groups or any(all(_test(props, view, f) for f in g.get("filters") or []) for g in groups)


def known(props: Mapping[str, Prop], name: Any) -> Prop:
    """The definition of a filtered or sorted property, or 400 as HubSpot answers."""
    p = props.get(str(name))
    if p is None:
        raise StoreError(
            400,
            "VALIDATION_ERROR",
            "Filter or sort on a property that does not exist",
            errors=[
                {
                    "message": "Property does not exist",
                    "code": "PROPERTY_DOESNT_EXIST",
                    "context": {"propertyName": [str(name)]},
                }
            ],
        )
    return p


def _test(props: Mapping[str, Prop], view: Mapping[str, str], f: Mapping[str, Any]) -> bool:
    p = known(props, f.get("propertyName"))
    raw = view.get(p.name)
    op = str(f.get("operator", "EQ")).upper()
    if op == "HAS_PROPERTY":
        return raw is not None
    if op == "NOT_HAS_PROPERTY":
        return raw is None
    if op in ("CONTAINS_TOKEN", "NOT_CONTAINS_TOKEN"):
        token = str(f.get("value", "")).lower().strip("*")
        found = raw is not None and token in raw.lower()
        return found == (op == "CONTAINS_TOKEN")
    if op in ("IN", "NOT_IN"):
        wanted = [typed(p, str(v), fold=True) for v in f.get("values") or []]
        inside = raw is not None and typed(p, raw, fold=True) in wanted
        return inside == (op == "IN")
    actual = typed(p, raw) if raw is not None else None
    value = typed(p, str(f.get("value")))
    if op == "NEQ":
        return actual != value
    if actual is None or value is None or type(actual) is not type(value):
        return False
    if op == "BETWEEN":
        high = typed(p, str(f.get("highValue")))
        return type(high) is type(actual) and value <= actual <= high  # type: ignore[operator]
    tests: dict[str, Callable[[Any, Any], bool]] = {
        "EQ": lambda a, b: a == b,
        "LT": lambda a, b: a < b,
        "LTE": lambda a, b: a <= b,
        "GT": lambda a, b: a > b,
        "GTE": lambda a, b: a >= b,
    }
    if op not in tests:
        raise StoreError(400, "VALIDATION_ERROR", f"Unknown filter operator {op}")
    return tests[op](actual, value)


def order(
    props: Mapping[str, Prop],
    hits: list[HitT],
    sort: Any,
    *,
    tie: Callable[[HitT], Any],
    default: Callable[[HitT], Any],
) -> list[HitT]:
    """Sort hits by one property (missing values last), ties by ``tie``; without a sort by ``default``."""
    if sort is None:
        return sorted(hits, key=default)
    if isinstance(sort, str):
        name, descending = sort.lstrip("-"), sort.startswith("-")
    else:
        name = str(sort.get("propertyName"))
        descending = str(sort.get("direction", "")).upper() == "DESCENDING"
    p = known(props, name)
    present = [(h, typed(p, h[1][name])) for h in hits if h[1].get(name) is not None]
    missing = [h for h in hits if h[1].get(name) is None]
    present.sort(key=lambda pair: (pair[1], tie(pair[0])), reverse=descending)
    return [h for h, _ in present] + missing


def ms(moment: datetime) -> datetime:
    """Truncate to milliseconds in UTC (naive values are taken as UTC)."""
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(microsecond=moment.microsecond // 1000 * 1000)


def parse_instant(text: str) -> datetime | None:
    """Parse epoch-millisecond or ISO-8601 text (naive: UTC); None when it is neither."""
    if text.lstrip("-").isdigit():
        return _EPOCH + timedelta(milliseconds=int(text))
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def coerce(p: Prop, value: Any) -> str | None:
    """The stored string for a written value, or None when it is invalid for the type."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    if p.type != "string" and text != text.strip():  # refused since HubSpot's 2025 validation change
        return None
    if p.type == "number":
        try:
            number = Decimal(text)
        except InvalidOperation:
            return None
        return text if number.is_finite() else None
    if p.type == "datetime":
        moment = parse_instant(text)
        return stamp(ms(moment)) if moment else None
    if p.type == "date":
        moment = parse_instant(text) if "T" in text or text.isdigit() else None
        try:
            day = moment.date() if moment else date.fromisoformat(text)
        except ValueError:
            return None
        return day.isoformat()
    if p.type == "bool":
        return text.lower() if text.lower() in ("true", "false") else None
    if p.options and text not in p.options:
        return None
    return text


def typed(p: Prop, raw: str | None, *, fold: bool = False) -> Any:
    """A comparable value: epoch ms for dates, Decimal for numbers, text otherwise."""
    if raw is None or raw == "None":
        return None
    if p.type in ("datetime", "date"):
        moment = parse_instant(raw) if ("T" in raw or raw.lstrip("-").isdigit()) else None
        if moment is None:
            try:
                moment = datetime.combine(date.fromisoformat(raw), datetime.min.time(), UTC)
            except ValueError:
                return None
        return (moment - _EPOCH) // timedelta(milliseconds=1)
    if p.type == "number":
        try:
            return Decimal(raw)
        except InvalidOperation:
            return None
    return raw.lower() if fold else raw


def rate_body(policy: str) -> dict[str, Any]:
    """The 429 body HubSpot sends for a rate-limit ``policyName``."""
    message = {
        "SECONDLY": "You have reached your secondly limit.",
        "DAILY": "You have reached your daily limit.",
    }.get(policy, "You have reached your ten_secondly_rolling limit.")
    return error_body(
        "RATE_LIMITS", message, errorType="RATE_LIMIT", policyName=policy, requestId=str(uuid.uuid4())
    )


def int_arg(value: Any, name: str) -> int:
    """An integer request parameter, or 400."""
    try:
        return int(str(value))
    except ValueError:
        raise StoreError(400, "VALIDATION_ERROR", f"{name} must be an integer") from None


def csv_arg(values: list[str] | None) -> list[str]:
    """Comma-separated (and repeated) query values as one list."""
    return [p for v in values or [] for p in v.split(",") if p]


def seconds_text(seconds: float) -> str:
    """A Retry-After value: whole seconds without a fraction."""
    return str(int(seconds)) if Decimal(str(seconds)) == int(seconds) else str(seconds)
