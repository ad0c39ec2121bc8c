"""Customer lifetime value: what each customer has brought in so far, and what they are expected to bring.

* Historical CLV (deterministic, from the ledger): net invoiced revenue minus net credit notes, optionally
  times the gross margin; and its cash variant, net paid revenue.
* Predictive (residual) CLV: the purchase model chosen in the configuration (MBG/NBD or Pareto/NBD) and
  the Gamma-Gamma spend model of :mod:`metrics.models`, fitted on the invoice history.

Revenue is the **net** (tax-exclusive) amount in the home currency; a posted invoice is one with status
``authorised`` or ``paid`` (:func:`metrics.dso.is_posted`), counted on its issue date, and a credit note
counts on its own date.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, Literal

import numpy as np

from metrics import models
from metrics.dso import is_posted
from metrics.facts import CreditFact, InvoiceFact, PaymentFact
from metrics.periods import month_key

__all__ = [
    "CustomerPrediction",
    "Predictions",
    "RevenueEvent",
    "clv_from_events",
    "historical_clv",
    "net_paid_revenue",
    "predict",
    "purchase_transactions",
    "revenue_between",
    "revenue_by_month",
    "revenue_events",
]

_ZERO = Decimal(0)
#: The horizon of ``expected_purchases_90d``, in days.
ACTIVITY_DAYS = 90


@dataclass(frozen=True, slots=True)
class RevenueEvent:
    """One change to a customer's net revenue: +net of a posted invoice on its issue date, -net of a credit."""

    customer_id: str
    date: dt.date
    amount: Decimal


def revenue_events(
    invoices: Iterable[InvoiceFact], credits: Iterable[CreditFact], as_of: dt.date
) -> list[RevenueEvent]:
    """Net revenue movements dated on or before ``as_of``: posted invoices (+net) and credit notes (-net)."""
    events = [
        RevenueEvent(inv.customer_id, inv.issue_date, inv.net)
        for inv in invoices
        if is_posted(inv) and inv.issue_date <= as_of
    ]
    events.extend(RevenueEvent(c.customer_id, c.date, -c.net) for c in credits if c.date <= as_of)
    return events


def revenue_between(events: Iterable[RevenueEvent], first: dt.date, last: dt.date) -> dict[str, Decimal]:
    """Net revenue per customer of the events dated from ``first`` to ``last`` inclusive."""
    totals: dict[str, Decimal] = defaultdict(Decimal)
    for e in events:
        if first <= e.date <= last:
            totals[e.customer_id] += e.amount
    return dict(totals)


def revenue_by_month(events: Iterable[RevenueEvent]) -> dict[str, dict[str, Decimal]]:
    """``customer_id -> {"YYYY-MM": net revenue of the month}`` (invoices minus credit notes, by document date)."""
    totals: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for e in events:
        totals[e.customer_id][month_key(e.date)] += e.amount
    return {c: dict(sorted(months.items())) for c, months in totals.items()}


def historical_clv(
    invoices: Iterable[InvoiceFact], credits: Iterable[CreditFact], as_of: dt.date, *, margin: Decimal | None = None
) -> dict[str, Decimal]:
    """Historical CLV per customer, home currency, unrounded.

    ``(sum of net of posted invoices issued on or before as_of - sum of net of credit notes dated on or
    before as_of) x margin``, where ``margin`` is the gross margin (1 when None). Credit notes count
    whether or not they are applied to an invoice.
    """
    return clv_from_events(revenue_events(invoices, credits, as_of), margin=margin)


def clv_from_events(events: Iterable[RevenueEvent], *, margin: Decimal | None = None) -> dict[str, Decimal]:
    """Historical CLV per customer from :func:`revenue_events`: their sum per customer x ``margin`` (1 when None)."""
    factor = Decimal(1) if margin is None else margin
    totals: dict[str, Decimal] = defaultdict(Decimal)
    for e in events:
        totals[e.customer_id] += e.amount
    return {c: v * factor for c, v in totals.items()}


def net_paid_revenue(
    invoices: Iterable[InvoiceFact], payments: Iterable[PaymentFact], as_of: dt.date, *, margin: Decimal | None = None
) -> dict[str, Decimal]:
    """Net paid revenue per customer (cash basis of historical CLV), home currency, unrounded.

    ``sum over payments dated on or before as_of of amount x net / gross`` of the posted invoice it pays
    (the tax share of each payment removed), times ``margin`` (1 when None). Payments on invoices with a
    gross of 0, or on invoices that are not posted, are left out. Keyed by the invoice's customer.
    """
    factor = Decimal(1) if margin is None else margin
    by_id = {inv.ledger_id: inv for inv in invoices if is_posted(inv)}
    totals: dict[str, Decimal] = defaultdict(Decimal)
    for p in payments:
        inv = by_id.get(p.invoice_id)
        if inv is None or inv.gross == 0 or p.date > as_of:
            continue
        totals[inv.customer_id] += p.amount * inv.net / inv.gross
    return {c: v * factor for c, v in totals.items()}


