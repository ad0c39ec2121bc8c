"""Receivables metrics: countback DSO, BPDSO, ADD, CEI, simple DSO and per-customer payment behaviour."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from metrics.dso import (
    ReceivablesBook,
    cei,
    company_receivables,
    countback_dso,
    customer_receivables,
    weighted_days,
)
from metrics.facts import CreditFact, InvoiceFact, PaymentFact

D = Decimal
TWO = D("0.01")


def invoice(
    ledger_id: str,
    issued: dt.date,
    gross: str,
    *,
    due: dt.date | None = None,
    customer: str = "c1",
    balance: str | None = None,
    status: str = "authorised",
) -> InvoiceFact:
    return InvoiceFact(
        ledger_id=ledger_id,
        customer_id=customer,
        issue_date=issued,
        due_date=due or issued + dt.timedelta(days=30),
        net=D(gross) / D("1.2"),
        gross=D(gross),
        balance=D(gross if balance is None else balance),
        status=status,  # type: ignore[arg-type]
    )


def payment(ledger_id: str, inv: InvoiceFact, paid: dt.date, amount: str) -> PaymentFact:
    return PaymentFact(ledger_id=ledger_id, invoice_id=inv.ledger_id, customer_id=inv.customer_id, date=paid,
                       amount=D(amount))


def q1_book() -> tuple[list[InvoiceFact], list[PaymentFact]]:
    """Jan 70k, Feb 80k, Mar 100k of sales; 38k of the January invoice paid by Mar 31, so AR is 212k."""
    jan = invoice("jan", dt.date(2025, 1, 10), "70000", due=dt.date(2025, 2, 9), balance="0")
    feb = invoice("feb", dt.date(2025, 2, 10), "80000", due=dt.date(2025, 3, 12))
    mar = invoice("mar", dt.date(2025, 3, 10), "100000", due=dt.date(2025, 4, 9))
    pays = [payment("p1", jan, dt.date(2025, 3, 1), "38000"), payment("p2", jan, dt.date(2025, 4, 5), "32000")]
    return [jan, feb, mar], pays


def test_countback_worked_example_with_thirty_day_months() -> None:
    """AR 212,000 against sales of 100k, 80k, 70k in 30-day months counts back to 73.71 days."""
    buckets = [(D(100000), 30), (D(80000), 30), (D(70000), 30)]
    assert countback_dso(D(212000), buckets).quantize(TWO) == D("73.71")  # type: ignore[union-attr]


def test_countback_edge_cases() -> None:
    """No AR gives 0 days; an AR larger than every bucket's sales is undefined; months without sales add their days."""
    assert countback_dso(D(0), [(D(10), 30)]) == 0
    assert countback_dso(D(500), [(D(100), 30), (D(100), 31)]) is None
    assert countback_dso(D(150), [(D(0), 30), (D(-20), 31), (D(100), 28), (D(100), 31)]) == D(30 + 31 + 28) + D(
        "15.5"
    )
    assert countback_dso(D(100), [(D(100), 31), (D(50), 30)]) == 31


def test_company_countback_on_calendar_months_reproduces_73_17_days() -> None:
    """With Jan/Feb/Mar buckets (31/28/31 days) at as_of Mar 31 the same book gives 73.17 days; simple 90d is 76.32."""
    invoices, payments = q1_book()
    result = company_receivables(invoices, payments, [], dt.date(2025, 3, 31))
    assert result.ar_total == D(212000)
    assert result.dso_countback.quantize(TWO) == D("73.17")  # type: ignore[union-attr]
    assert result.dso_simple_90d.quantize(TWO) == D("76.32")  # type: ignore[union-attr]
    # The March invoice (100k) is not yet due: BPDSO exhausts it in March alone, ADD is the rest.
    assert result.ar_current == D(100000)
    assert result.bpdso == 31
    assert result.add.quantize(TWO) == D("42.17")  # type: ignore[union-attr]


def test_past_as_of_recomputes_receivables_from_payment_dates() -> None:
    """A payment made after as_of does not reduce the AR of as_of, although the invoice's current balance is 0."""
    invoices, payments = q1_book()
    at_feb_end = company_receivables(invoices, payments, [], dt.date(2025, 2, 28))
    assert at_feb_end.ar_total == D(150000)
    # Feb 28 is a month end: Feb (28 days) then Jan, 150k - 80k = 70k exhausts January exactly.
    assert at_feb_end.dso_countback == 28 + 31
    at_april = company_receivables(invoices, payments, [], dt.date(2025, 4, 5))
    assert at_april.ar_total == D(180000)


