"""The Salesforce sandbox behaves like Salesforce: SOQL, paging, writes and their errors, limits, sessions, OAuth."""

from __future__ import annotations

import datetime as dt
import pickle
import re
import time
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.salesforce.client import loads, to_18
from connectors.salesforce.sandbox import (
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
    DEMO_PASSWORD,
    DEMO_REFRESH_TOKEN,
    DEMO_USERNAME,
    SalesforceSandbox,
)
from connectors.seedbook import Book, effective_lines, generate_book

V = "/services/data/v62.0"


@pytest.fixture(scope="module")
def book() -> Book:
    return generate_book(13, companies=60, deals=260)


def make(book: Book, **options: Any) -> SalesforceSandbox:
    sb = SalesforceSandbox(seed=13, **options)
    sb.load_book(book)
    return sb


@pytest.fixture(scope="module")
def shared(book: Book) -> SalesforceSandbox:
    """A loaded sandbox for the tests that only read."""
    return make(book)


@pytest.fixture
def sb(book: Book) -> SalesforceSandbox:
    return make(book)


def client(sb: SalesforceSandbox, token: str | None = None) -> httpx.Client:
    return httpx.Client(transport=sb.transport(), base_url="https://acme.my.salesforce.com",
                        headers={"Authorization": f"Bearer {token or sb.issue_session()}"})


@pytest.fixture
def api(sb: SalesforceSandbox) -> Iterator[httpx.Client]:
    with client(sb) as c:
        yield c


@pytest.fixture
def ro(shared: SalesforceSandbox) -> Iterator[httpx.Client]:
    with client(shared) as c:
        yield c


def soql(api: httpx.Client, q: str, *, all_rows: bool = False, batch: int | None = None) -> httpx.Response:
    headers = {"Sforce-Query-Options": f"batchSize={batch}"} if batch else {}
    return api.get(f"{V}/{'queryAll' if all_rows else 'query'}/", params={"q": q}, headers=headers)


def records(resp: httpx.Response) -> list[dict[str, Any]]:
    assert resp.status_code == 200, resp.text
    body = loads(resp.content)
    assert body["done"] is True
    return list(body["records"])


def test_ids_are_18_characters_with_key_prefixes(shared: SalesforceSandbox) -> None:
    """Every object's ids carry its key prefix and a valid case-insensitivity suffix, increasing in creation order."""
    prefixes = {"Account": "001", "Opportunity": "006", "OpportunityLineItem": "00k", "Product2": "01t",
                "PricebookEntry": "01u", "Pricebook2": "01s", "Quote": "0Q0", "QuoteLineItem": "0QL",
                "OpportunityStage": "01J", "User": "005"}
    for obj, prefix in prefixes.items():
        ids = shared.object_ids(obj)
        assert ids, obj
        assert all(len(i) == 18 and i.startswith(prefix) and to_18(i[:15]) == i for i in ids), obj
        assert ids == sorted(ids)


def test_query_pages_follow_next_records_url(ro: httpx.Client, shared: SalesforceSandbox) -> None:
    """A query answers batches of the requested size with nextRecordsUrl; following it yields every record once."""
    first = soql(ro, "SELECT Id FROM Opportunity ORDER BY Id", batch=200)
    body = loads(first.content)
    assert (body["totalSize"], body["done"], len(body["records"])) == (260, False, 200)
    assert re.fullmatch(rf"{V}/query/01g\w{{15}}-200", body["nextRecordsUrl"])
    second = loads(ro.get(body["nextRecordsUrl"]).content)
    assert second["done"] is True
    assert "nextRecordsUrl" not in second
    ids = [r["Id"] for r in body["records"] + second["records"]]
    assert ids == sorted(shared.object_ids("Opportunity"))
    # batchSize is at least 200; the default batch is 2,000; an unknown locator is refused.
    small = loads(soql(ro, "SELECT Id FROM Opportunity", batch=50).content)
    assert len(small["records"]) == 200
    assert len(records(soql(ro, "SELECT Id FROM Opportunity"))) == 260
    gone = ro.get(f"{V}/query/01g8d0000000000AAA-200")
    assert gone.status_code == 400
    assert loads(gone.content)[0]["errorCode"] == "INVALID_QUERY_LOCATOR"