def purchase_transactions(
    invoices: Iterable[InvoiceFact], credits: Iterable[CreditFact], as_of: dt.date
) -> dict[tuple[str, dt.date], Decimal]:
    """The purchases the predictive models see: ``(customer_id, day) -> value``.

    A purchase is a posted invoice issued on or before ``as_of``, valued at its net minus the net of the
    credit notes applied to it dated on or before ``as_of``; invoices of the same customer on the same day
    are merged (values summed, exactly, in Decimal), and days whose value is not positive (fully credited)
    are not purchases.
    """
    credited: dict[str, Decimal] = defaultdict(Decimal)
    for c in credits:
        if c.invoice_id is not None and c.date <= as_of:
            credited[c.invoice_id] += c.net
    merged: dict[tuple[str, dt.date], Decimal] = defaultdict(Decimal)
    for inv in invoices:
        if is_posted(inv) and inv.issue_date <= as_of:
            merged[(inv.customer_id, inv.issue_date)] += inv.net - credited.get(inv.ledger_id, _ZERO)
    return {key: value for key, value in sorted(merged.items()) if value > 0}


@dataclass(frozen=True, slots=True)
class CustomerPrediction:
    """Model outputs for one customer (floats are model expectations; money is Decimal, unrounded)."""

    #: Repeat purchases, time of last purchase and length of observation since the first, in ``unit``.
    x: int
    t_x: float
    T: float
    #: P(alive) under the configured churn model, and under BG/NBD for comparison (None if not fitted).
    p_alive: float
    p_alive_bgnbd: float | None
    #: Expected purchases in the next 90 days (configured model).
    expected_purchases_90d: float
    #: Gamma-Gamma E[M]: expected net value of one future purchase; None without a spend model.
    expected_spend: Decimal | None
    #: Discounted expected net revenue over the horizon (margin 1); None without a spend model.
    clv_revenue: Decimal | None
    #: clv_revenue x gross margin (== clv_revenue when no margin is configured).
    clv: Decimal | None


@dataclass(frozen=True)
class Predictions:
    """Fitted models and per-customer predictions; ``status`` says how far fitting got and ``reason`` why not."""

    status: Literal["fitted", "no_spend_model", "skipped"]
    reason: str | None
    unit: str
    churn_model: str
    customers: int
    repeat_customers: int
    #: ``{"name", "params": {...}, "loglik", "n"}`` of each fitted model; None when not fitted.
    purchase_model: dict[str, Any] | None = None
    comparison_model: dict[str, Any] | None = None
    spend_model: dict[str, Any] | None = None
    #: Why the comparison BG/NBD or the spend model could not be fitted, when the rest was.
    notes: tuple[str, ...] = ()
    horizon_months: int = 12
    customers_predicted: dict[str, CustomerPrediction] = field(default_factory=dict)


def _money(value: float) -> Decimal | None:
    return Decimal(f"{value:.6f}") if math.isfinite(value) else None


def _describe(name: str, model: models.BGNBD | models.MBGNBD | models.ParetoNBD | models.GammaGamma) -> dict[str, Any]:
    if isinstance(model, models.GammaGamma):
        params = {"p": model.p, "q": model.q, "gamma": model.gamma}
    elif isinstance(model, models.ParetoNBD):
        params = {"r": model.r, "alpha": model.alpha, "s": model.s, "beta": model.beta}
    else:
        params = {"r": model.r, "alpha": model.alpha, "a": model.a, "b": model.b}
    return {"name": name, "params": params, "loglik": model.loglik, "n": model.n}


_PURCHASE_MODELS: dict[str, tuple[str, type[models.MBGNBD] | type[models.ParetoNBD]]] = {
    "mbgnbd": ("MBG/NBD", models.MBGNBD),
    "paretonbd": ("Pareto/NBD", models.ParetoNBD),
}


