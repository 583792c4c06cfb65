"""Chaos and soak harness: a seeded two-sided workload while the agent is killed, stormed and starved.

Run from the repository root (as root, for the tmpfs; loopback only)::

    .venv/bin/python -m bench.chaos.run --profile short            # < 3 minutes, >= 5 kills (CI)
    .venv/bin/python -m bench.chaos.run --profile long --seed 7    # >= 10 minutes, >= 50 kills

It starts a throwaway PostgreSQL cluster and the Salesforce emulator (in this process), runs the
agent daemon as a child, and for the profile's time applies a seeded workload to both systems
while SIGKILLing the agent, storming the emulator, restarting PostgreSQL and filling the state
file's disk. Then it lets the agent run fault-free until quiescent, watches it idle, compares
both systems with the reference model (``bench.chaos.model``), prints a summary and writes
``bench/out/chaos.json``. Exit 1 when anything was lost, duplicated, written by a non-owner or
echoed while idle; 2 when the harness itself failed. See ``bench/chaos/README.md``.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from agent.demo import erp_schema_sql
from agent.localpg import LocalCluster, start_cluster
from bench.chaos.faults import (
    STORM_KINDS,
    AgentProcess,
    DiskFiller,
    Restarter,
    StormySalesforce,
    restart_cluster,
)
from bench.chaos.model import (
    STATUS_TO_CRM,
    STATUS_TO_ERP,
    Copy,
    Step,
    Verdict,
    Workload,
    compare,
    summarize_mismatches,
)
from connectors.emulator import EmulatorServer
from connectors.salesforce.schema import SfField
from state import checkpoints, exceptions, journal, open_state, outbox

OUT = Path(__file__).resolve().parents[1] / "out" / "chaos.json"
SF_ENV = {"SF_CLIENT_ID": "syncagent", "SF_CLIENT_SECRET": "s3cret"}
DB = "chaos"
Range = tuple[float, float]


@dataclass(frozen=True, slots=True)
class Profile:
    """Durations, rates and fault frequencies of one run."""

    name: str
    chaos_seconds: float
    steps_per_second: float
    max_records: int
    kill_after: Range
    early_kill_share: float
    storm_seconds: Range
    calm_seconds: Range
    pg_restart_every: Range
    disk_full_every: Range
    disk_full_seconds: Range
    drain_timeout: float
    idle_seconds: float
    tmpfs_mb: int
    min_kills: int


PROFILES = {
    "short": Profile(
        name="short",
        chaos_seconds=60,
        steps_per_second=6.0,
        max_records=60,
        kill_after=(1.5, 6.0),
        early_kill_share=0.1,
        storm_seconds=(3, 7),
        calm_seconds=(1.5, 3.5),
        pg_restart_every=(18, 26),
        disk_full_every=(20, 30),
        disk_full_seconds=(3, 6),
        drain_timeout=90,
        idle_seconds=5,
        tmpfs_mb=32,
        min_kills=5,
    ),
    "long": Profile(
        name="long",
        chaos_seconds=600,
        steps_per_second=4.0,
        max_records=300,
        kill_after=(2.0, 10.0),
        early_kill_share=0.1,
        storm_seconds=(25, 100),
        calm_seconds=(5, 20),
        pg_restart_every=(60, 110),
        disk_full_every=(70, 130),
        disk_full_seconds=(8, 25),
        drain_timeout=300,
        idle_seconds=5,
        tmpfs_mb=64,
        min_kills=50,
    ),
}


def config_text(work: Path, port: int, sf_url: str, state_path: Path) -> str:
    """The chaos config: the ownership rules of the e2e sync tests, short intervals, revert policy."""
    return f"""
[agent]
state_path = "{state_path}"
resolve_interval = 0.5
retry_base_seconds = 0.2
retry_cap_seconds = 5.0
max_attempts = 500

[systems.erp]
type = "postgres"
host = "127.0.0.1"
port = {port}
dbname = "{DB}"
user = "postgres"
slot = "{DB}"
publication = "{DB}"
origin = "{DB}"
poll_interval = 0.5
connect_timeout = 3

[systems.crm]
type = "salesforce"
instance_url = "{sf_url}"
client_id = {{env = "SF_CLIENT_ID"}}
client_secret = {{env = "SF_CLIENT_SECRET"}}
lookback_seconds = 5
poll_interval = 0.5
timeout_seconds = 10

[entities.customer]
on_non_owner_edit = "revert"
on_conflict = "latest"

[entities.customer.systems.erp]
object = "erp.customers"
key = "id"
external_id = "crm_id"
match_on = "customer_no"
updated_at = "updated_at"

[entities.customer.systems.crm]
object = "Account"
key = "Id"
external_id = "ERP_Id__c"
match_on = "customer_no"

