"""Acquisition cost: paid CAC by channel, blended CAC, per-customer allocation that reconciles, payback, ratio."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from config.schema import MetricsConfig
from metrics.cac import (
    UNATTRIBUTED,
    acquisition_cost,
    cac_payback_months,
    clv_cac_ratio,
    sales_effort,
)
from metrics.compute import compute
from metrics.facts import ActivityFact, CustomerFact, DealFact, Facts, InvoiceFact, SpendFact

D = Decimal
AS_OF = dt.date(2025, 4, 30)
COSTS = {"call": D(10), "meeting": D(50)}


def inv(ledger_id: str, customer: str, issued: dt.date, net: str = "100", status: str = "authorised") -> InvoiceFact:
    return InvoiceFact(ledger_id, customer, issued, issued + dt.timedelta(days=30), D(net), D(net) * D("1.2"),
                       D(net) * D("1.2"), status=status)  # type: ignore[arg-type]


def book() -> dict[str, object]:
    """Four customers won in March (2 ads, 1 seo, 1 without source) and one in April; February spend."""
    invoices = [
        inv("a1", "ads-1", dt.date(2025, 3, 3), "200"),
        inv("a1b", "ads-1", dt.date(2025, 4, 3), "300"),
        inv("a2", "ads-2", dt.date(2025, 3, 9)),
        inv("s1", "seo-1", dt.date(2025, 3, 15)),
        inv("u1", "nobody", dt.date(2025, 3, 20)),
        inv("d1", "drafty", dt.date(2025, 2, 20), status="draft"),
        inv("x1", "apr-1", dt.date(2025, 4, 2)),
    ]
    customers = [
        CustomerFact("ads-1", "Ads One", acquisition_source="ads"),
        CustomerFact("ads-2", "Ads Two", acquisition_source="ads"),
        CustomerFact("seo-1", "Seo One", acquisition_source="seo"),
        CustomerFact("nobody", "No Source"),
        CustomerFact("apr-1", "April", acquisition_source="ads"),
    ]
    spend = [
        SpendFact(dt.date(2025, 2, 3), "ads", D(400)),
        SpendFact(dt.date(2025, 2, 20), "ads", D(200)),
        SpendFact(dt.date(2025, 2, 5), "seo", D(300)),
        SpendFact(dt.date(2025, 2, 7), "tv", D(200)),
        SpendFact(dt.date(2025, 2, 28), "salaries", D(400), kind="overhead"),
        SpendFact(dt.date(2025, 1, 10), "ads", D(1000)),  # matched with February: nobody was won then
        SpendFact(dt.date(2025, 3, 10), "ads", D(90)),  # matched with April's customer
        SpendFact(dt.date(2025, 4, 10), "ads", D(70)),  # matched with May: still to come
        SpendFact(dt.date(2025, 5, 2), "ads", D(5000)),  # after as_of: ignored
    ]
    deals = [
        DealFact("deal-1", "ads-1", D(240), "won", D(1), is_won=True, is_closed=True, close_date=dt.date(2025, 3, 1)),
        DealFact("deal-2", "ads-1", D(99), "lost", D(0), is_won=False, is_closed=True, close_date=dt.date(2025, 3, 1)),
    ]
    activities = [
        ActivityFact("deal-1", "call", 2),
        ActivityFact("deal-1", "meeting", 1),
        ActivityFact("deal-1", "email", 7),
        ActivityFact("deal-2", "meeting", 4),
    ]
    return {"invoices": invoices, "customers": customers, "spend": spend, "deals": deals, "activities": activities}


def report(lag: int = 1) -> object:
    return acquisition_cost(**book(), activity_costs=COSTS, as_of=AS_OF, lag_months=lag)  # type: ignore[arg-type]


def test_sales_effort_counts_activities_of_won_deals_only() -> None:
    """Sales effort is count x unit cost over the activities of won deals; kinds without a cost cost nothing."""
    data = book()
    effort = sales_effort(data["deals"], data["activities"], COSTS)  # type: ignore[arg-type]
    assert effort == {"ads-1": D(2 * 10 + 50)}


def test_per_customer_cac_with_one_month_lag() -> None:
    """March customers share February spend: their channel's paid spend, and overhead plus orphan channel spend."""
    result = report()
    assert result.new_customers["2025-03"] == {"ads": 2, "seo": 1, UNATTRIBUTED: 1}  # type: ignore[attr-defined]
    customers = result.customers  # type: ignore[attr-defined]
    # Overhead 400 + the tv spend that acquired nobody (200) spread over the 4 March customers.
    assert customers["ads-1"].paid_share == D(300)
    assert customers["ads-1"].sales_effort == D(70)
    assert customers["ads-1"].cac_paid == D(370)
    assert customers["ads-1"].cac_blended == D(520)
    assert customers["ads-2"].cac_paid == D(300)
    assert customers["ads-2"].cac_blended == D(450)
    assert customers["seo-1"].cac_blended == D(450)
    assert customers["nobody"].channel == UNATTRIBUTED
    assert customers["nobody"].cac_paid == 0
    assert customers["nobody"].cac_blended == D(150)
    assert customers["apr-1"].cac_blended == D(90)
    assert "drafty" not in customers


def test_blended_cac_reconciles_with_the_spend_of_the_matched_month() -> None:
    """Per-customer blended CAC of a month sums to the matched month's whole spend plus the sales effort."""
    result = report()
    march = [c for c in result.customers.values() if c.acquisition_month == "2025-03"]  # type: ignore[attr-defined]
    spend_feb = result.spend_by_month["2025-02"]  # type: ignore[attr-defined]
    assert spend_feb == D(1500)
    assert sum(c.cac_blended for c in march) == spend_feb + result.sales_effort_by_month["2025-03"]  # type: ignore[attr-defined]
    assert result.blended_cac["2025-03"] == D(1570) / 4  # type: ignore[attr-defined]
    assert result.blended_cac["2025-02"] is None  # type: ignore[attr-defined]


