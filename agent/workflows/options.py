"""The ``[workflows.NAME]`` tables: every key with its kind and default, and their validation.

Each workflow names the entities it works on (``deals = "contract"``) rather than tables, so
it reuses the entities' mappings: value fields are found by their canonical name (``value``,
``tax_code``...), links between entities by their ``ref`` (the project's field whose ``ref``
is the deals entity). ``check`` reports every problem as ``(dotted key, reason)``; the
config loader adds the file and raises them together with the rest.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.config import EntityConfig

# Per key: (kind, default); kinds: bool, str, system, entity, strlist, fields (metric -> field).
WORKFLOW_OPTIONS: dict[str, dict[str, tuple[str, Any]]] = {
    "closed_won": {
        "enabled": ("bool", True),
        "crm": ("system", "crm"),
        "erp": ("system", "erp"),
        "deals": ("entity", "contract"),
        "customers": ("entity", "customer"),
        "projects": ("entity", "project"),
        "legal_entities": ("entity", "legal_entity"),
        "tax_codes": ("entity", "tax_code"),
        "service_lines": ("entity", "service_line"),
        "trigger_field": ("str", "stage"),
        "trigger_value": ("str", "won"),
        "customer_creation": ("str", "on_won"),
        "project_code": ("str", "PRJ-{crm_id}"),
        "project_status": ("str", "setup"),
        "delivery_status": ("str", "setup"),
        "crm_project_field": ("str", None),
        "crm_delivery_status_field": ("str", None),
    },
    "billing": {
        "enabled": ("bool", True),
        "crm": ("system", "crm"),
        "erp": ("system", "erp"),
        "deals": ("entity", "contract"),
        "projects": ("entity", "project"),
        "milestones": ("entity", "milestone"),
        "invoices": ("entity", "invoice"),
        "payments": ("entity", "payment"),
        "completed_status": ("str", "completed"),
        "invoiced_statuses": ("strlist", ["posted", "paid"]),
        "crm_fields": ("fields", {}),
    },
    "change_order": {
        "enabled": ("bool", True),
        "crm": ("system", "crm"),
        "erp": ("system", "erp"),
        "change_orders": ("entity", "change_order"),
        "deals": ("entity", "contract"),
        "revisions": ("entity", "contract_revision"),
        "approved_value": ("str", "approved"),
        "billing_schedule_column": ("str", "billing_schedule"),
        "crm_revision_field": ("str", None),
        "update_crm_value": ("bool", True),
    },
    "time_actuals": {
        "enabled": ("bool", True),
        "crm": ("system", "crm"),
        "erp": ("system", "erp"),
        "deals": ("entity", "contract"),
        "projects": ("entity", "project"),
        "time_entries": ("entity", "time_entry"),
        "crm_fields": ("fields", {}),
    },
}

METRICS = {
    "billing": (
        "delivery_status",
        "percent_complete",
        "milestone_completed_at",
        "invoiced_amount",
        "invoiced_at",
        "paid_amount",
        "paid_at",
    ),
    "time_actuals": ("consumed_hours", "consumed_amount", "last_worked_on"),
}
PROJECT_CODE_PLACEHOLDERS = ("crm_id", "service_line", "customer_no", "close_year")

Add = Callable[[str, str], None]


def check(
    raw: Mapping[str, Any], entities: Mapping[str, EntityConfig], systems: Mapping[str, Any]
) -> tuple[dict[str, dict[str, Any]], list[tuple[str, str]]]:
    """Validate the ``[workflows]`` table; return the tables with defaults and the problems."""
    issues: list[tuple[str, str]] = []
    out: dict[str, dict[str, Any]] = {}
    for name, table in raw.items():
        key = f"workflows.{name}"
        spec = WORKFLOW_OPTIONS.get(name)
        if spec is None:
            issues.append((key, f"unknown workflow; expected one of {sorted(WORKFLOW_OPTIONS)}"))
            continue
        if not isinstance(table, dict):
            issues.append((key, f"must be a table, not {type(table).__name__}"))
            continue

        def add(k: str, reason: str, _key: str = key) -> None:
            issues.append((f"{_key}.{k}" if k else _key, reason))

        for k in table:
            if k not in spec:
                add(k, "unknown key")
        found = len(issues)
        values = _values(table, spec, entities, systems, add)
        if len(issues) == found and values["enabled"]:
            _SEMANTICS[name](values, entities, add)
        out[name] = values
    return out, issues


def _values(
    table: Mapping[str, Any],
    spec: Mapping[str, tuple[str, Any]],
    entities: Mapping[str, EntityConfig],
    systems: Mapping[str, Any],
    add: Add,
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for k, (kind, default) in spec.items():
        v = table.get(k, default)
        values[k] = v
        if v is None:
            continue
        if kind == "bool" and not isinstance(v, bool):
            add(k, "must be true or false")
        elif kind in ("str", "system", "entity") and not isinstance(v, str):
            add(k, f"must be text, not {type(v).__name__}")
        elif kind == "system" and v not in systems:
            add(k, f"unknown system {v!r}; define [systems.{v}]")
        elif kind == "entity" and v not in entities:
            add(k, f"unknown entity {v!r}; define [entities.{v}]")
        elif kind == "strlist" and (not isinstance(v, list) or not all(isinstance(x, str) for x in v)):
            add(k, "must be a list of text values")
        elif kind == "fields" and (
            not isinstance(v, dict) or not all(isinstance(x, str) and x for x in v.values())
        ):
            add(k, 'must be a table of metric = "CRM field"')
    return values


def _need(
    v: Mapping[str, Any],
    entities: Mapping[str, EntityConfig],
    add: Add,
    option: str,
    systems: tuple[str, ...],
    fields: tuple[str, ...] = (),
    refs: tuple[str, ...] = (),
    natural: bool = False,
) -> None:
    """Check that the entity named by ``option`` is mapped and has what the workflow uses."""
    entity = entities[v[option]]
    for s in systems:
        if v[s] not in entity.systems:
            add(option, f"entity {entity.name} must be mapped in {v[s]}")
            return
    for f in fields:
        if f not in entity.fields:
            add(option, f"entity {entity.name} needs a field {f!r}")
    for ref in refs:
        if ref_field(entity, v[ref]) is None:
            add(option, f"entity {entity.name} needs a field with ref = {v[ref]!r}")
    if natural and not entity.systems[v["erp"]].match_on:
        add(option, f"entity {entity.name} needs match_on in its {v['erp']} mapping (its code)")


def ref_field(entity: EntityConfig, target: str) -> str | None:
    """The canonical field of ``entity`` that refers to the ``target`` entity, if any."""
    return next((f.name for f in entity.fields.values() if f.ref == target), None)


def _closed_won(v: Mapping[str, Any], entities: Mapping[str, EntityConfig], add: Add) -> None:
    deal_fields = (v["trigger_field"], "value", "currency", "legal_entity", "tax_code", "service_line")
    _need(v, entities, add, "deals", ("crm", "erp"), deal_fields, refs=("customers",))
    _need(v, entities, add, "customers", ("crm", "erp"))
    _need(v, entities, add, "projects", ("erp",), ("project_code", "service_line", "status"), ("deals",))
    _need(v, entities, add, "legal_entities", ("erp",), ("currencies",), natural=True)
    _need(v, entities, add, "tax_codes", ("erp",), natural=True)
    _need(v, entities, add, "service_lines", ("erp",), natural=True)
    for option in ("deals", "customers"):
        entity = entities[v[option]]
        if v["erp"] in entity.systems and not entity.systems[v["erp"]].external_id:
            add(option, f"entity {entity.name} needs external_id in its {v['erp']} mapping (the CRM id)")
    if v["customer_creation"] not in ("on_won", "sync"):
        add("customer_creation", "must be 'on_won' or 'sync'")
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(v["project_code"]) if f is not None}
    except ValueError as exc:
        add("project_code", f"not a format string: {exc}")
        return
    unknown = sorted(names - set(PROJECT_CODE_PLACEHOLDERS))
    if unknown or not names:
        add("project_code", f"use the placeholders {{{'}, {'.join(PROJECT_CODE_PLACEHOLDERS)}}}")


def _billing(v: Mapping[str, Any], entities: Mapping[str, EntityConfig], add: Add) -> None:
    _need(v, entities, add, "deals", ("crm", "erp"))
    _need(v, entities, add, "projects", ("erp",), refs=("deals",))
    _need(v, entities, add, "milestones", ("erp",), ("status", "amount", "completed_at"), ("projects",))
    _need(v, entities, add, "invoices", ("erp",), ("status", "amount", "posted_at"), ("deals",))
    _need(v, entities, add, "payments", ("erp",), ("amount", "received_at"), ("invoices",))
    _metrics("billing", v, add)


def _change_order(v: Mapping[str, Any], entities: Mapping[str, EntityConfig], add: Add) -> None:
    co_fields = ("status", "new_value", "approved_by", "approved_at")
    _need(v, entities, add, "change_orders", ("crm",), co_fields, ("deals",))
    _need(v, entities, add, "deals", ("crm", "erp"), ("value", "version"))
    revision_fields = ("version", "old_value", "new_value", "approved_by", "approved_at", "change_order_ref")
    _need(v, entities, add, "revisions", ("erp",), revision_fields, ("deals",))


def _time_actuals(v: Mapping[str, Any], entities: Mapping[str, EntityConfig], add: Add) -> None:
    _need(v, entities, add, "deals", ("crm", "erp"))
    _need(v, entities, add, "projects", ("erp",), refs=("deals",))
    _need(v, entities, add, "time_entries", ("erp",), ("hours", "rate", "approved"), ("projects",))
    _metrics("time_actuals", v, add)


def _metrics(name: str, v: Mapping[str, Any], add: Add) -> None:
    if not v["crm_fields"]:
        add("crm_fields", f"name the CRM field of at least one of {', '.join(METRICS[name])}")
    for metric in v["crm_fields"]:
        if metric not in METRICS[name]:
            add(f"crm_fields.{metric}", f"unknown metric; expected one of {', '.join(METRICS[name])}")


_SEMANTICS: Mapping[str, Callable[[Mapping[str, Any], Mapping[str, EntityConfig], Add], None]] = {
    "closed_won": _closed_won,
    "billing": _billing,
    "change_order": _change_order,
    "time_actuals": _time_actuals,
}