[entities.customer.fields]
name = {{owner = "crm", erp = "name", crm = "Name"}}
customer_no = {{owner = "erp", erp = "customer_no", crm = "AccountNumber"}}
phone = {{owner = "shared", erp = "phone", crm = "Phone"}}
credit_limit = {{owner = "erp", type = "decimal", erp = "credit_limit", crm = "Credit_Limit__c"}}

[entities.customer.fields.status]
owner = "erp"
erp = "status"
crm = "Status__c"
values = {{crm = {{active = "Active", hold = "On Hold", archived = "Inactive"}}}}
"""


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """The seeded timeline of storms, PostgreSQL restarts and disk-full windows (seconds from start)."""

    storms: tuple[tuple[float, str, float, float], ...]
    pg_restarts: tuple[float, ...]
    disk_full: tuple[tuple[float, float], ...]


def plan_faults(profile: Profile, rng: random.Random) -> FaultPlan:
    """Draw the fault timeline of a run from ``rng``."""
    end = profile.chaos_seconds
    storms, kinds = [], list[str]()
    t = rng.uniform(*profile.calm_seconds) / 2
    while t < end - 1:
        if not kinds:
            kinds = list(STORM_KINDS)
            rng.shuffle(kinds)
        length = min(rng.uniform(*profile.storm_seconds), end - t)
        rate = 1.0 if rng.random() < 0.4 else rng.uniform(0.3, 0.8)
        storms.append((round(t, 2), kinds.pop(), round(rate, 2), round(length, 2)))
        t += length + rng.uniform(*profile.calm_seconds)
    restarts, t = [], rng.uniform(*profile.pg_restart_every) / 2
    while t < end - 3:
        restarts.append(round(t, 2))
        t += rng.uniform(*profile.pg_restart_every)
    disks, t = [], rng.uniform(*profile.disk_full_every) / 2
    while t < end - 2:
        length = min(rng.uniform(*profile.disk_full_seconds), end - t - 1)
        disks.append((round(t, 2), round(length, 2)))
        t += length + rng.uniform(*profile.disk_full_every)
    return FaultPlan(tuple(storms), tuple(restarts), tuple(disks))


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

    def __init__(self, profile: Profile, seed: int, *, disk_mode: str, work: Path) -> None:
        self.profile, self.seed, self.work = profile, seed, work
        self.workload = Workload(seed, max_records=profile.max_records)
        self.fault_rng = random.Random(f"chaos-faults:{seed}")
        self.plan = plan_faults(profile, self.fault_rng)
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
            self.tend_agent(kills=True)
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


def run(profile: Profile, seed: int, *, disk_mode: str, keep: bool) -> dict[str, Any]:
    """Run one chaos profile; return the report."""
    work = Path(tempfile.mkdtemp(prefix="syncagent-chaos-"))
    h = Harness(profile, seed, disk_mode=disk_mode, work=work)
    started = time.monotonic()
    failed = True
    try:
        h.setup()
        t = time.monotonic()
        h.phase_seconds["setup"] = round(t - started, 1)
        h.chaos()
        h.phase_seconds["chaos"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        quiescent = h.drain()
        h.phase_seconds["drain"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        echo = h.idle()
        h.phase_seconds["idle"] = round(time.monotonic() - t, 1)
        assert h.agent is not None
        stop_code = h.agent.stop()
        verdict = compare(h.workload, h.copies())
        report = build_report(h, verdict, echo, quiescent, stop_code, time.monotonic() - started)
        failed = not report["passed"]
        return report
    finally:
        if h.agent is not None:
            h.agent.close()
        if keep or failed:
            try:
                h.keep_evidence()
            except (OSError, AttributeError) as exc:
                print(f"could not keep the evidence: {exc}", file=sys.stderr)
        if h.erp is not None:
            h.erp.close()
        h.server.stop()
        h.disk.teardown()
        if h.cluster is not None:
            h.cluster.stop()
        if keep or failed:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def build_report(
    h: Harness, v: Verdict, echo: dict[str, int], quiescent: bool, stop_code: int | None, elapsed: float
) -> dict[str, Any]:
    """The JSON report of one run."""
    assert h.agent is not None and h.restarter is not None and h.erp is not None
    state = h.state_report()
    echo_loops = echo["crm_writes"] + echo["erp_rows_rewritten"]
    lost = v.lost + len(v.broken_links)
    report: dict[str, Any] = {
        "profile": h.profile.name,
        "seed": h.seed,
        "elapsed_s": round(elapsed, 1),
        "phases_s": h.phase_seconds,
        "disk_mode": h.disk.mode,
        "mount_error": h.disk.mount_error,
        "changes_made": v.changes_made,
        "field_writes": v.field_writes,
        "changes_converged": v.changes_converged,
        "changes_lost": v.changes_lost,
        "records": v.records_expected,
        "lost": lost,
        "duplicated": v.duplicates,
        "violations": v.violations,
        "echo_loops": echo_loops,
        "quiescent": quiescent,
        "workload": {
            "steps": h.workload.steps,
            "erp_transactions": h.erp.applied,
            "crm_writes": h.crm_steps,
            "harness_erp_errors": dict(h.erp.errors),
        },
        "faults": {
            "kills": h.agent.kills,
            "starts": h.agent.starts,
            "unexpected_exits": dict(h.agent.exits),
            "storms": dict(Counter(s[1] for s in h.plan.storms)),
            "storm_faults": dict(h.sf.faulted),
            "pg_restarts": h.restarter.done,
            "pg_restart_errors": h.restarter.errors,
            "disk_fills": h.disk.fills,
        },
        "echo": echo,
        "clean_stop_exit": stop_code,
        "details": {
            "missing": v.missing[:50],
            "duplicated": v.duplicated[:50],
            "strays": v.strays[:50],
            "broken_links": v.broken_links[:50],
            "mismatches": summarize_mismatches(v.mismatches),
            "mismatch_examples": [asdict(m) for m in v.mismatches[:20]],
        },
        "exceptions": state["exceptions"],
        "exception_examples": state["exception_examples"],
        "outbox_pending": state["outbox_pending"],
        "state_integrity": state["integrity"],
        "journal": state["journal"],
        "agent_log": {
            "job_failures": dict(h.agent.log.failures.most_common(30)),
            "job_crashes": dict(h.agent.log.crashed.most_common(30)),
            "non_json_lines": h.agent.log.other_lines,
            "last_non_json": h.agent.log.last_other[-5:],
            "path": str(h.agent.log_path),
        },
        "timeline": h.timeline,
    }
    report["kills_target"] = h.profile.min_kills
    report["passed"] = lost == 0 and v.duplicates == 0 and v.violations == 0 and echo_loops == 0
    return report


def print_summary(r: dict[str, Any]) -> None:
    """Print the summary table."""
    f = r["faults"]
    print(
        f"chaos {r['profile']} seed={r['seed']} disk={r['disk_mode']} elapsed={r['elapsed_s']}s "
        f"phases={r['phases_s']}"
    )
    print(
        f"faults: kills={f['kills']} unexpected_exits={f['unexpected_exits'] or 0} storms={f['storms']} "
        f"pg_restarts={f['pg_restarts']} disk_fills={f['disk_fills']}"
    )
    rows = [
        ("changes made", r["changes_made"], ""),
        ("changes converged", r["changes_converged"], ""),
        ("changes not converged", r["changes_made"] - r["changes_converged"], "0"),
        ("lost", r["lost"], "0"),
        ("duplicated records", r["duplicated"], "0"),
        ("ownership violations", r["violations"], "0"),
        ("echo loops", r["echo_loops"], "0"),
        ("exceptions raised", sum(r["exceptions"].values()), ""),
    ]
    print(f"{'metric':<24}{'value':>8}  must be")
    for name, value, must in rows:
        print(f"{name:<24}{value:>8}  {must}")
    for why, n in sorted(r["exceptions"].items()):
        print(f"  exception {why}: {n}")
    for why, n in r["agent_log"]["job_crashes"].items():
        print(f"  job crash {why}: {n}")
    for why, n in list(r["agent_log"]["job_failures"].items())[:6]:
        print(f"  job failure {why}: {n}")
    for code, n in r["faults"]["unexpected_exits"].items():
        print(f"  agent exited on its own with status {code}: {n}")
    if f["kills"] < r["kills_target"]:
        print(f"  fewer kills than the profile's target of {r['kills_target']}")
    if not r["quiescent"]:
        print("  the agent did not become quiescent within the drain timeout")
    print("PASS" if r["passed"] else "FAIL")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, report; exit 0 pass, 1 fail, 2 harness error."""
    ap = argparse.ArgumentParser(prog="python -m bench.chaos.run", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="short")
    ap.add_argument("--minutes", type=float, default=None, help="Length of the chaos phase (overrides).")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT, help="Where to write the JSON report.")
    ap.add_argument("--disk", choices=("tmpfs", "rlimit"), default="tmpfs", help="How to fill the disk.")
    ap.add_argument("--keep", action="store_true", help="Keep the work folder (logs, state file).")
    args = ap.parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 <pid> prints every thread's stack

    def _terminate(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through the teardown: unmount, stop PostgreSQL

    signal.signal(signal.SIGTERM, _terminate)
    profile = PROFILES[args.profile]
    if args.minutes is not None:
        profile = replace(profile, chaos_seconds=args.minutes * 60)
    try:
        report = run(profile, args.seed, disk_mode=args.disk, keep=args.keep)
    except (Exception, KeyboardInterrupt) as exc:
        print(f"chaos harness failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print_summary(report)
    print(f"report: {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
