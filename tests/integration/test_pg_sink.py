"""PostgresSink against a real PostgreSQL: upserts, per-op outcomes, origins, failures."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from agent.errors import AuthError, PermanentError, RetryableError
from agent.model import Op, Outcome
from connectors.base import Sink
from connectors.postgres.sink import PostgresSink, SinkTable

pytestmark = pytest.mark.pg

CUSTOMERS = "public.customers"
_SCHEMA = """
CREATE TABLE public.customers (
    id serial PRIMARY KEY,
    crm_id text,
    name text NOT NULL,
    code varchar(4),
    credit numeric(12,2) CHECK (credit >= 0),
    active boolean,
    since date,
    extra json
);
CREATE TABLE public.victims (id int PRIMARY KEY);
"""
_TABLES = {CUSTOMERS: SinkTable("public", "customers", ("id",))}


@dataclass
class Erp:
    """A fresh database with the ERP tables, an origin for the sink, and sinks to close."""

    dsn: str
    origin: str
    dbname: str
    sinks: list[PostgresSink] = field(default_factory=list)

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True)

    def sink(
        self,
        *,
        tables: Mapping[str, SinkTable] = _TABLES,
        origin: str | None = None,
        lock_timeout: float = 5.0,
        dsn: str | None = None,
        app: str = "sink-under-test",
    ) -> PostgresSink:
        target = make_conninfo(dsn or self.dsn, application_name=app)
        sink = PostgresSink(
            "erp",
            lambda: psycopg.connect(target),
            origin=origin or self.origin,
            tables=tables,
            lock_timeout=lock_timeout,
        )
        self.sinks.append(sink)
        return sink


@pytest.fixture
def erp(pg_dsn: str) -> Iterator[Erp]:
    dbname = conninfo_to_dict(pg_dsn)["dbname"]
    assert isinstance(dbname, str)
    env = Erp(pg_dsn, f"sa_{dbname}", dbname)
    with env.admin() as conn:
        conn.execute(_SCHEMA)
        conn.execute("SELECT pg_replication_origin_create(%s)", (env.origin,))
    yield env
    for sink in env.sinks:
        sink.close()
    with env.admin() as conn:  # origins are cluster-wide and use up replication state slots
        conn.execute("SELECT pg_replication_origin_drop(%s)", (env.origin,))


def _op(
    key: Mapping[str, Any],
    fields: Mapping[str, Any] | None = None,
    *,
    action: str = "upsert",
    obj: str = CUSTOMERS,
    n: int = 0,
) -> Op:
    return Op(
        idempotency_key=f"k{n}",
        target="erp",
        entity="customer",
        canonical_id=f"c{n}",
        object_name=obj,
        action=action,  # type: ignore[arg-type]
        key=key,
        fields=fields or {},
        trace_id=f"trace{n}",
        op_id=n,
    )


def _customer(n: int, **over: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "name": f"Customer {n}",
        "code": f"C{n}",
        "credit": Decimal("10.5"),
        "active": True,
        "since": "2024-02-29",
        "extra": {"tier": "gold", "n": n},
    }
    fields.update(over)
    return fields


def _rows(erp: Erp, where: str = "true") -> list[tuple[Any, ...]]:
    with erp.admin() as conn:
        query = sql.SQL("SELECT id, crm_id, name, credit FROM public.customers WHERE {} ORDER BY id")
        return conn.execute(query.format(sql.SQL(where))).fetchall()


def _seed(erp: Erp, n: int) -> None:
    with erp.admin() as conn:
        for i in range(1, n + 1):
            conn.execute(
                "INSERT INTO public.customers (id, crm_id, name) VALUES (%s, %s, %s)",
                (i, f"CRM-{i}", f"Old {i}"),
            )
        conn.execute("SELECT setval('public.customers_id_seq', %s)", (n,))


def _wait_for_lock_wait(erp: Erp, app: str, timeout: float = 5.0) -> int:
    """Return the pid of the sink's backend once it waits for a lock."""
    deadline = time.monotonic() + timeout
    with erp.admin() as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'",
                (app,),
            ).fetchone()
            if row:
                return int(row[0])
            time.sleep(0.02)
    raise AssertionError("the sink never waited for the lock")


def test_sink_satisfies_sink_protocol_when_constructed(erp: Erp) -> None:
    sink = erp.sink()
    assert isinstance(sink, Sink)
    assert sink.apply([]) == []


