"""Capture benchmark: ``syncagent run --once`` against ``pg_recvlogical`` on the same WAL.

Run from the repository root::

    .venv/bin/python -m bench.capture.run            # full profile (a few minutes)
    .venv/bin/python -m bench.capture.run --quick    # small profile (well under a minute)

It starts a throwaway cluster (loopback only), writes three workloads into three databases
(a mixed ERP stream, a pgbench TPC-B run, one huge transaction), and for each one measures
both consumers on copies of one master slot. It prints a table and writes the figures to
``bench/out/capture.json``. See ``bench/capture/README.md`` for what is measured and how.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg

from agent.localpg import LocalCluster, start_cluster
from bench import workload
from bench.capture import consumers

OUT = Path(__file__).resolve().parents[1] / "out" / "capture.json"


@dataclass(frozen=True, slots=True)
class Profile:
    """Sizes of one benchmark profile."""

    name: str
    mixed_changes: int
    mixed_seed_rows: int
    pgbench_scale: int
    pgbench_seconds: int
    bigtx_rows: int
    repeat: int


PROFILES = {
    "full": Profile("full", 200_000, 20_000, 5, 20, 1_000_000, 3),
    "quick": Profile("quick", 20_000, 2_000, 1, 3, 100_000, 1),
}

# name -> (ratio target, peak RSS target in MiB); None where the issue sets none.
TARGETS: dict[str, tuple[float | None, float | None]] = {
    "mixed": (0.7, None),
    "pgbench": (1.0, None),
    "bigtx": (None, 200.0),
}


@dataclass(frozen=True, slots=True)
class Setup:
    """One workload's database, config and the stream it left behind."""

    name: str
    dbname: str
    slot: str
    config: Path
    state_path: Path
    start_lsn: str
    end_lsn: str
    written: workload.WorkloadResult


def _config(path: Path, *, dbname: str, port: int, slot: str, state: Path, tables: dict[str, str]) -> Path:
    """Write an ERP-only config capturing ``tables`` (entity -> 'schema.table:key')."""
    parts = [
        "[agent]",
        f'state_path = "{state}"',
        "",
        "[systems.erp]",
        'type = "postgres"',
        'host = "127.0.0.1"',
        f"port = {port}",
        f'dbname = "{dbname}"',
        'user = "postgres"',
        f'slot = "{slot}"',
        f'publication = "{slot}"',
        f'origin = "{slot}"',
        # One poll must cover the whole stream (the 1M-row transaction is ~190 MB of WAL).
        "max_poll_mb = 4096",
    ]
    for entity, spec in tables.items():
        obj, key, field = spec.split(":")
        parts += [
            "",
            f"[entities.{entity}.systems.erp]",
            f'object = "{obj}"',
            f'key = "{key}"',
            "",
            f"[entities.{entity}.fields]",
            f'{field} = {{owner = "erp", erp = "{field}"}}',
        ]
    path.write_text("\n".join(parts) + "\n")
    return path


def _prepare(
    cluster: LocalCluster, work: Path, name: str, tables: dict[str, str], schema: Callable[[str], None]
) -> tuple[str, str, Path, Path]:
    dbname = slot = f"bench_{name}"
    cluster.createdb(dbname)
    schema(cluster.dsn(dbname))
    state = work / name / "state.db"
    state.parent.mkdir(parents=True, exist_ok=True)
    cfg = _config(work / name / "config.toml", dbname=dbname, port=cluster.port, slot=slot,
                  state=state, tables=tables)  # fmt: skip
    consumers.syncagent(cfg, "init")  # publication, slot and origin, as an operator would
    consumers.fresh_state(state)
    return dbname, slot, cfg, state


_ERP_TABLES = {"customer": "erp.customers:id:name"}
_PGBENCH_TABLES = {
    "branch": "public.pgbench_branches:bid:bbalance",
    "teller": "public.pgbench_tellers:tid:tbalance",
    "account": "public.pgbench_accounts:aid:abalance",
    "history": "public.pgbench_history:tid:delta",
}


