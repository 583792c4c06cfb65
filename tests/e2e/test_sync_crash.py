"""Kill tests for the whole sync, ERP (real PostgreSQL) <-> Salesforce (its emulator as a server).

The agent runs as a child process and is SIGKILLed at a chosen point: after a batch was
journaled (before the source is acknowledged), inside the resolve transaction, after the
resolve committed (before delivery), after the ERP committed a delivery batch, and while the
Salesforce emulator serves a Collections write (applied there, the answer never read). The
restarted agent must reach the same end state as an uninterrupted run: no lost change, no
duplicate record on either side, no duplicate journal position, nothing left in the outbox,
no exceptions. A workload of a few hundred customer inserts and updates runs both ways.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from agent.cli import cli
from agent.config import load_config
from connectors.emulator import EmulatorServer, EmuRequest, EmuResponse
from connectors.salesforce.emulator import SalesforceEmulator
from state import audit, open_state
from tests.erp import add_sf_fields, load_erp, sync_config

pytestmark = [pytest.mark.pg, pytest.mark.e2e]

SF_ENV = {"SF_CLIENT_ID": "syncagent", "SF_CLIENT_SECRET": "s3cret"}
STATUS_TO_CRM = {"active": "Active", "hold": "On Hold", "archived": "Inactive"}
STATUS_TO_ERP = {v: k for k, v in STATUS_TO_CRM.items()}
REPO = Path(__file__).parents[2]
Pick = Callable[[str, int], bool]

# The child: the real runtime and one AgentRunner cycle, with one kill point armed.
CHILD = textwrap.dedent("""
    import json, os, signal, sys
    from agent.daemon import build_runtime, open_config
    from agent.scheduler import AgentRunner

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    class KillOn:
        '''Delegates to ``inner``; dies before or after its ``nth`` call of ``method``.'''
        def __init__(self, inner, method, nth, after):
            self._inner, self._method, self._left, self._after = inner, method, nth, after
        def __getattr__(self, name):
            attr = getattr(self._inner, name)
            if name != self._method:
                return attr
            def call(*args, **kwargs):
                self._left -= 1
                if self._left == 0 and not self._after:
                    die()
                result = attr(*args, **kwargs)
                if self._left == 0 and self._after:
                    die()
                return result
            return call

    class Runner(AgentRunner):
        point = None
        def retry_parked(self):
            if self.point == "resolved":
                die()  # the resolve transaction has committed; nothing is delivered yet
            return super().retry_parked()

    cfg = open_config(sys.argv[1])
    rt = build_runtime(cfg)
    point, nth = sys.argv[2], int(sys.argv[3])
    if point == "erp_journaled":  # journal committed, slot not advanced
        rt.sources["erp"] = KillOn(rt.sources["erp"], "commit", nth, after=False)
    elif point == "crm_journaled":
        rt.sources["crm"] = KillOn(rt.sources["crm"], "commit", nth, after=False)
    elif point == "resolving":  # inside the open resolve transaction
        rt.resolver = KillOn(rt.resolver, "resolve", nth, after=False)
    elif point == "erp_applied":  # the ERP committed the batch; the outcome is not recorded
        rt.sinks["erp"] = KillOn(rt.sinks["erp"], "apply", nth, after=True)
    runner = Runner(rt)
    runner.point = point
    report = runner.run_once()
    print(json.dumps({"ok": report.ok, "failures": report.failures}))
""")


class KillingSalesforce(SalesforceEmulator):
    """The Salesforce emulator, able to SIGKILL a process while it serves a Collections write."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._victim: int | None = None
        self._countdown = 0
        self.kills = 0

    def kill_during_write(self, pid: int, nth: int) -> None:
        """SIGKILL ``pid`` once the ``nth`` Collections write from now is applied, before it is answered."""
        with self._lock:
            self._victim, self._countdown = pid, nth

    def handle(self, request: EmuRequest) -> EmuResponse | None:
        """Serve as Salesforce; kill the armed victim between applying a write and answering it."""
        victim = None
        if "/composite/sobjects" in request.path and request.method in ("PATCH", "DELETE"):
            with self._lock:
                if self._victim is not None:
                    self._countdown -= 1
                    if self._countdown == 0:
                        victim, self._victim = self._victim, None
        response = super().handle(request)
        if victim is not None:
            os.kill(victim, signal.SIGKILL)
            self.kills += 1
        return response


@dataclass
class Model:
    """What both systems must hold at the end, by customer number, and the ERP changes made."""

    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    erp_changes: int = 0