def test_sink_inserts_by_external_id_then_updates_by_pk_when_the_erp_id_becomes_known(erp: Erp) -> None:
    sink = erp.sink()
    [created] = sink.apply([_op({"crm_id": "CRM-1"}, _customer(1))])
    assert created.status == "applied"
    assert created.external_id is not None and created.version is not None
    [updated] = sink.apply([_op({"id": created.external_id}, {"name": "Renamed", "credit": "99.999"})])
    assert updated.status == "applied"
    assert updated.external_id == created.external_id
    assert _rows(erp) == [(int(created.external_id), "CRM-1", "Renamed", Decimal("100.00"))]


def test_sink_stamps_each_outcome_with_the_server_clock_read_inside_the_write_when_applied(erp: Erp) -> None:
    sink = erp.sink()
    with erp.admin() as conn:
        before = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
    outs = sink.apply([_op({"crm_id": f"CRM-{i}"}, _customer(i), n=i) for i in (1, 2)])
    with erp.admin() as conn:
        after = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
    stamps = {o.written_at for o in outs}
    assert len(stamps) == 1  # one transaction, one reading
    [stamp] = stamps
    assert stamp is not None and stamp.tzinfo is not None and before < stamp < after


def test_sink_replay_writes_no_row_and_no_wal_when_rows_already_hold_the_values(erp: Erp) -> None:
    sink = erp.sink()
    ops = [_op({"crm_id": f"CRM-{i}"}, _customer(i), n=i) for i in range(1, 6)]
    first = sink.apply(ops)
    assert [o.status for o in first] == ["applied"] * 5
    slot = f"replay_{erp.dbname}"
    with erp.admin() as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (slot,))
    try:
        again = sink.apply(ops)
        by_pk = sink.apply([_op({"id": o.external_id}, _customer(i + 1)) for i, o in enumerate(first)])
        with erp.admin() as conn:
            decoded = conn.execute(
                "SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL)", (slot,)
            ).fetchall()
    finally:
        with erp.admin() as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    assert decoded == []  # not even an empty BEGIN/COMMIT: no transaction id was assigned
    assert [o.external_id for o in again] == [o.external_id for o in first]
    assert [o.external_id for o in by_pk] == [o.external_id for o in first]
    assert all(o.status == "applied" and o.version is None for o in [*again, *by_pk])
    assert len(_rows(erp)) == 5


@pytest.mark.parametrize(
    ("bad_fields", "reason", "column"),
    [
        ({"name": None}, "not_null_violation", "name"),
        ({"credit": "-5"}, "check_violation", "credit"),
        ({"credit": "12x.5"}, "invalid_text_representation", "credit"),
        ({"code": "TOOLONG"}, "string_data_right_truncation", "code"),
        ({"since": "2024-02-30"}, "datetime_field_overflow", "since"),
    ],
)
def test_sink_rejects_only_the_bad_row_when_nine_others_commit(
    erp: Erp, bad_fields: dict[str, Any], reason: str, column: str
) -> None:
    ops = [
        _op({"crm_id": f"CRM-{i}"}, _customer(i, **(bad_fields if i == 7 else {})), n=i) for i in range(10)
    ]
    outcomes = erp.sink().apply(ops)
    bad = outcomes[7]
    assert (bad.status, bad.reason, bad.field_name) == ("reject", reason, column)
    assert bad.detail and all(str(v) not in bad.detail for v in bad_fields.values() if v is not None)
    assert [o.status for i, o in enumerate(outcomes) if i != 7] == ["applied"] * 9
    assert [r[1] for r in _rows(erp)] == [f"CRM-{i}" for i in range(10) if i != 7]


def test_sink_answers_retry_for_a_locked_row_within_the_lock_timeout_when_others_apply(erp: Erp) -> None:
    _seed(erp, 5)
    ops = [_op({"id": i}, {"name": f"New {i}"}, n=i) for i in range(1, 6)]
    with erp.admin() as locker, locker.transaction():
        locker.execute("SELECT 1 FROM public.customers WHERE id = 3 FOR UPDATE")
        started = time.monotonic()
        outcomes = erp.sink(lock_timeout=0.2).apply(ops)
        elapsed = time.monotonic() - started
    assert elapsed < 2.0
    assert outcomes[2] == Outcome.retry(None, "lock_not_available")
    assert [o.status for i, o in enumerate(outcomes) if i != 2] == ["applied"] * 4
    assert [r[2] for r in _rows(erp)] == ["New 1", "New 2", "Old 3", "New 4", "New 5"]


