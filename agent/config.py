"""TOML -> frozen ``Config``: every problem collected (file, dotted key, why) before raising.

Secrets are references, never inline: ``{credential = "name"}`` reads
``$CREDENTIALS_DIRECTORY/name`` (systemd ``LoadCredential=``), ``{env = "NAME"}`` reads the
environment. Resolved values are ``Secret``s, which never print.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apscheduler.triggers.cron import CronTrigger

from agent.credentials import SecretRefError, resolve_secret
from agent.errors import ConfigError, ConfigIssue

FIELD_TYPES = ("string", "decimal", "int", "bool", "date", "datetime")
NON_OWNER_POLICIES = ("ignore", "revert", "exception")
DELETE_POLICIES = ("exception", "ignore", "propagate")
SHARED = "shared"
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
LOG_LEVELS = ("debug", "info", "warning", "error")

# Per key: (kind, default); default REQUIRED means the key must be given.
REQUIRED = object()
_COMMON: dict[str, tuple[str, Any]] = {
    "type": ("str", REQUIRED),
    "poll_interval": ("float", 30.0),
    "verify_tls": ("bool", True),
    "timeout_seconds": ("float", 30.0),
}
CONNECTOR_OPTIONS: dict[str, dict[str, tuple[str, Any]]] = {
    "postgres": {
        "host": ("str", "127.0.0.1"),
        "port": ("int", 5432),
        "dbname": ("str", REQUIRED),
        "user": ("str", REQUIRED),
        "password": ("secret", None),
        "sslmode": ("str", "prefer"),
        "slot": ("ident", "syncagent"),
        "publication": ("ident", "syncagent"),
        "origin": ("ident", "syncagent"),
        "max_poll_mb": ("int", 256),
        "chunk_rows": ("int", 10_000),
        "connect_timeout": ("int", 10),
        "poll_interval": ("float", 5.0),
    },
    "salesforce": {
        "instance_url": ("url", REQUIRED),
        "token_url": ("url", None),
        "auth": ("str", "client_credentials"),
        "client_id": ("secret", REQUIRED),
        "client_secret": ("secret", None),
        "username": ("str", None),
        "private_key": ("secret", None),
        "signing_algorithm": ("str", "RS256"),
        "jwt_audience": ("url", "https://login.salesforce.com"),
        "api_version": ("str", "v62.0"),
        "lookback_seconds": ("int", 300),
        "safety_lag_seconds": ("float", 2.0),
        "page_size": ("int", 2000),
        "budget_per_day": ("int", None),
        "budget_per_run": ("int", None),
    },
    "hubspot": {
        "base_url": ("url", "https://api.hubapi.com"),
        "token": ("secret", None),
        "client_id": ("secret", None),
        "client_secret": ("secret", None),
        "refresh_token": ("secret", None),
        "lookback_seconds": ("int", 120),
        "search_rate_per_s": ("float", 4.0),
    },
    "dynamics": {
        "base_url": ("url", REQUIRED),
        "tenant": ("str", REQUIRED),
        "token_url": ("url", None),
        "client_id": ("secret", REQUIRED),
        "client_secret": ("secret", REQUIRED),
        "scope": ("str", None),
        "api_path": ("str", "/api/data/v9.2"),
        "page_size": ("int", 5000),
        "lookback_seconds": ("int", 120),
    },
    "netsuite": {
        "base_url": ("url", REQUIRED),
        "account": ("str", REQUIRED),
        "token_url": ("url", None),
        "client_id": ("secret", REQUIRED),
        "certificate_id": ("str", REQUIRED),
        "private_key": ("secret", REQUIRED),
        "signing_algorithm": ("str", "PS256"),
        "page_size": ("int", 1000),
        "lookback_seconds": ("int", 900),
        "query_cap": ("int", 100_000),
    },
}
_AGENT_KEYS: dict[str, tuple[str, Any]] = {
    "name": ("str", "syncagent"),
    "state_path": ("path", "/var/lib/syncagent/state.db"),
    "log_format": ("str", "logfmt"),
    "log_level": ("str", "info"),
    "journal_retention_days": ("int", 30),
    "resolve_batch": ("int", 5000),
    "deliver_batch": ("int", 200),
    "retry_base_seconds": ("float", 2.0),
    "retry_cap_seconds": ("float", 600.0),
    "max_attempts": ("int", 12),
    "reconcile_cron": ("str", "0 2 * * *"),
    "resolve_interval": ("float", 2.0),
}
_SYSTEM_MAPPING_KEYS = ("object", "key", "external_id", "match_on", "row_filter", "updated_at")
_FIELD_KEYS = ("owner", "type", "values", "ref", "required")
_ENTITY_KEYS = ("systems", "fields", "on_non_owner_edit", "on_conflict", "on_delete")


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """The ``[agent]`` table: identity, state file, logging, batch sizes, retry policy."""

    name: str
    state_path: Path
    log_format: str
    log_level: str
    journal_retention_days: int
    resolve_batch: int
    deliver_batch: int
    retry_base_seconds: float
    retry_cap_seconds: float
    max_attempts: int
    reconcile_cron: str
    resolve_interval: float


@dataclass(frozen=True, slots=True)
class SystemConfig:
    """One ``[systems.NAME]`` table: connector type, schedule, and validated options."""

    name: str
    type: str
    poll_interval: float
    verify_tls: bool
    timeout_seconds: float
    options: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class SystemMapping:
    """How one system stores an entity: object or table, key, external-id field, filters."""

    system: str
    object: str
    key: str
    external_id: str | None = None
    match_on: str | None = None
    row_filter: str | None = None
    updated_at: str | None = None


@dataclass(frozen=True, slots=True)
class FieldRule:
    """One canonical field: its owner, type, per-system column and value maps."""

    name: str
    owner: str
    type: str
    columns: Mapping[str, str]
    values: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    ref: str | None = None
    required: bool = False


@dataclass(frozen=True, slots=True)
class EntityConfig:
    """One canonical entity: how each system stores it, its fields and its policies."""

    name: str
    systems: Mapping[str, SystemMapping]
    fields: Mapping[str, FieldRule]
    on_non_owner_edit: str = "ignore"
    on_conflict: str = "latest"
    on_delete: str = "exception"


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration."""

    path: Path
    agent: AgentSettings
    metrics_listen: str | None
    systems: Mapping[str, SystemConfig]
    entities: Mapping[str, EntityConfig]
    workflows: Mapping[str, Mapping[str, Any]]  # [workflows.NAME], validated, defaults filled in
    digest: str

    def mappings_of(self, system: str) -> list[tuple[EntityConfig, SystemMapping]]:
        """Return every entity mapping that lives in ``system``."""
        return [(e, e.systems[system]) for e in self.entities.values() if system in e.systems]


