"""The HubSpot sandbox behaves like HubSpot: paging, search semantics and caps, limits, auth, batches."""

from __future__ import annotations

import datetime as dt
import json
import pickle
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.hubspot.sandbox import CUSTOM_PIPELINE_ID, HubSpotSandbox, parse_ms, to_ms
from connectors.sandboxkit import Clock
from connectors.seedbook import Book, generate_book

TOKEN = "demo-hubspot-token"
SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"


@pytest.fixture(scope="module")
def book() -> Book:
    return generate_book(11, companies=40, deals=120)


def make(book: Book, **options: Any) -> HubSpotSandbox:
    options.setdefault("requests_per_10s", 100_000)
    options.setdefault("searches_per_s", 100_000)
    sb = HubSpotSandbox(seed=11, **options)
    sb.load_book(book)
    return sb


@pytest.fixture
def sb(book: Book) -> HubSpotSandbox:
    return make(book)


@pytest.fixture
def api(sb: HubSpotSandbox) -> Iterator[httpx.Client]:
    with httpx.Client(transport=sb.transport(), base_url="https://api.hubapi.com",
                      headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c


def search(api: httpx.Client, **body: Any) -> httpx.Response:
    return api.post("/crm/v3/objects/deals/search", json=body)


def ids_where(sb: HubSpotSandbox, pred: Any) -> set[str]:
    return {i for i in sb.object_ids("deals") if pred(sb.properties_of("deals", i))}


def test_list_pages_with_after_and_absolute_link(sb: HubSpotSandbox, api: httpx.Client) -> None:
    """Listing pages with after to the end; paging.next.link is absolute and gives the same next page."""
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 7, "properties": "dealname,amount"}
    while True:
        body = api.get("/crm/v3/objects/deals", params=params).json()
        seen += [r["id"] for r in body["results"]]
        if "paging" not in body:
            break
        nxt = body["paging"]["next"]
        assert nxt["link"].startswith("https://api.hubapi.com/crm/v3/objects/deals?")
        via_link = api.get(nxt["link"]).json()
        params["after"] = nxt["after"]
        assert api.get("/crm/v3/objects/deals", params=params).json()["results"] == via_link["results"]
    assert seen == sb.object_ids("deals")
    assert len(seen) == 120


def test_list_offset_paging_ends(sb: HubSpotSandbox, api: httpx.Client) -> None:
    """offset paging (Airbyte's line items and products) walks every record once and then runs dry."""
    seen: list[str] = []
    offset = 0
    while True:
        rows = api.get("/crm/v3/objects/line_items", params={"offset": offset, "limit": 100}).json()["results"]
        if not rows:
            break
        seen += [r["id"] for r in rows]
        offset += 100
    assert seen == sb.object_ids("line_items")


def test_object_type_aliases_and_limits(api: httpx.Client) -> None:
    """Plural, singular and 0-x types are the same objects; limit defaults to 10 and stops at 100."""
    plural = api.get("/crm/v3/objects/deals").json()["results"]
    assert len(plural) == 10
    assert api.get("/crm/v3/objects/deal").json()["results"] == plural
    assert api.get("/crm/v3/objects/0-3").json()["results"] == plural
    assert len(api.get("/crm/v3/objects/line_item", params={"limit": 500}).json()["results"]) == 100
    assert api.get("/crm/v3/objects/widgets").status_code == 400


def test_values_are_strings(api: httpx.Client) -> None:
    """Every property value is a string (or null), ids are numeric strings, dates ISO with milliseconds."""
    rows = api.get("/crm/v3/objects/deals", params={
        "limit": 100, "properties": "amount,closedate,hs_is_closed_won,hs_deal_stage_probability,no_such_prop",
        "associations": "companies,line_items"}).json()["results"]
    for r in rows:
        assert r["id"].isdigit()
        assert r["properties"]["hs_object_id"] == r["id"]
        assert all(v is None or isinstance(v, str) for v in r["properties"].values())
        assert "no_such_prop" not in r["properties"]
        assert r["properties"]["hs_lastmodifieddate"].endswith("Z")
        assert "." in r["properties"]["hs_lastmodifieddate"]
        assert r["updatedAt"] == r["properties"]["hs_lastmodifieddate"]
        assert r["associations"]["companies"]["results"][0]["type"] in ("deal_to_company", "deal_to_company_unlabeled")