def test_sink_marks_every_transaction_with_its_origin_when_decoded_with_pgoutput(erp: Erp) -> None:
    slot, pub = f"pgo_{erp.dbname}", f"pub_{erp.dbname}"
    with erp.admin() as conn:
        conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE public.customers").format(sql.Identifier(pub)))
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    try:
        sink = erp.sink()
        ours: set[int] = set()
        for batch in range(3):
            ops = [_op({"crm_id": f"CRM-{batch}-{i}"}, _customer(i), n=i) for i in range(3)]
            outcomes = sink.apply(ops) + sink.apply([_op({"crm_id": f"CRM-{batch}-0"}, {"name": "x"})])
            ours.update(int(o.version) for o in outcomes if o.version)
            with erp.admin() as conn:  # a user's write in between: no origin
                conn.execute("INSERT INTO public.customers (name) VALUES ('by hand')")
        with erp.admin() as conn:
            rows = conn.execute(
                "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
                "'proto_version', '1', 'publication_names', %s)",
                (slot, pub),
            ).fetchall()
    finally:
        with erp.admin() as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    messages = [bytes(r[0]) for r in rows]
    begins = [(i, struct.unpack_from(">I", m, 17)[0]) for i, m in enumerate(messages) if m[:1] == b"B"]
    assert len(ours) == 6 and len(begins) == 9
    for index, xid in begins:
        following = messages[index + 1]
        tagged = following[:1] == b"O" and following[9:].split(b"\0")[0] == erp.origin.encode()
        assert tagged == (xid in ours), (xid, following[:1])


def test_sink_raises_retryable_and_applies_nothing_when_its_connection_is_killed_mid_batch(erp: Erp) -> None:
    _seed(erp, 5)
    ops = [_op({"id": i}, {"name": f"New {i}"}, n=i) for i in range(1, 6)]
    sink = erp.sink(lock_timeout=10, app="sink-to-kill")
    killed: list[bool] = []

    def kill() -> None:
        pid = _wait_for_lock_wait(erp, "sink-to-kill")
        with erp.admin() as conn:
            killed.append(conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,))

    with erp.admin() as locker, locker.transaction():
        locker.execute("SELECT 1 FROM public.customers WHERE id = 4 FOR UPDATE")
        killer = threading.Thread(target=kill)
        killer.start()
        with pytest.raises(RetryableError):
            sink.apply(ops)
        killer.join()
    assert killed == [True]
    assert [r[2] for r in _rows(erp)] == [f"Old {i}" for i in range(1, 6)]
    assert [o.status for o in sink.apply(ops)] == ["applied"] * 5  # reconnects, origin set again
    assert [r[2] for r in _rows(erp)] == [f"New {i}" for i in range(1, 6)]


def test_sink_upsert_updates_the_row_when_another_session_inserts_the_unique_key_first(erp: Erp) -> None:
    with erp.admin() as conn:
        conn.execute("CREATE UNIQUE INDEX customers_crm_id ON public.customers (crm_id)")
    sink = erp.sink(app="sink-racing")
    with erp.admin() as rival:
        rival.execute("BEGIN")
        rival.execute("INSERT INTO public.customers (id, crm_id, name) VALUES (500, 'CRM-R', 'rival')")

        def commit_when_sink_waits() -> None:
            _wait_for_lock_wait(erp, "sink-racing")
            rival.execute("COMMIT")

        committer = threading.Thread(target=commit_when_sink_waits)
        committer.start()
        [outcome] = sink.apply([_op({"crm_id": "CRM-R"}, {"name": "ours"})])
        committer.join()
    assert outcome.status == "applied" and outcome.external_id == "500"
    assert _rows(erp) == [(500, "CRM-R", "ours", None)]


def test_sink_delete_is_applied_again_when_the_row_is_already_gone(erp: Erp) -> None:
    _seed(erp, 2)
    sink = erp.sink()
    first = sink.apply([_op({"id": 1}, action="delete"), _op({"crm_id": "CRM-2"}, action="delete")])
    again = sink.apply([_op({"id": 1}, action="delete"), _op({"crm_id": "CRM-2"}, action="delete")])
    assert [(o.status, o.external_id) for o in first] == [("applied", "1"), ("applied", "2")]
    assert first[0].version is not None and first[0].version == first[1].version
    assert [(o.status, o.version) for o in again] == [("applied", None), ("applied", None)]
    assert again[0].external_id == "1"
    assert _rows(erp) == []


