"""The contract harness: every connector built as the daemon builds it, behind one set of operations.

Each ``System`` writes a one-system config, loads it with ``agent.daemon.open_config`` and
builds the connector with ``agent.daemon.build_runtime``, against its emulator served on a
loopback port (or, for PostgreSQL, a fresh database from ``pg_dsn`` set up by ``syncagent
init``'s ``ops.init``). The contract tests then speak one language to all of them:
``create``/``update``/``delete`` records behind the connector's back, ``settle`` (let the
server clock pass the connector's signpost), ``drain`` (read every stream to the end,
committing as the pipeline does), ``inject_rate_limit``, ``expire_tokens``, ``records``.

Emulator clocks are frozen at the start (records created together share one modification
time: a tie) and only move when a test says so: ``create(n, tie=False)`` steps the clock
between records, ``settle`` steps it past the safety lag. The steps stay small, because
NetSuite's token endpoint compares the assertion's real-time ``iat``/``exp`` with it.

Fixtures, in apscheduler's backend style: ``system`` runs a test once per connector;
``api_system`` only over the four HTTP connectors (rate limits and tokens do not exist for
PostgreSQL), so no test has to skip.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import psycopg
import pytest

from agent.daemon import Runtime, build_runtime, open_config
from agent.model import Change, Cursor, Op, new_trace_id, utcnow
from connectors.base import Sink, Source
from connectors.dynamics import DynamicsEmulator
from connectors.emulator import EmulatorApp, EmulatorServer, EmuResponse
from connectors.hubspot import HubSpotEmulator
from connectors.netsuite.emulator import NetSuiteEmulator, ns_error
from connectors.postgres import drop
from connectors.salesforce.emulator import SalesforceEmulator
from tests.erp import dsn_parts, load_erp

Side = Literal["read", "write"]

API_SYSTEMS = ("salesforce", "hubspot", "dynamics", "netsuite")
ALL_SYSTEMS = (*API_SYSTEMS, pytest.param("postgres", marks=pytest.mark.pg))
REFUSED_NAME = "Refused Industries"


class System:
    """One connector under contract: built from config as the daemon would, with uniform operations."""

    kind = ""
    object_name = ""
    pk = ""  # the change key field, and the key of an op addressing a known record
    ext = ""  # the external-id field an op upserts on
    name_field = ""
    page = 0  # records per server page the connector meets
    walk = 0  # records one walk needs to cross every page (and query cap) boundary

    def __init__(self, tmp_path: Path, config: str) -> None:
        self.config_path = tmp_path / "config.toml"
        self.config_path.write_text(
            f'[agent]\nstate_path = "{tmp_path / "state.db"}"\n{config}'
            f"\n[entities.customer.systems.{self.kind}]\n"
            f'object = "{self.object_name}"\nkey = "{self.pk}"\nexternal_id = "{self.ext}"\n'
        )
        self._counter = 0
        self.runtime = self._build()

    def _build(self) -> Runtime:
        runtime = build_runtime(open_config(self.config_path))
        ((name, source),) = runtime.sources.items()
        self.source: Source = source
        self.sink: Sink = runtime.sinks[name]
        return runtime

    def restart(self) -> None:
        """Stop the connector and build a new one from the same config (a process restart)."""
        self.runtime.close()
        self.runtime = self._build()

    def close(self) -> None:
        """Release what the connector holds."""
        self.runtime.close()

    @property
    def streams(self) -> tuple[str, ...]:
        """Every stream the source reads for the mapped entity (NetSuite adds its deletes)."""
        return tuple(self.source.streams())

    def drain(
        self, cursors: Mapping[str, Cursor] | None = None, *, limit: int = 1000
    ) -> tuple[list[Change], dict[str, Cursor]]:
        """Read every stream until it has no more, committing each batch as capture does."""
        changes: list[Change] = []
        out: dict[str, Cursor] = {}
        for stream in self.streams:
            cursor = (cursors or {}).get(stream)
            for _ in range(1000):
                batch = self.source.read(stream, cursor, limit=limit)
                changes.extend(batch.changes)
                cursor = batch.next_cursor
                self.source.commit(stream, cursor)
                if not batch.more:
                    break
            else:
                raise AssertionError(f"{self.kind}/{stream}: the walk never finished")
            out[stream] = cursor
        return changes, out

    def record_id(self, change: Change) -> str:
        """The id of the record a change is about, as text."""
        return str(change.key[self.pk])

    def upsert_op(
        self, n: int, *, name: str | None = None, known_id: str | None = None, bad: bool = False
    ) -> Op:
        """An upsert as resolve builds it: by external id, or by the record's own id once linked."""
        key = {self.pk: known_id} if known_id is not None else {self.ext: f"X-{n}"}
        fields = {self.name_field: name or f"Firm {n}", **(self.refused_fields() if bad else {})}
        return Op(
            f"k{n}-{new_trace_id()}",
            self.kind,
            "customer",
            f"c{n}",
            self.object_name,
            "upsert",
            key,
            fields,
            new_trace_id(),
        )

    def delete_op(self, record_id: str) -> Op:
        """A delete of a linked record, keyed by its own id (what resolve sends)."""
        return Op(
            f"d-{record_id}",
            self.kind,
            "customer",
            "c",
            self.object_name,
            "delete",
            {self.pk: record_id},
            {},
            new_trace_id(),
        )

    def next_ext(self) -> str:
        """A fresh external-id value for a record created behind the connector's back."""
        self._counter += 1
        return f"E-{self._counter}"

    # --- per system ----------------------------------------------------------------------------
    def create(self, n: int, *, tie: bool = True) -> list[str]:
        """Create ``n`` records directly in the system; ``tie``: all with one modification time."""
        raise NotImplementedError

    def update(self, record_id: str) -> None:
        """Change a record's name directly in the system."""
        raise NotImplementedError

    def delete(self, record_id: str) -> None:
        """Delete a record directly in the system."""
        raise NotImplementedError

    def settle(self) -> None:
        """Let the server's clock pass the connector's signpost, so what was written is readable."""

    def records(self) -> dict[str, Any]:
        """Live records: id -> name."""
        raise NotImplementedError

    def refused_fields(self) -> dict[str, Any]:
        """Fields with a value the system refuses for one record (its own validation)."""
        raise NotImplementedError

    def inject_rate_limit(self, side: Side) -> None:
        """Make the next read (or write) call meet the vendor's throttle answer."""
        raise NotImplementedError

    def expire_tokens(self) -> None:
        """Invalidate every access token the server issued."""
        raise NotImplementedError

    def token_grants(self) -> int:
        """How many access tokens the server has granted so far."""
        raise NotImplementedError