def test_closed_won_is_derived_from_the_stage(sb: HubSpotSandbox, book: Book, api: httpx.Client) -> None:
    """hs_is_closed_won follows the stage's metadata (numeric stage ids in the custom pipeline), never the name."""
    stages = {s["id"]: s["metadata"] for p in api.get("/crm/v3/pipelines/deals").json()["results"] for s in p["stages"]}
    assert all(isinstance(m["probability"], str) and m["isClosed"] in ("true", "false") for m in stages.values())
    by_book = sb.deal_ids_by_book_id()
    custom_won = 0
    for d in book.deals:
        props = sb.properties_of("deals", by_book[d.id])
        meta = stages[props["dealstage"]]
        won = meta["isClosed"] == "true" and Decimal(meta["probability"]) == 1
        assert (props["hs_is_closed_won"] == "true") == won == d.is_won
        custom_won += won and props["pipeline"] == CUSTOM_PIPELINE_ID and props["dealstage"].isdigit()
    assert custom_won > 0
    deal = by_book[next(d.id for d in book.deals if d.is_won)]
    pipeline = sb.properties_of("deals", deal)["pipeline"]
    lost = "closedlost" if pipeline == "default" else "84213562"
    assert api.patch(f"/crm/v3/objects/deals/{deal}", json={"properties": {"dealstage": lost}}).status_code == 200
    assert sb.properties_of("deals", deal)["hs_is_closed_won"] == "false"


