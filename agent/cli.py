"""The ``syncagent`` command line: thin commands that parse, call ``ops``/``health``, render.

Data goes to stdout (an aligned table, or one JSON object with a stable envelope under
``--json``); logs go to stderr. Exit codes: 0 ok, 1 failure (``status`` finding something
unhealthy included), 2 bad usage or config.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from agent import __version__, ops
from agent.config import Config
from agent.errors import ConfigError, SyncAgentError, exit_code_for
from agent.logging import setup as setup_logging
from agent.model import utcnow
from agent.render import emit_json, json_default, render_status, table

DEFAULT_CONFIG = "/etc/syncagent/config.toml"


class Ctx:
    """What the group passes to its commands: the config path and output options."""

    def __init__(self, config_path: str, log_format: str | None, log_level: str | None) -> None:
        self.config_path = config_path
        self.log_format = log_format
        self.log_level = log_level
        self._config: Config | None = None

    def config(self) -> Config:
        """Load (once) and validate the config, connector checks included."""
        if self._config is None:
            from agent.daemon import open_config

            self._config = open_config(self.config_path)
        return self._config

    @property
    def cfg_arg(self) -> str:
        """How the user named the config, to repeat in suggested commands."""
        return f"-c {self.config_path}"


def command(json_flag: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command: ``--json``, and errors turned into messages and exit codes."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            as_json = bool(kwargs.get("as_json"))
            try:
                return fn(*args, **kwargs)
            except ConfigError as exc:
                _fail(as_json, "invalid configuration", [str(e) for e in exc.errors], 2)
            except SyncAgentError as exc:
                _fail(as_json, str(exc), [type(exc).__name__], exit_code_for(exc))

        if json_flag:
            run = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")(run)
        return run

    return wrap


def _fail(as_json: bool, message: str, errors: list[str], code: int) -> None:
    if as_json:
        emit_json({"ok": False, "error": message, "errors": errors})
    else:
        click.echo(f"error: {message}", err=True)
        for e in errors:
            if e != message:
                click.echo(f"  {e}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-c",
    "--config",
    "config_path",
    envvar="SYNCAGENT_CONFIG",
    default=DEFAULT_CONFIG,
    show_default=True,
    help="Config file (or $SYNCAGENT_CONFIG).",
)
@click.option(
    "--log-format",
    type=click.Choice(["logfmt", "json"]),
    default=None,
    help="Log line format on stderr (default: the config's, else logfmt).",
)
@click.option(
    "--log-level", default=None, help="debug, info, warning or error (default: the config's, else info)."
)
@click.version_option(__version__, prog_name="syncagent")
@click.pass_context
def cli(ctx: click.Context, config_path: str, log_format: str | None, log_level: str | None) -> None:
    """Keep a CRM and an ERP in step: capture, resolve by field ownership, deliver."""
    setup_logging(level=log_level or "info", fmt=log_format or "logfmt")
    ctx.obj = Ctx(config_path, log_format, log_level)


@contextmanager
def _state(c: Ctx, *, readonly: bool = False) -> Iterator[Any]:
    st = ops.open_store(c.config(), readonly=readonly)
    try:
        yield st
    finally:
        st.close()


@contextmanager
def _runtime(c: Ctx) -> Iterator[Any]:
    from agent.daemon import build_runtime

    rt = build_runtime(c.config())
    try:
        yield rt
    finally:
        rt.close()


@cli.command()
@click.option("--dry-run", is_flag=True, help="Print the SQL without running it.")
@command()
@click.pass_obj
def init(c: Ctx, dry_run: bool, as_json: bool) -> None:
    """Create the publication, replication slot and origin (idempotent), and the state file."""
    done = ops.init(c.config(), dry_run=dry_run)
    if not dry_run:
        ops.prepare_state(c.config())
    if as_json:
        emit_json({"ok": True, "dry_run": dry_run, "statements": done})
        return
    for system, statements in done.items():
        verb = "would run" if dry_run else "ran"
        click.echo(
            f"-- {system}: {verb} {len(statements)} statement(s)" + ("" if statements else ": in place")
        )
        for s in statements:
            click.echo(s.rstrip(";") + ";")


@cli.command()
@command()
@click.pass_obj
def check(c: Ctx, as_json: bool) -> None:
    """Validate the config and every connector's setup and reachability; name each fix."""
    cfg = c.config()
    with _runtime(c) as rt:
        found = ops.check(rt)
    errors = {s: [p for p in ps if p.severity == "error"] for s, ps in found.items()}
    ok = not any(errors.values())
    if as_json:
        emit_json(
            {
                "ok": ok,
                "config": str(cfg.path),
                "systems": {
                    s: [
                        {"subject": p.subject, "message": p.message, "fix": p.fix, "severity": p.severity}
                        for p in ps
                    ]
                    for s, ps in found.items()
                },
            }
        )
    else:
        click.echo(f"config {cfg.path}: valid")
        for system, problems in found.items():
            if not problems:
                click.echo(f"{system}: ok")
            for p in problems:
                click.echo(f"{system}: {p.severity}: {p.subject}: {p.message}")
                if p.fix:
                    click.echo(f"    fix: {p.fix}")
    if not ok:
        sys.exit(1)


