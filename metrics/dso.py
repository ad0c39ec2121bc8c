"""Receivables metrics: company-wide DSO family and per-customer payment behaviour.

Definitions used throughout (all amounts in the home currency of the facts):

* **Posted invoice**: an invoice whose status is ``authorised`` or ``paid``. Drafts and invoices awaiting
  approval (``submitted``) are not receivables, not sales and not revenue.
* **Open amount of an invoice at the end of day d** (its receivable): ``gross - payments dated <= d -
  gross of credit notes applied to it dated <= d``, floored at 0, for a posted invoice issued on or before
  d. It is recomputed from the facts so that any past ``as_of`` works. The ledger's current balance also
  bounds it: open(d) never exceeds ``balance + payments and credits dated after d``, so a settlement the
  ledger shows but no payment fact explains (a write-off, an allocated prepayment) counts as settled rather
  than as receivable forever.
* **Current (not-yet-due) amount at d**: open amount of invoices with ``due_date >= d``; **overdue**:
  ``due_date < d``, and the invoice is ``d - due_date`` days overdue.
* **Credit sales of a period**: gross of posted invoices issued in it minus the gross of all credit notes
  dated in it (net of credit notes). A credit note not applied to an invoice lowers sales but is not
  netted against receivables.
* **Months** are calendar months; the latest bucket runs from the first of ``as_of``'s month to ``as_of``
  (so it is a whole month when ``as_of`` is a month end).
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

from metrics.facts import CreditFact, InvoiceFact, PaymentFact
from metrics.periods import add_months, month_end, month_key, month_start

__all__ = [
    "DEFAULT_COUNTBACK_MONTHS",
    "POSTED_STATUSES",
    "CompanyReceivables",
    "CustomerReceivables",
    "ReceivablesBook",
    "cei",
    "company_receivables",
    "countback_buckets",
    "countback_dso",
    "customer_receivables",
    "is_posted",
    "receivables_report",
    "simple_dso",
    "weighted_days",
]

#: Invoice statuses that are receivables and sales.
POSTED_STATUSES = frozenset({"authorised", "paid"})
#: How many calendar months the countback walks back before giving up (the DSO is then undefined).
DEFAULT_COUNTBACK_MONTHS = 24

_ZERO = Decimal(0)
_HUNDRED = Decimal(100)


def is_posted(invoice: InvoiceFact) -> bool:
    """True when ``invoice`` is a receivable and a sale (status ``authorised`` or ``paid``)."""
    return invoice.status in POSTED_STATUSES


class ReceivablesBook:
    """The posted invoices with the payments and applied credit notes of each, indexed for date queries."""

    def __init__(
        self,
        invoices: Iterable[InvoiceFact],
        payments: Iterable[PaymentFact],
        credits: Iterable[CreditFact],
    ) -> None:
        self.invoices: dict[str, InvoiceFact] = {inv.ledger_id: inv for inv in invoices if is_posted(inv)}
        self.credits: tuple[CreditFact, ...] = tuple(credits)
        applied: dict[str, list[tuple[dt.date, Decimal]]] = defaultdict(list)
        self.payments: tuple[PaymentFact, ...] = tuple(p for p in payments if p.invoice_id in self.invoices)
        for p in self.payments:
            applied[p.invoice_id].append((p.date, p.amount))
        for c in self.credits:
            if c.invoice_id is not None and c.invoice_id in self.invoices:
                applied[c.invoice_id].append((c.date, c.gross))
        self._applied = dict(applied)
        #: ledger_id -> (everything applied, date of the last application)
        self._settled = {
            i: (sum((a for _, a in rows), _ZERO), max(d for d, _ in rows)) for i, rows in self._applied.items()
        }
        # Once its last application is dated, an invoice's open amount no longer changes: keep the ones left
        # open, and the invoices by date of last application to find those still moving at a given day.
        self._left_open: list[tuple[str, Decimal]] = []
        for ledger_id, inv in self.invoices.items():
            applied_total = self._settled[ledger_id][0] if ledger_id in self._settled else _ZERO
            left = max(_ZERO, min(inv.gross - applied_total, inv.balance))
            if left > 0:
                self._left_open.append((ledger_id, left))
        self._by_last = sorted((last.toordinal(), i) for i, (_, last) in self._settled.items())
        self._last_days = [day for day, _ in self._by_last]
        # Net credit sales by document day, as prefix sums for range queries.
        by_day: dict[int, Decimal] = defaultdict(Decimal)
        for inv in self.invoices.values():
            by_day[inv.issue_date.toordinal()] += inv.gross
        for c in self.credits:
            by_day[c.date.toordinal()] -= c.gross
        self._days = sorted(by_day)
        self._cumulative = list(itertools.accumulate((by_day[d] for d in self._days), initial=_ZERO))

    def open_amount(self, invoice: InvoiceFact, on: dt.date) -> Decimal:
        """Receivable left on ``invoice`` at the end of day ``on`` (0 before it is issued); see the module doc."""
        if invoice.issue_date > on:
            return _ZERO
        settled = self._settled.get(invoice.ledger_id)
        if settled is None:
            before = after = _ZERO
        elif settled[1] <= on:
            before, after = settled[0], _ZERO
        else:
            before = after = _ZERO
            for day, amount in self._applied[invoice.ledger_id]:
                if day <= on:
                    before += amount
                else:
                    after += amount
        forward = invoice.gross - before
        backward = invoice.balance + after
        return max(_ZERO, min(forward, backward))

    def open_amounts(self, on: dt.date) -> dict[str, Decimal]:
        """``ledger_id -> open amount`` at the end of day ``on``, for the posted invoices with something open."""
        moving = self._by_last[bisect.bisect_right(self._last_days, on.toordinal()):]
        out: dict[str, Decimal] = {}
        for ledger_id, left in self._left_open:
            if self.invoices[ledger_id].issue_date <= on:
                out[ledger_id] = left
        for _, ledger_id in moving:
            amount = self.open_amount(self.invoices[ledger_id], on)
            if amount > 0:
                out[ledger_id] = amount
            else:
                out.pop(ledger_id, None)
        return out

    def ar(self, on: dt.date) -> tuple[Decimal, Decimal]:
        """``(total, current)`` receivables at the end of day ``on``; current = not yet due (due_date >= on)."""
        total = current = _ZERO
        for ledger_id, amount in self.open_amounts(on).items():
            total += amount
            if self.invoices[ledger_id].due_date >= on:
                current += amount
        return total, current

    def credit_sales(self, first: dt.date, last: dt.date) -> Decimal:
        """Gross invoiced minus gross credited, for documents dated from ``first`` to ``last`` inclusive."""
        lo = bisect.bisect_left(self._days, first.toordinal())
        hi = bisect.bisect_right(self._days, last.toordinal())
        return self._cumulative[hi] - self._cumulative[lo] if hi > lo else _ZERO


def countback_dso(ar: Decimal, buckets: Sequence[tuple[Decimal, int]]) -> Decimal | None:
    """Countback (exhaustion) DSO in days.

    ``buckets`` are ``(credit_sales, days)`` per period, latest first. Starting from ``ar``, while the
    remaining receivable exceeds a bucket's sales, the bucket's sales are subtracted and its days added;
    the bucket that exhausts it adds ``remaining / sales * days``. A bucket with sales <= 0 adds its
    days and leaves the remainder unchanged. ``ar <= 0`` gives 0; a receivable larger than all the buckets'
    sales gives None (undefined).

    Example: AR 212,000 with sales 100k/80k/70k over 30-day months gives 30 + 30 + 32/70 x 30 = 73.71 days.
    """
    if ar <= 0:
        return _ZERO
    remaining = ar
    days_total = Decimal(0)
    for sales, days in buckets:
        if sales > 0 and remaining <= sales:
            return days_total + remaining / sales * days
        if sales > 0:
            remaining -= sales
        days_total += days
    return None


def countback_buckets(
    book: ReceivablesBook, as_of: dt.date, months: int = DEFAULT_COUNTBACK_MONTHS
) -> list[tuple[str, Decimal, int]]:
    """``(month, credit_sales, days)`` for the ``months`` calendar buckets ending at ``as_of``, latest first.

    The latest bucket runs from the first of ``as_of``'s month to ``as_of`` (``as_of.day`` days); each
    earlier one is a whole calendar month with its real length.
    """
    buckets: list[tuple[str, Decimal, int]] = []
    last = as_of
    for _ in range(months):
        first = month_start(last)
        buckets.append((month_key(first), book.credit_sales(first, last), (last - first).days + 1))
        last = first - dt.timedelta(days=1)
    return buckets


def simple_dso(ar: Decimal, sales: Decimal, days: int) -> Decimal | None:
    """Simple DSO in days: ``ar / sales * days`` (None when ``sales <= 0``)."""
    if sales <= 0:
        return None
    return ar / sales * days


def cei(
    ar_begin: Decimal, sales: Decimal, months: int, ar_end_total: Decimal, ar_end_current: Decimal
) -> Decimal | None:
    """Collection Effectiveness Index, percent (Credit Research Foundation).

    ``(ar_begin + sales/months - ar_end_total) / (ar_begin + sales/months - ar_end_current) x 100``, with
    ``sales`` the credit sales of the ``months``-month period, AR at its beginning and, total and current
    (not yet due), at its end. None when the denominator is 0. Example: 6,200 + 10,890/3 - 6,340 over
    6,200 + 10,890/3 - 3,590 = 55.9 %.
    """
    base = ar_begin + sales / months
    denominator = base - ar_end_current
    if denominator == 0:
        return None
    return (base - ar_end_total) / denominator * _HUNDRED


@dataclass(frozen=True, slots=True)
class CompanyReceivables:
    """Company-wide receivables figures at ``as_of``; days are unrounded Decimal, CEI is a percent."""

    as_of: dt.date
    #: Open receivables, their not-yet-due part and the overdue rest (gross, home currency).
    ar_total: Decimal
    ar_current: Decimal
    ar_overdue: Decimal
    #: Countback DSO over calendar-month buckets ending at as_of; None if AR exceeds the buckets' sales.
    dso_countback: Decimal | None
    #: Best possible DSO: the same countback with the not-yet-due AR as numerator.
    bpdso: Decimal | None
    #: Average days delinquent: dso_countback - bpdso.
    add: Decimal | None
    #: CEI (percent) of ``cei_month``: the last complete calendar month at as_of.
    cei: Decimal | None
    cei_month: str
    #: Simple DSO over the 90 days ending at as_of: AR / credit sales of those days x 90.
    dso_simple_90d: Decimal | None
    sales_90d: Decimal


def company_receivables(
    invoices: Iterable[InvoiceFact],
    payments: Iterable[PaymentFact],
    credits: Iterable[CreditFact],
    as_of: dt.date,
    *,
    countback_months: int = DEFAULT_COUNTBACK_MONTHS,
) -> CompanyReceivables:
    """Company-wide DSO family at the end of day ``as_of`` (definitions in the module doc).

    * ``dso_countback``: :func:`countback_dso` of the total AR at ``as_of`` over :func:`countback_buckets`
      (``countback_months`` calendar months ending at ``as_of``), in days.
    * ``bpdso``: the same with the not-yet-due AR; ``add = dso_countback - bpdso`` (days).
    * ``cei``: :func:`cei` over the last complete calendar month (``as_of``'s month when ``as_of`` is its
      last day, else the month before), ``months = 1``, AR_begin at the end of the previous day.
    * ``dso_simple_90d``: AR at ``as_of`` / credit sales of the 90 days ending at ``as_of`` x 90.
    """
    book = ReceivablesBook(invoices, payments, credits)
    return _company(book, as_of, countback_months)


def _company(book: ReceivablesBook, as_of: dt.date, countback_months: int) -> CompanyReceivables:
    total, current = book.ar(as_of)
    buckets = [(sales, days) for _, sales, days in countback_buckets(book, as_of, countback_months)]
    dso = countback_dso(total, buckets)
    bpdso = countback_dso(current, buckets)
    cei_last = as_of if month_end(as_of) == as_of else month_start(as_of) - dt.timedelta(days=1)
    cei_first = month_start(cei_last)
    begin_total, _ = book.ar(cei_first - dt.timedelta(days=1))
    end_total, end_current = book.ar(cei_last)
    sales_90 = book.credit_sales(as_of - dt.timedelta(days=89), as_of)
    return CompanyReceivables(
        as_of=as_of,
        ar_total=total,
        ar_current=current,
        ar_overdue=total - current,
        dso_countback=dso,
        bpdso=bpdso,
        add=None if dso is None or bpdso is None else dso - bpdso,
        cei=cei(begin_total, book.credit_sales(cei_first, cei_last), 1, end_total, end_current),
        cei_month=month_key(cei_first),
        dso_simple_90d=simple_dso(total, sales_90, 90),
        sales_90d=sales_90,
    )


def weighted_days(observations: Iterable[tuple[Decimal, int]]) -> Decimal | None:
    """Amount-weighted mean of days: ``sum(amount x days) / sum(amount)`` over ``(amount, days)`` pairs.

    None when the amounts sum to 0 or less. Example: $10 paid in 5 days and $100 in 10 days give 9.55 days.
    """
    weight = _ZERO
    total = _ZERO
    for amount, days in observations:
        weight += amount
        total += amount * days
    if weight <= 0:
        return None
    return total / weight


@dataclass(frozen=True, slots=True)
class CustomerReceivables:
    """One customer's payment behaviour and open receivables at ``as_of`` (days unrounded)."""

    #: sum(amount_p x (payment date - invoice issue date)) / sum(amount_p) over payments in the window.
    days_to_pay_weighted: Decimal | None
    #: The same with max(0, payment date - due date).
    days_beyond_terms_weighted: Decimal | None
    #: sum(open_j x (as_of - issue date_j)) / sum(open_j) over the customer's open invoices.
    open_ar_age_weighted: Decimal | None
    #: Open receivables (gross) at as_of.
    balance_due: Decimal
    #: The part of balance_due on invoices past their due date.
    overdue_amount: Decimal
    #: How many open invoices are past their due date.
    overdue_invoices: int
    #: Days past due of the most overdue open invoice (0 when nothing is overdue).
    max_days_overdue: int
    #: Payment applications counted in days_to_pay_weighted.
    payments_counted: int


