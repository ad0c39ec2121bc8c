"""The QuickBooks Online sandbox on its own: queries, requestid, names, numbers, tax, limits, CDC, OAuth, state."""

from __future__ import annotations

import base64
import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.domain import round_money
from connectors.quickbooks.query import QueryError, parse
from connectors.quickbooks.sandbox import (
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
    QuickBooksSandbox,
    exchange_rate,
    sandbox_settings,
)
from connectors.xero.testing import ManualClock

BASE = "https://quickbooks.api.intuit.com"


class Api:
    """A bare client of one sandbox company: bearer token, realm path, minorversion."""

    def __init__(self, sandbox: QuickBooksSandbox) -> None:
        self.sandbox = sandbox
        token = sandbox.issue_tokens()["access_token"]
        self.http = httpx.Client(transport=sandbox.transport(), base_url=f"{BASE}/v3/company/{sandbox.realm_id}",
                                 headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})

    def post(self, entity: str, body: dict[str, Any], **params: str) -> httpx.Response:
        return self.http.post(f"/{entity}", json=body, params={"minorversion": "75", **params})

    def query(self, statement: str, *, method: str = "POST") -> httpx.Response:
        if method == "GET":
            return self.http.get("/query", params={"query": statement, "minorversion": "75"})
        return self.http.post("/query", content=statement.encode(), headers={"Content-Type": "application/text"})

    def rows(self, statement: str) -> dict[str, Any]:
        resp = self.query(statement)
        assert resp.status_code == 200, resp.text
        response: dict[str, Any] = resp.json()["QueryResponse"]
        return response


def fault(resp: httpx.Response) -> tuple[str, str]:
    body = resp.json()["Fault"]
    return body["type"], body["Error"][0]["code"]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def sandbox(clock: ManualClock) -> QuickBooksSandbox:
    return QuickBooksSandbox(clock=clock, seed=5)


@pytest.fixture
def api(sandbox: QuickBooksSandbox) -> Api:
    return Api(sandbox)


def customer(api: Api, name: str, currency: str = "EUR") -> str:
    resp = api.post("customer", {"DisplayName": name, "CurrencyRef": {"value": currency}})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["Customer"]["Id"])


def invoice_body(customer_id: str, *, doc: str | None = None, currency: str = "EUR") -> dict[str, Any]:
    body: dict[str, Any] = {
        "CustomerRef": {"value": customer_id}, "CurrencyRef": {"value": currency}, "TxnDate": "2026-01-10",
        "Line": [
            {"DetailType": "SalesItemLineDetail", "Amount": "2125.00", "Description": "Conseil",
             "SalesItemLineDetail": {"ItemRef": {"value": "1"}, "Qty": "2.5", "UnitPrice": "850.00",
                                     "TaxCodeRef": {"value": "2"}}},
            {"DetailType": "SalesItemLineDetail", "Amount": "89.25", "Description": "Guide",
             "SalesItemLineDetail": {"ItemRef": {"value": "14"}, "Qty": "3", "UnitPrice": "34.00",
                                     "DiscountRate": "12.5", "TaxCodeRef": {"value": "4"}}},
        ],
    }
    if doc is not None:
        body["DocNumber"] = doc
    return body


def test_query_parser_reads_the_quickbooks_subset() -> None:
    """SELECT with IN, LIKE, comparisons, escaped quotes, ORDERBY/ORDER BY, paging; OR and bad bounds refused."""
    sel = parse("select * from Invoice where DocNumber in ('A', 'B\\'s') and TotalAmt > 10.5 "
                "AND MetaData.LastUpdatedTime >= '2026-01-01T00:00:00+01:00' ORDERBY TxnDate DESC, Id "
                "STARTPOSITION 11 MAXRESULTS 10")
    assert sel.entity == "Invoice"
    assert [(c.field, c.op) for c in sel.where] == [("DocNumber", "IN"), ("TotalAmt", ">"),
                                                   ("MetaData.LastUpdatedTime", ">=")]
    assert sel.where[0].values == ("A", "B's")
    assert sel.order == [("TxnDate", True), ("Id", False)]
    assert (sel.start, sel.max_results) == (11, 10)
    assert parse("SELECT *, Sku FROM Item ORDER BY Name").order == [("Name", False)]
    assert parse("SELECT COUNT(*) FROM Customer WHERE DisplayName LIKE 'Dup%'").count
    with pytest.raises(QueryError):
        parse("SELECT * FROM Customer WHERE DisplayName = 'a' OR DisplayName = 'b'")
    with pytest.raises(QueryError) as err:
        parse("SELECT * FROM Customer STARTPOSITION 0")
    assert err.value.code == "4001"
    with pytest.raises(QueryError):
        parse("SELECT * FROM Customer MAXRESULTS 1001")