def test_soql_where_order_and_limit(ro: httpx.Client, shared: SalesforceSandbox) -> None:
    """AND/OR/NOT, parentheses, IN, LIKE, comparisons, null, datetime literals, ORDER BY and LIMIT filter as SOQL."""
    opps = [shared.record("Opportunity", i) for i in shared.object_ids("Opportunity")]
    cut = sorted(o["SystemModstamp"] for o in opps)[100]
    literal = cut.strftime("%Y-%m-%dT%H:%M:%S.") + f"{cut.microsecond // 1000:03d}Z"
    got = records(soql(ro, f"SELECT Id, Amount FROM Opportunity WHERE (IsWon = true OR StageName IN ('Perdu', "
                           f"'Closed Lost')) AND SystemModstamp > {literal} AND NOT Name LIKE '%cloud%' "
                           "AND Amount != null ORDER BY Amount DESC, Id"))
    expected = [o for o in opps if (o["IsWon"] or o["StageName"] in ("Perdu", "Closed Lost"))
                and o["SystemModstamp"] > cut and "cloud" not in o["Name"].lower() and o["Amount"] is not None]
    expected.sort(key=lambda o: o["Id"])
    expected.sort(key=lambda o: o["Amount"], reverse=True)
    assert [r["Id"] for r in got] == [o["Id"] for o in expected]
    assert len(got) > 10
    assert all(isinstance(r["Amount"], Decimal | int) for r in got)
    top = records(soql(ro, "SELECT Id FROM Opportunity WHERE CurrencyIsoCode NOT IN ('EUR') ORDER BY Id LIMIT 3"))
    assert [r["Id"] for r in top] == sorted(o["Id"] for o in opps if o["CurrencyIsoCode"] != "EUR")[:3]
    day = records(soql(ro, "SELECT Id FROM Opportunity WHERE CloseDate >= 2025-01-01"))
    assert len(day) == sum(1 for o in opps if o["CloseDate"] >= dt.date(2025, 1, 1))
    counted = loads(soql(ro, "SELECT COUNT() FROM Opportunity WHERE IsWon = true").content)
    assert (counted["totalSize"], counted["records"]) == (sum(1 for o in opps if o["IsWon"]), [])


def test_relationship_fields_and_child_subqueries(ro: httpx.Client, shared: SalesforceSandbox) -> None:
    """Parent paths come back as nested records and child subqueries as nested query results (null when empty)."""
    rows = records(soql(ro, "SELECT Id, Account.Name, Account.BillingAddress, SyncedQuote.Status, Owner.Email, "
                            "(SELECT Id, Quantity, PricebookEntry.Product2.ProductCode FROM OpportunityLineItems "
                            "ORDER BY SortOrder) FROM Opportunity WHERE SyncedQuoteId != null LIMIT 5"))
    assert len(rows) == 5
    for r in rows:
        opp = shared.record("Opportunity", r["Id"])
        account = shared.record("Account", opp["AccountId"])
        assert r["Account"]["attributes"]["type"] == "Account"
        assert r["Account"]["Name"] == account["Name"]
        assert r["Account"]["BillingAddress"]["city"] == account["BillingCity"]
        assert r["SyncedQuote"]["Status"] == "Accepted"
        assert r["Owner"]["Email"].endswith("@atelier-numerique.fr")
        lines = r["OpportunityLineItems"]
        assert lines["done"] is True
        assert lines["totalSize"] == len(lines["records"]) > 0
        assert all(li["PricebookEntry"]["Product2"]["ProductCode"] for li in lines["records"])
    empty = records(soql(ro, "SELECT Id, SyncedQuote.Status, (SELECT Id FROM Quotes) FROM Opportunity "
                             "WHERE SyncedQuoteId = null ORDER BY Id LIMIT 400"))
    assert all(r["SyncedQuote"] is None for r in empty)
    assert any(r["Quotes"] is None for r in empty)


def test_soql_errors_are_salesforce_error_arrays(ro: httpx.Client) -> None:
    """Unknown fields and objects, quoted datetimes and bad syntax answer 400 with Salesforce's error array."""
    cases = {
        "SELECT Id, Colour__c FROM Opportunity": "INVALID_FIELD",
        "SELECT Id FROM Opportunity WHERE SystemModstamp > '2024-01-01T00:00:00Z'": "INVALID_FIELD",
        "SELECT Id FROM Opportunity WHERE Amount > '10'": "INVALID_FIELD",
        "SELECT Id FROM Widget__c": "INVALID_TYPE",
        "SELECT Id FROM Opportunity WHERE": "MALFORMED_QUERY",
        "SELECT Id FROM Opportunity ORDER Id": "MALFORMED_QUERY",
    }
    for q, code in cases.items():
        resp = soql(ro, q)
        assert resp.status_code == 400, q
        body = loads(resp.content)
        assert isinstance(body, list), q
        assert body[0]["errorCode"] == code, (q, body)
        assert body[0]["message"]


