"""The seeded ledger history: deterministic, never in the future, internally consistent, and with the customer
behaviours the metrics must see (churn, one-time and frequent buyers, late, partial and missing payments)."""

from __future__ import annotations

import datetime as dt
import statistics
from collections import defaultdict
from decimal import Decimal

import pytest

from connectors.domain import InvoiceLine, round_money
from connectors.seedbook import PRODUCTS, Book, BookLine, generate_book
from connectors.seedhistory import History, HistoryInvoice, PayerProfile, generate_history, payment_plan

TODAY = dt.date(2026, 11, 16)
DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def book() -> Book:
    return generate_book(0)


@pytest.fixture(scope="module")
def history(book: Book) -> History:
    return generate_history(book, seed=0, today=TODAY)


def total(lines: tuple[BookLine, ...], currency: str) -> Decimal:
    """Total including tax as a ledger computes it, line by line."""
    out = Decimal(0)
    for ln in lines:
        il = InvoiceLine(description=ln.description, quantity=ln.quantity, unit_price=ln.unit_price,
                         discount_percent=ln.discount_percent, tax_rate=ln.tax_rate)
        out += il.net_amount(currency) + il.tax_amount(currency)
    return out


def credited(history: History) -> dict[str, Decimal]:
    by_invoice: dict[str, Decimal] = defaultdict(Decimal)
    for cn in history.credit_notes:
        by_invoice[cn.invoice_id] += total(cn.lines, cn.currency)
    return by_invoice


def paid(inv: HistoryInvoice) -> Decimal:
    return sum((p.amount for p in inv.payments), Decimal(0))


def test_same_arguments_same_history_and_each_argument_matters(book: Book, history: History) -> None:
    assert generate_history(book, seed=0, today=TODAY) == history
    assert generate_history(book, seed=1, today=TODAY).invoices != history.invoices
    assert generate_history(book, seed=0, today=TODAY - 30 * DAY).invoices != history.invoices
    shorter = generate_history(book, seed=0, today=TODAY, years=1)
    assert min(i.issue_date for i in shorter.invoices) >= TODAY - 365 * DAY
    assert len(shorter.invoices) < len(history.invoices)
    with pytest.raises(ValueError, match="years"):
        generate_history(book, seed=0, today=TODAY, years=0)


def test_nothing_is_dated_after_today_or_before_the_window(history: History) -> None:
    start = TODAY - dt.timedelta(days=round(365.25 * 3))
    assert history.today == TODAY
    for inv in history.invoices:
        assert start <= inv.issue_date <= TODAY
        assert inv.due_date > inv.issue_date
        for p in inv.payments:
            assert inv.issue_date <= p.date <= TODAY
    for cn in history.credit_notes:
        assert cn.issue_date <= TODAY
    for e in history.expenses:
        assert start <= e.date <= TODAY
    # The history runs up to today, not just near it.
    assert max(i.issue_date for i in history.invoices) >= TODAY - 14 * DAY
    assert max(p.date for i in history.invoices for p in i.payments) >= TODAY - 14 * DAY


def test_size_identifiers_and_lines(book: Book, history: History) -> None:
    assert 1500 <= len(history.invoices) <= 3000
    assert len({i.id for i in history.invoices}) == len(history.invoices)
    assert len({i.number for i in history.invoices}) == len(history.invoices)
    assert len({p.id for i in history.invoices for p in i.payments}) == sum(len(i.payments) for i in history.invoices)
    assert [i.issue_date for i in history.invoices] == sorted(i.issue_date for i in history.invoices)
    products = {p.sku: p for p in PRODUCTS}
    companies = {c.id: c for c in book.companies}
    for inv in history.invoices:
        company = companies[inv.company_id]
        assert inv.currency == company.currency
        assert inv.issue_date.weekday() < 5
        assert (inv.due_date - inv.issue_date).days in (30, 45, 60)
        assert inv.lines
        assert len({ln.sku for ln in inv.lines}) == len(inv.lines)
        for ln in inv.lines:
            product = products[ln.sku]
            assert ln.tax_rate == product.tax_rate
            assert ln.quantity > 0
            assert Decimal(0) <= ln.discount_percent < Decimal(30)
            if inv.currency == "EUR":
                assert ln.unit_price in (product.unit_price, round_money(product.unit_price * Decimal("0.95"), "EUR"))
            else:
                assert ln.unit_price > product.unit_price * Decimal("0.95")
    assert {i.currency for i in history.invoices} == {"EUR", "USD"}


