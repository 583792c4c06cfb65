"""The CLI's record commands: the exception queue, the cross-reference, reconciliation, workflows.

Registered on the ``syncagent`` group of ``agent.cli`` when that module is imported.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from agent import ops
from agent.cli import Ctx, _fail, _runtime, _state, cli, command
from agent.errors import SyncAgentError
from agent.render import emit_json, json_default, render_reconcile, table


@cli.group()
def exceptions() -> None:
    """The exception queue: list, show, retry or resolve parked records."""


@exceptions.command(name="list")
@click.option(
    "--status", type=click.Choice(["open", "retrying", "resolved", "all"]), default="open", show_default=True
)
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@command()
@click.pass_obj
def exceptions_list(c: Ctx, status: str, limit: int, as_json: bool) -> None:
    """List exception items: id, age, kind, reason, record and field."""
    with _state(c, readonly=True) as st:
        items = ops.exception_items(st, status=None if status == "all" else status, limit=limit)
    if as_json:
        emit_json({"ok": True, "items": [_item_dict(i) for i in items]})
        return
    table(
        [
            [
                i.id,
                i.status,
                i.created_at.isoformat(timespec="seconds"),
                i.kind,
                i.reason,
                i.entity,
                i.source,
                i.field,
                i.attempts,
                i.trace_id,
            ]
            for i in items
        ],
        ["id", "status", "created", "kind", "reason", "entity", "system", "field", "tries", "trace"],
    )


def _item_dict(i: Any) -> dict[str, Any]:
    return {k: getattr(i, k) for k in i.__dataclass_fields__}


@exceptions.command(name="show")
@click.argument("item_id", type=int)
@command()
@click.pass_obj
def exceptions_show(c: Ctx, item_id: int, as_json: bool) -> None:
    """Show one exception item whole: reason, detail, record, trace id."""
    with _state(c, readonly=True) as st:
        item = ops.exception_item(st, item_id)
    if item is None:
        raise SyncAgentError(f"no exception item {item_id}")
    if as_json:
        emit_json({"ok": True, "item": _item_dict(item)})
        return
    for k, v in _item_dict(item).items():
        if k == "record":
            v = json.dumps(v, default=json_default, indent=2)
        click.echo(f"{k:>13}: {v}")


@exceptions.command(name="retry")
@click.argument("item_id", type=int)
@command()
@click.pass_obj
def exceptions_retry(c: Ctx, item_id: int, as_json: bool) -> None:
    """Retry one item now: re-queue its op, or resolve its change again."""
    with _runtime(c) as rt, _state(c) as st:
        outcome = ops.retry_exception(rt, st, item_id, actor=ops.operator())
    if as_json:
        emit_json({"ok": True, "id": item_id, "outcome": outcome})
    else:
        click.echo(f"exception {item_id}: {outcome}")


@exceptions.command(name="resolve")
@click.argument("item_id", type=int)
@click.option("--note", required=True, help="Why it is resolved (kept in the audit log).")
@click.option("--yes", is_flag=True, help="Do it; without this only say what would happen.")
@command()
@click.pass_obj
def exceptions_resolve(c: Ctx, item_id: int, note: str, yes: bool, as_json: bool) -> None:
    """Close an item by hand (nothing is applied), with a note in the audit log."""
    if not yes:
        msg = f"dry run: exception {item_id} would be resolved with note {note!r}; add --yes"
        emit_json({"ok": True, "dry_run": True, "message": msg}) if as_json else click.echo(msg)
        return
    with _state(c) as st:
        ops.resolve_exception(st, item_id, actor=ops.operator(), note=note)
    emit_json({"ok": True, "id": item_id, "resolved": True}) if as_json else click.echo(
        f"exception {item_id} resolved"
    )


@cli.group()
def xref() -> None:
    """The cross-reference between systems' ids."""


@xref.command(name="lookup")
@click.argument("entity")
@click.argument("system")
@click.argument("external_id")
@command()
@click.pass_obj
def xref_lookup(c: Ctx, entity: str, system: str, external_id: str, as_json: bool) -> None:
    """Find a record's canonical id and its id in every other system."""
    with _state(c, readonly=True) as st:
        found = ops.xref_lookup(st, entity, system, external_id)
    if found is None:
        _fail(as_json, f"no {entity} linked for {system} id {external_id}", ["not_found"], 1)
        return
    if as_json:
        emit_json({"ok": True, **found})
        return
    click.echo(f"{entity} {found['canonical_id']}")
    table([[s, i] for s, i in found["members"].items()], ["system", "id"])


@cli.command(name="reconcile")
@click.argument("entity")
@click.option(
    "--repair", is_flag=True, help="Queue ops pushing each owner's value; open items for missing records."
)
@click.option(
    "--page-size", type=click.IntRange(1, 10_000), default=500, show_default=True, help="Records per page."
)
@command()
@click.pass_obj
def reconcile_cmd(c: Ctx, entity: str, repair: bool, page_size: int, as_json: bool) -> None:
    """Compare ENTITY's linked records field by field across systems (read-only unless --repair)."""
    from agent.reconcile import reconcile

    bar = None
    if sys.stderr.isatty() and not as_json:

        def bar(done: int, total: int) -> None:
            filled = 30 * done // max(total, 1)
            click.echo(f"\r[{'#' * filled:<30}] {done:,}/{total:,}", err=True, nl=False)

    with _runtime(c) as rt, _state(c, readonly=not repair) as st:
        report = reconcile(
            rt, st, entity, repair=repair, page_size=page_size, progress=bar, actor=ops.operator()
        )
    if bar is not None:
        click.echo("", err=True)
    if as_json:
        emit_json({"ok": report.ok, "report": report.as_dict()})
    else:
        render_reconcile(report, repair=repair)
    sys.exit(0 if report.ok or repair else 1)


@cli.command(name="workflows")
@click.option("--workflow", "name", default=None, help="Only instances of this workflow.")
@click.option("--status", type=click.Choice(["running", "parked", "failed", "completed"]), default=None)
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@command()
@click.pass_obj
def workflows_cmd(c: Ctx, name: str | None, status: str | None, limit: int, as_json: bool) -> None:
    """List workflow instances: trigger, steps, outcome, trace id, latency from trigger to completion."""
    from agent.workflows.report import instance_report, render_report

    with _state(c, readonly=True) as st:
        report = instance_report(st, workflow=name, status=status, limit=limit)
    emit_json({"ok": True, **report.to_dict()}) if as_json else render_report(report)
