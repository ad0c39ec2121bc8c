"""The QuickBooks sandbox's JSON against Intuit's XSDs and the recorded payloads: names, shapes, texts, formats."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.quickbooks.sandbox import QuickBooksSandbox
from connectors.xero.testing import ManualClock

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
FIXTURES = SHARED / "fixtures" / "quickbooks"
SPECS = SHARED / "specs" / "quickbooks"
XS = "{http://www.w3.org/2001/XMLSchema}"
NS = "{http://schema.intuit.com/finance/v3}"
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}[+-]\d{2}:\d{2}$")
RESPONSE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}[+-]\d{2}:\d{2}$")


@cache
def _types() -> dict[str, ET.Element]:
    types: dict[str, ET.Element] = {}
    for name in ("IntuitBaseTypes.xsd", "IntuitNamesTypes.xsd", "Finance.xsd"):
        for node in ET.parse(SPECS / name).getroot().iter(f"{XS}complexType"):
            if node.get("name"):
                types[str(node.get("name"))] = node
    return types


def xsd_elements(type_name: str) -> set[str]:
    """Element names a complexType holds, through its chain of base types."""
    names: set[str] = set()
    current: str | None = type_name
    while current:
        node = _types()[current]
        names.update(str(e.get("name")) for e in node.iter(f"{XS}element") if e.get("name"))
        ext = node.find(f".//{XS}extension")
        current = str(ext.get("base")) if ext is not None and ext.get("base") in _types() else None
    return names


def fixture(name: str) -> ET.Element:
    return ET.parse(FIXTURES / name).getroot()


def children(node: ET.Element) -> set[str]:
    return {child.tag.removeprefix(NS) for child in node}


def entity(root: ET.Element, name: str) -> ET.Element:
    found = root.find(f".//{NS}{name}")
    if found is None:
        found = root.find(f".//{name}")
    assert found is not None, name
    return found


@pytest.fixture
def sandbox() -> QuickBooksSandbox:
    return QuickBooksSandbox(clock=ManualClock(), seed=3)


@pytest.fixture
def api(sandbox: QuickBooksSandbox) -> httpx.Client:
    token = sandbox.issue_tokens()["access_token"]
    return httpx.Client(transport=sandbox.transport(),
                        base_url=f"https://quickbooks.api.intuit.com/v3/company/{sandbox.realm_id}",
                        headers={"Authorization": f"Bearer {token}"})


def make_invoice(api: httpx.Client) -> dict[str, Any]:
    customer = api.post("/customer", json={"DisplayName": "Sunset Bakery", "Notes": "x"}).json()["Customer"]
    resp = api.post("/invoice", json={
        "CustomerRef": {"value": customer["Id"]}, "DocNumber": "1001", "TxnDate": "2026-01-15",
        "PrivateNote": "Statement Memo", "CustomerMemo": {"value": "Message to Customer"},
        "Line": [{"DetailType": "SalesItemLineDetail", "Amount": 850, "Description": "Conseil",
                  "SalesItemLineDetail": {"ItemRef": {"value": "1"}, "Qty": 1, "UnitPrice": 850,
                                          "TaxCodeRef": {"value": "2"}}}]})
    assert resp.status_code == 200, resp.text
    invoice: dict[str, Any] = resp.json()["Invoice"]
    return invoice


def test_invoice_keys_are_the_recorded_element_names(api: httpx.Client) -> None:
    """The sandbox's Invoice carries the recorded invoice's elements, and only names Intuit's Invoice type has."""
    invoice = make_invoice(api)
    recorded = entity(fixture("quickbooks-ruby_fetch_invoice_by_id.xml"), "Invoice")
    recorded_names = children(recorded)
    not_simulated = {"BillAddr", "ShipAddr", "SalesTermRef"}  # addresses and terms the sandbox does not invent
    assert recorded_names - not_simulated <= set(invoice)
    allowed = xsd_elements("Invoice") | {"domain", "sparse"}
    assert set(invoice) <= allowed, set(invoice) - allowed
    line = invoice["Line"][0]
    recorded_line = children(recorded.find(f"{NS}Line"))  # type: ignore[arg-type]
    assert recorded_line <= set(line)
    assert set(line) <= xsd_elements("Line")
    detail_names = xsd_elements("SalesItemLineDetail")
    assert set(line["SalesItemLineDetail"]) <= detail_names
    recorded_detail = recorded.find(f"{NS}Line/{NS}SalesItemLineDetail")
    assert recorded_detail is not None
    assert children(recorded_detail) <= set(line["SalesItemLineDetail"])
    assert invoice["Line"][-1] == {"Amount": 850, "DetailType": "SubTotalLineDetail", "SubTotalLineDetail": {}}
    assert set(invoice["TxnTaxDetail"]) <= xsd_elements("TxnTaxDetail")
    assert set(invoice["TxnTaxDetail"]["TaxLine"][0]["TaxLineDetail"]) <= xsd_elements("TaxLineDetail")
    assert set(invoice["MetaData"]) == children(recorded.find(f"{NS}MetaData"))  # type: ignore[arg-type]