def test_query_paging_filters_and_empty_answer(api: Api) -> None:
    """STARTPOSITION is 1-based, MAXRESULTS pages, GET and POST agree, COUNT counts, no match gives QueryResponse {}."""
    for i in range(7):
        customer(api, f"Client {i:02d}")
    first = api.rows("SELECT * FROM Customer ORDERBY DisplayName STARTPOSITION 1 MAXRESULTS 3")
    assert [c["DisplayName"] for c in first["Customer"]] == ["Client 00", "Client 01", "Client 02"]
    assert (first["startPosition"], first["maxResults"]) == (1, 3)
    last = api.rows("SELECT * FROM Customer ORDERBY DisplayName STARTPOSITION 7 MAXRESULTS 3")
    assert [c["DisplayName"] for c in last["Customer"]] == ["Client 06"]
    assert api.rows("SELECT * FROM Customer STARTPOSITION 8 MAXRESULTS 3") == {}
    assert api.rows("SELECT * FROM Customer WHERE DisplayName = 'nobody'") == {}
    got = api.query("SELECT * FROM Customer WHERE DisplayName IN ('Client 01', 'client 05')", method="GET")
    assert sorted(c["DisplayName"] for c in got.json()["QueryResponse"]["Customer"]) == ["Client 01", "Client 05"]
    assert api.rows("SELECT COUNT(*) FROM Customer WHERE DisplayName LIKE 'Client 0%'") == {"totalCount": 7}
    assert len(api.rows("SELECT * FROM Customer WHERE Id > '4'")["Customer"]) == 3
    items = api.rows("SELECT *, Sku FROM Item WHERE Sku = 'BOOK-GUIDE'")["Item"]
    assert items[0]["Name"] == "BOOK-GUIDE"
    assert items[0]["IncomeAccountRef"]["name"] == "Ventes de marchandises"


def test_query_refuses_what_quickbooks_cannot_filter(api: Api) -> None:
    """PrivateNote and Notes are not queryable (4001), a bad statement is 4000, both as ValidationFaults."""
    refused = api.query("SELECT * FROM Invoice WHERE PrivateNote = 'x'")
    assert refused.status_code == 400
    assert fault(refused) == ("ValidationFault", "4001")
    assert "PrivateNote" in refused.json()["Fault"]["Error"][0]["Detail"]
    assert fault(api.query("SELECT * FROM Customer WHERE Notes LIKE '%x%'")) == ("ValidationFault", "4001")
    assert fault(api.query("SELEKT * FROM Customer")) == ("ValidationFault", "4000")
    assert fault(api.query("SELECT * FROM Nothing")) == ("ValidationFault", "4000")


def test_requestid_replays_the_first_answer_without_applying_again(sandbox: QuickBooksSandbox, api: Api) -> None:
    """The same requestid returns the original Customer (same Id) and creates nothing more, even with a new body."""
    first = api.post("customer", {"DisplayName": "Boulangerie Martin"}, requestid="4957")
    again = api.post("customer", {"DisplayName": "Boulangerie Martin"}, requestid="4957")
    other = api.post("customer", {"DisplayName": "Something else"}, requestid="4957")
    assert first.status_code == again.status_code == other.status_code == 200
    assert first.json()["Customer"]["Id"] == again.json()["Customer"]["Id"] == other.json()["Customer"]["Id"]
    assert len(sandbox.customers()) == 1
    assert sandbox.requestid_replays == 2
    assert sandbox.requestid_conflicts == 1
    assert api.post("customer", {"DisplayName": "X"}, requestid="r" * 51).status_code == 400


