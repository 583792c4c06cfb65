"""packaging/: the systemd unit's options, the snippets, install.sh's dry run, the ERP role script."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from agent.localpg import LocalCluster
from connectors.postgres.pgoutput import str_to_lsn
from connectors.postgres.slot import PeekCursor, TableSpec, advance, ensure

ROOT = Path(__file__).resolve().parents[2]
PACKAGING = ROOT / "packaging"
UNIT = PACKAGING / "syncagent.service"

# Every option the service relies on, with its exact value (the brief and design.md "Operations").
EXPECTED = {
    "Service": {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "/opt/syncagent/venv/bin/syncagent -c /etc/syncagent/config.toml run",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Environment": "SYNCAGENT_CONFIG=/etc/syncagent/config.toml",
        "WatchdogSec": "60",
        "Restart": "on-failure",
        "RestartSec": "5",
        "RestartPreventExitStatus": "2",
        "TimeoutStopSec": "90",
        "KillSignal": "SIGTERM",
        "User": "syncagent",
        "Group": "syncagent",
        "StateDirectory": "syncagent",
        "StateDirectoryMode": "0700",
        "ConfigurationDirectory": "syncagent",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "ProtectProc": "invisible",
        "ProcSubset": "pid",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "UMask": "0077",
        "DevicePolicy": "closed",
        "RemoveIPC": "yes",
        "KeyringMode": "private",
    },
    "Install": {"WantedBy": "multi-user.target"},
}


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value in order (systemd keys may repeat)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            out.setdefault(section, {})
            continue
        assert section is not None, f"line {n}: an option outside any section"
        assert "=" in line, f"line {n}: not key=value: {raw!r}"
        key, _, value = line.partition("=")
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key.strip()), f"line {n}: bad key {key!r}"
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [(s, k, v) for s, opts in EXPECTED.items() for k, v in opts.items()],
)
def test_unit_sets_option_when_installed(
    unit: dict[str, dict[str, list[str]]], section: str, key: str, value: str
) -> None:
    assert unit[section].get(key) == [value]


def test_unit_filters_syscalls_to_service_set_without_privileged_when_loaded(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    assert unit["Service"]["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert unit["Service"]["SystemCallErrorNumber"] == ["EPERM"]


def test_unit_keeps_erp_and_crm_reachable_when_hardened(unit: dict[str, dict[str, list[str]]]) -> None:
    svc = unit["Service"]
    assert "IPAddressDeny" not in svc
    assert "PrivateNetwork" not in svc
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(svc["RestrictAddressFamilies"][0].split())


def test_unit_loads_credentials_named_in_example_config_when_listed(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    example = (ROOT / "config.example.toml").read_text()
    used = set(re.findall(r'^[# ]*\w+ *= *\{credential = "([a-z0-9_]+)"\}', example, re.M))
    active = {v.split(":", 1)[0]: v.split(":", 1)[1] for v in unit["Service"]["LoadCredential"]}
    commented = set(re.findall(r"^#LoadCredential=([a-z0-9_]+):", UNIT.read_text(), re.M))
    assert active == {
        "erp_password": "/etc/syncagent/credentials/erp_password",
        "sf_client_secret": "/etc/syncagent/credentials/sf_client_secret",
    }
    assert used <= set(active) | commented, used - set(active) - commented
    assert all(path == f"/etc/syncagent/credentials/{name}" for name, path in active.items())


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_exposure_stays_low_when_scored_offline() -> None:
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout + out.stderr)
    assert match, out.stdout[-2000:] + out.stderr
    assert float(match.group(1)) <= 1.5


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_verifies_cleanly_when_binary_exists(tmp_path: Path) -> None:
    # verify also checks that ExecStart exists; point it at a binary this machine has.
    copy = tmp_path / "syncagent.service"
    copy.write_text(UNIT.read_text().replace("/opt/syncagent/venv/bin/syncagent", "/bin/true"))
    out = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "syncagent.service" not in out.stderr, out.stderr


def test_sysusers_and_tmpfiles_declare_user_and_private_folders_when_read() -> None:
    sysusers = [
        line
        for line in (PACKAGING / "syncagent.sysusers").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    tmpfiles = [
        line.split()
        for line in (PACKAGING / "syncagent.tmpfiles").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert sysusers == ['u syncagent - "syncagent CRM/ERP sync" /var/lib/syncagent']
    assert tmpfiles == [
        ["d", "/var/lib/syncagent", "0700", "syncagent", "syncagent", "-"],
        ["d", "/etc/syncagent/credentials", "0700", "root", "root", "-"],
    ]


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None or os.geteuid() != 0,
    reason="needs systemd-sysusers, systemd-tmpfiles and root",
)
def test_snippets_create_user_and_folders_when_applied_to_scratch_root(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    for argv in (
        ["systemd-sysusers", f"--root={tmp_path}", str(PACKAGING / "syncagent.sysusers")],
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(PACKAGING / "syncagent.tmpfiles")],
    ):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
    passwd = (tmp_path / "etc/passwd").read_text()
    assert re.search(r"^syncagent:x:\d+:\d+:syncagent CRM/ERP sync:/var/lib/syncagent:", passwd, re.M)
    state = (tmp_path / "var/lib/syncagent").stat()
    creds = (tmp_path / "etc/syncagent/credentials").stat()
    assert (state.st_mode & 0o777, creds.st_mode & 0o777, creds.st_uid) == (0o700, 0o700, 0)
    assert state.st_uid != 0


# --- install.sh ---------------------------------------------------------------------------------

SYSTEM_PATHS = [
    Path("/etc/systemd/system/syncagent.service"),
    Path("/etc/sysusers.d/syncagent.conf"),
    Path("/etc/tmpfiles.d/syncagent.conf"),
    Path("/etc/syncagent"),
    Path("/opt/syncagent"),
]


def _fingerprint() -> list[tuple[str, Any]]:
    return [(str(p), (p.stat().st_mtime_ns, p.stat().st_ino) if p.exists() else None) for p in SYSTEM_PATHS]


def _install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(PACKAGING / "install.sh"), *args], capture_output=True, text=True, timeout=60
    )


def test_install_script_parses_when_checked_by_bash() -> None:
    out = subprocess.run(["bash", "-n", str(PACKAGING / "install.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "set -euo pipefail" in (PACKAGING / "install.sh").read_text()


def test_install_dry_run_lists_every_step_and_changes_nothing_when_run(tmp_path: Path) -> None:
    prefix = tmp_path / "opt" / "syncagent"
    before = _fingerprint()
    out = _install("--dry-run", "--prefix", str(prefix))
    assert out.returncode == 0, out.stderr
    assert _fingerprint() == before
    assert not (tmp_path / "opt").exists()
    steps = [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]
    wanted = [
        "install -m 0644 {src}/packaging/syncagent.sysusers /etc/sysusers.d/syncagent.conf",
        "install -m 0644 {src}/packaging/syncagent.tmpfiles /etc/tmpfiles.d/syncagent.conf",
        "{py} -m venv {prefix}/venv",
        "{prefix}/venv/bin/python -m pip install --quiet --upgrade {src}[fast]",
        "sed s#/opt/syncagent#{prefix}#g {src}/packaging/syncagent.service > "
        "/etc/systemd/system/syncagent.service",
    ]
    for w in wanted:
        step = w.format(src=ROOT, prefix=prefix, py="python3")
        assert step in steps, (step, steps)
    if shutil.which("systemd-sysusers"):
        assert "systemd-sysusers /etc/sysusers.d/syncagent.conf" in steps
    if Path("/etc/syncagent/config.toml").exists():
        assert "kept the existing /etc/syncagent/config.toml" in out.stdout
    else:
        assert any(s.startswith("install -m 0640 -o root -g syncagent") for s in steps)
    for hint in ("sa check", "sa init --dry-run", "systemctl enable --now syncagent"):
        assert hint in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prefix", "relative/dir", "--dry-run"], "absolute path"),
        (["--frobnicate"], "unknown option"),
        (["--dry-run", "--python", "no-such-python-3"], "not found"),
    ],
)
def test_install_refuses_when_arguments_are_wrong(args: list[str], message: str) -> None:
    before = _fingerprint()
    out = _install(*args)
    assert out.returncode in (1, 2)
    assert message in out.stderr
    assert _fingerprint() == before


# --- postgres-setup.sql ---------------------------------------------------------------------------

ERP_SCHEMA = """
CREATE SCHEMA erp;
CREATE TABLE erp.customers (id bigserial PRIMARY KEY, name text NOT NULL, status text NOT NULL);
CREATE TABLE erp.contracts (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, title text);
CREATE TABLE erp.payroll (id int PRIMARY KEY, salary numeric);
ALTER TABLE erp.customers REPLICA IDENTITY FULL;
INSERT INTO erp.customers (name, status) VALUES ('Acme', 'active');
"""


class ErpRole:
    """Names for one test: role, slot, origin and publication are cluster-wide, so unique."""

    def __init__(self, admin_dsn: str) -> None:
        tag = uuid.uuid4().hex[:10]
        self.admin_dsn = admin_dsn
        self.role = f"sa_{tag}"
        self.slot = f"sa_slot_{tag}"
        self.origin = f"sa_origin_{tag}"
        self.publication = "syncagent"
        params = psycopg.conninfo.conninfo_to_dict(admin_dsn)
        params["user"] = self.role
        self.role_dsn = psycopg.conninfo.make_conninfo(**params)  # type: ignore[arg-type]

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.admin_dsn, autocommit=True)

    def as_role(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.role_dsn, autocommit=True)


@pytest.fixture
def erp(pg_cluster: LocalCluster, pg_dsn: str) -> Iterator[ErpRole]:
    names = ErpRole(pg_dsn)
    with names.admin() as conn:
        conn.execute(ERP_SCHEMA)
    yield names
    with names.admin() as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
            (names.slot,),
        )
        conn.execute(
            "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = %s",
            (names.origin,),
        )
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (names.role,)).fetchone():
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(names.role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(names.role)))


def _psql(cluster: LocalCluster, dsn: str, **variables: str) -> subprocess.CompletedProcess[str]:
    psql = cluster.bindir / "psql"
    argv = [str(psql) if psql.exists() else "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1"]
    for name, value in variables.items():
        argv += ["-v", f"{name}={value}"]
    argv += ["-f", str(PACKAGING / "postgres-setup.sql"), dsn]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def _denied(conn: psycopg.Connection[Any], statement: str) -> bool:
    try:
        conn.execute(statement)
    except psycopg.errors.InsufficientPrivilege:
        return True
    return False


@pytest.mark.pg
def test_setup_sql_role_captures_and_writes_mapped_tables_only_when_granted(
    pg_cluster: LocalCluster, erp: ErpRole
) -> None:
    variables = {
        "role": erp.role,
        "read_tables": "{customers,erp.contracts}",
        "write_tables": "{erp.customers}",
        "init_origin": "on",
    }
    for _ in range(2):  # a second run changes nothing and does not fail
        out = _psql(pg_cluster, erp.admin_dsn, **variables)
        assert out.returncode == 0, out.stderr
    tables = [TableSpec("erp", "customers", row_filter="status <> 'archived'"), TableSpec("erp", "contracts")]

    # The documented split: the table owner runs the PUBLICATION lines init --dry-run prints...
    with erp.admin() as admin:
        plan = ensure(
            admin, slot=erp.slot, publication=erp.publication, origin=erp.origin, tables=tables, dry_run=True
        )
        for stmt in plan:
            if "PUBLICATION" in stmt:
                admin.execute(stmt.encode())
    # ...and init as the agent's role creates what is left: the slot and the origin.
    with erp.as_role() as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(
                sql.SQL("ALTER PUBLICATION {} DROP TABLE erp.contracts").format(
                    sql.Identifier(erp.publication)
                )
            )
        done = ensure(
            conn, slot=erp.slot, publication=erp.publication, origin=erp.origin, tables=tables, dry_run=False
        )
        assert [s.split("(")[0] for s in done] == [
            "SELECT pg_create_logical_replication_slot",
            "SELECT pg_replication_origin_create",
        ]

    with erp.admin() as admin:
        admin.execute("INSERT INTO erp.customers (name, status) VALUES ('Globex', 'active')")

    with erp.as_role() as conn:
        peek = PeekCursor(conn, slot=erp.slot, publication=erp.publication, max_poll_bytes=2**24)
        messages = peek.fetch(100)
        peek.close()
        assert [m[:1] for m in messages] == [b"B", b"R", b"I", b"C"]
        (last_lsn,) = conn.execute(
            "SELECT max(lsn) FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
            "'proto_version', '1', 'publication_names', %s)",
            (erp.slot, erp.publication),
        ).fetchone()  # type: ignore[misc]
        assert advance(conn, erp.slot, str_to_lsn(str(last_lsn)))

        conn.execute("SELECT pg_replication_origin_session_setup(%s)", (erp.origin,))
        conn.execute("UPDATE erp.customers SET status = 'hold' WHERE name = 'Acme'")
        conn.execute("INSERT INTO erp.customers (name, status) VALUES ('Initech', 'active')")
        conn.execute("SELECT pg_replication_origin_session_reset()")
        assert conn.execute("SELECT count(*) FROM erp.contracts").fetchone() == (0,)

        assert _denied(conn, "SELECT * FROM erp.payroll")
        assert _denied(conn, "CREATE TABLE erp.sneaky (id int)")
        assert _denied(conn, "CREATE TABLE public.sneaky (id int)")
        assert _denied(conn, "INSERT INTO erp.contracts (title) VALUES ('x')")
        assert _denied(conn, "SELECT pg_replication_origin_drop('any')")

    with erp.as_role() as conn:
        rows = conn.execute(
            "SELECT substr(data, 1, 1) FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
            "'proto_version', '1', 'publication_names', %s)",
            (erp.slot, erp.publication),
        ).fetchall()
    # The agent's own transaction comes back tagged with its origin right after Begin.
    assert [bytes(r[0]) for r in rows][:3] == [b"B", b"O", b"R"]


@pytest.mark.pg
def test_setup_sql_withholds_origin_create_when_init_origin_is_off(
    pg_cluster: LocalCluster, erp: ErpRole
) -> None:
    out = _psql(pg_cluster, erp.admin_dsn, role=erp.role, read_tables="{erp.customers}")
    assert out.returncode == 0, out.stderr
    with erp.as_role() as conn:
        assert _denied(conn, f"SELECT pg_replication_origin_create('{erp.origin}')")
        assert _denied(conn, "UPDATE erp.customers SET status = 'x'")
        assert conn.execute("SELECT count(*) FROM erp.customers").fetchone() == (1,)


@pytest.mark.pg
@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({}, "set read_tables"),
        ({"read_tables": "{erp.customers}", "write_tables": "{erp.payroll}"}, "must also be in read_tables"),
        ({"read_tables": "{erp.nope}"}, 'relation "erp.nope" does not exist'),
    ],
)
def test_setup_sql_refuses_and_grants_nothing_when_variables_are_wrong(
    pg_cluster: LocalCluster, erp: ErpRole, variables: dict[str, str], message: str
) -> None:
    out = _psql(pg_cluster, erp.admin_dsn, role=erp.role, **variables)
    assert out.returncode != 0
    assert message in out.stderr
    with erp.admin() as conn:
        assert conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (erp.role,)).fetchone() is None
