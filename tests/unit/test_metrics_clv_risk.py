"""Lifetime value (historical, paid, predictive) and revenue at risk with its warning signals."""

from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal

import pytest

from config.schema import MetricsConfig
from metrics import models
from metrics.clv import historical_clv, net_paid_revenue, predict, purchase_transactions
from metrics.compute import compute
from metrics.facts import CreditFact, CustomerFact, Facts, InvoiceFact, PaymentFact
from metrics.risk import (
    SIGNAL_BASKET_DROP,
    SIGNAL_FREQUENCY_DROP,
    SIGNAL_ONE_TIME_BUYER,
    SIGNAL_OVERDUE,
    revenue_at_risk,
    risk_signals,
)

D = Decimal
AS_OF = dt.date(2025, 6, 30)


def inv(
    ledger_id: str, customer: str, issued: dt.date, net: str, *, status: str = "authorised", balance: str | None = None
) -> InvoiceFact:
    gross = D(net) * D("1.2")
    return InvoiceFact(ledger_id, customer, issued, issued + dt.timedelta(days=30), D(net), gross,
                       gross if balance is None else D(balance), status=status)  # type: ignore[arg-type]


def simulated_book(seed: int = 7, customers: int = 160, as_of: dt.date = AS_OF) -> Facts:
    """A seeded customer base: Poisson purchases with dropout after each, gamma-distributed spend per customer."""
    rng = random.Random(seed)
    invoices: list[InvoiceFact] = []
    payments: list[PaymentFact] = []
    start = as_of - dt.timedelta(days=540)
    for c in range(customers):
        cid = f"cust-{c:03d}"
        day = start + dt.timedelta(days=rng.randrange(0, 360))
        mean_gap = rng.uniform(10, 120)
        basket = rng.gammavariate(4.0, 60.0)
        while day <= as_of:
            net = D(str(round(rng.gammavariate(6.0, basket / 6.0) + 5, 2)))
            ledger_id = f"inv-{len(invoices):05d}"
            paid_on = day + dt.timedelta(days=rng.randrange(5, 70))
            paid = paid_on <= as_of
            invoice = InvoiceFact(ledger_id, cid, day, day + dt.timedelta(days=30), net, net * D("1.2"),
                                  D(0) if paid else net * D("1.2"), status="paid" if paid else "authorised")
            invoices.append(invoice)
            if paid:
                payments.append(PaymentFact("p" + ledger_id, ledger_id, cid, paid_on, invoice.gross))
            if rng.random() < 0.15:
                break
            day += dt.timedelta(days=1 + int(rng.expovariate(1 / mean_gap)))
    customer_facts = [CustomerFact(f"cust-{c:03d}", f"Customer {c}") for c in range(customers)]
    return Facts(as_of=as_of, currency="EUR", invoices=invoices, payments=payments, customers=customer_facts)


def test_historical_clv_nets_credit_notes_and_applies_margin() -> None:
    """Historical CLV is net invoiced revenue minus credit notes (applied or not) to date, times the margin."""
    invoices = [
        inv("a", "c1", dt.date(2025, 1, 5), "1000"),
        inv("b", "c1", dt.date(2025, 2, 5), "500"),
        inv("draft", "c1", dt.date(2025, 3, 5), "9999", status="draft"),
        inv("later", "c1", dt.date(2025, 7, 5), "800"),
        inv("z", "c2", dt.date(2025, 2, 5), "300"),
    ]
    credits = [
        CreditFact("cn1", "c1", dt.date(2025, 2, 10), net=D(100), gross=D(120), invoice_id="b"),
        CreditFact("cn2", "c1", dt.date(2025, 3, 10), net=D(50), gross=D(60)),
        CreditFact("cn3", "c1", dt.date(2025, 7, 10), net=D(70), gross=D(84)),
    ]
    assert historical_clv(invoices, credits, AS_OF) == {"c1": D(1350), "c2": D(300)}
    assert historical_clv(invoices, credits, AS_OF, margin=D("0.4")) == {"c1": D(540), "c2": D(120)}


