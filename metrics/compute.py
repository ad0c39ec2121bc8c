"""Run every metric on one :class:`~metrics.facts.Facts` and gather the results.

:func:`compute` is a pure function of the facts, the pipeline's :class:`~config.schema.MetricsConfig` and
optional forecast snapshots: the same inputs in any order give the same :class:`MetricsResult`. Money is
rounded to the currency of the facts (:func:`connectors.domain.round_money`), days to 1 decimal place,
percents to 1 decimal place, probabilities to 4 and expected purchase counts to 3; a figure that is not
defined for a customer (no payments in the window, no model fitted...) is None.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from config.schema import MetricsConfig
from connectors.domain import minor_unit
from metrics import cac as cac_mod
from metrics import clv as clv_mod
from metrics import dso as dso_mod
from metrics import forecast as forecast_mod
from metrics import risk as risk_mod
from metrics.facts import CustomerFact, Facts
from metrics.periods import add_months, month_end, month_key, parse_month

__all__ = ["CustomerMetrics", "MetricsResult", "compute"]

_ZERO = Decimal(0)
_ONE_DP = Decimal("0.1")
_TWO_DP = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class CustomerMetrics:
    """Every per-customer metric, rounded (see the module doc); the field docs give each definition."""

    customer_id: str
    #: CRM name when the customer is known to the CRM, else None.
    name: str | None
    #: CRM acquisition source, or "unattributed".
    channel: str
    #: Issue dates of the first and last posted invoice on or before as_of, and how many there are.
    first_invoice_date: dt.date | None
    last_invoice_date: dt.date | None
    invoices_count: int
    #: Net invoiced revenue minus net credit notes, to date (x gross margin when configured).
    clv_historical: Decimal
    #: Payments received net of their tax share, to date (x gross margin when configured).
    clv_paid: Decimal
    #: Discounted expected net revenue over horizon_months (x gross margin when configured).
    clv_predicted: Decimal | None
    #: P(alive) and 1 - P(alive) under the configured churn model.
    p_alive: float | None
    churn_probability: float | None
    #: Expected purchases (invoice days) in the next 90 days.
    expected_purchases_90d: float | None
    #: Gamma-Gamma expected net value of one future purchase.
    expected_spend: Decimal | None
    #: Channel paid spend share + sales effort; blended adds the share of overhead (see metrics.cac).
    cac_paid: Decimal | None
    cac_blended: Decimal | None
    #: clv_historical / cac_blended.
    clv_cac_ratio: Decimal | None
    #: Months (acquisition month = 1) until cumulative margin (or net revenue) reaches cac_blended.
    cac_payback_months: int | None
    #: Amount-weighted days from invoice to payment, payments of the trailing `trailing_months` months.
    days_to_pay_weighted: Decimal | None
    #: Amount-weighted max(0, payment date - due date), same payments.
    days_beyond_terms_weighted: Decimal | None
    #: Open-amount-weighted age of open invoices at as_of.
    open_ar_age_weighted: Decimal | None
    #: Open receivables (gross) at as_of, the part past due, how many invoices are past due, the worst.
    balance_due: Decimal
    overdue_amount: Decimal
    overdue_invoices: int
    max_days_overdue: int
    #: Net revenue of the 12 months ending at as_of.
    revenue_trailing_12m: Decimal
    #: min(CLV_h(1-P)/P, (1-P) x revenue_trailing_12m) on a revenue basis, + overdue_amount.
    revenue_at_risk: Decimal | None
    #: Warning signals (metrics.risk), in a fixed order.
    risk_signals: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """This customer's metrics as a JSON-able dict (Decimal as string, dates ISO, tuples as lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class MetricsResult:
    """The company-wide figures and the per-customer metrics of one computation.

    ``company`` keys (money rounded; days and percents 1 dp; months ``"YYYY-MM"``):

    * ``customers``, ``new_customers_by_month`` ({month: n});
    * ``ar_total``, ``ar_current``, ``ar_overdue``; ``dso_countback``, ``bpdso``, ``add``, ``dso_simple_90d``
      (days), ``cei`` (percent) and ``cei_month``;
    * ``revenue_by_month`` (net invoiced revenue minus credit notes), ``clv_historical_total``;
    * ``spend_by_month``, ``cac_blended_by_month``, ``cac_paid_by_channel`` ({channel: {month: CAC}}),
      ``sales_effort_by_month``, ``unallocated_spend_by_month``, ``cac_lag_months``;
    * ``forecast_by_month`` ({month: {"weighted", "won", "total"}}), ``forecast_open_deals``,
      ``forecast_excluded_deals`` ({"open", "won"});
    * ``forecast_accuracy``: None without snapshots, else {"base", "months": {month: {"forecast",
      "actual", "error", "accuracy"}}, "wape", "bias", "last_period_accuracy"} (percents);
    * ``models``: {"status", "reason", "notes", "unit", "churn_model", "horizon_months", "customers",
      "repeat_customers", "purchase_model", "comparison_model", "spend_model"} (each model: "name",
      "params", "loglik", "n").
    """

    as_of: dt.date
    currency: str
    company: dict[str, Any]
    customers: dict[str, CustomerMetrics]

    def forecast_by_month(self) -> dict[str, Decimal]:
        """``{month: weighted open pipeline + won to date}`` (rounded), the figure a forecast snapshot keeps."""
        return {m: row["total"] for m, row in self.company["forecast_by_month"].items()}

    def headline(self) -> list[tuple[str, str]]:
        """The main company figures as ``(label, text)`` rows for a report (undefined figures shown as ``-``)."""
        c = self.company

        def text(value: Any, unit: str = "") -> str:
            return "-" if value is None else f"{value}{unit}"

        latest_cac = next((v for v in reversed(c["cac_blended_by_month"].values()) if v is not None), None)
        models = c["models"]
        fitted = models["purchase_model"]
        model_text = (
            f"{fitted['name']} (log-likelihood {fitted['loglik']:.1f}, unit {models['unit']}), "
            f"{models['repeat_customers']} repeat buyers"
            if fitted is not None
            else f"not fitted: {models['reason']}"
        )
        return [
            ("customers", str(c["customers"])),
            (f"receivables ({self.currency})", f"{c['ar_total']} ({c['ar_overdue']} overdue)"),
            ("DSO, countback (days)", text(c["dso_countback"])),
            ("best possible DSO (days)", text(c["bpdso"])),
            ("average days delinquent", text(c["add"])),
            (f"CEI {c['cei_month']}", text(c["cei"], " %")),
            ("DSO, simple 90 days (days)", text(c["dso_simple_90d"])),
            (f"CLV to date, all customers ({self.currency})", str(c["clv_historical_total"])),
            (f"blended CAC, latest month ({self.currency})", text(latest_cac)),
            ("purchase model", model_text),
        ]

    def customer_values(self, customer_id: str) -> dict[str, Any]:
        """Every metric of one customer by field name (the :class:`CustomerMetrics` fields), for the write-back."""
        metrics = self.customers[customer_id]
        return {f.name: getattr(metrics, f.name) for f in fields(metrics)}

    def to_json(self) -> dict[str, Any]:
        """The whole result as a JSON-able dict (Decimal as string, dates ISO, non-finite floats as None)."""
        return {
            "as_of": self.as_of.isoformat(),
            "currency": self.currency,
            "company": _jsonable(self.company),
            "customers": {cid: m.to_json() for cid, m in sorted(self.customers.items())},
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _one_dp(value: Decimal | None) -> Decimal | None:
    return None if value is None else value.quantize(_ONE_DP, rounding=ROUND_HALF_UP)


def _prob(value: float | None, digits: int = 4) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


def compute(
    facts: Facts, config: MetricsConfig, *, snapshots: Mapping[str, Decimal] | None = None
) -> MetricsResult:
    """Every metric of ``facts`` at ``facts.as_of`` under ``config``.

    ``snapshots`` are forecast snapshots ``{month: forecast}`` for the accuracy figures; only months that
    have ended by ``as_of`` are scored, against the net invoiced revenue of the month.
    Customers are every customer id of the invoices, the credit notes and the CRM customer facts.
    """
    as_of = facts.as_of
    currency = facts.currency

    cent = Decimal(1).scaleb(-minor_unit(currency))

    def money(value: Decimal) -> Decimal:
        # Same rounding as connectors.domain.round_money, without its per-call checks.
        return value.quantize(cent, rounding=ROUND_HALF_UP)

    def opt_money(value: Decimal | None) -> Decimal | None:
        return None if value is None else value.quantize(cent, rounding=ROUND_HALF_UP)

    book = dso_mod.ReceivablesBook(facts.invoices, facts.payments, facts.credits)
    company_ar, receivables = dso_mod.receivables_report(book, as_of, trailing_months=config.trailing_months)

    margin = config.gross_margin
    events = clv_mod.revenue_events(facts.invoices, facts.credits, as_of)
    monthly = clv_mod.revenue_by_month(events)
    historical = clv_mod.clv_from_events(events, margin=margin)
    paid = clv_mod.net_paid_revenue(facts.invoices, facts.payments, as_of, margin=margin)
    trailing = clv_mod.revenue_between(events, add_months(as_of, -12) + dt.timedelta(days=1), as_of)
    events_by_customer: dict[str, list[tuple[dt.date, Decimal]]] = defaultdict(list)
    for e in events:
        events_by_customer[e.customer_id].append((e.date, e.amount))

    predictions = clv_mod.predict(
        clv_mod.purchase_transactions(facts.invoices, facts.credits, as_of),
        as_of,
        unit=config.time_unit,
        churn_model=config.churn_model,
        horizon_months=config.horizon_months,
        annual_discount_rate=config.discount_rate_annual,
        margin=margin,
        min_repeat_customers=config.min_repeat_customers,
    )

    acquisition = cac_mod.acquisition_cost(
        invoices=facts.invoices,
        customers=facts.customers,
        spend=facts.spend,
        deals=facts.deals,
        activities=facts.activities,
        activity_costs=facts.activity_costs or config.activity_costs,
        as_of=as_of,
        lag_months=config.spend.lag_months,
        overhead_channels=config.spend.overhead_channels,
    )

    # Without any spend and any cost per sales activity, acquisition cost is unknown, not zero.
    costs_known = bool(facts.spend) or any(v for v in (facts.activity_costs or config.activity_costs).values())
    posted_days: dict[str, list[dt.date]] = defaultdict(list)
    for inv in facts.invoices:
        if dso_mod.is_posted(inv) and inv.issue_date <= as_of:
            posted_days[inv.customer_id].append(inv.issue_date)
    crm: dict[str, CustomerFact] = {}
    for c in sorted(facts.customers, key=lambda c: (c.customer_id, c.name, c.acquisition_source or "")):
        crm.setdefault(c.customer_id, c)
    ids = sorted(
        {inv.customer_id for inv in facts.invoices} | {c.customer_id for c in facts.credits} | set(crm)
    )
    last_month = month_key(as_of)
    customers: dict[str, CustomerMetrics] = {}
    for cid in ids:
        days = posted_days.get(cid, [])
        ar = receivables.get(cid)
        overdue_amount = ar.overdue_amount if ar is not None else _ZERO
        overdue_count = ar.overdue_invoices if ar is not None else 0
        prediction = predictions.customers_predicted.get(cid)
        allocated = acquisition.customers.get(cid) if costs_known else None
        clv_hist = money(historical.get(cid, _ZERO))
        cac_blended = opt_money(allocated.cac_blended) if allocated is not None else None
        value_by_month = {m: v * (margin if margin is not None else 1) for m, v in monthly.get(cid, {}).items()}
        t12 = trailing.get(cid, _ZERO)
        rar: Decimal | None = None
        churn: float | None = None
        if prediction is not None:
            churn = _prob(1 - prediction.p_alive)
            if prediction.clv_revenue is not None and math.isfinite(prediction.p_alive):
                rar = money(risk_mod.revenue_at_risk(prediction.p_alive, prediction.clv_revenue, t12,
                                                     overdue_amount).total)
        channel = allocated.channel if allocated is not None else None
        if channel is None:
            source = crm[cid].acquisition_source if cid in crm else None
            channel = source or cac_mod.UNATTRIBUTED
        customers[cid] = CustomerMetrics(
            customer_id=cid,
            name=crm[cid].name if cid in crm else None,
            channel=channel,
            first_invoice_date=min(days) if days else None,
            last_invoice_date=max(days) if days else None,
            invoices_count=len(days),
            clv_historical=clv_hist,
            clv_paid=money(paid.get(cid, _ZERO)),
            clv_predicted=opt_money(prediction.clv) if prediction is not None else None,
            p_alive=_prob(prediction.p_alive) if prediction is not None else None,
            churn_probability=churn,
            expected_purchases_90d=_prob(prediction.expected_purchases_90d, 3) if prediction is not None else None,
            expected_spend=opt_money(prediction.expected_spend) if prediction is not None else None,
            cac_paid=opt_money(allocated.cac_paid) if allocated is not None else None,
            cac_blended=cac_blended,
            clv_cac_ratio=_ratio(cac_mod.clv_cac_ratio(clv_hist, cac_blended)),
            cac_payback_months=(
                cac_mod.cac_payback_months(cac_blended, allocated.acquisition_month, value_by_month, last_month)
                if allocated is not None
                else None
            ),
            days_to_pay_weighted=_one_dp(ar.days_to_pay_weighted) if ar is not None else None,
            days_beyond_terms_weighted=_one_dp(ar.days_beyond_terms_weighted) if ar is not None else None,
            open_ar_age_weighted=_one_dp(ar.open_ar_age_weighted) if ar is not None else None,
            balance_due=money(ar.balance_due) if ar is not None else money(_ZERO),
            overdue_amount=money(overdue_amount),
            overdue_invoices=overdue_count,
            max_days_overdue=ar.max_days_overdue if ar is not None else 0,
            revenue_trailing_12m=money(t12),
            revenue_at_risk=rar,
            risk_signals=risk_mod.risk_signals(
                days, events_by_customer.get(cid, ()), as_of,
                overdue_invoices=overdue_count, overdue_amount=overdue_amount, currency=currency,
            ),
        )

    company: dict[str, Any] = {
        "customers": len(customers),
        "new_customers_by_month": {m: sum(ch.values()) for m, ch in acquisition.new_customers.items()},
        "ar_total": money(company_ar.ar_total),
        "ar_current": money(company_ar.ar_current),
        "ar_overdue": money(company_ar.ar_overdue),
        "dso_countback": _one_dp(company_ar.dso_countback),
        "bpdso": _one_dp(company_ar.bpdso),
        "add": _one_dp(company_ar.add),
        "cei": _one_dp(company_ar.cei),
        "cei_month": company_ar.cei_month,
        "dso_simple_90d": _one_dp(company_ar.dso_simple_90d),
        "revenue_by_month": {m: money(v) for m, v in _company_revenue(monthly).items()},
        "clv_historical_total": money(sum(historical.values(), _ZERO)),
        "spend_by_month": {m: money(v) for m, v in acquisition.spend_by_month.items()},
        "cac_blended_by_month": {m: opt_money(v) for m, v in acquisition.blended_cac.items()},
        "cac_paid_by_channel": {
            ch: {m: opt_money(v) for m, v in months.items()} for ch, months in acquisition.paid_cac.items()
        },
        "sales_effort_by_month": {m: money(v) for m, v in acquisition.sales_effort_by_month.items()},
        "unallocated_spend_by_month": {m: money(v) for m, v in acquisition.unallocated.items()},
        "cac_lag_months": acquisition.lag_months,
        **_forecast(facts, snapshots, _company_revenue(monthly), money),
        "models": _models(predictions),
    }
    return MetricsResult(as_of=as_of, currency=currency, company=company, customers=customers)


def _ratio(value: Decimal | None) -> Decimal | None:
    return None if value is None else value.quantize(_TWO_DP, rounding=ROUND_HALF_UP)


def _company_revenue(monthly: Mapping[str, Mapping[str, Decimal]]) -> dict[str, Decimal]:
    totals: dict[str, Decimal] = defaultdict(Decimal)
    for months in monthly.values():
        for m, v in months.items():
            totals[m] += v
    return dict(sorted(totals.items()))


def _forecast(
    facts: Facts,
    snapshots: Mapping[str, Decimal] | None,
    actuals: Mapping[str, Decimal],
    money: Callable[[Decimal], Decimal],
) -> dict[str, Any]:
    pipeline = forecast_mod.weighted_pipeline(facts.deals, facts.as_of)
    by_month = {
        m: {
            "weighted": money(pipeline.weighted_by_month.get(m, _ZERO)),
            "won": money(pipeline.won_by_month.get(m, _ZERO)),
            "total": money(total),
        }
        for m, total in pipeline.forecast_by_month.items()
    }
    accuracy: dict[str, Any] | None = None
    if snapshots is not None:
        ended = {m: f for m, f in snapshots.items() if month_end(parse_month(m)) <= facts.as_of}
        scored = forecast_mod.forecast_accuracy(ended, actuals)
        accuracy = {
            "base": scored.base,
            "months": {
                m: {
                    "forecast": money(scored.forecast[m]),
                    "actual": money(scored.actual[m]),
                    "error": money(scored.error[m]),
                    "accuracy": _one_dp(scored.accuracy[m]),
                }
                for m in scored.months
            },
            "wape": _one_dp(scored.wape),
            "bias": _one_dp(scored.bias),
            "last_period_accuracy": _one_dp(scored.last_period_accuracy),
        }
    return {
        "forecast_by_month": by_month,
        "forecast_open_deals": pipeline.open_deals,
        "forecast_excluded_deals": {"open": pipeline.excluded_open_deals, "won": pipeline.excluded_won_deals},
        "forecast_accuracy": accuracy,
    }


def _models(predictions: clv_mod.Predictions) -> dict[str, Any]:
    return {
        "status": predictions.status,
        "reason": predictions.reason,
        "notes": list(predictions.notes),
        "unit": predictions.unit,
        "churn_model": predictions.churn_model,
        "horizon_months": predictions.horizon_months,
        "customers": predictions.customers,
        "repeat_customers": predictions.repeat_customers,
        "purchase_model": predictions.purchase_model,
        "comparison_model": predictions.comparison_model,
        "spend_model": predictions.spend_model,
    }
