"""The facts every metric is computed from: a snapshot of ledger and CRM truth, in one home currency.

:mod:`metrics.load` builds a :class:`Facts` from the state store; the metric functions are pure
functions of a :class:`Facts` (or of parts of it) and an ``as_of`` date, so they can be tested on any
hand-made book. Money is :class:`~decimal.Decimal` in :attr:`Facts.currency`, already converted with the
rate the ledger recorded on each document (or the configured rate when the ledger gives none).

Customer identifiers are CRM customer ids where the ledger contact is linked to a CRM customer, else
``"ledger:<contact id>"`` so that ledger history of customers the CRM does not know still counts in the
company-wide figures.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

__all__ = [
    "ActivityFact",
    "CreditFact",
    "CustomerFact",
    "DealFact",
    "Facts",
    "InvoiceFact",
    "PaymentFact",
    "SpendFact",
]


@dataclass(frozen=True, slots=True)
class InvoiceFact:
    """A sales invoice as the ledger holds it (voided and deleted invoices are not facts)."""

    ledger_id: str
    customer_id: str
    issue_date: dt.date
    due_date: dt.date
    #: Amount before tax, in the home currency (what revenue and CLV count).
    net: Decimal
    #: Amount including tax, in the home currency (what receivables and DSO count).
    gross: Decimal
    #: Still owed including tax, home currency, after payments and credit notes; 0 when paid.
    balance: Decimal
    status: Literal["draft", "submitted", "authorised", "paid"] = "authorised"
    deal_id: str | None = None
    number: str | None = None
    #: The document's own currency (before conversion), for display.
    currency: str = ""


@dataclass(frozen=True, slots=True)
class PaymentFact:
    """Money received against one invoice, home currency."""

    ledger_id: str
    invoice_id: str
    customer_id: str
    date: dt.date
    amount: Decimal


@dataclass(frozen=True, slots=True)
class CreditFact:
    """A credit note, or the part of one applied to an invoice, home currency.

    ``net`` and ``gross`` are what it takes off revenue and off receivables; ``invoice_id`` is the invoice
    it is applied to, when it is applied to one.
    """

    ledger_id: str
    customer_id: str
    date: dt.date
    net: Decimal
    gross: Decimal
    invoice_id: str | None = None


@dataclass(frozen=True, slots=True)
class DealFact:
    deal_id: str
    customer_id: str | None
    amount: Decimal | None
    stage: str | None
    probability: Decimal | None
    is_won: bool
    is_closed: bool
    close_date: dt.date | None
    created_date: dt.date | None = None
    acquisition_source: str | None = None
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class CustomerFact:
    customer_id: str
    name: str
    #: The channel that acquired the customer (its acquisition source in the CRM), or None.
    acquisition_source: str | None = None
    created_date: dt.date | None = None


@dataclass(frozen=True, slots=True)
class SpendFact:
    """Acquisition spend: one row of the spend CSV or one month of a mapped expense account."""

    date: dt.date
    channel: str
    amount: Decimal
    campaign: str | None = None
    #: ``paid`` for channel spend (paid CAC); ``overhead`` for sales and marketing cost no channel owns
    #: (salaries, tools), which only blended CAC spreads.
    kind: Literal["paid", "overhead"] = "paid"


@dataclass(frozen=True, slots=True)
class ActivityFact:
    deal_id: str
    kind: str
    count: int


@dataclass(frozen=True)
class Facts:
    """Everything the metrics of one pipeline read, in ``currency``."""

    as_of: dt.date
    currency: str
    invoices: Sequence[InvoiceFact] = ()
    payments: Sequence[PaymentFact] = ()
    credits: Sequence[CreditFact] = ()
    deals: Sequence[DealFact] = ()
    customers: Sequence[CustomerFact] = ()
    spend: Sequence[SpendFact] = ()
    activities: Sequence[ActivityFact] = ()
    #: Configured cost of one sales activity of each kind (``call``, ``meeting``, ``email``, ``task``).
    activity_costs: dict[str, Decimal] = field(default_factory=dict)
