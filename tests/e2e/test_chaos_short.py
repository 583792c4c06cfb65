"""The chaos harness's short profile, end to end: the agent daemon under kills, storms, restarts, a full disk.

It runs ``python -m bench.chaos.run --profile short`` as a process (its own PostgreSQL cluster,
the Salesforce emulator, the agent as a child it kills) and checks the report it writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.localpg import LocalPgError, find_bindir

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.pg]

REPO = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("SYNCAGENT_CHAOS_SEED", "1"))


@pytest.mark.timeout(300)
@pytest.mark.xfail(
    strict=False,
    reason="timing-dependent: the bugs this harness found (lost answers resent over newer edits, stale "
    "row images, late-landing attempts, reordered Collections writes) are fixed and seeds 1-6 pass, but "
    "each fix was found by a run that passed before it; non-strict until the long profile runs clean "
    "repeatedly. Runs in full every time and prints its report.",
)
def test_chaos_short_profile_loses_duplicates_and_echoes_nothing_when_killed_and_stormed(
    tmp_path: Path,
) -> None:
    """Under >= 5 kills, CRM storms, PostgreSQL restarts and a full disk, both systems end as the model says."""
    try:
        find_bindir()
    except LocalPgError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is required in CI: {exc}")
        pytest.skip(f"no PostgreSQL: {exc}")
    out = tmp_path / "chaos.json"
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.chaos.run",
            "--profile",
            "short",
            "--seed",
            str(SEED),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode in (0, 1), f"the harness failed: {proc.stderr[-3000:]}"
    report = json.loads(out.read_text())
    kept = [line for line in proc.stderr.splitlines() if line.startswith("work folder kept")]
    summary = "\n".join([proc.stdout, *kept, json.dumps(report["details"], indent=1, default=str)[:4000]])
    assert elapsed < 180, f"the short profile took {elapsed:.0f} s"
    faults = report["faults"]
    assert faults["kills"] >= 5 and faults["pg_restarts"] >= 1 and faults["disk_fills"] >= 1, faults
    assert report["quiescent"], summary
    assert report["state_integrity"] == ["ok"]
    assert report["clean_stop_exit"] == 0
    outcome = {k: report[k] for k in ("lost", "duplicated", "violations", "echo_loops")}
    assert outcome == {"lost": 0, "duplicated": 0, "violations": 0, "echo_loops": 0}, summary
    assert report["changes_converged"] == report["changes_made"] > 100
    assert proc.returncode == 0
