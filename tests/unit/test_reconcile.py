"""Reconciliation rules as pure functions: deal to invoice, keys, references and customer matching."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest

from config.schema import Pipeline
from connectors.domain import Customer, Deal, Invoice, LineItem
from connectors.interfaces import LedgerCustomer
from sync.reconcile import (
    CustomerIndex,
    DealProblem,
    batch_key,
    build_invoice,
    customer_number,
    deal_from_reference,
    fingerprint,
    intent_key,
    invoice_reference,
)

TODAY = dt.date(2026, 3, 2)
TAXES = {"20": "TAX001", "10": "TAX002", "5.5": "TAX003", "2.1": "TAX004"}
MATCH_ORDER = ["link", "number", "vat_number", "domain", "email", "name"]


def pipeline(**sections: Any) -> Pipeline:
    base: dict[str, Any] = {
        "crm": {"type": "hubspot"},
        "ledger": {"type": "xero"},
        "items": {"on_unmapped": "fail", "map": {"SVC": {"item_code": "SVC", "account_code": "706"},
                                                 "HW": {"item_code": "HW", "account_code": "707"}}},
        "taxes": {"map": TAXES},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return Pipeline.model_validate(base)


def deal(*lines: LineItem, amount: str | None = None, currency: str = "EUR", customer: bool = True,
         close: dt.date | None = dt.date(2026, 2, 27)) -> Deal:
    total = sum((li.net_amount(currency) for li in lines), Decimal(0))
    return Deal(crm_id="901", name="Déploiement", currency=currency, is_won=True, close_date=close,
                amount=Decimal(amount) if amount is not None else total,
                customer=Customer(crm_id="C1", name="Atelier Dupont SARL") if customer else None,
                line_items=list(lines), updated_at=dt.datetime(2026, 2, 27, 10, tzinfo=dt.UTC))


def line(price: str, qty: str = "1", rate: str | None = "20", sku: str | None = "SVC", discount: str = "0") -> LineItem:
    return LineItem(sku=sku, description=f"{sku} line", quantity=Decimal(qty), unit_price=Decimal(price),
                    discount_percent=Decimal(discount), tax_rate=Decimal(rate) if rate is not None else None)


def built(d: Deal, p: Pipeline | None = None) -> Invoice:
    result = build_invoice(d, p or pipeline(), "main", TODAY)
    assert isinstance(result, Invoice), result
    return result


def problem(d: Deal, p: Pipeline | None = None) -> DealProblem:
    result = build_invoice(d, p or pipeline(), "main", TODAY)
    assert isinstance(result, DealProblem), result
    return result


# ------------------------------------------------------------------------------------------------
# deal to invoice
# ------------------------------------------------------------------------------------------------
def test_tax_is_rounded_per_line_then_summed() -> None:
    """Three lines of 33.333 at 20 % give 99.99 net and 3 x 6.67 tax, not the invoice-level 20.00."""
    inv = built(deal(line("33.333"), line("33.333"), line("33.333")))
    assert [ln.net_amount("EUR") for ln in inv.lines] == [Decimal("33.33")] * 3
    assert [ln.tax_amount("EUR") for ln in inv.lines] == [Decimal("6.67")] * 3
    assert (inv.subtotal, inv.tax, inv.total) == (Decimal("99.99"), Decimal("20.01"), Decimal("120.00"))


def test_one_line_of_three_units_rounds_once() -> None:
    """3 x 33.333 on one line is 99.999, rounded once to 100.00 net and 20.00 tax."""
    inv = built(deal(line("33.333", qty="3")))
    assert (inv.subtotal, inv.tax, inv.total) == (Decimal("100.00"), Decimal("20.00"), Decimal("120.00"))


def test_lines_carry_items_accounts_tax_types_and_discount() -> None:
    """Each line maps its SKU to item and account, its rate to a tax type, and keeps its discount."""
    inv = built(deal(line("100", qty="2", discount="15"), line("49.90", rate="5.5", sku="HW")))
    first, second = inv.lines
    assert (first.item_code, first.account_code, first.tax_type) == ("SVC", "706", "TAX001")
    assert first.discount_percent == Decimal(15)
    assert (first.net_amount("EUR"), first.tax_amount("EUR")) == (Decimal("170.00"), Decimal("34.00"))
    assert (second.item_code, second.account_code, second.tax_type) == ("HW", "707", "TAX003")
    assert second.tax_amount("EUR") == Decimal("2.74")  # 49.90 x 5.5 % = 2.7445
    assert inv.subtotal == Decimal("219.90")
    assert inv.reference == "LB-main:901"
    assert inv.currency == "EUR"
    assert inv.status == "authorised"


def test_issue_and_due_dates_follow_the_policy() -> None:
    """The invoice is dated on the close date (or today when asked or missing), due due_days later."""
    inv = built(deal(line("10")))
    assert (inv.issue_date, inv.due_date) == (dt.date(2026, 2, 27), dt.date(2026, 3, 29))
    assert built(deal(line("10"), close=None)).issue_date == TODAY
    today = built(deal(line("10")), pipeline(invoice={"issue_date": "today", "due_days": 0}))
    assert (today.issue_date, today.due_date) == (TODAY, TODAY)


def test_zero_decimal_currency_rounds_to_whole_units() -> None:
    """A JPY deal rounds each line and its tax to whole yen."""
    inv = built(deal(line("1000.6", qty="3"), currency="JPY"))
    assert (inv.subtotal, inv.tax) == (Decimal("3002"), Decimal("600"))


def test_missing_tax_rate_uses_missing_rate_or_is_flagged() -> None:
    """A line without a rate takes taxes.missing_rate; without one it is unmapped_tax; default policy maps it."""
    d = deal(line("100", rate=None))
    assert problem(d).reason == "unmapped_tax"
    assert "no tax rate" in problem(d).detail
    assert "901" in problem(d).detail
    with_rate = built(d, pipeline(taxes={"missing_rate": "20"}))
    assert (with_rate.lines[0].tax_type, with_rate.tax) == ("TAX001", Decimal("20.00"))
    defaulted = built(d, pipeline(taxes={"on_unmapped": "default", "default": "NONE"}))
    assert (defaulted.lines[0].tax_type, defaulted.tax) == ("NONE", Decimal("0.00"))


def test_unmapped_rate_names_the_rate() -> None:
    """A rate with no tax type is unmapped_tax naming the deal, the line's SKU and the rate."""
    p = problem(deal(line("100", rate="7")))
    assert p.reason == "unmapped_tax"
    assert "901" in p.detail
    assert "SVC" in p.detail
    assert "7 %" in p.detail


