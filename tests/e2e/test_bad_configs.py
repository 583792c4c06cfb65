"""A corpus of broken configs through the CLI: exit 2, file and key named, no traceback, no state.

Each file in ``tests/data/bad_configs/`` breaks one thing and says in its first line which
dotted key the error must name (``# expect: systems.erp.slot``). A file-level error (TOML
syntax, encoding) names the key ``-`` and says what else the message must hold on a second
line (``# expect-text: line 6``). ``# env-unset: NAME`` runs that file with ``NAME`` removed
from the environment. ``@STATE@`` in a file is replaced by a state path under the test's
temporary folder, which must still not exist after every command.

The configs point at servers that are not there (port 1): a config wrongly accepted shows up
as exit 1 and a state folder created, never as a hang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import cli
from agent.daemon import open_config
from agent.localpg import free_port

pytestmark = [pytest.mark.e2e]

CORPUS = Path(__file__).resolve().parents[1] / "data" / "bad_configs"
REPO = Path(__file__).resolve().parents[2]
COMMANDS: tuple[tuple[str, ...], ...] = (
    ("status",),
    ("status", "--json"),
    ("check",),
    ("init", "--dry-run"),
    ("run", "--once"),
)
DEFAULT_STATE_DIR = Path("/var/lib/syncagent")


@dataclass(frozen=True, slots=True)
class BadConfig:
    """One corpus file and what its error must say."""

    path: Path
    key: str
    text: str | None
    unset: tuple[str, ...]

    @property
    def id(self) -> str:
        return self.path.stem


def _load_corpus() -> list[BadConfig]:
    cases = []
    for path in sorted(CORPUS.glob("*.toml")):
        head = path.read_bytes().split(b"\n")[:3]
        lines = [h.decode("ascii", "replace").strip() for h in head]
        assert lines[0].startswith("# expect: "), f"{path.name}: first line must be '# expect: <key>'"
        key = lines[0].removeprefix("# expect: ").strip()
        text = next(
            (ln.removeprefix("# expect-text: ") for ln in lines if ln.startswith("# expect-text: ")), None
        )
        unset = tuple(ln.removeprefix("# env-unset: ") for ln in lines if ln.startswith("# env-unset: "))
        cases.append(BadConfig(path, key, text, unset))
    return cases


CASES = _load_corpus()


@dataclass(frozen=True, slots=True)
class Sandbox:
    """A temporary folder holding the installed config, a credentials folder and the state path."""

    root: Path
    state_dir: Path
    env: dict[str, str | None]

    def install(self, case: BadConfig) -> Path:
        """Copy the corpus file in, pointing its state path into the sandbox."""
        target = self.root / "etc" / case.path.name
        target.parent.mkdir(exist_ok=True)
        raw = case.path.read_bytes().replace(b"@STATE@", str(self.state_dir / "state.db").encode())
        target.write_bytes(raw)
        return target

    def env_for(self, case: BadConfig) -> dict[str, str | None]:
        env = dict(self.env)
        for name in case.unset:
            env[name] = None
        return env

    def untouched(self) -> list[str]:
        """What appeared in the sandbox besides the config and the credentials (should be nothing)."""
        return sorted(p.name for p in self.root.iterdir() if p.name not in ("etc", "creds"))


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "erp_password").write_text("not-a-real-password\n")
    monkeypatch.chdir(tmp_path)  # a relative state path would land here, and be seen
    env: dict[str, str | None] = {
        "SYNCAGENT_TEST_CLIENT_ID": "syncagent",
        "SYNCAGENT_TEST_CLIENT_SECRET": "s3cret",
        "CREDENTIALS_DIRECTORY": str(creds),
        "SYNCAGENT_TEST_UNSET": None,
        "SYNCAGENT_CONFIG": None,
    }
    return Sandbox(tmp_path, tmp_path / "state", env)


def _names_the_problem(output: str, cfg: Path, case: BadConfig) -> bool:
    if case.text is not None and case.text not in output:
        return False
    return f"{cfg}: {case.key}: " in output


def test_bad_configs_corpus_holds_at_least_50_files_each_naming_its_key() -> None:
    """The corpus is big enough and every file says what its error must name."""
    assert len(CASES) >= 50
    names = [c.path.name for c in CASES]
    assert all(n[:2].isdigit() and n[2] == "_" for n in names), names
    assert len({n[:2] for n in names}) == len(names), "two files share a number"
    assert all(c.key for c in CASES)
    assert all(c.text for c in CASES if c.key == "-"), "a file-level error needs '# expect-text:'"


def test_bad_configs_base_config_without_the_break_is_valid(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The skeleton the corpus files are built from passes, so each file fails only for its break."""
    cfg = sandbox.root / "etc" / "good.toml"
    cfg.parent.mkdir()
    cfg.write_text(f"""
[agent]
state_path = "{sandbox.state_dir / "state.db"}"

[systems.erp]
type = "postgres"
host = "127.0.0.1"
port = 1
dbname = "erp"
user = "syncagent"
password = {{credential = "erp_password"}}

[systems.crm]
type = "salesforce"
instance_url = "http://127.0.0.1:1"
client_id = {{env = "SYNCAGENT_TEST_CLIENT_ID"}}
client_secret = {{env = "SYNCAGENT_TEST_CLIENT_SECRET"}}

[entities.customer.systems.erp]
object = "erp.customers"
key = "id"
external_id = "crm_id"
row_filter = "status <> 'archived' AND lower(name) LIKE 'a%'"

[entities.customer.systems.crm]
object = "Account"
key = "Id"
external_id = "ERP_Id__c"

[entities.customer.fields]
name = {{owner = "crm", erp = "name", crm = "Name"}}
status = {{owner = "erp", erp = "status", crm = "Status__c", values = {{crm = {{active = "Active", hold = "On Hold"}}}}}}

[metrics]
listen = "127.0.0.1:9464"
""")
    for name, value in sandbox.env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    config = open_config(cfg)
    assert set(config.systems) == {"erp", "crm"}
    assert sandbox.untouched() == []


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_config_exits_2_naming_file_and_key_without_traceback_or_state(
    case: BadConfig, sandbox: Sandbox
) -> None:
    """status, check, init --dry-run and run --once all refuse the file the same way."""
    cfg = sandbox.install(case)
    default_existed = DEFAULT_STATE_DIR.exists()
    for args in COMMANDS:
        res = CliRunner().invoke(cli, ["-c", str(cfg), *args], env=sandbox.env_for(case))
        crashed = res.exception is not None and not isinstance(res.exception, SystemExit)
        assert not crashed, f"{args}: crashed with {res.exception!r}"
        assert res.exit_code == 2, f"{args}: exit {res.exit_code}\n{res.output}"
        assert "Traceback" not in res.output, args
        assert _names_the_problem(res.output, cfg, case), f"{args}: must name {case.key!r}\n{res.output}"
        if "--json" in args:
            body = json.loads(res.stdout)
            assert body["ok"] is False and body["error"] == "invalid configuration"
            assert any(e.startswith(f"{cfg}: {case.key}: ") for e in body["errors"]), body
    assert not sandbox.state_dir.exists(), "a state folder was created for an invalid config"
    assert sandbox.untouched() == [], "something was written next to the config"
    assert DEFAULT_STATE_DIR.exists() == default_existed