class Env:
    """One ERP database, one Salesforce emulator server, one config and state file."""

    def __init__(self, dsn: str, cfg: Path, sf: KillingSalesforce, tmp_path: Path) -> None:
        self.dsn, self.cfg, self.sf, self.tmp_path = dsn, cfg, sf, tmp_path
        self.model = Model()

    # --- driving the agent ------------------------------------------------------------------
    def cli(self, *args: str) -> tuple[int, str]:
        res = CliRunner().invoke(cli, ["-c", str(self.cfg), *args], catch_exceptions=False)
        return res.exit_code, res.stdout

    def child(self, point: str, nth: int = 1) -> int:
        """Run one agent cycle in a child process with ``point`` armed; return its exit status."""
        script = self.tmp_path / "child.py"
        script.write_text(CHILD)
        self.sf.shift_clock(timedelta(seconds=3))
        proc = subprocess.Popen(
            [sys.executable, str(script), str(self.cfg), point, str(nth)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **SF_ENV, "PYTHONPATH": str(REPO)},
        )
        if point == "crm_applied":
            self.sf.kill_during_write(proc.pid, nth)
        _out, err = proc.communicate(timeout=120)
        if proc.returncode not in (0, -signal.SIGKILL):
            raise AssertionError(f"child failed ({proc.returncode}): {err[-3000:]}")
        return proc.returncode

    def converge(self, max_cycles: int = 12) -> int:
        """Run ``run --once`` until two cycles in a row capture and apply nothing; return cycles."""
        quiet = 0
        for n in range(1, max_cycles + 1):
            self.sf.shift_clock(timedelta(seconds=3))
            code, text = self.cli("run", "--once")
            out = json.loads(text.strip().splitlines()[-1])
            assert code == 0, out
            busy = (
                sum(out["captured"].values()) + sum(out["applied"].values()) + sum(out["rejected"].values())
            )
            quiet = quiet + 1 if busy == 0 else 0
            if quiet == 2:
                return n
        raise AssertionError(f"no quiet state after {max_cycles} cycles")

    # --- the two systems ------------------------------------------------------------------
    def sql(self, query: str, *args: object) -> int:
        """Run one ERP statement (autocommit); count its rows as ERP changes."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            n = conn.execute(query, args or None).rowcount
        self.model.erp_changes += max(n, 0)
        return n

    def rows(self) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(
                "SELECT id, customer_no, name, phone, credit_limit, status, crm_id FROM erp.customers"
            ).fetchall()

    def account_ids(self) -> dict[str, str]:
        """Salesforce account ids by account number (one each, or the test fails)."""
        found = Counter(a["AccountNumber"] for a in self.sf.all("Account"))
        assert not [n for n, c in found.items() if c > 1], "duplicate account"
        return {a["AccountNumber"]: a["Id"] for a in self.sf.all("Account")}

    # --- workload ---------------------------------------------------------------------------
    def erp_insert(self, lo: int, hi: int, per_txn: int = 50) -> None:
        """Insert customers C-lo..C-hi in the ERP, ``per_txn`` to a transaction."""
        for start in range(lo, hi + 1, per_txn):
            stop = min(start + per_txn - 1, hi)
            self.sql(
                "INSERT INTO erp.customers (customer_no, name, phone, credit_limit, status)"
                " SELECT 'C-' || lpad(g::text, 4, '0'), 'Erp ' || g, '+1 555 ' || g, g * 10,"
                " (ARRAY['active', 'hold', 'archived'])[1 + g %% 3] FROM generate_series(%s::int, %s::int) g",
                start,
                stop,
            )
            for g in range(start, stop + 1):
                self.model.customers[f"C-{g:04}"] = {
                    "name": f"Erp {g}",
                    "phone": f"+1 555 {g}",
                    "credit_limit": Decimal(g * 10),
                    "status": ("active", "hold", "archived")[g % 3],
                }

    def erp_update(self, pick: Pick, **values: Any) -> None:
        """Update the ERP customers ``pick`` chooses (by prefix and number) that the ERP holds."""
        numbers = [n for n in self.model.customers if pick(n[0], int(n[2:]))]
        sets = ", ".join(f"{col} = %s" for col in values)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(
                f"UPDATE erp.customers SET {sets} WHERE customer_no = ANY(%s) RETURNING customer_no",  # noqa: S608
                (*values.values(), numbers),
            )
            # a CRM account the agent has not brought to the ERP yet cannot be edited there
            done = [r[0] for r in cur.fetchall()]
        self.model.erp_changes += len(done)
        for n in done:
            self.model.customers[n].update(values)

    def crm_insert(self, lo: int, hi: int) -> None:
        """Create accounts K-lo..K-hi in Salesforce (as a user would)."""
        for j in range(lo, hi + 1):
            status = ("Active", "On Hold")[j % 2]
            self.sf.insert(
                "Account",
                {
                    "Name": f"Crm {j}",
                    "AccountNumber": f"K-{j:04}",
                    "Phone": f"+44 20 {j}",
                    "Status__c": status,
                },
            )
            self.model.customers[f"K-{j:04}"] = {
                "name": f"Crm {j}",
                "phone": f"+44 20 {j}",
                "credit_limit": None,
                "status": STATUS_TO_ERP[status],
            }

    def crm_edit(self, pick: Pick, **values: Any) -> None:
        """Edit the Salesforce accounts ``pick`` chooses (values by canonical field name)."""
        columns = {"name": "Name", "phone": "Phone"}
        ids = self.account_ids()
        for n, expected in self.model.customers.items():
            # a user edits the accounts they can see (an unsynced ERP customer has none yet)
            if pick(n[0], int(n[2:])) and n in ids:
                self.sf.update("Account", ids[n], {columns[k]: v for k, v in values.items()})
                expected.update(values)

    def phase_one(self) -> None:
        """New records on both sides, some ERP rows updated before the agent ever saw them."""
        self.erp_insert(1, 250)
        self.erp_update(lambda k, n: n % 9 == 0, status="hold")
        self.crm_insert(1, 120)

    def phase_two(self) -> None:
        """Updates of synced records both ways (owned and shared fields), and more new records."""
        self.erp_insert(251, 310)
        self.erp_update(
            lambda k, n: k == "C" and n % 3 == 0, credit_limit=Decimal("1234.50"), status="archived"
        )
        self.erp_update(lambda k, n: k == "C" and n % 5 == 0 and n <= 250, phone="+1 999 0")
        self.erp_update(lambda k, n: k == "K" and n % 4 == 0, status="hold", credit_limit=Decimal("500.00"))
        self.crm_edit(lambda k, n: k == "C" and n % 2 == 0 and n <= 250, name="renamed in CRM")
        self.crm_edit(lambda k, n: k == "K" and n % 3 == 0, name="Crm v2")
        self.crm_edit(lambda k, n: k == "K" and n % 5 == 0, phone="+44 20 0")
        self.crm_insert(121, 140)

    # --- the end state ----------------------------------------------------------------------
    def assert_in_step(self) -> None:
        """Both systems hold exactly the model, linked one to one; state has nothing left over."""
        rows = self.rows()
        accounts = self.sf.all("Account")
        expected = self.model.customers
        assert not [a for a in accounts if a["IsDeleted"]]
        numbers = Counter(r[1] for r in rows)
        assert not [n for n, c in numbers.items() if c > 1], "duplicate ERP customer"
        assert sorted(numbers) == sorted(expected), "ERP customers differ from the workload"
        ext = Counter(a["ERP_Id__c"] for a in accounts)
        assert not [e for e, c in ext.items() if c > 1 or e is None], f"duplicate/unlinked accounts: {ext}"
        assert len(accounts) == len(rows), f"{len(accounts)} accounts for {len(rows)} ERP customers"
        by_id = {a["Id"]: a for a in accounts}
        wrong: list[tuple[Any, ...]] = []
        for erp_id, number, name, phone, credit, status, crm_id in rows:
            want = expected[number]
            acct = by_id.get(crm_id)
            if acct is None or acct["ERP_Id__c"] != str(erp_id):
                wrong.append((number, "link", crm_id, acct and acct["ERP_Id__c"]))
                continue
            erp_side = {"name": name, "phone": phone, "credit_limit": credit, "status": status}
            crm_credit = acct["Credit_Limit__c"]
            crm_side = {
                "name": acct["Name"],
                "phone": acct["Phone"],
                "credit_limit": None if crm_credit is None else Decimal(str(crm_credit)),
                "status": STATUS_TO_ERP.get(acct["Status__c"]),
            }
            if erp_side != want or crm_side != want or acct["AccountNumber"] != number:
                wrong.append((number, want, erp_side, crm_side))
        assert not wrong, f"{len(wrong)} records out of step, e.g. {wrong[:3]}"
        self.assert_state_clean()

    def assert_state_clean(self) -> None:
        """The journal has each ERP change once and no duplicate position; outbox and queue are empty."""
        code, text = self.cli("journal", "--json", "--limit", "100000")
        entries = json.loads(text)["entries"]
        positions = Counter((e["source"], e["position"]) for e in entries)
        assert not [p for p, c in positions.items() if c > 1], "a journal position repeats"
        erp_own = [e for e in entries if e["source"] == "erp" and e["origin"] is None]
        assert len(erp_own) == self.model.erp_changes, "an ERP change was lost or journaled twice"
        code, text = self.cli("status", "--json")
        snap = json.loads(text)
        assert all(v["pending"] == 0 for v in snap["outbox"].values()), snap["outbox"]
        assert snap["exceptions"]["open"] == 0, self.cli("exceptions", "list", "--json")[1]
        assert snap["resolver"]["backlog"] == 0
        st = open_state(load_config(self.cfg).agent.state_path, readonly=True)
        try:
            phantom = [
                (a.detail["field"], a.detail["new_value"])
                for a in audit.list_records(st, action="ownership_ignored", limit=100_000)
            ]
        finally:
            st.close()
        # The workload never edits a field in its non-owner: any such audit row is invented.
        assert not phantom, f"{len(phantom)} ownership_ignored audits of values equal to the owner's"


@pytest.fixture
def env(pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    for k, v in SF_ENV.items():
        monkeypatch.setenv(k, v)
    load_erp(pg_dsn)
    sf = KillingSalesforce()
    add_sf_fields(sf)
    with EmulatorServer(sf) as server:
        e = Env(pg_dsn, sync_config(tmp_path, pg_dsn, server.url), sf, tmp_path)
        assert e.cli("init")[0] == 0
        yield e


KILL_POINTS = [
    pytest.param("none", 1, id="uninterrupted"),
    pytest.param("erp_journaled", 1, id="after-erp-capture"),
    pytest.param("crm_journaled", 1, id="after-crm-capture"),
    pytest.param("resolving", 150, id="inside-resolve"),
    pytest.param("resolved", 1, id="after-resolve"),
    pytest.param("erp_applied", 1, id="erp-batch-applied-not-recorded"),
    pytest.param("crm_applied", 2, id="crm-batch-applied-not-recorded"),
]


@pytest.mark.parametrize(("point", "nth"), KILL_POINTS)
def test_sync_reaches_the_uninterrupted_end_state_when_killed(env: Env, point: str, nth: int) -> None:
    """SIGKILL at one point in each of two workload phases; restarts converge on the model."""
    env.phase_one()
    status = env.child(point, nth)
    assert status == (0 if point == "none" else -signal.SIGKILL), "the kill point was never reached"
    env.converge()
    env.assert_in_step()
    env.phase_two()
    status = env.child(point, nth)
    assert status == (0 if point == "none" else -signal.SIGKILL), "the kill point was never reached"
    env.converge()
    env.assert_in_step()


@pytest.mark.xfail(
    strict=False,
    reason="in a full run the mid-delivery kill point of this sequence is sometimes not reached (the "
    "child finishes cleanly); passes when run alone; under investigation",
)
def test_sync_reaches_the_end_state_when_killed_at_every_point_in_a_row(env: Env) -> None:
    """Kill after capture, inside resolve, after resolve and mid-delivery, with no clean cycle between."""
    env.phase_one()
    assert env.child("erp_journaled") == -signal.SIGKILL
    assert env.child("resolving", 100) == -signal.SIGKILL
    assert env.child("resolved") == -signal.SIGKILL
    assert env.child("erp_applied") == -signal.SIGKILL
    assert env.child("crm_applied", 1) == -signal.SIGKILL
    env.phase_two()
    assert env.child("crm_applied", 1) == -signal.SIGKILL
    assert env.child("crm_journaled") == -signal.SIGKILL
    assert env.child("erp_applied") == -signal.SIGKILL
    env.converge()
    env.assert_in_step()


def test_sync_links_both_ways_when_killed_after_salesforce_applied_a_create(env: Env) -> None:
    """The smallest case of "applied but not recorded": three new ERP customers, one Collections write.

    On restart the CRM poll sees the new Accounts (their ERP_Id__c names the ERP rows) before
    the replayed upsert is recorded; the ERP must still get each Account's id in crm_id, and
    the audit must not claim that Salesforce edited ERP-owned fields.
    """
    env.erp_insert(1, 3)
    assert env.child("crm_applied", 1) == -signal.SIGKILL
    assert len(env.sf.all("Account")) == 3, "the write was applied before the kill"
    env.converge()
    env.assert_in_step()


def test_sync_keeps_an_erp_edit_made_after_a_crm_create_was_applied_but_not_recorded(env: Env) -> None:
    """A replayed create must not undo what the owner changed since it was first applied.

    An Account becomes an ERP row; the agent dies after the ERP committed it. Before the
    restart an ERP user archives the customer (status is ERP-owned). The restarted agent
    replays the create, an upsert by crm_id carrying the Account's first values.
    """
    env.crm_insert(1, 1)  # status On Hold
    assert env.child("erp_applied", 1) == -signal.SIGKILL
    env.erp_update(lambda k, n: k == "K", status="archived")
    assert env.model.customers["K-0001"]["status"] == "archived", "the ERP row exists before the restart"
    env.converge()
    ((status,),) = (
        psycopg.connect(env.dsn, autocommit=True)
        .execute("SELECT status FROM erp.customers WHERE customer_no = 'K-0001'")
        .fetchall()
    )
    crm_status = env.sf.all("Account")[0]["Status__c"]
    assert (status, crm_status) == ("archived", "Inactive"), (
        f"ERP status {status!r}, Salesforce {crm_status!r}: the replayed create overwrote the ERP"
        " owner's newer edit with the Account's first values"
    )


def test_sync_keeps_a_crm_edit_made_after_an_erp_create_was_applied_but_not_recorded(env: Env) -> None:
    """The same on the Salesforce side: a rename (CRM-owned) made while the create was unrecorded."""
    env.erp_insert(1, 1)
    assert env.child("crm_applied", 1) == -signal.SIGKILL
    env.crm_edit(lambda k, n: True, name="renamed in CRM")
    assert env.model.customers["C-0001"]["name"] == "renamed in CRM", "the Account exists before the restart"
    env.converge()
    ((name,),) = (
        psycopg.connect(env.dsn, autocommit=True)
        .execute("SELECT name FROM erp.customers WHERE customer_no = 'C-0001'")
        .fetchall()
    )
    crm_name = env.sf.all("Account")[0]["Name"]
    assert (name, crm_name) == ("renamed in CRM", "renamed in CRM"), (
        f"ERP name {name!r}, Salesforce {crm_name!r}: the replayed create overwrote the CRM"
        " owner's newer edit"
    )


# --- throttling and expired sessions, under the daemon ----------------------------------------


def daemon_config(cfg: Path) -> Path:
    """The sync config with short poll and resolve intervals, for a daemon under test."""
    text = cfg.read_text()
    text = text.replace("retry_cap_seconds = 0.05", "retry_cap_seconds = 0.2\nresolve_interval = 0.2")
    text = text.replace('type = "postgres"', 'type = "postgres"\npoll_interval = 0.2')
    text = text.replace('type = "salesforce"', 'type = "salesforce"\npoll_interval = 0.3')
    cfg.write_text(text)
    return cfg


def syncagent_argv() -> list[str]:
    """The installed ``syncagent`` script of this interpreter's environment."""
    script = Path(sys.executable).parent / "syncagent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent.cli"]


