"""The status snapshot: one screen an ops person can read at 3 a.m.

Per connector stream: healthy or not, why, and the command that fixes it; the cursor,
last success, changes captured, slot lag and the age of the oldest unconsumed change.
Then the resolver's backlog, the outbox per target and the exception queue by reason.
Reads the state file only (read-only), so it works while the agent runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from agent.config import Config
from agent.model import utcnow
from state import checkpoints, exceptions, health, journal, outbox, schema_version, workflows
from state.db import State

STALE_AFTER_POLLS = 10
STALE_MIN = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class StreamStatus:
    """Health of one connector stream."""

    connector: str
    type: str
    stream: str
    healthy: bool
    state: str
    reason: str
    fix: str
    cursor: Mapping[str, Any] | None
    last_success_at: str | None
    changes_total: int
    lag_bytes: int | None
    oldest_unconsumed_age_s: float | None
    last_error: str | None
    detail: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything ``syncagent status`` shows."""

    ok: bool
    generated_at: str
    state_path: str
    schema_version: int
    streams: list[StreamStatus]
    resolver: Mapping[str, Any]
    outbox: Mapping[str, Any]
    exceptions: Mapping[str, Any]
    journal: Mapping[str, Any]
    problems: list[str] = field(default_factory=list)
    api: Mapping[str, Any] = field(default_factory=dict)
    business: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the ``--json`` body)."""
        return asdict(self)


def snapshot(
    config: Config, st: State, *, now: datetime | None = None, cfg_arg: str = "-c CONFIG"
) -> Snapshot:
    """Build the status snapshot from the state file."""
    now = now or utcnow()
    rows = {(h.connector, h.stream): h for h in health.all_health(st)}
    cps = {(c.owner, c.stream): c for c in checkpoints.list_all(st)}
    streams: list[StreamStatus] = []
    problems: list[str] = []
    for name, sc in config.systems.items():
        owner = f"source:{name}"
        stream_names = sorted(
            {s for (o, s) in cps if o == owner and not s.startswith("resync:")}
            | {s for (c, s) in rows if c == name and s not in ("*", "deliver", "api")}
        )
        error_row = rows.get((name, "*"))
        for stream in stream_names or ["-"]:
            h = rows.get((name, stream))
            cp = cps.get((owner, stream))
            state, reason, fix = _judge(name, sc.poll_interval, h, error_row, now, cfg_arg)
            oldest = h.oldest_unconsumed_at if h else None
            streams.append(
                StreamStatus(
                    connector=name,
                    type=sc.type,
                    stream=stream,
                    healthy=state == "ok",
                    state=state,
                    reason=reason,
                    fix=fix,
                    cursor=dict(cp.cursor.data) if cp else None,
                    last_success_at=_iso(h.last_success_at if h else None),
                    changes_total=h.changes_total if h else 0,
                    lag_bytes=h.lag_bytes if h else None,
                    oldest_unconsumed_age_s=round((now - oldest).total_seconds(), 1) if oldest else None,
                    last_error=(error_row.last_error if error_row and error_row.state != "ok" else None)
                    or (h.last_error if h and h.state != "ok" else None),
                    detail=dict(h.detail) if h and h.detail else None,
                )
            )
        d = rows.get((name, "deliver"))
        if d is not None and d.state in ("error", "stopped"):
            problems.append(f"{name}: delivery {d.state}: {d.last_error}")
    for s in streams:
        if not s.healthy:
            problems.append(f"{s.connector}/{s.stream}: {s.reason}")
    rcp = cps.get(("resolver", "journal"))
    position = int(rcp.cursor.data.get("seq", 0)) if rcp else 0
    last = journal.last_seq(st)
    depth = outbox.depth(st, now=now)
    exc = exceptions.stats(st)
    jstats = journal.stats(st)
    return Snapshot(
        ok=not problems,
        generated_at=now.isoformat(),
        state_path=str(st.path),
        schema_version=schema_version(st),
        streams=streams,
        resolver={
            "position": position,
            "journal_last_seq": last,
            "backlog": sum(v.pending for v in jstats.values()),
            "generation": rcp.generation if rcp else 0,
        },
        outbox={
            t: {
                "pending": v.pending,
                "due": v.due,
                "retrying": v.retrying,
                "oldest_age_s": round((now - v.oldest_at).total_seconds(), 1) if v.oldest_at else None,
            }
            for t, v in depth.items()
        },
        exceptions={
            "open": sum(v.count for v in exc.values()),
            "by_reason": {
                r: {"count": v.count, "oldest_age_s": round((now - v.oldest_created_at).total_seconds(), 1)}
                for r, v in exc.items()
            },
        },
        journal={s: {"count": v.count, "pending": v.pending} for s, v in jstats.items()},
        problems=problems,
        api={c: dict(h.detail or {}) for (c, s), h in rows.items() if s == "api"},
        business=_business(config, st, {c: dict(h.detail or {}) for (c, s), h in rows.items() if s == "api"}),
    )


def _business(config: Config, st: State, api: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The figures business people read: closed-won to project, invoicing delay, fates, API budget.

    The invoice-readiness delay is the billing workflow's latency: from the ERP event
    (milestone completed, invoice posted, payment received) to the CRM showing it.
    """
    lat = workflows.latency(st)

    def summary(name: str) -> dict[str, Any] | None:
        s = lat.get(name)
        if s is None:
            return None
        return {"quantiles": {"0.5": s.p50, "0.95": s.p95, "1": s.max}, "sum": s.total, "count": s.count}

    budget = {}
    for connector, usage in api.items():
        limit = (
            config.systems[connector].options.get("budget_per_day") if connector in config.systems else None
        )
        budget[connector] = {"used": usage.get("calls_last_24h", usage.get("calls", 0)), "limit": limit}
    out: dict[str, Any] = {"journal_fate": journal.fate_counts(st), "api_budget_used": budget}
    for key, wf in (
        ("closed_won_to_project_seconds", "closed_won"),
        ("invoice_readiness_delay_seconds", "billing"),
    ):
        value = summary(wf)
        if value is not None:
            out[key] = value
    return out


