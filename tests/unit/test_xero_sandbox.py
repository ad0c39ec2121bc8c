"""The Xero sandbox: envelope, paging, filters, tax rounding, validation, idempotency, limits and auth."""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.domain import Invoice, InvoiceLine
from connectors.sandboxkit import FaultPlan
from connectors.seedbook import PRODUCTS
from connectors.xero import wire
from connectors.xero.sandbox import EMPTY_ID, XeroSandbox
from connectors.xero.testing import ManualClock

API = "https://api.xero.com/api.xro/2.0"


class Api:
    """A bare client for the sandbox with a valid token and the tenant header."""

    def __init__(self, sandbox: XeroSandbox, tenant: str | None = None) -> None:
        self.sandbox = sandbox
        token = sandbox.issue_tokens()["access_token"]
        self.headers = {"Authorization": f"Bearer {token}", "xero-tenant-id": tenant or sandbox.tenant_id,
                        "Accept": "application/json"}
        self.http = httpx.Client(transport=sandbox.transport(), base_url=API)

    def get(self, path: str, headers: dict[str, str] | None = None, **params: Any) -> httpx.Response:
        return self.http.get(path, params=params, headers={**self.headers, **(headers or {})})

    def put(self, path: str, body: Any, key: str | None = None, **params: Any) -> httpx.Response:
        headers = {**self.headers, "Content-Type": "application/json"}
        if key:
            headers["Idempotency-Key"] = key
        return self.http.put(path, params=params, content=wire.dumps(body), headers=headers)

    def post(self, path: str, body: Any, **params: Any) -> httpx.Response:
        return self.http.post(path, params=params, content=wire.dumps(body),
                              headers={**self.headers, "Content-Type": "application/json"})


def data(resp: httpx.Response) -> Any:
    return wire.loads(resp.content)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def sandbox(clock: ManualClock) -> XeroSandbox:
    # Long-lived access tokens: these tests move the clock by hours; token expiry has its own test.
    return XeroSandbox(clock=clock, seed=3, access_token_ttl_s=10 * 86400)


@pytest.fixture
def api(sandbox: XeroSandbox) -> Api:
    return Api(sandbox)


def new_contact(api: Api, name: str = "Dupont SARL", number: str | None = None) -> str:
    body: dict[str, Any] = {"Name": name}
    if number:
        body["ContactNumber"] = number
    resp = api.put("/Contacts", {"Contacts": [body]})
    assert resp.status_code == 200, resp.text
    return str(data(resp)["Contacts"][0]["ContactID"])


def invoice(contact_id: str, ref: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "Type": "ACCREC", "Contact": {"ContactID": contact_id}, "Date": "2026-01-15", "DueDate": "2026-02-14",
        "Reference": ref, "Status": "AUTHORISED", "LineAmountTypes": "Exclusive", "CurrencyCode": "EUR",
        "LineItems": [{"Description": "Conseil", "Quantity": Decimal("2"), "UnitAmount": Decimal("850.00"),
                       "AccountCode": "706", "TaxType": "TAX001"}],
    }
    body.update(extra)
    return body


def test_organisation_is_seeded_from_the_book_catalogue(api: Api) -> None:
    """Items are the seeded book's products; taxes, accounts and currencies match the demo config; not paged."""
    items = data(api.get("/Items"))
    assert "pagination" not in items
    assert [i["Code"] for i in items["Items"]] == [p.sku for p in PRODUCTS]
    assert items["Items"][0]["SalesDetails"]["UnitPrice"] == PRODUCTS[0].unit_price
    rates = {r["TaxType"]: r["EffectiveRate"] for r in data(api.get("/TaxRates"))["TaxRates"]}
    assert rates == {"TAX001": 20, "TAX002": 10, "TAX003": Decimal("5.5"), "TAX004": Decimal("2.1"), "NONE": 0}
    accounts = {a["Code"]: a["Type"] for a in data(api.get("/Accounts"))["Accounts"]}
    assert accounts["706"] == accounts["707"] == "REVENUE"
    assert accounts["512"] == "BANK"
    assert "411" in accounts
    assert [c["Code"] for c in data(api.get("/Currencies"))["Currencies"]] == ["EUR", "USD"]


def test_envelope_and_ms_json_dates(api: Api, clock: ManualClock) -> None:
    """Responses carry Id/Status/ProviderName/DateTimeUTC and MS-JSON dates with escaped slashes."""
    cid = new_contact(api)
    resp = api.put("/Invoices", {"Invoices": [invoice(cid, "LB-1")]})
    assert "\\/Date(" in resp.text
    body = data(resp)
    assert body["Status"] == "OK"
    assert body["ProviderName"]
    assert re.fullmatch(r"[0-9a-f-]{36}", body["Id"])
    assert re.fullmatch(r"/Date\(\d+\)/", body["DateTimeUTC"])
    inv = body["Invoices"][0]
    assert inv["Date"] == "/Date(1768435200000+0000)/"
    assert inv["DateString"] == "2026-01-15T00:00:00"
    assert inv["DueDate"] == wire.ms_date(wire.parse_date("2026-02-14"))  # type: ignore[arg-type]
    assert wire.parse_datetime(inv["UpdatedDateUTC"]).timestamp() == pytest.approx(clock.now(), abs=0.001)  # type: ignore[union-attr]
    assert inv["StatusAttributeString"] == "OK"
    assert inv["HasErrors"] is False