class _Emulated(System):
    """A system behind a vendor emulator on a loopback port, its clock frozen at the start."""

    settle_step = timedelta(seconds=1)
    spread_step = timedelta(seconds=1)

    def __init__(self, tmp_path: Path, emulator: EmulatorApp, config: str) -> None:
        self.emu = emulator
        self.emu.freeze_clock(utcnow().replace(microsecond=0))
        self.server = EmulatorServer(emulator).start()
        super().__init__(tmp_path, config.replace("{url}", self.server.url))

    def close(self) -> None:
        """Release the connector, then stop the server."""
        super().close()
        self.server.stop()

    def settle(self) -> None:
        """Step the emulator clock past the connector's safety lag."""
        self.emu.shift_clock(self.settle_step)

    def create(self, n: int, *, tie: bool = True) -> list[str]:
        """Create ``n`` records; without ``tie`` the clock steps between them."""
        ids = []
        for i in range(n):
            if i and not tie:
                self.emu.shift_clock(self.spread_step)
            ids.append(self._insert(f"Firm {self._counter + 1}", self.next_ext()))
        return ids

    def _insert(self, name: str, ext: str) -> str:
        raise NotImplementedError


class _Salesforce(_Emulated):
    kind, object_name, pk, ext, name_field = "salesforce", "Account", "Id", "ERP_Id__c", "Name"
    page, walk = 3, 8
    settle_step = timedelta(seconds=3)  # the connector's safety lag is 2 s

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SF_CLIENT_ID", "syncagent")
        monkeypatch.setenv("SF_CLIENT_SECRET", "s3cret")
        emu = SalesforceEmulator(page_size=self.page)
        emu.schemas["Account"].add_rule(
            lambda r: (
                ("FIELD_CUSTOM_VALIDATION_EXCEPTION", "this name is refused", ["Name"])
                if r.get("Name") == REFUSED_NAME
                else None
            )
        )
        super().__init__(tmp_path, emu, _SF_CONFIG)
        self.sf = emu

    def _insert(self, name: str, ext: str) -> str:
        return self.sf.insert("Account", {"Name": name, "ERP_Id__c": ext})

    def update(self, record_id: str) -> None:
        """Rename the account."""
        self.sf.update("Account", record_id, {"Name": "Renamed"})

    def delete(self, record_id: str) -> None:
        """Soft-delete the account (Recycle Bin)."""
        self.sf.delete("Account", record_id)

    def records(self) -> dict[str, Any]:
        """Live accounts."""
        return {r["Id"]: r["Name"] for r in self.sf.all("Account", include_deleted=False)}

    def refused_fields(self) -> dict[str, Any]:
        """A name the org's validation rule refuses."""
        return {"Name": REFUSED_NAME}

    def inject_rate_limit(self, side: Side) -> None:
        """403 REQUEST_LIMIT_EXCEEDED on the next API call."""
        self.sf.throttle_next(1)

    def expire_tokens(self) -> None:
        """End every session."""
        self.sf.expire_all_tokens()

    def token_grants(self) -> int:
        """Sessions issued."""
        return self.sf.tokens_issued


