"""The Pipedrive sandbox behaves like Pipedrive: envelopes, cursor paging, filters, token costs, limits, errors."""

from __future__ import annotations

import base64
import datetime as dt
import json
import pickle
import time
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.pipedrive.client import loads
from connectors.pipedrive.sandbox import PipedriveSandbox, parse_time
from connectors.sandboxkit import Clock
from connectors.seedbook import Book, effective_lines, generate_book

TOKEN = "demo-pipedrive-token"
API = "https://api.pipedrive.com"


@pytest.fixture(scope="module")
def book() -> Book:
    return generate_book(11, companies=40, deals=120)


def make(book: Book, **options: Any) -> PipedriveSandbox:
    sb = PipedriveSandbox(seed=11, **options)
    sb.load_book(book)
    return sb


@pytest.fixture
def sb(book: Book) -> PipedriveSandbox:
    return make(book)


def client(sb: PipedriveSandbox, token: str | None = TOKEN) -> httpx.Client:
    return httpx.Client(transport=sb.transport(), base_url=API, headers={"x-api-token": token} if token else {})


@pytest.fixture
def api(sb: PipedriveSandbox) -> Iterator[httpx.Client]:
    with client(sb) as c:
        yield c


def walk(api: httpx.Client, path: str, **params: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    query: dict[str, Any] = dict(params)
    while True:
        resp = api.get(path, params=query)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["success"] is True
        rows += body["data"]
        nxt = body["additional_data"]["next_cursor"]
        if nxt is None:
            return rows
        query["cursor"] = nxt


def test_cursor_paging_walks_every_deal_once(sb: PipedriveSandbox, api: httpx.Client) -> None:
    """limit/cursor paging visits every deal once in id order; the last page's next_cursor is null."""
    rows = walk(api, "/api/v2/deals", limit=7)
    assert [r["id"] for r in rows] == sb.deal_ids()
    assert len(rows) == 120
    first = api.get("/api/v2/deals").json()
    assert len(first["data"]) == 100  # the default limit
    assert api.get("/api/v2/deals", params={"limit": 501}).status_code == 400
    assert api.get("/api/v2/deals", params={"limit": 500}).json()["additional_data"]["next_cursor"] is None


def test_update_time_order_breaks_ties_by_id(sb: PipedriveSandbox, api: httpx.Client) -> None:
    """sort_by=update_time pages are ordered by (update_time, id), including a tie spanning page boundaries."""
    tied = sb.deal_ids()[10:40]
    sb.touch(tied, dt.datetime(2025, 2, 1, 8, 0, tzinfo=dt.UTC))
    rows = walk(api, "/api/v2/deals", limit=9, sort_by="update_time", sort_direction="asc")
    keys = [(r["update_time"], r["id"]) for r in rows]
    assert keys == sorted(keys)
    assert len(rows) == 120
    assert sum(1 for r in rows if r["update_time"] == "2025-02-01T08:00:00Z") == 30
    desc = walk(api, "/api/v2/deals", limit=13, sort_by="update_time", sort_direction="desc")
    assert [(r["update_time"], r["id"]) for r in desc] == sorted(keys, reverse=True)


def test_a_cursor_belongs_to_its_query(api: httpx.Client) -> None:
    """A cursor replayed with another sort order, or a forged one, is a 400 in Pipedrive's error shape."""
    cursor = api.get("/api/v2/deals", params={"limit": 5}).json()["additional_data"]["next_cursor"]
    wrong = api.get("/api/v2/deals", params={"limit": 5, "cursor": cursor, "sort_by": "update_time"})
    assert wrong.status_code == 400
    assert wrong.json() == {"success": False, "error": "Invalid cursor",
                            "error_info": "Please check developers.pipedrive.com", "data": None,
                            "additional_data": None}
    assert api.get("/api/v2/deals", params={"cursor": "not-base64!"}).status_code == 400


def test_updated_since_is_inclusive_and_until_exclusive_to_the_second(sb: PipedriveSandbox, api: httpx.Client) -> None:
    """updated_since keeps deals at that very second; updated_until drops them."""
    at = dt.datetime(2025, 3, 3, 12, 0, 0, tzinfo=dt.UTC)
    ids = sb.deal_ids()[:3]
    sb.touch(ids, at)
    stamp = "2025-03-03T12:00:00Z"
    since = walk(api, "/api/v2/deals", updated_since=stamp)
    assert set(ids) <= {r["id"] for r in since}
    assert all(r["update_time"] >= stamp for r in since)
    until = walk(api, "/api/v2/deals", updated_until=stamp)
    assert not set(ids) & {r["id"] for r in until}
    both = walk(api, "/api/v2/deals", updated_since=stamp, updated_until="2025-03-03T12:00:01Z")
    assert {r["id"] for r in both} == set(ids)
    assert api.get("/api/v2/deals", params={"updated_since": "yesterday"}).status_code == 400
    assert parse_time("2025-03-03T14:00:00+02:00") == at.timestamp()


def test_status_filter_deleted_and_archived_deals(sb: PipedriveSandbox, api: httpx.Client) -> None:
    """status=won lists won deals; deleted deals need status=deleted; archived ones live in /deals/archived only."""
    won = walk(api, "/api/v2/deals", status="won")
    assert won
    assert all(r["status"] == "won" for r in won)
    everything = sb.deal_ids()
    deleted, archived = everything[0], everything[1]
    sb.delete_deal(deleted)
    sb.archive_deal(archived)
    default = {r["id"] for r in walk(api, "/api/v2/deals")}
    assert deleted not in default
    assert archived not in default
    with_deleted = walk(api, "/api/v2/deals", status="open,won,lost,deleted")
    gone = next(r for r in with_deleted if r["id"] == deleted)
    assert (gone["status"], gone["is_deleted"]) == ("deleted", True)
    arch = walk(api, "/api/v2/deals/archived")
    assert [r["id"] for r in arch] == [archived]
    assert arch[0]["is_archived"] is True
    assert arch[0]["archive_time"] is not None
    assert api.get("/api/v2/deals", params={"status": "closed"}).status_code == 400
    assert api.get(f"/api/v2/deals/{deleted}").json()["data"]["is_deleted"] is True


def test_ids_filter_and_its_limit(sb: PipedriveSandbox, api: httpx.Client) -> None:
    """ids returns just those deals (unknown ones left out); more than 100 ids is a 400."""
    ids = sb.deal_ids()[:5]
    rows = walk(api, "/api/v2/deals", ids=",".join(str(i) for i in [*ids, 999_999]))
    assert [r["id"] for r in rows] == ids
    assert api.get("/api/v2/deals", params={"ids": ",".join(str(i) for i in range(1, 102))}).status_code == 400


def test_token_costs_are_charged_per_operation(sb: PipedriveSandbox, api: httpx.Client) -> None:
    """Each operation spends its x-token-cost: a v2 list 10, one record 1, a PATCH 5, archived 20, v1 fields 20."""

    def left(resp: httpx.Response) -> int:
        return int(resp.headers["x-daily-requests-left"])

    start = sb.tokens_left()
    deal = sb.deal_ids()[0]
    steps = [
        (api.get("/api/v2/deals"), 10),
        (api.get(f"/api/v2/deals/{deal}"), 1),
        (api.patch(f"/api/v2/deals/{deal}", json={"title": "Renamed"}), 5),
        (api.get("/api/v2/deals/archived"), 20),
        (api.get("/api/v2/deals/products", params={"deal_ids": str(deal)}), 10),
        (api.get(f"/api/v2/deals/{deal}/products"), 10),
        (api.get("/api/v2/dealFields"), 10),
        (api.get("/v1/dealFields"), 20),
        (api.get("/api/v2/organizations/1"), 1),
    ]
    spent = 0
    for resp, cost in steps:
        assert resp.status_code == 200, resp.text
        spent += cost
        assert left(resp) == start - spent
        assert resp.headers["x-ratelimit-limit"] == "80"
        assert int(resp.headers["x-ratelimit-remaining"]) < 80
        assert float(resp.headers["x-ratelimit-reset"]) > 0
    assert sb.stats()["tokens_charged"] == spent


def test_burst_limit_answers_429_per_token_window(book: Book) -> None:
    """Past burst_limit requests in 2 s, a token gets 429 with Retry-After; another token and a later window pass."""
    sb = make(book, burst_limit=5, clock=Clock(40))
    with client(sb) as api:
        answers = [api.get("/api/v2/deals/1") for _ in range(6)]
        assert [a.status_code for a in answers[:5]] == [200] * 5
        assert answers[4].headers["x-ratelimit-remaining"] == "0"
        limited = answers[5]
        assert limited.status_code == 429
        assert limited.json()["success"] is False
        assert 0 < float(limited.headers["Retry-After"]) <= 2 / 40 + 0.01
        with client(sb, sb.new_api_token()) as other:
            assert other.get("/api/v2/deals/1").status_code == 200
        time.sleep(float(limited.headers["Retry-After"]) + 0.01)
        assert api.get("/api/v2/deals/1").status_code == 200
    assert sb.stats()["rate_limited"] == 1


def test_daily_budget_exhaustion(book: Book) -> None:
    """With 25 tokens a day, two lists pass, the third is refused until midnight; a 1-token read still fits."""
    sb = make(book, daily_token_budget=25)
    with client(sb) as api:
        assert api.get("/api/v2/deals").status_code == 200
        assert api.get("/api/v2/organizations").status_code == 200
        refused = api.get("/api/v2/products")
        assert refused.status_code == 429
        assert refused.headers["x-daily-requests-left"] == "5"
        assert float(refused.headers["Retry-After"]) > 2
        assert "budget" in refused.json()["error"].lower()
        single = api.get("/api/v2/deals/1")
        assert single.status_code == 200
        assert single.headers["x-daily-requests-left"] == "4"
    assert sb.stats()["quota_refused"] == 1


def test_auth_header_query_and_errors(sb: PipedriveSandbox) -> None:
    """x-api-token and the api_token query parameter are accepted (and logged apart); a bad token is a 401."""
    with client(sb, "wrong-token") as bad:
        resp = bad.get("/api/v2/deals")
    assert resp.status_code == 401
    assert resp.json()["success"] is False
    assert resp.json()["error"] == "unauthorized access"
    with client(sb, None) as anon:
        assert anon.get("/api/v2/deals").status_code == 401
        assert anon.get("/api/v2/deals", params={"api_token": TOKEN, "limit": 1}).status_code == 200
    with client(sb) as api:
        assert api.get("/api/v2/deals", params={"limit": 1}).status_code == 200
    by_auth = sb.stats()["requests_by_auth"]
    assert by_auth["query"] == 1
    assert by_auth["header"] == 1
    assert [e["api_token_in_query"] for e in sb.access_log] == [False, False, True, False]


def test_not_found_and_validation_errors(sb: PipedriveSandbox, api: httpx.Client) -> None:
    """Unknown records answer 404 and invalid writes 400, in Pipedrive's error envelope; nothing is changed."""
    missing = api.get("/api/v2/deals/987654")
    assert missing.status_code == 404
    assert missing.json() == {"success": False, "error": "Entity was not found", "error_info": "Object was not found.",
                              "data": None, "additional_data": None}
    deal = sb.deal_ids()[0]
    before = sb.deal(deal)
    for body in ({"value": "lots"}, {"status": "closed"}, {"colour": "blue"},
                 {"custom_fields": {"0" * 40: "x"}}, {"org_id": 987654}):
        resp = api.patch(f"/api/v2/deals/{deal}", json=body)
        assert resp.status_code == 400, body
        assert resp.json()["success"] is False
        assert resp.json()["data"] is None
    assert sb.deal(deal) == before
    assert api.patch("/api/v2/deals/987654", json={"title": "x"}).status_code == 404


def test_custom_fields_are_hash_keyed_and_nested(sb: PipedriveSandbox, api: httpx.Client) -> None:
    """Custom values sit under custom_fields by 40-hex key; option fields give ids, or {id, label} on request."""
    fields = {f["field_name"]: f for f in walk(api, "/api/v2/dealFields")}
    source = fields["Acquisition source"]
    assert len(source["field_code"]) == 40
    assert int(source["field_code"], 16) >= 0
    assert source["is_custom_field"] is True
    assert fields["Title"]["field_code"] == "title"
    deal = api.get("/api/v2/deals", params={"limit": 1}).json()["data"][0]
    option_id = deal["custom_fields"][source["field_code"]]
    assert option_id in {o["id"] for o in source["options"]}
    labelled = api.get(f"/api/v2/deals/{deal['id']}", params={"include_option_labels": "true"}).json()["data"]
    value = labelled["custom_fields"][source["field_code"]]
    assert value["id"] == option_id
    assert value["label"] in {o["label"] for o in source["options"]}
    org_fields = {f["field_name"]: f["field_code"] for f in walk(api, "/api/v2/organizationFields")}
    org = api.get("/api/v2/organizations", params={"limit": 1}).json()["data"][0]
    assert set(org["custom_fields"]) == {org_fields[n] for n in ("VAT number", "SIREN", "SIRET", "Billing email",
                                                                  "Billing currency", "Acquisition source")}


def test_creating_and_writing_a_custom_field(sb: PipedriveSandbox, api: httpx.Client) -> None:
    """POST dealFields gives a new 40-hex key; PATCH sets its value and update_time; [] is refused, null clears."""
    created = api.post("/api/v2/dealFields", json={"field_name": "Invoice number", "field_type": "varchar",
                                                   "description": "from the ledger"})
    assert created.status_code == 200
    key = created.json()["data"]["field_code"]
    assert len(key) == 40
    assert created.json()["data"]["description"] == "from the ledger"
    enum = api.post("/api/v2/dealFields", json={"field_name": "Paid", "field_type": "enum",
                                                "options": [{"label": "Yes"}, {"label": "No"}]}).json()["data"]
    assert [o["label"] for o in enum["options"]] == ["Yes", "No"]
    assert api.post("/api/v2/dealFields", json={"field_name": "Bad", "field_type": "enum"}).status_code == 400
    deal = sb.deal_ids()[3]
    before = sb.deal(deal)["update_time"]
    yes = enum["options"][0]["id"]
    patched = api.patch(f"/api/v2/deals/{deal}", json={"custom_fields": {key: "INV-1", enum["field_code"]: yes}})
    assert patched.status_code == 200
    data = patched.json()["data"]
    assert data["custom_fields"][key] == "INV-1"
    assert data["update_time"] > before
    assert api.patch(f"/api/v2/deals/{deal}", json={"custom_fields": {enum["field_code"]: []}}).status_code == 400
    cleared = api.patch(f"/api/v2/deals/{deal}", json={"custom_fields": {key: None}}).json()["data"]
    assert cleared["custom_fields"][key] is None
    v1 = {f["key"]: f for f in api.get("/v1/dealFields", params={"limit": 500}).json()["data"]}
    assert v1[key]["name"] == "Invoice number"
    assert v1[enum["field_code"]]["options"] == [{"id": o["id"], "label": o["label"]} for o in enum["options"]]


def test_v1_field_listing_pages_with_start(api: httpx.Client) -> None:
    """v1 dealFields pages with start/limit and additional_data.pagination (next_start while more remain)."""
    first = api.get("/v1/dealFields", params={"start": 0, "limit": 5}).json()
    assert first["additional_data"]["pagination"] == {"start": 0, "limit": 5, "more_items_in_collection": True,
                                                      "next_start": 5}
    keys = [f["key"] for f in first["data"]]
    start = 5
    while True:
        page = api.get("/v1/dealFields", params={"start": start, "limit": 5}).json()
        keys += [f["key"] for f in page["data"]]
        if not page["additional_data"]["pagination"]["more_items_in_collection"]:
            break
        start = page["additional_data"]["pagination"]["next_start"]
    v2 = [f["field_code"] for f in walk(api, "/api/v2/dealFields")]
    assert keys == v2
    assert first["data"][0]["add_time"] == "2023-06-01 00:00:00"


def test_book_is_loaded_with_effective_lines(book: Book, sb: PipedriveSandbox, api: httpx.Client) -> None:
    """Deal values, statuses and products follow the book: products are the effective lines, code is the SKU."""
    products = {p["id"]: p for p in walk(api, "/api/v2/products")}
    assert {p["code"] for p in products.values()} == {p.sku for p in book.products}
    ids = sb.deal_ids_by_book_id()
    for bd in book.deals:
        deal = sb.deal(ids[bd.id])
        assert deal["value"] == bd.amount
        assert deal["status"] == ("won" if bd.is_won else "lost" if bd.stage == "lost" else "open")
        if bd.is_won:
            assert deal["won_time"] is not None
            assert deal["won_time"] <= deal["update_time"]
        lines = sb.deal_products_of(ids[bd.id])
        expected = [(ln.sku, ln.quantity, ln.unit_price, ln.discount_percent, ln.tax_rate)
                    for ln in effective_lines(bd)]
        assert [(products[p["product_id"]]["code"], p["quantity"], p["item_price"], p["discount"], p["tax"])
                for p in lines] == expected
        assert all(p["tax_method"] == "exclusive" and p["discount_type"] == "percentage" for p in lines)
    bulk = walk(api, "/api/v2/deals/products", deal_ids=",".join(str(i) for i in list(ids.values())[:10]), limit=4)
    assert len(bulk) == sum(len(sb.deal_products_of(i)) for i in list(ids.values())[:10])
    assert api.get("/api/v2/deals/products").status_code == 400


def test_amounts_travel_as_exact_json_numbers(sb: PipedriveSandbox, api: httpx.Client) -> None:
    """Deal values and prices are JSON numbers with their exact decimal digits, never rounded through float."""
    raw = api.get("/api/v2/deals", params={"limit": 500}).content
    text = raw.decode()
    values = [r["value"] for r in loads(raw)["data"]]
    assert all(isinstance(v, Decimal | int) for v in values)
    assert sorted(values) == sorted(Decimal(sb.deal(i)["value"]) for i in sb.deal_ids())
    assert '"value":"' not in text
    cents = next(v for v in values if isinstance(v, Decimal) and v != v.to_integral_value())
    assert f'"value":{cents}' in text


def test_same_seed_same_data_and_state_round_trip(book: Book, tmp_path: Path) -> None:
    """Two sandboxes with one seed serve identical data; save/load restores deals and custom fields."""
    a, b = make(book), make(book)
    with client(a) as api_a, client(b) as api_b:
        assert api_a.get("/api/v2/deals", params={"limit": 500}).content == \
            api_b.get("/api/v2/deals", params={"limit": 500}).content
        key = api_a.post("/api/v2/organizationFields", json={"field_name": "Ledger id",
                                                             "field_type": "varchar"}).json()["data"]["field_code"]
        api_a.patch("/api/v2/organizations/2", json={"custom_fields": {key: "C-2"}})
    a.save(tmp_path / "pd.bin")
    fresh = PipedriveSandbox(seed=11)
    assert fresh.load(tmp_path / "pd.bin")
    assert fresh.organization(2)["custom_fields"][key] == "C-2"
    assert fresh.deal_ids() == a.deal_ids()
    assert fresh.deal_ids_by_book_id() == a.deal_ids_by_book_id()


def test_injected_faults_use_pipedrive_bodies(book: Book) -> None:
    """An injected 503 or 429 carries Pipedrive's error body; a 429 a Retry-After on the sandbox clock."""
    sb = make(book, faults="429=0.5,503=0.5", clock=Clock(10))
    seen: dict[int, httpx.Response] = {}
    with client(sb) as api:
        for _ in range(40):
            resp = api.get("/api/v2/deals/1")
            seen.setdefault(resp.status_code, resp)
    assert {429, 503} <= set(seen)
    for status in (429, 503):
        body = seen[status].json()
        assert body["success"] is False
        assert body["data"] is None
    assert float(seen[429].headers["Retry-After"]) <= 0.2


def test_oauth_refresh_and_bearer(book: Book) -> None:
    """A refresh token from the consent flow buys a bearer token; a wrong client secret is refused."""
    sb = make(book, oauth_client=("app-id", "app-secret"))
    refresh = sb.issue_refresh_token()
    with httpx.Client(transport=sb.transport(), base_url=API) as raw:
        basic = base64.b64encode(b"app-id:app-secret").decode()
        token = raw.post("/oauth/token", data={"grant_type": "refresh_token", "refresh_token": refresh},
                         headers={"Authorization": f"Basic {basic}"})
        assert token.status_code == 200
        payload = token.json()
        assert payload["token_type"] == "Bearer"
        assert payload["expires_in"] > 0
        assert payload["api_domain"].startswith("https://")
        ok = raw.get("/api/v2/deals/1", headers={"Authorization": f"Bearer {payload['access_token']}"})
        assert ok.status_code == 200
        wrong = base64.b64encode(b"app-id:nope").decode()
        refused = raw.post("/oauth/token", data={"grant_type": "refresh_token", "refresh_token": refresh},
                           headers={"Authorization": f"Basic {wrong}"})
        assert refused.status_code == 401
        bad_grant = raw.post("/oauth/token", data={"grant_type": "refresh_token", "refresh_token": "x"},
                             headers={"Authorization": f"Basic {basic}"})
        assert bad_grant.json()["error"] == "invalid_grant"
    assert sb.stats()["requests_by_auth"]["bearer"] == 1


def test_admin_deals_listing_and_user_edit(book: Book, sb: PipedriveSandbox) -> None:
    """/_sandbox/deals lists deals in the HubSpot sandbox's shape; a PATCH there edits one as a user would."""
    with httpx.Client(transport=sb.transport(), base_url=API) as raw:
        rows = raw.get("/_sandbox/deals").json()
        assert len(rows) == len(book.deals)
        won = [r for r in rows if r["won"]]
        assert len(won) == sum(1 for d in book.deals if d.is_won)
        sample = won[0]
        assert set(sample) >= {"id", "amount", "currency", "won", "name", "book_id", "updated_at"}
        assert isinstance(sample["id"], str)
        assert Decimal(sample["amount"]) == book.deal(sample["book_id"]).amount
        edited = raw.patch(f"/_sandbox/deals/{sample['id']}", json={"properties": {"status": "lost"}})
        assert edited.status_code == 200
        assert edited.json()["status"] == "lost"
        assert raw.patch("/_sandbox/deals/999999", json={"properties": {"title": "x"}}).status_code == 404
        stats = raw.get("/_sandbox/stats").json()
    assert stats["objects"]["deals"] == len(book.deals)
    assert json.dumps(stats)


def test_activities_list_filters_and_pages(book: Book, sb: PipedriveSandbox, api: httpx.Client) -> None:
    """GET /api/v2/activities lists the book's activities (done, on their deal, person and organization), filters
    by one deal_id, type-agnostic, pages with limit/cursor, sorts by due_date, and costs 10 tokens a page."""
    pd_ids = sb.deal_ids_by_book_id()
    everything = walk(api, "/api/v2/activities", limit=500)
    assert len(everything) == sum(len(book.activities(d)) for d in book.deals)
    assert [a["id"] for a in everything] == sorted(a["id"] for a in everything)
    assert {a["type"] for a in everything} == {"call", "meeting", "email", "task"}
    assert all(a["done"] and a["marked_as_done_time"] and not a["is_deleted"] for a in everything)
    deal = next(d for d in book.deals if len(book.activities(d)) >= 3)
    did = pd_ids[deal.id]
    raw = sb.deal(did)
    mine = walk(api, "/api/v2/activities", deal_id=did, limit=2)
    assert [(a["type"], a["subject"]) for a in sorted(mine, key=lambda a: a["add_time"])] == [
        (a.kind, a.subject) for a in book.activities(deal)]
    assert {(a["person_id"], a["org_id"]) for a in mine} == {(raw["person_id"], raw["org_id"])}
    assert all(parse_time(a["add_time"]) == int(x.at.timestamp()) for a, x in zip(
        sorted(mine, key=lambda a: a["add_time"]), book.activities(deal), strict=True))
    meeting = next((a for a in everything if a["type"] == "meeting"), None)
    assert meeting is not None
    assert meeting["busy"] is True
    assert meeting["duration"].count(":") == 2
    by_due = walk(api, "/api/v2/activities", sort_by="due_date", sort_direction="desc", limit=500)
    assert [a["due_date"] for a in by_due] == sorted((a["due_date"] for a in everything), reverse=True)
    assert walk(api, "/api/v2/activities", deal_id=424242) == []
    assert walk(api, "/api/v2/activities", done="false") == []
    for bad in ({"limit": 501}, {"done": "maybe"}, {"include_fields": "notes"}, {"sort_by": "subject"}):
        assert api.get("/api/v2/activities", params=bad).status_code == 400, bad
    assert "attendees" in api.get("/api/v2/activities", params={"include_fields": "attendees"}).json()["data"][0]
    start = sb.tokens_left()
    resp = api.get("/api/v2/activities", params={"deal_id": did})
    assert int(resp.headers["x-daily-requests-left"]) == start - 10
    with httpx.Client(transport=sb.transport(), base_url="http://sandbox") as admin:
        rows = {r["book_id"]: r for r in admin.get("/_sandbox/deals").json()}
    for d in book.deals:
        assert rows[d.id]["activities"] == dict(Counter(a.kind for a in book.activities(d)))
        assert parse_time(rows[d.id]["created_at"]) == int(d.created_at.timestamp())


def test_adding_and_deleting_an_activity(sb: PipedriveSandbox, api: httpx.Client) -> None:
    """POST /activities adds one (type checked, deal checked, 5 tokens); DELETE takes it out of the listings."""
    deal = sb.deal_ids()[0]
    before = sb.activity_counts_of(deal)
    made = api.post("/api/v2/activities", json={"deal_id": deal, "type": "call", "subject": "Rappel"})
    assert made.status_code == 200, made.text
    activity = made.json()["data"]
    assert (activity["deal_id"], activity["type"], activity["done"]) == (deal, "call", False)
    assert sb.activity_counts_of(deal) == {**before, "call": before.get("call", 0) + 1}
    assert api.get(f"/api/v2/activities/{activity['id']}").json()["data"]["subject"] == "Rappel"
    assert api.post("/api/v2/activities", json={"deal_id": deal, "type": "fax"}).status_code == 400
    assert api.post("/api/v2/activities", json={"deal_id": 424242, "type": "call"}).status_code == 400
    assert api.delete(f"/api/v2/activities/{activity['id']}").status_code == 200
    assert sb.activity_counts_of(deal) == before
    assert activity["id"] not in {a["id"] for a in walk(api, "/api/v2/activities", deal_id=deal)}
    assert api.delete(f"/api/v2/activities/{activity['id']}").status_code == 404


def test_stages_pipelines_and_activity_metadata(api: httpx.Client) -> None:
    """Stages carry deal_probability (percent) per pipeline and cost 5 tokens; pipelines list; activityTypes and
    activityFields describe the activity types."""
    stages = walk(api, "/api/v2/stages")
    assert {s["pipeline_id"] for s in stages} == {1, 2}
    assert all(isinstance(s["deal_probability"], int) and 0 < s["deal_probability"] <= 100 for s in stages)
    assert [s["id"] for s in walk(api, "/api/v2/stages", pipeline_id=2, sort_by="order_nr")] == [6, 7, 8, 9, 10]
    assert api.get("/api/v2/stages/3").json()["data"]["deal_probability"] == 50
    assert api.get("/api/v2/stages/99").status_code == 404
    pipelines = walk(api, "/api/v2/pipelines")
    assert [(p["id"], p["is_deal_probability_enabled"]) for p in pipelines] == [(1, True), (2, True)]
    left = int(api.get("/api/v2/stages").headers["x-daily-requests-left"])
    assert int(api.get("/api/v2/pipelines").headers["x-daily-requests-left"]) == left - 5
    types = api.get("/v1/activityTypes").json()["data"]
    assert {"call", "meeting", "email", "task"} <= {t["key_string"] for t in types}
    fields = {f["field_code"]: f for f in walk(api, "/api/v2/activityFields")}
    assert {"subject", "type", "deal_id", "due_date", "done"} <= set(fields)
    assert {o["label"] for o in fields["type"]["options"]} >= {"Call", "Meeting", "Email", "Task"}
    assert api.get("/v1/activityFields").json()["additional_data"]["pagination"]["more_items_in_collection"] is False


def test_organizations_carry_acquisition_source_and_some_deals_a_probability(book: Book, sb: PipedriveSandbox,
                                                                             api: httpx.Client) -> None:
    """Organizations carry the company's acquisition channel as an option; about a quarter of open deals have a
    probability of their own, closed deals none."""
    fields = {f["field_name"]: f for f in walk(api, "/api/v2/organizationFields")}
    source = fields["Acquisition source"]
    labels = {o["id"]: o["label"] for o in source["options"]}
    orgs = sb.org_ids_by_book_id()
    for c in book.companies:
        assert labels[sb.organization(orgs[c.id])["custom_fields"][source["field_code"]]] == c.acquisition_source
    pd_ids = sb.deal_ids_by_book_id()
    own = [sb.deal(pd_ids[d.id])["probability"] for d in book.deals if not d.is_closed]
    assert 0.1 < sum(p is not None for p in own) / len(own) < 0.45
    assert all(sb.deal(pd_ids[d.id])["probability"] is None for d in book.deals if d.is_closed)


def test_state_saved_before_activities_existed_still_loads(sb: PipedriveSandbox, tmp_path: Path) -> None:
    """A state file written before activities existed loads: no activities, and new ones can be added."""
    sb.save(tmp_path / "pd.state")
    state = pickle.loads((tmp_path / "pd.state").read_bytes())
    del state["_activities"]
    del state["_fields"]["activity"]
    del state["_next_ids"]["activity"]
    (tmp_path / "old.state").write_bytes(pickle.dumps(state))
    fresh = PipedriveSandbox(seed=11)
    assert fresh.load(tmp_path / "old.state")
    deal = sb.deal_ids()[0]
    assert fresh.activity_counts_of(deal) == {}
    with client(fresh) as api:
        assert api.post("/api/v2/activities", json={"deal_id": deal, "type": "email"}).status_code == 200
        assert api.get("/api/v2/activityFields").status_code == 200
    assert fresh.activity_counts_of(deal) == {"email": 1}
