"""QuickBooks ledger facts for the metrics: credit memos and their allocations, cash-only payments, expense lines,
exchange rates, the home currency and invoice links; the sandbox's history loading and settlement."""

from __future__ import annotations

import dataclasses
import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors import seedhistory
from connectors.domain import CreditAllocation, round_money
from connectors.quickbooks import QuickBooksLedger
from connectors.quickbooks.sandbox import QuickBooksSandbox, exchange_rate
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
from tests.unit.test_quickbooks_adapter import customer, make_ledger, one_customer, request

BASE = "https://quickbooks.api.intuit.com"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def sandbox(clock: ManualClock) -> QuickBooksSandbox:
    return QuickBooksSandbox(clock=clock, seed=13)


class Api:
    """A bare client of the sandbox company."""

    def __init__(self, sandbox: QuickBooksSandbox) -> None:
        token = sandbox.issue_tokens()["access_token"]
        self.http = httpx.Client(transport=sandbox.transport(), base_url=f"{BASE}/v3/company/{sandbox.realm_id}",
                                 headers={"Authorization": f"Bearer {token}"})

    def post(self, entity: str, body: dict[str, Any], **params: str) -> httpx.Response:
        return self.http.post(f"/{entity}", json=body, params={"minorversion": "75", **params})

    def query(self, statement: str) -> dict[str, Any]:
        resp = self.http.post("/query", content=statement.encode(), headers={"Content-Type": "application/text"})
        assert resp.status_code == 200, resp.text
        out: dict[str, Any] = resp.json()["QueryResponse"]
        return out


def code(resp: httpx.Response) -> str:
    return str(resp.json()["Fault"]["Error"][0]["code"])


def invoice_of(ledger: QuickBooksLedger, ref: str, customer_id: str, currency: str = "EUR") -> str:
    outcome = ledger.create_invoices([request(ref, customer_id, currency=currency)], "b")[0]
    assert outcome.ok
    assert outcome.invoice is not None
    assert outcome.invoice.ledger_id
    return outcome.invoice.ledger_id


# == credit memos and payments ======================================================================

def test_a_credit_memo_applied_by_a_payment_of_no_money_is_a_credit_not_a_payment(
        sandbox: QuickBooksSandbox, clock: ManualClock) -> None:
    """The $0 payment linking the invoice and the memo yields no Payment; the memo comes back with its allocation,
    the invoice's amount due goes down by it; a payment mixing cash and credit reports only the cash."""
    ledger = make_ledger(sandbox, clock)
    cid = one_customer(ledger)
    inv_id = invoice_of(ledger, "LB-acme:D1", cid)
    total = Decimal(sandbox.raw_invoice(inv_id)["TotalAmt"])  # type: ignore[index]
    memo = sandbox.credit_invoice(inv_id, net=Decimal("100.00"), day=dt.date(2026, 1, 20))
    assert (memo["TotalAmt"], memo["Balance"], memo["RemainingCredit"]) == (Decimal("120.00"), Decimal("0.00"),
                                                                           Decimal("0.00"))
    applying = sandbox.payments()[-1]
    assert applying["TotalAmt"] == 0
    assert len(applying["Line"]) == 2
    assert list(ledger.list_payments()) == []
    invoice = next(i for i in ledger.list_invoices() if i.ledger_id == inv_id)
    assert invoice.amount_due == total - Decimal("120.00")

    # A second memo, left unapplied, then used with 200.00 of cash in one payment.
    second = sandbox.credit_invoice(inv_id, net=Decimal("50.00"), day=dt.date(2026, 1, 25), apply=False)
    assert second["Balance"] == Decimal("60.00")
    clock.advance(3600)
    since = dt.datetime.fromtimestamp(clock.now(), dt.UTC)
    clock.advance(60)
    api = Api(sandbox)
    resp = api.post("payment", {
        "CustomerRef": {"value": cid}, "TotalAmt": "200.00", "TxnDate": "2026-01-28",
        "Line": [{"Amount": "260.00", "LinkedTxn": [{"TxnId": inv_id, "TxnType": "Invoice"}]},
                 {"Amount": "60.00", "LinkedTxn": [{"TxnId": second["Id"], "TxnType": "CreditMemo"}]}]})
    assert resp.status_code == 200, resp.text
    payments = list(ledger.list_payments())
    assert [(p.invoice_ledger_id, p.amount, p.date) for p in payments] == [(inv_id, Decimal("200.00"),
                                                                           dt.date(2026, 1, 28))]
    notes = {n.ledger_id: n for n in ledger.list_credit_notes()}
    first = notes[memo["Id"]]
    assert (first.total, first.subtotal, first.remaining, first.status, first.customer_ledger_id) == (
        Decimal("120.00"), Decimal("100.00"), Decimal("0.00"), "paid", cid)
    assert first.allocations == [CreditAllocation(invoice_ledger_id=inv_id, amount=Decimal("120.00"),
                                                  date=dt.date(2026, 1, 20))]
    assert notes[second["Id"]].allocations == [CreditAllocation(invoice_ledger_id=inv_id, amount=Decimal("60.00"),
                                                                date=dt.date(2026, 1, 28))]
    assert first.exchange_rate == Decimal(1)
    # Incremental: only what changed since (the second memo, applied by the new payment), with all its allocations.
    recent = list(ledger.list_credit_notes(since))
    assert [n.ledger_id for n in recent] == [second["Id"]]
    assert recent[0].allocations == notes[second["Id"]].allocations
    assert [p.amount for p in ledger.list_payments(since)] == [Decimal("200.00")]


