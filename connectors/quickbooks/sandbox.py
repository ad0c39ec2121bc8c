"""A stateful simulator of the QuickBooks Online Accounting API v3, Intuit's OAuth2 endpoints and the limits.

One company (realm) seeded as a French SME's books, so that the demo's mappings work: one Item per product
of the seeded book's catalogue (``Name`` = ``Sku`` = SKU, income account 706 for services, 707 for goods),
tax codes ``2``..``5`` for French VAT at 20 / 10 / 5.5 / 2.1 % (and ``6``, exempt) each backed by one
TaxRate, home currency EUR with USD enabled.

What it reproduces, because clients depend on it:

- JSON shapes of the XSDs and the recorded payloads: ``{"Customer": {...}, "time": ...}``, references as
  ``{"value", "name"}``, ``QueryResponse{Entity: [...], startPosition, maxResults}`` and the empty
  ``"QueryResponse": {}``, ``MetaData.LastUpdatedTime`` as ``2024-03-01T00:00:00+01:00`` (company offset,
  seconds), Faults ``{"Fault": {"Error": [{Message, Detail, code, element}], "type"}, "time"}``;
- ``/query`` by GET (``?query=``) and by POST (``Content-Type: application/text``) with the SQL subset of
  :mod:`connectors.quickbooks.query`, only on the properties QuickBooks lets a query filter on (a filter on
  ``PrivateNote`` or ``Notes`` is refused, as by QuickBooks), inactive customers and items hidden unless
  ``Active`` is filtered, STARTPOSITION 1-based, MAXRESULTS at most 1000 (default 100);
- ``requestid`` on writes: the same id gets the original answer back, without applying anything again;
- ``SyncToken`` optimistic concurrency (a stale token is Fault 5010), ``sparse`` updates, invoice
  ``?operation=void`` and ``?operation=delete``;
- ``DisplayName`` unique across customers, vendors and employees (Fault 6240); ``DocNumber`` at most 21
  characters and unique among invoices (Fault 6140) unless ``allow_duplicate_doc_numbers``; automatic
  ``DocNumber`` (1001, 1002...) when none is sent;
- tax per line from TaxCode -> TaxRate, rounded per line then summed (``TxnTaxDetail.TotalTax``),
  ``TotalAmt`` and ``Balance``; multi-currency: an invoice is in its customer's currency; payments applied
  through ``Line[].LinkedTxn`` reduce the invoice's ``Balance``;
- ``/cdc?entities=...&changedSince=...``: 30-day look-back, at most 1,000 objects per answer (the oldest
  changes first), deleted objects as ``{"status": "Deleted", "Id", "MetaData"}``;
- credit memos (``POST/GET /creditmemo``, query, CDC) with ``Balance`` and ``RemainingCredit``; a credit memo is
  applied to an invoice, as in QuickBooks, by a payment whose lines link both (``TotalAmt`` is the cash only, 0
  when the credit covers all): the invoice's ``Balance`` and the memo's ``RemainingCredit`` go down together and
  each lists the payment in its ``LinkedTxn``;
- expenses (``Purchase``: cash, cheque and card spend, ``Credit`` for a refund) and supplier bills (``Bill``)
  with ``AccountBasedExpenseLineDetail`` lines booked to accounts; accounts (``POST /account``) carry ``AcctNum``;
- ``ExchangeRate`` on every transaction in home-currency units per foreign unit: the one sent, else the
  sandbox's rate of the transaction's month (:func:`exchange_rate`, deterministic);
- OAuth2: the OpenID discovery document (for intuit-oauth), the token endpoint (refresh_token grant, Basic
  or form client authentication, a new refresh token on every refresh unless ``rotate_refresh_tokens`` is
  off, ``x_refresh_token_expires_in``), bearer tokens that expire (401 AuthenticationFault 3200), the
  realm the token was issued for (403 otherwise);
- limits per realm on the sandbox clock: ``requests_per_minute`` (500) and ``concurrency`` (10) answered by
  429 Fault ``SERVICE`` 3001 ``ThrottleExceeded`` (``throttle_status=403`` for the older answer), with no
  ``Retry-After`` unless ``retry_after_header``.

History and settlement (for the demo and the metrics): :meth:`QuickBooksSandbox.load_history` writes a
:class:`~connectors.seedhistory.History` (customers, invoices, payments, credit memos applied to their
invoices, supplier bills) with the history's dates; :meth:`QuickBooksSandbox.settle` (and
``POST /_sandbox/settle {"today": "YYYY-MM-DD"}``) pays the open invoices as each customer's
:func:`~connectors.seedhistory.payment_plan` says, once per planned payment.

Not simulated: ``/batch``, estimates, ``DiscountLineDetail`` (a transaction-level discount; per-line
``DiscountRate`` is), sales-tax agencies, updates of credit memos, expenses and bills (they are created, and a
credit memo deleted), bill payments (a bill stays open), item-based expense lines. Chosen without a primary
source (verify against a QuickBooks sandbox company): the codes and wording of the 2020/2050/2080/2090/2500/6000
validation Faults and of the CDC refusals, the check that a line's ``Amount`` equals ``Qty x UnitPrice`` less the
discount, how long a ``requestid`` is remembered (``requestid_ttl_s``), that ``PrimaryTaxIdentifier`` reads back
unmasked, the refusals of a payment whose credit exceeds what its invoices take, that an applied credit memo lists
the payment in its ``LinkedTxn``, and the rates themselves (QuickBooks downloads market rates).
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import importlib
import json
import math
import random
import secrets
import threading
import zoneinfo
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs

from connectors import seedhistory
from connectors.domain import round_money
from connectors.quickbooks import wire
from connectors.quickbooks.query import QueryError, Select, lookup, parse, sort_key
from connectors.sandboxkit import (
    Clock,
    ConcurrencyGate,
    FaultPlan,
    Route,
    SandboxApp,
    SandboxRequest,
    SandboxResponse,
    WindowLimit,
)

if TYPE_CHECKING:
    from connectors.seedbook import Book, BookCompany
    from connectors.seedhistory import History, HistoryCreditNote, HistoryExpense, HistoryInvoice

__all__ = [
    "DEMO_CLIENT_ID",
    "DEMO_CLIENT_SECRET",
    "DEMO_REALM_ID",
    "DEMO_REFRESH_TOKEN",
    "TAX_CODES",
    "ItemSpec",
    "QuickBooksSandbox",
    "exchange_rate",
    "sandbox_settings",
]

#: The simulator's own app and company, which the demo and test configs name.
DEMO_REALM_ID = "9130355377426000"
DEMO_CLIENT_ID = "demo-quickbooks-client"
DEMO_CLIENT_SECRET = "demo-quickbooks-secret"  # public: the simulator's own test app
DEMO_REFRESH_TOKEN = "demo-quickbooks-refresh-token"

#: Tax codes of the seeded company: (TaxCode Id, name, rate %, TaxRate Id, TaxRate name).
TAX_CODES: tuple[tuple[str, str, Decimal, str, str], ...] = (
    ("2", "TVA 20 %", Decimal("20"), "3", "TVA collectée 20 %"),
    ("3", "TVA 10 %", Decimal("10"), "4", "TVA collectée 10 %"),
    ("4", "TVA 5,5 %", Decimal("5.5"), "5", "TVA collectée 5,5 %"),
    ("5", "TVA 2,1 %", Decimal("2.1"), "6", "TVA collectée 2,1 %"),
    ("6", "Exonéré", Decimal("0"), "7", "Exonération"),
)
# (Id, Name, AcctNum, AccountType, AccountSubType, Classification)
_ACCOUNTS: tuple[tuple[str, str, str, str, str, str], ...] = (
    ("1", "Prestations de services", "706", "Income", "ServiceFeeIncome", "Revenue"),
    ("2", "Ventes de marchandises", "707", "Income", "SalesOfProductIncome", "Revenue"),
    ("3", "Clients", "411", "Accounts Receivable", "AccountsReceivable", "Asset"),
    ("4", "Banque", "512", "Bank", "Checking", "Asset"),
    ("5", "TVA collectée", "44571", "Other Current Liability", "GlobalTaxPayable", "Liability"),
    ("6", "Fournisseurs", "401", "Accounts Payable", "AccountsPayable", "Liability"),
    ("7", "Publicité, annonces et insertions", "6231", "Expense", "AdvertisingPromotional", "Expense"),
    ("8", "Honoraires", "6226", "Expense", "LegalProfessionalFees", "Expense"),
    ("9", "Logiciels et abonnements", "6516", "Expense", "OfficeGeneralAdministrativeExpenses", "Expense"),
    ("10", "Carte bancaire", "5121", "Credit Card", "CreditCard", "Liability"),
)
_CURRENCY_NAMES = {"EUR": "Euro", "USD": "United States Dollar", "GBP": "British Pound Sterling"}
#: Home-currency (EUR) units for one foreign unit (QuickBooks' ExchangeRate convention), before the monthly drift.
_EXCHANGE = {"EUR": Decimal("1"), "USD": Decimal("0.925926"), "GBP": Decimal("1.17")}
_RATE_STEP = Decimal("0.000001")


def exchange_rate(currency: str, day: dt.date, home: str = "EUR") -> Decimal:
    """The sandbox's rate of ``currency`` on ``day``: home-currency units for one unit, the base rate moved by a
    fixed drift of the month (-1.25 % .. +1.25 %), so that documents of different months carry different rates and
    every run gives the same ones. 1 for the home currency."""
    if currency == home:
        return Decimal(1)
    base = _EXCHANGE.get(currency, Decimal(1)) / _EXCHANGE.get(home, Decimal(1))
    month = day.year * 12 + day.month
    drift = Decimal((month * 7) % 11 - 5) / Decimal(400)
    return (base * (Decimal(1) + drift)).quantize(_RATE_STEP)
_GOODS_PREFIXES = ("HW-", "BOOK-", "PRESS-")

# Which properties a query may filter or sort on, per entity (QuickBooks refuses the others).
_META = {"Id", "MetaData.CreateTime", "MetaData.LastUpdatedTime"}
_QUERYABLE: dict[str, set[str]] = {
    "Customer": _META | {"DisplayName", "GivenName", "MiddleName", "FamilyName", "Suffix", "FullyQualifiedName",
                         "CompanyName", "PrintOnCheckName", "PrimaryEmailAddr", "Active", "Balance", "Job"},
    "Invoice": _META | {"DocNumber", "TxnDate", "DueDate", "CustomerRef", "Balance", "TotalAmt"},
    "Payment": _META | {"TxnDate", "CustomerRef", "TotalAmt"},
    "CreditMemo": _META | {"DocNumber", "TxnDate", "CustomerRef", "Balance", "TotalAmt"},
    "Purchase": _META | {"TxnDate", "PaymentType", "EntityRef", "AccountRef", "TotalAmt", "DocNumber"},
    "Bill": _META | {"DocNumber", "TxnDate", "DueDate", "VendorRef", "Balance", "TotalAmt"},
    "Item": _META | {"Name", "Sku", "Type", "Active", "Description", "FullyQualifiedName"},
    "TaxCode": {"Id", "Name", "Active"},
    "TaxRate": {"Id", "Name", "Active", "RateValue"},
    "Account": _META | {"Name", "AcctNum", "AccountType", "Classification", "Active", "FullyQualifiedName"},
    "Vendor": _META | {"DisplayName", "CompanyName", "Active"},
    "Employee": _META | {"DisplayName", "GivenName", "FamilyName", "Active"},
    "CompanyInfo": {"Id"},
    "Preferences": {"Id"},
}
_ACTIVE_DEFAULT = {"Customer", "Item", "Account", "Vendor", "Employee", "TaxCode", "TaxRate"}
_CDC_ENTITIES = {"Customer", "Invoice", "Payment", "CreditMemo", "Purchase", "Bill", "Item", "Account", "Vendor",
                 "Employee"}
_PAYMENT_TYPES = ("Cash", "Check", "CreditCard")
_QUERY_DEFAULT_MAX = 100


class ItemSpec(Protocol):
    """What the sandbox needs of a catalogue product (``seedbook.BookProduct`` fits)."""

    @property
    def sku(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def unit_price(self) -> Decimal: ...

    @property
    def tax_rate(self) -> Decimal: ...


def sandbox_settings(url: str, *, time_scale: float = 1.0, refresh_token: str = DEMO_REFRESH_TOKEN,
                     realm_id: str = DEMO_REALM_ID) -> dict[str, Any]:
    """The ``ledger:`` block that points :class:`~connectors.quickbooks.QuickBooksLedger` at a sandbox at ``url``.

    The demo refresh token is the one a sandbox built with ``initial_refresh_token=DEMO_REFRESH_TOKEN``
    accepts once; after it, the rotated tokens live in the state store.
    """
    return {"type": "quickbooks", "base_url": url, "token_url": url.rstrip("/") + "/oauth2/v1/tokens/bearer",
            "realm_id": realm_id, "client_id": DEMO_CLIENT_ID, "client_secret": DEMO_CLIENT_SECRET,
            "refresh_token": refresh_token, "time_scale": time_scale}


def _book_products() -> Sequence[ItemSpec]:
    module = importlib.import_module("connectors.seedbook")
    products: Sequence[ItemSpec] = module.PRODUCTS
    return products


class _Fault(Exception):
    """A Fault answer: raised inside a handler, rendered by :meth:`QuickBooksSandbox._fault`."""

    def __init__(self, code: str, message: str, detail: str = "", *, element: str = "", status: int = 400,
                 fault_type: str = "ValidationFault") -> None:
        super().__init__(f"{code} {message}: {detail}")
        self.code = code
        self.message = message
        self.detail = detail
        self.element = element
        self.status = status
        self.fault_type = fault_type


def _invalid_ref(what: str, ref: Any) -> _Fault:
    return _Fault("2500", "Invalid Reference Id", f"Invalid Reference Id : {what} element id {ref} not found",
                  element=what)


def _business(detail: str) -> _Fault:
    return _Fault("6000", "A business validation error has occurred while processing your request",
                  f"Business Validation Error: {detail}")


def _length(field: str, maximum: int, supplied: int) -> _Fault:
    return _Fault("2050", "String length is either shorter or longer than supported by specification",
                  f"String length specified does not match the supported length. Min:0 Max:{maximum} "
                  f"supplied:{supplied}", element=field)


def _missing(field: str) -> _Fault:
    return _Fault("2020", "Required param missing, need to supply the required value for the API",
                  f"Required parameter {field} is missing in the request", element=field)


def _dec(value: Any, field: str) -> Decimal:
    if isinstance(value, bool) or value is None or value == "":
        raise _Fault("2090", "Invalid Number", f"Invalid Number : {field}", element=field)
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise _Fault("2090", "Invalid Number", f"Invalid Number : {field}", element=field) from None
    if not number.is_finite():
        raise _Fault("2090", "Invalid Number", f"Invalid Number : {field}", element=field)
    return number


def _ref_value(raw: Any) -> str | None:
    if isinstance(raw, Mapping):
        value = raw.get("value")
        return str(value) if value not in (None, "") else None
    if isinstance(raw, str | int) and not isinstance(raw, bool):
        return str(raw)
    return None


def _strip(obj: Any) -> Any:
    """The record as the API shows it: internal ``_`` keys removed, recursively, deep-copied."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


