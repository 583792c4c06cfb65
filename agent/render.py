"""Rendering for the CLI: aligned tables for people, one JSON object for programs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import click

from agent.model import utcnow


def json_default(value: Any) -> Any:
    """Encode what stdlib json cannot: datetimes, Decimals, bytes, sets."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return "\\x" + value.hex()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def emit_json(payload: dict[str, Any]) -> None:
    """Print one JSON object: the ``--json`` envelope."""
    click.echo(json.dumps(payload, default=json_default, indent=2, sort_keys=False))


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    """Print an aligned table."""
    text = [[("" if v is None else str(v)) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in text]) for i, h in enumerate(headers)]
    click.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for r in text:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def render_status(snap: Any) -> None:
    """Print the status snapshot as one screen of text."""
    click.echo(
        f"syncagent {'HEALTHY' if snap.ok else 'UNHEALTHY'}   state {snap.state_path} "
        f"(schema v{snap.schema_version})"
    )
    rows = []
    for s in snap.streams:
        cursor = ",".join(f"{k}={v}" for k, v in (s.cursor or {}).items() if k != "v")
        rows.append(
            [
                s.connector,
                s.stream,
                s.state,
                _age(s.last_success_at),
                s.changes_total,
                _bytes(s.lag_bytes),
                _secs(s.oldest_unconsumed_age_s),
                cursor[:48],
            ]
        )
    table(rows, ["connector", "stream", "state", "last ok", "changes", "slot lag", "oldest", "cursor"])
    for s in snap.streams:
        if not s.healthy:
            click.echo(f"  ! {s.connector}/{s.stream}: {s.reason}")
            if s.fix:
                click.echo(f"    fix: {s.fix}")
    r = snap.resolver
    click.echo(f"resolver: position {r['position']} of {r['journal_last_seq']} (backlog {r['backlog']})")
    if snap.outbox:
        table(
            [
                [t, v["pending"], v["due"], v["retrying"], _secs(v["oldest_age_s"])]
                for t, v in snap.outbox.items()
            ],
            ["outbox target", "pending", "due", "retrying", "oldest"],
        )
    for connector, usage in snap.api.items():
        parts = [f"{k}={v}" for k, v in usage.items() if v is not None]
        click.echo(f"api {connector}: " + " ".join(parts))
    e = snap.exceptions
    click.echo(f"exceptions open: {e['open']}")
    for reason, v in e["by_reason"].items():
        click.echo(f"  {reason}: {v['count']} (oldest {_secs(v['oldest_age_s'])})")


def _age(iso: str | None) -> str:
    if not iso:
        return "never"
    return _secs((utcnow() - datetime.fromisoformat(iso)).total_seconds()) + " ago"


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.0f}s"
    if value < 7200:
        return f"{value / 60:.0f}m"
    return f"{value / 3600:.1f}h"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


def render_reconcile(report: Any, *, repair: bool) -> None:
    """Print a reconciliation report: drift by field and owner, records missing per system."""
    verdict = "IN STEP" if report.ok else "DRIFT"
    click.echo(
        f"{verdict}: {report.compared} of {report.records} linked records compared, "
        f"{report.drifted_records} drifted"
    )
    if report.by_field:
        table(
            [[f.field, f.owner, f.drifted, f.repaired, f.in_flight] for f in report.by_field],
            ["field", "owner", "drifted", "repaired", "in flight"],
        )
    for system, n in report.missing_by_system.items():
        click.echo(f"missing in {system}: {n} (hard deletes the API never reported; see `exceptions list`)")
    if not repair and not report.ok:
        click.echo("read-only: add --repair to push each owner's value")
