"""Pipeline forecast by month and forecast accuracy against invoiced revenue.

Deal amounts are in the home currency of the facts; probabilities are on the 0..1 scale of the CRM
domain (:attr:`connectors.domain.Deal.probability`).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from metrics.facts import DealFact
from metrics.periods import month_key

__all__ = ["ACCURACY_BASE", "ForecastAccuracy", "PipelineForecast", "forecast_accuracy", "weighted_pipeline"]

#: What the accuracy metrics divide by, stated with every result.
ACCURACY_BASE = (
    "actual invoiced net revenue of the month (posted invoices net of tax, minus credit notes, by document date)"
)

_ZERO = Decimal(0)
_HUNDRED = Decimal(100)


@dataclass(frozen=True, slots=True)
class PipelineForecast:
    """Weighted open pipeline and won amounts by close month (``"YYYY-MM"``), home currency, unrounded."""

    #: Sum of amount x probability over open deals closing in the month.
    weighted_by_month: dict[str, Decimal]
    #: Sum of amount over won deals closed in the month, on or before as_of.
    won_by_month: dict[str, Decimal]
    #: Open deals counted in weighted_by_month.
    open_deals: int
    #: Open deals left out because they lack a close date, an amount or a probability.
    excluded_open_deals: int
    #: Won deals left out because they lack a close date or an amount.
    excluded_won_deals: int

    @property
    def forecast_by_month(self) -> dict[str, Decimal]:
        """Forecast of each month = weighted open pipeline + won to date (the weighted-pipeline forecast)."""
        months = sorted(set(self.weighted_by_month) | set(self.won_by_month))
        return {m: self.weighted_by_month.get(m, _ZERO) + self.won_by_month.get(m, _ZERO) for m in months}


def weighted_pipeline(deals: Iterable[DealFact], as_of: dt.date) -> PipelineForecast:
    """Weighted pipeline and won-to-date by calendar month of close date.

    * Weighted: ``sum(amount x probability)`` over open deals (``is_closed`` false) whose close date falls
      in the month; open deals without a close date, an amount or a probability are counted in
      ``excluded_open_deals`` instead.
    * Won to date: ``sum(amount)`` over won deals closed in the month on or before ``as_of``; won deals
      without a close date or an amount are counted in ``excluded_won_deals``. Lost deals count nowhere.
    """
    weighted: dict[str, Decimal] = defaultdict(Decimal)
    won: dict[str, Decimal] = defaultdict(Decimal)
    open_count = excluded_open = excluded_won = 0
    for deal in deals:
        if deal.is_won:
            if deal.close_date is None or deal.amount is None:
                excluded_won += 1
            elif deal.close_date <= as_of:
                won[month_key(deal.close_date)] += deal.amount
        elif not deal.is_closed:
            if deal.close_date is None or deal.amount is None or deal.probability is None:
                excluded_open += 1
            else:
                open_count += 1
                weighted[month_key(deal.close_date)] += deal.amount * deal.probability
    return PipelineForecast(
        weighted_by_month=dict(sorted(weighted.items())),
        won_by_month=dict(sorted(won.items())),
        open_deals=open_count,
        excluded_open_deals=excluded_open,
        excluded_won_deals=excluded_won,
    )


@dataclass(frozen=True, slots=True)
class ForecastAccuracy:
    """Forecast F against actual A per month, and over all months; ratios are percents, unrounded."""

    months: tuple[str, ...]
    forecast: dict[str, Decimal]
    actual: dict[str, Decimal]
    #: F - A per month (positive = over-forecast).
    error: dict[str, Decimal]
    #: 1 - |F - A| / A per month, percent; None when A <= 0.
    accuracy: dict[str, Decimal | None]
    #: sum |A - F| / sum |A|, percent; None when every A is 0.
    wape: Decimal | None
    #: sum (F - A) / sum A, percent (positive = over-forecast); None when sum A is 0.
    bias: Decimal | None
    base: str = field(default=ACCURACY_BASE)

    @property
    def last_period_accuracy(self) -> Decimal | None:
        """Single-period accuracy (1 - |F - A| / A, percent) of the latest month, None without months."""
        return self.accuracy[self.months[-1]] if self.months else None


def forecast_accuracy(snapshots: Mapping[str, Decimal], actuals: Mapping[str, Decimal]) -> ForecastAccuracy:
    """Accuracy of forecast snapshots ``{month: F}`` against actual revenue ``{month: A}``.

    Base: A is the actual invoiced net revenue of the month (:data:`ACCURACY_BASE`); a month missing from
    ``actuals`` has A = 0. Over the months of ``snapshots``:

    * per month: error ``F - A`` and single-period accuracy ``1 - |F - A| / A`` (percent, None if A <= 0);
    * ``WAPE = sum |A - F| / sum |A|`` (percent), robust to months with A = 0;
    * ``bias = sum (F - A) / sum A`` (percent, signed: positive = over-forecast).

    Example: A = [100, 200, 0, 50], F = [110, 150, 10, 60] give WAPE 80/350 = 22.9 % and bias -20/350 = -5.7 %.
    """
    months = tuple(sorted(snapshots))
    forecast = {m: snapshots[m] for m in months}
    actual = {m: actuals.get(m, _ZERO) for m in months}
    error = {m: forecast[m] - actual[m] for m in months}
    accuracy: dict[str, Decimal | None] = {
        m: (1 - abs(error[m]) / actual[m]) * _HUNDRED if actual[m] > 0 else None for m in months
    }
    abs_actual = sum((abs(a) for a in actual.values()), _ZERO)
    sum_actual = sum(actual.values(), _ZERO)
    return ForecastAccuracy(
        months=months,
        forecast=forecast,
        actual=actual,
        error=error,
        accuracy=accuracy,
        wape=sum((abs(e) for e in error.values()), _ZERO) / abs_actual * _HUNDRED if abs_actual else None,
        bias=sum(error.values(), _ZERO) / sum_actual * _HUNDRED if sum_actual else None,
    )
