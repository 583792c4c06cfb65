"""Contract tests: the NetSuite sink's ``unit`` op (a saga of upserts by external id) and custom records."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from agent.model import Op, Secret
from connectors.auth import BearerAuth, hs256_signer
from connectors.emulator import EmulatorServer
from connectors.http import make_client
from connectors.netsuite import NetSuiteConnector, NetSuiteM2M, NsRecord, standard_records
from connectors.netsuite.emulator import RECORD_PATH, NetSuiteEmulator, ns_error

CONTRACT = NsRecord(
    "customrecord_contract",
    "customrecord_contract",
    ("name", "custrecord_customer", "custrecord_value"),
    refs=frozenset({"custrecord_customer"}),
)


@pytest.fixture
def emu() -> NetSuiteEmulator:
    ns = NetSuiteEmulator()
    ns.define_record(
        "customrecord_contract", {"custrecord_customer": "ref:customer", "custrecord_value": "number"}
    )
    ns.add_fields("job", {"custentity_contract": "ref:customrecord_contract"})
    return ns


@pytest.fixture
def client(emu: NetSuiteEmulator) -> Iterator[httpx.Client]:
    with EmulatorServer(emu) as server, make_client(server.url, timeout=5.0) as c:
        yield c


def auth_for(client: httpx.Client) -> BearerAuth:
    signer = hs256_signer(Secret("emulator-secret"))
    return BearerAuth(
        NetSuiteM2M(
            client,
            client_id="syncagent-client",
            certificate_id="syncagent-cert",
            algorithm="HS256",
            signer=signer,
        )
    )


@pytest.fixture
def conn(client: httpx.Client) -> NetSuiteConnector:
    std = standard_records()
    job = replace(std["job"], fields=(*std["job"].fields, "custentity_contract"))
    records = {"customer": std["customer"], "job": job, "customrecord_contract": CONTRACT}
    return NetSuiteConnector("netsuite", client, auth=auth_for(client), records=records, throttle_backoff=4.0)


def step(obj: str, key: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    return {"object": obj, "key": key, "fields": fields, "entity": obj, "canonical_id": "c", "canonical": {}}


def unit(*steps: dict[str, Any], key: str = "wf:closed_won:deal-1") -> Op:
    return Op(
        key,
        "netsuite",
        "contract",
        "deal-1",
        "customrecord_contract",
        "unit",
        {},
        {"steps": list(steps)},
        "t1",
    )


def closed_won(**job: Any) -> Op:
    """Customer by CRM id, contract by CRM id, job by its code: later steps name earlier ids."""
    return unit(
        step("customer", {"externalid": "001A"}, {"companyname": "Acme", "entityid": "C-1"}),
        step(
            "customrecord_contract",
            {"externalid": "006A"},
            {"name": "Rollout", "custrecord_customer": {"$step": 0}},
        ),
        step(
            "job",
            {"companyname": "IMPL-006A"},
            {"parent": {"$step": 0}, "custentity_contract": {"$step": 1}, **job},
        ),
    )


def writes(emu: NetSuiteEmulator) -> list[tuple[str, str, int]]:
    return [
        (r.method, r.path.removeprefix(RECORD_PATH + "/"), r.status)
        for r in emu.requests(path_prefix=RECORD_PATH)
        if r.method != "GET"
    ]


def test_unit_answers_the_step_ids_as_a_json_list_when_every_step_upserts(emu, conn):
    """Three PUTs by eid; the outcome's id is the JSON list of internal ids (the PostgreSQL sink's shape)."""
    [out] = conn.apply([closed_won()])
    assert out.status == "applied"
    cid, kid, jid = json.loads(out.external_id or "")
    [job] = emu.all("job")
    assert (str(job["id"]), job["parent"], job["custentity_contract"]) == (jid, cid, kid)
    assert (job["companyname"], job["externalid"]) == ("IMPL-006A", "IMPL-006A"), (
        "a natural key doubles as the eid"
    )
    assert [(m, p) for m, p, _ in writes(emu)] == [
        ("PUT", "customer/eid:001A"),
        ("PUT", "customrecord_contract/eid:006A"),
        ("PUT", "job/eid:IMPL-006A"),
    ]
    assert emu.get("customrecord_contract", kid)["custrecord_customer"] == cid  # type: ignore[index]


def test_unit_creates_nothing_twice_when_the_same_unit_is_applied_again(emu, conn):
    """A replay of an applied unit finds every record by its eid and answers the same ids."""
    first = conn.apply([closed_won()])[0].external_id
    again = conn.apply([replace(closed_won(), idempotency_key="wf:replayed")])[0].external_id
    assert again == first
    assert [len(emu.all(t)) for t in ("customer", "customrecord_contract", "job")] == [1, 1, 1]


def test_unit_continues_at_the_failed_step_when_retried_after_a_server_error(emu, conn):
    """A 503 on the job answers retry; the retry in the same process sends only the job."""
    emu.inject(
        ns_error(503, "UNEXPECTED_ERROR", "An unexpected error occurred."), path_prefix=RECORD_PATH + "/job"
    )
    [first] = conn.apply([closed_won()])
    assert first.status == "retry"
    assert [len(emu.all(t)) for t in ("customer", "customrecord_contract", "job")] == [1, 1, 0]
    sent = len(writes(emu))
    [second] = conn.apply([closed_won()])
    assert second.status == "applied" and len(json.loads(second.external_id or "")) == 3
    assert writes(emu)[sent:] == [("PUT", "job/eid:IMPL-006A", 204)]


def test_unit_and_the_ops_after_it_retry_with_the_backoff_hint_when_the_concurrency_limit_answers(emu, conn):
    """A 429 at step 1 makes the unit and every later op of the batch retry, with the configured hint."""
    emu.inject(
        ns_error(429, "CONCURRENCY_LIMIT_EXCEEDED", "Concurrent request limit exceeded."),
        path_prefix=RECORD_PATH + "/customrecord_contract",
    )
    later = Op(
        "k2",
        "netsuite",
        "customer",
        "c2",
        "customer",
        "upsert",
        {"externalid": "C-2"},
        {"companyname": "B"},
        "t2",
    )
    outcomes = conn.apply([closed_won(), later])
    assert [(o.status, o.retry_after) for o in outcomes] == [("retry", 4.0), ("retry", 4.0)]


def test_unit_rejects_naming_the_step_and_the_kept_records_when_netsuite_refuses_a_later_step(emu, conn):
    """A refused job: the reject names step 2, NetSuite's reason and field, and the ids already there."""
    emu.allow("job", "entitystatus", ("1",))
    [out] = conn.apply([closed_won(entitystatus="9")])
    [customer], [contract] = emu.all("customer"), emu.all("customrecord_contract")
    assert (out.status, out.reason, out.field_name) == ("reject", "USER_ERROR", "entitystatus")
    assert out.detail == (
        "step 2 (job): Invalid value for the field entityStatus.; already in NetSuite, kept: "
        f"step 0 customer id {customer['id']}, step 1 customrecord_contract id {contract['id']}"
    )
    emu.allow("job", "entitystatus", ("1", "9"))
    [fixed] = conn.apply([closed_won(entitystatus="9")])
    assert json.loads(fixed.external_id or "")[:2] == [str(customer["id"]), str(contract["id"])]