def test_payments_never_exceed_and_old_invoices_are_settled_in_full(history: History) -> None:
    credits = credited(history)
    for inv in history.invoices:
        owed = total(inv.lines, inv.currency) - credits.get(inv.id, Decimal(0))
        assert owed >= 0
        assert all(p.amount > 0 for p in inv.payments)
        assert paid(inv) <= owed
        # Payment plans end within a year of the issue date: older invoices are either paid in full or never paid.
        if inv.issue_date < TODAY - 365 * DAY and inv.payments:
            assert paid(inv) == owed, inv.id
    fully = sum(1 for i in history.invoices if i.payments and paid(i) == total(i.lines, i.currency))
    assert fully > 0.8 * len(history.invoices)
    # Recent invoices are still open.
    recent = [i for i in history.invoices if i.issue_date > TODAY - 20 * DAY]
    assert recent
    assert sum(1 for i in recent if paid(i) < total(i.lines, i.currency)) > len(recent) / 2


def test_churned_companies_stop_buying(book: Book, history: History) -> None:
    by_company: dict[str, list[dt.date]] = defaultdict(list)
    for inv in history.invoices:
        by_company[inv.company_id].append(inv.issue_date)
    won: dict[str, list[dt.date]] = defaultdict(list)
    for d in book.deals:
        if d.is_won and d.close_date is not None:
            won[d.company_id].append(d.close_date)
    assert [p.company_id for p in history.profiles] == [c.id for c in book.companies]
    churned = [p for p in history.profiles if p.churned_on is not None]
    for p in churned:
        assert p.churned_on is not None
        assert by_company[p.company_id], "a company that churned had bought before"
        assert max(by_company[p.company_id]) <= p.churned_on <= TODAY
        assert all(d <= p.churned_on or d > TODAY for d in won[p.company_id])
    n = len(history.profiles)
    assert 0.18 <= len(churned) / n <= 0.35
    well_before = [p for p in churned if p.churned_on is not None and p.churned_on < TODAY - 180 * DAY]
    assert len(well_before) >= 0.6 * len(churned)
    # Active customers keep buying: most of those with a long history bought in the last six months.
    active = [c for c, dates in by_company.items() if history.profile(c).churned_on is None  # type: ignore[union-attr]
              and len(dates) >= 5]
    assert sum(1 for c in active if max(by_company[c]) > TODAY - 183 * DAY) > 0.7 * len(active)


def test_purchase_frequency_and_spend_vary_between_customers(history: History) -> None:
    counts: dict[str, int] = defaultdict(int)
    nets: dict[str, list[float]] = defaultdict(list)
    for inv in history.invoices:
        counts[inv.company_id] += 1
        if inv.currency == "EUR":
            nets[inv.company_id].append(sum(float(ln.quantity * ln.unit_price) for ln in inv.lines))
    one_time = sum(1 for k in counts.values() if k == 1)
    assert 0.08 * len(counts) <= one_time <= 0.35 * len(counts)
    assert 3 <= sum(1 for k in counts.values() if k >= 30) <= 30
    assert len(counts) < len(history.profiles)  # some CRM companies have no ledger history
    means = [statistics.mean(v) for v in nets.values() if len(v) >= 4]
    assert 1500 < statistics.median(means) < 8000
    assert statistics.pstdev(means) / statistics.mean(means) > 0.3


