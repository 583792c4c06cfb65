from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from agent.config import CONNECTOR_OPTIONS, AgentSettings, load_config
from agent.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.example.toml"
ENV = {"SF_CLIENT_ID": "cid", "CREDENTIALS_DIRECTORY": ""}


@pytest.fixture
def creds(tmp_path: Path) -> dict[str, str]:
    d = tmp_path / "creds"
    d.mkdir()
    for name in ("erp_password", "sf_client_secret", "sf_jwt_key"):
        (d / name).write_text("s3cret-" + name)
    return {"SF_CLIENT_ID": "cid", "CREDENTIALS_DIRECTORY": str(d)}


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


MINIMAL = """
[agent]
state_path = "/tmp/x.db"
[systems.erp]
type = "postgres"
dbname = "erp"
user = "me"
[entities.customer.systems.erp]
object = "erp.customers"
key = "id"
[entities.customer.fields]
name = {owner = "erp", erp = "name"}
"""


def test_config_example_loads_when_credentials_exist(creds: dict[str, str]) -> None:
    cfg = load_config(EXAMPLE, environ=creds)
    assert cfg.systems["erp"].type == "postgres"
    assert cfg.entities["customer"].fields["status"].values["crm"]["hold"] == "On Hold"
    assert repr(cfg.systems["crm"].options["client_secret"]) == "'***'"


def test_config_example_mentions_every_key() -> None:
    text = EXAMPLE.read_text()
    keys = {f.name for f in dataclasses.fields(AgentSettings)}
    for opts in CONNECTOR_OPTIONS.values():
        keys |= set(opts)
    keys |= {"type", "poll_interval", "verify_tls", "timeout_seconds", "listen", "object", "key", "external_id",
             "match_on", "row_filter", "updated_at", "owner", "values", "ref", "required", "on_non_owner_edit",
             "on_conflict", "on_delete"}
    missing = sorted(k for k in keys if not re.search(rf"(^|[\s{{,#]){re.escape(k)}\s*=", text, re.M))
    assert missing == []


def test_load_config_collects_every_problem_with_file_and_key(tmp_path: Path) -> None:
    p = write(tmp_path, """
[agent]
state_path = 5
colour = "blue"
[systems.erp]
type = "postgres"
user = "me"
password = "hunter2-inline"
[entities.customer.systems.erp]
object = "erp.customers"
key = "id"
[entities.customer.fields]
name = {owner = "nobody", erp = "name"}
""")
    with pytest.raises(ConfigError) as info:
        load_config(p, environ={})
    keys = {e.key for e in info.value.errors}
    assert {"agent.state_path", "agent.colour", "systems.erp.dbname", "systems.erp.password",
            "entities.customer.fields.name.owner"} <= keys
    assert all(e.file == str(p) for e in info.value.errors)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("snippet,key", [
    ("[systems.x]\ntype = 'sap'\n", "systems.x.type"),
    ("[metrics]\nlisten = '0.0.0.0:9464'\n", "metrics.listen"),
    ("[systems.erp2]\ntype = 'postgres'\ndbname='e'\nuser='u'\nslot = 'Bad Slot'\n", "systems.erp2.slot"),
    ("[systems.erp2]\ntype = 'postgres'\ndbname='e'\nuser='u'\nport = 'x'\n", "systems.erp2.port"),
    ("[systems.erp2]\ntype = 'postgres'\ndbname='e'\nuser='u'\npassword = {env = 'NOPE'}\n",
     "systems.erp2.password"),
    ("[systems.erp2]\ntype = 'postgres'\ndbname='e'\nuser='u'\npassword = {credential = 'x'}\n",
     "systems.erp2.password"),
])
def test_load_config_names_the_key_when_a_value_is_wrong(tmp_path: Path, snippet: str, key: str) -> None:
    p = write(tmp_path, MINIMAL + snippet)
    with pytest.raises(ConfigError) as info:
        load_config(p, environ={})
    assert key in {e.key for e in info.value.errors}


def test_load_config_reports_toml_syntax_errors_with_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, "[agent\nname = 1")
    with pytest.raises(ConfigError) as info:
        load_config(p, environ={})
    assert str(p) in str(info.value) and "TOML syntax" in str(info.value)


def test_load_config_suggests_the_key_when_misspelt(tmp_path: Path) -> None:
    p = write(tmp_path, MINIMAL.replace("[agent]", "[agent]\nresolve_bach = 5"))
    with pytest.raises(ConfigError) as info:
        load_config(p, environ={})
    assert "did you mean 'resolve_batch'" in str(info.value)


def test_load_config_reads_secret_from_credentials_directory(tmp_path: Path, creds: dict[str, str]) -> None:
    p = write(tmp_path, MINIMAL.replace('user = "me"', 'user = "me"\npassword = {credential = "erp_password"}'))
    cfg = load_config(p, environ=creds)
    secret = cfg.systems["erp"].options["password"]
    assert secret.reveal() == "s3cret-erp_password" and "s3cret" not in repr(cfg)
