"""The running service: live config reload (file edit and SIGHUP) and the metrics endpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
import pytest
from click.testing import CliRunner

from agent.cli import cli
from agent.localpg import free_port
from tests.erp import erp_only_config, load_erp

pytestmark = [pytest.mark.pg, pytest.mark.e2e]


def wait_for(pred, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def service(pg_dsn: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    load_erp(pg_dsn)
    port = free_port()
    cfg = erp_only_config(tmp_path, pg_dsn, extra="")
    cfg.write_text(
        cfg.read_text()
        .replace(
            "[agent]\n", f'[metrics]\nlisten = "127.0.0.1:{port}"\n\n[agent]\nresolve_interval = 0.5\n', 1
        )
        .replace('origin = "', 'poll_interval = 0.5\norigin = "', 1)
    )
    assert CliRunner().invoke(cli, ["-c", str(cfg), "init"]).exit_code == 0
    log = (tmp_path / "agent.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "-c", str(cfg), "--log-format", "json", "run"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        yield proc, cfg, port, tmp_path / "agent.log", pg_dsn
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        log.close()


def test_service_serves_prometheus_metrics_on_loopback(service) -> None:  # type: ignore[no-untyped-def]
    proc, cfg, port, log, dsn = service
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO erp.customers (name) VALUES ('m1'), ('m2')")

    def scraped() -> str:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
        except httpx.HTTPError:
            return ""

    assert wait_for(
        lambda: 'syncagent_changes_captured_total{connector="erp",stream="wal"} 2' in scraped()
    ), scraped()[:2000]
    assert "syncagent_resolver_backlog" in scraped()
    assert 'syncagent_journal_fate_total{fate="noop"} 2' in scraped()


def test_service_rejects_a_broken_config_edit_and_keeps_running(service) -> None:  # type: ignore[no-untyped-def]
    proc, cfg, port, log, dsn = service
    good = cfg.read_text()
    assert wait_for(lambda: "agent_started" in log.read_text())
    cfg.write_text(good.replace('owner = "erp", erp = "name"', 'owner = "nobody", erp = "name"'))
    assert wait_for(lambda: "config_rejected" in log.read_text())
    assert "entities.customer.fields.name.owner" in log.read_text()
    assert proc.poll() is None
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO erp.customers (name) VALUES ('still running')")
    res = lambda: CliRunner().invoke(cli, ["-c", str(cfg.with_name("good.toml")), "journal", "--json"])  # noqa: E731
    cfg.with_name("good.toml").write_text(good)
    assert wait_for(lambda: '"still running"' in res().stdout)


def test_service_reloads_a_valid_edit_and_on_sighup(service) -> None:  # type: ignore[no-untyped-def]
    proc, cfg, port, log, dsn = service
    assert wait_for(lambda: "agent_started" in log.read_text())
    cfg.write_text(cfg.read_text().replace("resolve_interval = 0.5", "resolve_interval = 0.7"))
    assert wait_for(lambda: "config_reloaded" in log.read_text())
    proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "reload_requested" in log.read_text())
    time.sleep(0.5)
    assert proc.poll() is None, "SIGHUP must not stop the agent"