@cli.command()
@click.option("--once", is_flag=True, help="Do one full cycle (capture, resolve, deliver) and exit.")
@command(json_flag=False)
@click.pass_obj
def run(c: Ctx, once: bool) -> None:
    """Run the agent: forever under the scheduler, or one cycle with --once."""
    from agent.scheduler import AgentRunner

    cfg = c.config()
    setup_logging(level=c.log_level or cfg.agent.log_level, fmt=c.log_format or cfg.agent.log_format)
    with _runtime(c) as rt:
        if not once:
            from agent.service import Service

            Service(rt).serve()
            return
        runner = AgentRunner(rt)
        if once:
            report = runner.run_once()
            runner.close()
            click.echo(
                json.dumps(
                    {
                        "ok": report.ok,
                        "captured": report.captured,
                        "resolved": report.resolved,
                        "applied": report.applied,
                        "rejected": report.rejected,
                        "failures": report.failures,
                    }
                )
            )
            sys.exit(0 if report.ok else 1)


@cli.command()
@command()
@click.pass_obj
def status(c: Ctx, as_json: bool) -> None:
    """Health per connector with the fixing command, lag, backlog, outbox and exceptions."""
    from agent.health import snapshot

    cfg = c.config()
    with _state(c, readonly=True) as st:
        snap = snapshot(cfg, st, cfg_arg=c.cfg_arg)
    if as_json:
        emit_json(snap.to_dict())
    else:
        render_status(snap)
    if not snap.ok:
        sys.exit(1)


