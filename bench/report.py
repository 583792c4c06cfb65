"""Run every benchmark and write bench/RESULTS.md: each figure, its baseline, the ratio, the machine.

    .venv/bin/python -m bench.report [--quick]

Runs, one after the other and each as its own process: the capture benchmark (agent vs
pg_recvlogical on the same WAL), the sync benchmark (ERP <-> Salesforce emulator), the
closed-won latency benchmark and the short chaos profile. Each writes its JSON to
bench/out/; this script reads those files back and renders the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
RESULTS = ROOT / "bench" / "RESULTS.md"


def run(module: str, *args: str) -> tuple[int, float]:
    """Run ``python -m module args``; return its exit code and wall time."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc.returncode, time.monotonic() - started


def load(name: str) -> Any:
    """A benchmark's JSON output, or None if it did not write one."""
    path = OUT / name
    return json.loads(path.read_text()) if path.exists() else None


def machine() -> str:
    """Cores, memory and the commit the figures belong to."""
    mem_kb = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), 0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    return (f"{os.cpu_count()} cores, {mem_kb / 2**20:.0f} GiB memory, {platform.python_implementation()} "
            f"{platform.python_version()}, commit {commit or '?'}")


def _dig(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def render(runs: dict[str, tuple[int, float]], quick: bool) -> str:
    """The RESULTS.md text from the benchmarks' JSON files."""
    how = ("run now by `python -m bench.report`" if runs else
           "rendered by `python -m bench.report --render-only` from the last runs' JSON in bench/out/ "
           "(each made on this machine kind earlier; a fresh `python -m bench.report` replaces them)")
    lines = ["# Benchmark results", "",
             f"Machine: {machine()}. Profile: {'quick' if quick else 'full'}; {how}. Every agent figure "
             "sits beside a baseline measured in the same run.", ""]
    cap = load("capture.json")
    lines += ["## Capture (bench/capture): agent vs pg_recvlogical on the same WAL", "",
              "| workload | changes | agent changes/s | pg_recvlogical changes/s | ratio | target | agent peak RSS |"
              " journal = stream |", "|---|---|---|---|---|---|---|---|"]
    for name, row in (_dig(cap, "results") or {}).items():
        target = (f">= {row['target_ratio']}x" if row.get("target_ratio") else
                  f"RSS < {row['target_rss_mib']:.0f} MiB" if row.get("target_rss_mib") else "-")
        lines.append(f"| {name} | {_num(row.get('stream_changes'))} | {_num(_dig(row, 'agent', 'changes_per_s'))} | "
                     f"{_num(_dig(row, 'recvlogical', 'changes_per_s'))} | {_ratio(row.get('ratio'))} | {target} | "
                     f"{_num(_dig(row, 'agent', 'max_rss_mib'))} MiB | {row.get('journal_matches_stream')} |")
    syn = load("sync.json")
    lines += ["", "## Sync (bench/sync): ERP <-> Salesforce emulator", "",
              "| direction | records | records/s | without emulator time | Salesforce API calls per 1,000 (target <= 8) |",
              "|---|---|---|---|---|"]
    for name, row in (_dig(syn, "results") or {}).items():
        lines.append(f"| {name} | {_num(row.get('records'))} | {_num(row.get('records_per_s'))} | "
                     f"{_num(row.get('records_per_s_without_emulator'))} | {_num(row.get('api_calls_per_1000'))} |")
    if syn:
        lines.append(f"\nEnd state in step: {_dig(syn, 'end_state', 'ok')}.")
    lat = load("latency.json")
    cw = _dig(lat, "closed_won_to_erp_project_s") or {}
    lines += ["", "## Closed-won latency (bench/latency): CRM closed-won -> ERP project committed", "",
              "| deals | poll interval | p50 | p95 (target < 3 s) | max |", "|---|---|---|---|---|",
              f"| {_dig(lat, 'measured') or '-'} | {_dig(lat, 'poll_interval_s') or '-'} s | {_num(cw.get('p50'))} s | "
              f"{_num(cw.get('p95'))} s | {_num(cw.get('max'))} s |"]
    for title, name in (("short profile", "chaos.json"), ("long profile", "chaos-long.json")):
        lines += _chaos(title, load(name))
    lines += ["", "The long profile (10+ minutes) is not run by `bench.report`: its row is the last "
              "`python -m bench.chaos.run --profile long --out bench/out/chaos-long.json`, which may "
              "predate the current commit."]
    return _runs(lines, runs)


def _chaos(title: str, chaos: Any) -> list[str]:
    lines = ["", f"## Chaos, {title} (bench/chaos)", ""]
    if not chaos:
        return lines + ["(not run)"]
    if chaos:
        keys = ("seed", "changes_made", "changes_converged", "lost", "duplicated", "violations", "echo_loops")
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                  "| " + " | ".join(str(_count(chaos.get(k))) for k in keys) + " |"]
        faults = chaos.get("faults")
        if faults:
            lines.append(f"\nFaults injected: {json.dumps(faults)}; elapsed {chaos.get('elapsed_s')} s.")
    return lines


def _runs(lines: list[str], runs: dict[str, tuple[int, float]]) -> str:
    lines += ["", "## Runs", "", "| benchmark | exit | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {code} | {secs:.0f} |" for name, (code, secs) in runs.items()]
    lines.append("")
    return "\n".join(lines)


def _num(value: Any) -> str:
    if isinstance(value, int | float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return "-"


def _ratio(value: Any) -> str:
    return f"{value:.2f}x" if isinstance(value, int | float) else "-"


def _count(value: Any) -> Any:
    return len(value) if isinstance(value, list) else value


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and write RESULTS.md; exit 0 when every benchmark ran."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small profiles (a few minutes in all)")
    ap.add_argument("--render-only", action="store_true", help="only render RESULTS.md from bench/out/*.json")
    args = ap.parse_args(argv)
    if args.render_only:
        RESULTS.write_text(render({}, args.quick))
        print(f"wrote {RESULTS}")
        return 0
    quick = ["--quick"] if args.quick else []
    runs = {
        "capture": run("bench.capture.run", *quick),
        "sync": run("bench.sync.run", *quick),
        "latency": run("bench.latency.run", *(["--deals", "50"] if args.quick else [])),
        "chaos short": run("bench.chaos.run", "--profile", "short"),
    }
    RESULTS.write_text(render(runs, args.quick))
    print(f"wrote {RESULTS}")
    return 0 if all(code in (0, 1) for code, _ in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