def test_pagination_page_size_and_snake_case(api: Api) -> None:
    """page/pageSize (or page_size) page with a pagination block; no page returns everything unpaged."""
    api.put("/Contacts", {"Contacts": [{"Name": f"Client {i}", "ContactNumber": f"C{i}"} for i in range(7)]})
    page2 = data(api.get("/Contacts", page=2, pageSize=3, order="Name ASC"))
    assert page2["pagination"] == {"page": 2, "pageSize": 3, "pageCount": 3, "itemCount": 7}
    assert [c["Name"] for c in page2["Contacts"]] == ["Client 3", "Client 4", "Client 5"]
    snake = data(api.get("/Contacts", page=1, page_size=5))
    assert snake["pagination"]["pageSize"] == 5
    assert len(snake["Contacts"]) == 5
    assert data(api.get("/Contacts", page=1, pageSize=5000))["pagination"]["pageSize"] == 1000
    everything = data(api.get("/Contacts"))
    assert "pagination" not in everything
    assert len(everything["Contacts"]) == 7


def test_invoice_lines_only_when_paged_or_by_id(api: Api) -> None:
    """The invoice list omits line items unless ``page`` is given; GET by id always has them."""
    cid = new_contact(api)
    inv_id = data(api.put("/Invoices", {"Invoices": [invoice(cid, "LB-1")]}))["Invoices"][0]["InvoiceID"]
    assert "LineItems" not in data(api.get("/Invoices"))["Invoices"][0]
    assert len(data(api.get("/Invoices", page=1))["Invoices"][0]["LineItems"]) == 1
    assert len(data(api.get(f"/Invoices/{inv_id}"))["Invoices"][0]["LineItems"]) == 1


def test_if_modified_since_where_order_and_id_filters(api: Api, clock: ManualClock) -> None:
    """If-Modified-Since, where (OR/AND, Guid), Statuses, IDs, InvoiceNumbers and order select invoices."""
    a = new_contact(api, "Alpha")
    b = new_contact(api, "Beta")
    first = data(api.put("/Invoices", {"Invoices": [invoice(a, "LB-1"), invoice(b, "LB-2", Status="DRAFT")]}))
    clock.advance(3600)
    since = wire.parse_datetime(wire.ms_datetime(clock.now()))
    later = data(api.put("/Invoices", {"Invoices": [invoice(a, "LB-3")]}))["Invoices"][0]
    changed = data(api.get("/Invoices", headers={"If-Modified-Since": since.isoformat()}))  # type: ignore[union-attr]
    assert [i["Reference"] for i in changed["Invoices"]] == ["LB-3"]
    where = data(api.get("/Invoices", where='Reference=="LB-1" OR Reference=="LB-3"', order="InvoiceNumber DESC"))
    assert [i["Reference"] for i in where["Invoices"]] == ["LB-3", "LB-1"]
    by_contact = data(api.get("/Invoices", where=f'Type=="ACCREC" AND Contact.ContactID==Guid("{b.upper()}")'))
    assert [i["Reference"] for i in by_contact["Invoices"]] == ["LB-2"]
    assert [i["Reference"] for i in data(api.get("/Invoices", Statuses="DRAFT"))["Invoices"]] == ["LB-2"]
    assert [i["Reference"] for i in data(api.get("/Invoices", IDs=later["InvoiceID"]))["Invoices"]] == ["LB-3"]
    number = first["Invoices"][1]["InvoiceNumber"]
    assert [i["Reference"] for i in data(api.get("/Invoices", InvoiceNumbers=number))["Invoices"]] == ["LB-2"]
    bad = api.get("/Invoices", where='Reference=="unterminated')
    assert bad.status_code == 400
    assert data(bad)["Type"] == "QueryParseException"


def test_tax_is_rounded_per_line_then_summed(api: Api) -> None:
    """Line amounts and line taxes are each rounded to the cent before the totals are summed."""
    cid = new_contact(api)
    lines = [{"Description": f"Petite ligne {i}", "Quantity": 1, "UnitAmount": Decimal("0.03"),
              "AccountCode": "706", "TaxType": "TAX001"} for i in range(3)]
    lines.append({"Description": "Remise", "Quantity": 3, "UnitAmount": Decimal("33.335"),
                  "DiscountRate": Decimal("10"), "AccountCode": "706", "TaxType": "TAX003"})
    inv = data(api.put("/Invoices", {"Invoices": [invoice(cid, "LB-R", LineItems=lines)]}, unitdp=4))["Invoices"][0]
    assert [ln["TaxAmount"] for ln in inv["LineItems"]] == [Decimal("0.01")] * 3 + [Decimal("4.95")]
    assert inv["LineItems"][3]["LineAmount"] == Decimal("90.00")
    assert inv["TotalTax"] == Decimal("4.98")  # 0.09 * 20 % rounded once would give 0.02, not 0.03
    assert inv["SubTotal"] == Decimal("90.09")
    assert inv["Total"] == Decimal("95.07")
    domain = Invoice(reference="LB-R", currency="EUR", issue_date=wire.parse_date("2026-01-15"),
                     lines=[InvoiceLine(description="x", quantity=Decimal(1), unit_price=Decimal("0.03"),
                                        tax_rate=Decimal(20))] * 3
                     + [InvoiceLine(description="y", quantity=Decimal(3), unit_price=Decimal("33.335"),
                                    discount_percent=Decimal(10), tax_rate=Decimal("5.5"))])
    assert domain.total == inv["Total"]