def test_credit_memo_faults_and_reads(sandbox: QuickBooksSandbox, clock: ManualClock) -> None:
    """A memo of another customer, more credit than the memo holds or than the invoices take, is refused (6000);
    memos are read by id, by query and through change data capture; an applied memo cannot be deleted."""
    ledger = make_ledger(sandbox, clock)
    cid = one_customer(ledger)
    other = ledger.create_customers([("LB-hubspot-9", customer(9, vat="FR83404833048"))], "c9")["LB-hubspot-9"]
    inv_id = invoice_of(ledger, "LB-acme:D2", cid)
    memo = sandbox.credit_invoice(inv_id, net=Decimal("10.00"), apply=False)
    foreign = sandbox.credit_invoice(invoice_of(ledger, "LB-acme:D3", other.ledger_id), net=Decimal("10.00"),
                                     apply=False)
    api = Api(sandbox)

    def pay(invoice_amount: str, credit_amount: str, memo_id: str, total: str = "0") -> httpx.Response:
        return api.post("payment", {"CustomerRef": {"value": cid}, "TotalAmt": total, "Line": [
            {"Amount": invoice_amount, "LinkedTxn": [{"TxnId": inv_id, "TxnType": "Invoice"}]},
            {"Amount": credit_amount, "LinkedTxn": [{"TxnId": memo_id, "TxnType": "CreditMemo"}]}]})

    assert code(pay("12.00", "12.00", foreign["Id"])) == "6000"
    assert code(pay("13.00", "13.00", memo["Id"])) == "6000"  # the memo holds 12.00
    assert code(pay("5.00", "12.00", memo["Id"])) == "6000"  # more credit than the invoice takes
    assert code(pay("20.00", "12.00", memo["Id"])) == "6000"  # 8.00 of cash missing from TotalAmt
    assert pay("20.00", "12.00", memo["Id"], total="8.00").status_code == 200
    got = api.http.get(f"/creditmemo/{memo['Id']}").json()["CreditMemo"]
    assert got["Balance"] == 0
    assert got["LinkedTxn"][0]["TxnType"] == "Payment"
    assert [m["Id"] for m in api.query("SELECT * FROM CreditMemo WHERE Balance > '0'")["CreditMemo"]] == [
        foreign["Id"]]
    changed = api.http.get("/cdc", params={"entities": "CreditMemo", "changedSince": "2025-12-31T00:00:00Z"}).json()
    assert len(changed["CDCResponse"][0]["QueryResponse"][0]["CreditMemo"]) == 2
    delete = api.post("creditmemo", {"Id": memo["Id"], "SyncToken": got["SyncToken"]}, operation="delete")
    assert code(delete) == "6000"


# == expenses, rates, currency, links ===============================================================

