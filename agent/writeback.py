"""Ops that follow a delivery: id write-backs, and first copies replayed after a crash."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from agent.config import Config
from agent.model import Op


def writeback_ops(config: Config, created: Op, external_id: str, members: Mapping[str, str]) -> list[Op]:
    """Ops that store a newly created record's id in its counterparts' external-id fields.

    Example: a customer created in the ERP from the CRM gets its ERP id written into the
    CRM account's ``ERP_Id__c``, so the CRM shows it and later matches never depend on us.
    """
    entity = config.entities.get(created.entity)
    if entity is None:
        return []
    ops = []
    for system, m in entity.systems.items():
        if system == created.target or not m.external_id or system not in members:
            continue
        ops.append(
            Op(
                idempotency_key=f"writeback:{created.entity}:{created.canonical_id}:{system}:{created.target}:{external_id}",
                target=system,
                entity=created.entity,
                canonical_id=created.canonical_id,
                object_name=m.object,
                action="upsert",
                key={m.key: members[system]},
                fields={m.external_id: external_id},
                trace_id=created.trace_id,
                source_seq=None,
            )
        )
    return ops


def is_first_copy(config: Config, op: Op) -> bool:
    """Tell whether ``op`` creates-or-updates by external id (the target's own key unknown)."""
    entity = config.entities.get(op.entity)
    if entity is None or op.target not in entity.systems:
        return False
    return entity.systems[op.target].key not in op.key


def without_fields(config: Config, op: Op, names: set[str]) -> Op:
    """The same op without the canonical fields ``names`` (and their native columns)."""
    entity = config.entities[op.entity]
    columns = {
        entity.fields[n].columns[op.target]
        for n in names
        if n in entity.fields and op.target in entity.fields[n].columns
    }
    return replace(
        op,
        fields={k: v for k, v in op.fields.items() if k not in columns},
        canonical={k: v for k, v in op.canonical.items() if k not in names},
    )
