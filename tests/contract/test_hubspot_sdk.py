"""The official hubspot-api-client, pointed at the sandbox, works unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hubspot import HubSpot
from hubspot.crm.associations.v4 import (
    BatchInputPublicFetchAssociationsBatchRequest,
    PublicFetchAssociationsBatchRequest,
)
from hubspot.crm.companies import BatchReadInputSimplePublicObjectId, SimplePublicObjectId
from hubspot.crm.deals import Filter, FilterGroup, PublicObjectSearchRequest
from hubspot.crm.deals.exceptions import UnauthorizedException

from connectors.hubspot.sandbox import HubSpotSandbox
from connectors.sandboxkit import SandboxServer, serve
from connectors.seedbook import Book, generate_book

TOKEN = "demo-hubspot-token"


@pytest.fixture(scope="module")
def book() -> Book:
    return generate_book(5, companies=30, deals=90)


@pytest.fixture(scope="module")
def sandbox(book: Book) -> Iterator[tuple[HubSpotSandbox, SandboxServer]]:
    sb = HubSpotSandbox(seed=5, requests_per_10s=10_000, searches_per_s=1_000)
    sb.load_book(book)
    server = serve(sb)
    yield sb, server
    server.stop()


class Apis:
    """SDK API objects, each holding a connection pool that is closed after the test."""

    def __init__(self, url: str, token: str = TOKEN) -> None:
        self.client = HubSpot(access_token=token, host=url)
        self._made: list[Any] = []

    def __call__(self, api: Any) -> Any:
        self._made.append(api)
        return api

    def close(self) -> None:
        for api in self._made:
            api.api_client.rest_client.pool_manager.clear()


@pytest.fixture
def sdk(sandbox: tuple[HubSpotSandbox, SandboxServer]) -> Iterator[Apis]:
    apis = Apis(sandbox[1].url)
    yield apis
    apis.close()


def test_deals_get_page_to_the_end_with_associations(sdk: Apis, sandbox: tuple[HubSpotSandbox, SandboxServer]) -> None:
    """basic_api.get_page pages with after to the last deal and returns company and line item associations."""
    api = sdk(sdk.client.crm.deals.basic_api)
    seen: list[str] = []
    after = None
    while True:
        page = api.get_page(limit=25, after=after, associations=["companies", "line_items"],
                            properties=["dealname", "amount", "hs_is_closed_won"])
        for deal in page.results:
            seen.append(deal.id)
            assert deal.associations["companies"].results[0].type in ("deal_to_company", "deal_to_company_unlabeled")
            assert deal.associations["line_items"].results
            assert isinstance(deal.properties["amount"], str)
        if page.paging is None:
            break
        after = page.paging.next.after
        assert page.paging.next.link.startswith(sandbox[1].url)
    assert seen == sandbox[0].object_ids("deals")


def test_deals_search_with_a_filter(sdk: Apis, sandbox: tuple[HubSpotSandbox, SandboxServer]) -> None:
    """search_api.do_search filters closed-won deals and reports the total."""
    api = sdk(sdk.client.crm.deals.search_api)
    request = PublicObjectSearchRequest(
        filter_groups=[FilterGroup(filters=[Filter(property_name="hs_is_closed_won", operator="EQ", value="true")])],
        properties=["dealname", "hs_is_closed_won"], limit=100,
    )
    result = api.do_search(public_object_search_request=request)
    won = [d["id"] for d in sandbox[0].deals_snapshot() if d["hs_is_closed_won"] == "true"]
    assert result.total == len(won)
    assert sorted(r.id for r in result.results) == sorted(won)
    assert all(r.properties["hs_is_closed_won"] == "true" for r in result.results)


def test_companies_batch_read(sdk: Apis, sandbox: tuple[HubSpotSandbox, SandboxServer]) -> None:
    """batch_api.read returns the companies asked for, with their custom properties."""
    api = sdk(sdk.client.crm.companies.batch_api)
    ids = sandbox[0].object_ids("companies")[:5]
    result = api.read(batch_read_input_simple_public_object_id=BatchReadInputSimplePublicObjectId(
        inputs=[SimplePublicObjectId(id=i) for i in ids], properties=["name", "vat_number", "siren"],
        properties_with_history=[]))
    assert sorted(r.id for r in result.results) == sorted(ids)
    assert result.status == "COMPLETE"
    assert all(r.properties["name"] for r in result.results)


def test_associations_v4_batch_read(sdk: Apis, sandbox: tuple[HubSpotSandbox, SandboxServer]) -> None:
    """associations.v4 batch_api.get_page reads deal-to-line-item links with their association types."""
    api = sdk(sdk.client.crm.associations.v4.batch_api)
    sb = sandbox[0]
    deals = sb.object_ids("deals")[:10]
    result = api.get_page(from_object_type="deals", to_object_type="line_items",
                          batch_input_public_fetch_associations_batch_request=BatchInputPublicFetchAssociationsBatchRequest(
                              inputs=[PublicFetchAssociationsBatchRequest(id=i) for i in deals]))
    for row in result.results:
        assert sorted(t.to_object_id for t in row.to) == sorted(sb.associated_ids("deals", row._from.id, "line_items"))
        assert all(a.type_id == 19 and a.category == "HUBSPOT_DEFINED" for t in row.to for a in t.association_types)
    assert len(result.results) == len(deals)


def test_properties_get_all(sdk: Apis) -> None:
    """properties core_api.get_all lists the deal properties with their types and groups."""
    api = sdk(sdk.client.crm.properties.core_api)
    props = {p.name: p for p in api.get_all(object_type="deals").results}
    assert props["amount"].type == "number"
    assert props["dealstage"].type == "enumeration"
    assert props["hs_is_closed_won"].modification_metadata.read_only_value


def test_pipelines_get_all(sdk: Apis) -> None:
    """pipelines_api.get_all returns both deal pipelines with string stage metadata."""
    api = sdk(sdk.client.crm.pipelines.pipelines_api)
    pipelines = api.get_all(object_type="deals").results
    assert {p.id for p in pipelines} == {"default", "84213556"}
    for p in pipelines:
        won = [s for s in p.stages if s.metadata == {"isClosed": "true", "probability": "1.0"}]
        assert len(won) == 1


def test_bad_token_is_the_sdk_401(sandbox: tuple[HubSpotSandbox, SandboxServer]) -> None:
    """The SDK sees the sandbox's 401 as its own UnauthorizedException, as with HubSpot."""
    apis = Apis(sandbox[1].url, token="wrong")
    try:
        with pytest.raises(UnauthorizedException):
            apis(apis.client.crm.deals.basic_api).get_page()
    finally:
        apis.close()