def test_invoice_numbers_are_generated_and_unique(api: Api) -> None:
    """Missing ACCREC numbers become INV-0001, INV-0002...; a repeated number is a validation error."""
    cid = new_contact(api)
    out = data(api.put("/Invoices", {"Invoices": [invoice(cid, "A"), invoice(cid, "B")]}))["Invoices"]
    assert [i["InvoiceNumber"] for i in out] == ["INV-0001", "INV-0002"]
    dup = data(api.put("/Invoices", {"Invoices": [invoice(cid, "C", InvoiceNumber="INV-0001")]}))["Invoices"][0]
    assert dup["HasErrors"] is True
    assert dup["ValidationErrors"] == [{"Message": "Invoice # must be unique."}]


def test_summarize_errors_false_returns_each_element_with_its_errors(api: Api, sandbox: XeroSandbox) -> None:
    """With summarizeErrors=false the valid invoices are created and each bad one carries its own error."""
    cid = new_contact(api)
    bad_line = {"Description": "x", "Quantity": 1, "UnitAmount": 1, "AccountCode": "706"}
    batch = [
        invoice(cid, "OK-1"),
        invoice("6f1c2a9e-0000-4000-8000-000000000001", "BAD-CONTACT"),
        invoice(cid, "BAD-TAX", LineItems=[{**bad_line, "TaxType": "TAX999"}]),
        invoice(cid, "BAD-ACCOUNT", LineItems=[{**bad_line, "AccountCode": "999"}]),
        invoice(cid, "BAD-ITEM", LineItems=[{**bad_line, "ItemCode": "NOPE"}]),
        invoice(cid, "NO-LINES", LineItems=[]),
        invoice(cid, "BAD-CURRENCY", CurrencyCode="GBP"),
        invoice(cid, "OK-2", LineItems=[{"ItemCode": PRODUCTS[0].sku, "Quantity": 2}]),
    ]
    resp = api.put("/Invoices", {"Invoices": batch}, summarizeErrors="false")
    assert resp.status_code == 200
    out = {i["Reference"]: i for i in data(resp)["Invoices"]}
    assert out["OK-1"]["StatusAttributeString"] == "OK"
    assert out["OK-2"]["Total"] == PRODUCTS[0].unit_price * 2 * Decimal(
        "1.2")
    expected = {
        "BAD-CONTACT": "could not be found", "BAD-TAX": "TaxType code 'TAX999'",
        "BAD-ACCOUNT": "Account code '999'", "BAD-ITEM": "Item code 'NOPE' is not valid",
        "NO-LINES": "line item", "BAD-CURRENCY": "GBP",
    }
    for ref, fragment in expected.items():
        element = out[ref]
        assert element["HasErrors"] is True
        assert element["InvoiceID"] == EMPTY_ID
        assert element["StatusAttributeString"] == "ERROR"
        assert any(fragment in e["Message"] for e in element["ValidationErrors"]), (ref, element)
    assert sorted(i["Reference"] for i in sandbox.invoices()) == ["OK-1", "OK-2"]


def test_summarize_errors_true_fails_the_whole_batch(api: Api, sandbox: XeroSandbox) -> None:
    """With summarizeErrors=true one bad invoice makes a 400 ValidationException and nothing is created."""
    cid = new_contact(api)
    resp = api.put("/Invoices", {"Invoices": [invoice(cid, "OK"), invoice(cid, "BAD", CurrencyCode="GBP")]},
                   summarizeErrors="true")
    assert resp.status_code == 400
    body = data(resp)
    assert body["ErrorNumber"] == 10
    assert body["Type"] == "ValidationException"
    assert body["Message"] == "A validation exception occurred"
    assert len(body["Elements"]) == 1
    assert body["Elements"][0]["ValidationErrors"][0]["Message"]
    assert sandbox.invoices() == []