def setup_mixed(cluster: LocalCluster, work: Path, p: Profile) -> Setup:
    """Seed erp.customers, then write the mixed stream after a fresh master slot."""

    def schema(dsn: str) -> None:
        workload.load_erp_schema(dsn)
        workload.seed_customers(dsn, p.mixed_seed_rows)

    dbname, slot, cfg, state = _prepare(cluster, work, "mixed", _ERP_TABLES, schema)
    dsn = cluster.dsn(dbname)
    consumers.create_master(dsn, f"{slot}_master")
    start = consumers.slot_position(dsn, f"{slot}_master")
    written = workload.mixed(dsn, changes=p.mixed_changes, seeded=p.mixed_seed_rows)
    return Setup("mixed", dbname, slot, cfg, state, start, consumers.current_lsn(dsn), written)


def setup_pgbench(cluster: LocalCluster, work: Path, p: Profile) -> Setup:
    """Initialise pgbench (not measured), then run it for a while after a fresh master slot."""

    def schema(dsn: str) -> None:
        workload.pgbench_init(cluster.bindir, cluster.port, dsn.split("dbname=")[1], scale=p.pgbench_scale)

    dbname, slot, cfg, state = _prepare(cluster, work, "pgbench", _PGBENCH_TABLES, schema)
    dsn = cluster.dsn(dbname)
    consumers.create_master(dsn, f"{slot}_master")
    start = consumers.slot_position(dsn, f"{slot}_master")
    written = workload.pgbench_run(cluster.bindir, cluster.port, dbname, seconds=p.pgbench_seconds)
    return Setup("pgbench", dbname, slot, cfg, state, start, consumers.current_lsn(dsn), written)


def setup_bigtx(cluster: LocalCluster, work: Path, p: Profile) -> Setup:
    """Write one transaction of ``bigtx_rows`` INSERTs after a fresh master slot."""
    dbname, slot, cfg, state = _prepare(cluster, work, "bigtx", _ERP_TABLES, workload.load_erp_schema)
    dsn = cluster.dsn(dbname)
    consumers.create_master(dsn, f"{slot}_master")
    start = consumers.slot_position(dsn, f"{slot}_master")
    written = workload.big_transaction(dsn, rows=p.bigtx_rows)
    return Setup("bigtx", dbname, slot, cfg, state, start, consumers.current_lsn(dsn), written)


def measure(cluster: LocalCluster, work: Path, s: Setup, repeat: int, full_cycle: bool) -> dict[str, Any]:
    """Run both consumers ``repeat`` times on the setup's stream; return its figures."""
    dsn = cluster.dsn(s.dbname)
    master = f"{s.slot}_master"
    rows, truncated = consumers.stream_changes(dsn, master, s.slot, s.end_lsn)
    expected = rows + truncated
    recv: list[consumers.ProcessRun] = []
    agent: list[consumers.AgentRun] = []
    for _ in range(repeat):
        recv.append(consumers.run_recvlogical(cluster, s.dbname, master=master, publication=s.slot,
                                              endpos=s.end_lsn, out=work / s.name / "recv.bin"))  # fmt: skip
        agent.append(consumers.run_agent(cluster, s.dbname, master=master, slot=s.slot, config=s.config,
                                         state_path=s.state_path, full_cycle=full_cycle))  # fmt: skip
    (work / s.name / "recv.bin").unlink(missing_ok=True)
    recv_s = statistics.median(r.seconds for r in recv)
    cap_s = statistics.median(a.capture_seconds for a in agent)
    proc_s = statistics.median(a.process.seconds for a in agent)
    ratio_target, rss_target = TARGETS[s.name]
    ratio = (expected / cap_s) / (expected / recv_s)
    peak = max(a.process.max_rss_mib for a in agent)
    journal_ok = all(a.journal_rows == expected and a.journaled == expected for a in agent)
    met = (ratio_target is None or ratio >= ratio_target) and (rss_target is None or peak < rss_target)
    return {
        "workload": asdict(s.written),
        "wal_bytes": consumers.wal_bytes(dsn, s.start_lsn, s.end_lsn),
        "stream_changes": expected,
        "stream_truncated_tables": truncated,
        "recvlogical": {
            "runs_s": [round(r.seconds, 3) for r in recv],
            "median_s": round(recv_s, 3),
            "changes_per_s": round(expected / recv_s),
            "max_rss_mib": round(max(r.max_rss_mib for r in recv), 1),
        },
        "agent": {
            "capture_runs_s": [round(a.capture_seconds, 3) for a in agent],
            "process_runs_s": [round(a.process.seconds, 3) for a in agent],
            "process_is": "start to exit" if full_cycle else "start to end of capture",
            "capture_median_s": round(cap_s, 3),
            "process_median_s": round(proc_s, 3),
            "changes_per_s": round(expected / cap_s),
            "process_changes_per_s": round(expected / proc_s),
            "max_rss_mib": round(peak, 1),
            "journal_rows": [a.journal_rows for a in agent],
        },
        "ratio": round(ratio, 3),
        "process_ratio": round(recv_s / proc_s, 3),
        "target_ratio": ratio_target,
        "target_rss_mib": rss_target,
        "journal_matches_stream": journal_ok,
        "targets_met": met,
    }


