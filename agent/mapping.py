"""Per-system record <-> canonical fields, with value maps and exact normalisation.

Canonical values are JSON scalars in one normal form per type, so that equality means
"in step": decimals as plain text without exponent or trailing zeros, datetimes as UTC
ISO text to the second, dates as ISO text, booleans as bool. Native values leave in the
form the target's connector sends (Decimal for numbers, ISO text for dates).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from agent.config import EntityConfig, FieldRule
from agent.errors import DataError

_TRUE = frozenset({"true", "t", "1", "yes", "y", "on"})
_FALSE = frozenset({"false", "f", "0", "no", "n", "off", ""})


def normalize(value: Any, ftype: str, *, record: str = "", field: str = "") -> Any:
    """Return ``value`` in the canonical normal form of ``ftype``; DataError if it cannot be."""
    if value is None:
        return None
    try:
        if ftype == "string":
            if isinstance(value, dict | list):
                raise TypeError("a structured value where text is mapped")
            return value if isinstance(value, str) else _text(value)
        if ftype == "decimal":
            return decimal_text(value)
        if ftype == "int":
            if isinstance(value, bool):
                raise ValueError("boolean is not a number")
            d = Decimal(str(value))
            if d != d.to_integral_value():
                raise ValueError("not a whole number")
            return int(d)
        if ftype == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError("not a boolean")
        if ftype == "date":
            if isinstance(value, datetime):
                return value.astimezone(UTC).date().isoformat() if value.tzinfo else value.date().isoformat()
            if isinstance(value, date):
                return value.isoformat()
            return date.fromisoformat(str(value)[:10]).isoformat()
        if ftype == "datetime":
            return datetime_text(value)
    except (ValueError, InvalidOperation, TypeError, OverflowError) as exc:
        raise DataError(record, field, f"not a valid {ftype}: {type(value).__name__} value") from exc
    raise DataError(record, field, f"unknown field type {ftype!r}")


def decimal_text(value: Any) -> str:
    """Exact decimal text: no exponent, no trailing zeros (``100.50`` -> ``100.5``)."""
    if isinstance(value, float):
        value = repr(value)
    d = Decimal(str(value).strip())
    if not d.is_finite():
        raise ValueError("not a finite number")
    if d == d.to_integral_value():
        return format(d.quantize(Decimal(1)), "f")
    return format(d.normalize(), "f")


def datetime_text(value: Any) -> str:
    """UTC ISO 8601 text to the second, with a ``Z`` (the precision every vendor keeps)."""
    if isinstance(value, datetime):
        dt = value
    else:
        text = str(value).strip().replace(" ", "T", 1)
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        if len(text) >= 5 and text[-5] in "+-" and text[-4:].isdigit() and ":" not in text[-5:]:
            text = text[:-2] + ":" + text[-2:]  # Salesforce's +0000
        dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _text(value: Any) -> str:
    if isinstance(value, Decimal):
        return decimal_text(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


RefResolver = Callable[[str, str, Any], Any]
"""(entity, system, value) -> value translated through the cross-reference, or None."""


class EntityMapper:
    """Maps one entity's records between each system's native fields and canonical fields."""

    def __init__(self, entity: EntityConfig) -> None:
        self.entity = entity
        self._by_column: dict[str, dict[str, FieldRule]] = {}
        for rule in entity.fields.values():
            for system, column in rule.columns.items():
                self._by_column.setdefault(system, {})[column] = rule
        self._inverse: dict[tuple[str, str], dict[str, str]] = {
            (rule.name, system): {native: canon for canon, native in vmap.items()}
            for rule in entity.fields.values()
            for system, vmap in rule.values.items()
        }

    def columns(self, system: str) -> list[str]:
        """The native columns this entity reads from ``system``."""
        return list(self._by_column.get(system, {}))

    def to_canonical(
        self, system: str, native: Mapping[str, Any], *, record: str, refs: RefResolver | None = None
    ) -> dict[str, Any]:
        """Canonical values for the mapped columns present in ``native``.

        A value outside a field's value map is a ``DataError`` naming record and field:
        an unknown picklist value must reach a person, not be guessed.
        """
        out: dict[str, Any] = {}
        for column, rule in self._by_column.get(system, {}).items():
            if column not in native:
                continue
            value = native[column]
            inverse = self._inverse.get((rule.name, system))
            if inverse is not None and value is not None:
                key = _text(value)
                if key not in inverse:
                    raise DataError(record, rule.name, f"value not in the value map of {system}.{column}")
                value = inverse[key]
            if rule.ref and value is not None:
                value = refs(rule.ref, system, value) if refs else None
                if value is None:
                    raise DataError(record, rule.name, f"no {rule.ref} linked for {system}.{column}")
            out[rule.name] = normalize(value, rule.type, record=record, field=rule.name)
        return out

    def readable(
        self, system: str, native: Mapping[str, Any], *, record: str, refs: RefResolver | None = None
    ) -> tuple[dict[str, Any], list[DataError]]:
        """Like ``to_canonical``, column by column: one unmappable value hides only its own field."""
        out: dict[str, Any] = {}
        errors: list[DataError] = []
        for column in self._by_column.get(system, {}):
            if column in native:
                try:
                    out.update(self.to_canonical(system, {column: native[column]}, record=record, refs=refs))
                except DataError as exc:
                    errors.append(exc)
        return out, errors

    def to_native(
        self, system: str, canonical: Mapping[str, Any], *, record: str, refs: RefResolver | None = None
    ) -> dict[str, Any]:
        """Native fields of ``system`` for the canonical values given (unmapped fields skipped)."""
        out: dict[str, Any] = {}
        for name, value in canonical.items():
            rule = self.entity.fields.get(name)
            if rule is None or system not in rule.columns:
                continue
            if rule.ref and value is not None:
                value = refs(rule.ref, system, value) if refs else None
                if value is None:
                    raise DataError(record, name, f"the {rule.ref} is not yet linked in {system}")
            vmap = rule.values.get(system)
            if vmap is not None and value is not None:
                key = _text(value)
                if key not in vmap:
                    raise DataError(record, name, f"no {system} value mapped for this {name}")
                value = vmap[key]
            out[rule.columns[system]] = _native(value, rule.type)
        return out


def _native(value: Any, ftype: str) -> Any:
    if value is None:
        return None
    if ftype == "decimal":
        return Decimal(value)
    return value