def _judge(
    name: str, interval: float, h: Any, error_row: Any, now: datetime, cfg: str
) -> tuple[str, str, str]:
    latest_error = error_row if error_row and error_row.state != "ok" else None
    if (
        latest_error
        and h
        and h.last_success_at
        and latest_error.last_error_at
        and h.last_success_at > latest_error.last_error_at
    ):
        latest_error = None
    if latest_error is not None:
        text = latest_error.last_error or ""
        if latest_error.state == "stopped" or "AuthError" in text:
            fix = f"fix the credentials or setup of systems.{name}, then `syncagent {cfg} check` and restart"
            if "CursorUnavailable" in text:
                fix = (
                    f"`syncagent {cfg} init`, then `syncagent {cfg} checkpoint rewind {name} --to TIME --yes`"
                )
            return "stopped", text, fix
        if "BudgetExhausted" in text:
            return (
                "deferred",
                text,
                f"work waits for the API budget; raise systems.{name}.budget_per_day if needed",
            )
        return "error", text, f"transient: it retries with backoff; `syncagent {cfg} check` tests {name} now"
    if h is None or h.last_success_at is None:
        return "never", "no successful poll yet", f"`syncagent {cfg} run --once` or start the service"
    stale = max(STALE_MIN, timedelta(seconds=interval * STALE_AFTER_POLLS))
    if now - h.last_success_at > stale:
        age = int((now - h.last_success_at).total_seconds())
        return "stale", f"last success {age}s ago", "is the agent running? `systemctl status syncagent`"
    detail = h.detail or {}
    if detail.get("wal_status") == "lost":
        return (
            "stopped",
            "replication slot invalidated (WAL removed)",
            f"`syncagent {cfg} init`, then `syncagent {cfg} checkpoint rewind {name} --to TIME --yes`",
        )
    return "ok", "", ""


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