def test_payer_behaviour_shares(history: History) -> None:
    profiles = {p.company_id: p for p in history.profiles}
    late = [p for p in profiles.values() if p.mean_delay_days > 0]
    assert 0.12 <= len(late) / len(profiles) <= 0.18
    assert all(20 <= p.mean_delay_days <= 90 for p in late)
    assert 0 < sum(1 for p in profiles.values() if p.partial_share > 0) <= 0.15 * len(profiles)
    credits = credited(history)
    beyond: dict[bool, list[int]] = defaultdict(list)
    for inv in history.invoices:
        if not inv.payments or inv.id in credits:
            continue
        is_late = profiles[inv.company_id].mean_delay_days > 0
        beyond[is_late].extend((p.date - inv.due_date).days for p in inv.payments)
        if not is_late and profiles[inv.company_id].partial_share == 0:
            assert all(p.date <= inv.due_date + 5 * DAY for p in inv.payments)
    assert statistics.median(beyond[True]) >= 15
    assert statistics.median(beyond[False]) <= 0
    old = [i for i in history.invoices if i.issue_date < TODAY - 365 * DAY and credits.get(i.id) != total(
        i.lines, i.currency)]
    never = sum(1 for i in old if not i.payments)
    assert 0.003 <= never / len(old) <= 0.05
    # Late payers leave more invoices unpaid than punctual ones.
    rates = {}
    for is_late in (True, False):
        group = [i for i in old if (profiles[i.company_id].mean_delay_days > 0) == is_late]
        rates[is_late] = sum(1 for i in group if not i.payments) / len(group)
    assert rates[True] > 2 * rates[False]


def test_credit_notes_correct_existing_invoices_within_their_amount(history: History) -> None:
    invoices = {i.id: i for i in history.invoices}
    assert 0.005 * len(invoices) <= len(history.credit_notes) <= 0.04 * len(invoices)
    assert len({cn.id for cn in history.credit_notes}) == len({cn.number for cn in history.credit_notes}) == len(
        history.credit_notes)
    kinds = set()
    for cn in history.credit_notes:
        inv = invoices[cn.invoice_id]
        assert cn.company_id == inv.company_id
        assert cn.currency == inv.currency
        assert inv.issue_date < cn.issue_date <= TODAY
        assert {ln.sku for ln in cn.lines} <= {ln.sku for ln in inv.lines}
        amount = total(cn.lines, cn.currency)
        assert 0 < amount <= total(inv.lines, inv.currency)
        kinds.add("full" if amount == total(inv.lines, inv.currency) else "partial")
        assert all(p.date >= cn.issue_date for p in inv.payments)
    assert kinds == {"full", "partial"}


def test_marketing_and_sales_expenses_by_month(history: History) -> None:
    by_month: dict[tuple[int, int], dict[str, Decimal]] = defaultdict(dict)
    for e in history.expenses:
        assert e.currency == "EUR"
        assert e.net > 0
        assert e.date == (dt.date(e.date.year, e.date.month, 28) + 4 * DAY).replace(day=1) - DAY  # month end
        assert e.account_code not in by_month[(e.date.year, e.date.month)]
        by_month[(e.date.year, e.date.month)][e.account_code] = e.net
    assert 34 <= len(by_month) <= 36
    assert {c for m in by_month.values() for c in m} == {"6231", "6233", "6234", "6411"}
    for accounts in by_month.values():
        assert {"6231", "6233", "6411"} <= set(accounts)
        assert accounts["6411"] > 3 * accounts["6231"] > 3 * accounts["6233"]
    yearly = sum((e.net for e in history.expenses if e.date.year == 2025), Decimal(0))
    assert Decimal(250_000) < yearly < Decimal(500_000)


def test_history_before_the_book_ignores_deals_won_later(book: Book) -> None:
    early = generate_history(book, seed=3, today=dt.date(2024, 3, 1), years=2)
    assert max(i.issue_date for i in early.invoices) <= dt.date(2024, 3, 1)
    for p in early.profiles:
        assert p.churned_on is None or p.churned_on <= dt.date(2024, 3, 1)
    empty = generate_history(Book(products=PRODUCTS, companies=(), deals=()), seed=0, today=TODAY)
    assert (len(empty.invoices), len(empty.credit_notes), len(empty.profiles)) == (0, 0, 0)
    assert empty.expenses