def test_single_record_writes(api: httpx.Client, sb: SalesforceSandbox) -> None:
    """Create answers 201 {id, success, errors}; update 204 with no body and a new SystemModstamp; delete 204."""
    account = sb.object_ids("Account")[0]
    created = api.post(f"{V}/sobjects/Opportunity/", json={"Name": "Renouvellement", "StageName": "Prospecting",
                                                           "CloseDate": "2026-12-31", "AccountId": account})
    assert created.status_code == 201
    body = loads(created.content)
    assert body["success"] is True
    assert body["errors"] == []
    assert body["id"].startswith("006")
    rid = body["id"]
    before = sb.record("Opportunity", rid)["SystemModstamp"]
    time.sleep(0.002)
    updated = api.patch(f"{V}/sobjects/Opportunity/{rid}", json={"StageName": "Signé", "Amount": 1234.5})
    assert updated.status_code == 204
    assert updated.content == b""
    rec = sb.record("Opportunity", rid)
    assert rec["IsWon"] is True
    assert rec["IsClosed"] is True
    assert rec["Amount"] == Decimal("1234.5")
    assert rec["SystemModstamp"] > before
    got = loads(api.get(f"{V}/sobjects/Opportunity/{rid}", params={"fields": "Name,IsWon"}).content)
    assert (got["Name"], got["IsWon"], got["attributes"]["type"]) == ("Renouvellement", True, "Opportunity")
    missing = api.post(f"{V}/sobjects/Opportunity", json={"Name": "Sans étape"})
    assert missing.status_code == 400
    assert loads(missing.content)[0] == {"message": "Required fields are missing: [StageName, CloseDate]",
                                         "errorCode": "REQUIRED_FIELD_MISSING", "fields": ["StageName", "CloseDate"]}
    bad_stage = api.patch(f"{V}/sobjects/Opportunity/{rid}", json={"StageName": "Won"})
    assert loads(bad_stage.content)[0]["errorCode"] == "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"
    assert api.get(f"{V}/sobjects/Opportunity/006000000000000AAA").status_code == 404
    assert api.delete(f"{V}/sobjects/Opportunity/{rid}").status_code == 204
    again = api.get(f"{V}/sobjects/Opportunity/{rid}")
    assert (again.status_code, loads(again.content)[0]["errorCode"]) == (404, "ENTITY_IS_DELETED")


def test_upsert_by_external_id(api: httpx.Client, sb: SalesforceSandbox) -> None:
    """PATCH on an external id creates (201, created true) then updates (200, created false)."""
    path = f"{V}/sobjects/Account/LB_Book_Id__c/EXT-1"
    first = api.patch(path, json={"Name": "Atelier Neuf"})
    assert first.status_code == 201
    assert loads(first.content)["created"] is True
    second = api.patch(path, json={"Website": "https://www.atelier-neuf.fr"})
    assert second.status_code == 200
    assert loads(second.content)["created"] is False
    rec = sb.record("Account", loads(first.content)["id"])
    assert (rec["Name"], rec["Website"], rec["LB_Book_Id__c"]) == ("Atelier Neuf", "https://www.atelier-neuf.fr",
                                                                   "EXT-1")
    assert api.patch(f"{V}/sobjects/Account/Name/x", json={}).status_code == 404


def test_collection_update_isolates_failures(api: httpx.Client, sb: SalesforceSandbox) -> None:
    """sObject Collections answer 200 with per-record statusCode errors; allOrNone rolls every record back."""
    opps = sb.object_ids("Opportunity")
    sb.delete("Opportunity", opps[3])
    records_ = [{"attributes": {"type": "Opportunity"}, "id": opps[0], "NextStep": "Relancer"},
                {"attributes": {"type": "Opportunity"}, "id": opps[1], "NextStep": "x" * 300},
                {"attributes": {"type": "Opportunity"}, "id": "006000000000000AAA", "NextStep": "?"},
                {"attributes": {"type": "Opportunity"}, "id": opps[3], "NextStep": "?"},
                {"attributes": {"type": "Opportunity"}, "id": opps[2], "StageName": "Gagné"},
                {"attributes": {"type": "Opportunity"}, "id": opps[4], "IsWon": True}]
    resp = api.patch(f"{V}/composite/sobjects", json={"allOrNone": False, "records": records_})
    assert resp.status_code == 200
    results = loads(resp.content)
    assert [r["success"] for r in results] == [True, False, False, False, False, False]
    codes = [r["errors"][0]["statusCode"] if r["errors"] else None for r in results]
    assert codes == [None, "STRING_TOO_LONG", "INVALID_CROSS_REFERENCE_KEY", "ENTITY_IS_DELETED",
                     "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST", "INVALID_FIELD_FOR_INSERT_UPDATE"]
    assert results[1]["errors"][0]["fields"] == ["NextStep"]
    assert all("errorCode" not in e for r in results for e in r["errors"])
    assert sb.record("Opportunity", opps[0])["NextStep"] == "Relancer"
    rolled = api.patch(f"{V}/composite/sobjects", json={"allOrNone": True, "records": [
        {"attributes": {"type": "Opportunity"}, "id": opps[5], "NextStep": "Jamais écrit"}, records_[1]]})
    assert [r["errors"][0]["statusCode"] for r in loads(rolled.content)] == [
        "ALL_OR_NONE_OPERATION_ROLLED_BACK", "STRING_TOO_LONG"]
    assert sb.record("Opportunity", opps[5])["NextStep"] is None
    too_many = api.patch(f"{V}/composite/sobjects", json={"records": [records_[0]] * 201})
    assert too_many.status_code == 400
    unparsable = api.patch(f"{V}/composite/sobjects", json={"records": [
        {"attributes": {"type": "Opportunity"}, "id": opps[0], "Amount": "beaucoup"}]})
    assert (unparsable.status_code, loads(unparsable.content)[0]["errorCode"]) == (400, "JSON_PARSER_ERROR")
    created = api.post(f"{V}/composite/sobjects", json={"records": [
        {"attributes": {"type": "Account"}, "Name": "Nouvelle SAS"}, {"attributes": {"type": "Account"}}]})
    assert [(r["success"], bool(r.get("id"))) for r in loads(created.content)] == [(True, True), (False, False)]


