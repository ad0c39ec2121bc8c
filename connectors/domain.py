"""Vendor-neutral domain model: customers, deals, line items, invoices and payments.

Money is always a :class:`~decimal.Decimal` paired with an ISO-4217 currency code and rounded to that
currency's minor unit. Tax is computed per line, rounded, then summed, which is how Xero and QuickBooks
Online compute it; the invoice total is the sum of the rounded line amounts and the rounded line taxes.
"""

from __future__ import annotations

import datetime as dt
from decimal import ROUND_HALF_UP, Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "MINOR_UNITS",
    "Address",
    "CreditAllocation",
    "CreditNote",
    "Customer",
    "Deal",
    "ExpenseLine",
    "Invoice",
    "InvoiceLine",
    "LineItem",
    "Money",
    "Payment",
    "minor_unit",
    "round_money",
]

# ISO-4217 minor units for the currencies whose exponent is not 2. Every other currency has 2.
MINOR_UNITS: dict[str, int] = {
    "BIF": 0, "CLP": 0, "DJF": 0, "GNF": 0, "ISK": 0, "JPY": 0, "KMF": 0, "KRW": 0, "PYG": 0,
    "RWF": 0, "UGX": 0, "UYI": 0, "VND": 0, "VUV": 0, "XAF": 0, "XOF": 0, "XPF": 0,
    "BHD": 3, "IQD": 3, "JOD": 3, "KWD": 3, "LYD": 3, "OMR": 3, "TND": 3,
    "CLF": 4, "UYW": 4,
}

CurrencyCode = Annotated[str, Field(pattern=r"^[A-Z]{3}$", description="ISO-4217 code, e.g. EUR")]


def minor_unit(currency: str) -> int:
    """Number of decimal places of ``currency`` (ISO-4217 exponent)."""
    return MINOR_UNITS.get(currency.upper(), 2)


def round_money(amount: Decimal, currency: str) -> Decimal:
    """Round ``amount`` half-up to the minor unit of ``currency``."""
    if not isinstance(amount, Decimal):
        raise TypeError(f"money must be Decimal, not {type(amount).__name__}")
    exp = Decimal(1).scaleb(-minor_unit(currency))
    return amount.quantize(exp, rounding=ROUND_HALF_UP)


class Money(BaseModel):
    """An amount in one currency, always rounded to that currency's minor unit."""

    model_config = ConfigDict(frozen=True)

    amount: Decimal
    currency: CurrencyCode

    @model_validator(mode="after")
    def _round(self) -> Money:
        rounded = round_money(self.amount, self.currency)
        if rounded != self.amount:
            object.__setattr__(self, "amount", rounded)
        return self

    def __add__(self, other: Money) -> Money:
        if other.currency != self.currency:
            raise ValueError(f"cannot add {other.currency} to {self.currency}")
        return Money(amount=self.amount + other.amount, currency=self.currency)

    def __str__(self) -> str:
        return f"{self.amount} {self.currency}"


class Address(BaseModel):
    line1: str | None = None
    line2: str | None = None
    city: str | None = None
    postal_code: str | None = None
    region: str | None = None
    country: str | None = Field(default=None, description="ISO-3166 alpha-2 country code")


class Customer(BaseModel):
    """A customer as the CRM knows it (a HubSpot company, a Salesforce account, ...)."""

    crm_id: str
    name: str
    domain: str | None = None
    email: str | None = None
    vat_number: str | None = Field(default=None, description="Intra-EU VAT number, e.g. FR40303265045")
    siren: str | None = Field(default=None, pattern=r"^\d{9}$")
    siret: str | None = Field(default=None, pattern=r"^\d{14}$")
    country: str | None = None
    currency: str | None = None
    address: Address = Field(default_factory=Address)
    acquisition_source: str | None = None
    created_at: dt.datetime | None = Field(default=None, description="When the CRM record was created")
    updated_at: dt.datetime | None = None

    @field_validator("vat_number")
    @classmethod
    def _normalise_vat(cls, v: str | None) -> str | None:
        return v.replace(" ", "").replace(".", "").upper() if v else v

    @field_validator("domain")
    @classmethod
    def _normalise_domain(cls, v: str | None) -> str | None:
        if not v:
            return v
        v = v.strip().lower()
        for prefix in ("https://", "http://"):
            v = v.removeprefix(prefix)
        return v.removeprefix("www.").rstrip("/")


class LineItem(BaseModel):
    """One priced line of a deal or an accepted quote."""

    sku: str | None = None
    description: str
    quantity: Decimal = Decimal(1)
    unit_price: Decimal
    discount_percent: Decimal = Decimal(0)
    tax_rate: Decimal | None = Field(default=None, description="Tax rate in percent, e.g. 20 or 5.5")

    def net_amount(self, currency: str) -> Decimal:
        """Line amount before tax, after discount, rounded to the currency."""
        gross = self.quantity * self.unit_price
        return round_money(gross * (Decimal(100) - self.discount_percent) / Decimal(100), currency)


