"""Pennylane ledger facts for the metrics: credit notes (negative customer invoices that credit an invoice), expense
lines from the general ledger, exchange rates, the home currency; the sandbox's supplier invoices, ledger
accounts and entries, history loading and settlement."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors import seedhistory
from connectors.domain import CreditAllocation, round_money
from connectors.pennylane import PennylaneLedger
from connectors.pennylane.sandbox import DEMO_API_TOKEN, PennylaneSandbox, exchange_rate
from connectors.seedbook import Book, BookCompany, BookLine, generate_book
from connectors.seedhistory import (
    History,
    HistoryCreditNote,
    HistoryExpense,
    HistoryInvoice,
    HistoryPayment,
    PayerProfile,
)
from connectors.xero.testing import ManualClock
from tests.unit.test_pennylane_adapter import customer, make_ledger, one_customer, request

API = "https://app.pennylane.com/api/external/v2"
TOTAL = Decimal("2644.16")  # the total of test_pennylane_adapter.request()'s invoice


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def sandbox(clock: ManualClock) -> PennylaneSandbox:
    return PennylaneSandbox(clock=clock, seed=11, reference_lookup_delay_s=0, requests_per_5s=1000)


def api(sandbox: PennylaneSandbox) -> httpx.Client:
    return httpx.Client(transport=sandbox.transport(), base_url=API,
                        headers={"Authorization": f"Bearer {DEMO_API_TOKEN}"})


def flt(*conditions: tuple[str, str, Any]) -> str:
    return json.dumps([{"field": f, "operator": op, "value": v} for f, op, v in conditions])


def invoice_of(ledger: PennylaneLedger, ref: str, customer_id: str, currency: str = "EUR") -> str:
    outcome = ledger.create_invoices([request(ref, customer_id, currency=currency)], "b")[0]
    assert outcome.ok
    assert outcome.invoice is not None
    assert outcome.invoice.ledger_id
    return outcome.invoice.ledger_id


def credit_body(customer_id: int, price: str, *, credited: int | None = None, vat: str = "FR_200",
                draft: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"date": "2026-01-20", "deadline": "2026-01-20", "customer_id": customer_id,
                            "currency": "EUR", "draft": draft,
                            "invoice_lines": [{"label": "Geste commercial", "raw_currency_unit_price": price,
                                               "unit": "piece", "vat_rate": vat, "quantity": 1}]}
    if credited is not None:
        body["credited_invoice_id"] = credited
    return body


# == credit notes ====================================================================================

def test_a_credit_note_is_a_customer_invoice_with_negative_amounts_that_credits_an_invoice(
        sandbox: PennylaneSandbox, clock: ManualClock) -> None:
    """POST /customer_invoices with negative prices makes a credit note (own numbering, negative amounts,
    ``credited_invoice``); the invoice it credits is partially cancelled, its remaining amount lowered; the
    ``credit_note`` filter tells the two apart; what Pennylane refuses is refused (422)."""
    ledger = make_ledger(sandbox, clock)
    cid = int(one_customer(ledger))
    inv_id = int(invoice_of(ledger, "LB-acme:D1", str(cid)))
    client = api(sandbox)
    resp = client.post("/customer_invoices", json=credit_body(cid, "-100.00", credited=inv_id))
    assert resp.status_code == 201, resp.text
    note = resp.json()
    assert (note["currency_amount"], note["currency_amount_before_tax"], note["status"]) == ("-120.00", "-100.00",
                                                                                             "credit_note")
    assert note["credited_invoice"]["id"] == inv_id
    assert note["invoice_number"] == "A20260001"
    assert note["remaining_amount_with_tax"] == "0.00"
    invoice = client.get(f"/customer_invoices/{inv_id}").json()
    assert (invoice["status"], invoice["remaining_amount_with_tax"]) == ("partially_cancelled", str(TOTAL - 120))
    notes = client.get("/customer_invoices", params={"filter": flt(("credit_note", "eq", True))}).json()["items"]
    invoices = client.get("/customer_invoices", params={"filter": flt(("credit_note", "eq", False))}).json()["items"]
    assert ([n["id"] for n in notes], [i["id"] for i in invoices]) == ([note["id"]], [inv_id])

    other = int(ledger.create_customers([("hubspot:C0002", customer(2))], "c2")["hubspot:C0002"].ledger_id)
    refused = [
        client.post("/customer_invoices", json=credit_body(cid, "100.00", credited=inv_id)),  # not a credit note
        client.post("/customer_invoices", json=credit_body(cid, "-3000.00", credited=inv_id)),  # more than is left
        client.post("/customer_invoices", json=credit_body(other, "-10.00", credited=inv_id)),  # another customer
        client.post("/customer_invoices", json=credit_body(cid, "-10.00", credited=note["id"])),  # a credit note
        client.post("/customer_invoices", json=credit_body(cid, "0.00")),  # nothing
    ]
    assert [r.status_code for r in refused] == [422] * 5
    discounted = credit_body(cid, "-10.00")
    discounted["invoice_lines"][0]["discount"] = {"type": "absolute", "value": "1.00"}
    assert client.post("/customer_invoices", json=discounted).status_code == 422


def test_a_credit_note_linked_later_and_one_cancelling_an_invoice(sandbox: PennylaneSandbox,
                                                                 clock: ManualClock) -> None:
    """A credit note made on its own has all of it left to use until linked (POST .../link_credit_note); a
    credit note of all of an invoice cancels it: the invoice reads back settled (paid, nothing due) and the
    credit note carries the allocation, so that invoice less credit nets to nothing."""
    ledger = make_ledger(sandbox, clock)
    cid = int(one_customer(ledger))
    first = int(invoice_of(ledger, "LB-acme:D1", str(cid)))
    second = int(invoice_of(ledger, "LB-acme:D2", str(cid)))
    client = api(sandbox)
    loose = client.post("/customer_invoices", json=credit_body(cid, "-50.00")).json()
    assert (loose["remaining_amount_with_tax"], loose["credited_invoice"]) == ("-60.00", None)
    notes = {n.ledger_id: n for n in ledger.list_credit_notes()}
    assert (notes[str(loose["id"])].remaining, notes[str(loose["id"])].allocations) == (Decimal("60.00"), [])
    linked = client.post(f"/customer_invoices/{first}/link_credit_note", json={"credit_note_id": loose["id"]})
    assert linked.status_code == 200, linked.text
    assert linked.json()["credited_invoice"]["id"] == first
    assert client.post(f"/customer_invoices/{second}/link_credit_note",
                       json={"credit_note_id": loose["id"]}).status_code == 422
    sandbox.cancel_invoice(second)
    by_id = {i.ledger_id: i for i in ledger.list_invoices()}
    assert (by_id[str(second)].status, by_id[str(second)].amount_due) == ("paid", Decimal("0.00"))
    assert (by_id[str(first)].status, by_id[str(first)].amount_due) == ("authorised", TOTAL - Decimal("60.00"))
    assert [row["Status"] for row in sandbox.ledger_view()] == ["AUTHORISED", "VOIDED"]
    notes = {n.ledger_id: n for n in ledger.list_credit_notes()}
    assert len(notes) == 2
    full = next(n for n in notes.values() if n.credited_invoice_ledger_id == str(second))
    assert (full.total, full.remaining, full.status) == (TOTAL, Decimal("0.00"), "paid")
    assert full.allocations == [CreditAllocation(invoice_ledger_id=str(second), amount=TOTAL,
                                                 date=dt.date(2026, 1, 1))]
    assert notes[str(loose["id"])].allocations == [CreditAllocation(invoice_ledger_id=str(first),
                                                                     amount=Decimal("60.00"),
                                                                     date=dt.date(2026, 1, 20))]


def test_credit_notes_are_read_incrementally_from_the_changelog(sandbox: PennylaneSandbox, clock: ManualClock) -> None:
    """list_credit_notes(since) reads the customer invoices changelog and keeps the credit notes; a draft credit
    note is a draft without allocation; list_invoices and list_payments leave credit notes out."""
    ledger = make_ledger(sandbox, clock)
    cid = int(one_customer(ledger))
    inv_id = int(invoice_of(ledger, "LB-acme:D1", str(cid)))
    sandbox.credit_invoice(inv_id, Decimal("120.00"), dt.date(2026, 1, 5))
    clock.advance(3600)
    since = dt.datetime.fromtimestamp(clock.now(), dt.UTC)
    clock.advance(60)
    draft = api(sandbox).post("/customer_invoices", json=credit_body(cid, "-10.00", credited=inv_id, draft=True))
    assert draft.status_code == 201, draft.text
    recent = list(ledger.list_credit_notes(since))
    assert [(n.ledger_id, n.status, n.allocations, n.number) for n in recent] == [
        (str(draft.json()["id"]), "draft", [], None)]
    assert len(list(ledger.list_credit_notes())) == 2
    assert {i.ledger_id for i in ledger.list_invoices()} == {str(inv_id)}
    assert list(ledger.list_payments()) == []
    # Finalizing the draft links it: the invoice changes too, and reads back lowered by both credit notes.
    assert api(sandbox).put(f"/customer_invoices/{draft.json()['id']}/finalize").status_code == 200
    changed = {i.ledger_id: i for i in ledger.list_invoices(since)}
    assert changed[str(inv_id)].amount_due == TOTAL - Decimal("132.00")


# == expenses, rates, currency, links ===============================================================

def test_expenses_are_the_ledger_lines_of_the_asked_accounts(sandbox: PennylaneSandbox, clock: ManualClock) -> None:
    """Supplier invoices book their lines to expense accounts through ledger entries; list_expenses reads the
    ledger entry lines of the accounts numbered as asked within the dates, in euros (a dollar invoice converted
    at its rate); the supplier invoice API shows the documented shapes."""
    ledger = make_ledger(sandbox, clock)
    bill = sandbox.add_supplier_invoice("6231", dt.date(2026, 1, 12), Decimal("1250.40"), "Google Ads – janvier")
    sandbox.add_supplier_invoice("6226", dt.date(2026, 1, 14), Decimal("310.00"), "Avocat")
    sandbox.add_supplier_invoice("6231", dt.date(2026, 2, 1), Decimal("888.00"), "Google Ads – février")
    sandbox.add_supplier_invoice("6231", dt.date(2026, 1, 20), Decimal("100.00"), "LinkedIn Ads", currency="USD")
    lines = sorted(ledger.list_expenses(["6231"], dt.date(2026, 1, 1), dt.date(2026, 1, 31)), key=lambda e: e.date)
    usd_net = round_money(Decimal("100.00") * exchange_rate("USD", dt.date(2026, 1, 20)), "EUR")
    assert [(e.account_code, e.date, e.net, e.currency, e.description) for e in lines] == [
        ("6231", dt.date(2026, 1, 12), Decimal("1250.40"), "EUR", "Google Ads – janvier"),
        ("6231", dt.date(2026, 1, 20), usd_net, "EUR", "LinkedIn Ads")]
    assert {e.account_code for e in ledger.list_expenses(["6231", "6226", "9999"], dt.date(2026, 1, 1),
                                                         dt.date(2026, 1, 31))} == {"6231", "6226"}
    client = api(sandbox)
    got = client.get(f"/supplier_invoices/{bill['id']}").json()
    assert (got["currency_amount"], got["currency_amount_before_tax"], got["currency_tax"]) == (
        "1500.48", "1250.40", "250.08")
    [line] = client.get(f"/supplier_invoices/{bill['id']}/invoice_lines").json()["items"]
    assert (line["label"], line["vat_rate"], line["currency_amount_before_tax"]) == (
        "Google Ads – janvier", "FR_200", "1250.40")
    entry = client.get("/ledger_entry_lines", params={"filter": flt(("date", "eq", "2026-01-12")),
                                                       "limit": 100}).json()["items"]
    assert sum(Decimal(x["debit"]) for x in entry) == sum(Decimal(x["credit"]) for x in entry) == Decimal("1500.48")
    accounts = client.get("/ledger_accounts", params={"filter": flt(("number", "start_with", "62"))}).json()
    assert sorted(a["number"] for a in accounts["items"]) == ["6226", "6231"]
    created = client.post("/ledger_accounts", json={"number": "6234", "label": "Salons"})
    assert created.status_code == 201
    assert client.post("/ledger_accounts", json={"number": "6234", "label": "Encore"}).status_code == 409


def test_exchange_rates_home_currency_and_no_invoice_link(sandbox: PennylaneSandbox, clock: ManualClock) -> None:
    """Invoices carry Pennylane's exchange_rate (euros per unit, the month's rate, 1 for the euro); the books are
    in euros; an invoice has no lasting address in the API (its PDF link expires), so no link."""
    ledger = make_ledger(sandbox, clock)
    cid = one_customer(ledger)
    eur = invoice_of(ledger, "LB-acme:E1", cid)
    usd = invoice_of(ledger, "LB-acme:U1", cid, "USD")
    by_id = {i.ledger_id: i for i in ledger.list_invoices()}
    assert by_id[eur].exchange_rate == Decimal(1)
    assert by_id[usd].exchange_rate == exchange_rate("USD", dt.date(2026, 1, 10))
    assert exchange_rate("USD", dt.date(2026, 1, 10)) != exchange_rate("USD", dt.date(2026, 3, 10))
    assert ledger.base_currency() == "EUR"
    assert ledger.invoice_url(by_id[eur]) is None


# == history and settlement =========================================================================

def small_book() -> Book:
    return generate_book(5, companies=12, deals=1)


def picked(book: Book) -> tuple[BookCompany, BookCompany, BookCompany]:
    eur = [c for c in book.companies if c.currency == "EUR" and c.vat_number and c.email]
    return eur[0], eur[1], eur[2]


def line(sku: str, qty: str, price: str, rate: str, discount: str = "0") -> BookLine:
    return BookLine(sku=sku, description=f"{sku} (historique)", quantity=Decimal(qty), unit_price=Decimal(price),
                    discount_percent=Decimal(discount), tax_rate=Decimal(rate))


def small_history(book: Book) -> History:
    a, b, c = picked(book)
    inv1 = HistoryInvoice(id="H000001", company_id=a.id, number="FA2025-00001", issue_date=dt.date(2025, 3, 3),
                          due_date=dt.date(2025, 4, 2), currency="EUR",
                          lines=(line("SVC-CONSULT-DAY", "2", "850.00", "20"),
                                 line("BOOK-GUIDE", "3", "34.00", "5.5", "10")),
                          payments=(HistoryPayment("H000001-P1", "H000001", dt.date(2025, 4, 20), Decimal("1000.00")),
                                    HistoryPayment("H000001-P2", "H000001", dt.date(2025, 5, 20),
                                                   Decimal("1136.85"))))
    inv2 = HistoryInvoice(id="H000002", company_id=b.id, number="FA2025-00002", issue_date=dt.date(2025, 6, 10),
                          due_date=dt.date(2025, 7, 10), currency="EUR",
                          lines=(line("LIC-SAAS-USER", "10", "39.90", "20"),))
    credit = HistoryCreditNote(id="HC00001", invoice_id="H000002", company_id=b.id, number="AV2025-0001",
                               issue_date=dt.date(2025, 6, 20), currency="EUR",
                               lines=(line("LIC-SAAS-USER", "2", "39.90", "20"),))
    expenses = (HistoryExpense("HE00001", "6231", dt.date(2025, 5, 31), Decimal("1200.00"), "EUR", "Google Ads"),
                HistoryExpense("HE00002", "6233", dt.date(2025, 9, 30), Decimal("3000.00"), "EUR", "Salon"),
                HistoryExpense("HE00003", "6411", dt.date(2025, 9, 30), Decimal("19500.00"), "EUR", "Salaires"))
    profiles = (PayerProfile(a.id, 10, 0.5, 0.0), PayerProfile(b.id, 40, 0.0, 0.0), PayerProfile(c.id, 0, 0.0, 0.0))
    return History(today=dt.date(2025, 12, 31), invoices=(inv1, inv2), credit_notes=(credit,), expenses=expenses,
                   profiles=profiles)


def test_history_is_loaded_as_the_company_past(sandbox: PennylaneSandbox, clock: ManualClock, tmp_path: Path) -> None:
    """Company customers carry the companies' names, VAT numbers, SIRENs, e-mails and addresses (no external
    number of the sync's); invoices keep the history's numbers and dates; payments are received on their days;
    the credit note credits its invoice; expenses are supplier invoices (payroll an entry of the miscellaneous
    journal); nothing old is in the changelog; loading twice adds nothing; the state survives save/load."""
    book = small_book()
    history = small_history(book)
    a, b, c = picked(book)
    counts = sandbox.load_history(book, history)
    assert counts == {"customers": 3, "invoices": 2, "payments": 2, "credit_notes": 1, "expenses": 3}
    assert set(sandbox.load_history(book, history).values()) == {0}
    ledger = make_ledger(sandbox, clock)
    customers = {x.name: x for x in ledger.list_customers()}
    assert set(customers) == {a.name, b.name, c.name}
    assert (customers[a.name].vat_number, customers[a.name].email, customers[a.name].company_id) == (
        a.vat_number, a.email, a.siren)
    raw = next(r for r in sandbox.customers() if r["name"] == a.name)
    assert raw["billing_address"]["postal_code"] == a.postal_code
    invoices = {i.number: i for i in ledger.list_invoices()}
    first, second = invoices["FA2025-00001"], invoices["FA2025-00002"]
    assert (first.issue_date, first.due_date, first.status, first.amount_due, first.ledger_total) == (
        dt.date(2025, 3, 3), dt.date(2025, 4, 2), "paid", Decimal("0.00"), Decimal("2136.85"))
    assert [(ln.tax_type, ln.quantity) for ln in first.lines] == [("FR_200", Decimal(2)), ("FR_55", Decimal(3))]
    assert second.amount_due == Decimal("478.80") - Decimal("95.76")
    assert sorted((p.date, p.amount) for p in ledger.list_payments()) == [
        (dt.date(2025, 4, 20), Decimal("1000.00")), (dt.date(2025, 5, 20), Decimal("1136.85"))]
    [note] = list(ledger.list_credit_notes())
    assert (note.number, note.total, note.allocations) == ("AV2025-0001", Decimal("95.76"), [
        CreditAllocation(invoice_ledger_id=second.ledger_id or "", amount=Decimal("95.76"),
                         date=dt.date(2025, 6, 20))])
    spend = sorted((e.account_code, e.net) for e in ledger.list_expenses(["6231", "6233", "6411"],
                                                                          dt.date(2025, 1, 1), history.today))
    assert spend == [("6231", Decimal("1200.00")), ("6233", Decimal("3000.00")), ("6411", Decimal("19500.00"))]
    recent = dt.datetime.fromtimestamp(clock.now(), dt.UTC) - dt.timedelta(days=20)
    assert list(ledger.list_invoices(recent)) == []
    assert api(sandbox).get("/changelogs/customer_invoices").json()["items"] == []
    sandbox.save(tmp_path / "pennylane.state")
    restored = PennylaneSandbox(clock=clock, requests_per_5s=1000)
    assert restored.load(tmp_path / "pennylane.state")
    assert [r["InvoiceNumber"] for r in restored.ledger_view()] == ["FA2025-00001", "FA2025-00002"]
    assert (restored.stats()["credit_notes"], restored.stats()["supplier_invoices"]) == (1, 2)


def test_settle_pays_open_invoices_as_planned_once(sandbox: PennylaneSandbox, clock: ManualClock,
                                                   monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Open invoices are paid as the plan of their customer's profile says, up to the given day and never twice:
    the profile comes from the customer written with the history, else from a company of the same name, else
    none; a history invoice gets only the payments planned after the history's today; payments are received on
    their planned day but recorded now, so an incremental read sees them."""
    calls: dict[str, str | None] = {}

    def plan(profile: PayerProfile | None, key: str, issue: dt.date, due: dt.date, total: Decimal,
             currency: str) -> list[tuple[dt.date, Decimal]]:
        calls[key] = profile.company_id if profile else None
        half = round_money(total / 2, currency)
        if key.startswith("H"):
            return [(due + dt.timedelta(days=10), half), (dt.date(2026, 1, 5), total - half)]
        return [(due - dt.timedelta(days=20), half), (due + dt.timedelta(days=10), total - half),
                (due + dt.timedelta(days=40), Decimal("5.00"))]

    monkeypatch.setattr(seedhistory, "payment_plan", plan)
    book = small_book()
    history = small_history(book)
    _a, b, c = picked(book)
    sandbox.load_history(book, history)
    sandbox.save(tmp_path / "state")
    # What settle needs of the history survives save/load.
    sandbox = PennylaneSandbox(clock=clock, requests_per_5s=1000, reference_lookup_delay_s=0)
    assert sandbox.load(tmp_path / "state")
    ledger = make_ledger(sandbox, clock)
    known = {x.name: x.ledger_id for x in ledger.list_customers()}
    mine = invoice_of(ledger, "LB-acme:S1", known[c.name])
    namesake = customer(77).model_copy(update={"name": b.name, "vat_number": None})
    same_name = invoice_of(ledger, "LB-acme:S2",
                           ledger.create_customers([("hubspot:C77", namesake)], "k")["hubspot:C77"].ledger_id)
    stranger = invoice_of(ledger, "LB-acme:S3", one_customer(ledger))
    since = dt.datetime.fromtimestamp(clock.now(), dt.UTC)
    clock.advance(60)
    assert sandbox.settle(dt.date(2026, 1, 19)) == 1  # the history's open invoice: the payment after its today
    assert sandbox.settle(dt.date(2026, 1, 20)) == 3
    assert sandbox.settle(dt.date(2026, 1, 20)) == 0
    assert (calls[mine], calls[same_name], calls[stranger], calls["H000002"]) == (c.id, b.id, None, b.id)
    assert "H000001" not in calls
    fresh = [p for p in ledger.list_payments(since) if p.invoice_ledger_id == mine]
    assert [(p.date, p.amount) for p in fresh] == [(dt.date(2026, 1, 20), round_money(TOTAL / 2, "EUR"))]
    admin = httpx.Client(transport=sandbox.transport(), base_url="https://app.pennylane.com")
    assert admin.post("/_sandbox/settle", json={"today": "2026-03-31"}).json() == {"payments": 3,
                                                                                  "today": "2026-03-31"}
    assert admin.post("/_sandbox/settle", json={"today": "2026-06-30"}).json()["payments"] == 0
    due = {i.ledger_id: i.amount_due for i in ledger.list_invoices()}
    assert (due[mine], due[same_name], due[stranger]) == (Decimal(0), Decimal(0), Decimal(0))
    assert admin.post("/_sandbox/settle", json={"today": "31/03/2026"}).status_code == 400


