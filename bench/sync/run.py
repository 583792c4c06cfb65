"""Sync benchmark: ERP customer changes to Salesforce and Salesforce account changes to the ERP.

Run from the repository root::

    .venv/bin/python -m bench.sync.run            # 10,000 changes each way (a few minutes)
    .venv/bin/python -m bench.sync.run --quick    # 1,000 each way (well under a minute)

It starts a throwaway PostgreSQL cluster (loopback only) with the demo ERP schema and the
Salesforce emulator in this process, then measures each direction as a backlog drained by
``syncagent run --once`` cycles (real CLI processes). It prints a table and writes the figures
to ``bench/out/sync.json``. See ``bench/sync/README.md`` for what is measured and how.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg

from agent.demo import erp_schema_sql
from agent.localpg import LocalCluster, start_cluster
from connectors.emulator import EmulatorServer, EmuRequest, EmuResponse
from connectors.salesforce.emulator import SalesforceEmulator
from connectors.salesforce.schema import SfField

OUT = Path(__file__).resolve().parents[1] / "out" / "sync.json"
API_PREFIX = "/services/data/v"
CALLS_TARGET = 8.0  # Salesforce API calls per 1,000 records
STATUS_TO_CRM = {"active": "Active", "hold": "On Hold", "archived": "Inactive"}
# The connector reads only up to its server's clock minus a 2 s safety lag; moving the
# emulator's clock on before each cycle keeps the benchmark from sleeping through it.
CLOCK_STEP = timedelta(seconds=3)


@dataclass(frozen=True, slots=True)
class Profile:
    """Sizes of one profile: new records and edits per side, rows per ERP transaction."""

    name: str
    erp_inserts: int
    erp_updates: int
    crm_inserts: int
    crm_edits: int
    tx_rows: int = 100

    @property
    def erp_changes(self) -> int:
        """ERP row changes written."""
        return self.erp_inserts + self.erp_updates

    @property
    def crm_changes(self) -> int:
        """Salesforce record changes made."""
        return self.crm_inserts + self.crm_edits


PROFILES = {
    "full": Profile("full", 8_000, 2_000, 8_000, 2_000),
    "quick": Profile("quick", 800, 200, 800, 200),
}


class TimedSalesforce(SalesforceEmulator):
    """The Salesforce emulator, adding up the time it spends serving requests."""

    def __init__(self) -> None:
        super().__init__(daily_limit=10_000_000)
        self.busy_seconds = 0.0
        self._busy_lock = threading.Lock()

    def handle(self, request: EmuRequest) -> EmuResponse | None:
        """Serve one request and count its service time."""
        started = time.perf_counter()
        try:
            return super().handle(request)
        finally:
            with self._busy_lock:
                self.busy_seconds += time.perf_counter() - started


def add_custom_fields(sf: SalesforceEmulator) -> None:
    """The Account custom fields the benchmark config maps."""
    account = sf.schemas["Account"].fields
    account["Status__c"] = SfField("Status__c", "picklist", picklist=tuple(STATUS_TO_CRM.values()))
    account["Credit_Limit__c"] = SfField("Credit_Limit__c", "currency")


def write_config(path: Path, *, dsn: str, sf_url: str, state: Path) -> Path:
    """ERP (PostgreSQL) <-> Salesforce for customers, field ownership as a firm would set it."""
    p = dict(part.split("=", 1) for part in dsn.split())
    path.write_text(f"""
[agent]
state_path = "{state}"

[systems.erp]
type = "postgres"
host = "{p["host"]}"
port = {p["port"]}
dbname = "{p["dbname"]}"
user = "{p["user"]}"
slot = "bench_sync"
publication = "bench_sync"
origin = "bench_sync"

[systems.crm]
type = "salesforce"
instance_url = "{sf_url}"
client_id = {{env = "SF_CLIENT_ID"}}
client_secret = {{env = "SF_CLIENT_SECRET"}}
lookback_seconds = 5

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
""")
    return path


# --- the agent as a process --------------------------------------------------------------------

TIME = "/usr/bin/time"


@dataclass(frozen=True, slots=True)
class ProcessRun:
    """One finished child process: exit code, wall seconds, peak RSS in MiB, its output."""

    returncode: int
    seconds: float
    max_rss_mib: float
    stdout: str
    stderr: str


def syncagent_argv(config: Path, *args: str) -> list[str]:
    """The installed ``syncagent`` command of this interpreter's environment."""
    exe = Path(sys.executable).with_name("syncagent")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "agent.cli"]
    return [*base, "-c", str(config), *args]


