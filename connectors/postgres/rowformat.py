"""PostgreSQL row messages as the journal keeps them: raw pgoutput bytes plus their shape.

Capture journals each Insert/Update/Delete message as it came from the slot, with the shape
of its table version (``RowShape``: relation id, columns with type OIDs and names, replica
identity, key columns); decoding happens when the journal is read (``row_decoder``). The
shape is plain JSON and is stored once per table version, so a journal row can be decoded
by any later process, whatever Relation messages it has seen since.

A row image is the same whichever process decodes it: the compiled reader of
``connectors.postgres.rows`` for the plain case, the general decoder and converters for the
rest (unchanged TOAST, changed keys, values a converter refuses, which keep the server's
text).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from agent.errors import PermanentError
from agent.model import RowImage, RowShape
from connectors.postgres.pgoutput import (
    UNCHANGED,
    Column,
    Decoder,
    Delete,
    Insert,
    Relation,
    TypeInfo,
    Update,
)
from connectors.postgres.rows import RowReader, compile_reader
from connectors.postgres.values import (
    SCALAR_OIDS,
    Converter,
    PgValueError,
    row_converters,
    unchecked_converter_for,
)

__all__ = ["FORMAT", "RowPlan", "build_plan", "row_decoder"]

logger = logging.getLogger(__name__)

FORMAT: Final = "pgoutput1"
# Types whose converted values are immutable and whose text tends to repeat across rows (a
# now() default or a trigger stamps every row of a transaction alike).
_MEMO_TYPES = frozenset({"timestamptz", "timestamp", "date"})
_PLANS_KEPT = 256


@dataclass(frozen=True, slots=True)
class RowPlan:
    """How to turn one table version's row messages into row images (built once per version)."""

    relation: Relation
    object_name: str
    names: tuple[str, ...]
    converters: tuple[Converter | None, ...]
    key: tuple[tuple[str, int], ...]
    identity: tuple[int, ...]
    # The compiled reader for plain row changes (None where column names repeat).
    reader: RowReader | None
    decoder: Decoder
    shape: RowShape


def build_plan(rel: Relation, types: Mapping[int, TypeInfo], key_names: Sequence[str] | None) -> RowPlan:
    """Build the plan of ``rel``; ``key_names`` from config, or None for the replica identity.

    Raises:
        PermanentError: a configured key column is not among the published columns.
    """
    names = tuple(c.name for c in rel.columns)
    position = {n: i for i, n in enumerate(names)}
    identity = tuple(i for i, c in enumerate(rel.columns) if c.is_key)
    if not key_names:
        key_names = tuple(names[i] for i in identity) if rel.replident in "di" else names
    missing = [k for k in key_names if k not in position]
    if missing:
        raise PermanentError(
            f"table {rel.qualified_name}: key column(s) {', '.join(missing)} are not in the "
            "published columns. Fix: correct key_columns in the table mapping"
        )
    if rel.replident == "f":
        identity = tuple(range(len(names)))
    converters = row_converters(rel.columns, types)
    reader = None
    if len(set(names)) == len(names):
        fast = [_fast_kind(col.type_oid) for col in rel.columns]
        reader = compile_reader(
            source="", stream="", object_name=rel.qualified_name, names=names, converters=converters,
            fast=fast, key=[position[k] for k in key_names], identity=identity,
        )  # fmt: skip
    decoder = Decoder()
    decoder.remember(rel)
    definition = _definition(rel, types, tuple(key_names))
    # The shape's decoder needs the plan and the plan holds the shape: the box ties the knot.
    plan_box: list[RowPlan] = []
    shape = RowShape(
        id=_shape_id(definition), format=FORMAT, definition=definition, decode=lambda d: image(plan_box[0], d)
    )
    plan = RowPlan(
        relation=rel, object_name=rel.qualified_name, names=names, converters=converters,
        key=tuple((k, position[k]) for k in key_names), identity=identity, reader=reader, decoder=decoder,
        shape=shape,
    )  # fmt: skip
    plan_box.append(plan)
    return plan


def image(plan: RowPlan, data: bytes) -> RowImage:
    """Decode one Insert/Update/Delete message of ``plan``'s table version."""
    if plan.reader is not None:
        change = plan.reader(data, "", "", None, None, "")
        if change is not None:
            return change.key, change.fields, frozenset(), None
    msg = plan.decoder.decode(data)
    if not isinstance(msg, Insert | Update | Delete):
        raise PermanentError(
            f"table {plan.object_name}: expected a row change message, got {type(msg).__name__}"
        )
    return _general_image(plan, msg)


