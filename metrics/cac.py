"""Customer acquisition cost: by channel, blended, and allocated to each new customer so that it reconciles.

Definitions (home currency, calendar months keyed ``"YYYY-MM"``):

* **New customer of month m**: a customer whose first posted invoice (:func:`metrics.dso.is_posted`) is
  issued in m (on or before ``as_of``). Its **channel** is its CRM acquisition source, or
  :data:`UNATTRIBUTED` when it has none.
* **Spend**: :class:`~metrics.facts.SpendFact` rows dated on or before ``as_of``. Rows of kind ``overhead``,
  or whose channel is one of the overhead channels, are overhead (only blended CAC spreads them); the
  rest is paid spend of their channel.
* **Lag**: customers acquired in month m are matched with the spend of month ``m - lag``.
* **Sales effort** of a customer: ``sum(count x unit cost of the kind)`` over the activities of its won
  deals; kinds without a configured cost cost nothing.

Per new customer i of month m (spend month s = m - lag, N = new customers of m, n_c = those of channel c):

* ``paid_share = paid spend of c in s / n_c`` for i's channel c;
* ``cac_paid = paid_share + sales_effort``;
* ``overhead_share = (overhead of s + paid spend in s of channels with no new customer in m) / N``;
* ``cac_blended = cac_paid + overhead_share``.

So the blended CAC of the customers of a month sums to the whole spend of month s plus their sales effort.
Spend of a month s whose month s + lag has no new customer (or lies after ``as_of``'s month) is reported
as unallocated.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal

from metrics.dso import is_posted
from metrics.facts import ActivityFact, CustomerFact, DealFact, InvoiceFact, SpendFact
from metrics.periods import add_months, month_key, month_range, parse_month

__all__ = [
    "UNATTRIBUTED",
    "CacReport",
    "CustomerCac",
    "acquisition_cost",
    "acquisition_months",
    "cac_payback_months",
    "clv_cac_ratio",
    "sales_effort",
]

#: Channel of a customer whose CRM record names no acquisition source.
UNATTRIBUTED = "unattributed"

_ZERO = Decimal(0)


def acquisition_months(invoices: Iterable[InvoiceFact], as_of: dt.date) -> dict[str, dt.date]:
    """``customer_id -> issue date of its first posted invoice`` issued on or before ``as_of``."""
    first: dict[str, dt.date] = {}
    for inv in invoices:
        if is_posted(inv) and inv.issue_date <= as_of:
            known = first.get(inv.customer_id)
            if known is None or inv.issue_date < known:
                first[inv.customer_id] = inv.issue_date
    return first


def sales_effort(
    deals: Iterable[DealFact], activities: Iterable[ActivityFact], costs: Mapping[str, Decimal]
) -> dict[str, Decimal]:
    """Cost of the sales activities on each customer's won deals: ``sum(count x costs[kind])`` per customer."""
    owner = {d.deal_id: d.customer_id for d in deals if d.is_won and d.customer_id is not None}
    effort: dict[str, Decimal] = defaultdict(Decimal)
    for a in activities:
        customer_id = owner.get(a.deal_id)
        if customer_id is not None:
            effort[customer_id] += costs.get(a.kind, _ZERO) * a.count
    return dict(effort)


@dataclass(frozen=True, slots=True)
class CustomerCac:
    """The acquisition cost allocated to one new customer (unrounded); see the module doc for the formulas."""

    customer_id: str
    channel: str
    acquisition_month: str
    paid_share: Decimal
    sales_effort: Decimal
    overhead_share: Decimal
    cac_paid: Decimal
    cac_blended: Decimal


@dataclass(frozen=True)
class CacReport:
    """Company and per-customer CAC (unrounded, home currency); months are ``"YYYY-MM"``."""

    lag_months: int
    #: Acquisition month -> channel -> new customers.
    new_customers: dict[str, dict[str, int]]
    #: Spend month -> total spend (paid + overhead).
    spend_by_month: dict[str, Decimal]
    #: Spend month -> channel -> paid spend.
    paid_spend: dict[str, dict[str, Decimal]]
    #: Spend month -> overhead.
    overhead_by_month: dict[str, Decimal]
    #: Channel -> acquisition month -> paid spend of the channel in month - lag / its new customers
    #: (None when the channel acquired nobody that month: that spend is then spread by blended CAC).
    paid_cac: dict[str, dict[str, Decimal | None]]
    #: Acquisition month -> (total spend of month - lag + sales effort of its new customers) / new customers
    #: (None without new customers).
    blended_cac: dict[str, Decimal | None]
    #: Acquisition month -> sales effort of its new customers.
    sales_effort_by_month: dict[str, Decimal]
    #: Spend month -> spend allocated to no customer (no new customer in month + lag, or it is still to come).
    unallocated: dict[str, Decimal]
    customers: dict[str, CustomerCac]


