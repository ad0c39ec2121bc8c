"""The Pipedrive sandbox answers the calls of Pipedrive's OpenAPI descriptions with bodies of the same shape.

Pipedrive's v1 and v2 OpenAPI descriptions may not be redistributed (see shared/specs/SOURCES.md: they are
read at their mirror, juhokoskela/pipedrive-go, openapi/upstream/v2.yaml and v1.yaml). The shapes below are
JSON schemas written from a reading of those documents, one per operation:

- ``getDeals`` (GET /api/v2/deals), ``getDeal`` (GET /api/v2/deals/{id}), ``updateDeal`` (PATCH
  /api/v2/deals/{id}): the deal object of GetDealsResponse / UpsertDealResponse;
- ``getOrganizations`` (GET /api/v2/organizations): GetOrganizationsResponse;
- ``getProducts`` (GET /api/v2/products): GetProductsResponse (BaseProduct plus PricesArray);
- ``getDealProducts`` (GET /api/v2/deals/{id}/products) and ``getDealsProducts`` (GET
  /api/v2/deals/products): the deal-product object;
- ``getDealFields`` (GET /api/v2/dealFields, and v1 GET /v1/dealFields);
- the error object the v2 description gives for 404 (GetConvertResponse: success, error, error_info, data,
  additional_data).

Where the description and Pipedrive's own examples disagree, the examples (what the API answers) win, and the
schema says so: ``won_time``/``lost_time``/``close_time``/``expected_close_date`` are not marked nullable but
are null on an open deal; v1 ``additional_data`` lists ``start``/``limit``/``more_items_in_collection`` at its
top level while every v1 example nests them under ``pagination``; v1 ``field_type`` is an ``allOf`` of two
enums that do not agree (``int``, ``status``, ``stage`` appear only in the second), so the union is accepted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal
from typing import Any

import httpx
import pytest

from connectors.pipedrive.sandbox import PipedriveSandbox
from connectors.seedbook import generate_book

TOKEN = "demo-pipedrive-token"

STR = {"type": "string"}
STR_OR_NULL = {"type": ["string", "null"]}
INT = {"type": "integer"}
INT_OR_NULL = {"type": ["integer", "null"]}
NUM = {"type": "number"}
NUM_OR_NULL = {"type": ["number", "null"]}
BOOL = {"type": "boolean"}
RFC3339 = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$"}
RFC3339_OR_NULL = {"anyOf": [RFC3339, {"type": "null"}]}
DATE_OR_NULL = {"anyOf": [{"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"}, {"type": "null"}]}
HASH_KEYED = {"type": "object", "propertyNames": {"pattern": "^[0-9a-f]{40}$"}}


def obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required or list(properties)}


# getDeals / getDeal / updateDeal: the deal object (types from the schema, keys from the example).
DEAL = obj({
    "id": INT, "title": STR, "creator_user_id": INT, "owner_id": INT, "value": NUM, "person_id": INT_OR_NULL,
    "org_id": INT_OR_NULL, "stage_id": INT, "pipeline_id": INT, "currency": STR, "archive_time": RFC3339_OR_NULL,
    "add_time": RFC3339, "update_time": RFC3339, "stage_change_time": RFC3339_OR_NULL,
    "status": {"enum": ["open", "won", "lost", "deleted"]}, "is_archived": BOOL, "is_deleted": BOOL,
    "probability": NUM_OR_NULL, "lost_reason": STR_OR_NULL, "visible_to": INT, "close_time": RFC3339_OR_NULL,
    "won_time": RFC3339_OR_NULL, "lost_time": RFC3339_OR_NULL, "local_won_date": DATE_OR_NULL,
    "local_lost_date": DATE_OR_NULL, "local_close_date": DATE_OR_NULL, "expected_close_date": DATE_OR_NULL,
    "label_ids": {"type": "array", "items": INT}, "origin": STR, "origin_id": STR_OR_NULL,
    "channel": INT_OR_NULL, "channel_id": STR_OR_NULL, "acv": NUM_OR_NULL, "arr": NUM_OR_NULL,
    "mrr": NUM_OR_NULL, "custom_fields": HASH_KEYED,
})

# getOrganizations: OrganizationItem, with OrganizationItemAddress.
ADDRESS = obj(dict.fromkeys(("value", "country", "admin_area_level_1", "admin_area_level_2", "locality", "sublocality",
                             "route", "street_number", "subpremise", "postal_code"), STR_OR_NULL))
ORGANIZATION = obj({
    "id": INT, "name": STR, "owner_id": INT, "add_time": RFC3339, "update_time": RFC3339, "is_deleted": BOOL,
    "visible_to": INT, "address": {"anyOf": [ADDRESS, {"type": "null"}]}, "label_ids": {"type": "array", "items": INT},
    "website": STR_OR_NULL, "linkedin": STR_OR_NULL, "industry": INT_OR_NULL, "annual_revenue": INT_OR_NULL,
    "employee_count": INT_OR_NULL, "custom_fields": HASH_KEYED,
})

# getProducts: BaseProduct + PricesArray.
PRICE = obj({"product_id": INT, "price": NUM, "currency": STR, "cost": NUM, "direct_cost": NUM_OR_NULL,
             "notes": STR})
PRODUCT = obj({
    "id": INT, "name": STR, "code": STR, "description": STR_OR_NULL, "unit": STR, "tax": NUM,
    "category": STR_OR_NULL, "is_linkable": BOOL, "is_deleted": BOOL, "visible_to": {"enum": [1, 3, 5, 7]},
    "owner_id": INT, "add_time": RFC3339, "update_time": RFC3339,
    "billing_frequency": {"enum": ["one-time", "annually", "semi-annually", "quarterly", "monthly", "weekly"]},
    "billing_frequency_cycles": INT_OR_NULL, "prices": {"type": "array", "items": PRICE},
    "custom_fields": HASH_KEYED,
})

# getDealProducts / getDealsProducts: the deal-product (product attachment) object.
DEAL_PRODUCT = obj({
    "id": INT, "sum": NUM, "tax": NUM, "deal_id": INT, "name": STR, "product_id": INT,
    "product_variation_id": INT_OR_NULL, "order_nr": INT_OR_NULL, "add_time": RFC3339, "update_time": RFC3339,
    "comments": STR, "currency": STR, "discount": NUM, "discount_type": {"enum": ["percentage", "amount"]},
    "quantity": NUM, "item_price": NUM, "tax_method": {"enum": ["exclusive", "inclusive", "none"]},
    "is_enabled": BOOL,
    "billing_frequency": {"enum": ["one-time", "annually", "semi-annually", "quarterly", "monthly", "weekly"]},
    "billing_frequency_cycles": INT_OR_NULL, "billing_start_date": DATE_OR_NULL,
})

# getDealFields (v2).
V2_FIELD_TYPES = ["int", "double", "boolean", "varchar", "text", "phone", "varchar_options", "varchar_auto", "date",
                  "daterange", "time", "timerange", "enum", "set", "address", "monetary", "deal", "deals", "lead",
                  "org", "people", "project", "stage", "user", "activity", "json", "picture", "status",
                  "visible_to", "price_list", "billing_frequency", "projects_board", "projects_phase"]
V2_FIELD = obj({
    "field_name": STR, "field_code": STR, "description": STR_OR_NULL, "field_type": {"enum": V2_FIELD_TYPES},
    "options": {"anyOf": [{"type": "array", "items": obj({"id": {"type": ["integer", "string"]}, "label": STR},
                                                         ["id", "label"])}, {"type": "null"}]},
    "subfields": {"anyOf": [{"type": "array", "items": obj({"field_code": STR, "field_name": STR,
                                                             "field_type": STR})}, {"type": "null"}]},
    "is_custom_field": BOOL, "is_optional_response_field": BOOL,
}, ["field_name", "field_code", "field_type", "is_custom_field", "is_optional_response_field"])

# getDealFields (v1): the union of the two field_type enums of the allOf.
V1_FIELD_TYPES = sorted({"address", "date", "daterange", "double", "enum", "monetary", "org", "people", "phone", "set",
                         "text", "time", "timerange", "user", "varchar", "varchar_auto", "visible_to", "boolean", "int",
                         "json", "varchar_options", "activity", "deal", "lead", "pipeline", "product", "project",
                         "stage", "billing_frequency", "picture", "price_list", "projects_board", "projects_phase",
                         "status"})
V1_TIME = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$"}
V1_FIELD = obj({
    "id": INT, "key": STR, "name": STR, "order_nr": INT, "field_type": {"enum": V1_FIELD_TYPES}, "add_time": V1_TIME,
    "update_time": {"anyOf": [V1_TIME, {"type": "null"}]}, "last_updated_by_user_id": INT_OR_NULL,
    "created_by_user_id": INT_OR_NULL, "active_flag": BOOL, "edit_flag": BOOL, "index_visible_flag": BOOL,
    "details_visible_flag": BOOL, "add_visible_flag": BOOL, "important_flag": BOOL, "bulk_edit_allowed": BOOL,
    "searchable_flag": BOOL, "filtering_allowed": BOOL, "sortable_flag": BOOL,
    "options": {"anyOf": [{"type": "array", "items": obj({"id": {"type": ["integer", "string"]}, "label": STR})},
                          {"type": "null"}]},
    "mandatory_flag": BOOL,
})


def listing(item: dict[str, Any]) -> dict[str, Any]:
    """A v2 list answer: success, data array, additional_data.next_cursor (null on the last page)."""
    return obj({"success": {"const": True}, "data": {"type": "array", "items": item, "minItems": 1},
                "additional_data": obj({"next_cursor": STR_OR_NULL})})


def single(item: dict[str, Any]) -> dict[str, Any]:
    return obj({"success": {"const": True}, "data": item})


V1_LISTING = obj({
    "success": {"const": True}, "data": {"type": "array", "items": V1_FIELD, "minItems": 1},
    "additional_data": obj({"pagination": obj({"start": INT, "limit": INT, "more_items_in_collection": BOOL},
                                              ["start", "limit", "more_items_in_collection"])}),
})
ERROR = obj({"success": {"const": False}, "error": STR, "error_info": STR, "data": {"type": "null"},
             "additional_data": {"type": "null"}})


@pytest.fixture(scope="module")
def sandbox() -> PipedriveSandbox:
    sb = PipedriveSandbox(seed=5)
    sb.load_book(generate_book(5, companies=20, deals=40))
    return sb


@pytest.fixture
def api(sandbox: PipedriveSandbox) -> Iterator[httpx.Client]:
    with httpx.Client(transport=sandbox.transport(), base_url="https://api.pipedrive.com",
                      headers={"x-api-token": TOKEN}) as c:
        yield c


_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float | Decimal) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def problems(value: Any, schema: Mapping[str, Any], where: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema`` (the JSON-schema keywords used above); empty when it conforms."""
    out: list[str] = []
    if "anyOf" in schema:
        if all(problems(value, alt, where) for alt in schema["anyOf"]):
            out.append(f"{where}: matches none of the alternatives")
        return out
    if "const" in schema and value != schema["const"]:
        out.append(f"{where}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{where}: {value!r} is not one of {schema['enum']}")
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        if not any(_TYPES[t](value) for t in names):
            return [f"{where}: {value!r} is not of type {types}"]
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        out.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, dict):
        out += [f"{where}: missing {k!r}" for k in schema.get("required", []) if k not in value]
        for k, sub in schema.get("properties", {}).items():
            if k in value:
                out += problems(value[k], sub, f"{where}.{k}")
        names_schema = schema.get("propertyNames")
        if names_schema is not None:
            for k in value:
                out += problems(k, names_schema, f"{where} key {k!r}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            out.append(f"{where}: fewer than {schema['minItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                out += problems(item, schema["items"], f"{where}[{i}]")
    return out


def check(resp: httpx.Response, schema: dict[str, Any], status: int = 200) -> Any:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    found = problems(body, schema)
    assert not found, found[:10]
    return body


def test_the_expectations_reject_other_shapes(api: httpx.Client) -> None:
    """The schemas are not vacuous: a value as a string, a missing key or a wrong envelope is caught."""
    body = api.get("/api/v2/deals", params={"limit": 3}).json()
    assert not problems(body, listing(DEAL))
    body["data"][0]["value"] = "12"
    del body["data"][1]["custom_fields"]
    body["additional_data"] = {}
    found = problems(body, listing(DEAL))
    assert len(found) == 3
    assert problems({"success": True, "data": {}}, ERROR)


def test_get_deals_matches_get_deals_response(api: httpx.Client) -> None:
    """getDeals with the documented parameters (limit 100, sort by update_time) answers GetDealsResponse."""
    body = check(api.get("/api/v2/deals", params={"limit": 100, "sort_by": "update_time", "sort_direction": "asc",
                                                  "status": "open,won,lost"}), listing(DEAL))
    assert {d["status"] for d in body["data"]} == {"open", "won", "lost"}
    check(api.get("/api/v2/deals", params={"limit": 10}), listing(DEAL))


def test_get_deal_matches_get_deal_response(api: httpx.Client) -> None:
    """getDeal answers one deal object; an unknown id answers the documented error object."""
    check(api.get("/api/v2/deals/1"), single(DEAL))
    check(api.get("/api/v2/deals/1", params={"include_option_labels": "true"}), single({**DEAL, "properties": {
        **DEAL["properties"], "custom_fields": {"type": "object"}}}))
    check(api.get("/api/v2/deals/99999"), ERROR, 404)


def test_get_organizations_matches_get_organizations_response(api: httpx.Client) -> None:
    """getOrganizations answers organizations with the address object and hash-keyed custom fields."""
    body = check(api.get("/api/v2/organizations", params={"limit": 100}), listing(ORGANIZATION))
    assert all(o["address"]["locality"] for o in body["data"])


def test_get_products_matches_get_products_response(api: httpx.Client) -> None:
    """getProducts answers products with code, tax and the prices array."""
    body = check(api.get("/api/v2/products", params={"limit": 100}), listing(PRODUCT))
    assert {p["currency"] for p in body["data"][0]["prices"]} == {"EUR", "USD"}


def test_deal_products_match_get_deal_products_response(sandbox: PipedriveSandbox, api: httpx.Client) -> None:
    """getDealProducts and getDealsProducts answer deal-product objects."""
    deal = next(i for i in sandbox.deal_ids() if sandbox.deal_products_of(i))
    check(api.get(f"/api/v2/deals/{deal}/products", params={"limit": 100}), listing(DEAL_PRODUCT))
    check(api.get("/api/v2/deals/products", params={"deal_ids": ",".join(str(i) for i in sandbox.deal_ids()[:10]),
                                                    "limit": 100}), listing(DEAL_PRODUCT))


def test_update_deal_matches_upsert_deal_response(sandbox: PipedriveSandbox, api: httpx.Client) -> None:
    """updateDeal with a title, a value and a custom field answers UpsertDealResponse; a bad body the error."""
    fields = api.get("/api/v2/dealFields", params={"limit": 500}).json()["data"]
    source = next(f for f in fields if f["field_name"] == "Acquisition source")
    option = source["options"][1]["id"]
    body = check(api.patch("/api/v2/deals/2", json={"title": "Renamed deal", "value": 1234.5,
                                                    "custom_fields": {source["field_code"]: option}}), single(DEAL))
    assert body["data"]["title"] == "Renamed deal"
    assert body["data"]["custom_fields"][source["field_code"]] == option
    check(api.patch("/api/v2/deals/2", json={"value": "a lot"}), ERROR, 400)


def test_deal_fields_match_get_deal_fields_response(api: httpx.Client) -> None:
    """getDealFields answers in its v2 shape, and v1 GET /dealFields in the v1 shape with pagination."""
    check(api.get("/api/v2/dealFields", params={"limit": 100}), listing(V2_FIELD))
    body = check(api.get("/v1/dealFields", params={"start": 0, "limit": 100}), V1_LISTING)
    assert any(len(f["key"]) == 40 for f in body["data"])
    check(api.get("/v1/organizationFields"), V1_LISTING)