@dataclass
class _RefreshGrant:
    issued_at: float
    used_at: float | None = None
    revoked: bool = False


@dataclass
class _Replay:
    fingerprint: str
    status: int
    body: bytes
    headers: dict[str, str]
    at: float


class QuickBooksSandbox(SandboxApp):
    """The QuickBooks Online simulator. See the module docstring for what it reproduces.

    Options (keyword-only): ``realm_id`` (:data:`DEMO_REALM_ID`), ``company_name``; ``client_id`` and
    ``client_secret`` of the one registered app (:data:`DEMO_CLIENT_ID`/:data:`DEMO_CLIENT_SECRET`);
    ``initial_refresh_token`` (else :meth:`issue_tokens` or ``POST /_sandbox/authorize`` makes one);
    ``rotate_refresh_tokens`` (True: every refresh answers a new refresh token and the old one dies after
    ``refresh_grace_s``, 0); ``access_token_ttl_s`` (3600), ``refresh_token_ttl_s`` (100 days);
    ``requests_per_minute`` (500), ``concurrency`` (10), ``throttle_status`` (429, or 403 as older answers),
    ``retry_after_header`` (False); ``requestid_ttl_s`` (7 days virtual); ``cdc_max_objects`` (1000),
    ``cdc_lookback_days`` (30); ``allow_duplicate_doc_numbers`` (False); ``auto_doc_numbers`` (True);
    ``timezone`` (Europe/Paris: the offset of the timestamps); ``items`` (catalogue, default
    ``seedbook.PRODUCTS``); ``currencies`` (EUR home, USD).
    """

    vendor = "quickbooks"
    state_attrs = (
        "_rng", "realm_id", "_created_at", "_refresh", "_access", "_replays", "_seq", "_doc_seq", "_customers",
        "_invoices", "_payments", "_items", "_tax_codes", "_tax_rates", "_accounts", "_vendors", "_employees",
        "_tombstones", "refresh_calls", "refresh_rejected", "requestid_replays", "requestid_conflicts",
        "_credit_memos", "_purchases", "_bills", "currencies", "_history_customers", "_history_names",
        "_history_profiles", "_history_keys", "_settled",
    )

    def __init__(
        self,
        *,
        seed: int = 0,
        faults: str | FaultPlan | None = None,
        clock: Clock | None = None,
        realm_id: str = DEMO_REALM_ID,
        company_name: str = "Atelier Numérique SAS",
        client_id: str = DEMO_CLIENT_ID,
        client_secret: str = DEMO_CLIENT_SECRET,
        initial_refresh_token: str | None = None,
        rotate_refresh_tokens: bool = True,
        refresh_grace_s: float = 0.0,
        access_token_ttl_s: float = 3600.0,
        refresh_token_ttl_s: float = 100 * 86400.0,
        requests_per_minute: int = 500,
        concurrency: int = 10,
        throttle_status: int = 429,
        retry_after_header: bool = False,
        requestid_ttl_s: float = 7 * 86400.0,
        cdc_max_objects: int = 1000,
        cdc_lookback_days: int = 30,
        allow_duplicate_doc_numbers: bool = False,
        auto_doc_numbers: bool = True,
        timezone: str = "Europe/Paris",
        items: Iterable[ItemSpec] | None = None,
        currencies: Sequence[str] = ("EUR", "USD"),
    ) -> None:
        super().__init__(seed=seed, faults=faults, clock=clock)
        self._rng = random.Random(seed)
        self.realm_id = realm_id
        self.company_name = company_name
        self.client_id = client_id
        self._client_secret = client_secret
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.refresh_grace_s = refresh_grace_s
        self.access_token_ttl_s = access_token_ttl_s
        self.refresh_token_ttl_s = refresh_token_ttl_s
        self.throttle_status = throttle_status
        self.retry_after_header = retry_after_header
        self.requestid_ttl_s = requestid_ttl_s
        self.cdc_max_objects = cdc_max_objects
        self.cdc_lookback_days = cdc_lookback_days
        self.allow_duplicate_doc_numbers = allow_duplicate_doc_numbers
        self.auto_doc_numbers = auto_doc_numbers
        self.tz = zoneinfo.ZoneInfo(timezone)
        self.home_currency = currencies[0]
        self.currencies = tuple(currencies)
        self._created_at = self.clock.now()

        self._minute = WindowLimit(self.clock, requests_per_minute, 60.0, "minute")
        self._gate = ConcurrencyGate(concurrency)
        self._rate_lock = threading.Lock()
        self._in_gate: set[int] = set()
        self.throttled = 0

        self._auth_lock = threading.RLock()
        self._refresh: dict[str, _RefreshGrant] = {}
        self._access: dict[str, float] = {}
        self.refresh_calls = 0
        self.refresh_rejected = 0
        self.requestid_replays = 0
        self.requestid_conflicts = 0
        self._replays: dict[str, _Replay] = {}

        self._seq: dict[str, int] = {}
        self._doc_seq = 1000
        self._customers: dict[str, dict[str, Any]] = {}
        self._invoices: dict[str, dict[str, Any]] = {}
        self._payments: dict[str, dict[str, Any]] = {}
        self._vendors: dict[str, dict[str, Any]] = {}
        self._employees: dict[str, dict[str, Any]] = {}
        self._credit_memos: dict[str, dict[str, Any]] = {}
        self._purchases: dict[str, dict[str, Any]] = {}
        self._bills: dict[str, dict[str, Any]] = {}
        self._tombstones: list[tuple[str, str, float]] = []  # (entity, Id, when)
        # History and settlement: customer Id -> book company id, company name (casefolded) -> company id,
        # company id -> payer profile, invoice Id -> the key its payment plan is drawn for, invoice Id -> planned
        # payments already made.
        self._history_customers: dict[str, str] = {}
        self._history_names: dict[str, str] = {}
        self._history_profiles: dict[str, Any] = {}
        self._history_keys: dict[str, tuple[str, dt.date]] = {}
        self._settled: dict[str, int] = {}
        self._backdate: float | None = None  # while history is written: the time records are stamped with
        self._seed_company(items)
        if initial_refresh_token:
            self._refresh[initial_refresh_token] = _RefreshGrant(issued_at=self.clock.now())
        self._register_routes()

    # == time and ids ==============================================================================
    def _next_id(self, entity: str) -> str:
        self._seq[entity] = self._seq.get(entity, 0) + 1
        return str(self._seq[entity])

    def _record_time(self) -> float:
        """When a record written now says it was written: the sandbox clock, or the day history is written for."""
        return self.clock.now() if self._backdate is None else self._backdate

    def _now(self) -> float:
        return math.floor(self._record_time())

    def _stamp(self, when: float | None = None) -> str:
        instant = dt.datetime.fromtimestamp(math.floor(self._record_time() if when is None else when), tz=dt.UTC)
        return wire.qbo_datetime(instant, self.tz)

    def _time(self) -> str:
        instant = dt.datetime.fromtimestamp(self.clock.now(), tz=dt.UTC)
        return wire.qbo_datetime(instant, self.tz, millis=True)

    def _today(self) -> dt.date:
        return dt.datetime.fromtimestamp(self.clock.now(), tz=self.tz).date()

    def _meta(self) -> dict[str, str]:
        stamp = self._stamp()
        return {"CreateTime": stamp, "LastUpdatedTime": stamp}

    def _touch(self, record: dict[str, Any], *, bump: bool = True) -> None:
        record["MetaData"]["LastUpdatedTime"] = self._stamp()
        record["_t"] = self._now()
        if bump:
            record["SyncToken"] = str(int(record["SyncToken"]) + 1)

    def _currency_ref(self, code: str) -> dict[str, str]:
        return {"value": code, "name": _CURRENCY_NAMES.get(code, code)}

    # == seeding ===================================================================================
    def _seed_company(self, items: Iterable[ItemSpec] | None) -> None:
        t = self._now()
        meta = self._meta()
        self._accounts: dict[str, dict[str, Any]] = {}
        for acct_id, name, number, kind, sub, classification in _ACCOUNTS:
            self._accounts[acct_id] = {
                "Id": acct_id, "SyncToken": "0", "domain": "QBO", "sparse": False, "MetaData": dict(meta),
                "Name": name, "AcctNum": number, "FullyQualifiedName": name, "Active": True, "SubAccount": False,
                "Classification": classification, "AccountType": kind, "AccountSubType": sub,
                "CurrentBalance": Decimal("0"), "CurrentBalanceWithSubAccounts": Decimal("0"),
                "CurrencyRef": self._currency_ref(self.home_currency), "_t": t,
            }
        self._seq["Account"] = len(_ACCOUNTS)
        self._tax_rates: dict[str, dict[str, Any]] = {}
        self._tax_codes: dict[str, dict[str, Any]] = {}
        for code_id, name, rate, rate_id, rate_name in TAX_CODES:
            self._tax_rates[rate_id] = {
                "Id": rate_id, "SyncToken": "0", "domain": "QBO", "sparse": False, "MetaData": dict(meta),
                "Name": rate_name, "Description": rate_name, "Active": True, "RateValue": rate,
                "AgencyRef": {"value": "1"}, "SpecialTaxType": "NONE" if rate else "ZERO_RATE",
                "DisplayType": "ReadOnly", "EffectiveTaxRate": [{"RateValue": rate, "EffectiveDate": "2014-01-01"}],
                "_t": t,
            }
            self._tax_codes[code_id] = {
                "Id": code_id, "SyncToken": "0", "domain": "QBO", "sparse": False, "MetaData": dict(meta),
                "Name": name, "Description": name, "Active": True, "Hidden": False, "Taxable": bool(rate),
                "TaxGroup": False,
                "SalesTaxRateList": {"TaxRateDetail": [{"TaxRateRef": {"value": rate_id, "name": rate_name},
                                                        "TaxTypeApplicable": "TaxOnAmount", "TaxOrder": 0}]},
                "PurchaseTaxRateList": {"TaxRateDetail": []},
                "_t": t,
            }
        by_rate = {rate: code_id for code_id, _n, rate, _r, _rn in TAX_CODES}
        products = list(items) if items is not None else list(_book_products())
        self._items: dict[str, dict[str, Any]] = {}
        for product in products:
            item_id = self._next_id("Item")
            goods = product.sku.startswith(_GOODS_PREFIXES)
            account = self._accounts["2" if goods else "1"]
            self._items[item_id] = {
                "Id": item_id, "SyncToken": "0", "domain": "QBO", "sparse": False, "MetaData": dict(meta),
                "Name": product.sku, "Sku": product.sku, "Description": product.name, "Active": True,
                "FullyQualifiedName": product.sku, "Taxable": True, "UnitPrice": Decimal(product.unit_price),
                "Type": "NonInventory" if goods else "Service",
                "IncomeAccountRef": {"value": account["Id"], "name": account["Name"]},
                "SalesTaxCodeRef": {"value": by_rate.get(Decimal(product.tax_rate), "2")},
                "PurchaseCost": Decimal("0"), "TrackQtyOnHand": False, "_t": t,
            }
        vendor_id = self._next_id("Vendor")
        self._vendors[vendor_id] = {
            "Id": vendor_id, "SyncToken": "0", "domain": "QBO", "sparse": False, "MetaData": dict(meta),
            "DisplayName": "Fournitures de Bureau Martin", "CompanyName": "Fournitures de Bureau Martin",
            "PrintOnCheckName": "Fournitures de Bureau Martin", "Active": True, "Balance": Decimal("0"), "_t": t,
        }
        employee_id = self._next_id("Employee")
        self._employees[employee_id] = {
            "Id": employee_id, "SyncToken": "0", "domain": "QBO", "sparse": False, "MetaData": dict(meta),
            "DisplayName": "Camille Durand", "GivenName": "Camille", "FamilyName": "Durand",
            "PrintOnCheckName": "Camille Durand", "Active": True, "_t": t,
        }

    # == routes ====================================================================================
    def _register_routes(self) -> None:
        p = "/v3/company/{realm}"
        for name in ("openid_configuration", "openid_sandbox_configuration"):
            self.route("GET", f"/.well-known/{name}", self._discovery)
        self.route("POST", "/oauth2/v1/tokens/bearer", self._token)
        self.route("POST", "/v2/oauth2/tokens/revoke", self._revoke)
        self.route("GET", f"{p}/companyinfo/{{id}}", self._company_info)
        self.route("GET", f"{p}/preferences", lambda r: self._ok({"Preferences": self._preferences()}))
        self.route("GET", f"{p}/query", self._query)
        self.route("POST", f"{p}/query", self._query, is_write=False)
        self.route("GET", f"{p}/cdc", self._cdc)
        self.route("POST", f"{p}/customer", lambda r: self._write(r, self._post_customer))
        self.route("GET", f"{p}/customer/{{id}}", lambda r: self._get_one(r, "Customer", self._customers))
        self.route("POST", f"{p}/invoice", lambda r: self._write(r, self._post_invoice))
        self.route("GET", f"{p}/invoice/{{id}}", lambda r: self._get_one(r, "Invoice", self._live_invoices()))
        self.route("POST", f"{p}/payment", lambda r: self._write(r, self._post_payment))
        self.route("GET", f"{p}/payment/{{id}}", lambda r: self._get_one(r, "Payment", self._payments))
        self.route("GET", f"{p}/item/{{id}}", lambda r: self._get_one(r, "Item", self._items))
        self.route("GET", f"{p}/taxcode/{{id}}", lambda r: self._get_one(r, "TaxCode", self._tax_codes))
        self.route("GET", f"{p}/taxrate/{{id}}", lambda r: self._get_one(r, "TaxRate", self._tax_rates))
        self.route("GET", f"{p}/account/{{id}}", lambda r: self._get_one(r, "Account", self._accounts))
        self.route("POST", f"{p}/account", lambda r: self._write(r, self._post_account))
        self.route("POST", f"{p}/creditmemo", lambda r: self._write(r, self._post_credit_memo))
        self.route("GET", f"{p}/creditmemo/{{id}}", lambda r: self._get_one(r, "CreditMemo", self._live_memos()))
        self.route("POST", f"{p}/purchase", lambda r: self._write(r, self._post_purchase))
        self.route("GET", f"{p}/purchase/{{id}}", lambda r: self._get_one(r, "Purchase", self._purchases))
        self.route("POST", f"{p}/bill", lambda r: self._write(r, self._post_bill))
        self.route("GET", f"{p}/bill/{{id}}", lambda r: self._get_one(r, "Bill", self._bills))
        self.route("GET", f"{p}/vendor/{{id}}", lambda r: self._get_one(r, "Vendor", self._vendors))

    # == responses =================================================================================
    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> SandboxResponse:
        h = {"Content-Type": "application/json;charset=UTF-8", "intuit_tid": secrets.token_hex(12)}
        if headers:
            h.update(headers)
        return SandboxResponse(status, wire.dumps(payload).encode(), h)

    def _ok(self, payload: dict[str, Any]) -> SandboxResponse:
        return self._json(200, {**payload, "time": self._time()})

    def _fault(self, fault: _Fault) -> SandboxResponse:
        error = {"Message": fault.message, "Detail": fault.detail, "code": fault.code, "element": fault.element}
        return self._json(fault.status, {"Fault": {"Error": [error], "type": fault.fault_type}, "time": self._time()})

    def _throttled(self) -> SandboxResponse:
        status = self.throttle_status
        resp = self._fault(_Fault("3001", f"message=ThrottleExceeded; errorCode=003001; statusCode={status}",
                                  "The request limit was reached.  Try again later", status=status,
                                  fault_type="SERVICE"))
        if self.retry_after_header:
            resp.headers["Retry-After"] = f"{max(self.clock.to_real(60.0), 0.001):.3f}".rstrip("0").rstrip(".")
        return resp

    def not_found(self, req: SandboxRequest) -> SandboxResponse:
        return self._fault(_Fault("10000", "An application error has occurred while processing your request",
                                  f"System Failure Error: Could not find resource for relative : {req.path}",
                                  status=404 if not req.path.startswith("/v3/") else 400,
                                  fault_type="SystemFault"))

    def fault_response(self, req: SandboxRequest, kind: str) -> SandboxResponse:
        if kind == "429":
            return self._throttled()
        return self._fault(_Fault("10000", "An application error has occurred while processing your request",
                                  "System Failure Error: the service is temporarily unavailable",
                                  status=int(kind), fault_type="SystemFault"))

    # == auth ======================================================================================
    def is_exempt(self, req: SandboxRequest) -> bool:
        return not req.path.startswith("/v3/")

    def authorize(self, req: SandboxRequest) -> SandboxResponse | None:
        if not req.path.startswith("/v3/"):
            return None
        auth = req.header("authorization") or ""
        scheme, _, token = auth.partition(" ")
        with self._auth_lock:
            expires_at = self._access.get(token.strip()) if scheme.lower() == "bearer" else None
        if expires_at is None or expires_at <= self.clock.now():
            detail = "Token expired" if expires_at is not None else "Token revocation or invalid token"
            resp = self._fault(_Fault("3200", "message=AuthenticationFailed; errorCode=003200; statusCode=401",
                                      detail, status=401, fault_type="AuthenticationFault"))
            resp.headers["WWW-Authenticate"] = 'Bearer realm="Intuit", error="invalid_token"'
            return resp
        if req.params.get("realm") != self.realm_id:
            return self._fault(_Fault("3100",
                                      "message=ApplicationAuthorizationFailed; errorCode=003100; statusCode=403",
                                      "", status=403, fault_type="SERVICE"))
        return None

    # == limits ====================================================================================
    def pre_request(self, req: SandboxRequest, route: Route) -> SandboxResponse | None:
        if not req.path.startswith("/v3/"):
            return None
        if not self._gate.enter():
            with self._rate_lock:
                self.throttled += 1
            return self._throttled()
        with self._rate_lock:
            self._in_gate.add(id(req))
            allowed, _left, _wait = self._minute.try_acquire()
            if not allowed:
                self.throttled += 1
        return None if allowed else self._throttled()

    def handle(self, req: SandboxRequest) -> SandboxResponse:
        try:
            return super().handle(req)
        finally:
            with self._rate_lock:
                entered = id(req) in self._in_gate
                self._in_gate.discard(id(req))
            if entered:
                self._gate.leave()

    # == identity ==================================================================================
    def _discovery(self, req: SandboxRequest) -> SandboxResponse:
        base = req.base_url.rstrip("/")
        return self._json(200, {
            "issuer": "https://oauth.platform.intuit.com/op/v1",
            "authorization_endpoint": f"{base}/connect/oauth2",
            "token_endpoint": f"{base}/oauth2/v1/tokens/bearer",
            "userinfo_endpoint": f"{base}/v1/openid_connect/userinfo",
            "revocation_endpoint": f"{base}/v2/oauth2/tokens/revoke",
            "jwks_uri": f"{base}/op/v1/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid", "email", "profile", "address", "phone"],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
            "claims_supported": ["aud", "exp", "iat", "iss", "realmid", "sub"],
        })

    def _form(self, req: SandboxRequest) -> dict[str, list[str]]:
        try:
            return parse_qs(req.body.decode(), keep_blank_values=True)
        except UnicodeDecodeError:
            return {}

    def _client_ok(self, req: SandboxRequest, form: Mapping[str, list[str]]) -> bool:
        scheme, _, value = (req.header("authorization") or "").partition(" ")
        if scheme.lower() == "basic":
            try:
                client_id, _, secret = base64.b64decode(value.strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
        else:
            client_id = form["client_id"][-1] if form.get("client_id") else ""
            secret = form["client_secret"][-1] if form.get("client_secret") else ""
        return secrets.compare_digest(client_id, self.client_id) and secrets.compare_digest(
            secret, self._client_secret)

    def _new_access_locked(self) -> str:
        now = self.clock.now()
        for stale in [t for t, exp in self._access.items() if exp < now - 86400]:
            del self._access[stale]
        header = base64.urlsafe_b64encode(b'{"alg":"dir","enc":"A128CBC-HS256"}').rstrip(b"=")
        claims = base64.urlsafe_b64encode(json.dumps({"realmid": self.realm_id, "exp": int(
            now + self.access_token_ttl_s), "jti": secrets.token_hex(12)}).encode()).rstrip(b"=")
        tail = base64.urlsafe_b64encode(secrets.token_bytes(24)).rstrip(b"=")
        access = b".".join((header, claims, tail)).decode()
        self._access[access] = now + self.access_token_ttl_s
        return access

    def _token_payload(self, access: str, refresh: str, grant: _RefreshGrant) -> dict[str, Any]:
        left = grant.issued_at + self.refresh_token_ttl_s - self.clock.now()
        return {"token_type": "bearer", "expires_in": int(self.access_token_ttl_s), "refresh_token": refresh,
                "x_refresh_token_expires_in": max(int(left), 0), "access_token": access}

    def _token(self, req: SandboxRequest) -> SandboxResponse:
        form = self._form(req)
        if not self._client_ok(req, form):
            return self._json(401, {"error": "invalid_client"})
        if (form.get("grant_type") or [""])[-1] != "refresh_token":
            return self._json(400, {"error": "unsupported_grant_type"})
        token = (form.get("refresh_token") or [""])[-1]
        with self._auth_lock:
            self.refresh_calls += 1
            grant = self._refresh.get(token)
            now = self.clock.now()
            if (grant is None or grant.revoked or now >= grant.issued_at + self.refresh_token_ttl_s
                    or (grant.used_at is not None and now >= grant.used_at + self.refresh_grace_s
                        and self.rotate_refresh_tokens)):
                self.refresh_rejected += 1
                return self._json(400, {"error": "invalid_grant"})
            if self.rotate_refresh_tokens:
                if grant.used_at is None:
                    grant.used_at = now
                refresh = "AB11" + secrets.token_hex(23)
                new_grant = _RefreshGrant(issued_at=now)
                self._refresh[refresh] = new_grant
            else:
                refresh, new_grant = token, grant
            payload = self._token_payload(self._new_access_locked(), refresh, new_grant)
        return self._json(200, payload, {"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _revoke(self, req: SandboxRequest) -> SandboxResponse:
        scheme, _, _value = (req.header("authorization") or "").partition(" ")
        if scheme.lower() != "basic" or not self._client_ok(req, {}):
            return self._json(401, {"error": "invalid_client"})
        try:
            token = str((json.loads(req.body or b"{}") or {}).get("token") or "")
        except (ValueError, AttributeError):
            token = ""
        with self._auth_lock:
            grant = self._refresh.get(token)
            if grant is not None:
                grant.revoked = True
            self._access.pop(token, None)
        return SandboxResponse(200, b"", {})

    # == idempotent writes =========================================================================
    def _write(self, req: SandboxRequest, apply: Callable[[SandboxRequest], SandboxResponse]) -> SandboxResponse:
        key = (req.arg("requestid") or "").strip()
        with self.lock:
            if not key:
                return self._applied(req, apply)
            if len(key) > 50:
                return self._fault(_length("requestid", 50, len(key)))
            now = self.clock.now()
            for stale in [k for k, v in self._replays.items() if v.at + self.requestid_ttl_s <= now]:
                del self._replays[stale]
            fingerprint = f"{req.path}?{req.arg('operation') or ''}:{hashlib.sha256(req.body).hexdigest()}"
            stored = self._replays.get(key)
            if stored is not None:
                # QuickBooks answers a known requestid with the original response whatever the new body says;
                # the count of such mismatches shows a client reusing ids for different requests.
                self.requestid_replays += 1
                if stored.fingerprint != fingerprint:
                    self.requestid_conflicts += 1
                return SandboxResponse(stored.status, stored.body, dict(stored.headers))
            resp = self._applied(req, apply)
            if resp.status < 500 and resp.status not in (401, 403, 429):
                self._replays[key] = _Replay(fingerprint, resp.status, resp.body, dict(resp.headers), now)
            return resp

    def _applied(self, req: SandboxRequest, apply: Callable[[SandboxRequest], SandboxResponse]) -> SandboxResponse:
        try:
            return apply(req)
        except _Fault as fault:
            return self._fault(fault)

    def _body(self, req: SandboxRequest) -> dict[str, Any]:
        try:
            body = wire.loads(req.body) if req.body else None
        except (ValueError, UnicodeDecodeError):
            raise _Fault("2010", "Request has invalid or unsupported property",
                         "The request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _Fault("2010", "Request has invalid or unsupported property", "The request body must be an object")
        return body

    def _stale(self, record: Mapping[str, Any], body: Mapping[str, Any]) -> None:
        if "SyncToken" not in body:
            raise _missing("SyncToken")
        if str(body["SyncToken"]) != record["SyncToken"]:
            raise _Fault("5010", "Stale Object Error",
                         "Stale Object Error : You and another user were working on the same thing. "
                         "Please try again.")

    # == reads =====================================================================================
    def _get_one(self, req: SandboxRequest, entity: str, records: Mapping[str, dict[str, Any]]) -> SandboxResponse:
        with self.lock:
            record = records.get(req.params["id"])
            if record is None:
                return self._fault(_Fault("610", "Object Not Found",
                                          f"Object Not Found : Something you're trying to use has been made "
                                          f"inactive. Check the fields with accounts, customers, items, vendors "
                                          f"or employees. ({entity} {req.params['id']})"))
            return self._ok({entity: _strip(record)})

    def _live_invoices(self) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self._invoices.items() if v["_status"] != "deleted"}

    def _live_memos(self) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self._credit_memos.items() if v["_status"] != "deleted"}

    def _company_info(self, req: SandboxRequest) -> SandboxResponse:
        if req.params["id"] != self.realm_id:
            return self.not_found(req)
        return self._ok({"CompanyInfo": self._company()})

    def _company(self) -> dict[str, Any]:
        created = self._stamp(self._created_at)
        return {
            "Id": "1", "SyncToken": "0", "domain": "QBO", "sparse": False,
            "MetaData": {"CreateTime": created, "LastUpdatedTime": created},
            "CompanyName": self.company_name, "LegalName": self.company_name, "Country": "FR",
            "CompanyAddr": {"Id": "1", "Line1": "12 rue de la République", "City": "Lyon", "PostalCode": "69002",
                            "Country": "FR"},
            "SupportedLanguages": "fr", "FiscalYearStartMonth": "January", "CompanyStartDate": "2023-01-01",
            "NameValue": [{"Name": "QBOIndustryType", "Value": "Services informatiques"}],
        }

    def _preferences(self) -> dict[str, Any]:
        return {
            "Id": "1", "SyncToken": "0", "domain": "QBO", "sparse": False,
            "MetaData": {"CreateTime": self._stamp(self._created_at), "LastUpdatedTime": self._stamp(self._created_at)},
            "CurrencyPrefs": {"HomeCurrency": {"value": self.home_currency}, "MultiCurrencyEnabled":
                              len(self.currencies) > 1},
            "TaxPrefs": {"UsingSalesTax": True, "PartnerTaxEnabled": False},
            "SalesFormsPrefs": {"CustomTxnNumbers": not self.auto_doc_numbers, "AllowDiscount": True,
                                "DefaultTerms": {"value": "3"}},
        }

    def _collection(self, entity: str) -> list[dict[str, Any]] | None:
        tables: dict[str, Callable[[], Iterable[dict[str, Any]]]] = {
            "Customer": lambda: self._customers.values(),
            "Invoice": lambda: self._live_invoices().values(),
            "Payment": lambda: self._payments.values(),
            "CreditMemo": lambda: self._live_memos().values(),
            "Purchase": lambda: self._purchases.values(),
            "Bill": lambda: self._bills.values(),
            "Item": lambda: self._items.values(),
            "TaxCode": lambda: self._tax_codes.values(),
            "TaxRate": lambda: self._tax_rates.values(),
            "Account": lambda: self._accounts.values(),
            "Vendor": lambda: self._vendors.values(),
            "Employee": lambda: self._employees.values(),
            "CompanyInfo": lambda: [self._company()],
            "Preferences": lambda: [self._preferences()],
        }
        getter = tables.get(entity)
        return list(getter()) if getter is not None else None

    def _canonical(self, entity: str) -> str | None:
        return next((name for name in _QUERYABLE if name.lower() == entity.lower()), None)

    def _query(self, req: SandboxRequest) -> SandboxResponse:
        # python-quickbooks POSTs the statement as text; the documented GET carries it in ?query=.
        statement = req.body.decode("utf-8", errors="replace") if req.method == "POST" else req.arg("query") or ""
        try:
            sel = parse(statement)
            with self.lock:
                return self._ok({"QueryResponse": self._run(sel)})
        except QueryError as exc:
            return self._fault(_Fault(exc.code, "Invalid query" if exc.code == "4001" else "Error parsing query",
                                      str(exc)))

    def _run(self, sel: Select) -> dict[str, Any]:
        entity = self._canonical(sel.entity)
        records = self._collection(entity) if entity else None
        if entity is None or records is None:
            raise QueryError(f"QueryParserError: Invalid context declaration : {sel.entity}")
        allowed = _QUERYABLE[entity]
        allowed_lower = {a.lower() for a in allowed}
        for cond in sel.where:
            if cond.field.lower() not in allowed_lower:
                raise QueryError(f"QueryValidationError: property '{cond.field}' is not queryable", "4001")
        for name, _desc in sel.order:
            if name.lower() not in allowed_lower:
                raise QueryError(f"QueryValidationError: property '{name}' is not sortable", "4001")
        if entity in _ACTIVE_DEFAULT and not any(c.field.lower() == "active" for c in sel.where):
            records = [r for r in records if r.get("Active", True)]
        selected = [r for r in records if sel.matches(r)]
        if sel.count:
            return {"totalCount": len(selected)}
        order = sel.order or [("Id", False)]
        for name, desc in reversed(order):
            selected.sort(key=lambda r, n=name: sort_key(r, n), reverse=desc)  # type: ignore[misc]
        size = sel.max_results or _QUERY_DEFAULT_MAX
        page = selected[sel.start - 1 : sel.start - 1 + size]
        if not page:
            return {}
        if sel.fields:
            rendered = [{**{f: lookup(r, f) for f in sel.fields}, "Id": r.get("Id"), "domain": "QBO",
                         "sparse": True} for r in page]
        else:
            rendered = [_strip(r) for r in page]
        return {entity: rendered, "startPosition": sel.start, "maxResults": len(rendered)}

    def _cdc(self, req: SandboxRequest) -> SandboxResponse:
        names = [n.strip() for n in (req.arg("entities") or "").split(",") if n.strip()]
        since = wire.parse_datetime(req.arg("changedSince"))
        entities: list[str] = []
        for name in names:
            canonical = self._canonical(name)
            if canonical is None or canonical not in _CDC_ENTITIES:
                return self._fault(_Fault("2010", "Request has invalid or unsupported property",
                                          f"CDC is not supported for the entity {name}", element="entities"))
            entities.append(canonical)
        if not entities:
            return self._fault(_missing("entities"))
        if since is None:
            return self._fault(_missing("changedSince"))
        now = self.clock.now()
        if since.timestamp() < now - self.cdc_lookback_days * 86400:
            return self._fault(_Fault("2010", "Request has invalid or unsupported property",
                                      f"changedSince must be within the last {self.cdc_lookback_days} days",
                                      element="changedSince"))
        threshold = math.floor(since.timestamp())
        with self.lock:
            changes: list[tuple[float, int, int, str, dict[str, Any]]] = []
            for rank, entity in enumerate(entities):
                for record in self._collection(entity) or []:
                    if record.get("_t", 0) >= threshold:
                        changes.append((record["_t"], rank, int(record["Id"]), entity, _strip(record)))
                for kind, ident, when in self._tombstones:
                    if kind == entity and when >= threshold:
                        changes.append((when, rank, int(ident), entity, {
                            "domain": "QBO", "status": "Deleted", "Id": ident,
                            "MetaData": {"LastUpdatedTime": self._stamp(when)}}))
            changes.sort(key=lambda c: (c[0], c[1], c[2]))
            kept = changes[: self.cdc_max_objects]
            responses: list[dict[str, Any]] = []
            for entity in entities:
                objects = [c[4] for c in kept if c[3] == entity]
                responses.append({entity: objects, "startPosition": 1, "maxResults": len(objects),
                                  "totalCount": len(objects)} if objects else {})
        return self._ok({"CDCResponse": [{"QueryResponse": responses}]})

    # == customers =================================================================================
    def _names_taken(self, name: str, except_id: str | None) -> str | None:
        key = name.strip().casefold()
        for kind, table in (("customer", self._customers), ("vendor", self._vendors),
                            ("employee", self._employees)):
            for record in table.values():
                if record.get("Active", True) and str(record.get("DisplayName", "")).casefold() == key and not (
                        kind == "customer" and record["Id"] == except_id):
                    return kind
        return None

    _CUSTOMER_FIELDS = (
        "DisplayName", "Title", "GivenName", "MiddleName", "FamilyName", "Suffix", "CompanyName",
        "PrintOnCheckName", "Active", "PrimaryPhone", "Mobile", "Fax", "PrimaryEmailAddr", "WebAddr", "BillAddr",
        "ShipAddr", "Notes", "Taxable", "CurrencyRef", "PrimaryTaxIdentifier", "BusinessNumber", "ResaleNum",
        "PreferredDeliveryMethod", "DefaultTaxCodeRef", "SalesTermRef", "PaymentMethodRef",
    )

    def _post_customer(self, req: SandboxRequest) -> SandboxResponse:
        body = self._body(req)
        if req.arg("operation"):
            raise _Fault("2010", "Request has invalid or unsupported property",
                         "Customers cannot be deleted; set Active to false")
        return self._ok({"Customer": _strip(self._save_customer(body))})

    def _save_customer(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Create or update a customer from a request body (a Fault when QuickBooks would refuse it)."""
        existing: dict[str, Any] | None = None
        if body.get("Id") not in (None, ""):
            existing = self._customers.get(str(body["Id"]))
            if existing is None:
                raise _Fault("610", "Object Not Found", f"Object Not Found : Customer {body['Id']}")
            self._stale(existing, body)
        if existing is not None and body.get("sparse") is True:
            record = copy.deepcopy(existing)
        elif existing is not None:
            record = {k: v for k, v in copy.deepcopy(existing).items()
                      if k not in self._CUSTOMER_FIELDS or k in ("DisplayName", "CurrencyRef")}
        else:
            record = {"Id": "", "SyncToken": "0", "domain": "QBO", "sparse": False, "MetaData": self._meta(),
                      "Active": True, "Taxable": True, "Job": False, "BillWithParent": False,
                      "Balance": Decimal("0"), "BalanceWithJobs": Decimal("0"),
                      "CurrencyRef": self._currency_ref(self.home_currency), "PreferredDeliveryMethod": "Print"}
        for key in self._CUSTOMER_FIELDS:
            if key in body:
                record[key] = copy.deepcopy(body[key])
        if not record.get("DisplayName"):
            parts = [str(record.get(k) or "") for k in ("Title", "GivenName", "MiddleName", "FamilyName", "Suffix")]
            record["DisplayName"] = " ".join(p for p in parts if p) or record.get("CompanyName") or ""
        name = str(record["DisplayName"]).strip()
        if not name:
            raise _missing("DisplayName")
        if len(name) > 500:
            raise _length("DisplayName", 500, len(name))
        if not record.get("Active", True) and existing is not None and existing.get("Active", True):
            name = f"{name} (deleted)"
        record["DisplayName"] = name
        if record.get("Active", True):
            taken = self._names_taken(name, existing["Id"] if existing else None)
            if taken is not None:
                raise _Fault("6240", "Duplicate Name Exists Error",
                             f"The name supplied already exists. : Another {taken} is already using this name. "
                             "Please use a different name.")
        for field, limit in (("CompanyName", 100), ("Notes", 2000), ("PrimaryTaxIdentifier", 20),
                             ("GivenName", 100), ("FamilyName", 100)):
            value = record.get(field)
            if isinstance(value, str) and len(value) > limit:
                raise _length(field, limit, len(value))
        email = lookup(record, "PrimaryEmailAddr")
        if email is not None and ("@" not in str(email) or "." not in str(email).rsplit("@", 1)[-1]):
            raise _Fault("2090", "Invalid Email Address format", f"Invalid Email Address format : {email}",
                         element="PrimaryEmailAddr")
        currency = _ref_value(record.get("CurrencyRef")) or self.home_currency
        if currency not in self.currencies:
            raise _invalid_ref("CurrencyRef", currency)
        if existing is not None and _ref_value(existing.get("CurrencyRef")) != currency:
            raise _business("You can't change the currency of a customer.")
        record["CurrencyRef"] = self._currency_ref(currency)
        record["FullyQualifiedName"] = name
        record.setdefault("PrintOnCheckName", record.get("CompanyName") or name)
        if existing is None:
            record["Id"] = self._next_id("Customer")
            record["_t"] = self._now()
        else:
            self._touch(record)
        self._customers[record["Id"]] = record
        return record

    # == invoices ==================================================================================
    def _tax_rate_of(self, code_id: str) -> tuple[Decimal, list[tuple[str, Decimal]]]:
        code = self._tax_codes.get(code_id)
        if code is None or not code.get("Active", True):
            raise _invalid_ref("TaxCodeRef", code_id)
        parts: list[tuple[str, Decimal]] = []
        for detail in code["SalesTaxRateList"]["TaxRateDetail"]:
            rate_id = str(detail["TaxRateRef"]["value"])
            parts.append((rate_id, Decimal(self._tax_rates[rate_id]["RateValue"])))
        return sum((r for _i, r in parts), Decimal(0)), parts

    def _build_lines(self, raw_lines: Any, currency: str, inclusive: bool) -> list[dict[str, Any]]:
        if not isinstance(raw_lines, list) or not raw_lines:
            raise _missing("Line")
        lines: list[dict[str, Any]] = []
        for index, raw in enumerate(raw_lines, start=1):
            if not isinstance(raw, dict):
                raise _Fault("2010", "Request has invalid or unsupported property", f"Line {index} is not an object")
            kind = raw.get("DetailType")
            if kind == "SubTotalLineDetail":
                continue
            if kind == "DescriptionOnly":
                lines.append({"Description": str(raw.get("Description") or ""), "DetailType": "DescriptionOnly",
                              "DescriptionLineDetail": {}, "Amount": Decimal("0")})
                continue
            if kind != "SalesItemLineDetail":
                raise _Fault("2010", "Request has invalid or unsupported property",
                             f"Line DetailType {kind!r} is not supported for an invoice by this company",
                             element="Line.DetailType")
            detail = raw.get("SalesItemLineDetail")
            if not isinstance(detail, dict):
                raise _missing("SalesItemLineDetail")
            item_id = _ref_value(detail.get("ItemRef"))
            item = self._items.get(item_id or "")
            if item is None or not item.get("Active", True):
                raise _invalid_ref("ItemRef", item_id)
            qty = _dec(detail.get("Qty", 1), "Qty")
            unit = _dec(detail["UnitPrice"], "UnitPrice") if detail.get("UnitPrice") is not None else Decimal(
                item["UnitPrice"])
            rate = _dec(detail["DiscountRate"], "DiscountRate") if detail.get("DiscountRate") else Decimal(0)
            if not 0 <= rate <= 100:
                raise _Fault("2050", "Invalid value", "DiscountRate must be between 0 and 100", element="DiscountRate")
            expected = round_money(qty * unit * (Decimal(100) - rate) / Decimal(100), currency)
            if raw.get("Amount") is None:
                raise _missing("Line.Amount")
            amount = _dec(raw["Amount"], "Amount")
            if round_money(amount, currency) != expected:
                raise _business(f"Amount is not equal to UnitPrice * Qty less the discount. Supplied value:{amount}")
            code_id = _ref_value(detail.get("TaxCodeRef"))
            if code_id is None:
                raise _business("Make sure all your transactions have a VAT rate before you save.")
            total_rate, parts = self._tax_rate_of(code_id)
            if inclusive:
                tax = round_money(expected * total_rate / (Decimal(100) + total_rate), currency)
            else:
                tax = round_money(expected * total_rate / Decimal(100), currency)
            out_detail: dict[str, Any] = {
                "ItemRef": {"value": item["Id"], "name": item["Name"]},
                "UnitPrice": unit,
                "Qty": qty,
                "ItemAccountRef": dict(item["IncomeAccountRef"]),
                "TaxCodeRef": {"value": code_id},
            }
            if rate:
                out_detail["DiscountRate"] = rate
            if detail.get("ServiceDate"):
                out_detail["ServiceDate"] = str(detail["ServiceDate"])
            lines.append({
                "Description": str(raw.get("Description") or item.get("Description") or ""),
                "Amount": expected, "DetailType": "SalesItemLineDetail", "SalesItemLineDetail": out_detail,
                "_tax": tax, "_rates": parts,
            })
        if not any(ln["DetailType"] == "SalesItemLineDetail" for ln in lines):
            raise _missing("Line")
        for n, line in enumerate(lines, start=1):
            line["Id"] = str(n)
            line["LineNum"] = n
        return lines

    def _totals(self, inv: dict[str, Any], lines: list[dict[str, Any]], inclusive: bool) -> None:
        currency = inv["CurrencyRef"]["value"]
        sales = [ln for ln in lines if ln["DetailType"] == "SalesItemLineDetail"]
        subtotal = sum((ln["Amount"] for ln in sales), Decimal(0))
        tax = sum((ln["_tax"] for ln in sales), Decimal(0))
        by_rate: dict[str, list[Decimal]] = {}
        for ln in sales:
            parts = ln["_rates"]
            for rate_id, rate in parts:
                share = ln["_tax"] if len(parts) == 1 else round_money(ln["Amount"] * rate / Decimal(100), currency)
                acc = by_rate.setdefault(rate_id, [Decimal(0), Decimal(0), rate])
                acc[0] += share
                acc[1] += ln["Amount"]
        inv["Line"] = [*lines, {"Amount": subtotal, "DetailType": "SubTotalLineDetail", "SubTotalLineDetail": {}}]
        inv["TxnTaxDetail"] = {"TotalTax": tax, "TaxLine": [
            {"Amount": amount, "DetailType": "TaxLineDetail", "TaxLineDetail": {
                "TaxRateRef": {"value": rate_id}, "PercentBased": True, "TaxPercent": rate,
                "NetAmountTaxable": net}}
            for rate_id, (amount, net, rate) in sorted(by_rate.items(), key=lambda kv: int(kv[0]))]}
        total = subtotal if inclusive else subtotal + tax
        paid = inv.get("_paid", Decimal(0))
        inv["TotalAmt"] = total
        inv["Balance"] = total - paid
        inv["_subtotal"] = subtotal - tax if inclusive else subtotal
        if currency != self.home_currency:
            rate = Decimal(inv["ExchangeRate"])
            inv["HomeTotalAmt"] = round_money(total * rate, self.home_currency)
            inv["HomeBalance"] = round_money((total - paid) * rate, self.home_currency)

    def _doc_number_taken(self, number: str, except_id: str | None) -> str | None:
        for inv in self._invoices.values():
            if inv["_status"] != "deleted" and inv.get("DocNumber") == number and inv["Id"] != except_id:
                return str(inv["Id"])
        return None

    def _post_invoice(self, req: SandboxRequest) -> SandboxResponse:
        body = self._body(req)
        operation = (req.arg("operation") or "").lower()
        if operation in ("void", "delete"):
            return self._void_or_delete(body, operation)
        if operation not in ("", "update", "create"):
            raise _Fault("2010", "Request has invalid or unsupported property", f"Unknown operation {operation}")
        existing: dict[str, Any] | None = None
        if body.get("Id") not in (None, ""):
            existing = self._live_invoices().get(str(body["Id"]))
            if existing is None:
                raise _Fault("610", "Object Not Found", f"Object Not Found : Invoice {body['Id']}")
            self._stale(existing, body)
            if existing["_status"] == "voided":
                raise _business("A voided transaction cannot be changed.")
        inv = self._invoice_from(body, existing)
        if existing is None:
            self._invoices[inv["Id"]] = inv
        else:
            self._touch(inv)
            self._invoices[inv["Id"]] = inv
        return self._ok({"Invoice": _strip(inv)})

    def _invoice_from(self, body: Mapping[str, Any], existing: dict[str, Any] | None) -> dict[str, Any]:
        base = copy.deepcopy(existing) if existing is not None else None
        customer_id = _ref_value(body.get("CustomerRef")) or (_ref_value(base["CustomerRef"]) if base else None)
        customer = self._customers.get(customer_id or "")
        if customer is None or not customer.get("Active", True):
            if customer_id is None:
                raise _missing("CustomerRef")
            raise _invalid_ref("CustomerRef", customer_id)
        customer_currency = _ref_value(customer.get("CurrencyRef")) or self.home_currency
        currency = _ref_value(body.get("CurrencyRef")) or (base["CurrencyRef"]["value"] if base else customer_currency)
        if currency not in self.currencies:
            raise _invalid_ref("CurrencyRef", currency)
        if currency != customer_currency:
            raise _business(f"The currency of the transaction ({currency}) must be the currency of the customer "
                            f"({customer_currency}).")
        calc = str(body.get("GlobalTaxCalculation") or (base or {}).get("GlobalTaxCalculation") or "TaxExcluded")
        if calc not in ("TaxExcluded", "TaxInclusive", "NotApplicable"):
            raise _Fault("2010", "Request has invalid or unsupported property",
                         f"GlobalTaxCalculation {calc} is not valid", element="GlobalTaxCalculation")
        inclusive = calc == "TaxInclusive"
        if base is not None and "Line" not in body:
            lines = [ln for ln in base["Line"] if ln["DetailType"] != "SubTotalLineDetail"]
        else:
            if base is not None and base.get("_paid", Decimal(0)) > 0:
                raise _business("This transaction has payments applied; its lines cannot be changed.")
            lines = self._build_lines(body.get("Line"), currency, inclusive)
        txn_date = body.get("TxnDate") or (base or {}).get("TxnDate") or self._today().isoformat()
        due = body.get("DueDate") or (base or {}).get("DueDate") or txn_date
        for field, value in (("TxnDate", txn_date), ("DueDate", due)):
            try:
                dt.date.fromisoformat(str(value))
            except ValueError:
                raise _Fault("2080", "Invalid date", f"Invalid date : {field} {value}", element=field) from None
        note = body.get("PrivateNote", (base or {}).get("PrivateNote"))
        if isinstance(note, str) and len(note) > 4000:
            raise _length("PrivateNote", 4000, len(note))
        number = body.get("DocNumber") if "DocNumber" in body else (base or {}).get("DocNumber")
        if number is not None:
            number = str(number)
            if len(number) > wire.DOC_NUMBER_MAX:
                raise _length("DocNumber", wire.DOC_NUMBER_MAX, len(number))
            holder = self._doc_number_taken(number, base["Id"] if base else None)
            if holder is not None and not self.allow_duplicate_doc_numbers:
                raise _Fault("6140", "Duplicate Document Number Error",
                             "Duplicate Document Number Error : You must specify a different number. This number "
                             f"has already been used. DocNumber={number} is assigned to TxnType=Invoice with "
                             f"TxnId={holder}")
        elif base is None and self.auto_doc_numbers:
            self._doc_seq += 1
            while self._doc_number_taken(str(self._doc_seq), None) is not None:
                self._doc_seq += 1
            number = str(self._doc_seq)
        inv: dict[str, Any] = base or {
            "Id": "", "SyncToken": "0", "domain": "QBO", "sparse": False, "MetaData": self._meta(),
            "CustomField": [], "LinkedTxn": [], "ApplyTaxAfterDiscount": False, "PrintStatus": "NotSet",
            "EmailStatus": "NotSet", "Deposit": Decimal("0"), "AllowIPNPayment": False,
            "AllowOnlinePayment": False, "AllowOnlineCreditCardPayment": False, "AllowOnlineACHPayment": False,
            "_status": "active", "_paid": Decimal("0.00"),
        }
        if number is not None:
            inv["DocNumber"] = number
        else:
            inv.pop("DocNumber", None)
        inv["TxnDate"] = str(txn_date)
        inv["CurrencyRef"] = self._currency_ref(currency)
        inv["ExchangeRate"] = self._rate_for(body, currency, str(txn_date))
        if isinstance(note, str):
            inv["PrivateNote"] = note
        if "CustomerMemo" in body:
            inv["CustomerMemo"] = copy.deepcopy(body["CustomerMemo"])
        if "BillEmail" in body:
            inv["BillEmail"] = copy.deepcopy(body["BillEmail"])
        inv["CustomerRef"] = {"value": customer["Id"], "name": customer["DisplayName"]}
        inv["DueDate"] = str(due)
        inv["GlobalTaxCalculation"] = calc
        self._totals(inv, lines, inclusive)
        if base is None:
            inv["Id"] = self._next_id("Invoice")
            inv["_t"] = self._now()
            inv["_reference"] = wire.note_value(note, wire.REFERENCE_TAG) or number or ""
        return inv

    def _void_or_delete(self, body: Mapping[str, Any], operation: str) -> SandboxResponse:
        inv = self._live_invoices().get(str(body.get("Id") or ""))
        if inv is None:
            raise _Fault("610", "Object Not Found", f"Object Not Found : Invoice {body.get('Id')}")
        self._stale(inv, body)
        if inv.get("_paid", Decimal(0)) > 0:
            raise _business("This transaction has payments applied. Remove the payments first.")
        if operation == "delete":
            inv["_status"] = "deleted"
            inv["_t"] = self._now()
            self._tombstones.append(("Invoice", inv["Id"], inv["_t"]))
            return self._ok({"Invoice": {"domain": "QBO", "status": "Deleted", "Id": inv["Id"]}})
        inv["_status"] = "voided"
        inv["PrivateNote"] = "Voided"
        inv["Balance"] = Decimal("0")
        if "HomeBalance" in inv:
            inv["HomeBalance"] = Decimal("0")
        self._touch(inv)
        return self._ok({"Invoice": _strip(inv)})

    # == payments ==================================================================================
    def _post_payment(self, req: SandboxRequest) -> SandboxResponse:
        body = self._body(req)
        if body.get("Id") not in (None, "") or req.arg("operation"):
            raise _Fault("2010", "Request has invalid or unsupported property",
                         "This sandbox only creates payments")
        return self._ok({"Payment": _strip(self._new_payment(body))})

    def _new_payment(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """A payment: its lines apply amounts to invoices and use credit memos; ``TotalAmt`` is the money received,
        at least the invoices' amounts less the credit used (the rest stays unapplied)."""
        customer_id = _ref_value(body.get("CustomerRef"))
        customer = self._customers.get(customer_id or "")
        if customer is None:
            raise _invalid_ref("CustomerRef", customer_id) if customer_id else _missing("CustomerRef")
        total = _dec(body.get("TotalAmt"), "TotalAmt")
        if total < 0:
            raise _business("The total amount of a payment cannot be negative.")
        currency = _ref_value(body.get("CurrencyRef")) or _ref_value(customer.get("CurrencyRef")) or self.home_currency
        applied: list[tuple[str, dict[str, Any], Decimal]] = []  # (TxnType, invoice or memo, amount)
        used: dict[str, Decimal] = {}
        for raw in body.get("Line") or []:
            amount = _dec(raw.get("Amount") if isinstance(raw, dict) else None, "Line.Amount")
            links = [link for link in raw.get("LinkedTxn") or [] if isinstance(link, dict)]
            if not links:
                raise _missing("Line.LinkedTxn")
            for link in links:
                kind = link.get("TxnType")
                if kind == "Invoice":
                    doc = self._live_invoices().get(str(link.get("TxnId") or ""))
                    if doc is None or doc["_status"] != "active":
                        raise _invalid_ref("LinkedTxn", link.get("TxnId"))
                elif kind == "CreditMemo":
                    doc = self._live_memos().get(str(link.get("TxnId") or ""))
                    if doc is None:
                        raise _invalid_ref("LinkedTxn", link.get("TxnId"))
                else:
                    raise _Fault("2010", "Request has invalid or unsupported property",
                                 "A payment line must link an Invoice or a CreditMemo", element="LinkedTxn")
                if doc["CustomerRef"]["value"] != customer["Id"]:
                    raise _business(f"The {kind} belongs to another customer.")
                if doc["CurrencyRef"]["value"] != currency:
                    raise _business(f"The payment currency must be the {kind} currency.")
                key = f"{kind}:{doc['Id']}"
                used[key] = used.get(key, Decimal(0)) + amount
                if amount <= 0 or used[key] > doc["Balance"]:
                    raise _business(f"The amount applied ({amount}) must be positive and at most the open balance "
                                    f"({doc['Balance']}) of {kind} {doc['Id']}.")
                applied.append((kind, doc, amount))
        to_invoices = sum((a for kind, _d, a in applied if kind == "Invoice"), Decimal(0))
        credit = sum((a for kind, _d, a in applied if kind == "CreditMemo"), Decimal(0))
        if credit > to_invoices:
            raise _business("The credit used is more than the amounts applied to invoices.")
        if total < to_invoices - credit:
            raise _business("The total amount is less than the amounts applied to invoices less the credit used.")
        day = str(body.get("TxnDate") or self._today().isoformat())
        payment_id = self._next_id("Payment")
        payment: dict[str, Any] = {
            "Id": payment_id, "SyncToken": "0", "domain": "QBO", "sparse": False, "MetaData": self._meta(),
            "TxnDate": day, "CurrencyRef": self._currency_ref(currency),
            "ExchangeRate": self._rate_for(body, currency, day),
            "CustomerRef": {"value": customer["Id"], "name": customer["DisplayName"]},
            "DepositToAccountRef": {"value": _ref_value(body.get("DepositToAccountRef")) or "4"},
            "TotalAmt": total, "UnappliedAmt": total - (to_invoices - credit), "ProcessPayment": False,
            "Line": [{"Amount": a, "LinkedTxn": [{"TxnId": doc["Id"], "TxnType": kind}]} for kind, doc, a in applied],
            "_t": self._now(),
        }
        if body.get("PrivateNote"):
            payment["PrivateNote"] = str(body["PrivateNote"])
        for _kind, doc, amount in applied:
            doc["_paid"] = doc.get("_paid", Decimal(0)) + amount
            doc["Balance"] = doc["TotalAmt"] - doc["_paid"]
            if "RemainingCredit" in doc:
                doc["RemainingCredit"] = doc["Balance"]
            if "HomeBalance" in doc:
                doc["HomeBalance"] = round_money(doc["Balance"] * Decimal(doc["ExchangeRate"]), self.home_currency)
            if not any(link.get("TxnId") == payment_id for link in doc["LinkedTxn"]):
                doc["LinkedTxn"].append({"TxnId": payment_id, "TxnType": "Payment"})
            self._touch(doc)
        self._payments[payment_id] = payment
        return payment

    def _rate_for(self, body: Mapping[str, Any], currency: str, day: str) -> Decimal:
        """The ``ExchangeRate`` sent when positive, else the sandbox's rate for the transaction's month."""
        if currency == self.home_currency:
            return Decimal(1)
        sent = body.get("ExchangeRate")
        if sent not in (None, ""):
            rate = _dec(sent, "ExchangeRate")
            if rate <= 0:
                raise _Fault("2050", "Invalid value", "ExchangeRate must be positive", element="ExchangeRate")
            return rate
        try:
            when = dt.date.fromisoformat(day[:10])
        except ValueError:
            when = self._today()
        return exchange_rate(currency, when, self.home_currency)

    # == credit memos ==============================================================================
    def _post_credit_memo(self, req: SandboxRequest) -> SandboxResponse:
        body = self._body(req)
        operation = (req.arg("operation") or "").lower()
        if operation == "delete":
            memo = self._live_memos().get(str(body.get("Id") or ""))
            if memo is None:
                raise _Fault("610", "Object Not Found", f"Object Not Found : CreditMemo {body.get('Id')}")
            self._stale(memo, body)
            if memo["_paid"] > 0:
                raise _business("This credit memo has been applied. Remove the payments that use it first.")
            memo["_status"] = "deleted"
            memo["_t"] = self._now()
            self._tombstones.append(("CreditMemo", memo["Id"], memo["_t"]))
            return self._ok({"CreditMemo": {"domain": "QBO", "status": "Deleted", "Id": memo["Id"]}})
        if operation not in ("", "create") or body.get("Id") not in (None, ""):
            raise _Fault("2010", "Request has invalid or unsupported property",
                         "This sandbox creates and deletes credit memos; it does not update them")
        return self._ok({"CreditMemo": _strip(self._new_credit_memo(body))})

    def _new_credit_memo(self, body: Mapping[str, Any]) -> dict[str, Any]:
        customer_id = _ref_value(body.get("CustomerRef"))
        customer = self._customers.get(customer_id or "")
        if customer is None or not customer.get("Active", True):
            raise _invalid_ref("CustomerRef", customer_id) if customer_id else _missing("CustomerRef")
        customer_currency = _ref_value(customer.get("CurrencyRef")) or self.home_currency
        currency = _ref_value(body.get("CurrencyRef")) or customer_currency
        if currency != customer_currency:
            raise _business(f"The currency of the transaction ({currency}) must be the currency of the customer "
                            f"({customer_currency}).")
        calc = str(body.get("GlobalTaxCalculation") or "TaxExcluded")
        if calc not in ("TaxExcluded", "TaxInclusive", "NotApplicable"):
            raise _Fault("2010", "Request has invalid or unsupported property",
                         f"GlobalTaxCalculation {calc} is not valid", element="GlobalTaxCalculation")
        lines = self._build_lines(body.get("Line"), currency, calc == "TaxInclusive")
        txn_date = str(body.get("TxnDate") or self._today().isoformat())
        try:
            dt.date.fromisoformat(txn_date)
        except ValueError:
            raise _Fault("2080", "Invalid date", f"Invalid date : TxnDate {txn_date}", element="TxnDate") from None
        number = str(body["DocNumber"]) if body.get("DocNumber") not in (None, "") else None
        if number is not None:
            if len(number) > wire.DOC_NUMBER_MAX:
                raise _length("DocNumber", wire.DOC_NUMBER_MAX, len(number))
            holder = next((m["Id"] for m in self._live_memos().values() if m.get("DocNumber") == number), None)
            if holder is not None and not self.allow_duplicate_doc_numbers:
                raise _Fault("6140", "Duplicate Document Number Error",
                             "Duplicate Document Number Error : You must specify a different number. This number "
                             f"has already been used. DocNumber={number} is assigned to TxnType=CreditMemo with "
                             f"TxnId={holder}")
        elif self.auto_doc_numbers:
            self._doc_seq += 1
            while (self._doc_number_taken(str(self._doc_seq), None) is not None
                   or any(m.get("DocNumber") == str(self._doc_seq) for m in self._credit_memos.values())):
                self._doc_seq += 1
            number = str(self._doc_seq)
        memo: dict[str, Any] = {
            "Id": self._next_id("CreditMemo"), "SyncToken": "0", "domain": "QBO", "sparse": False,
            "MetaData": self._meta(), "TxnDate": txn_date, "CurrencyRef": self._currency_ref(currency),
            "ExchangeRate": self._rate_for(body, currency, txn_date),
            "CustomerRef": {"value": customer["Id"], "name": customer["DisplayName"]},
            "GlobalTaxCalculation": calc, "PrintStatus": "NotSet", "EmailStatus": "NotSet", "LinkedTxn": [],
            "CustomField": [], "_status": "active", "_paid": Decimal("0.00"), "_t": self._now(),
        }
        if number is not None:
            memo["DocNumber"] = number
        if isinstance(body.get("PrivateNote"), str):
            memo["PrivateNote"] = body["PrivateNote"]
        if isinstance(body.get("CustomerMemo"), dict):
            memo["CustomerMemo"] = copy.deepcopy(body["CustomerMemo"])
        self._totals(memo, lines, calc == "TaxInclusive")
        memo["RemainingCredit"] = memo["Balance"]
        self._credit_memos[memo["Id"]] = memo
        return memo

    # == accounts, expenses and bills ==============================================================
    def _post_account(self, req: SandboxRequest) -> SandboxResponse:
        body = self._body(req)
        if body.get("Id") not in (None, "") or req.arg("operation"):
            raise _Fault("2010", "Request has invalid or unsupported property", "This sandbox only creates accounts")
        return self._ok({"Account": _strip(self._new_account(body))})

    def _new_account(self, body: Mapping[str, Any]) -> dict[str, Any]:
        name = str(body.get("Name") or "").strip()
        if not name:
            raise _missing("Name")
        if len(name) > 100:
            raise _length("Name", 100, len(name))
        kind = str(body.get("AccountType") or "").strip()
        if not kind and not body.get("AccountSubType"):
            raise _missing("AccountType")
        number = str(body["AcctNum"]).strip() if body.get("AcctNum") not in (None, "") else None
        for account in self._accounts.values():
            if str(account["Name"]).casefold() == name.casefold():
                raise _Fault("6240", "Duplicate Name Exists Error",
                             "The name supplied already exists. : Another account is already using this name.")
            if number is not None and account.get("AcctNum") == number:
                raise _Fault("6000", "A business validation error has occurred while processing your request",
                             f"Business Validation Error: Another account already uses the number {number}.")
        classification = {"Expense": "Expense", "Other Expense": "Expense", "Cost of Goods Sold": "Expense",
                          "Income": "Revenue", "Other Income": "Revenue", "Bank": "Asset",
                          "Accounts Receivable": "Asset", "Accounts Payable": "Liability",
                          "Credit Card": "Liability"}.get(kind or "Expense", "Asset")
        record: dict[str, Any] = {
            "Id": self._next_id("Account"), "SyncToken": "0", "domain": "QBO", "sparse": False,
            "MetaData": self._meta(), "Name": name, "FullyQualifiedName": name, "Active": True, "SubAccount": False,
            "Classification": classification, "AccountType": kind or "Expense",
            "AccountSubType": str(body.get("AccountSubType") or "OtherMiscellaneousServiceCost"),
            "CurrentBalance": Decimal("0"), "CurrentBalanceWithSubAccounts": Decimal("0"),
            "CurrencyRef": self._currency_ref(_ref_value(body.get("CurrencyRef")) or self.home_currency),
            "_t": self._now(),
        }
        if number is not None:
            record["AcctNum"] = number
        self._accounts[record["Id"]] = record
        return record

    def _account(self, ref: Any, what: str) -> dict[str, Any]:
        account_id = _ref_value(ref)
        account = self._accounts.get(account_id or "")
        if account is None or not account.get("Active", True):
            raise _invalid_ref(what, account_id) if account_id else _missing(what)
        return account

    def _expense_lines(self, raw_lines: Any, currency: str, calc: str) -> tuple[list[dict[str, Any]], Decimal]:
        """The lines of a purchase or a bill (``AccountBasedExpenseLineDetail`` only) and their tax."""
        if not isinstance(raw_lines, list) or not raw_lines:
            raise _missing("Line")
        lines: list[dict[str, Any]] = []
        tax = Decimal(0)
        for n, raw in enumerate(raw_lines, start=1):
            if not isinstance(raw, dict) or raw.get("DetailType") != "AccountBasedExpenseLineDetail":
                raise _Fault("2010", "Request has invalid or unsupported property",
                             f"Line {n}: this sandbox books expense lines to accounts only "
                             "(AccountBasedExpenseLineDetail)", element="Line.DetailType")
            detail = raw.get("AccountBasedExpenseLineDetail")
            if not isinstance(detail, dict):
                raise _missing("AccountBasedExpenseLineDetail")
            account = self._account(detail.get("AccountRef"), "AccountRef")
            if raw.get("Amount") is None:
                raise _missing("Line.Amount")
            amount = round_money(_dec(raw["Amount"], "Amount"), currency)
            if amount < 0:
                raise _business("An expense line amount cannot be negative; record a refund with Credit.")
            out: dict[str, Any] = {"AccountRef": {"value": account["Id"], "name": account["Name"]},
                                   "BillableStatus": "NotBillable"}
            code_id = _ref_value(detail.get("TaxCodeRef"))
            if code_id is not None:
                rate, _parts = self._tax_rate_of(code_id)
                line_tax = (round_money(amount * rate / (Decimal(100) + rate), currency) if calc == "TaxInclusive"
                            else round_money(amount * rate / Decimal(100), currency))
                out["TaxCodeRef"] = {"value": code_id}
                out["TaxAmount"] = line_tax
                tax += line_tax
            lines.append({"Id": str(n), "LineNum": n, "Description": str(raw.get("Description") or ""),
                          "Amount": amount, "DetailType": "AccountBasedExpenseLineDetail",
                          "AccountBasedExpenseLineDetail": out})
        return lines, tax

    def _post_purchase(self, req: SandboxRequest) -> SandboxResponse:
        body = self._body(req)
        if body.get("Id") not in (None, "") or req.arg("operation"):
            raise _Fault("2010", "Request has invalid or unsupported property", "This sandbox only creates expenses")
        return self._ok({"Purchase": _strip(self._new_purchase(body))})

    def _new_purchase(self, body: Mapping[str, Any]) -> dict[str, Any]:
        kind = body.get("PaymentType")
        if kind is None:
            raise _missing("PaymentType")
        if kind not in _PAYMENT_TYPES:
            raise _Fault("2010", "Request has invalid or unsupported property",
                         f"PaymentType {kind} is not one of {', '.join(_PAYMENT_TYPES)}", element="PaymentType")
        paid_from = self._account(body.get("AccountRef"), "AccountRef")
        return self._new_expense_doc("Purchase", body, {
            "PaymentType": kind, "Credit": body.get("Credit") is True,
            "AccountRef": {"value": paid_from["Id"], "name": paid_from["Name"]},
        }, self._purchases, entity_ref=body.get("EntityRef"))

    def _post_bill(self, req: SandboxRequest) -> SandboxResponse:
        body = self._body(req)
        if body.get("Id") not in (None, "") or req.arg("operation"):
            raise _Fault("2010", "Request has invalid or unsupported property", "This sandbox only creates bills")
        return self._ok({"Bill": _strip(self._new_bill(body))})

    def _new_bill(self, body: Mapping[str, Any]) -> dict[str, Any]:
        vendor_id = _ref_value(body.get("VendorRef"))
        vendor = self._vendors.get(vendor_id or "")
        if vendor is None or not vendor.get("Active", True):
            raise _invalid_ref("VendorRef", vendor_id) if vendor_id else _missing("VendorRef")
        payable = self._accounts["6"]
        txn_date = str(body.get("TxnDate") or self._today().isoformat())
        return self._new_expense_doc("Bill", body, {
            "VendorRef": {"value": vendor["Id"], "name": vendor["DisplayName"]},
            "APAccountRef": {"value": payable["Id"], "name": payable["Name"]},
            "DueDate": str(body.get("DueDate") or txn_date),
        }, self._bills)

    def _new_expense_doc(self, entity: str, body: Mapping[str, Any], fields: dict[str, Any],
                         table: dict[str, dict[str, Any]], *, entity_ref: Any = None) -> dict[str, Any]:
        currency = _ref_value(body.get("CurrencyRef")) or self.home_currency
        if currency not in self.currencies:
            raise _invalid_ref("CurrencyRef", currency)
        txn_date = str(body.get("TxnDate") or self._today().isoformat())
        for field in ("TxnDate", "DueDate"):
            value = fields.get(field, txn_date) if field == "DueDate" else txn_date
            try:
                dt.date.fromisoformat(str(value))
            except ValueError:
                raise _Fault("2080", "Invalid date", f"Invalid date : {field} {value}", element=field) from None
        calc = str(body.get("GlobalTaxCalculation") or "TaxExcluded")
        lines, tax = self._expense_lines(body.get("Line"), currency, calc)
        net = sum((ln["Amount"] for ln in lines), Decimal(0))
        total = net if calc == "TaxInclusive" else net + tax
        doc: dict[str, Any] = {
            "Id": self._next_id(entity), "SyncToken": "0", "domain": "QBO", "sparse": False, "MetaData": self._meta(),
            "TxnDate": txn_date, "CurrencyRef": self._currency_ref(currency),
            "ExchangeRate": self._rate_for(body, currency, txn_date), "GlobalTaxCalculation": calc,
            "Line": lines, "TxnTaxDetail": {"TotalTax": tax}, "TotalAmt": total, "_t": self._now(), **fields,
        }
        if entity == "Bill":
            doc["Balance"] = total
        if currency != self.home_currency:
            doc["HomeTotalAmt"] = round_money(total * Decimal(doc["ExchangeRate"]), self.home_currency)
        for key in ("DocNumber", "PrivateNote", "Memo"):
            if isinstance(body.get(key), str) and body[key]:
                doc[key] = body[key]
        if entity_ref is not None:
            ref = _ref_value(entity_ref)
            holder = self._vendors.get(ref or "")
            if holder is None:
                raise _invalid_ref("EntityRef", ref)
            doc["EntityRef"] = {"value": holder["Id"], "name": holder["DisplayName"], "type": "Vendor"}
        table[doc["Id"]] = doc
        return doc

    # == test and demo helpers =====================================================================
    def admin(self, req: SandboxRequest) -> SandboxResponse:
        """Sandbox controls: ``GET /_sandbox/{stats,invoices,customers,payments}``, ``POST /_sandbox/authorize``
        (a fresh token set, as after the consent flow), ``POST /_sandbox/payments`` (``{"invoice_id", "amount",
        "date"}``: a payment recorded by a person), ``POST /_sandbox/settle`` (``{"today": "YYYY-MM-DD"}``: the
        customers pay as planned up to that day, see :meth:`settle`) and ``POST /_sandbox/revoke``."""
        path = req.path.rstrip("/")
        h = {"Content-Type": "application/json"}

        def dump(payload: Any) -> bytes:
            return json.dumps(payload, default=str).encode()

        if req.method == "GET" and path == "/_sandbox/invoices":
            return SandboxResponse(200, dump(self.invoices()), h)
        if req.method == "GET" and path == "/_sandbox/customers":
            return SandboxResponse(200, dump(self.customers()), h)
        if req.method == "GET" and path == "/_sandbox/payments":
            return SandboxResponse(200, dump(self.payments()), h)
        if req.method == "POST" and path == "/_sandbox/authorize":
            return SandboxResponse(200, dump(self.issue_tokens()), h)
        if req.method == "POST" and path == "/_sandbox/revoke":
            self.revoke_refresh_tokens()
            return SandboxResponse(204, b"", {})
        if req.method == "POST" and path == "/_sandbox/payments":
            try:
                body = wire.loads(req.body or b"{}")
                day = dt.date.fromisoformat(str(body["date"])) if body.get("date") else None
                payment = self.create_payment(str(body["invoice_id"]), _dec(body["amount"], "amount"), day)
            except (ValueError, KeyError, TypeError, _Fault) as exc:
                return SandboxResponse(400, dump({"message": str(exc)}), h)
            return SandboxResponse(200, dump(payment), h)
        if req.method == "POST" and path == "/_sandbox/settle":
            try:
                body = wire.loads(req.body or b"{}") or {}
                today = dt.date.fromisoformat(str(body["today"])) if body.get("today") else self._today()
                made = self.settle(today)
            except (ValueError, TypeError, AttributeError) as exc:
                return SandboxResponse(400, dump({"message": str(exc)}), h)
            return SandboxResponse(200, dump({"payments": made, "today": today.isoformat()}), h)
        return super().admin(req)

    def issue_tokens(self) -> dict[str, Any]:
        """A fresh token set, as if a person had just completed the consent flow."""
        with self._auth_lock:
            refresh = "AB11" + secrets.token_hex(23)
            grant = _RefreshGrant(issued_at=self.clock.now())
            self._refresh[refresh] = grant
            return self._token_payload(self._new_access_locked(), refresh, grant)

    def revoke_refresh_tokens(self) -> None:
        """Invalidate every refresh token (the user disconnected the app)."""
        with self._auth_lock:
            for grant in self._refresh.values():
                grant.revoked = True

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far expire now (the next API call answers 401)."""
        with self._auth_lock:
            now = self.clock.now()
            for token in self._access:
                self._access[token] = min(self._access[token], now)

    def _invoice_view(self, inv: Mapping[str, Any]) -> dict[str, Any]:
        currency = inv["CurrencyRef"]["value"]
        lines = []
        for ln in inv["Line"]:
            if ln["DetailType"] != "SalesItemLineDetail":
                continue
            d = ln["SalesItemLineDetail"]
            lines.append({"Description": ln.get("Description", ""), "Quantity": d["Qty"], "UnitAmount": d["UnitPrice"],
                          "DiscountRate": d.get("DiscountRate", Decimal(0)), "LineAmount": ln["Amount"],
                          "TaxAmount": ln["_tax"], "TaxType": d["TaxCodeRef"]["value"],
                          "ItemCode": d["ItemRef"]["name"]})
        status = {"voided": "VOIDED", "deleted": "DELETED"}.get(inv["_status"], "AUTHORISED")
        if status == "AUTHORISED" and inv["Balance"] == 0 and inv["TotalAmt"] > 0:
            status = "PAID"
        total_tax = inv["TxnTaxDetail"]["TotalTax"]
        return {
            "InvoiceID": inv["Id"], "InvoiceNumber": inv.get("DocNumber") or "", "Reference": inv["_reference"],
            "ContactID": inv["CustomerRef"]["value"], "CurrencyCode": currency,
            "Date": dt.date.fromisoformat(inv["TxnDate"]), "DueDate": dt.date.fromisoformat(inv["DueDate"]),
            "SubTotal": inv["_subtotal"], "TotalTax": total_tax, "Total": inv["TotalAmt"],
            "AmountDue": inv["Balance"], "AmountPaid": inv.get("_paid", Decimal("0.00")), "Status": status,
            "SyncToken": inv["SyncToken"], "PrivateNote": inv.get("PrivateNote"), "LineItems": lines,
        }

    def invoices(self) -> list[dict[str, Any]]:
        """Every invoice (deleted ones too), in creation order, with the keys of the Xero sandbox's list:
        ``Reference`` (the full LedgerBridge reference), ``SubTotal``, ``TotalTax``, ``Total``, ``CurrencyCode``,
        ``Status`` (AUTHORISED, PAID, VOIDED, DELETED), ``InvoiceNumber`` (the DocNumber)..."""
        with self.lock:
            return [self._invoice_view(inv) for inv in self._invoices.values()]

    def invoice_by_reference(self, reference: str) -> dict[str, Any] | None:
        """The first live invoice whose LedgerBridge reference is ``reference``."""
        return next((i for i in self.invoices() if i["Reference"] == reference and i["Status"] != "DELETED"), None)

    def raw_invoice(self, invoice_id: str) -> dict[str, Any] | None:
        """An invoice as the API shows it."""
        with self.lock:
            inv = self._invoices.get(invoice_id)
            shown: dict[str, Any] | None = _strip(inv) if inv is not None else None
            return shown

    def customers(self) -> list[dict[str, Any]]:
        """Every customer as the API shows it, in creation order."""
        with self.lock:
            return [_strip(c) for c in self._customers.values()]

    def payments(self) -> list[dict[str, Any]]:
        with self.lock:
            return [_strip(p) for p in self._payments.values()]

    def add_vendor(self, name: str) -> str:
        """A vendor (its name then blocks customers of the same DisplayName); returns its Id."""
        with self.lock:
            vendor_id = self._next_id("Vendor")
            self._vendors[vendor_id] = {"Id": vendor_id, "SyncToken": "0", "domain": "QBO", "sparse": False,
                                        "MetaData": self._meta(), "DisplayName": name, "CompanyName": name,
                                        "Active": True, "Balance": Decimal("0"), "_t": self._now()}
            return vendor_id

    def touch_invoice(self, invoice_id: str, memo: str = "Edited in QuickBooks") -> None:
        """Someone edits the invoice in QuickBooks: its SyncToken moves on (a client holding the old one is stale)."""
        with self.lock:
            inv = self._invoices[invoice_id]
            inv["CustomerMemo"] = {"value": memo}
            self._touch(inv)

    def create_payment(self, invoice_id: str, amount: Decimal, day: dt.date | None = None) -> dict[str, Any]:
        """Record a payment against an invoice, as a person would in QuickBooks; returns the payment."""
        with self.lock:
            inv = self._invoices[invoice_id]
            payment = self._new_payment({
                "CustomerRef": {"value": inv["CustomerRef"]["value"]}, "TotalAmt": amount,
                "CurrencyRef": {"value": inv["CurrencyRef"]["value"]},
                "TxnDate": (day or self._today()).isoformat(),
                "Line": [{"Amount": amount, "LinkedTxn": [{"TxnId": invoice_id, "TxnType": "Invoice"}]}],
            })
            shown: dict[str, Any] = _strip(payment)
            return shown

    def credit_invoice(self, invoice_id: str, net: Decimal | None = None, day: dt.date | None = None, *,
                       gross: Decimal | None = None, apply: bool = True) -> dict[str, Any]:
        """A credit memo against an invoice, as a person would record it: the invoice's lines (all of it), or one
        line on the item and tax code of its first line worth ``net`` before tax or ``gross`` tax included (then
        entered tax-inclusive, so that the memo's total is exactly ``gross``); applied to the invoice (as far as it
        is still due) by a payment of no money dated ``day``, unless ``apply`` is False. Returns the memo."""
        with self.lock:
            inv = self._invoices[invoice_id]
            sales = [ln for ln in inv["Line"] if ln["DetailType"] == "SalesItemLineDetail"]
            calc = "TaxExcluded"
            if net is None and gross is None:
                lines = [{"DetailType": "SalesItemLineDetail", "Amount": ln["Amount"],
                          "Description": ln.get("Description", ""),
                          "SalesItemLineDetail": {k: copy.deepcopy(v) for k, v in ln["SalesItemLineDetail"].items()
                                                  if k in ("ItemRef", "Qty", "UnitPrice", "DiscountRate",
                                                           "TaxCodeRef")}} for ln in sales]
            else:
                amount = gross if gross is not None else net
                if gross is not None:
                    calc = "TaxInclusive"
                first = sales[0]["SalesItemLineDetail"]
                lines = [{"DetailType": "SalesItemLineDetail", "Amount": amount, "Description": "Avoir",
                          "SalesItemLineDetail": {"ItemRef": dict(first["ItemRef"]), "Qty": Decimal(1),
                                                  "UnitPrice": amount, "TaxCodeRef": dict(first["TaxCodeRef"])}}]
            when = (day or self._today()).isoformat()
            memo = self._new_credit_memo({"CustomerRef": dict(inv["CustomerRef"]),
                                          "CurrencyRef": dict(inv["CurrencyRef"]), "TxnDate": when,
                                          "GlobalTaxCalculation": calc, "Line": lines})
            if apply:
                self._apply_credit(memo, inv, when)
            shown: dict[str, Any] = _strip(memo)
            return shown

    def _apply_credit(self, memo: dict[str, Any], inv: dict[str, Any], day: str) -> Decimal:
        """Apply as much of ``memo`` as ``inv`` still owes, by a payment of no money; returns the amount applied."""
        amount = min(Decimal(memo["Balance"]), Decimal(inv["Balance"]))
        if amount <= 0 or inv["_status"] != "active":
            return Decimal(0)
        self._new_payment({
            "CustomerRef": {"value": inv["CustomerRef"]["value"]}, "TotalAmt": Decimal(0),
            "CurrencyRef": {"value": inv["CurrencyRef"]["value"]}, "TxnDate": day,
            "Line": [{"Amount": amount, "LinkedTxn": [{"TxnId": inv["Id"], "TxnType": "Invoice"}]},
                     {"Amount": amount, "LinkedTxn": [{"TxnId": memo["Id"], "TxnType": "CreditMemo"}]}],
        })
        return amount

    def add_expense(self, account_code: str, day: dt.date, net: Decimal, currency: str | None = None, *,
                    description: str = "", kind: str = "Bill") -> dict[str, Any]:
        """A supplier bill (``kind="Bill"``) or an expense paid by card (``"Purchase"``) of one line of ``net``
        booked to the account whose AcctNum is ``account_code`` (created as an expense account when missing)."""
        with self.lock:
            account = self._expense_account(account_code, description)
            line = {"DetailType": "AccountBasedExpenseLineDetail", "Amount": net, "Description": description,
                    "AccountBasedExpenseLineDetail": {"AccountRef": {"value": account["Id"]}}}
            body: dict[str, Any] = {"TxnDate": day.isoformat(), "Line": [line],
                                    "CurrencyRef": {"value": currency or self.home_currency}}
            if kind == "Purchase":
                doc = self._new_purchase({**body, "PaymentType": "CreditCard", "AccountRef": {"value": "10"}})
            else:
                vendor = self._history_vendor()
                doc = self._new_bill({**body, "VendorRef": {"value": vendor["Id"]},
                                      "DueDate": (day + dt.timedelta(days=30)).isoformat()})
            shown: dict[str, Any] = _strip(doc)
            return shown

    def _expense_account(self, code: str, label: str = "") -> dict[str, Any]:
        for account in self._accounts.values():
            if account.get("AcctNum") == code:
                return account
        name = f"{code} {label}".strip()[:100] if label else f"Charges {code}"
        taken = {str(a["Name"]).casefold() for a in self._accounts.values()}
        if name.casefold() in taken:
            name = f"Charges {code}"
        return self._new_account({"Name": name, "AcctNum": code, "AccountType": "Expense"})

    def _history_vendor(self) -> dict[str, Any]:
        name = "Fournisseurs divers"
        for vendor in self._vendors.values():
            if vendor["DisplayName"] == name:
                return vendor
        vendor_id = self._next_id("Vendor")
        self._vendors[vendor_id] = {"Id": vendor_id, "SyncToken": "0", "domain": "QBO", "sparse": False,
                                    "MetaData": self._meta(), "DisplayName": name, "CompanyName": name,
                                    "PrintOnCheckName": name, "Active": True, "Balance": Decimal("0"),
                                    "_t": self._now()}
        return self._vendors[vendor_id]

    # == history and settlement ====================================================================
    def _at_noon(self, day: dt.date) -> float:
        return dt.datetime(day.year, day.month, day.day, 12, tzinfo=self.tz).timestamp()

    def load_history(self, book: Book, history: History) -> dict[str, int]:
        """Write ``history`` as the company's past: a customer per company of the history (the name, e-mail, VAT
        number, SIRET and address the sync would send, without its external number, so that the sync matches
        them), the invoices with their dates, numbers, items and tax codes (the demo configuration's: the TaxCode
        of each rate, the Item of each SKU), the payments, the credit memos applied to their invoices by payments
        of no money, the supplier bills of the expenses (expenses paid from the bank for personnel costs, accounts
        64x), on expense accounts created when missing. Each record is stamped with the day it happened, so that
        change data capture sees only the recent ones. Records already there (the same company, invoice or credit
        memo number, expense) are kept, so loading twice adds nothing. Returns what was added."""
        by_code = {rate: code_id for code_id, _n, rate, _r, _rn in TAX_CODES}
        items = {str(item["Sku"]): item for item in self._items.values()}
        wanted = ({i.company_id for i in history.invoices} | {c.company_id for c in history.credit_notes}
                  | {p.company_id for p in history.profiles})
        companies = [c for c in book.companies if c.id in wanted]
        first: dict[str, dt.date] = {}
        for inv in history.invoices:
            first[inv.company_id] = min(first.get(inv.company_id, inv.issue_date), inv.issue_date)
        counts = {"customers": 0, "invoices": 0, "payments": 0, "credit_notes": 0, "expenses": 0}
        with self.lock:
            try:
                customer_of: dict[str, dict[str, Any]] = {}
                for company in companies:
                    since = first.get(company.id, history.today) - dt.timedelta(days=30)
                    self._backdate = self._at_noon(since)
                    before = len(self._customers)
                    customer_of[company.id] = self._history_customer(company)
                    counts["customers"] += len(self._customers) - before
                self._history_profiles.update({p.company_id: p for p in history.profiles})
                self._history_names.update({c.name.casefold(): c.id for c in companies})
                invoice_numbers = {str(i.get("DocNumber")): i["Id"] for i in self._live_invoices().values()}
                memo_numbers = {str(m.get("DocNumber")) for m in self._live_memos().values()}
                expenses_in = {str(d.get("PrivateNote")) for d in (*self._bills.values(), *self._purchases.values())}
                events: list[tuple[dt.date, int, str, Any]] = []
                invoice_ids: dict[str, str] = {}
                for inv in history.invoices:
                    known = invoice_numbers.get(inv.number[: wire.DOC_NUMBER_MAX])
                    if known is not None:
                        invoice_ids[inv.id] = known
                        continue
                    events.append((inv.issue_date, 0, "invoice", inv))
                    events.extend((p.date, 2, "payment", p) for p in inv.payments)
                events.extend((c.issue_date, 1, "credit", c) for c in history.credit_notes
                              if c.number[: wire.DOC_NUMBER_MAX] not in memo_numbers)
                events.extend((e.date, 3, "expense", e) for e in history.expenses if e.id not in expenses_in)
                events.sort(key=lambda ev: (ev[0], ev[1]))
                for day, _rank, kind, item in events:
                    self._backdate = self._at_noon(day)
                    if kind == "invoice":
                        body = self._history_document(item, customer_of[item.company_id], items, by_code)
                        record = self._invoice_from({**body, "DocNumber": item.number[: wire.DOC_NUMBER_MAX],
                                                     "DueDate": item.due_date.isoformat()}, None)
                        self._invoices[record["Id"]] = record
                        invoice_ids[item.id] = record["Id"]
                        # Its plan is drawn for the history's id; up to the history's today the history says what
                        # was paid.
                        self._history_keys[record["Id"]] = (item.id, history.today)
                        counts["invoices"] += 1
                    elif kind == "payment":
                        inv_record = self._invoices[invoice_ids[item.invoice_id]]
                        amount = min(item.amount, Decimal(inv_record["Balance"]))
                        if amount > 0:
                            self._new_payment({
                                "CustomerRef": {"value": inv_record["CustomerRef"]["value"]}, "TotalAmt": amount,
                                "CurrencyRef": {"value": inv_record["CurrencyRef"]["value"]},
                                "TxnDate": day.isoformat(), "PrivateNote": item.id,
                                "Line": [{"Amount": amount,
                                          "LinkedTxn": [{"TxnId": inv_record["Id"], "TxnType": "Invoice"}]}]})
                            counts["payments"] += 1
                    elif kind == "credit":
                        body = self._history_document(item, customer_of[item.company_id], items, by_code)
                        memo = self._new_credit_memo({**body, "DocNumber": item.number[: wire.DOC_NUMBER_MAX]})
                        target = invoice_ids.get(item.invoice_id)
                        if target is not None:
                            self._apply_credit(memo, self._invoices[target], day.isoformat())
                        counts["credit_notes"] += 1
                    else:
                        self._history_expense(item)
                        counts["expenses"] += 1
            except _Fault as fault:
                raise ValueError(f"the history does not fit this QuickBooks company: {fault}") from None
            finally:
                self._backdate = None
        return counts

    def _history_customer(self, company: BookCompany) -> dict[str, Any]:
        for customer_id, known in self._history_customers.items():
            if known == company.id and customer_id in self._customers:
                return self._customers[customer_id]  # loaded before
        customer = seedhistory.book_customer(company)
        if company.currency not in self.currencies:
            self.currencies = (*self.currencies, company.currency)
        base = wire.display_name(company.name) or company.id
        candidates = [base, f"{base[: wire.DISPLAY_NAME_MAX - len(company.id) - 3]} ({company.id})"]
        for name in candidates:
            if self._names_taken(name, None) is None:
                record = self._save_customer(wire.customer_body(customer, name))
                self._history_customers[record["Id"]] = company.id
                return record
        raise ValueError(f"no free DisplayName for the company {company.id}")

    def _history_document(self, doc: HistoryInvoice | HistoryCreditNote, customer: Mapping[str, Any],
                          items: Mapping[str, Mapping[str, Any]], by_code: Mapping[Decimal, str]) -> dict[str, Any]:
        currency = _ref_value(customer.get("CurrencyRef")) or self.home_currency
        if doc.currency != currency:
            raise ValueError(f"{doc.id} is in {doc.currency} but its customer pays in {currency}; a QuickBooks "
                             f"customer has one currency")
        lines = []
        for line in doc.lines:
            item = items.get(line.sku)
            code = by_code.get(Decimal(line.tax_rate))
            if item is None or code is None:
                raise ValueError(f"{doc.id}: no item {line.sku!r} or no tax code for {line.tax_rate} %")
            amount = round_money(line.quantity * line.unit_price * (Decimal(100) - line.discount_percent)
                                 / Decimal(100), doc.currency)
            detail: dict[str, Any] = {"ItemRef": {"value": item["Id"]}, "Qty": line.quantity,
                                      "UnitPrice": line.unit_price, "TaxCodeRef": {"value": code}}
            if line.discount_percent:
                detail["DiscountRate"] = line.discount_percent
            lines.append({"DetailType": "SalesItemLineDetail", "Amount": amount, "Description": line.description,
                          "SalesItemLineDetail": detail})
        return {"CustomerRef": {"value": customer["Id"]}, "CurrencyRef": {"value": doc.currency},
                "TxnDate": doc.issue_date.isoformat(), "GlobalTaxCalculation": "TaxExcluded", "Line": lines}

    def _history_expense(self, expense: HistoryExpense) -> None:
        if expense.currency not in self.currencies:
            self.currencies = (*self.currencies, expense.currency)
        account = self._expense_account(expense.account_code)
        body: dict[str, Any] = {
            "TxnDate": expense.date.isoformat(), "CurrencyRef": {"value": expense.currency},
            "PrivateNote": expense.id,
            "Line": [{"DetailType": "AccountBasedExpenseLineDetail", "Amount": expense.net,
                      "Description": expense.description,
                      "AccountBasedExpenseLineDetail": {"AccountRef": {"value": account["Id"]}}}],
        }
        if expense.account_code.startswith("64"):  # personnel costs: paid from the bank, no supplier bill
            self._new_purchase({**body, "PaymentType": "Check", "AccountRef": {"value": "4"}})
            return
        vendor = self._history_vendor()
        self._new_bill({**body, "VendorRef": {"value": vendor["Id"]},
                        "DueDate": (expense.date + dt.timedelta(days=30)).isoformat()})

    def _profile_for(self, customer_id: str) -> Any:
        """The payer profile of a customer: by the customer written with the history, else by its name."""
        company = self._history_customers.get(customer_id)
        if company is None:
            customer = self._customers.get(customer_id) or {}
            for name in (customer.get("CompanyName"), customer.get("DisplayName")):
                if isinstance(name, str) and name.casefold() in self._history_names:
                    company = self._history_names[name.casefold()]
                    break
        return self._history_profiles.get(company) if company is not None else None

    def settle(self, today: dt.date) -> int:
        """Pay the open invoices as their customers would: the payments of
        :func:`~connectors.seedhistory.payment_plan` dated up to ``today`` that have not been made yet (each planned
        payment once, at most what the invoice still owes), dated as planned. The plan of an invoice of the history
        is drawn for its history id, and only its payments planned after the history's today are made (up to that
        day the history has said what was paid); the plan of any other invoice is drawn for its Id. Returns the
        number of payments made."""
        made = 0
        with self.lock:
            for inv in sorted(self._invoices.values(), key=lambda r: int(r["Id"])):
                if inv["_status"] != "active" or inv["Balance"] <= 0 or inv["TotalAmt"] <= 0:
                    continue
                issue = dt.date.fromisoformat(inv["TxnDate"])
                if issue > today:
                    continue
                key, decided = self._history_keys.get(inv["Id"], (inv["Id"], None))
                plan = seedhistory.payment_plan(self._profile_for(inv["CustomerRef"]["value"]), key, issue,
                                                dt.date.fromisoformat(inv["DueDate"]), inv["TotalAmt"],
                                                inv["CurrencyRef"]["value"])
                done = self._settled.get(inv["Id"], 0)
                for index, (day, amount) in enumerate(plan):
                    if index < done:
                        continue
                    if day > today:
                        break
                    pay = min(amount, Decimal(inv["Balance"]))
                    if decided is not None and day <= decided:
                        pay = Decimal(0)  # the history has said what was paid up to its today
                    if pay > 0:
                        self._new_payment({
                            "CustomerRef": {"value": inv["CustomerRef"]["value"]}, "TotalAmt": pay,
                            "CurrencyRef": {"value": inv["CurrencyRef"]["value"]}, "TxnDate": day.isoformat(),
                            "Line": [{"Amount": pay, "LinkedTxn": [{"TxnId": inv["Id"], "TxnType": "Invoice"}]}]})
                        made += 1
                    done = index + 1
                self._settled[inv["Id"]] = done
        return made

    def stats(self) -> dict[str, Any]:
        base = super().stats()
        with self.lock:
            base.update(
                invoices=sum(1 for i in self._invoices.values() if i["_status"] != "deleted"),
                customers=len(self._customers),
                payments=len(self._payments),
                credit_memos=sum(1 for m in self._credit_memos.values() if m["_status"] != "deleted"),
                purchases=len(self._purchases),
                bills=len(self._bills),
                refresh_calls=self.refresh_calls,
                refresh_rejected=self.refresh_rejected,
                requestid_replays=self.requestid_replays,
                requestid_conflicts=self.requestid_conflicts,
                throttled=self.throttled,
                peak_concurrency=self._gate.peak,
            )
        return base