SUBPROCESS_CASES = {
    "01_syntax_unclosed_table": ("module", ("status", "--json")),
    "17_type_poll_interval_is_text": ("module", ("check",)),
    "42_secret_env_not_set": ("script", ("run", "--once")),
    "44_secret_credential_without_directory": ("script", ("status",)),
    "53_filter_pg_sleep": ("script", ("init", "--dry-run")),
    "67_inject_slot": ("module", ("run", "--once")),
}


def _process_env(env: dict[str, str | None]) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in env or env[k] is not None}
    out.update({k: v for k, v in env.items() if v is not None})
    out.pop("SYNCAGENT_NO_MAIN", None)
    return out


def _argv(how: str, cfg: Path, args: Sequence[str]) -> list[str]:
    if how == "script":
        return [str(REPO / ".venv" / "bin" / "syncagent"), "-c", str(cfg), *args]
    return [sys.executable, "-m", "agent.cli", "-c", str(cfg), *args]


@pytest.mark.parametrize("name", sorted(SUBPROCESS_CASES))
def test_bad_config_exits_2_in_a_real_process(name: str, sandbox: Sandbox) -> None:
    """The console script and ``python -m agent.cli`` give the same exit code and message."""
    case = next(c for c in CASES if c.id == name)
    how, args = SUBPROCESS_CASES[name]
    cfg = sandbox.install(case)
    proc = subprocess.run(
        _argv(how, cfg, args),
        cwd=sandbox.root,
        env=_process_env(sandbox.env_for(case)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output
    assert _names_the_problem(output, cfg, case), output
    assert not sandbox.state_dir.exists()
    assert sandbox.untouched() == []


def test_init_dry_run_names_an_unreachable_server_without_a_traceback(sandbox: Sandbox) -> None:
    """A valid config whose ERP is down: init --dry-run fails with exit 1 and names host:port."""
    port = free_port()
    cfg = sandbox.root / "etc" / "down.toml"
    cfg.parent.mkdir()
    cfg.write_text(f"""
[agent]
state_path = "{sandbox.state_dir / "state.db"}"

[systems.erp]
type = "postgres"
host = "127.0.0.1"
port = {port}
dbname = "erp"
user = "syncagent"

[entities.customer.systems.erp]
object = "erp.customers"
key = "id"

[entities.customer.fields]
name = {{owner = "erp", erp = "name"}}
""")
    for args in (("init", "--dry-run"), ("init", "--dry-run", "--json")):
        res = CliRunner().invoke(cli, ["-c", str(cfg), *args], env=sandbox.env)
        crashed = res.exception is not None and not isinstance(res.exception, SystemExit)
        assert not crashed, f"{args}: crashed with {res.exception!r}"
        assert res.exit_code == 1, res.output
        assert f"127.0.0.1:{port}" in res.output and "Traceback" not in res.output
    assert not sandbox.state_dir.exists()
