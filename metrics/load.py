"""From the state store (and the spend sources) to :class:`~metrics.facts.Facts`, in one home currency.

Definitions applied here, once, for every metric:

- An invoice counts from its issue date when the ledger has it as submitted, authorised or paid; drafts
  (not yet issued), voided and deleted invoices are not facts.
- Amounts are converted to the home currency at the rate the ledger recorded on the document. Without one,
  at ``metrics.fx_rates`` from the config, else at the most recent rate the ledger recorded on any
  document in that currency; a currency with no rate at all is an error naming it and a document.
  Payments and credits are converted at their invoice's rate (realised exchange differences are not
  revenue, and are left out).
- A credit note nets against the invoices it is allocated to (at the allocation's date); what is not
  allocated reduces the customer's revenue at the credit note's date.
- A ledger customer linked to a CRM customer (by the sync) is that CRM customer; others are
  ``ledger:<contact id>``.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path

from config.schema import MetricsConfig
from connectors.domain import ExpenseLine, round_money
from connectors.errors import ConfigError
from metrics.facts import (
    ActivityFact,
    CreditFact,
    CustomerFact,
    DealFact,
    Facts,
    InvoiceFact,
    PaymentFact,
    SpendFact,
)
from sync.factstore import FactStore, LedgerInvoiceRow
from sync.state import StateStore

__all__ = ["Rates", "expense_spend", "load_facts", "read_spend_csv"]

_COUNTED = ("submitted", "authorised", "paid")
_PAID_PAYMENT = ("authorised", "paid", "")
_SPEND_COLUMNS = ("date", "channel", "campaign", "amount", "currency")


class Rates:
    """Home-currency units per unit of a currency: configured rates first, then the ledger's latest."""

    def __init__(self, home: str, configured: Mapping[str, Decimal], invoices: Iterable[LedgerInvoiceRow] = ()):
        self.home = home
        self.configured = dict(configured)
        latest: dict[str, tuple[dt.date, Decimal]] = {}
        for inv in invoices:
            if inv.exchange_rate is not None and inv.currency != home:
                seen = latest.get(inv.currency)
                if seen is None or inv.issue_date >= seen[0]:
                    latest[inv.currency] = (inv.issue_date, inv.exchange_rate)
        self.ledger_latest = {c: r for c, (_, r) in latest.items()}

    def rate(self, currency: str, document_rate: Decimal | None = None, *, where: str) -> Decimal:
        if currency == self.home:
            return Decimal(1)
        if document_rate is not None:
            return document_rate
        if currency in self.configured:
            return self.configured[currency]
        if currency in self.ledger_latest:
            return self.ledger_latest[currency]
        raise ConfigError(
            f"no exchange rate from {currency} to {self.home} for {where}: the ledger records none; add "
            f"metrics.fx_rates.{currency} to the pipeline"
        )

    def convert(self, amount: Decimal, currency: str, document_rate: Decimal | None = None, *,
                where: str) -> Decimal:
        return round_money(amount * self.rate(currency, document_rate, where=where), self.home)


