"""The daemon as systemd runs it: ``syncagent run`` as a process, sd_notify, SIGTERM, bad setups.

The test listens on an AF_UNIX datagram socket and passes it as ``NOTIFY_SOCKET``, the way
systemd does for a ``Type=notify`` unit, then checks READY, WATCHDOG and STOPPING, the exit
status after SIGTERM (also in the middle of a large backlog), a connector that stops on a
wrong secret while the others keep running, and exit status 2 for a bad config.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from agent.cli import cli
from agent.config import load_config
from agent.pipeline import ROW_FORMATS
from connectors.emulator import EmulatorServer
from connectors.salesforce.emulator import SalesforceEmulator
from state import journal, open_state, outbox
from tests.erp import add_sf_fields, erp_only_config, load_erp, sync_config

pytestmark = [pytest.mark.pg, pytest.mark.e2e]

SF_ENV = {"SF_CLIENT_ID": "syncagent", "SF_CLIENT_SECRET": "s3cret"}


# --- helpers: the notify socket and the daemon process --------------------------------------


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket collecting sd_notify messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, timeout: float, value: str | None = None) -> dict[str, str]:
        """Return the first message (received now or before) carrying ``key`` (=``value``)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for m in self.messages[seen:]:
                if key in m and (value is None or m[key] == value):
                    return m
            seen = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key} notification within {timeout}s; got {self.messages}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append(
                dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            )

    def count(self, key: str) -> int:
        """How many messages so far carried ``key``."""
        return sum(1 for m in self.messages if key in m)

    def drain(self, seconds: float) -> None:
        """Collect whatever arrives during ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            self.messages.append(
                dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            )

    def close(self) -> None:
        """Close and remove the socket."""
        self.sock.close()
        self.path.unlink(missing_ok=True)


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    # sun_path holds 107 bytes; pytest's tmp_path for a long test name can be longer.
    folder = tmp_path if len(str(tmp_path)) < 90 else Path(tempfile.mkdtemp(prefix="sdn"))
    ns = NotifySocket(folder / "notify.sock")
    yield ns
    ns.close()
    if folder != tmp_path:
        folder.rmdir()


def syncagent_argv() -> list[str]:
    """The installed ``syncagent`` script of this interpreter's environment."""
    script = Path(sys.executable).parent / "syncagent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent.cli"]