def test_sink_quotes_identifiers_when_table_and_column_names_carry_sql(erp: Erp) -> None:
    table = 'evil"; DROP TABLE public.victims; --'
    column = 'name"); DROP TABLE public.victims; --'
    with erp.admin() as conn:
        conn.execute(
            sql.SQL("CREATE TABLE public.{} (id serial PRIMARY KEY, {} text)").format(
                sql.Identifier(table), sql.Identifier(column)
            )
        )
        # The ERP generates these ids: an op keyed by one updates that row, it never creates it.
        conn.execute(sql.SQL("INSERT INTO public.{} DEFAULT VALUES").format(sql.Identifier(table)))
    tables = {**_TABLES, "public.evil": SinkTable("public", table, ("id",))}
    sink = erp.sink(tables=tables)
    outcomes = sink.apply(
        [
            _op({"id": 1}, {column: "'); DROP TABLE public.victims; --"}, obj="public.evil"),
            _op({"crm_id": "CRM-1"}, {"name": "ok", 'x" = 1; DROP TABLE public.victims; --': "v"}),
        ]
    )
    assert outcomes[0] == Outcome.applied("1", outcomes[0].version, outcomes[0].written_at)
    assert outcomes[1].status == "reject" and outcomes[1].reason == "undefined_column"
    assert outcomes[1].field_name == 'x" = 1; DROP TABLE public.victims; --'
    with erp.admin() as conn:
        assert conn.execute("SELECT to_regclass('public.victims') IS NOT NULL").fetchone() == (True,)
        stored = conn.execute(
            sql.SQL("SELECT {} FROM public.{}").format(sql.Identifier(column), sql.Identifier(table))
        )
        assert stored.fetchall() == [("'); DROP TABLE public.victims; --",)]


@pytest.mark.parametrize(
    ("op", "reason", "column"),
    [
        (_op({"crm_id": "CRM-1"}, {"name": "x"}, obj="public.unknown"), "unknown_object", None),
        (_op({"crm_id": "CRM-1"}, {"name": "x", "nickname": "y"}), "undefined_column", "nickname"),
        (_op({"crm_code": "CRM-1"}, {"name": "x"}), "undefined_column", "crm_code"),
        (_op({"crm_id": None}, {"name": "x"}), "null_key", "crm_id"),
        (_op({}, {"name": "x"}), "missing_key", None),
        (_op({"id": "abc"}, {"name": "x"}), "invalid_text_representation", "id"),
    ],
)
def test_sink_rejects_the_op_when_its_mapping_does_not_fit_the_table(
    erp: Erp, op: Op, reason: str, column: str | None
) -> None:
    sink = erp.sink()
    outcomes = sink.apply([op, _op({"crm_id": "CRM-OK"}, {"name": "fine"})])
    assert (outcomes[0].status, outcomes[0].reason, outcomes[0].field_name) == ("reject", reason, column)
    assert outcomes[1].status == "applied"


def test_sink_rejects_the_op_when_its_external_id_matches_two_rows(erp: Erp) -> None:
    with erp.admin() as conn:
        conn.execute("INSERT INTO public.customers (crm_id, name) VALUES ('DUP', 'a'), ('DUP', 'b')")
    [outcome] = erp.sink().apply([_op({"crm_id": "DUP"}, {"name": "c"})])
    assert (outcome.status, outcome.reason) == ("reject", "ambiguous_key")
    assert [r[2] for r in _rows(erp)] == ["a", "b"]


def test_sink_reports_composite_primary_key_as_json_list_when_table_has_two_key_columns(erp: Erp) -> None:
    with erp.admin() as conn:
        conn.execute("CREATE TABLE public.lines (doc int, line int, qty numeric, PRIMARY KEY (doc, line))")
    sink = erp.sink(tables={"public.lines": SinkTable("public", "lines", ("doc", "line"))})
    [outcome] = sink.apply([_op({"doc": 7, "line": 2}, {"qty": Decimal("1.5")}, obj="public.lines")])
    assert outcome.status == "applied" and outcome.external_id == '["7", "2"]'


def test_sink_raises_permanent_error_naming_init_when_the_origin_is_missing(erp: Erp) -> None:
    sink = erp.sink(origin="no_such_origin")
    with pytest.raises(PermanentError, match="no_such_origin.*syncagent init"):
        sink.apply([_op({"crm_id": "CRM-1"}, {"name": "x"})])
    assert _rows(erp) == []
    problems = sink.check()
    assert [p.fix for p in problems] == ["run `syncagent init`"]


def test_sink_raises_retryable_when_another_session_holds_the_origin(erp: Erp) -> None:
    first, second = erp.sink(), erp.sink()
    assert first.apply([_op({"crm_id": "CRM-1"}, {"name": "x"})])[0].status == "applied"
    with pytest.raises(RetryableError, match="in use by another session"):
        second.apply([_op({"crm_id": "CRM-2"}, {"name": "y"})])
    first.close()
    assert second.apply([_op({"crm_id": "CRM-2"}, {"name": "y"})])[0].status == "applied"


