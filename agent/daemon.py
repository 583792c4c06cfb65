"""The composition root: builds connectors, resolver and policy from a ``Config``.

The only module (with ``agent.pipeline``) that knows both the connectors and the state
store. Connectors receive their collaborators ready-made (an ``httpx.Client``, a psycopg
connection factory, a clock): they never read config themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.conninfo import make_conninfo

from agent.config import Config, EntityConfig, SystemConfig, load_config
from agent.errors import ConfigError, ConfigIssue
from agent.logging import log_event
from agent.resolve import Resolver
from agent.retry import RetryPolicy
from agent.workflows import build_workflows
from connectors.auth import BearerAuth, ClientCredentials, JwtBearer, hs256_signer, pem_signer
from connectors.base import Sink, Source
from connectors.http import make_client
from connectors.postgres import PostgresSource, TableSpec, check_row_filter
from connectors.postgres.sink import PostgresSink, SinkTable

logger = logging.getLogger(__name__)


def open_config(path: str | Path) -> Config:
    """Load the config and run the connector-specific checks (row filters through pglast)."""
    cfg = load_config(path)
    issues: list[ConfigIssue] = []
    for entity in cfg.entities.values():
        for system, m in entity.systems.items():
            sc = cfg.systems[system]
            key = f"entities.{entity.name}.systems.{system}"
            if sc.type == "postgres":
                if "." not in m.object:
                    issues.append(
                        ConfigIssue(str(cfg.path), f"{key}.object", "name the table as schema.table")
                    )
                if m.row_filter:
                    try:
                        check_row_filter(m.row_filter, None, key=f"{key}.row_filter")
                    except ConfigError as exc:
                        issues += [ConfigIssue(str(cfg.path), e.key, e.reason) for e in exc.errors]
            elif m.row_filter:
                issues.append(
                    ConfigIssue(str(cfg.path), f"{key}.row_filter", "row filters apply to postgres only")
                )
    used = {system for entity in cfg.entities.values() for system in entity.systems}
    for name in cfg.systems:
        if name not in used:
            issues.append(
                ConfigIssue(
                    str(cfg.path),
                    f"systems.{name}",
                    "no entity maps this system: map an entity to it or remove it",
                )
            )
    seen: dict[tuple[str, str], str] = {}
    for entity in cfg.entities.values():
        for system, m in entity.systems.items():
            other = seen.setdefault((system, m.object), entity.name)
            if other != entity.name:
                issues.append(
                    ConfigIssue(
                        str(cfg.path),
                        f"entities.{entity.name}.systems.{system}.object",
                        f"{m.object} is already mapped by entity {other}",
                    )
                )
    if issues:
        raise ConfigError(issues)
    return cfg


@dataclass
class Runtime:
    """Everything built from one config: sources, sinks, the resolver and retry policy."""

    config: Config
    sources: dict[str, Source]
    sinks: dict[str, Sink]
    resolver: Resolver
    policy: RetryPolicy
    clients: list[httpx.Client] = field(default_factory=list)

    def close(self) -> None:
        """Close HTTP clients and database connections the connectors hold."""
        for c in self.clients:
            c.close()
        for conn in {id(x): x for x in [*self.sources.values(), *self.sinks.values()]}.values():
            close = getattr(conn, "close", None)
            if callable(close):
                close()


def build_runtime(config: Config, *, transport: httpx.BaseTransport | None = None) -> Runtime:
    """Build every connector the config names, the resolver and the retry policy."""
    sources: dict[str, Source] = {}
    sinks: dict[str, Sink] = {}
    clients: list[httpx.Client] = []
    origins: set[str] = set()
    for name, sc in config.systems.items():
        if not sc.verify_tls:
            log_event(
                logger,
                "tls_verification_disabled",
                system=name,
                level=logging.WARNING,
                hint="set verify_tls = true unless this is a lab system",
            )
        builder = _BUILDERS[sc.type]
        try:
            source, sink = builder(config, sc, transport, clients)
        except ValueError as exc:  # a connector refusing a setting the loader could not judge
            raise ConfigError([ConfigIssue(str(config.path), f"systems.{name}", str(exc))]) from exc
        sources[name] = source
        sinks[name] = sink
        if sc.type == "postgres":
            origins.add(str(sc.options["origin"]))
    a = config.agent
    policy = RetryPolicy(a.retry_base_seconds, a.retry_cap_seconds, a.max_attempts)
    resolver = Resolver(config, own_origins=frozenset(origins), workflows=build_workflows(config))
    return Runtime(config, sources, sinks, resolver, policy, clients)


def pg_connect_factory(
    sc: SystemConfig, *, application_name: str = "syncagent"
) -> Callable[[], psycopg.Connection]:
    """A function that opens a new connection to the system's PostgreSQL (password never logged)."""
    o = sc.options
    conninfo = make_conninfo(
        host=o["host"],
        port=o["port"],
        dbname=o["dbname"],
        user=o["user"],
        sslmode=o["sslmode"],
        connect_timeout=o["connect_timeout"],
        application_name=application_name,
    )
    password = o.get("password")

    def connect() -> psycopg.Connection:
        kwargs: dict[str, Any] = {"password": password.reveal()} if password is not None else {}
        return psycopg.connect(conninfo, **kwargs)

    return connect


