"""The workflow tables on a real SQLite file: instances, latency, the value index, migration m002."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest
from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from agent.model import Op, utcnow
from state import open_state, outbox, shadow, workflows
from state.db import State
from state.migrations import m001_initial_tables


@pytest.fixture
def st(tmp_path: Path) -> State:
    s = open_state(tmp_path / "state.db")
    yield s
    s.close()


def _record(st: State, status: str, key: str = "closed_won:c1", **kw: object) -> workflows.WorkflowRow:
    args = dict(
        workflow="closed_won",
        key=key,
        entity="contract",
        canonical_id="c1",
        status=status,
        trigger_seq=7,
        trace_id="a" * 16,
        trigger={"source": "crm", "object": "Opportunity"},
        trigger_ts=utcnow() - timedelta(seconds=2),
        steps=(f"step:{status}",),
    )
    args.update(kw)
    return workflows.record(st, **args)  # type: ignore[arg-type]


def test_workflow_record_keeps_the_first_trigger_and_never_leaves_completed_when_recorded_again(
    st: State,
) -> None:
    first = _record(st, "parked")
    _record(st, "parked", trigger_seq=9, trace_id="b" * 16)
    assert workflows.parked_on(st, 7)[0].key == "closed_won:c1" and workflows.parked_on(st, 9) == []
    again = _record(st, "running", trigger_seq=9)
    assert (again.trigger_seq, again.trace_id, again.status) == (7, "a" * 16, "running")
    assert [s["step"] for s in again.steps] == ["step:parked", "step:running"], (
        "a repeated step was kept twice"
    )
    assert workflows.mark_step(st, first.key, "erp:unit", detail={"ids": ["1"]}, completed=True)
    _record(st, "parked")
    done = workflows.get(st, first.key)
    assert done is not None and done.status == "completed" and done.latency_seconds is not None
    assert done.latency_seconds >= 2 and done.steps[-1]["ids"] == ["1"]


def test_workflow_latency_reports_p50_p95_and_max_when_instances_completed(st: State) -> None:
    for i in range(20):
        _record(
            st, "running", key=f"billing:{i}", workflow="billing", trigger_ts=utcnow() - timedelta(seconds=i)
        )
        workflows.mark_step(st, f"billing:{i}", "crm:Opportunity", completed=True)
    _record(st, "running", key="billing:open", workflow="billing")
    stats = workflows.latency(st)["billing"]
    assert stats.count == 20 and 9 <= stats.p50 <= 11 and 17 <= stats.p95 <= 19.5 and 19 <= stats.max < 20


def test_workflow_exceptions_are_remembered_and_taken_once(st: State) -> None:
    _record(st, "parked")
    workflows.note_exceptions(st, "closed_won:c1", [3, 1])
    workflows.note_exceptions(st, "closed_won:c1", [3])
    assert workflows.take_exceptions(st, "closed_won:c1") == [1, 3]
    assert workflows.take_exceptions(st, "closed_won:c1") == []


def test_workflow_mark_failed_only_moves_a_running_instance(st: State) -> None:
    _record(st, "parked")
    assert not workflows.mark_failed(st, "closed_won:c1", "erp rejected")
    _record(st, "running")
    assert workflows.mark_failed(st, "closed_won:c1", "erp rejected")
    assert workflows.status_of(st, "closed_won:c1") == "failed"


def test_related_finds_records_by_a_field_value_through_the_value_index(st: State) -> None:
    for n, contract in enumerate(["k1", "k1", "k2"]):
        shadow.put(
            st,
            "invoice",
            f"i{n}",
            {"contract": contract, "amount": str(n)},
            system="erp",
            by_agent=False,
            source_ts=None,
        )
    found = workflows.related(st, "invoice", "erp", "contract", "k1")
    assert sorted(found) == ["i0", "i1"] and found["i1"]["amount"].value == "1"
    plan = st.conn.execute(
        "EXPLAIN QUERY PLAN SELECT canonical_id FROM shadow WHERE entity = 'invoice' AND system = 'erp'"
        " AND field = 'contract' AND value = '\"k1\"' AND length(value) <= 80"
    ).fetchall()
    assert any("shadow_by_value" in str(tuple(r)) for r in plan)
    long = "x" * 200
    shadow.put(st, "invoice", "i9", {"note": long}, system="erp", by_agent=False, source_ts=None)
    assert list(workflows.related(st, "invoice", "erp", "note", long)) == ["i9"]


def test_migration_m002_keeps_outbox_ops_and_never_reuses_a_pruned_op_id(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    raw = sqlite3.connect(path, isolation_level=None)
    db = Database(raw)
    old = Migrations("syncagent")
    old(name="m001_initial_tables")(m001_initial_tables)
    old.apply(db)
    raw.close()
    st = sqlite3.connect(path, isolation_level=None)
    ts = utcnow().isoformat()
    for n in (1, 2, 3):
        st.execute(
            "INSERT INTO outbox (idempotency_key, target, entity, canonical_id, object_name, action, key,"
            " fields, canonical, trace_id, next_attempt_at, created_at, updated_at)"
            " VALUES (?, 'erp', 'customer', 'c', 'erp.customers', 'upsert', '{}', '{}', '{}', 't', ?, ?, ?)",
            (f"k{n}", ts, ts, ts),
        )
    st.execute("DELETE FROM outbox WHERE op_id = 3")  # pruned
    st.close()
    s = open_state(path)
    try:
        assert [r.op.idempotency_key for i in (1, 2) if (r := outbox.get(s, i))] == ["k1", "k2"]
        outbox.enqueue(
            s,
            [
                Op(
                    "k4",
                    "erp",
                    "contract",
                    "c",
                    "erp.contracts",
                    "unit",
                    {},
                    {"steps": []},
                    "t",
                    workflow="w:1",
                )
            ],
        )
        (op_id,) = s.conn.execute("SELECT op_id FROM outbox WHERE idempotency_key = 'k4'").fetchone()
        assert op_id == 4, "a pruned op id was handed out again"
        row = outbox.get(s, 4)
        assert row is not None and row.op.action == "unit" and row.op.workflow == "w:1"
        assert outbox.pending_for_workflow(s, "w:1") == 1
    finally:
        s.close()
