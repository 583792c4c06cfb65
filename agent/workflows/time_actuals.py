"""Approved time entries in the ERP -> the project's actuals on the deal in the CRM.

A change to a time entry that is approved, or was approved until this change, recomputes
the consumed hours and amount (hours x rate) of every approved entry of the deal's
projects and writes the totals that moved to the CRM. An entry that was never approved
triggers nothing: unapproved time never moves.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from agent.config import Config
from agent.decision import AuditItem
from agent.workflows.base import (
    RUNNING,
    WorkflowContext,
    WorkflowInstance,
    WorkflowResult,
    decimal,
    latest,
    metrics_op,
    related_values,
    shadow_values,
)
from agent.workflows.options import ref_field


class TimeActuals:
    """Keeps the CRM's consumed hours and amount in step with the ERP's approved time."""

    def __init__(self, name: str, config: Config, options: Mapping[str, Any]) -> None:
        self.name = name
        self.o = options
        self.crm, self.erp = options["crm"], options["erp"]
        e = config.entities
        self.deals, self.projects, self.entries = (
            e[options["deals"]],
            e[options["projects"]],
            e[options["time_entries"]],
        )
        self.project_deal = ref_field(self.projects, self.deals.name) or ""
        self.entry_project = ref_field(self.entries, self.projects.name) or ""

    def claims(self) -> frozenset[tuple[str, str]]:
        """Nothing: this workflow only updates records that exist."""
        return frozenset()

    def evaluate(self, ctx: WorkflowContext) -> WorkflowResult | None:
        """Recompute the deal's actuals after a change to an approved (or unapproved) time entry."""
        if ctx.system != self.erp or ctx.entity.name != self.entries.name:
            return None
        approved = ctx.record.get("approved") is True
        if "approved" in ctx.changed:
            was = ctx.previous.get("approved") is True
        else:
            was = approved and not ctx.new
        if not (approved or was):
            return None
        project = ctx.record.get(self.entry_project)
        if project is None:
            return None
        deal_cid = shadow_values(ctx.view, self.projects.name, str(project), self.erp).get(self.project_deal)
        if deal_cid is None:
            return None
        key = f"{self.name}:{ctx.seq}"
        op = metrics_op(
            ctx,
            instance_key=key,
            deal_entity=self.deals,
            deal_cid=str(deal_cid),
            crm=self.crm,
            crm_fields=self.o["crm_fields"],
            metrics=self._metrics(ctx, str(deal_cid)),
        )
        if op is None:
            return None
        moved = ",".join(sorted(op.canonical))
        instance = WorkflowInstance(
            self.name, key, self.deals.name, str(deal_cid), RUNNING, ("computed", f"queued:{self.crm}"), moved
        )
        audit = AuditItem("workflow_started", {"workflow": self.name, "instance": key, "metrics": moved})
        return WorkflowResult(instance, ops=(op,), audits=(audit,))

    def _metrics(self, ctx: WorkflowContext, deal_cid: str) -> dict[str, Any]:
        entries: dict[str, dict[str, Any]] = {}
        for project in related_values(ctx, self.projects.name, self.erp, self.project_deal, deal_cid):
            entries.update(related_values(ctx, self.entries.name, self.erp, self.entry_project, project))
        approved = [e for e in entries.values() if e.get("approved") is True]
        hours = sum((decimal(e.get("hours")) for e in approved), Decimal(0))
        spent = sum((decimal(e.get("hours")) * decimal(e.get("rate")) for e in approved), Decimal(0))
        return {
            "consumed_hours": hours,
            "consumed_amount": spent.quantize(Decimal("0.01")),
            "last_worked_on": latest([e.get("worked_on") for e in approved]),
        }
