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

import argparse
import faulthandler
import json
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench.chaos.harness import Harness
from bench.chaos.model import Verdict, compare, summarize_mismatches
from bench.chaos.profiles import FAULT_KINDS, PROFILES, Profile

OUT = Path(__file__).resolve().parents[1] / "out" / "chaos.json"


def run(
    profile: Profile, seed: int, *, disk_mode: str, keep: bool, faults: frozenset[str] = FAULT_KINDS
) -> dict[str, Any]:
    """Run one chaos profile; return the report."""
    work = Path(tempfile.mkdtemp(prefix="syncagent-chaos-"))
    h = Harness(profile, seed, disk_mode=disk_mode, work=work, faults=faults)
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
            "enabled": sorted(h.faults),
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
    ap.add_argument(
        "--faults",
        default=",".join(sorted(FAULT_KINDS)),
        help="Comma-separated subset of kill,storm,pg,disk; 'none' for a fault-free control run.",
    )
    args = ap.parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 <pid> prints every thread's stack

    def _terminate(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through the teardown: unmount, stop PostgreSQL

    signal.signal(signal.SIGTERM, _terminate)
    faults = frozenset() if args.faults == "none" else frozenset(args.faults.split(","))
    if not faults <= FAULT_KINDS:
        ap.error(f"--faults takes a subset of {','.join(sorted(FAULT_KINDS))} or 'none'")
    profile = PROFILES[args.profile]
    if args.minutes is not None:
        profile = replace(profile, chaos_seconds=args.minutes * 60)
    try:
        report = run(profile, args.seed, disk_mode=args.disk, keep=args.keep, faults=faults)
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