def test_idempotency_key_replays_the_stored_answer(api: Api, sandbox: XeroSandbox, clock: ManualClock) -> None:
    """The same key and body return the first answer and create nothing; another body is refused."""
    cid = new_contact(api)
    body = {"Invoices": [invoice(cid, "LB-7")]}
    first = api.put("/Invoices", body, key="key-7", summarizeErrors="false")
    again = api.put("/Invoices", body, key="key-7", summarizeErrors="false")
    assert again.status_code == 200
    assert again.content == first.content
    assert len(sandbox.invoices()) == 1
    assert sandbox.idempotent_replays == 1
    other = api.put("/Invoices", {"Invoices": [invoice(cid, "LB-8")]}, key="key-7", summarizeErrors="false")
    assert other.status_code == 400
    assert "Idempotency-Key" in data(other)["Message"]
    assert len(sandbox.invoices()) == 1
    assert api.put("/Invoices", body, key="k" * 129).status_code == 400
    clock.advance(86400 + 1)  # the key has expired: the same request is a new one
    api.put("/Invoices", body, key="key-7", summarizeErrors="false")
    assert len(sandbox.invoices()) == 2


def test_drop_after_commit_commits_then_drops(api: Api, sandbox: XeroSandbox) -> None:
    """drop_after_commit applies the write and then closes the connection without an answer."""
    cid = new_contact(api)
    sandbox.faults = FaultPlan("drop_after_commit=1.0")
    body = {"Invoices": [invoice(cid, "LB-D")]}
    with pytest.raises(httpx.RemoteProtocolError):
        api.put("/Invoices", body, key="key-d")
    stored = sandbox.invoice_by_reference("LB-D")
    assert stored is not None
    assert len(sandbox.invoices()) == 1
    sandbox.faults = FaultPlan(None)
    replay = data(api.put("/Invoices", body, key="key-d"))["Invoices"][0]
    assert replay["InvoiceID"] == stored["InvoiceID"]
    assert len(sandbox.invoices()) == 1


def test_minute_limit_answers_429_with_headers(sandbox: XeroSandbox, api: Api, clock: ManualClock) -> None:
    """The 61st call in a minute gets 429, Retry-After and X-Rate-Limit-Problem: minute; limits are reported."""
    remaining = [api.get("/Currencies").headers["X-MinLimit-Remaining"] for _ in range(60)]
    assert remaining[0] == "59"
    assert remaining[-1] == "0"
    limited = api.get("/Currencies")
    assert limited.status_code == 429
    assert limited.headers["X-Rate-Limit-Problem"] == "minute"
    assert limited.headers["Retry-After"] == "60"
    assert limited.headers["X-DayLimit-Remaining"] == "4940"
    assert "X-AppMinLimit-Remaining" in limited.headers
    clock.advance(60)
    assert api.get("/Currencies").status_code == 200


def test_retry_after_is_in_real_seconds_on_a_compressed_clock() -> None:
    """With a clock 600x faster a one-minute wait is announced as a fraction of a real second."""
    clock = ManualClock(scale=600)
    sandbox = XeroSandbox(clock=clock, calls_per_minute=2)
    api = Api(sandbox)
    api.get("/Currencies")
    api.get("/Currencies")
    limited = api.get("/Currencies")
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "0.1"


def test_daily_limit_answers_429_day(clock: ManualClock) -> None:
    """Past the daily allowance the problem is 'day' and the minute allowance is untouched."""
    sandbox = XeroSandbox(clock=clock, calls_per_day=3)
    api = Api(sandbox)
    for _ in range(3):
        assert api.get("/Currencies").status_code == 200
    limited = api.get("/Currencies")
    assert limited.status_code == 429
    assert limited.headers["X-Rate-Limit-Problem"] == "day"
    assert limited.headers["X-DayLimit-Remaining"] == "0"
    assert limited.headers["X-MinLimit-Remaining"] == "57"
    assert float(limited.headers["Retry-After"]) == pytest.approx(86400, abs=1)