def test_expense_lines_by_account_number_or_id_within_the_dates(sandbox: QuickBooksSandbox,
                                                                 clock: ManualClock) -> None:
    """Bill and Purchase lines booked to the asked accounts (AcctNum, or Id of an account without one), dated in
    [start, end]; a card refund is negative; foreign-currency lines carry their rate; other accounts are left out."""
    ledger = make_ledger(sandbox, clock)
    api = Api(sandbox)
    bill = sandbox.add_expense("6231", dt.date(2026, 1, 5), Decimal("500.00"), description="Salon Big Data")
    sandbox.add_expense("6231", dt.date(2026, 1, 31), Decimal("80.00"), kind="Purchase", description="LinkedIn Ads")
    sandbox.add_expense("6231", dt.date(2026, 2, 1), Decimal("999.00"))  # after the window
    sandbox.add_expense("6226", dt.date(2026, 1, 12), Decimal("1500.00"))  # an account not asked for
    usd = sandbox.add_expense("6231", dt.date(2026, 1, 15), Decimal("300.00"), "USD")
    unnumbered = api.post("account", {"Name": "Salons et événements", "AccountType": "Expense"}).json()["Account"]
    refund = api.post("purchase", {
        "PaymentType": "CreditCard", "AccountRef": {"value": "10"}, "Credit": True, "TxnDate": "2026-01-20",
        "Line": [{"DetailType": "AccountBasedExpenseLineDetail", "Amount": "45.00", "Description": "Remboursement",
                  "AccountBasedExpenseLineDetail": {"AccountRef": {"value": unnumbered["Id"]},
                                                    "TaxCodeRef": {"value": "2"}}}]})
    assert refund.status_code == 200, refund.text
    assert refund.json()["Purchase"]["TotalAmt"] == 54.0
    lines = sorted(ledger.list_expenses(["6231", unnumbered["Id"]], dt.date(2026, 1, 1), dt.date(2026, 1, 31)),
                   key=lambda e: e.date)
    assert [(e.account_code, e.date, e.net, e.currency) for e in lines] == [
        ("6231", dt.date(2026, 1, 5), Decimal("500.00"), "EUR"),
        ("6231", dt.date(2026, 1, 15), Decimal("300.00"), "USD"),
        (unnumbered["Id"], dt.date(2026, 1, 20), Decimal("-45.00"), "EUR"),
        ("6231", dt.date(2026, 1, 31), Decimal("80.00"), "EUR"),
    ]
    assert lines[0].ledger_id == f"Bill:{bill['Id']}:1"
    assert lines[0].description == "Salon Big Data"
    assert lines[1].exchange_rate == Decimal(str(usd["ExchangeRate"])) == exchange_rate("USD", dt.date(2026, 1, 15))
    assert list(ledger.list_expenses(["7777"], dt.date(2026, 1, 1), dt.date(2026, 12, 31))) == []
    assert list(ledger.list_expenses([], dt.date(2026, 1, 1), dt.date(2026, 12, 31))) == []
    # A bill needs a vendor; an expense line needs a known account.
    no_vendor = api.post("bill", {"Line": [{"DetailType": "AccountBasedExpenseLineDetail", "Amount": "1",
                                            "AccountBasedExpenseLineDetail": {"AccountRef": {"value": "7"}}}]})
    assert code(no_vendor) == "2020"
    bad_account = api.post("purchase", {"PaymentType": "Cash", "AccountRef": {"value": "4"}, "Line": [
        {"DetailType": "AccountBasedExpenseLineDetail", "Amount": "1",
         "AccountBasedExpenseLineDetail": {"AccountRef": {"value": "999"}}}]})
    assert code(bad_account) == "2500"