def test_won_comes_from_the_stage_record(api: httpx.Client, sb: SalesforceSandbox, book: Book) -> None:
    """IsWon/IsClosed follow OpportunityStage: "Signé" is won, "Verbal Won" is not; a stage change flips them."""
    stages = {r["MasterLabel"]: r for r in records(soql(api, "SELECT MasterLabel, IsWon, IsClosed FROM "
                                                              "OpportunityStage"))}
    assert stages["Signé"]["IsWon"]
    assert stages["Closed Won"]["IsWon"]
    assert not stages["Verbal Won"]["IsWon"]
    assert not stages["Verbal Won"]["IsClosed"]
    opps = [sb.record("Opportunity", i) for i in sb.object_ids("Opportunity")]
    won_stages = Counter(o["StageName"] for o in opps if o["IsWon"])
    assert set(won_stages) == {"Closed Won", "Signé"}
    assert won_stages["Signé"] > 10
    assert any(o["StageName"] == "Verbal Won" for o in opps)
    assert sum(o["IsWon"] for o in opps) == sum(d.is_won for d in book.deals)
    verbal = next(o["Id"] for o in opps if o["StageName"] == "Verbal Won")
    assert api.patch(f"{V}/sobjects/Opportunity/{verbal}", json={"StageName": "Closed Won"}).status_code == 204
    assert sb.record("Opportunity", verbal)["IsWon"] is True


def test_seeded_quotes_sync_into_line_items(shared: SalesforceSandbox, book: Book) -> None:
    """An accepted quote is synced and the opportunity's lines mirror it; other quotes are not; amounts add up."""
    opp_ids, quote_ids = shared.deal_ids_by_book_id(), shared.quote_ids_by_book_id()
    rows = shared.query("SELECT Id, Amount, SyncedQuoteId, (SELECT Product2Id, Quantity, UnitPrice, Discount, "
                        "TotalPrice, Tax_Rate__c, Description FROM OpportunityLineItems ORDER BY SortOrder) "
                        "FROM Opportunity")
    by_id = {r["Id"]: r for r in rows}
    statuses: Counter[str] = Counter()
    for d in book.deals:
        r = by_id[opp_ids[d.id]]
        lines = (r["OpportunityLineItems"] or {"records": []})["records"]
        expected = effective_lines(d)
        assert [(li["Quantity"], li["UnitPrice"], li["Discount"] or 0, li["Tax_Rate__c"], li["Description"])
                for li in lines] == [(ln.quantity, ln.unit_price, ln.discount_percent, ln.tax_rate, ln.description)
                                     for ln in expected]
        assert r["Amount"] == d.amount == sum(li["TotalPrice"] for li in lines)
        if d.quote is None:
            assert r["SyncedQuoteId"] is None
            continue
        quote = shared.record("Quote", quote_ids[d.quote.id])
        statuses[quote["Status"]] += 1
        synced = d.quote.status == "accepted"
        assert (r["SyncedQuoteId"] == quote["Id"]) == synced == quote["IsSyncing"]
        assert quote["Status"] == {"accepted": "Accepted", "sent": "Presented", "draft": "Draft",
                                   "rejected": "Denied"}[d.quote.status]
        assert quote["LineItemCount"] == len(d.quote.lines)
    assert statuses["Accepted"] > 5
    assert statuses["Presented"] > 5
    stamps = Counter(r["SystemModstamp"] for r in shared.query("SELECT SystemModstamp FROM Opportunity"))
    assert max(stamps.values()) >= 10