def test_sixth_concurrent_call_answers_429_concurrent(sandbox: XeroSandbox, api: Api) -> None:
    """Five calls in flight fill the concurrency limit; the sixth gets 429 concurrent."""
    statuses: list[int] = []
    with sandbox.lock:  # hold the data lock: the five calls stay inside their handlers
        workers = [threading.Thread(target=lambda: statuses.append(api.get("/Invoices").status_code))
                   for _ in range(5)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 5
        while sandbox.stats()["peak_concurrency"] < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        sixth = api.get("/Invoices")
    for w in workers:
        w.join(5)
    assert sixth.status_code == 429
    assert sixth.headers["X-Rate-Limit-Problem"] == "concurrent"
    assert statuses == [200] * 5


def test_auth_failures_have_xero_shapes(clock: ManualClock) -> None:
    """No token or an unknown one: 401; expired: 401 TokenExpired; unknown tenant: 403."""
    sandbox = XeroSandbox(clock=clock)
    http = httpx.Client(transport=sandbox.transport(), base_url=API)
    none = http.get("/Invoices", headers={"xero-tenant-id": sandbox.tenant_id})
    assert none.status_code == 401
    assert none.json()["Title"] == "Unauthorized"
    api = Api(sandbox)
    clock.advance(1801)
    expired = api.get("/Invoices")
    assert expired.status_code == 401
    assert re.fullmatch(r"TokenExpired: token expired at \d\d/\d\d/\d{4} \d\d:\d\d:\d\d", expired.json()["Detail"])
    wrong = Api(sandbox, tenant="00000000-0000-0000-0000-00000000abcd").get("/Invoices")
    assert wrong.status_code == 403
    assert wrong.json() == {**wrong.json(), "Type": None, "Title": "Forbidden", "Status": 403,
                            "Detail": "AuthenticationUnsuccessful"}
    connections = Api(sandbox).http.get("https://api.xero.com/connections", headers=Api(sandbox).headers).json()
    assert connections[0]["tenantId"] == sandbox.tenant_id
    assert connections[0]["tenantType"] == "ORGANISATION"


def test_payments_update_the_invoice_and_are_listed(api: Api, sandbox: XeroSandbox, clock: ManualClock) -> None:
    """A payment lowers AmountDue, the last one marks the invoice PAID; payments page and filter by date."""
    cid = new_contact(api)
    inv = data(api.put("/Invoices", {"Invoices": [invoice(cid, "LB-P")]}))["Invoices"][0]
    assert inv["Total"] == Decimal("2040.00")
    sandbox.create_payment(inv["InvoiceID"], Decimal("1000.00"), wire.parse_date("2026-01-20"))
    clock.advance(60)
    mark = wire.parse_datetime(wire.ms_datetime(clock.now()))
    over = data(api.put("/Payments", {"Payments": [{"Invoice": {"InvoiceID": inv["InvoiceID"]},
                                                    "Account": {"Code": "512"}, "Date": "2026-01-21",
                                                    "Amount": Decimal("5000")}]}))["Payments"][0]
    assert over["ValidationErrors"][0]["Message"] == "Payment amount exceeds the amount outstanding on this document"
    done = data(api.put("/Payments", {"Invoice": {"InvoiceID": inv["InvoiceID"]}, "Account": {"Code": "512"},
                                      "Date": "2026-01-22", "Amount": Decimal("1040.00")}))["Payments"][0]
    assert done["Status"] == "AUTHORISED"
    assert done["Invoice"]["InvoiceID"] == inv["InvoiceID"]
    paid = data(api.get(f"/Invoices/{inv['InvoiceID']}"))["Invoices"][0]
    assert paid["Status"] == "PAID"
    assert paid["AmountDue"] == 0
    assert paid["AmountPaid"] == Decimal("2040.00")
    assert len(paid["Payments"]) == 2
    listed = data(api.get("/Payments", page=1, pageSize=1))
    assert listed["pagination"] == {"page": 1, "pageSize": 1, "pageCount": 2, "itemCount": 2}
    recent = data(api.get("/Payments", headers={"If-Modified-Since": mark.isoformat()}))  # type: ignore[union-attr]
    assert [p["Amount"] for p in recent["Payments"]] == [Decimal("1040.00")]


def test_contact_names_are_unique_among_active_contacts(api: Api) -> None:
    """A second active contact with the same name is refused with Xero's message."""
    new_contact(api, "Martin & Fils")
    resp = data(api.put("/Contacts", {"Contacts": [{"Name": "martin & fils", "ContactNumber": "X"}]}))
    element = resp["Contacts"][0]
    assert element["HasValidationErrors"] is True
    assert "is already assigned to another contact" in element["ValidationErrors"][0]["Message"]
    found = data(api.get("/Contacts", where='ContactNumber=="X" OR Name=="Martin & Fils"'))["Contacts"]
    assert [c["Name"] for c in found] == ["Martin & Fils"]


def test_post_updates_status_and_put_never_updates(api: Api) -> None:
    """POST with an InvoiceID changes an invoice (here: voids it); PUT refuses an InvoiceID."""
    cid = new_contact(api)
    inv = data(api.put("/Invoices", {"Invoices": [invoice(cid, "LB-V")]}))["Invoices"][0]
    put = data(api.put("/Invoices", {"Invoices": [{"InvoiceID": inv["InvoiceID"], "Status": "VOIDED"}]}))
    assert put["Invoices"][0]["HasErrors"] is True
    voided = data(api.post(f"/Invoices/{inv['InvoiceID']}", {"Invoices": [{"Status": "VOIDED"}]}))["Invoices"][0]
    assert voided["Status"] == "VOIDED"
    assert voided["InvoiceID"] == inv["InvoiceID"]


def test_state_survives_save_and_load(tmp_path: Path, clock: ManualClock) -> None:
    """A saved sandbox reloads its invoices and tokens and keeps minting fresh ids."""
    first = XeroSandbox(clock=clock, seed=9)
    api = Api(first)
    cid = new_contact(api)
    api.put("/Invoices", {"Invoices": [invoice(cid, "LB-S")]})
    refresh = first.issue_tokens()["refresh_token"]
    first.save(tmp_path / "xero.bin")
    second = XeroSandbox(clock=clock, seed=9)
    assert second.load(tmp_path / "xero.bin")
    assert [i["Reference"] for i in second.invoices()] == ["LB-S"]
    api2 = Api(second)
    api2.put("/Invoices", {"Invoices": [invoice(cid, "LB-T")]})
    assert len({i["InvoiceID"] for i in second.invoices()}) == 2
    token = api2.http.post("https://identity.xero.com/connect/token",
                           data={"grant_type": "refresh_token", "refresh_token": refresh},
                           auth=(second.client_id, "demo-client-secret"))
    assert token.status_code == 200


def credit_note(contact_id: str, amount: str = "100.00", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "Type": "ACCRECCREDIT", "Contact": {"ContactID": contact_id}, "Date": "2026-01-20", "Status": "AUTHORISED",
        "LineItems": [{"Description": "Geste commercial", "Quantity": 1, "UnitAmount": Decimal(amount),
                       "AccountCode": "706", "TaxType": "TAX001"}],
    }
    body.update(extra)
    return body


def allocate(api: Api, note_id: str, invoice_id: str, amount: str, day: str = "2026-01-21",
             **params: Any) -> httpx.Response:
    return api.put(f"/CreditNotes/{note_id}/Allocations",
                   {"Allocations": [{"Invoice": {"InvoiceID": invoice_id}, "Amount": Decimal(amount), "Date": day}]},
                   **params)


def test_credit_note_totals_numbers_and_allocations_settle_the_invoice(api: Api, sandbox: XeroSandbox) -> None:
    """Credit notes are totalled like invoices and numbered CN-0001...; an allocation lowers the invoice's amount
    due and the note's remaining credit; the invoice is PAID once payments and credits cover it."""
    cid = new_contact(api)
    inv = data(api.put("/Invoices", {"Invoices": [invoice(cid, "LB-C")]}))["Invoices"][0]
    note = data(api.put("/CreditNotes", {"CreditNotes": [credit_note(cid, "100.005")]}))["CreditNotes"][0]
    assert (note["CreditNoteNumber"], note["Type"], note["Status"]) == ("CN-0001", "ACCRECCREDIT", "AUTHORISED")
    assert (note["SubTotal"], note["TotalTax"], note["Total"], note["RemainingCredit"]) == (
        Decimal("100.01"), Decimal("20.00"), Decimal("120.01"), Decimal("120.01"))
    assert note["CurrencyRate"] == 1
    assert note["Allocations"] == []
    done = data(allocate(api, note["CreditNoteID"], inv["InvoiceID"], "120.01"))["Allocations"][0]
    assert (done["Amount"], done["Invoice"]["InvoiceID"]) == (Decimal("120.01"), inv["InvoiceID"])
    assert done["Date"] == wire.ms_date(wire.parse_date("2026-01-21"))  # type: ignore[arg-type]
    credited = data(api.get(f"/Invoices/{inv['InvoiceID']}"))["Invoices"][0]
    assert (credited["AmountCredited"], credited["AmountDue"], credited["Status"]) == (
        Decimal("120.01"), Decimal("1919.99"), "AUTHORISED")
    assert [(c["CreditNoteID"], c["AppliedAmount"]) for c in credited["CreditNotes"]] == [
        (note["CreditNoteID"], Decimal("120.01"))]
    spent = data(api.get(f"/CreditNotes/{note['CreditNoteID']}"))["CreditNotes"][0]
    assert (spent["Status"], spent["RemainingCredit"]) == ("PAID", 0)
    assert [(a["Amount"], a["Invoice"]["InvoiceID"]) for a in spent["Allocations"]] == [
        (Decimal("120.01"), inv["InvoiceID"])]
    sandbox.create_payment(inv["InvoiceID"], Decimal("1000.00"), wire.parse_date("2026-01-25"))
    big = data(api.put("/CreditNotes", {"CreditNotes": [credit_note(cid, "2000.00")]}))["CreditNotes"][0]
    over = data(allocate(api, big["CreditNoteID"], inv["InvoiceID"], "920.00"))["Allocations"][0]
    assert over["ValidationErrors"][0]["Message"] == "The amount being allocated exceeds the amount outstanding on " \
                                                     "this invoice"
    data(allocate(api, big["CreditNoteID"], inv["InvoiceID"], "919.99", day="2026-01-30"))
    settled = data(api.get(f"/Invoices/{inv['InvoiceID']}"))["Invoices"][0]
    assert (settled["Status"], settled["AmountDue"], settled["AmountPaid"], settled["AmountCredited"]) == (
        "PAID", 0, Decimal("1000.00"), Decimal("1040.00"))
    assert settled["FullyPaidOnDate"] == wire.ms_date(wire.parse_date("2026-01-30"))  # type: ignore[arg-type]
    left = data(api.get(f"/CreditNotes/{big['CreditNoteID']}"))["CreditNotes"][0]
    assert (left["Status"], left["RemainingCredit"]) == ("AUTHORISED", Decimal("2400.00") - Decimal("919.99"))
    refused = data(api.put("/Payments", {"Payments": [{"Invoice": {"InvoiceID": inv["InvoiceID"]},
                                                       "Account": {"Code": "512"}, "Amount": Decimal("1")}]}))
    assert refused["Payments"][0]["ValidationErrors"][0]["Message"] == \
        "Payments can only be made against Authorised documents"


def test_removing_an_allocation_reopens_the_invoice_and_notes_keep_xero_rules(api: Api) -> None:
    """DELETE of an allocation gives the credit back; a note with allocations cannot be voided nor edited, a draft
    cannot be allocated, nor a note to another contact's invoice; numbers are unique; summarizeErrors=true fails all."""
    cid, other = new_contact(api), new_contact(api, "Autre SAS")
    inv = data(api.put("/Invoices", {"Invoices": [invoice(cid, "LB-D")]}))["Invoices"][0]
    note = data(api.put("/CreditNotes", credit_note(cid, "1700.00")))["CreditNotes"][0]
    allocation = data(allocate(api, note["CreditNoteID"], inv["InvoiceID"], "2040.00"))["Allocations"][0]
    assert data(api.get(f"/Invoices/{inv['InvoiceID']}"))["Invoices"][0]["Status"] == "PAID"
    void = data(api.post(f"/CreditNotes/{note['CreditNoteID']}", {"Status": "VOIDED"}))["CreditNotes"][0]
    assert void["HasErrors"] is True
    assert "cannot be voided" in void["ValidationErrors"][0]["Message"]
    path = f"/CreditNotes/{note['CreditNoteID']}/Allocations/{allocation['AllocationID']}"
    removed = api.http.delete(path, headers=api.headers)
    assert removed.status_code == 200
    assert data(removed)["IsDeleted"] is True
    assert api.http.delete(path, headers=api.headers).status_code == 404
    reopened = data(api.get(f"/Invoices/{inv['InvoiceID']}"))["Invoices"][0]
    assert (reopened["Status"], reopened["AmountDue"], reopened["CreditNotes"]) == ("AUTHORISED", Decimal("2040.00"),
                                                                                    [])
    voided = data(api.post(f"/CreditNotes/{note['CreditNoteID']}", {"Status": "VOIDED"}))["CreditNotes"][0]
    assert (voided["Status"], voided["Allocations"]) == ("VOIDED", [])
    draft = data(api.put("/CreditNotes", credit_note(cid, Status="DRAFT", CreditNoteNumber="AV-1")))["CreditNotes"][0]
    refused = data(allocate(api, draft["CreditNoteID"], inv["InvoiceID"], "10"))["Allocations"][0]
    assert refused["ValidationErrors"][0]["Message"] == "Only approved credit notes can be allocated"
    again = data(api.put("/CreditNotes", credit_note(cid, CreditNoteNumber="AV-1")))["CreditNotes"][0]
    assert again["ValidationErrors"][0]["Message"] == "Credit Note # must be unique."
    theirs = data(api.put("/CreditNotes", credit_note(other)))["CreditNotes"][0]
    wrong = data(allocate(api, theirs["CreditNoteID"], inv["InvoiceID"], "10"))["Allocations"][0]
    assert wrong["ValidationErrors"][0]["Message"] == "The credit note and the invoice must belong to the same contact"
    deleted = data(api.post("/CreditNotes", {"CreditNotes": [{"CreditNoteID": draft["CreditNoteID"],
                                                              "Status": "DELETED"}]}))["CreditNotes"][0]
    assert deleted["Status"] == "DELETED"
    before = data(api.get("/CreditNotes"))["CreditNotes"]
    batch = api.put("/CreditNotes", {"CreditNotes": [credit_note(cid), credit_note(cid, Type="NOPE")]},
                    summarizeErrors="true")
    assert batch.status_code == 400
    assert data(api.get("/CreditNotes"))["CreditNotes"] == before


def test_credit_notes_list_with_filters_paging_and_lines_only_when_paged(api: Api, clock: ManualClock) -> None:
    """GET /CreditNotes honours where (Type, Status), If-Modified-Since, order and page/pageSize; lines with a page."""
    cid = new_contact(api)
    api.put("/CreditNotes", {"CreditNotes": [credit_note(cid), credit_note(cid, Type="ACCPAYCREDIT")]})
    clock.advance(60)
    mark = dt_of(clock)
    api.put("/CreditNotes", credit_note(cid, "50.00"))
    sales = data(api.get("/CreditNotes", where='Type=="ACCRECCREDIT"', order="CreditNoteNumber DESC"))["CreditNotes"]
    assert [n["CreditNoteNumber"] for n in sales] == ["CN-0002", "CN-0001"]
    assert all("LineItems" not in n for n in sales)
    recent = data(api.get("/CreditNotes", headers={"If-Modified-Since": mark}))["CreditNotes"]
    assert [n["Total"] for n in recent] == [Decimal("60.00")]
    paged = data(api.get("/CreditNotes", page=2, pageSize=2))
    assert paged["pagination"] == {"page": 2, "pageSize": 2, "pageCount": 2, "itemCount": 3}
    assert paged["CreditNotes"][0]["LineItems"][0]["LineAmount"] == Decimal("50.00")
    assert api.get("/CreditNotes/00000000-0000-0000-0000-0000000000ff").status_code == 404


def dt_of(clock: ManualClock) -> str:
    parsed = wire.parse_datetime(wire.ms_datetime(clock.now()))
    assert parsed is not None
    return parsed.isoformat()


def test_bank_transactions_spend_money_from_a_bank_account(api: Api) -> None:
    """SPEND and RECEIVE transactions from a bank account, totalled per line; a non-bank account, another currency
    or a line without account is refused; POST deletes one."""
    cid = new_contact(api, "Régie publicitaire")
    spend: dict[str, Any] = {
        "Type": "SPEND", "Contact": {"ContactID": cid}, "BankAccount": {"Code": "512"}, "Date": "2026-01-31",
        "Reference": "Google Ads janvier", "LineItems": [
            {"Description": "Campagnes", "Quantity": 1, "UnitAmount": Decimal("1250.40"), "AccountCode": "6231",
             "TaxType": "TAX001"},
            {"Description": "Salon", "Quantity": 2, "UnitAmount": Decimal("99.99"), "AccountCode": "6233",
             "TaxType": "TAX001"}],
    }
    tx = data(api.put("/BankTransactions", {"BankTransactions": [spend]}))["BankTransactions"][0]
    assert (tx["Type"], tx["Status"], tx["CurrencyCode"], tx["CurrencyRate"]) == ("SPEND", "AUTHORISED", "EUR", 1)
    assert (tx["SubTotal"], tx["TotalTax"], tx["Total"]) == (Decimal("1450.38"), Decimal("290.08"),
                                                             Decimal("1740.46"))
    assert tx["BankAccount"]["Code"] == "512"
    bad = [dict(spend, BankAccount={"Code": "6231"}), dict(spend, CurrencyCode="USD"),
           dict(spend, LineItems=[{"Description": "x", "Quantity": 1, "UnitAmount": 5}]),
           dict(spend, Type="SPEND-TRANSFER")]
    refused = data(api.put("/BankTransactions", {"BankTransactions": bad}))["BankTransactions"]
    assert [r["ValidationErrors"][0]["Message"] for r in refused] == [
        "Account 6231 is not a bank account",
        "The currency of a bank transaction must be the currency of its bank account (EUR)",
        "An account code must be specified on each line of a bank transaction.",
        "Bank transaction Type must be SPEND or RECEIVE",
    ]
    api.put("/BankTransactions", dict(spend, Type="RECEIVE"))
    spends = data(api.get("/BankTransactions", where='Type=="SPEND"', page=1))["BankTransactions"]
    assert [t["BankTransactionID"] for t in spends] == [tx["BankTransactionID"]]
    assert [ln["AccountCode"] for ln in spends[0]["LineItems"]] == ["6231", "6233"]
    gone = data(api.post(f"/BankTransactions/{tx['BankTransactionID']}", {"Status": "DELETED"}))["BankTransactions"][0]
    assert gone["Status"] == "DELETED"
    assert data(api.get(f"/BankTransactions/{tx['BankTransactionID']}"))["BankTransactions"][0]["Status"] == "DELETED"


def test_foreign_currency_documents_carry_a_rate_of_the_day(api: Api, sandbox: XeroSandbox) -> None:
    """A USD invoice gets the rate of its day (USD per EUR, near 1.08, the same in every sandbox) unless one is sent;
    a EUR invoice has 1; a payment carries the invoice's rate."""
    cid = new_contact(api)
    usd = data(api.put("/Invoices", {"Invoices": [
        invoice(cid, "LB-U1", CurrencyCode="USD", Date="2026-01-15"),
        invoice(cid, "LB-U2", CurrencyCode="USD", Date="2026-01-16"),
        invoice(cid, "LB-U3", CurrencyCode="USD", CurrencyRate=Decimal("1.1234567")),
        invoice(cid, "LB-E", CurrencyRate=Decimal("3")),
    ]}))["Invoices"]
    rates = [i["CurrencyRate"] for i in usd]
    other = XeroSandbox(seed=99)
    assert rates[:2] == [other.day_rate("USD", dt.date(2026, 1, d)) for d in (15, 16)]
    assert all(Decimal("1.08") * Decimal("0.9595") <= r <= Decimal("1.08") * Decimal("1.0405") for r in rates[:2])
    assert all(r.as_tuple().exponent == -6 for r in rates[:2])
    assert rates[2:] == [Decimal("1.123457"), 1]
    days = [sandbox.day_rate("USD", dt.date(2026, m, 10)) for m in range(1, 13)]
    assert len(set(days)) > 6  # the rate moves from month to month
    paid = sandbox.create_payment(usd[0]["InvoiceID"], Decimal("100.00"))
    assert paid["CurrencyRate"] == rates[0]
    bad = data(api.put("/Invoices", invoice(cid, "LB-U4", CurrencyCode="USD", CurrencyRate=0)))["Invoices"][0]
    assert bad["ValidationErrors"][0]["Message"] == "The CurrencyRate must be greater than zero"