def test_net_paid_revenue_removes_the_tax_share_of_each_payment() -> None:
    """Paid revenue counts payments to date at net/gross of their invoice, partial payments included."""
    a = inv("a", "c1", dt.date(2025, 1, 5), "1000")  # gross 1200
    b = inv("b", "c1", dt.date(2025, 2, 5), "500")  # gross 600
    payments = [
        PaymentFact("p1", "a", "c1", dt.date(2025, 1, 20), D(600)),
        PaymentFact("p2", "b", "c1", dt.date(2025, 2, 20), D(600)),
        PaymentFact("p3", "a", "c1", dt.date(2025, 7, 20), D(600)),  # after as_of
        PaymentFact("p4", "ghost", "c1", dt.date(2025, 2, 20), D(600)),  # unknown invoice
    ]
    assert net_paid_revenue([a, b], payments, AS_OF) == {"c1": D(1000)}
    assert net_paid_revenue([a, b], payments, AS_OF, margin=D("0.5")) == {"c1": D(500)}


def test_purchase_transactions_merge_days_and_net_credits() -> None:
    """One purchase per customer-day, valued net of credit notes applied to its invoices; fully credited days drop."""
    invoices = [
        inv("a", "c1", dt.date(2025, 1, 5), "100"),
        inv("b", "c1", dt.date(2025, 1, 5), "50"),
        inv("c", "c1", dt.date(2025, 2, 5), "80"),
        inv("d", "c2", dt.date(2025, 2, 5), "10", status="draft"),
    ]
    credits = [
        CreditFact("cn1", "c1", dt.date(2025, 1, 9), net=D(30), gross=D(36), invoice_id="b"),
        CreditFact("cn2", "c1", dt.date(2025, 2, 9), net=D(80), gross=D(96), invoice_id="c"),
    ]
    assert purchase_transactions(invoices, credits, AS_OF) == {("c1", dt.date(2025, 1, 5)): D(120)}


def test_predictions_skipped_below_min_repeat_customers() -> None:
    """With too few repeat buyers no model is fitted; the predictive fields are None and a reason is given."""
    facts = simulated_book(customers=30)
    result = compute(facts, MetricsConfig(min_repeat_customers=1000))
    assert result.company["models"]["status"] == "skipped"
    assert "min_repeat_customers = 1000" in result.company["models"]["reason"]
    assert result.company["models"]["purchase_model"] is None
    for metrics in result.customers.values():
        assert metrics.clv_predicted is None
        assert metrics.p_alive is None
        assert metrics.revenue_at_risk is None
        assert metrics.churn_probability is None
        assert metrics.expected_purchases_90d is None


def test_fit_error_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """A purchase model that cannot be fitted leaves the predictions absent with the error as the reason."""

    def refuse(cls: object, rfm: models.RFM) -> models.MBGNBD:
        raise models.ModelFitError("MBG/NBD: the fit did not converge")

    monkeypatch.setattr(models.MBGNBD, "fit", classmethod(refuse))
    result = compute(simulated_book(), MetricsConfig(min_repeat_customers=5))
    assert result.company["models"]["status"] == "skipped"
    assert "did not converge" in result.company["models"]["reason"]
    assert all(m.p_alive is None for m in result.customers.values())


def test_spend_model_failure_keeps_purchase_predictions() -> None:
    """When every repeat buyer spends the same, Gamma-Gamma is not identified: P(alive) stays, money is None."""
    facts = simulated_book()
    transactions = dict.fromkeys(purchase_transactions(facts.invoices, facts.credits, AS_OF), D(100))
    result = predict(transactions, AS_OF, unit="week", churn_model="mbgnbd", horizon_months=12,
                     annual_discount_rate=D("0.1"), margin=None, min_repeat_customers=10)
    assert result.status == "no_spend_model"
    assert result.reason is not None
    assert "Gamma-Gamma" in result.reason
    assert result.spend_model is None
    assert result.purchase_model is not None
    some = next(iter(result.customers_predicted.values()))
    assert 0 < some.p_alive <= 1
    assert some.clv is None
    assert some.expected_spend is None