def test_writes_bump_last_modified(book: Book) -> None:
    """A PATCH sets hs_lastmodifieddate from the sandbox clock; read-only properties cannot be written."""
    start = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
    sb = make(book, clock=Clock(scale=1.0, start=start.timestamp()))
    deal = sb.object_ids("deals")[0]
    with httpx.Client(transport=sb.transport(), base_url="https://api.hubapi.com",
                      headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        r = api.patch(f"/crm/v3/objects/deals/{deal}", json={"properties": {"description": "x"}})
        assert r.status_code == 200
        ms = parse_ms(sb.properties_of("deals", deal)["hs_lastmodifieddate"])
        assert ms is not None
        assert abs(ms - to_ms(start)) < 5_000
        bad = api.patch(f"/crm/v3/objects/deals/{deal}", json={"properties": {"hs_is_closed_won": "true"}})
        assert bad.status_code == 400
        assert bad.json()["category"] == "VALIDATION_ERROR"


def test_search_operators(sb: HubSpotSandbox, api: httpx.Client) -> None:
    """Each operator selects what it should, compared with a scan of the records."""
    mid = sorted(parse_ms(sb.properties_of("deals", i)["hs_lastmodifieddate"]) or 0 for i in sb.object_ids("deals"))[60]

    def found(*filters: dict[str, Any]) -> set[str]:
        out: set[str] = set()
        after: str | None = None
        while True:
            body = search(api, filterGroups=[{"filters": list(filters)}], limit=50, after=after).json()
            out |= {r["id"] for r in body["results"]}
            if "paging" not in body:
                return out
            after = body["paging"]["next"]["after"]

    def amount(p: dict[str, str]) -> Decimal:
        return Decimal(p["amount"])

    assert found({"propertyName": "amount", "operator": "GT", "value": "5000"}) == ids_where(
        sb, lambda p: amount(p) > 5000)
    assert found({"propertyName": "amount", "operator": "LTE", "value": "5000"}) == ids_where(
        sb, lambda p: amount(p) <= 5000)
    assert found({"propertyName": "amount", "operator": "BETWEEN", "value": "1000", "highValue": "3000"}) == ids_where(
        sb, lambda p: 1000 <= amount(p) <= 3000)
    assert found({"propertyName": "hs_lastmodifieddate", "operator": "LT", "value": str(mid)}) == ids_where(
        sb, lambda p: (parse_ms(p["hs_lastmodifieddate"]) or 0) < mid)
    assert found({"propertyName": "hs_lastmodifieddate", "operator": "GTE", "value": str(mid)}) == ids_where(
        sb, lambda p: (parse_ms(p["hs_lastmodifieddate"]) or 0) >= mid)
    assert found({"propertyName": "dealstage", "operator": "IN", "values": ["closedwon", "84213561"]}) == ids_where(
        sb, lambda p: p["hs_is_closed_won"] == "true")
    assert found({"propertyName": "deal_currency_code", "operator": "NOT_IN", "values": ["EUR"]}) == ids_where(
        sb, lambda p: p["deal_currency_code"] != "EUR")
    assert found({"propertyName": "deal_currency_code", "operator": "NEQ", "value": "EUR"}) == ids_where(
        sb, lambda p: p["deal_currency_code"] != "EUR")
    assert found({"propertyName": "closedate", "operator": "NOT_HAS_PROPERTY"}) == ids_where(
        sb, lambda p: "closedate" not in p)
    assert found({"propertyName": "closedate", "operator": "HAS_PROPERTY"}) == ids_where(sb, lambda p: "closedate" in p)
    one = sb.object_ids("deals")[5]
    assert found({"propertyName": "hs_object_id", "operator": "EQ", "value": one}) == {one}


def test_filter_groups_or_and_sorting(sb: HubSpotSandbox, api: httpx.Client) -> None:
    """Groups are OR'ed, filters inside a group AND'ed; one sort orders the results, both directions."""
    groups = [
        {"filters": [{"propertyName": "deal_currency_code", "operator": "EQ", "value": "USD"},
                     {"propertyName": "hs_is_closed_won", "operator": "EQ", "value": "true"}]},
        {"filters": [{"propertyName": "amount", "operator": "LT", "value": "500"}]},
    ]
    body = search(api, filterGroups=groups, limit=200, sorts=[{"propertyName": "amount", "direction": "DESCENDING"}],
                  properties=["amount"]).json()
    expected = ids_where(sb, lambda p: (p["deal_currency_code"] == "USD" and p["hs_is_closed_won"] == "true")
                         or Decimal(p["amount"]) < 500)
    assert {r["id"] for r in body["results"]} == expected
    assert body["total"] == len(expected)
    amounts = [Decimal(r["properties"]["amount"]) for r in body["results"]]
    assert amounts == sorted(amounts, reverse=True)
    asc = search(api, limit=200, sorts=["hs_lastmodifieddate"]).json()["results"]
    stamps = [parse_ms(r["properties"]["hs_lastmodifieddate"]) or 0 for r in asc]
    assert stamps == sorted(stamps)
    assert len(asc) == 120


def test_search_request_limits(api: httpx.Client) -> None:
    """More than 5 groups, 10 filters in a group, 25 filters in all, a limit over 200 or two sorts: 400."""
    f = {"propertyName": "amount", "operator": "GT", "value": "1"}
    assert search(api, filterGroups=[{"filters": [f]}] * 6).status_code == 400
    assert search(api, filterGroups=[{"filters": [f] * 11}]).status_code == 400
    assert search(api, filterGroups=[{"filters": [f] * 6}] * 5).status_code == 400
    assert search(api, filterGroups=[{"filters": [f] * 5}] * 5).status_code == 200
    assert search(api, limit=201).status_code == 400
    assert search(api, limit=200).status_code == 200
    r = search(api, sorts=["amount", "dealname"])
    assert r.status_code == 400
    assert r.json()["category"] == "VALIDATION_ERROR"
    assert r.json()["correlationId"]


def test_search_cap_answers_400_past_it(book: Book) -> None:
    """Paging a query up to the cap works; asking for results at or past it answers 400 while total stays true."""
    sb = make(book, search_cap=30)
    with httpx.Client(transport=sb.transport(), base_url="https://api.hubapi.com",
                      headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        after: str | None = None
        got = 0
        while True:
            r = search(api, limit=10, after=after, sorts=["hs_object_id"])
            if r.status_code == 400:
                assert "30" in r.json()["message"]
                break
            body = r.json()
            assert body["total"] == 120
            got += len(body["results"])
            after = body["paging"]["next"]["after"]
        assert got == 30
        assert after == "30"


def test_ties_are_not_returned_in_id_order(sb: HubSpotSandbox, api: httpx.Client) -> None:
    """Records with the same sort value come in a stable order that is not the id order."""
    ids = sb.object_ids("deals")[:40]
    ms = sb.touch("deals", ids, dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    flt = {"filterGroups": [{"filters": [{"propertyName": "hs_lastmodifieddate", "operator": "EQ", "value": str(ms)}]}],
           "sorts": ["hs_lastmodifieddate"], "limit": 40}
    first = [r["id"] for r in search(api, **flt).json()["results"]]
    assert sorted(first) == sorted(ids)
    assert first != sorted(first, key=int)
    assert [r["id"] for r in search(api, **flt).json()["results"]] == first


def test_batch_read_and_update_multi_status(sb: HubSpotSandbox, api: httpx.Client) -> None:
    """Unknown ids give a 207 with per-id errors; a bad value rejects the batch; over 100 inputs is a 400."""
    ids = sb.object_ids("companies")[:3]
    r = api.post("/crm/v3/objects/companies/batch/read",
                 json={"inputs": [{"id": i} for i in [*ids, "999"]], "properties": ["name", "vat_number"]})
    assert r.status_code == 207
    body = r.json()
    assert {x["id"] for x in body["results"]} == set(ids)
    assert body["numErrors"] == 1
    err = body["errors"][0]
    assert err["category"] == "OBJECT_NOT_FOUND"
    assert err["context"]["ids"] == ["999"]
    assert {"status", "message", "context", "errors", "links"} <= set(err)

    deals = sb.object_ids("deals")[:3]
    upd = api.post("/crm/v3/objects/deals/batch/update", json={"inputs": [
        {"id": deals[0], "properties": {"description": "ok"}}, {"id": "999", "properties": {"description": "x"}}]})
    assert upd.status_code == 207
    assert sb.properties_of("deals", deals[0])["description"] == "ok"
    poison = api.post("/crm/v3/objects/deals/batch/update", json={"inputs": [
        {"id": deals[1], "properties": {"description": "fine"}}, {"id": deals[2], "properties": {"amount": "abc"}}]})
    assert poison.status_code == 400
    assert "INVALID_DECIMAL" in poison.json()["message"]
    assert "description" not in sb.properties_of("deals", deals[1])
    dup = api.post("/crm/v3/objects/deals/batch/update", json={"inputs": [{"id": deals[1], "properties": {}}] * 2})
    assert dup.status_code == 400
    big = api.post("/crm/v3/objects/deals/batch/read", json={"inputs": [{"id": str(i)} for i in range(101)],
                                                             "properties": []})
    assert big.status_code == 400


def test_unknown_property_error_shape(sb: HubSpotSandbox, api: httpx.Client) -> None:
    """Writing a property that does not exist answers HubSpot's VALIDATION_ERROR body."""
    deal = sb.object_ids("deals")[0]
    r = api.patch(f"/crm/v3/objects/deals/{deal}", json={"properties": {"foo": "1"}})
    fixture = json.loads((SHARED / "fixtures/hubspot/constructed/error_validation.json").read_text())
    body = r.json()
    assert r.status_code == 400
    assert set(fixture) <= set(body)
    assert body["category"] == fixture["category"]
    assert "PROPERTY_DOESNT_EXIST" in body["message"]
    assert api.get("/crm/v3/objects/deals/123").status_code == 404


def test_auth_is_required(sb: HubSpotSandbox) -> None:
    """A missing or unknown bearer token answers 401 with HubSpot's error body."""
    with httpx.Client(transport=sb.transport(), base_url="https://api.hubapi.com") as anon:
        for headers in ({}, {"Authorization": "Bearer nope"}):
            r = anon.get("/crm/v3/objects/deals", headers=headers)
            assert r.status_code == 401
            body = r.json()
            assert body["category"] == "INVALID_AUTHENTICATION"
            assert body["status"] == "error"
            assert body["correlationId"]


def test_rate_limits_answer_429_with_headers(book: Book) -> None:
    """The 101st request in 10 s and the 6th search in a second answer 429 with HubSpot's body and headers."""
    sb = make(book, requests_per_10s=100, searches_per_s=5, clock=Clock(scale=0.01))
    with httpx.Client(transport=sb.transport(), base_url="https://api.hubapi.com",
                      headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        remaining = []
        for _ in range(100):
            r = api.get("/crm/v3/objects/deals", params={"limit": 1})
            assert r.status_code == 200
            remaining.append(int(r.headers["X-HubSpot-RateLimit-Remaining"]))
            assert r.headers["X-HubSpot-RateLimit-Max"] == "100"
        assert remaining == list(range(99, -1, -1))
        r = api.get("/crm/v3/objects/deals")
        assert r.status_code == 429
        body = r.json()
        assert body["errorType"] == "RATE_LIMIT"
        assert body["policyName"] == "TEN_SECONDLY_ROLLING"
        assert body["status"] == "error"
        assert body["correlationId"]
        assert r.headers["X-HubSpot-RateLimit-Remaining"] == "0"
        assert int(r.headers["X-HubSpot-RateLimit-Interval-Milliseconds"]) > 0
        assert "X-HubSpot-RateLimit-Daily-Remaining" in r.headers
        codes = [search(api, limit=1).status_code for _ in range(6)]
        assert codes == [200] * 5 + [429]
        assert search(api).json()["policyName"] == "SECONDLY"
        assert sb.stats()["rate_limited"] == 3


def test_injected_faults_have_hubspot_shapes(book: Book) -> None:
    """The fault plan's 429 carries HubSpot's rate-limit body; a 502 is a gateway page."""
    sb = make(book, faults="429=1")
    with httpx.Client(transport=sb.transport(), base_url="https://api.hubapi.com",
                      headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        r = api.get("/crm/v3/objects/deals")
        assert r.status_code == 429
        assert r.json()["errorType"] == "RATE_LIMIT"
        assert "Retry-After" in r.headers
    sb = make(book, faults="502=1")
    with httpx.Client(transport=sb.transport(), base_url="https://api.hubapi.com",
                      headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        r = api.get("/crm/v3/objects/deals")
        assert r.status_code == 502
        assert r.headers["content-type"].startswith("text/html")


def test_associations_v4(sb: HubSpotSandbox, book: Book, api: httpx.Client) -> None:
    """The v4 batch read gives primary company labels; objects with no association are per-object errors."""
    by_book = sb.deal_ids_by_book_id()
    with_quote = next(by_book[d.id] for d in book.deals if d.quote is not None)
    without = next(by_book[d.id] for d in book.deals if d.quote is None)
    r = api.post("/crm/v4/associations/deals/quotes/batch/read", json={"inputs": [{"id": with_quote}, {"id": without}]})
    assert r.status_code == 207
    body = r.json()
    assert [x["from"]["id"] for x in body["results"]] == [with_quote]
    assert body["errors"][0]["subCategory"] == "crm.associations.NO_ASSOCIATIONS_FOUND"
    comp = api.post("/crm/v4/associations/deal/company/batch/read", json={"inputs": [{"id": without}]}).json()
    types = {(t["typeId"], t["label"]) for t in comp["results"][0]["to"][0]["associationTypes"]}
    assert types == {(341, None), (5, "Primary")}
    company = str(comp["results"][0]["to"][0]["toObjectId"])
    back = api.get(f"/crm/v4/objects/companies/{company}/associations/deals").json()["results"]
    assert int(without) in [x["toObjectId"] for x in back]
    line = sb.object_ids("line_items")[0]
    put = api.put(f"/crm/v4/objects/deals/{without}/associations/default/line_items/{line}")
    assert put.status_code == 200
    assert line in sb.associated_ids("deals", without, "line_items")


def test_activities_are_engagements_associated_with_deal_company_and_contact(
        sb: HubSpotSandbox, book: Book, api: httpx.Client) -> None:
    """Each deal's book activities are calls, meetings, emails and tasks at their time, with hs_createdate (no
    createdate), associated with the deal, its company and its contact under HubSpot's association type ids."""
    by_book = sb.deal_ids_by_book_id()
    companies = sb.company_ids_by_book_id()
    total: Counter[str] = Counter()
    for d in book.deals:
        kinds = Counter(a.kind for a in book.activities(d))
        total.update(kinds)
        assert sb.activity_counts_of(by_book[d.id]) == dict(kinds)
    assert set(total) == {"call", "meeting", "email", "task"}
    assert sb.stats()["objects"]["calls"] == total["call"]
    deal = next(d for d in book.deals if any(a.kind == "meeting" for a in book.activities(d)))
    meeting = next(a for a in book.activities(deal) if a.kind == "meeting")
    r = api.post("/crm/v4/associations/deal/meeting/batch/read", json={"inputs": [{"id": by_book[deal.id]}]})
    assert r.status_code == 200
    linked = r.json()["results"][0]["to"]
    assert {t["typeId"] for x in linked for t in x["associationTypes"]} == {211}
    meetings = api.post("/crm/v3/objects/0-47/batch/read", json={
        "inputs": [{"id": str(x["toObjectId"])} for x in linked],
        "properties": ["hs_timestamp", "hs_meeting_title", "hs_meeting_outcome", "createdate"]}).json()["results"]
    times = {parse_ms(m["properties"]["hs_timestamp"]) for m in meetings}
    assert to_ms(meeting.at) in times
    assert all("createdate" not in m["properties"] and m["properties"]["hs_createdate"] for m in meetings)
    assert {m["properties"]["hs_meeting_outcome"] for m in meetings} == {"COMPLETED"}
    back = api.get(f"/crm/v4/objects/meetings/{linked[0]['toObjectId']}/associations/companies").json()["results"]
    assert [(x["toObjectId"], x["associationTypes"][0]["typeId"]) for x in back] == \
        [(int(companies[deal.company_id]), 188)]
    labels = api.get("/crm/v4/associations/deals/calls/labels").json()["results"]
    assert labels == [{"category": "HUBSPOT_DEFINED", "typeId": 205, "label": None}]
    listed = api.get("/crm/v3/objects/tasks", params={"limit": 5}).json()
    assert len(listed["results"]) == 5
    assert set(listed["results"][0]["properties"]) == {"hs_createdate", "hs_lastmodifieddate", "hs_object_id"}
    too_many = api.post("/crm/v4/associations/deals/calls/batch/read",
                        json={"inputs": [{"id": str(i)} for i in range(1001)]})
    assert too_many.status_code == 400


def test_stage_probability_is_a_double_expansion(sb: HubSpotSandbox, book: Book) -> None:
    """hs_deal_stage_probability is the stage's probability written as HubSpot writes doubles (0..1 scale)."""
    by_book = sb.deal_ids_by_book_id()
    seen = {sb.properties_of("deals", by_book[d.id])["hs_deal_stage_probability"] for d in book.deals}
    assert "0.200000000000000011102230246251565404236316680908203125" in seen
    assert {"1", "0"} <= seen
    assert all(0 <= Decimal(v) <= 1 for v in seen)


def test_properties_groups_and_defaults(api: httpx.Client) -> None:
    """Default properties other tools require exist; groups and properties are created once (then 409)."""
    for obj, required in {
        "products": {"createdate", "description", "hs_lastmodifieddate", "hs_object_id", "name", "price"},
        "companies": {"createdate", "domain", "hs_lastmodifieddate", "hs_object_id", "name"},
        "contacts": {"createdate", "email", "firstname", "hs_object_id", "lastmodifieddate", "lastname"},
        "quotes": {"hs_createdate", "hs_expiration_date", "hs_lastmodifieddate", "hs_object_id", "hs_public_url_key",
                   "hs_status", "hs_title"},
        "deals": {"dealname", "dealstage", "amount", "closedate", "pipeline", "hs_is_closed_won",
                  "hs_deal_stage_probability"},
        "calls": {"hs_createdate", "hs_timestamp", "hs_call_title", "hs_call_direction", "hs_call_duration"},
        "emails": {"hs_createdate", "hs_timestamp", "hs_email_subject", "hs_email_direction"},
        "meetings": {"hs_createdate", "hs_timestamp", "hs_meeting_title", "hs_meeting_outcome"},
        "tasks": {"hs_createdate", "hs_timestamp", "hs_task_subject", "hs_task_status"},
    }.items():
        names = {p["name"] for p in api.get(f"/crm/v3/properties/{obj}").json()["results"]}
        assert required <= names, obj
    assert api.get("/properties/v2/deal/properties").json()[0]["name"]
    group = {"name": "ledgerbridge", "label": "Finance (LedgerBridge)"}
    assert api.post("/crm/v3/properties/deals/groups", json=group).status_code == 201
    assert api.post("/crm/v3/properties/deals/groups", json=group).status_code == 409
    prop = {"name": "lb_invoice", "label": "Invoice", "type": "string", "fieldType": "text",
            "groupName": "ledgerbridge"}
    assert api.post("/crm/v3/properties/deals", json=prop).status_code == 201
    dup = api.post("/crm/v3/properties/deals", json=prop)
    assert dup.status_code == 409
    assert dup.json()["category"] == "OBJECT_ALREADY_EXISTS"
    assert api.post("/crm/v3/properties/deals", json={**prop, "name": "x2", "groupName": "nope"}).status_code == 400
    assert api.get("/crm/v3/properties/deals/lb_invoice").json()["groupName"] == "ledgerbridge"


def test_book_is_loaded_with_hubspot_semantics(sb: HubSpotSandbox, book: Book) -> None:
    """Deals keep the book's amount, currency and timestamps; accepted quotes read as accepted, others not."""
    by_book = sb.deal_ids_by_book_id()
    quotes = sb.quote_ids_by_book_id()
    for d in book.deals:
        props = sb.properties_of("deals", by_book[d.id])
        assert props["amount"] == str(d.amount)
        assert props["deal_currency_code"] == d.currency
        assert parse_ms(props["hs_lastmodifieddate"]) == to_ms(d.updated_at)
        assert props["ledgerbridge_book_id"] == d.id
        if d.quote is None:
            continue
        q = sb.properties_of("quotes", quotes[d.quote.id])
        signed = q["hs_status"] == "APPROVAL_NOT_NEEDED" and q.get("hs_esign_enabled") == "true" and (
            q.get("hs_esign_num_signers_completed") == q.get("hs_esign_num_signers_required"))
        assert (q["hs_status"] == "ACCEPTED" or signed) == (d.quote.status == "accepted")
        assert len(sb.associated_ids("quotes", quotes[d.quote.id], "line_items")) == len(d.quote.lines)


def test_state_survives_save_and_load(sb: HubSpotSandbox, tmp_path: Path) -> None:
    """A saved sandbox restores its records into a fresh one."""
    sb.modify_deal(sb.object_ids("deals")[0], description="kept")
    sb.save(tmp_path / "hs.bin")
    other = HubSpotSandbox(seed=11)
    assert other.load(tmp_path / "hs.bin")
    assert other.properties_of("deals", sb.object_ids("deals")[0])["description"] == "kept"
    assert other.deal_ids_by_book_id() == sb.deal_ids_by_book_id()
    deal = sb.object_ids("deals")[0]
    assert other.activity_counts_of(deal) == sb.activity_counts_of(deal)


def test_state_saved_before_engagements_existed_still_loads(sb: HubSpotSandbox, tmp_path: Path) -> None:
    """A state file written before the engagement types existed loads; those types start empty and usable."""
    sb.save(tmp_path / "hs.bin")
    state = pickle.loads((tmp_path / "hs.bin").read_bytes())
    for name in ("_objects", "_props", "_groups", "_book_ids"):
        for t in ("calls", "emails", "meetings", "tasks"):
            del state[name][t]
    (tmp_path / "old.bin").write_bytes(pickle.dumps(state))
    other = HubSpotSandbox(seed=11)
    assert other.load(tmp_path / "old.bin")
    deal = sb.object_ids("deals")[0]
    assert other.activity_counts_of(deal) == {}
    with httpx.Client(transport=other.transport(), base_url="https://api.hubapi.com",
                      headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        assert api.get("/crm/v3/objects/calls").json() == {"results": []}
        assert api.get("/crm/v3/properties/calls").status_code == 200


def test_admin_endpoints_list_and_edit_deals(sb: HubSpotSandbox, book: Book) -> None:
    """/_sandbox/deals lists every deal with its won flag and amount; a PATCH there edits one as a user would."""
    with httpx.Client(transport=sb.transport(), base_url="http://sandbox") as admin:
        rows = admin.get("/_sandbox/deals").json()
        assert len(rows) == len(book.deals)
        by_book = {r["book_id"]: r for r in rows}
        for d in book.deals:
            assert by_book[d.id]["won"] == d.is_won
            assert by_book[d.id]["amount"] == str(d.amount)
            assert by_book[d.id]["activities"] == dict(Counter(a.kind for a in book.activities(d)))
            assert parse_ms(by_book[d.id]["created_at"]) == to_ms(d.created_at)
        deal = rows[0]["id"]
        r = admin.patch(f"/_sandbox/deals/{deal}", json={"properties": {"amount": "10.00"}})
        assert r.status_code == 200
        assert sb.properties_of("deals", deal)["amount"] == "10.00"
        assert admin.patch(f"/_sandbox/deals/{deal}", json={"properties": {"amount": "x"}}).status_code == 400
        assert admin.get("/_sandbox/stats").json()["objects"]["deals"] == len(book.deals)