class _HubSpot(_Emulated):
    kind, object_name, pk, ext, name_field = "hubspot", "companies", "id", "erp_id", "name"
    page, walk = 200, 260  # search pages are at most 200; the emulator's search cap is set to 250
    settle_step = timedelta(seconds=6)  # the connector's safety lag is 5 s
    spread_step = timedelta(milliseconds=1)

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("HS_CLIENT_ID", "emulator-client")
        monkeypatch.setenv("HS_CLIENT_SECRET", "emulator-secret")
        monkeypatch.setenv("HS_REFRESH_TOKEN", "emulator-refresh")
        emu = HubSpotEmulator(search_rate_per_s=1000, search_cap=250, burst_limit=10_000)
        super().__init__(tmp_path, emu, _HS_CONFIG)
        self.hs = emu

    def _insert(self, name: str, ext: str) -> str:
        return self.hs.insert("companies", {"name": name, "erp_id": ext})

    def update(self, record_id: str) -> None:
        """Rename the company."""
        self.hs.update("companies", record_id, {"name": "Renamed"})

    def delete(self, record_id: str) -> None:
        """Archive the company."""
        self.hs.archive("companies", record_id)

    def records(self) -> dict[str, Any]:
        """Live companies."""
        return {r["id"]: r["properties"]["name"] for r in self.hs.all("companies")}

    def refused_fields(self) -> dict[str, Any]:
        """A lifecycle stage outside the enumeration's options."""
        return {"lifecyclestage": "not-a-stage"}

    def inject_rate_limit(self, side: Side) -> None:
        """429 with policyName TEN_SECONDLY_ROLLING on the next CRM call."""
        self.hs.throttle_next(policy="TEN_SECONDLY_ROLLING", retry_after=1, path_prefix="/crm")

    def expire_tokens(self) -> None:
        """Expire every OAuth access token."""
        self.hs.expire_all_tokens()

    def token_grants(self) -> int:
        """OAuth refresh grants answered."""
        return sum(1 for r in self.hs.requests(path_prefix="/oauth/v1/token") if r.status == 200)


