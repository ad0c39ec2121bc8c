"""Several years of ledger history for the companies of a seed book, loaded into the ledger sandboxes.

A CRM book (:mod:`connectors.seedbook`) holds deals; a ledger that has been in use for years also holds
invoices issued before the CRM sync started, the payments customers made against them (some late, some
partial), a few credit notes, and customers who stopped buying. :func:`generate_history` builds that
history for a book, deterministically for a seed and a ``today``; each ledger sandbox's ``load_history``
writes it as that ledger would hold it (contacts carrying the company's identifiers, so the sync matches
them to the CRM companies).

Each company also gets a :class:`PayerProfile`: how late it pays. :func:`payment_plan` turns a profile and
an invoice into the payments the customer makes, so a sandbox can settle the invoices the sync creates
as the customer would (``settle``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import random
from dataclasses import dataclass, replace
from decimal import Decimal

from connectors.domain import Address, Customer, round_money
from connectors.seedbook import (
    _DISCOUNTS,
    _PRODUCT_WEIGHTS,
    _QUANTITIES,
    _USD_PER_EUR,
    PRODUCTS,
    Book,
    BookCompany,
    BookLine,
    BookProduct,
)

__all__ = [
    "History",
    "HistoryCreditNote",
    "HistoryExpense",
    "HistoryInvoice",
    "HistoryPayment",
    "PayerProfile",
    "book_customer",
    "generate_history",
    "payment_plan",
]


@dataclass(frozen=True)
class PayerProfile:
    """How a company pays: ``mean_delay_days`` past the due date on average (0 for a punctual payer),
    ``partial_share`` the share of invoices it pays in two instalments, ``never_share`` the share it never
    pays. ``churned_on`` is the day after which it bought nothing more (None while it is active)."""

    company_id: str
    mean_delay_days: int
    partial_share: float
    never_share: float
    churned_on: dt.date | None = None


@dataclass(frozen=True)
class HistoryPayment:
    id: str
    invoice_id: str
    date: dt.date
    amount: Decimal  # including tax, invoice currency


@dataclass(frozen=True)
class HistoryInvoice:
    id: str  # H000001...
    company_id: str
    number: str
    issue_date: dt.date
    due_date: dt.date
    currency: str
    lines: tuple[BookLine, ...]
    #: Included in the ledger as authorised (approved) invoices; the payments below settle them.
    payments: tuple[HistoryPayment, ...] = ()


@dataclass(frozen=True)
class HistoryCreditNote:
    id: str
    invoice_id: str  # the invoice it corrects, and is allocated to
    company_id: str
    number: str
    issue_date: dt.date
    currency: str
    lines: tuple[BookLine, ...]


@dataclass(frozen=True)
class HistoryExpense:
    """A supplier bill line booked to an expense account (marketing spend, sales tools...)."""

    id: str
    account_code: str
    date: dt.date
    net: Decimal
    currency: str
    description: str


@dataclass(frozen=True)
class History:
    today: dt.date
    invoices: tuple[HistoryInvoice, ...]
    credit_notes: tuple[HistoryCreditNote, ...]
    expenses: tuple[HistoryExpense, ...]
    profiles: tuple[PayerProfile, ...]

    def profile(self, company_id: str) -> PayerProfile | None:
        for p in self.profiles:
            if p.company_id == company_id:
                return p
        return None


def _rng_for(key: str) -> random.Random:
    """A generator seeded from ``key`` through SHA-256: the same sequence in every process and Python build."""
    return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))


def _line_net(line: BookLine, currency: str) -> Decimal:
    gross = line.quantity * line.unit_price
    return round_money(gross * (Decimal(100) - line.discount_percent) / Decimal(100), currency)


def _lines_total(lines: tuple[BookLine, ...], currency: str) -> Decimal:
    """Total including tax, as a ledger computes it: rounded line amounts plus rounded line taxes."""
    total = Decimal(0)
    for line in lines:
        net = _line_net(line, currency)
        total += net + round_money(net * line.tax_rate / Decimal(100), currency)
    return total


# Purchases follow a BG/NBD-like process, in weeks: each company buys at a rate drawn from a gamma distribution
# and, after each purchase, stops buying for good with a probability drawn from a beta distribution. Unlike
# BG/NBD, the first purchase can be the last one too: some companies buy once and never come back.
_RATE_SHAPE, _RATE_SCALE = 1.5, 0.06  # purchases a week: mean 0.09, most companies between 0.01 and 0.25
_DROP_A, _DROP_B = 1.0, 14.0  # chance of stopping after a purchase: mean 0.07
_FREQUENT_SHARE = 0.04  # companies that buy every week or two and hardly ever leave
_NO_HISTORY_SHARE = 0.08  # companies known only to the CRM (prospects, or customers the sync brings)
# Spend per invoice follows the Gamma-Gamma model: invoice net ~ Gamma(p, 1/nu) with nu ~ Gamma(q, 1/gamma)
# per company; p and q as fitted on CDNOW, gamma scaled so that the mean invoice is about 3,900 EUR before tax.
_SPEND_P, _SPEND_Q, _SPEND_GAMMA = 6.25, 3.74, 1700.0
_LATE_SHARE = 0.15  # habitual late payers, 20 to 90 days beyond terms
_PARTIAL_SHARE = 0.08  # companies that pay some invoices in two instalments
_CREDIT_SHARE = 0.02  # invoices corrected by a credit note
_TERMS = ((30, 45, 60), (76, 16, 8))  # payment terms in days, and how many companies in a hundred have them
_LINE_COUNTS = ((1, 2, 3, 4, 5), (34, 30, 18, 11, 7))
# Monthly marketing and sales expenses of the SME, in EUR before tax: (account, base amount, description).
_EXPENSE_ACCOUNTS = (
    ("6231", 2800.0, "Google Ads – campagnes de recherche"),
    ("6233", 1500.0, "LinkedIn et Meta Ads – campagnes sponsorisées"),
    ("6234", 0.0, "Salons et événements"),
    ("6411", 19500.0, "Salaires de l'équipe commerciale"),
)
_SEASON = {1: 1.0, 2: 1.05, 3: 1.1, 4: 1.05, 5: 1.0, 6: 0.95, 7: 0.7, 8: 0.55, 9: 1.2, 10: 1.2, 11: 1.1, 12: 0.8}
_EVENT_MONTHS = (3, 6, 10)


def _working_day(day: dt.date, start: dt.date) -> dt.date:
    """Invoices are issued on working days: a weekend day moves back to the Friday, or on to the Monday when
    that Friday is before ``start``."""
    friday = day - dt.timedelta(days=max(0, day.weekday() - 4))
    return friday if friday >= start else day + dt.timedelta(days=7 - day.weekday())


def _add_months(day: dt.date, months: int) -> dt.date:
    y, m = divmod(day.month - 1 + months, 12)
    return dt.date(day.year + y, m + 1, 1)


def _basket(rng: random.Random, target: float, favourites: list[BookProduct], catalogue: tuple[BookProduct, ...],
            weights: list[float], prices: dict[str, Decimal], discount: Decimal) -> tuple[BookLine, ...]:
    """Invoice lines worth about ``target`` before tax, mostly from the company's favourite products."""
    n = min(rng.choices(*_LINE_COUNTS)[0], len(catalogue))
    chosen: list[BookProduct] = []
    while len(chosen) < n:
        if rng.random() < 0.85 and any(p not in chosen for p in favourites):
            product = rng.choice([p for p in favourites if p not in chosen])
        else:
            product = rng.choices(catalogue, weights=weights)[0]
        if product not in chosen:
            chosen.append(product)
    shares = [rng.gammavariate(2.0, 1.0) for _ in chosen]
    lines: list[BookLine] = []
    for product, share in zip(chosen, shares, strict=True):
        price = prices[product.sku]
        aim = max(target * share / sum(shares), 1.0)
        options = sorted({Decimal(q) for q in _QUANTITIES.get(product.sku, ("1", "2", "5", "10"))})
        best = min(range(len(options)), key=lambda i: abs(math.log(max(float(options[i] * price), 0.01) / aim)))
        if len(options) > 1 and rng.random() < 0.3:
            best = min(max(best + rng.choice((-1, 1)), 0), len(options) - 1)
        line_discount = discount if discount and rng.random() < 0.7 else Decimal(0)
        lines.append(BookLine(sku=product.sku, description=product.name, quantity=options[best], unit_price=price,
                              discount_percent=line_discount, tax_rate=product.tax_rate))
    return tuple(lines)