def _table(results: dict[str, dict[str, Any]]) -> str:
    head = ("workload", "changes", "WAL MB", "recvlogical s", "changes/s", "agent s", "changes/s",
            "ratio", "target", "agent RSS MiB", "journal rows", "met")  # fmt: skip
    rows: list[tuple[str, ...]] = [head]
    for name, r in results.items():
        rc, ag = r["recvlogical"], r["agent"]
        target = []
        if r["target_ratio"] is not None:
            target.append(f"ratio >= {r['target_ratio']}")
        if r["target_rss_mib"] is not None:
            target.append(f"RSS < {r['target_rss_mib']:.0f}")
        journal = "= stream" if r["journal_matches_stream"] else "MISMATCH"
        rows.append((
            name, f"{r['stream_changes']:,}", f"{r['wal_bytes'] / 1e6:.1f}",
            f"{rc['median_s']:.3f}", f"{rc['changes_per_s']:,}",
            f"{ag['capture_median_s']:.3f}", f"{ag['changes_per_s']:,}",
            f"{r['ratio']:.2f}", ", ".join(target) or "-", f"{ag['max_rss_mib']:.1f}",
            f"{min(ag['journal_rows']):,} {journal}", "yes" if r["targets_met"] else "NO",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit 1 when a journal does not match its stream (or, with --strict, a target)."""
    ap = argparse.ArgumentParser(prog="python -m bench.capture.run", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small profile (20k changes, 100k-row transaction)")
    ap.add_argument("--repeat", type=int, help="runs per consumer and workload (median; default 3, quick 1)")
    ap.add_argument("--only", action="append", choices=sorted(TARGETS), help="run only this workload")
    ap.add_argument("--out", type=Path, default=OUT, help=f"JSON output (default {OUT})")
    ap.add_argument("--strict", action="store_true", help="also exit 1 when a target is missed")
    ap.add_argument("--full-cycle", action="store_true",
                    help="let run --once resolve too (slow); default: stop it after its capture")  # fmt: skip
    args = ap.parse_args(argv)
    p = PROFILES["quick" if args.quick else "full"]
    repeat = args.repeat or p.repeat
    wanted = args.only or ["mixed", "pgbench", "bigtx"]
    setups = {"mixed": setup_mixed, "pgbench": setup_pgbench, "bigtx": setup_bigtx}
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="syncagent-bench-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # the postgres user must reach the cluster folder inside
        with start_cluster(work / "pg") as cluster:
            with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
                server = conn.execute("SHOW server_version").fetchone()
            for name in wanted:
                print(f"[{name}] writing the workload ...", file=sys.stderr, flush=True)
                s = setups[name](cluster, work, p)
                print(f"[{name}] {s.written.changes:,} changes in {s.written.seconds:.1f} s; measuring "
                      f"x{repeat} ...", file=sys.stderr, flush=True)  # fmt: skip
                results[name] = measure(cluster, work, s, repeat, args.full_cycle)
                with psycopg.connect(cluster.dsn(s.dbname), autocommit=True) as conn:
                    consumers.drop_slot(conn, f"{s.slot}_master")
    report = {
        "profile": p.name,
        "repeat": repeat,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "postgres": server[0] if server else None,
        },  # fmt: skip
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(results))
    print(f"profile {p.name}, median of {repeat} runs; agent s = its capture cycle (connect, peek, read,"
          f" journal, advance); JSON: {args.out}")  # fmt: skip
    ok = all(r["journal_matches_stream"] for r in results.values())
    if args.strict:
        ok = ok and all(r["targets_met"] for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
