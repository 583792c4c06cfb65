"""Workloads for the benchmarks: a mixed ERP stream, a pgbench TPC-B run, one huge transaction.

Each generator writes to a database of a throwaway cluster (``agent.localpg``) and returns
what it did. None of them creates slots: the caller decides where the measured stream
starts. The ERP workloads use ``erp.customers`` of the demo schema (``agent/demo``).
"""

from __future__ import annotations

import random
import string
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from agent.demo import erp_schema_sql

_WORDS = (
    "alpha beta gamma delta audit ledger invoice contract project milestone retainer advisory "
    "implementation billing rollout review phase scope budget renewal onboarding support credit "
    "hold priority region north south east west quarterly annual monthly travel expense"
).split()
_STATUSES = ("active", "hold", "archived")
_TAX = ("DE-VAT19", "UK-VAT20")
_ENTITIES = ("ACME-DE", "ACME-UK")

_INSERT = (
    "INSERT INTO erp.customers (id, customer_no, name, status, phone, credit_limit, tax_code,"
    " legal_entity, notes) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
_UPDATE = "UPDATE erp.customers SET status = %s, credit_limit = %s WHERE id = %s"
_UPDATE_NOTES = "UPDATE erp.customers SET status = %s, credit_limit = %s, notes = %s WHERE id = %s"
_DELETE = "DELETE FROM erp.customers WHERE id = %s"


@dataclass(frozen=True, slots=True)
class WorkloadResult:
    """What a generator wrote: row changes by kind, transactions and wall time."""

    name: str
    inserts: int
    updates: int
    deletes: int
    transactions: int
    seconds: float

    @property
    def changes(self) -> int:
        """Row changes written (inserts + updates + deletes)."""
        return self.inserts + self.updates + self.deletes


def load_erp_schema(dsn: str) -> None:
    """Create the demo ERP schema in the (empty) database at ``dsn``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(erp_schema_sql())


def _notes(rng: random.Random) -> str:
    # 1% of rows carry a note long enough to be stored out of line (TOAST), so UPDATEs that
    # leave it alone send it as 'unchanged' ('u'), as a real ERP's long text columns do.
    if rng.random() < 0.01:
        return "".join(rng.choices(string.ascii_letters + string.digits, k=4000))
    return " ".join(rng.choices(_WORDS, k=rng.randint(12, 30)))


def _customer(rng: random.Random, cid: int) -> tuple[object, ...]:
    return (
        cid,
        f"C-{cid:08d}",
        f"{rng.choice(_WORDS).title()} {rng.choice(_WORDS).title()} {cid}",
        rng.choice(_STATUSES),
        f"+49 30 {rng.randint(1000000, 9999999)}",
        f"{rng.randint(0, 10_000_000) / 100:.2f}",
        rng.choice(_TAX),
        rng.choice(_ENTITIES),
        _notes(rng),
    )


def seed_customers(dsn: str, rows: int, *, seed: int = 7) -> None:
    """Fill erp.customers with ids 1..rows by COPY (not part of any measured stream)."""
    rng = random.Random(seed)
    cols = "id, customer_no, name, status, phone, credit_limit, tax_code, legal_entity, notes"
    with psycopg.connect(dsn) as conn:
        with conn.cursor() as cur, cur.copy(f"COPY erp.customers ({cols}) FROM STDIN") as copy:
            for cid in range(1, rows + 1):
                copy.write_row(_customer(rng, cid))
        conn.commit()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE erp.customers")
        conn.execute("CHECKPOINT")


def mixed(dsn: str, *, changes: int, seeded: int, tx_rows: int = 100, seed: int = 42) -> WorkloadResult:
    """Write ``changes`` row changes to erp.customers: 50% INSERT, 40% UPDATE, 10% DELETE.

    Shuffled, in transactions of ``tx_rows`` statements sent through a pipeline. UPDATEs and
    DELETEs always hit live rows (``seeded`` ids exist before), a fifth of the UPDATEs also
    replace the notes. The table ends with ``seeded + inserts - deletes`` rows.
    """
    rng = random.Random(seed)
    n_ins, n_upd = changes // 2, changes * 2 // 5
    n_del = changes - n_ins - n_upd
    kinds = ["i"] * n_ins + ["u"] * n_upd + ["d"] * n_del
    rng.shuffle(kinds)
    live = list(range(1, seeded + 1))
    next_id = seeded + 1
    txs = 0
    started = time.perf_counter()
    with psycopg.connect(dsn) as conn:
        for start in range(0, len(kinds), tx_rows):
            with conn.pipeline(), conn.cursor() as cur:
                for kind in kinds[start : start + tx_rows]:
                    if kind == "i" or not live:
                        cur.execute(_INSERT, _customer(rng, next_id))
                        live.append(next_id)
                        next_id += 1
                    elif kind == "u":
                        target = live[rng.randrange(len(live))]
                        amount = f"{rng.randint(0, 10_000_000) / 100:.2f}"
                        if rng.random() < 0.2:
                            cur.execute(_UPDATE_NOTES, (rng.choice(_STATUSES), amount, _notes(rng), target))
                        else:
                            cur.execute(_UPDATE, (rng.choice(_STATUSES), amount, target))
                    else:
                        at = rng.randrange(len(live))
                        live[at], live[-1] = live[-1], live[at]
                        cur.execute(_DELETE, (live.pop(),))
            conn.commit()
            txs += 1
    return WorkloadResult("mixed", n_ins, n_upd, n_del, txs, time.perf_counter() - started)


def big_transaction(dsn: str, *, rows: int) -> WorkloadResult:
    """Insert ``rows`` customers in one transaction (``INSERT ... SELECT generate_series``)."""
    started = time.perf_counter()
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO erp.customers (id, customer_no, name, status, phone, credit_limit, tax_code,"
            " legal_entity, notes)"
            " SELECT g, 'C-' || lpad(g::text, 8, '0'), 'Customer ' || g, 'active',"
            " '+49 30 ' || (1000000 + g), (g %% 100000) / 100.0, 'DE-VAT19', 'ACME-DE',"
            " repeat('note ', 24) || g"
            " FROM generate_series(1, %s) g",
            (rows,),
        )
        conn.commit()
    return WorkloadResult("bigtx", rows, 0, 0, 1, time.perf_counter() - started)


def _pg_args(bindir: Path, tool: str, port: int) -> list[str]:
    return [str(bindir / tool), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]


def pgbench_init(bindir: Path, port: int, dbname: str, *, scale: int) -> None:
    """Run ``pgbench -i -s scale`` (quietly); its rows are setup, not part of a measured stream."""
    subprocess.run([*_pg_args(bindir, "pgbench", port), "-i", "-q", "-s", str(scale), dbname],
                   check=True, capture_output=True, text=True)  # fmt: skip
    dsn = f"host=127.0.0.1 port={port} user=postgres dbname={dbname}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        # pgbench_history has no key; the agent (and PostgreSQL, for UPDATE/DELETE) needs one.
        conn.execute("ALTER TABLE pgbench_history REPLICA IDENTITY FULL")
        conn.execute("CHECKPOINT")


def pgbench_run(bindir: Path, port: int, dbname: str, *, seconds: int, clients: int = 2) -> WorkloadResult:
    """Run the TPC-B-like script for ``seconds``; each transaction makes 3 UPDATEs and 1 INSERT."""
    started = time.perf_counter()
    out = subprocess.run(
        [*_pg_args(bindir, "pgbench", port), "-n", "-T", str(seconds), "-c", str(clients),
         "-j", str(clients), dbname],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    txs = 0
    for line in out.stdout.splitlines():
        if line.startswith("number of transactions actually processed:"):
            txs = int(line.split(":", 1)[1].split("/")[0])
    return WorkloadResult("pgbench", txs, 3 * txs, 0, txs, elapsed)