def _credit_lines(rng: random.Random, lines: tuple[BookLine, ...], currency: str) -> tuple[BookLine, ...]:
    """The lines of a credit note on an invoice of ``lines``: all of them, one of them, or a price reduction."""
    r = rng.random()
    if r < 0.35:
        return lines
    if r < 0.6 and len(lines) > 1:
        return (rng.choice(lines),)
    line = rng.choice(lines)
    share = Decimal(rng.choice(("0.1", "0.2", "0.25", "0.5")))
    return (replace(line, description=f"Geste commercial – {line.description}",
                    unit_price=round_money(line.unit_price * share, currency)),)


@dataclass
class _Sale:
    company: BookCompany
    profile: PayerProfile
    terms: int
    date: dt.date
    lines: tuple[BookLine, ...]


def generate_history(book: Book, *, seed: int = 0, today: dt.date, years: int = 3) -> History:
    """The ledger history of ``book``'s companies over the ``years`` before ``today``."""
    if years < 1:
        raise ValueError("years must be at least 1")
    if book.companies and not book.products:
        raise ValueError("a book with companies needs products to invoice them")
    rng = random.Random(f"ledgerbridge-history-{seed}")
    start = today - dt.timedelta(days=round(365.25 * years))
    span_days = (today - start).days
    catalogue = book.products
    base_weights = dict(zip((p.sku for p in PRODUCTS), _PRODUCT_WEIGHTS, strict=True))
    weights = [float(base_weights.get(p.sku, 1)) for p in catalogue]
    last_won: dict[str, dt.date] = {}
    for deal in book.deals:
        if deal.is_won and deal.close_date is not None and deal.close_date <= today:
            last_won[deal.company_id] = max(deal.close_date, last_won.get(deal.company_id, deal.close_date))

    sales: list[_Sale] = []
    profiles: list[PayerProfile] = []
    late_payers = set(rng.sample(range(len(book.companies)), round(_LATE_SHARE * len(book.companies))))
    for index, company in enumerate(book.companies):
        late = index in late_payers
        mean_delay = rng.randint(20, 90) if late else 0
        if late:
            never_share = round(rng.uniform(0.03, 0.10), 3)
        else:
            never_share = round(rng.uniform(0.01, 0.04), 3) if rng.random() < 0.2 else 0.0
        partial_share = round(rng.uniform(0.3, 0.6), 2) if rng.random() < _PARTIAL_SHARE else 0.0
        terms = rng.choices(*_TERMS)[0]
        dates: list[dt.date] = []
        dropped = frequent = False
        if rng.random() >= _NO_HISTORY_SHARE:
            frequent = rng.random() < _FREQUENT_SHARE
            if frequent:
                rate, drop = rng.uniform(0.4, 0.8), rng.uniform(0.0, 0.02)
            else:
                rate, drop = rng.gammavariate(_RATE_SHAPE, _RATE_SCALE), rng.betavariate(_DROP_A, _DROP_B)
            t = rng.uniform(0, span_days / 2 if frequent else span_days)  # frequent buyers are long-standing
            while t <= span_days:
                dates.append(_working_day(start + dt.timedelta(days=int(t)), start))
                if rng.random() < drop:
                    dropped = True
                    break
                t += rng.expovariate(max(rate, 1e-4)) * 7
        churned_on = max([dates[-1], *([last_won[company.id]] if company.id in last_won else [])]) if dropped else None
        profile = PayerProfile(company.id, mean_delay, partial_share, never_share, churned_on)
        profiles.append(profile)
        if not dates:
            continue
        # The company's basket: its favourite products, its negotiated prices and discount, its spend level.
        favourites: list[BookProduct] = []
        while len(favourites) < min(rng.randint(2, 5), len(catalogue)):
            product = rng.choices(catalogue, weights=weights)[0]
            if product not in favourites:
                favourites.append(product)
        negotiated = rng.random() < 0.1
        prices: dict[str, Decimal] = {}
        for product in catalogue:
            price = product.unit_price
            if company.currency != "EUR":
                price = round_money(price * _USD_PER_EUR, company.currency)
            if negotiated:
                price = round_money(price * Decimal("0.95"), company.currency)
            prices[product.sku] = price
        discount = Decimal(rng.choice(_DISCOUNTS)) if rng.random() < 0.2 else Decimal(0)
        nu = rng.gammavariate(_SPEND_Q, 1 / _SPEND_GAMMA)
        scale = (0.25 if frequent else 1.0) * (float(_USD_PER_EUR) if company.currency != "EUR" else 1.0)
        for day in dates:
            target = rng.gammavariate(_SPEND_P, 1 / nu) * scale
            lines = _basket(rng, target, favourites, catalogue, weights, prices, discount)
            sales.append(_Sale(company, profile, terms, day, lines))

    sales.sort(key=lambda s: (s.date, s.company.id))
    invoices: list[HistoryInvoice] = []
    credit_notes: list[HistoryCreditNote] = []
    per_year: dict[int, int] = {}
    credits_per_year: dict[int, int] = {}
    for n, sale in enumerate(sales, start=1):
        currency = sale.company.currency
        per_year[sale.date.year] = per_year.get(sale.date.year, 0) + 1
        invoice_id = f"H{n:06d}"
        due = sale.date + dt.timedelta(days=sale.terms)
        owed = _lines_total(sale.lines, currency)
        paid_from = sale.date
        if rng.random() < _CREDIT_SHARE and sale.date + dt.timedelta(days=2) <= today:
            credit_date = min(today, sale.date + dt.timedelta(days=rng.randint(2, 40)))
            credit = _credit_lines(rng, sale.lines, currency)
            year_count = credits_per_year[credit_date.year] = credits_per_year.get(credit_date.year, 0) + 1
            credit_notes.append(HistoryCreditNote(
                id=f"HC{len(credit_notes) + 1:05d}", invoice_id=invoice_id, company_id=sale.company.id,
                number=f"AV{credit_date.year}-{year_count:04d}", issue_date=credit_date, currency=currency,
                lines=credit,
            ))
            owed -= _lines_total(credit, currency)
            paid_from = credit_date
        plan = payment_plan(sale.profile, f"history-{seed}-{invoice_id}", sale.date, due, owed, currency)
        payments = tuple(
            HistoryPayment(id=f"{invoice_id}-P{k}", invoice_id=invoice_id, date=max(day, paid_from), amount=amount)
            for k, (day, amount) in enumerate(plan, start=1) if max(day, paid_from) <= today
        )
        invoices.append(HistoryInvoice(
            id=invoice_id, company_id=sale.company.id, number=f"FA{sale.date.year}-{per_year[sale.date.year]:05d}",
            issue_date=sale.date, due_date=due, currency=currency, lines=sale.lines, payments=payments,
        ))

    expenses: list[HistoryExpense] = []
    month = _add_months(start, 1)
    while True:
        month_end = _add_months(month, 1) - dt.timedelta(days=1)
        if month_end > today:
            break
        growth = 1.04 ** ((month - start).days / 365.25)
        for code, base, description in _EXPENSE_ACCOUNTS:
            if code == "6234":
                if month.month in _EVENT_MONTHS and rng.random() < 0.8:
                    amount = rng.uniform(4000, 14000) * growth
                elif rng.random() < 0.15:
                    amount = rng.uniform(400, 2500) * growth
                else:
                    continue
            elif code == "6411":
                amount = base * growth * rng.uniform(0.98, 1.02) * (1.3 if month.month == 12 else 1.0)
            else:
                amount = base * growth * _SEASON[month.month] * rng.uniform(0.8, 1.2)
            expenses.append(HistoryExpense(
                id=f"HE{len(expenses) + 1:05d}", account_code=code, date=month_end,
                net=round_money(Decimal(f"{amount:.2f}"), "EUR"),
                currency="EUR", description=f"{description} – {month:%m/%Y}",
            ))
        month = _add_months(month, 1)

    return History(today=today, invoices=tuple(invoices), credit_notes=tuple(credit_notes),
                   expenses=tuple(expenses), profiles=tuple(profiles))


