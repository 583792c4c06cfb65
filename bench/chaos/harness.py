"""One chaos run's moving parts: the two systems, the agent, the workload's writers and the probes."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter, deque
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from agent.demo import erp_schema_sql
from agent.localpg import LocalCluster, start_cluster
from bench.chaos.faults import AgentProcess, DiskFiller, Restarter, StormySalesforce, restart_cluster
from bench.chaos.model import STATUS_TO_CRM, STATUS_TO_ERP, Copy, Step, Workload
from bench.chaos.profiles import DB, FAULT_KINDS, FaultPlan, Profile, config_text, plan_faults
from connectors.emulator import EmulatorServer
from connectors.salesforce.schema import SfField
from state import checkpoints, exceptions, journal, open_state, outbox

SF_ENV = {"SF_CLIENT_ID": "syncagent", "SF_CLIENT_SECRET": "s3cret"}


class ErpWriter:
    """Applies ERP steps in order, one transaction each, retrying through outages."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.queue: deque[Step] = deque()
        self.applied = 0
        self.errors: Counter[str] = Counter()
        self.log: list[tuple[float, Step]] = []
        self._conn: psycopg.Connection | None = None
        self._retry_at = 0.0

    def pump(self) -> None:
        """Apply queued steps until the queue is empty or the ERP refuses."""
        while self.queue and time.monotonic() >= self._retry_at:
            try:
                self._apply(self.queue[0])
            except psycopg.Error as exc:
                self.errors[type(exc).__name__] += 1
                self._close()
                self._retry_at = time.monotonic() + 0.3
                return
            step = self.queue.popleft()
            self.applied += 1
            self.log.append((time.monotonic(), step))

    def _apply(self, step: Step) -> None:
        if self._conn is None:
            self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
        with self._conn.transaction():
            for e in step.edits:
                if e.kind == "create":
                    cols = ["customer_no", *e.values]
                    self._conn.execute(
                        sql.SQL(
                            "INSERT INTO erp.customers ({}) VALUES ({}) ON CONFLICT (customer_no) DO NOTHING"
                        ).format(
                            sql.SQL(", ").join(map(sql.Identifier, cols)),
                            sql.SQL(", ").join(sql.Placeholder() * len(cols)),
                        ),
                        [e.marker, *e.values.values()],
                    )
                else:
                    sets = sql.SQL(", ").join(
                        sql.SQL("{} = {}").format(sql.Identifier(c), sql.Placeholder()) for c in e.values
                    )
                    self._conn.execute(
                        sql.SQL(
                            "UPDATE erp.customers SET {}, updated_at = now() WHERE customer_no = %s"
                        ).format(sets),
                        [*e.values.values(), e.marker],
                    )

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
            self._conn = None

    def close(self) -> None:
        """Close the connection."""
        self._close()


def crm_fields(values: dict[str, Any]) -> dict[str, Any]:
    """Canonical customer values as Salesforce Account fields."""
    names = {
        "name": "Name",
        "phone": "Phone",
        "credit_limit": "Credit_Limit__c",
        "customer_no": "AccountNumber",
    }
    out = {names[k]: v for k, v in values.items() if k in names}
    if "status" in values:
        out["Status__c"] = STATUS_TO_CRM[values["status"]]
    return out


