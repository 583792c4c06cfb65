"""Operator actions behind the CLI: init, check, checkpoint rewind, exceptions, xref lookup.

Destructive actions (rewind, exception resolve) take the state write lock and write an
audit row with the operator as actor; the CLI shows a dry run unless given ``--yes``.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent import pipeline
from agent.config import Config
from agent.daemon import Runtime, pg_connect_factory
from agent.errors import CursorUnavailable, PermanentError, SyncAgentError
from agent.model import Cursor, Problem
from connectors.base import Resync
from connectors.postgres import TableSpec, classify_pg, ensure
from state import audit, checkpoints, exceptions, journal, open_state, outbox, xref
from state.checkpoints import Checkpoint
from state.db import State
from state.exceptions import ExceptionItem
from state.journal import JournalRow


def operator() -> str:
    """The name recorded as actor for operator actions."""
    try:
        return f"operator:{getpass.getuser()}"
    except (KeyError, OSError):
        return "operator"


def open_store(config: Config, *, readonly: bool = False) -> State:
    """Open the config's state file (read-only for the reporting commands)."""
    return open_state(config.agent.state_path, readonly=readonly)


def prepare_state(config: Config) -> None:
    """Create (or migrate) the state file; when run as root, hand it to its folder's owner.

    ``sudo syncagent init`` must not leave a root-owned state file that the service user
    (the owner of systemd's StateDirectory) can no longer write.
    """
    open_store(config).close()
    path = config.agent.state_path
    if os.geteuid() != 0:
        return
    folder = os.stat(path.parent)
    if folder.st_uid == 0:
        return
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if p.exists():
            os.chown(p, folder.st_uid, folder.st_gid)


def journal_rows(st: State, *, since_seq: int, limit: int, source: str | None) -> list[JournalRow]:
    """Journal entries after ``since_seq`` with their fates."""
    return journal.list_entries(
        st, since_seq=since_seq, limit=limit, source=source, formats=pipeline.ROW_FORMATS
    )


def checkpoint_rows(st: State) -> list[Checkpoint]:
    """Every checkpoint."""
    return checkpoints.list_all(st)


def exception_items(st: State, *, status: str | None, limit: int) -> list[ExceptionItem]:
    """Exception items with ``status`` (None: all)."""
    return exceptions.list_items(st, status=status, limit=limit)  # type: ignore[arg-type]


def exception_item(st: State, item_id: int) -> ExceptionItem | None:
    """One exception item, or None."""
    return exceptions.get(st, item_id)


def init(config: Config, *, dry_run: bool) -> dict[str, list[str]]:
    """Create publication, slot and origin for every PostgreSQL system; return the SQL per system."""
    out: dict[str, list[str]] = {}
    for name, sc in config.systems.items():
        if sc.type != "postgres":
            continue
        specs = []
        for _entity, m in config.mappings_of(name):
            schema, _, table = m.object.partition(".")
            specs.append(
                TableSpec(
                    schema,
                    table,
                    row_filter=m.row_filter,
                    key_columns=(m.key,),
                    updated_at_column=m.updated_at,
                )
            )
        with (
            classify_pg(f"syncagent init ({name})", target=f"{sc.options['host']}:{sc.options['port']}"),
            pg_connect_factory(sc)() as conn,
        ):
            out[name] = ensure(
                conn,
                slot=sc.options["slot"],
                publication=sc.options["publication"],
                origin=sc.options["origin"],
                tables=specs,
                dry_run=dry_run,
            )
    return out


def check(runtime: Runtime) -> dict[str, list[Problem]]:
    """Call every connector's ``check()``; a failure to check is itself a problem, not a traceback."""
    out: dict[str, list[Problem]] = {}
    for name in runtime.config.systems:
        problems: list[Problem] = []
        for part in {id(x): x for x in (runtime.sources.get(name), runtime.sinks.get(name)) if x}.values():
            try:
                problems += part.check()
            except SyncAgentError as exc:
                problems.append(Problem(name, str(exc), "see docs/operations.md"))
        out[name] = list({(p.subject, p.message): p for p in problems}.values())
    return out


@dataclass(frozen=True, slots=True)
class RewindPlan:
    """What a rewind will do, shown before it is done."""

    target: str
    kind: str  # "api", "resolver", "resync"
    description: str
    current: dict[str, Any] | None
    new: dict[str, Any] | None