def test_sink_check_reports_missing_table_and_wrong_key_when_config_does_not_match(erp: Erp) -> None:
    tables = {
        CUSTOMERS: SinkTable("public", "customers", ("crm_id",)),
        "public.nope": SinkTable("public", "nope", ("id",)),
    }
    problems = erp.sink(tables=tables).check()
    assert [(p.subject, p.severity) for p in problems] == [
        ("postgres sink erp: public.customers", "error"),
        ("postgres sink erp: public.nope", "error"),
    ]
    assert "primary key of public.customers is ('id',)" in problems[0].message
    assert "does not exist" in problems[1].message
    assert erp.sink().check() == []


def test_sink_needs_the_grant_on_origin_setup_when_its_role_is_not_superuser(erp: Erp) -> None:
    role = f"agent_{erp.dbname}"
    quoted = f'"{role}"'
    with erp.admin() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT SELECT, UPDATE ON public.customers TO {}").format(sql.Identifier(role)))
    try:
        sink = erp.sink(dsn=make_conninfo(erp.dsn, user=role))
        before = sink.check()
        with pytest.raises(AuthError) as info:
            sink.apply([_op({"crm_id": "CRM-1"}, {"name": "x"})])
        grant_origin = f"GRANT EXECUTE ON FUNCTION pg_replication_origin_session_setup(text) TO {quoted};"
        assert grant_origin in str(info.value)
        assert [(p.severity, p.fix) for p in before] == [
            ("error", f'GRANT INSERT ON "public"."customers" TO {quoted};'),
            ("warning", f'GRANT DELETE ON "public"."customers" TO {quoted};'),
            ("error", grant_origin),
        ]
        with erp.admin() as conn:
            conn.execute(grant_origin)
            conn.execute(
                sql.SQL("GRANT INSERT, DELETE ON public.customers TO {}").format(sql.Identifier(role))
            )
            conn.execute(
                sql.SQL("GRANT USAGE ON SEQUENCE public.customers_id_seq TO {}").format(sql.Identifier(role))
            )
        assert sink.check() == []
        assert sink.apply([_op({"crm_id": "CRM-1"}, {"name": "x"})])[0].status == "applied"
    finally:
        for sink in erp.sinks:
            sink.close()
        with erp.admin() as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_sink_logs_counts_without_values_when_a_batch_is_applied(
    erp: Erp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="connectors.postgres.sink")
    erp.sink().apply(
        [_op({"crm_id": "CRM-1"}, {"name": "Secret Name"}), _op({"crm_id": "CRM-2"}, {"name": None})]
    )
    events = {r.getMessage(): getattr(r, "fields", {}) for r in caplog.records}
    assert events["sink_batch_applied"]["applied"] == 1 and events["sink_batch_applied"]["reject"] == 1
    assert events["sink_op_rejected"]["field"] == "name"
    assert "Secret Name" not in caplog.text


def test_sink_rejects_the_op_when_a_deferred_foreign_key_or_an_erp_trigger_refuses_it(erp: Erp) -> None:
    _seed(erp, 1)
    with erp.admin() as conn:
        conn.execute(
            "CREATE TABLE public.contracts (id int PRIMARY KEY, customer_id int "
            "REFERENCES public.customers DEFERRABLE INITIALLY DEFERRED, amount numeric)"
        )
        conn.execute(
            "CREATE FUNCTION public.needs_approval() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.amount > 1000 THEN RAISE EXCEPTION 'amount needs approval'; END IF; RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER approval BEFORE INSERT OR UPDATE ON public.contracts "
            "FOR EACH ROW EXECUTE FUNCTION public.needs_approval()"
        )
    sink = erp.sink(tables={"public.contracts": SinkTable("public", "contracts", ("id",))})
    outcomes = sink.apply(
        [
            _op({"id": 1}, {"customer_id": 1, "amount": 5}, obj="public.contracts"),
            _op({"id": 2}, {"customer_id": 99, "amount": 5}, obj="public.contracts"),
            _op({"id": 3}, {"customer_id": 1, "amount": 5000}, obj="public.contracts"),
        ]
    )
    assert outcomes[0].status == "applied"
    assert (outcomes[1].reason, outcomes[1].field_name) == ("foreign_key_violation", "customer_id")
    assert (outcomes[2].reason, outcomes[2].detail) == ("raise_exception", "amount needs approval")
    with erp.admin() as conn:
        assert conn.execute("SELECT id FROM public.contracts").fetchall() == [(1,)]
