"""In-process capture profiler: the agent's capture cycle without the CLI, for comparing variants.

Run from the repository root::

    .venv/bin/python -m bench.capture.profile --workload mixed --changes 200000 --repeat 3
    .venv/bin/python -m bench.capture.profile --workload pgbench --cprofile /tmp/pgbench.prof

It starts a throwaway cluster, writes one workload after a master slot, then runs
``agent.pipeline.capture`` (PostgresSource into a fresh state file) on a fresh copy of the
master each time. It prints client CPU time (``time.process_time``: this process only, so
the load of other processes on the machine hardly moves it) and wall time per run. The CLI
benchmark (``bench.capture.run``) is the one that counts; this one is for finding costs.
"""

from __future__ import annotations

import argparse
import cProfile
import pickle
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from agent import pipeline
from agent.localpg import start_cluster
from bench import workload
from bench.capture import consumers
from connectors.postgres.slot import TableSpec
from connectors.postgres.source import PostgresSource
from state import open_state

_ERP = (TableSpec("erp", "customers", key_columns=("id",)),)
_PGBENCH = (
    TableSpec("public", "pgbench_branches", key_columns=("bid",)),
    TableSpec("public", "pgbench_tellers", key_columns=("tid",)),
    TableSpec("public", "pgbench_accounts", key_columns=("aid",)),
    TableSpec("public", "pgbench_history", key_columns=("tid",)),
)


def _setup(
    cluster_dsn: str, bindir: Path, port: int, name: str, changes: int
) -> tuple[str, tuple[TableSpec, ...]]:
    """Create the database and publication, the master slot, then write the workload."""
    dbname = f"prof_{name}"
    with psycopg.connect(cluster_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {dbname}")
    dsn = cluster_dsn.replace("dbname=postgres", f"dbname={dbname}")
    if name == "pgbench":
        workload.pgbench_init(bindir, port, dbname, scale=5 if changes >= 100_000 else 1)
        specs = _PGBENCH
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("ALTER TABLE public.pgbench_history REPLICA IDENTITY FULL")
    else:
        workload.load_erp_schema(dsn)
        workload.seed_customers(dsn, changes // 10)
        specs = _ERP
    tables = ", ".join(s.qualified_name for s in specs)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE PUBLICATION prof FOR TABLE {tables}")
    consumers.create_master(dsn, "prof_master")
    if name == "pgbench":
        workload.pgbench_run(bindir, port, dbname, seconds=max(2, changes // 13_000))
    elif name == "bigtx":
        workload.big_transaction(dsn, rows=changes)
    else:
        workload.mixed(dsn, changes=changes, seeded=changes // 10)
    return dsn, specs


def _run_once(
    dsn: str, specs: tuple[TableSpec, ...], work: Path, prof: cProfile.Profile | None
) -> tuple[float, float, int]:
    consumers.copy_slot(dsn, "prof_master", "prof")
    state = work / "state.db"
    consumers.fresh_state(state)
    st = open_state(state, background_checkpoints=True)  # as the agent opens it
    source = PostgresSource("erp", lambda: psycopg.connect(dsn), slot="prof", publication="prof",
                            origin="prof", tables=specs, max_poll_bytes=4096 * 2**20)  # fmt: skip
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        if prof is not None:
            prof.enable()
        result = pipeline.capture(source, st, "wal", limit=5000)
        if prof is not None:
            prof.disable()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        source.close()
        st.close()
        with psycopg.connect(dsn, autocommit=True) as conn:
            consumers.drop_slot(conn, "prof")
    return cpu, wall, result.journaled


def _dump(dsn: str, path: Path) -> None:
    """Pickle every message of the master's stream (bytes, in order) for offline decoding runs."""
    with psycopg.connect(dsn) as conn, conn.cursor(binary=True) as cur:
        cur.execute("SELECT data FROM pg_logical_slot_peek_binary_changes('prof_master', NULL, NULL,"
                    " 'proto_version', '1', 'publication_names', 'prof')")  # fmt: skip
        path.write_bytes(pickle.dumps([r[0] for r in cur.fetchall()]))


def main(argv: list[str] | None = None) -> int:
    """Write the workload once, then time ``repeat`` in-process captures of it."""
    ap = argparse.ArgumentParser(prog="python -m bench.capture.profile", description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=("mixed", "pgbench", "bigtx"), default="mixed")
    ap.add_argument("--changes", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cprofile", type=Path, help="write cProfile stats of all runs here")
    ap.add_argument("--dump", type=Path, help="also pickle the stream's raw pgoutput messages here")
    ap.add_argument("--serve", action="store_true", help="write the workload, print its DSN and wait")
    ap.add_argument(
        "--dsn", help="measure this prepared database (its prof_master slot) instead of a new cluster"
    )
    args = ap.parse_args(argv)
    prof = cProfile.Profile() if args.cprofile else None
    with tempfile.TemporaryDirectory(prefix="syncagent-prof-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        if args.dsn:
            specs = _PGBENCH if args.workload == "pgbench" else _ERP
            runs = [_run_once(args.dsn, specs, work, prof) for _ in range(args.repeat)]
        else:
            runs = _fresh(work, args, prof)
    _report(args.workload, runs)
    if prof is not None:
        prof.dump_stats(args.cprofile)
    return 0


def _fresh(
    work: Path, args: argparse.Namespace, prof: cProfile.Profile | None
) -> list[tuple[float, float, int]]:
    """Start a cluster, write the workload, then time the runs."""
    with start_cluster(work / "pg") as cluster:
        dsn, specs = _setup(cluster.dsn(), cluster.bindir, cluster.port, args.workload, args.changes)
        if args.dump:
            _dump(dsn, args.dump)
        if args.serve:
            print(f"serving {dsn} (Ctrl-C or SIGTERM stops it)", flush=True)
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                return []
        return [_run_once(dsn, specs, work, prof) for _ in range(args.repeat)]


def _report(name: str, runs: list[tuple[float, float, int]]) -> None:
    for cpu, wall, n in runs:
        print(f"{name}: {n:,} changes  cpu {cpu:.3f} s ({cpu / n * 1e6:.2f} us/change)  "
              f"wall {wall:.3f} s ({n / wall:,.0f}/s)")  # fmt: skip
    if runs:
        cpu = statistics.median(r[0] for r in runs)
        wall = statistics.median(r[1] for r in runs)
        print(f"median cpu {cpu:.3f} s, wall {wall:.3f} s")


if __name__ == "__main__":
    sys.exit(main())