def test_unmapped_sku_fails_defaults_or_is_skipped() -> None:
    """An unknown SKU is unmapped_item under fail, takes items.default under default, has no item under skip."""
    d = deal(line("100", sku="NEW-SKU"))
    p = problem(d)
    assert p.reason == "unmapped_item"
    assert "NEW-SKU" in p.detail
    assert "901" in p.detail
    default = built(d, pipeline(items={"on_unmapped": "default", "default": {"account_code": "706"}}))
    assert (default.lines[0].item_code, default.lines[0].account_code) == (None, "706")
    skipped = built(d, pipeline(items={"on_unmapped": "skip"}))
    assert (skipped.lines[0].item_code, skipped.lines[0].account_code) == (None, None)
    # A line without any SKU is unmapped as well.
    assert problem(deal(line("100", sku=None))).reason == "unmapped_item"


def test_other_problems_have_stable_reasons() -> None:
    """No company, no lines, a refused currency and an amount gap each give their reason code."""
    assert problem(deal(line("10"), customer=False)).reason == "no_customer"
    assert problem(deal()).reason == "no_lines"
    usd = problem(deal(line("10"), currency="USD"), pipeline(invoice={"currencies": ["EUR"]}))
    assert usd.reason == "currency_not_allowed"
    assert "USD" in usd.detail
    gap = problem(deal(line("10"), amount="10.02"))
    assert gap.reason == "amount_mismatch"
    assert "10.02" in gap.detail
    assert "10.00" in gap.detail
    # Within the tolerance it is invoiced.
    assert built(deal(line("10"), amount="10.01")).subtotal == Decimal("10.00")