class _Dynamics(_Emulated):
    kind, object_name, pk, ext, name_field = "dynamics", "accounts", "accountid", "erp_customerid", "name"
    page, walk = 3, 8

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("DV_CLIENT_ID", "syncagent")
        monkeypatch.setenv("DV_CLIENT_SECRET", "s3cret")
        emu = DynamicsEmulator()
        super().__init__(tmp_path, emu, _DV_CONFIG)
        self.dv = emu

    def _insert(self, name: str, ext: str) -> str:
        return self.dv.insert("accounts", {"name": name, "erp_customerid": ext})

    def update(self, record_id: str) -> None:
        """Rename the account."""
        self.dv.update("accounts", record_id, {"name": "Renamed"})

    def delete(self, record_id: str) -> None:
        """Delete the account (change tracking keeps a tombstone)."""
        self.dv.delete("accounts", record_id)

    def records(self) -> dict[str, Any]:
        """Live accounts."""
        return {r["accountid"]: r["name"] for r in self.dv.all("accounts")}

    def refused_fields(self) -> dict[str, Any]:
        """A name longer than the column's 160 characters."""
        return {"name": "N" * 161}

    def inject_rate_limit(self, side: Side) -> None:
        """429 with Retry-After (service protection) on the next Web API call."""
        body = {"error": {"code": "0x80072322", "message": "Number of requests exceeded the limit."}}
        self.dv.inject(EmuResponse(429, body, {"Retry-After": "2"}), path_prefix="/api/data")

    def expire_tokens(self) -> None:
        """Expire every Entra ID access token."""
        self.dv.expire_all_tokens()

    def token_grants(self) -> int:
        """Client-credentials grants answered."""
        return sum(1 for r in self.dv.requests(path_prefix="/contoso-tenant/oauth2") if r.status == 200)


class _NetSuite(_Emulated):
    kind, object_name, pk, ext, name_field = "netsuite", "customer", "id", "externalid", "companyname"
    page, walk = 10, 35  # config page_size 10 and query_cap 30, the emulator's cap 30 too
    settle_step = timedelta(seconds=3)  # past any safety lag a poller should keep

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("NS_CLIENT_ID", "syncagent-client")
        monkeypatch.setenv("NS_PRIVATE_KEY", "emulator-secret")
        emu = NetSuiteEmulator(query_cap=30)
        emu.allow("customer", "currency", ("1", "2"))
        super().__init__(tmp_path, emu, _NS_CONFIG)
        self.ns = emu

    def _insert(self, name: str, ext: str) -> str:
        return self.ns.insert("customer", {"companyname": name, "externalid": ext})

    def update(self, record_id: str) -> None:
        """Rename the customer."""
        self.ns.update("customer", record_id, {"companyname": "Renamed"})

    def delete(self, record_id: str) -> None:
        """Delete the customer (logged in the deleted-records table)."""
        self.ns.delete("customer", record_id)

    def records(self) -> dict[str, Any]:
        """Live customers."""
        return {str(r["id"]): r.get("companyname") for r in self.ns.all("customer")}

    def refused_fields(self) -> dict[str, Any]:
        """A currency the account does not offer."""
        return {"currency": "99"}

    def inject_rate_limit(self, side: Side) -> None:
        """429 CONCURRENCY_LIMIT_EXCEEDED (no Retry-After) on the next SuiteQL or record call."""
        prefix = "/services/rest/query" if side == "read" else "/services/rest/record"
        throttle = ns_error(429, "CONCURRENCY_LIMIT_EXCEEDED", "Concurrent request limit exceeded.")
        self.ns.inject(throttle, path_prefix=prefix)

    def expire_tokens(self) -> None:
        """Forget every access token."""
        self.ns.expire_tokens()

    def token_grants(self) -> int:
        """Client-assertion grants answered."""
        return len(self.ns.grants())