@pytest.mark.parametrize(
    ("steps", "reason", "field"),
    [
        pytest.param(
            [step("customer", {"externalid": "001A"}, {"entityid": "C-1"})],
            "MISSING_REQUIRED",
            "companyname",
            id="required",
        ),
        pytest.param(
            [step("customer", {"externalid": None}, {"companyname": "A"})],
            "MISSING_KEY",
            "externalid",
            id="no_key_value",
        ),
        pytest.param(
            [step("customer", {"externalid": "a b"}, {"companyname": "A"})],
            "INVALID_KEY",
            "externalid",
            id="bad_eid",
        ),
        pytest.param([step("customer", {"id": "x1"}, {})], "INVALID_KEY", "id", id="bad_internal_id"),
        pytest.param([step("vendor", {"externalid": "V"}, {})], "UNKNOWN_RECORD", None, id="unknown_record"),
        pytest.param(
            [step("customer", {"externalid": "A"}, {"companyname": "A", "bogus": 1})],
            "UNKNOWN_FIELD",
            "bogus",
            id="unknown_field",
        ),
        pytest.param(
            [step("job", {"companyname": "P"}, {"parent": {"$step": 0}})],
            "bad_step_reference",
            "parent",
            id="forward_ref",
        ),
    ],
)
def test_unit_rejects_before_any_write_when_a_step_fails_local_validation(emu, conn, steps, reason, field):
    """Every step is checked first: a bad last step refuses the unit with nothing sent to NetSuite."""
    good = step("customer", {"externalid": "001B"}, {"companyname": "Fine"})
    [out] = conn.apply([unit(good, *[replace_refs(s) for s in steps])])
    assert (out.status, out.reason, out.field_name) == ("reject", reason, field)
    assert (
        out.detail
        and out.detail.startswith("step 1 (")
        and out.detail.endswith("nothing of the unit was written")
    )
    assert writes(emu) == []


def replace_refs(s: dict[str, Any]) -> dict[str, Any]:
    """Shift ``$step`` references by one, for a step placed after a leading good step."""
    fields = {k: {"$step": v["$step"] + 1} if isinstance(v, dict) else v for k, v in s["fields"].items()}
    return {**s, "fields": fields}


def test_unit_sends_no_request_for_a_linked_customer_when_its_step_writes_nothing(emu, conn):
    """A customer already in NetSuite is a step keyed by its internal id with no fields: only its id is used."""
    cid = emu.insert("customer", {"companyname": "Acme", "externalid": "001A"})
    op = unit(
        step("customer", {"id": cid}, {}),
        step(
            "customrecord_contract",
            {"externalid": "006A"},
            {"name": "R", "custrecord_customer": {"$step": 0}},
        ),
    )
    [out] = conn.apply([op])
    assert json.loads(out.external_id or "")[0] == cid
    assert [p for _, p, _ in writes(emu)] == ["customrecord_contract/eid:006A"]


def test_emulator_serves_a_custom_record_the_documented_way_when_one_is_defined(emu, client, conn):
    """A custom record: REST GET with ``{id, refName}`` refs, SuiteQL table of its type, a 400 on a bad ref."""
    cid = emu.insert("customer", {"companyname": "Acme"})
    auth = auth_for(client)
    put = client.put(
        f"{RECORD_PATH}/customrecord_contract/eid:K1",
        json={"name": "R", "custrecord_customer": {"id": cid}},
        auth=auth,
    )
    assert put.status_code == 204 and put.headers["Location"].endswith("/customrecord_contract/1")
    body = client.get(f"{RECORD_PATH}/customrecord_contract/eid:K1", auth=auth).json()
    assert body["externalId"] == "K1" and body["custrecord_customer"]["id"] == cid
    assert body["custrecord_customer"]["refName"] == "Acme"
    assert conn.fetch("customrecord_contract", ["1", "2"])["2"] is None
    bad = client.put(
        f"{RECORD_PATH}/customrecord_contract/eid:K2", json={"custrecord_customer": {"id": "999"}}, auth=auth
    )
    assert bad.status_code == 400 and bad.json()["o:errorDetails"][0]["o:errorCode"] == "USER_ERROR"