# ------------------------------------------------------------------------------------------------
# keys, references and fingerprints
# ------------------------------------------------------------------------------------------------
def test_intent_keys_are_deterministic_and_short() -> None:
    """The same intent always gets the same key, at most 36 characters; another revision gets another key."""
    k1 = intent_key("main", "invoice", "10050003723", 1)
    assert k1 == intent_key("main", "invoice", "10050003723", 1)
    assert len(k1) <= 36
    others = {intent_key("main", "invoice", "10050003723", 2), intent_key("main", "customer", "10050003723", 1),
              intent_key("other", "invoice", "10050003723", 1), intent_key("main", "invoice", "10050003724", 1)}
    assert k1 not in others
    assert len(others) == 4
    long_id = "x" * 500
    assert len(intent_key("a" * 40, "invoice", long_id, 10_000)) <= 36


def test_batch_key_depends_on_the_set_of_intents_only() -> None:
    """A batch key is the same whatever the order of its intents, different for another set, at most 36 chars."""
    keys = [intent_key("main", "invoice", str(i), 1) for i in range(50)]
    assert batch_key(keys) == batch_key(list(reversed(keys)))
    assert batch_key(keys) != batch_key(keys[:-1])
    assert len(batch_key(keys)) <= 36


def test_reference_round_trips_to_the_deal_id() -> None:
    """invoice_reference and deal_from_reference are inverse; foreign references give None."""
    p = pipeline()
    ref = invoice_reference(p, "main", "10050003723")
    assert ref == "LB-main:10050003723"
    assert deal_from_reference(p, "main", ref) == "10050003723"
    for foreign in (None, "", "LB-main:", "LB-other:1", "XX-main:1", "INV-0001", "LB-main-10050003723"):
        assert deal_from_reference(p, "main", foreign) is None
    # Pipelines whose names prefix each other never claim each other's invoices.
    assert deal_from_reference(p, "acme", invoice_reference(p, "acme-fr", "123")) is None
    assert deal_from_reference(p, "acme-fr", invoice_reference(p, "acme-fr", "123")) == "123"
    custom = pipeline(invoice={"reference_prefix": "ACME"})
    assert deal_from_reference(custom, "main", invoice_reference(custom, "main", "7")) == "7"
    assert deal_from_reference(custom, "main", ref) is None


def test_customer_number_fits_the_ledger_limit() -> None:
    """A customer's external number names the CRM and the company and fits in 50 characters."""
    assert customer_number(pipeline(), "hubspot", "123") == "LB-hubspot-123"
    assert len(customer_number(pipeline(), "hubspot", "9" * 80)) == 50


def test_fingerprint_changes_with_what_is_invoiced() -> None:
    """The fingerprint is stable for the same lines and customer and changes with a line, currency or customer."""
    base = built(deal(line("100"), line("20", sku="HW")))
    same = built(deal(line("100"), line("20", sku="HW"), close=dt.date(2026, 1, 1)))
    assert fingerprint(base, "C1") == fingerprint(same, "C1")
    assert fingerprint(base, "C1") != fingerprint(base, "C2")
    assert fingerprint(base, "C1") != fingerprint(built(deal(line("100"), line("21", sku="HW"))), "C1")
    assert fingerprint(base, "C1") != fingerprint(built(deal(line("100"), line("20", sku="HW"), currency="USD")),
                                                  "C1")
    assert fingerprint(base, "C1") != fingerprint(built(deal(line("100", qty="1.0"), line("20", sku="HW"),
                                                             line("0.01"))), "C1")


# ------------------------------------------------------------------------------------------------
# customer matching
# ------------------------------------------------------------------------------------------------
CUSTOMER = Customer(crm_id="C1", name="Atelier  Dupont SARL", domain="https://www.atelier-dupont.fr/",
                    email="Compta@Atelier-Dupont.fr", vat_number="fr 40 303265045")