def test_display_names_are_unique_across_customers_vendors_and_employees(sandbox: QuickBooksSandbox,
                                                                         api: Api) -> None:
    """6240 for a name held by a customer (any case), a vendor or an employee; free once the holder is inactive."""
    cid = customer(api, "Garage Petit")
    for name in ("garage petit", "Fournitures de Bureau Martin", "Camille Durand"):
        resp = api.post("customer", {"DisplayName": name})
        assert resp.status_code == 400
        assert fault(resp) == ("ValidationFault", "6240")
    sandbox.add_vendor("Imprimerie Roux")
    assert fault(api.post("customer", {"DisplayName": "Imprimerie Roux"}))[1] == "6240"
    current = api.http.get(f"/customer/{cid}").json()["Customer"]
    gone = api.post("customer", {"Id": cid, "SyncToken": current["SyncToken"], "sparse": True, "Active": False})
    assert gone.json()["Customer"]["DisplayName"] == "Garage Petit (deleted)"
    assert api.post("customer", {"DisplayName": "Garage Petit"}).status_code == 200
    assert api.rows("SELECT COUNT(*) FROM Customer") == {"totalCount": 1}
    assert api.rows("SELECT COUNT(*) FROM Customer WHERE Active IN (true, false)") == {"totalCount": 2}


def test_invoice_tax_is_computed_per_line_and_rounded(sandbox: QuickBooksSandbox, api: Api) -> None:
    """Line amounts, per-line VAT from TaxCode -> TaxRate, TxnTaxDetail, TotalAmt, Balance and the admin view."""
    resp = api.post("invoice", invoice_body(customer(api, "Librairie Roux"), doc="LB-acme:D1"))
    assert resp.status_code == 200, resp.text
    inv = resp.json()["Invoice"]
    assert inv["TotalAmt"] == 2644.16
    assert inv["Balance"] == 2644.16
    assert inv["TxnTaxDetail"]["TotalTax"] == 429.91  # 425.00 + 4.91 (89.25 x 5.5 % = 4.90875)
    assert {t["TaxLineDetail"]["TaxRateRef"]["value"]: t["Amount"] for t in inv["TxnTaxDetail"]["TaxLine"]} == {
        "3": 425.0, "5": 4.91}
    assert [ln["DetailType"] for ln in inv["Line"]] == ["SalesItemLineDetail", "SalesItemLineDetail",
                                                       "SubTotalLineDetail"]
    assert inv["Line"][2]["Amount"] == 2214.25
    assert inv["Line"][1]["SalesItemLineDetail"]["DiscountRate"] == 12.5
    assert inv["Line"][1]["SalesItemLineDetail"]["ItemRef"] == {"value": "14", "name": "BOOK-GUIDE"}
    assert inv["CurrencyRef"] == {"value": "EUR", "name": "Euro"}
    assert inv["MetaData"]["LastUpdatedTime"] == "2026-01-01T01:00:00+01:00"
    view = sandbox.invoices()[0]
    assert (view["Reference"], view["SubTotal"], view["Total"], view["CurrencyCode"], view["Status"]) == (
        "LB-acme:D1", Decimal("2214.25"), Decimal("2644.16"), "EUR", "AUTHORISED")