# -- payment_plan ---------------------------------------------------------------------------------

ISSUE, DUE = dt.date(2025, 3, 3), dt.date(2025, 4, 2)
PUNCTUAL = PayerProfile("C1", 0, 0.0, 0.0)


def test_payment_plan_sums_to_the_total_and_is_deterministic() -> None:
    profiles = [None, PUNCTUAL, PayerProfile("C2", 45, 0.5, 0.0), PayerProfile("C3", 70, 1.0, 0.0)]
    for i in range(300):
        profile = profiles[i % len(profiles)]
        amount = Decimal(1000 + 37 * i) / Decimal(100)
        currency = "JPY" if i % 7 == 0 else "EUR"
        if currency == "JPY":
            amount = Decimal(1000 + 37 * i)
        plan = payment_plan(profile, f"INV-{i}", ISSUE, DUE, amount, currency)
        assert plan == payment_plan(profile, f"INV-{i}", ISSUE, DUE, amount, currency)
        assert sum(a for _, a in plan) == amount
        assert all(a > 0 and d >= ISSUE for d, a in plan)
        assert all(a == a.quantize(Decimal(1) if currency == "JPY" else Decimal("0.01")) for _, a in plan)
        assert [d for d, _ in plan] == sorted(d for d, _ in plan)
    # Different invoices of the same customer are paid on different days.
    assert len({payment_plan(PUNCTUAL, f"K{i}", ISSUE, DUE, Decimal(100), "EUR")[0][0] for i in range(50)}) > 10
    assert payment_plan(PUNCTUAL, "K", ISSUE, DUE, Decimal(0), "EUR") == []


def test_payment_plan_follows_the_profile() -> None:
    keys = [f"INV-{i:04d}" for i in range(400)]
    amount = Decimal("1200.00")
    punctual = [payment_plan(PUNCTUAL, k, ISSUE, DUE, amount, "EUR") for k in keys]
    assert all(len(p) == 1 and ISSUE <= p[0][0] <= DUE + 5 * DAY for p in punctual)
    assert statistics.mean((p[0][0] - ISSUE).days for p in punctual) > 15

    late = PayerProfile("C2", 40, 0.0, 0.0)
    delays = [(payment_plan(late, k, ISSUE, DUE, amount, "EUR")[0][0] - DUE).days for k in keys]
    assert min(delays) >= 1
    assert 34 <= statistics.mean(delays) <= 46

    never = PayerProfile("C3", 0, 0.0, 1.0)
    assert all(payment_plan(never, k, ISSUE, DUE, amount, "EUR") == [] for k in keys[:50])
    some_never = PayerProfile("C4", 30, 0.0, 0.1)
    share = sum(1 for k in keys if not payment_plan(some_never, k, ISSUE, DUE, amount, "EUR")) / len(keys)
    assert 0.05 <= share <= 0.15

    partial = PayerProfile("C5", 0, 1.0, 0.0)
    for k in keys[:50]:
        plan = payment_plan(partial, k, ISSUE, DUE, amount, "EUR")
        assert len(plan) == 2
        assert plan[1][0] >= plan[0][0] + 15 * DAY
        assert plan[0][1] in (Decimal("360.00"), Decimal("480.00"), Decimal("600.00"), Decimal("720.00"))

    unknown = [payment_plan(None, k, ISSUE, DUE, amount, "EUR") for k in keys]
    assert all(len(p) == 1 for p in unknown)
    unknown_delays = [(p[0][0] - DUE).days for p in unknown]
    assert all(-7 <= d <= 30 for d in unknown_delays)
    assert 0 < sum(1 for d in unknown_delays if d > 3) < 0.2 * len(keys)