def test_each_key_matches_on_its_own() -> None:
    """Number, VAT (normalised), website domain, e-mail (any case) and name (case, spaces) each find a customer."""
    targets = {
        "number": LedgerCustomer("L-num", "Other name", number="LB-hubspot-C1"),
        "vat_number": LedgerCustomer("L-vat", "Another", vat_number="FR 40303265045"),
        "domain": LedgerCustomer("L-dom", "Third", domain="Atelier-Dupont.fr"),
        "email": LedgerCustomer("L-mail", "Fourth", email="compta@atelier-dupont.fr"),
        "name": LedgerCustomer("L-name", "atelier dupont sarl"),
    }
    for key, target in targets.items():
        index = CustomerIndex([target, LedgerCustomer("L-x", "Unrelated", number="LB-hubspot-C2")])
        found, how = index.match(CUSTOMER, "LB-hubspot-C1", ["link", key])
        assert (found.ledger_id if found else None, how) == (target.ledger_id, key)


def test_match_follows_the_policy_order() -> None:
    """The first key in the policy's order that finds exactly one ledger customer wins."""
    index = CustomerIndex([
        LedgerCustomer("L-num", "Other name", number="LB-hubspot-C1"),
        LedgerCustomer("L-vat", "Another", vat_number="FR40303265045"),
        LedgerCustomer("L-mail", "Fourth", email="compta@atelier-dupont.fr"),
        LedgerCustomer("L-name", "atelier dupont sarl"),
    ])
    for order, ledger_id, how in ((MATCH_ORDER, "L-num", "number"), (["vat_number", "number"], "L-vat", "vat_number"),
                                  (["name", "email"], "L-name", "name"),
                                  # A ledger contact without a website is known by its e-mail domain.
                                  (["domain", "name"], "L-mail", "domain")):
        found, key = index.match(CUSTOMER, "LB-hubspot-C1", order)
        assert (found.ledger_id if found else None, key) == (ledger_id, how)


def test_two_ledger_customers_with_one_name_match_nobody_by_name() -> None:
    """Two ledger customers with the same name are ambiguous: no match by name, a later key may still match."""
    twins = [LedgerCustomer("L1", "Atelier Dupont SARL"), LedgerCustomer("L2", "ATELIER DUPONT SARL ")]
    customer = Customer(crm_id="C1", name="Atelier Dupont SARL")
    assert CustomerIndex(twins).match(customer, "LB-hubspot-C1", MATCH_ORDER) == (None, "")
    with_vat = CustomerIndex([*twins, LedgerCustomer("L3", "Dupont (siège)", vat_number="FR40303265045")])
    found, how = with_vat.match(CUSTOMER, "LB-hubspot-C1", ["name", "vat_number"])
    assert (found.ledger_id if found else None, how) == ("L3", "vat_number")


def test_a_customer_listed_twice_is_not_ambiguous() -> None:
    """The same ledger customer indexed twice (listed, then added after creation) still matches."""
    one = LedgerCustomer("L1", "Atelier Dupont SARL")
    index = CustomerIndex([one])
    index.add(one)
    found, how = index.match(Customer(crm_id="C1", name="Atelier Dupont SARL"), "n", ["name"])
    assert (found, how) == (one, "name")


def test_email_domain_of_a_ledger_contact_is_not_the_company_domain_of_another() -> None:
    """A CRM company with no domain is not matched through the e-mail domain of a ledger contact."""
    index = CustomerIndex([LedgerCustomer("L1", "Someone", email="billing@gmail.com")])
    customer = Customer(crm_id="C9", name="Nobody", email="x@gmail.com")
    assert index.match(customer, "n", ["domain", "name"]) == (None, "")


@pytest.mark.parametrize("order", [["link"], []])
def test_no_usable_key_matches_nothing(order: list[str]) -> None:
    """A policy with no key but link (or none) matches nothing in the ledger."""
    index = CustomerIndex([LedgerCustomer("L1", "Atelier Dupont SARL")])
    assert index.match(CUSTOMER, "n", order) == (None, "")