def test_exchange_rates_home_currency_and_invoice_links(sandbox: QuickBooksSandbox, clock: ManualClock) -> None:
    """Invoices carry QuickBooks' ExchangeRate (home units per foreign unit, the month's rate); the base currency is
    the company's home currency; the invoice link opens the web app (app_url is a setting)."""
    ledger = make_ledger(sandbox, clock)
    usd_id = invoice_of(ledger, "LB-acme:U1", one_customer(ledger, "USD"), "USD")
    by_id = {i.ledger_id: i for i in ledger.list_invoices()}
    assert by_id[usd_id].exchange_rate == exchange_rate("USD", dt.date(2026, 1, 10))
    assert exchange_rate("USD", dt.date(2026, 1, 10)) != exchange_rate("USD", dt.date(2026, 2, 10))
    assert exchange_rate("EUR", dt.date(2026, 1, 10)) == 1
    assert ledger.base_currency() == "EUR"
    assert ledger.invoice_url(by_id[usd_id]) == f"https://app.qbo.intuit.com/app/invoice?txnId={usd_id}"
    sandboxed = make_ledger(sandbox, clock, app_url="https://app.sandbox.qbo.intuit.com/")
    assert sandboxed.invoice_url(by_id[usd_id]) == f"https://app.sandbox.qbo.intuit.com/app/invoice?txnId={usd_id}"
    assert ledger.invoice_url(by_id[usd_id].model_copy(update={"ledger_id": None})) is None


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
    inv1 = HistoryInvoice(id="H000001", company_id=a.id, number="H-2025-0001", issue_date=dt.date(2025, 3, 3),
                          due_date=dt.date(2025, 4, 2), currency="EUR",
                          lines=(line("SVC-CONSULT-DAY", "2", "850.00", "20"),
                                 line("BOOK-GUIDE", "3", "34.00", "5.5", "10")),
                          payments=(HistoryPayment("P1", "H000001", dt.date(2025, 4, 20), Decimal("1000.00")),
                                    HistoryPayment("P2", "H000001", dt.date(2025, 5, 20), Decimal("1136.85"))))
    inv2 = HistoryInvoice(id="H000002", company_id=b.id, number="H-2025-0002", issue_date=dt.date(2025, 6, 10),
                          due_date=dt.date(2025, 7, 10), currency="EUR",
                          lines=(line("LIC-SAAS-USER", "10", "39.90", "20"),))
    credit = HistoryCreditNote(id="C000001", invoice_id="H000002", company_id=b.id, number="AV-2025-0001",
                               issue_date=dt.date(2025, 6, 20), currency="EUR",
                               lines=(line("LIC-SAAS-USER", "2", "39.90", "20"),))
    expenses = (HistoryExpense("E1", "6231", dt.date(2025, 5, 2), Decimal("1200.00"), "EUR", "Google Ads mai"),
                HistoryExpense("E2", "6233", dt.date(2025, 9, 15), Decimal("3000.00"), "EUR", "Salon VivaTech"),
                HistoryExpense("E3", "6411", dt.date(2025, 9, 30), Decimal("19500.00"), "EUR", "Salaires 09/2025"))
    profiles = (PayerProfile(a.id, 10, 0.5, 0.0), PayerProfile(b.id, 40, 0.0, 0.0),
                PayerProfile(c.id, 0, 0.0, 0.0))
    return History(today=dt.date(2025, 12, 31), invoices=(inv1, inv2), credit_notes=(credit,), expenses=expenses,
                   profiles=profiles)


