"""One exchange-rate convention from each ledger to the metrics: ``exchange_rate`` on the domain documents is
home-currency units per unit of the document's currency, and the metrics multiply by it.

Xero's ``CurrencyRate`` is the other way round (units of the document's currency per unit of the base currency,
so a base amount is the document amount divided by it); QuickBooks' ``ExchangeRate`` is home units per foreign
unit; Pennylane's ``exchange_rate`` converts a document to euros (read as euros per unit, checked against the
document's euro and currency totals)."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from config.schema import MetricsConfig
from connectors.domain import CreditNote, Invoice, Payment, round_money
from connectors.pennylane.adapter import home_rate as pennylane_home_rate
from connectors.pennylane.sandbox import PennylaneSandbox
from connectors.pennylane.sandbox import exchange_rate as pennylane_rate
from connectors.quickbooks.sandbox import QuickBooksSandbox
from connectors.quickbooks.sandbox import exchange_rate as quickbooks_rate
from connectors.xero.sandbox import XeroSandbox
from connectors.xero.testing import ManualClock
from metrics.facts import Facts
from metrics.load import load_facts
from sync.crypto import generate_key
from sync.factstore import FactStore
from sync.state import StateStore
from tests.unit import test_pennylane_adapter as pennylane
from tests.unit import test_quickbooks_adapter as quickbooks
from tests.unit import test_xero_adapter as xero

ISSUED = dt.date(2026, 1, 10)
AS_OF = dt.date(2026, 6, 30)


def facts_of(tmp_path: Path, invoices: list[Invoice], payments: list[Payment] | None = None,
             credit_notes: list[CreditNote] | None = None) -> Facts:
    """The metrics facts (home currency EUR, no configured rates) of what a ledger returned."""
    store = StateStore.open(f"sqlite:///{tmp_path / 'state.db'}", secret_key=generate_key())
    try:
        FactStore(store).record_ledger_page("p", invoices=[(inv, None) for inv in invoices],
                                            payments=payments or [], credit_notes=credit_notes or [])
        return load_facts(store, "p", MetricsConfig(), as_of=AS_OF, home_currency="EUR")
    finally:
        store.close()


# == Xero ============================================================================================

def test_a_xero_usd_invoice_at_currency_rate_r_counts_as_its_amount_divided_by_r(tmp_path: Path) -> None:
    """EUR organisation, USD documents at CurrencyRate 1.25 (1 EUR buys 1.25 USD): the invoice of 1,200 USD
    (1,000 before tax) counts 960 EUR (800 net), a payment of 600 USD 480 EUR, an unallocated credit note of
    160 USD at 1.6 is 100 EUR. Multiplying by the rate would give 1,500, 750 and 256."""
    clock = ManualClock()
    sandbox = XeroSandbox(clock=clock, seed=11)
    ledger = xero.make_ledger(sandbox, clock)
    cid = xero.one_contact(ledger)
    doc = {"Contact": {"ContactID": cid}, "Date": ISSUED.isoformat(), "CurrencyCode": "USD",
           "Status": "AUTHORISED", "LineAmountTypes": "Exclusive"}
    made = xero.xero_api(sandbox, "PUT", "/Invoices", {"Invoices": [dict(
        doc, Type="ACCREC", DueDate="2026-02-09", CurrencyRate=Decimal("1.25"), LineItems=[
            {"Description": "Conseil", "Quantity": 1, "UnitAmount": Decimal("1000.00"), "AccountCode": "706",
             "TaxType": "TAX001"}])]})
    invoice_id = made["Invoices"][0]["InvoiceID"]
    assert made["Invoices"][0]["Total"] == Decimal("1200.00")
    xero.xero_api(sandbox, "PUT", "/Payments", {"Payments": [
        {"Invoice": {"InvoiceID": invoice_id}, "Account": {"Code": "512"}, "Date": "2026-01-20",
         "Amount": Decimal("600.00")}]})
    xero.xero_api(sandbox, "PUT", "/CreditNotes", {"CreditNotes": [dict(
        doc, Type="ACCRECCREDIT", CurrencyRate=Decimal("1.6"), LineItems=[
            {"Description": "Remise", "Quantity": 1, "UnitAmount": Decimal("160.00"), "AccountCode": "706",
             "TaxType": "NONE"}])]})

    [invoice] = ledger.list_invoices()
    assert invoice.exchange_rate == Decimal("0.8")
    facts = facts_of(tmp_path, [invoice], list(ledger.list_payments()), list(ledger.list_credit_notes()))

    [fact] = facts.invoices
    assert (fact.gross, fact.net, fact.currency) == (Decimal("960.00"), Decimal("800.00"), "USD")
    assert [p.amount for p in facts.payments] == [Decimal("480.00")]
    assert fact.balance == Decimal("480.00")
    assert [(c.gross, c.net) for c in facts.credits] == [(Decimal("100.00"), Decimal("100.00"))]


def test_xeros_sandbox_quotes_its_day_rates_as_dollars_per_euro() -> None:
    """The sandbox's rate of the day is in Xero's direction: about 1.08 USD for 1 EUR (not 0.93); the base is 1."""
    sandbox = XeroSandbox(clock=ManualClock(), seed=11)
    rate = sandbox.day_rate("USD", ISSUED)
    assert Decimal("1.03") < rate < Decimal("1.13")
    assert sandbox.day_rate("EUR", ISSUED) == 1


# == QuickBooks ======================================================================================

def test_a_quickbooks_usd_invoice_counts_as_its_amount_times_exchange_rate(tmp_path: Path) -> None:
    """QuickBooks' ExchangeRate is home units per foreign unit (about 0.93 EUR per USD here): a USD invoice
    counts its total times the rate, and the adapter passes the rate through unchanged."""
    clock = ManualClock()
    sandbox = QuickBooksSandbox(clock=clock, seed=13)
    ledger = quickbooks.make_ledger(sandbox, clock)
    customer_id = quickbooks.one_customer(ledger, "USD")
    assert ledger.create_invoices([quickbooks.request("LB-fx:U1", customer_id, currency="USD")], "fx")[0].ok
    [invoice] = ledger.list_invoices()
    rate = quickbooks_rate("USD", ISSUED)
    assert Decimal("0.85") < rate < 1
    assert invoice.exchange_rate == rate
    assert invoice.ledger_total is not None

    [fact] = facts_of(tmp_path, [invoice]).invoices
    assert fact.gross == round_money(invoice.ledger_total * rate, "EUR")
    assert fact.gross < invoice.ledger_total


# == Pennylane =======================================================================================

def test_a_pennylane_usd_invoice_counts_as_its_amount_times_exchange_rate(tmp_path: Path) -> None:
    """Pennylane's exchange_rate converts to euros (euros per unit): the invoice counts its euro ``amount``."""
    clock = ManualClock()
    sandbox = PennylaneSandbox(clock=clock, seed=11, reference_lookup_delay_s=0, requests_per_5s=1000)
    ledger = pennylane.make_ledger(sandbox, clock)
    cid = pennylane.one_customer(ledger)
    assert ledger.create_invoices([pennylane.request("LB-fx:U1", cid, currency="USD")], "fx")[0].ok
    [invoice] = ledger.list_invoices()
    rate = pennylane_rate("USD", ISSUED)
    assert invoice.exchange_rate == rate
    assert invoice.ledger_total is not None

    [fact] = facts_of(tmp_path, [invoice]).invoices
    assert fact.gross == round_money(invoice.ledger_total * rate, "EUR")