def test_a_generated_history_reads_back_whole() -> None:
    """A generated history of 60 companies reads back through the connector: every invoice, payment, credit note
    (crediting the invoice it corrects) and expense."""
    clock = ManualClock()
    sandbox = PennylaneSandbox(clock=clock, seed=2, requests_per_5s=100_000)
    book = generate_book(3, companies=60, deals=120)
    history = seedhistory.generate_history(book, today=dt.date(2025, 12, 31), years=2)
    sandbox.load_history(book, history)
    ledger = make_ledger(sandbox, clock)
    invoices = {i.number: i for i in ledger.list_invoices()}
    assert set(invoices) == {h.number for h in history.invoices}
    assert sorted((p.date, p.amount) for p in ledger.list_payments()) == sorted(
        (p.date, p.amount) for h in history.invoices for p in h.payments)
    by_id = {h.id: h.number for h in history.invoices}
    notes = {n.number: n for n in ledger.list_credit_notes()}
    assert set(notes) == {c.number for c in history.credit_notes}
    for credit in history.credit_notes:
        note = notes[credit.number]
        assert note.credited_invoice_ledger_id == invoices[by_id[credit.invoice_id]].ledger_id
        assert [a.amount for a in note.allocations] == [note.total]
    codes = sorted({e.account_code for e in history.expenses})
    spend = list(ledger.list_expenses(codes, dt.date(2023, 1, 1), history.today))
    assert sum((e.net for e in spend), Decimal(0)) == sum((e.net for e in history.expenses), Decimal(0))