def acquisition_cost(
    *,
    invoices: Iterable[InvoiceFact],
    customers: Iterable[CustomerFact],
    spend: Iterable[SpendFact],
    deals: Iterable[DealFact],
    activities: Iterable[ActivityFact],
    activity_costs: Mapping[str, Decimal],
    as_of: dt.date,
    lag_months: int = 0,
    overhead_channels: Collection[str] = ("overhead",),
) -> CacReport:
    """Paid CAC by channel and month, blended CAC by month, and per-customer CAC (definitions in the module doc).

    * Paid CAC of channel c in acquisition month m = paid spend of c in month ``m - lag_months`` / new
      customers of c in m.
    * Blended CAC of month m = (all spend, paid + overhead, of month ``m - lag_months`` + sales effort of
      the new customers of m) / all new customers of m; it is the mean of the customers' ``cac_blended``.
    * Per customer: ``cac_paid`` and ``cac_blended`` as in the module doc; their blended CAC over a month
      sums to the month's matched spend plus their sales effort.
    """
    first = acquisition_months(invoices, as_of)
    channel_of: dict[str, str] = {}
    for c in sorted(customers, key=lambda c: (c.customer_id, c.acquisition_source or "")):
        channel_of.setdefault(c.customer_id, c.acquisition_source or UNATTRIBUTED)
    effort = sales_effort(deals, activities, activity_costs)

    acquired: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for customer_id in sorted(first):
        acquired[month_key(first[customer_id])][channel_of.get(customer_id, UNATTRIBUTED)].append(customer_id)

    paid: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    overhead: dict[str, Decimal] = defaultdict(Decimal)
    for row in spend:
        if row.date > as_of:
            continue
        if row.kind == "overhead" or row.channel in overhead_channels:
            overhead[month_key(row.date)] += row.amount
        else:
            paid[month_key(row.date)][row.channel] += row.amount
    spend_months = set(paid) | set(overhead)
    spend_by_month = {
        m: overhead.get(m, _ZERO) + sum(paid.get(m, {}).values(), _ZERO) for m in sorted(spend_months)
    }

    def spend_month(acquisition: str) -> str:
        return month_key(add_months(parse_month(acquisition), -lag_months))

    def acquisition_month(spent: str) -> str:
        return month_key(add_months(parse_month(spent), lag_months))

    last = month_key(as_of)
    starts = [*acquired, *(acquisition_month(m) for m in spend_months)]
    months = list(month_range(min(starts), last)) if starts else []

    per_customer: dict[str, CustomerCac] = {}
    paid_cac: dict[str, dict[str, Decimal | None]] = defaultdict(dict)
    blended: dict[str, Decimal | None] = {}
    effort_by_month: dict[str, Decimal] = {}
    unallocated: dict[str, Decimal] = {}
    for m in months:
        s = spend_month(m)
        channels = acquired.get(m, {})
        paid_s = paid.get(s, {})
        for channel in sorted(set(channels) | set(paid_s)):
            n_c = len(channels.get(channel, ()))
            paid_cac[channel][m] = paid_s.get(channel, _ZERO) / n_c if n_c else None
        n = sum(len(ids) for ids in channels.values())
        total = spend_by_month.get(s, _ZERO)
        if n == 0:
            blended[m] = None
            if total:
                unallocated[s] = total
            continue
        orphan = sum((amount for ch, amount in paid_s.items() if ch not in channels), _ZERO)
        overhead_share = (overhead.get(s, _ZERO) + orphan) / n
        month_effort = _ZERO
        for channel, ids in channels.items():
            paid_share = paid_s.get(channel, _ZERO) / len(ids)
            for customer_id in ids:
                own = effort.get(customer_id, _ZERO)
                month_effort += own
                per_customer[customer_id] = CustomerCac(
                    customer_id=customer_id,
                    channel=channel,
                    acquisition_month=m,
                    paid_share=paid_share,
                    sales_effort=own,
                    overhead_share=overhead_share,
                    cac_paid=paid_share + own,
                    cac_blended=paid_share + own + overhead_share,
                )
        effort_by_month[m] = month_effort
        blended[m] = (total + month_effort) / n
    # Spend whose acquisition month is after as_of's month waits for customers still to come.
    for s in sorted(spend_months):
        if acquisition_month(s) > last and spend_by_month[s]:
            unallocated[s] = spend_by_month[s]

    return CacReport(
        lag_months=lag_months,
        new_customers={
            m: {ch: len(ids) for ch, ids in sorted(acquired[m].items())} for m in sorted(acquired)
        },
        spend_by_month=spend_by_month,
        paid_spend={m: dict(sorted(paid[m].items())) for m in sorted(paid)},
        overhead_by_month=dict(sorted(overhead.items())),
        paid_cac={ch: dict(sorted(v.items())) for ch, v in sorted(paid_cac.items())},
        blended_cac=blended,
        sales_effort_by_month=effort_by_month,
        unallocated=dict(sorted(unallocated.items())),
        customers=dict(sorted(per_customer.items())),
    )


def clv_cac_ratio(clv: Decimal | None, cac: Decimal | None) -> Decimal | None:
    """``clv / cac`` (a pure number); None when either is unknown or ``cac <= 0``.

    Keep both on the same basis: the metrics use historical CLV (on a gross-margin basis when a margin is
    configured) over blended CAC.
    """
    if clv is None or cac is None or cac <= 0:
        return None
    return clv / cac


def cac_payback_months(
    cac: Decimal | None, acquisition_month: str, monthly_value: Mapping[str, Decimal], last_month: str
) -> int | None:
    """Months to recover the CAC: the first month, counting the acquisition month as 1, by the end of which
    the customer's cumulative value (gross margin, or net revenue when no margin is configured; by month of
    document date from the acquisition month on) is at least ``cac``.

    None when ``cac`` is unknown or when it is not recovered by ``last_month`` (the month of ``as_of``).
    """
    if cac is None:
        return None
    cumulative = _ZERO
    for index, month in enumerate(month_range(acquisition_month, last_month), start=1):
        cumulative += monthly_value.get(month, _ZERO)
        if cumulative >= cac:
            return index
    return None
