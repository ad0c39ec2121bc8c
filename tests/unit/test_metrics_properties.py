"""Properties over random books: days to pay and countback DSO match a direct recomputation, and every metric is
independent of the order of the input sequences."""

from __future__ import annotations

import calendar
import datetime as dt
import random
from collections.abc import Sequence
from dataclasses import replace
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Literal, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.schema import MetricsConfig
from metrics.compute import compute
from metrics.dso import company_receivables, customer_receivables
from metrics.facts import (
    ActivityFact,
    CreditFact,
    CustomerFact,
    DealFact,
    Facts,
    InvoiceFact,
    PaymentFact,
    SpendFact,
)
from tests.unit.test_metrics_clv_risk import simulated_book

D = Decimal
T = TypeVar("T")
BASE = dt.date(2024, 1, 1)
CENT = D("0.01")
PROPERTY_SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NO_MODELS = MetricsConfig(min_repeat_customers=10**6, gross_margin=D("0.7"), spend={"lag_months": 1},
                          activity_costs={"call": D(15)})


@st.composite
def books(draw: st.DrawFn) -> Facts:
    """Invoices with partial payments and credit notes (never more than the invoice), plus CRM side facts."""
    invoices: list[InvoiceFact] = []
    payments: list[PaymentFact] = []
    credits: list[CreditFact] = []
    customers: list[CustomerFact] = []
    deals: list[DealFact] = []
    activities: list[ActivityFact] = []
    for c in range(draw(st.integers(1, 4))):
        cid = f"c{c}"
        if draw(st.booleans()):
            source = draw(st.sampled_from([None, "ads", "seo"]))
            customers.append(CustomerFact(cid, f"Customer {c}", acquisition_source=source))
        for _ in range(draw(st.integers(0, 6))):
            ledger_id = f"i{len(invoices)}"
            issued = BASE + dt.timedelta(days=draw(st.integers(0, 500)))
            gross = D(draw(st.integers(1, 1_000_000))) * CENT
            net = (gross / D("1.2")).quantize(CENT)
            draft = draw(st.integers(0, 5)) == 0
            remaining = gross
            if not draft:
                for _ in range(draw(st.integers(0, 3))):
                    amount = (remaining * draw(st.integers(1, 100)) / 100).quantize(CENT, rounding=ROUND_DOWN)
                    if amount <= 0:
                        continue
                    paid_on = issued + dt.timedelta(days=draw(st.integers(-5, 200)))
                    payments.append(PaymentFact(f"p{len(payments)}", ledger_id, cid, paid_on, amount))
                    remaining -= amount
                if remaining > 0 and draw(st.booleans()):
                    amount = (remaining * draw(st.integers(1, 100)) / 100).quantize(CENT, rounding=ROUND_DOWN)
                    if amount > 0:
                        credited_on = issued + dt.timedelta(days=draw(st.integers(0, 90)))
                        credits.append(CreditFact(f"cn{len(credits)}", cid, credited_on,
                                                  net=(amount / D("1.2")).quantize(CENT), gross=amount,
                                                  invoice_id=ledger_id))
                        remaining -= amount
            status: Literal["draft", "paid", "authorised"] = (
                "draft" if draft else ("paid" if remaining == 0 else "authorised")
            )
            terms = draw(st.sampled_from([0, 15, 30, 60]))
            invoices.append(InvoiceFact(ledger_id, cid, issued, issued + dt.timedelta(days=terms), net, gross,
                                        remaining, status=status))
        if draw(st.booleans()):
            day = BASE + dt.timedelta(days=draw(st.integers(0, 500)))
            amount = D(draw(st.integers(1, 50_000))) * CENT
            credits.append(CreditFact(f"cn{len(credits)}", cid, day, net=amount, gross=amount * D("1.2")))
        if draw(st.booleans()):
            deal_id = f"d{len(deals)}"
            deals.append(DealFact(deal_id, cid, D(1000), "won", D(1), is_won=True, is_closed=True,
                                  close_date=BASE + dt.timedelta(days=draw(st.integers(0, 500)))))
            activities.append(ActivityFact(deal_id, "call", draw(st.integers(0, 5))))
    spend = [
        SpendFact(BASE + dt.timedelta(days=draw(st.integers(0, 500))), draw(st.sampled_from(["ads", "seo", "tv"])),
                  D(draw(st.integers(1, 100_000))) * CENT, kind=draw(st.sampled_from(["paid", "overhead"])))
        for _ in range(draw(st.integers(0, 5)))
    ]
    as_of = BASE + dt.timedelta(days=draw(st.integers(0, 700)))
    return Facts(as_of=as_of, currency="EUR", invoices=invoices, payments=payments, credits=credits,
                 customers=customers, deals=deals, spend=spend, activities=activities)


# ------------------------------------------------------------------------------------------------
# Direct recomputation, written with plain loops over the facts
# ------------------------------------------------------------------------------------------------


def posted(facts: Facts) -> list[InvoiceFact]:
    return [inv for inv in facts.invoices if inv.status in ("authorised", "paid")]


def year_before(day: dt.date) -> dt.date:
    last = calendar.monthrange(day.year - 1, day.month)[1]
    return dt.date(day.year - 1, day.month, min(day.day, last))