def start(cfg: Path, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """Start ``syncagent run``; stderr to ``log``, faulthandler on so a hang can be dumped."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [*syncagent_argv(), "-c", str(cfg), "run"],
            stdout=subprocess.DEVNULL,
            stderr=out,
            env={**os.environ, **SF_ENV, "PYTHONFAULTHANDLER": "1", **env},
        )


def sigterm(proc: subprocess.Popen[bytes], log: Path, timeout: float = 5.0) -> tuple[float, str | None]:
    """SIGTERM the daemon; return the seconds until it exited and what went wrong, if anything.

    A daemon still running after ``timeout`` gets SIGABRT, so faulthandler writes every
    thread's stack to the log; the problem text quotes them.
    """
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        proc.wait(timeout=10)
        text = log.read_text()
        dump = text[text.rfind("Fatal Python error") :][:5000]
        return time.monotonic() - started, f"no exit within {timeout}s of SIGTERM; thread stacks:\n{dump}"
    took = time.monotonic() - started
    if code != 0:
        return took, f"exit status {code} after SIGTERM (0 expected):\n{log.read_text()[-3000:]}"
    return took, None


def stop(proc: subprocess.Popen[bytes], log: Path, timeout: float = 5.0) -> float:
    """SIGTERM the daemon; it must exit 0 within ``timeout`` s. Return the seconds it took."""
    took, problem = sigterm(proc, log, timeout)
    assert problem is None, problem
    return took


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the daemon (where a clean stop is not what the test is about)."""
    proc.kill()
    proc.wait(timeout=10)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30.0, every: float = 0.1) -> None:
    """Poll ``check()`` until it is true, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def fast(cfg: Path, *, batch: int | None = None) -> Path:
    """Short poll and resolve intervals (and optionally small batches) for a daemon under test."""
    text = cfg.read_text().replace("[agent]\n", "[agent]\nresolve_interval = 0.2\n", 1)
    if batch:
        text = text.replace("[agent]\n", f"[agent]\nresolve_batch = {batch}\n", 1)
        text = text.replace('type = "postgres"', f'type = "postgres"\nchunk_rows = {batch}', 1)
    text = text.replace('type = "postgres"', 'type = "postgres"\npoll_interval = 0.2', 1)
    text = text.replace('type = "salesforce"', 'type = "salesforce"\npoll_interval = 0.3', 1)
    cfg.write_text(text)
    return cfg


@dataclass
class Agent:
    """One ERP database, a Salesforce emulator server and a config for them."""

    dsn: str
    cfg: Path
    sf: SalesforceEmulator
    log: Path

    def cli(self, *args: str) -> tuple[int, str]:
        res = CliRunner().invoke(cli, ["-c", str(self.cfg), *args])
        return res.exit_code, res.stdout

    def sql(self, query: str) -> int:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(query).rowcount

    def journaled(self, source: str = "erp", *, own: bool = False) -> int:
        """Journal rows from ``source`` (``own``: only changes not written by the agent)."""
        st = open_state(load_config(self.cfg).agent.state_path, readonly=True)
        try:
            if not own:
                return journal.stats(st).get(source, journal.JournalStats(0, 0, None)).count
            rows = journal.list_entries(st, limit=1_000_000, source=source, formats=ROW_FORMATS)
            return sum(1 for r in rows if r.entry.change.origin is None)
        finally:
            st.close()

    def pending(self) -> int:
        """Ops waiting in the outbox, all targets."""
        st = open_state(load_config(self.cfg).agent.state_path, readonly=True)
        try:
            return sum(d.pending for d in outbox.depth(st).values())
        finally:
            st.close()

    def status(self) -> tuple[int, dict]:
        code, text = self.cli("status", "--json")
        return code, json.loads(text)


@pytest.fixture
def agent(pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Agent]:
    for k, v in SF_ENV.items():
        monkeypatch.setenv(k, v)
    load_erp(pg_dsn)
    sf = SalesforceEmulator()
    add_sf_fields(sf)
    with EmulatorServer(sf) as server:
        cfg = fast(sync_config(tmp_path, pg_dsn, server.url))
        a = Agent(pg_dsn, cfg, sf, tmp_path / "daemon.log")
        assert a.cli("init")[0] == 0
        yield a


# --- sd_notify and SIGTERM ---------------------------------------------------------------------


def test_daemon_notifies_ready_watchdog_and_stopping_when_run_under_a_notify_socket(
    agent: Agent, notify: NotifySocket
) -> None:
    proc = start(agent.cfg, agent.log, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="2000000")
    try:
        ready = notify.wait_for("READY", timeout=15, value="1")
        assert ready.get("MAINPID") == str(proc.pid)
        first = time.monotonic()
        notify.wait_for("WATCHDOG", timeout=3, value="1")
        notify.drain(2.2)
        # WATCHDOG_USEC=2 s: a ping every second (half the timeout), never a gap of 2 s
        assert notify.count("WATCHDOG") >= 2, notify.messages
        assert time.monotonic() - first < 6
        agent.sql("INSERT INTO erp.customers (customer_no, name) VALUES ('C-1', 'Acme')")
        wait_for("the customer in Salesforce", lambda: len(agent.sf.all("Account")) == 1)
    finally:
        took = stop(proc, agent.log)
    notify.wait_for("STOPPING", timeout=1, value="1")
    assert took < 5
    assert "event=agent_stopped" in agent.log.read_text()


def test_daemon_sends_no_watchdog_pings_when_watchdog_usec_is_unset(
    agent: Agent, notify: NotifySocket
) -> None:
    proc = start(agent.cfg, agent.log, NOTIFY_SOCKET=str(notify.path))
    try:
        notify.wait_for("READY", timeout=15, value="1")
        notify.drain(1.5)
    finally:
        stop(proc, agent.log)
    assert notify.count("WATCHDOG") == 0, notify.messages


def test_daemon_stops_cleanly_and_loses_nothing_when_sigterm_arrives_mid_capture(
    pg_dsn: str, tmp_path: Path
) -> None:
    """A 60,000-row ERP backlog captured 500 rows a batch: SIGTERM ends it after the batch in flight."""
    load_erp(pg_dsn)
    cfg = fast(erp_only_config(tmp_path, pg_dsn), batch=500)
    assert CliRunner().invoke(cli, ["-c", str(cfg), "init"]).exit_code == 0
    total = 60_000
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for lo in range(1, total, 10_000):
            conn.execute(
                "INSERT INTO erp.customers (customer_no, name) SELECT 'C-' || g, 'N' || g"
                f" FROM generate_series({lo}, {lo + 9_999}) g"
            )
    a = Agent(pg_dsn, cfg, SalesforceEmulator(), tmp_path / "daemon.log")
    proc = start(cfg, a.log)
    try:
        wait_for("the first journaled batch", lambda: a.journaled() > 0, timeout=20, every=0.02)
    finally:
        took, hung = sigterm(proc, a.log)
    at_stop = a.journaled()
    proc = start(cfg, a.log)
    try:
        wait_for("the whole backlog journaled", lambda: a.journaled() >= total, timeout=60, every=0.2)
    finally:
        kill(proc)
    entries = a.cli("journal", "--json", "--limit", "100000")[1]
    positions = [e["position"] for e in json.loads(entries)["entries"]]
    assert len(positions) == total and len(set(positions)) == total, "a change was lost or journaled twice"
    # nothing was lost; now the clean stop itself
    assert hung is None, hung
    assert at_stop < total, (
        f"SIGTERM waited for the whole {total}-row backlog instead of the batch in flight"
        " (capture does not look at the stop flag between batches)"
    )
    assert took < 3, f"{took:.1f}s from SIGTERM to exit"


def test_daemon_delivers_everything_once_when_sigterm_arrives_mid_delivery(agent: Agent) -> None:
    """SIGTERM while 3,000 new ERP customers go to Salesforce; a restart delivers the rest, once."""
    total = 3_000
    agent.sql(
        "INSERT INTO erp.customers (customer_no, name) SELECT 'C-' || g, 'N' || g"
        f" FROM generate_series(1, {total}) g"
    )
    proc = start(agent.cfg, agent.log)
    try:
        wait_for(
            "the first delivered batch", lambda: len(agent.sf.all("Account")) > 0, timeout=20, every=0.02
        )
        code, snap = agent.status()  # status reads the state file while the agent writes it
        assert "outbox" in snap, snap
    finally:
        took, hung = sigterm(proc, agent.log)
    proc = start(agent.cfg, agent.log)
    try:
        wait_for(
            "every customer linked",
            lambda: agent.sql("SELECT 1 FROM erp.customers WHERE crm_id IS NOT NULL") == total,
            90,
            0.3,
        )
        wait_for("an empty outbox", lambda: agent.pending() == 0, 30)
    finally:
        kill(proc)
    accounts = agent.sf.all("Account")
    counts = Counter(a["ERP_Id__c"] for a in accounts)
    assert len(accounts) == total and len(counts) == total, "a customer reached Salesforce twice"
    assert agent.journaled(own=True) == total, "an ERP change was lost or journaled twice"
    # nothing was lost; now the clean stop itself
    assert hung is None, hung
    assert took < 5, f"{took:.1f}s from SIGTERM to exit"


def test_daemon_status_answers_while_the_agent_works_through_a_backlog(agent: Agent) -> None:
    agent.sql(
        "INSERT INTO erp.customers (customer_no, name) SELECT 'C-' || g, 'N' || g FROM generate_series(1, 1500) g"
    )
    proc = start(agent.cfg, agent.log)
    failures = []
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            code, text = agent.cli("status", "--json")
            snap = json.loads(text)
            if "streams" not in snap:
                failures.append(snap)
    finally:
        kill(proc)
    assert not failures, failures[:3]


# --- a connector that cannot work, and a config that cannot load -------------------------------


def test_daemon_stops_the_crm_jobs_and_keeps_capturing_the_erp_when_the_salesforce_secret_is_wrong(
    agent: Agent,
) -> None:
    proc = start(agent.cfg, agent.log, SF_CLIENT_SECRET="not-the-secret")
    try:

        def crm_stopped() -> bool:
            _code, snap = agent.status()
            return any(s["connector"] == "crm" and s["state"] == "stopped" for s in snap.get("streams", []))

        wait_for("systems.crm to be stopped", crm_stopped, timeout=20, every=0.2)
        tokens_tried = len(agent.sf.requests(path_prefix="/services/oauth2/token"))
        agent.sql("INSERT INTO erp.customers (customer_no, name) VALUES ('C-1', 'Acme'), ('C-2', 'Globex')")
        wait_for("the ERP capture to keep running", lambda: agent.journaled() >= 2, timeout=10)
        time.sleep(1.0)  # several crm poll intervals: a stopped connector must not retry
        again = len(agent.sf.requests(path_prefix="/services/oauth2/token")) - tokens_tried
        assert again == 0, (
            f"systems.crm was stopped, yet asked for a token {again} more time(s) with the wrong secret:"
            " a stopped connector's paused jobs were woken again"
        )
        code, snap = agent.status()
        plain_code, plain = agent.cli("status")
    finally:
        stop(proc, agent.log)
    assert code == 1 and plain_code == 1
    crm = [s for s in snap["streams"] if s["connector"] == "crm"]
    erp = [s for s in snap["streams"] if s["connector"] == "erp"]
    assert crm and all(s["state"] == "stopped" and "systems.crm" in s["fix"] for s in crm), crm
    assert "check" in crm[0]["fix"] and "restart" in crm[0]["fix"]
    assert erp and all(s["healthy"] for s in erp), erp
    assert snap["outbox"]["crm"]["pending"] == 2, "the ERP changes wait for the CRM"
    assert "systems.crm" in plain
    assert agent.sf.all("Account") == []


BAD_CONFIGS = [
    pytest.param('instance_url = "', 'instance_ur = "', "systems.crm.instance_ur", id="unknown-key"),
    pytest.param("poll_interval = 0.3", "poll_interval = -1", "systems.crm.poll_interval", id="bad-value"),
    pytest.param(
        '{env = "SF_CLIENT_SECRET"}',
        '{env = "NO_SUCH_VARIABLE"}',
        "systems.crm.client_secret",
        id="missing-secret",
    ),
    pytest.param(
        "[entities.customer.fields]\n",
        '[entities.customer.fields]\ncolor = {owner = "nobody", erp = "color"}\n',
        "entities.customer.fields.color",
        id="unknown-owner",
    ),
]


@pytest.mark.parametrize(("old", "new", "key"), BAD_CONFIGS)
def test_daemon_exits_2_naming_the_key_when_the_config_is_bad(
    agent: Agent, notify: NotifySocket, old: str, new: str, key: str
) -> None:
    text = agent.cfg.read_text()
    assert old in text
    agent.cfg.write_text(text.replace(old, new, 1))
    proc = start(agent.cfg, agent.log, NOTIFY_SOCKET=str(notify.path))
    assert proc.wait(timeout=20) == 2, "RestartPreventExitStatus=2 relies on exit status 2"
    err = agent.log.read_text()
    assert key in err, err
    notify.drain(0.1)
    assert notify.count("READY") == 0, "a bad config must not report READY"