_plans: dict[str, RowPlan] = {}
_plans_lock = threading.Lock()


def row_decoder(definition: Mapping[str, Any]) -> Callable[[bytes], RowImage]:
    """Return the decoder of journaled row messages of the shape ``definition`` (plans cached)."""
    sid = _shape_id(definition)
    plan = _plans.get(sid)
    if plan is None:
        rel, types, key_names = _from_definition(definition)
        plan = build_plan(rel, types, key_names)
        with _plans_lock:
            if len(_plans) >= _PLANS_KEPT:
                _plans.clear()
            _plans[sid] = plan
    return plan.shape.decode


def _definition(rel: Relation, types: Mapping[int, TypeInfo], key_names: tuple[str, ...]) -> dict[str, Any]:
    """The JSON form of a table version: enough to rebuild its plan in another process."""
    type_names = {str(c.type_oid): types[c.type_oid].name for c in rel.columns if c.type_oid in types}
    return {
        "relid": rel.relid,
        "namespace": rel.namespace,
        "name": rel.name,
        "replident": rel.replident,
        "columns": [[c.name, c.type_oid, c.typmod, c.is_key] for c in rel.columns],
        "key": list(key_names),
        "types": type_names,
    }


def _from_definition(d: Mapping[str, Any]) -> tuple[Relation, dict[int, TypeInfo], tuple[str, ...]]:
    try:
        columns = tuple(Column(str(n), int(oid), int(mod), bool(k)) for n, oid, mod, k in d["columns"])
        rel = Relation(int(d["relid"]), str(d["namespace"]), str(d["name"]), str(d["replident"]), columns)
        types = {int(oid): TypeInfo(int(oid), "", str(name)) for oid, name in d["types"].items()}
        return rel, types, tuple(str(k) for k in d["key"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PermanentError(f"journal row shape {d!r} is not a {FORMAT} shape ({exc})") from None


def _shape_id(definition: Mapping[str, Any]) -> str:
    text = json.dumps([FORMAT, definition], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _convert(plan: RowPlan, values: tuple[object, ...]) -> tuple[object, ...]:
    try:
        return tuple(
            [
                v if conv is None or type(v) is not str else conv(v)
                for conv, v in zip(plan.converters, values, strict=True)
            ]
        )
    except PgValueError:
        pass
    out = []
    for name, conv, v in zip(plan.names, plan.converters, values, strict=True):
        if conv is not None and type(v) is str:
            try:
                v = conv(v)
            except PgValueError:
                # Keep the server's text: stalling on one odd value is worse.
                logger.warning("event=pg_value_kept_as_text table=%s column=%s", plan.object_name, name)
        out.append(v)
    return tuple(out)


def _general_image(plan: RowPlan, msg: Insert | Update | Delete) -> RowImage:
    names = plan.names
    old_key = None
    unchanged: frozenset[str] = frozenset()
    if isinstance(msg, Delete):
        old = _convert(plan, msg.old)
        cols = plan.identity if msg.old_kind == "K" else range(len(names))
        fields = {names[i]: old[i] for i in cols if old[i] is not UNCHANGED}
        key = {k: old[i] for k, i in plan.key}
        return key, fields, unchanged, None
    new = _convert(plan, msg.new)
    if UNCHANGED in new:
        fields = {n: v for n, v in zip(names, new, strict=True) if v is not UNCHANGED}
        unchanged = frozenset(n for n, v in zip(names, new, strict=True) if v is UNCHANGED)
    else:
        fields = dict(zip(names, new, strict=True))
    key = {k: new[i] for k, i in plan.key}
    if isinstance(msg, Update) and msg.old is not None:
        old = _convert(plan, msg.old)
        previous = {k: old[i] for k, i in plan.key}
        for k, v in key.items():
            if v is UNCHANGED:
                key[k] = previous[k]
        if previous != key and all(v is not UNCHANGED for v in previous.values()):
            old_key = previous
    return key, fields, unchanged, old_key


def _fast_kind(type_oid: int) -> str | None:
    """How a compiled reader converts a column of this type (see ``rows.compile_reader``)."""
    unchecked = unchecked_converter_for(type_oid)
    if unchecked is int:
        return "int"
    if unchecked is not None:
        return "decimal"
    return "memo" if SCALAR_OIDS.get(type_oid) in _MEMO_TYPES else None