def timed(argv: list[str]) -> ProcessRun:
    """Run ``argv`` to the end; measure wall time and the child's own peak RSS.

    GNU time reports the peak of the exec'd program alone; the rusage of a forked child can
    also include pages of this (large, emulator-holding) process, so it is only the fallback.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:  # fmt: skip
        wrapped = [TIME, "-f", "%M", "-o", rss.name, *argv] if os.path.exists(TIME) else argv
        started = time.perf_counter()
        proc = subprocess.Popen(wrapped, stdout=out, stderr=err)
        _pid, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        figures = rss.read().split()  # KiB; a failed command adds a line before the figure
        kib = int(figures[-1]) if wrapped is not argv and figures else usage.ru_maxrss
        out.seek(0)
        err.seek(0)
        return ProcessRun(proc.returncode, seconds, kib / 1024, out.read(), err.read())


# --- workloads ---------------------------------------------------------------------------------


def erp_workload(dsn: str, p: Profile, rng: random.Random) -> float:
    """New customers, then updates of ERP-owned fields of random ones; return the seconds taken."""
    started = time.perf_counter()
    with psycopg.connect(dsn) as conn:
        for lo in range(1, p.erp_inserts + 1, p.tx_rows):
            hi = min(lo + p.tx_rows - 1, p.erp_inserts)
            conn.execute(
                "INSERT INTO erp.customers (customer_no, name, phone, credit_limit, status)"
                " SELECT 'C-' || lpad(g::text, 6, '0'), 'Customer ' || g, '+49 30 ' || g,"
                " g * 10, 'active' FROM generate_series(%s::int, %s::int) g",
                (lo, hi),
            )
            conn.commit()
        ids = [r[0] for r in conn.execute("SELECT id FROM erp.customers ORDER BY id").fetchall()]
        picked = rng.sample(ids, p.erp_updates)
        for start in range(0, len(picked), p.tx_rows):
            with conn.pipeline(), conn.cursor() as cur:
                for cid in picked[start : start + p.tx_rows]:
                    cur.execute(
                        "UPDATE erp.customers SET credit_limit = %s, status = %s WHERE id = %s",
                        (Decimal(rng.randint(1, 10**6)) / 100, rng.choice(list(STATUS_TO_CRM)), cid),
                    )
            conn.commit()
    return time.perf_counter() - started


def crm_workload(sf: SalesforceEmulator, p: Profile, rng: random.Random) -> float:
    """New accounts, then renames (a CRM-owned field) of accounts the ERP sent; return seconds."""
    started = time.perf_counter()
    erp_made = [a["Id"] for a in sf.all("Account") if a["ERP_Id__c"]]
    for j in range(1, p.crm_inserts + 1):
        sf.insert(
            "Account",
            {
                "Name": f"Prospect {j}",
                "AccountNumber": f"K-{j:06}",
                "Phone": f"+44 20 {j}",
                "Status__c": "Active",
            },
        )
    for record_id in rng.sample(erp_made, min(p.crm_edits, len(erp_made))):
        sf.update("Account", record_id, {"Name": f"Renamed {record_id[-6:]}"})
    return time.perf_counter() - started


# --- measuring ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cycle:
    """One ``run --once``: wall time, peak RSS and what it reported."""

    seconds: float
    max_rss_mib: float
    captured: int
    resolved: int
    applied: int
    rejected: int


def run_cycle(config: Path, sf: SalesforceEmulator, log: Path | None = None) -> Cycle:
    """Move the emulator clock past the safety lag and run one full agent cycle."""
    sf.shift_clock(CLOCK_STEP)
    run: ProcessRun = timed(syncagent_argv(config, "run", "--once"))
    if log is not None:
        with log.open("a") as f:
            f.write(run.stderr)
    lines = run.stdout.strip().splitlines()
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"run --once failed ({run.returncode}): {run.stdout[-500:]} {run.stderr[-1500:]}")
    out = json.loads(lines[-1])
    return Cycle(
        run.seconds,
        run.max_rss_mib,
        sum(out["captured"].values()),
        out["resolved"],
        sum(out["applied"].values()),
        sum(out["rejected"].values()),
    )


def drain(
    config: Path, sf: TimedSalesforce, records: int, *, log: Path | None = None, max_cycles: int = 20
) -> dict[str, Any]:
    """Run cycles until one captures and applies nothing; return the direction's figures.

    Seconds count the cycles up to the last one that applied anything (later cycles only
    read back the agent's own writes); API calls count every call until the quiet cycle.
    """
    calls_before = len(sf.requests(path_prefix=API_PREFIX))
    writes_before = _writes(sf)
    tokens_before = len(sf.requests(path_prefix="/services/oauth2"))
    busy_before = sf.busy_seconds
    cycles: list[Cycle] = []
    busy_at_last_work = busy_before
    while len(cycles) < max_cycles:
        cycle = run_cycle(config, sf, log)
        cycles.append(cycle)
        if cycle.applied or cycle.rejected:
            busy_at_last_work = sf.busy_seconds
        if cycle.captured == 0 and cycle.applied == 0 and cycle.rejected == 0:
            break
    else:
        raise RuntimeError(f"no quiet cycle after {max_cycles} cycles")
    working = cycles[: _last_work(cycles) + 1]
    seconds = sum(c.seconds for c in working)
    emulator = busy_at_last_work - busy_before
    calls = len(sf.requests(path_prefix=API_PREFIX)) - calls_before
    return {
        "records": records,
        "cycles": len(cycles),
        "working_cycles": len(working),
        "seconds": round(seconds, 2),
        "records_per_s": round(records / seconds),
        "emulator_seconds": round(emulator, 2),
        "records_per_s_without_emulator": round(records / max(seconds - emulator, 1e-9)),
        "api_calls": calls,
        "api_calls_per_1000": round(calls * 1000 / records, 2),
        "token_requests": len(sf.requests(path_prefix="/services/oauth2")) - tokens_before,
        "collections_writes": _writes(sf) - writes_before,
        "queries": calls - (_writes(sf) - writes_before),
        "applied_ops": sum(c.applied for c in cycles),
        "rejected_ops": sum(c.rejected for c in cycles),
        "max_rss_mib": round(max(c.max_rss_mib for c in cycles), 1),
        "cycle_seconds": [round(c.seconds, 2) for c in cycles],
    }


def _writes(sf: SalesforceEmulator) -> int:
    return len([r for r in sf.requests(path_prefix=API_PREFIX) if "/composite/" in r.path])


def _last_work(cycles: list[Cycle]) -> int:
    return max((i for i, c in enumerate(cycles) if c.applied or c.rejected), default=0)


def in_step(dsn: str, sf: SalesforceEmulator) -> dict[str, Any]:
    """Compare both systems record by record: linked one to one, the same values."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT id, customer_no, name, phone, credit_limit, status, crm_id FROM erp.customers"
        ).fetchall()
    accounts = {a["Id"]: a for a in sf.all("Account", include_deleted=False)}
    ext = Counter(a["ERP_Id__c"] for a in accounts.values())
    unlinked = differ = 0
    for erp_id, number, name, phone, credit, status, crm_id in rows:
        acct = accounts.get(crm_id)
        if acct is None or acct["ERP_Id__c"] != str(erp_id):
            unlinked += 1
            continue
        crm_credit = acct["Credit_Limit__c"]
        same = (
            acct["AccountNumber"] == number
            and acct["Name"] == name
            and acct["Phone"] == phone
            and (None if crm_credit is None else Decimal(str(crm_credit))) == credit
            and acct["Status__c"] == STATUS_TO_CRM[status]
        )
        differ += not same
    return {
        "erp_customers": len(rows),
        "crm_accounts": len(accounts),
        "duplicate_erp_ids_in_crm": sum(1 for e, c in ext.items() if e is not None and c > 1),
        "unlinked": unlinked,
        "values_differ": differ,
        "ok": len(rows) == len(accounts)
        and unlinked == 0
        and differ == 0
        and max(ext.values(), default=1) == 1,
    }