def test_invoice_validation_faults(api: Api) -> None:
    """Unknown tax code or item (2500), missing VAT code, wrong amount, other currency than the customer's (6000)."""
    cid = customer(api, "Hôtel Bernard")
    bad_tax = invoice_body(cid)
    bad_tax["Line"][0]["SalesItemLineDetail"]["TaxCodeRef"] = {"value": "99"}
    assert fault(api.post("invoice", bad_tax)) == ("ValidationFault", "2500")
    bad_item = invoice_body(cid)
    bad_item["Line"][0]["SalesItemLineDetail"]["ItemRef"] = {"value": "999"}
    assert fault(api.post("invoice", bad_item))[1] == "2500"
    no_tax = invoice_body(cid)
    del no_tax["Line"][0]["SalesItemLineDetail"]["TaxCodeRef"]
    assert fault(api.post("invoice", no_tax))[1] == "6000"
    wrong_amount = invoice_body(cid)
    wrong_amount["Line"][0]["Amount"] = "2000.00"
    assert fault(api.post("invoice", wrong_amount))[1] == "6000"
    assert fault(api.post("invoice", invoice_body(cid, currency="USD")))[1] == "6000"
    assert fault(api.post("invoice", invoice_body(cid, doc="X" * 22)))[1] == "2050"
    usd = customer(api, "Walker Labs", currency="USD")
    ok = api.post("invoice", invoice_body(usd, currency="USD")).json()["Invoice"]
    rate = exchange_rate("USD", dt.date.fromisoformat(ok["TxnDate"]))
    assert Decimal(str(ok["ExchangeRate"])) == rate
    assert Decimal(str(ok["HomeTotalAmt"])) == round_money(Decimal("2644.16") * rate, "EUR")


def test_doc_numbers_are_unique_unless_allowed(clock: ManualClock) -> None:
    """A DocNumber in use is Fault 6140 naming the holder; auto numbers follow 1001; the option allows duplicates."""
    strict = Api(QuickBooksSandbox(clock=clock))
    cid = customer(strict, "Atelier Faure")
    assert strict.post("invoice", invoice_body(cid, doc="A-1")).status_code == 200
    dup = strict.post("invoice", invoice_body(cid, doc="A-1"))
    assert fault(dup) == ("ValidationFault", "6140")
    assert "TxnId=1" in dup.json()["Fault"]["Error"][0]["Detail"]
    assert strict.post("invoice", invoice_body(cid)).json()["Invoice"]["DocNumber"] == "1001"
    lenient = Api(QuickBooksSandbox(clock=clock, allow_duplicate_doc_numbers=True))
    cid = customer(lenient, "Atelier Faure")
    assert [lenient.post("invoice", invoice_body(cid, doc="A-1")).status_code for _ in range(2)] == [200, 200]


def test_sync_token_guards_updates_and_void(sandbox: QuickBooksSandbox, api: Api) -> None:
    """Updates need the current SyncToken (5010 otherwise); each change increments it; void keeps the invoice."""
    inv = api.post("invoice", invoice_body(customer(api, "Menuiserie Blanc"))).json()["Invoice"]
    assert inv["SyncToken"] == "0"
    sparse = api.post("invoice", {"Id": inv["Id"], "SyncToken": "0", "sparse": True, "DueDate": "2026-03-01"})
    assert sparse.json()["Invoice"]["SyncToken"] == "1"
    assert sparse.json()["Invoice"]["TotalAmt"] == 2644.16
    stale = api.post("invoice", {"Id": inv["Id"], "SyncToken": "0", "sparse": True, "DueDate": "2026-04-01"})
    assert fault(stale) == ("ValidationFault", "5010")
    assert fault(api.post("invoice", {"Id": inv["Id"], "SyncToken": "0"}, operation="void"))[1] == "5010"
    voided = api.post("invoice", {"Id": inv["Id"], "SyncToken": "1"}, operation="void").json()["Invoice"]
    assert (voided["PrivateNote"], voided["Balance"], voided["SyncToken"]) == ("Voided", 0, "2")
    assert sandbox.invoices()[0]["Status"] == "VOIDED"