def test_line_item_writes_roll_up_and_quote_sync_replaces_lines(api: httpx.Client, sb: SalesforceSandbox) -> None:
    """A new line item raises Amount and bumps the opportunity; syncing a quote replaces the opportunity's lines."""
    opp = next(r for r in sb.query("SELECT Id, Amount, CurrencyIsoCode, (SELECT Id FROM Quotes) FROM Opportunity "
                                   "WHERE SyncedQuoteId = null AND CurrencyIsoCode = 'EUR'") if r["Quotes"])
    entry = sb.query("SELECT Id, UnitPrice FROM PricebookEntry WHERE CurrencyIsoCode = 'EUR' AND "
                     "ProductCode = 'SVC-TRAVEL'")[0]
    before = sb.record("Opportunity", opp["Id"])["SystemModstamp"]
    resp = api.post(f"{V}/sobjects/OpportunityLineItem", json={
        "OpportunityId": opp["Id"], "PricebookEntryId": entry["Id"], "Quantity": 2, "Discount": 10})
    assert resp.status_code == 201, resp.text
    after = sb.record("Opportunity", opp["Id"])
    assert after["Amount"] == opp["Amount"] + Decimal("270.00")
    assert after["SystemModstamp"] >= before
    quote_id = opp["Quotes"]["records"][0]["Id"]
    assert api.patch(f"{V}/sobjects/Opportunity/{opp['Id']}", json={"SyncedQuoteId": quote_id}).status_code == 204
    quote = sb.record("Quote", quote_id)
    assert quote["IsSyncing"] is True
    assert sb.record("Opportunity", opp["Id"])["Amount"] == quote["TotalPrice"]
    lines = sb.query(f"SELECT Quantity FROM OpportunityLineItem WHERE OpportunityId = '{opp['Id']}'")
    assert len(lines) == quote["LineItemCount"]


def test_delete_goes_to_the_recycle_bin_and_the_delete_log(api: httpx.Client, sb: SalesforceSandbox) -> None:
    """query hides a deleted record, queryAll shows it with IsDeleted and a new SystemModstamp; deleted/ lists it."""
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    rid = sb.object_ids("Opportunity")[10]
    before = sb.record("Opportunity", rid)["SystemModstamp"]
    assert api.delete(f"{V}/sobjects/Opportunity/{rid}").status_code == 204
    assert records(soql(api, f"SELECT Id FROM Opportunity WHERE Id = '{rid}'")) == []
    [row] = records(soql(api, f"SELECT Id, IsDeleted, SystemModstamp FROM Opportunity WHERE Id = '{rid}'",
                         all_rows=True))
    assert row["IsDeleted"] is True
    assert row["SystemModstamp"] > before.strftime("%Y-%m-%dT%H:%M:%S")
    assert records(soql(api, f"SELECT Id FROM OpportunityLineItem WHERE OpportunityId = '{rid}'")) == []
    window = {"start": start.isoformat(), "end": (start + dt.timedelta(minutes=10)).isoformat()}
    deleted = loads(api.get(f"{V}/sobjects/Opportunity/deleted/", params=window).content)
    assert [r["id"] for r in deleted["deletedRecords"]] == [rid]
    assert {"earliestDateAvailable", "latestDateCovered"} <= set(deleted)
    sb.purge("Opportunity", rid)
    assert records(soql(api, f"SELECT Id FROM Opportunity WHERE Id = '{rid}'", all_rows=True)) == []
    assert [r["id"] for r in loads(api.get(f"{V}/sobjects/Opportunity/deleted", params=window).content)
            ["deletedRecords"]] == [rid]
    short = api.get(f"{V}/sobjects/Opportunity/deleted/", params={"start": start.isoformat(),
                                                                  "end": start.isoformat()})
    assert loads(short.content)[0]["errorCode"] == "INVALID_REPLICATION_DATE"
    touched = sb.object_ids("Opportunity")[0]
    api.patch(f"{V}/sobjects/Opportunity/{touched}", json={"NextStep": "Appeler"})
    assert loads(api.get(f"{V}/sobjects/Opportunity/updated/", params=window).content)["ids"] == [touched]


def test_daily_limit_answers_403_and_every_answer_carries_usage(book: Book) -> None:
    """Sforce-Limit-Info counts every call; past the allocation calls answer 403 REQUEST_LIMIT_EXCEEDED (not 429)."""
    sb = SalesforceSandbox(seed=13, daily_limit=4)
    with client(sb) as api:
        seen = []
        for _ in range(4):
            resp = api.get(f"{V}/limits")
            assert resp.status_code == 200
            seen.append(resp.headers["Sforce-Limit-Info"])
        assert seen == ["api-usage=1/4", "api-usage=2/4", "api-usage=3/4", "api-usage=4/4"]
        assert loads(resp.content)["DailyApiRequests"] == {"Max": 4, "Remaining": 0}
        refused = soql(api, "SELECT Id FROM Account")
        assert refused.status_code == 403
        assert loads(refused.content) == [{"message": "TotalRequests Limit exceeded.",
                                           "errorCode": "REQUEST_LIMIT_EXCEEDED"}]
        assert refused.headers["Sforce-Limit-Info"] == "api-usage=4/4"
    assert sb.stats()["request_limit_exceeded"] == 1


