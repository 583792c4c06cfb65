"""The chaos workload and its reference model: seeded edits on both sides, and the end state they imply.

Customers live in both systems under the ownership rules of the chaos config: ``name`` is
owned by the CRM, ``status`` and ``credit_limit`` by the ERP, ``phone`` is shared and
``customer_no`` (the natural key) is a marker the workload never edits. Each record's
phone is edited on one side only (chosen by the seed), so the model needs no conflict
rule. A few edits are deliberate non-owner edits; under ``on_non_owner_edit = "revert"``
the owner's value must win on both sides.

Every generated value is unique (a global serial is part of it), so at the end a field's
value names the edit that wrote it: the latest owner edit (converged), an older one (a lost
update), a non-owner edit (an ownership violation) or nothing known. ``status`` has three
values only and is judged by equality.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

Side = Literal["erp", "crm"]
SIDES: tuple[Side, Side] = ("erp", "crm")
FIELDS = ("name", "status", "credit_limit", "phone")
OWNER: Mapping[str, str] = {"name": "crm", "status": "erp", "credit_limit": "erp", "phone": "shared"}
STATUSES = ("active", "hold", "archived")
STATUS_TO_CRM: Mapping[str, str] = {"active": "Active", "hold": "On Hold", "archived": "Inactive"}
STATUS_TO_ERP: Mapping[str, str] = {v: k for k, v in STATUS_TO_CRM.items()}


def other(side: Side) -> Side:
    """The other system."""
    return "crm" if side == "erp" else "erp"


@dataclass(frozen=True, slots=True)
class Edit:
    """One record's part of a workload step: canonical field values written on one side."""

    marker: str
    kind: Literal["create", "update"]
    values: Mapping[str, Any]
    non_owner: bool = False


@dataclass(frozen=True, slots=True)
class Step:
    """One workload step: edits made on one side, in one ERP transaction or one CRM write each."""

    seq: int
    side: Side
    edits: tuple[Edit, ...]

    def needs(self) -> list[tuple[str, Side]]:
        """The (record, side) copies that must exist before this step can be applied.

        A non-owner edit waits for both copies: before the other copy exists, its value would
        be a first value (which ownership does not govern), not an edit.
        """
        out: list[tuple[str, Side]] = []
        for e in self.edits:
            if e.kind == "update":
                out.append((e.marker, self.side))
                if e.non_owner:
                    out.append((e.marker, other(self.side)))
        return out


@dataclass
class RecordModel:
    """What the model knows of one record: where it was born, its expected and past values."""

    marker: str
    origin: Side
    phone_side: Side
    expected: dict[str, Any]
    owner_values: dict[str, list[Any]] = field(default_factory=dict)
    foreign_values: dict[str, list[Any]] = field(default_factory=dict)
    edits: list[tuple[int, Edit]] = field(default_factory=list)

    def writer(self, fname: str) -> Side:
        """The side whose edits of ``fname`` count (the owner, or the record's phone side)."""
        owner = OWNER[fname]
        return self.phone_side if owner == "shared" else owner  # type: ignore[return-value]


