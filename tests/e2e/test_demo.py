"""``syncagent demo``: the whole narrated tour against its own throwaway PostgreSQL and emulator."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import cli

pytestmark = [pytest.mark.pg, pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _demo_root(text: str) -> Path:
    found = re.search(r"agent log (\S+)/agent\.log", text)
    assert found, text
    return Path(found.group(1))


def test_demo_narrates_every_workflow_and_removes_everything_when_it_ends() -> None:
    res = CliRunner().invoke(cli, ["demo"], catch_exceptions=False)
    out = res.stdout
    assert res.exit_code == 0, out
    for expected in (
        "Closed Won",
        "ERP, ",  # the project appeared
        "Salesforce: ERP project id 1, delivery status 'setup'",
        "41.67 % complete, delivery status 'in_progress'",
        "contract now version 2 at 55,000.00",
        "48,000.00 -> 55,000.00, approved by Dana Lee",
        "missing_tax_code: tax code DE-VAT7 is not in erp (erp.tax_codes) (waiting for tax_code:DE-VAT7)",
        "0 contracts for it; nothing half-created",
        "exception #1 resolved by the agent",
        "$ syncagent status",
        "syncagent HEALTHY",
        "$ syncagent workflows",
        "syncagent demo --keep",
        "demo removed",
    ):
        assert expected in out, f"missing {expected!r} in:\n{out}"
    assert not _demo_root(out).exists(), "the demo left its folder behind"


def test_demo_keep_stays_up_for_exploration_and_cleans_up_on_ctrl_c() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "demo", "--keep"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops it" in line:
                break
        text = "".join(lines)
        assert "Ctrl-C stops it" in text, text
        root = _demo_root(text)
        cfg = root / "config.toml"
        status = subprocess.run(
            [sys.executable, "-m", "agent.cli", "-c", str(cfg), "workflows", "--json"],
            cwd=ROOT,
            env={
                **env,
                "SYNCAGENT_DEMO_SF_CLIENT_ID": "syncagent",
                "SYNCAGENT_DEMO_SF_CLIENT_SECRET": "s3cret",
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0 and '"closed_won"' in status.stdout, status.stdout + status.stderr
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, rest
    assert "demo removed" in rest and not root.exists()