def test_mid_month_as_of_uses_a_partial_current_bucket() -> None:
    """At as_of Mar 15 the current bucket is Mar 1-15 (15 days) holding the March invoice."""
    invoices, payments = q1_book()
    result = company_receivables(invoices, payments, [], dt.date(2025, 3, 15))
    # AR 212k: March so far 100k (15 days), February 80k (28 days), 32k of January's 70k (31 days).
    expected = D(15) + D(28) + D(32000) / D(70000) * 31
    assert result.dso_countback == expected


def test_credit_notes_reduce_receivables_and_sales() -> None:
    """A credit note applied to an invoice lowers its open amount and the month's sales; an unapplied one lowers
    only sales."""
    inv = invoice("a", dt.date(2025, 3, 3), "1000")
    applied = CreditFact("cn1", "c1", dt.date(2025, 3, 20), net=D(250), gross=D(300), invoice_id="a")
    loose = CreditFact("cn2", "c1", dt.date(2025, 3, 21), net=D(100), gross=D(120))
    book = ReceivablesBook([inv], [], [applied, loose])
    assert book.open_amount(inv, dt.date(2025, 3, 19)) == D(1000)
    assert book.open_amount(inv, dt.date(2025, 3, 20)) == D(700)
    assert book.credit_sales(dt.date(2025, 3, 1), dt.date(2025, 3, 31)) == D(1000 - 300 - 120)
    result = company_receivables([inv], [], [applied, loose], dt.date(2025, 3, 31))
    assert result.ar_total == D(700)
    # AR 700 exceeds March's net sales of 580 and nothing was sold before: the countback is undefined.
    assert result.dso_countback is None
    assert result.dso_simple_90d == D(700) / D(580) * 90


def test_drafts_are_not_receivables_and_settled_balances_are_not_open() -> None:
    """Draft invoices are neither AR nor sales; a zero ledger balance with no payment facts counts as settled."""
    draft = invoice("d", dt.date(2025, 3, 3), "500", status="draft")
    written_off = invoice("w", dt.date(2025, 3, 4), "200", balance="0")
    book = ReceivablesBook([draft, written_off], [], [])
    assert book.ar(dt.date(2025, 3, 31)) == (D(0), D(0))
    assert book.credit_sales(dt.date(2025, 3, 1), dt.date(2025, 3, 31)) == D(200)


def test_cei_worked_example() -> None:
    """Begin 6,200, sales 10,890 over 3 months, end total 6,340 and current 3,590 give a CEI of 55.9 %."""
    value = cei(D(6200), D(10890), 3, D(6340), D(3590))
    assert value is not None
    assert value.quantize(D("0.1")) == D("55.9")
    assert cei(D(0), D(0), 1, D(0), D(0)) is None


def test_company_cei_is_for_the_last_complete_month() -> None:
    """CEI at a mid-month as_of scores the previous calendar month from the AR at its start and end."""
    old = invoice("o", dt.date(2025, 1, 20), "1000", due=dt.date(2025, 2, 10))
    feb = invoice("f", dt.date(2025, 2, 5), "3000", due=dt.date(2025, 3, 7))
    pays = [payment("p", old, dt.date(2025, 2, 15), "600"), payment("q", feb, dt.date(2025, 2, 25), "500")]
    result = company_receivables([old, feb], pays, [], dt.date(2025, 3, 10))
    assert result.cei_month == "2025-02"
    # Begin 1,000; sales 3,000; end total 400 + 2,500 = 2,900 of which current (due Mar 7) 2,500.
    assert result.cei == (D(1000) + D(3000) - D(2900)) / (D(1000) + D(3000) - D(2500)) * 100


def test_weighted_days_examples() -> None:
    """$10 paid in 5 days and $100 in 10 days weigh to 9.55 days; 0/6/8 days on 4k/6k/2k to 4.33 days."""
    assert weighted_days([(D(10), 5), (D(100), 10)]).quantize(TWO) == D("9.55")  # type: ignore[union-attr]
    assert weighted_days([(D(4000), 0), (D(6000), 6), (D(2000), 8)]).quantize(TWO) == D("4.33")  # type: ignore[union-attr]
    assert weighted_days([]) is None