def test_expired_or_unknown_sessions_are_invalid_session_id(book: Book) -> None:
    """An unknown token, an idle session past its lifetime and an expired one answer 401 INVALID_SESSION_ID."""
    sb = SalesforceSandbox(seed=13, session_lifetime_s=0.2)
    expected = [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
    with client(sb, "00Dxx!not-a-session") as api:
        resp = api.get(f"{V}/limits")
        assert (resp.status_code, loads(resp.content)) == (401, expected)
    with client(sb) as api:
        assert api.get(f"{V}/limits").status_code == 200
        time.sleep(0.3)
        assert api.get(f"{V}/limits").status_code == 401
    with client(sb) as api:
        sb.expire_sessions()
        assert api.get(f"{V}/sobjects").status_code == 401


def test_oauth_grants_answer_like_salesforce(book: Book) -> None:
    """Refresh and password grants return a token with instance_url and no expires_in; rotation invalidates the old."""
    sb = SalesforceSandbox(seed=13, refresh_rotation=True)
    with httpx.Client(transport=sb.transport(), base_url="http://127.0.0.1:9") as http:
        def grant(**form: str) -> httpx.Response:
            return http.post("/services/oauth2/token", data={"client_id": DEMO_CLIENT_ID,
                                                             "client_secret": DEMO_CLIENT_SECRET, **form})

        first = grant(grant_type="refresh_token", refresh_token=DEMO_REFRESH_TOKEN)
        body = first.json()
        assert first.status_code == 200
        assert {"access_token", "instance_url", "id", "token_type", "issued_at", "signature"} <= set(body)
        assert "expires_in" not in body
        assert body["instance_url"] == "http://127.0.0.1:9"
        assert body["refresh_token"] != DEMO_REFRESH_TOKEN
        reused = grant(grant_type="refresh_token", refresh_token=DEMO_REFRESH_TOKEN)
        assert (reused.status_code, reused.json()["error"]) == (400, "invalid_grant")
        assert grant(grant_type="refresh_token", refresh_token=body["refresh_token"]).status_code == 200
        login = grant(grant_type="password", username=DEMO_USERNAME, password=DEMO_PASSWORD)
        assert login.status_code == 200
        assert "refresh_token" not in login.json()
        assert grant(grant_type="password", username=DEMO_USERNAME, password="wrong").json()["error"] == "invalid_grant"
        other = http.post("/services/oauth2/token", data={"client_id": "someone", "grant_type": "refresh_token"})
        assert other.json()["error"] == "invalid_client_id"
        access = login.json()["access_token"]
    with client(sb, access) as api:
        assert api.get(f"{V}/limits").status_code == 200


def test_tooling_creates_custom_fields(api: httpx.Client, sb: SalesforceSandbox) -> None:
    """A CustomField created through the Tooling API shows in describe and can be written; a duplicate is refused."""
    body = {"FullName": "Opportunity.Invoice_Number__c",
            "Metadata": {"label": "Invoice number", "type": "Text", "length": 40}}
    created = api.post(f"{V}/tooling/sobjects/CustomField", json=body)
    assert created.status_code == 201
    assert loads(created.content)["success"] is True
    described = loads(api.get(f"{V}/sobjects/Opportunity/describe/").content)
    field = next(f for f in described["fields"] if f["name"] == "Invoice_Number__c")
    assert (field["type"], field["length"], field["custom"], field["updateable"]) == ("string", 40, True, True)
    assert {"Amount", "StageName", "IsWon", "SystemModstamp"} <= {f["name"] for f in described["fields"]}
    opp = sb.object_ids("Opportunity")[0]
    assert api.patch(f"{V}/sobjects/Opportunity/{opp}", json={"Invoice_Number__c": "F-2026-001"}).status_code == 204
    assert sb.record("Opportunity", opp)["Invoice_Number__c"] == "F-2026-001"
    again = api.post(f"{V}/tooling/sobjects/CustomField", json=body)
    assert loads(again.content)[0]["errorCode"] == "DUPLICATE_DEVELOPER_NAME"
    bad = api.post(f"{V}/tooling/sobjects/CustomField", json={"FullName": "Opportunity.bad__name",
                                                                "Metadata": {"label": "x", "type": "Text",
                                                                             "length": 5}})
    assert bad.status_code == 400
    names = {o["name"] for o in loads(api.get(f"{V}/sobjects/").content)["sobjects"]}
    assert {"Account", "Opportunity", "OpportunityLineItem", "Quote", "QuoteLineItem", "OpportunityStage"} <= names


def test_faults_versions_and_trailing_slashes(book: Book) -> None:
    """Injected 5xx carry Salesforce bodies and usage; unknown API versions are 404; trailing slashes are accepted."""
    sb = SalesforceSandbox(seed=13, faults="503=1")
    with client(sb) as api:
        resp = api.get(f"{V}/limits/")
        assert resp.status_code == 503
        assert loads(resp.content)[0]["errorCode"] == "SERVER_UNAVAILABLE"
        assert "Sforce-Limit-Info" in resp.headers
    sb = SalesforceSandbox(seed=13)
    with client(sb) as api:
        assert api.get("/services/data/v99.0/limits").status_code == 404
        assert api.get("/services/data/v59.0/limits/").status_code == 200
        assert api.get("/services/data/").json()[-1]["version"] == "62.0"


def test_admin_deals_state_and_determinism(tmp_path: Path, book: Book, shared: SalesforceSandbox) -> None:
    """/_sandbox/deals lists deals like the HubSpot sandbox; saved state loads back; one seed gives one org."""
    with httpx.Client(transport=shared.transport(), base_url="http://127.0.0.1:9") as admin:
        rows = admin.get("/_sandbox/deals").json()
        assert len(rows) == len(book.deals)
        assert {"id", "amount", "currency", "won"} <= set(rows[0])
        won = [r for r in rows if r["won"]]
        assert len(won) == sum(d.is_won for d in book.deals)
        assert all(isinstance(r["amount"], str) and Decimal(r["amount"]) >= 0 for r in won)
        assert admin.get("/_sandbox/stats").json()["objects"]["Opportunity"] == len(book.deals)
    twin = make(book)
    assert twin.object_ids("Opportunity") == shared.object_ids("Opportunity")
    assert twin.deals_snapshot() == shared.deals_snapshot()
    path = tmp_path / "salesforce.state"
    twin.modify("Opportunity", twin.object_ids("Opportunity")[0], NextStep="Sauvegardé")
    twin.save(path)
    fresh = SalesforceSandbox(seed=99)
    assert fresh.load(path)
    assert fresh.org_id == twin.org_id
    assert fresh.record("Opportunity", twin.object_ids("Opportunity")[0])["NextStep"] == "Sauvegardé"
    assert fresh.deals_snapshot() == twin.deals_snapshot()


def test_book_activities_are_tasks_and_events_on_the_opportunity(shared: SalesforceSandbox, book: Book) -> None:
    """Calls and e-mails are completed Tasks with their subtype, tasks generic Tasks, meetings Events; each on its
    deal's opportunity and account, at the activity's time; /_sandbox/deals counts them per deal."""
    opps = shared.deal_ids_by_book_id()
    accounts = shared.account_ids_by_book_id()
    deal = next(d for d in book.deals if {a.kind for a in book.activities(d)} >= {"call", "meeting"})
    opp = opps[deal.id]
    tasks = shared.query("SELECT Subject, TaskSubtype, Type, Status, IsClosed, ActivityDate, AccountId, "
                         f"CallDurationInSeconds, CreatedDate FROM Task WHERE WhatId = '{opp}' ORDER BY CreatedDate",
                         include_deleted=True)
    events = shared.query("SELECT Subject, ActivityDateTime, EndDateTime, DurationInMinutes, EventSubtype, AccountId "
                          f"FROM Event WHERE WhatId = '{opp}' ORDER BY ActivityDateTime", include_deleted=True)
    logged = [a for a in book.activities(deal) if a.kind != "meeting"]
    assert [(t["Subject"], t["TaskSubtype"]) for t in tasks] == [
        (a.subject, {"call": "Call", "email": "Email"}.get(a.kind, "Task")) for a in logged]
    assert all(t["IsClosed"] and t["Status"] == "Completed" and t["AccountId"] == accounts[deal.company_id]
               for t in tasks)
    assert [t["CallDurationInSeconds"] for t in tasks if t["TaskSubtype"] == "Call"] == [
        a.duration_minutes * 60 for a in logged if a.kind == "call"]
    meetings = [a for a in book.activities(deal) if a.kind == "meeting"]
    assert [(e["Subject"], e["DurationInMinutes"], e["EventSubtype"]) for e in events] == [
        (a.subject, a.duration_minutes, "Event") for a in meetings]
    assert events[0]["ActivityDateTime"].startswith(meetings[0].at.strftime("%Y-%m-%dT%H:%M:%S"))
    assert shared.activity_counts_of(opp) == dict(Counter(a.kind for a in book.activities(deal)))
    with httpx.Client(transport=shared.transport(), base_url="http://127.0.0.1:9") as admin:
        rows = {r["book_id"]: r for r in admin.get("/_sandbox/deals").json()}
    for d in book.deals:
        assert rows[d.id]["activities"] == dict(Counter(a.kind for a in book.activities(d))), d.id
        assert rows[d.id]["created_at"].startswith(d.created_at.strftime("%Y-%m-%dT%H:%M:%S"))


def test_activities_a_year_old_are_archived_out_of_query(api: httpx.Client, sb: SalesforceSandbox) -> None:
    """The book's activities are more than a year old: query does not return them, queryAll does with IsArchived;
    a fresh open task is returned by both."""
    assert records(soql(api, "SELECT Id FROM Task")) == []
    archived = records(soql(api, "SELECT Id, IsArchived FROM Event", all_rows=True))
    assert archived
    assert all(r["IsArchived"] is True for r in archived)
    opp = sb.object_ids("Opportunity")[0]
    made = api.post(f"{V}/sobjects/Task", json={"WhatId": opp, "Subject": "Relancer", "TaskSubtype": "Call"})
    assert made.status_code == 201, made.text
    fresh = made.json()["id"]
    assert [r["Id"] for r in records(soql(api, "SELECT Id, IsArchived FROM Task"))] == [fresh]
    row = records(soql(api, f"SELECT IsArchived, Status, IsClosed FROM Task WHERE Id = '{fresh}'", all_rows=True))
    assert row[0]["IsArchived"] is False
    assert (row[0]["Status"], row[0]["IsClosed"]) == ("Not Started", False)


def test_aggregate_queries_group_and_count(ro: httpx.Client, shared: SalesforceSandbox) -> None:
    """GROUP BY with COUNT(field), aliases and expr0 names answers AggregateResult rows in one batch; a field that is
    neither grouped nor aggregated, an alias outside an aggregate query and a textarea group are refused."""
    opps = shared.object_ids("Opportunity")[:30]
    listed = ", ".join(f"'{o}'" for o in opps)
    rows = records(soql(ro, f"SELECT WhatId w, TaskSubtype, COUNT(Id) n, COUNT_DISTINCT(Type) FROM Task WHERE WhatId "
                            f"IN ({listed}) AND IsDeleted = false GROUP BY WhatId, TaskSubtype ORDER BY WhatId",
                        all_rows=True, batch=200))
    assert rows
    assert {tuple(r) for r in rows} == {("attributes", "w", "TaskSubtype", "n", "expr0")}
    assert all(r["attributes"] == {"type": "AggregateResult"} for r in rows)
    assert [r["w"] for r in rows] == sorted(r["w"] for r in rows)
    expected: Counter[str] = Counter()
    for o in opps:
        for kind, n in shared.activity_counts_of(o).items():
            if kind != "meeting":
                expected[kind] += n
    got: Counter[str] = Counter()
    for r in rows:
        got[{"Call": "call", "Email": "email"}.get(r["TaskSubtype"], "task")] += r["n"]
        assert r["expr0"] == 1  # each subtype has one Type in the book
    assert got == expected
    total = records(soql(ro, "SELECT COUNT(Id) FROM Event", all_rows=True))
    assert total == [{"attributes": {"type": "AggregateResult"}, "expr0": shared.stats()["objects"]["Event"]}]
    for q, code in {
        "SELECT WhatId, Subject, COUNT(Id) FROM Task GROUP BY WhatId": "MALFORMED_QUERY",
        "SELECT Id i FROM Task": "MALFORMED_QUERY",
        "SELECT Description, COUNT(Id) FROM Task GROUP BY Description": "INVALID_FIELD",
        "SELECT CreatedDate, COUNT(Id) FROM Task GROUP BY CreatedDate": "INVALID_FIELD",
    }.items():
        resp = soql(ro, q)
        assert resp.status_code == 400, q
        assert loads(resp.content)[0]["errorCode"] == code, q


def test_aggregate_answers_over_two_thousand_rows_are_refused() -> None:
    """An aggregate query cannot be continued with queryMore: more than 2,000 groups answer EXCEEDED_ID_LIMIT."""
    big = make(generate_book(13, companies=200, deals=700))
    with client(big) as api:
        ok = records(soql(api, "SELECT Id, COUNT(Id) FROM Task GROUP BY Id LIMIT 2000", all_rows=True, batch=200))
        assert len(ok) == 2000
        resp = soql(api, "SELECT Id, COUNT(Id) FROM Task GROUP BY Id", all_rows=True)
    assert resp.status_code == 400
    assert loads(resp.content) == [{
        "message": "Aggregate query does not support queryMore(), use LIMIT to restrict the results to a single batch",
        "errorCode": "EXCEEDED_ID_LIMIT", "fields": []}]
    assert big.stats()["objects"]["Task"] > 2000


def test_state_saved_before_activities_existed_still_loads(tmp_path: Path, sb: SalesforceSandbox) -> None:
    """A state file written before Task and Event existed loads; they start empty and can be queried."""
    sb.save(tmp_path / "sf.state")
    state = pickle.loads((tmp_path / "sf.state").read_bytes())
    for name in ("Task", "Event"):
        del state["_schema"][name]
        del state["_data"][name]
        del state["_book_ids"][name]
    for obj in state["_schema"].values():
        obj.children = [c for c in obj.children if c[1] not in ("Task", "Event")]
    (tmp_path / "old.state").write_bytes(pickle.dumps(state))
    fresh = SalesforceSandbox(seed=13)
    assert fresh.load(tmp_path / "old.state")
    assert fresh.query("SELECT Id FROM Task", include_deleted=True) == []
    opp = sb.object_ids("Opportunity")[0]
    assert fresh.query(f"SELECT Id, (SELECT Id FROM Tasks) FROM Opportunity WHERE Id = '{opp}'")[0]["Tasks"] is None
