"""The HubSpot emulator's records: typed properties, unique values, search index, associations.

Private to ``connectors/hubspot/emulator.py``. Callers hold the emulator's lock; nothing here
locks. Every property value is kept as the string HubSpot would send; typed values are only
built to compare (search filters and sorts) and to validate writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from connectors.hubspot._values import (
    FIELD_TYPES,
    Prop,
    StoreError,
    check_shape,
    coerce,
    error_body,
    invalid_message,
    matches,
    ms,
    order,
    stamp,
)

OBJECT_TYPE_IDS = {"contacts": "0-1", "companies": "0-2", "deals": "0-3"}
_SINGULAR = {"contacts": "contact", "companies": "company", "deals": "deal"}
_MODIFIED = {
    "contacts": "lastmodifieddate",
    "companies": "hs_lastmodifieddate",
    "deals": "hs_lastmodifieddate",
}
_DEAL_STAGES = (
    "appointmentscheduled",
    "qualifiedtobuy",
    "presentationscheduled",
    "decisionmakerboughtin",
    "contractsent",
    "closedwon",
    "closedlost",
)
# name, type, read-only, unique, options
_CATALOG: dict[str, list[tuple[str, str, bool, bool, tuple[str, ...]]]] = {
    "companies": [
        ("name", "string", False, False, ()),
        ("domain", "string", False, False, ()),
        ("city", "string", False, False, ()),
        ("country", "string", False, False, ()),
        ("phone", "string", False, False, ()),
        ("lifecyclestage", "enumeration", False, False, ("lead", "opportunity", "customer", "other")),
        ("erp_id", "string", False, True, ()),
    ],
    "deals": [
        ("dealname", "string", False, False, ()),
        ("amount", "number", False, False, ()),
        ("closedate", "datetime", False, False, ()),
        ("pipeline", "enumeration", False, False, ("default",)),
        ("dealstage", "enumeration", False, False, _DEAL_STAGES),
        ("deal_currency_code", "enumeration", False, False, ("EUR", "USD", "GBP", "CHF")),
        ("hubspot_owner_id", "string", False, False, ()),
        ("description", "string", False, False, ()),
        ("hs_is_closed_won", "bool", True, False, ()),
        ("hs_is_closed", "bool", True, False, ()),
        ("erp_id", "string", False, True, ()),
    ],
    "contacts": [
        ("email", "string", False, True, ()),
        ("firstname", "string", False, False, ()),
        ("lastname", "string", False, False, ()),
        ("phone", "string", False, False, ()),
        ("company", "string", False, False, ()),
        ("jobtitle", "string", False, False, ()),
        ("erp_id", "string", False, True, ()),
    ],
}
_DEFAULT_PROPS = {
    "companies": ("name", "domain"),
    "deals": ("dealname", "amount", "closedate", "pipeline", "dealstage"),
    "contacts": ("firstname", "lastname", "email"),
}
# typeId -> (from, to, reverse typeId); the first of each pair is the default (unlabeled) type
_ASSOC_TYPES = {
    341: ("deals", "companies", 342),
    342: ("companies", "deals", 341),
    5: ("deals", "companies", 6),
    6: ("companies", "deals", 5),
    3: ("deals", "contacts", 4),
    4: ("contacts", "deals", 3),
    279: ("contacts", "companies", 280),
    280: ("companies", "contacts", 279),
    1: ("contacts", "companies", 2),
    2: ("companies", "contacts", 1),
}
_DEFAULT_ASSOC = {(f, t): tid for tid, (f, t, _) in _ASSOC_TYPES.items() if tid not in (5, 6, 1, 2)}
_PRIMARY = frozenset({5, 6, 1, 2})


@dataclass(slots=True)
class Record:
    """One CRM record; ``indexed`` is what search sees, ``pending`` what it will see later."""

    id: str
    props: dict[str, str]
    created: datetime
    archived_at: datetime | None = None
    indexed: dict[str, str] | None = None
    pending: list[tuple[datetime, dict[str, str]]] = field(default_factory=list)


WriteItem = tuple[str | None, "Record | None", Mapping[str, Any], "dict[str, Any] | None"]
"""One batch input to validate: its reference, its target record, its properties, a preset error."""


Hit = tuple["Record", dict[str, str]]
"""A search hit: the record and the (possibly stale) property snapshot the index holds."""


@dataclass(slots=True)
class Plan:
    """One validated batch input: its target record (None: create) or why it fails."""

    ref: str | None
    target: Record | None
    props: dict[str, str | None]
    error: dict[str, Any] | None = None
    status: int = 200
    invalid: list[dict[str, Any]] = field(default_factory=list)


class Store:
    """All records of one emulated account, with HubSpot's write and search rules."""

    def __init__(
        self,
        now: Callable[[], datetime],
        *,
        index_lag: timedelta = timedelta(0),
        tie_order: str = "scrambled",
        association_bumps_modified: bool = False,
        archive_retention: timedelta = timedelta(days=90),
    ) -> None:
        self._now = now
        self.index_lag = index_lag
        self.tie_order = tie_order
        self.association_bumps_modified = association_bumps_modified
        self.archive_retention = archive_retention
        self._next_id = 1_000_000_001
        self._records: dict[str, dict[str, Record]] = {o: {} for o in OBJECT_TYPE_IDS}
        self._assoc: dict[tuple[str, str, str], dict[str, set[int]]] = {}
        self._props: dict[str, dict[str, Prop]] = {}
        for obj, rows in _CATALOG.items():
            fixed = [
                Prop("hs_object_id", "number", True),
                Prop("createdate", "datetime", True),
                Prop(_MODIFIED[obj], "datetime", True),
            ]
            listed = [Prop(n, t, ro, u, opts, custom=(n == "erp_id")) for n, t, ro, u, opts in rows]
            self._props[obj] = {p.name: p for p in fixed + listed}

    # --- object types and properties ----------------------------------------------------
    def object_name(self, raw: str) -> str:
        """Resolve ``deals``/``0-3``/``deal`` to the canonical object name, or fail with 400."""
        for name, type_id in OBJECT_TYPE_IDS.items():
            if raw in (name, type_id, _SINGULAR[name]):
                return name
        raise StoreError(400, "VALIDATION_ERROR", "Unable to infer object type from the path")

    def define_property(self, obj: str, name: str, type_: str, *, unique: bool = False) -> None:
        """Add a custom property definition."""
        if type_ not in FIELD_TYPES:
            raise ValueError(f"unknown property type {type_!r}")
        self._props[obj][name] = Prop(name, type_, unique=unique, custom=True)

    def property_list(self, obj: str) -> list[dict[str, Any]]:
        """Render every property definition of ``obj`` as the properties API does."""
        return [self._prop_json(obj, p, i) for i, p in enumerate(self._props[obj].values())]

    def property_json(self, obj: str, name: str) -> dict[str, Any]:
        """Render one property definition, or 404."""
        props = list(self._props[obj])
        if name not in self._props[obj]:
            raise StoreError(404, "OBJECT_NOT_FOUND", "Property does not exist")
        return self._prop_json(obj, self._props[obj][name], props.index(name))

    def _prop_json(self, obj: str, p: Prop, order: int) -> dict[str, Any]:
        when = "2020-01-01T00:00:00.000Z"
        return {
            "name": p.name,
            "label": p.name.replace("_", " ").title(),
            "type": p.type,
            "fieldType": FIELD_TYPES[p.type],
            "description": "",
            "groupName": f"{_SINGULAR[obj]}information",
            "options": [
                {"label": o, "value": o, "displayOrder": i, "hidden": False} for i, o in enumerate(p.options)
            ],
            "displayOrder": order,
            "calculated": p.read_only,
            "externalOptions": False,
            "hasUniqueValue": p.unique,
            "hidden": False,
            "hubspotDefined": not p.custom,
            "formField": not p.read_only,
            "modificationMetadata": {
                "archivable": p.custom,
                "readOnlyDefinition": not p.custom,
                "readOnlyValue": p.read_only,
            },
            "createdAt": when,
            "updatedAt": when,
            "archived": False,
        }

    def require_unique(self, obj: str, prop: str) -> None:
        """Refuse an ``idProperty`` that is not a unique-value property (as HubSpot does)."""
        p = self._props[obj].get(prop)
        if p is None:
            raise StoreError(400, "VALIDATION_ERROR", "idProperty does not exist")
        if not p.unique:
            raise StoreError(
                400,
                "VALIDATION_ERROR",
                f"Unable to perform update/upsert by non-unique {OBJECT_TYPE_IDS[obj]} property {prop}",
            )

    # --- lookup -------------------------------------------------------------------------
    def records(self, obj: str, *, archived: bool | None = False) -> list[Record]:
        """Records of ``obj`` ordered by id: live ones, archived ones, or (None) all."""
        self._forget_old_archives(obj)
        rows = list(self._records[obj].values())
        if archived is not None:
            rows = [r for r in rows if (r.archived_at is not None) == archived]
        return sorted(rows, key=lambda r: int(r.id))

    def find(
        self, obj: str, ref: str, id_prop: str | None = None, *, archived: bool | None = False
    ) -> Record | None:
        """Find a record by id, or by the value of unique property ``id_prop``."""
        self._forget_old_archives(obj)
        if id_prop and id_prop != "hs_object_id":
            hits = [r for r in self._records[obj].values() if r.props.get(id_prop) == ref]
        else:
            hit = self._records[obj].get(ref)
            hits = [hit] if hit else []
        for rec in hits:
            if archived is None or (rec.archived_at is not None) == archived:
                return rec
        return None

    def _forget_old_archives(self, obj: str) -> None:
        """Archived records are restorable for a while, then gone for good (and from the list)."""
        cutoff = self._now() - self.archive_retention
        rows = self._records[obj]
        for rec in [r for r in rows.values() if r.archived_at is not None and r.archived_at < cutoff]:
            del rows[rec.id]

    def lookup(self, obj: str, ref: str, id_prop: str | None = None, *, archived: bool = False) -> Record:
        """Like ``find`` but 404 when missing."""
        rec = self.find(obj, ref, id_prop, archived=archived)
        if rec is None:
            raise StoreError(404, "OBJECT_NOT_FOUND", "Object not found")
        return rec

    def record(self, obj: str, record_id: str, *, archived: bool | None = False) -> Record:
        """Return a record by id (direct access); KeyError-like 404 when missing."""
        if archived is None:
            return self._any(obj, record_id)
        return self.lookup(obj, record_id, archived=archived)

    def _any(self, obj: str, record_id: str) -> Record:
        rec = self._records[obj].get(record_id)
        if rec is None:
            raise StoreError(404, "OBJECT_NOT_FOUND", "Object not found")
        return rec

    def not_found_error(self, obj: str, ids: Sequence[str]) -> dict[str, Any]:
        """The per-record error of a batch call naming ids that do not exist."""
        return error_body(
            "OBJECT_NOT_FOUND",
            f"Could not find some {obj}; they may be archived or not exist",
            context={"ids": list(ids)},
        )

    # --- writes -------------------------------------------------------------------------
    def plan(self, obj: str, items: Iterable[WriteItem]) -> list[Plan]:
        """Validate batch inputs (``ref``, target, properties, pre-set error) without writing."""
        plans: list[Plan] = []
        claimed: set[tuple[str, str]] = set()
        for ref, target, raw, pre in items:
            context = {"ids": [ref]} if ref else {}
            if pre is not None:
                plans.append(Plan(ref, target, {}, pre, 404))
                continue
            props, errors = self._normalize(obj, raw)
            if errors:
                body = error_body("VALIDATION_ERROR", invalid_message(errors), context=context)
                plans.append(Plan(ref, target, props, body, 400, errors))
                continue
            uniques = {(n, v) for n, v in props.items() if v is not None and self._props[obj][n].unique}
            clash = any(k in claimed or self._holder(obj, *k) not in (None, target) for k in uniques)
            if clash:
                body = error_body(
                    "CONFLICT", "A unique property value is already used by another record", context=context
                )
                plans.append(Plan(ref, target, props, body, 409))
                continue
            claimed |= uniques
            plans.append(Plan(ref, target, props))
        return plans

    def apply(self, obj: str, plan: Plan, *, at: datetime | None = None) -> tuple[Record, bool]:
        """Carry out a valid plan: create or modify; returns the record and whether it is new."""
        moment = ms(at or self._now())
        if plan.target is None:
            record_id = str(self._next_id)
            self._next_id += 1
            rec = Record(record_id, {"hs_object_id": record_id, "createdate": stamp(moment)}, moment)
            self._records[obj][record_id] = rec
            new = True
        else:
            rec, new = plan.target, False
        for name, value in plan.props.items():
            if value is None:
                rec.props.pop(name, None)
            else:
                rec.props[name] = value
        self._derive(obj, rec)
        self._touch(obj, rec, moment)
        return rec, new

    def create(self, obj: str, props: Mapping[str, Any], *, at: datetime | None = None) -> Record:
        """Create one record, failing with 400/409 like the API."""
        return self.apply(obj, self._single(obj, None, props), at=at)[0]

    def modify(self, obj: str, rec: Record, props: Mapping[str, Any], *, at: datetime | None = None) -> None:
        """Update one record, failing with 400/409 like the API."""
        self.apply(obj, self._single(obj, rec, props), at=at)

    def _single(self, obj: str, rec: Record | None, props: Mapping[str, Any]) -> Plan:
        (plan,) = self.plan(obj, [(rec.id if rec else None, rec, props, None)])
        if plan.error is not None:
            body = dict(plan.error)
            raise StoreError(
                plan.status,
                body.pop("category"),
                body.pop("message"),
                **{k: v for k, v in body.items() if k not in ("status", "correlationId")},
            )
        return plan

    def archive(self, obj: str, rec: Record, *, at: datetime | None = None) -> None:
        """Soft-delete a record: it leaves search at once and shows in ``archived=true`` lists."""
        if rec.archived_at is None:
            moment = ms(at or self._now())
            rec.archived_at = moment
            self._touch(obj, rec, moment)

    def restore(self, obj: str, rec: Record, *, at: datetime | None = None) -> None:
        """Un-archive a record (its modified time moves, so pollers see it again)."""
        rec.archived_at = None
        self._touch(obj, rec, ms(at or self._now()))

    def reject_duplicate_refs(self, refs: Sequence[str | None]) -> None:
        """Fail the whole batch when two inputs name the same record (HubSpot answers 400)."""
        present = [r for r in refs if r is not None]
        if len(set(present)) != len(present):
            raise StoreError(400, "VALIDATION_ERROR", "Duplicate IDs found in batch input")

    def _holder(self, obj: str, name: str, value: str) -> Record | None:
        for rec in self._records[obj].values():
            if rec.archived_at is None and rec.props.get(name) == value:
                return rec
        return None

    def _normalize(
        self, obj: str, raw: Mapping[str, Any]
    ) -> tuple[dict[str, str | None], list[dict[str, Any]]]:
        props: dict[str, str | None] = {}
        errors: list[dict[str, Any]] = []
        for name, value in raw.items():
            p = self._props[obj].get(name)

            def bad(code: str, why: str, name: str = name) -> None:
                text = f'Property "{name}" {why}'
                errors.append(
                    {
                        "isValid": False,
                        "message": text,
                        "error": code,
                        "name": name,
                        "localizedErrorMessage": text,
                    }
                )

            if p is None:
                bad("PROPERTY_DOESNT_EXIST", "does not exist")
            elif p.read_only:
                bad("READ_ONLY_VALUE", "is read-only")
            elif value is None or value == "":
                props[name] = None
            else:
                text = coerce(p, value)
                if text is None:
                    bad(f"INVALID_{p.type.upper()}", f"is not a valid {p.type}")
                else:
                    props[name] = text
        return props, errors

    def _derive(self, obj: str, rec: Record) -> None:
        if obj == "deals":
            stage = rec.props.get("dealstage")
            rec.props["hs_is_closed_won"] = "true" if stage == "closedwon" else "false"
            rec.props["hs_is_closed"] = "true" if stage in ("closedwon", "closedlost") else "false"

    def _touch(self, obj: str, rec: Record, moment: datetime) -> None:
        rec.props[_MODIFIED[obj]] = stamp(moment)
        snapshot = dict(rec.props)
        if self.index_lag <= timedelta(0):
            rec.indexed, rec.pending = snapshot, []
        else:
            rec.pending.append((self._now() + self.index_lag, snapshot))

    # --- search -------------------------------------------------------------------------
    def settle_index(self) -> None:
        """Make every pending change searchable now."""
        for rows in self._records.values():
            for rec in rows.values():
                if rec.pending:
                    rec.indexed, rec.pending = rec.pending[-1][1], []

    def _view(self, rec: Record, now: datetime) -> dict[str, str] | None:
        while rec.pending and rec.pending[0][0] <= now:
            rec.indexed = rec.pending.pop(0)[1]
        return rec.indexed

    def search(self, obj: str, body: Mapping[str, Any]) -> list[Hit]:
        """Every searchable live record matching ``body``'s filters, in its sort order."""
        props = self._props[obj]
        check_shape(props, body)
        groups = body.get("filterGroups") or []
        now = self._now()
        query = str(body.get("query") or "").lower()
        hits = []
        for rec in self._records[obj].values():
            view = self._view(rec, now)
            if rec.archived_at is not None or view is None:
                continue
            if query and not any(query in v.lower() for v in view.values()):
                continue
            if matches(props, view, groups):
                hits.append((rec, view))
        sorts = body.get("sorts") or []
        return order(
            props,
            hits,
            sorts[0] if sorts else None,
            tie=self._tie,
            default=lambda h: (h[0].created, int(h[0].id)),
        )

    def _tie(self, hit: Hit) -> tuple[int, int]:
        n = int(hit[0].id)
        return ((n * 2654435761) & 0xFFFFFFFF, n) if self.tie_order == "scrambled" else (n, n)

    # --- rendering ----------------------------------------------------------------------
    def render(
        self,
        obj: str,
        rec: Record,
        props: Sequence[str] | str | None,
        *,
        view: Mapping[str, str] | None = None,
        associations: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Render a record as the API does; ``props`` None: defaults, ``"*"``: every property."""
        source = view if view is not None else rec.props
        always = ("createdate", _MODIFIED[obj], "hs_object_id")
        if props == "*":
            names: Iterable[str] = source.keys()
        else:
            names = dict.fromkeys([*(props if props is not None else _DEFAULT_PROPS[obj]), *always])
        out: dict[str, Any] = {
            "id": rec.id,
            "properties": {n: source.get(n) for n in names},
            "createdAt": stamp(rec.created),
            "updatedAt": source[_MODIFIED[obj]],
            "archived": rec.archived_at is not None,
        }
        if rec.archived_at is not None:
            out["archivedAt"] = stamp(rec.archived_at)
        linked = {}
        for to in associations:
            to_obj = self.object_name(to)
            ids = sorted(self.associations(obj, rec.id, to_obj), key=int)
            if ids:
                kind = f"{_SINGULAR[obj]}_to_{_SINGULAR[to_obj]}"
                linked[to_obj] = {"results": [{"id": i, "type": kind} for i in ids]}
        if linked:
            out["associations"] = linked
        return out

    # --- associations -------------------------------------------------------------------
    def associate(self, obj: str, rec_id: str, to: str, to_id: str, type_id: int | None) -> tuple[int, int]:
        """Link two records with ``type_id`` (default type when None); returns (type, reverse)."""
        self.lookup(obj, rec_id)
        self.lookup(to, to_id)
        tid = int(type_id) if type_id is not None else _DEFAULT_ASSOC.get((obj, to), 0)
        spec = _ASSOC_TYPES.get(tid)
        if spec is None or spec[:2] != (obj, to):
            raise StoreError(400, "VALIDATION_ERROR", "Association type does not fit these objects")
        self._assoc.setdefault((obj, rec_id, to), {}).setdefault(to_id, set()).add(tid)
        self._assoc.setdefault((to, to_id, obj), {}).setdefault(rec_id, set()).add(spec[2])
        if self.association_bumps_modified:
            for o, i in ((obj, rec_id), (to, to_id)):
                self._touch(o, self._any(o, i), ms(self._now()))
        return tid, spec[2]

    def associate_any(self, obj: str, rec_id: str, to_id: str, type_id: Any) -> None:
        """Link by association type id alone (the create endpoint's ``associations``)."""
        spec = _ASSOC_TYPES.get(int(type_id)) if type_id is not None else None
        if spec is None or spec[0] != obj:
            raise StoreError(400, "VALIDATION_ERROR", "Unknown association type")
        self.associate(obj, rec_id, spec[1], to_id, int(type_id))

    def dissociate(self, obj: str, rec_id: str, to: str, to_id: str) -> None:
        """Remove every association between two records."""
        self._assoc.get((obj, rec_id, to), {}).pop(to_id, None)
        self._assoc.get((to, to_id, obj), {}).pop(rec_id, None)

    def associations(self, obj: str, rec_id: str, to: str) -> set[str]:
        """Ids of ``to`` records linked to one record."""
        return {k for k, v in self._assoc.get((obj, rec_id, to), {}).items() if v}

    def association_rows(self, obj: str, rec_id: str, to: str) -> list[dict[str, Any]]:
        """v4 rows (``toObjectId`` as an integer, with typed labels) ordered by id."""
        links = self._assoc.get((obj, rec_id, to), {})
        return [
            {
                "toObjectId": int(k),
                "associationTypes": [
                    {
                        "category": "HUBSPOT_DEFINED",
                        "typeId": t,
                        "label": "Primary" if t in _PRIMARY else None,
                    }
                    for t in sorted(links[k])
                ],
            }
            for k in sorted(links, key=int)
            if links[k]
        ]
