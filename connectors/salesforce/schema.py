"""Object metadata of the emulated Salesforce org: fields, flags, validation and value coercion."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Any

RowError = tuple[str, str, list[str]]
Rule = Callable[[Mapping[str, Any]], RowError | None]

NUMERIC_TYPES = frozenset({"currency", "double", "percent", "int"})
STAGES = {  # StageName -> (IsClosed, IsWon): "won" is stage metadata, not a label
    "Prospecting": (False, False),
    "Qualification": (False, False),
    "Proposal": (False, False),
    "Negotiation": (False, False),
    "Closed Won": (True, True),
    "Closed Lost": (True, False),
}


@dataclass(frozen=True, slots=True)
class SfField:
    """One field of an emulated object: type, flags, picklist values, length."""

    name: str
    type: str = "string"
    external_id: bool = False
    unique: bool = False
    required: bool = False
    picklist: tuple[str, ...] = ()
    updateable: bool = True
    length: int = 255


@dataclass(slots=True)
class SfSchema:
    """An emulated object: API name, Id key prefix, fields and validation rules."""

    name: str
    key_prefix: str
    fields: dict[str, SfField] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)

    def require(self, field_name: str) -> None:
        """Make a field required on create and update (configure before serving requests)."""
        self.fields[field_name] = replace(self.fields[field_name], required=True)

    def restrict_picklist(self, field_name: str, values: Sequence[str]) -> None:
        """Turn a field into a restricted picklist of ``values``."""
        self.fields[field_name] = replace(self.fields[field_name], type="picklist", picklist=tuple(values))

    def add_rule(self, rule: Rule) -> None:
        """Add a validation rule: it sees the merged record and returns (code, message, fields) or None."""
        self.rules.append(rule)

    def find(self, name: str) -> SfField | None:
        """Look a field up by case-insensitive name."""
        lowered = name.lower()
        return next((f for n, f in self.fields.items() if n.lower() == lowered), None)


def _schema(name: str, prefix: str, *fields: SfField) -> SfSchema:
    system = (
        SfField("Id", "id", updateable=False),
        SfField("IsDeleted", "boolean", updateable=False),
        SfField("CreatedDate", "datetime", updateable=False),
        SfField("LastModifiedDate", "datetime", updateable=False),
        SfField("SystemModstamp", "datetime", updateable=False),
    )
    return SfSchema(name, prefix, {f.name: f for f in (*system, *fields)})


def default_schemas() -> dict[str, SfSchema]:
    """Account, Contact and Opportunity with an ``ERP_Id__c`` external id each."""
    ext = SfField("ERP_Id__c", external_id=True, unique=True, length=64)
    return {
        "Account": _schema(
            "Account",
            "001",
            SfField("Name", required=True),
            SfField("AccountNumber"),
            SfField("Type"),
            SfField("Industry"),
            SfField("BillingCity"),
            SfField("BillingCountry"),
            SfField("Phone"),
            ext,
        ),
        "Contact": _schema(
            "Contact",
            "003",
            SfField("FirstName"),
            SfField("LastName", required=True),
            SfField("Email", "email"),
            SfField("AccountId", "reference", length=18),
            ext,
        ),
        "Opportunity": _schema(
            "Opportunity",
            "006",
            SfField("Name", required=True),
            SfField("AccountId", "reference", length=18),
            SfField("StageName", "picklist", required=True, picklist=tuple(STAGES)),
            SfField("Amount", "currency"),
            SfField("CloseDate", "date", required=True),
            SfField("Probability", "percent"),
            SfField("IsClosed", "boolean", updateable=False),
            SfField("IsWon", "boolean", updateable=False),
            ext,
        ),
    }


class RowFailure(Exception):
    """One record's failure in a write, rendered as a Collections ``errors`` entry."""

    def __init__(self, code: str, message: str, fields: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.error = {"statusCode": code, "message": message, "fields": list(fields)}


def coerce_value(f: SfField, value: Any) -> Any:
    """Check and convert a written value for field ``f``; raise ``RowFailure`` when it does not fit."""
    if value is None:
        return None
    if f.type in NUMERIC_TYPES:
        if isinstance(value, bool):
            raise RowFailure(
                "INVALID_TYPE_ON_FIELD_IN_RECORD", f"{f.name}: value not of required type", [f.name]
            )
        try:
            return Decimal(str(value))
        except InvalidOperation:
            raise RowFailure(
                "INVALID_TYPE_ON_FIELD_IN_RECORD", f"{f.name}: value not of required type", [f.name]
            ) from None
    if f.type == "boolean":
        if not isinstance(value, bool):
            raise RowFailure(
                "INVALID_TYPE_ON_FIELD_IN_RECORD", f"{f.name}: value not of required type", [f.name]
            )
        return value
    if f.type == "date" and not (isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value)):
        raise RowFailure("INVALID_TYPE_ON_FIELD_IN_RECORD", f"{f.name}: value not a valid date", [f.name])
    text = str(value)
    if f.picklist and f.type == "picklist" and text not in f.picklist:
        raise RowFailure(
            "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
            f"{f.name}: bad value for restricted picklist field: {text}",
            [f.name],
        )
    if len(text) > f.length:
        raise RowFailure(
            "STRING_TOO_LONG", f"{f.name}: data value too large (max length={f.length})", [f.name]
        )
    return text


def check_write(
    schema: SfSchema,
    fields: Mapping[str, Any],
    current: Mapping[str, Any] | None,
    records: Iterable[Mapping[str, Any]],
) -> dict[str, Any]:
    """Validate a create (``current`` None) or update against ``schema`` and the live ``records``.

    Returns the coerced fields under their canonical names; raises ``RowFailure`` with the
    Salesforce status code (INVALID_FIELD, REQUIRED_FIELD_MISSING, DUPLICATE_VALUE, ...).
    """
    clean: dict[str, Any] = {}
    for name, value in fields.items():
        f = schema.find(name)
        if f is None:
            raise RowFailure(
                "INVALID_FIELD", f"No such column '{name}' on sobject of type {schema.name}", [name]
            )
        if not f.updateable:
            raise RowFailure(
                "INVALID_FIELD_FOR_INSERT_UPDATE", f"Unable to create/update fields: {f.name}.", [f.name]
            )
        clean[f.name] = coerce_value(f, value)
    merged = {**(current or dict.fromkeys(schema.fields)), **clean}
    missing = [f.name for f in schema.fields.values() if f.required and merged.get(f.name) in (None, "")]
    if missing:
        raise RowFailure(
            "REQUIRED_FIELD_MISSING", f"Required fields are missing: [{', '.join(missing)}]", missing
        )
    unique = [f.name for f in schema.fields.values() if f.unique and merged.get(f.name) is not None]
    for r in records:
        if r["IsDeleted"] or (current is not None and r["Id"] == current["Id"]):
            continue
        for name in unique:
            if r.get(name) == merged[name]:
                message = f"duplicate value found: {name} duplicates value on record with id: {r['Id']}"
                raise RowFailure("DUPLICATE_VALUE", message, [name])
    for rule in schema.rules:
        failure = rule(merged)
        if failure is not None:
            raise RowFailure(*failure)
    return clean
