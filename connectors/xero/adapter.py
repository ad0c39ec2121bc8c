"""Xero as a LedgerBridge ledger: contacts, sales invoices (ACCREC), their payments and credit notes, and the
purchase lines (bills and spend money) booked to expense accounts.

Writes are batched (up to 50 invoices in one ``PUT /Invoices?summarizeErrors=false``) and carry an
``Idempotency-Key``, so a write whose answer was lost is retried with the same key and the same body and
Xero answers with what it created the first time. Invoices carry the deal's reference in ``Reference``,
the field :meth:`XeroLedger.find_invoices_by_reference` searches when an outcome is unknown. Contacts
carry the CRM's id in ``ContactNumber``. Only :mod:`connectors.errors` types leave this module.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any, ClassVar, cast

import httpx
import structlog
from pydantic import ValidationError

from config.schema import ConnectorSettings
from connectors.domain import CreditAllocation, CreditNote, Customer, ExpenseLine, Invoice, InvoiceLine, Payment
from connectors.errors import ConfigError, RecordError, VendorError
from connectors.interfaces import (
    ApiStats,
    CreateOutcome,
    InvoiceRequest,
    Ledger,
    LedgerCustomer,
    TokenStore,
)
from connectors.oauth import LockFactory
from connectors.xero import wire
from connectors.xero.client import VENDOR, XeroClient, idempotency_key, where_any
from connectors.xero.settings import XeroSettings

__all__ = ["INVOICE_URL", "XeroLedger", "contact_fields", "contact_number", "home_rate"]

log = structlog.get_logger("ledgerbridge.xero")

_STATUSES: dict[str, str] = {
    "DRAFT": "draft", "SUBMITTED": "submitted", "AUTHORISED": "authorised", "PAID": "paid",
    "VOIDED": "voided", "DELETED": "deleted",
}
_CREATABLE = {"draft", "submitted", "authorised"}
_NAME_TAKEN = "already assigned to another contact"
_CONTACT_NUMBER_MAX = 50
_CONTACT_BATCH = 50
_GONE = {"deleted", "voided"}
_APPROVED = ("AUTHORISED", "PAID")
#: Where a person opens a sales invoice in Xero's web app.
INVOICE_URL = "https://go.xero.com/AccountsReceivable/View.aspx?InvoiceID={id}"
_RATE_PLACES = Decimal("1e-10")


def contact_number(external: str) -> str:
    """The ``ContactNumber`` for an external (CRM) id: itself, or a stable shortened form over 50 chars."""
    if len(external) <= _CONTACT_NUMBER_MAX:
        return external
    digest = hashlib.sha256(external.encode()).hexdigest()[:12]
    return f"{external[:_CONTACT_NUMBER_MAX - 13]}~{digest}"


def home_rate(currency_rate: Any) -> Decimal | None:
    """Home-currency units per one unit of the document's currency, from a Xero ``CurrencyRate``.

    Xero quotes ``CurrencyRate`` as units of the document's currency per one unit of the organisation's base
    currency (an NZD organisation records a USD invoice at 0.7500 when 1 NZD buys 0.75 USD; an amount in base
    currency is the document amount divided by the rate). The spec only says "the currency rate for a
    multicurrency invoice" and "exchange rate to base currency ... e.g. 0.7500". LedgerBridge's
    ``exchange_rate`` is the other way round (what one unit of the document's currency is worth at home), so it
    is the reciprocal. A missing or non-positive rate gives None.
    """
    rate = _dec(currency_rate)
    if rate is None or not rate.is_finite() or rate <= 0:
        return None
    return (Decimal(1) / rate).quantize(_RATE_PLACES)


def contact_fields(customer: Customer) -> dict[str, Any]:
    """The contact fields LedgerBridge sends for ``customer`` (besides ``ContactNumber`` and ``Name``): e-mail,
    VAT number (``TaxNumber``), company number (SIRET, else SIREN), default currency and postal address."""
    body: dict[str, Any] = {}
    if customer.email:
        body["EmailAddress"] = customer.email
    if customer.vat_number:
        body["TaxNumber"] = customer.vat_number[:50]
    company = customer.siret or customer.siren
    if company:
        body["CompanyNumber"] = company
    if customer.currency:
        body["DefaultCurrency"] = customer.currency
    address = customer.address
    fields = {
        "AddressLine1": address.line1, "AddressLine2": address.line2, "City": address.city,
        "PostalCode": address.postal_code, "Region": address.region, "Country": address.country or customer.country,
    }
    if any(fields.values()):
        body["Addresses"] = [{"AddressType": "POBOX", **{k: v for k, v in fields.items() if v}}]
    return body


def _shape_error(what: str) -> VendorError:
    return VendorError(f"unexpected {what} in the response", vendor=VENDOR)


def _dec(value: Any) -> Decimal | None:
    if value is None or value == "":
        return None
    return value if isinstance(value, Decimal) else Decimal(str(value))


def _dec_or(value: Any, default: Decimal) -> Decimal:
    number = _dec(value)
    return default if number is None else number


class XeroLedger(Ledger):
    """The Xero ledger connector (one organisation)."""

    vendor: ClassVar[str] = "xero"
    Settings: ClassVar[type[ConnectorSettings]] = XeroSettings
    max_batch: ClassVar[int] = 50

    def __init__(
        self,
        settings: XeroSettings,
        tokens: TokenStore,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], float] = time.time,
        lock_factory: LockFactory | None = None,
        max_attempts: int = 8,
    ) -> None:
        """``transport`` (an in-process sandbox), ``sleep``/``monotonic`` (pacing and backoff) and ``clock``
        (token expiry) are for tests and the sandboxes; production uses the defaults."""
        self.settings = settings
        self.stats = ApiStats()
        self.client = XeroClient(settings, tokens, transport=transport, stats=self.stats, sleep=sleep,
                                 monotonic=monotonic, clock=clock, lock_factory=lock_factory,
                                 max_attempts=max_attempts)
        self._tax_rates: dict[str, Decimal] | None = None
        self._base_currency: str | None = None

    @classmethod
    def from_config(
        cls,
        settings: Mapping[str, Any],
        tokens: TokenStore,
        *,
        transport: httpx.BaseTransport | None = None,
        lock_factory: LockFactory | None = None,
    ) -> XeroLedger:
        """Validate the pipeline's ``ledger:`` block and build the connector."""
        try:
            parsed = XeroSettings.model_validate(dict(settings))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'ledger'}: {err['msg']}" for err in exc.errors()
            )
            raise ConfigError(f"ledger (xero): {problems}") from None
        return cls(parsed, tokens, transport=transport, lock_factory=lock_factory)

    def close(self) -> None:
        self.client.close()

    # == customers =================================================================================
    @staticmethod
    def _customer(contact: Mapping[str, Any]) -> LedgerCustomer:
        try:
            website = contact.get("Website")
            domain = None
            if isinstance(website, str) and website:
                domain = Customer(crm_id="-", name="-", domain=website).domain
            return LedgerCustomer(
                ledger_id=str(contact["ContactID"]),
                name=str(contact.get("Name") or ""),
                number=str(contact["ContactNumber"]) if contact.get("ContactNumber") else None,
                email=str(contact["EmailAddress"]) if contact.get("EmailAddress") else None,
                vat_number=str(contact["TaxNumber"]) if contact.get("TaxNumber") else None,
                domain=domain,
                company_id=str(contact["CompanyNumber"]) if contact.get("CompanyNumber") else None,
            )
        except (KeyError, ValidationError):
            raise _shape_error("contact") from None

    def list_customers(self) -> Iterator[LedgerCustomer]:
        for page in self.client.pages("/Contacts", "Contacts", params={"order": "Name ASC"}):
            for contact in page:
                if contact.get("ContactStatus", "ACTIVE") == "ACTIVE":
                    yield self._customer(contact)

    def find_customers_by_number(self, numbers: Sequence[str]) -> dict[str, LedgerCustomer]:
        wanted = {contact_number(n): n for n in numbers}
        found: dict[str, LedgerCustomer] = {}
        for _chunk, where in where_any("ContactNumber", list(wanted)):
            for page in self.client.pages("/Contacts", "Contacts", params={"where": where}):
                for contact in page:
                    customer = self._customer(contact)
                    external = wanted.get(customer.number or "")
                    if external is not None and external not in found:
                        found[external] = customer
        return found

    @staticmethod
    def _contact_body(number: str, customer: Customer, name: str) -> dict[str, Any]:
        return {"ContactNumber": contact_number(number), "Name": name, **contact_fields(customer)}

    def create_customers(
        self, customers: Sequence[tuple[str, Customer]], idempotency_key: str
    ) -> dict[str, LedgerCustomer]:
        """Create contacts (PUT /Contacts, 50 a call). A name already in use gets the number as suffix."""
        created: dict[str, LedgerCustomer] = {}
        batches = [list(customers[i : i + _CONTACT_BATCH]) for i in range(0, len(customers), _CONTACT_BATCH)]
        for index, batch in enumerate(batches):
            names = {number: (customer.name.strip() or number)[:255] for number, customer in batch}
            pending = batch
            for attempt in range(3):
                if not pending:
                    break
                suffix = "/".join(s for s in (f"b{index}" if len(batches) > 1 else "",
                                              f"n{attempt}" if attempt else "") if s) or None
                key = _key(idempotency_key, suffix)
                body = {"Contacts": [self._contact_body(n, c, names[n]) for n, c in pending]}
                data = self.client.request("PUT", "/Contacts", params={"summarizeErrors": "false"}, body=body,
                                           idempotency_key=key)
                elements = data.get("Contacts") if isinstance(data, dict) else None
                if not isinstance(elements, list) or len(elements) != len(pending):
                    raise _shape_error("contact batch")
                retry: list[tuple[str, Customer]] = []
                for (number, customer), element in zip(pending, elements, strict=True):
                    errors = _messages(element)
                    if not errors:
                        created[number] = self._customer(element)
                    elif any(_NAME_TAKEN in m for m in errors) and attempt < 2:
                        base = customer.name.strip() or number
                        tag = number if attempt == 0 else f"{number}-{attempt + 1}"
                        names[number] = f"{base[: 255 - len(tag) - 3]} ({tag})"
                        retry.append((number, customer))
                    else:
                        log.warning("xero contact rejected", number=number, errors=errors)
                pending = retry
        return created

    # == invoices ==================================================================================
    def _rates(self) -> dict[str, Decimal]:
        if self._tax_rates is None:
            data = self.client.request("GET", "/TaxRates")
            rates: dict[str, Decimal] = {}
            for rate in data.get("TaxRates") or [] if isinstance(data, dict) else []:
                if isinstance(rate, dict) and rate.get("TaxType") and rate.get("EffectiveRate") is not None:
                    rates[str(rate["TaxType"])] = cast(Decimal, _dec(rate["EffectiveRate"]))
            self._tax_rates = rates
        return self._tax_rates

    def base_currency(self) -> str:
        """The organisation's base currency (one call, then cached)."""
        if self._base_currency is None:
            data = self.client.request("GET", "/Organisation")
            orgs = data.get("Organisations") if isinstance(data, dict) else None
            if not isinstance(orgs, list) or not orgs or not isinstance(orgs[0], dict):
                raise _shape_error("organisation")
            self._base_currency = str(orgs[0].get("BaseCurrency") or "")
            if not self._base_currency:
                raise _shape_error("organisation currency")
        return self._base_currency

    def _invoice(self, data: Mapping[str, Any], sent: Invoice | None = None) -> Invoice:
        """A domain invoice from Xero's JSON. ``sent`` is the invoice just written: parsing the answer to a
        write then makes no further call (its tax rates and currency come from what was sent)."""
        try:
            fallback = sent.currency if sent is not None else None
            currency = str(data.get("CurrencyCode") or fallback or self.base_currency())
            known = {ln.tax_type: ln.tax_rate for ln in sent.lines if ln.tax_type} if sent is not None else None
            lines: list[InvoiceLine] = []
            for raw in data.get("LineItems") or []:
                tax_type = str(raw["TaxType"]) if raw.get("TaxType") else None
                rate: Decimal | None = Decimal(0)
                if tax_type and known is not None:
                    rate = known.get(tax_type)
                elif tax_type:
                    rate = self._rates().get(tax_type)
                if rate is None:  # an unknown tax type: the rate the amounts imply
                    amount = _dec(raw.get("LineAmount")) or Decimal(0)
                    tax = _dec(raw.get("TaxAmount")) or Decimal(0)
                    rate = (tax * 100 / amount).quantize(Decimal("0.01")) if amount else Decimal(0)
                lines.append(InvoiceLine(
                    description=str(raw.get("Description") or ""),
                    quantity=_dec_or(raw.get("Quantity"), Decimal(1)),
                    unit_price=_dec_or(raw.get("UnitAmount"), Decimal(0)),
                    discount_percent=_dec_or(raw.get("DiscountRate"), Decimal(0)),
                    tax_rate=rate,
                    item_code=str(raw["ItemCode"]) if raw.get("ItemCode") else None,
                    account_code=str(raw["AccountCode"]) if raw.get("AccountCode") else None,
                    tax_type=tax_type,
                ))
            issue = wire.parse_date(data.get("Date")) or wire.parse_date(data.get("DateString"))
            updated = wire.parse_datetime(data.get("UpdatedDateUTC"))
            if issue is None:
                issue = updated.date() if updated else None
            if issue is None:
                raise _shape_error("invoice date")
            contact = data.get("Contact") or {}
            return Invoice(
                reference=str(data.get("Reference") or ""),
                currency=currency,
                lines=lines,
                issue_date=issue,
                due_date=wire.parse_date(data.get("DueDate")),
                status=_STATUSES.get(str(data.get("Status") or "").upper(), "authorised"),
                number=str(data["InvoiceNumber"]) if data.get("InvoiceNumber") else None,
                ledger_id=str(data["InvoiceID"]),
                customer_ledger_id=str(contact["ContactID"]) if contact.get("ContactID") else None,
                amount_paid=_dec(data.get("AmountPaid")),
                amount_due=_dec(data.get("AmountDue")),
                updated_at=updated,
                ledger_total=_dec(data.get("Total")),
                exchange_rate=home_rate(data.get("CurrencyRate")),
            )
        except (KeyError, TypeError, AttributeError, ArithmeticError, ValidationError):
            raise _shape_error("invoice") from None

    @staticmethod
    def _invoice_body(request: InvoiceRequest) -> dict[str, Any]:
        inv = request.invoice
        lines: list[dict[str, Any]] = []
        for line in inv.lines:
            body: dict[str, Any] = {
                "Description": line.description,
                "Quantity": line.quantity,
                "UnitAmount": line.unit_price,
            }
            if line.discount_percent:
                body["DiscountRate"] = line.discount_percent
            if line.item_code:
                body["ItemCode"] = line.item_code
            if line.account_code:
                body["AccountCode"] = line.account_code
            if line.tax_type:
                body["TaxType"] = line.tax_type
            lines.append(body)
        out: dict[str, Any] = {
            "Type": "ACCREC",
            "Contact": {"ContactID": request.customer_ledger_id},
            "Date": inv.issue_date.isoformat(),
            "LineAmountTypes": "Exclusive",
            "Reference": inv.reference,
            "Status": inv.status.upper(),
            "CurrencyCode": inv.currency,
            "LineItems": lines,
        }
        if inv.due_date:
            out["DueDate"] = inv.due_date.isoformat()
        if inv.number:
            out["InvoiceNumber"] = inv.number
        return out

    def create_invoices(self, requests: Sequence[InvoiceRequest], idempotency_key: str) -> list[CreateOutcome]:
        """One ``PUT /Invoices`` for up to 50 invoices; outcomes in the order of ``requests``."""
        if len(requests) > self.max_batch:
            raise ValueError(f"at most {self.max_batch} invoices per call")
        outcomes: dict[int, CreateOutcome] = {}
        sendable: list[tuple[int, InvoiceRequest]] = []
        for i, req in enumerate(requests):
            if req.invoice.status not in _CREATABLE:
                outcomes[i] = CreateOutcome(req.idempotency_key, False,
                                            error=f"cannot create an invoice with status {req.invoice.status}")
            else:
                sendable.append((i, req))
        if sendable:
            body = {"Invoices": [self._invoice_body(r) for _, r in sendable]}
            try:
                data = self.client.request("PUT", "/Invoices", params={"summarizeErrors": "false", "unitdp": 4},
                                           body=body, idempotency_key=_key(idempotency_key))
            except RecordError as exc:
                # The whole batch was refused before anything was created: a definitive failure per invoice.
                for i, req in sendable:
                    outcomes[i] = CreateOutcome(req.idempotency_key, False, error=exc.detail)
                data = None
            if data is not None:
                outcomes.update(self._match_outcomes(sendable, data))
        return [outcomes[i] for i in range(len(requests))]

    def _match_outcomes(self, sent: list[tuple[int, InvoiceRequest]], data: Any) -> dict[int, CreateOutcome]:
        elements = data.get("Invoices") if isinstance(data, dict) else None
        if not isinstance(elements, list) or not all(isinstance(e, dict) for e in elements):
            raise _shape_error("invoice batch")
        by_reference: dict[str, deque[int]] = defaultdict(deque)
        for index, element in enumerate(elements):
            by_reference[str(element.get("Reference") or "")].append(index)
        used: set[int] = set()
        out: dict[int, CreateOutcome] = {}
        for order, (i, req) in enumerate(sent):
            queue = by_reference.get(req.invoice.reference)
            pos: int | None = queue.popleft() if queue else None
            if pos is None and order < len(elements) and order not in used:
                pos = order  # Xero keeps the order of the batch
            if pos is None or pos in used:
                out[i] = CreateOutcome(req.idempotency_key, False, error="no result returned for this invoice")
                continue
            used.add(pos)
            element = elements[pos]
            errors = _messages(element)
            if errors:
                out[i] = CreateOutcome(req.idempotency_key, False, error="; ".join(errors))
            else:
                out[i] = CreateOutcome(req.idempotency_key, True, invoice=self._invoice(element, req.invoice))
        return out

    def find_invoices_by_reference(self, references: Sequence[str]) -> dict[str, Invoice]:
        found: dict[str, Invoice] = {}
        for _chunk, where in where_any("Reference", references, prefix='Type=="ACCREC" AND '):
            for page in self.client.pages("/Invoices", "Invoices", params={"where": where, "unitdp": 4}):
                for element in page:
                    invoice = self._invoice(element)
                    current = found.get(invoice.reference)
                    if current is None or (current.status in _GONE and invoice.status not in _GONE):
                        found[invoice.reference] = invoice
                    elif invoice.status not in _GONE:
                        log.warning("xero holds several invoices with one reference", reference=invoice.reference)
        return {ref: inv for ref, inv in found.items() if ref in set(references)}

    def list_invoices(self, modified_since: dt.datetime | None = None) -> Iterator[Invoice]:
        # unitdp=4: unit prices come back as sent (up to four decimals), not rounded to two.
        params = {"where": 'Type=="ACCREC"', "order": "UpdatedDateUTC ASC", "unitdp": 4}
        for page in self.client.pages("/Invoices", "Invoices", params=params, modified_since=modified_since):
            for element in page:
                yield self._invoice(element)

    def invoice_url(self, invoice: Invoice) -> str | None:
        """The invoice's page in Xero's web app (``go.xero.com``), for an invoice read from Xero."""
        return INVOICE_URL.format(id=invoice.ledger_id) if invoice.ledger_id else None

    # == payments ==================================================================================
    def list_payments(self, modified_since: dt.datetime | None = None) -> Iterator[Payment]:
        params = {"where": 'PaymentType=="ACCRECPAYMENT"', "order": "UpdatedDateUTC ASC"}
        for page in self.client.pages("/Payments", "Payments", params=params, modified_since=modified_since):
            for element in page:
                payment = self._payment(element, self.base_currency)
                if payment is not None:
                    yield payment

    @staticmethod
    def _payment(data: Mapping[str, Any], base_currency: Callable[[], str]) -> Payment | None:
        try:
            invoice = data.get("Invoice") or {}
            if not invoice.get("InvoiceID") or invoice.get("Type", "ACCREC") != "ACCREC":
                return None
            day = wire.parse_date(data.get("Date"))
            if day is None:
                raise _shape_error("payment date")
            return Payment(
                ledger_id=str(data["PaymentID"]),
                invoice_ledger_id=str(invoice["InvoiceID"]),
                amount=cast(Decimal, _dec(data["Amount"])),
                currency=str(invoice.get("CurrencyCode") or base_currency()),
                date=day,
                status=str(data.get("Status") or "AUTHORISED").lower(),
                updated_at=wire.parse_datetime(data.get("UpdatedDateUTC")),
            )
        except (KeyError, TypeError, AttributeError, ArithmeticError, ValidationError):
            raise _shape_error("payment") from None


    # == credit notes ==============================================================================
    def list_credit_notes(self, modified_since: dt.datetime | None = None) -> Iterator[CreditNote]:
        """Sales credit notes (``ACCRECCREDIT``) changed since ``modified_since``, with their allocations."""
        params = {"where": 'Type=="ACCRECCREDIT"', "order": "UpdatedDateUTC ASC"}
        for page in self.client.pages("/CreditNotes", "CreditNotes", params=params, modified_since=modified_since):
            for element in page:
                if str(element.get("Type") or "ACCRECCREDIT").upper() == "ACCRECCREDIT":
                    yield self._credit_note(element)

    def _credit_note(self, data: Mapping[str, Any]) -> CreditNote:
        try:
            day = wire.parse_date(data.get("Date")) or wire.parse_date(data.get("DateString"))
            if day is None:
                raise _shape_error("credit note date")
            allocations: list[CreditAllocation] = []
            for raw in data.get("Allocations") or []:
                invoice = raw.get("Invoice") or {}
                applied = wire.parse_date(raw.get("Date"))
                if raw.get("IsDeleted") or not invoice.get("InvoiceID"):
                    continue
                if applied is None:
                    raise _shape_error("allocation date")
                allocations.append(CreditAllocation(invoice_ledger_id=str(invoice["InvoiceID"]),
                                                    amount=cast(Decimal, _dec(raw["Amount"])), date=applied))
            contact = data.get("Contact") or {}
            subtotal = _dec(data.get("SubTotal"))
            total = _dec(data.get("Total"))
            if total is None:
                raise _shape_error("credit note total")
            return CreditNote(
                ledger_id=str(data["CreditNoteID"]),
                number=str(data["CreditNoteNumber"]) if data.get("CreditNoteNumber") else None,
                customer_ledger_id=str(contact["ContactID"]) if contact.get("ContactID") else None,
                currency=str(data.get("CurrencyCode") or self.base_currency()),
                issue_date=day,
                status=_STATUSES.get(str(data.get("Status") or "").upper(), "authorised"),
                subtotal=total - (_dec(data.get("TotalTax")) or Decimal(0)) if subtotal is None else subtotal,
                total=total,
                remaining=_dec_or(data.get("RemainingCredit"), Decimal(0)),
                allocations=allocations,
                exchange_rate=home_rate(data.get("CurrencyRate")),
                updated_at=wire.parse_datetime(data.get("UpdatedDateUTC")),
            )
        except (KeyError, TypeError, AttributeError, ArithmeticError, ValidationError):
            raise _shape_error("credit note") from None

    # == expenses ==================================================================================
    def list_expenses(self, account_codes: Sequence[str], start: dt.date, end: dt.date) -> Iterator[ExpenseLine]:
        """Lines booked to ``account_codes`` of approved bills (``ACCPAY`` invoices, authorised or paid) and of
        spend-money bank transactions, dated within ``[start, end]``; amounts before tax."""
        codes = set(account_codes)
        if not codes or end < start:
            return
        dated = (f"Date >= DateTime({start.year}, {start.month:02d}, {start.day:02d}) AND "
                 f"Date <= DateTime({end.year}, {end.month:02d}, {end.day:02d})")
        approved = " OR ".join(f'Status=="{status}"' for status in _APPROVED)
        bills = {"where": f'Type=="ACCPAY" AND ({approved}) AND {dated}', "order": "Date ASC", "unitdp": 4}
        for page in self.client.pages("/Invoices", "Invoices", params=bills):
            for element in page:
                if element.get("Type") == "ACCPAY" and element.get("Status") in _APPROVED:
                    yield from self._expense_lines(element, "InvoiceID", codes, start, end)
        spends = {"where": f'Type=="SPEND" AND Status=="AUTHORISED" AND {dated}', "order": "Date ASC"}
        for page in self.client.pages("/BankTransactions", "BankTransactions", params=spends):
            for element in page:
                if element.get("Type") == "SPEND" and element.get("Status") == "AUTHORISED":
                    yield from self._expense_lines(element, "BankTransactionID", codes, start, end)

    def _expense_lines(self, data: Mapping[str, Any], id_field: str, codes: set[str], start: dt.date,
                       end: dt.date) -> Iterator[ExpenseLine]:
        try:
            day = wire.parse_date(data.get("Date")) or wire.parse_date(data.get("DateString"))
            if day is None:
                raise _shape_error("purchase date")
            if not start <= day <= end:
                return
            document = str(data[id_field])
            currency = str(data.get("CurrencyCode") or self.base_currency())
            inclusive = str(data.get("LineAmountTypes") or "Exclusive") == "Inclusive"
            rate = home_rate(data.get("CurrencyRate"))
            for index, raw in enumerate(data.get("LineItems") or []):
                code = str(raw.get("AccountCode") or "")
                if code not in codes:
                    continue
                amount = _dec_or(raw.get("LineAmount"), Decimal(0))
                if inclusive:  # the line amount includes the tax: the net is what is left without it
                    amount -= _dec_or(raw.get("TaxAmount"), Decimal(0))
                yield ExpenseLine(
                    ledger_id=f"{document}:{raw.get('LineItemID') or index}",
                    account_code=code,
                    date=day,
                    net=amount,
                    currency=currency,
                    exchange_rate=rate,
                    description=str(raw["Description"]) if raw.get("Description") else None,
                )
        except (KeyError, TypeError, AttributeError, ArithmeticError, ValidationError):
            raise _shape_error("purchase") from None


def _key(key: str, suffix: str | None = None) -> str:
    return idempotency_key(key, suffix)


def _messages(element: Mapping[str, Any]) -> list[str]:
    errors = element.get("ValidationErrors") or []
    messages = [str(e.get("Message")) for e in errors if isinstance(e, dict) and e.get("Message")]
    failed = element.get("HasErrors") or element.get("HasValidationErrors")
    if not messages and (failed or element.get("StatusAttributeString") == "ERROR"):
        messages = ["rejected by Xero"]
    return messages

