"""Milestone completed, invoice posted, payment received in the ERP -> the deal in the CRM.

Any change to a milestone, invoice or payment recomputes the deal's delivery and billing
figures from what the agent knows of the ERP (the shadow): percent complete (milestone
amounts completed over all, or their count when no amounts are set), delivery status,
invoiced amount (invoices in an invoiced status), paid amount (payments of the deal's
invoices), each with the ERP's latest timestamp. Only figures that differ from what the
CRM last got are written; figures are totals, never increments, so a replay writes
nothing new.
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

_CENT = Decimal("0.01")


class Billing:
    """Keeps the CRM's view of delivery and billing in step with the ERP's milestones and invoices."""

    def __init__(self, name: str, config: Config, options: Mapping[str, Any]) -> None:
        self.name = name
        self.o = options
        self.crm, self.erp = options["crm"], options["erp"]
        e = config.entities
        self.deals, self.projects = e[options["deals"]], e[options["projects"]]
        self.milestones, self.invoices, self.payments = (
            e[options["milestones"]],
            e[options["invoices"]],
            e[options["payments"]],
        )
        self.project_deal = ref_field(self.projects, self.deals.name) or ""
        self.milestone_project = ref_field(self.milestones, self.projects.name) or ""
        self.invoice_deal = ref_field(self.invoices, self.deals.name) or ""
        self.payment_invoice = ref_field(self.payments, self.invoices.name) or ""
        self.triggers = {self.milestones.name, self.invoices.name, self.payments.name}

    def claims(self) -> frozenset[tuple[str, str]]:
        """Nothing: this workflow only updates records that exist."""
        return frozenset()

    def evaluate(self, ctx: WorkflowContext) -> WorkflowResult | None:
        """Recompute the deal's figures after a milestone, invoice or payment change."""
        if ctx.system != self.erp or ctx.entity.name not in self.triggers:
            return None
        deal_cid = self._deal_of(ctx)
        if deal_cid is None:
            return None
        key = f"{self.name}:{ctx.seq}"
        op = metrics_op(
            ctx,
            instance_key=key,
            deal_entity=self.deals,
            deal_cid=deal_cid,
            crm=self.crm,
            crm_fields=self.o["crm_fields"],
            metrics=self._metrics(ctx, deal_cid),
        )
        if op is None:
            return None
        moved = ",".join(sorted(op.canonical))
        instance = WorkflowInstance(
            self.name,
            key,
            self.deals.name,
            deal_cid,
            RUNNING,
            (f"computed:{ctx.entity.name}", f"queued:{self.crm}"),
            moved,
        )
        audit = AuditItem(
            "workflow_started",
            {"workflow": self.name, "instance": key, "trigger": ctx.entity.name, "metrics": moved},
        )
        return WorkflowResult(instance, ops=(op,), audits=(audit,))

    def _deal_of(self, ctx: WorkflowContext) -> str | None:
        rec, view, name = ctx.record, ctx.view, ctx.entity.name
        if name == self.invoices.name:
            return _text(rec.get(self.invoice_deal))
        if name == self.milestones.name:
            project = _text(rec.get(self.milestone_project))
            if project is None:
                return None
            return _text(shadow_values(view, self.projects.name, project, self.erp).get(self.project_deal))
        invoice = _text(rec.get(self.payment_invoice))
        if invoice is None:
            return None
        return _text(shadow_values(view, self.invoices.name, invoice, self.erp).get(self.invoice_deal))

    def _metrics(self, ctx: WorkflowContext, deal_cid: str) -> dict[str, Any]:
        erp = self.erp
        out: dict[str, Any] = {}
        projects = related_values(ctx, self.projects.name, erp, self.project_deal, deal_cid)
        milestones: dict[str, dict[str, Any]] = {}
        for project in projects:
            milestones.update(related_values(ctx, self.milestones.name, erp, self.milestone_project, project))
        if milestones:
            done = [m for m in milestones.values() if m.get("status") == self.o["completed_status"]]
            total = sum((decimal(m.get("amount")) for m in milestones.values()), Decimal(0))
            if total > 0:
                share = sum((decimal(m.get("amount")) for m in done), Decimal(0)) / total
            else:
                share = Decimal(len(done)) / Decimal(len(milestones))
            out["percent_complete"] = (share * 100).quantize(_CENT)
            out["delivery_status"] = (
                "delivered" if len(done) == len(milestones) else "in_progress" if done else "not_started"
            )
            out["milestone_completed_at"] = latest([m.get("completed_at") for m in done])
        invoices = related_values(ctx, self.invoices.name, erp, self.invoice_deal, deal_cid)
        invoiced = [i for i in invoices.values() if i.get("status") in self.o["invoiced_statuses"]]
        out["invoiced_amount"] = sum((decimal(i.get("amount")) for i in invoiced), Decimal(0))
        out["invoiced_at"] = latest([i.get("posted_at") for i in invoiced])
        payments: dict[str, dict[str, Any]] = {}
        for invoice in invoices:
            payments.update(related_values(ctx, self.payments.name, erp, self.payment_invoice, invoice))
        out["paid_amount"] = sum((decimal(p.get("amount")) for p in payments.values()), Decimal(0))
        out["paid_at"] = latest([p.get("received_at") for p in payments.values()])
        return out


def _text(value: Any) -> str | None:
    return None if value is None else str(value)
