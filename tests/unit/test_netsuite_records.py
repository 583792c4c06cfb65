"""The composition root's NetSuite record definitions: standard records merged with the mapped columns."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.daemon import build_runtime, open_config
from connectors.netsuite import NetSuiteConnector, NsRecord, standard_records

CONFIG = """
[agent]
state_path = "{state}"

[systems.erp]
type = "netsuite"
base_url = "http://127.0.0.1:9"
account = "1234567"
client_id = {{env = "NS_CLIENT_ID"}}
certificate_id = "syncagent-cert"
private_key = {{env = "NS_PRIVATE_KEY"}}
signing_algorithm = "HS256"

[entities.customer.systems.erp]
object = "customer"
key = "id"
external_id = "externalid"

[entities.customer.fields]
name = {{owner = "erp", erp = "companyname"}}

[entities.contract.systems.erp]
object = "customrecord_contract"
key = "id"
external_id = "externalid"

[entities.contract.fields]
title = {{owner = "erp", erp = "name", required = true}}
customer = {{owner = "erp", ref = "customer", erp = "custrecord_customer"}}
signed = {{owner = "erp", type = "date", erp = "custrecord_signed_on"}}
approved_at = {{owner = "erp", type = "datetime", erp = "custrecord_approved_at"}}

[entities.project.systems.erp]
object = "job"
key = "id"

[entities.project.fields]
code = {{owner = "erp", erp = "companyname"}}
contract = {{owner = "erp", ref = "contract", erp = "custentity_contract"}}
kickoff = {{owner = "erp", type = "date", erp = "custentity_kickoff"}}
"""


@pytest.fixture
def records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, NsRecord]:
    monkeypatch.setenv("NS_CLIENT_ID", "syncagent-client")
    monkeypatch.setenv("NS_PRIVATE_KEY", "emulator-secret")
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(state=tmp_path / "state.db"))
    runtime = build_runtime(open_config(path))
    try:
        sink = runtime.sinks["erp"]
        assert isinstance(sink, NetSuiteConnector)
        return dict(sink.records)
    finally:
        runtime.close()


def test_netsuite_builder_merges_mapped_custom_fields_into_a_standard_record_when_a_job_maps_them(
    records: dict[str, NsRecord],
) -> None:
    """The job keeps NetSuite's definition (REST names, refs, dates) and gains the custentity_* columns."""
    std, job = standard_records()["job"], records["job"]
    assert job.fields[: len(std.fields)] == std.fields
    assert {"custentity_contract", "custentity_kickoff"} <= set(job.fields)
    assert job.rest_names == std.rest_names
    assert job.refs == std.refs | {"custentity_contract"}
    assert job.dates == std.dates | {"custentity_kickoff"}
    assert job.required == std.required


def test_netsuite_builder_keeps_a_standard_record_unchanged_when_only_its_own_columns_are_mapped(
    records: dict[str, NsRecord],
) -> None:
    """A customer mapping only standard columns gets exactly NetSuite's customer definition."""
    assert records["customer"] == standard_records()["customer"]


def test_netsuite_builder_derives_refs_dates_and_required_from_the_mapping_when_the_record_is_custom(
    records: dict[str, NsRecord],
) -> None:
    """A custom record is the mapping alone: ref fields become references, typed fields dates, required kept."""
    contract = records["customrecord_contract"]
    assert contract.table == "customrecord_contract"
    assert set(contract.fields) == {
        "name",
        "custrecord_customer",
        "custrecord_signed_on",
        "custrecord_approved_at",
        "externalid",
    }
    assert contract.refs == {"custrecord_customer"}
    assert (contract.dates, contract.timestamps) == ({"custrecord_signed_on"}, {"custrecord_approved_at"})
    assert contract.required == {"name"}
