"""The seeded CRM book: deterministic, internally consistent, with valid French and EU identifiers."""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from decimal import Decimal

import pytest

from connectors.domain import LineItem
from connectors.seedbook import (
    ACQUISITION_SOURCES,
    OWNERS,
    PRODUCTS,
    STAGES,
    TAX_RATES,
    Book,
    BookDeal,
    be_vat_valid,
    de_vat_valid,
    effective_lines,
    generate_book,
)


@pytest.fixture(scope="module")
def book() -> Book:
    return generate_book(7, companies=400, deals=1000)


def _luhn(number: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _net(deal: BookDeal) -> Decimal:
    """The invoice net total, computed with the domain model rather than the generator's helper."""
    lines = [LineItem(sku=ln.sku, description=ln.description, quantity=ln.quantity, unit_price=ln.unit_price,
                      discount_percent=ln.discount_percent, tax_rate=ln.tax_rate) for ln in effective_lines(deal)]
    return sum((li.net_amount(deal.currency) for li in lines), Decimal(0))


def test_same_seed_gives_the_same_book() -> None:
    """Two books from the same seed and arguments are identical; another seed gives another book."""
    a = generate_book(3, companies=60, deals=150)
    b = generate_book(3, companies=60, deals=150)
    assert a == b
    assert generate_book(4, companies=60, deals=150) != a


def test_amount_is_the_sum_of_the_effective_lines(book: Book) -> None:
    """Every deal's amount equals the rounded net total of its effective lines (accepted quote, else deal)."""
    for deal in book.deals:
        assert deal.amount == _net(deal), deal.id
        assert deal.amount.as_tuple().exponent == -2


def test_french_identifiers_are_valid(book: Book) -> None:
    """French companies carry a Luhn-valid SIREN, a SIRET extending it, and the VAT number with its key."""
    french = [c for c in book.companies if c.country == "FR"]
    assert len(french) > 250
    for c in french:
        assert c.siren is not None
        assert c.siret is not None
        assert c.vat_number is not None
        assert re.fullmatch(r"\d{9}", c.siren), c.siren
        assert _luhn(c.siren), c.siren
        assert re.fullmatch(r"\d{14}", c.siret)
        assert _luhn(c.siret)
        assert c.siret.startswith(c.siren)
        key = (12 + 3 * (int(c.siren) % 97)) % 97
        assert c.vat_number == f"FR{key:02d}{c.siren}"
    assert len({c.siren for c in french}) == len(french)


def test_foreign_companies(book: Book) -> None:
    """About a tenth are EU companies with valid VAT numbers; the USD ones are in the US without VAT."""
    foreign = [c for c in book.companies if c.country in ("DE", "BE", "ES", "IT")]
    assert 0.05 * len(book.companies) <= len(foreign) <= 0.15 * len(book.companies)
    for c in foreign:
        assert c.siren is None
        assert c.vat_number is not None
        assert c.vat_number.startswith(c.country)
        if c.country == "DE":
            assert de_vat_valid(c.vat_number)
        elif c.country == "BE":
            assert be_vat_valid(c.vat_number)
        elif c.country == "IT":
            assert re.fullmatch(r"IT\d{11}", c.vat_number)
            assert _luhn(c.vat_number[2:])
        else:
            assert re.fullmatch(r"ESB\d{8}", c.vat_number)
    us = [c for c in book.companies if c.currency == "USD"]
    assert us
    assert all(c.country == "US" and c.vat_number is None for c in us)
    assert all(d.currency == book.company(d.company_id).currency for d in book.deals)


def test_tax_rates_spread(book: Book) -> None:
    """Lines use the four French VAT rates, 20 % for most of them and 2.1 % for a few."""
    rates = Counter(ln.tax_rate for d in book.deals for ln in d.lines)
    assert set(rates) == set(TAX_RATES)
    total = sum(rates.values())
    assert rates[Decimal("20")] > 0.6 * total
    assert 0 < rates[Decimal("2.1")] < rates[Decimal("10")]
    assert {p.tax_rate for p in PRODUCTS} == set(TAX_RATES)


def test_accepted_quotes_carry_different_lines(book: Book) -> None:
    """About a fifth of the won deals have an accepted quote whose lines differ from the deal's own."""
    won = [d for d in book.deals if d.is_won]
    accepted = [d for d in won if d.quote is not None and d.quote.status == "accepted"]
    assert 0.12 * len(won) <= len(accepted) <= 0.3 * len(won)
    for d in accepted:
        assert d.quote is not None
        assert d.quote.lines != d.lines
    statuses = Counter(d.quote.status for d in book.deals if d.quote is not None)
    assert set(statuses) == {"accepted", "sent", "draft", "rejected"}
    assert all(d.quote is None or d.quote.status != "accepted" or d.is_won for d in book.deals)


def test_many_deals_share_a_timestamp(book: Book) -> None:
    """Groups of deals share the exact same updated_at, one of them large; times are whole milliseconds."""
    counts = Counter(d.updated_at for d in book.deals)
    assert max(counts.values()) >= 75
    assert sum(1 for n in counts.values() if n >= 2) >= 10
    for d in book.deals:
        assert d.created_at <= d.updated_at
        assert d.updated_at.microsecond % 1000 == 0
        assert d.updated_at.tzinfo is not None


def test_book_shape(book: Book) -> None:
    """Ids, stages, owners, sources and dates are consistent with the documented spec."""
    assert [d.id for d in book.deals] == [f"D{i:05d}" for i in range(1, 1001)]
    assert [c.id for c in book.companies] == [f"C{i:05d}" for i in range(1, 401)]
    assert len({c.name for c in book.companies}) == len(book.companies)
    assert any(c.domain is None for c in book.companies)
    for d in book.deals:
        assert d.stage in STAGES
        assert d.owner in OWNERS
        assert d.acquisition_source in ACQUISITION_SOURCES
        assert d.is_won == (d.stage == "won")
        assert d.is_closed == (d.stage in ("won", "lost"))
        if d.is_closed:
            assert d.close_date is not None
            assert d.created_at.date() <= d.close_date <= d.updated_at.date()
        assert d.lines
        assert all(ln.sku in {p.sku for p in PRODUCTS} for ln in d.lines)
    assert 0.35 < sum(d.is_won for d in book.deals) / len(book.deals) < 0.55
    assert all(c.acquisition_source in ACQUISITION_SOURCES for c in book.companies)


def test_options_shape_the_book() -> None:
    """won_share, usd_share and lines_per_deal are honoured."""
    b = generate_book(1, companies=40, deals=80, won_share=1.0, usd_share=0.0, lines_per_deal=3)
    assert all(d.is_won and len(d.lines) == 3 and d.currency == "EUR" for d in b.deals)
    assert max(d.updated_at for d in b.deals) < dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