def _split_table(name: str) -> tuple[str, str]:
    schema, _, table = name.partition(".")
    return schema, table


def _pg(
    config: Config, sc: SystemConfig, _t: httpx.BaseTransport | None, _c: list[httpx.Client]
) -> tuple[Any, Any]:
    connect = pg_connect_factory(sc)
    o = sc.options
    specs, sink_tables = [], {}
    for _entity, m in config.mappings_of(sc.name):
        schema, table = _split_table(m.object)
        specs.append(
            TableSpec(
                schema, table, row_filter=m.row_filter, key_columns=(m.key,), updated_at_column=m.updated_at
            )
        )
        sink_tables[m.object] = SinkTable(schema, table, (m.key,))
    source = PostgresSource(
        sc.name,
        connect,
        slot=o["slot"],
        publication=o["publication"],
        origin=o["origin"],
        tables=specs,
        max_poll_bytes=int(o["max_poll_mb"]) * 2**20,
        chunk_rows=o["chunk_rows"],
    )
    sink = PostgresSink(
        sc.name,
        pg_connect_factory(sc, application_name="syncagent-writer"),
        origin=o["origin"],
        tables=sink_tables,
    )
    return source, sink


def _fields_of(config: Config, system: str) -> dict[str, tuple[EntityConfig, list[str]]]:
    out: dict[str, tuple[EntityConfig, list[str]]] = {}
    for entity, m in config.mappings_of(system):
        cols = [r.columns[system] for r in entity.fields.values() if system in r.columns]
        if m.external_id and m.external_id not in cols:
            cols.append(m.external_id)
        out[m.object] = (entity, cols)
    return out


def _http(
    sc: SystemConfig, base_url: str, transport: httpx.BaseTransport | None, clients: list[httpx.Client]
) -> httpx.Client:
    client = make_client(base_url, timeout=sc.timeout_seconds, verify=sc.verify_tls, transport=transport)
    clients.append(client)
    return client


