"""The official ``hubspot-api-client`` SDK, unchanged, against the HubSpot emulator.

The SDK deserializes responses into its generated models, which raise on missing required
fields: a free check that the emulator's search, upsert, associations and error shapes
match HubSpot's published spec.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from hubspot import HubSpot
from hubspot.crm.associations.v4 import ApiException as AssociationsApiException
from hubspot.crm.deals import (
    ApiException,
    BatchInputSimplePublicObjectBatchInputUpsert,
    Filter,
    FilterGroup,
    PublicObjectSearchRequest,
    SimplePublicObjectBatchInputUpsert,
)

from agent.model import utcnow
from connectors.emulator import EmulatorServer
from connectors.hubspot import HubSpotEmulator

TOKEN = "pat-na1-emulator"


@pytest.fixture
def sdk() -> Iterator[tuple[HubSpotEmulator, HubSpot]]:
    """The SDK pointed at a running emulator through its documented ``host`` option."""
    emu = HubSpotEmulator()
    with EmulatorServer(emu) as server:
        yield emu, HubSpot(access_token=TOKEN, host=server.url)


def test_sdk_searches_deals_when_filtering_by_modified_date(sdk: tuple[HubSpotEmulator, HubSpot]) -> None:
    """do_search with a GTE filter, one sort and paging returns typed, paged results."""
    emu, api = sdk
    base = utcnow() - timedelta(minutes=5)
    ids = [
        emu.insert("deals", {"dealname": f"D{n}", "amount": "10"}, at=base + timedelta(seconds=n))
        for n in range(3)
    ]
    since = str(int((base + timedelta(seconds=1)).timestamp() * 1000))
    request = PublicObjectSearchRequest(
        filter_groups=[
            FilterGroup(filters=[Filter(property_name="hs_lastmodifieddate", operator="GTE", value=since)])
        ],
        sorts=[{"propertyName": "hs_lastmodifieddate", "direction": "ASCENDING"}],
        properties=["dealname", "amount"],
        limit=1,
    )
    page = api.crm.deals.search_api.do_search(public_object_search_request=request)
    assert page.total == 2 and [r.id for r in page.results] == [ids[1]]
    assert page.results[0].properties["amount"] == "10" and isinstance(page.results[0].updated_at, datetime)
    request.after = page.paging.next.after
    last = api.crm.deals.search_api.do_search(public_object_search_request=request)
    assert [r.id for r in last.results] == [ids[2]] and last.paging is None


def test_sdk_upserts_by_unique_property_when_batch_is_sent(sdk: tuple[HubSpotEmulator, HubSpot]) -> None:
    """batch_api.upsert creates then updates by erp_id, with the ``new`` flag the spec requires."""
    emu, api = sdk
    inputs = BatchInputSimplePublicObjectBatchInputUpsert(
        inputs=[
            SimplePublicObjectBatchInputUpsert(id="C-1", id_property="erp_id", properties={"name": "Acme"}),
            SimplePublicObjectBatchInputUpsert(id="C-2", id_property="erp_id", properties={"name": "Globex"}),
        ]
    )
    first = api.crm.companies.batch_api.upsert(batch_input_simple_public_object_batch_input_upsert=inputs)
    assert first.status == "COMPLETE" and [r.new for r in first.results] == [True, True]
    again = api.crm.companies.batch_api.upsert(batch_input_simple_public_object_batch_input_upsert=inputs)
    assert [r.new for r in again.results] == [False, False]
    assert {r.id for r in first.results} == {r.id for r in again.results} and len(emu.all("companies")) == 2


def test_sdk_reads_error_and_association_shapes_when_calls_fail_or_link(
    sdk: tuple[HubSpotEmulator, HubSpot],
) -> None:
    """Errors carry category/correlationId/message; v4 association pages deserialize."""
    emu, api = sdk
    bad = BatchInputSimplePublicObjectBatchInputUpsert(
        inputs=[
            SimplePublicObjectBatchInputUpsert(
                id="1", id_property="hs_object_id", properties={"dealname": "x"}
            ),
        ]
    )
    with pytest.raises(ApiException) as caught:
        api.crm.deals.batch_api.upsert(batch_input_simple_public_object_batch_input_upsert=bad)
    body = json.loads(caught.value.body)
    assert caught.value.status == 400 and body["category"] == "VALIDATION_ERROR"
    assert {"message", "correlationId", "status"} <= set(body)
    deal = emu.insert("deals", {"dealname": "D"})
    company = emu.insert("companies", {"name": "C"})
    api.crm.associations.v4.basic_api.create_default(
        from_object_type="deals", from_object_id=deal, to_object_type="companies", to_object_id=company
    )
    page = api.crm.associations.v4.basic_api.get_page(
        object_type="deals", object_id=deal, to_object_type="companies"
    )
    assert [str(r.to_object_id) for r in page.results] == [company]
    assert page.results[0].association_types[0].type_id == 341
    with pytest.raises(AssociationsApiException):
        api.crm.associations.v4.basic_api.get_page(
            object_type="deals", object_id="999", to_object_type="companies"
        )