def test_history_is_loaded_as_the_company_past(sandbox: QuickBooksSandbox, clock: ManualClock,
                                               tmp_path: Path) -> None:
    """Customers carry the companies' names, VAT numbers, e-mails and addresses (no external number); invoices keep
    their numbers, dates, items and tax codes; payments, the applied credit memo and the bills follow; every record
    is dated in the past, so change data capture of the last days shows none; the state survives save/load."""
    book = small_book()
    history = small_history(book)
    a, b, c = picked(book)
    counts = sandbox.load_history(book, history)
    assert counts == {"customers": 3, "invoices": 2, "payments": 2, "credit_notes": 1, "expenses": 3}
    assert set(sandbox.load_history(book, history).values()) == {0}  # loading again adds nothing
    ledger = make_ledger(sandbox, clock)
    customers = {x.name: x for x in ledger.list_customers()}
    assert set(customers) == {a.name, b.name, c.name}
    assert customers[a.name].vat_number == a.vat_number
    assert customers[a.name].email == a.email
    assert customers[a.name].number is None
    raw = next(r for r in sandbox.customers() if r["DisplayName"] == a.name)
    assert raw["BillAddr"]["Line1"] == a.address
    assert raw["BillAddr"]["PostalCode"] == a.postal_code
    invoices = {i.number: i for i in ledger.list_invoices()}
    first, second = invoices["H-2025-0001"], invoices["H-2025-0002"]
    assert (first.issue_date, first.due_date, first.status, first.amount_due) == (
        dt.date(2025, 3, 3), dt.date(2025, 4, 2), "paid", Decimal("0.00"))
    assert [(ln.item_code, ln.tax_type, ln.tax_rate) for ln in first.lines] == [
        ("SVC-CONSULT-DAY", "2", Decimal(20)), ("BOOK-GUIDE", "4", Decimal("5.5"))]
    assert first.ledger_total == Decimal("2136.85")
    assert second.amount_due == Decimal("478.80") - Decimal("95.76")
    assert first.customer_ledger_id == customers[a.name].ledger_id
    assert sorted((p.date, p.amount) for p in ledger.list_payments()) == [
        (dt.date(2025, 4, 20), Decimal("1000.00")), (dt.date(2025, 5, 20), Decimal("1136.85"))]
    notes = list(ledger.list_credit_notes())
    assert [(n.number, n.total, n.allocations) for n in notes] == [("AV-2025-0001", Decimal("95.76"), [
        CreditAllocation(invoice_ledger_id=second.ledger_id or "", amount=Decimal("95.76"),
                         date=dt.date(2025, 6, 20))])]
    spend = list(ledger.list_expenses(["6231", "6233", "6411"], dt.date(2025, 1, 1), dt.date(2025, 12, 31)))
    assert sorted((e.account_code, e.net, e.ledger_id.split(":")[0]) for e in spend) == [
        ("6231", Decimal("1200.00"), "Bill"), ("6233", Decimal("3000.00"), "Bill"),
        ("6411", Decimal("19500.00"), "Purchase")]  # salaries are paid from the bank, not billed
    recent = dt.datetime.fromtimestamp(clock.now(), dt.UTC) - dt.timedelta(days=20)
    assert list(ledger.list_invoices(recent)) == []
    assert list(ledger.list_credit_notes(recent)) == []
    raw_first = sandbox.raw_invoice(first.ledger_id or "")
    assert raw_first is not None
    assert raw_first["MetaData"]["CreateTime"].startswith("2025-03-03T12:00:00")

    sandbox.save(tmp_path / "qbo.state")
    restored = QuickBooksSandbox(clock=clock, seed=13)
    assert restored.load(tmp_path / "qbo.state")
    assert [i["InvoiceNumber"] for i in restored.invoices()] == ["H-2025-0001", "H-2025-0002"]
    assert restored.stats()["credit_memos"] == 1
    assert restored.stats()["bills"] == 2
    assert restored.stats()["purchases"] == 1


def test_a_generated_history_reads_back_whole() -> None:
    """A generated history of 60 companies reads back through the connector: every invoice, payment, credit memo
    (allocated to the invoice it corrects) and expense, with the history's amounts."""
    clock = ManualClock()
    sandbox = QuickBooksSandbox(clock=clock, seed=2)
    book = generate_book(3, companies=60, deals=120)
    history = seedhistory.generate_history(book, today=dt.date(2025, 12, 31), years=2)
    sandbox.load_history(book, history)
    ledger = make_ledger(sandbox, clock)
    invoices = {i.number: i for i in ledger.list_invoices()}
    assert set(invoices) == {h.number for h in history.invoices}
    payments = list(ledger.list_payments())
    assert sorted((p.date, p.amount) for p in payments) == sorted(
        (p.date, p.amount) for h in history.invoices for p in h.payments)
    by_id = {h.id: h.number for h in history.invoices}
    notes = {n.number: n for n in ledger.list_credit_notes()}
    assert set(notes) == {c.number for c in history.credit_notes}
    for credit in history.credit_notes:
        note = notes[credit.number]
        target = invoices[by_id[credit.invoice_id]].ledger_id
        assert [a.invoice_ledger_id for a in note.allocations] == [target]
        assert note.issue_date == credit.issue_date
    codes = sorted({e.account_code for e in history.expenses})
    spend = list(ledger.list_expenses(codes, dt.date(2023, 1, 1), history.today))
    assert sum((e.net for e in spend), Decimal(0)) == sum((e.net for e in history.expenses), Decimal(0))
    assert len(spend) == len(history.expenses)