@pytest.mark.parametrize(
    ("churn_model", "name", "size"), [("mbgnbd", "MBG/NBD", 160), ("paretonbd", "Pareto/NBD", 40)]
)
def test_fitted_predictions_in_compute(churn_model: str, name: str, size: int) -> None:
    """A seeded customer base fits the configured model, BG/NBD and Gamma-Gamma; active customers outrank lapsed."""
    facts = simulated_book(customers=size)
    config = MetricsConfig.model_validate(
        {"churn_model": churn_model, "time_unit": "week", "gross_margin": "0.6", "min_repeat_customers": 20}
    )
    result = compute(facts, config)
    info = result.company["models"]
    assert info["status"] == "fitted", info["reason"]
    assert info["purchase_model"]["name"] == name
    assert info["comparison_model"]["name"] == "BG/NBD"
    assert info["unit"] == "week"
    assert info["purchase_model"]["loglik"] < 0
    assert info["spend_model"]["loglik"] < 0
    assert info["repeat_customers"] >= 20
    predicted = [m for m in result.customers.values() if m.p_alive is not None]
    assert len(predicted) == info["customers"]
    for m in predicted:
        assert 0 <= m.p_alive <= 1  # type: ignore[operator]
        assert m.churn_probability == pytest.approx(1 - m.p_alive, abs=2e-4)  # type: ignore[operator]
        assert m.clv_predicted is not None
        assert m.clv_predicted >= 0
        assert m.expected_spend is not None
        assert m.expected_spend > 0
        assert m.revenue_at_risk is not None
        assert m.revenue_at_risk >= m.overdue_amount
    by_recency = sorted(predicted, key=lambda m: m.last_invoice_date)  # type: ignore[arg-type, return-value]
    lapsed = [m for m in by_recency[: size // 8] if m.invoices_count >= 3]
    active = [m for m in by_recency[-size // 8 :] if m.invoices_count >= 3]
    assert lapsed
    assert active
    assert max(m.p_alive or 0.0 for m in lapsed) < min(m.p_alive or 0.0 for m in active)


def test_predicted_clv_is_margin_times_the_revenue_value() -> None:
    """The predictive CLV field carries the margin; the revenue-basis value feeds revenue at risk."""
    facts = simulated_book()
    transactions = purchase_transactions(facts.invoices, facts.credits, AS_OF)
    kwargs = {"unit": "day", "churn_model": "mbgnbd", "horizon_months": 6, "annual_discount_rate": D("0.1"),
              "min_repeat_customers": 20}
    plain = predict(transactions, AS_OF, margin=None, **kwargs)  # type: ignore[arg-type]
    halved = predict(transactions, AS_OF, margin=D("0.5"), **kwargs)  # type: ignore[arg-type]
    assert plain.status == halved.status == "fitted"
    for cid, p in plain.customers_predicted.items():
        h = halved.customers_predicted[cid]
        assert p.clv == p.clv_revenue == h.clv_revenue
        assert h.clv == p.clv_revenue * D("0.5")  # type: ignore[operator]
        assert p.expected_purchases_90d >= 0


def test_revenue_at_risk_formula() -> None:
    """Model value CLV_h (1-P)/P is capped by (1-P) x trailing revenue, and the overdue balance is added."""
    mid = revenue_at_risk(0.5, D(100), D(1000), D(50))
    assert (mid.churn_probability, mid.expected_value_if_alive, mid.model_value, mid.total) == (
        0.5, D(200), D(100), D(150)
    )
    capped = revenue_at_risk(0.1, D(100), D(200), D(0))
    assert capped.model_value == D("0.9") * 200
    dead = revenue_at_risk(0.0, D(0), D(300), D(10))
    assert dead.expected_value_if_alive is None
    assert dead.total == D(310)
    assert revenue_at_risk(0.2, D(10), D(-500), D(0)).model_value == 0


def test_risk_signals() -> None:
    """Each rule fires past its threshold only, with a fixed prefix."""
    days = [dt.date(2025, 1, 1), dt.date(2025, 1, 31), dt.date(2025, 3, 2)]  # median gap 30 days
    at_limit = risk_signals(days, [], dt.date(2025, 5, 1), overdue_invoices=0, overdue_amount=D(0), currency="EUR")
    assert at_limit == ()  # 60 days since = 2 x median: not beyond
    beyond = risk_signals(days, [], dt.date(2025, 5, 2), overdue_invoices=0, overdue_amount=D(0), currency="EUR")
    assert len(beyond) == 1
    assert beyond[0].startswith(SIGNAL_FREQUENCY_DROP)
    assert beyond[0] == (
        f"{SIGNAL_FREQUENCY_DROP}: 61 days since the last invoice, 2.0x the median 30 days between invoices"
    )
    odd = risk_signals([dt.date(2025, 1, 1), dt.date(2025, 1, 31), dt.date(2025, 3, 1)], [], dt.date(2025, 6, 1),
                       overdue_invoices=0,
                       overdue_amount=D(0), currency="EUR")
    assert "the median 29.5 days" in odd[0]

    revenue = [(dt.date(2025, 1, 10), D(3650))]  # 900 per 90 days on average over the prior 365 days
    as_of = dt.date(2025, 6, 30)
    low = risk_signals([], [*revenue, (dt.date(2025, 6, 1), D(449))], as_of, overdue_invoices=0,
                       overdue_amount=D(0), currency="EUR")
    assert len(low) == 1
    assert low[0].startswith(SIGNAL_BASKET_DROP)
    ok = risk_signals([], [*revenue, (dt.date(2025, 6, 1), D(450))], as_of, overdue_invoices=0,
                      overdue_amount=D(0), currency="EUR")
    assert ok == ()

    overdue = risk_signals([dt.date(2025, 6, 1)], [], as_of, overdue_invoices=2, overdue_amount=D("12.5"),
                           currency="EUR")
    assert overdue == (f"{SIGNAL_OVERDUE}: 2 for 12.50 EUR", SIGNAL_ONE_TIME_BUYER)


def test_compute_customers_include_crm_customers_without_invoices() -> None:
    """Every customer of the invoices, credit notes and CRM facts gets metrics; money is rounded to the currency."""
    facts = Facts(
        as_of=AS_OF,
        currency="JPY",
        invoices=[inv("a", "c1", dt.date(2025, 6, 1), "1000.4")],
        credits=[CreditFact("cn", "c3", dt.date(2025, 6, 2), net=D(10), gross=D(12))],
        customers=[CustomerFact("c2", "CRM only", acquisition_source="ads")],
    )
    result = compute(facts, MetricsConfig())
    assert sorted(result.customers) == ["c1", "c2", "c3"]
    assert result.customers["c1"].clv_historical == D(1000)
    assert result.customers["c1"].balance_due == D(1200)
    assert result.customers["c3"].clv_historical == D(-10)
    only_crm = result.customers["c2"]
    assert (only_crm.name, only_crm.channel, only_crm.invoices_count, only_crm.cac_blended) == (
        "CRM only", "ads", 0, None
    )
    assert only_crm.first_invoice_date is None
    assert only_crm.risk_signals == ()
    payload = result.to_json()
    assert payload["customers"]["c1"]["clv_historical"] == "1000"
    assert payload["customers"]["c1"]["first_invoice_date"] == "2025-06-01"
    assert payload["customers"]["c1"]["risk_signals"] == ["one-time buyer"]


def test_predictions_do_not_depend_on_the_time_unit() -> None:
    """Fitting in days or in weeks gives the same 90-day activity, P(alive) and CLV (the unit only rescales rates)."""
    facts = simulated_book()
    transactions = purchase_transactions(facts.invoices, facts.credits, AS_OF)
    kwargs = {"churn_model": "mbgnbd", "horizon_months": 12, "annual_discount_rate": D("0.1"), "margin": None,
              "min_repeat_customers": 20}
    in_days = predict(transactions, AS_OF, unit="day", **kwargs)  # type: ignore[arg-type]
    in_weeks = predict(transactions, AS_OF, unit="week", **kwargs)  # type: ignore[arg-type]
    assert in_days.unit == "day"
    assert in_weeks.unit == "week"
    ratio = in_weeks.purchase_model["params"]["alpha"] / in_days.purchase_model["params"]["alpha"]  # type: ignore[index]
    assert ratio == pytest.approx(1 / 7, rel=1e-2)
    for cid, d in in_days.customers_predicted.items():
        w = in_weeks.customers_predicted[cid]
        assert w.expected_purchases_90d == pytest.approx(d.expected_purchases_90d, rel=1e-2, abs=1e-4)
        assert w.p_alive == pytest.approx(d.p_alive, rel=1e-2, abs=1e-4)
        assert float(w.clv) == pytest.approx(float(d.clv), rel=1e-2, abs=1e-2)  # type: ignore[arg-type]