def plan_rewind(
    runtime: Runtime, st: State, target: str, *, to_time: datetime | None, to_seq: int | None
) -> RewindPlan:
    """Work out what rewinding ``target`` (``resolver``, ``SYSTEM`` or ``SYSTEM/STREAM``) means."""
    if target == "resolver":
        cp = checkpoints.get(st, pipeline.RESOLVER_OWNER, pipeline.RESOLVER_STREAM)
        seq = to_seq
        if seq is None and to_time is not None:
            first = _first_seq(st, to_time)
            seq = max(0, first - 1) if first is not None else None
        if seq is None:
            raise PermanentError("nothing in the journal at or after that time (within retention)")
        return RewindPlan(
            "resolver",
            "resolver",
            f"re-resolve journal entries after seq {seq}; what is already in step produces nothing",
            dict(cp.cursor.data) if cp else None,
            {"v": 1, "seq": seq},
        )
    system, _, stream = target.partition("/")
    if system not in runtime.sources:
        raise PermanentError(f"unknown checkpoint {target!r}: use `checkpoint list` for the names")
    source = runtime.sources[system]
    streams = [stream] if stream else list(source.streams())
    rewindable = runtime.config.systems[system].type != "postgres" and hasattr(source, "cursor_for_time")
    if rewindable and to_time is not None:
        try:
            for s in streams:
                source.cursor_for_time(s, to_time)  # type: ignore[attr-defined]
        except CursorUnavailable:
            rewindable = False
    if not rewindable:
        if not isinstance(source, Resync):
            raise CursorUnavailable(f"{system} cannot rewind and has no resync")
        tables = [m.object for _e, m in runtime.config.mappings_of(system)]
        if stream and stream != "wal":
            tables = [stream]
        when = to_time.isoformat() if to_time else "the beginning (all rows)"
        why = (
            "a replication slot cannot move backwards"
            if runtime.config.systems[system].type == "postgres"
            else "its change cursor cannot move back to a time"
        )
        return RewindPlan(
            target,
            "resync",
            f"{why}: re-read {', '.join(tables)} changed since {when} as 'read' changes into the journal",
            None,
            {"tables": tables, "since": to_time.isoformat() if to_time else None},
        )
    if to_time is None:
        raise PermanentError("an API source rewinds to a time: give --to TIME")
    new = {s: dict(source.cursor_for_time(s, to_time).data) for s in streams}  # type: ignore[attr-defined]
    current = {
        s: dict(cp.cursor.data)
        for s in streams
        if (cp := checkpoints.get(st, pipeline.source_owner(system), s))
    }
    return RewindPlan(
        target,
        "api",
        f"re-read {', '.join(streams)} from {to_time.isoformat()}; re-read changes "
        "already in step produce nothing",
        current,
        new,
    )


def _first_seq(st: State, when: datetime) -> int | None:
    return journal.first_seq_at_or_after(st, when)


def execute_rewind(
    runtime: Runtime,
    st: State,
    plan: RewindPlan,
    *,
    actor: str,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Carry out a planned rewind; for a resync, return the rows journaled."""
    if plan.kind == "resolver":
        assert plan.new is not None
        checkpoints.rewind(
            st,
            pipeline.RESOLVER_OWNER,
            pipeline.RESOLVER_STREAM,
            Cursor(plan.new),
            reason="rewind",
            actor=actor,
        )
        return 0
    system = plan.target.partition("/")[0]
    if plan.kind == "api":
        assert plan.new is not None
        for stream, data in plan.new.items():
            checkpoints.rewind(
                st, pipeline.source_owner(system), stream, Cursor(data), reason="rewind", actor=actor
            )
        return 0
    assert plan.new is not None
    source = runtime.sources[system]
    assert isinstance(source, Resync)
    since = datetime.fromisoformat(plan.new["since"]) if plan.new.get("since") else None
    total = 0
    audit.record(st, "resync_started", actor=actor, detail={"system": system, **plan.new})
    for table in plan.new["tables"]:
        for n in _resync(source, st, system, table, since):
            total += n
            if progress:
                progress(n)
    audit.record(st, "resync_finished", actor=actor, detail={"system": system, "rows": total})
    return total


def _resync(source: Resync, st: State, system: str, table: str, since: datetime | None) -> Iterator[int]:
    yield from pipeline.run_resync(source, st, source_name=system, table=table, since=since)


def retry_exception(runtime: Runtime, st: State, item_id: int, *, actor: str) -> str:
    """Retry one exception item: re-queue its op, or resolve its journal entry again."""
    item = exceptions.get(st, item_id)
    if item is None:
        raise PermanentError(f"no exception item {item_id}")
    if item.status == "resolved":
        raise PermanentError(f"exception {item_id} is already resolved")
    exceptions.mark_retrying(st, item_id)
    audit.record(
        st,
        "exception_retried",
        actor=actor,
        trace_id=item.trace_id,
        entity=item.entity,
        canonical_id=item.canonical_id,
        detail={"id": item_id, "reason": item.reason},
    )
    if item.op_id is not None:
        outbox.requeue(st, item.op_id)
        return "requeued: the op is due now and `run` (or the service) delivers it"
    if item.journal_seq is not None:
        decision = pipeline.reresolve(st, runtime.resolver, item.journal_seq)
        if decision is not None and not any(p.reason == item.reason for p in decision.problems):
            exceptions.resolve(st, item_id, actor=actor, resolution=f"retried: {decision.fate}")
            return f"resolved again: {decision.fate}"
        exceptions.reopen(st, item_id, actor=actor)
        return "still failing: " + "; ".join(p.detail for p in (decision.problems if decision else ()))
    raise PermanentError(f"exception {item_id} has nothing to retry; resolve it instead")


def resolve_exception(st: State, item_id: int, *, actor: str, note: str) -> None:
    """Close an exception item by hand, with the operator's note (audited)."""
    if not exceptions.resolve(st, item_id, actor=actor, resolution=note):
        raise PermanentError(f"no open exception item {item_id}")


def xref_lookup(st: State, entity: str, system: str, external_id: str) -> dict[str, Any] | None:
    """The canonical id and every system's id for one record, or None."""
    cid = xref.lookup(st, entity, system, external_id)
    if cid is None:
        return None
    return {"entity": entity, "canonical_id": cid, "members": xref.members(st, entity, cid)}
