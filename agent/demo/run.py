"""``syncagent demo``: a throwaway ERP and Salesforce, the agent, and a narrated tour of the workflows.

``start_environment`` starts a PostgreSQL cluster (``agent.localpg``, ``wal_level=logical``)
with the demo ERP, the bundled Salesforce emulator seeded with accounts and opportunities,
writes a config, runs ``init`` and loads the ERP's reference data (a resync of the legal
entity, tax code and service line tables). ``run_demo`` then runs the agent and narrates:
a deal is won and its ERP project appears; a milestone completes and Salesforce shows it;
a change order revises the contract; a deal with an unknown tax code waits in the
exception queue and goes through on its own once the tax code is added. It ends with
``syncagent status`` and how to explore; everything is removed afterwards (Ctrl-C too)
unless ``--keep`` leaves it running.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

import psycopg

from agent import ops
from agent.daemon import Runtime, build_runtime, open_config
from agent.demo import erp_schema_sql
from agent.demo.seed import REFERENCE_TABLES, crm_env, make_crm, seed_crm, write_config
from agent.health import snapshot
from agent.localpg import LocalCluster, start_cluster
from agent.logging import setup as setup_logging
from agent.render import render_status
from agent.scheduler import AgentRunner
from agent.workflows.report import instance_report, render_report
from connectors.emulator import EmulatorServer
from connectors.salesforce.emulator import SalesforceEmulator
from state import exceptions, open_state

Echo = Callable[[str], None]
WAIT_SECONDS = 45.0


class DemoFailed(Exception):
    """A step of the demo did not happen in time."""


@dataclass
class DemoEnv:
    """A running demo environment: its folder, ERP cluster, CRM emulator and config."""

    root: Path
    cluster: LocalCluster
    server: EmulatorServer
    sf: SalesforceEmulator
    config_path: Path
    dsn: str
    ids: dict[str, str] = field(default_factory=dict)

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        """Run one statement in the demo ERP (autocommit) and return its rows."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query, args or None)
            return cur.fetchall() if cur.description else []

    def close(self) -> None:
        """Stop the emulator and the cluster and remove the folder."""
        self.server.stop()
        self.cluster.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def new_root() -> Path:
    """A fresh folder for a demo environment."""
    root = Path(tempfile.mkdtemp(prefix="syncagent-demo-"))
    os.chmod(root, 0o755)  # the server runs as the postgres user and must reach its folder
    return root


def start_environment(root: Path | None = None, *, poll_interval: float = 1.0, seed: bool = True) -> DemoEnv:
    """Start PostgreSQL with the demo ERP and the seeded emulator in ``root``; write the config; init."""
    root = root or new_root()
    cluster = start_cluster(root / "pg")
    server = None
    try:
        cluster.createdb("erp")
        dsn = cluster.dsn("erp")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(erp_schema_sql())
        sf = make_crm()
        server = EmulatorServer(sf).start()
        os.environ.update(crm_env())
        db = {"host": "127.0.0.1", "port": str(cluster.port), "dbname": "erp", "user": cluster.user}
        path = write_config(
            root / "config.toml",
            db=db,
            sf_url=server.url,
            state_path=root / "state" / "state.db",
            slot="syncagent_demo",
            poll_interval=poll_interval,
        )
        env = DemoEnv(root, cluster, server, sf, path, dsn)
        load_reference_data(path)
        if seed:
            env.ids = seed_crm(sf)
        return env
    except BaseException:
        if server is not None:
            server.stop()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        raise


def load_reference_data(config_path: Path) -> int:
    """``init``, then read the ERP's reference tables once (their rows pre-date the slot)."""
    cfg = open_config(config_path)
    ops.init(cfg, dry_run=False)
    rt = build_runtime(cfg)
    st = open_state(cfg.agent.state_path)
    try:
        return sum(
            ops.execute_rewind(
                rt, st, ops.plan_rewind(rt, st, f"erp/{table}", to_time=None, to_seq=None), actor="demo"
            )
            for table in REFERENCE_TABLES
        )
    finally:
        st.close()
        rt.close()


