"""Secrets never leave their slot; TLS is verified unless switched off, loudly; state is owner-only.

A canary value sits in every credential slot of a real config (the ERP password through
``$CREDENTIALS_DIRECTORY``, the Salesforce client id and secret through the environment),
and the ERP role really needs that password (a pg_hba line for that role only). The agent
then runs every command, with traffic both ways, refused credentials and debug logging in
both log formats; the canary must appear in no output, no log line, no state row and no byte
of the state files.
"""

from __future__ import annotations

import json
import os
import sqlite3
import ssl
import stat
import subprocess
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql

from agent.cli import cli
from agent.config import load_config
from agent.daemon import build_runtime
from agent.localpg import LocalCluster
from connectors.emulator import EmulatorServer
from connectors.salesforce.emulator import SalesforceEmulator
from tests.erp import add_sf_fields, dsn_parts, load_erp, sync_config

pytestmark = [pytest.mark.e2e]

CANARY = "CANARY-7f3a9c"
ERP_PASSWORD = f"{CANARY}-erp-password"
SF_CLIENT_ID = f"{CANARY}-sf-client-id"
SF_CLIENT_SECRET = f"{CANARY}-sf-client-secret"


# --- the canary run ------------------------------------------------------------------------------


class CanaryEnv:
    """A synced ERP <-> Salesforce setup whose every credential is a canary, and all it printed."""

    def __init__(self, dsn: str, role: str, cfg: Path, sf: SalesforceEmulator, state_path: Path) -> None:
        self.dsn, self.role, self.cfg, self.sf, self.state_path = dsn, role, cfg, sf, state_path
        self.seen: list[str] = []

    def cli(self, *args: str, log_format: str = "logfmt") -> tuple[int, str, str]:
        argv = ["--log-level", "debug", "--log-format", log_format, "-c", str(self.cfg), *args]
        res = CliRunner().invoke(cli, argv)
        crashed = res.exception is not None and not isinstance(res.exception, SystemExit)
        assert not crashed, f"{args} crashed: {res.exception!r}"
        self.seen += [res.stdout, res.stderr]
        return res.exit_code, res.stdout, res.stderr

    def cycle(self, n: int = 1, *, log_format: str = "logfmt") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for _ in range(n):
            self.sf.shift_clock(timedelta(seconds=3))
            _, stdout, _ = self.cli("run", "--once", log_format=log_format)
            out = json.loads(stdout.strip().splitlines()[-1])
        return out

    def sql(self, query: str | sql.Composed, *args: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query, args or None)
            return cur.fetchall() if cur.description else []


@pytest.fixture
def canary_role(pg_cluster: LocalCluster, pg_dsn: str) -> Iterator[str]:
    """A superuser role of this test's own that must log in with ERP_PASSWORD (scram)."""
    role = f"canary_{dsn_parts(pg_dsn)['dbname']}"
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(ERP_PASSWORD)
            )
        )
    hba = pg_cluster.root / "data" / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + original)
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")
    try:
        yield role
    finally:
        hba.write_text(original)
        with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")