class Deal(BaseModel):
    """A CRM deal (opportunity) with the customer and the lines an invoice would carry."""

    crm_id: str
    name: str
    amount: Decimal | None = None
    currency: CurrencyCode
    stage: str | None = None
    probability: Decimal | None = Field(
        default=None, ge=0, le=1, description="Chance of winning, 0..1, from the deal or its pipeline stage"
    )
    is_won: bool = False
    is_closed: bool = False
    created_at: dt.datetime | None = None
    close_date: dt.date | None = None
    owner: str | None = None
    acquisition_source: str | None = None
    customer: Customer | None = None
    line_items: list[LineItem] = Field(default_factory=list)
    lines_source: Literal["deal", "quote"] = "deal"
    quote_id: str | None = None
    updated_at: dt.datetime
    archived: bool = False

    def lines_net_total(self) -> Decimal:
        return sum((li.net_amount(self.currency) for li in self.line_items), Decimal(0))


class InvoiceLine(BaseModel):
    """An invoice line once items and taxes have been mapped to the ledger's codes."""

    description: str
    quantity: Decimal
    unit_price: Decimal
    discount_percent: Decimal = Decimal(0)
    tax_rate: Decimal = Decimal(0)
    item_code: str | None = None
    account_code: str | None = None
    tax_type: str | None = None

    def net_amount(self, currency: str) -> Decimal:
        gross = self.quantity * self.unit_price
        return round_money(gross * (Decimal(100) - self.discount_percent) / Decimal(100), currency)

    def tax_amount(self, currency: str) -> Decimal:
        return round_money(self.net_amount(currency) * self.tax_rate / Decimal(100), currency)


InvoiceStatus = Literal["draft", "submitted", "authorised", "paid", "voided", "deleted"]


class Invoice(BaseModel):
    """A sales invoice, either one we intend to create or one read back from a ledger."""

    reference: str
    currency: CurrencyCode
    lines: list[InvoiceLine]
    issue_date: dt.date
    due_date: dt.date | None = None
    status: InvoiceStatus = "authorised"
    number: str | None = None
    ledger_id: str | None = None
    customer_ledger_id: str | None = None
    amount_paid: Decimal | None = None
    amount_due: Decimal | None = None
    updated_at: dt.datetime | None = None
    ledger_total: Decimal | None = Field(default=None, description="Total as the ledger computed it")
    exchange_rate: Decimal | None = Field(
        default=None, gt=0, description="Home-currency units per unit of ``currency``, as the ledger recorded it"
    )

    @property
    def subtotal(self) -> Decimal:
        return sum((ln.net_amount(self.currency) for ln in self.lines), Decimal(0))

    @property
    def tax(self) -> Decimal:
        return sum((ln.tax_amount(self.currency) for ln in self.lines), Decimal(0))

    @property
    def total(self) -> Decimal:
        return self.subtotal + self.tax


class Payment(BaseModel):
    ledger_id: str
    invoice_ledger_id: str
    amount: Decimal
    currency: CurrencyCode
    date: dt.date
    status: str = "authorised"
    updated_at: dt.datetime | None = None


class CreditAllocation(BaseModel):
    """Part of a credit note applied against one invoice."""

    invoice_ledger_id: str
    amount: Decimal = Field(description="Amount applied, in the credit note's currency, including tax")
    date: dt.date


class CreditNote(BaseModel):
    """A sales credit note as read back from a ledger: it nets against the invoices it is allocated to.

    ``total`` includes tax; ``subtotal`` excludes it. ``credited_invoice_ledger_id`` is the invoice the
    ledger says it corrects, when it says so; ``allocations`` are the amounts actually applied.
    """

    ledger_id: str
    number: str | None = None
    customer_ledger_id: str | None = None
    currency: CurrencyCode
    issue_date: dt.date
    status: InvoiceStatus = "authorised"
    subtotal: Decimal
    total: Decimal
    remaining: Decimal = Decimal(0)
    credited_invoice_ledger_id: str | None = None
    allocations: list[CreditAllocation] = Field(default_factory=list)
    exchange_rate: Decimal | None = Field(default=None, gt=0)
    updated_at: dt.datetime | None = None


class ExpenseLine(BaseModel):
    """One line of a purchase (bill, expense, bank spend) booked to an expense account."""

    ledger_id: str
    account_code: str
    date: dt.date
    net: Decimal = Field(description="Amount before tax, in ``currency``")
    currency: CurrencyCode
    exchange_rate: Decimal | None = Field(default=None, gt=0)
    description: str | None = None