class AgentThread:
    """The agent, running in this process under its scheduler, until ``stop``."""

    def __init__(self, config_path: Path) -> None:
        self.rt: Runtime = build_runtime(open_config(config_path))
        self.runner = AgentRunner(self.rt)
        self.thread = threading.Thread(target=self.runner.run_forever, name="syncagent-demo", daemon=True)

    def start(self) -> AgentThread:
        """Start the scheduler thread."""
        self.thread.start()
        return self

    def stop(self) -> None:
        """Finish the jobs in flight, stop, and close the connectors."""
        self.runner.stop()
        self.thread.join(timeout=15)
        self.rt.close()


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT_SECONDS) -> Any:
    """Poll ``check`` until it returns something true; raise ``DemoFailed`` naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def _money(value: Any) -> str:
    return f"{Decimal(str(value)):,.2f}"


def _close_won(env: DemoEnv, echo: Echo, deal: str) -> tuple[float, str]:
    started = time.monotonic()
    env.sf.update("Opportunity", env.ids[deal], {"StageName": "Closed Won"})
    echo(f'  Salesforce: "{deal}" is now Closed Won')
    return started, env.ids[deal]


def _tour_closed_won(env: DemoEnv, echo: Echo) -> str:
    echo("\n1. A deal is won in Salesforce: the ERP sets it up in one transaction")
    started, opp = _close_won(env, echo, "Acme - ERP rollout")
    row = wait_for(
        "the ERP project",
        lambda: env.sql(
            "SELECT p.project_code, p.id, c.id, c.value, c.currency, c.billing_type, c.legal_entity, k.name"
            " FROM erp.projects p JOIN erp.contracts c ON c.id = p.contract_id"
            " JOIN erp.customers k ON k.id = c.customer_id WHERE c.crm_id = %s",
            opp,
        ),
    )[0]
    code, project_id, contract_id, value, currency, billing, entity, customer = row
    echo(f"  ERP, {time.monotonic() - started:.1f}s later: project {code} (#{project_id}),")
    echo(
        f"    contract #{contract_id} {_money(value)} {currency} {billing} for {entity}, customer {customer}"
    )
    got = wait_for("the write-back", lambda: (env.sf.get("Opportunity", opp) or {}).get("ERP_Project_Id__c"))
    status = (env.sf.get("Opportunity", opp) or {}).get("Delivery_Status__c")
    echo(f"  Salesforce: ERP project id {got}, delivery status {status!r}")
    return str(project_id)


def _tour_milestone(env: DemoEnv, echo: Echo, project_id: str) -> None:
    echo("\n2. A milestone is completed in the ERP: Salesforce shows the progress")
    env.sql(
        "INSERT INTO erp.milestones (project_id, name, amount)"
        " VALUES (%s, 'Design', 20000), (%s, 'Build', 28000)",
        project_id,
        project_id,
    )
    env.sql(
        "UPDATE erp.milestones SET status = 'completed', completed_at = now()"
        " WHERE project_id = %s AND name = 'Design'",
        project_id,
    )
    echo("  ERP: milestones Design (20,000) and Build (28,000); Design completed")
    opp = env.ids["Acme - ERP rollout"]
    pct = wait_for(
        "the percent complete", lambda: (env.sf.get("Opportunity", opp) or {}).get("Percent_Complete__c")
    )
    o = env.sf.get("Opportunity", opp) or {}
    echo(
        f"  Salesforce: {pct} % complete, delivery status {o.get('Delivery_Status__c')!r},"
        f" updated at the ERP's time {o.get('Delivery_Updated_At__c')}"
    )


def _tour_change_order(env: DemoEnv, echo: Echo) -> None:
    echo("\n3. A change order is approved in Salesforce: the ERP contract is revised, with history")
    opp = env.ids["Acme - ERP rollout"]
    schedule = json.dumps(
        [{"due": "2026-03-31", "amount": "27500.00"}, {"due": "2026-06-30", "amount": "27500.00"}]
    )
    env.sf.insert(
        "Change_Order__c",
        {
            "Name": "CO-001",
            "Opportunity__c": opp,
            "New_Amount__c": Decimal("55000.00"),
            "Billing_Schedule__c": schedule,
            "Status__c": "Approved",
            "Approved_By__c": "Dana Lee",
            "Approved_At__c": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
    )
    echo("  Salesforce: CO-001 raises the deal to 55,000.00, approved by Dana Lee")
    rev = wait_for(
        "the contract revision",
        lambda: env.sql(
            "SELECT r.version, r.old_value, r.new_value, r.approved_by, r.trace_id, c.version, c.value"
            " FROM erp.contract_revisions r JOIN erp.contracts c ON c.id = r.contract_id WHERE c.crm_id = %s",
            opp,
        ),
    )[0]
    echo(f"  ERP: contract now version {rev[5]} at {_money(rev[6])}; revision v{rev[0]} keeps")
    echo(f"    {_money(rev[1])} -> {_money(rev[2])}, approved by {rev[3]}, trace {rev[4]}")


def _tour_parked(env: DemoEnv, echo: Echo, cfg_path: Path) -> None:
    echo("\n4. A deal names a tax code the ERP does not have: it waits, then goes through on its own")
    _started, opp = _close_won(env, echo, "Globex - Data migration")
    state_path = open_config(cfg_path).agent.state_path

    def parked() -> Any:
        st = open_state(state_path, readonly=True)
        try:
            return [i for i in exceptions.list_items(st, status="open") if i.reason == "missing_tax_code"]
        finally:
            st.close()

    item = wait_for("the exception item", parked)[0]
    echo(f"  exception #{item.id} {item.reason}: {item.detail} (waiting for {item.blocking_ref})")
    created = env.sql("SELECT count(*) FROM erp.contracts WHERE crm_id = %s", opp)[0][0]
    echo(f"  ERP: {created} contracts for it; nothing half-created")
    env.sql("INSERT INTO erp.tax_codes VALUES ('DE-VAT7', 0.07, 'ACME-DE')")
    echo("  ERP: tax code DE-VAT7 added")
    code = wait_for(
        "the released project",
        lambda: env.sql(
            "SELECT p.project_code FROM erp.projects p JOIN erp.contracts c ON c.id = p.contract_id"
            " WHERE c.crm_id = %s",
            opp,
        ),
    )[0][0]
    wait_for("the exception to close", lambda: not parked())
    wait_for("the write-back", lambda: (env.sf.get("Opportunity", opp) or {}).get("ERP_Project_Id__c"))
    echo(f"  ERP: project {code} created; exception #{item.id} resolved by the agent")


def _summary(env: DemoEnv, echo: Echo, keep: bool) -> None:
    cfg = open_config(env.config_path)
    st = open_state(cfg.agent.state_path, readonly=True)
    try:
        echo("\n$ syncagent status")
        render_status(snapshot(cfg, st, cfg_arg=f"-c {env.config_path}"))
        echo("\n$ syncagent workflows")
        render_report(instance_report(st))
    finally:
        st.close()
    c = f"syncagent -c {env.config_path}"
    creds = " ".join(f"{k}={v}" for k, v in crm_env().items())
    echo("\nExplore:" if keep else "\nTo explore it yourself, run `syncagent demo --keep`, then:")
    echo(f"  export {creds}")
    for cmd in ("workflows", "exceptions list --status all", "journal --limit 40", "checkpoint list"):
        echo(f"  {c} {cmd}")
    echo(f"  psql '{env.dsn}' -c 'SELECT * FROM erp.contract_revisions'")
    echo(f"  Salesforce emulator: {env.server.url}")


def run_demo(*, keep: bool = False, echo: Echo = print, log: TextIO | None = None) -> int:
    """Run the whole demo; 0 when every step happened, 1 when one did not, 130 on Ctrl-C."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    if main and keep:  # a shell may start us with SIGINT ignored; Ctrl-C must still end the demo
        signal.signal(signal.SIGINT, signal.default_int_handler)
    echo("Starting a throwaway PostgreSQL with the demo ERP and the Salesforce emulator...")
    root = new_root()
    log_file = log or open(root / "agent.log", "a")  # noqa: SIM115 - closed below
    setup_logging(level="info", fmt="logfmt", stream=log_file)
    try:
        env = start_environment(root)
    except BaseException:
        logging.getLogger().handlers.clear()
        log_file.close()
        shutil.rmtree(root, ignore_errors=True)
        raise
    agent = None
    try:
        echo(f"  ERP {env.dsn}; Salesforce {env.server.url}; agent log {root / 'agent.log'}")
        agent = AgentThread(env.config_path).start()
        project_id = _tour_closed_won(env, echo)
        _tour_milestone(env, echo, project_id)
        _tour_change_order(env, echo)
        _tour_parked(env, echo, env.config_path)
        _summary(env, echo, keep)
        if keep:
            echo("\nEverything keeps running; Ctrl-C stops it and removes it.")
            while True:
                time.sleep(3600)
        return 0
    except DemoFailed as exc:
        echo(f"\ndemo failed: {exc}; the agent's last log lines:")
        log_file.flush()
        own_log = root / "agent.log"
        for line in own_log.read_text().splitlines()[-15:] if own_log.exists() else []:
            echo(f"  {line}")
        return 1
    except KeyboardInterrupt:
        echo("\nstopping...")
        return 130
    finally:
        if agent is not None:
            agent.stop()
        logging.getLogger().handlers.clear()
        if log is None and not log_file.closed:
            log_file.close()
        env.close()
        if main:
            signal.signal(signal.SIGTERM, previous)
        echo("demo removed: cluster, emulator and state are gone")


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt
