"""HubSpot writes: batch upsert by a unique property, batch update by id, batch archive.

Consecutive ops of one object and kind go out in requests of at most 100 inputs, never with
the same record twice in one request (HubSpot refuses duplicate ids in a batch). HubSpot may
fail a *whole* batch with 400 or 409 for one bad input (a conflicting unique value, an
invalid number) instead of answering 207, and the body does not say which input: such a
batch is bisected until the culprit stands alone, so only it is rejected and the others
apply (about 2·log2(n) extra requests per bad record). 207 answers are read per record.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import httpx

from agent.model import Op, Outcome
from connectors.http import json_body
from connectors.hubspot.api import BATCH_MAX, HsObject, HubSpotApi
from connectors.hubspot.source import iso_ms, parse_instant

logger = logging.getLogger(__name__)

_PROPERTY_WIDE = frozenset({"PROPERTY_DOESNT_EXIST", "READ_ONLY_VALUE"})
_Item = tuple[int, str]  # (index of the op, its reference: HubSpot id or unique-property value)


class BatchWriter:
    """Applies ops to HubSpot objects, one ``Outcome`` per op (see the module doc)."""

    def __init__(self, api: HubSpotApi, objects: Mapping[str, HsObject]) -> None:
        self._api = api
        self._objects = objects

    def apply(self, ops: Sequence[Op]) -> list[Outcome]:
        """Apply ``ops`` in order; per-record failures are outcomes, batch failures raise."""
        outcomes: list[Outcome | None] = [None] * len(ops)
        runs: list[tuple[HsObject, str, list[_Item]]] = []
        for index, op in enumerate(ops):
            routed = self._route(op)
            if isinstance(routed, Outcome):
                outcomes[index] = routed
                continue
            obj, mode, ref = routed
            if runs and runs[-1][0] == obj and runs[-1][1] == mode:
                runs[-1][2].append((index, ref))
            else:
                runs.append((obj, mode, [(index, ref)]))
        for obj, mode, items in runs:
            for chunk in _chunks(items):
                outcomes_of = (
                    self._archive_by(obj, chunk)
                    if mode == "archive_by"
                    else self._send(obj, mode, chunk, ops)
                )
                for index, outcome in outcomes_of.items():
                    outcomes[index] = outcome
        return [o if o is not None else Outcome.retry(None, "no_result") for o in outcomes]

    def _route(self, op: Op) -> tuple[HsObject, str, str] | Outcome:
        obj = self._objects.get(op.object_name)
        if obj is None:
            return Outcome.reject("unknown_object", f"no HubSpot object is configured as {op.object_name!r}")
        if op.action not in ("upsert", "delete"):
            return Outcome.reject("unknown_action", f"action {op.action!r} is neither upsert nor delete")
        record_id = op.key.get("id", op.key.get("hs_object_id"))
        if record_id not in (None, ""):
            return obj, "update" if op.action == "upsert" else "archive", str(record_id)
        if obj.id_property and op.key.get(obj.id_property) not in (None, ""):
            return obj, "upsert" if op.action == "upsert" else "archive_by", str(op.key[obj.id_property])
        return Outcome.reject(
            "missing_key", f"op for {obj.name} has neither id nor {obj.id_property or 'an id property'}"
        )

    def _send(self, obj: HsObject, mode: str, chunk: list[_Item], ops: Sequence[Op]) -> dict[int, Outcome]:
        """Send one batch; bisect it when HubSpot refuses it whole."""
        inputs: list[dict[str, Any]] = []
        sent: dict[int, set[str]] = {}
        for index, ref in chunk:
            if mode == "archive":
                inputs.append({"id": ref})
                continue
            props = {k: _wire(v) for k, v in ops[index].fields.items() if k not in ("id", "hs_object_id")}
            sent[index] = set(props)
            if mode == "upsert" and obj.id_property:
                props[obj.id_property] = ref  # echoed back, so results can be matched to inputs
                inputs.append({"id": ref, "idProperty": obj.id_property, "properties": props})
            else:
                inputs.append({"id": ref, "properties": props})
        response = self._api.call(
            "POST", f"/crm/v3/objects/{obj.name}/batch/{mode}", body={"inputs": inputs}, tolerate=(400, 409)
        )
        if response.status_code in (400, 409):
            body = _body(response)
            if len(chunk) == 1:
                return {chunk[0][0]: reject_outcome(body, response.status_code)}
            # A property that does not exist (or is read-only) fails every input that sets it:
            # reject those directly instead of bisecting down to each of them.
            wide = {name for code, name in property_errors(body) if code in _PROPERTY_WIDE}
            doomed = [item for item in chunk if wide & sent.get(item[0], set())]
            if doomed:
                out = {index: _reject_properties(wide & sent[index]) for index, _ in doomed}
                rest = [item for item in chunk if item not in doomed]
                return {**out, **(self._send(obj, mode, rest, ops) if rest else {})}
            logger.info(
                "event=hubspot_batch_split object=%s mode=%s n=%s status=%s",
                obj.name,
                mode,
                len(chunk),
                response.status_code,
            )
            middle = len(chunk) // 2
            return {
                **self._send(obj, mode, chunk[:middle], ops),
                **self._send(obj, mode, chunk[middle:], ops),
            }
        if mode == "archive":
            return {index: Outcome.applied(ref) for index, ref in chunk}
        return self._outcomes(obj, mode, chunk, json_body(response) or {})

    def _outcomes(
        self, obj: HsObject, mode: str, chunk: list[_Item], body: Mapping[str, Any]
    ) -> dict[int, Outcome]:
        by_ref: dict[str, Outcome] = {}
        for result in body.get("results") or []:
            props = result.get("properties") or {}
            ref = str(props.get(obj.id_property) if mode == "upsert" else result.get("id"))
            when = parse_instant(props.get(obj.modified_property) or result.get("updatedAt"))
            by_ref[ref] = Outcome.applied(str(result.get("id")), iso_ms(when) if when else None)
        loose: list[Outcome] = []
        for error in body.get("errors") or []:
            outcome = reject_outcome(error)
            named = [
                str(v)
                for values in (error.get("context") or {}).values()
                if isinstance(values, list)
                for v in values
            ]
            hit = [r for r in named if r in {ref for _, ref in chunk}]
            for ref in hit:
                by_ref.setdefault(ref, outcome)
            if not hit:
                loose.append(outcome)
        fallback = loose[0] if loose else Outcome.retry(None, "no_result")
        return {index: by_ref.get(ref, fallback) for index, ref in chunk}

    def _archive_by(self, obj: HsObject, chunk: list[_Item]) -> dict[int, Outcome]:
        """Delete by unique-property value: look the ids up, archive those that exist."""
        body = {
            "inputs": [{"id": ref} for _, ref in chunk],
            "idProperty": obj.id_property,
            "properties": [obj.id_property],
        }
        found = json_body(self._api.call("POST", f"/crm/v3/objects/{obj.name}/batch/read", body=body)) or {}
        ids = {
            str((r.get("properties") or {}).get(obj.id_property)): str(r.get("id"))
            for r in found.get("results") or []
        }
        out = {
            index: Outcome("applied", external_id=None, detail="already deleted")
            for index, ref in chunk
            if ref not in ids
        }
        present = [(index, ids[ref]) for index, ref in chunk if ref in ids]
        if present:
            out.update(self._send(obj, "archive", present, ()))
        return out


def _chunks(items: list[_Item]) -> list[list[_Item]]:
    """Split into requests of at most 100 inputs, none naming the same record twice."""
    chunks: list[list[_Item]] = []
    refs: set[str] = set()
    for item in items:
        if not chunks or len(chunks[-1]) >= BATCH_MAX or item[1] in refs:
            chunks.append([])
            refs = set()
        chunks[-1].append(item)
        refs.add(item[1])
    return chunks


def _wire(value: Any) -> str:
    """HubSpot takes every property value as a string; empty string clears a property."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime):
        return iso_ms(value if value.tzinfo else value.astimezone())
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _body(response: httpx.Response) -> Mapping[str, Any]:
    try:
        body = json_body(response)
    except ValueError:
        body = None
    return body if isinstance(body, Mapping) else {"category": f"http_{response.status_code}"}