def test_customer_item_taxcode_and_payment_keys(sandbox: QuickBooksSandbox, api: httpx.Client) -> None:
    """Customer, Item, TaxCode and Payment JSON keys are element names of their XSD types and of the recordings."""
    invoice = make_invoice(api)
    customer = api.get("/customer/1").json()["Customer"]
    assert set(customer) <= xsd_elements("Customer") | {"domain", "sparse"}
    recorded_customer = children(entity(fixture("quickbooks-ruby_fetch_customer_by_id.xml"), "Customer"))
    assert {"Id", "SyncToken", "MetaData", "DisplayName", "FullyQualifiedName", "PrintOnCheckName", "Active",
            "Taxable", "Job", "BillWithParent", "Balance", "BalanceWithJobs", "PreferredDeliveryMethod"} <= (
        recorded_customer & set(customer))
    item = api.get("/item/1").json()["Item"]
    assert set(item) <= xsd_elements("Item") | {"domain", "sparse"}
    assert children(entity(fixture("quickbooks-ruby_fetch_item_by_id.xml"), "Item")) <= set(item)
    tax_code = api.get("/taxcode/2").json()["TaxCode"]
    recorded_code = fixture("quickbooks-ruby_tax_code.xml")
    assert children(recorded_code) - {"TaxGroup"} <= set(tax_code)
    detail = recorded_code.find("SalesTaxRateList/TaxRateDetail")
    assert detail is not None
    assert children(detail) == set(tax_code["SalesTaxRateList"]["TaxRateDetail"][0])
    payment = sandbox.create_payment(invoice["Id"], invoice["TotalAmt"].__class__("100.00"))
    assert set(payment) <= xsd_elements("Payment") | {"domain", "sparse"}
    recorded_payment = children(entity(fixture("quickbooks-ruby_payment_by_id.xml"), "Payment"))
    assert recorded_payment - {"PrivateNote"} <= set(payment)


def test_timestamps_have_the_recorded_format(api: httpx.Client) -> None:
    """MetaData times are seconds with an offset (no Z, no fraction) like the recordings; answer times carry ms."""
    for name in ("quickbooks-ruby_fetch_invoice_by_id.xml", "quickbooks-ruby_change_data_capture_response.xml"):
        stamps = [n.text or "" for n in fixture(name).iter(f"{NS}LastUpdatedTime")]
        assert stamps
        assert all(TIMESTAMP.match(s) for s in stamps)
    resp = api.post("/customer", json={"DisplayName": "Thrifty Meats"})
    body = resp.json()
    assert TIMESTAMP.match(body["Customer"]["MetaData"]["LastUpdatedTime"])
    assert TIMESTAMP.match(body["Customer"]["MetaData"]["CreateTime"])
    assert RESPONSE_TIME.match(body["time"])
    assert RESPONSE_TIME.match(str(fixture("quickbooks-ruby_invoices.xml").get("time")))


def test_faults_match_the_recorded_ones(sandbox: QuickBooksSandbox, api: httpx.Client) -> None:
    """6240, 5010, 4001 and the 3001 throttle Fault carry the recorded codes, types, messages and details."""
    api.post("/customer", json={"DisplayName": "Thrifty Meats"})
    dup = api.post("/customer", json={"DisplayName": "Thrifty Meats"}).json()
    constructed = json.loads((FIXTURES / "constructed" / "fault_duplicate_name_6240.json").read_text())
    assert set(dup) == set(constructed)
    assert set(dup["Fault"]) == set(constructed["Fault"])
    assert dup["Fault"]["Error"][0] == constructed["Fault"]["Error"][0]
    recorded = entity(fixture("quickbooks-ruby_customer_duplicate_error.xml"), "Fault")
    error = recorded.find(f"{NS}Error")
    assert error is not None
    assert (recorded.get("type"), error.get("code"), error.findtext(f"{NS}Message")) == (
        dup["Fault"]["type"], dup["Fault"]["Error"][0]["code"], dup["Fault"]["Error"][0]["Message"])
    stale = api.post("/customer", json={"Id": "1", "SyncToken": "7", "sparse": True, "Notes": "n"}).json()
    expected = json.loads((FIXTURES / "constructed" / "fault_stale_object_5010.json").read_text())
    assert stale["Fault"]["Error"][0] == expected["Fault"]["Error"][0]
    invalid = api.post("/query", content=b"SELECT * FROM Customer STARTPOSITION 0",
                       headers={"Content-Type": "application/text"}).json()
    recorded_invalid = entity(fixture("quickbooks-ruby_query_validation_error.xml"), "Error")
    assert invalid["Fault"]["Error"][0]["code"] == recorded_invalid.get("code")
    assert invalid["Fault"]["Error"][0]["Message"] == recorded_invalid.findtext(f"{NS}Message")
    assert invalid["Fault"]["Error"][0]["Detail"] == recorded_invalid.findtext(f"{NS}Detail")
    throttle = sandbox._throttled()
    body = json.loads(throttle.body)
    recorded_throttle = entity(fixture("quickbooks-ruby_too_many_requests_error.xml"), "Fault")
    throttle_error = recorded_throttle.find(f"{NS}Error")
    assert throttle_error is not None
    assert throttle.status == 429
    assert (body["Fault"]["type"], body["Fault"]["Error"][0]["code"], body["Fault"]["Error"][0]["Message"],
            body["Fault"]["Error"][0]["Detail"]) == (
        recorded_throttle.get("type"), throttle_error.get("code"), throttle_error.findtext(f"{NS}Message"),
        throttle_error.findtext(f"{NS}Detail"))