def _salesforce(
    config: Config, sc: SystemConfig, transport: httpx.BaseTransport | None, clients: list[httpx.Client]
) -> tuple[Any, Any]:
    from connectors.salesforce import ApiBudget, SalesforceConnector, SfObject

    o = sc.options
    client = _http(sc, o["instance_url"], transport, clients)
    token_url = o["token_url"] or "/services/oauth2/token"
    provider: Any
    if o["auth"] == "jwt":
        signer = (
            hs256_signer(o["private_key"])
            if o["signing_algorithm"] == "HS256"
            else pem_signer(o["private_key"], "RS256")
        )
        provider = JwtBearer(
            client,
            token_url,
            client_id=o["client_id"].reveal(),
            username=o["username"],
            signer=signer,
            audience=o["jwt_audience"],
        )
    else:
        provider = ClientCredentials(
            client, token_url, client_id=o["client_id"].reveal(), client_secret=o["client_secret"]
        )
    objects = {
        obj: SfObject(obj, tuple(cols), m_ext(entity, sc.name))
        for obj, (entity, cols) in _fields_of(config, sc.name).items()
    }
    conn = SalesforceConnector(
        sc.name,
        client,
        auth=BearerAuth(provider),
        api_version=o["api_version"],
        objects=objects,
        lookback=timedelta(seconds=o["lookback_seconds"]),
        page_size=o["page_size"],
        budget=ApiBudget(per_day=o["budget_per_day"], per_run=o["budget_per_run"]),
        safety_lag=timedelta(seconds=o["safety_lag_seconds"]),
    )
    return conn, conn


def _hubspot(
    config: Config, sc: SystemConfig, transport: httpx.BaseTransport | None, clients: list[httpx.Client]
) -> tuple[Any, Any]:
    from connectors.auth import StaticToken
    from connectors.hubspot import HsObject, HubSpotConnector, HubSpotOAuth

    o = sc.options
    client = _http(sc, o["base_url"], transport, clients)
    provider: Any
    if o["token"] is not None:
        provider = StaticToken(o["token"])
    else:
        provider = HubSpotOAuth(client, o["client_id"].reveal(), o["client_secret"], o["refresh_token"])
    objects = {}
    for obj, (entity, cols) in _fields_of(config, sc.name).items():
        m = entity.systems[sc.name]
        modified = "lastmodifieddate" if obj == "contacts" else "hs_lastmodifieddate"
        # A deal's company is an association, not a property: read it as associated_company_id.
        associated = "associated_company_id" in cols
        objects[obj] = HsObject(
            obj,
            tuple(c for c in cols if c not in (m.external_id, "associated_company_id")),
            id_property=m.external_id,
            modified_property=modified,
            associations=("companies",) if associated else (),
        )
    conn = HubSpotConnector(
        sc.name,
        client,
        auth=BearerAuth(provider),
        objects=objects,
        lookback=timedelta(seconds=o["lookback_seconds"]),
        search_rate_per_s=o["search_rate_per_s"],
    )
    return conn, conn


def _dynamics(
    config: Config, sc: SystemConfig, transport: httpx.BaseTransport | None, clients: list[httpx.Client]
) -> tuple[Any, Any]:
    from connectors.dynamics import DvTable, DynamicsConnector

    o = sc.options
    client = _http(sc, o["base_url"], transport, clients)
    token_url = o["token_url"] or f"https://login.microsoftonline.com/{o['tenant']}/oauth2/v2.0/token"
    provider = ClientCredentials(
        client,
        token_url,
        client_id=o["client_id"].reveal(),
        client_secret=o["client_secret"],
        scope=o["scope"] or f"{o['base_url'].rstrip('/')}/.default",
    )
    tables = {}
    for obj, (entity, cols) in _fields_of(config, sc.name).items():
        m = entity.systems[sc.name]
        logical = m.key[:-2] if m.key.endswith("id") else m.key
        tables[obj] = DvTable(
            obj, logical, m.key, tuple(cols), alternate_key=(m.external_id,) if m.external_id else None
        )
    conn = DynamicsConnector(
        sc.name,
        client,
        auth=BearerAuth(provider),
        tables=tables,
        api_path=o["api_path"],
        page_size=o["page_size"],
        lookback=timedelta(seconds=o["lookback_seconds"]),
    )
    return conn, conn


