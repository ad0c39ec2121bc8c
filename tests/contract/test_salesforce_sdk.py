"""simple-salesforce, pointed at the sandbox, works unchanged."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from decimal import Decimal
from typing import Any, cast

import pytest
import requests
from simple_salesforce.api import Salesforce, SFType
from simple_salesforce.exceptions import (
    SalesforceExpiredSession,
    SalesforceMalformedRequest,
    SalesforceRefusedRequest,
    SalesforceResourceNotFound,
)

from connectors.salesforce.client import mount_plain_http
from connectors.salesforce.sandbox import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, DEMO_REFRESH_TOKEN, SalesforceSandbox
from connectors.sandboxkit import SandboxServer, serve
from connectors.seedbook import Book, generate_book


@pytest.fixture(scope="module")
def book() -> Book:
    return generate_book(5, companies=40, deals=160)


@pytest.fixture(scope="module")
def sandbox(book: Book) -> Iterator[tuple[SalesforceSandbox, SandboxServer]]:
    sb = SalesforceSandbox(seed=5)
    sb.load_book(book)
    server = serve(sb)
    yield sb, server
    server.stop()


def connect(server: SandboxServer, session_id: str, version: str = "62.0") -> tuple[Salesforce, requests.Session]:
    session = requests.Session()
    https_origin = mount_plain_http(session, server.url)
    return Salesforce(instance_url=https_origin, session_id=session_id, session=session, version=version), session


def sobject(sf: Salesforce, name: str) -> SFType:
    """``sf.<name>`` (typed: simple-salesforce's __getattr__ also returns bulk handlers)."""
    return cast(SFType, getattr(sf, name))


def rest(sf: Salesforce, path: str, **kwargs: Any) -> Any:
    answer = sf.restful(path, **kwargs)
    assert answer is not None
    return answer


@pytest.fixture
def sf(sandbox: tuple[SalesforceSandbox, SandboxServer]) -> Iterator[Salesforce]:
    """simple-salesforce with a session from the OAuth refresh-token flow."""
    session = requests.Session()
    answer = session.post(sandbox[1].url + "/services/oauth2/token", data={
        "grant_type": "refresh_token", "refresh_token": DEMO_REFRESH_TOKEN, "client_id": DEMO_CLIENT_ID,
        "client_secret": DEMO_CLIENT_SECRET}).json()
    session.close()
    assert answer["instance_url"] == sandbox[1].url
    assert "expires_in" not in answer
    client, http = connect(sandbox[1], answer["access_token"])
    yield client
    http.close()


def test_query_query_more_and_query_all(sf: Salesforce, sandbox: tuple[SalesforceSandbox, SandboxServer]) -> None:
    """query answers the first batch, query_more follows nextRecordsUrl, query_all gathers every record."""
    sb = sandbox[0]
    lines = sb.object_ids("OpportunityLineItem")
    assert len(lines) > 200
    batch = {"Sforce-Query-Options": "batchSize=200"}
    first = sf.query("SELECT Id FROM OpportunityLineItem ORDER BY Id", headers=batch)
    assert (first["totalSize"], first["done"], len(first["records"])) == (len(lines), False, 200)
    second = sf.query_more(first["nextRecordsUrl"], identifier_is_url=True)
    assert second["records"][0]["Id"] == sorted(lines)[200]
    everything = sf.query_all("SELECT Id, Quantity FROM OpportunityLineItem", headers=batch)
    assert sorted(r["Id"] for r in everything["records"]) == sorted(lines)
    won = sf.query("SELECT Id, Amount, Account.Name FROM Opportunity WHERE IsWon = true")
    assert won["totalSize"] == sum(1 for d in sb.deals_snapshot() if d["won"])
    assert all(r["Account"]["Name"] for r in won["records"])


def test_sobject_create_update_get_upsert_delete(sf: Salesforce, sandbox: tuple[SalesforceSandbox, SandboxServer]
                                                 ) -> None:
    """SFType create returns its dict, update and delete return 204, get reads, upsert creates then updates."""
    sb = sandbox[0]
    opp = sobject(sf, "Opportunity")
    created = opp.create({"Name": "Extension de contrat", "StageName": "Prospecting", "CloseDate": "2026-12-15",
                          "AccountId": sb.object_ids("Account")[0]})
    assert created["success"] is True
    assert created["errors"] == []
    rid = created["id"]
    assert opp.update(rid, {"StageName": "Signé", "Amount": 2500}) == 204
    got = opp.get(rid)
    assert (got["IsWon"], got["Amount"], got["StageName"]) == (True, 2500, "Signé")
    assert opp.upsert("LB_Book_Id__c/EXT-42", {"Name": "Par clé externe", "StageName": "Prospecting",
                                               "CloseDate": "2027-01-31"}) == 201
    assert opp.upsert("LB_Book_Id__c/EXT-42", {"NextStep": "Relancer"}) == 200
    assert opp.get_by_custom_id("LB_Book_Id__c", "EXT-42")["NextStep"] == "Relancer"
    assert opp.delete(rid) == 204
    with pytest.raises(SalesforceResourceNotFound):
        opp.get(rid)
    deleted = sf.query_all(f"SELECT Id, IsDeleted FROM Opportunity WHERE Id = '{rid}'", include_deleted=True)
    assert deleted["records"][0]["IsDeleted"] is True
    now = dt.datetime.now(dt.UTC)
    window = opp.deleted(now - dt.timedelta(minutes=10), now + dt.timedelta(minutes=2))
    assert rid in [r["id"] for r in window["deletedRecords"]]


def test_restful_limits_describe_tooling_and_collections(sf: Salesforce,
                                                         sandbox: tuple[SalesforceSandbox, SandboxServer]) -> None:
    """restful("limits"), limits(), api_usage, describe, toolingexecute and composite/sobjects all work."""
    sb = sandbox[0]
    limits = rest(sf, "limits")
    assert {"Max", "Remaining"} <= set(limits["DailyApiRequests"])
    assert sf.limits()["DailyApiRequests"]["Max"] == limits["DailyApiRequests"]["Max"]
    usage = sf.api_usage["api-usage"]
    assert usage.total == limits["DailyApiRequests"]["Max"]
    assert usage.used == sb.api_usage()[0]
    fields = {f["name"]: f for f in sobject(sf, "Opportunity").describe()["fields"]}
    assert fields["IsWon"]["type"] == "boolean"
    assert fields["SyncedQuoteId"]["referenceTo"] == ["Quote"]
    described = sf.describe()
    assert described is not None
    assert "QuoteLineItem" in {o["name"] for o in described["sobjects"]}
    made = sf.toolingexecute("sobjects/CustomField", method="POST", data={
        "FullName": "Account.Payment_Terms__c", "Metadata": {"label": "Payment terms", "type": "Text", "length": 30}})
    assert made["success"] is True
    accounts = sb.object_ids("Account")[:2]
    results = rest(sf, "composite/sobjects", method="PATCH", json={"allOrNone": False, "records": [
        {"attributes": {"type": "Account"}, "id": accounts[0], "Payment_Terms__c": "30 jours fin de mois"},
        {"attributes": {"type": "Account"}, "id": accounts[1], "Payment_Terms__c": "x" * 31}]})
    assert [r["success"] for r in results] == [True, False]
    assert results[1]["errors"][0]["statusCode"] == "STRING_TOO_LONG"


def test_errors_are_the_sdk_exceptions(sandbox: tuple[SalesforceSandbox, SandboxServer]) -> None:
    """An expired session, bad SOQL and the daily limit raise simple-salesforce's own exceptions."""
    sb, server = sandbox
    expired, http = connect(server, "00Dxx!expired", version="59.0")
    try:
        with pytest.raises(SalesforceExpiredSession):
            expired.query("SELECT Id FROM Account")
    finally:
        http.close()
    client, http = connect(server, sb.issue_session(), version="59.0")
    try:
        with pytest.raises(SalesforceMalformedRequest) as bad:
            client.query("SELECT Id FROM Account WHERE")
        assert cast(Any, bad.value.content)[0]["errorCode"] == "MALFORMED_QUERY"
    finally:
        http.close()
    tight = SalesforceSandbox(seed=5, daily_limit=1)
    tight_server = serve(tight)
    client, http = connect(tight_server, tight.issue_session())
    try:
        assert rest(client, "limits")["DailyApiRequests"]["Remaining"] == 0
        with pytest.raises(SalesforceRefusedRequest) as refused:
            client.query("SELECT Id FROM Account")
        assert cast(Any, refused.value.content)[0]["errorCode"] == "REQUEST_LIMIT_EXCEEDED"
    finally:
        http.close()
        tight_server.stop()


def test_decimal_parsing_keeps_amounts_exact(sandbox: tuple[SalesforceSandbox, SandboxServer]) -> None:
    """With parse_float=Decimal the SDK reads amounts exactly as the sandbox stores them."""
    sb, server = sandbox
    session = requests.Session()
    client = Salesforce(instance_url=mount_plain_http(session, server.url), session_id=sb.issue_session(),
                        session=session, version="62.0", parse_float=Decimal)
    try:
        rows = client.query_all("SELECT Id, Amount FROM Opportunity WHERE Amount != null")["records"]
        assert rows
        for r in rows[:50]:
            assert Decimal(r["Amount"]) == sb.record("Opportunity", r["Id"])["Amount"]
    finally:
        session.close()