def payment_plan(profile: PayerProfile | None, invoice_key: str, issue_date: dt.date, due_date: dt.date,
                 total: Decimal, currency: str) -> list[tuple[dt.date, Decimal]]:
    """The payments (date, amount including tax) the customer makes against an invoice, deterministic for
    ``invoice_key``; empty when it never pays. A missing profile pays around the due date."""
    rng = _rng_for(f"ledgerbridge-payment-{invoice_key}")
    if total <= 0:
        return []
    if profile is None:
        delay = rng.randint(5, 30) if rng.random() < 0.08 else rng.randint(-7, 3)
        return [(max(issue_date, due_date + dt.timedelta(days=delay)), total)]
    if rng.random() < profile.never_share:
        return []
    if profile.mean_delay_days > 0:
        mean = profile.mean_delay_days
        paid = due_date + dt.timedelta(days=max(1, round(rng.gauss(mean, max(3.0, mean / 4)))))
    else:
        # Between the issue date and a few days after the due date, most often in the last week or so.
        span = max((due_date - issue_date).days, 0) + 5
        paid = issue_date + dt.timedelta(days=round(rng.triangular(0, span, max(0, span - 8))))
    paid = max(paid, issue_date)
    if rng.random() < profile.partial_share:
        first = round_money(total * Decimal(rng.choice(("0.3", "0.4", "0.5", "0.6"))), currency)
        if 0 < first < total:
            return [(paid, first), (paid + dt.timedelta(days=rng.randint(15, 60)), total - first)]
    return [(paid, total)]


def book_customer(company: BookCompany) -> Customer:
    """``company`` as the sync reads it from the CRM: the name, identifiers, e-mail, website domain, currency
    and address a ledger sandbox gives the contact it loads for the company, so that the sync matches it."""
    return Customer(
        crm_id=company.id, name=company.name, domain=company.domain, email=company.email,
        vat_number=company.vat_number, siren=company.siren, siret=company.siret, country=company.country,
        currency=company.currency, acquisition_source=company.acquisition_source,
        address=Address(line1=company.address, city=company.city, postal_code=company.postal_code,
                        country=company.country),
    )