class Harness:
    """One chaos run: the systems, the agent, the workload, the faults and the verdict."""

    def __init__(
        self,
        profile: Profile,
        seed: int,
        *,
        disk_mode: str,
        work: Path,
        faults: frozenset[str] = FAULT_KINDS,
    ) -> None:
        self.profile, self.seed, self.work = profile, seed, work
        self.workload = Workload(seed, max_records=profile.max_records)
        self.fault_rng = random.Random(f"chaos-faults:{seed}")
        self.faults = faults
        plan = plan_faults(profile, self.fault_rng)
        self.plan = FaultPlan(
            plan.storms if "storm" in faults else (),
            plan.pg_restarts if "pg" in faults else (),
            plan.disk_full if "disk" in faults else (),
        )
        self.sf = StormySalesforce(seed)
        for name, f in (
            ("Status__c", SfField("Status__c", "picklist", picklist=tuple(STATUS_TO_ERP))),
            ("Credit_Limit__c", SfField("Credit_Limit__c", "currency")),
        ):
            self.sf.schemas["Account"].fields[name] = f
        self.server = EmulatorServer(self.sf)
        self.disk = DiskFiller(work / "state", profile.tmpfs_mb, mode=disk_mode)
        self.restarter: Restarter | None = None
        self.cluster: LocalCluster | None = None
        self.agent: AgentProcess | None = None
        self.erp: ErpWriter | None = None
        self.waiting: list[Step] = []
        self.sf_ids: dict[str, str] = {}
        self.erp_seen: set[str] = set()
        self.crm_steps = 0
        self.crm_log: list[tuple[float, Step]] = []
        self.timeline: list[dict[str, Any]] = []
        self.phase_seconds: dict[str, float] = {}
        self._next_kill = float("inf")
        self._restart_at = 0.0
        self._last_scan = 0.0
        self._t0 = time.monotonic()

    # --- setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        """Start PostgreSQL and the emulator, write the config, ``syncagent init``."""
        os.chmod(self.work, 0o755)
        self.cluster = start_cluster(self.work / "pg")
        self.cluster.createdb(DB)
        with psycopg.connect(self.cluster.dsn(DB), autocommit=True) as conn:
            conn.execute(erp_schema_sql())
        cluster = self.cluster
        self.restarter = Restarter(lambda: restart_cluster(cluster))
        self.server.start()
        mode = self.disk.setup()
        state_path = self.work / "state" / "state.db"
        self.config = self.work / "chaos.toml"
        self.config.write_text(config_text(self.work, self.cluster.port, self.server.url, state_path))
        self.state_path = state_path
        env = {**os.environ, **SF_ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        out = subprocess.run(
            [sys.executable, "-m", "agent.cli", "-c", str(self.config), "init"],
            capture_output=True,
            text=True,
            env=env,
        )
        if out.returncode != 0:
            raise RuntimeError(f"syncagent init failed: {out.stderr[-2000:]}")
        self.erp = ErpWriter(self.cluster.dsn(DB))
        self.agent = AgentProcess(self.config, self.work / "agent.log", SF_ENV)
        self.note("setup", disk_mode=mode, mount_error=self.disk.mount_error)

    def note(self, what: str, **detail: Any) -> None:
        """Add an event to the run's timeline."""
        self.timeline.append({"t": round(time.monotonic() - self._t0, 2), "event": what, **detail})

    # --- the workload -----------------------------------------------------------------------
    def submit(self, step: Step) -> None:
        """Queue a step: it is applied once the copies it edits exist, in order per copy."""
        self.waiting.append(step)

    def release(self, force_scan: bool = False) -> None:
        """Apply waiting steps whose copies exist, keeping the order per (record, side)."""
        now = time.monotonic()
        if self.waiting and (force_scan or now - self._last_scan > 0.3):
            self._scan()
            self._last_scan = now
        blocked: set[tuple[str, str]] = set()
        keep: list[Step] = []
        for step in self.waiting:
            needs = step.needs()
            ready = all(self._exists(m, s) for m, s in needs) and not any(n in blocked for n in needs)
            if ready:
                self._apply(step)
            else:
                blocked.update(needs)
                keep.append(step)
        self.waiting = keep

    def _exists(self, marker: str, side: str) -> bool:
        return marker in (self.erp_seen if side == "erp" else self.sf_ids)

    def _scan(self) -> None:
        wanted_crm = {m for s in self.waiting for m, side in s.needs() if side == "crm"}
        if wanted_crm - self.sf_ids.keys():
            for a in self.sf.all("Account", include_deleted=False):
                m = a.get("AccountNumber")
                if m in wanted_crm and m not in self.sf_ids:
                    self.sf_ids[m] = a["Id"]
        wanted_erp = {m for s in self.waiting for m, side in s.needs() if side == "erp"} - self.erp_seen
        if wanted_erp and self.cluster is not None:
            try:
                with psycopg.connect(self.cluster.dsn(DB), autocommit=True, connect_timeout=2) as conn:
                    rows = conn.execute(
                        "SELECT customer_no FROM erp.customers WHERE customer_no = ANY(%s)",
                        (list(wanted_erp),),
                    ).fetchall()
                self.erp_seen.update(r[0] for r in rows)
            except psycopg.Error:
                pass

    def _apply(self, step: Step) -> None:
        assert self.erp is not None
        if step.side == "erp":
            for e in step.edits:
                if e.kind == "create":
                    self.erp_seen.add(e.marker)
            self.erp.queue.append(step)
            self.erp.pump()
            return
        self.crm_log.append((time.monotonic(), step))
        for e in step.edits:
            self.crm_steps += 1
            fields = crm_fields(dict(e.values))
            if e.kind == "create":
                fields["AccountNumber"] = e.marker
                self.sf_ids[e.marker] = self.sf.insert("Account", fields)
            else:
                self.sf.update("Account", self.sf_ids[e.marker], fields)

    # --- the agent ----------------------------------------------------------------------------
    def tend_agent(self, *, kills: bool) -> None:
        """Restart the agent when it is down; kill it when its time has come (if ``kills``)."""
        agent = self.agent
        assert agent is not None
        now = time.monotonic()
        if agent.proc is not None:
            code = agent.note_exit()
            if code is not None:
                self.note("agent_exited", code=code, last=agent.log.last_other[-1:] or None)
                self._restart_at = now + 1.0  # systemd's RestartSec
            elif kills and now >= self._next_kill:
                agent.kill()
                self._restart_at = now + self.fault_rng.uniform(0.05, 0.5)
        if agent.proc is None and now >= self._restart_at:
            agent.start()
            p, r = self.profile, self.fault_rng
            wait = r.uniform(0.1, 1.5) if r.random() < p.early_kill_share else r.uniform(*p.kill_after)
            self._next_kill = now + wait

    # --- phases -------------------------------------------------------------------------------
    def chaos(self) -> None:
        """The chaos phase: workload, kills, storms, PostgreSQL restarts, a full disk."""
        assert self.erp is not None and self.restarter is not None and self.agent is not None
        p = self.profile
        total = int(p.chaos_seconds * p.steps_per_second)
        start = time.monotonic()
        storms, restarts, disks = (
            list(self.plan.storms),
            list(self.plan.pg_restarts),
            list(self.plan.disk_full),
        )
        disk_until: float | None = None
        done = 0
        while True:
            now = time.monotonic()
            t = now - start
            if t >= p.chaos_seconds and done >= total:
                break
            while done < total and done <= t * p.steps_per_second:
                self.submit(self.workload.next_step())
                done += 1
            self.release()
            self.erp.pump()
            if storms and t >= storms[0][0]:
                _, kind, rate, length = storms.pop(0)
                self.sf.start_storm(kind, rate, length)
                self.note("storm", kind=kind, rate=rate, seconds=length)
            if restarts and t >= restarts[0]:
                restarts.pop(0)
                if self.restarter.trigger():
                    self.note("pg_restart")
            if disk_until is None and disks and t >= disks[0][0]:
                _, length = disks.pop(0)
                self.disk.fill(self.agent)
                disk_until = t + length
                self.note("disk_full", seconds=length, ballast_bytes=self.disk.ballast_bytes)
            elif disk_until is not None and t >= disk_until:
                self.disk.free(self.agent)
                disk_until = None
                self.note("disk_freed")
            self.tend_agent(kills="kill" in self.faults)
            time.sleep(0.02)
        self.sf.calm()
        if self.disk.full:
            self.disk.free(self.agent)
            self.note("disk_freed")
        self.restarter.wait()
        self.note("chaos_over", steps=done, kills=self.agent.kills)

    def drain(self) -> bool:
        """Let the agent run fault-free until quiescent; tell whether it got there in time."""
        assert self.erp is not None and self.agent is not None
        deadline = time.monotonic() + self.profile.drain_timeout
        quiet, mark, last_check = 0, None, 0.0
        while time.monotonic() < deadline:
            self.release(force_scan=True)
            self.erp.pump()
            self.tend_agent(kills=False)
            if time.monotonic() - last_check >= 1.0:
                last_check = time.monotonic()
                settled, mark = self._settled(mark)
                quiet = quiet + 1 if settled else 0
                if quiet >= 3:
                    self.note("quiescent")
                    return True
            time.sleep(0.05)
        self.note("drain_timeout", waiting=len(self.waiting), erp_queue=len(self.erp.queue))
        return False

    def _settled(self, mark: Any) -> tuple[bool, Any]:
        """One quiescence probe: nothing waiting or queued, journal resolved, both cursors caught up."""
        assert self.erp is not None and self.cluster is not None
        try:
            st = open_state(self.state_path, readonly=True)
        except Exception:
            return False, mark
        try:
            pending = sum(d.pending for d in outbox.depth(st).values())
            last = journal.last_seq(st)
            rcp = checkpoints.get(st, "resolver", "journal")
            position = int(rcp.cursor.data.get("seq", 0)) if rcp else 0
            ccp = checkpoints.get(st, "source:crm", "Account")
            crm_ts = ccp.cursor.data.get("ts") if ccp and not ccp.cursor.data.get("upto") else None
        finally:
            st.close()
        stamps = [a["SystemModstamp"] for a in self.sf.all("Account")]
        crm_ok = not stamps or (crm_ts is not None and datetime.fromisoformat(crm_ts) >= max(stamps))
        try:
            with psycopg.connect(self.cluster.dsn(DB), autocommit=True, connect_timeout=2) as conn:
                row = conn.execute(
                    "SELECT confirmed_flush_lsn::text, pg_current_wal_lsn()::text,"
                    " confirmed_flush_lsn >= coalesce(%s::pg_lsn, '0/0') FROM pg_replication_slots"
                    " WHERE slot_name = %s",
                    (mark[0] if mark else None, DB),
                ).fetchone()
        except psycopg.Error:
            return False, None
        if row is None:
            return False, None
        new_mark = (row[1], last, self.sf.writes_ok)
        same = mark is not None and mark[1:] == new_mark[1:]
        ok = (
            not self.waiting
            and not self.erp.queue
            and pending == 0
            and position >= last
            and crm_ok
            and bool(row[2])
            and same
        )
        return ok, new_mark

    def idle(self) -> dict[str, int]:
        """Watch the quiescent agent: writes to either system while idle are echo loops."""
        assert self.agent is not None
        w0, x0, j0 = self.sf.writes_ok, self._xmins(), self._journal_last()
        until = time.monotonic() + self.profile.idle_seconds
        while time.monotonic() < until:
            self.tend_agent(kills=False)
            time.sleep(0.1)
        w1, x1, j1 = self.sf.writes_ok, self._xmins(), self._journal_last()
        changed = sum(1 for k, v in x1.items() if x0.get(k) != v)
        return {"crm_writes": w1 - w0, "erp_rows_rewritten": changed, "journal_growth": j1 - j0}

    def _xmins(self) -> dict[str, str]:
        assert self.cluster is not None
        with psycopg.connect(self.cluster.dsn(DB), autocommit=True, connect_timeout=5) as conn:
            return {str(r[0]): r[1] for r in conn.execute("SELECT id, xmin::text FROM erp.customers")}

    def _journal_last(self) -> int:
        st = open_state(self.state_path, readonly=True)
        try:
            return journal.last_seq(st)
        finally:
            st.close()

    # --- the verdict --------------------------------------------------------------------------
    def copies(self) -> list[Copy]:
        """Every customer record in both systems, in canonical fields."""
        assert self.cluster is not None
        out = []
        with psycopg.connect(self.cluster.dsn(DB), autocommit=True) as conn:
            rows = conn.execute(
                "SELECT id, customer_no, name, status, credit_limit, phone, crm_id FROM erp.customers"
            ).fetchall()
        for rid, no, name, status, credit, phone, crm_id in rows:
            values = {"name": name, "status": status, "credit_limit": credit, "phone": phone}
            out.append(Copy("erp", no, values, str(rid), crm_id))
        for a in self.sf.all("Account", include_deleted=False):
            status = a.get("Status__c")
            values = {
                "name": a.get("Name"),
                "status": None if status is None else STATUS_TO_ERP.get(str(status), status),
                "credit_limit": a.get("Credit_Limit__c"),
                "phone": a.get("Phone"),
            }
            out.append(Copy("crm", a.get("AccountNumber"), values, a["Id"], a.get("ERP_Id__c")))
        return out

    def keep_evidence(self) -> None:
        """Copy the state file out of the tmpfs and write the applied steps, for a post-mortem."""
        if self.state_path.parent.exists():
            shutil.copytree(self.state_path.parent, self.work / "state-final", dirs_exist_ok=True)
        applied = sorted([*(self.erp.log if self.erp else []), *self.crm_log], key=lambda x: x[0])
        with (self.work / "steps.jsonl").open("w") as f:
            for at, step in applied:
                row = {
                    "t": round(at - self._t0, 3),
                    "seq": step.seq,
                    "side": step.side,
                    "edits": [asdict(e) for e in step.edits],
                }
                f.write(json.dumps(row, default=str) + "\n")

    def state_report(self) -> dict[str, Any]:
        """Exceptions, outbox backlog and the state file's integrity after the run."""
        st = open_state(self.state_path, readonly=True)
        try:
            items = exceptions.list_items(st, status=None, limit=100_000)
            depth = {t: d.pending for t, d in outbox.depth(st).items()}
            integrity = [r[0] for r in st.conn.execute("PRAGMA integrity_check").fetchall()]
            stats = {k: asdict(v) for k, v in journal.stats(st).items()}
        finally:
            st.close()
        return {
            "exceptions": dict(Counter(f"{i.kind}/{i.reason} ({i.status})" for i in items)),
            "exception_examples": [
                {"kind": i.kind, "reason": i.reason, "detail": i.detail[:300], "status": i.status}
                for i in items[:10]
            ],
            "outbox_pending": depth,
            "integrity": integrity,
            "journal": stats,
        }