def test_history_invoices_must_be_in_the_customer_currency(sandbox: QuickBooksSandbox) -> None:
    """A QuickBooks customer has one currency: an invoice of the history in another is refused, saying why."""
    book = small_book()
    history = small_history(book)
    odd = dataclasses.replace(history.invoices[1], currency="USD")
    with pytest.raises(ValueError, match="one currency"):
        sandbox.load_history(book, History(today=history.today, invoices=(history.invoices[0], odd),
                                           credit_notes=(), expenses=(), profiles=history.profiles))


def test_settle_pays_open_invoices_as_planned_once(sandbox: QuickBooksSandbox, clock: ManualClock,
                                                   monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Open invoices are paid as the plan of their customer's profile says, up to the given day and never twice:
    the profile comes from the customer written with the history, else from a company of the same name, else
    none; history invoices continue their plan after the payments already loaded; the admin call does the same."""
    calls: list[tuple[str | None, str, Decimal]] = []

    def plan(profile: PayerProfile | None, key: str, issue: dt.date, due: dt.date, total: Decimal,
             currency: str) -> list[tuple[dt.date, Decimal]]:
        calls.append((profile.company_id if profile else None, key, total))
        half = round_money(total / 2, currency)
        if key.startswith("H"):  # a history invoice: one payment before the history's today, one after
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
    sandbox = QuickBooksSandbox(clock=clock)
    assert sandbox.load(tmp_path / "state")
    ledger = make_ledger(sandbox, clock)
    known = {x.name: x.ledger_id for x in ledger.list_customers()}
    mine = invoice_of(ledger, "LB-acme:S1", known[c.name])  # a customer of the history
    namesake = ledger.create_customers([("LB-hubspot-77", customer(77, name=b.name + " ", vat=None))], "k")
    same_name = invoice_of(ledger, "LB-acme:S2", namesake["LB-hubspot-77"].ledger_id)
    stranger = invoice_of(ledger, "LB-acme:S3", one_customer(ledger))
    # The history's open invoice (credited, unpaid, due 2025-07-10): its plan is drawn for its history id and only
    # the payment planned after the history's today is made (before it, the history said what was paid: nothing).
    assert sandbox.settle(dt.date(2026, 1, 19)) == 1
    history_open = next(i for i in ledger.list_invoices() if i.number == "H-2025-0002")
    assert history_open.amount_due == Decimal("383.04") - Decimal("239.40")
    # Due 2026-02-09: the first half is planned for 2026-01-20, the rest for 2026-02-19.
    assert sandbox.settle(dt.date(2026, 1, 20)) == 3
    assert sandbox.settle(dt.date(2026, 1, 20)) == 0
    profiles = {key: company for company, key, _total in calls}
    assert (profiles[mine], profiles[same_name], profiles[stranger]) == (c.id, b.id, None)  # plans drawn per Id
    assert profiles["H000002"] == b.id
    assert "H000001" not in profiles
    total = Decimal(sandbox.raw_invoice(mine)["TotalAmt"])  # type: ignore[index]
    due = {i.ledger_id: i.amount_due for i in ledger.list_invoices()}
    half_paid = {k for k in (mine, same_name, stranger) if Decimal(0) < (due[k] or Decimal(0)) < total}
    assert half_paid == {mine, same_name, stranger}
    admin = httpx.Client(transport=sandbox.transport(), base_url=BASE)
    answer = admin.post("/_sandbox/settle", json={"today": "2026-03-31"}).json()
    # The rest of each of the three; the 5.00 extra finds nothing left to pay.
    assert answer == {"payments": 3, "today": "2026-03-31"}
    assert {i.ledger_id for i in ledger.list_invoices() if i.amount_due} == {history_open.ledger_id}
    assert admin.post("/_sandbox/settle", json={"today": "2026-06-30"}).json()["payments"] == 0
    paid = [p for p in ledger.list_payments() if p.invoice_ledger_id == mine]
    assert [p.date for p in paid] == [dt.date(2026, 1, 20), dt.date(2026, 2, 19)]
    assert sum((p.amount for p in paid), Decimal(0)) == total
    assert admin.post("/_sandbox/settle", json={"today": "not a date"}).status_code == 400
