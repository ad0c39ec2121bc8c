"""Churn and revenue at risk per customer: a model-consistent amount and rule-based warning signals.

The churn probability is ``1 - P(alive)`` from the configured purchase model (MBG/NBD or Pareto/NBD,
whose P(alive) is below 1 also for one-time buyers). The signals are plain rules on the invoice history,
with thresholds given by the module constants below.
"""

from __future__ import annotations

import datetime as dt
import itertools
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from connectors.domain import round_money

__all__ = [
    "BASKET_DROP_RATIO",
    "BASKET_HISTORY_DAYS",
    "BASKET_WINDOW_DAYS",
    "FREQUENCY_DROP_RATIO",
    "SIGNAL_BASKET_DROP",
    "SIGNAL_FREQUENCY_DROP",
    "SIGNAL_ONE_TIME_BUYER",
    "SIGNAL_OVERDUE",
    "RevenueAtRisk",
    "revenue_at_risk",
    "risk_signals",
]

#: "purchase frequency drop" when days since the last invoice exceed this multiple of the customer's median
#: days between invoices (needs at least 2 invoice days).
FREQUENCY_DROP_RATIO = Decimal(2)
#: "basket drop" when net revenue of the last BASKET_WINDOW_DAYS is below this share of the average
#: BASKET_WINDOW_DAYS of the BASKET_HISTORY_DAYS before them.
BASKET_DROP_RATIO = Decimal("0.5")
BASKET_WINDOW_DAYS = 90
BASKET_HISTORY_DAYS = 365

#: Each signal string starts with one of these.
SIGNAL_FREQUENCY_DROP = "purchase frequency drop"
SIGNAL_BASKET_DROP = "basket drop"
SIGNAL_OVERDUE = "overdue invoices"
SIGNAL_ONE_TIME_BUYER = "one-time buyer"

_ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class RevenueAtRisk:
    """Revenue at risk of one customer (money unrounded, home currency)."""

    #: 1 - P(alive).
    churn_probability: float
    #: Expected discounted value over the horizon if the customer is alive: CLV_h / P(alive); None if P = 0.
    expected_value_if_alive: Decimal | None
    #: min(CLV_h x (1 - P) / P, (1 - P) x trailing-12-month net revenue), floored at 0.
    model_value: Decimal
    #: model_value + overdue balance.
    total: Decimal


def revenue_at_risk(
    p_alive: float, clv_horizon: Decimal, trailing_revenue: Decimal, overdue: Decimal
) -> RevenueAtRisk:
    """Revenue at risk of a customer.

    With P = P(alive) and CLV_h the discounted expected net revenue over the horizon (which, under the
    purchase models, is P x the value expected if alive):

    * ``churn_probability = 1 - P``;
    * ``expected_value_if_alive = CLV_h / P`` (None when P = 0);
    * ``model_value = min(CLV_h x (1 - P) / P, (1 - P) x trailing_revenue)``, floored at 0: what is lost if
      the customer has gone, capped by the simple "(1 - P) x trailing-12-month revenue" because the model
      term explodes as P -> 0 (when P = 0 it is the cap);
    * ``total = model_value + overdue`` (the overdue receivable is at risk too).
    """
    p = Decimal(repr(min(max(p_alive, 0.0), 1.0)))
    churn = 1 - p
    cap = churn * trailing_revenue
    if p > 0:
        if_alive: Decimal | None = clv_horizon / p
        value = min(clv_horizon * churn / p, cap)
    else:
        if_alive = None
        value = cap
    value = max(value, _ZERO)
    return RevenueAtRisk(
        churn_probability=float(churn), expected_value_if_alive=if_alive, model_value=value, total=value + overdue
    )


def risk_signals(
    purchase_days: Iterable[dt.date],
    revenue: Iterable[tuple[dt.date, Decimal]],
    as_of: dt.date,
    *,
    overdue_invoices: int,
    overdue_amount: Decimal,
    currency: str,
) -> tuple[str, ...]:
    """Warning signals of a customer at ``as_of``, in a fixed order, each starting with a ``SIGNAL_*`` prefix.

    * ``purchase frequency drop``: with at least 2 distinct invoice days on or before ``as_of``,
      ``(as_of - last invoice day) / median days between consecutive invoice days > FREQUENCY_DROP_RATIO``.
    * ``basket drop``: net revenue (``revenue``: dated net amounts, invoices positive, credit notes negative)
      of the ``BASKET_WINDOW_DAYS`` ending at ``as_of`` is below ``BASKET_DROP_RATIO`` x the average per
      ``BASKET_WINDOW_DAYS`` of the ``BASKET_HISTORY_DAYS`` before them
      (``prior x BASKET_WINDOW_DAYS / BASKET_HISTORY_DAYS``), when that average is positive.
    * ``overdue invoices``: the customer has open invoices past due (count and amount).
    * ``one-time buyer`` (information): exactly one invoice day so far.
    """
    days = sorted({d for d in purchase_days if d <= as_of})
    signals: list[str] = []
    if len(days) >= 2:
        median = Decimal(repr(statistics.median((b - a).days for a, b in itertools.pairwise(days))))
        since = (as_of - days[-1]).days
        if since > FREQUENCY_DROP_RATIO * median:
            signals.append(
                f"{SIGNAL_FREQUENCY_DROP}: {since} days since the last invoice, "
                f"{Decimal(since) / median:.1f}x the median {_number(median)} days between invoices"
            )
    window_start = as_of - dt.timedelta(days=BASKET_WINDOW_DAYS - 1)
    history_start = window_start - dt.timedelta(days=BASKET_HISTORY_DAYS)
    recent = prior = _ZERO
    for day, amount in revenue:
        if window_start <= day <= as_of:
            recent += amount
        elif history_start <= day < window_start:
            prior += amount
    average = prior * BASKET_WINDOW_DAYS / BASKET_HISTORY_DAYS
    if average > 0 and recent < BASKET_DROP_RATIO * average:
        signals.append(
            f"{SIGNAL_BASKET_DROP}: {round_money(recent, currency)} {currency} in the last {BASKET_WINDOW_DAYS} days "
            f"against {round_money(average, currency)} {currency} on average before"
        )
    if overdue_invoices > 0:
        signals.append(f"{SIGNAL_OVERDUE}: {overdue_invoices} for {round_money(overdue_amount, currency)} {currency}")
    if len(days) == 1:
        signals.append(SIGNAL_ONE_TIME_BUYER)
    return tuple(signals)


def _number(value: Decimal) -> str:
    """``value`` without a trailing ``.0`` when it is whole (``2``, ``76.5``)."""
    return str(int(value)) if value == value.to_integral_value() else f"{value:f}"