class Workload:
    """A seeded stream of steps that follow the ownership rules, and the model they imply.

    The model is updated when a step is generated; the harness applies every generated
    step, in order per record and side, before it compares (steps on a copy that does not
    exist yet wait for it), so the expected end state depends on the seed only.
    """

    def __init__(
        self,
        seed: int,
        *,
        max_records: int,
        non_owner_rate: float = 0.05,
        hot_share: float = 0.3,
        multi_row_rate: float = 0.1,
    ) -> None:
        self.rng = random.Random(f"chaos-workload:{seed}")
        self.seed = seed
        self.max_records = max_records
        self.non_owner_rate = non_owner_rate
        self.hot_share = hot_share
        self.multi_row_rate = multi_row_rate
        self.records: dict[str, RecordModel] = {}
        self.steps = 0
        self._serial = 0
        self._counts = {"erp": 0, "crm": 0}

    # --- generation -------------------------------------------------------------------------
    def next_step(self) -> Step:
        """Generate the next step and fold it into the model."""
        self.steps += 1
        rng = self.rng
        n = len(self.records)
        create_p = 0.9 if n < 8 else (0.25 if n < self.max_records else 0.0)
        if n == 0 or rng.random() < create_p:
            step = self._create(rng.choice(SIDES))
        else:
            step = self._update()
        for e in step.edits:
            rec = self.records[e.marker]
            rec.edits.append((step.seq, e))
        return step

    def _value(self, fname: str, marker: str, *, foreign: bool = False) -> Any:
        self._serial += 1
        v = self._serial
        if fname == "name":
            return f"{marker} {'x' if foreign else 'n'}{v}"
        if fname == "phone":
            return f"+1 555 {v:07d}"
        if fname == "credit_limit":
            return Decimal(f"{v}.{75 if foreign else 50}")
        return self.rng.choice(STATUSES)

    def _create(self, side: Side) -> Step:
        self._counts[side] += 1
        marker = f"{'E' if side == 'erp' else 'C'}{self._counts[side]:05d}"
        rng = self.rng
        values = {f: self._value(f, marker) for f in FIELDS}
        if rng.random() < 0.2:
            values["credit_limit"] = None
        rec = RecordModel(marker, side, rng.choice(SIDES), dict(values))
        for f, v in values.items():
            rec.owner_values[f] = [v]
        self.records[marker] = rec
        return Step(self.steps, side, (Edit(marker, "create", values),))

    def _pick(self) -> RecordModel:
        markers = list(self.records)
        hot = max(1, len(markers) // 10)
        if self.rng.random() < self.hot_share:
            return self.records[self.rng.choice(markers[:hot])]
        return self.records[self.rng.choice(markers)]

    def _update(self) -> Step:
        rng = self.rng
        rec = self._pick()
        if rng.random() < self.non_owner_rate:
            return self._non_owner(rec)
        side: Side = rng.choice(SIDES)
        owned = [f for f in FIELDS if rec.writer(f) == side]
        if side == "erp" and rng.random() < self.multi_row_rate:
            return self._erp_multi_row(rec)
        chosen = rng.sample(owned, k=rng.randint(1, len(owned)))
        values = {f: self._value(f, rec.marker) for f in chosen}
        self._fold(rec, values)
        return Step(self.steps, side, (Edit(rec.marker, "update", values),))

    def _erp_multi_row(self, first: RecordModel) -> Step:
        """One ERP transaction updating the credit limit of a few records."""
        picked = {first.marker: first}
        for _ in range(self.rng.randint(1, 3)):
            r = self._pick()
            picked[r.marker] = r
        edits = []
        for rec in picked.values():
            values = {"credit_limit": self._value("credit_limit", rec.marker)}
            self._fold(rec, values)
            edits.append(Edit(rec.marker, "update", values))
        return Step(self.steps, "erp", tuple(edits))

    def _non_owner(self, rec: RecordModel) -> Step:
        """An edit of a field by the system that does not own it (must be reverted)."""
        rng = self.rng
        if rng.random() < 0.5:
            side: Side = "erp"
            values = {"name": self._value("name", rec.marker, foreign=True)}
        else:
            side = "crm"
            f = rng.choice(("status", "credit_limit"))
            if f == "status":
                choices = [s for s in STATUSES if s != rec.expected["status"]]
                values = {"status": rng.choice(choices)}
            else:
                values = {"credit_limit": self._value("credit_limit", rec.marker, foreign=True)}
        for f, v in values.items():
            rec.foreign_values.setdefault(f, []).append(v)
        return Step(self.steps, side, (Edit(rec.marker, "update", values, non_owner=True),))

    def _fold(self, rec: RecordModel, values: Mapping[str, Any]) -> None:
        for f, v in values.items():
            rec.expected[f] = v
            rec.owner_values.setdefault(f, []).append(v)


# --- comparison -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Copy:
    """One record as found in one system, in canonical fields, with its link to the other side."""

    side: Side
    marker: str | None
    values: Mapping[str, Any]
    own_id: str
    other_id: str | None


@dataclass(frozen=True, slots=True)
class Mismatch:
    """A field whose end value is not the expected one, and what wrote the value found."""

    marker: str
    side: Side
    field: str
    expected: Any
    found: Any
    verdict: Literal["stale", "non_owner", "unknown"]


@dataclass
class Verdict:
    """The comparison of both systems with the model."""

    changes_made: int = 0
    field_writes: int = 0
    changes_converged: int = 0
    changes_lost: int = 0
    records_expected: int = 0
    missing: list[tuple[str, str]] = field(default_factory=list)
    duplicated: list[tuple[str, str, int]] = field(default_factory=list)
    strays: list[tuple[str, str]] = field(default_factory=list)
    broken_links: list[tuple[str, str]] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def lost(self) -> int:
        """Missing copies plus fields holding a stale or unknown value."""
        return len(self.missing) + sum(1 for m in self.mismatches if m.verdict != "non_owner")

    @property
    def duplicates(self) -> int:
        """Extra copies of a record, and records nobody created (copies of a copy)."""
        return sum(n - 1 for _, _, n in self.duplicated) + len(self.strays)

    @property
    def violations(self) -> int:
        """Fields whose end value came from a system that does not own them."""
        return sum(1 for m in self.mismatches if m.verdict == "non_owner")


def _same(fname: str, a: Any, b: Any) -> bool:
    if fname == "credit_limit" and a is not None and b is not None:
        return Decimal(str(a)) == Decimal(str(b))
    return bool(a == b)


def _classify(rec: RecordModel, fname: str, found: Any) -> Literal["stale", "non_owner", "unknown"]:
    if fname != "status" and any(_same(fname, found, v) for v in rec.foreign_values.get(fname, [])):
        return "non_owner"
    if any(_same(fname, found, v) for v in rec.owner_values.get(fname, [])):
        return "stale"
    if fname == "status" and found in rec.foreign_values.get("status", []):
        return "non_owner"
    return "unknown"


def compare(workload: Workload, copies: Iterable[Copy]) -> Verdict:
    """Compare what both systems hold with the model: lost, duplicated and violated fields."""
    v = Verdict(records_expected=len(workload.records))
    by_side: dict[Side, dict[str, list[Copy]]] = {"erp": {}, "crm": {}}
    ids: dict[Side, dict[str, Copy]] = {"erp": {}, "crm": {}}
    for c in copies:
        ids[c.side][c.own_id] = c
        if c.marker is None or c.marker not in workload.records:
            v.strays.append((c.side, c.own_id))
            continue
        by_side[c.side].setdefault(c.marker, []).append(c)
    bad_slots: set[tuple[str, str]] = set()
    for marker, rec in workload.records.items():
        for side in SIDES:
            found = by_side[side].get(marker, [])
            if not found:
                v.missing.append((marker, side))
                bad_slots |= {(marker, f) for f in FIELDS}
                continue
            if len(found) > 1:
                v.duplicated.append((marker, side, len(found)))
            c = found[0]
            twin = ids[other(side)].get(c.other_id or "")
            if twin is None or twin.marker != marker:
                v.broken_links.append((marker, side))
            for fname in FIELDS:
                want, got = rec.expected[fname], c.values.get(fname)
                if not _same(fname, want, got):
                    v.mismatches.append(Mismatch(marker, side, fname, want, got, _classify(rec, fname, got)))
                    bad_slots.add((marker, fname))
    for marker, rec in workload.records.items():
        for _, e in rec.edits:
            v.changes_made += 1
            v.field_writes += len(e.values)
            if any((marker, f) in bad_slots for f in e.values) or (
                e.kind == "create" and any(m == marker for m, _ in v.missing)
            ):
                v.changes_lost += 1
            else:
                v.changes_converged += 1
    return v


def summarize_mismatches(mismatches: Iterable[Mismatch]) -> dict[str, int]:
    """Counts of mismatches by side, field and verdict (for the JSON report)."""
    return dict(Counter(f"{m.side}.{m.field}.{m.verdict}" for m in mismatches))