class _Postgres(System):
    kind, object_name, pk, ext, name_field = "erp", "erp.customers", "id", "crm_id", "name"
    page, walk = 4, 8  # reads fetch ``limit`` pgoutput messages; a change takes 3-4 of them

    def __init__(self, tmp_path: Path, dsn: str) -> None:
        from agent import ops

        self.dsn = dsn
        load_erp(dsn)
        p = dsn_parts(dsn)
        self.dbname = p["dbname"]
        config = (
            f'[systems.erp]\ntype = "postgres"\nhost = "{p["host"]}"\nport = {p["port"]}\n'
            f'dbname = "{p["dbname"]}"\nuser = "{p["user"]}"\nslot = "{p["dbname"]}"\n'
            f'publication = "{p["dbname"]}"\norigin = "{p["dbname"]}"\n' + _PG_FIELDS
        )
        super().__init__(tmp_path, config)
        ops.init(self.runtime.config, dry_run=False)

    def close(self) -> None:
        """Release the connections, then drop slot, publication and origin (slots are cluster-wide)."""
        super().close()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            drop(conn, self.dbname, self.dbname, self.dbname)

    def _sql(self, query: str, *args: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query, args or None)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def create(self, n: int, *, tie: bool = True) -> list[str]:
        """Insert ``n`` rows: in one transaction (one commit LSN and time: a tie) or one each."""
        names = [f"Firm {self._counter + i + 1}" for i in range(n)]
        self._counter += n
        if tie:
            rows = self._sql("INSERT INTO erp.customers (name) SELECT unnest(%s::text[]) RETURNING id", names)
        else:
            rows = [
                self._sql("INSERT INTO erp.customers (name) VALUES (%s) RETURNING id", x)[0] for x in names
            ]
        return [str(r[0]) for r in rows]

    def update(self, record_id: str) -> None:
        """Rename the row."""
        self._sql("UPDATE erp.customers SET name = 'Renamed' WHERE id = %s", int(record_id))

    def delete(self, record_id: str) -> None:
        """Delete the row."""
        self._sql("DELETE FROM erp.customers WHERE id = %s", int(record_id))

    def records(self) -> dict[str, Any]:
        """Rows of erp.customers."""
        return {str(i): name for i, name in self._sql("SELECT id, name FROM erp.customers")}

    def refused_fields(self) -> dict[str, Any]:
        """A status the table's CHECK constraint refuses."""
        return {"status": "bogus"}


_FIELDS = '\n[entities.customer.fields]\nname = {{owner = "{k}", {k} = "{name}"}}\n'
_SF_CONFIG = """
[systems.salesforce]
type = "salesforce"
instance_url = "{url}"
client_id = {env = "SF_CLIENT_ID"}
client_secret = {env = "SF_CLIENT_SECRET"}
lookback_seconds = 5
""" + _FIELDS.format(k="salesforce", name="Name")
_HS_CONFIG = (
    """
[systems.hubspot]
type = "hubspot"
base_url = "{url}"
client_id = {env = "HS_CLIENT_ID"}
client_secret = {env = "HS_CLIENT_SECRET"}
refresh_token = {env = "HS_REFRESH_TOKEN"}
lookback_seconds = 5
search_rate_per_s = 1000.0
"""
    + _FIELDS.format(k="hubspot", name="name")
    + 'stage = {owner = "hubspot", hubspot = "lifecyclestage"}\n'
)
_DV_CONFIG = """
[systems.dynamics]
type = "dynamics"
base_url = "{url}"
tenant = "contoso-tenant"
token_url = "{url}/contoso-tenant/oauth2/v2.0/token"
client_id = {env = "DV_CLIENT_ID"}
client_secret = {env = "DV_CLIENT_SECRET"}
page_size = 3
lookback_seconds = 5
""" + _FIELDS.format(k="dynamics", name="name")
_NS_CONFIG = """
[systems.netsuite]
type = "netsuite"
base_url = "{url}"
account = "1234567"
client_id = {env = "NS_CLIENT_ID"}
certificate_id = "syncagent-cert"
private_key = {env = "NS_PRIVATE_KEY"}
signing_algorithm = "HS256"
page_size = 10
query_cap = 30
""" + _FIELDS.format(k="netsuite", name="companyname")
_PG_FIELDS = _FIELDS.format(k="erp", name="name") + 'status = {owner = "erp", erp = "status"}\n'


def _start(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> System:
    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    if kind == "salesforce":
        return _Salesforce(tmp_path, monkeypatch)
    if kind == "hubspot":
        return _HubSpot(tmp_path, monkeypatch)
    if kind == "dynamics":
        return _Dynamics(tmp_path, monkeypatch)
    if kind == "netsuite":
        return _NetSuite(tmp_path, monkeypatch)
    return _Postgres(tmp_path, request.getfixturevalue("pg_dsn"))


@pytest.fixture(params=ALL_SYSTEMS)
def system(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[System]:
    """Each connector in turn, built from config, against its emulator or a fresh database."""
    started = _start(request.param, request, tmp_path)
    yield started
    started.close()


@pytest.fixture(params=API_SYSTEMS)
def api_system(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[System]:
    """Each HTTP connector in turn (the behaviours of rate limits and tokens)."""
    started = _start(request.param, request, tmp_path)
    yield started
    started.close()
