"""python-quickbooks with intuit-oauth work unchanged against the QuickBooks sandbox served on a socket."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from decimal import Decimal

import pytest
from intuitlib.client import AuthClient
from quickbooks import QuickBooks
from quickbooks.cdc import change_data_capture
from quickbooks.exceptions import QuickbooksException
from quickbooks.objects.base import Ref
from quickbooks.objects.customer import Customer
from quickbooks.objects.detailline import SalesItemLine, SalesItemLineDetail
from quickbooks.objects.invoice import Invoice
from quickbooks.objects.item import Item
from quickbooks.objects.payment import Payment, PaymentLine

from connectors.quickbooks.sandbox import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, QuickBooksSandbox
from connectors.sandboxkit import SandboxServer, serve


@pytest.fixture
def served() -> Iterator[tuple[QuickBooksSandbox, SandboxServer]]:
    sandbox = QuickBooksSandbox(seed=41)  # real clock: the SDK and intuit-oauth read the wall clock
    server = serve(sandbox)
    try:
        yield sandbox, server
    finally:
        server.stop()


@pytest.fixture
def qb(served: tuple[QuickBooksSandbox, SandboxServer], monkeypatch: pytest.MonkeyPatch) -> QuickBooks:
    sandbox, server = served
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")  # requests-oauthlib refuses http:// otherwise
    auth = AuthClient(client_id=DEMO_CLIENT_ID, client_secret=DEMO_CLIENT_SECRET,
                      redirect_uri="http://127.0.0.1/callback",
                      environment=server.url + "/.well-known/openid_configuration")
    client = QuickBooks(auth_client=auth, refresh_token=sandbox.issue_tokens()["refresh_token"],
                        company_id=sandbox.realm_id, minorversion=75)
    client.api_url_v3 = server.url + "/v3"
    return client


def _customer(name: str) -> Customer:
    c = Customer()
    c.DisplayName = name
    c.CompanyName = name
    c.Notes = "LedgerBridge number: LB-sdk-1"
    return c


def _invoice(customer: Customer, item: Item, qty: str, tax_code: str, doc: str) -> Invoice:
    detail = SalesItemLineDetail()
    detail.ItemRef = item.to_ref()
    detail.Qty = Decimal(qty)
    detail.UnitPrice = Decimal(str(item.UnitPrice))
    tax = Ref()
    tax.value = tax_code
    detail.TaxCodeRef = tax
    line = SalesItemLine()
    line.Amount = Decimal(qty) * Decimal(str(item.UnitPrice))
    line.Description = item.Description
    line.SalesItemLineDetail = detail
    inv = Invoice()
    inv.CustomerRef = customer.to_ref()
    inv.DocNumber = doc
    inv.PrivateNote = f"LedgerBridge reference: {doc}"
    inv.Line.append(line)
    return inv


def test_sdk_authorises_through_discovery_and_the_token_endpoint(
        qb: QuickBooks, served: tuple[QuickBooksSandbox, SandboxServer]) -> None:
    """AuthClient reads the discovery document; QuickBooks() refreshes once and gets a rotated token."""
    sandbox, server = served
    assert qb.auth_client.token_endpoint == server.url + "/oauth2/v1/tokens/bearer"
    assert qb.auth_client.access_token
    assert qb.auth_client.x_refresh_token_expires_in > 0
    assert sandbox.refresh_calls == 1
    info = qb.get(f"{qb.api_url}/company/{sandbox.realm_id}/companyinfo/{sandbox.realm_id}")
    assert info["CompanyInfo"]["Country"] == "FR"


def test_sdk_creates_and_queries_customers(qb: QuickBooks, served: tuple[QuickBooksSandbox, SandboxServer]) -> None:
    """Customer.save (with request_id), filter, where, count; a duplicate name raises the SDK's 6240 error."""
    sandbox, _server = served
    created = _customer("Boulangerie Martin").save(qb=qb, request_id="sdk-customer-1")
    assert int(created.Id) > 0
    replay = _customer("Boulangerie Martin").save(qb=qb, request_id="sdk-customer-1")
    assert replay.Id == created.Id
    _customer("Garage Petit").save(qb=qb)
    assert [c.DisplayName for c in Customer.filter(DisplayName="Garage Petit", qb=qb)] == ["Garage Petit"]
    assert [c.Id for c in Customer.where("DisplayName LIKE 'Boul%'", qb=qb)] == [created.Id]
    assert Customer.count(qb=qb) == 2
    assert Customer.filter(DisplayName="Nobody's", qb=qb) == []
    with pytest.raises(QuickbooksException) as err:
        _customer("garage petit").save(qb=qb)
    assert err.value.error_code == 6240
    assert len(sandbox.customers()) == 2


def test_sdk_creates_and_reads_invoices(qb: QuickBooks, served: tuple[QuickBooksSandbox, SandboxServer]) -> None:
    """Invoice.save with SalesItemLine objects; totals, query by DocNumber, payment, CDC and the Item listing."""
    sandbox, _server = served
    before = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    customer = _customer("Librairie Roux").save(qb=qb)
    items = {i.Sku: i for i in Item.all(qb=qb, max_results=1000)}
    assert len(items) == 16
    inv = _invoice(customer, items["SVC-CONSULT-DAY"], "2.5", "2", "LB-sdk:1")
    inv.Line.append(_invoice(customer, items["BOOK-GUIDE"], "3", "4", "x").Line[0])
    saved = inv.save(qb=qb, request_id="sdk-invoice-1")
    assert Decimal(str(saved.TotalAmt)) == Decimal("2657.61")  # 2125 + 425 VAT, 102 + 5.61 VAT
    assert saved.TxnTaxDetail.TotalTax == 430.61
    assert [ln.DetailType for ln in saved.Line] == ["SalesItemLineDetail", "SalesItemLineDetail",
                                                   "SubTotalLineDetail"]
    found = Invoice.filter(DocNumber="LB-sdk:1", qb=qb)
    assert [i.Id for i in found] == [saved.Id]
    assert found[0].PrivateNote == "LedgerBridge reference: LB-sdk:1"
    assert Invoice.get(saved.Id, qb=qb).CustomerRef.value == customer.Id
    payment = Payment()
    payment.CustomerRef = customer.to_ref()
    payment.TotalAmt = 1000
    applied = PaymentLine()
    applied.Amount = 1000
    applied.LinkedTxn.append(saved.to_linked_txn())
    payment.Line.append(applied)
    paid = payment.save(qb=qb, request_id="sdk-payment-1")
    assert paid.TotalAmt == 1000
    assert paid.UnappliedAmt == 0
    assert Invoice.get(saved.Id, qb=qb).Balance == 1657.61
    changes = change_data_capture([Invoice, Payment], before, qb=qb)
    assert [i.Id for i in changes.Invoice] == [saved.Id]
    assert len(changes.Payment) == 1
    assert sandbox.invoices()[0]["Reference"] == "LB-sdk:1"