@pytest.fixture
def canary(
    pg_dsn: str, canary_role: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[CanaryEnv]:
    creds = tmp_path / "creds"
    creds.mkdir(mode=0o700)
    (creds / "erp_password").write_text(ERP_PASSWORD + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv("SF_CLIENT_ID", SF_CLIENT_ID)
    monkeypatch.setenv("SF_CLIENT_SECRET", SF_CLIENT_SECRET)
    load_erp(pg_dsn)
    sf = SalesforceEmulator(clients={SF_CLIENT_ID: SF_CLIENT_SECRET})
    add_sf_fields(sf)
    role_dsn = pg_dsn.replace("user=postgres", f"user={canary_role}")
    try:
        with EmulatorServer(sf) as server:
            cfg = sync_config(tmp_path, role_dsn, server.url)
            text = cfg.read_text().replace(
                f'user = "{canary_role}"\n',
                f'user = "{canary_role}"\npassword = {{credential = "erp_password"}}\n',
            )
            assert "erp_password" in text
            cfg.write_text(text)
            yield CanaryEnv(pg_dsn, canary_role, cfg, sf, tmp_path / "state" / "state.db")
    finally:
        # the cluster has room for few slots and origins: give back the ones init made
        name = dsn_parts(pg_dsn)["dbname"]
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                (name,),
            )
            conn.execute(
                "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = %s",
                (name,),
            )


def _state_files(state_path: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in (
            state_path,
            state_path.with_name(state_path.name + "-wal"),
            state_path.with_name(state_path.name + "-shm"),
        )
        if p.exists()
    }


def _all_rows(state_path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the state file, by table."""
    conn = sqlite3.connect(f"file:{state_path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: [tuple(row) for row in conn.execute(f'SELECT * FROM "{t}"')] for t in tables}
    finally:
        conn.close()


def _exercise(env: CanaryEnv, log_format: str, tag: str) -> None:
    """Traffic both ways, a parked record, refused credentials on both sides, every read command."""
    env.sql(
        "INSERT INTO erp.customers (customer_no, name, status) VALUES (%s, %s, 'active')",
        f"C-{tag}",
        f"ERP {tag}",
    )
    sid = env.sf.insert("Account", {"Name": f"CRM {tag}", "Status__c": "Active"})
    env.sf.insert("Account", {"Name": f"Odd {tag}", "Status__c": "Not In The Map"})
    out = env.cycle(3, log_format=log_format)
    assert out["ok"], out
    assert env.sql("SELECT count(*) FROM erp.customers WHERE crm_id = %s", sid) == [(1,)]
    assert any(a["AccountNumber"] == f"C-{tag}" for a in env.sf.all("Account"))
    env.sf.update("Account", sid, {"Status__c": "On Hold"})  # an ERP-owned field: ignored, audited
    assert env.cycle(1, log_format=log_format)["ok"]

    # Salesforce refuses the secret the agent sends: an AuthError, logged and kept in health
    env.sf.clients[SF_CLIENT_ID] = "rotated-elsewhere"
    env.sf.expire_all_tokens()
    env.sf.insert("Account", {"Name": f"Late {tag}", "Status__c": "Active"})
    env.sf.shift_clock(timedelta(seconds=3))
    code, stdout, stderr = env.cli("run", "--once", log_format=log_format)
    assert code == 1 and "AuthError" in json.loads(stdout.strip().splitlines()[-1])["failures"]["crm"]
    assert "job_failed" in stderr
    env.cli("check", "--json", log_format=log_format)
    env.cli("status", log_format=log_format)
    env.sf.clients[SF_CLIENT_ID] = SF_CLIENT_SECRET

    # the ERP refuses the password the agent sends
    role = sql.Identifier(env.role)
    env.sql(sql.SQL("ALTER ROLE {} PASSWORD 'changed-by-dba'").format(role))
    code, _, stderr = env.cli("run", "--once", log_format=log_format)
    assert code == 1 and "password authentication failed" in stderr
    env.cli("check", log_format=log_format)
    env.sql(sql.SQL("ALTER ROLE {} PASSWORD {}").format(role, sql.Literal(ERP_PASSWORD)))
    assert env.cycle(2, log_format=log_format)["ok"]

    for args in (
        ("status",),
        ("status", "--json"),
        ("exceptions", "list"),
        ("exceptions", "list", "--status", "all", "--json"),
        ("exceptions", "show", "1"),
        ("exceptions", "show", "1", "--json"),
        ("journal",),
        ("journal", "--json", "--limit", "1000"),
        ("checkpoint", "list", "--json"),
        ("xref", "lookup", "customer", "crm", sid, "--json"),
        ("check",),
        ("init", "--dry-run"),
        ("exceptions", "resolve", "1", "--note", "reviewed", "--yes"),
    ):
        env.cli(*args, log_format=log_format)


@pytest.mark.pg
def test_security_canary_secrets_appear_in_no_output_log_row_or_state_byte(canary: CanaryEnv) -> None:
    code, out, err = canary.cli("init")
    assert code == 0, out + err
    # a reader kept open, so the -wal and -shm files are still there to be read at the end
    keeper = sqlite3.connect(f"file:{canary.state_path}?mode=ro", uri=True)
    try:
        keeper.execute("SELECT count(*) FROM sqlite_master").fetchone()
        _exercise(canary, "logfmt", "a")
        _exercise(canary, "json", "b")
        files = _state_files(canary.state_path)
        rows = _all_rows(canary.state_path)
    finally:
        keeper.close()

    assert CANARY not in repr(load_config(canary.cfg)), "the loaded Config shows a secret"
    text = "\n".join(canary.seen)
    assert "level=debug" in text and '"level": "debug"' in text, "debug logging was not on"
    assert "AuthError" in text and "password authentication failed" in text
    leaks = [line for line in text.splitlines() if CANARY in line]
    assert leaks == [], leaks[:5]
    assert all(rows[t] for t in ("journal", "audit", "exceptions", "checkpoints", "connector_health")), {
        t: len(r) for t, r in rows.items()
    }
    leaked_rows = [(t, r) for t, table in rows.items() for r in table if CANARY in repr(r)]
    assert leaked_rows == [], leaked_rows[:3]
    assert {"state.db", "state.db-wal"} <= set(files), sorted(files)
    for name, data in files.items():
        assert CANARY.encode() not in data, f"the canary is in the bytes of {name}"
        assert CANARY.encode("utf-16-le") not in data, f"the canary is in the bytes of {name} (UTF-16)"


@pytest.mark.parametrize(
    "slot",
    [
        f'password = "{ERP_PASSWORD}"',
        f'client_id = "{SF_CLIENT_ID}"',
        f'client_secret = "{SF_CLIENT_SECRET}"',
        f'pasword = "{ERP_PASSWORD}"',
        f'password = "{ERP_PASSWORD}',
    ],
    ids=["inline_password", "inline_client_id", "inline_client_secret", "misspelt_key", "syntax_error"],
)
def test_security_inline_secrets_are_refused_without_echoing_them(
    slot: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SF_CLIENT_ID", "id")
    monkeypatch.setenv("SF_CLIENT_SECRET", "secret")
    erp_slot = slot if "pass" in slot else ""
    crm_slot = slot if "client" in slot else ""
    cfg = tmp_path / "inline.toml"
    cfg.write_text(f"""[agent]
state_path = "{tmp_path / "state" / "state.db"}"

[systems.erp]
type = "postgres"
dbname = "erp"
user = "syncagent"
{erp_slot}

[systems.crm]
type = "salesforce"
instance_url = "http://127.0.0.1:1"
{crm_slot or 'client_id = {env = "SF_CLIENT_ID"}'}
{"" if "client_secret" in crm_slot else 'client_secret = {env = "SF_CLIENT_SECRET"}'}
""")
    for args in (("check",), ("status", "--json"), ("run", "--once")):
        res = CliRunner().invoke(cli, ["--log-level", "debug", "-c", str(cfg), *args])
        assert res.exit_code == 2, res.output
        assert CANARY not in res.output, res.output
    assert not (tmp_path / "state").exists()


# --- TLS ---------------------------------------------------------------------------------------


class TlsServer:
    """A loopback HTTPS server with a self-signed certificate that counts the requests it gets."""

    def __init__(self, folder: Path) -> None:
        cert, key = folder / "cert.pem", folder / "key.pem"
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
                "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        self.requests: list[str] = []
        seen = self.requests

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                seen.append(f"{self.command} {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                body = b"{}"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = _answer

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    server = TlsServer(tmp_path_factory.mktemp("tls"))
    yield server
    server.stop()


def _api_config(kind: str, url: str) -> str:
    tables = {
        "salesforce": f"""type = "salesforce"
instance_url = "{url}"
client_id = {{env = "T_ID"}}
client_secret = {{env = "T_SECRET"}}
""",
        "hubspot": f"""type = "hubspot"
base_url = "{url}"
token = {{env = "T_SECRET"}}
""",
        "dynamics": f"""type = "dynamics"
base_url = "{url}"
tenant = "contoso"
token_url = "{url}/token"
client_id = {{env = "T_ID"}}
client_secret = {{env = "T_SECRET"}}
""",
        "netsuite": f"""type = "netsuite"
base_url = "{url}"
account = "1234567"
token_url = "{url}/token"
client_id = {{env = "T_ID"}}
certificate_id = "cert-1"
private_key = {{env = "T_SECRET"}}
signing_algorithm = "HS256"
""",
    }
    return tables[kind]


API_TYPES = ("salesforce", "hubspot", "dynamics", "netsuite")
ENVIRON = {"T_ID": "tls-test-id", "T_SECRET": "tls-test-secret"}


# One mapped object per connector type, so that check() has something to look at.
_OBJECTS = {
    "salesforce": ("Account", "Id", "Name"),
    "hubspot": ("companies", "hs_object_id", "name"),
    "dynamics": ("accounts", "accountid", "name"),
    "netsuite": ("customer", "id", "companyname"),
}


def _write(tmp_path: Path, kind: str, url: str, extra: str = "") -> Path:
    obj, key, column = _OBJECTS[kind]
    cfg = tmp_path / f"{kind}.toml"
    cfg.write_text(
        f'[agent]\nstate_path = "{tmp_path / "state" / "state.db"}"\n\n[systems.api]\n'
        + _api_config(kind, url)
        + extra
        + f'\n[entities.customer.systems.api]\nobject = "{obj}"\nkey = "{key}"\n'
        + f'\n[entities.customer.fields]\nname = {{owner = "api", api = "{column}"}}\n'
    )
    return cfg


def _cert_refused(exc: BaseException) -> bool:
    node: BaseException | None = exc
    while node is not None:
        if isinstance(node, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(node):
            return True
        node = node.__cause__ or node.__context__
    return False


@pytest.mark.parametrize("kind", API_TYPES)
def test_security_api_clients_refuse_a_self_signed_certificate_by_default(
    kind: str, tls_server: TlsServer, tmp_path: Path
) -> None:
    config = load_config(_write(tmp_path, kind, tls_server.url), environ=ENVIRON)
    assert config.systems["api"].verify_tls is True
    rt = build_runtime(config)
    try:
        assert rt.clients, "the connector got no HTTP client from the composition root"
        before = len(tls_server.requests)
        for client in rt.clients:
            with pytest.raises(httpx.ConnectError) as caught:
                client.get("/")
            assert _cert_refused(caught.value), repr(caught.value)
        problems = rt.sources["api"].check()
        assert problems, "check() reached a server whose certificate it cannot verify"
        assert len(tls_server.requests) == before, tls_server.requests[before:]
    finally:
        rt.close()


@pytest.mark.parametrize("kind", API_TYPES)
def test_security_api_clients_reach_the_server_when_verify_tls_is_false(
    kind: str, tls_server: TlsServer, tmp_path: Path
) -> None:
    config = load_config(_write(tmp_path, kind, tls_server.url, "verify_tls = false\n"), environ=ENVIRON)
    rt = build_runtime(config)
    try:
        before = len(tls_server.requests)
        assert rt.clients[0].get("/probe").status_code == 200
        assert len(tls_server.requests) == before + 1
    finally:
        rt.close()


@pytest.mark.parametrize("log_format", ["logfmt", "json"])
def test_security_verify_tls_false_warns_at_every_start(
    log_format: str, tls_server: TlsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in ENVIRON.items():
        monkeypatch.setenv(k, v)
    insecure = _write(tmp_path, "salesforce", tls_server.url, "verify_tls = false\n")
    secure = tmp_path / "secure.toml"
    secure.write_text(insecure.read_text().replace("verify_tls = false\n", ""))

    def warnings(cfg: Path, *args: str) -> list[dict[str, Any] | str]:
        res = CliRunner().invoke(cli, ["--log-format", log_format, "-c", str(cfg), *args])
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
        lines: list[dict[str, Any] | str] = [
            ln for ln in res.stderr.splitlines() if "tls_verification_disabled" in ln
        ]
        if log_format == "json":
            return [json.loads(str(ln)) for ln in lines]
        return lines

    for start in (("run", "--once"), ("run", "--once"), ("check",)):
        found = warnings(insecure, *start)
        assert len(found) == 1, (start, found)
        line = found[0]
        if isinstance(line, dict):
            assert line["event"] == "tls_verification_disabled" and line["level"] == "warning"
            assert line["system"] == "api"
        else:
            assert "event=tls_verification_disabled" in line and "level=warning" in line
            assert "system=api" in line
    assert warnings(secure, "check") == []


# --- state file permissions ----------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_security_state_file_is_created_0600_in_a_0700_folder(
    umask: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in ENVIRON.items():
        monkeypatch.setenv(k, v)
    cfg = _write(tmp_path, "hubspot", "https://127.0.0.1:1")
    state = tmp_path / "state" / "state.db"
    old = os.umask(umask)
    try:
        res = CliRunner().invoke(cli, ["-c", str(cfg), "init"])
        assert res.exit_code == 0, res.output
        assert stat.S_IMODE(state.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(state.stat().st_mode) == 0o600
        # the WAL and shared-memory files exist while a connection is open
        conn = sqlite3.connect(state)
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS _probe (x)")
            conn.execute("DROP TABLE _probe")
            sidecars = [state.with_name(state.name + s) for s in ("-wal", "-shm")]
            assert all(p.exists() for p in sidecars)
            assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in sidecars} == {
                "state.db-wal": 0o600,
                "state.db-shm": 0o600,
            }
        finally:
            conn.close()
    finally:
        os.umask(old)
