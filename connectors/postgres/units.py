"""The ``unit`` op: several upserts applied all or nothing, later steps using earlier steps' ids.

``op.fields["steps"]`` is a list of ``{"object": "erp.customers", "key": {...}, "fields":
{...}}``; a key or field value ``{"$step": n}`` is replaced by the primary key step ``n``
returned. The sink runs every step as an ordinary upsert (by its key, so a replay finds the
rows and creates nothing twice) inside one savepoint: the first step that is refused rolls
back the steps before it, and the unit is answered with that step's outcome, its detail
prefixed with the step. Other keys of a step (``entity``, ``canonical``) and of the fields
(``then``) belong to the pipeline and are ignored here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any, Protocol

from agent.model import Op, Outcome


class StepWritten(Protocol):
    """What the sink answers for a step that went through: the row's id, and whether it wrote."""

    @property
    def external_id(self) -> str:
        """The row's primary key, as text."""
        ...

    @property
    def wrote(self) -> bool:
        """Whether the step changed a row."""
        ...


class _Abort(Exception):
    """Raised inside the unit's savepoint to roll it back and answer ``outcome``."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reason)
        self.outcome = outcome


def apply_unit(
    op: Op,
    apply_step: Callable[[Op], Outcome | StepWritten],
    savepoint: Callable[[], AbstractContextManager[Any]],
) -> Outcome | tuple[list[str], bool]:
    """Apply the unit's steps through ``apply_step`` in one ``savepoint``.

    Returns the steps' ids and whether any step wrote, or the outcome of the step that
    was refused (nothing of the unit is then kept).
    """
    steps = op.fields.get("steps")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, Mapping) for s in steps):
        return Outcome.reject("invalid_unit", "a unit op needs fields.steps: a list of upserts")
    ids: list[str] = []
    wrote = False
    try:
        with savepoint():
            for n, step in enumerate(steps):
                where = f"step {n} ({step.get('object')})"
                sub = replace(
                    op,
                    object_name=str(step.get("object")),
                    action="upsert",
                    key=_filled(step.get("key"), ids, where),
                    fields=_filled(step.get("fields"), ids, where),
                )
                result = apply_step(sub)
                if isinstance(result, Outcome):
                    raise _Abort(replace(result, detail=f"{where}: {result.detail or result.reason}"))
                ids.append(result.external_id)
                wrote = wrote or result.wrote
    except _Abort as exc:
        return exc.outcome
    return ids, wrote


def _filled(values: Any, ids: list[str], where: str) -> dict[str, Any]:
    if not isinstance(values, Mapping):
        raise _Abort(Outcome.reject("invalid_unit", f"{where}: key and fields must be objects"))
    out: dict[str, Any] = {}
    for column, value in values.items():
        if isinstance(value, Mapping) and set(value) == {"$step"}:
            n = value["$step"]
            if not isinstance(n, int) or not 0 <= n < len(ids):
                raise _Abort(
                    Outcome.reject(
                        "bad_step_reference", f"{where}: refers to step {n}, not before it", column
                    )
                )
            value = ids[n]
        out[column] = value
    return out