def predict(
    transactions: Mapping[tuple[str, dt.date], Decimal],
    as_of: dt.date,
    *,
    unit: models.TimeUnit,
    churn_model: Literal["mbgnbd", "paretonbd"],
    horizon_months: int,
    annual_discount_rate: Decimal,
    margin: Decimal | None,
    min_repeat_customers: int,
) -> Predictions:
    """Predictive CLV, P(alive) and expected activity per customer from ``transactions``.

    * RFM (:func:`metrics.models.rfm_from_transactions`) as of ``as_of`` in ``unit``, from
      :func:`purchase_transactions` (one transaction per customer-day).
    * Purchase model: ``churn_model`` (MBG/NBD or Pareto/NBD) and BG/NBD for comparison, both fitted by
      maximum likelihood on :func:`metrics.models.group` rows (identical (x, t_x, T) merged with weights).
    * Spend model: Gamma-Gamma on the repeat buyers, rows with identical (x, m_x) merged with weights.
    * Per customer: ``p_alive`` (P(alive at as_of)), ``expected_purchases_90d`` (E[Y(90 days) | x, t_x, T]),
      ``expected_spend`` (E[M], money per purchase) and ``clv`` = :func:`metrics.models.predictive_clv`:
      ``sum_k margin x E[M] x (E[Y(t_k)] - E[Y(t_{k-1})]) / (1 + d_m)^k`` over ``horizon_months`` calendar
      months, with ``d_m`` the monthly rate equivalent to ``annual_discount_rate``.

    Never raises for data reasons: with fewer repeat buyers (x > 0) than ``min_repeat_customers`` or a
    :class:`~metrics.models.ModelFitError` of the purchase model, ``status`` is ``"skipped"`` and every
    prediction is absent; if only the spend model fails, ``status`` is ``"no_spend_model"`` and the money
    predictions are None. ``reason`` says why.
    """
    model_name, model_cls = _PURCHASE_MODELS[churn_model]
    keys = sorted(transactions)
    ids, rfm = models.rfm_from_transactions(
        [c for c, _ in keys], [d for _, d in keys], [float(transactions[k]) for k in keys], as_of, unit
    )
    repeat = int(np.sum(rfm.x > 0))
    skeleton = Predictions(
        status="skipped", reason=None, unit=unit, churn_model=model_name, customers=len(ids),
        repeat_customers=repeat, horizon_months=horizon_months,
    )
    if repeat < min_repeat_customers:
        return replace(
            skeleton, reason=f"{repeat} repeat buyer(s), fewer than min_repeat_customers = {min_repeat_customers}"
        )
    grouped, _ = models.group(rfm)
    try:
        purchase = model_cls.fit(grouped)
    except models.ModelFitError as exc:
        return replace(skeleton, reason=f"{model_name} not fitted: {exc}")
    notes: list[str] = []
    comparison: models.BGNBD | None
    try:
        comparison = models.BGNBD.fit(grouped)
    except models.ModelFitError as exc:
        comparison = None
        notes.append(f"BG/NBD comparison not fitted: {exc}")
    spend: models.GammaGamma | None
    buyers = rfm.x > 0
    pairs, counts = np.unique(np.column_stack([rfm.x[buyers], rfm.m_x[buyers]]), axis=0, return_counts=True)
    try:
        spend = models.GammaGamma.fit(pairs[:, 0], pairs[:, 1], counts.astype(np.float64))
    except models.ModelFitError as exc:
        spend = None
        notes.append(f"Gamma-Gamma not fitted: {exc}")

    p_alive = purchase.p_alive(rfm.x, rfm.t_x, rfm.T)
    p_alive_bg = comparison.p_alive(rfm.x, rfm.t_x, rfm.T) if comparison is not None else None
    activity = purchase.expected_purchases(ACTIVITY_DAYS / models.DAYS_PER_UNIT[unit], rfm.x, rfm.t_x, rfm.T)
    e_m = clv = None
    if spend is not None:
        e_m = spend.expected_spend(rfm.x, rfm.m_x)
        clv = models.predictive_clv(
            purchase, spend, rfm, horizon_months=horizon_months, annual_discount_rate=float(annual_discount_rate)
        )
    factor = Decimal(1) if margin is None else margin
    predicted: dict[str, CustomerPrediction] = {}
    for i, customer_id in enumerate(ids):
        revenue = _money(float(clv[i])) if clv is not None else None
        predicted[customer_id] = CustomerPrediction(
            x=int(rfm.x[i]),
            t_x=float(rfm.t_x[i]),
            T=float(rfm.T[i]),
            p_alive=float(p_alive[i]),
            p_alive_bgnbd=float(p_alive_bg[i]) if p_alive_bg is not None else None,
            expected_purchases_90d=float(activity[i]),
            expected_spend=_money(float(e_m[i])) if e_m is not None else None,
            clv_revenue=revenue,
            clv=revenue * factor if revenue is not None else None,
        )
    return replace(
        skeleton,
        status="fitted" if spend is not None else "no_spend_model",
        reason=None if spend is not None else notes[-1],
        purchase_model=_describe(model_name, purchase),
        comparison_model=_describe("BG/NBD", comparison) if comparison is not None else None,
        spend_model=_describe("Gamma-Gamma", spend) if spend is not None else None,
        notes=tuple(notes),
        customers_predicted=predicted,
    )