def test_payment_reduces_the_balance(sandbox: QuickBooksSandbox, api: Api) -> None:
    """A Payment whose line links the invoice lowers Balance; more than the balance is refused."""
    cid = customer(api, "Cabinet Garnier")
    inv = api.post("invoice", invoice_body(cid)).json()["Invoice"]
    link = [{"TxnId": inv["Id"], "TxnType": "Invoice"}]
    paid = api.post("payment", {"CustomerRef": {"value": cid}, "TotalAmt": "1000.00",
                                "Line": [{"Amount": "1000.00", "LinkedTxn": link}]})
    assert paid.status_code == 200, paid.text
    assert paid.json()["Payment"]["Line"][0]["LinkedTxn"] == link
    assert api.http.get(f"/invoice/{inv['Id']}").json()["Invoice"]["Balance"] == 1644.16
    too_much = api.post("payment", {"CustomerRef": {"value": cid}, "TotalAmt": "2000",
                                    "Line": [{"Amount": "2000", "LinkedTxn": link}]})
    assert fault(too_much)[1] == "6000"
    sandbox.create_payment(inv["Id"], Decimal("1644.16"))
    assert sandbox.invoices()[0]["Status"] == "PAID"


def test_throttle_is_a_service_fault_3001(clock: ManualClock) -> None:
    """Past the minute allowance: 429 Fault SERVICE 3001 ThrottleExceeded (403 with the older answer)."""
    for status in (429, 403):
        sandbox = QuickBooksSandbox(clock=clock, requests_per_minute=3, throttle_status=status)
        api = Api(sandbox)
        answers = [api.query("SELECT * FROM TaxCode") for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, status]
        assert fault(answers[3]) == ("SERVICE", "3001")
        assert "ThrottleExceeded" in answers[3].json()["Fault"]["Error"][0]["Message"]
        assert "Retry-After" not in answers[3].headers
        clock.advance(61)
        assert api.query("SELECT * FROM TaxCode").status_code == 200


def test_cdc_returns_changes_and_deletions_up_to_its_cap(clock: ManualClock) -> None:
    """Changed objects since a time, deleted ones as status Deleted; at most cdc_max_objects, oldest first."""
    sandbox = QuickBooksSandbox(clock=clock, requests_per_minute=100_000)
    api = Api(sandbox)
    cid = customer(api, "Studio Lambert")
    since = dt.datetime.fromtimestamp(clock.now(), tz=dt.UTC)
    clock.advance(5)
    first = api.post("invoice", invoice_body(cid)).json()["Invoice"]
    clock.advance(5)
    api.post("invoice", {"Id": first["Id"], "SyncToken": "0"}, operation="delete")
    for i in range(1002):
        clock.advance(1)
        customer(api, f"Client {i:04d}")
    resp = api.http.get("/cdc", params={"entities": "Invoice,Customer", "changedSince": since.isoformat()})
    assert resp.status_code == 200, resp.text
    blocks = resp.json()["CDCResponse"][0]["QueryResponse"]
    invoices, customers = blocks[0]["Invoice"], blocks[1]["Customer"]
    assert invoices == [{"domain": "QBO", "status": "Deleted", "Id": first["Id"],
                         "MetaData": {"LastUpdatedTime": invoices[0]["MetaData"]["LastUpdatedTime"]}}]
    assert len(invoices) + len(customers) == 1000  # the cap: the oldest changes first
    assert customers[0]["DisplayName"] == "Studio Lambert"
    assert customers[-1]["DisplayName"] == "Client 0997"
    recent = dt.datetime.fromtimestamp(clock.now() - 1, tz=dt.UTC).isoformat()
    tail = api.http.get("/cdc", params={"entities": "Invoice,Customer", "changedSince": recent}).json()
    assert tail["CDCResponse"][0]["QueryResponse"][0] == {}
    assert [c["DisplayName"] for c in tail["CDCResponse"][0]["QueryResponse"][1]["Customer"]] == [
        "Client 1000", "Client 1001"]
    old = (dt.datetime.fromtimestamp(clock.now(), tz=dt.UTC) - dt.timedelta(days=31)).isoformat()
    assert api.http.get("/cdc", params={"entities": "Invoice", "changedSince": old}).status_code == 400