def wait_for(what: str, check: Any, timeout: float = 30.0, every: float = 0.1) -> None:
    """Poll ``check()`` until it is true, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def start_daemon(cfg: Path, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """Start ``syncagent run``; stderr goes to ``log`` (faulthandler on, so a hang can be dumped)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [*syncagent_argv(), "-c", str(cfg), "run"],
            stdout=subprocess.DEVNULL,
            stderr=out,
            env={**os.environ, **SF_ENV, "PYTHONFAULTHANDLER": "1", **env},
        )


def stop_daemon(proc: subprocess.Popen[bytes], log: Path, timeout: float = 10.0) -> float:
    """SIGTERM the daemon; it must exit 0 within ``timeout`` s. Return how long it took.

    A daemon that hangs gets SIGABRT, so faulthandler writes every thread's stack to the log,
    which the failure message quotes.
    """
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        proc.wait(timeout=10)
        raise AssertionError(f"no exit {timeout}s after SIGTERM:\n{log.read_text()[-6000:]}") from None
    assert code == 0, f"exit {code} after SIGTERM:\n{log.read_text()[-3000:]}"
    return time.monotonic() - started


def wait_in_step(env: Env, timeout: float) -> None:
    """Wait until both systems hold the model (the daemon works meanwhile); else fail saying why."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            env.assert_in_step()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def test_sync_waits_while_salesforce_throttles_and_sessions_expire_then_resumes(
    pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """403 REQUEST_LIMIT_EXCEEDED for a while, then sessions that expire every second: no loss."""
    for k, v in SF_ENV.items():
        monkeypatch.setenv(k, v)
    load_erp(pg_dsn)
    sf = KillingSalesforce(token_lifetime=timedelta(seconds=1))
    add_sf_fields(sf)
    log = tmp_path / "daemon.log"
    with EmulatorServer(sf) as server:
        env = Env(pg_dsn, daemon_config(sync_config(tmp_path, pg_dsn, server.url)), sf, tmp_path)
        assert env.cli("init")[0] == 0
        env.phase_one()
        sf.throttle_next(1_000_000)
        proc = start_daemon(env.cfg, log)
        try:
            wait_for("throttled calls", lambda: len(sf.requests()) >= 5)
            env.erp_insert(311, 330)
            wait_for(
                "the ERP capture during the throttle",
                lambda: journal_count(env, "erp") >= env.model.erp_changes,
            )
            code, text = env.cli("status", "--json")
            crm = [s for s in json.loads(text)["streams"] if s["connector"] == "crm"]
            assert code == 1 and crm and all(s["state"] == "error" for s in crm), crm
            assert "REQUEST_LIMIT_EXCEEDED" in json.dumps(crm)
            assert not [a for a in sf.all("Account") if a["ERP_Id__c"]], "a write got through the throttle"
            sf.clear_faults()
            wait_in_step(env, 60)
            tokens = sf.tokens_issued
            env.phase_two()
            wait_in_step(env, 60)
            wait_for("sessions expiring and renewed", lambda: sf.tokens_issued >= tokens + 2, 10)
        finally:
            stop_daemon(proc, log)
        statuses = Counter(r.status for r in sf.requests(path_prefix="/services/data/v"))
        assert statuses[403] > 0 and statuses[401] > 0, statuses
        env.assert_in_step()


def journal_count(env: Env, source: str) -> int:
    """Journal rows from ``source``, as ``status --json`` reports them while the daemon runs."""
    code, text = env.cli("status", "--json")
    snap = json.loads(text)
    assert "journal" in snap, f"status failed while the agent runs (exit {code}): {text}"
    return int(snap["journal"].get(source, {}).get("count", 0))


def test_sync_reaches_the_end_state_when_the_daemon_is_sigkilled_again_and_again(
    pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``syncagent run`` SIGKILLed as soon as the state file shows progress, restarted each time."""
    for k, v in SF_ENV.items():
        monkeypatch.setenv(k, v)
    load_erp(pg_dsn)
    sf = KillingSalesforce()
    add_sf_fields(sf)
    log = tmp_path / "daemon.log"
    with EmulatorServer(sf) as server:
        env = Env(pg_dsn, daemon_config(sync_config(tmp_path, pg_dsn, server.url)), sf, tmp_path)
        assert env.cli("init")[0] == 0
        env.phase_one()
        linked = lambda: len([r for r in env.rows() if r[6]])  # noqa: E731
        marks: list[tuple[str, Callable[[], bool]]] = [
            ("the first journaled batch", lambda: journal_count(env, "erp") > 0),
            ("accounts arriving in Salesforce", lambda: len(sf.all("Account")) >= 100),
            ("ids written back to the ERP", lambda: linked() >= 50),
        ]
        for what, mark in marks:
            proc = start_daemon(env.cfg, log)
            try:
                wait_for(what, mark, timeout=30, every=0.02)
            finally:
                proc.kill()
                assert proc.wait(timeout=10) == -signal.SIGKILL
        erp_seen = journal_count(env, "erp")
        env.phase_two()
        proc = start_daemon(env.cfg, log)
        try:
            wait_for("phase two captured", lambda: journal_count(env, "erp") > erp_seen, 30, every=0.02)
        finally:
            proc.kill()
            proc.wait(timeout=10)
        proc = start_daemon(env.cfg, log)
        try:
            wait_in_step(env, 60)
        finally:
            stop_daemon(proc, log)
        # The in-step check can pass while the echoes of the last writes are still being read;
        # a clean stop leaves them journaled for the next start, which finds nothing to do.
        assert env.converge() <= 3
        env.assert_in_step()
