"""Contract tests: the ``Lookup`` capability (read records by id, in pages) of every API connector.

A fetched record must carry what a captured change of it carries, so reconciliation compares
like with like; an id the system does not have (never there, deleted, malformed) is ``None``.
Then reconciliation itself runs through each of HubSpot, Dynamics and NetSuite: two systems
of the same kind, each on its own emulator, three linked records: one in step, one differing,
one gone from the second system.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.daemon import build_runtime, open_config
from agent.model import utcnow
from agent.reconcile import Lookup, reconcile
from connectors.dynamics import DynamicsEmulator
from connectors.emulator import EmulatorApp, EmulatorServer
from connectors.hubspot import HubSpotEmulator
from connectors.netsuite.emulator import NetSuiteEmulator
from state import open_state, xref
from tests.contract.conftest import System

ABSENT = {
    "salesforce": ["001000000000999AAA"],
    "hubspot": ["999999999", "not-an-id"],
    "dynamics": [str(uuid.uuid4()), "not-a-guid"],
    "netsuite": ["999999", "not-an-id"],
}


def test_lookup_fetches_records_by_id_as_capture_reads_them_when_ids_span_several_pages(
    api_system: System,
) -> None:
    """105 records fetched by id equal their captured fields; unknown, malformed and deleted ids are None."""
    s = api_system
    lookup = s.sink
    assert isinstance(lookup, Lookup)
    ids = s.create(105, tie=False)
    s.settle()
    changes, _ = s.drain()
    captured = {s.record_id(c): c.fields for c in changes}
    s.delete(ids[0])
    fetched = lookup.fetch(s.object_name, [*ids, *ABSENT[s.kind]])
    assert set(fetched) == {*ids, *ABSENT[s.kind]}
    assert [fetched[i] for i in (ids[0], *ABSENT[s.kind])] == [None] * (1 + len(ABSENT[s.kind]))
    for rid in ids[1:]:
        record = fetched[rid]
        assert record is not None, rid
        assert {k: record.get(k) for k in captured[rid]} == dict(captured[rid])


def test_lookup_answers_an_empty_result_without_calling_the_system_when_no_ids_are_asked(
    api_system: System,
) -> None:
    """No ids, no request."""
    emu: EmulatorApp = getattr(api_system, "emu")  # noqa: B009 (every API system has its emulator)
    lookup = api_system.sink
    assert isinstance(lookup, Lookup)
    before = len(emu.requests())
    assert lookup.fetch(api_system.object_name, []) == {}
    assert len(emu.requests()) == before


# --- reconcile through each connector -------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """How to configure, fill and empty one kind of system for the reconcile test."""

    system: str  # the [systems.X] table body, with {url}
    mapping: str  # object, key, external id
    name: str  # the name column
    make: Callable[[], EmulatorApp]
    insert: Callable[[EmulatorApp, str], str]
    remove: Callable[[EmulatorApp, str], None]
    env: dict[str, str]


KINDS = {
    "hubspot": Kind(
        'type = "hubspot"\nbase_url = "{url}"\ntoken = {env = "HS_TOKEN"}\nsearch_rate_per_s = 1000.0\n',
        'object = "companies"\nkey = "id"\nexternal_id = "erp_id"\n',
        "name",
        lambda: HubSpotEmulator(search_rate_per_s=1000, burst_limit=10_000),
        lambda e, n: e.insert("companies", {"name": n}),  # type: ignore[attr-defined]
        lambda e, i: e.archive("companies", i),  # type: ignore[attr-defined]
        {"HS_TOKEN": "pat-na1-emulator"},
    ),
    "dynamics": Kind(
        'type = "dynamics"\nbase_url = "{url}"\ntenant = "contoso-tenant"\n'
        'token_url = "{url}/contoso-tenant/oauth2/v2.0/token"\n'
        'client_id = {env = "DV_CLIENT_ID"}\nclient_secret = {env = "DV_CLIENT_SECRET"}\n',
        'object = "accounts"\nkey = "accountid"\nexternal_id = "erp_customerid"\n',
        "name",
        DynamicsEmulator,
        lambda e, n: e.insert("accounts", {"name": n}),  # type: ignore[attr-defined]
        lambda e, i: e.delete("accounts", i),  # type: ignore[attr-defined]
        {"DV_CLIENT_ID": "syncagent", "DV_CLIENT_SECRET": "s3cret"},
    ),
    "netsuite": Kind(
        'type = "netsuite"\nbase_url = "{url}"\naccount = "1234567"\nclient_id = {env = "NS_CLIENT_ID"}\n'
        'certificate_id = "syncagent-cert"\nprivate_key = {env = "NS_PRIVATE_KEY"}\n'
        'signing_algorithm = "HS256"\npage_size = 2\n',
        'object = "customer"\nkey = "id"\nexternal_id = "externalid"\n',
        "companyname",
        NetSuiteEmulator,
        lambda e, n: e.insert("customer", {"companyname": n}),  # type: ignore[attr-defined]
        lambda e, i: e.delete("customer", i),  # type: ignore[attr-defined]
        {"NS_CLIENT_ID": "syncagent-client", "NS_PRIVATE_KEY": "emulator-secret"},
    ),
}


@pytest.fixture(params=sorted(KINDS))
def pair(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Kind, EmulatorApp, EmulatorApp, Path]]:
    """Systems ``a`` and ``b`` of one kind, each on its own emulator, and a config mapping both."""
    kind = KINDS[request.param]
    for k, v in kind.env.items():
        monkeypatch.setenv(k, v)
    a, b = kind.make(), kind.make()
    for emu in (a, b):
        emu.freeze_clock(utcnow().replace(microsecond=0))
    with EmulatorServer(a) as sa, EmulatorServer(b) as sb:
        path = tmp_path / "config.toml"
        path.write_text(
            f'[agent]\nstate_path = "{tmp_path / "state.db"}"\n'
            f"[systems.a]\n{kind.system.replace('{url}', sa.url)}\n"
            f"[systems.b]\n{kind.system.replace('{url}', sb.url)}\n"
            f"[entities.customer.systems.a]\n{kind.mapping}\n[entities.customer.systems.b]\n{kind.mapping}\n"
            f'[entities.customer.fields]\nname = {{owner = "a", a = "{kind.name}", b = "{kind.name}"}}\n'
        )
        yield kind, a, b, path


def test_reconcile_finds_a_differing_and_a_missing_record_when_reading_through_each_connector(
    pair: tuple[Kind, EmulatorApp, EmulatorApp, Path],
) -> None:
    """Three linked records: one in step, one renamed in b, one deleted from b; the report says so."""
    kind, a, b, path = pair
    names = [("Same", "Same"), ("Owner's", "Drifted"), ("Gone", "Gone")]
    pairs = [(kind.insert(a, x), kind.insert(b, y)) for x, y in names]
    kind.remove(b, pairs[2][1])
    config = open_config(path)
    runtime = build_runtime(config)
    st = open_state(config.agent.state_path)
    try:
        with st.write_txn():
            for n, (ida, idb) in enumerate(pairs):
                xref.link(st, "customer", f"c{n}", "a", ida)
                xref.link(st, "customer", f"c{n}", "b", idb)
        report = reconcile(runtime, st, "customer")
    finally:
        st.close()
        runtime.close()
    assert report.systems == ("a", "b") and dict(report.skipped_systems) == {}
    assert (report.records, report.compared, report.in_step, report.drifted_records) == (3, 2, 1, 1)
    [drift] = report.drifts
    assert (drift.canonical_id, drift.field, drift.winner, drift.targets) == ("c1", "name", "a", ("b",))
    assert dict(drift.values) == {"a": "Owner's", "b": "Drifted"}
    assert dict(report.missing_by_system) == {"b": 1}
    [missing] = report.missing
    assert (missing.canonical_id, missing.system, missing.present_in) == ("c2", "b", ("a",))
