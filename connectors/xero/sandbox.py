"""A stateful simulator of the Xero Accounting API, its identity (OAuth2) endpoints and its limits.

One organisation (tenant) seeded as the demo config expects: items from the seeded book's product
catalogue (``Code`` = SKU), revenue accounts 706/707, receivables 411, bank 512, suppliers 401, a few
expense accounts (622x-625x, 6411), French VAT rates ``TAX001``..``TAX004`` plus ``NONE``, currencies EUR
(base) and USD.

What it reproduces, because clients depend on it:

- the envelope ``{Id, Status, ProviderName, DateTimeUTC, ...}``, MS-JSON dates with escaped slashes,
  ``pagination`` when ``page`` is given (line items only then), ``pageSize``/``page_size`` up to 1000,
  ``where``/``order``/``IDs``/``Statuses``/``InvoiceNumbers``/``ContactIDs``/``If-Modified-Since``;
- PUT creates, POST creates or updates; ``summarizeErrors=false`` answers 200 with per-element
  ``HasErrors``/``ValidationErrors``, ``true`` fails the whole request with a 400 ValidationException;
- per-line tax rounding (line amount and line tax rounded to the cent, then summed), unique ACCREC
  invoice numbers (``INV-0001``...), unique active contact names;
- sales and purchase invoices (``ACCREC``/``ACCPAY``), payments, credit notes (``ACCRECCREDIT``/
  ``ACCPAYCREDIT``, numbered ``CN-0001``...) and their allocations to invoices
  (``PUT /CreditNotes/{id}/Allocations``): an allocation lowers the invoice's ``AmountDue`` and the credit
  note's ``RemainingCredit``, and either becomes ``PAID`` when nothing is left; spend and receive money
  (``/BankTransactions``);
- ``CurrencyRate`` on every document: 1 in the base currency; in another currency the rate sent, else a
  deterministic rate of the day (Xero's convention: units of the document's currency per one unit of the
  base currency);
- ``Idempotency-Key``: a replay of the same request returns the stored answer without applying it
  again; the same key with another request is refused with a 400; keys live ``idempotency_ttl_s``;
- ``xero-tenant-id`` (unknown tenant: 403), bearer tokens issued by ``POST /connect/token`` that expire
  (401 ``TokenExpired``), single-use refresh tokens (``invalid_grant`` on reuse after
  ``refresh_grace_s``), ``GET /connections``;
- limits per tenant: 5 concurrent, 60 per minute, 5,000 per day (and 10,000 per minute per app), on the
  sandbox clock; 429 with ``Retry-After`` in real seconds and ``X-Rate-Limit-Problem``
  (``concurrent``, ``minute``, ``day``, ``appminute``); ``X-DayLimit-Remaining``,
  ``X-MinLimit-Remaining``, ``X-AppMinLimit-Remaining`` on every API answer.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime as dt
import email.utils
import hashlib
import importlib
import json
import math
import random
import re
import secrets
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs

from connectors import seedhistory
from connectors.domain import round_money
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
from connectors.sandboxwebhooks import (
    WebhookSender,
    WebhookTarget,
    compact_json,
    iso_ms_utc,
    post_once,
    random_key,
    random_letters,
    sign_xero,
    webhook_admin,
)
from connectors.xero import wire
from connectors.xero.adapter import contact_fields
from connectors.xero.query import QueryError, compile_where, parse_order, sort_records

if TYPE_CHECKING:
    from connectors.seedbook import Book, BookCompany, BookLine
    from connectors.seedhistory import History, HistoryExpense, HistoryInvoice, PayerProfile

__all__ = ["API_PREFIX", "DEMO_CLIENT_ID", "DEMO_CLIENT_SECRET", "DEMO_TENANT_ID", "ItemSpec", "XeroSandbox",
           "sales_account"]

API_PREFIX = "/api.xro/2.0"
#: The simulator's own app and organisation, which the demo and test configs name.
DEMO_TENANT_ID = "demo-tenant"
DEMO_CLIENT_ID = "demo-client"
DEMO_CLIENT_SECRET = "demo-client-secret"  # public: the simulator's own test app
EMPTY_ID = "00000000-0000-0000-0000-000000000000"

_INVOICE_TYPES = {"ACCREC", "ACCPAY"}
_CREDIT_TYPES = {"ACCRECCREDIT": "ACCREC", "ACCPAYCREDIT": "ACCPAY"}  # credit note type -> invoice type
_BANK_TYPES = {"SPEND", "RECEIVE"}
_CREATE_STATUSES = {"DRAFT", "SUBMITTED", "AUTHORISED"}
_LINE_AMOUNT_TYPES = {"Exclusive", "Inclusive", "NoTax"}
_CENT = Decimal("0.01")


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


# (TaxType, name, rate)
_TAX_RATES: tuple[tuple[str, str, Decimal], ...] = (
    ("TAX001", "TVA 20 %", Decimal("20")),
    ("TAX002", "TVA 10 %", Decimal("10")),
    ("TAX003", "TVA 5,5 %", Decimal("5.5")),
    ("TAX004", "TVA 2,1 %", Decimal("2.1")),
    ("NONE", "Pas de TVA", Decimal("0")),
)
# (Code, Name, Type, Class, TaxType)
_ACCOUNTS: tuple[tuple[str, str, str, str, str], ...] = (
    ("706", "Prestations de services", "REVENUE", "REVENUE", "TAX001"),
    ("707", "Ventes de marchandises", "REVENUE", "REVENUE", "TAX001"),
    ("411", "Clients", "CURRENT", "ASSET", "NONE"),
    ("512", "Banque", "BANK", "ASSET", "NONE"),
    ("401", "Fournisseurs", "CURRLIAB", "LIABILITY", "NONE"),
    ("6226", "Honoraires", "EXPENSE", "EXPENSE", "TAX001"),
    ("6231", "Annonces et insertions", "EXPENSE", "EXPENSE", "TAX001"),
    ("6233", "Foires et expositions", "EXPENSE", "EXPENSE", "TAX001"),
    ("6234", "Cadeaux à la clientèle", "EXPENSE", "EXPENSE", "TAX001"),
    ("6251", "Voyages et déplacements", "EXPENSE", "EXPENSE", "TAX001"),
    ("6257", "Réceptions", "EXPENSE", "EXPENSE", "TAX001"),
    ("6411", "Salaires, appointements", "EXPENSE", "EXPENSE", "NONE"),
)
_CURRENCIES: dict[str, str] = {"EUR": "Euro", "USD": "United States Dollar"}
#: Central rate of each foreign currency, in Xero's convention: units of it per one unit of the base currency
#: (EUR). The rate of a day moves around it (see :meth:`XeroSandbox.day_rate`).
_FX_PER_BASE: dict[str, Decimal] = {"USD": Decimal("1.08")}
_RATE_Q = Decimal("0.000001")  # Xero keeps six decimals of a currency rate
#: Catalogue products booked to 707 (sales of goods) by the demo configuration; every other product is a
#: service, booked to 706. History invoices use the same accounts as the invoices the sync creates.
_GOODS_SKUS = frozenset({"HW-LAPTOP-14", "HW-SCREEN-27", "HW-DOCK-USBC", "CAT-LUNCH-TRAY", "BOOK-GUIDE",
                         "PRESS-SUB-YEAR"})
_NAME_SUFFIX = re.compile(r"\s*\([^()]*\)$")


def sales_account(sku: str) -> str:
    """The revenue account a catalogue product is sold to: 707 for goods, 706 for services."""
    return "707" if sku in _GOODS_SKUS else "706"


def _name_key(name: str) -> str:
    return " ".join(name.casefold().split())


def _book_products() -> Sequence[ItemSpec]:
    module = importlib.import_module("connectors.seedbook")
    products: Sequence[ItemSpec] = module.PRODUCTS
    return products


class _Invalid(Exception):
    pass


def _dec(value: Any, what: str) -> Decimal:
    if value is None or value == "":
        raise _Invalid(f"{what} must be a number")
    if isinstance(value, bool):
        raise _Invalid(f"{what} must be a number")
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise _Invalid(f"{what} must be a number") from None
    if not number.is_finite():
        raise _Invalid(f"{what} must be a number")
    return number


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return str(value)


class XeroSandbox(SandboxApp):
    """The Xero simulator. See the module docstring for what it reproduces.

    Options (all keyword-only): ``tenant_id`` (``demo-tenant``) and ``tenant_name``; ``client_id`` and
    ``client_secret`` of the one registered app (``demo-client``/``demo-client-secret``);
    ``initial_refresh_token`` (else :meth:`issue_tokens` or ``POST /_sandbox/authorize`` makes one);
    ``access_token_ttl_s`` (1800),
    ``refresh_token_ttl_s`` (60 days), ``refresh_grace_s`` (0: a used refresh token is dead at once;
    Xero documents a 30-minute grace, 1800); ``calls_per_minute`` (60), ``concurrency`` (5),
    ``calls_per_day`` (5000), ``app_calls_per_minute`` (10000); ``idempotency_ttl_s`` (24 h virtual);
    ``max_page_size`` (1000); ``items`` (catalogue products, default ``seedbook.PRODUCTS``);
    ``provider_name`` (the app name echoed in envelopes).
    """

    vendor = "xero"
    state_attrs = (
        "_rng", "tenant_id", "organisation_id", "connection_id", "_created_at", "_refresh", "_access",
        "_replays", "_contacts", "_invoices", "_payments", "_invoice_seq", "_items", "_accounts", "_tax_rates",
        "_currencies", "refresh_calls", "refresh_rejected", "idempotent_replays", "_credit_notes",
        "_credit_note_seq", "_bank_transactions", "_profiles", "_profile_names", "_plan_keys",
    )

    def __init__(
        self,
        *,
        seed: int = 0,
        faults: str | FaultPlan | None = None,
        clock: Clock | None = None,
        tenant_id: str = DEMO_TENANT_ID,
        tenant_name: str = "LedgerBridge Démo SAS",
        client_id: str = DEMO_CLIENT_ID,
        client_secret: str = DEMO_CLIENT_SECRET,
        initial_refresh_token: str | None = None,
        access_token_ttl_s: float = 1800.0,
        refresh_token_ttl_s: float = 60 * 86400.0,
        refresh_grace_s: float = 0.0,
        calls_per_minute: int = 60,
        concurrency: int = 5,
        calls_per_day: int = 5000,
        app_calls_per_minute: int = 10000,
        idempotency_ttl_s: float = 86400.0,
        max_page_size: int = 1000,
        items: Iterable[ItemSpec] | None = None,
        provider_name: str = "LedgerBridge",
    ) -> None:
        super().__init__(seed=seed, faults=faults, clock=clock)
        self._rng = random.Random(seed)
        self.tenant_id = tenant_id.lower()
        self.organisation_id = self._uuid()
        self.tenant_name = tenant_name
        self.client_id = client_id
        self._client_secret = client_secret
        self.provider_name = provider_name
        self.access_token_ttl_s = access_token_ttl_s
        self.refresh_token_ttl_s = refresh_token_ttl_s
        self.refresh_grace_s = refresh_grace_s
        self.idempotency_ttl_s = idempotency_ttl_s
        self.max_page_size = max_page_size
        self.base_currency = "EUR"
        self._created_at = self.clock.now()
        self.connection_id = self._uuid()

        self._minute = WindowLimit(self.clock, calls_per_minute, 60.0, "minute")
        self._day = WindowLimit(self.clock, calls_per_day, 86400.0, "day")
        self._app_minute = WindowLimit(self.clock, app_calls_per_minute, 60.0, "appminute")
        self._gate = ConcurrencyGate(concurrency)
        self._rate_lock = threading.Lock()
        self._in_gate: set[int] = set()

        self._auth_lock = threading.RLock()  # guards the token tables, apart from the vendor data
        self._refresh: dict[str, _RefreshGrant] = {}
        self._numbers_in_use: set[str] | None = None
        self._access: dict[str, float] = {}
        self.refresh_calls = 0
        self.refresh_rejected = 0
        self.rate_limited: dict[str, int] = {}
        self.idempotent_replays = 0
        self._replays: dict[str, _Replay] = {}

        self._contacts: dict[str, dict[str, Any]] = {}
        self._invoices: dict[str, dict[str, Any]] = {}
        self._payments: dict[str, dict[str, Any]] = {}
        self._invoice_seq = 0
        self._credit_notes: dict[str, dict[str, Any]] = {}
        self._credit_note_seq = 0
        self._bank_transactions: dict[str, dict[str, Any]] = {}
        # Loaded history: payer profile by contact id and by contact name; for each history invoice, the key
        # of its payment plan (its history id) and the day up to which the history decided its payments.
        self._profiles: dict[str, PayerProfile] = {}
        self._profile_names: dict[str, PayerProfile] = {}
        self._plan_keys: dict[str, tuple[str, dt.date]] = {}
        self._seed_org(items)
        if initial_refresh_token:
            self._refresh[initial_refresh_token] = _RefreshGrant(issued_at=self.clock.now())
        self._register_routes()

    # == seeding ===================================================================================
    def _uuid(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def _now_dt(self) -> dt.datetime:
        now = self.clock.now()
        # Millisecond precision, as the MS-JSON dates carry it, so that read-back values compare equal.
        return dt.datetime.fromtimestamp(math.floor(now * 1000) / 1000, tz=dt.UTC)

    def _today(self) -> dt.date:
        return self._now_dt().date()

    def _seed_org(self, items: Iterable[ItemSpec] | None) -> None:
        now = self._now_dt()
        self._tax_rates: dict[str, dict[str, Any]] = {}
        for tax_type, name, rate in _TAX_RATES:
            self._tax_rates[tax_type] = {
                "Name": name,
                "TaxType": tax_type,
                "ReportTaxType": "OUTPUT" if rate else "NONE",
                "CanApplyToAssets": True,
                "CanApplyToEquity": True,
                "CanApplyToExpenses": True,
                "CanApplyToLiabilities": True,
                "CanApplyToRevenue": True,
                "DisplayTaxRate": rate,
                "EffectiveRate": rate,
                "Status": "ACTIVE",
                "TaxComponents": [{"Name": "TVA", "Rate": rate, "IsCompound": False, "IsNonRecoverable": False}],
            }
        self._accounts: dict[str, dict[str, Any]] = {}
        for code, name, type_, class_, tax_type in _ACCOUNTS:
            account: dict[str, Any] = {
                "AccountID": self._uuid(),
                "Code": code,
                "Name": name,
                "Type": type_,
                "Class": class_,
                "Status": "ACTIVE",
                "TaxType": tax_type,
                "EnablePaymentsToAccount": False,
                "ShowInExpenseClaims": False,
                "ReportingCode": code,
                "HasAttachments": False,
                "UpdatedDateUTC": now,
            }
            if type_ == "BANK":
                account.update(BankAccountNumber="FR7630001007941234567890185", BankAccountType="BANK",
                               CurrencyCode=self.base_currency)
            self._accounts[code] = account
        self._currencies = dict(_CURRENCIES)
        by_rate = {rate: tax_type for tax_type, _name, rate in _TAX_RATES}
        products = list(items) if items is not None else list(_book_products())
        self._items: dict[str, dict[str, Any]] = {}
        for product in products:
            tax_rate = Decimal(product.tax_rate)
            self._items[product.sku] = {
                "ItemID": self._uuid(),
                "Code": product.sku,
                "Name": product.name[:50],
                "Description": product.name,
                "IsSold": True,
                "IsPurchased": False,
                "IsTrackedAsInventory": False,
                "PurchaseDetails": {},
                "SalesDetails": {
                    "UnitPrice": Decimal(product.unit_price),
                    "AccountCode": "706",
                    "TaxType": by_rate.get(tax_rate, "TAX001"),
                },
                "UpdatedDateUTC": now,
            }

    # == routes ====================================================================================
    def _register_routes(self) -> None:
        a = API_PREFIX
        self.route("POST", "/connect/token", self._token)
        self.route("POST", "/connect/revocation", self._revocation)
        self.route("GET", "/connections", self._connections)
        self.route("GET", "/Connections", self._connections)
        self.route("GET", f"{a}/Organisation", self._organisation)
        self.route("GET", f"{a}/Contacts", self._get_contacts)
        self.route("GET", f"{a}/Contacts/{{ContactID}}", self._get_contact)
        self.route("PUT", f"{a}/Contacts", lambda r: self._write(r, self._save_contacts, create_only=True))
        self.route("POST", f"{a}/Contacts", lambda r: self._write(r, self._save_contacts, create_only=False))
        self.route("POST", f"{a}/Contacts/{{ContactID}}",
                   lambda r: self._write(r, self._save_contacts, create_only=False))
        self.route("GET", f"{a}/Invoices", self._get_invoices)
        self.route("GET", f"{a}/Invoices/{{InvoiceID}}", self._get_invoice)
        self.route("PUT", f"{a}/Invoices", lambda r: self._write(r, self._save_invoices, create_only=True))
        self.route("POST", f"{a}/Invoices", lambda r: self._write(r, self._save_invoices, create_only=False))
        self.route("POST", f"{a}/Invoices/{{InvoiceID}}",
                   lambda r: self._write(r, self._save_invoices, create_only=False))
        self.route("GET", f"{a}/Payments", self._get_payments)
        self.route("GET", f"{a}/Payments/{{PaymentID}}", self._get_payment)
        self.route("PUT", f"{a}/Payments", lambda r: self._write(r, self._save_payments, create_only=True))
        self.route("POST", f"{a}/Payments", lambda r: self._write(r, self._save_payments, create_only=True))
        self.route("GET", f"{a}/CreditNotes", self._get_credit_notes)
        self.route("GET", f"{a}/CreditNotes/{{CreditNoteID}}", self._get_credit_note)
        self.route("PUT", f"{a}/CreditNotes", lambda r: self._write(r, self._save_credit_notes, create_only=True))
        self.route("POST", f"{a}/CreditNotes",
                   lambda r: self._write(r, self._save_credit_notes, create_only=False))
        self.route("POST", f"{a}/CreditNotes/{{CreditNoteID}}",
                   lambda r: self._write(r, self._save_credit_notes, create_only=False))
        self.route("PUT", f"{a}/CreditNotes/{{CreditNoteID}}/Allocations",
                   lambda r: self._write(r, self._save_allocations, create_only=True))
        self.route("DELETE", f"{a}/CreditNotes/{{CreditNoteID}}/Allocations/{{AllocationID}}",
                   lambda r: self._write(r, self._delete_allocation, create_only=False))
        self.route("GET", f"{a}/BankTransactions", self._get_bank_transactions)
        self.route("GET", f"{a}/BankTransactions/{{BankTransactionID}}", self._get_bank_transaction)
        self.route("PUT", f"{a}/BankTransactions",
                   lambda r: self._write(r, self._save_bank_transactions, create_only=True))
        self.route("POST", f"{a}/BankTransactions",
                   lambda r: self._write(r, self._save_bank_transactions, create_only=False))
        self.route("POST", f"{a}/BankTransactions/{{BankTransactionID}}",
                   lambda r: self._write(r, self._save_bank_transactions, create_only=False))
        self.route("GET", f"{a}/Items", lambda r: self._get_simple(r, "Items", list(self._items.values())))
        self.route("GET", f"{a}/TaxRates",
                   lambda r: self._get_simple(r, "TaxRates", list(self._tax_rates.values())))
        self.route("GET", f"{a}/Accounts",
                   lambda r: self._get_simple(r, "Accounts", list(self._accounts.values())))
        self.route("GET", f"{a}/Currencies", lambda r: self._get_simple(
            r, "Currencies", [{"Code": c, "Description": d} for c, d in self._currencies.items()]))

    # == responses =================================================================================
    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> SandboxResponse:
        # Xero's JSON escapes forward slashes ("\/Date(...)\/"); any JSON parser reads them back.
        body = wire.dumps(payload).replace("/", "\\/").encode()
        h = {"Content-Type": "application/json; charset=utf-8", "Xero-Correlation-Id": str(uuid.uuid4())}
        if headers:
            h.update(headers)
        return SandboxResponse(status, body, h)

    def _envelope(self, key: str, records: list[Any], pagination: dict[str, int] | None = None,
                  warnings: list[dict[str, str]] | None = None) -> SandboxResponse:
        payload: dict[str, Any] = {
            "Id": str(uuid.uuid4()),
            "Status": "OK",
            "ProviderName": self.provider_name,
            "DateTimeUTC": wire.ms_datetime(self.clock.now(), offset=False),
        }
        if pagination is not None:
            payload["pagination"] = pagination
        if warnings:
            payload["Warnings"] = warnings
        payload[key] = records
        return self._json(200, payload)

    def _problem(self, status: int, title: str, detail: str, headers: dict[str, str] | None = None
                 ) -> SandboxResponse:
        """The identity layer's problem shape (401, 403, 404, 429...)."""
        return self._json(status, {"Type": None, "Title": title, "Status": status, "Detail": detail,
                                   "Instance": str(uuid.uuid4()), "Extensions": {}}, headers)

    def _api_error(self, status: int, number: int, type_: str, message: str,
                   elements: list[dict[str, Any]] | None = None) -> SandboxResponse:
        payload: dict[str, Any] = {"ErrorNumber": number, "Type": type_, "Message": message}
        if elements is not None:
            payload["Elements"] = elements
        return self._json(status, payload)

    def not_found(self, req: SandboxRequest) -> SandboxResponse:
        return self._problem(404, "Not Found", "The resource you're looking for cannot be found")

    def fault_response(self, req: SandboxRequest, kind: str) -> SandboxResponse:
        status = int(kind)
        if status == 429:
            return self._rate_limited("minute", self.clock.to_real(1.0), injected=True)
        titles = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
                  504: "Gateway Timeout"}
        return self._problem(status, titles.get(status, "Error"), "The Xero API is temporarily unavailable")

    # == auth ======================================================================================
    def is_exempt(self, req: SandboxRequest) -> bool:
        return not req.path.startswith(API_PREFIX)

    def authorize(self, req: SandboxRequest) -> SandboxResponse | None:
        if req.path.startswith("/connect/") or req.path.startswith("/_sandbox"):
            return None
        auth = req.header("authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return self._unauthorised("AuthenticationUnsuccessful")
        with self._auth_lock:
            expires_at = self._access.get(token.strip())
        if expires_at is None:
            return self._unauthorised("AuthenticationUnsuccessful")
        if expires_at <= self.clock.now():
            when = dt.datetime.fromtimestamp(expires_at, tz=dt.UTC).strftime("%m/%d/%Y %H:%M:%S")
            return self._unauthorised(f"TokenExpired: token expired at {when}")
        if req.path.startswith(API_PREFIX):
            tenant = (req.header("xero-tenant-id") or "").strip().lower()
            if tenant != self.tenant_id:
                return self._problem(403, "Forbidden", "AuthenticationUnsuccessful")
        return None

    def _unauthorised(self, detail: str) -> SandboxResponse:
        return self._problem(401, "Unauthorized", detail,
                             {"WWW-Authenticate": 'Bearer error="invalid_token"'})

    # == limits ====================================================================================
    def _fmt_wait(self, real_seconds: float) -> str:
        real_seconds = max(real_seconds, 0.001)
        if self.clock.scale == 1.0:
            return str(max(math.ceil(real_seconds), 1))
        return f"{real_seconds:.3f}".rstrip("0").rstrip(".") or "0.001"

    def _rate_limited(self, problem: str, real_wait: float, *, injected: bool = False) -> SandboxResponse:
        if not injected:  # injected 429s are counted with the other faults
            with self._rate_lock:
                self.rate_limited[problem] = self.rate_limited.get(problem, 0) + 1
        resp = self._json(429, {"Type": None, "Title": "Too Many Requests", "Status": 429,
                                "Detail": f"Rate limit exceeded: {problem}", "Instance": str(uuid.uuid4()),
                                "Extensions": {}})
        resp.headers["Retry-After"] = self._fmt_wait(real_wait)
        resp.headers["X-Rate-Limit-Problem"] = problem
        return resp

    def pre_request(self, req: SandboxRequest, route: Route) -> SandboxResponse | None:
        if not req.path.startswith(API_PREFIX):
            return None
        if not self._gate.enter():
            return self._rate_limited("concurrent", 1.0)
        with self._rate_lock:
            self._in_gate.add(id(req))
            for limit in (self._day, self._minute, self._app_minute):
                if limit.remaining() <= 0:
                    _ok, _left, wait = limit.try_acquire()
                    blocked = limit
                    break
            else:
                for limit in (self._day, self._minute, self._app_minute):
                    limit.try_acquire()
                return None
        return self._rate_limited(blocked.name, wait)

    def post_request(self, req: SandboxRequest, resp: SandboxResponse) -> None:
        if req.path.startswith(API_PREFIX) and resp.status not in (401, 403):
            resp.headers["X-DayLimit-Remaining"] = str(max(self._day.remaining(), 0))
            resp.headers["X-MinLimit-Remaining"] = str(max(self._minute.remaining(), 0))
            resp.headers["X-AppMinLimit-Remaining"] = str(max(self._app_minute.remaining(), 0))

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
    def _client_ok(self, req: SandboxRequest, form: Mapping[str, list[str]]) -> bool:
        auth = req.header("authorization") or ""
        scheme, _, value = auth.partition(" ")
        client_id: str | None = None
        secret: str | None = None
        if scheme.lower() == "basic":
            try:
                client_id, _, secret = base64.b64decode(value.strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
        else:
            client_id = form["client_id"][-1] if form.get("client_id") else None
            secret = form["client_secret"][-1] if form.get("client_secret") else None
        return (
            client_id is not None
            and secret is not None
            and secrets.compare_digest(client_id, self.client_id)
            and secrets.compare_digest(secret, self._client_secret)
        )

    def _form(self, req: SandboxRequest) -> dict[str, list[str]]:
        try:
            return parse_qs(req.body.decode(), keep_blank_values=True)
        except UnicodeDecodeError:
            return {}

    def _issue_locked(self) -> dict[str, Any]:
        now = self.clock.now()
        # Forget tokens long dead so that a long-running sandbox does not grow without bound.
        for access in [t for t, exp in self._access.items() if exp < now - 86400]:
            del self._access[access]
        for refresh in [t for t, g in self._refresh.items()
                        if g.used_at is not None and g.used_at + self.refresh_grace_s < now - 86400]:
            del self._refresh[refresh]
        refresh = secrets.token_hex(32)
        self._refresh[refresh] = _RefreshGrant(issued_at=now)
        header = base64.urlsafe_b64encode(b'{"alg":"RS256","kid":"sandbox","typ":"JWT"}').rstrip(b"=")
        claims = json.dumps({"iss": "https://identity.xero.com", "client_id": self.client_id,
                             "exp": int(now + self.access_token_ttl_s), "jti": secrets.token_hex(16)})
        body = base64.urlsafe_b64encode(claims.encode()).rstrip(b"=")
        signature = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=")
        access = b".".join((header, body, signature)).decode()
        self._access[access] = now + self.access_token_ttl_s
        return {
            "access_token": access,
            "expires_in": int(self.access_token_ttl_s),
            "token_type": "Bearer",
            "refresh_token": refresh,
            "scope": "openid profile email accounting.transactions accounting.contacts "
                     "accounting.settings offline_access",
        }

    def _token(self, req: SandboxRequest) -> SandboxResponse:
        form = self._form(req)
        if not self._client_ok(req, form):
            return self._json(400, {"error": "invalid_client"})
        grant_type = (form.get("grant_type") or [""])[-1]
        if grant_type != "refresh_token":
            return self._json(400, {"error": "unsupported_grant_type"})
        token = (form.get("refresh_token") or [""])[-1]
        with self._auth_lock:
            self.refresh_calls += 1
            grant = self._refresh.get(token)
            now = self.clock.now()
            usable = (
                grant is not None
                and not grant.revoked
                and now < grant.issued_at + self.refresh_token_ttl_s
                and (grant.used_at is None or now < grant.used_at + self.refresh_grace_s)
            )
            if not usable or grant is None:
                self.refresh_rejected += 1
                return self._json(400, {"error": "invalid_grant"})
            if grant.used_at is None:
                grant.used_at = now
            payload = self._issue_locked()
        return self._json(200, payload, {"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _revocation(self, req: SandboxRequest) -> SandboxResponse:
        form = self._form(req)
        if not self._client_ok(req, form):
            return self._json(400, {"error": "invalid_client"})
        token = (form.get("token") or [""])[-1]
        with self._auth_lock:
            grant = self._refresh.get(token)
            if grant is not None:
                grant.revoked = True
        return SandboxResponse(200, b"", {})

    def _connections(self, req: SandboxRequest) -> SandboxResponse:
        # Xero writes these UTC times without a zone ("...19.5165400"), which is not an RFC 3339 date-time
        # as its identity spec declares; the "Z" keeps the same instant and satisfies the spec.
        created = dt.datetime.fromtimestamp(self._created_at, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")
        return self._json(200, [{
            "id": self.connection_id,
            "authEventId": self.connection_id,
            "tenantId": self.tenant_id,
            "tenantType": "ORGANISATION",
            "tenantName": self.tenant_name,
            "createdDateUtc": created,
            "updatedDateUtc": created,
        }])

    def _organisation(self, req: SandboxRequest) -> SandboxResponse:
        return self._envelope("Organisations", [{
            "OrganisationID": self.organisation_id,
            "Name": self.tenant_name,
            "LegalName": self.tenant_name,
            "PaysTax": True,
            "Version": "GLOBAL",
            "OrganisationType": "COMPANY",
            "BaseCurrency": self.base_currency,
            "CountryCode": "FR",
            "IsDemoCompany": False,
            "OrganisationStatus": "ACTIVE",
            "FinancialYearEndDay": 31,
            "FinancialYearEndMonth": 12,
            "SalesTaxBasis": "ACCRUAL",
            "SalesTaxPeriod": "MONTHLY",
            "DefaultSalesTax": "Tax Exclusive",
            "DefaultPurchasesTax": "Tax Exclusive",
            "CreatedDateUTC": wire.ms_datetime(self._created_at, offset=False),
            "Timezone": "ROMANCESTANDARDTIME",
            "OrganisationEntityType": "COMPANY",
            "ShortCode": "!LB001",
            "Class": "STANDARD",
            "Edition": "BUSINESS",
            "Addresses": [],
            "Phones": [],
            "ExternalLinks": [],
        }])

    # == test and demo helpers =====================================================================
    def admin(self, req: SandboxRequest) -> SandboxResponse:
        """Sandbox controls: ``GET /_sandbox/{stats,invoices,contacts,payments,credit-notes,bank-transactions}``,
        ``POST /_sandbox/authorize`` (a fresh token set, as after the consent flow), ``POST /_sandbox/payments``
        (``{"invoice_id", "amount", "date"}``: a payment recorded by a person), ``POST /_sandbox/credit-notes``
        (``{"invoice_id", "amount", "date"}``: a credit note on the invoice, allocated to it),
        ``POST /_sandbox/settle`` (``{"today": "YYYY-MM-DD"}``: see :meth:`settle`) and
        ``POST /_sandbox/revoke``."""
        path = req.path.rstrip("/")
        if path.startswith("/_sandbox/webhooks"):
            return self._webhook_admin(req)
        dump: Callable[[Any], bytes] = lambda payload: json.dumps(payload, default=str).encode()  # noqa: E731
        h = {"Content-Type": "application/json"}
        if req.method == "GET" and path == "/_sandbox/invoices":
            return SandboxResponse(200, dump(self.invoices()), h)
        if req.method == "GET" and path == "/_sandbox/contacts":
            return SandboxResponse(200, dump(self.contacts()), h)
        if req.method == "GET" and path == "/_sandbox/payments":
            return SandboxResponse(200, dump(self.payments()), h)
        if req.method == "GET" and path == "/_sandbox/credit-notes":
            return SandboxResponse(200, dump(self.credit_notes()), h)
        if req.method == "GET" and path == "/_sandbox/bank-transactions":
            return SandboxResponse(200, dump(self.bank_transactions()), h)
        if req.method == "POST" and path == "/_sandbox/authorize":
            return SandboxResponse(200, dump(self.issue_tokens()), h)
        if req.method == "POST" and path == "/_sandbox/revoke":
            self.revoke_refresh_tokens()
            return SandboxResponse(204, b"", {})
        if req.method == "POST" and path == "/_sandbox/payments":
            try:
                body = wire.loads(req.body or b"{}")
                payment = self.create_payment(str(body["invoice_id"]), _dec(body["amount"], "amount"),
                                              wire.parse_date(body.get("date")))
            except (ValueError, KeyError, TypeError, _Invalid) as exc:
                return SandboxResponse(400, dump({"message": str(exc)}), h)
            return SandboxResponse(200, dump(payment), h)
        if req.method == "POST" and path in {"/_sandbox/credit-notes", "/_sandbox/settle"}:
            try:
                body = wire.loads(req.body or b"{}")
                if path == "/_sandbox/settle":
                    today = wire.parse_date(body.get("today"))
                    if today is None:
                        raise ValueError("today must be a date, YYYY-MM-DD")
                    recorded = self.settle(today)
                    return SandboxResponse(200, dump({"recorded": len(recorded), "payments": recorded}), h)
                note = self.create_credit_note(str(body["invoice_id"]), _dec(body["amount"], "amount"),
                                               wire.parse_date(body.get("date")))
            except (ValueError, KeyError, TypeError, AttributeError, _Invalid) as exc:
                return SandboxResponse(400, dump({"message": str(exc)}), h)
            return SandboxResponse(200, dump(note), h)
        return super().admin(req)

    def issue_tokens(self) -> dict[str, Any]:
        """A fresh token set, as if a person had just completed the consent flow."""
        with self._auth_lock:
            return self._issue_locked()

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

    def invoices(self) -> list[dict[str, Any]]:
        """Every invoice, in creation order (amounts as Decimal, dates as ``date``)."""
        with self.lock:
            return copy.deepcopy(list(self._invoices.values()))

    def contacts(self) -> list[dict[str, Any]]:
        """Every contact, in creation order."""
        with self.lock:
            return [{k: v for k, v in c.items() if not k.startswith("_")}
                    for c in copy.deepcopy(list(self._contacts.values()))]

    def payments(self) -> list[dict[str, Any]]:
        with self.lock:
            return copy.deepcopy(list(self._payments.values()))

    def credit_notes(self) -> list[dict[str, Any]]:
        """Every credit note, in creation order, with its allocations."""
        with self.lock:
            return copy.deepcopy(list(self._credit_notes.values()))

    def bank_transactions(self) -> list[dict[str, Any]]:
        with self.lock:
            return copy.deepcopy(list(self._bank_transactions.values()))

    def invoice_by_reference(self, reference: str) -> dict[str, Any] | None:
        """The first non-deleted invoice with this Reference."""
        with self.lock:
            for inv in self._invoices.values():
                if inv.get("Reference") == reference and inv["Status"] != "DELETED":
                    return copy.deepcopy(inv)
        return None

    def create_payment(self, invoice_id: str, amount: Decimal, date: dt.date | None = None,
                       account_code: str = "512") -> dict[str, Any]:
        """Record a payment against an invoice, as a person would in Xero; returns the payment."""
        with self.lock:
            payment = self._new_payment({
                "Invoice": {"InvoiceID": invoice_id},
                "Account": {"Code": account_code},
                "Amount": amount,
                "Date": (date or self._today()).isoformat(),
            })
            return copy.deepcopy(payment)

    def create_credit_note(self, invoice_id: str, amount: Decimal, date: dt.date | None = None, *,
                           allocate: bool = True) -> dict[str, Any]:
        """A person's "Add credit note" on an invoice: an approved credit note of ``amount`` (tax included) for
        the invoice's contact, currency and rate, on the account and tax type of the invoice's first line,
        allocated to the invoice in full when ``allocate``; returns the credit note."""
        with self.lock, _plain_errors():
            inv = self._find_invoice(invoice_id)
            if inv is None:
                raise _Invalid(f"invoice {invoice_id} not found")
            first = inv["LineItems"][0] if inv["LineItems"] else {}
            day = date or self._today()
            note_type = "ACCRECCREDIT" if inv["Type"] == "ACCREC" else "ACCPAYCREDIT"
            element: dict[str, Any] = {
                "Type": note_type, "Contact": {"ContactID": inv["ContactID"]}, "Date": day.isoformat(),
                "Status": "AUTHORISED", "LineAmountTypes": "Inclusive", "CurrencyCode": inv["CurrencyCode"],
                "CurrencyRate": inv["CurrencyRate"],
                "LineItems": [{"Description": f"Avoir sur la facture {inv['InvoiceNumber']}".strip(), "Quantity": 1,
                               "UnitAmount": amount, "AccountCode": first.get("AccountCode") or "706",
                               "TaxType": first.get("TaxType") or "NONE"}],
            }
            if note_type == "ACCRECCREDIT":
                element["Reference"] = inv["InvoiceNumber"]
            note = self._new_credit_note(element, 4)
            self._credit_notes[note["CreditNoteID"]] = note
            if allocate:
                self._new_allocation(note, {"Invoice": {"InvoiceID": inv["InvoiceID"]}, "Amount": note["Total"],
                                            "Date": day.isoformat()})
            return copy.deepcopy(note)

    def _supplier(self, name: str) -> str:
        """The id of the active supplier contact called ``name``, created if there is none."""
        key = name.strip().lower()
        for contact in self._contacts.values():
            if contact["_name_key"] == key and contact["ContactStatus"] == "ACTIVE":
                contact["IsSupplier"] = True
                return str(contact["ContactID"])
        contact_id = self._uuid()
        self._contacts[contact_id] = {
            "ContactID": contact_id, "ContactStatus": "ACTIVE", "Name": name.strip(), "_name_key": key,
            "Addresses": [], "Phones": [], "ContactGroups": [], "ContactPersons": [], "IsSupplier": True,
            "IsCustomer": False, "HasAttachments": False, "HasValidationErrors": False,
            "UpdatedDateUTC": self._now_dt(),
        }
        return contact_id

    def _purchase_line(self, account_code: str, net: Decimal, description: str, currency: str,
                       tax_type: str | None) -> dict[str, Any]:
        # French VAT on purchases in euros; a purchase in another currency comes from abroad, without it.
        tax = tax_type or ("TAX001" if currency == self.base_currency else "NONE")
        return {"Description": description, "Quantity": 1, "UnitAmount": net, "AccountCode": account_code,
                "TaxType": tax}

    def create_bill(self, account_code: str, day: dt.date, net: Decimal, description: str, *,
                    currency: str | None = None, supplier: str = "Fournisseurs divers", number: str | None = None,
                    tax_type: str | None = None, status: str = "AUTHORISED", paid: bool = False) -> dict[str, Any]:
        """A supplier bill (``ACCPAY`` invoice) of one line of ``net`` (before tax) booked to ``account_code``,
        dated and due ``day``; paid in full that day from bank 512 when ``paid``. Returns the bill."""
        with self.lock, _plain_errors():
            cur = currency or self.base_currency
            element: dict[str, Any] = {
                "Type": "ACCPAY", "Contact": {"ContactID": self._supplier(supplier)}, "Date": day.isoformat(),
                "DueDate": day.isoformat(), "Status": status, "LineAmountTypes": "Exclusive", "CurrencyCode": cur,
                "LineItems": [self._purchase_line(account_code, net, description, cur, tax_type)],
            }
            if number:
                element["InvoiceNumber"] = number
            bill = self._new_invoice(element, 4)
            self._invoices[bill["InvoiceID"]] = bill
            if paid:
                self._new_payment({"Invoice": {"InvoiceID": bill["InvoiceID"]}, "Account": {"Code": "512"},
                                   "Amount": bill["Total"], "Date": day.isoformat()})
            return copy.deepcopy(bill)

    def create_spend(self, account_code: str, day: dt.date, net: Decimal, description: str, *,
                     supplier: str = "Fournisseurs divers", tax_type: str | None = None,
                     reference: str | None = None) -> dict[str, Any]:
        """Spend money from bank 512: a ``SPEND`` bank transaction of one line of ``net`` (before tax) booked to
        ``account_code`` on ``day``. Returns the bank transaction."""
        with self.lock, _plain_errors():
            element = {
                "Type": "SPEND", "Contact": {"ContactID": self._supplier(supplier)}, "BankAccount": {"Code": "512"},
                "Date": day.isoformat(), "LineAmountTypes": "Exclusive", "Reference": reference or description,
                "LineItems": [self._purchase_line(account_code, net, description, self.base_currency, tax_type)],
            }
            tx = self._new_bank_transaction(element, 4)
            self._bank_transactions[tx["BankTransactionID"]] = tx
            return copy.deepcopy(tx)

    # == ledger history ============================================================================
    def load_history(self, book: Book, history: History) -> dict[str, int]:
        """Write ``history`` as this organisation would hold it after years of use.

        A contact for every company of the history, with the name, e-mail, VAT number (``TaxNumber``),
        company number and address LedgerBridge would send for it, and its website (set in Xero's app, it is
        read-only in the API), so that the sync matches it; approved sales invoices with the history's
        numbers, dates, and the demo configuration's revenue accounts and tax types; the payments on their
        dates; approved credit notes allocated to the invoice they correct (as far as it is still due);
        supplier bills (paid on their date) for the expenses, spend money for personnel costs (accounts 64x),
        on expense accounts created when missing.
        Each contact's payer profile is remembered for :meth:`settle`. Records already present (same contact
        name, invoice or credit note number) are kept, so loading twice adds nothing. Returns counts.
        """
        companies = {c.id: c for c in book.companies}
        profiles = {p.company_id: p for p in history.profiles}
        counts = Counter[str]()
        with self.lock, _plain_errors():
            self._numbers_in_use = {i["InvoiceNumber"] for i in self._invoices.values()}
            try:
                wanted = [*(i.company_id for i in history.invoices), *(n.company_id for n in history.credit_notes),
                          *profiles]
                contacts: dict[str, str] = {}
                for company_id in dict.fromkeys(wanted):
                    contacts[company_id] = self._history_contact(companies[company_id], counts)
                    profile = profiles.get(company_id)
                    if profile is not None:
                        self._profiles[contacts[company_id]] = profile
                        self._profile_names[_name_key(companies[company_id].name)] = profile
                invoices: dict[str, dict[str, Any]] = {}
                for hist in history.invoices:
                    inv = self._history_invoice(hist, contacts[hist.company_id], history.today)
                    if inv is not None:
                        invoices[hist.id] = inv
                        counts["invoices"] += 1
                self._history_settlements(history, invoices, contacts, counts)
                for expense in history.expenses:
                    self._history_expense(expense, counts)
            finally:
                self._numbers_in_use = None
        return dict(counts)

    def _history_contact(self, company: BookCompany, counts: Counter[str]) -> str:
        name = company.name.strip()[:255]
        key = name.lower()
        for existing in self._contacts.values():
            if existing["_name_key"] == key and existing["ContactStatus"] == "ACTIVE":
                return str(existing["ContactID"])
        customer = seedhistory.book_customer(company)
        errors: list[str] = []
        contact: dict[str, Any] = {
            "ContactID": self._uuid(), "ContactStatus": "ACTIVE", "Name": name, "_name_key": key, "Addresses": [],
            "Phones": [], "ContactGroups": [], "ContactPersons": [], "IsSupplier": False, "IsCustomer": True,
            "HasAttachments": False, "HasValidationErrors": False,
        }
        self._contact_fields(contact_fields(customer), contact, errors)
        if errors:
            raise _Errors(errors)
        if customer.domain:
            contact["Website"] = f"https://www.{customer.domain}"
        contact["UpdatedDateUTC"] = self._now_dt()
        self._contacts[contact["ContactID"]] = contact
        counts["contacts"] += 1
        return str(contact["ContactID"])

    def _history_lines(self, lines: Iterable[BookLine]) -> list[dict[str, Any]]:
        by_rate = {Decimal(t["EffectiveRate"]): code for code, t in self._tax_rates.items()}
        out: list[dict[str, Any]] = []
        for line in lines:
            tax_type = by_rate.get(Decimal(line.tax_rate))
            if tax_type is None:
                raise _Invalid(f"no tax type for the rate {line.tax_rate} %")
            raw: dict[str, Any] = {"Description": line.description, "Quantity": line.quantity,
                                   "UnitAmount": line.unit_price, "AccountCode": sales_account(line.sku),
                                   "TaxType": tax_type}
            if line.sku in self._items:
                raw["ItemCode"] = line.sku
            if line.discount_percent:
                raw["DiscountRate"] = line.discount_percent
            out.append(raw)
        return out

    def _number_taken(self, number: str, doc_type: str) -> bool:
        taken = self._numbers_in_use
        return (taken is None or number in taken) and any(
            i["InvoiceNumber"] == number and i["Type"] == doc_type and i["Status"] != "DELETED"
            for i in self._invoices.values())

    def _history_invoice(self, hist: HistoryInvoice, contact_id: str, today: dt.date) -> dict[str, Any] | None:
        """The invoice created for ``hist``; None when its number is already in use (loaded before)."""
        if self._number_taken(hist.number, "ACCREC"):
            return None
        inv = self._new_invoice({
            "Type": "ACCREC", "Contact": {"ContactID": contact_id}, "InvoiceNumber": hist.number,
            "Date": hist.issue_date.isoformat(), "DueDate": hist.due_date.isoformat(), "Status": "AUTHORISED",
            "LineAmountTypes": "Exclusive", "CurrencyCode": hist.currency, "LineItems": self._history_lines(hist.lines),
        }, 4)
        self._invoices[inv["InvoiceID"]] = inv
        self._plan_keys[inv["InvoiceID"]] = (hist.id, today)
        return inv

    def _history_settlements(self, history: History, invoices: Mapping[str, dict[str, Any]],
                             contacts: Mapping[str, str], counts: Counter[str]) -> None:
        """Payments and credit notes of the invoices created by this load (``invoices``, by history id), in date
        order (on one day, payments first)."""
        events: list[tuple[dt.date, int, str, Any]] = []
        for hist in history.invoices:
            events += [(p.date, 0, hist.id, p) for p in hist.payments]
        events += [(n.issue_date, 1, n.invoice_id, n) for n in history.credit_notes]
        events.sort(key=lambda e: (e[0], e[1]))
        for day, kind, invoice_key, event in events:
            inv = invoices.get(invoice_key)
            if inv is None:
                continue  # an invoice loaded before, with its payments and credit notes
            if kind == 0:
                self._new_payment({"Invoice": {"InvoiceID": inv["InvoiceID"]}, "Account": {"Code": "512"},
                                   "Amount": event.amount, "Date": day.isoformat()})
                counts["payments"] += 1
                continue
            note = self._new_credit_note({
                "Type": "ACCRECCREDIT", "Contact": {"ContactID": contacts[event.company_id]},
                "CreditNoteNumber": event.number, "Reference": inv["InvoiceNumber"], "Date": day.isoformat(),
                "Status": "AUTHORISED", "LineAmountTypes": "Exclusive", "CurrencyCode": event.currency,
                "CurrencyRate": inv["CurrencyRate"], "LineItems": self._history_lines(event.lines),
            }, 4)
            self._credit_notes[note["CreditNoteID"]] = note
            counts["credit_notes"] += 1
            amount = min(note["Total"], inv["AmountDue"])
            if inv["Status"] == "AUTHORISED" and amount > 0 and inv["ContactID"] == note["ContactID"]:
                self._allocate(note, inv, amount, day)
                counts["allocations"] += 1

    def _history_expense(self, expense: HistoryExpense, counts: Counter[str]) -> None:
        """A supplier bill, paid on its date; personnel costs (accounts 64x) are spend money instead."""
        if self._number_taken(expense.id, "ACCPAY"):
            return
        account = self._accounts.get(expense.account_code)
        if account is None:
            account = self._accounts[expense.account_code] = {
                "AccountID": self._uuid(), "Code": expense.account_code, "Name": f"Charges {expense.account_code}",
                "Type": "EXPENSE", "Class": "EXPENSE", "Status": "ACTIVE", "TaxType": "TAX001",
                "EnablePaymentsToAccount": False, "ShowInExpenseClaims": True, "ReportingCode": expense.account_code,
                "HasAttachments": False, "UpdatedDateUTC": self._now_dt(),
            }
            counts["accounts"] += 1
        if expense.account_code.startswith("64"):  # personnel costs: paid from the bank, no supplier, no VAT
            if any(t["Reference"] == expense.id for t in self._bank_transactions.values()):
                return
            self.create_spend(expense.account_code, expense.date, expense.net, expense.description,
                              supplier="Personnel", tax_type="NONE", reference=expense.id)
            counts["spend"] += 1
            return
        self.create_bill(expense.account_code, expense.date, expense.net, expense.description,
                         currency=expense.currency, supplier=f"Fournisseurs – {account['Name']}", number=expense.id,
                         paid=True)
        counts["bills"] += 1

    def _profile_for(self, contact_id: str) -> PayerProfile | None:
        """The payer profile of a contact: the one remembered for it, else the one of the history company of
        the same name (a contact created later, by the sync, may carry a suffix in parentheses); else None."""
        profile = self._profiles.get(contact_id)
        contact = self._contacts.get(contact_id)
        if profile is not None or contact is None:
            return profile
        name = _name_key(str(contact.get("Name") or ""))
        profile = self._profile_names.get(name)
        stripped = _NAME_SUFFIX.sub("", name)
        if profile is None and stripped != name:
            profile = self._profile_names.get(stripped)
        return profile

    def settle(self, today: dt.date) -> list[dict[str, Any]]:
        """Customers pay what they owe, up to ``today``: for every open sales invoice (approved, something due),
        the payments :func:`connectors.seedhistory.payment_plan` plans for its contact's payer profile that are
        dated on or before ``today`` and not recorded yet are recorded (a planned payment counts as recorded
        when the invoice has a payment of the same date and amount; one larger than what is still due is cut
        down to it). Settling twice records nothing new. Returns the payments recorded.

        The plan's key is the invoice id; for an invoice loaded from a history it is the history's invoice id,
        and only the payments planned after the history's ``today`` are recorded: up to that day the history
        has said what was paid (an invoice it left unpaid stays so until then)."""
        recorded: list[dict[str, Any]] = []
        with self.lock, _plain_errors():
            paid: dict[str, Counter[tuple[dt.date, Decimal]]] = {}
            for p in self._payments.values():
                if p["Status"] != "DELETED":
                    paid.setdefault(p["InvoiceID"], Counter())[(p["Date"], p["Amount"])] += 1
            for inv in list(self._invoices.values()):
                if inv["Type"] != "ACCREC" or inv["Status"] != "AUTHORISED" or inv["AmountDue"] <= 0:
                    continue
                currency = inv["CurrencyCode"]
                key, decided = self._plan_keys.get(inv["InvoiceID"], (inv["InvoiceID"], None))
                plan = seedhistory.payment_plan(self._profile_for(inv["ContactID"]), key, inv["Date"],
                                                inv["DueDate"] or inv["Date"], inv["Total"], currency)
                done = paid.get(inv["InvoiceID"], Counter())
                for day, planned in plan:
                    amount = round_money(planned, currency)
                    if done[(day, amount)] > 0:
                        done[(day, amount)] -= 1
                        continue
                    if day > today or (decided is not None and day <= decided) or inv["Status"] != "AUTHORISED" \
                            or amount <= 0:
                        continue
                    payment = self._new_payment({"Invoice": {"InvoiceID": inv["InvoiceID"]}, "Account": {"Code": "512"},
                                                 "Amount": min(amount, inv["AmountDue"]), "Date": day.isoformat()})
                    recorded.append(copy.deepcopy(payment))
        return recorded

    def stats(self) -> dict[str, Any]:
        base = super().stats()
        with self.lock:
            base.update(
                invoices=len(self._invoices),
                contacts=len(self._contacts),
                payments=len(self._payments),
                credit_notes=len(self._credit_notes),
                bank_transactions=len(self._bank_transactions),
                refresh_calls=self.refresh_calls,
                refresh_rejected=self.refresh_rejected,
                idempotent_replays=self.idempotent_replays,
                rate_limited=dict(self.rate_limited),
                peak_concurrency=self._gate.peak,
            )
        return base

    # == idempotent writes =========================================================================
    def _fingerprint(self, req: SandboxRequest) -> str:
        h = hashlib.sha256()
        h.update(req.method.encode())
        h.update(req.path.encode())
        for name in sorted(req.query):
            h.update(f"\0{name}={','.join(req.query[name])}".lower().encode())
        h.update(b"\0")
        h.update(req.body)
        return h.hexdigest()

    def _write(self, req: SandboxRequest, apply: Callable[[SandboxRequest, bool], SandboxResponse],
               *, create_only: bool) -> SandboxResponse:
        key = (req.header("idempotency-key") or "").strip()
        with self.lock:
            if not key:
                return apply(req, create_only)
            if len(key) > 128:
                return self._api_error(400, 10, "ValidationException",
                                       "The Idempotency-Key header must be 128 characters or fewer")
            now = self.clock.now()
            for stale in [k for k, v in self._replays.items() if v.at + self.idempotency_ttl_s <= now]:
                del self._replays[stale]
            fingerprint = self._fingerprint(req)
            slot = f"{self.tenant_id}:{key}"
            stored = self._replays.get(slot)
            if stored is not None:
                if stored.fingerprint != fingerprint:
                    return self._api_error(
                        400, 10, "ValidationException",
                        "This Idempotency-Key was already used with a different request; "
                        "use a new key for a different request",
                    )
                self.idempotent_replays += 1
                return SandboxResponse(stored.status, stored.body, dict(stored.headers))
            resp = apply(req, create_only)
            if resp.status < 500:
                self._replays[slot] = _Replay(fingerprint, resp.status, resp.body, dict(resp.headers), now)
            return resp

    def _elements(self, req: SandboxRequest, key: str) -> list[Any] | SandboxResponse:
        try:
            body = wire.loads(req.body) if req.body else None
        except (ValueError, UnicodeDecodeError):
            return self._api_error(400, 14, "PostDataInvalidException", "The request body is not valid JSON")
        if isinstance(body, dict) and isinstance(body.get(key), list):
            elements: list[Any] = body[key]
        elif isinstance(body, dict) and body and key not in body:
            elements = [body]  # a single object is accepted as a one-element batch
        else:
            return self._api_error(400, 14, "PostDataInvalidException",
                                   f"The request body must hold a '{key}' array")
        if not elements or not all(isinstance(e, dict) for e in elements):
            return self._api_error(400, 14, "PostDataInvalidException", f"'{key}' must be a non-empty array")
        return elements

    def _summarize(self, req: SandboxRequest) -> bool:
        return (req.arg("summarizeErrors") or req.arg("summarize_errors") or "false").lower() == "true"

    def _batch(self, req: SandboxRequest, key: str, results: list[tuple[dict[str, Any], list[str]]],
               rollback: Callable[[], None]) -> SandboxResponse:
        """Answer a batch write: per-element errors (summarizeErrors=false) or all-or-nothing (true)."""
        failed = [(element, errors) for element, errors in results if errors]
        if failed and self._summarize(req):
            rollback()
            elements = []
            for element, errors in failed:
                element = dict(element)
                element["ValidationErrors"] = [{"Message": m} for m in errors]
                elements.append(element)
            return self._api_error(400, 10, "ValidationException", "A validation exception occurred", elements)
        out = []
        for element, errors in results:
            element = dict(element)
            if errors:
                element["ValidationErrors"] = [{"Message": m} for m in errors]
                element["StatusAttributeString"] = "ERROR"
                element["HasErrors" if key in {"Invoices", "CreditNotes"} else "HasValidationErrors"] = True
            else:
                element["StatusAttributeString"] = "OK"
            out.append(element)
        return self._envelope(key, out)

    # == reads =====================================================================================
    def _paged(self, req: SandboxRequest, records: list[Any]) -> tuple[list[Any], dict[str, int] | None]:
        page_s = req.arg("page")
        if page_s is None or page_s == "":
            return records, None
        size_s = req.arg("pageSize") or req.arg("page_size") or req.arg("pagesize")
        try:
            page = max(int(page_s), 1)
            size = min(max(int(size_s), 1), self.max_page_size) if size_s else 100
        except ValueError:
            raise _Invalid("page and pageSize must be integers") from None
        count = len(records)
        return records[(page - 1) * size : page * size], {
            "page": page, "pageSize": size, "pageCount": math.ceil(count / size), "itemCount": count,
        }

    def _modified_since(self, req: SandboxRequest) -> dt.datetime | None:
        raw = req.header("if-modified-since")
        if not raw:
            return None
        parsed = wire.parse_datetime(raw)
        if parsed is None:
            try:
                parsed = email.utils.parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                raise _Invalid("If-Modified-Since is not a valid date") from None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=dt.UTC)
        return parsed

    def _select(self, req: SandboxRequest, records: Iterable[dict[str, Any]], *, id_field: str,
                modified: bool = True) -> list[dict[str, Any]]:
        out = list(records)
        ids = {i.lower() for i in req.args("IDs") + req.args("ids")}
        if ids:
            out = [r for r in out if str(r.get(id_field, "")).lower() in ids]
        since = self._modified_since(req) if modified else None
        if since is not None:
            out = [r for r in out if r.get("UpdatedDateUTC") and r["UpdatedDateUTC"] >= since]
        try:
            where = compile_where(req.arg("where"))
            out = [r for r in out if where(r)]
            order = parse_order(req.arg("order"))
            return sort_records(out, order) if order else out
        except QueryError as exc:
            raise _Query(str(exc)) from None

    def _reading(self, fn: Callable[[], SandboxResponse]) -> SandboxResponse:
        try:
            with self.lock:
                return fn()
        except _Query as exc:
            return self._api_error(400, 16, "QueryParseException", str(exc))
        except _Invalid as exc:
            return self._api_error(400, 10, "ValidationException", str(exc))

    def _get_simple(self, req: SandboxRequest, key: str, records: list[dict[str, Any]]) -> SandboxResponse:
        def run() -> SandboxResponse:
            selected = self._select(req, records, id_field="", modified=key in {"Items", "Accounts"})
            return self._envelope(key, [self._render_plain(r, req) for r in selected])

        return self._reading(run)

    def _render_plain(self, record: Mapping[str, Any], req: SandboxRequest | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in record.items():
            if v is None:
                continue  # Xero leaves unset fields out rather than sending null
            if isinstance(v, dt.datetime):
                out[k] = wire.ms_datetime(v)
            elif isinstance(v, dict):
                out[k] = self._render_plain(v)
            else:
                out[k] = v
        return out

    # -- contacts ----------------------------------------------------------------------------------
    def _render_contact(self, c: Mapping[str, Any]) -> dict[str, Any]:
        out = self._render_plain(c)
        out.pop("_name_key", None)
        return out

    def _get_contacts(self, req: SandboxRequest) -> SandboxResponse:
        def run() -> SandboxResponse:
            records = list(self._contacts.values())
            if (req.arg("includeArchived") or "").lower() != "true":
                records = [c for c in records if c["ContactStatus"] == "ACTIVE"]
            term = (req.arg("searchTerm") or "").lower()
            if term:
                records = [c for c in records if any(term in str(c.get(f) or "").lower()
                                                     for f in ("Name", "ContactNumber", "EmailAddress",
                                                               "FirstName", "LastName"))]
            selected = self._select(req, records, id_field="ContactID")
            page, pagination = self._paged(req, selected)
            return self._envelope("Contacts", [self._render_contact(c) for c in page], pagination)

        return self._reading(run)

    def _get_contact(self, req: SandboxRequest) -> SandboxResponse:
        with self.lock:
            contact_id = req.params["ContactID"].lower()
            contact = self._contacts.get(contact_id)
            if contact is None:
                contact = next((c for c in self._contacts.values() if c.get("ContactNumber") == req.params[
                    "ContactID"]), None)
            if contact is None:
                return self.not_found(req)
            return self._envelope("Contacts", [self._render_contact(contact)])

    def _name_taken(self, name: str, except_id: str | None = None) -> bool:
        key = name.strip().lower()
        return any(
            c["_name_key"] == key and c["ContactStatus"] == "ACTIVE" and c["ContactID"] != except_id
            for c in self._contacts.values()
        )

    def _contact_fields(self, element: Mapping[str, Any], target: dict[str, Any], errors: list[str]) -> None:
        simple = ("ContactNumber", "AccountNumber", "FirstName", "LastName", "CompanyNumber", "EmailAddress",
                  "TaxNumber", "BankAccountDetails", "DefaultCurrency", "AccountsReceivableTaxType",
                  "SalesDefaultAccountCode")
        limits = {"ContactNumber": 50, "AccountNumber": 50, "CompanyNumber": 50, "TaxNumber": 50,
                  "EmailAddress": 255, "FirstName": 255, "LastName": 255}
        for field in simple:
            if field in element:
                value = _text(element[field])
                if value is not None and len(value) > limits.get(field, 4000):
                    errors.append(f"{field} must not be more than {limits[field]} characters long.")
                    continue
                target[field] = value
        if "ContactStatus" in element:
            status = str(element["ContactStatus"]).upper()
            if status not in {"ACTIVE", "ARCHIVED"}:
                errors.append(f"'{status}' is not a valid ContactStatus")
            else:
                target["ContactStatus"] = status
        currency = target.get("DefaultCurrency")
        if currency and currency not in self._currencies:
            errors.append(f"The currency '{currency}' is not enabled for this organisation.")
        for collection, kinds in (("Addresses", {"POBOX", "STREET"}),
                                  ("Phones", {"DEFAULT", "DDI", "MOBILE", "FAX", "OFFICE"})):
            if collection in element:
                values = element[collection]
                if not isinstance(values, list) or not all(isinstance(v, dict) for v in values):
                    errors.append(f"{collection} must be an array")
                    continue
                kind_field = "AddressType" if collection == "Addresses" else "PhoneType"
                for v in values:
                    if v.get(kind_field) not in kinds:
                        errors.append(f"{kind_field} must be one of {', '.join(sorted(kinds))}")
                        break
                else:
                    target[collection] = [{k: _text(x) for k, x in v.items()} for v in values]

    def _save_contacts(self, req: SandboxRequest, create_only: bool) -> SandboxResponse:
        elements = self._elements(req, "Contacts")
        if isinstance(elements, SandboxResponse):
            return elements
        path_id = req.params.get("ContactID")
        snapshot = copy.deepcopy(self._contacts) if self._summarize(req) else None
        results: list[tuple[dict[str, Any], list[str]]] = []
        for element in elements:
            errors: list[str] = []
            existing: dict[str, Any] | None = None
            ref_id = str(element.get("ContactID") or path_id or "").lower()
            if not create_only and ref_id:
                existing = self._contacts.get(ref_id)
                if existing is None:
                    errors.append("The ContactID does not match an existing contact")
            elif not create_only and element.get("ContactNumber"):
                existing = next((c for c in self._contacts.values()
                                 if c.get("ContactNumber") == element["ContactNumber"]), None)
            elif create_only and element.get("ContactID"):
                errors.append("A ContactID cannot be set when creating a contact")
            if errors:
                results.append((self._echo_contact(element), errors))
                continue
            target: dict[str, Any] = copy.deepcopy(existing) if existing else {
                "ContactID": self._uuid(), "ContactStatus": "ACTIVE", "Name": "", "Addresses": [], "Phones": [],
                "ContactGroups": [], "ContactPersons": [], "IsSupplier": False, "IsCustomer": False,
                "HasAttachments": False, "HasValidationErrors": False,
            }
            if "Name" in element or existing is None:
                name = (_text(element.get("Name")) or "").strip()
                if not name:
                    errors.append("The contact name must be specified.")
                elif len(name) > 255:
                    errors.append("The contact name must not be more than 255 characters long.")
                elif self._name_taken(name, target["ContactID"]):
                    errors.append(f"The contact name {name} is already assigned to another contact. "
                                  "The contact name must be unique across all active contacts.")
                target["Name"] = name
                target["_name_key"] = name.lower()
            self._contact_fields(element, target, errors)
            if errors:
                results.append((self._echo_contact(element), errors))
                continue
            target["UpdatedDateUTC"] = self._now_dt()
            self._contacts[target["ContactID"]] = target
            results.append((self._render_contact(target), []))

        def rollback() -> None:
            if snapshot is not None:
                self._contacts = snapshot

        return self._batch(req, "Contacts", results, rollback)

    def _echo_contact(self, element: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in element.items() if k in {
            "ContactNumber", "Name", "FirstName", "LastName", "EmailAddress", "TaxNumber", "CompanyNumber"}}
        out["ContactID"] = EMPTY_ID
        out["HasValidationErrors"] = True
        return out

    # -- invoices ----------------------------------------------------------------------------------
    def _unitdp(self, req: SandboxRequest) -> int:
        return 4 if (req.arg("unitdp") or "") == "4" else 2

    def _render_invoice(self, inv: Mapping[str, Any], *, lines: bool, unitdp: int = 2) -> dict[str, Any]:
        out: dict[str, Any] = {
            "Type": inv["Type"],
            "InvoiceID": inv["InvoiceID"],
            "InvoiceNumber": inv["InvoiceNumber"],
            "Reference": inv.get("Reference") or "",
            "Payments": [
                {"PaymentID": p["PaymentID"], "Date": wire.ms_date(p["Date"]), "Amount": p["Amount"],
                 "CurrencyRate": p["CurrencyRate"], "HasAccount": True, "HasValidationErrors": False}
                for p in self._payments.values() if p["InvoiceID"] == inv["InvoiceID"] and p["Status"] != "DELETED"
            ],
            "CreditNotes": self._credits_on(inv["InvoiceID"]),
            "Prepayments": [],
            "Overpayments": [],
            "AmountDue": inv["AmountDue"],
            "AmountPaid": inv["AmountPaid"],
            "AmountCredited": inv["AmountCredited"],
            "SentToContact": False,
            "CurrencyRate": inv["CurrencyRate"],
            "IsDiscounted": inv["IsDiscounted"],
            "HasAttachments": False,
            "HasErrors": False,
            "Contact": self._contact_ref(inv["ContactID"]),
            "DateString": inv["Date"].isoformat() + "T00:00:00",
            "Date": wire.ms_date(inv["Date"]),
            "Status": inv["Status"],
            "LineAmountTypes": inv["LineAmountTypes"],
            "SubTotal": inv["SubTotal"],
            "TotalTax": inv["TotalTax"],
            "Total": inv["Total"],
            "UpdatedDateUTC": wire.ms_datetime(inv["UpdatedDateUTC"]),
            "CurrencyCode": inv["CurrencyCode"],
        }
        if inv.get("DueDate"):
            out["DueDateString"] = inv["DueDate"].isoformat() + "T00:00:00"
            out["DueDate"] = wire.ms_date(inv["DueDate"])
        if inv.get("FullyPaidOnDate"):
            out["FullyPaidOnDate"] = wire.ms_date(inv["FullyPaidOnDate"])
        if inv.get("TotalDiscount"):
            out["TotalDiscount"] = inv["TotalDiscount"]
        if lines:
            out["LineItems"] = self._render_lines(inv["LineItems"], unitdp)
        return out

    def _invoice_view(self, inv: Mapping[str, Any]) -> dict[str, Any]:
        """The record as ``where`` sees it: invoice fields plus the contact's."""
        view = dict(inv)
        contact = self._contacts.get(inv["ContactID"], {})
        view["Contact"] = {"ContactID": inv["ContactID"], "Name": contact.get("Name"),
                           "ContactNumber": contact.get("ContactNumber")}
        return view

    def _get_invoices(self, req: SandboxRequest) -> SandboxResponse:
        def run() -> SandboxResponse:
            records = [self._invoice_view(i) for i in self._invoices.values()]
            statuses = {s.upper() for s in req.args("Statuses") + req.args("statuses")}
            if statuses:
                records = [i for i in records if i["Status"] in statuses]
            numbers = set(req.args("InvoiceNumbers") + req.args("invoice_numbers"))
            if numbers:
                records = [i for i in records if i["InvoiceNumber"] in numbers]
            contact_ids = {c.lower() for c in req.args("ContactIDs") + req.args("contact_ids")}
            if contact_ids:
                records = [i for i in records if i["ContactID"] in contact_ids]
            if (req.arg("includeArchived") or "").lower() != "true":
                records = [i for i in records if i["Status"] != "ARCHIVED"]
            term = (req.arg("searchTerm") or "").lower()
            if term:
                records = [i for i in records
                           if term in str(i.get("InvoiceNumber") or "").lower()
                           or term in str(i.get("Reference") or "").lower()]
            selected = self._select(req, records, id_field="InvoiceID")
            page, pagination = self._paged(req, selected)
            with_lines = pagination is not None and (req.arg("summaryOnly") or "").lower() != "true"
            unitdp = self._unitdp(req)
            rendered = [self._render_invoice(i, lines=with_lines, unitdp=unitdp) for i in page]
            return self._envelope("Invoices", rendered, pagination)

        return self._reading(run)

    def _find_invoice(self, ref: str) -> dict[str, Any] | None:
        inv = self._invoices.get(ref.lower())
        if inv is None:
            inv = next((i for i in self._invoices.values() if i["InvoiceNumber"] == ref), None)
        return inv

    def _get_invoice(self, req: SandboxRequest) -> SandboxResponse:
        with self.lock:
            inv = self._find_invoice(req.params["InvoiceID"])
            if inv is None:
                return self.not_found(req)
            return self._envelope("Invoices", [self._render_invoice(inv, lines=True, unitdp=self._unitdp(req))])

    def _resolve_contact(self, raw: Any, inv_type: str) -> str:
        if not isinstance(raw, dict) or not raw:
            raise _Invalid("A Contact must be specified for this type of transaction")
        contact_id = str(raw.get("ContactID") or "").lower()
        if contact_id and contact_id != EMPTY_ID:
            if contact_id not in self._contacts:
                raise _Invalid(f"The contact with ContactID {contact_id} could not be found")
            return contact_id
        number = _text(raw.get("ContactNumber"))
        if number:
            for c in self._contacts.values():
                if c.get("ContactNumber") == number:
                    return str(c["ContactID"])
        name = (_text(raw.get("Name")) or "").strip()
        if name:
            for c in self._contacts.values():
                if c["_name_key"] == name.lower() and c["ContactStatus"] == "ACTIVE":
                    return str(c["ContactID"])
            # Xero creates a contact that is referred to by an unknown name.
            new_id = self._uuid()
            self._contacts[new_id] = {
                "ContactID": new_id, "ContactStatus": "ACTIVE", "Name": name, "_name_key": name.lower(),
                "ContactNumber": number, "Addresses": [], "Phones": [], "ContactGroups": [], "ContactPersons": [],
                "IsSupplier": inv_type == "ACCPAY", "IsCustomer": inv_type == "ACCREC", "HasAttachments": False,
                "HasValidationErrors": False, "UpdatedDateUTC": self._now_dt(),
            }
            return new_id
        raise _Invalid("A Contact must be specified for this type of transaction")

    def _build_lines(self, raw_lines: Any, amount_types: str, currency: str, unitdp: int,
                     errors: list[str]) -> list[dict[str, Any]]:
        if raw_lines is None:
            return []
        if not isinstance(raw_lines, list) or not all(isinstance(x, dict) for x in raw_lines):
            errors.append("LineItems must be an array")
            return []
        lines: list[dict[str, Any]] = []
        unit_q = Decimal(1).scaleb(-unitdp)
        for raw in raw_lines:
            line: dict[str, Any] = {"LineItemID": self._uuid()}
            try:
                item_code = _text(raw.get("ItemCode"))
                item = None
                if item_code:
                    item = self._items.get(item_code)
                    if item is None:
                        raise _Invalid(f"Item code '{item_code}' is not valid")
                    line["ItemCode"] = item_code
                sales = item["SalesDetails"] if item else {}
                description = _text(raw.get("Description")) or (item["Description"] if item else None)
                if not description:
                    raise _Invalid("Description must be specified for each line item")
                line["Description"] = description
                quantity = _dec(raw.get("Quantity", 1), "Quantity")
                unit = raw.get("UnitAmount")
                unit_amount = _dec(unit, "UnitAmount") if unit is not None else Decimal(sales.get("UnitPrice", 0))
                discount = _dec(raw.get("DiscountRate"), "DiscountRate") if raw.get("DiscountRate") else Decimal(0)
                if not 0 <= discount <= 100:
                    raise _Invalid("DiscountRate must be between 0 and 100")
                account_code = _text(raw.get("AccountCode")) or sales.get("AccountCode")
                if account_code:
                    account = self._accounts.get(account_code)
                    if account is None or account["Status"] != "ACTIVE":
                        raise _Invalid(f"Account code '{account_code}' is not a valid code for this document.")
                    line["AccountCode"] = account_code
                tax_type = _text(raw.get("TaxType")) or sales.get("TaxType") or (
                    self._accounts[account_code]["TaxType"] if account_code else None)
                if amount_types == "NoTax":
                    tax_type = "NONE"
                if tax_type and tax_type not in self._tax_rates:
                    raise _Invalid(f"The TaxType code '{tax_type}' does not exist or cannot be used for this type "
                                   "of transaction.")
            except _Invalid as exc:
                errors.append(str(exc))
                continue
            unit_amount = unit_amount.quantize(unit_q, rounding=ROUND_HALF_UP)
            gross = quantity * unit_amount
            line_amount = round_money(gross * (Decimal(100) - discount) / Decimal(100), currency)
            rate = Decimal(self._tax_rates[tax_type]["EffectiveRate"]) if tax_type else Decimal(0)
            if amount_types == "Inclusive":
                tax = round_money(line_amount * rate / (Decimal(100) + rate), currency)
            else:
                tax = round_money(line_amount * rate / Decimal(100), currency)
            line.update(Quantity=quantity, UnitAmount=unit_amount, LineAmount=line_amount, TaxAmount=tax,
                        Tracking=[], ValidationErrors=[])
            if tax_type:
                line["TaxType"] = tax_type
            if discount:
                line["DiscountRate"] = discount
                line["DiscountAmount"] = round_money(gross, currency) - line_amount
            lines.append(line)
        return lines

    def _totals(self, doc: dict[str, Any]) -> None:
        """Totals of an invoice, credit note or bank transaction from its lines (tax rounded per line), and
        what is left: an invoice's ``AmountDue``, a credit note's ``RemainingCredit``."""
        currency = doc["CurrencyCode"]
        lines = doc["LineItems"]
        line_sum = sum((ln["LineAmount"] for ln in lines), Decimal(0))
        tax = sum((ln["TaxAmount"] for ln in lines), Decimal(0))
        subtotal = line_sum - tax if doc["LineAmountTypes"] == "Inclusive" else line_sum
        doc["SubTotal"] = round_money(subtotal, currency)
        doc["TotalTax"] = round_money(tax, currency)
        doc["Total"] = round_money(subtotal + tax, currency)
        if "AmountPaid" in doc:
            doc["AmountDue"] = doc["Total"] - doc["AmountPaid"] - doc["AmountCredited"]
        if "RemainingCredit" in doc:
            doc["RemainingCredit"] = doc["Total"] - self._allocated(doc)
        discount = sum((ln.get("DiscountAmount", Decimal(0)) for ln in lines), Decimal(0))
        doc["IsDiscounted"] = discount > 0
        doc["TotalDiscount"] = discount if discount > 0 else None

    def day_rate(self, currency: str, day: dt.date) -> Decimal:
        """The sandbox's rate of the day for ``currency`` (its XE.com rate), in Xero's convention: units of
        ``currency`` per one unit of the base currency; 1 for the base currency. Deterministic: a monthly level
        within 4 % of the central rate and a daily move within 0.05 %."""
        if currency == self.base_currency:
            return Decimal("1.000000")
        centre = _FX_PER_BASE.get(currency, Decimal(1))

        def spread(text: str, width: int) -> int:  # an integer in [-width, width], from a hash of ``text``
            return int(hashlib.sha256(f"{currency}:{text}".encode()).hexdigest()[:8], 16) % (2 * width + 1) - width

        move = Decimal(spread(f"{day:%Y-%m}", 400)) / 10000 + Decimal(spread(day.isoformat(), 50)) / 100000
        return (centre * (1 + move)).quantize(_RATE_Q, rounding=ROUND_HALF_UP)

    def _currency_rate(self, element: Mapping[str, Any], currency: str, day: dt.date | None,
                       errors: list[str]) -> Decimal:
        """The document's ``CurrencyRate``: 1 in the base currency, else the rate sent or the rate of the day."""
        if currency == self.base_currency:
            return Decimal("1.000000")
        raw = element.get("CurrencyRate")
        if raw is not None and raw != "":
            try:
                rate = _dec(raw, "CurrencyRate")
            except _Invalid as exc:
                errors.append(str(exc))
                return Decimal("1.000000")
            if rate <= 0:
                errors.append("The CurrencyRate must be greater than zero")
                return Decimal("1.000000")
            return rate.quantize(_RATE_Q, rounding=ROUND_HALF_UP)
        return self.day_rate(currency, day or self._today())

    def _echo_invoice(self, element: Mapping[str, Any]) -> dict[str, Any]:
        """A failed element as Xero sends it back: what was sent, normalised, with an empty ID."""
        out: dict[str, Any] = {"InvoiceID": EMPTY_ID, "HasErrors": True}
        for field in ("Type", "InvoiceNumber", "Reference", "Status", "LineAmountTypes", "CurrencyCode"):
            if field in element and element[field] is not None:
                out[field] = str(element[field])
        contact = element.get("Contact")
        if isinstance(contact, dict):
            out["Contact"] = {k: str(v) for k, v in contact.items()
                              if k in {"ContactID", "ContactNumber", "Name"} and v is not None}
        for field in ("Date", "DueDate"):
            day = wire.parse_date(element.get(field))
            if day is not None:
                out[field] = wire.ms_date(day)
        raw_lines = element.get("LineItems")
        if isinstance(raw_lines, list):
            lines = []
            for raw in raw_lines:
                if not isinstance(raw, dict):
                    continue
                line: dict[str, Any] = {}
                for k in ("Description", "ItemCode", "AccountCode", "TaxType"):
                    if raw.get(k) is not None:
                        line[k] = str(raw[k])
                for k in ("Quantity", "UnitAmount", "DiscountRate"):
                    try:
                        if raw.get(k) is not None:
                            line[k] = _dec(raw[k], k)
                    except _Invalid:
                        pass
                lines.append(line)
            out["LineItems"] = lines
        return out

    def _new_invoice(self, element: Mapping[str, Any], unitdp: int) -> dict[str, Any]:
        errors: list[str] = []
        inv_type = str(element.get("Type") or "").upper()
        if inv_type not in _INVOICE_TYPES:
            raise _Invalid("Invoice Type must be ACCREC or ACCPAY" if inv_type else "Invoice Type must be specified")
        status = str(element.get("Status") or "DRAFT").upper()
        if status not in _CREATE_STATUSES:
            errors.append(f"Invoice not of valid status for creation: {status}")
        amount_types = str(element.get("LineAmountTypes") or "Exclusive")
        amount_types = {t.lower(): t for t in _LINE_AMOUNT_TYPES}.get(amount_types.lower(), "")
        if not amount_types:
            errors.append("LineAmountTypes must be Exclusive, Inclusive or NoTax")
            amount_types = "Exclusive"
        currency = str(element.get("CurrencyCode") or self.base_currency).upper()
        if currency not in self._currencies:
            errors.append(f"The currency code {currency} is not enabled for this organisation.")
            currency = self.base_currency
        day = wire.parse_date(element["Date"]) if element.get("Date") else self._today()
        if day is None:
            errors.append("The Date is not a valid date")
        due = wire.parse_date(element["DueDate"]) if element.get("DueDate") else None
        if element.get("DueDate") and due is None:
            errors.append("The DueDate is not a valid date")
        number = (_text(element.get("InvoiceNumber")) or "").strip() or None
        if number is not None and len(number) > 255:
            errors.append("InvoiceNumber must not be more than 255 characters long.")
        taken = self._numbers_in_use
        maybe_taken = taken is None or number in taken  # a number never used is unique without a scan
        if inv_type == "ACCREC" and number is not None and maybe_taken and any(
            i["InvoiceNumber"] == number and i["Type"] == "ACCREC" and i["Status"] != "DELETED"
            for i in self._invoices.values()
        ):
            errors.append("Invoice # must be unique.")
        contact_id = ""
        try:
            contact_id = self._resolve_contact(element.get("Contact"), inv_type)
        except _Invalid as exc:
            errors.append(str(exc))
        lines = self._build_lines(element.get("LineItems"), amount_types, currency, unitdp, errors)
        if not element.get("LineItems") and status != "DRAFT":
            errors.append("At least one line item must be specified to approve an invoice.")
        if status == "AUTHORISED":
            for ln in lines:
                if not ln.get("AccountCode"):
                    errors.append("An account code must be specified on each line of an approved invoice.")
                    break
        rate = self._currency_rate(element, currency, day, errors)
        if errors:
            raise _Errors(errors)
        if number is None and inv_type == "ACCREC":
            # One set of the numbers in use per request keeps a large organisation linear, not quadratic.
            if taken is None:
                taken = {i["InvoiceNumber"] for i in self._invoices.values()}
            self._invoice_seq += 1
            while f"INV-{self._invoice_seq:04d}" in taken:
                self._invoice_seq += 1
            number = f"INV-{self._invoice_seq:04d}"
        if taken is not None and number is not None:
            taken.add(number)
        inv: dict[str, Any] = {
            "InvoiceID": self._uuid(),
            "Type": inv_type,
            "InvoiceNumber": number or "",
            "Reference": _text(element.get("Reference")) or "",
            "ContactID": contact_id,
            "Date": day,
            "DueDate": due,
            "Status": status,
            "LineAmountTypes": amount_types,
            "LineItems": lines,
            "CurrencyCode": currency,
            "CurrencyRate": rate,
            "AmountPaid": Decimal("0.00"),
            "AmountCredited": Decimal("0.00"),
            "FullyPaidOnDate": None,
        }
        self._totals(inv)
        inv["UpdatedDateUTC"] = self._now_dt()
        self._mark_contact(contact_id, inv_type)
        return inv

    def _mark_contact(self, contact_id: str, doc_type: str) -> None:
        """A contact becomes a customer with its first sale and a supplier with its first purchase."""
        contact = self._contacts.get(contact_id)
        if contact is None:
            return
        flag = "IsCustomer" if doc_type in {"ACCREC", "RECEIVE"} else "IsSupplier"
        if not contact.get(flag):
            contact[flag] = True

    def _update_invoice(self, inv: dict[str, Any], element: Mapping[str, Any], unitdp: int) -> None:
        errors: list[str] = []
        status = str(element.get("Status") or inv["Status"]).upper()
        current = inv["Status"]
        allowed = {
            "DRAFT": {"DRAFT", "SUBMITTED", "AUTHORISED", "DELETED"},
            "SUBMITTED": {"DRAFT", "SUBMITTED", "AUTHORISED", "DELETED"},
            "AUTHORISED": {"AUTHORISED", "VOIDED"},
        }.get(current, {current})
        if status not in allowed:
            errors.append(f"Invoice status cannot be changed from {current} to {status}")
        if status == "VOIDED" and inv["AmountPaid"] > 0:
            errors.append("Invoices with payments cannot be voided")
        if status == "VOIDED" and inv["AmountCredited"] > 0:
            errors.append("Invoices with credit notes allocated to them cannot be voided")
        editable = current in {"DRAFT", "SUBMITTED"} or (
            current == "AUTHORISED" and inv["AmountPaid"] == 0 and inv["AmountCredited"] == 0)
        new_lines = None
        if "LineItems" in element:
            if not editable:
                errors.append("This document cannot be edited as it has a payment or credit note allocated to it.")
            else:
                new_lines = self._build_lines(element["LineItems"], inv["LineAmountTypes"], inv["CurrencyCode"],
                                              unitdp, errors)
        for field in ("Date", "DueDate"):
            if element.get(field):
                day = wire.parse_date(element[field])
                if day is None:
                    errors.append(f"The {field} is not a valid date")
        if errors:
            raise _Errors(errors)
        inv["Status"] = status
        if "Reference" in element:
            inv["Reference"] = _text(element.get("Reference")) or ""
        for field in ("Date", "DueDate"):
            if element.get(field):
                inv[field] = wire.parse_date(element[field])
        if new_lines is not None:
            inv["LineItems"] = new_lines
            self._totals(inv)
        inv["UpdatedDateUTC"] = self._now_dt()

    def _save_invoices(self, req: SandboxRequest, create_only: bool) -> SandboxResponse:
        elements = self._elements(req, "Invoices")
        if isinstance(elements, SandboxResponse):
            return elements
        unitdp = self._unitdp(req)
        path_id = req.params.get("InvoiceID")
        snapshot = copy.deepcopy((self._invoices, self._contacts, self._invoice_seq)) if self._summarize(req) else None
        results: list[tuple[dict[str, Any], list[str]]] = []
        self._numbers_in_use = {i["InvoiceNumber"] for i in self._invoices.values()}
        try:
            self._save_invoice_elements(elements, results, unitdp, path_id, create_only)
        finally:
            self._numbers_in_use = None

        def rollback() -> None:
            if snapshot is not None:
                self._invoices, self._contacts, self._invoice_seq = snapshot

        return self._batch(req, "Invoices", results, rollback)

    def _save_invoice_elements(self, elements: list[Any], results: list[tuple[dict[str, Any], list[str]]],
                               unitdp: int, path_id: str | None, create_only: bool) -> None:
        for element in elements:
            try:
                existing = None
                ref = str(element.get("InvoiceID") or path_id or "")
                if ref and create_only:
                    raise _Invalid("An InvoiceID cannot be set when creating an invoice")
                if ref and ref.lower() != EMPTY_ID:
                    existing = self._find_invoice(ref)
                    if existing is None:
                        raise _Invalid("The InvoiceID does not match an existing invoice")
                elif not create_only and element.get("InvoiceNumber"):
                    number = str(element["InvoiceNumber"])
                    existing = next((i for i in self._invoices.values() if i["InvoiceNumber"] == number
                                     and i["Type"] == str(element.get("Type") or "ACCREC").upper()
                                     and i["Status"] != "DELETED"), None)
                if existing is not None:
                    self._update_invoice(existing, element, unitdp)
                    inv = existing
                else:
                    inv = self._new_invoice(element, unitdp)
                    self._invoices[inv["InvoiceID"]] = inv
                results.append((self._render_invoice(inv, lines=True, unitdp=unitdp), []))
            except _Invalid as exc:
                results.append((self._echo_invoice(element), [str(exc)]))
            except _Errors as exc:
                results.append((self._echo_invoice(element), exc.messages))

    # -- payments ----------------------------------------------------------------------------------
    def _render_payment(self, p: Mapping[str, Any]) -> dict[str, Any]:
        inv = self._invoices[p["InvoiceID"]]
        contact = self._contacts.get(inv["ContactID"], {})
        account = self._accounts[p["AccountCode"]]
        return {
            "PaymentID": p["PaymentID"],
            "Date": wire.ms_date(p["Date"]),
            "BankAmount": p["Amount"],
            "Amount": p["Amount"],
            "Reference": p.get("Reference") or "",
            "CurrencyRate": p["CurrencyRate"],
            "PaymentType": "ACCRECPAYMENT" if inv["Type"] == "ACCREC" else "ACCPAYPAYMENT",
            "Status": p["Status"],
            "UpdatedDateUTC": wire.ms_datetime(p["UpdatedDateUTC"]),
            "HasAccount": True,
            "IsReconciled": False,
            "Account": {"AccountID": account["AccountID"], "Code": account["Code"], "Name": account["Name"]},
            "Invoice": {
                "Type": inv["Type"],
                "InvoiceID": inv["InvoiceID"],
                "InvoiceNumber": inv["InvoiceNumber"],
                "Reference": inv.get("Reference") or "",
                "Payments": [],
                "CreditNotes": [],
                "Prepayments": [],
                "Overpayments": [],
                "HasErrors": False,
                "IsDiscounted": inv["IsDiscounted"],
                "Contact": {"ContactID": inv["ContactID"], "Name": contact.get("Name", ""),
                            "Addresses": [], "Phones": [], "ContactGroups": [], "ContactPersons": [],
                            "HasValidationErrors": False},
                "LineItems": [],
                "CurrencyCode": inv["CurrencyCode"],
            },
            "HasValidationErrors": False,
        }

    def _payment_view(self, p: Mapping[str, Any]) -> dict[str, Any]:
        inv = self._invoices[p["InvoiceID"]]
        view = dict(p)
        view["Invoice"] = {"InvoiceID": inv["InvoiceID"], "InvoiceNumber": inv["InvoiceNumber"],
                           "Type": inv["Type"], "Reference": inv.get("Reference")}
        view["PaymentType"] = "ACCRECPAYMENT" if inv["Type"] == "ACCREC" else "ACCPAYPAYMENT"
        return view

    def _get_payments(self, req: SandboxRequest) -> SandboxResponse:
        def run() -> SandboxResponse:
            records = [self._payment_view(p) for p in self._payments.values()]
            selected = self._select(req, records, id_field="PaymentID")
            page, pagination = self._paged(req, selected)
            return self._envelope("Payments", [self._render_payment(p) for p in page], pagination)

        return self._reading(run)

    def _get_payment(self, req: SandboxRequest) -> SandboxResponse:
        with self.lock:
            p = self._payments.get(req.params["PaymentID"].lower())
            if p is None:
                return self.not_found(req)
            return self._envelope("Payments", [self._render_payment(p)])

    def _new_payment(self, element: Mapping[str, Any]) -> dict[str, Any]:
        invoice_ref = element.get("Invoice")
        if not isinstance(invoice_ref, dict):
            raise _Invalid("An Invoice must be specified for the payment")
        inv = None
        if invoice_ref.get("InvoiceID"):
            inv = self._invoices.get(str(invoice_ref["InvoiceID"]).lower())
        elif invoice_ref.get("InvoiceNumber"):
            inv = next((i for i in self._invoices.values()
                        if i["InvoiceNumber"] == str(invoice_ref["InvoiceNumber"])), None)
        if inv is None:
            raise _Invalid("Invoice could not be found")
        if inv["Status"] != "AUTHORISED":
            raise _Invalid("Payments can only be made against Authorised documents")
        account_ref = element.get("Account")
        account = None
        if isinstance(account_ref, dict):
            if account_ref.get("Code"):
                account = self._accounts.get(str(account_ref["Code"]))
            elif account_ref.get("AccountID"):
                account = next((a for a in self._accounts.values()
                                if a["AccountID"] == str(account_ref["AccountID"]).lower()), None)
        if account is None:
            raise _Invalid("An Account must be specified for the payment")
        if account["Type"] != "BANK" and not account["EnablePaymentsToAccount"]:
            raise _Invalid("Account type is invalid for making a payment to/from")
        amount = round_money(_dec(element.get("Amount"), "Amount"), inv["CurrencyCode"])
        if amount <= 0:
            raise _Invalid("Payment amount must be greater than zero")
        if amount > inv["AmountDue"]:
            raise _Invalid("Payment amount exceeds the amount outstanding on this document")
        day = wire.parse_date(element.get("Date")) if element.get("Date") else self._today()
        if day is None:
            raise _Invalid("The Date is not a valid date")
        now = self._now_dt()
        payment = {
            "PaymentID": self._uuid(),
            "InvoiceID": inv["InvoiceID"],
            "AccountCode": account["Code"],
            "Date": day,
            "Amount": amount,
            "CurrencyRate": inv["CurrencyRate"],
            "Reference": _text(element.get("Reference")) or "",
            "Status": "AUTHORISED",
            "UpdatedDateUTC": now,
        }
        self._payments[payment["PaymentID"]] = payment
        inv["AmountPaid"] = inv["AmountPaid"] + amount
        inv["AmountDue"] = inv["Total"] - inv["AmountPaid"] - inv["AmountCredited"]
        if inv["AmountDue"] == 0:
            inv["Status"] = "PAID"
            inv["FullyPaidOnDate"] = day
        inv["UpdatedDateUTC"] = now
        return payment

    def _save_payments(self, req: SandboxRequest, create_only: bool) -> SandboxResponse:
        elements = self._elements(req, "Payments")
        if isinstance(elements, SandboxResponse):
            return elements
        snapshot = copy.deepcopy((self._payments, self._invoices)) if self._summarize(req) else None
        results: list[tuple[dict[str, Any], list[str]]] = []
        for element in elements:
            try:
                payment = self._new_payment(element)
                results.append((self._render_payment(payment), []))
            except _Invalid as exc:
                echo: dict[str, Any] = {"PaymentID": EMPTY_ID, "HasValidationErrors": True}
                try:
                    if element.get("Amount") is not None:
                        echo["Amount"] = _dec(element["Amount"], "Amount")
                except _Invalid:
                    pass
                day = wire.parse_date(element.get("Date"))
                if day is not None:
                    echo["Date"] = wire.ms_date(day)
                results.append((echo, [str(exc)]))

        def rollback() -> None:
            if snapshot is not None:
                self._payments, self._invoices = snapshot

        return self._batch(req, "Payments", results, rollback)

    # == shared by every kind of document ==========================================================
    def _contact_ref(self, contact_id: str) -> dict[str, Any]:
        """The contact as a document embeds it."""
        contact = self._contacts.get(contact_id, {})
        out: dict[str, Any] = {
            "ContactID": contact_id,
            "Name": contact.get("Name", ""),
            "ContactStatus": contact.get("ContactStatus", "ACTIVE"),
            "Addresses": [],
            "Phones": [],
            "ContactGroups": [],
            "ContactPersons": [],
            "HasValidationErrors": False,
        }
        if contact.get("ContactNumber"):
            out["ContactNumber"] = contact["ContactNumber"]
        return out

    @staticmethod
    def _render_lines(lines: Iterable[Mapping[str, Any]], unitdp: int) -> list[dict[str, Any]]:
        quantum = Decimal(1).scaleb(-unitdp)
        return [
            {k: (v.quantize(quantum, rounding=ROUND_HALF_UP) if k == "UnitAmount" and isinstance(v, Decimal) else v)
             for k, v in line.items()}
            for line in lines
        ]

    @staticmethod
    def _amount_types(element: Mapping[str, Any], errors: list[str]) -> str:
        raw = str(element.get("LineAmountTypes") or "Exclusive")
        amount_types = {t.lower(): t for t in _LINE_AMOUNT_TYPES}.get(raw.lower(), "")
        if not amount_types:
            errors.append("LineAmountTypes must be Exclusive, Inclusive or NoTax")
        return amount_types or "Exclusive"

    def _document_currency(self, element: Mapping[str, Any], errors: list[str], default: str | None = None) -> str:
        currency = str(element.get("CurrencyCode") or default or self.base_currency).upper()
        if currency not in self._currencies:
            errors.append(f"The currency code {currency} is not enabled for this organisation.")
            return self.base_currency
        return currency

    def _document_dates(self, element: Mapping[str, Any], errors: list[str]) -> tuple[dt.date | None, dt.date | None]:
        day = wire.parse_date(element["Date"]) if element.get("Date") else self._today()
        if day is None:
            errors.append("The Date is not a valid date")
        due = wire.parse_date(element["DueDate"]) if element.get("DueDate") else None
        if element.get("DueDate") and due is None:
            errors.append("The DueDate is not a valid date")
        return day, due

    def _snapshot(self) -> Any:
        return copy.deepcopy((self._invoices, self._credit_notes, self._bank_transactions, self._payments,
                              self._contacts, self._invoice_seq, self._credit_note_seq))

    def _restore(self, snapshot: Any) -> None:
        (self._invoices, self._credit_notes, self._bank_transactions, self._payments, self._contacts,
         self._invoice_seq, self._credit_note_seq) = snapshot

    def _echo_document(self, element: Mapping[str, Any], id_field: str, fields: Sequence[str]) -> dict[str, Any]:
        """A failed element as Xero sends it back: what was sent, normalised, with an empty ID."""
        out: dict[str, Any] = {id_field: EMPTY_ID, "HasErrors": True}
        for field in fields:
            if element.get(field) is not None:
                out[field] = str(element[field])
        contact = element.get("Contact")
        if isinstance(contact, dict):
            out["Contact"] = {k: str(v) for k, v in contact.items()
                              if k in {"ContactID", "ContactNumber", "Name"} and v is not None}
        for field in ("Date", "DueDate"):
            day = wire.parse_date(element.get(field))
            if day is not None:
                out[field] = wire.ms_date(day)
        return out

    def _save_documents(
        self,
        req: SandboxRequest,
        create_only: bool,
        *,
        key: str,
        id_field: str,
        label: str,
        find: Callable[[str], dict[str, Any] | None],
        new: Callable[[Mapping[str, Any], int], dict[str, Any]],
        update: Callable[[dict[str, Any], Mapping[str, Any], int], None],
        render: Callable[[dict[str, Any], int], dict[str, Any]],
        store: Callable[[], dict[str, dict[str, Any]]],
        echo: Sequence[str],
    ) -> SandboxResponse:
        """PUT (create) or POST (create or update) a batch of credit notes or bank transactions."""
        elements = self._elements(req, key)
        if isinstance(elements, SandboxResponse):
            return elements
        unitdp = self._unitdp(req)
        path_id = req.params.get(id_field)
        snapshot = self._snapshot() if self._summarize(req) else None
        results: list[tuple[dict[str, Any], list[str]]] = []
        for element in elements:
            try:
                ref = str(element.get(id_field) or path_id or "")
                existing = None
                if ref and create_only:
                    raise _Invalid(f"A {id_field} cannot be set when creating a {label}")
                if ref and ref.lower() != EMPTY_ID:
                    existing = find(ref)
                    if existing is None:
                        raise _Invalid(f"An existing {label} with the specified {id_field} could not be found")
                if existing is not None:
                    update(existing, element, unitdp)
                    doc = existing
                else:
                    doc = new(element, unitdp)
                    store()[doc[id_field]] = doc
                results.append((render(doc, unitdp), []))
            except _Invalid as exc:
                results.append((self._echo_document(element, id_field, echo), [str(exc)]))
            except _Errors as exc:
                results.append((self._echo_document(element, id_field, echo), exc.messages))

        def rollback() -> None:
            if snapshot is not None:
                self._restore(snapshot)

        return self._batch(req, key, results, rollback)

    # -- credit notes ------------------------------------------------------------------------------
    @staticmethod
    def _allocated(note: Mapping[str, Any]) -> Decimal:
        return sum((a["Amount"] for a in note.get("Allocations") or [] if not a.get("IsDeleted")), Decimal(0))

    def _find_credit_note(self, ref: str) -> dict[str, Any] | None:
        note = self._credit_notes.get(ref.lower())
        if note is None:
            note = next((n for n in self._credit_notes.values() if n["CreditNoteNumber"] == ref), None)
        return note

    def _credits_on(self, invoice_id: str) -> list[dict[str, Any]]:
        """The credit notes allocated to an invoice, as the invoice lists them."""
        out: list[dict[str, Any]] = []
        for note in self._credit_notes.values():
            applied = sum((a["Amount"] for a in note["Allocations"]
                           if a["InvoiceID"] == invoice_id and not a.get("IsDeleted")), Decimal(0))
            if applied:
                out.append({"CreditNoteID": note["CreditNoteID"], "ID": note["CreditNoteID"],
                            "CreditNoteNumber": note["CreditNoteNumber"], "Date": wire.ms_date(note["Date"]),
                            "AppliedAmount": applied, "Total": note["Total"], "LineItems": [], "HasErrors": False})
        return out

    def _render_allocation(self, note: Mapping[str, Any], allocation: Mapping[str, Any]) -> dict[str, Any]:
        inv = self._invoices.get(allocation["InvoiceID"], {})
        out: dict[str, Any] = {
            "AllocationID": allocation["AllocationID"],
            "Amount": allocation["Amount"],
            "Date": wire.ms_date(allocation["Date"]),
            "Invoice": {"InvoiceID": allocation["InvoiceID"], "InvoiceNumber": inv.get("InvoiceNumber", ""),
                        "Payments": [], "CreditNotes": [], "Prepayments": [], "Overpayments": [], "HasErrors": False,
                        "IsDiscounted": bool(inv.get("IsDiscounted")), "LineItems": [], "ValidationErrors": []},
            "CreditNote": {"CreditNoteID": note["CreditNoteID"], "ID": note["CreditNoteID"],
                           "CreditNoteNumber": note["CreditNoteNumber"], "LineItems": []},
            "ValidationErrors": [],
        }
        if allocation.get("IsDeleted"):
            out["IsDeleted"] = True
        return out

    def _render_credit_note(self, note: Mapping[str, Any], *, lines: bool, unitdp: int = 2) -> dict[str, Any]:
        out: dict[str, Any] = {
            "CreditNoteID": note["CreditNoteID"],
            "ID": note["CreditNoteID"],
            "CreditNoteNumber": note["CreditNoteNumber"],
            "Type": note["Type"],
            "Reference": note.get("Reference") or "",
            "Payments": [],
            "CurrencyRate": note["CurrencyRate"],
            "RemainingCredit": note["RemainingCredit"],
            "Allocations": [self._render_allocation(note, a) for a in note["Allocations"] if not a.get("IsDeleted")],
            "HasAttachments": False,
            "HasErrors": False,
            "SentToContact": False,
            "Contact": self._contact_ref(note["ContactID"]),
            "DateString": note["Date"].isoformat() + "T00:00:00",
            "Date": wire.ms_date(note["Date"]),
            "Status": note["Status"],
            "LineAmountTypes": note["LineAmountTypes"],
            "SubTotal": note["SubTotal"],
            "TotalTax": note["TotalTax"],
            "Total": note["Total"],
            "UpdatedDateUTC": wire.ms_datetime(note["UpdatedDateUTC"]),
            "CurrencyCode": note["CurrencyCode"],
        }
        if note.get("DueDate"):
            out["DueDate"] = wire.ms_date(note["DueDate"])
        if note.get("FullyPaidOnDate"):
            out["FullyPaidOnDate"] = wire.ms_date(note["FullyPaidOnDate"])
        if lines:
            out["LineItems"] = self._render_lines(note["LineItems"], unitdp)
        return out

    def _get_credit_notes(self, req: SandboxRequest) -> SandboxResponse:
        def run() -> SandboxResponse:
            records = [self._invoice_view(n) for n in self._credit_notes.values()]
            selected = self._select(req, records, id_field="CreditNoteID")
            page, pagination = self._paged(req, selected)
            with_lines = pagination is not None
            unitdp = self._unitdp(req)
            rendered = [self._render_credit_note(n, lines=with_lines, unitdp=unitdp) for n in page]
            return self._envelope("CreditNotes", rendered, pagination)

        return self._reading(run)

    def _get_credit_note(self, req: SandboxRequest) -> SandboxResponse:
        with self.lock:
            note = self._find_credit_note(req.params["CreditNoteID"])
            if note is None:
                return self.not_found(req)
            return self._envelope("CreditNotes", [self._render_credit_note(note, lines=True,
                                                                           unitdp=self._unitdp(req))])

    def _new_credit_note(self, element: Mapping[str, Any], unitdp: int) -> dict[str, Any]:
        errors: list[str] = []
        note_type = str(element.get("Type") or "").upper()
        if note_type not in _CREDIT_TYPES:
            raise _Invalid("Credit note Type must be ACCRECCREDIT or ACCPAYCREDIT" if note_type
                           else "Credit note Type must be specified")
        status = str(element.get("Status") or "DRAFT").upper()
        if status not in _CREATE_STATUSES:
            errors.append(f"Credit note not of valid status for creation: {status}")
        amount_types = self._amount_types(element, errors)
        currency = self._document_currency(element, errors)
        day, due = self._document_dates(element, errors)
        number = (_text(element.get("CreditNoteNumber")) or "").strip() or None
        if number is not None and len(number) > 255:
            errors.append("CreditNoteNumber must not be more than 255 characters long.")
        if note_type == "ACCRECCREDIT" and number is not None and any(
            n["CreditNoteNumber"] == number and n["Type"] == note_type and n["Status"] != "DELETED"
            for n in self._credit_notes.values()
        ):
            errors.append("Credit Note # must be unique.")
        contact_id = ""
        try:
            contact_id = self._resolve_contact(element.get("Contact"), _CREDIT_TYPES[note_type])
        except _Invalid as exc:
            errors.append(str(exc))
        lines = self._build_lines(element.get("LineItems"), amount_types, currency, unitdp, errors)
        if not element.get("LineItems") and status != "DRAFT":
            errors.append("At least one line item must be specified to approve a credit note.")
        if status == "AUTHORISED" and any(not ln.get("AccountCode") for ln in lines):
            errors.append("An account code must be specified on each line of an approved credit note.")
        rate = self._currency_rate(element, currency, day, errors)
        if errors:
            raise _Errors(errors)
        if number is None and note_type == "ACCRECCREDIT":
            taken = {n["CreditNoteNumber"] for n in self._credit_notes.values()}
            self._credit_note_seq += 1
            while f"CN-{self._credit_note_seq:04d}" in taken:
                self._credit_note_seq += 1
            number = f"CN-{self._credit_note_seq:04d}"
        note: dict[str, Any] = {
            "CreditNoteID": self._uuid(),
            "Type": note_type,
            "CreditNoteNumber": number or "",
            "Reference": _text(element.get("Reference")) or "",
            "ContactID": contact_id,
            "Date": day,
            "DueDate": due,
            "Status": status,
            "LineAmountTypes": amount_types,
            "LineItems": lines,
            "CurrencyCode": currency,
            "CurrencyRate": rate,
            "Allocations": [],
            "RemainingCredit": Decimal("0.00"),
            "FullyPaidOnDate": None,
        }
        self._totals(note)
        note["UpdatedDateUTC"] = self._now_dt()
        self._mark_contact(contact_id, _CREDIT_TYPES[note_type])
        return note

    def _update_credit_note(self, note: dict[str, Any], element: Mapping[str, Any], unitdp: int) -> None:
        errors: list[str] = []
        status = str(element.get("Status") or note["Status"]).upper()
        current = note["Status"]
        allowed = {
            "DRAFT": {"DRAFT", "SUBMITTED", "AUTHORISED", "DELETED"},
            "SUBMITTED": {"DRAFT", "SUBMITTED", "AUTHORISED", "DELETED"},
            "AUTHORISED": {"AUTHORISED", "VOIDED"},
        }.get(current, {current})
        allocated = self._allocated(note) > 0
        if status == "VOIDED" and allocated:
            errors.append("Credit notes with allocations cannot be voided; remove the allocations first")
        elif status not in allowed:
            errors.append(f"Credit note status cannot be changed from {current} to {status}")
        editable = current in {"DRAFT", "SUBMITTED"} or (current == "AUTHORISED" and not allocated)
        new_lines = None
        if "LineItems" in element:
            if not editable:
                errors.append("This credit note cannot be edited as it has been allocated.")
            else:
                new_lines = self._build_lines(element["LineItems"], note["LineAmountTypes"], note["CurrencyCode"],
                                              unitdp, errors)
        if status == "AUTHORISED" and any(not ln.get("AccountCode") for ln in new_lines or note["LineItems"]):
            errors.append("An account code must be specified on each line of an approved credit note.")
        dates = {f: wire.parse_date(element[f]) for f in ("Date", "DueDate") if element.get(f)}
        errors += [f"The {f} is not a valid date" for f, day in dates.items() if day is None]
        if errors:
            raise _Errors(errors)
        note["Status"] = status
        if "Reference" in element:
            note["Reference"] = _text(element.get("Reference")) or ""
        note.update(dates)
        if new_lines is not None:
            note["LineItems"] = new_lines
            self._totals(note)
        note["UpdatedDateUTC"] = self._now_dt()

    def _save_credit_notes(self, req: SandboxRequest, create_only: bool) -> SandboxResponse:
        return self._save_documents(
            req, create_only, key="CreditNotes", id_field="CreditNoteID", label="Credit Note",
            find=self._find_credit_note, new=self._new_credit_note, update=self._update_credit_note,
            render=lambda n, unitdp: self._render_credit_note(n, lines=True, unitdp=unitdp),
            store=lambda: self._credit_notes,
            echo=("Type", "CreditNoteNumber", "Reference", "Status", "LineAmountTypes", "CurrencyCode"),
        )

    # -- allocations -------------------------------------------------------------------------------
    def _allocate(self, note: dict[str, Any], inv: dict[str, Any], amount: Decimal, day: dt.date) -> dict[str, Any]:
        """Apply ``amount`` of a credit note to an invoice (both checked): the invoice's amount due and the credit
        note's remaining credit drop, and either is PAID once nothing is left."""
        now = self._now_dt()
        allocation = {"AllocationID": self._uuid(), "InvoiceID": inv["InvoiceID"], "Amount": amount, "Date": day}
        note["Allocations"].append(allocation)
        note["RemainingCredit"] = note["Total"] - self._allocated(note)
        if note["RemainingCredit"] == 0:
            note["Status"] = "PAID"
            note["FullyPaidOnDate"] = day
        inv["AmountCredited"] = inv["AmountCredited"] + amount
        inv["AmountDue"] = inv["Total"] - inv["AmountPaid"] - inv["AmountCredited"]
        if inv["AmountDue"] == 0:
            inv["Status"] = "PAID"
            inv["FullyPaidOnDate"] = day
        note["UpdatedDateUTC"] = inv["UpdatedDateUTC"] = now
        return allocation

    def _new_allocation(self, note: dict[str, Any], element: Mapping[str, Any]) -> dict[str, Any]:
        if note["Status"] not in {"AUTHORISED", "PAID"}:
            raise _Invalid("Only approved credit notes can be allocated")
        ref = element.get("Invoice")
        if not isinstance(ref, dict):
            raise _Invalid("An Invoice must be specified for the allocation")
        inv = None
        if ref.get("InvoiceID"):
            inv = self._invoices.get(str(ref["InvoiceID"]).lower())
        elif ref.get("InvoiceNumber"):
            inv = next((i for i in self._invoices.values() if i["InvoiceNumber"] == str(ref["InvoiceNumber"])
                        and i["Type"] == _CREDIT_TYPES[note["Type"]]), None)
        if inv is None:
            raise _Invalid("Invoice could not be found")
        if inv["Type"] != _CREDIT_TYPES[note["Type"]]:
            raise _Invalid(f"A credit note of type {note['Type']} can only be allocated to an invoice of type "
                           f"{_CREDIT_TYPES[note['Type']]}")
        if inv["ContactID"] != note["ContactID"]:
            raise _Invalid("The credit note and the invoice must belong to the same contact")
        if inv["CurrencyCode"] != note["CurrencyCode"]:
            raise _Invalid("The credit note and the invoice must be in the same currency")
        if inv["Status"] != "AUTHORISED":
            raise _Invalid("Credit notes can only be allocated to Authorised invoices")
        amount = round_money(_dec(element.get("Amount"), "Amount"), note["CurrencyCode"])
        if amount <= 0:
            raise _Invalid("The Amount must be greater than zero")
        if amount > note["RemainingCredit"]:
            raise _Invalid("The amount being allocated exceeds the remaining credit on this credit note")
        if amount > inv["AmountDue"]:
            raise _Invalid("The amount being allocated exceeds the amount outstanding on this invoice")
        day = wire.parse_date(element.get("Date")) if element.get("Date") else self._today()
        if day is None:
            raise _Invalid("The Date is not a valid date")
        return self._allocate(note, inv, amount, day)

    def _save_allocations(self, req: SandboxRequest, create_only: bool) -> SandboxResponse:
        note = self._find_credit_note(req.params["CreditNoteID"])
        if note is None:
            return self.not_found(req)
        elements = self._elements(req, "Allocations")
        if isinstance(elements, SandboxResponse):
            return elements
        snapshot = self._snapshot() if self._summarize(req) else None
        results: list[tuple[dict[str, Any], list[str]]] = []
        for element in elements:
            try:
                allocation = self._new_allocation(note, element)
                results.append((self._render_allocation(note, allocation), []))
            except _Invalid as exc:
                echo: dict[str, Any] = {"CreditNote": {"CreditNoteID": note["CreditNoteID"]}}
                invoice = element.get("Invoice")
                if isinstance(invoice, dict) and invoice.get("InvoiceID"):
                    echo["Invoice"] = {"InvoiceID": str(invoice["InvoiceID"])}
                try:
                    if element.get("Amount") is not None:
                        echo["Amount"] = _dec(element["Amount"], "Amount")
                except _Invalid:
                    pass
                results.append((echo, [str(exc)]))

        def rollback() -> None:
            if snapshot is not None:
                self._restore(snapshot)

        return self._batch(req, "Allocations", results, rollback)

    def _delete_allocation(self, req: SandboxRequest, create_only: bool) -> SandboxResponse:
        note = self._find_credit_note(req.params["CreditNoteID"])
        wanted = req.params["AllocationID"].lower()
        allocation = None if note is None else next(
            (a for a in note["Allocations"] if a["AllocationID"] == wanted and not a.get("IsDeleted")), None)
        if note is None or allocation is None:
            return self.not_found(req)
        inv = self._invoices[allocation["InvoiceID"]]
        now = self._now_dt()
        allocation["IsDeleted"] = True
        note["RemainingCredit"] = note["Total"] - self._allocated(note)
        if note["Status"] == "PAID":
            note["Status"], note["FullyPaidOnDate"] = "AUTHORISED", None
        inv["AmountCredited"] = inv["AmountCredited"] - allocation["Amount"]
        inv["AmountDue"] = inv["Total"] - inv["AmountPaid"] - inv["AmountCredited"]
        if inv["Status"] == "PAID" and inv["AmountDue"] > 0:
            inv["Status"], inv["FullyPaidOnDate"] = "AUTHORISED", None
        note["UpdatedDateUTC"] = inv["UpdatedDateUTC"] = now
        return self._json(200, self._render_allocation(note, allocation))

    # -- bank transactions -------------------------------------------------------------------------
    def _find_bank_transaction(self, ref: str) -> dict[str, Any] | None:
        return self._bank_transactions.get(ref.lower())

    def _bank_account(self, raw: Any) -> dict[str, Any]:
        account = None
        if isinstance(raw, dict):
            if raw.get("Code"):
                account = self._accounts.get(str(raw["Code"]))
            elif raw.get("AccountID"):
                account = next((a for a in self._accounts.values()
                                if a["AccountID"] == str(raw["AccountID"]).lower()), None)
        if account is None:
            raise _Invalid("A valid BankAccount must be specified")
        if account["Type"] != "BANK":
            raise _Invalid(f"Account {account['Code']} is not a bank account")
        return account

    def _render_bank_transaction(self, tx: Mapping[str, Any], *, lines: bool, unitdp: int = 2) -> dict[str, Any]:
        account = self._accounts[tx["BankAccountCode"]]
        out: dict[str, Any] = {
            "BankTransactionID": tx["BankTransactionID"],
            "Type": tx["Type"],
            "Contact": self._contact_ref(tx["ContactID"]),
            "BankAccount": {"AccountID": account["AccountID"], "Code": account["Code"], "Name": account["Name"]},
            "IsReconciled": tx["IsReconciled"],
            "Date": wire.ms_date(tx["Date"]),
            "Reference": tx.get("Reference") or "",
            "CurrencyCode": tx["CurrencyCode"],
            "CurrencyRate": tx["CurrencyRate"],
            "Status": tx["Status"],
            "LineAmountTypes": tx["LineAmountTypes"],
            "SubTotal": tx["SubTotal"],
            "TotalTax": tx["TotalTax"],
            "Total": tx["Total"],
            "UpdatedDateUTC": wire.ms_datetime(tx["UpdatedDateUTC"]),
            "HasAttachments": False,
        }
        if lines:
            out["LineItems"] = self._render_lines(tx["LineItems"], unitdp)
        return out

    def _bank_view(self, tx: Mapping[str, Any]) -> dict[str, Any]:
        view = self._invoice_view(tx)
        view["BankAccount"] = {"Code": tx["BankAccountCode"], "AccountID": self._accounts[tx["BankAccountCode"]][
            "AccountID"]}
        return view

    def _get_bank_transactions(self, req: SandboxRequest) -> SandboxResponse:
        def run() -> SandboxResponse:
            records = [self._bank_view(t) for t in self._bank_transactions.values()]
            selected = self._select(req, records, id_field="BankTransactionID")
            page, pagination = self._paged(req, selected)
            unitdp = self._unitdp(req)
            rendered = [self._render_bank_transaction(t, lines=pagination is not None, unitdp=unitdp) for t in page]
            return self._envelope("BankTransactions", rendered, pagination)

        return self._reading(run)

    def _get_bank_transaction(self, req: SandboxRequest) -> SandboxResponse:
        with self.lock:
            tx = self._find_bank_transaction(req.params["BankTransactionID"])
            if tx is None:
                return self.not_found(req)
            return self._envelope("BankTransactions", [self._render_bank_transaction(tx, lines=True,
                                                                                     unitdp=self._unitdp(req))])

    def _new_bank_transaction(self, element: Mapping[str, Any], unitdp: int) -> dict[str, Any]:
        errors: list[str] = []
        kind = str(element.get("Type") or "").upper()
        if kind not in _BANK_TYPES:
            raise _Invalid("Bank transaction Type must be SPEND or RECEIVE" if kind
                           else "Bank transaction Type must be specified")
        doc_type = "ACCPAY" if kind == "SPEND" else "ACCREC"
        status = str(element.get("Status") or "AUTHORISED").upper()
        if status != "AUTHORISED":
            errors.append(f"Bank transaction not of valid status for creation: {status}")
        amount_types = self._amount_types(element, errors)
        account: dict[str, Any] | None = None
        try:
            account = self._bank_account(element.get("BankAccount"))
        except _Invalid as exc:
            errors.append(str(exc))
        account_currency = (account or {}).get("CurrencyCode") or self.base_currency
        currency = self._document_currency(element, errors, default=account_currency)
        if currency != account_currency:
            errors.append(f"The currency of a bank transaction must be the currency of its bank account "
                          f"({account_currency})")
        day, _due = self._document_dates(element, errors)
        contact_id = ""
        try:
            contact_id = self._resolve_contact(element.get("Contact"), doc_type)
        except _Invalid as exc:
            errors.append(str(exc))
        lines = self._build_lines(element.get("LineItems"), amount_types, currency, unitdp, errors)
        if not element.get("LineItems"):
            errors.append("At least one line item must be specified")
        if any(not ln.get("AccountCode") for ln in lines):
            errors.append("An account code must be specified on each line of a bank transaction.")
        rate = self._currency_rate(element, currency, day, errors)
        if errors or account is None:
            raise _Errors(errors)
        tx: dict[str, Any] = {
            "BankTransactionID": self._uuid(),
            "Type": kind,
            "ContactID": contact_id,
            "BankAccountCode": account["Code"],
            "Date": day,
            "Reference": _text(element.get("Reference")) or "",
            "Status": status,
            "LineAmountTypes": amount_types,
            "LineItems": lines,
            "CurrencyCode": currency,
            "CurrencyRate": rate,
            "IsReconciled": bool(element.get("IsReconciled")),
        }
        self._totals(tx)
        tx["UpdatedDateUTC"] = self._now_dt()
        self._mark_contact(contact_id, doc_type)
        return tx

    def _update_bank_transaction(self, tx: dict[str, Any], element: Mapping[str, Any], unitdp: int) -> None:
        errors: list[str] = []
        status = str(element.get("Status") or tx["Status"]).upper()
        current = tx["Status"]
        allowed = {"AUTHORISED": {"AUTHORISED", "DELETED", "VOIDED"}}.get(current, {current})
        if status not in allowed:
            errors.append(f"Bank transaction status cannot be changed from {current} to {status}")
        new_lines = None
        if "LineItems" in element:
            if current != "AUTHORISED":
                errors.append("A deleted bank transaction cannot be edited")
            else:
                new_lines = self._build_lines(element["LineItems"], tx["LineAmountTypes"], tx["CurrencyCode"],
                                              unitdp, errors)
                if any(not ln.get("AccountCode") for ln in new_lines):
                    errors.append("An account code must be specified on each line of a bank transaction.")
        day = wire.parse_date(element["Date"]) if element.get("Date") else None
        if element.get("Date") and day is None:
            errors.append("The Date is not a valid date")
        if errors:
            raise _Errors(errors)
        tx["Status"] = status
        if "Reference" in element:
            tx["Reference"] = _text(element.get("Reference")) or ""
        if day is not None:
            tx["Date"] = day
        if new_lines is not None:
            tx["LineItems"] = new_lines
            self._totals(tx)
        tx["UpdatedDateUTC"] = self._now_dt()

    def _save_bank_transactions(self, req: SandboxRequest, create_only: bool) -> SandboxResponse:
        return self._save_documents(
            req, create_only, key="BankTransactions", id_field="BankTransactionID", label="Bank Transaction",
            find=self._find_bank_transaction, new=self._new_bank_transaction, update=self._update_bank_transaction,
            render=lambda t, unitdp: self._render_bank_transaction(t, lines=True, unitdp=unitdp),
            store=lambda: self._bank_transactions,
            echo=("Type", "Reference", "Status", "LineAmountTypes", "CurrencyCode"),
        )

    # == webhooks (sending) ===========================================================================
    # Xero's webhooks: INVOICE and CREDITNOTE events (CREATE, UPDATE) as ``{"events": [...],
    # "firstEventSequence", "lastEventSequence", "entropy"}``, at most 100 events a request, signed with the
    # webhook key (``x-xero-signature``: base64 HMAC-SHA256 of the raw body). Changes are found by comparing the
    # documents every ``poll_s`` (0.1 s) with what was last sent, so every way a document changes (API writes,
    # payments, allocations, the admin endpoints) is reported. Off until POST /_sandbox/webhooks {"url",
    # "webhook_key"? (generated and answered once when absent), "deliveries"?, ...} (see
    # connectors.sandboxwebhooks); POST /_sandbox/webhooks/intent-to-receive runs Xero's "intent to receive"
    # check against the target. Not persisted: save() writes no registration and load() keeps the one in force.

    _webhook_sender: WebhookSender | None = None
    _webhook_state: dict[str, Any] | None = None

    def _webhook_admin(self, req: SandboxRequest) -> SandboxResponse:
        if req.path.rstrip("/") == "/_sandbox/webhooks/intent-to-receive" and req.method == "POST":
            return SandboxResponse(200, compact_json(self.webhook_intent_to_receive()),
                                   {"Content-Type": "application/json"})
        resp, self._webhook_sender = webhook_admin(req, self._webhook_sender, self._webhook_start)
        return resp

    def _webhook_start(self, body: Any) -> tuple[WebhookSender, dict[str, Any]]:
        key = body.get("webhook_key")
        if key is not None and (not isinstance(key, str) or not key):
            raise ValueError("'webhook_key' must be a non-empty string (omit it to have one generated)")
        key = key or random_key()
        target = WebhookTarget.from_body(body, batch_size=100)
        poll_s = body.get("poll_s", 0.1)
        if isinstance(poll_s, bool) or not isinstance(poll_s, int | float) or not 0.01 <= poll_s <= 60:
            raise ValueError("'poll_s' must be a number of seconds between 0.01 and 60")
        with self.lock:
            state: dict[str, Any] = {"key": key, "url": target.url, "seen": {}, "sequence": 0}
            self._webhook_state = state
            self._webhook_changes(state)  # what exists now is the baseline, not news

        def build(events: list[dict[str, Any]], attempt: int) -> tuple[bytes, dict[str, str]]:
            payload = compact_json({
                "events": [{k: v for k, v in e.items() if k != "_sequence"} for e in events],
                "firstEventSequence": events[0]["_sequence"], "lastEventSequence": events[-1]["_sequence"],
                "entropy": random_letters(),
            })
            return payload, {"Content-Type": "application/json", "x-xero-signature": sign_xero(key, payload)}

        def poll() -> list[dict[str, Any]]:
            with self.lock:
                return self._webhook_changes(state) if self._webhook_state is state else []

        sender = WebhookSender(target, build, name="xero-webhooks", poll=poll, poll_s=float(poll_s))
        return sender, ({"webhook_key": key} if body.get("webhook_key") is None else {})

    def _webhook_changes(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        """Events for the documents created or changed since the last call (under ``self.lock``)."""
        seen: dict[str, tuple[Any, ...]] = state["seen"]
        events: list[dict[str, Any]] = []
        for category, path, id_field, docs in (("INVOICE", "Invoices", "InvoiceID", self._invoices),
                                               ("CREDITNOTE", "CreditNotes", "CreditNoteID",
                                                getattr(self, "_credit_notes", {}))):
            for doc_id, doc in docs.items():
                marker = tuple(doc.get(k) for k in ("UpdatedDateUTC", "Status", "Total", "AmountPaid",
                                                      "AmountCredited", "AmountDue", "RemainingCredit"))
                before = seen.get(f"{category}:{doc_id}")
                if before == marker:
                    continue
                seen[f"{category}:{doc_id}"] = marker
                state["sequence"] += 1
                updated = doc.get("UpdatedDateUTC")
                event: dict[str, Any] = {
                    "resourceUrl": f"{self.base_url}{API_PREFIX}/{path}/{doc[id_field]}",
                    "resourceId": doc[id_field], "tenantId": self.tenant_id, "tenantType": "ORGANISATION",
                    "eventCategory": category, "eventType": "CREATE" if before is None else "UPDATE",
                    "eventDateUtc": iso_ms_utc(updated.timestamp() if isinstance(updated, dt.datetime)
                                               else self.clock.now(), zulu=False),
                    "_sequence": state["sequence"],
                }
                if category == "CREDITNOTE":
                    event["data"] = {"Type": doc.get("Type"), "Status": doc.get("Status")}
                events.append(event)
        return events

    def webhook_intent_to_receive(self) -> dict[str, Any]:
        """Xero's "intent to receive" check: payloads with no events, one signed with the webhook key and one
        not, to the registered URL; the endpoint passes when it answers 200 and 401 respectively, within 5 s."""
        state, sender = self._webhook_state, self._webhook_sender
        if state is None or sender is None:
            return {"ok": False, "message": "no webhook is registered"}
        answers: list[dict[str, Any]] = []
        ok = True
        for correct in (True, False):
            body = compact_json({"events": [], "firstEventSequence": 0, "lastEventSequence": 0,
                                 "entropy": random_letters()})
            key = state["key"] if correct else random_key()
            status, seconds = post_once(state["url"], body, {"Content-Type": "application/json",
                                                             "x-xero-signature": sign_xero(key, body)})
            answers.append({"signature": "correct" if correct else "incorrect", "status": status,
                            "expected": 200 if correct else 401, "seconds": round(seconds, 3)})
            ok = ok and status == (200 if correct else 401) and seconds < 5
        return {"ok": ok, "answers": answers}

    def webhook_sender(self) -> WebhookSender | None:
        """The sender in force (None while sending is off)."""
        return self._webhook_sender


class _Errors(Exception):
    def __init__(self, messages: list[str]) -> None:
        super().__init__("; ".join(messages))
        self.messages = messages


@contextlib.contextmanager
def _plain_errors() -> Iterator[None]:
    """A refused record in an in-process helper (not an API call) is a ValueError with Xero's message."""
    try:
        yield
    except (_Invalid, _Errors) as exc:
        raise ValueError(str(exc)) from None


class _Query(Exception):
    pass