class _Collector:
    def __init__(self, file: str) -> None:
        self.file = file
        self.issues: list[ConfigIssue] = []

    def add(self, key: str, reason: str) -> None:
        self.issues.append(ConfigIssue(self.file, key, reason))


def load_config(path: str | Path, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the TOML file at ``path``; raise ``ConfigError`` listing every problem."""
    p = Path(path)
    col = _Collector(str(p))
    try:
        raw_bytes = p.read_bytes()
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(p), "-", f"cannot read file: {exc.strerror}")]) from exc
    try:
        raw = tomllib.loads(raw_bytes.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigIssue(str(p), "-", "file is not UTF-8 text")]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigIssue(str(p), "-", f"TOML syntax error: {exc}")]) from exc
    env = os.environ if environ is None else environ
    cfg = _build(raw, col, env, p)
    if col.issues:
        raise ConfigError(col.issues)
    assert cfg is not None
    return cfg


def _build(raw: dict[str, Any], col: _Collector, env: Mapping[str, str], path: Path) -> Config | None:
    _unknown(raw, ("agent", "metrics", "systems", "entities", "workflows"), "", col)
    agent_raw = _table(raw.get("agent", {}), "agent", col)
    agent_vals = _options(agent_raw, _AGENT_KEYS, "agent", col, env)
    if agent_vals.get("log_format") not in ("logfmt", "json"):
        col.add("agent.log_format", "must be 'logfmt' or 'json'")
    if agent_vals.get("log_level") not in LOG_LEVELS:
        col.add("agent.log_level", f"must be one of {list(LOG_LEVELS)}")
    cron = agent_vals.get("reconcile_cron")
    if isinstance(cron, str):
        try:
            CronTrigger.from_crontab(cron)
        except ValueError as exc:
            col.add("agent.reconcile_cron", f"not a cron expression (minute hour day month weekday): {exc}")
    metrics_raw = _table(raw.get("metrics", {}), "metrics", col)
    _unknown(metrics_raw, ("listen",), "metrics", col)
    listen = metrics_raw.get("listen")
    if listen is not None and not _is_loopback_listen(listen):
        col.add("metrics.listen", "must be a loopback 'host:port' such as '127.0.0.1:9464'")

    systems: dict[str, SystemConfig] = {}
    for name, sys_raw in _table(raw.get("systems", {}), "systems", col).items():
        sc = _system(name, sys_raw, col, env)
        if sc is not None:
            systems[name] = sc
    if not systems and "systems" not in raw:
        col.add("systems", "at least one system is required")

    entities: dict[str, EntityConfig] = {}
    for name, ent_raw in _table(raw.get("entities", {}), "entities", col).items():
        ec = _entity(name, ent_raw, systems, col)
        if ec is not None:
            entities[name] = ec
    for ec in entities.values():
        for f in ec.fields.values():
            if f.ref and f.ref not in entities:
                col.add(f"entities.{ec.name}.fields.{f.name}.ref", f"unknown entity {f.ref!r}")

    # Imported here: the workflows' own modules import this one.
    from agent.workflows.options import check as check_workflows

    raw_workflows = _table(raw.get("workflows", {}), "workflows", col)
    workflows, problems = check_workflows(raw_workflows, entities, systems)
    for key, reason in problems:
        col.add(key, reason)
    if col.issues:
        return None
    return Config(
        path=path,
        agent=AgentSettings(**agent_vals),
        metrics_listen=listen,
        systems=systems,
        entities=entities,
        workflows=workflows,
        digest=hashlib.sha256(repr(sorted(raw.items(), key=lambda kv: kv[0])).encode()).hexdigest()[:12],
    )


def _system(name: str, raw: Any, col: _Collector, env: Mapping[str, str]) -> SystemConfig | None:
    key = f"systems.{name}"
    if not _is_ident(name):
        col.add(key, "system names are letters, digits and underscores")
    table = _table(raw, key, col)
    kind = table.get("type")
    if not isinstance(kind, str) or kind not in CONNECTOR_OPTIONS:
        col.add(
            f"{key}.type", f"unknown connector type {kind!r}; expected one of {sorted(CONNECTOR_OPTIONS)}"
        )
        return None
    spec = {**_COMMON, **CONNECTOR_OPTIONS[kind]}
    values = _options(table, spec, key, col, env)
    if kind == "salesforce":
        mode = values.get("auth")
        if mode not in ("client_credentials", "jwt"):
            col.add(f"{key}.auth", "must be 'client_credentials' or 'jwt'")
        if mode == "client_credentials" and values.get("client_secret") is None:
            col.add(f"{key}.client_secret", "required when auth = 'client_credentials'")
        if mode == "jwt" and (values.get("private_key") is None or not values.get("username")):
            col.add(f"{key}", "auth = 'jwt' needs username and private_key")
        version = values.get("api_version")
        if isinstance(version, str) and not re.fullmatch(r"v\d{2,3}\.\d", version):
            col.add(f"{key}.api_version", "must look like 'v62.0'")
    if kind == "hubspot" and values.get("token") is None and values.get("refresh_token") is None:
        col.add(f"{key}.token", "give a private-app token, or client_id, client_secret and refresh_token")
    if kind == "postgres":
        port = values.get("port")
        if isinstance(port, int) and not 0 < port < 65536:
            col.add(f"{key}.port", "must be a TCP port, 1 to 65535")
        if values.get("sslmode") is not None and values["sslmode"] not in SSL_MODES:
            col.add(f"{key}.sslmode", f"must be one of {list(SSL_MODES)}")
    common = {k: values.pop(k) for k in list(values) if k in _COMMON}
    for num in ("poll_interval", "timeout_seconds"):
        if common.get(num) is None:
            return None  # already reported as a wrong type
        if common[num] <= 0:
            col.add(f"{key}.{num}", "must be a positive number of seconds")
    return SystemConfig(
        name=name,
        type=kind,
        poll_interval=float(common["poll_interval"]),
        verify_tls=bool(common["verify_tls"]),
        timeout_seconds=float(common["timeout_seconds"]),
        options=values,
    )


def _entity(name: str, raw: Any, systems: Mapping[str, SystemConfig], col: _Collector) -> EntityConfig | None:
    key = f"entities.{name}"
    table = _table(raw, key, col)
    _unknown(table, _ENTITY_KEYS, key, col)
    mappings: dict[str, SystemMapping] = {}
    for sys_name, m_raw in _table(table.get("systems", {}), f"{key}.systems", col).items():
        mkey = f"{key}.systems.{sys_name}"
        if sys_name not in systems:
            col.add(mkey, f"unknown system {sys_name!r}; define [systems.{sys_name}]")
            continue
        m = _table(m_raw, mkey, col)
        _unknown(m, _SYSTEM_MAPPING_KEYS, mkey, col)
        for req in ("object", "key"):
            if not isinstance(m.get(req), str) or not m.get(req):
                col.add(f"{mkey}.{req}", "required text")
            elif not _is_name(m[req], dotted=req == "object"):
                col.add(
                    f"{mkey}.{req}",
                    "must be a plain name (letters, digits, underscores; schema.table "
                    "for a table): it is quoted as an identifier, never pasted into SQL",
                )
        for opt in ("external_id", "match_on", "row_filter", "updated_at"):
            if opt in m and not isinstance(m[opt], str):
                col.add(f"{mkey}.{opt}", "must be text")
                m = {**m, opt: None}
            elif (
                opt in ("external_id", "updated_at") and isinstance(m.get(opt), str) and not _is_name(m[opt])
            ):
                col.add(f"{mkey}.{opt}", "must be a plain column or field name")
        mappings[sys_name] = SystemMapping(
            system=sys_name,
            object=str(m.get("object", "")),
            key=str(m.get("key", "")),
            external_id=m.get("external_id"),
            match_on=m.get("match_on"),
            row_filter=m.get("row_filter"),
            updated_at=m.get("updated_at"),
        )
    if not mappings:
        col.add(f"{key}.systems", "map the entity in at least one system")
    if sum(1 for m in mappings.values() if m.external_id) and len(mappings) > 2:
        col.add(f"{key}.systems", "external_id holds the counterpart's id: use it only with two systems")
    fields: dict[str, FieldRule] = {}
    for fname, f_raw in _table(table.get("fields", {}), f"{key}.fields", col).items():
        fr = _field(fname, f_raw, mappings, f"{key}.fields.{fname}", col)
        if fr is not None:
            fields[fname] = fr
    for sm in mappings.values():
        if sm.match_on and sm.match_on not in fields:
            col.add(f"{key}.systems.{sm.system}.match_on", f"{sm.match_on!r} is not a field of {name}")
    policy = table.get("on_non_owner_edit", "ignore")
    if not isinstance(policy, str) or policy not in NON_OWNER_POLICIES:
        col.add(f"{key}.on_non_owner_edit", f"must be one of {list(NON_OWNER_POLICIES)}")
    conflict = table.get("on_conflict", "latest")
    if not isinstance(conflict, str) or (conflict != "latest" and conflict not in mappings):
        col.add(f"{key}.on_conflict", "must be 'latest' or the name of a system mapping this entity")
    on_delete = table.get("on_delete", "exception")
    if not isinstance(on_delete, str) or on_delete not in DELETE_POLICIES:
        col.add(f"{key}.on_delete", f"must be one of {list(DELETE_POLICIES)}")
    return EntityConfig(
        name=name,
        systems=mappings,
        fields=fields,
        on_non_owner_edit=str(policy),
        on_conflict=str(conflict),
        on_delete=str(on_delete),
    )


def _field(
    name: str, raw: Any, mappings: Mapping[str, SystemMapping], key: str, col: _Collector
) -> FieldRule | None:
    table = _table(raw, key, col)
    columns: dict[str, str] = {}
    for k, v in table.items():
        if k in _FIELD_KEYS:
            continue
        if k not in mappings:
            col.add(f"{key}.{k}", f"unknown key or system {k!r}{_suggest(k, [*_FIELD_KEYS, *mappings])}")
        elif not isinstance(v, str) or not v:
            col.add(f"{key}.{k}", "the column or field name in that system, as text")
        elif not _is_name(v):
            col.add(f"{key}.{k}", "must be a plain column or field name (letters, digits, underscores)")
        else:
            columns[k] = v
    if not columns:
        col.add(key, 'name the field\'s column in at least one system, e.g. erp = "name"')
    owner = table.get("owner")
    if owner is not None and not isinstance(owner, str):
        col.add(f"{key}.owner", "must be a system name or 'shared', as text")
        owner = None
    elif owner is None:
        col.add(f"{key}.owner", "required: a system name or 'shared'")
    elif owner != SHARED and owner not in mappings:
        col.add(f"{key}.owner", f"unknown owner {owner!r}: a system mapping this entity or 'shared'")
    elif owner != SHARED and owner not in columns:
        col.add(f"{key}.owner", f"owner {owner!r} has no column for this field")
    ftype = table.get("type", "string")
    if ftype not in FIELD_TYPES:
        col.add(f"{key}.type", f"must be one of {list(FIELD_TYPES)}")
    values: dict[str, dict[str, str]] = {}
    for sys_name, vmap in _table(table.get("values", {}), f"{key}.values", col).items():
        if sys_name not in columns:
            col.add(f"{key}.values.{sys_name}", "a value map for a system without a column")
            continue
        vm = _table(vmap, f"{key}.values.{sys_name}", col)
        if any(not isinstance(v, str | int | bool) for v in vm.values()):
            col.add(f"{key}.values.{sys_name}", "value maps map canonical text to native scalars")
        natives = [str(v) for v in vm.values()]
        if len(set(natives)) != len(natives):
            col.add(f"{key}.values.{sys_name}", "two canonical values map to the same native value")
        values[sys_name] = {str(k): str(v) for k, v in vm.items()}
    ref = table.get("ref")
    if ref is not None and not isinstance(ref, str):
        col.add(f"{key}.ref", "must name an entity")
        ref = None
    required = table.get("required", False)
    if not isinstance(required, bool):
        col.add(f"{key}.required", "must be true or false")
    return FieldRule(
        name=name,
        owner=str(owner),
        type=str(ftype),
        columns=columns,
        values=values,
        ref=ref,
        required=bool(required),
    )


def _options(
    table: Mapping[str, Any],
    spec: Mapping[str, tuple[str, Any]],
    key: str,
    col: _Collector,
    env: Mapping[str, str],
) -> dict[str, Any]:
    _unknown(table, tuple(spec), key, col)
    out: dict[str, Any] = {}
    for name, (kind, default) in spec.items():
        dotted = f"{key}.{name}"
        if name not in table:
            if default is REQUIRED:
                col.add(dotted, "required")
            out[name] = None if default is REQUIRED else default
            continue
        out[name] = _coerce(table[name], kind, dotted, col, env)
    return out


def _coerce(value: Any, kind: str, key: str, col: _Collector, env: Mapping[str, str]) -> Any:
    if kind == "secret":
        try:
            return resolve_secret(value, env)
        except SecretRefError as exc:
            col.add(key, str(exc))
            return None
    if isinstance(value, dict) and ("credential" in value or "env" in value):
        col.add(key, "this key is not a secret: give the value itself")
        return None
    if kind in ("str", "ident", "url", "path"):
        if not isinstance(value, str):
            col.add(key, f"must be text, not {type(value).__name__}")
            return None
        if kind == "ident" and not _is_ident(value):
            col.add(key, "must be a plain identifier: lowercase letters, digits, underscores (max 63)")
        if kind == "url" and not value.startswith(("https://", "http://")):
            col.add(key, "must be an http(s) URL")
        return Path(value) if kind == "path" else value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            col.add(key, f"must be a whole number, not {type(value).__name__}")
            return None
        if value < 0:
            col.add(key, "must not be negative")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            col.add(key, f"must be a number, not {type(value).__name__}")
            return None
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            col.add(key, "must be true or false")
            return None
        return value
    raise AssertionError(kind)


def _table(value: Any, key: str, col: _Collector) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    col.add(key or "-", f"must be a table, not {type(value).__name__}")
    return {}


def _unknown(table: Mapping[str, Any], known: tuple[str, ...], key: str, col: _Collector) -> None:
    for k in table:
        if k not in known:
            col.add(f"{key}.{k}" if key else k, f"unknown key{_suggest(k, known)}")


def _suggest(word: str, options: Any) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_ident(value: str) -> bool:
    return (
        0 < len(value) <= 63
        and value.replace("_", "a").isalnum()
        and value.isascii()
        and value == value.lower()
    )


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _is_name(value: str, *, dotted: bool = False) -> bool:
    parts = value.split(".") if dotted else [value]
    return 0 < len(parts) <= 2 and all(_NAME.match(p) and len(p) <= 128 for p in parts)


def _is_loopback_listen(value: Any) -> bool:
    if not isinstance(value, str) or ":" not in value:
        return False
    host, _, port = value.rpartition(":")
    return host in ("127.0.0.1", "localhost", "[::1]") and port.isdigit() and 0 < int(port) < 65536
