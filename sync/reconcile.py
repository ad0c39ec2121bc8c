"""Reconciliation rules: deal to invoice mapping, customer matching, references and keys.

Everything here is a pure function of the deal, the pipeline policy and what the ledger holds, so the
planner (``ledgerbridge plan``) and the engine (``ledgerbridge run``) take the same decisions.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from config.schema import Pipeline
from connectors.domain import Customer, Deal, Invoice, InvoiceLine
from connectors.interfaces import LedgerCustomer

__all__ = [
    "CustomerIndex",
    "DealProblem",
    "batch_key",
    "build_invoice",
    "customer_number",
    "deal_from_reference",
    "fingerprint",
    "intent_key",
    "invoice_reference",
]

# Fixed namespace so idempotency keys are the same on every machine and every run.
_NAMESPACE = uuid.UUID("5b1f6c2e-2d6a-5d0e-9a53-1ed9e7b1b1a0")


def intent_key(pipeline: str, kind: str, crm_id: str, revision: int) -> str:
    """Deterministic idempotency key of one ledger write (36 characters: fits every vendor's limit)."""
    return str(uuid.uuid5(_NAMESPACE, f"{pipeline}:{kind}:{crm_id}:v{revision}"))


def batch_key(keys: Iterable[str]) -> str:
    """Idempotency key of a batch request: the same set of intents always gives the same key."""
    return str(uuid.uuid5(_NAMESPACE, "batch:" + ",".join(sorted(keys))))


def invoice_reference(pipeline: Pipeline, pipeline_name: str, deal_id: str) -> str:
    """The reference written into the ledger; it is how a lost state database is rebuilt.

    ``PREFIX-PIPELINE:DEAL``: a colon cannot occur in a pipeline name, so pipelines ``acme`` and
    ``acme-fr`` sharing one ledger never read each other's references as their own.
    """
    return f"{pipeline.invoice.reference_prefix}-{pipeline_name}:{deal_id}"


def deal_from_reference(pipeline: Pipeline, pipeline_name: str, reference: str | None) -> str | None:
    prefix = f"{pipeline.invoice.reference_prefix}-{pipeline_name}:"
    if reference and reference.startswith(prefix) and len(reference) > len(prefix):
        return reference[len(prefix):]
    return None


def customer_number(pipeline: Pipeline, crm_vendor: str, crm_id: str) -> str:
    """The external number a created ledger customer carries (Xero ContactNumber, at most 50 chars)."""
    return f"{pipeline.invoice.reference_prefix}-{crm_vendor}-{crm_id}"[:50]


def fingerprint(invoice: Invoice, customer_crm_id: str | None) -> str:
    """Hash of what is sent for a deal: lines, currency, customer. Detects changes after invoicing."""
    payload = {
        "currency": invoice.currency,
        "customer": customer_crm_id,
        "lines": [
            [ln.description, str(ln.quantity.normalize()), str(ln.unit_price.normalize()),
             str(ln.discount_percent.normalize()), str(ln.tax_rate.normalize()), ln.item_code, ln.account_code,
             ln.tax_type]
            for ln in invoice.lines
        ],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class DealProblem:
    """Why a won deal cannot be invoiced as it stands. ``reason`` is a stable short code."""

    reason: Literal[
        "no_customer", "no_lines", "unmapped_item", "unmapped_tax", "currency_not_allowed",
        "amount_mismatch", "customer_unmatched", "ledger_rejected", "changed_after_invoice",
    ]
    detail: str


def _rate_key(rate: Decimal) -> Decimal:
    return rate.normalize()


def build_invoice(
    deal: Deal, pipeline: Pipeline, pipeline_name: str, today: dt.date
) -> Invoice | DealProblem:
    """Map a won deal to the invoice the ledger should hold, or say why it cannot be done."""
    if deal.customer is None:
        return DealProblem("no_customer", f"deal {deal.crm_id} has no associated company")
    pol = pipeline.invoice
    if pol.currencies is not None and deal.currency not in pol.currencies:
        return DealProblem(
            "currency_not_allowed",
            f"deal {deal.crm_id} is in {deal.currency}; the ledger accepts {', '.join(pol.currencies)}",
        )
    if not deal.line_items and pol.require_lines:
        return DealProblem("no_lines", f"deal {deal.crm_id} has no line items")
    tax_map = {_rate_key(k): v for k, v in pipeline.taxes.map.items()}
    lines: list[InvoiceLine] = []
    for i, li in enumerate(deal.line_items, start=1):
        where = f"deal {deal.crm_id} line {i}" + (f" (SKU {li.sku})" if li.sku else "")
        item_code: str | None = None
        account_code: str | None = None
        target = pipeline.items.map.get(li.sku) if li.sku else None
        if target is None:
            if pipeline.items.on_unmapped == "fail":
                return DealProblem("unmapped_item", f"{where}: no item mapping for SKU {li.sku!r}")
            if pipeline.items.on_unmapped == "default" and pipeline.items.default is not None:
                target = pipeline.items.default
        if target is not None:
            item_code, account_code = target.item_code, target.account_code
        rate = li.tax_rate if li.tax_rate is not None else pipeline.taxes.missing_rate
        tax_type: str | None
        if rate is None:
            if pipeline.taxes.on_unmapped == "fail":
                return DealProblem("unmapped_tax", f"{where}: the line has no tax rate")
            tax_type = pipeline.taxes.default if pipeline.taxes.on_unmapped == "default" else None
            rate = Decimal(0)
        else:
            tax_type = tax_map.get(_rate_key(rate))
            if tax_type is None:
                if pipeline.taxes.on_unmapped == "fail":
                    return DealProblem("unmapped_tax", f"{where}: no tax mapping for rate {rate} %")
                tax_type = pipeline.taxes.default if pipeline.taxes.on_unmapped == "default" else None
        lines.append(
            InvoiceLine(
                description=li.description,
                quantity=li.quantity,
                unit_price=li.unit_price,
                discount_percent=li.discount_percent,
                tax_rate=rate,
                item_code=item_code,
                account_code=account_code,
                tax_type=tax_type,
            )
        )
    issue = deal.close_date if (pol.issue_date == "close_date" and deal.close_date) else today
    invoice = Invoice(
        reference=invoice_reference(pipeline, pipeline_name, deal.crm_id),
        currency=deal.currency,
        lines=lines,
        issue_date=issue,
        due_date=issue + dt.timedelta(days=pol.due_days),
        status=pol.status,
    )
    if deal.amount is not None and abs(invoice.subtotal - deal.amount) > pol.amount_tolerance:
        return DealProblem(
            "amount_mismatch",
            f"deal {deal.crm_id}: amount {deal.amount} {deal.currency} but lines total {invoice.subtotal}",
        )
    return invoice


def _norm_name(name: str) -> str:
    return " ".join(name.casefold().split())


def _email_domain(email: str | None) -> str | None:
    if email and "@" in email:
        return email.rsplit("@", 1)[1].lower()
    return None


class CustomerIndex:
    """The ledger's customers indexed by every key the matching policy can use."""

    def __init__(self, customers: Iterable[LedgerCustomer]) -> None:
        self.by: dict[str, dict[str, list[LedgerCustomer]]] = {
            k: defaultdict(list) for k in ("number", "vat_number", "domain", "email", "name")
        }
        for c in customers:
            self.add(c)

    def add(self, c: LedgerCustomer) -> None:
        if c.number:
            self.by["number"][c.number].append(c)
        if c.vat_number:
            self.by["vat_number"][c.vat_number.replace(" ", "").upper()].append(c)
        dom = c.domain or _email_domain(c.email)
        if dom:
            self.by["domain"][dom.lower()].append(c)
        if c.email:
            self.by["email"][c.email.lower()].append(c)
        self.by["name"][_norm_name(c.name)].append(c)

    def match(self, customer: Customer, number: str, order: Sequence[str]) -> tuple[LedgerCustomer | None, str]:
        """The unique ledger customer for ``customer`` by the first key in ``order`` that finds one."""
        keys: dict[str, str | None] = {
            "number": number,
            "vat_number": customer.vat_number,
            # Only the company's own website domain: an e-mail domain may be a shared mail provider.
            "domain": customer.domain,
            "email": customer.email.lower() if customer.email else None,
            "name": _norm_name(customer.name),
        }
        for key in order:
            if key == "link":
                continue
            value = keys.get(key)
            if not value:
                continue
            found = self.by[key].get(value.upper() if key == "vat_number" else value.lower() if key in (
                "domain",) else value, [])
            unique = {c.ledger_id: c for c in found}
            if len(unique) == 1:
                return next(iter(unique.values())), key
        return None, ""
