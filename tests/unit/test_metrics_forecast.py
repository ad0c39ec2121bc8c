"""Weighted pipeline by close month and forecast accuracy (WAPE, bias, single-period accuracy)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from config.schema import MetricsConfig
from metrics.compute import compute
from metrics.facts import DealFact, Facts, InvoiceFact
from metrics.forecast import ACCURACY_BASE, forecast_accuracy, weighted_pipeline

D = Decimal
AS_OF = dt.date(2025, 5, 15)


def deal(
    deal_id: str,
    amount: str | None,
    probability: str | None,
    close: dt.date | None,
    *,
    won: bool = False,
    closed: bool = False,
) -> DealFact:
    return DealFact(
        deal_id=deal_id,
        customer_id="c1",
        amount=None if amount is None else D(amount),
        stage=None,
        probability=None if probability is None else D(probability),
        is_won=won,
        is_closed=closed or won,
        close_date=close,
    )


DEALS = [
    deal("open-may", "1000", "0.4", dt.date(2025, 5, 20)),
    deal("open-may-2", "500", "0.9", dt.date(2025, 5, 31)),
    deal("open-jun", "2000", "0.25", dt.date(2025, 6, 3)),
    deal("no-date", "700", "0.5", None),
    deal("no-probability", "700", None, dt.date(2025, 6, 1)),
    deal("no-amount", None, "0.5", dt.date(2025, 6, 1)),
    deal("won-may", "800", "1", dt.date(2025, 5, 2), won=True),
    deal("won-april", "300", "1", dt.date(2025, 4, 28), won=True),
    deal("won-later", "999", "1", dt.date(2025, 5, 20), won=True),
    deal("won-no-date", "50", "1", None, won=True),
    deal("lost", "5000", "0", dt.date(2025, 5, 10), closed=True),
]


def test_weighted_pipeline_by_close_month() -> None:
    """Open deals weigh amount x probability in their close month; won deals to date add their amount."""
    result = weighted_pipeline(DEALS, AS_OF)
    assert result.weighted_by_month == {"2025-05": D("850.0"), "2025-06": D("500.00")}
    assert result.won_by_month == {"2025-04": D(300), "2025-05": D(800)}
    assert result.forecast_by_month == {"2025-04": D(300), "2025-05": D("1650.0"), "2025-06": D("500.00")}
    assert result.open_deals == 3
    assert result.excluded_open_deals == 3
    assert result.excluded_won_deals == 1


def test_accuracy_worked_example() -> None:
    """A = [100, 200, 0, 50] against F = [110, 150, 10, 60] gives WAPE 22.9 % and bias -5.7 %."""
    months = ["2025-01", "2025-02", "2025-03", "2025-04"]
    actual = dict(zip(months, [D(100), D(200), D(0), D(50)], strict=True))
    forecast = dict(zip(months, [D(110), D(150), D(10), D(60)], strict=True))
    result = forecast_accuracy(forecast, actual)
    assert result.wape is not None
    assert result.bias is not None
    assert result.wape.quantize(D("0.1")) == D("22.9")
    assert result.bias.quantize(D("0.1")) == D("-5.7")
    assert result.error == {"2025-01": 10, "2025-02": -50, "2025-03": 10, "2025-04": 10}
    assert result.accuracy == {"2025-01": 90, "2025-02": 75, "2025-03": None, "2025-04": 80}
    assert result.last_period_accuracy == 80
    assert result.base == ACCURACY_BASE
    assert "actual invoiced net revenue" in result.base


def test_accuracy_with_missing_or_zero_actuals() -> None:
    """A month without actual revenue counts as 0; with no actual revenue at all WAPE and bias are undefined."""
    result = forecast_accuracy({"2025-01": D(100)}, {})
    assert result.actual == {"2025-01": 0}
    assert result.wape is None
    assert result.bias is None
    assert result.last_period_accuracy is None
    empty = forecast_accuracy({}, {"2025-01": D(5)})
    assert empty.months == ()
    assert empty.last_period_accuracy is None


def test_compute_scores_only_ended_months_against_invoiced_revenue() -> None:
    """compute() compares snapshots with net invoiced revenue per month, skipping the month still running."""
    invoices = [
        InvoiceFact("i1", "c1", dt.date(2025, 3, 5), dt.date(2025, 4, 5), D(1000), D(1200), D(0), status="paid"),
        InvoiceFact("i2", "c1", dt.date(2025, 4, 5), dt.date(2025, 5, 5), D(400), D(480), D(480)),
        InvoiceFact("i3", "c1", dt.date(2025, 4, 9), dt.date(2025, 5, 5), D(9999), D(9999), D(9999), status="draft"),
    ]
    facts = Facts(as_of=AS_OF, currency="EUR", invoices=invoices, deals=DEALS)
    snapshots = {"2025-03": D(900), "2025-04": D(500), "2025-05": D(2000)}
    result = compute(facts, MetricsConfig(), snapshots=snapshots)
    accuracy = result.company["forecast_accuracy"]
    assert list(accuracy["months"]) == ["2025-03", "2025-04"]
    assert accuracy["months"]["2025-04"] == {
        "forecast": D("500.00"), "actual": D("400.00"), "error": D("100.00"), "accuracy": D("75.0")
    }
    assert accuracy["wape"] == D("14.3")  # (100 + 100) / 1400
    assert accuracy["bias"] == D("0.0")
    assert accuracy["base"] == ACCURACY_BASE
    assert result.company["forecast_by_month"]["2025-05"] == {
        "weighted": D("850.00"), "won": D("800.00"), "total": D("1650.00")
    }
    assert result.company["forecast_excluded_deals"] == {"open": 3, "won": 1}
    assert compute(facts, MetricsConfig()).company["forecast_accuracy"] is None


def test_result_accessors_for_snapshots_and_write_back() -> None:
    """MetricsResult gives the monthly forecast totals and a customer's metrics by field name."""
    invoices = [InvoiceFact("i1", "c1", dt.date(2025, 3, 5), dt.date(2025, 4, 5), D(1000), D(1200), D(1200))]
    result = compute(Facts(as_of=AS_OF, currency="EUR", invoices=invoices, deals=DEALS), MetricsConfig())
    assert result.forecast_by_month() == {"2025-04": D("300.00"), "2025-05": D("1650.00"), "2025-06": D("500.00")}
    values = result.customer_values("c1")
    assert values["clv_historical"] == D("1000.00")
    assert values["balance_due"] == D("1200.00")
    assert values["last_invoice_date"] == dt.date(2025, 3, 5)
    assert values["risk_signals"] == ("overdue invoices: 1 for 1200.00 EUR", "one-time buyer")
    assert set(values) == set(result.customers["c1"].to_json())


def test_headline_lists_the_company_figures() -> None:
    """The headline rows show the DSO family and say why the models were not fitted."""
    invoices = [InvoiceFact("i1", "c1", dt.date(2025, 4, 5), dt.date(2025, 4, 20), D(1000), D(1200), D(1200))]
    rows = dict(compute(Facts(as_of=AS_OF, currency="EUR", invoices=invoices), MetricsConfig()).headline())
    assert rows["receivables (EUR)"] == "1200.00 (1200.00 overdue)"
    assert rows["DSO, countback (days)"] == "45.0"  # May 1-15 without sales (15 days) + 1200/1200 of April (30)
    assert rows["best possible DSO (days)"] == "0.0"
    assert rows["CEI 2025-04"] == "0.0 %"
    assert rows["purchase model"].startswith("not fitted: 0 repeat buyer(s)")