def direct_days_to_pay(facts: Facts) -> dict[str, Fraction]:
    """sum(amount x (paid - issued)) / sum(amount) per customer over payments in (as_of - 12 months, as_of]."""
    by_id = {inv.ledger_id: inv for inv in posted(facts)}
    numerator: dict[str, Fraction] = {}
    denominator: dict[str, Fraction] = {}
    start = year_before(facts.as_of)
    for p in facts.payments:
        inv = by_id.get(p.invoice_id)
        if inv is None or p.amount <= 0 or not (start < p.date <= facts.as_of):
            continue
        cid = inv.customer_id
        numerator[cid] = numerator.get(cid, Fraction(0)) + Fraction(p.amount) * (p.date - inv.issue_date).days
        denominator[cid] = denominator.get(cid, Fraction(0)) + Fraction(p.amount)
    return {cid: numerator[cid] / denominator[cid] for cid in numerator}


def direct_open(facts: Facts, inv: InvoiceFact, day: dt.date) -> Fraction:
    if inv.issue_date > day:
        return Fraction(0)
    left = Fraction(inv.gross)
    for p in facts.payments:
        if p.invoice_id == inv.ledger_id and p.date <= day:
            left -= Fraction(p.amount)
    for c in facts.credits:
        if c.invoice_id == inv.ledger_id and c.date <= day:
            left -= Fraction(c.gross)
    return max(left, Fraction(0))


def direct_countback(facts: Facts, months: int = 24) -> Fraction | None:
    """Walk back calendar months from as_of, exhausting the AR with each month's net credit sales."""
    invoices = posted(facts)
    remaining = sum((direct_open(facts, inv, facts.as_of) for inv in invoices), Fraction(0))
    if remaining <= 0:
        return Fraction(0)
    days = Fraction(0)
    end = facts.as_of
    for _ in range(months):
        start = end.replace(day=1)
        sales = sum((Fraction(inv.gross) for inv in invoices if start <= inv.issue_date <= end), Fraction(0))
        sales -= sum((Fraction(c.gross) for c in facts.credits if start <= c.date <= end), Fraction(0))
        length = (end - start).days + 1
        if sales > 0 and remaining <= sales:
            return days + remaining / sales * length
        if sales > 0:
            remaining -= sales
        days += length
        end = start - dt.timedelta(days=1)
    return None


def one_dp(value: Fraction) -> Decimal:
    return (D(value.numerator) / D(value.denominator)).quantize(D("0.1"), rounding=ROUND_HALF_UP)


def close(a: Decimal, b: Fraction) -> bool:
    return abs(Fraction(a) - b) < Fraction(1, 10**18)


@PROPERTY_SETTINGS
@given(books())
def test_days_to_pay_matches_direct_recomputation(facts: Facts) -> None:
    """Per-customer weighted days to pay equals the direct recomputation, unrounded and as compute() rounds it."""
    expected = direct_days_to_pay(facts)
    got = customer_receivables(facts.invoices, facts.payments, facts.credits, facts.as_of)
    result = compute(facts, NO_MODELS)
    for cid, metrics in result.customers.items():
        if cid in expected:
            value = got[cid].days_to_pay_weighted
            assert value is not None
            assert close(value, expected[cid])
            assert metrics.days_to_pay_weighted == one_dp(expected[cid])
        else:
            assert metrics.days_to_pay_weighted is None


@PROPERTY_SETTINGS
@given(books())
def test_countback_dso_matches_direct_recomputation(facts: Facts) -> None:
    """Company countback DSO equals the direct month-by-month recomputation, and AR equals the open amounts."""
    expected = direct_countback(facts)
    got = company_receivables(facts.invoices, facts.payments, facts.credits, facts.as_of)
    if expected is None:
        assert got.dso_countback is None
    else:
        assert got.dso_countback is not None
        assert close(got.dso_countback, expected)
        assert compute(facts, NO_MODELS).company["dso_countback"] == one_dp(expected)
    ar = sum((direct_open(facts, inv, facts.as_of) for inv in posted(facts)), Fraction(0))
    assert Fraction(got.ar_total) == ar


def shuffled(facts: Facts, rng: random.Random) -> Facts:
    def mix(items: Sequence[T]) -> list[T]:
        out = list(items)
        rng.shuffle(out)
        return out

    return replace(
        facts,
        invoices=mix(facts.invoices),
        payments=mix(facts.payments),
        credits=mix(facts.credits),
        deals=mix(facts.deals),
        customers=mix(facts.customers),
        spend=mix(facts.spend),
        activities=mix(facts.activities),
    )


@PROPERTY_SETTINGS
@given(books(), st.randoms(use_true_random=False))
def test_every_metric_is_independent_of_input_order(facts: Facts, rng: random.Random) -> None:
    """compute() gives the same result, company and customers, for any order of every input sequence."""
    assert compute(shuffled(facts, rng), NO_MODELS).to_json() == compute(facts, NO_MODELS).to_json()


def test_fitted_models_are_independent_of_input_order() -> None:
    """With the models fitted, the parameters and every prediction are the same for a shuffled book."""
    facts = simulated_book(customers=120)
    config = MetricsConfig(min_repeat_customers=20)
    first = compute(facts, config).to_json()
    assert first["company"]["models"]["status"] == "fitted"
    assert compute(shuffled(facts, random.Random(11)), config).to_json() == first