@cli.command(name="journal")
@click.option("--since", "since_seq", type=int, default=0, help="Only entries after this sequence number.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.option("--source", default=None, help="Only entries from this system.")
@command()
@click.pass_obj
def journal_cmd(c: Ctx, since_seq: int, limit: int, source: str | None, as_json: bool) -> None:
    """List captured changes with their fate (applied, echo, ignored, conflict, exception...)."""
    with _state(c, readonly=True) as st:
        rows = ops.journal_rows(st, since_seq=since_seq, limit=limit, source=source)
    if as_json:
        emit_json(
            {
                "ok": True,
                "entries": [
                    {
                        "seq": r.entry.seq,
                        "source": r.entry.change.source,
                        "stream": r.entry.change.stream,
                        "object": r.entry.change.object_name,
                        "op": r.entry.change.op,
                        "key": r.entry.change.key,
                        "fields": r.entry.change.fields,
                        "unchanged": sorted(r.entry.change.unchanged),
                        "position": r.entry.change.position,
                        "version": r.entry.change.version,
                        "origin": r.entry.change.origin,
                        "trace_id": r.entry.change.trace_id,
                        "captured_at": r.entry.captured_at,
                        "status": r.entry.status,
                        "fate": r.fate,
                        "fate_detail": r.fate_detail,
                    }
                    for r in rows
                ],
            }
        )
        return
    table(
        [
            [
                r.entry.seq,
                r.entry.change.source,
                r.entry.change.object_name,
                r.entry.change.op,
                json.dumps(dict(r.entry.change.key), default=json_default)[:40],
                r.entry.change.version,
                r.fate or r.entry.status,
                r.entry.change.trace_id,
            ]
            for r in rows
        ],
        ["seq", "source", "object", "op", "key", "version", "fate", "trace"],
    )


@cli.group()
def checkpoint() -> None:
    """List checkpoints, or rewind one (a resync for PostgreSQL)."""


@checkpoint.command(name="list")
@command()
@click.pass_obj
def checkpoint_list(c: Ctx, as_json: bool) -> None:
    """Show every checkpoint: owner, stream, cursor, generation and when it moved."""
    with _state(c, readonly=True) as st:
        cps = ops.checkpoint_rows(st)
    if as_json:
        emit_json(
            {
                "ok": True,
                "checkpoints": [
                    {
                        "owner": cp.owner,
                        "stream": cp.stream,
                        "cursor": dict(cp.cursor.data),
                        "generation": cp.generation,
                        "updated_at": cp.updated_at,
                        "reason": cp.reason,
                        "actor": cp.actor,
                    }
                    for cp in cps
                ],
            }
        )
        return
    table(
        [
            [
                cp.owner,
                cp.stream,
                ",".join(f"{k}={v}" for k, v in cp.cursor.data.items() if k != "v")[:60],
                cp.generation,
                cp.updated_at.isoformat(timespec="seconds"),
                cp.reason,
                cp.actor,
            ]
            for cp in cps
        ],
        ["owner", "stream", "cursor", "gen", "updated", "reason", "actor"],
    )


_RELATIVE = re.compile(r"^(\d+)\s*([smhd])$")


def parse_when(text: str) -> datetime:
    """Parse ``--to``: ISO 8601 (UTC if no offset) or a duration ago such as ``90m``, ``2h``, ``1d``."""
    m = _RELATIVE.match(text.strip())
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return utcnow() - timedelta(**{unit: int(m.group(1))})
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise click.BadParameter(
            "use ISO 8601 (2026-12-01T08:00:00Z) or a duration ago (90m, 2h, 1d)"
        ) from exc
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


@checkpoint.command(name="rewind")
@click.argument("target")
@click.option(
    "--to", "to_time", default=None, help="A time: ISO 8601, or a duration ago (2h). 'all' resyncs all rows."
)
@click.option("--seq", "to_seq", type=int, default=None, help="For the resolver: a journal sequence number.")
@click.option("--yes", is_flag=True, help="Do it; without this only the plan is shown.")
@command()
@click.pass_obj
def checkpoint_rewind(
    c: Ctx, target: str, to_time: str | None, to_seq: int | None, yes: bool, as_json: bool
) -> None:
    """Rewind TARGET (resolver, SYSTEM or SYSTEM/STREAM); PostgreSQL rewinds by resync."""
    when = None if to_time in (None, "all") else parse_when(to_time)
    if to_time is None and to_seq is None:
        raise click.UsageError("give --to TIME (or 'all'), or --seq N for the resolver")
    with _runtime(c) as rt, _state(c) as st:
        plan = ops.plan_rewind(rt, st, target, to_time=when, to_seq=to_seq)
        if not yes:
            if as_json:
                emit_json({"ok": True, "dry_run": True, "plan": _plan_dict(plan)})
            else:
                click.echo(f"plan ({plan.kind}): {plan.description}")
                click.echo(f"  current: {plan.current}\n  new:     {plan.new}")
                click.echo("dry run: nothing changed; add --yes to do it")
            return
        rows = 0
        if plan.kind == "resync" and sys.stderr.isatty() and not as_json:
            done = [0]

            def _progress(n: int) -> None:
                done[0] += n
                click.echo(f"\rresync: {done[0]:,} rows journaled", err=True, nl=False)

            rows = ops.execute_rewind(rt, st, plan, actor=ops.operator(), progress=_progress)
            click.echo("", err=True)
        else:
            rows = ops.execute_rewind(rt, st, plan, actor=ops.operator())
    if as_json:
        emit_json({"ok": True, "dry_run": False, "plan": _plan_dict(plan), "rows_journaled": rows})
    else:
        click.echo(f"done ({plan.kind}): {plan.description}" + (f"; {rows} rows journaled" if rows else ""))


def _plan_dict(plan: ops.RewindPlan) -> dict[str, Any]:
    return {
        "target": plan.target,
        "kind": plan.kind,
        "description": plan.description,
        "current": plan.current,
        "new": plan.new,
    }


@cli.command()
@click.option("--keep", is_flag=True, help="Leave everything running to explore it (Ctrl-C ends it).")
def demo(keep: bool) -> None:
    """Run the guided demo: a throwaway ERP and Salesforce emulator, the agent and its workflows."""
    from agent.demo.run import run_demo

    sys.exit(run_demo(keep=keep, echo=click.echo))


SANDBOXES = ("salesforce", "hubspot", "dynamics", "netsuite")


@cli.command()
@click.argument("vendor", type=click.Choice(SANDBOXES))
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="Loopback port (0: any free port).")
@click.option("--seed-demo", is_flag=True, help="Start with the demo's sample records.")
def sandbox(vendor: str, port: int, seed_demo: bool) -> None:
    """Run a vendor API emulator on loopback, for rehearsing mappings before go-live."""
    from agent.sandbox import serve

    serve(
        vendor,
        port=port,
        seed_demo=seed_demo,
        announce=lambda url: click.echo(f"{vendor} emulator listening on {url} (Ctrl-C to stop)"),
    )


# The exception queue, cross-reference, reconciliation and workflow commands live in their
# own module; importing it registers them on the group above.
from agent import cli_records  # noqa: E402,F401


def main() -> None:
    """Entry point for ``python -m agent.cli``."""
    cli(prog_name="syncagent")


if __name__ == "__main__" and not os.environ.get("SYNCAGENT_NO_MAIN"):
    # Run as ``python -m agent.cli``: use the imported module, on whose group the record
    # commands (agent.cli_records) registered, not this ``__main__`` copy.
    from agent.cli import main as _imported_main

    _imported_main()