def _netsuite(
    config: Config, sc: SystemConfig, transport: httpx.BaseTransport | None, clients: list[httpx.Client]
) -> tuple[Any, Any]:
    from connectors.netsuite import NetSuiteConnector, NetSuiteM2M, NsRecord, standard_records

    o = sc.options
    client = _http(sc, o["base_url"], transport, clients)
    algorithm = o["signing_algorithm"]
    signer = (
        hs256_signer(o["private_key"]) if algorithm == "HS256" else pem_signer(o["private_key"], algorithm)
    )
    provider = NetSuiteM2M(
        client,
        client_id=o["client_id"].reveal(),
        certificate_id=o["certificate_id"],
        signer=signer,
        algorithm=algorithm,
        token_path=o["token_url"] or "/services/rest/auth/oauth2/v1/token",
    )
    known = standard_records()
    records = {}
    for obj, (entity, cols) in _fields_of(config, sc.name).items():
        m = entity.systems[sc.name]
        # A standard record keeps its definition (REST names, refs) and gains every mapped
        # column (custom fields such as custentity_*); a custom record is the mapping alone.
        base = known.get(obj) or NsRecord(obj, obj, (), external_id_field=m.external_id or "externalid")
        rules = [r for r in entity.fields.values() if sc.name in r.columns]

        def columns(test: Callable[[Any], bool], rules: list[Any] = rules) -> frozenset[str]:
            return frozenset(r.columns[sc.name] for r in rules if test(r))

        extra = tuple(c for c in dict.fromkeys(cols) if c not in base.fields and c != "id")
        records[obj] = replace(
            base,
            fields=(*base.fields, *extra),
            external_id_field=m.external_id or base.external_id_field,
            refs=base.refs | columns(lambda r: r.ref is not None),
            dates=base.dates | columns(lambda r: r.type == "date"),
            timestamps=base.timestamps | columns(lambda r: r.type == "datetime"),
            required=base.required | columns(lambda r: r.required),
        )
    conn = NetSuiteConnector(
        sc.name,
        client,
        auth=BearerAuth(provider),
        records=records,
        page_size=o["page_size"],
        lookback=timedelta(seconds=o["lookback_seconds"]),
        query_cap=o["query_cap"],
    )
    return conn, conn


def m_ext(entity: EntityConfig, system: str) -> str | None:
    """The external-id field an entity uses in ``system`` (None if it has none)."""
    return entity.systems[system].external_id


_BUILDERS: Mapping[str, Callable[..., tuple[Any, Any]]] = {
    "postgres": _pg,
    "salesforce": _salesforce,
    "hubspot": _hubspot,
    "dynamics": _dynamics,
    "netsuite": _netsuite,
}


def swap_config(runtime: Runtime, config: Config) -> list[str]:
    """Apply a new, validated config to a running runtime; return what changed.

    Mapping, ownership, policies and schedules change live. Connections (the systems'
    connector settings) need a restart: such a change is refused whole, so the running
    config stays consistent.
    """
    old = runtime.config
    moved = [
        name
        for name in {*old.systems, *config.systems}
        if _connection(old.systems.get(name)) != _connection(config.systems.get(name))
    ]
    if moved:
        raise ConfigError(
            [
                ConfigIssue(
                    str(config.path),
                    f"systems.{name}",
                    "connection settings changed: restart the agent to apply them",
                )
                for name in sorted(moved)
            ]
        )
    origins = runtime.resolver.own_origins
    runtime.resolver = Resolver(config, own_origins=origins, workflows=build_workflows(config))
    runtime.config = config
    a = config.agent
    runtime.policy = RetryPolicy(a.retry_base_seconds, a.retry_cap_seconds, a.max_attempts)
    changed = ["entities", "agent"] + [
        f"systems.{n}.poll_interval"
        for n in config.systems
        if old.systems[n].poll_interval != config.systems[n].poll_interval
    ]
    log_event(logger, "config_reloaded", digest=config.digest, changed=",".join(changed))
    return changed


def _connection(sc: SystemConfig | None) -> Any:
    if sc is None:
        return None
    return (
        sc.type,
        sc.verify_tls,
        sc.timeout_seconds,
        tuple(sorted((k, repr(v) if v is None else v) for k, v in sc.options.items())),
    )