def load_facts(
    store: StateStore,
    pipeline: str,
    config: MetricsConfig,
    *,
    as_of: dt.date,
    home_currency: str,
    spend: Sequence[SpendFact] = (),
    activities: Sequence[ActivityFact] = (),
) -> Facts:
    """The pipeline's facts as of ``as_of`` (documents dated later are left out)."""
    facts = FactStore(store)
    customer_of_contact = {lk.ledger_id: crm_id for crm_id, lk in store.links(pipeline, "customer").items()}
    deal_of_invoice = {lk.ledger_id: crm_id for crm_id, lk in store.links(pipeline, "deal").items()}
    inv_rows = facts.ledger_invoices(pipeline)
    rates = Rates(home_currency, config.fx_rates, inv_rows)
    home = home_currency

    def customer(contact: str | None) -> str:
        if contact is None:
            return "ledger:unknown"
        return customer_of_contact.get(contact) or f"ledger:{contact}"

    invoices: list[InvoiceFact] = []
    by_id: dict[str, tuple[LedgerInvoiceRow, Decimal]] = {}
    for row in inv_rows:
        if row.status not in _COUNTED or row.issue_date > as_of:
            continue
        where = f"invoice {row.number or row.ledger_id}"
        rate = rates.rate(row.currency, row.exchange_rate, where=where)
        by_id[row.ledger_id] = (row, rate)
    credits: list[CreditFact] = []
    credited_gross: dict[str, Decimal] = {}
    for cn in facts.ledger_credit_notes(pipeline):
        if cn.status not in _COUNTED or cn.issue_date > as_of or cn.total == 0:
            continue
        where = f"credit note {cn.number or cn.ledger_id}"
        rate = rates.rate(cn.currency, cn.exchange_rate, where=where)
        net_share = cn.subtotal / cn.total
        allocated = Decimal(0)
        for a in cn.allocations:
            inv_id = str(a["invoice_ledger_id"])
            day = dt.date.fromisoformat(str(a["date"]))
            amount = Decimal(str(a["amount"]))
            if day > as_of:
                continue
            allocated += amount
            target = by_id.get(inv_id)
            inv_rate = target[1] if target is not None else rate
            gross = round_money(amount * inv_rate, home)
            credits.append(CreditFact(ledger_id=f"{cn.ledger_id}:{inv_id}", customer_id=customer(cn.customer_ledger_id),
                                      date=day, net=round_money(amount * net_share * inv_rate, home), gross=gross,
                                      invoice_id=inv_id if target is not None else None))
            if target is not None:
                credited_gross[inv_id] = credited_gross.get(inv_id, Decimal(0)) + gross
        rest = cn.total - allocated
        if rest > 0:
            credits.append(CreditFact(ledger_id=cn.ledger_id, customer_id=customer(cn.customer_ledger_id),
                                      date=cn.issue_date, net=round_money(rest * net_share * rate, home),
                                      gross=round_money(rest * rate, home)))
    payments: list[PaymentFact] = []
    paid_gross: dict[str, Decimal] = {}
    for p in facts.ledger_payments(pipeline):
        target = by_id.get(p.invoice_ledger_id)
        if target is None or p.status not in _PAID_PAYMENT or p.date > as_of:
            continue
        inv, rate = target
        amount = round_money(p.amount * rate, home)
        payments.append(PaymentFact(ledger_id=p.ledger_id, invoice_id=p.invoice_ledger_id,
                                    customer_id=customer(inv.customer_ledger_id), date=p.date, amount=amount))
        paid_gross[p.invoice_ledger_id] = paid_gross.get(p.invoice_ledger_id, Decimal(0)) + amount
    for inv_id, (row, rate) in by_id.items():
        gross = round_money(row.total * rate, home)
        # The balance as of `as_of`, from the payments and credits dated up to then (the ledger's own
        # amount_due is today's, which a past as_of must not see).
        balance = max(gross - paid_gross.get(inv_id, Decimal(0)) - credited_gross.get(inv_id, Decimal(0)),
                      Decimal(0))
        invoices.append(InvoiceFact(
            ledger_id=inv_id, customer_id=customer(row.customer_ledger_id), issue_date=row.issue_date,
            due_date=row.due_date or row.issue_date, net=round_money(row.subtotal * rate, home), gross=gross,
            balance=balance, status="paid" if balance == 0 else "authorised",  # as of as_of
            deal_id=deal_of_invoice.get(inv_id), number=row.number, currency=row.currency,
        ))
    deals = []
    for d in facts.crm_deals(pipeline):
        if d.archived:
            continue
        deal_amount: Decimal | None = None
        if d.amount is not None:
            deal_amount = rates.convert(d.amount, d.currency, where=f"deal {d.deal_id}")
        deals.append(DealFact(
            deal_id=d.deal_id, customer_id=d.customer_id, amount=deal_amount, stage=d.stage, probability=d.probability,
            is_won=d.is_won, is_closed=d.is_closed, close_date=d.close_date,
            created_date=d.created_at.date() if d.created_at else None, acquisition_source=d.acquisition_source,
            owner=d.owner,
        ))
    customers = [CustomerFact(customer_id=c.customer_id, name=c.name, acquisition_source=c.acquisition_source,
                              created_date=c.created_at.date() if c.created_at else None)
                 for c in facts.crm_customers(pipeline)]
    return Facts(as_of=as_of, currency=home, invoices=invoices, payments=payments, credits=credits, deals=deals,
                 customers=customers, spend=list(spend), activities=list(activities),
                 activity_costs=dict(config.activity_costs))


def read_spend_csv(path: Path, rates: Rates, overhead_channels: Sequence[str]) -> list[SpendFact]:
    """Spend rows of a CSV (header: date, channel, campaign, amount, currency), converted to home currency.

    A bad row is a :class:`ConfigError` naming the file, the line and the column.
    """
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the spend CSV ({exc.strerror})") from None
    out: list[SpendFact] = []
    with handle:
        reader = csv.DictReader(handle)
        header = [h.strip().lower() for h in reader.fieldnames or []]
        missing = [c for c in _SPEND_COLUMNS if c not in header]
        if missing:
            raise ConfigError(f"{path}:1: the spend CSV lacks the column(s) {', '.join(missing)} "
                              f"(expected {', '.join(_SPEND_COLUMNS)})")
        for raw in reader:
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
            line = reader.line_num
            try:
                day = dt.date.fromisoformat(row["date"])
            except ValueError:
                raise ConfigError(f"{path}:{line}: date {row['date']!r} is not YYYY-MM-DD") from None
            try:
                amount = Decimal(row["amount"])
                if not amount.is_finite():
                    raise InvalidOperation
            except InvalidOperation:
                raise ConfigError(f"{path}:{line}: amount {row['amount']!r} is not a number") from None
            currency = row["currency"].upper() or rates.home
            if len(currency) != 3 or not currency.isalpha():
                raise ConfigError(f"{path}:{line}: currency {row['currency']!r} is not an ISO-4217 code")
            channel = row["channel"]
            if not channel:
                raise ConfigError(f"{path}:{line}: channel is empty")
            out.append(SpendFact(date=day, channel=channel, campaign=row["campaign"] or None,
                                 amount=rates.convert(amount, currency, where=f"{path}:{line}"),
                                 kind="overhead" if channel in overhead_channels else "paid"))
    return out


def expense_spend(lines: Iterable[ExpenseLine], mapping: Mapping[str, str], rates: Rates,
                  overhead_channels: Sequence[str]) -> list[SpendFact]:
    """Ledger expense lines as spend of the channel their account is mapped to."""
    out = []
    for ln in lines:
        channel = mapping.get(ln.account_code)
        if channel is None:
            continue
        out.append(SpendFact(date=ln.date, channel=channel, campaign=f"account {ln.account_code}",
                             amount=rates.convert(ln.net, ln.currency, ln.exchange_rate,
                                                  where=f"expense {ln.ledger_id}"),
                             kind="overhead" if channel in overhead_channels else "paid"))
    return out
