"""A ledger history loaded into the Xero sandbox, settling invoices as customers pay, and the spec of the documents
the metrics read (credit notes, allocations, bills, spend money)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_core import Config, OpenAPI

from config.loader import load_config
from connectors import seedhistory
from connectors.domain import round_money
from connectors.seedbook import PRODUCTS, Book, BookCompany, BookLine, generate_book
from connectors.seedhistory import (
    History,
    HistoryCreditNote,
    HistoryExpense,
    HistoryInvoice,
    HistoryPayment,
    PayerProfile,
    book_customer,
    generate_history,
)
from connectors.xero import XeroLedger, wire
from connectors.xero.sandbox import API_PREFIX, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, XeroSandbox, sales_account
from connectors.xero.settings import XeroSettings
from connectors.xero.testing import ManualClock, MemoryTokenStore
from sync.reconcile import CustomerIndex
from tests.contract.test_xero_spec import SPEC, Recorder, check

ROOT = Path(__file__).resolve().parents[2]
TODAY = dt.date(2026, 1, 15)
D = Decimal
CONSULT = BookLine("SVC-CONSULT-DAY", "Journée de conseil", D("2"), D("850.00"), D("0"), D("20"))
LAPTOP = BookLine("HW-LAPTOP-14", "Ordinateur portable 14 pouces", D("1"), D("1149.00"), D("10"), D("20"))
GUIDE = BookLine("BOOK-GUIDE", "Guide pratique", D("3"), D("34.00"), D("0"), D("5.5"))
HALF_DAY = BookLine("SVC-CONSULT-DAY", "Journée de conseil (avoir)", D("0.5"), D("850.00"), D("0"), D("20"))
USD_DAY = BookLine("SVC-CONSULT-DAY", "Consulting day", D("1"), D("918.00"), D("0"), D("20"))


def make_ledger(sandbox: XeroSandbox, clock: ManualClock, transport: httpx.BaseTransport | None = None) -> XeroLedger:
    settings = XeroSettings(tenant_id=sandbox.tenant_id, client_id=DEMO_CLIENT_ID, client_secret=DEMO_CLIENT_SECRET,
                            refresh_token=sandbox.issue_tokens()["refresh_token"])
    return XeroLedger(settings, MemoryTokenStore(), transport=transport or sandbox.transport(), clock=clock.now)


@pytest.fixture(scope="module")
def book() -> Book:
    return generate_book(5, companies=30, deals=1)


def companies(book: Book) -> tuple[BookCompany, BookCompany, BookCompany]:
    fr = [c for c in book.companies if c.country == "FR" and c.vat_number and c.domain and c.email and c.siret]
    us = next(c for c in book.companies if c.currency == "USD")
    return fr[0], fr[1], us


def small_history(book: Book) -> History:
    """Four invoices of three companies (paid in two instalments; credited then paid; open; USD part paid), one
    credit note, three expenses (one on an account the organisation does not have yet) and three payer profiles."""
    first, second, us = companies(book)
    return History(
        today=TODAY,
        invoices=(
            HistoryInvoice("H000001", first.id, "FA2025-00001", dt.date(2025, 3, 3), dt.date(2025, 4, 2), "EUR",
                           (CONSULT, LAPTOP, GUIDE),
                           (HistoryPayment("H000001-P1", "H000001", dt.date(2025, 4, 10), D("1000.00")),
                            HistoryPayment("H000001-P2", "H000001", dt.date(2025, 5, 15), D("2388.53")))),
            HistoryInvoice("H000002", first.id, "FA2025-00002", dt.date(2025, 11, 3), dt.date(2025, 12, 3), "EUR",
                           (CONSULT,), (HistoryPayment("H000002-P1", "H000002", dt.date(2025, 12, 20), D("1530.00")),)),
            HistoryInvoice("H000003", second.id, "FA2025-00003", dt.date(2025, 12, 15), dt.date(2026, 1, 14), "EUR",
                           (CONSULT,)),
            HistoryInvoice("H000004", us.id, "FA2025-00004", dt.date(2025, 10, 1), dt.date(2025, 10, 31), "USD",
                           (USD_DAY,), (HistoryPayment("H000004-P1", "H000004", dt.date(2025, 11, 5), D("500.00")),)),
        ),
        credit_notes=(HistoryCreditNote("HC00001", "H000002", first.id, "AV2025-0001", dt.date(2025, 11, 10), "EUR",
                                        (HALF_DAY,)),),
        expenses=(
            HistoryExpense("HE00001", "6231", dt.date(2025, 12, 31), D("2800.00"), "EUR", "Google Ads – 12/2025"),
            HistoryExpense("HE00002", "6411", dt.date(2025, 12, 31), D("19500.00"), "EUR", "Salaires – 12/2025"),
            HistoryExpense("HE00003", "6185", dt.date(2025, 12, 31), D("120.00"), "EUR", "Documentation – 12/2025"),
        ),
        profiles=(PayerProfile(first.id, 0, 0.5, 0.0), PayerProfile(second.id, 45, 0.0, 0.05),
                  PayerProfile(us.id, 10, 0.0, 0.0)),
    )


def test_history_is_loaded_as_xero_holds_it_and_the_sync_finds_its_contacts(book: Book) -> None:
    """Contacts the sync matches by VAT number, domain, e-mail and name; invoices with the history's numbers, dates,
    demo accounts and tax types, paid or part paid on the history's dates; the credit note allocated to its invoice;
    bills and spend money on the expense accounts. Loading again adds nothing."""
    clock = ManualClock()
    sandbox = XeroSandbox(clock=clock, seed=4)
    history = small_history(book)
    counts = sandbox.load_history(book, history)
    assert counts == {"contacts": 3, "invoices": 4, "payments": 4, "credit_notes": 1, "allocations": 1, "bills": 2,
                      "spend": 1, "accounts": 1}
    ledger = make_ledger(sandbox, clock)
    customers = list(ledger.list_customers())
    index = CustomerIndex(customers)
    first, second, us = companies(book)
    for company in (first, second, us):
        [contact] = [c for c in sandbox.contacts() if c["Name"] == company.name]
        sent = book_customer(company)
        assert contact["EmailAddress"] == sent.email
        assert contact.get("TaxNumber") == sent.vat_number
        assert contact.get("CompanyNumber") == (sent.siret or sent.siren)
        assert contact["Addresses"] == [{"AddressType": "POBOX", "AddressLine1": company.address, "City": company.city,
                                         "PostalCode": company.postal_code, "Country": company.country}]
        assert contact["DefaultCurrency"] == company.currency
        assert "ContactNumber" not in contact  # created before the sync: no CRM number yet
        keys = ["vat_number", "domain", "email", "name"] if company.vat_number else ["domain", "email", "name"]
        for key in keys:
            found, how = index.match(sent, f"CRM-{company.id}", [key])
            assert (found.ledger_id if found else None, how) == (contact["ContactID"], key), (company.id, key)

    invoices = {i.number: i for i in ledger.list_invoices()}
    assert set(invoices) == {"FA2025-00001", "FA2025-00002", "FA2025-00003", "FA2025-00004"}
    one = invoices["FA2025-00001"]
    assert (one.issue_date, one.due_date, one.status, one.ledger_total, one.amount_paid, one.amount_due) == (
        dt.date(2025, 3, 3), dt.date(2025, 4, 2), "paid", D("3388.53"), D("3388.53"), D(0))
    assert [(ln.item_code, ln.account_code, ln.tax_type) for ln in one.lines] == [
        ("SVC-CONSULT-DAY", "706", "TAX001"), ("HW-LAPTOP-14", "707", "TAX001"), ("BOOK-GUIDE", "707", "TAX003")]
    assert [ln.discount_percent for ln in one.lines] == [D(0), D(10), D(0)]
    two = invoices["FA2025-00002"]
    assert (two.status, two.amount_paid, two.amount_due) == ("paid", D("1530.00"), D(0))
    three = invoices["FA2025-00003"]
    assert (three.status, three.amount_due, three.customer_ledger_id) == ("authorised", D("2040.00"), next(
        c.ledger_id for c in customers if c.name == second.name))
    four = invoices["FA2025-00004"]
    assert (four.currency, four.status, four.amount_due) == ("USD", "authorised", D("1101.60") - D("500.00"))
    assert four.exchange_rate is not None
    assert D("0.85") < four.exchange_rate < 1
    payments = sorted((p.date, p.amount) for p in ledger.list_payments())
    assert payments == [(dt.date(2025, 4, 10), D("1000.00")), (dt.date(2025, 5, 15), D("2388.53")),
                        (dt.date(2025, 11, 5), D("500.00")), (dt.date(2025, 12, 20), D("1530.00"))]
    [note] = ledger.list_credit_notes()
    assert (note.number, note.issue_date, note.total, note.remaining, note.status) == (
        "AV2025-0001", dt.date(2025, 11, 10), D("510.00"), D(0), "paid")
    assert [(a.invoice_ledger_id, a.amount, a.date) for a in note.allocations] == [
        (two.ledger_id, D("510.00"), dt.date(2025, 11, 10))]
    spend = sorted((e.account_code, e.net, e.date) for e in ledger.list_expenses(
        ["6231", "6411", "6185"], dt.date(2025, 12, 1), dt.date(2025, 12, 31)))
    assert spend == [("6185", D("120.00"), dt.date(2025, 12, 31)), ("6231", D("2800.00"), dt.date(2025, 12, 31)),
                     ("6411", D("19500.00"), dt.date(2025, 12, 31))]
    before = (sandbox.contacts(), sandbox.invoices(), sandbox.payments(), sandbox.credit_notes(),
              sandbox.bank_transactions())
    assert sandbox.load_history(book, history) == {}
    assert (sandbox.contacts(), sandbox.invoices(), sandbox.payments(), sandbox.credit_notes(),
            sandbox.bank_transactions()) == before


def test_history_lines_use_the_demo_configuration_accounts_and_tax_types() -> None:
    """Every catalogue product is booked to the account the demo config maps it to; every rate has its tax type."""
    pipeline = load_config(ROOT / "config" / "examples" / "demo.yaml").app.pipelines["acme-fr"]
    assert {p.sku: sales_account(p.sku) for p in PRODUCTS} == {
        sku: target.account_code for sku, target in pipeline.items.map.items()}
    sandbox = XeroSandbox()
    token = sandbox.issue_tokens()["access_token"]
    with httpx.Client(transport=sandbox.transport()) as http:
        answer = http.get(f"https://api.xero.com{API_PREFIX}/TaxRates",
                          headers={"Authorization": f"Bearer {token}", "xero-tenant-id": sandbox.tenant_id})
    rates = {Decimal(str(r["EffectiveRate"])): r["TaxType"] for r in wire.loads(answer.content)["TaxRates"]}
    assert {rate: rates[rate] for rate in pipeline.taxes.map} == dict(pipeline.taxes.map)


def test_settle_records_the_planned_payments_due_by_today_once(book: Book, monkeypatch: pytest.MonkeyPatch) -> None:
    """settle(today) asks the plan of every open invoice with its contact's profile (by contact, else by the company
    name, else none), records the planned payments dated up to today (never those the history already decided),
    cuts one down to what is still due, and records nothing twice; the admin endpoint does the same."""
    clock = ManualClock()
    sandbox = XeroSandbox(clock=clock, seed=6, access_token_ttl_s=10 * 86400)
    sandbox.load_history(book, small_history(book))
    first, second, us = companies(book)
    asked: list[tuple[str | None, str, dt.date, dt.date, Decimal, str]] = []

    def plan(profile: PayerProfile | None, key: str, issue: dt.date, due: dt.date, total: Decimal,
             currency: str) -> list[tuple[dt.date, Decimal]]:
        asked.append((profile.company_id if profile else None, key, issue, due, total, currency))
        half = round_money(total / 2, currency)
        return [(issue + dt.timedelta(days=10), half), (due + dt.timedelta(days=5), total - half)]

    monkeypatch.setattr(seedhistory, "payment_plan", plan)
    ledger = make_ledger(sandbox, clock)
    suffixed = ledger.create_customers([("CRM-1", book_customer(first).model_copy(
        update={"name": f"{first.name} (CRM-1)"}))], "k-c1")["CRM-1"].ledger_id
    stranger = ledger.create_customers([("CRM-2", book_customer(first).model_copy(
        update={"name": "Inconnu SARL"}))], "k-c2")["CRM-2"].ledger_id
    second_id = next(c["ContactID"] for c in sandbox.contacts() if c["Name"] == second.name)
    created = {}
    for name, contact in (("own", second_id), ("suffixed", suffixed), ("stranger", stranger)):
        created[name] = sandbox_invoice(sandbox, contact, name)
    credited = created["own"]
    sandbox.create_credit_note(credited["InvoiceID"], D("1500.00"), dt.date(2026, 1, 12))

    recorded = sandbox.settle(dt.date(2026, 1, 25))
    by_key = {a[1]: a for a in asked}
    assert by_key["H000003"] == (second.id, "H000003", dt.date(2025, 12, 15), dt.date(2026, 1, 14), D("2040.00"),
                                 "EUR")
    assert by_key["H000004"][0] == us.id
    assert by_key[created["suffixed"]["InvoiceID"]][0] == first.id
    assert by_key[created["stranger"]["InvoiceID"]][0] is None
    assert by_key[credited["InvoiceID"]][0] == second.id
    assert len(asked) == 5  # the paid history invoices are not asked about
    got = sorted((p["InvoiceID"], p["Date"], p["Amount"]) for p in recorded)
    history_three = sandbox_invoice_by_number(sandbox, "FA2025-00003")
    assert got == sorted([
        # H000003: its first instalment (2025-12-25) falls in the history, which left it unpaid; the second is due.
        (history_three["InvoiceID"], dt.date(2026, 1, 19), D("1020.00")),
        # Invoices issued 2026-01-05, due 2026-02-04: the first halves; the credited one is cut to what is due.
        (created["own"]["InvoiceID"], dt.date(2026, 1, 15), D("540.00")),
        (created["suffixed"]["InvoiceID"], dt.date(2026, 1, 15), D("1020.00")),
        (created["stranger"]["InvoiceID"], dt.date(2026, 1, 15), D("1020.00")),
    ])
    assert sandbox.settle(dt.date(2026, 1, 25)) == []
    http = httpx.Client(transport=sandbox.transport(), base_url="http://sandbox")
    answer = http.post("/_sandbox/settle", content=b'{"today": "2026-02-28"}')
    assert answer.status_code == 200
    assert answer.json()["recorded"] == 2  # the second halves of the two uncredited invoices
    assert http.post("/_sandbox/settle", content=b'{"today": "2026-02-28"}').json()["recorded"] == 0
    assert http.post("/_sandbox/settle", content=b'{"today": "soon"}').status_code == 400
    statuses = {i["InvoiceID"]: i["Status"] for i in sandbox.invoices()}
    assert [statuses[created[n]["InvoiceID"]] for n in ("own", "suffixed", "stranger")] == ["PAID", "PAID", "PAID"]
    assert statuses[history_three["InvoiceID"]] == "AUTHORISED"  # half of it was planned within the history


def sandbox_invoice(sandbox: XeroSandbox, contact_id: str, ref: str) -> dict[str, Any]:
    """An invoice of 2,040.00 EUR issued 2026-01-05, due 2026-02-04, as the sync creates them."""
    token = sandbox.issue_tokens()["access_token"]
    body = {"Type": "ACCREC", "Contact": {"ContactID": contact_id}, "Date": "2026-01-05", "DueDate": "2026-02-04",
            "Reference": ref, "Status": "AUTHORISED", "LineItems": [
                {"Description": "Conseil", "Quantity": 2, "UnitAmount": D("850.00"), "AccountCode": "706",
                 "TaxType": "TAX001"}]}
    with httpx.Client(transport=sandbox.transport()) as http:
        answer = http.put(f"https://api.xero.com{API_PREFIX}/Invoices", content=wire.dumps(body),
                          headers={"Authorization": f"Bearer {token}", "xero-tenant-id": sandbox.tenant_id})
    created: dict[str, Any] = wire.loads(answer.content)["Invoices"][0]
    assert created["Total"] == D("2040.00")
    return created


def sandbox_invoice_by_number(sandbox: XeroSandbox, number: str) -> dict[str, Any]:
    return next(i for i in sandbox.invoices() if i["InvoiceNumber"] == number)


def test_a_generated_history_settles_the_same_after_a_save_and_load(book: Book, tmp_path: Path) -> None:
    """With the real payment plans: a saved and reloaded sandbox (profiles and plan keys included) settles exactly
    as the original; payments fall after the history's today and never exceed what is due; twice adds nothing."""
    big = generate_book(5, companies=60, deals=1)
    history = generate_history(big, seed=2, today=TODAY)
    clock = ManualClock()
    first = XeroSandbox(clock=clock, seed=8)
    counts = first.load_history(big, history)
    assert counts["invoices"] == len(history.invoices)
    assert counts["payments"] == sum(len(i.payments) for i in history.invoices)
    first.save(tmp_path / "xero.bin")
    second = XeroSandbox(clock=clock, seed=8)
    assert second.load(tmp_path / "xero.bin")
    later = TODAY + dt.timedelta(days=120)
    ours = [(p["InvoiceID"], p["Date"], p["Amount"]) for p in first.settle(later)]
    theirs = [(p["InvoiceID"], p["Date"], p["Amount"]) for p in second.settle(later)]
    assert ours == theirs
    assert ours
    assert all(TODAY < day <= later and amount > 0 for _, day, amount in ours)
    assert all(i["AmountDue"] >= 0 for i in first.invoices())
    assert first.settle(later) == []


