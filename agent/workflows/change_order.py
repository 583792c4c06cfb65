"""Change order approved in the CRM -> a revision of the ERP contract, with its history kept.

One ``unit`` op: insert the revision row (old value, new value, billing schedule, who
approved and when, the trace id, keyed by the change order's CRM id, which is UNIQUE in the
ERP) and revise the contract's value and version, all or nothing. The contract is never
changed without its revision row. The new version is the contract's known version plus
one; while another revision of the same contract is on its way, this one waits (parked as
a dependency on the contract) so versions never collide. A completed instance is never
run again, and a replay of the same change order upserts the same revision row.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from agent.config import Config
from agent.decision import AuditItem, ProblemItem
from agent.mapping import EntityMapper
from agent.model import Op
from agent.workflows.base import (
    PARKED,
    RUNNING,
    WorkflowContext,
    WorkflowInstance,
    WorkflowResult,
    follow_up,
    iso,
    parked,
    shadow_values,
    unit_step,
    validation,
)
from agent.workflows.options import ref_field


class ChangeOrder:
    """Turns an approved change order into a contract revision in the ERP."""

    def __init__(self, name: str, config: Config, options: Mapping[str, Any]) -> None:
        self.name = name
        self.o = options
        self.crm, self.erp = options["crm"], options["erp"]
        e = config.entities
        self.orders, self.deals, self.revisions = (
            e[options["change_orders"]],
            e[options["deals"]],
            e[options["revisions"]],
        )
        self.mappers = {x.name: EntityMapper(x) for x in (self.deals, self.revisions)}
        self.order_deal = ref_field(self.orders, self.deals.name) or ""
        self.revision_deal = ref_field(self.revisions, self.deals.name) or ""

    def claims(self) -> frozenset[tuple[str, str]]:
        """Nothing: revisions are written by the unit op only."""
        return frozenset()

    def evaluate(self, ctx: WorkflowContext) -> WorkflowResult | None:
        """Queue the revision of an approved change order (or park it until it can be made)."""
        if ctx.entity.name != self.orders.name or ctx.system != self.crm or ctx.change.op == "delete":
            return None
        rec, view, cid = ctx.record, ctx.view, ctx.canonical_id
        if rec.get("status") != self.o["approved_value"]:
            return None
        key = f"{self.name}:{cid}"
        if view.workflow_status(key) not in (None, PARKED):
            return None
        deal_cid = rec.get(self.order_deal)
        problems = self._validate(ctx, key, None if deal_cid is None else str(deal_cid))
        if problems or deal_cid is None:
            return parked(self.name, key, ctx, self.orders.name, cid, problems)
        return self._revise(ctx, key, str(deal_cid))

    def _validate(self, ctx: WorkflowContext, key: str, deal_cid: str | None) -> list[ProblemItem]:
        rec, view = ctx.record, ctx.view
        own = f"{self.orders.name}:{ctx.canonical_id}"
        problems: list[ProblemItem] = []
        if rec.get("new_value") is None:
            problems.append(validation("missing_value", "the change order has no new value", own, key))
        schedule = rec.get("billing_schedule")
        if schedule:
            try:
                json.loads(str(schedule))
            except ValueError:
                problems.append(
                    validation("invalid_billing_schedule", "the billing schedule is not JSON", own, key)
                )
        if deal_cid is None:
            problems.append(validation("missing_deal", "the change order names no deal", own, key))
            return problems
        deal_ref = f"{self.deals.name}:{deal_cid}"
        if view.external_id(self.deals.name, deal_cid, self.erp) is None:
            detail = f"the deal's contract is not in {self.erp} yet"
            problems.append(ProblemItem("dependency", "contract_not_in_erp", detail, None, deal_ref, key))
        elif not problems and "version" in view.pending_fields(self.deals.name, deal_cid, self.erp):
            detail = "another revision of this contract is being applied; this one follows it"
            problems.append(ProblemItem("dependency", "revision_in_flight", detail, None, deal_ref, key))
        return problems

    def _revise(self, ctx: WorkflowContext, key: str, deal_cid: str) -> WorkflowResult:
        rec, view, erp = ctx.record, ctx.view, self.erp
        contract_id = view.external_id(self.deals.name, deal_cid, erp) or ""
        known = shadow_values(view, self.deals.name, deal_cid, erp)
        old_version = int(known.get("version") or 1)
        version = old_version + 1
        revision = {
            "version": version,
            "old_value": known.get("value"),
            "new_value": rec["new_value"],
            "approved_by": rec.get("approved_by") or f"{self.crm}:{self.orders.systems[self.crm].object}",
            "approved_at": rec.get("approved_at") or iso(ctx.change.source_ts),
            "trace_id": ctx.change.trace_id,
            "change_order_ref": ctx.record_id,
        }
        revision = {k: v for k, v in revision.items() if k in self.revisions.fields and v is not None}
        fields = self.mappers[self.revisions.name].to_native(erp, revision, record=key)
        fields[self.revisions.fields[self.revision_deal].columns[erp]] = contract_id
        if rec.get("billing_schedule") and self.o["billing_schedule_column"]:
            # Written as JSON text into its own column, never read back as a canonical field.
            fields[self.o["billing_schedule_column"]] = rec["billing_schedule"]
        ref_column = self.revisions.fields["change_order_ref"].columns[erp]
        rm, dm = self.revisions.systems[erp], self.deals.systems[erp]
        contract = {"value": rec["new_value"], "version": version}
        steps = [
            unit_step(
                rm.object,
                {ref_column: ctx.record_id},
                fields,
                self.revisions.name,
                f"{ctx.canonical_id}-rev",
                revision,
            ),
            unit_step(
                dm.object,
                {dm.key: contract_id},
                self.mappers[self.deals.name].to_native(erp, contract, record=key),
                self.deals.name,
                deal_cid,
                contract,
            ),
        ]
        op = Op(
            idempotency_key=f"wf:{key}",
            target=erp,
            entity=self.deals.name,
            canonical_id=deal_cid,
            object_name=dm.object,
            action="unit",
            key={dm.key: contract_id},
            fields={"steps": steps, "then": self._writebacks(ctx, deal_cid, rec["new_value"])},
            trace_id=ctx.change.trace_id,
            source_seq=ctx.seq,
            canonical=contract,
            workflow=key,
        )
        instance = WorkflowInstance(
            self.name,
            key,
            self.orders.name,
            ctx.canonical_id,
            RUNNING,
            ("validated", f"queued:{erp}"),
            f"v{version}",
        )
        audit = AuditItem(
            "workflow_started",
            {
                "workflow": self.name,
                "instance": key,
                "contract": contract_id,
                "from_version": old_version,
                "version": version,
            },
        )
        return WorkflowResult(instance, ops=(op,), audits=(audit,))

    def _writebacks(self, ctx: WorkflowContext, deal_cid: str, new_value: Any) -> list[dict[str, Any]]:
        out = []
        om = self.orders.systems[self.crm]
        if self.o["crm_revision_field"]:
            fields = {self.o["crm_revision_field"]: {"$step": 0}}
            out.append(
                follow_up(
                    "change_order",
                    self.crm,
                    self.orders.name,
                    ctx.canonical_id,
                    om.object,
                    {om.key: ctx.record_id},
                    fields,
                    {},
                )
            )
        rule = self.deals.fields.get("value")
        deal_crm_id = ctx.view.external_id(self.deals.name, deal_cid, self.crm)
        if self.o["update_crm_value"] and rule is not None and self.crm in rule.columns and deal_crm_id:
            dm = self.deals.systems[self.crm]
            fields = self.mappers[self.deals.name].to_native(self.crm, {"value": new_value}, record=deal_cid)
            out.append(
                follow_up(
                    "deal",
                    self.crm,
                    self.deals.name,
                    deal_cid,
                    dm.object,
                    {dm.key: deal_crm_id},
                    fields,
                    {"value": new_value},
                )
            )
        return out