def _table(results: dict[str, dict[str, Any]]) -> str:
    head = ("direction", "records", "records/s", "w/o emulator", "API calls/1000", "target", "peak RSS MiB",
            "cycles")  # fmt: skip
    rows: list[tuple[str, ...]] = [head]
    for name, r in results.items():
        rows.append((
            name, f"{r['records']:,}", f"{r['records_per_s']:,}", f"{r['records_per_s_without_emulator']:,}",
            f"{r['api_calls_per_1000']:.2f}", f"<= {CALLS_TARGET:g}", f"{r['max_rss_mib']:.1f}",
            f"{r['working_cycles']}+{r['cycles'] - r['working_cycles']}",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def run(
    p: Profile, work: Path, cluster: LocalCluster, rng: random.Random, log_dir: Path | None = None
) -> dict[str, Any]:
    """Set up one ERP database and one emulator, then measure both directions in turn."""
    cluster.createdb("bench_sync")
    dsn = cluster.dsn("bench_sync")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(erp_schema_sql())
    sf = TimedSalesforce()
    add_custom_fields(sf)
    os.environ.setdefault("SF_CLIENT_ID", "syncagent")
    os.environ.setdefault("SF_CLIENT_SECRET", "s3cret")
    with EmulatorServer(sf) as server:
        config = write_config(
            work / "sync.toml", dsn=dsn, sf_url=server.url, state=work / "state" / "state.db"
        )
        init = timed(syncagent_argv(config, "init"))
        if init.returncode != 0:
            raise RuntimeError(f"init failed: {init.stderr[-1500:]}")
        print(f"[erp->crm] writing {p.erp_changes:,} ERP changes ...", file=sys.stderr, flush=True)
        erp_write_s = erp_workload(dsn, p, rng)
        print("[erp->crm] draining ...", file=sys.stderr, flush=True)
        erp = drain(config, sf, p.erp_changes, log=log_dir / "erp_to_crm.log" if log_dir else None)
        erp["workload_seconds"] = round(erp_write_s, 2)
        print(f"[crm->erp] making {p.crm_changes:,} Salesforce changes ...", file=sys.stderr, flush=True)
        crm_write_s = crm_workload(sf, p, rng)
        print("[crm->erp] draining ...", file=sys.stderr, flush=True)
        crm = drain(config, sf, p.crm_changes, log=log_dir / "crm_to_erp.log" if log_dir else None)
        crm["workload_seconds"] = round(crm_write_s, 2)
        check = in_step(dsn, sf)
        with psycopg.connect(dsn, autocommit=True) as conn:
            server_version = conn.execute("SHOW server_version").fetchone()
    return {
        "results": {"erp_to_crm": erp, "crm_to_erp": crm},
        "end_state": check,
        "postgres": server_version[0] if server_version else None,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit 1 when the systems end out of step (or, with --strict, a target is missed)."""
    ap = argparse.ArgumentParser(prog="python -m bench.sync.run", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,000 changes each way instead of 10,000")
    ap.add_argument("--out", type=Path, default=OUT, help=f"JSON output (default {OUT})")
    ap.add_argument("--seed", type=int, default=11, help="random seed of the workloads")
    ap.add_argument("--log-dir", type=Path, help="keep the agent's log lines of each direction here")
    ap.add_argument("--strict", action="store_true", help="also exit 1 when API calls/1000 exceed the target")
    args = ap.parse_args(argv)
    p = PROFILES["quick" if args.quick else "full"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="syncagent-bench-sync-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # the postgres user must reach the cluster folder inside
        with start_cluster(work / "pg") as cluster:
            if args.log_dir:
                args.log_dir.mkdir(parents=True, exist_ok=True)
            measured = run(p, work, cluster, random.Random(args.seed), args.log_dir)
    report = {
        "profile": asdict(p),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "postgres": measured["postgres"],
        },
        "target_api_calls_per_1000": CALLS_TARGET,
        **{k: v for k, v in measured.items() if k != "postgres"},
    }
    results = measured["results"]
    report["targets_met"] = all(r["api_calls_per_1000"] <= CALLS_TARGET for r in results.values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(results))
    end = measured["end_state"]
    verdict = "in step" if end["ok"] else "OUT OF STEP"
    print(
        f"profile {p.name}; end state {verdict}: {end['erp_customers']:,} ERP customers,"
        f" {end['crm_accounts']:,} accounts, {end['unlinked']} unlinked, {end['values_differ']}"
        f" differing; JSON: {args.out}"
    )
    ok = bool(end["ok"]) and (report["targets_met"] or not args.strict)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
