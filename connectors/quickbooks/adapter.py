"""QuickBooks Online as a LedgerBridge ledger: customers, sales invoices, the payments and credit memos applied to
them, and expense lines.

Where LedgerBridge keeps its keys in QuickBooks, and why:

- **Invoice reference.** QuickBooks has no searchable free reference on an invoice: ``PrivateNote`` and
  custom fields cannot be filtered in a query, and ``DocNumber`` (which can) holds at most 21 characters,
  while a reference ``LB-acme-fr:123456789012`` may be longer. So the full reference goes on a line of
  ``PrivateNote`` (``LedgerBridge reference: ...``) and, with ``doc_numbers: reference`` (the default),
  ``DocNumber`` holds :func:`~connectors.quickbooks.wire.doc_number` of it: the reference itself when it
  fits, else a 9-character digest and the reference's tail. A lookup by reference is then one query
  (``WHERE DocNumber IN (...)``), checked against ``PrivateNote`` (an invoice whose note names another
  reference is not ours; a voided invoice, whose note QuickBooks replaces by "Voided", is recognised by
  its DocNumber alone). A second create of the same reference under another ``requestid`` is refused by
  QuickBooks' duplicate-number check (Fault 6140) and resolved to the existing invoice. Companies whose
  invoice numbers must form one unbroken sequence set ``doc_numbers: ledger``: QuickBooks numbers the
  invoices, and a lookup by reference reads every invoice and matches ``PrivateNote``.
- **Customer number.** The external number goes on a line of the customer's ``Notes``
  (``LedgerBridge number: ...``). ``AcctNum`` is no home for it: Intuit's schema marks ``Customer.AcctNum``
  as QuickBooks Desktop only (``Product: QBW``), and the properties QuickBooks Online filters customers on
  are names, e-mail and balance. :meth:`QuickBooksLedger.find_customers_by_number` therefore lists the
  active customers (1,000 a call) and matches the notes; it runs only to resolve unanswered creates.
- **Idempotency.** Every write carries ``requestid``: the invoice's is its intent key, a customer's is
  derived from the batch key and the number. A write whose answer was lost is resent with the same id and
  QuickBooks answers with what it did the first time.

Ledger facts for the metrics: a credit memo is applied to an invoice by a payment whose lines link both (the
"payment" of no money QuickBooks records when credit is used), so :meth:`QuickBooksLedger.list_payments` reports
only the cash a payment applies and :meth:`QuickBooksLedger.list_credit_notes` the credit memos with the
allocations their payments make; :meth:`QuickBooksLedger.list_expenses` reads the ``AccountBasedExpenseLineDetail``
lines of expenses (``Purchase``) and bills (``Bill``) by the accounts' ``AcctNum``; ``ExchangeRate`` is read as
QuickBooks records it, home-currency units per foreign unit.

Invoices are created one ``POST /invoice`` each (``/batch`` allows 30 items but only 40 calls a minute, and
its single ``requestid`` would tie the replay of every invoice to the composition of the batch), up to
``write_workers`` at a time under the company's 500-a-minute budget. Only :mod:`connectors.errors`
types leave this module.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar

import httpx
import structlog
from pydantic import ValidationError

from config.schema import ConnectorSettings
from connectors.domain import CreditAllocation, CreditNote, Customer, ExpenseLine, Invoice, InvoiceLine, Payment
from connectors.errors import AmbiguousWriteError, ConfigError, ConnectorError, RecordError, VendorError
from connectors.interfaces import ApiStats, CreateOutcome, InvoiceRequest, Ledger, LedgerCustomer, TokenStore
from connectors.oauth import LockFactory
from connectors.quickbooks import wire
from connectors.quickbooks.client import VENDOR, QuickBooksClient, request_id
from connectors.quickbooks.settings import QuickBooksSettings

__all__ = ["QuickBooksLedger"]

log = structlog.get_logger("ledgerbridge.quickbooks")

_CREATABLE = {"draft", "submitted", "authorised"}
_GONE = {"deleted", "voided"}
_LOOKUP_CHUNK = 50
_NAMESPACE = uuid.UUID("0f6f3c55-8e0e-4b3e-9d0c-2a6a1f7b4c11")
_DISPLAY_NAME_MAX = wire.DISPLAY_NAME_MAX


def _shape_error(what: str) -> VendorError:
    return VendorError(f"unexpected {what} in the response", vendor=VENDOR)


def _dec(value: Any) -> Decimal | None:
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        return value if isinstance(value, Decimal) else Decimal(str(value))
    except InvalidOperation:
        return None


def _ref(value: Any) -> str | None:
    if isinstance(value, Mapping):
        inner = value.get("value")
        return str(inner) if inner not in (None, "") else None
    return str(value) if isinstance(value, str | int) and value != "" else None


def _ref_name(value: Any) -> str | None:
    if isinstance(value, Mapping) and value.get("name"):
        return str(value["name"])
    return None


def _rate(value: Any) -> Decimal | None:
    """An ``ExchangeRate`` (home-currency units per foreign unit); None when absent or not positive."""
    rate = _dec(value)
    return rate if rate is not None and rate > 0 else None


def _applications(payment: Mapping[str, Any]) -> tuple[list[tuple[str, Decimal]], list[tuple[str, Decimal]]]:
    """What a QuickBooks payment applies: (invoice id, amount) and (credit memo id, amount), in line order.

    Applying a credit memo to an invoice is a payment whose lines link the invoice (the amount it settles)
    and the credit memo (the amount of credit used); its ``TotalAmt`` is the cash only, 0 when the credit
    covers everything.
    """
    invoices: list[tuple[str, Decimal]] = []
    credits: list[tuple[str, Decimal]] = []
    for line in payment.get("Line") or []:
        amount = _dec(line.get("Amount")) if isinstance(line, Mapping) else None
        if amount is None:
            continue
        for link in line.get("LinkedTxn") or []:
            if not isinstance(link, Mapping) or not link.get("TxnId"):
                continue
            if link.get("TxnType") == "Invoice":
                invoices.append((str(link["TxnId"]), abs(amount)))
            elif link.get("TxnType") == "CreditMemo":
                credits.append((str(link["TxnId"]), abs(amount)))
    return invoices, credits


def _credit_pairs(invoices: Sequence[tuple[str, Decimal]], credits: Sequence[tuple[str, Decimal]]
                  ) -> list[tuple[int, str, Decimal]]:
    """(index of the invoice application, credit memo id, amount): the credit of one payment spread over its
    invoices in line order. QuickBooks records which credit memos and which invoices a payment touches but not
    which credit went to which invoice; with one of either (the usual case) the pairing is exact."""
    pairs: list[tuple[int, str, Decimal]] = []
    memos = [memo for memo, _amount in credits]
    left = [amount for _memo, amount in credits]
    k = 0
    for i, (_invoice, applied) in enumerate(invoices):
        need = applied
        while need > 0 and k < len(left):
            take = min(need, left[k])
            if take > 0:
                pairs.append((i, memos[k], take))
                need -= take
                left[k] -= take
            if left[k] <= 0:
                k += 1
    return pairs


def _num(value: Any) -> int:
    text = str(value or "")
    return int(text) if text.isdigit() else 0


def _date(value: Any) -> dt.date | None:
    if not value:
        return None
    try:
        return dt.date.fromisoformat(str(value)[:10])
    except ValueError:
        return None


class QuickBooksLedger(Ledger):
    """The QuickBooks Online ledger connector (one company)."""

    vendor: ClassVar[str] = "quickbooks"
    Settings: ClassVar[type[ConnectorSettings]] = QuickBooksSettings
    #: Invoices per engine batch: each is its own POST, so a batch is only the unit between two state commits
    #: (30 calls, about 4 seconds at the 500-a-minute limit).
    max_batch: ClassVar[int] = 30

    def __init__(
        self,
        settings: QuickBooksSettings,
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
        (token expiry, change-data-capture window) are for tests and the sandboxes."""
        self.settings = settings
        self.stats = ApiStats()
        self.client = QuickBooksClient(settings, tokens, transport=transport, stats=self.stats, sleep=sleep,
                                       monotonic=monotonic, clock=clock, lock_factory=lock_factory,
                                       max_attempts=max_attempts)
        self._cache_lock = threading.Lock()
        self._items: dict[str, dict[str, str]] | None = None
        self._tax_rates: dict[str, Decimal] | None = None
        self._home_currency: str | None = None

    @classmethod
    def from_config(
        cls,
        settings: Mapping[str, Any],
        tokens: TokenStore,
        *,
        transport: httpx.BaseTransport | None = None,
        lock_factory: LockFactory | None = None,
    ) -> QuickBooksLedger:
        """Validate the pipeline's ``ledger:`` block and build the connector."""
        try:
            parsed = QuickBooksSettings.model_validate(dict(settings))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'ledger'}: {err['msg']}" for err in exc.errors()
            )
            raise ConfigError(f"ledger (quickbooks): {problems}") from None
        return cls(parsed, tokens, transport=transport, lock_factory=lock_factory)

    def close(self) -> None:
        self.client.close()

    # == customers =================================================================================
    @staticmethod
    def _customer(record: Mapping[str, Any]) -> LedgerCustomer:
        try:
            web = record.get("WebAddr")
            uri = web.get("URI") if isinstance(web, Mapping) else None
            domain = Customer(crm_id="-", name="-", domain=str(uri)).domain if uri else None
            email = record.get("PrimaryEmailAddr")
            address = email.get("Address") if isinstance(email, Mapping) else None
            notes = record.get("Notes")
            company = wire.note_value(notes, "SIRET:") or wire.note_value(notes, "SIREN:")
            return LedgerCustomer(
                ledger_id=str(record["Id"]),
                name=str(record.get("DisplayName") or ""),
                number=wire.note_value(notes, wire.NUMBER_TAG),
                email=str(address) if address else None,
                vat_number=str(record["PrimaryTaxIdentifier"]) if record.get("PrimaryTaxIdentifier") else None,
                domain=domain,
                company_id=company,
            )
        except (KeyError, TypeError, AttributeError, ValidationError):
            raise _shape_error("customer") from None

    def list_customers(self) -> Iterator[LedgerCustomer]:
        for page in self.client.query_pages("Customer"):
            for record in page:
                if record.get("Active", True):
                    yield self._customer(record)

    def find_customers_by_number(self, numbers: Sequence[str]) -> dict[str, LedgerCustomer]:
        """Customers whose ``Notes`` carry one of ``numbers`` (QuickBooks cannot filter on Notes: a scan)."""
        wanted = set(numbers)
        found: dict[str, LedgerCustomer] = {}
        if not wanted:
            return found
        for customer in self.list_customers():
            if customer.number in wanted and customer.number not in found:
                found[customer.number] = customer
        return found

    @staticmethod
    def _display_name(text: str) -> str:
        return wire.display_name(text)

    @staticmethod
    def _customer_body(number: str, customer: Customer, name: str) -> dict[str, Any]:
        return wire.customer_body(customer, name, number)

    def _own_customer_named(self, name: str, number: str) -> LedgerCustomer | None:
        """The customer holding ``name`` when it carries ``number`` (created by an earlier, unanswered call)."""
        # A QuickBooks query, not SQL: the name is a quoted literal of its language.
        statement = f"SELECT * FROM Customer WHERE DisplayName = {wire.quote(name)}"  # noqa: S608
        response = self.client.query(statement)
        for record in response.get("Customer") or []:
            if isinstance(record, dict):
                customer = self._customer(record)
                if customer.number == number:
                    return customer
        return None

    def create_customers(
        self, customers: Sequence[tuple[str, Customer]], idempotency_key: str
    ) -> dict[str, LedgerCustomer]:
        """One POST per customer. DisplayName is unique across customers, vendors and employees: on Fault 6240
        the holder is adopted when it carries this number, else the name is made distinct (VAT number, then
        external number) and the create is sent again under a new ``requestid``."""
        created: dict[str, LedgerCustomer] = {}
        for number, customer in customers:
            result = self._create_customer(number, customer, idempotency_key)
            if result is not None:
                created[number] = result
        return created

    def _create_customer(self, number: str, customer: Customer, batch_key: str) -> LedgerCustomer | None:
        base = self._display_name(customer.name) or self._display_name(number)
        candidates = [base]
        if customer.vat_number:
            candidates.append(f"{base[: _DISPLAY_NAME_MAX - len(customer.vat_number) - 3]} ({customer.vat_number})")
        short = number[-30:]
        candidates.append(f"{base[: _DISPLAY_NAME_MAX - len(short) - 3]} ({short})")
        candidates.append(f"{base[: _DISPLAY_NAME_MAX - len(short) - 5]} ({short}-2)")
        key = str(uuid.uuid5(_NAMESPACE, f"{batch_key}:{number}"))
        last_error = ""
        for attempt, name in enumerate(dict.fromkeys(candidates)):
            try:
                data = self.client.request("POST", "/customer", body=self._customer_body(number, customer, name),
                                           request_id=request_id(key, f"n{attempt}" if attempt else None))
            except RecordError as exc:
                last_error = exc.detail
                if exc.code == "6240":
                    mine = self._own_customer_named(name, number)
                    if mine is not None:
                        return mine
                    log.info("quickbooks display name taken; trying another", number=number, attempt=attempt)
                    continue
                break
            record = data.get("Customer")
            if not isinstance(record, dict):
                raise _shape_error("customer")
            return self._customer(record)
        log.warning("quickbooks customer not created", number=number, error=last_error)
        return None

    # == reference data ============================================================================
    def _item_index(self, refresh: bool = False) -> dict[str, dict[str, str]]:
        with self._cache_lock:
            if self._items is None or refresh:
                index: dict[str, dict[str, str]] = {}
                for page in self.client.query_pages("Item"):
                    for item in page:
                        ref = {"value": str(item["Id"]), "name": str(item.get("Name") or "")}
                        for key in (item.get("Sku"), item.get("Name")):
                            if key:
                                index.setdefault(str(key), ref)
                self._items = index
            return self._items

    def _item_ref(self, code: str) -> dict[str, str] | None:
        ref = self._item_index().get(code)
        if ref is None:  # an item created since the catalogue was read
            ref = self._item_index(refresh=True).get(code)
        return ref

    def _rates(self) -> dict[str, Decimal]:
        """TaxCode Id -> the sales rate in percent (the sum of its TaxRates)."""
        with self._cache_lock:
            if self._tax_rates is None:
                rate_values: dict[str, Decimal] = {}
                for page in self.client.query_pages("TaxRate", "Active IN (true, false)"):
                    for rate in page:
                        value = _dec(rate.get("RateValue"))
                        if rate.get("Id") is not None and value is not None:
                            rate_values[str(rate["Id"])] = value
                codes: dict[str, Decimal] = {}
                for page in self.client.query_pages("TaxCode", "Active IN (true, false)"):
                    for code in page:
                        details = (code.get("SalesTaxRateList") or {}).get("TaxRateDetail") or []
                        total = Decimal(0)
                        for detail in details:
                            total += rate_values.get(_ref(detail.get("TaxRateRef")) or "", Decimal(0))
                        codes[str(code["Id"])] = total
                self._tax_rates = codes
            return self._tax_rates

    def home_currency(self) -> str:
        """The company's home currency (one query, then cached)."""
        if self._home_currency is None:
            response = self.client.query("SELECT * FROM Preferences")
            prefs = (response.get("Preferences") or [{}])[0]
            currency = _ref((prefs.get("CurrencyPrefs") or {}).get("HomeCurrency"))
            if not currency:
                raise _shape_error("home currency")
            self._home_currency = currency
        return self._home_currency

    # == invoices ==================================================================================
    def _invoice(self, data: Mapping[str, Any], sent: Invoice | None = None,
                 reference: str | None = None) -> Invoice:
        """A domain invoice from QuickBooks' JSON. ``sent`` is the invoice just written: parsing the answer to a
        write then makes no further call (its tax rates come from what was sent)."""
        try:
            updated = wire.parse_datetime((data.get("MetaData") or {}).get("LastUpdatedTime"))
            if data.get("status") == "Deleted":
                day = updated.date() if updated else dt.date(1970, 1, 1)
                return Invoice(reference=reference or "", currency=sent.currency if sent else self.home_currency(),
                               lines=[], issue_date=day, status="deleted", ledger_id=str(data["Id"]),
                               updated_at=updated)
            currency = _ref(data.get("CurrencyRef")) or (sent.currency if sent else None) or self.home_currency()
            known = {ln.tax_type: ln.tax_rate for ln in sent.lines if ln.tax_type} if sent is not None else None
            lines: list[InvoiceLine] = []
            for raw in data.get("Line") or []:
                if raw.get("DetailType") != "SalesItemLineDetail":
                    continue
                detail = raw.get("SalesItemLineDetail") or {}
                code = _ref(detail.get("TaxCodeRef"))
                rate: Decimal | None = Decimal(0)
                if code and known is not None and code in known:
                    rate = known[code]
                elif code:
                    rate = self._rates().get(code)
                amount = _dec(raw.get("Amount")) or Decimal(0)
                quantity = _dec(detail.get("Qty"))
                unit = _dec(detail.get("UnitPrice"))
                lines.append(InvoiceLine(
                    description=str(raw.get("Description") or ""),
                    quantity=quantity if quantity is not None else Decimal(1),
                    unit_price=unit if unit is not None else amount,
                    discount_percent=_dec(detail.get("DiscountRate")) or Decimal(0),
                    tax_rate=rate if rate is not None else Decimal(0),
                    item_code=_ref_name(detail.get("ItemRef")) or _ref(detail.get("ItemRef")),
                    account_code=None,  # QuickBooks books the line on the item's income account
                    tax_type=code,
                ))
            issue = _date(data.get("TxnDate")) or (updated.date() if updated else None)
            if issue is None:
                raise _shape_error("invoice date")
            note = data.get("PrivateNote")
            total = _dec(data.get("TotalAmt"))
            balance = _dec(data.get("Balance"))
            voided = isinstance(note, str) and note.strip().lower().startswith("voided") and balance == 0
            status = "voided" if voided else "paid" if (balance == 0 and total) else "authorised"
            ref = reference or wire.note_value(note, wire.REFERENCE_TAG) or str(data.get("DocNumber") or "")
            return Invoice(
                reference=ref,
                currency=currency,
                lines=lines,
                issue_date=issue,
                due_date=_date(data.get("DueDate")),
                status=status,
                number=str(data["DocNumber"]) if data.get("DocNumber") else None,
                ledger_id=str(data["Id"]),
                customer_ledger_id=_ref(data.get("CustomerRef")),
                amount_paid=None if voided or total is None or balance is None else total - balance,
                amount_due=balance,
                updated_at=updated,
                ledger_total=total,
                exchange_rate=_rate(data.get("ExchangeRate")),
            )
        except (KeyError, TypeError, AttributeError, ArithmeticError, ValidationError):
            raise _shape_error("invoice") from None

    def _invoice_body(self, request: InvoiceRequest) -> dict[str, Any] | str:
        """The JSON to POST, or why the invoice cannot be sent."""
        inv = request.invoice
        lines: list[dict[str, Any]] = []
        for n, line in enumerate(inv.lines, start=1):
            code = line.item_code or self.settings.default_item
            if not code:
                return f"line {n} has no item code and the connector has no default_item"
            item = self._item_ref(code)
            if item is None:
                return f"line {n}: no QuickBooks item has the Name or Sku {code!r}"
            detail: dict[str, Any] = {"ItemRef": item, "Qty": line.quantity, "UnitPrice": line.unit_price}
            if line.tax_type:
                detail["TaxCodeRef"] = {"value": line.tax_type}
            if line.discount_percent:
                detail["DiscountRate"] = line.discount_percent
            lines.append({"DetailType": "SalesItemLineDetail", "Amount": line.net_amount(inv.currency),
                          "Description": line.description[:4000], "SalesItemLineDetail": detail})
        if not lines:
            return "an invoice needs at least one line"
        body: dict[str, Any] = {
            "CustomerRef": {"value": request.customer_ledger_id},
            "CurrencyRef": {"value": inv.currency},
            "TxnDate": inv.issue_date.isoformat(),
            "GlobalTaxCalculation": "TaxExcluded",
            "PrivateNote": f"{wire.REFERENCE_TAG}{inv.reference}",
            "Line": lines,
        }
        if inv.due_date:
            body["DueDate"] = inv.due_date.isoformat()
        if self.settings.doc_numbers == "reference":
            body["DocNumber"] = wire.doc_number(inv.reference)
        elif inv.number:
            body["DocNumber"] = inv.number[: wire.DOC_NUMBER_MAX]
        return body

    def create_invoices(self, requests: Sequence[InvoiceRequest], idempotency_key: str) -> list[CreateOutcome]:
        """One ``POST /invoice?requestid=<intent key>`` per invoice, ``write_workers`` at a time; outcomes in
        the order of ``requests``. ``idempotency_key`` (the batch's) is not needed: each invoice has its own."""
        if len(requests) > self.max_batch:
            raise ValueError(f"at most {self.max_batch} invoices per call")
        outcomes: dict[int, CreateOutcome] = {}
        sendable: list[tuple[int, InvoiceRequest, dict[str, Any]]] = []
        for i, req in enumerate(requests):
            if req.invoice.status not in _CREATABLE:
                outcomes[i] = CreateOutcome(req.idempotency_key, False,
                                            error=f"cannot create an invoice with status {req.invoice.status}")
                continue
            body = self._invoice_body(req)
            if isinstance(body, str):
                outcomes[i] = CreateOutcome(req.idempotency_key, False, error=body)
            else:
                sendable.append((i, req, body))
        if sendable:
            self._send_all(sendable, outcomes)
        return [outcomes[i] for i in range(len(requests))]

    def _send_all(self, sendable: list[tuple[int, InvoiceRequest, dict[str, Any]]],
                  outcomes: dict[int, CreateOutcome]) -> None:
        workers = min(self.settings.write_workers, len(sendable))
        ambiguous: AmbiguousWriteError | None = None
        fatal: ConnectorError | None = None
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qbo-invoice") as pool:
            # Each worker runs in a copy of the caller's context, so log lines keep the run's bound fields.
            futures = [(i, pool.submit(contextvars.copy_context().run, self._create_one, req, body))
                       for i, req, body in sendable]
            for i, future in futures:
                try:
                    outcomes[i] = future.result()
                except AmbiguousWriteError as exc:
                    ambiguous = ambiguous or exc
                except ConnectorError as exc:
                    fatal = fatal or exc
        # Every other invoice has been sent by now; the caller resolves the unknown ones by reference.
        if ambiguous is not None:
            raise ambiguous
        if fatal is not None:
            raise fatal

    def _create_one(self, req: InvoiceRequest, body: dict[str, Any]) -> CreateOutcome:
        try:
            data = self.client.request("POST", "/invoice", body=body, request_id=request_id(req.idempotency_key))
        except RecordError as exc:
            if exc.code == "6140" and self.settings.doc_numbers == "reference":
                # The DocNumber of this reference exists: an earlier create of this very invoice, if its
                # PrivateNote agrees. Adopt it rather than report a failure.
                existing = self.find_invoices_by_reference([req.invoice.reference]).get(req.invoice.reference)
                if existing is not None and existing.status not in _GONE:
                    log.info("quickbooks invoice already exists; adopted", ledger_id=existing.ledger_id)
                    return CreateOutcome(req.idempotency_key, True, invoice=existing)
            return CreateOutcome(req.idempotency_key, False, error=exc.detail)
        record = data.get("Invoice")
        if not isinstance(record, dict):
            raise _shape_error("invoice")
        return CreateOutcome(req.idempotency_key, True, invoice=self._invoice(record, req.invoice))

    def find_invoices_by_reference(self, references: Sequence[str]) -> dict[str, Invoice]:
        wanted = list(dict.fromkeys(references))
        found: dict[str, Invoice] = {}

        def keep(ref: str, invoice: Invoice) -> None:
            current = found.get(ref)
            if current is None or (current.status in _GONE and invoice.status not in _GONE):
                found[ref] = invoice
            elif invoice.status not in _GONE:
                log.warning("quickbooks holds several invoices with one reference", ledger_id=invoice.ledger_id)

        if self.settings.doc_numbers == "reference":
            by_doc = {wire.doc_number(r): r for r in wanted}
            docs = list(by_doc)
            for start in range(0, len(docs), _LOOKUP_CHUNK):
                chunk = docs[start : start + _LOOKUP_CHUNK]
                where = f"DocNumber IN ({', '.join(wire.quote(d) for d in chunk)})"
                for page in self.client.query_pages("Invoice", where):
                    for record in page:
                        ref = by_doc.get(str(record.get("DocNumber") or ""))
                        noted = wire.note_value(record.get("PrivateNote"), wire.REFERENCE_TAG)
                        if ref is None or (noted is not None and noted != ref):
                            continue
                        keep(ref, self._invoice(record, reference=ref))
        else:
            targets = set(wanted)
            for page in self.client.query_pages("Invoice"):
                for record in page:
                    ref = wire.note_value(record.get("PrivateNote"), wire.REFERENCE_TAG)
                    if ref in targets:
                        keep(ref, self._invoice(record, reference=ref))
        return found

    def _changed(self, entity: str, modified_since: dt.datetime | None) -> Iterator[dict[str, Any]]:
        """Records of ``entity`` changed since ``modified_since`` (all when None), deleted ones through CDC."""
        if modified_since is None:
            for page in self.client.query_pages(entity):
                yield from page
            return
        since = modified_since if modified_since.tzinfo else modified_since.replace(tzinfo=dt.UTC)
        since = since.replace(microsecond=0)
        if self.settings.use_cdc:
            changed = self.client.cdc([entity], since)
            if changed is not None:
                yield from sorted(changed[entity], key=lambda r: (
                    wire.parse_datetime((r.get("MetaData") or {}).get("LastUpdatedTime")) or since,
                    int(r["Id"]) if str(r.get("Id", "")).isdigit() else 0))
                return
        where = f"MetaData.LastUpdatedTime >= {wire.quote(wire.qbo_datetime(since))}"
        for page in self.client.query_pages(entity, where):
            yield from page

    def list_invoices(self, modified_since: dt.datetime | None = None) -> Iterator[Invoice]:
        for record in self._changed("Invoice", modified_since):
            yield self._invoice(record)

    def void_invoice(self, ledger_id: str, key: str) -> Invoice:
        """Void an invoice (``?operation=void`` with its current SyncToken, re-read once on Fault 5010)."""
        record = self.client.update("Invoice", ledger_id,
                                    lambda current: {"Id": current["Id"], "SyncToken": current["SyncToken"]},
                                    key=key, params={"operation": "void"})
        return self._invoice(record)

    # == payments ==================================================================================
    def list_payments(self, modified_since: dt.datetime | None = None) -> Iterator[Payment]:
        """The money received: one Payment per invoice a QuickBooks payment applies cash to. The part of a payment
        that applies a credit memo is not money received (it is in :meth:`list_credit_notes`); a payment that only
        applies credit yields nothing."""
        for record in self._changed("Payment", modified_since):
            yield from self._payments(record)

    def _payments(self, data: Mapping[str, Any]) -> list[Payment]:
        """The cash part of a QuickBooks payment, per invoice (deleted payments are skipped)."""
        if data.get("status") == "Deleted":
            return []
        try:
            day = _date(data.get("TxnDate"))
            if day is None:
                raise _shape_error("payment date")
            currency = _ref(data.get("CurrencyRef")) or self.home_currency()
            updated = wire.parse_datetime((data.get("MetaData") or {}).get("LastUpdatedTime"))
            invoices, credits = _applications(data)
            credited = [Decimal(0)] * len(invoices)
            for i, _memo, amount in _credit_pairs(invoices, credits):
                credited[i] += amount
            cash: dict[str, Decimal] = {}
            for (invoice_id, applied), credit in zip(invoices, credited, strict=True):
                if applied - credit > 0:
                    cash[invoice_id] = cash.get(invoice_id, Decimal(0)) + applied - credit
            payment_id = str(data["Id"])
            return [Payment(ledger_id=payment_id if len(cash) == 1 else f"{payment_id}:{invoice_id}",
                            invoice_ledger_id=invoice_id, amount=amount, currency=currency, date=day,
                            status="authorised", updated_at=updated)
                    for invoice_id, amount in cash.items()]
        except (KeyError, TypeError, AttributeError, ArithmeticError, ValidationError):
            raise _shape_error("payment") from None

    # == credit notes ==============================================================================
    def list_credit_notes(self, modified_since: dt.datetime | None = None) -> Iterator[CreditNote]:
        """Credit memos changed since ``modified_since``, and those a changed payment applies, each with every
        allocation its payments make (read from the payments the memo links and the payments that changed)."""
        memos = {str(r["Id"]): r for r in self._changed("CreditMemo", modified_since) if r.get("Id") is not None}
        payments = {str(r["Id"]): r for r in self._changed("Payment", modified_since)
                    if r.get("Id") is not None and r.get("status") != "Deleted"}
        named = {memo for p in payments.values() for memo, _amount in _applications(p)[1]}
        for record in self._by_ids("CreditMemo", sorted(named - memos.keys())):
            memos[str(record["Id"])] = record
        linked = {str(link["TxnId"]) for memo in memos.values() for link in memo.get("LinkedTxn") or []
                  if isinstance(link, Mapping) and link.get("TxnType") == "Payment" and link.get("TxnId")}
        for record in self._by_ids("Payment", sorted(linked - payments.keys())):
            payments[str(record["Id"])] = record
        allocations: dict[str, list[CreditAllocation]] = defaultdict(list)
        for payment in sorted(payments.values(), key=lambda p: (str(p.get("TxnDate") or ""), _num(p.get("Id")))):
            day = _date(payment.get("TxnDate"))
            if day is None:
                raise _shape_error("payment date")
            invoices, credits = _applications(payment)
            for i, memo, amount in _credit_pairs(invoices, credits):
                allocations[memo].append(CreditAllocation(invoice_ledger_id=invoices[i][0], amount=amount, date=day))
        ordered = sorted(memos.values(), key=lambda r: (
            wire.parse_datetime((r.get("MetaData") or {}).get("LastUpdatedTime")) or dt.datetime.min.replace(
                tzinfo=dt.UTC), _num(r.get("Id"))))
        for record in ordered:
            yield self._credit_note(record, allocations.get(str(record["Id"]), []))

    def _by_ids(self, entity: str, ids: Sequence[str]) -> Iterator[dict[str, Any]]:
        for start in range(0, len(ids), _LOOKUP_CHUNK):
            chunk = ids[start : start + _LOOKUP_CHUNK]
            where = f"Id IN ({', '.join(wire.quote(i) for i in chunk)})"
            for page in self.client.query_pages(entity, where):
                yield from page

    def _credit_note(self, data: Mapping[str, Any], allocations: list[CreditAllocation]) -> CreditNote:
        try:
            updated = wire.parse_datetime((data.get("MetaData") or {}).get("LastUpdatedTime"))
            if data.get("status") == "Deleted":
                day = updated.date() if updated else dt.date(1970, 1, 1)
                return CreditNote(ledger_id=str(data["Id"]), currency=self.home_currency(), issue_date=day,
                                  status="deleted", subtotal=Decimal(0), total=Decimal(0), updated_at=updated)
            issue = _date(data.get("TxnDate")) or (updated.date() if updated else None)
            if issue is None:
                raise _shape_error("credit memo date")
            total = _dec(data.get("TotalAmt")) or Decimal(0)
            tax = _dec((data.get("TxnTaxDetail") or {}).get("TotalTax")) or Decimal(0)
            remaining = _dec(data.get("RemainingCredit"))
            if remaining is None:
                remaining = _dec(data.get("Balance"))
            if remaining is None:
                remaining = total - sum((a.amount for a in allocations), Decimal(0))
            note = data.get("PrivateNote")
            voided = isinstance(note, str) and note.strip().lower().startswith("voided") and total == 0
            status = "voided" if voided else "paid" if (remaining == 0 and total > 0) else "authorised"
            return CreditNote(
                ledger_id=str(data["Id"]),
                number=str(data["DocNumber"]) if data.get("DocNumber") else None,
                customer_ledger_id=_ref(data.get("CustomerRef")),
                currency=_ref(data.get("CurrencyRef")) or self.home_currency(),
                issue_date=issue,
                status=status,
                subtotal=total - tax,
                total=total,
                remaining=remaining,
                credited_invoice_ledger_id=_ref(data.get("InvoiceRef")),
                allocations=[] if voided else allocations,
                exchange_rate=_rate(data.get("ExchangeRate")),
                updated_at=updated,
            )
        except (KeyError, TypeError, AttributeError, ArithmeticError, ValidationError):
            raise _shape_error("credit memo") from None

    # == expenses ==================================================================================
    def list_expenses(self, account_codes: Sequence[str], start: dt.date, end: dt.date) -> Iterator[ExpenseLine]:
        """Lines of expenses (``Purchase``: cash, cheque and card spend) and bills (``Bill``) dated within
        ``[start, end]`` whose ``AccountBasedExpenseLineDetail`` books them to one of ``account_codes``: an
        account's ``AcctNum``, or its ``Id`` when it has no number. A refund (``Purchase`` with ``Credit``)
        comes back negative; voided transactions (amounts zeroed by QuickBooks) give nothing."""
        wanted = set(account_codes)
        if not wanted:
            return
        codes: dict[str, str] = {}
        for page in self.client.query_pages("Account", "Active IN (true, false)"):
            for account in page:
                number = str(account.get("AcctNum") or "").strip()
                ident = str(account.get("Id") or "")
                if number and number in wanted:
                    codes[ident] = number
                elif not number and ident in wanted:
                    codes[ident] = ident
        if not codes:
            return
        where = f"TxnDate >= {wire.quote(start.isoformat())} AND TxnDate <= {wire.quote(end.isoformat())}"
        for entity in ("Purchase", "Bill"):
            for page in self.client.query_pages(entity, where):
                for record in page:
                    yield from self._expense_lines(entity, record, codes)

    def _expense_lines(self, entity: str, data: Mapping[str, Any], codes: Mapping[str, str]) -> Iterator[ExpenseLine]:
        if data.get("status") == "Deleted":
            return
        try:
            day = _date(data.get("TxnDate"))
            if day is None:
                raise _shape_error(f"{entity.lower()} date")
            currency = _ref(data.get("CurrencyRef")) or self.home_currency()
            sign = Decimal(-1) if entity == "Purchase" and data.get("Credit") is True else Decimal(1)
            memo = data.get("PrivateNote") or data.get("Memo")
            for n, line in enumerate(data.get("Line") or [], start=1):
                if not isinstance(line, Mapping) or line.get("DetailType") != "AccountBasedExpenseLineDetail":
                    continue
                detail = line.get("AccountBasedExpenseLineDetail") or {}
                code = codes.get(_ref(detail.get("AccountRef")) or "")
                amount = _dec(line.get("Amount"))
                if code is None or not amount:
                    continue
                yield ExpenseLine(
                    ledger_id=f"{entity}:{data['Id']}:{line.get('Id') or n}",
                    account_code=code,
                    date=day,
                    net=sign * amount,
                    currency=currency,
                    exchange_rate=_rate(data.get("ExchangeRate")),
                    description=str(line.get("Description") or memo or "") or None,
                )
        except (KeyError, TypeError, AttributeError, ArithmeticError, ValidationError):
            raise _shape_error(entity.lower()) from None

    # == organisation ==============================================================================
    def base_currency(self) -> str:
        """The company's home currency (``Preferences.CurrencyPrefs.HomeCurrency``)."""
        return self.home_currency()

    def invoice_url(self, invoice: Invoice) -> str | None:
        """The invoice in the QuickBooks web app (``app_url``/app/invoice?txnId=<Id>)."""
        if not invoice.ledger_id:
            return None
        return f"{self.settings.app_url.rstrip('/')}/app/invoice?txnId={invoice.ledger_id}"
