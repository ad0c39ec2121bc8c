"""Pennylane as a LedgerBridge ledger: company customers, customer invoices, their payments and credit notes, and
expense lines (API v2).

Pennylane's create endpoints take no idempotency key, so exactly-once rests on ``external_reference``:

- every invoice carries the deal's deterministic reference in ``external_reference``, and every customer
  the CRM's external number;
- before an invoice is created, its reference is looked up (``filter`` on ``external_reference`` with
  ``eq``, the only operator the API allows on that field, so one lookup per reference); an invoice found is
  adopted and nothing is sent;
- a create is sent once. When its answer is lost (dropped connection, timeout, 5xx) the client raises
  :class:`~connectors.errors.AmbiguousWriteError` and nothing is re-sent. The lookup may lag behind the write,
  so a lookup that finds nothing right after such a create proves nothing: the class declares
  ``idempotent_creates = False`` and ``lookup_settle_s`` (from the settings) so that the engine keeps the
  intent pending, creates nothing for it, and looks again on a later run;
- a customer's ``external_reference`` is unique in Pennylane (a second create answers 409): customers are
  looked up by it (``in``, batched) before they are created, and a 409 is resolved by a lookup.

Invoice lines are written by label (``label``, ``raw_currency_unit_price``, ``unit``, ``vat_rate``,
``quantity``, a relative ``discount``); the line's ``tax_type`` is the Pennylane VAT code (``FR_200``...),
or is derived from its rate. ``item_code`` and ``account_code`` are not sent (Pennylane's products and ledger
accounts are referenced by their numeric ids). Invoice status ``draft`` creates a draft (``draft: true``);
``submitted`` and ``authorised`` create a finalized invoice (``draft: false``).

Reads: ``GET /customer_invoices`` returns ``invoice_lines`` as a link; lines come from the experimental
``include=invoice_lines`` (up to 20 per invoice) or from the ``invoice_lines`` sub-resource. Changes since a
date come from ``GET /changelogs/customer_invoices`` (4 weeks of retention; older or no date: the full list).
Payments come from ``GET /customer_invoices/{id}/payments`` of the invoices that changed and show a payment
(the v2 API has no company-wide list of customer invoice payments). An invoice marked paid by hand
(``mark_as_paid``) has no payment record; its status says ``paid``.

Ledger facts for the metrics: a credit note is a customer invoice with negative amounts (``credit_note``
filter) that names the invoice it credits (``credited_invoice``); :meth:`PennylaneLedger.list_credit_notes`
returns its amounts as positive numbers and its allocation to that invoice. An invoice cancelled by a credit note
of all of it reads back settled (``paid``, nothing due) and the credit note takes it back, as in Xero and
QuickBooks. Expense lines come from the general ledger (``GET /ledger_entry_lines`` on the ledger accounts of
the asked numbers): a supplier invoice line does not name its ledger account in the API, its ledger entry does.
The books are in euros; ``exchange_rate`` converts a document to euros (read as euros per unit, checked against
the document's two totals: :func:`home_rate`). An invoice has no lasting address in the API (its PDF link
expires after 30 minutes), so :meth:`PennylaneLedger.invoice_url` gives none.

Only :mod:`connectors.errors` types leave this module.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, ClassVar

import httpx
import structlog
from pydantic import ValidationError

from config.schema import ConnectorSettings
from connectors.domain import (
    CreditAllocation,
    CreditNote,
    Customer,
    ExpenseLine,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    Payment,
)
from connectors.errors import AmbiguousWriteError, ConfigError, RecordError, VendorError
from connectors.interfaces import (
    ApiStats,
    CreateOutcome,
    InvoiceRequest,
    Ledger,
    LedgerCustomer,
    TokenStore,
)
from connectors.oauth import LockFactory
from connectors.pennylane.client import VENDOR, PennylaneClient, filter_param, money
from connectors.pennylane.settings import PennylaneSettings

__all__ = ["VAT_CODES", "PennylaneLedger", "customer_body", "home_rate", "rate_of_vat_code", "vat_code_for"]

log = structlog.get_logger("ledgerbridge.pennylane")

#: French VAT rates (percent) and their Pennylane codes, for lines that carry a rate but no tax type.
VAT_CODES: dict[Decimal, str] = {
    Decimal("20"): "FR_200", Decimal("10"): "FR_100", Decimal("5.5"): "FR_55", Decimal("2.1"): "FR_21",
    Decimal("0"): "exempt",
}
_CREATABLE = {"draft", "submitted", "authorised"}
_GONE = {"voided", "deleted"}
_CHANGELOG_RETENTION = dt.timedelta(weeks=4)
_RETENTION_MARGIN = dt.timedelta(hours=1)
_IN_CHUNK = 50
_IN_BUDGET = 1500  # characters of one JSON filter value, to keep URLs short
_SIX = Decimal("0.000001")
_RATE_PLACES = Decimal("1e-10")
_RATE_SLACK = Decimal("0.00001")  # relative: a rate kept to six decimals
_CODE = re.compile(r"^[A-Z]{2}_(\d+)(?:_(\d+))?$")
_PAID_STATUSES = {"found", "confirmed", "paid_out", "emitted"}
_FAILED_STATUSES = {"aborted", "cancelled", "error", "failed", "refunded", "charged_back", "not_found",
                    "customer_approval_denied"}


def vat_code_for(line: InvoiceLine) -> str | None:
    """The ``vat_rate`` code of a line: its tax type, else the code of its rate (None when there is none)."""
    if line.tax_type:
        return line.tax_type
    return VAT_CODES.get(line.tax_rate.normalize()) or VAT_CODES.get(line.tax_rate)


def rate_of_vat_code(code: str | None) -> Decimal | None:
    """The rate (percent) a code stands for: ``FR_200`` 20, ``FR_55`` 5.5, ``FR_1_05`` 1.05, ``exempt`` 0."""
    if not code:
        return None
    if code in ("exempt", "extracom", "crossborder"):
        return Decimal(0)
    m = _CODE.match(code)
    if m is None:
        return None
    if m.group(2) is not None:
        return Decimal(f"{int(m.group(1))}.{m.group(2)}")
    return Decimal(m.group(1)) / 10


def customer_body(customer: Customer, number: str | None = None) -> dict[str, Any]:
    """The ``POST /company_customers`` body for ``customer``; ``number`` (the external number) is its
    ``external_reference`` (without one, Pennylane makes one up)."""
    address = customer.address
    street = ", ".join(p for p in (address.line1, address.line2) if p)
    body: dict[str, Any] = {"name": (customer.name.strip() or number or customer.crm_id)[:255]}
    if number:
        body["external_reference"] = number
    body["billing_address"] = {
        "address": street,
        "postal_code": address.postal_code or "",
        "city": address.city or "",
        "country_alpha2": (address.country or customer.country or "FR").upper()[:2],
    }
    if customer.vat_number:
        body["vat_number"] = customer.vat_number
    reg_no = customer.siren or (customer.siret[:9] if customer.siret else None)
    if reg_no:
        body["reg_no"] = reg_no
    if customer.email:
        body["emails"] = [customer.email]
    return body


def _shape_error(what: str) -> VendorError:
    return VendorError(f"unexpected {what} in the response", vendor=VENDOR)


def _dec(value: Any) -> Decimal | None:
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        number = value if isinstance(value, Decimal) else Decimal(str(value))
    except InvalidOperation:
        raise _shape_error("amount") from None
    if not number.is_finite():
        raise _shape_error("amount")
    return number


def _rate(value: Any) -> Decimal | None:
    """``exchange_rate`` (euros for one unit of the document's currency); None when absent or not positive."""
    rate = _dec(value)
    return rate if rate is not None and rate > 0 else None


def home_rate(document: Mapping[str, Any]) -> Decimal | None:
    """Euros for one unit of a customer invoice's or credit note's currency; None without a usable rate.

    The API describes ``exchange_rate`` only as the rate "used to convert the invoice to euros", which leaves its
    direction open. It is read as euros per unit (euro amount = currency amount x rate), as the field's wording
    suggests. The document also states both totals, ``amount`` in euros and ``currency_amount`` in its own
    currency: when they contradict that reading and agree with the other one (euro amount = currency amount /
    rate), the rate is turned round, so a foreign document is never counted at the inverse of its rate.
    """
    rate = _rate(document.get("exchange_rate"))
    if rate is None or rate == 1:
        return rate
    euros = _dec(document.get("amount"))
    units = _dec(document.get("currency_amount"))
    if euros is None or not units:
        return rate
    slack = Decimal("0.01") + abs(euros) * _RATE_SLACK  # the euro total is rounded to the cent
    if abs(units * rate - euros) > slack and abs(units / rate - euros) <= slack:
        return (Decimal(1) / rate).quantize(_RATE_PLACES)
    return rate


def _parse_dt(value: Any) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _parse_date(value: Any) -> dt.date | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return dt.date.fromisoformat(value[:10])
    except ValueError:
        return None


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _in_chunks(values: Sequence[str]) -> Iterator[list[str]]:
    """``values`` in groups that fit one ``in`` filter (at most 50, and a short URL)."""
    chunk: list[str] = []
    size = 0
    for value in values:
        if chunk and (len(chunk) >= _IN_CHUNK or size + len(value) + 4 > _IN_BUDGET):
            yield chunk
            chunk, size = [], 0
        chunk.append(value)
        size += len(value) + 4
    if chunk:
        yield chunk


class PennylaneLedger(Ledger):
    """The Pennylane ledger connector (one company)."""

    vendor: ClassVar[str] = "pennylane"
    Settings: ClassVar[type[ConnectorSettings]] = PennylaneSettings
    #: One create call per invoice: a small batch keeps each engine commit short.
    max_batch: ClassVar[int] = 10
    idempotent_creates: ClassVar[bool] = False
    lookup_settle_s: ClassVar[float] = 120.0

    def __init__(
        self,
        settings: PennylaneSettings,
        tokens: TokenStore,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], float] = time.time,
        lock_factory: LockFactory | None = None,
    ) -> None:
        """``transport`` (an in-process sandbox), ``sleep``/``monotonic`` (pacing and backoff) and ``clock``
        (token expiry, rate-limit resets, changelog retention) are for tests and the sandboxes."""
        self.settings = settings
        self.stats = ApiStats()
        self._clock = clock
        self.client = PennylaneClient(settings, tokens, transport=transport, stats=self.stats, sleep=sleep,
                                      monotonic=monotonic, clock=clock, lock_factory=lock_factory)
        # The engine reads the settle time from the instance: the configured one, on the client's timeline.
        setattr(self, "lookup_settle_s", settings.lookup_settle_s / settings.time_scale)  # noqa: B010

    @classmethod
    def from_config(
        cls,
        settings: Mapping[str, Any],
        tokens: TokenStore,
        *,
        transport: httpx.BaseTransport | None = None,
        lock_factory: LockFactory | None = None,
    ) -> PennylaneLedger:
        """Validate the pipeline's ``ledger:`` block and build the connector."""
        try:
            parsed = PennylaneSettings.model_validate(dict(settings))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'ledger'}: {err['msg']}" for err in exc.errors()
            )
            raise ConfigError(f"ledger (pennylane): {problems}") from None
        return cls(parsed, tokens, transport=transport, lock_factory=lock_factory)

    def close(self) -> None:
        self.client.close()

    # == customers =================================================================================
    @staticmethod
    def _customer(data: Mapping[str, Any]) -> LedgerCustomer:
        try:
            emails = [e for e in data.get("emails") or [] if isinstance(e, str) and e]
            return LedgerCustomer(
                ledger_id=str(data["id"]),
                name=str(data.get("name") or ""),
                number=str(data["external_reference"]) if data.get("external_reference") else None,
                email=emails[0] if emails else None,
                vat_number=str(data["vat_number"]) if data.get("vat_number") else None,
                company_id=str(data["reg_no"]) if data.get("reg_no") else None,
            )
        except (KeyError, TypeError, AttributeError):
            raise _shape_error("customer") from None

    def list_customers(self) -> Iterator[LedgerCustomer]:
        """Company and individual customers (``GET /customers``), oldest first."""
        for page in self.client.pages("/customers", {"sort": "id"}):
            for raw in page:
                yield self._customer(raw)

    def find_customers_by_number(self, numbers: Sequence[str]) -> dict[str, LedgerCustomer]:
        """Customers whose ``external_reference`` is one of ``numbers`` (``in`` filters, 50 a call)."""
        wanted = list(dict.fromkeys(n for n in numbers if n))
        found: dict[str, LedgerCustomer] = {}
        for chunk in _in_chunks(wanted):
            flt = filter_param(("external_reference", "in", chunk))
            for page in self.client.pages("/customers", {"filter": flt, "sort": "id"}):
                for raw in page:
                    customer = self._customer(raw)
                    if customer.number in chunk and customer.number not in found:
                        found[customer.number] = customer
        return found

    def _customer_body(self, number: str, customer: Customer) -> dict[str, Any]:
        return customer_body(customer, number)

    def create_customers(
        self, customers: Sequence[tuple[str, Customer]], idempotency_key: str
    ) -> dict[str, LedgerCustomer]:
        """Create company customers (one ``POST /company_customers`` each) unless their number exists.

        ``external_reference`` is unique in Pennylane: the numbers are looked up first and a 409 answer is
        resolved by a lookup, so a repeated call creates nothing twice. A rejected customer is left out of
        the result (and logged); an unanswered create raises :class:`AmbiguousWriteError`.
        """
        numbers = [n for n, _ in customers]
        created = self.find_customers_by_number(numbers)
        for number, customer in customers:
            if number in created:
                continue
            try:
                data = self.client.request("POST", "/company_customers", body=self._customer_body(number, customer),
                                           replay_safe=False)
            except RecordError as exc:
                log.warning("pennylane customer rejected", number=number, error=exc.detail)
                continue
            except VendorError as exc:
                if exc.status != 409:
                    raise
                again = self.find_customers_by_number([number]).get(number)
                if again is None:
                    log.warning("pennylane customer exists but is not visible yet", number=number)
                    continue
                created[number] = again
                continue
            if not isinstance(data, dict):
                raise AmbiguousWriteError("customer created but the answer is unreadable", vendor=VENDOR,
                                          method="POST", path="/company_customers")
            created[number] = self._customer(data)
        log.debug("pennylane customers resolved", count=len(created), batch=idempotency_key)
        return {n: created[n] for n in numbers if n in created}

    # == invoices ==================================================================================
    def _invoice_body(self, request: InvoiceRequest) -> tuple[dict[str, Any] | None, str | None]:
        """The ``POST /customer_invoices`` body, or why the invoice cannot be sent (a local, definitive error)."""
        inv = request.invoice
        if inv.status not in _CREATABLE:
            return None, f"cannot create an invoice with status {inv.status}"
        if not inv.reference:
            return None, "the invoice has no reference"
        try:
            customer_id = int(request.customer_ledger_id)
        except ValueError:
            return None, f"customer id {request.customer_ledger_id!r} is not a Pennylane customer id"
        if not inv.lines:
            return None, "the invoice has no lines"
        lines: list[dict[str, Any]] = []
        for n, line in enumerate(inv.lines, 1):
            code = vat_code_for(line)
            if code is None:
                return None, f"line {n}: no Pennylane VAT code for {line.tax_rate} % (map it under taxes:)"
            price = line.unit_price
            exponent = price.as_tuple().exponent
            if isinstance(exponent, int) and exponent < -6:
                if price.quantize(_SIX) != price:
                    return None, f"line {n}: unit price {price} has more than 6 decimals"
                price = price.quantize(_SIX)
            body: dict[str, Any] = {
                "label": line.description.strip() or "-",
                "raw_currency_unit_price": money(price),
                "unit": self.settings.line_unit,
                "vat_rate": code,
                "quantity": line.quantity,
            }
            if line.discount_percent:
                body["discount"] = {"type": "relative", "value": money(line.discount_percent)}
            lines.append(body)
        return {
            "date": inv.issue_date.isoformat(),
            "deadline": (inv.due_date or inv.issue_date).isoformat(),
            "customer_id": customer_id,
            "currency": inv.currency,
            "draft": inv.status == "draft",
            "external_reference": inv.reference,
            "invoice_lines": lines,
        }, None

    def create_invoices(self, requests: Sequence[InvoiceRequest], idempotency_key: str) -> list[CreateOutcome]:
        """Look every reference up, then create (one POST each) only the invoices not found.

        A rejected invoice comes back ``ok=False``; an invoice found by its reference comes back ``ok=True``
        without being created. A create whose answer is lost raises :class:`AmbiguousWriteError` at once:
        the invoices after it in the batch are not sent, and the caller resolves the batch by lookup.
        """
        if len(requests) > self.max_batch:
            raise ValueError(f"at most {self.max_batch} invoices per call")
        outcomes: dict[int, CreateOutcome] = {}
        done: dict[str, CreateOutcome] = {}  # reference -> outcome in this call (a reference twice in a batch)
        for i, req in enumerate(requests):
            body, error = self._invoice_body(req)
            if body is None:
                outcomes[i] = CreateOutcome(req.idempotency_key, False, error=error)
                continue
            ref = req.invoice.reference
            previous = done.get(ref)
            if previous is not None:
                outcomes[i] = CreateOutcome(req.idempotency_key, previous.ok, previous.invoice, previous.error)
                continue
            existing = self._lookup(ref)
            if existing is not None:
                log.info("pennylane invoice already exists; adopted", reference=ref, ledger_id=existing.ledger_id,
                         batch=idempotency_key)
                outcome = CreateOutcome(req.idempotency_key, True, invoice=existing)
            else:
                outcome = self._create(req, body)
            outcomes[i] = done[ref] = outcome
        return [outcomes[i] for i in range(len(requests))]

    def _create(self, req: InvoiceRequest, body: dict[str, Any]) -> CreateOutcome:
        ref = req.invoice.reference
        try:
            data = self.client.request("POST", "/customer_invoices", body=body, replay_safe=False)
        except RecordError as exc:
            return CreateOutcome(req.idempotency_key, False, error=exc.detail)
        except VendorError as exc:
            if exc.status != 409:
                raise
            # The reference is taken: the invoice exists, whether or not the lookup sees it yet.
            found = self._lookup(ref)
            if found is not None:
                return CreateOutcome(req.idempotency_key, True, invoice=found)
            raise AmbiguousWriteError("an invoice with this external_reference exists but the lookup does not "
                                      "show it yet", vendor=VENDOR, status=409, method="POST",
                                      path="/customer_invoices") from None
        try:
            if not isinstance(data, dict):
                raise _shape_error("created invoice")
            invoice = self._invoice(data, None, sent=req.invoice)
        except VendorError:
            raise AmbiguousWriteError("invoice created but the answer is unreadable", vendor=VENDOR, status=201,
                                      method="POST", path="/customer_invoices") from None
        return CreateOutcome(req.idempotency_key, True, invoice=invoice)

    def _lookup(self, reference: str) -> Invoice | None:
        """The invoice whose ``external_reference`` is ``reference`` (a live one before a cancelled one)."""
        best: Invoice | None = None
        flt = filter_param(("external_reference", "eq", reference))
        for raw, lines in self._records({"filter": flt, "sort": "id"}, with_lines=True):
            invoice = self._invoice(raw, lines)
            if invoice.reference != reference:
                continue
            if best is None or (best.status in _GONE and invoice.status not in _GONE):
                best = invoice
            elif invoice.status not in _GONE:
                log.warning("pennylane holds several invoices with one external_reference", reference=reference)
        return best

    def find_invoices_by_reference(self, references: Sequence[str]) -> dict[str, Invoice]:
        """One ``eq`` lookup per reference (Pennylane allows no ``in`` on ``external_reference``)."""
        found: dict[str, Invoice] = {}
        for ref in dict.fromkeys(r for r in references if r):
            invoice = self._lookup(ref)
            if invoice is not None:
                found[ref] = invoice
        return found

    def list_invoices(self, modified_since: dt.datetime | None = None) -> Iterator[Invoice]:
        """Customer invoices (credit notes left out) changed since ``modified_since``, with their lines."""
        for raw, lines in self._changed(modified_since, with_lines=True):
            yield self._invoice(raw, lines)

    # -- reading -----------------------------------------------------------------------------------
    def _records(self, params: Mapping[str, Any], *, with_lines: bool
                 ) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]] | None]]:
        """Invoices of ``GET /customer_invoices`` with ``params``, each with its raw lines when asked."""
        query = dict(params)
        if with_lines and self.settings.include_lines:
            query["include"] = "invoice_lines"
        for data in self.client.answers("/customer_invoices", query):
            included = data.get("included") if isinstance(data.get("included"), dict) else None
            by_invoice = included.get("invoice_lines") if included else None
            for raw in data["items"]:
                if not isinstance(raw, dict) or "id" not in raw:
                    raise _shape_error("invoice")
                if not with_lines:
                    yield raw, None
                    continue
                block = by_invoice.get(str(raw["id"])) if isinstance(by_invoice, dict) else None
                if (isinstance(block, dict) and isinstance(block.get("items"), list)
                        and not block.get("has_more")):
                    yield raw, [r for r in block["items"] if isinstance(r, dict)]
                else:
                    yield raw, self._lines_of(raw["id"])

    def _lines_of(self, invoice_id: Any) -> list[dict[str, Any]]:
        lines: list[dict[str, Any]] = []
        for page in self.client.pages(f"/customer_invoices/{invoice_id}/invoice_lines", {"sort": "id"}):
            lines.extend(page)
        return lines

    def _changed_ids(self, since: dt.datetime) -> list[str] | None:
        """Ids of the invoices changed since ``since`` (changelog order); None when the changelog cannot
        cover that far back (older than its 4-week retention)."""
        now = dt.datetime.fromtimestamp(self._clock(), tz=dt.UTC)
        if since < now - _CHANGELOG_RETENTION + _RETENTION_MARGIN:
            return None
        ids: dict[str, None] = {}
        try:
            for page in self.client.changelog("customer_invoices", since):
                for change in page:
                    key = str(change.get("id"))
                    ids.pop(key, None)
                    if change.get("operation") != "delete":
                        ids[key] = None
        except RecordError as exc:
            if exc.status == 422:  # start_date outside the retention, by Pennylane's clock
                log.info("pennylane changelog does not reach back that far; listing every invoice")
                return None
            raise
        return list(ids)

    def _changed(self, since: dt.datetime | None, *, with_lines: bool, credit_notes: bool = False
                 ) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]] | None]]:
        """Customer invoices (or, with ``credit_notes``, credit notes) changed since ``since`` (all when None)."""
        ids = self._changed_ids(_aware(since)) if since is not None else None
        not_credit_note = ("credit_note", "eq", "true" if credit_notes else "false")
        if ids is None:
            yield from self._records({"filter": filter_param(not_credit_note), "sort": "id"}, with_lines=with_lines)
            return
        for start in range(0, len(ids), self.settings.page_size):
            chunk = ids[start:start + self.settings.page_size]
            order = {k: n for n, k in enumerate(chunk)}
            flt = filter_param(("id", "in", chunk), not_credit_note)
            batch = list(self._records({"filter": flt, "sort": "id"}, with_lines=with_lines))
            batch.sort(key=lambda pair: order.get(str(pair[0]["id"]), len(order)))
            yield from batch

    @staticmethod
    def _status(raw: Mapping[str, Any]) -> InvoiceStatus:
        """A finalized invoice is cancelled in Pennylane by a credit note of all of it: it then reads as settled
        (``paid``, nothing due), the credit note (:meth:`list_credit_notes`) taking it back, as a credited invoice
        reads in Xero and QuickBooks; partially cancelled is still ``authorised`` until paid."""
        if raw.get("draft"):
            return "draft"
        status = str(raw.get("status") or "")
        if status == "archived" or raw.get("archived_at"):
            return "deleted"
        if status in ("paid", "cancelled") or raw.get("paid") is True:
            return "paid"
        remaining = _dec(raw.get("remaining_amount_with_tax"))
        if status == "partially_cancelled" and remaining == 0:
            return "paid"
        return "authorised"

    @staticmethod
    def _line(raw: Mapping[str, Any]) -> InvoiceLine:
        quantity = _dec(raw.get("quantity"))
        quantity = Decimal(1) if quantity is None else quantity
        price = _dec(raw.get("raw_currency_unit_price")) or Decimal(0)
        code = str(raw["vat_rate"]) if raw.get("vat_rate") else None
        rate = rate_of_vat_code(code)
        if rate is None:  # a code without a rate in its name: the rate the amounts imply
            before = _dec(raw.get("currency_amount_before_tax")) or Decimal(0)
            tax = _dec(raw.get("currency_tax")) or Decimal(0)
            rate = (tax * 100 / before).quantize(Decimal("0.01")) if before else Decimal(0)
        discount = Decimal(0)
        spec = raw.get("discount")
        if isinstance(spec, Mapping):
            value = _dec(spec.get("value")) or Decimal(0)
            if spec.get("type") == "absolute":
                gross = quantity * price
                discount = (value * 100 / gross).quantize(Decimal("0.0001"), ROUND_HALF_UP) if gross else Decimal(0)
            else:
                discount = value
        return InvoiceLine(description=str(raw.get("label") or raw.get("description") or ""), quantity=quantity,
                           unit_price=price, discount_percent=discount, tax_rate=rate, tax_type=code)

    def _invoice(self, raw: Mapping[str, Any], lines: list[dict[str, Any]] | None, *, sent: Invoice | None = None
                 ) -> Invoice:
        """A domain invoice from Pennylane's JSON. Without ``lines`` (the answer to a create, whose lines are a
        link) the lines are those of ``sent``, the invoice just written."""
        try:
            currency = str(raw.get("currency") or (sent.currency if sent else "EUR"))
            if lines is not None:
                ordered = sorted(lines, key=lambda r: int(r.get("id") or 0))
                parsed_lines = [self._line(r) for r in ordered]
            elif sent is not None:
                parsed_lines = list(sent.lines)
            else:
                parsed_lines = []
            status = self._status(raw)
            total = _dec(raw.get("currency_amount"))
            remaining = _dec(raw.get("remaining_amount_with_tax"))
            paid = total - remaining if status != "draft" and total is not None and remaining is not None else None
            created = _parse_dt(raw.get("created_at"))
            issue = _parse_date(raw.get("date")) or (created.date() if created else None)
            if issue is None:
                raise _shape_error("invoice date")
            customer = raw.get("customer")
            number = raw.get("invoice_number")
            return Invoice(
                reference=str(raw.get("external_reference") or ""),
                currency=currency,
                lines=parsed_lines,
                issue_date=issue,
                due_date=_parse_date(raw.get("deadline")),
                status=status,
                number=str(number) if number and status != "draft" else None,
                ledger_id=str(raw["id"]),
                customer_ledger_id=str(customer["id"]) if isinstance(customer, Mapping) and customer.get("id")
                else None,
                amount_paid=paid,
                amount_due=remaining if status != "draft" else None,
                updated_at=_parse_dt(raw.get("updated_at")),
                ledger_total=total,
                exchange_rate=home_rate(raw),
            )
        except (KeyError, TypeError, AttributeError, ArithmeticError, ValidationError):
            raise _shape_error("invoice") from None

    # == payments ==================================================================================
    def list_payments(self, modified_since: dt.datetime | None = None) -> Iterator[Payment]:
        """Payments of the invoices changed since ``modified_since`` that show one (paid, or an amount
        remaining below the total), from each invoice's ``payments`` sub-resource."""
        since = _aware(modified_since) if modified_since is not None else None
        for raw, _ in self._changed(since, with_lines=False):
            if raw.get("draft") or not self._shows_payment(raw):
                continue
            for page in self.client.pages(f"/customer_invoices/{raw['id']}/payments", {"sort": "id"}):
                for item in page:
                    payment = self._payment(item, raw)
                    if since is not None and payment.updated_at is not None and payment.updated_at < since:
                        continue
                    yield payment

    @staticmethod
    def _shows_payment(raw: Mapping[str, Any]) -> bool:
        if raw.get("paid") is True or raw.get("status") in ("paid", "partially_paid"):
            return True
        total = _dec(raw.get("currency_amount"))
        remaining = _dec(raw.get("remaining_amount_with_tax"))
        return total is not None and remaining is not None and remaining < total

    @staticmethod
    def _payment(data: Mapping[str, Any], invoice: Mapping[str, Any]) -> Payment:
        try:
            created = _parse_dt(data.get("created_at"))
            if created is None:
                raise _shape_error("payment date")
            raw_status = str(data.get("status") or "")
            status = ("authorised" if raw_status in _PAID_STATUSES
                      else "voided" if raw_status in _FAILED_STATUSES else "pending")
            amount = _dec(data.get("currency_amount"))
            if amount is None:
                raise _shape_error("payment amount")
            return Payment(
                ledger_id=str(data["id"]),
                invoice_ledger_id=str(invoice["id"]),
                amount=amount,
                currency=str(data.get("currency") or invoice.get("currency") or "EUR"),
                date=created.date(),
                status=status,
                updated_at=_parse_dt(data.get("updated_at")) or created,
            )
        except (KeyError, TypeError, AttributeError, ValidationError):
            raise _shape_error("payment") from None

    # == credit notes ==============================================================================
    def list_credit_notes(self, modified_since: dt.datetime | None = None) -> Iterator[CreditNote]:
        """Credit notes (customer invoices with negative amounts, ``credit_note`` filter) changed since
        ``modified_since``. Pennylane links a credit note to the invoice it credits (``credited_invoice``) and nets it
        against that invoice: the allocation is that invoice, for what the note does not leave to use
        (``remaining_amount_with_tax``), on the credit note's date."""
        since = _aware(modified_since) if modified_since is not None else None
        for raw, _lines in self._changed(since, with_lines=False, credit_notes=True):
            yield self._credit_note(raw)

    def _credit_note(self, raw: Mapping[str, Any]) -> CreditNote:
        try:
            draft = bool(raw.get("draft"))
            status: InvoiceStatus = "draft" if draft else "authorised"
            if raw.get("status") == "archived" or raw.get("archived_at"):
                status = "deleted"
            elif raw.get("status") == "cancelled":
                status = "voided"
            total = abs(_dec(raw.get("currency_amount")) or Decimal(0))
            subtotal = abs(_dec(raw.get("currency_amount_before_tax")) or Decimal(0))
            credited = raw.get("credited_invoice")
            credited_id = str(credited["id"]) if isinstance(credited, Mapping) and credited.get("id") else None
            left = _dec(raw.get("remaining_amount_with_tax"))
            remaining = abs(left) if left is not None else (Decimal(0) if credited_id else total)
            created = _parse_dt(raw.get("created_at"))
            issue = _parse_date(raw.get("date")) or (created.date() if created else None)
            if issue is None:
                raise _shape_error("credit note date")
            allocations: list[CreditAllocation] = []
            if credited_id and status in ("authorised",) and total - remaining > 0:
                allocations.append(CreditAllocation(invoice_ledger_id=credited_id, amount=total - remaining,
                                                    date=issue))
            if status == "authorised" and remaining == 0 and total > 0:
                status = "paid"
            customer = raw.get("customer")
            number = raw.get("invoice_number")
            return CreditNote(
                ledger_id=str(raw["id"]),
                number=str(number) if number and not draft else None,
                customer_ledger_id=str(customer["id"]) if isinstance(customer, Mapping) and customer.get("id")
                else None,
                currency=str(raw.get("currency") or "EUR"),
                issue_date=issue,
                status=status,
                subtotal=subtotal,
                total=total,
                remaining=remaining,
                credited_invoice_ledger_id=credited_id,
                allocations=allocations,
                exchange_rate=home_rate(raw),
                updated_at=_parse_dt(raw.get("updated_at")),
            )
        except (KeyError, TypeError, AttributeError, ArithmeticError, ValidationError):
            raise _shape_error("credit note") from None

    # == expenses ==================================================================================
    def list_expenses(self, account_codes: Sequence[str], start: dt.date, end: dt.date) -> Iterator[ExpenseLine]:
        """The general ledger's lines on the ledger accounts numbered ``account_codes`` dated within
        ``[start, end]`` (``GET /ledger_entry_lines`` filtered on ``ledger_account_id`` and ``date``): the expense
        lines of supplier invoices as the accountant booked them, and whatever else was booked there (bank
        payments, payroll entries), debit less credit, in euros. A supplier invoice's own lines do not name their
        ledger account in the API; its ledger entry does."""
        accounts: dict[str, str] = {}
        for code in dict.fromkeys(c for c in account_codes if c):
            flt = filter_param(("number", "eq", code))
            for page in self.client.pages("/ledger_accounts", {"filter": flt, "sort": "id"}):
                for raw in page:
                    if str(raw.get("number") or "") == code and raw.get("id") is not None:
                        accounts[str(raw["id"])] = code
        ids = list(accounts)
        for chunk in _in_chunks(ids):
            flt = filter_param(("ledger_account_id", "in", [int(i) for i in chunk]),
                               ("date", "gteq", start.isoformat()), ("date", "lteq", end.isoformat()))
            for page in self.client.pages("/ledger_entry_lines", {"filter": flt, "sort": "id"}):
                for raw in page:
                    line = self._expense(raw, accounts)
                    if line is not None:
                        yield line

    @staticmethod
    def _expense(raw: Mapping[str, Any], accounts: Mapping[str, str]) -> ExpenseLine | None:
        try:
            account = raw.get("ledger_account")
            code = accounts.get(str(account.get("id"))) if isinstance(account, Mapping) else None
            day = _parse_date(raw.get("date"))
            if code is None or day is None:
                return None
            net = (_dec(raw.get("debit")) or Decimal(0)) - (_dec(raw.get("credit")) or Decimal(0))
            if not net:
                return None
            return ExpenseLine(ledger_id=str(raw["id"]), account_code=code, date=day, net=net, currency="EUR",
                               description=str(raw["label"]) if raw.get("label") else None)
        except (KeyError, TypeError, AttributeError, ArithmeticError, ValidationError):
            raise _shape_error("ledger entry line") from None

    # == organisation ==============================================================================
    def base_currency(self) -> str:
        """Pennylane keeps a company's books in euros (``amount`` fields are "in euros"; ``exchange_rate`` converts
        to euros)."""
        return "EUR"

    def invoice_url(self, invoice: Invoice) -> str | None:
        """None: the API gives an invoice no lasting address (its ``public_file_url`` is a PDF link that expires
        after 30 minutes, no use in a CRM field)."""
        return None