def test_void_delete_and_cdc_shapes(api: httpx.Client) -> None:
    """Void answers PrivateNote "Voided", delete answers status="Deleted", CDC shows the deleted as recorded."""
    invoice = make_invoice(api)
    voided = api.post("/invoice", params={"operation": "void"},
                      json={"Id": invoice["Id"], "SyncToken": invoice["SyncToken"]}).json()["Invoice"]
    recorded_void = entity(fixture("quickbooks-ruby_invoice_void_success_response.xml"), "Invoice")
    assert voided["PrivateNote"] == recorded_void.findtext(f"{NS}PrivateNote") == "Voided"
    second = make_invoice_for(api, "1002")
    deleted = api.post("/invoice", params={"operation": "delete"},
                       json={"Id": second["Id"], "SyncToken": second["SyncToken"]}).json()["Invoice"]
    recorded_delete = entity(fixture("quickbooks-ruby_invoice_delete_success_response.xml"), "Invoice")
    assert deleted == {"domain": recorded_delete.get("domain"), "status": recorded_delete.get("status"),
                       "Id": second["Id"]}
    cdc = api.get("/cdc", params={"entities": "Invoice,Payment", "changedSince": "2025-12-31T00:00:00+00:00"}).json()
    blocks = cdc["CDCResponse"][0]["QueryResponse"]
    gone = [i for i in blocks[0]["Invoice"] if i.get("status") == "Deleted"]
    recorded_cdc = fixture("quickbooks-ruby_change_data_capture_response.xml")
    recorded_gone = [i for i in recorded_cdc.iter(f"{NS}Invoice") if i.get("status") == "Deleted"]
    assert set(gone[0]) == {"domain", "status", *children(recorded_gone[0])}
    assert blocks[1] == {}  # no payment changed: an empty QueryResponse, as recorded
    assert any(not list(q) for q in recorded_cdc.iter(f"{NS}QueryResponse"))


def make_invoice_for(api: httpx.Client, doc: str) -> dict[str, Any]:
    resp = api.post("/invoice", json={
        "CustomerRef": {"value": "1"}, "DocNumber": doc,
        "Line": [{"DetailType": "SalesItemLineDetail", "Amount": 18.5,
                  "SalesItemLineDetail": {"ItemRef": {"value": "11"}, "Qty": 1, "TaxCodeRef": {"value": "3"}}}]})
    assert resp.status_code == 200, resp.text
    invoice: dict[str, Any] = resp.json()["Invoice"]
    return invoice


def test_query_response_and_oauth_documents_match_the_recordings(api: httpx.Client,
                                                                sandbox: QuickBooksSandbox) -> None:
    """QueryResponse attributes, the token answer and the discovery document have the recorded keys."""
    make_invoice(api)
    response = api.get("/query", params={"query": "SELECT * FROM Invoice"}).json()["QueryResponse"]
    recorded = entity(fixture("quickbooks-ruby_payment_by_id.xml"), "QueryResponse")
    assert set(recorded.attrib) <= set(response)
    token = json.loads((FIXTURES / "intuit-dotnet-sdk_success_refreshtoken_response.json").read_text())
    assert set(sandbox.issue_tokens()) == set(token) - {"_note", "id_token"}
    discovery = json.loads((FIXTURES / "intuit-dotnet-sdk_discovery.json").read_text())
    served = httpx.Client(transport=sandbox.transport(), base_url="http://sandbox").get(
        "/.well-known/openid_sandbox_configuration/").json()
    assert set(served) == set(discovery)
    assert served["issuer"] == discovery["issuer"]
