"""QuickBooks Online as a LedgerBridge ledger: customers, sales invoices and the payments applied to them.

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar

import httpx
import structlog
from pydantic import ValidationError

from config.schema import ConnectorSettings
from connectors.domain import Customer, Invoice, InvoiceLine, Payment
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
_DISPLAY_NAME_MAX = 100


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
        # A colon separates levels of the fully qualified name (Parent:Job), so it is kept out of names.
        return " ".join(text.replace(":", " -").split())[:_DISPLAY_NAME_MAX].strip()

    @staticmethod
    def _customer_body(number: str, customer: Customer, name: str) -> dict[str, Any]:
        notes = [f"{wire.NUMBER_TAG}{number}"]
        if customer.siret:
            notes.append(f"SIRET: {customer.siret}")
        elif customer.siren:
            notes.append(f"SIREN: {customer.siren}")
        body: dict[str, Any] = {"DisplayName": name, "CompanyName": customer.name.strip()[:100] or name,
                                "Notes": "\n".join(notes)}
        if customer.email:
            body["PrimaryEmailAddr"] = {"Address": customer.email}
        if customer.domain:
            body["WebAddr"] = {"URI": f"https://{customer.domain}"}
        if customer.vat_number:
            body["PrimaryTaxIdentifier"] = customer.vat_number[:20]
        if customer.currency:
            body["CurrencyRef"] = {"value": customer.currency}
        address = customer.address
        fields = {"Line1": address.line1, "Line2": address.line2, "City": address.city,
                  "PostalCode": address.postal_code, "CountrySubDivisionCode": address.region,
                  "Country": address.country or customer.country}
        if any(fields.values()):
            body["BillAddr"] = {k: v for k, v in fields.items() if v}
        return body

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
        for record in self._changed("Payment", modified_since):
            yield from self._payments(record)

    def _payments(self, data: Mapping[str, Any]) -> list[Payment]:
        """One Payment per invoice the QuickBooks payment is applied to (deleted payments are skipped)."""
        if data.get("status") == "Deleted":
            return []
        try:
            day = _date(data.get("TxnDate"))
            if day is None:
                raise _shape_error("payment date")
            currency = _ref(data.get("CurrencyRef")) or self.home_currency()
            updated = wire.parse_datetime((data.get("MetaData") or {}).get("LastUpdatedTime"))
            applied: list[tuple[str, Decimal]] = []
            for line in data.get("Line") or []:
                amount = _dec(line.get("Amount"))
                for link in line.get("LinkedTxn") or []:
                    if link.get("TxnType") == "Invoice" and link.get("TxnId") and amount is not None:
                        applied.append((str(link["TxnId"]), amount))
            payment_id = str(data["Id"])
            return [Payment(ledger_id=payment_id if len(applied) == 1 else f"{payment_id}:{invoice_id}",
                            invoice_ledger_id=invoice_id, amount=amount, currency=currency, date=day,
                            status="authorised", updated_at=updated)
                    for invoice_id, amount in applied]
        except (KeyError, TypeError, AttributeError, ArithmeticError, ValidationError):
            raise _shape_error("payment") from None