def property_errors(body: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(code, property) pairs of a 400: from ``errors[]`` or the JSON list HubSpot embeds in ``message``."""
    pairs = [
        (str(e.get("code") or ""), str(n))
        for e in body.get("errors") or []
        for n in (e.get("context") or {}).get("propertyName") or []
    ]
    message = body.get("message")
    if isinstance(message, str) and "[" in message:
        try:
            items = json.loads(message[message.index("[") :])
        except ValueError:
            items = []
        for item in items if isinstance(items, list) else []:
            if isinstance(item, Mapping) and item.get("name"):
                pairs.append((str(item.get("error") or ""), str(item["name"])))
    return pairs


def _reject_properties(names: set[str]) -> Outcome:
    listed = ",".join(sorted(names))
    return Outcome.reject(
        "VALIDATION_ERROR",
        f"VALIDATION_ERROR properties={listed} do not exist or are read-only",
        sorted(names)[0],
    )


def reject_outcome(body: Mapping[str, Any], status: int | None = None) -> Outcome:
    """A reject outcome naming HubSpot's category, error codes and properties, never values."""
    category = str(body.get("category") or (f"http_{status}" if status else "error"))
    pairs = property_errors(body)
    codes = sorted(
        {c for c, _ in pairs if c} | {str(e["code"]) for e in body.get("errors") or [] if e.get("code")}
    )
    names = [n for _, n in pairs]
    detail = (
        category
        + (f" codes={','.join(codes)}" if codes else "")
        + (f" properties={','.join(dict.fromkeys(names))}" if names else "")
    )
    return Outcome.reject(category, detail, names[0] if names else None)