def test_customer_days_to_pay_counts_partial_payments_at_their_own_dates() -> None:
    """Partial payments of one invoice each weigh in at their own date; the trailing window drops old payments."""
    inv = invoice("a", dt.date(2025, 1, 1), "110", balance="0")
    old = invoice("b", dt.date(2023, 1, 1), "1000", balance="0")
    pays = [
        payment("p1", inv, dt.date(2025, 1, 6), "10"),
        payment("p2", inv, dt.date(2025, 1, 11), "100"),
        payment("p3", old, dt.date(2023, 3, 1), "1000"),
    ]
    result = customer_receivables([inv, old], pays, [], dt.date(2025, 6, 30))["c1"]
    assert result.days_to_pay_weighted.quantize(TWO) == D("9.55")  # type: ignore[union-attr]
    assert result.payments_counted == 2
    assert result.balance_due == 0
    assert result.open_ar_age_weighted is None


def test_customer_days_beyond_terms_example() -> None:
    """Invoices paid 0, 6 and 8 days after their due dates for 4k, 6k and 2k weigh to 4.33 days beyond terms."""
    rows = [("a", "4000", -3), ("b", "6000", 6), ("c", "2000", 8)]
    invoices, pays = [], []
    for ledger_id, amount, late in rows:
        inv = invoice(ledger_id, dt.date(2025, 1, 1), amount, due=dt.date(2025, 1, 31), balance="0")
        invoices.append(inv)
        pays.append(payment("p" + ledger_id, inv, dt.date(2025, 1, 31) + dt.timedelta(days=late), amount))
    result = customer_receivables(invoices, pays, [], dt.date(2025, 3, 1))["c1"]
    assert result.days_beyond_terms_weighted.quantize(TWO) == D("4.33")  # type: ignore[union-attr]


def test_customer_open_receivables_and_overdue() -> None:
    """Open AR age is weighted by open amount; overdue counts invoices past due and the worst days past due."""
    as_of = dt.date(2025, 6, 30)
    a = invoice("a", dt.date(2025, 4, 1), "1000", due=dt.date(2025, 5, 1))
    b = invoice("b", dt.date(2025, 6, 10), "3000", due=dt.date(2025, 7, 10), balance="2000")
    c = invoice("c", dt.date(2025, 5, 20), "500", due=dt.date(2025, 6, 19))
    pays = [payment("pb", b, dt.date(2025, 6, 20), "1000")]
    result = customer_receivables([a, b, c], pays, [], as_of)["c1"]
    assert result.balance_due == D(3500)
    assert result.overdue_amount == D(1500)
    assert result.overdue_invoices == 2
    assert result.max_days_overdue == (as_of - dt.date(2025, 5, 1)).days
    expected_age = (D(1000) * 90 + D(2000) * 20 + D(500) * 41) / D(3500)
    assert result.open_ar_age_weighted == expected_age


@pytest.mark.parametrize("due_offset", [0, 1])
def test_invoice_due_on_as_of_is_not_overdue(due_offset: int) -> None:
    """An invoice due on as_of is current; it is overdue from the next day."""
    as_of = dt.date(2025, 6, 30)
    inv = invoice("a", dt.date(2025, 6, 1), "100", due=as_of - dt.timedelta(days=due_offset))
    result = customer_receivables([inv], [], [], as_of)["c1"]
    assert result.overdue_invoices == due_offset
    assert result.max_days_overdue == due_offset


def test_trailing_window_excludes_its_first_day() -> None:
    """The 12-month window is (as_of - 12 months, as_of]: a payment exactly 12 months back is out, the next day in."""
    as_of = dt.date(2025, 6, 30)
    a = invoice("a", dt.date(2024, 6, 1), "100", balance="0")
    b = invoice("b", dt.date(2024, 6, 1), "100", balance="0")
    pays = [payment("pa", a, dt.date(2024, 6, 30), "100"), payment("pb", b, dt.date(2024, 7, 1), "100")]
    result = customer_receivables([a, b], pays, [], as_of)["c1"]
    assert result.payments_counted == 1
    assert result.days_to_pay_weighted == 30
    late = invoice("l", dt.date(2024, 2, 1), "100", balance="0")
    on_leap_day = [payment("pl", late, dt.date(2024, 2, 29), "100")]
    # From Feb 28, 2025 the window starts after Feb 28, 2024, so a Feb 29, 2024 payment is in.
    assert customer_receivables([late], on_leap_day, [], dt.date(2025, 2, 28))["c1"].payments_counted == 1
    assert customer_receivables([late], on_leap_day, [], dt.date(2025, 3, 1))["c1"].payments_counted == 0