@pytest.mark.filterwarnings("ignore:Unsupported scheme type:UserWarning")
def test_credit_notes_allocations_and_purchases_follow_the_spec() -> None:
    """CreditNotes PUT/POST/GET, Allocations PUT/DELETE, BankTransactions PUT/GET and the adapter's reads of credit
    notes and expenses validate against Xero's OpenAPI spec."""
    spec = OpenAPI.from_file_path(str(SPEC), config=Config(spec_validator_cls=None))
    clock = ManualClock()
    sandbox = XeroSandbox(clock=clock, seed=12)
    recorder = Recorder(sandbox)
    ledger = make_ledger(sandbox, clock, transport=httpx.MockTransport(recorder))
    token = sandbox.issue_tokens()["access_token"]
    http = httpx.Client(transport=httpx.MockTransport(recorder), base_url="https://api.xero.com" + API_PREFIX,
                        headers={"Authorization": f"Bearer {token}", "xero-tenant-id": sandbox.tenant_id,
                                 "Accept": "application/json", "Content-Type": "application/json"})

    def put(path: str, body: Any) -> Any:
        resp = http.put(path, content=wire.dumps(body))
        assert resp.status_code == 200, resp.text
        return wire.loads(resp.content)

    contact = put("/Contacts", {"Contacts": [{"Name": "Lefèvre SA"}]})["Contacts"][0]["ContactID"]
    line = {"Description": "Conseil", "Quantity": 1, "UnitAmount": D("850.00"), "AccountCode": "706",
            "TaxType": "TAX001"}
    invoice = put("/Invoices", {"Invoices": [{"Type": "ACCREC", "Contact": {"ContactID": contact},
                                              "Status": "AUTHORISED", "Date": "2026-01-05", "CurrencyCode": "USD",
                                              "LineItems": [line]}]})["Invoices"][0]
    note = put("/CreditNotes", {"CreditNotes": [{"Type": "ACCRECCREDIT", "Contact": {"ContactID": contact},
                                                 "Status": "AUTHORISED", "Date": "2026-01-06", "CurrencyCode": "USD",
                                                 "LineItems": [dict(line, UnitAmount=D("100.00"))]}]})
    note_id = note["CreditNotes"][0]["CreditNoteID"]
    allocation = put(f"/CreditNotes/{note_id}/Allocations", {"Allocations": [
        {"Invoice": {"InvoiceID": invoice["InvoiceID"]}, "Amount": D("60.00"), "Date": "2026-01-07"}]})
    assert http.get(f"/CreditNotes/{note_id}").status_code == 200
    assert http.get(f"/Invoices/{invoice['InvoiceID']}").json()["Invoices"][0]["CreditNotes"]
    assert [n.allocations[0].amount for n in ledger.list_credit_notes()] == [D("60.00")]
    removed = http.delete(f"/CreditNotes/{note_id}/Allocations/{allocation['Allocations'][0]['AllocationID']}")
    assert removed.status_code == 200
    voided = http.post(f"/CreditNotes/{note_id}", content=wire.dumps({"CreditNotes": [{"Status": "VOIDED"}]}))
    assert voided.json()["CreditNotes"][0]["Status"] == "VOIDED"
    spend = {"Type": "SPEND", "Contact": {"ContactID": contact}, "BankAccount": {"Code": "512"}, "Date": "2026-01-08",
             "LineItems": [dict(line, AccountCode="6231")]}
    put("/BankTransactions", {"BankTransactions": [spend]})
    put("/Invoices", {"Invoices": [{"Type": "ACCPAY", "Contact": {"ContactID": contact}, "Status": "AUTHORISED",
                                    "Date": "2026-01-09", "InvoiceNumber": "F-123",
                                    "LineItems": [dict(line, AccountCode="6231")]}]})
    lines = list(ledger.list_expenses(["6231"], dt.date(2026, 1, 1), dt.date(2026, 1, 31)))
    assert sorted(ln.date for ln in lines) == [dt.date(2026, 1, 8), dt.date(2026, 1, 9)]
    assert {"PUT /CreditNotes", "GET /CreditNotes", f"PUT /CreditNotes/{note_id}/Allocations",
            f"DELETE /CreditNotes/{note_id}/Allocations/{allocation['Allocations'][0]['AllocationID']}",
            f"POST /CreditNotes/{note_id}", "PUT /BankTransactions", "GET /BankTransactions"} <= recorder.operations()
    check(spec, recorder.exchanges)
