"""Closed-won deal in the CRM -> ERP customer, contract and project shell, in one ERP transaction.

Triggered by a deal whose trigger field (``stage``) has the trigger value (``won``) and that
is not yet set up in the ERP: the state decides, not the edge, so a deal that was parked,
or won before the agent ran, is set up on its next change or retry. Validation comes
first and sends the whole instance to the exception queue, nothing created: the legal
entity, tax code and service line must exist in the ERP's reference data (captured like
any entity, found by their natural key), and the deal's currency must be one the legal
entity allows. Each problem names what is missing in ``blocking_ref``
(``tax_code:DE-VAT7``); when that record appears the parked instance is retried.

The ERP work is one ``unit`` op: customer (linked if it exists, else upserted by its CRM
id), contract (upserted by its CRM id) and project (upserted by its code), each step an
upsert by key, so a replay creates nothing twice. Its follow-ups write the ERP ids back
to the CRM (the deal's external id, project id, delivery status).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from agent.config import Config, EntityConfig
from agent.decision import AuditItem, ProblemItem, StateView
from agent.mapping import EntityMapper
from agent.model import Op
from agent.workflows.base import (
    PARKED,
    RUNNING,
    WorkflowContext,
    WorkflowInstance,
    WorkflowResult,
    follow_up,
    parked,
    shadow_values,
    unit_step,
    validation,
)
from agent.workflows.options import ref_field

_REFERENCES = (
    ("legal_entities", "legal_entity", "legal entity"),
    ("tax_codes", "tax_code", "tax code"),
    ("service_lines", "service_line", "service line"),
)


def currency_codes(value: Any) -> list[str]:
    """The currency codes a legal entity allows, from a list or its text (``['GBP', 'EUR']``)."""
    if isinstance(value, list | tuple):
        return [str(v).upper() for v in value]
    return [c.upper() for c in re.findall(r"[A-Za-z]{3}", str(value or ""))]


class ClosedWon:
    """Sets a won deal up in the ERP: customer, contract and project shell, all or nothing."""

    def __init__(self, name: str, config: Config, options: Mapping[str, Any]) -> None:
        self.name = name
        self.o = options
        self.crm, self.erp = options["crm"], options["erp"]
        e = config.entities
        self.deals, self.customers, self.projects = (
            e[options["deals"]],
            e[options["customers"]],
            e[options["projects"]],
        )
        self.refs = {kind: e[options[kind]] for kind, _, _ in _REFERENCES}
        self.mappers = {x.name: EntityMapper(x) for x in (self.deals, self.customers, self.projects)}
        self.customer_field = ref_field(self.deals, self.customers.name) or "customer"
        self.project_deal_field = ref_field(self.projects, self.deals.name)
        self.project_customer_field = ref_field(self.projects, self.customers.name)

    def claims(self) -> frozenset[tuple[str, str]]:
        """The deal in the ERP, and the customer too unless customers sync on their own."""
        out = {(self.deals.name, self.erp)}
        if self.o["customer_creation"] == "on_won":
            out.add((self.customers.name, self.erp))
        return frozenset(out)

    def evaluate(self, ctx: WorkflowContext) -> WorkflowResult | None:
        """Validate a won deal not yet in the ERP, then queue its set-up (or park it)."""
        if ctx.entity.name != self.deals.name or ctx.system != self.crm or ctx.change.op == "delete":
            return None
        if ctx.record.get(self.o["trigger_field"]) != self.o["trigger_value"]:
            return None
        cid = ctx.canonical_id
        if ctx.view.external_id(self.deals.name, cid, self.erp) is not None:
            return None
        key = f"{self.name}:{cid}"
        if ctx.view.workflow_status(key) not in (None, PARKED):
            return None  # queued already, done, or failed (an operator retries the rejected op)
        problems, found = self._validate(ctx, key)
        if problems:
            return parked(self.name, key, ctx, self.deals.name, cid, problems)
        return self._setup(ctx, key, found)

    # --- validation ---------------------------------------------------------------------------
    def _validate(self, ctx: WorkflowContext, key: str) -> tuple[list[ProblemItem], dict[str, Any]]:
        rec, view = ctx.record, ctx.view
        deal_ref = f"{self.deals.name}:{ctx.canonical_id}"
        problems: list[ProblemItem] = []
        if rec.get(self.customer_field) is None:
            problems.append(validation("missing_customer", "the deal names no customer", deal_ref, key))
        if rec.get("value") is None:
            problems.append(validation("missing_value", "the deal has no value", deal_ref, key))
        found: dict[str, Any] = {}
        for kind, field, label in _REFERENCES:
            entity, value = self.refs[kind], rec.get(field)
            reason = f"missing_{field}"
            if value in (None, ""):
                problems.append(validation(reason, f"the deal names no {label}", deal_ref, key))
                continue
            m = entity.systems[self.erp]
            ref_cid = view.find_natural(entity.name, m.match_on or field, value)
            if ref_cid is None:
                detail = f"{label} {value} is not in {self.erp} ({m.object})"
                problems.append(validation(reason, detail, f"{entity.name}:{value}", key))
            else:
                found[kind] = ref_cid
        if "legal_entities" in found:
            le = self.refs["legal_entities"]
            allowed = currency_codes(
                shadow_values(view, le.name, found["legal_entities"], self.erp).get("currencies")
            )
            currency = rec.get("currency") or (allowed[0] if allowed else None)
            if currency is None or str(currency).upper() not in allowed:
                detail = (
                    f"currency {currency} is not allowed for legal entity {rec['legal_entity']}"
                    f" (allowed: {', '.join(allowed) or 'none'})"
                )
                problems.append(
                    validation("currency_not_allowed", detail, f"{le.name}:{rec['legal_entity']}", key)
                )
            found["currency"] = currency
        return problems, found

    # --- the unit -----------------------------------------------------------------------------
    def _setup(self, ctx: WorkflowContext, key: str, found: Mapping[str, Any]) -> WorkflowResult:
        view, cid, rec = ctx.view, ctx.canonical_id, ctx.record
        deal_crm_id = ctx.record_id
        customer_cid = str(rec[self.customer_field])
        customer = shadow_values(view, self.customers.name, customer_cid, self.crm)
        customer_erp_id = view.external_id(self.customers.name, customer_cid, self.erp)
        steps = [self._customer_step(customer_cid, customer, customer_erp_id, view)]

        deal = self._values(self.deals, rec)
        deal["currency"] = found["currency"]
        for fname, value in (("delivery_status", self.o["delivery_status"]), ("version", 1)):
            if fname in self.deals.fields and self.erp in self.deals.fields[fname].columns:
                deal[fname] = value
        dm = self.deals.systems[self.erp]
        fields = self._native(self.deals, deal, {self.customer_field: 0})
        steps.append(
            unit_step(dm.object, {str(dm.external_id): deal_crm_id}, fields, self.deals.name, cid, deal)
        )
        steps[-1]["canonical"][self.customer_field] = customer_cid

        code = self._project_code(rec, customer, deal_crm_id)
        project: dict[str, Any] = {
            "project_code": code,
            "service_line": rec["service_line"],
            "status": self.o["project_status"],
        }
        refs = {f: i for f, i in ((self.project_customer_field, 0), (self.project_deal_field, 1)) if f}
        pm = self.projects.systems[self.erp]
        code_column = self.projects.fields["project_code"].columns[self.erp]
        # A project id derived from the deal's: re-evaluating a parked deal names the same record.
        project_cid = view.find_natural(self.projects.name, "project_code", code) or f"{cid}-project"
        fields = self._native(self.projects, project, refs)
        linked = {**project, **{f: (customer_cid if i == 0 else cid) for f, i in refs.items()}}
        steps.append(
            unit_step(pm.object, {code_column: code}, fields, self.projects.name, project_cid, linked)
        )

        customer_crm_id = view.external_id(self.customers.name, customer_cid, self.crm)
        then = self._writebacks(cid, deal_crm_id, customer_cid, customer_erp_id, customer_crm_id)
        op = Op(
            idempotency_key=f"wf:{key}",
            target=self.erp,
            entity=self.deals.name,
            canonical_id=cid,
            object_name=dm.object,
            action="unit",
            key={str(dm.external_id): deal_crm_id},
            fields={"steps": steps, "then": then},
            trace_id=ctx.change.trace_id,
            source_seq=ctx.seq,
            canonical=steps[1]["canonical"],
            workflow=key,
        )
        instance = WorkflowInstance(
            self.name, key, self.deals.name, cid, RUNNING, ("validated", f"queued:{self.erp}"), code
        )
        audit = AuditItem("workflow_started", {"workflow": self.name, "instance": key, "project_code": code})
        return WorkflowResult(instance, ops=(op,), audits=(audit,))

    def _customer_step(
        self, customer_cid: str, customer: Mapping[str, Any], erp_id: str | None, view: StateView
    ) -> dict[str, Any]:
        cm = self.customers.systems[self.erp]
        if erp_id is not None:  # already in the ERP: the step only finds it, for its id
            return unit_step(cm.object, {cm.key: erp_id}, {}, self.customers.name, customer_cid, {})
        crm_id = view.external_id(self.customers.name, customer_cid, self.crm)
        values = self._values(self.customers, customer)
        fields = self._native(self.customers, values, {})
        return unit_step(
            cm.object, {str(cm.external_id): crm_id}, fields, self.customers.name, customer_cid, values
        )

    def _values(self, entity: EntityConfig, record: Mapping[str, Any]) -> dict[str, Any]:
        """The record's known, non-empty, non-reference values that the ERP has a column for."""
        return {
            k: v
            for k, v in record.items()
            if k in entity.fields
            and self.erp in entity.fields[k].columns
            and not entity.fields[k].ref
            and v is not None
        }

    def _native(
        self, entity: EntityConfig, values: Mapping[str, Any], refs: Mapping[str, int]
    ) -> dict[str, Any]:
        fields = self.mappers[entity.name].to_native(self.erp, values, record=f"{self.erp}:{entity.name}")
        for fname, index in refs.items():
            rule = entity.fields.get(fname)
            if rule is not None and self.erp in rule.columns:
                fields[rule.columns[self.erp]] = {"$step": index}
        return fields

    def _project_code(self, rec: Mapping[str, Any], customer: Mapping[str, Any], crm_id: str) -> str:
        return str(self.o["project_code"]).format(
            crm_id=crm_id,
            service_line=rec.get("service_line") or "",
            customer_no=customer.get("customer_no") or "",
            close_year=str(rec.get("close_date") or "")[:4],
        )

    def _writebacks(
        self,
        cid: str,
        deal_crm_id: str,
        customer_cid: str,
        customer_erp_id: str | None,
        customer_crm_id: str | None,
    ) -> list[dict[str, Any]]:
        """Follow-up ops for the CRM, sent once the unit committed; ``{"$step": n}`` is step n's id."""
        dm = self.deals.systems[self.crm]
        fields: dict[str, Any] = {}
        canonical: dict[str, Any] = {}
        if dm.external_id:
            fields[dm.external_id] = {"$step": 1}
        if self.o["crm_project_field"]:
            fields[self.o["crm_project_field"]] = {"$step": 2}
        status = self.o["delivery_status"]
        rule = self.deals.fields.get("delivery_status")
        if rule is not None and self.crm in rule.columns:
            fields.update(
                self.mappers[self.deals.name].to_native(self.crm, {"delivery_status": status}, record=cid)
            )
            canonical["delivery_status"] = status
        elif self.o["crm_delivery_status_field"]:
            fields[self.o["crm_delivery_status_field"]] = status
            canonical["delivery_status"] = status
        out = [
            follow_up(
                "deal", self.crm, self.deals.name, cid, dm.object, {dm.key: deal_crm_id}, fields, canonical
            )
        ]
        cm = self.customers.systems[self.crm]
        account = customer_crm_id if customer_erp_id is None else None
        if cm.external_id and account:
            fields = {cm.external_id: {"$step": 0}}
            out.append(
                follow_up(
                    "customer",
                    self.crm,
                    self.customers.name,
                    customer_cid,
                    cm.object,
                    {cm.key: account},
                    fields,
                    {},
                )
            )
        return [t for t in out if t["fields"]]