def _inverted(sandbox: PennylaneSandbox) -> httpx.MockTransport:
    """The sandbox answering with each foreign customer document's exchange_rate as units per euro."""

    def flip(doc: Any) -> None:
        if isinstance(doc, dict) and doc.get("exchange_rate") not in (None, "1", "1.0"):
            doc["exchange_rate"] = str((1 / Decimal(doc["exchange_rate"])).quantize(Decimal("0.000001")))

    def handle(request: httpx.Request) -> httpx.Response:
        resp = sandbox.handle_httpx(request)
        if "/customer_invoices" not in request.url.path or "json" not in resp.headers.get("content-type", ""):
            return resp
        body = json.loads(resp.content)
        for doc in body.get("items", []) if isinstance(body, dict) else []:
            flip(doc)
        flip(body)
        headers = {k: v for k, v in resp.headers.items() if k.lower() not in ("content-length", "content-encoding")}
        return httpx.Response(resp.status_code, headers=headers, json=body)

    return httpx.MockTransport(handle)


def test_a_pennylane_rate_given_the_other_way_round_is_turned_round_by_the_documents_totals(tmp_path: Path) -> None:
    """Were Pennylane to send units per euro, the euro and currency totals of the document show it: the adapter
    still gives euros per unit, and the invoice still counts its euro amount."""
    clock = ManualClock()
    sandbox = PennylaneSandbox(clock=clock, seed=11, reference_lookup_delay_s=0, requests_per_5s=1000)
    ledger = pennylane.make_ledger(sandbox, clock, transport=_inverted(sandbox))
    cid = pennylane.one_customer(ledger)
    assert ledger.create_invoices([pennylane.request("LB-fx:U1", cid, currency="USD")], "fx")[0].ok
    [invoice] = ledger.list_invoices()
    rate = pennylane_rate("USD", ISSUED)
    assert invoice.exchange_rate is not None
    assert abs(invoice.exchange_rate - rate) < Decimal("0.000001")
    assert invoice.ledger_total is not None

    [fact] = facts_of(tmp_path, [invoice]).invoices
    assert fact.gross == round_money(invoice.ledger_total * rate, "EUR")


@pytest.mark.parametrize(("document", "expected"), [
    ({"exchange_rate": "0.925926", "amount": "925.93", "currency_amount": "1000.00"}, Decimal("0.925926")),
    ({"exchange_rate": "1.08", "amount": "925.93", "currency_amount": "1000.00"}, Decimal("0.9259259259")),
    ({"exchange_rate": "1.08", "amount": "-92.59", "currency_amount": "-100.00"}, Decimal("0.9259259259")),
    ({"exchange_rate": "1.08", "amount": "1080.00", "currency_amount": "1000.00"}, Decimal("1.08")),
    ({"exchange_rate": "1.08", "amount": "500.00", "currency_amount": "1000.00"}, Decimal("1.08")),
    ({"exchange_rate": "1.08"}, Decimal("1.08")),
    ({"exchange_rate": "1.08", "amount": "0", "currency_amount": "0"}, Decimal("1.08")),
    ({"exchange_rate": "1.0", "amount": "100.00", "currency_amount": "100.00"}, Decimal(1)),
    ({"exchange_rate": "0", "amount": "1.00", "currency_amount": "1.00"}, None),
    ({"amount": "1.00", "currency_amount": "1.00"}, None),
])
def test_pennylane_rates_are_read_as_euros_per_unit_unless_the_totals_say_otherwise(
        document: dict[str, Any], expected: Decimal | None) -> None:
    """The documented reading stands unless the totals contradict it and agree with the reciprocal; totals that
    agree with neither, or are missing or zero, leave it as sent."""
    assert pennylane_home_rate(document) == expected
