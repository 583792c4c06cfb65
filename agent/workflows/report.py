"""``syncagent workflows``: the recorded instances with their trigger, steps, outcome and latency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click

from agent.render import table
from state import workflows
from state.db import State
from state.workflows import LatencyStats, WorkflowRow


@dataclass(frozen=True, slots=True)
class InstanceReport:
    """Recent workflow instances and the latency figures of the completed ones."""

    instances: list[WorkflowRow]
    latency: dict[str, LatencyStats]

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` payload (without the envelope)."""
        return {
            "instances": [instance_dict(r) for r in self.instances],
            "latency": {
                name: {"completed": s.count, "p50_s": s.p50, "p95_s": s.p95, "max_s": s.max}
                for name, s in self.latency.items()
            },
        }


def instance_report(
    st: State, *, workflow: str | None = None, status: str | None = None, limit: int = 50
) -> InstanceReport:
    """The newest instances (optionally of one workflow or status) and latency per workflow."""
    return InstanceReport(
        workflows.list_instances(st, workflow=workflow, status=status, limit=limit),
        workflows.latency(st, workflow=workflow),
    )


def instance_dict(r: WorkflowRow) -> dict[str, Any]:
    """One instance as JSON-ready data."""
    return {
        "workflow": r.workflow,
        "instance": r.key,
        "status": r.status,
        "entity": r.entity,
        "canonical_id": r.canonical_id,
        "trigger": {**r.trigger, "journal_seq": r.trigger_seq, "at": r.trigger_ts},
        "steps": list(r.steps),
        "detail": r.detail,
        "exception_ids": list(r.exception_ids),
        "trace_id": r.trace_id,
        "started_at": r.started_at,
        "completed_at": r.completed_at,
        "latency_s": r.latency_seconds,
    }


def render_report(report: InstanceReport) -> None:
    """Print the instances as a table, then the latency figures."""
    table(
        [
            [
                r.workflow,
                r.status,
                r.trigger.get("object"),
                r.trigger_seq,
                ",".join(str(s.get("step")) for s in r.steps)[:48],
                (r.detail or "")[:32],
                "" if r.latency_seconds is None else f"{r.latency_seconds:.1f}s",
                r.trace_id,
            ]
            for r in report.instances
        ],
        ["workflow", "status", "trigger", "seq", "steps", "detail", "latency", "trace"],
    )
    for name, s in report.latency.items():
        click.echo(f"{name}: {s.count} completed, latency p50 {s.p50:.2f}s p95 {s.p95:.2f}s max {s.max:.2f}s")