def customer_receivables(
    invoices: Iterable[InvoiceFact],
    payments: Iterable[PaymentFact],
    credits: Iterable[CreditFact],
    as_of: dt.date,
    *,
    trailing_months: int = 12,
) -> dict[str, CustomerReceivables]:
    """Per-customer payment behaviour at the end of day ``as_of``, keyed by the invoices' customer id.

    Days to pay and days beyond terms are amount-weighted over **payment applications** (each payment on
    a posted invoice, so partial payments count at their own dates; credit notes are not payments) with
    a positive amount dated in the trailing window ``(as_of - trailing_months calendar months, as_of]``:
    ``sum a_p x (paid_p - issued_p) / sum a_p`` and ``sum a_p x max(0, paid_p - due_p) / sum a_p`` (days;
    None without such payments). Open AR age, balance due and overdue figures use the open amounts at
    ``as_of`` (module doc); customers are those of posted invoices issued on or before ``as_of`` and of the
    payments counted.
    """
    book = ReceivablesBook(invoices, payments, credits)
    return _customers(book, as_of, trailing_months)


def _customers(book: ReceivablesBook, as_of: dt.date, trailing_months: int) -> dict[str, CustomerReceivables]:
    window_start = add_months(as_of, -trailing_months)
    to_pay: dict[str, list[tuple[Decimal, int]]] = defaultdict(list)
    beyond: dict[str, list[tuple[Decimal, int]]] = defaultdict(list)
    for p in book.payments:
        if p.amount <= 0 or not window_start < p.date <= as_of:
            continue
        inv = book.invoices[p.invoice_id]
        to_pay[inv.customer_id].append((p.amount, (p.date - inv.issue_date).days))
        beyond[inv.customer_id].append((p.amount, max(0, (p.date - inv.due_date).days)))
    open_by_customer: dict[str, list[tuple[InvoiceFact, Decimal]]] = defaultdict(list)
    for ledger_id, amount in book.open_amounts(as_of).items():
        inv = book.invoices[ledger_id]
        open_by_customer[inv.customer_id].append((inv, amount))
    known = {inv.customer_id for inv in book.invoices.values() if inv.issue_date <= as_of} | set(to_pay)
    result: dict[str, CustomerReceivables] = {}
    for customer_id in sorted(known):
        rows = open_by_customer.get(customer_id, [])
        overdue = [(inv, amount) for inv, amount in rows if inv.due_date < as_of]
        result[customer_id] = CustomerReceivables(
            days_to_pay_weighted=weighted_days(to_pay.get(customer_id, ())),
            days_beyond_terms_weighted=weighted_days(beyond.get(customer_id, ())),
            open_ar_age_weighted=weighted_days((amount, (as_of - inv.issue_date).days) for inv, amount in rows),
            balance_due=sum((amount for _, amount in rows), _ZERO),
            overdue_amount=sum((amount for _, amount in overdue), _ZERO),
            overdue_invoices=len(overdue),
            max_days_overdue=max(((as_of - inv.due_date).days for inv, _ in overdue), default=0),
            payments_counted=len(to_pay.get(customer_id, ())),
        )
    return result


def receivables_report(
    book: ReceivablesBook, as_of: dt.date, *, trailing_months: int = 12,
    countback_months: int = DEFAULT_COUNTBACK_MONTHS,
) -> tuple[CompanyReceivables, Mapping[str, CustomerReceivables]]:
    """Company and per-customer receivables from one prepared :class:`ReceivablesBook` (same definitions)."""
    return _company(book, as_of, countback_months), _customers(book, as_of, trailing_months)