def test_paid_cac_by_channel_and_unallocated_spend() -> None:
    """Paid CAC divides a channel's lagged spend by its new customers; spend nobody was acquired for is unallocated."""
    result = report()
    assert result.paid_cac["ads"]["2025-03"] == D(300)  # type: ignore[attr-defined]
    assert result.paid_cac["seo"]["2025-03"] == D(300)  # type: ignore[attr-defined]
    assert result.paid_cac["tv"]["2025-03"] is None  # type: ignore[attr-defined]
    assert result.paid_cac[UNATTRIBUTED]["2025-03"] == 0  # type: ignore[attr-defined]
    assert result.paid_cac["ads"]["2025-04"] == D(90)  # type: ignore[attr-defined]
    # January spend matches February (no new customer); April spend matches May (after as_of).
    assert result.unallocated == {"2025-01": D(1000), "2025-04": D(70)}  # type: ignore[attr-defined]
    assert "2025-05" not in result.spend_by_month  # type: ignore[attr-defined]


def test_without_lag_spend_matches_its_own_month() -> None:
    """With lag 0 the March customers get March spend only, and February's spend is unallocated."""
    result = report(lag=0)
    assert result.customers["ads-1"].paid_share == D(45)  # type: ignore[attr-defined]
    assert result.customers["seo-1"].cac_blended == D(0)  # type: ignore[attr-defined]
    assert result.unallocated["2025-02"] == D(1500)  # type: ignore[attr-defined]


def test_overhead_channels_by_name() -> None:
    """A paid row whose channel is listed as an overhead channel is spread like overhead."""
    data = book()
    data["spend"] = [SpendFact(dt.date(2025, 3, 1), "brand", D(400))]
    result = acquisition_cost(**data, activity_costs={}, as_of=AS_OF, overhead_channels=["brand"])  # type: ignore[arg-type]
    assert result.overhead_by_month == {"2025-03": D(400)}
    assert {c.overhead_share for c in result.customers.values() if c.acquisition_month == "2025-03"} == {D(100)}


def test_clv_cac_ratio() -> None:
    """The ratio is CLV over CAC and undefined without a positive CAC."""
    assert clv_cac_ratio(D(900), D(300)) == 3
    assert clv_cac_ratio(D(900), D(0)) is None
    assert clv_cac_ratio(None, D(10)) is None


@pytest.mark.parametrize(
    ("cac", "expected"),
    [(D(250), 4), (D(200), 2), (D(100), 1), (D(0), 1), (D(601), None), (None, None)],
)
def test_cac_payback_months(cac: Decimal | None, expected: int | None) -> None:
    """Payback is the first month (acquisition month = 1) whose cumulative value reaches the CAC."""
    monthly = {"2025-01": D(100), "2025-02": D(100), "2025-04": D(400)}
    assert cac_payback_months(cac, "2025-01", monthly, "2025-04") == expected


def test_compute_exposes_cac_per_customer_and_company() -> None:
    """compute() rounds the CAC figures, divides historical CLV by blended CAC and counts payback on margin."""
    data = book()
    facts = Facts(as_of=AS_OF, currency="EUR", activity_costs=COSTS, **data)  # type: ignore[arg-type]
    config = MetricsConfig.model_validate({"gross_margin": "0.5", "spend": {"lag_months": 1}})
    result = compute(facts, config)
    ads1 = result.customers["ads-1"]
    assert (ads1.cac_paid, ads1.cac_blended) == (D("370.00"), D("520.00"))
    assert ads1.clv_historical == D("250.00")  # (200 + 300) x 0.5
    assert ads1.clv_cac_ratio == D("0.48")
    assert ads1.cac_payback_months is None  # margin 100 in March + 150 in April < 520
    assert result.customers["apr-1"].cac_payback_months is None  # margin 50 < 90
    assert result.company["cac_blended_by_month"]["2025-03"] == D("392.50")
    assert result.company["cac_paid_by_channel"]["tv"]["2025-03"] is None
    assert result.company["unallocated_spend_by_month"] == {"2025-01": D("1000.00"), "2025-04": D("70.00")}
    assert result.company["new_customers_by_month"] == {"2025-03": 4, "2025-04": 1}
    on_revenue = compute(facts, MetricsConfig.model_validate({"spend": {"lag_months": 1}}))
    assert on_revenue.customers["apr-1"].cac_payback_months == 1  # revenue 100 >= 90
    assert on_revenue.customers["ads-1"].cac_payback_months is None  # revenue 200 + 300 < 520


def test_without_spend_or_activity_costs_cac_is_unknown_not_zero() -> None:
    """A pipeline that configures no spend source and no activity cost gets no CAC on any customer."""
    data = book()
    data["spend"] = []
    facts = Facts(as_of=AS_OF, currency="EUR", **data)  # type: ignore[arg-type]
    result = compute(facts, MetricsConfig())
    assert result.customers
    assert all(c.cac_paid is None and c.cac_blended is None for c in result.customers.values())
    assert all(c.clv_cac_ratio is None and c.cac_payback_months is None for c in result.customers.values())
    with_costs = compute(Facts(as_of=AS_OF, currency="EUR", activity_costs=COSTS, **data),  # type: ignore[arg-type]
                         MetricsConfig())
    assert any(c.cac_blended for c in with_costs.customers.values())