def test_token_endpoint_rotates_and_discovery_points_at_the_sandbox(sandbox: QuickBooksSandbox) -> None:
    """Discovery names the sandbox's token endpoint; a refresh rotates the token, the old one is then refused."""
    http = httpx.Client(transport=sandbox.transport(), base_url="http://127.0.0.1:9")
    doc = http.get("/.well-known/openid_configuration").json()
    assert doc["token_endpoint"] == "http://127.0.0.1:9/oauth2/v1/tokens/bearer"
    first = sandbox.issue_tokens()["refresh_token"]
    basic = base64.b64encode(f"{DEMO_CLIENT_ID}:{DEMO_CLIENT_SECRET}".encode()).decode()
    answer = http.post("/oauth2/v1/tokens/bearer", data={"grant_type": "refresh_token", "refresh_token": first},
                       headers={"Authorization": f"Basic {basic}"})
    assert answer.status_code == 200
    payload = answer.json()
    assert set(payload) == {"token_type", "expires_in", "refresh_token", "x_refresh_token_expires_in", "access_token"}
    assert payload["expires_in"] == 3600
    assert payload["refresh_token"] != first
    reused = http.post("/oauth2/v1/tokens/bearer", data={"grant_type": "refresh_token", "refresh_token": first},
                       headers={"Authorization": f"Basic {basic}"})
    assert reused.json() == {"error": "invalid_grant"}
    wrong = http.post("/oauth2/v1/tokens/bearer", data={"grant_type": "refresh_token", "refresh_token": "x"},
                      headers={"Authorization": "Basic " + base64.b64encode(b"a:b").decode()})
    assert wrong.status_code == 401


def test_access_tokens_expire_and_belong_to_one_realm(sandbox: QuickBooksSandbox, clock: ManualClock) -> None:
    """An expired token is 401 AuthenticationFault 3200; another realm in the path is 403."""
    api = Api(sandbox)
    other = api.http.post(f"{BASE}/v3/company/123/query", content=b"SELECT * FROM Item",
                          headers={"Content-Type": "application/text"})
    assert other.status_code == 403
    clock.advance(3601)
    expired = api.query("SELECT * FROM Item")
    assert expired.status_code == 401
    assert fault(expired) == ("AuthenticationFault", "3200")


def test_state_survives_save_and_load(sandbox: QuickBooksSandbox, api: Api, tmp_path: Path,
                                      clock: ManualClock) -> None:
    """save() then load() into a fresh sandbox keeps customers, invoices, numbering and replays."""
    cid = customer(api, "Verrerie Morel")
    api.post("invoice", invoice_body(cid), requestid="inv-1")
    sandbox.save(tmp_path / "qbo.bin")
    restored = QuickBooksSandbox(clock=clock, seed=5)
    assert restored.load(tmp_path / "qbo.bin")
    assert [c["DisplayName"] for c in restored.customers()] == ["Verrerie Morel"]
    again = Api(restored)
    assert again.post("invoice", invoice_body(cid), requestid="inv-1").json()["Invoice"]["Id"] == "1"
    assert again.post("invoice", invoice_body(cid)).json()["Invoice"]["DocNumber"] == "1002"
    assert len(restored.invoices()) == 2


def test_admin_endpoints(sandbox: QuickBooksSandbox, api: Api) -> None:
    """/_sandbox/invoices has the Xero sandbox's keys; /_sandbox/authorize issues tokens; stats count."""
    api.post("invoice", invoice_body(customer(api, "Ferme Girard"), doc="LB-x:1"))
    http = httpx.Client(transport=sandbox.transport(), base_url="http://sandbox")
    listed = http.get("/_sandbox/invoices").json()
    assert {"Reference", "SubTotal", "Total", "CurrencyCode", "Status", "InvoiceID", "InvoiceNumber"} <= set(listed[0])
    assert (listed[0]["Reference"], listed[0]["Total"], listed[0]["Status"]) == ("LB-x:1", "2644.16", "AUTHORISED")
    assert "refresh_token" in http.post("/_sandbox/authorize").json()
    stats = http.get("/_sandbox/stats").json()
    assert stats["invoices"] == 1
    assert stats["customers"] == 1
    settings = sandbox_settings("http://127.0.0.1:1234", time_scale=60.0)
    assert settings["token_url"] == "http://127.0.0.1:1234/oauth2/v1/tokens/bearer"
    assert settings["realm_id"] == sandbox.realm_id
