"""A stateful simulator of Pennylane's Company API v2 (``/api/external/v2``) and of its limits.

One company, seeded with a product per product of the seeded book's catalogue (``external_reference`` =
SKU) and the French VAT codes ``FR_200``, ``FR_100``, ``FR_55``, ``FR_21`` and ``exempt``; currencies EUR,
USD and GBP (fixed exchange rates to the euro).

What it reproduces, because clients depend on it:

- bearer authentication with company tokens (``api_tokens``) or OAuth2 tokens from
  ``POST /oauth/oauth/token`` (rotating refresh tokens); 401 ``{"error", "status"}`` otherwise;
- 25 requests per 5 seconds per token (sliding window, on the sandbox clock): a 429 with a plain-text body
  ``Rate limit exceeded. Please retry in X seconds.`` and ``retry-after``; ``ratelimit-limit``,
  ``ratelimit-remaining`` and ``ratelimit-reset`` (a unix timestamp) on every answer. Waits are reported in
  real seconds (on a compressed clock the reset is a real wall-clock timestamp);
- cursor pagination ``{items, has_more, next_cursor}`` (``limit`` 1..100, default 20; changelogs up to
  1000): the cursor carries only the position, so ``filter`` and ``sort`` must be sent again with it; an
  invalid cursor answers 400; ``filter`` is a JSON array of ``{field, operator, value}`` limited to the
  fields and operators of the OpenAPI description (``external_reference`` takes only ``eq`` on customer
  invoices; ``in`` takes an array);
- customers: ``POST /company_customers`` and ``/individual_customers`` (``external_reference`` unique: 409),
  ``GET /customers`` (both kinds); products; customer invoices created as drafts or finalized
  (``draft``), numbered ``F<year><seq>`` when finalized, lines stored and returned as a ``{url}`` link
  (``include=invoice_lines`` puts up to 20 per invoice in ``included``), ``/invoice_lines`` and ``/payments``
  sub-resources, ``finalize``, ``mark_as_paid``, ``DELETE`` of drafts;
- amounts as strings, VAT rounded per line to the cent, then summed;
- no idempotency on creates; a new invoice is seen by an ``external_reference`` filter only
  ``reference_lookup_delay_s`` virtual seconds after it was created (every other read sees it at once);
- changelogs of customer invoices, customers and products (``processed_at`` ascending, 4 weeks of retention:
  an older ``start_date`` answers 422, ``start_date`` with ``cursor`` answers 400);
- credit notes: a customer invoice whose lines add up to a negative total (``credit_note`` filter, numbered
  ``A<year><seq>``, ``status: credit_note``) that credits an invoice (``credited_invoice_id`` on create, or
  ``POST /customer_invoices/{id}/link_credit_note``) of the same customer and currency, up to what is left of it:
  the invoice's remaining amount goes down, its status becomes ``partially_cancelled``, ``cancelled`` when
  credited in full; a credit note crediting nothing has all of it left to use (negative remaining amount);
- the purchases side: ledger accounts (``GET/POST /ledger_accounts``, ``number`` filter), suppliers, supplier
  invoices with their lines (the documented shapes; created by the sandbox's helpers, as the API imports them
  from files), and their ledger entries in the purchases journal, read by ``GET /ledger_entry_lines``
  (``ledger_account_id``, ``date``, ``journal_id`` filters) in euros; only supplier invoices and the history's
  payroll entries produce ledger entry lines here;
- ``exchange_rate`` in euros per unit, the sandbox's rate of the document's month (:func:`exchange_rate`);
- error bodies: a body that breaks the schema (type, enum, format) answers 400 ``{message, field, code}``;
  a missing required field answers 422 ``{"error": "unprocessable_entity", "message", "details"}`` (the errors
  guide); a business rule (unknown customer, VAT code not enabled...) answers 422 ``{"error", "status"}``.

History and settlement (for the demo and the metrics): :meth:`PennylaneSandbox.load_history` writes a
:class:`~connectors.seedhistory.History` with the history's dates; :meth:`PennylaneSandbox.settle` (and
``POST /_sandbox/settle {"today": "YYYY-MM-DD"}``) pays the open invoices as each customer's
:func:`~connectors.seedhistory.payment_plan` says, once per planned payment. Chosen without a primary source
(verify against Pennylane): the credit note numbering and status, the check that a credit note does not exceed
what is left of the invoice it credits, and that a payment's ``created_at`` is the day the money came in.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import importlib
import json
import math
import random
import re
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs

from connectors import seedhistory
from connectors.domain import minor_unit, round_money
from connectors.sandboxkit import (
    Clock,
    FaultPlan,
    Route,
    SandboxApp,
    SandboxRequest,
    SandboxResponse,
    json_response,
)
from connectors.seedhistory import HistoryInvoice

if TYPE_CHECKING:
    from connectors.seedbook import Book
    from connectors.seedhistory import History, HistoryCreditNote, HistoryExpense

__all__ = [
    "API_PREFIX",
    "DEMO_API_TOKEN",
    "DEMO_CLIENT_ID",
    "DEMO_CLIENT_SECRET",
    "PennylaneSandbox",
    "exchange_rate",
    "sandbox_settings",
]

API_PREFIX = "/api/external/v2"
DEMO_API_TOKEN = "demo-pennylane-token"
DEMO_CLIENT_ID = "demo-pennylane-client"
DEMO_CLIENT_SECRET = "demo-pennylane-client-secret"  # public: the simulator's own test app
RETENTION_S = 28 * 86400.0
WINDOW_S = 5.0

DEFAULT_TAX_RATES: dict[str, Decimal] = {
    "FR_200": Decimal("20"), "FR_100": Decimal("10"), "FR_55": Decimal("5.5"), "FR_21": Decimal("2.1"),
    "exempt": Decimal("0"),
}
# VAT codes the request schema accepts (the French ones and the special ones of the description's enum);
# other countries' codes are recognised by their shape. A code outside these answers 400 NotEnumInclude.
_FR_CODES = frozenset({
    "FR_1_05", "FR_1_75", "FR_09", "FR_21", "FR_40", "FR_50", "FR_55", "FR_60", "FR_65", "FR_85", "FR_92",
    "FR_100", "FR_130", "FR_15_385", "FR_160", "FR_196", "FR_200", "FR_85_construction", "FR_100_construction",
    "FR_200_construction", "exempt", "intracom_21", "intracom_55", "intracom_85", "intracom_100", "crossborder",
    "extracom", "mixed",
})
_FOREIGN_CODE = re.compile(r"^[A-Z]{2}_\d+(?:_\d+)?$")
#: Euros for one unit of each currency the company invoices in, before the monthly drift (see exchange_rate).
_EUR_PER_UNIT: dict[str, Decimal] = {"EUR": Decimal("1"), "USD": Decimal("0.925926"), "GBP": Decimal("1.17")}
_RATE_STEP = Decimal("0.000001")
#: The company's chart of accounts to begin with: (number, label). Expense accounts are added as they are used.
_LEDGER_ACCOUNTS: tuple[tuple[str, str], ...] = (
    ("401", "Fournisseurs"), ("411", "Clients"), ("421", "Personnel - rémunérations dues"),
    ("44566", "TVA déductible sur autres biens et services"), ("44571", "TVA collectée"), ("512", "Banque"),
    ("6226", "Honoraires"), ("6231", "Annonces et insertions"), ("706", "Prestations de services"),
    ("707", "Ventes de marchandises"),
)
_JOURNALS = {"HA": (2, "Achats"), "OD": (4, "Opérations diverses")}


def exchange_rate(currency: str, day: dt.date) -> Decimal:
    """The sandbox's rate of ``currency`` on ``day`` in euros for one unit (Pennylane's ``exchange_rate``): the base
    rate moved by a fixed drift of the month (-1.25 % .. +1.25 %), so that documents of different months carry
    different rates and every run gives the same ones. 1 for the euro."""
    if currency == "EUR":
        return Decimal(1)
    month = day.year * 12 + day.month
    drift = Decimal((month * 7) % 11 - 5) / Decimal(400)
    return (_EUR_PER_UNIT[currency] * (Decimal(1) + drift)).quantize(_RATE_STEP)
_DISCOUNT_TYPES = ("absolute", "relative")
_ALL_OPS = frozenset({"lt", "lteq", "gt", "gteq", "eq", "not_eq", "in", "not_in"})
_LIST_OPS = frozenset({"in", "not_in"})


class ProductSpec(Protocol):
    """What the sandbox needs of a catalogue product (``seedbook.BookProduct`` fits)."""

    @property
    def sku(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def unit_price(self) -> Decimal: ...

    @property
    def tax_rate(self) -> Decimal: ...


def sandbox_settings(url: str, *, time_scale: float = 1.0) -> dict[str, Any]:
    """The ``ledger:`` block that points :class:`~connectors.pennylane.PennylaneLedger` at a sandbox at ``url``.

    ``lookup_settle_s`` (30 virtual seconds) leaves a wide margin over the sandbox's default
    ``reference_lookup_delay_s`` (5 virtual seconds).
    """
    return {"type": "pennylane", "base_url": url, "api_token": DEMO_API_TOKEN, "time_scale": time_scale,
            "lookup_settle_s": 30.0}


def _book_products() -> Sequence[ProductSpec]:
    module = importlib.import_module("connectors.seedbook")
    products: Sequence[ProductSpec] = module.PRODUCTS
    return products


# -- small helpers -----------------------------------------------------------------------------------

class _Reject(Exception):
    """A request the simulated API refuses; carries the answer."""

    def __init__(self, response: SandboxResponse) -> None:
        super().__init__(response.status)
        self.response = response


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> SandboxResponse:
    return json_response(status, payload, headers)


def _schema_error(message: str, field: str, code: str) -> _Reject:
    """The 400 a body that breaks the request schema gets (``{message, field, code}``)."""
    return _Reject(_json(400, {"message": message, "field": field, "code": code}))


def _missing(field: str) -> _Reject:
    """The 422 of the errors guide for a missing required field."""
    return _Reject(_json(422, {"error": "unprocessable_entity", "message": f"Missing required field: {field}",
                               "details": {"field": field, "issue": "is required"}}))


def _unprocessable(message: str) -> _Reject:
    return _Reject(_json(422, {"error": message, "status": 422}))


def _bad_request(message: str) -> _Reject:
    return _Reject(_json(400, {"message": message}))


def _not_found() -> _Reject:
    return _Reject(_json(404, {"error": "Not Found", "status": 404}))


def _money(value: Decimal, currency: str = "EUR") -> str:
    return str(round_money(value, currency))


def _plain(value: Decimal) -> str:
    text = format(value, "f")
    return "0" if text.lstrip("-").strip("0.") == "" else text


def _fmt_seconds(real: float, scale: float) -> str:
    if scale == 1.0:
        return str(max(math.ceil(real), 1))
    return f"{max(real, 0.001):.3f}".rstrip("0").rstrip(".")


class _TokenWindow:
    """A sliding window of ``limit`` requests per ``window`` virtual seconds for one token."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self.hits: deque[float] = deque()

    def trim(self, now: float) -> None:
        while self.hits and self.hits[0] <= now - self.window:
            self.hits.popleft()

    def acquire(self, now: float) -> bool:
        self.trim(now)
        if len(self.hits) >= self.limit:
            return False
        self.hits.append(now)
        return True

    def remaining(self, now: float) -> int:
        self.trim(now)
        return max(self.limit - len(self.hits), 0)

    def frees_in(self, now: float) -> float:
        """Virtual seconds until the oldest counted request leaves the window (0 when none is counted)."""
        self.trim(now)
        return max(self.hits[0] + self.window - now, 0.0) if self.hits else 0.0


# Filterable fields: name -> (value kind, operators), per list endpoint (from the OpenAPI description).
_INVOICE_FILTERS: dict[str, tuple[str, frozenset[str]]] = {
    "id": ("int", _ALL_OPS), "date": ("date", _ALL_OPS), "customer_id": ("int", _ALL_OPS),
    "billing_subscription_id": ("int", _ALL_OPS), "quote_id": ("int", _ALL_OPS),
    "invoice_number": ("str", frozenset({"eq", "not_eq", "in", "not_in"})),
    "draft": ("bool", frozenset({"eq"})), "credit_note": ("bool", frozenset({"eq"})),
    "external_reference": ("str", frozenset({"eq"})), "category_id": ("int", frozenset({"in"})),
}
_CUSTOMER_FILTERS: dict[str, tuple[str, frozenset[str]]] = {
    "id": ("int", _ALL_OPS), "customer_type": ("str", frozenset({"eq", "not_eq"})),
    "ledger_account_id": ("int", frozenset({"eq", "not_eq"})), "name": ("str", frozenset({"start_with", "eq"})),
    "external_reference": ("str", frozenset({"start_with", "eq", "not_eq", "in", "not_in"})),
    "reg_no": ("str", frozenset({"eq", "not_eq", "in", "not_in"})), "emails": ("str", frozenset({"in"})),
}
_PRODUCT_FILTERS: dict[str, tuple[str, frozenset[str]]] = {
    "id": ("int", _ALL_OPS), "label": ("str", frozenset({"eq", "in"})), "reference": ("str", frozenset({"eq", "in"})),
    "external_reference": ("str", frozenset({"eq", "not_eq", "in", "not_in"})),
}

_LEDGER_ACCOUNT_FILTERS: dict[str, tuple[str, frozenset[str]]] = {
    "id": ("int", _ALL_OPS), "number": ("str", frozenset({"start_with", "eq"})), "enabled": ("bool", frozenset({"eq"})),
}
_SUPPLIER_FILTERS: dict[str, tuple[str, frozenset[str]]] = {
    "id": ("int", _ALL_OPS), "name": ("str", frozenset({"start_with"})),
    "external_reference": ("str", frozenset({"eq", "not_eq", "in", "not_in"})),
}
_SUPPLIER_INVOICE_FILTERS: dict[str, tuple[str, frozenset[str]]] = {
    "id": ("int", _ALL_OPS), "supplier_id": ("int", _ALL_OPS), "date": ("date", _ALL_OPS),
    "invoice_number": ("str", frozenset({"eq", "not_eq", "in", "not_in"})),
    "external_reference": ("str", frozenset({"eq", "not_eq", "in", "not_in"})),
}
_ENTRY_LINE_FILTERS: dict[str, tuple[str, frozenset[str]]] = {
    "id": ("int", _ALL_OPS), "journal_id": ("int", _ALL_OPS), "ledger_account_id": ("int", _ALL_OPS),
    "date": ("date", _ALL_OPS),
}

Condition = tuple[str, str, Any]


def _convert(kind: str, field: str, value: Any) -> Any:
    try:
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            return int(str(value))
        if kind == "date":
            return dt.date.fromisoformat(str(value))
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "false"):
                return str(value).lower() == "true"
            raise ValueError
        if value is None or isinstance(value, dict | list):
            raise ValueError
        return str(value)
    except ValueError:
        raise _bad_request(f"Invalid value for filter on {field}") from None


def _parse_filter(raw: str | None, allowed: Mapping[str, tuple[str, frozenset[str]]]) -> list[Condition]:
    if raw is None or raw == "":
        return []
    try:
        items = json.loads(raw)
    except ValueError:
        raise _bad_request("filter must be a JSON array of {field, operator, value}") from None
    if not isinstance(items, list):
        raise _bad_request("filter must be a JSON array of {field, operator, value}")
    out: list[Condition] = []
    for item in items:
        if not isinstance(item, dict) or not {"field", "operator", "value"} <= set(item):
            raise _bad_request("each filter needs field, operator and value")
        field, op, value = item["field"], item["operator"], item["value"]
        spec = allowed.get(field) if isinstance(field, str) else None
        if spec is None:
            raise _bad_request(f"Filtering on {field!r} is not supported")
        kind, ops = spec
        if op not in ops:
            raise _bad_request(f"Operator {op!r} is not supported for field {field!r}")
        if op in _LIST_OPS:
            if not isinstance(value, list):
                raise _bad_request(f"The value of operator {op!r} must be an array")
            out.append((field, op, [_convert(kind, field, v) for v in value]))
        else:
            out.append((field, op, _convert(kind, field, value)))
    return out


def _matches(actual: Any, op: str, value: Any) -> bool:
    if isinstance(actual, list):  # a list field (emails): any element
        return any(_matches(a, op, value) for a in actual)
    if op == "eq":
        return actual is not None and actual == value
    if op == "not_eq":
        return bool(actual != value)
    if op == "in":
        return actual is not None and actual in value
    if op == "not_in":
        return actual not in value
    if op == "start_with":
        return actual is not None and str(actual).lower().startswith(str(value).lower())
    if actual is None:
        return False
    if op == "lt":
        return bool(actual < value)
    if op == "lteq":
        return bool(actual <= value)
    if op == "gt":
        return bool(actual > value)
    return bool(actual >= value)  # gteq


def _dec(value: Any, field: str) -> Decimal:
    if isinstance(value, bool) or value is None:
        raise _schema_error(f"{field} must be a number", field, "ValidateError")
    try:
        number = value if isinstance(value, Decimal) else Decimal(str(value))
    except InvalidOperation:
        raise _schema_error(f"{field} must be a number", field, "ValidateError") from None
    if not number.is_finite():
        raise _schema_error(f"{field} must be a number", field, "ValidateError")
    return number


def _decimal_string(value: Any, field: str) -> Decimal:
    """An amount the schema types as a string: a JSON string holding a decimal number."""
    if not isinstance(value, str):
        raise _schema_error(f"{field} must be a string", field, "ValidateError")
    try:
        number = Decimal(value.strip())
    except InvalidOperation:
        raise _schema_error(f"{field} must be a decimal number in a string", field, "InvalidPattern") from None
    if not number.is_finite():
        raise _schema_error(f"{field} must be a decimal number in a string", field, "InvalidPattern")
    return number


def _date(value: Any, field: str) -> dt.date:
    if not isinstance(value, str):
        raise _schema_error(f"{field} must be a date (YYYY-MM-DD)", field, "InvalidDateFormat")
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise _schema_error(f"{field} must be a date (YYYY-MM-DD)", field, "InvalidDateFormat") from None


def _address(value: Any, field: str) -> dict[str, str]:
    if value is None:
        raise _missing(field)
    if not isinstance(value, dict):
        raise _schema_error(f"{field} must be an object", field, "ValidateError")
    out: dict[str, str] = {}
    for key in ("address", "postal_code", "city", "country_alpha2"):
        if key not in value:
            raise _missing(f"{field}.{key}")
        if not isinstance(value[key], str):
            raise _schema_error(f"{field}.{key} must be a string", f"{field}.{key}", "ValidateError")
        out[key] = value[key]
    if not re.fullmatch(r"[A-Za-z]{2}", out["country_alpha2"]):
        raise _unprocessable(f"{field}.country_alpha2 must be an ISO 3166 alpha-2 code")
    out["country_alpha2"] = out["country_alpha2"].upper()
    return out


class PennylaneSandbox(SandboxApp):
    """The Pennylane simulator. See the module docstring for what it reproduces.

    Options (keyword-only): ``api_tokens`` (company tokens, default ``("demo-pennylane-token",)``);
    ``requests_per_5s`` (25); ``reference_lookup_delay_s`` (5.0 virtual seconds before a new invoice is seen
    by an ``external_reference`` filter); ``tax_rates`` (code -> percent, default FR_200/FR_100/FR_55/FR_21/
    exempt); ``products`` (catalogue, default ``seedbook.PRODUCTS``); ``unique_invoice_reference`` (False: a
    second invoice with a used ``external_reference`` is created; True: 409); ``client_id``/``client_secret``
    of the one OAuth app and ``access_token_ttl_s`` (86,400); ``changelog_retention_s`` (4 weeks).
    """

    vendor = "pennylane"
    state_attrs = (
        "_rng", "_next_id", "_numbers", "_customers", "_products", "_invoices", "_payments", "_changes",
        "_change_seq", "_refresh", "_access", "counters", "_credit_numbers", "_ledger_accounts", "_suppliers",
        "_supplier_invoices", "_entry_lines", "_history_customers", "_history_names", "_history_profiles",
        "_history_keys", "_settled",
    )

    def __init__(
        self,
        *,
        seed: int = 0,
        faults: str | FaultPlan | None = None,
        clock: Clock | None = None,
        api_tokens: Iterable[str] = (DEMO_API_TOKEN,),
        requests_per_5s: int = 25,
        reference_lookup_delay_s: float = 5.0,
        tax_rates: Mapping[str, Decimal] | None = None,
        products: Iterable[ProductSpec] | None = None,
        unique_invoice_reference: bool = False,
        client_id: str = DEMO_CLIENT_ID,
        client_secret: str = DEMO_CLIENT_SECRET,
        access_token_ttl_s: float = 86400.0,
        changelog_retention_s: float = RETENTION_S,
    ) -> None:
        super().__init__(seed=seed, faults=faults, clock=clock)
        self._rng = random.Random(seed)
        self.api_tokens = frozenset(api_tokens)
        self.requests_per_5s = requests_per_5s
        self.reference_lookup_delay_s = reference_lookup_delay_s
        self.tax_rates = dict(tax_rates) if tax_rates is not None else dict(DEFAULT_TAX_RATES)
        self.unique_invoice_reference = unique_invoice_reference
        self.client_id = client_id
        self._client_secret = client_secret
        self.access_token_ttl_s = access_token_ttl_s
        self.changelog_retention_s = changelog_retention_s
        self._windows: dict[str, _TokenWindow] = {}
        self._rate_lock = threading.Lock()
        self._next_id = 1000
        self._numbers: dict[int, int] = {}
        self._customers: dict[int, dict[str, Any]] = {}
        self._products: dict[int, dict[str, Any]] = {}
        self._invoices: dict[int, dict[str, Any]] = {}
        self._payments: dict[int, dict[str, Any]] = {}
        self._changes: list[dict[str, Any]] = []
        self._change_seq = 0
        self._credit_numbers: dict[int, int] = {}
        self._ledger_accounts: dict[int, dict[str, Any]] = {}
        self._suppliers: dict[int, dict[str, Any]] = {}
        self._supplier_invoices: dict[int, dict[str, Any]] = {}
        self._entry_lines: dict[int, dict[str, Any]] = {}
        # History and settlement: customer id -> book company id, company name (casefolded) -> company id,
        # company id -> payer profile, invoice id -> (history invoice id, the history's today), invoice id ->
        # planned payments already looked at.
        self._history_customers: dict[int, str] = {}
        self._history_names: dict[str, str] = {}
        self._history_profiles: dict[str, Any] = {}
        self._history_keys: dict[int, tuple[str, dt.date]] = {}
        self._settled: dict[int, int] = {}
        self._backdate: float | None = None  # while history is written: the time records are stamped with
        self._refresh: dict[str, bool] = {}  # refresh token -> used
        self._access: dict[str, float] = {}  # OAuth access token -> expiry (virtual)
        self.counters: dict[str, int] = {
            "invoice_creates": 0, "customer_creates": 0, "reference_lookups": 0, "reference_lookups_hidden": 0,
            "rate_limited": 0, "oauth_refreshes": 0,
        }
        self._seed_products(products)
        self._seed_ledger_accounts()
        self._register_routes()

    # == seeding ===================================================================================
    def _new_id(self) -> int:
        self._next_id += 1 + self._rng.randrange(3)
        return self._next_id

    def _seed_products(self, products: Iterable[ProductSpec] | None) -> None:
        by_rate = {rate: code for code, rate in self.tax_rates.items()}
        now = self.clock.now()
        for product in list(products) if products is not None else list(_book_products()):
            pid = self._new_id()
            rate = Decimal(product.tax_rate)
            code = by_rate.get(rate, "FR_200")
            price = Decimal(product.unit_price)
            self._products[pid] = {
                "id": pid, "label": product.name, "description": product.name, "external_reference": product.sku,
                "reference": product.sku, "price_before_tax": price, "vat_rate": code, "unit": "piece",
                "currency": "EUR", "created_at": now, "updated_at": now,
            }

    # == routes ====================================================================================
    def _register_routes(self) -> None:
        a = API_PREFIX
        self.route("POST", "/oauth/oauth/token", self._token)
        self.route("GET", f"{a}/me", self._api(self._me))
        self.route("GET", f"{a}/customers", self._api(self._list_customers))
        self.route("GET", f"{a}/customers/{{id}}", self._api(lambda r: self._get_customer(r, None)))
        self.route("POST", f"{a}/company_customers", self._api(lambda r: self._create_customer(r, "company")))
        self.route("GET", f"{a}/company_customers/{{id}}", self._api(lambda r: self._get_customer(r, "company")))
        self.route("POST", f"{a}/individual_customers",
                   self._api(lambda r: self._create_customer(r, "individual")))
        self.route("GET", f"{a}/individual_customers/{{id}}",
                   self._api(lambda r: self._get_customer(r, "individual")))
        self.route("GET", f"{a}/products", self._api(self._list_products))
        self.route("POST", f"{a}/products", self._api(self._create_product))
        self.route("GET", f"{a}/products/{{id}}", self._api(self._get_product))
        self.route("GET", f"{a}/customer_invoices", self._api(self._list_invoices))
        self.route("POST", f"{a}/customer_invoices", self._api(self._create_invoice))
        self.route("GET", f"{a}/customer_invoices/{{id}}", self._api(self._get_invoice))
        self.route("DELETE", f"{a}/customer_invoices/{{id}}", self._api(self._delete_invoice))
        self.route("PUT", f"{a}/customer_invoices/{{id}}/finalize", self._api(self._finalize))
        self.route("PUT", f"{a}/customer_invoices/{{id}}/mark_as_paid", self._api(self._mark_as_paid))
        self.route("GET", f"{a}/customer_invoices/{{id}}/invoice_lines", self._api(self._list_lines))
        self.route("GET", f"{a}/customer_invoices/{{id}}/payments", self._api(self._list_payments))
        self.route("POST", f"{a}/customer_invoices/{{id}}/link_credit_note", self._api(self._link_credit_note))
        self.route("GET", f"{a}/ledger_accounts", self._api(self._list_ledger_accounts))
        self.route("POST", f"{a}/ledger_accounts", self._api(self._create_ledger_account))
        self.route("GET", f"{a}/ledger_accounts/{{id}}", self._api(self._get_ledger_account))
        self.route("GET", f"{a}/ledger_entry_lines", self._api(self._list_entry_lines))
        self.route("GET", f"{a}/suppliers", self._api(self._list_suppliers))
        self.route("POST", f"{a}/suppliers", self._api(self._create_supplier))
        self.route("GET", f"{a}/suppliers/{{id}}", self._api(self._get_supplier))
        self.route("GET", f"{a}/supplier_invoices", self._api(self._list_supplier_invoices))
        self.route("GET", f"{a}/supplier_invoices/{{id}}", self._api(self._get_supplier_invoice))
        self.route("GET", f"{a}/supplier_invoices/{{id}}/invoice_lines", self._api(self._list_supplier_lines))
        for resource in ("customer_invoices", "customers", "products"):
            self.route("GET", f"{a}/changelogs/{resource}", self._api(self._changelog_of(resource)))

    def _changelog_of(self, resource: str) -> Callable[[SandboxRequest], SandboxResponse]:
        return lambda req: self._changelog(req, resource)

    def _api(self, fn: Callable[[SandboxRequest], SandboxResponse]) -> Callable[[SandboxRequest], SandboxResponse]:
        def run(req: SandboxRequest) -> SandboxResponse:
            with self.lock:
                try:
                    return fn(req)
                except _Reject as rejected:
                    return rejected.response
        return run

    # == auth and limits ===========================================================================
    def is_exempt(self, req: SandboxRequest) -> bool:
        return not req.path.startswith(API_PREFIX)

    @staticmethod
    def _bearer(req: SandboxRequest) -> str | None:
        scheme, _, token = (req.header("authorization") or "").partition(" ")
        token = token.strip()
        return token if scheme.lower() == "bearer" and token else None

    def authorize(self, req: SandboxRequest) -> SandboxResponse | None:
        if not req.path.startswith(API_PREFIX):
            return None
        token = self._bearer(req)
        if token is not None and token in self.api_tokens:
            return None
        if token is not None:
            with self.lock:
                expires = self._access.get(token)
            if expires is not None and expires > self.clock.now():
                return None
        return _json(401, {"error": "The access token is invalid", "status": 401})

    def _wall(self) -> float:
        """The clock a client reads ``ratelimit-reset`` against: the sandbox clock when it runs at real speed
        (a hand-driven test clock included), the real wall clock when it is compressed."""
        return self.clock.now() if self.clock.scale == 1.0 else time.time()

    def _limit_headers(self, token: str) -> dict[str, str]:
        now = self.clock.now()
        with self._rate_lock:
            window = self._windows.get(token)
            remaining = window.remaining(now) if window else self.requests_per_5s
            frees = window.frees_in(now) if window else 0.0
        reset = self._wall() + self.clock.to_real(frees)
        reset_text = str(math.ceil(reset)) if self.clock.scale == 1.0 else f"{reset:.3f}"
        return {"ratelimit-limit": str(self.requests_per_5s), "ratelimit-remaining": str(remaining),
                "ratelimit-reset": reset_text}

    def _rate_limited(self, real_wait: float) -> SandboxResponse:
        wait = _fmt_seconds(real_wait, self.clock.scale)
        body = f"Rate limit exceeded. Please retry in {wait} seconds.".encode()
        return SandboxResponse(429, body, {"Content-Type": "text/plain; charset=utf-8", "retry-after": wait})

    def pre_request(self, req: SandboxRequest, route: Route) -> SandboxResponse | None:
        token = self._bearer(req)
        if token is None or not req.path.startswith(API_PREFIX):
            return None
        now = self.clock.now()
        with self._rate_lock:
            window = self._windows.setdefault(token, _TokenWindow(self.requests_per_5s, WINDOW_S))
            if window.acquire(now):
                return None
            wait = self.clock.to_real(window.frees_in(now))
            self.counters["rate_limited"] += 1
        return self._rate_limited(wait)

    def post_request(self, req: SandboxRequest, resp: SandboxResponse) -> None:
        token = self._bearer(req)
        if token is None or not req.path.startswith(API_PREFIX) or resp.status == 401:
            return
        resp.headers.update(self._limit_headers(token))

    def fault_response(self, req: SandboxRequest, kind: str) -> SandboxResponse:
        status = int(kind)
        if status == 429:
            return self._rate_limited(self.clock.to_real(1.0))
        titles = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
                  504: "Gateway Timeout"}
        return _json(status, {"error": titles.get(status, "Server Error"), "status": status})

    def not_found(self, req: SandboxRequest) -> SandboxResponse:
        return _json(404, {"error": "Not Found", "status": 404})

    # == OAuth =====================================================================================
    def _client_ok(self, req: SandboxRequest, form: Mapping[str, list[str]]) -> bool:
        scheme, _, value = (req.header("authorization") or "").partition(" ")
        if scheme.lower() == "basic":
            try:
                cid, _, secret = base64.b64decode(value.strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
        else:
            cid = (form.get("client_id") or [""])[-1]
            secret = (form.get("client_secret") or [""])[-1]
        return secrets.compare_digest(cid, self.client_id) and secrets.compare_digest(secret, self._client_secret)

    def _issue_locked(self) -> dict[str, Any]:
        access = "pl-at-" + secrets.token_urlsafe(24)
        refresh = "pl-rt-" + secrets.token_urlsafe(24)
        self._access[access] = self.clock.now() + self.access_token_ttl_s
        self._refresh[refresh] = False
        return {"access_token": access, "token_type": "Bearer", "expires_in": int(self.access_token_ttl_s),
                "refresh_token": refresh, "scope": "customer_invoices:all customers:all products:all",
                "created_at": int(self.clock.now())}

    def issue_tokens(self) -> dict[str, Any]:
        """A fresh OAuth token set, as after a person completed the consent flow."""
        with self.lock:
            return self._issue_locked()

    def _token(self, req: SandboxRequest) -> SandboxResponse:
        form = parse_qs(req.body.decode(errors="replace"), keep_blank_values=True)
        if not self._client_ok(req, form):
            return _json(401, {"error": "invalid_client", "error_description": "Client authentication failed"})
        if (form.get("grant_type") or [""])[-1] != "refresh_token":
            return _json(400, {"error": "unsupported_grant_type"})
        token = (form.get("refresh_token") or [""])[-1]
        with self.lock:
            if self._refresh.get(token) is not False:
                return _json(400, {"error": "invalid_grant",
                                   "error_description": "The provided authorization grant is invalid"})
            self._refresh[token] = True  # refresh tokens are single-use: a new one comes with each refresh
            self.counters["oauth_refreshes"] += 1
            return _json(200, self._issue_locked())

    # == time and rendering helpers ================================================================
    def _ts(self, at: float) -> str:
        return dt.datetime.fromtimestamp(at, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def _today(self) -> dt.date:
        return dt.datetime.fromtimestamp(self.clock.now(), tz=dt.UTC).date()

    def _record_time(self) -> float:
        """When a record written now says it was written: the sandbox clock, or the day history is written for."""
        return self.clock.now() if self._backdate is None else self._backdate

    def _url(self, path: str) -> str:
        return f"{self.base_url}{API_PREFIX}{path}"

    def _log_change(self, resource: str, record: Mapping[str, Any], operation: str) -> None:
        self._change_seq += 1
        self._changes.append({"seq": self._change_seq, "resource": resource, "id": record["id"],
                              "operation": operation, "processed_at": self._record_time(),
                              "updated_at": record["updated_at"], "created_at": record["created_at"]})

    def _prune_changes(self) -> None:
        horizon = self.clock.now() - self.changelog_retention_s
        if self._changes and self._changes[0]["processed_at"] < horizon:
            self._changes = [c for c in self._changes if c["processed_at"] >= horizon]

    def _record_id(self, req: SandboxRequest) -> int:
        try:
            return int(req.params["id"])
        except (KeyError, ValueError):
            raise _not_found() from None

    def _body(self, req: SandboxRequest) -> dict[str, Any]:
        try:
            body = json.loads(req.body or b"null", parse_float=Decimal)
        except (ValueError, UnicodeDecodeError):
            raise _bad_request("The request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _bad_request("The request body must be a JSON object")
        return body

    # -- cursor pagination -------------------------------------------------------------------------
    @staticmethod
    def _limit(req: SandboxRequest, maximum: int = 100) -> int:
        raw = req.arg("limit")
        if raw is None or raw == "":
            return 20
        try:
            limit = int(raw)
        except ValueError:
            raise _schema_error("limit must be an integer", "limit", "ValidateError") from None
        if limit < 1:
            raise _schema_error("limit must be at least 1", "limit", "LessThanMinimum")
        if limit > maximum:
            raise _schema_error(f"limit must be at most {maximum}", "limit", "MoreThanMaximum")
        return limit

    @staticmethod
    def _encode_cursor(scope: str, sort: str, key: list[Any]) -> str:
        raw = json.dumps({"s": scope, "o": sort, "k": key}, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @staticmethod
    def _decode_cursor(cursor: str, scope: str, sort: str) -> list[Any]:
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise _bad_request("Invalid cursor") from None
        if (not isinstance(data, dict) or data.get("s") != scope or data.get("o") != sort
                or not isinstance(data.get("k"), list)):
            raise _bad_request("Invalid cursor")
        key: list[Any] = data["k"]
        return key

    def _paginate(self, req: SandboxRequest, records: Iterable[dict[str, Any]], render: Callable[[dict[str, Any]], Any],
                  *, scope: str, sorts: Mapping[str, Callable[[dict[str, Any]], list[Any]]], default_sort: str = "-id",
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """A page of ``records`` after the request's cursor, in the requested sort. Returns (records, body)."""
        limit = self._limit(req)
        sort = req.arg("sort") or default_sort
        field = sort.removeprefix("-")
        if field not in sorts:
            raise _bad_request(f"Sorting on {field!r} is not supported; available: {', '.join(sorts)}")
        desc = sort.startswith("-")
        key_of = sorts[field]
        keyed = sorted(((key_of(r), r) for r in records), key=lambda kr: kr[0], reverse=desc)
        cursor = req.arg("cursor")
        if cursor:
            after = self._decode_cursor(cursor, scope, sort)
            keyed = [kr for kr in keyed if (kr[0] < after if desc else kr[0] > after)]
        page = keyed[:limit]
        has_more = len(keyed) > limit
        body = {"items": [render(r) for _, r in page], "has_more": has_more,
                "next_cursor": self._encode_cursor(scope, sort, page[-1][0]) if has_more and page else None}
        return [r for _, r in page], body

    # == customers =================================================================================
    def _me(self, req: SandboxRequest) -> SandboxResponse:
        return _json(200, {"user": {"id": 1, "first_name": "Demo", "last_name": "LedgerBridge",
                                    "email": "demo@ledgerbridge.invalid", "locale": "fr"},
                           "company": {"id": 1, "name": "LedgerBridge Démo SAS", "reg_no": "552100554"},
                           "scopes": ["customer_invoices:all", "customers:all", "products:all"]})

    def _render_customer(self, c: Mapping[str, Any], *, with_type: bool = True) -> dict[str, Any]:
        """A customer as ``GET /customers`` shows it; the kind-specific endpoints (``/company_customers``...)
        answer without ``customer_type``."""
        cid = c["id"]
        out: dict[str, Any] = {
            "id": cid, "name": c["name"], "billing_iban": None, "payment_conditions": c["payment_conditions"],
            "recipient": c["recipient"], "phone": c["phone"], "reference": c["reference"], "notes": c["notes"],
        }
        if c["customer_type"] == "company":
            out.update(vat_number=c["vat_number"], reg_no=c["reg_no"])
        else:
            out.update(first_name=c["first_name"], last_name=c["last_name"])
        out.update({
            "ledger_account": None, "emails": list(c["emails"]), "billing_address": dict(c["billing_address"]),
            "delivery_address": dict(c["delivery_address"]), "created_at": self._ts(c["created_at"]),
            "updated_at": self._ts(c["updated_at"]),
        })
        if with_type:
            out["customer_type"] = c["customer_type"]
        out.update({
            "external_reference": c["external_reference"], "billing_language": c["billing_language"],
            "mandates": {"url": self._url(f"/gocardless_mandates?filter=customer_id:{cid}")},
            "pro_account_mandates": {"url": self._url(f"/pro_account/mandates?filter=customer_id:{cid}")},
            "contacts": {"url": self._url(f"/customers/{cid}/contacts")},
        })
        return out

    def _create_customer(self, req: SandboxRequest, kind: str) -> SandboxResponse:
        return _json(201, self._render_customer(self._save_customer(self._body(req), kind), with_type=False))

    def _save_customer(self, body: Mapping[str, Any], kind: str) -> dict[str, Any]:
        """A company or individual customer from a request body (a rejection when Pennylane would refuse it)."""
        if kind == "company":
            name = body.get("name")
            if name is None:
                raise _missing("name")
            if not isinstance(name, str):
                raise _schema_error("name must be a string", "name", "ValidateError")
            if not name.strip():
                raise _unprocessable("name can't be blank")
            first = last = None
        else:
            first, last = body.get("first_name"), body.get("last_name")
            for field, value in (("first_name", first), ("last_name", last)):
                if value is None:
                    raise _missing(field)
                if not isinstance(value, str) or len(value) > 1000:
                    raise _schema_error(f"{field} must be a string of at most 1000 characters", field,
                                        "MoreThanMaxLength")
            name = f"{first} {last}"
        billing = _address(body.get("billing_address"), "billing_address")
        delivery = _address(body["delivery_address"], "delivery_address") if body.get("delivery_address") else billing
        emails = body.get("emails") or []
        if not isinstance(emails, list) or not all(isinstance(e, str) for e in emails):
            raise _schema_error("emails must be an array of strings", "emails", "ValidateError")
        for e in emails:
            if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", e):
                raise _schema_error(f"{e!r} is not an e-mail address", "emails", "InvalidEmailFormat")
        texts: dict[str, str | None] = {}
        for field in ("vat_number", "reg_no", "phone", "recipient", "reference", "notes", "external_reference",
                      "payment_conditions", "billing_language"):
            value = body.get(field)
            if value is not None and not isinstance(value, str):
                raise _schema_error(f"{field} must be a string", field, "ValidateError")
            texts[field] = value
        ext = texts["external_reference"] or str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        if any(c["external_reference"] == ext for c in self._customers.values()):
            raise _Reject(_json(409, {"error": "Conflict with the current state of the target resource. Resource "
                                               "already exists.", "status": 409}))
        now = self._record_time()
        cid = self._new_id()
        record: dict[str, Any] = {
            "id": cid, "customer_type": kind, "name": name, "first_name": first, "last_name": last,
            "vat_number": texts["vat_number"] or "", "reg_no": texts["reg_no"] or "", "emails": emails,
            "billing_address": billing, "delivery_address": delivery, "external_reference": ext,
            "phone": texts["phone"] or "", "recipient": texts["recipient"] or "", "reference": texts["reference"],
            "notes": texts["notes"], "payment_conditions": texts["payment_conditions"] or "30_days",
            "billing_language": texts["billing_language"] or "fr_FR", "created_at": now, "updated_at": now,
        }
        self._customers[cid] = record
        self.counters["customer_creates"] += 1
        self._log_change("customers", record, "insert")
        return record

    def _get_customer(self, req: SandboxRequest, kind: str | None) -> SandboxResponse:
        record = self._customers.get(self._record_id(req))
        if record is None or (kind is not None and record["customer_type"] != kind):
            raise _not_found()
        return _json(200, self._render_customer(record, with_type=kind is None))

    def _list_customers(self, req: SandboxRequest) -> SandboxResponse:
        conditions = _parse_filter(req.arg("filter"), _CUSTOMER_FILTERS)
        rows = [c for c in self._customers.values()
                if all(_matches(self._customer_value(c, f), op, v) for f, op, v in conditions)]
        _, body = self._paginate(req, rows, self._render_customer, scope="customers",
                                 sorts={"id": lambda c: [c["id"]]})
        return _json(200, body)

    @staticmethod
    def _customer_value(c: Mapping[str, Any], field: str) -> Any:
        if field == "ledger_account_id":
            return None
        if field == "emails":
            return list(c["emails"])
        if field in ("reg_no", "external_reference", "name"):
            return c[field] or None
        return c[field]

    # == products ==================================================================================
    def _render_product(self, p: Mapping[str, Any]) -> dict[str, Any]:
        rate = self.tax_rates.get(p["vat_rate"], Decimal(0))
        price = p["price_before_tax"]
        return {
            "id": p["id"], "label": p["label"], "description": p["description"],
            "external_reference": p["external_reference"], "price_before_tax": _plain(price),
            "vat_rate": p["vat_rate"], "price": _plain(round_money(price * (100 + rate) / 100, p["currency"])),
            "unit": p["unit"], "currency": p["currency"], "reference": p["reference"], "ledger_account": None,
            "archived_at": None, "created_at": self._ts(p["created_at"]), "updated_at": self._ts(p["updated_at"]),
        }

    def _vat_code(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not (value in _FR_CODES or _FOREIGN_CODE.match(value)):
            raise _schema_error(f"{field} {value!r} is not one of the allowed VAT rates", field, "NotEnumInclude")
        if value not in self.tax_rates:
            raise _unprocessable(f"The VAT rate {value} is not available for this company")
        return value

    def _currency(self, value: Any) -> str:
        if not isinstance(value, str) or not re.fullmatch(r"[A-Z]{3}", value):
            raise _schema_error(f"currency {value!r} is not an allowed currency", "currency", "NotEnumInclude")
        if value not in _EUR_PER_UNIT:
            raise _unprocessable(f"The currency {value} is not enabled for this company")
        return value

    def _create_product(self, req: SandboxRequest) -> SandboxResponse:
        body = self._body(req)
        for field in ("label", "price_before_tax", "vat_rate"):
            if body.get(field) is None:
                raise _missing(field)
        if not isinstance(body["label"], str):
            raise _schema_error("label must be a string", "label", "ValidateError")
        price = _decimal_string(body["price_before_tax"], "price_before_tax")
        code = self._vat_code(body["vat_rate"], "vat_rate")
        currency = self._currency(body.get("currency") or "EUR")
        ext = body.get("external_reference") or str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        if any(p["external_reference"] == ext for p in self._products.values()):
            raise _Reject(_json(409, {"error": "Conflict with the current state of the target resource. Resource "
                                               "already exists.", "status": 409}))
        now = self.clock.now()
        pid = self._new_id()
        record = {"id": pid, "label": body["label"], "description": str(body.get("description") or ""),
                  "external_reference": str(ext), "reference": body.get("reference"), "price_before_tax": price,
                  "vat_rate": code, "unit": str(body.get("unit") or "piece"), "currency": currency,
                  "created_at": now, "updated_at": now}
        self._products[pid] = record
        self._log_change("products", record, "insert")
        return _json(201, self._render_product(record))

    def _get_product(self, req: SandboxRequest) -> SandboxResponse:
        record = self._products.get(self._record_id(req))
        if record is None:
            raise _not_found()
        return _json(200, self._render_product(record))

    def _list_products(self, req: SandboxRequest) -> SandboxResponse:
        conditions = _parse_filter(req.arg("filter"), _PRODUCT_FILTERS)
        rows = [p for p in self._products.values() if all(_matches(p.get(f), op, v) for f, op, v in conditions)]
        _, body = self._paginate(req, rows, self._render_product, scope="products", sorts={"id": lambda p: [p["id"]]})
        return _json(200, body)

    # == customer invoices =========================================================================
    def _status(self, inv: Mapping[str, Any]) -> str:
        """Draft; a credit note; an invoice cancelled (credited in full), paid (by payments, with what credit notes
        took off), partially cancelled, partially paid, late or upcoming."""
        if inv["draft"]:
            return "draft"
        if inv.get("credit_note"):
            return "credit_note"
        credited = self._credited(inv)
        if inv["cancelled"] or credited >= inv["total"]:
            return "cancelled"
        if inv["marked_paid"] or inv["paid_amount"] + credited >= inv["total"]:
            return "paid"
        if credited > 0:
            return "partially_cancelled"
        if inv["paid_amount"] > 0:
            return "partially_paid"
        return "late" if dt.date.fromisoformat(inv["deadline"]) < self._today() else "upcoming"

    def _remaining(self, inv: Mapping[str, Any]) -> Decimal:
        """What is left to pay, with tax; for a credit note, what is left to use (negative), 0 once it credits an
        invoice."""
        if inv.get("credit_note"):
            return Decimal(0) if inv.get("credited_invoice_id") is not None else Decimal(inv["total"])
        if inv["marked_paid"] or inv["cancelled"]:
            return Decimal(0)
        due: Decimal = inv["total"] - inv["paid_amount"] - self._credited(inv)
        return max(due, Decimal(0))

    def _eur(self, inv: Mapping[str, Any], amount: Decimal) -> Decimal:
        return round_money(amount * inv["exchange_rate"], "EUR")

    def _render_line(self, inv: Mapping[str, Any], line: Mapping[str, Any]) -> dict[str, Any]:
        cur = inv["currency"]
        product = line.get("product_id")
        discount = line.get("discount") or {"type": "relative", "value": Decimal(0)}
        return {
            "id": line["id"], "label": line["label"], "unit": line["unit"], "quantity": _plain(line["quantity"]),
            "amount": _money(self._eur(inv, line["total"])), "currency_amount": _money(line["total"], cur),
            "description": line["description"] or "",
            "product": {"id": product, "url": self._url(f"/products/{product}")} if product else None,
            "vat_rate": line["vat_rate"], "currency_amount_before_tax": _money(line["before_tax"], cur),
            "currency_tax": _money(line["tax"], cur), "tax": _money(self._eur(inv, line["tax"])),
            "raw_currency_unit_price": _plain(line["unit_price"]),
            "discount": {"type": discount["type"], "value": _plain(discount["value"])},
            "section_rank": None, "imputation_dates": None, "created_at": self._ts(line["created_at"]),
            "updated_at": self._ts(line["updated_at"]),
        }

    def _render_invoice(self, inv: Mapping[str, Any]) -> dict[str, Any]:
        iid = inv["id"]
        cur = inv["currency"]
        status = self._status(inv)
        remaining = None if inv["draft"] else self._remaining(inv)
        remaining_ht = None
        if remaining is not None:
            remaining_ht = (round_money(inv["before_tax"] * remaining / inv["total"], cur) if inv["total"]
                            else Decimal(0))
        credited = inv.get("credited_invoice_id")
        return {
            "id": iid, "label": inv["label"], "invoice_number": inv["invoice_number"], "currency": cur,
            "amount": _money(self._eur(inv, inv["total"])), "currency_amount": _money(inv["total"], cur),
            "currency_amount_before_tax": _money(inv["before_tax"], cur), "exchange_rate": _plain(inv["exchange_rate"]),
            "date": inv["date"], "deadline": inv["deadline"], "currency_tax": _money(inv["tax"], cur),
            "tax": _money(self._eur(inv, inv["tax"])), "language": inv["language"], "paid": status == "paid",
            "status": status, "discount": {"type": "relative", "value": "0"}, "ledger_entry": {"id": 40_000 + iid},
            "public_file_url": None if inv["draft"] else self._url(f"/public/invoice/{iid}.pdf"),
            "filename": None if inv["draft"] else f"{inv['invoice_number']}.pdf",
            "remaining_amount_with_tax": None if remaining is None else _money(remaining, cur),
            "remaining_amount_without_tax": None if remaining_ht is None else _money(remaining_ht, cur),
            "draft": inv["draft"], "special_mention": inv["special_mention"],
            "customer": {"id": inv["customer_id"], "url": self._url(f"/customers/{inv['customer_id']}")},
            "invoice_line_sections": {"url": self._url(f"/customer_invoices/{iid}/invoice_line_sections")},
            "invoice_lines": {"url": self._url(f"/customer_invoices/{iid}/invoice_lines")},
            "custom_header_fields": {"url": self._url(f"/customer_invoices/{iid}/custom_header_fields")},
            "categories": {"url": self._url(f"/customer_invoices/{iid}/categories")},
            "pdf_invoice_free_text": inv["pdf_invoice_free_text"], "pdf_invoice_subject": inv["pdf_invoice_subject"],
            "pdf_description": inv["pdf_description"], "billing_subscription": None,
            "credited_invoice": {"id": credited, "url": self._url(f"/customer_invoices/{credited}")} if credited
            else None,
            "customer_invoice_template": None, "transaction_reference": None,
            "payments": {"url": self._url(f"/customer_invoices/{iid}/payments")},
            "matched_transactions": {"url": self._url(f"/customer_invoices/{iid}/matched_transactions")},
            "appendices": {"url": self._url(f"/customer_invoices/{iid}/appendices")}, "quote": None,
            "external_reference": inv["external_reference"], "e_invoicing": None, "archived_at": None,
            "created_at": self._ts(inv["created_at"]), "updated_at": self._ts(inv["updated_at"]),
        }

    def _live_invoice(self, req: SandboxRequest) -> dict[str, Any]:
        inv = self._invoices.get(self._record_id(req))
        if inv is None or inv["deleted"]:
            raise _not_found()
        return inv

    def _invoice_value(self, inv: Mapping[str, Any], field: str) -> Any:
        if field == "date":
            return dt.date.fromisoformat(inv["date"])
        if field == "credit_note":
            return bool(inv.get("credit_note"))
        if field in ("billing_subscription_id", "quote_id", "category_id"):
            return None
        if field == "invoice_number":
            return inv["invoice_number"] or None
        return inv[field]

    def _list_invoices(self, req: SandboxRequest) -> SandboxResponse:
        conditions = _parse_filter(req.arg("filter"), _INVOICE_FILTERS)
        include = req.arg("include")
        if include not in (None, "", "invoice_lines"):
            raise _bad_request(f"Unknown include {include!r}; available: invoice_lines")
        by_reference = any(f == "external_reference" for f, _, _ in conditions)
        now = self.clock.now()
        rows: list[dict[str, Any]] = []
        for inv in self._invoices.values():
            if inv["deleted"] or not all(_matches(self._invoice_value(inv, f), op, v) for f, op, v in conditions):
                continue
            if by_reference and inv["visible_at"] > now:
                # The external_reference filter does not see the invoice yet (it lags behind the write).
                self.counters["reference_lookups_hidden"] += 1
                continue
            rows.append(inv)
        if by_reference:
            self.counters["reference_lookups"] += 1
        page, body = self._paginate(req, rows, self._render_invoice, scope="customer_invoices",
                                    sorts={"id": lambda i: [i["id"]], "date": lambda i: [i["date"], i["id"]]})
        if include == "invoice_lines":
            included: dict[str, Any] = {}
            for inv in page:
                lines = sorted(inv["lines"], key=lambda ln: ln["id"])
                head = lines[:20]
                more = len(lines) > 20
                cursor = self._encode_cursor(f"invoice_lines:{inv['id']}", "id", [head[-1]["id"]]) if more else None
                included[str(inv["id"])] = {
                    "items": [self._render_line(inv, ln) for ln in head], "has_more": more,
                    "next_url": self._url(f"/customer_invoices/{inv['id']}/invoice_lines?sort=id&limit=20"
                                          f"&cursor={cursor}") if more else None,
                }
            body["included"] = {"invoice_lines": included}
        return _json(200, body)

    def _get_invoice(self, req: SandboxRequest) -> SandboxResponse:
        return _json(200, self._render_invoice(self._live_invoice(req)))

    def _list_lines(self, req: SandboxRequest) -> SandboxResponse:
        inv = self._live_invoice(req)
        _, body = self._paginate(req, inv["lines"], lambda ln: self._render_line(inv, ln),
                                 scope=f"invoice_lines:{inv['id']}",
                                 sorts={"id": lambda ln: [ln["id"]], "rank": lambda ln: [ln["rank"], ln["id"]]})
        return _json(200, body)

    def _render_payment(self, p: Mapping[str, Any]) -> dict[str, Any]:
        return {"id": p["id"], "label": p["label"], "currency": p["currency"],
                "currency_amount": _money(p["amount"], p["currency"]), "status": p["status"],
                "created_at": self._ts(p["created_at"]), "updated_at": self._ts(p["updated_at"])}

    def _list_payments(self, req: SandboxRequest) -> SandboxResponse:
        inv = self._live_invoice(req)
        rows = [] if inv["draft"] else [p for p in self._payments.values() if p["invoice_id"] == inv["id"]]
        _, body = self._paginate(req, rows, self._render_payment, scope=f"payments:{inv['id']}",
                                 sorts={"id": lambda p: [p["id"]]})
        return _json(200, body)

    # -- create ------------------------------------------------------------------------------------
    def _build_line(self, raw: Any, n: int, currency: str, now: float) -> dict[str, Any]:
        where = f"invoice_lines[{n}]"
        if not isinstance(raw, dict):
            raise _schema_error(f"{where} must be an object", where, "NotOneOf")
        product: dict[str, Any] | None = None
        if raw.get("product_id") is not None:
            pid = raw["product_id"]
            if isinstance(pid, bool) or not isinstance(pid, int):
                raise _schema_error(f"{where}.product_id must be an integer", f"{where}.product_id", "ValidateError")
            product = self._products.get(pid)
            if product is None:
                raise _unprocessable(f"Product {pid} not found")
        if raw.get("vat_rate") is not None:
            self._vat_code(raw["vat_rate"], f"{where}.vat_rate")
        for field in ("label", "unit", "description"):
            if raw.get(field) is not None and not isinstance(raw[field], str):
                raise _schema_error(f"{where}.{field} must be a string", f"{where}.{field}", "ValidateError")
        if raw.get("raw_currency_unit_price") is not None:
            price = _decimal_string(raw["raw_currency_unit_price"], f"{where}.raw_currency_unit_price")
        elif product is not None:
            price = product["price_before_tax"]
        else:
            raise _missing(f"{where}.raw_currency_unit_price")
        if "quantity" not in raw or raw["quantity"] is None:
            raise _missing(f"{where}.quantity")
        if isinstance(raw["quantity"], str):
            raise _schema_error(f"{where}.quantity must be a number", f"{where}.quantity", "ValidateError")
        quantity = _dec(raw["quantity"], f"{where}.quantity")
        label = raw.get("label") if raw.get("label") is not None else (product["label"] if product else None)
        unit = raw.get("unit") if raw.get("unit") is not None else (product["unit"] if product else None)
        code = raw.get("vat_rate") if raw.get("vat_rate") is not None else (product["vat_rate"] if product else None)
        for field, value in (("label", label), ("unit", unit), ("vat_rate", code)):
            if value is None:
                raise _missing(f"{where}.{field}")
        exponent = price.as_tuple().exponent
        if isinstance(exponent, int) and exponent < -6:
            raise _unprocessable(f"{where}.raw_currency_unit_price can have at most 6 decimals")
        if quantity <= 0:
            raise _unprocessable(f"{where}.quantity must be greater than 0")
        discount: dict[str, Any] | None = None
        gross = quantity * price
        before = round_money(gross, currency)
        spec = raw.get("discount")
        if spec is not None:
            if not isinstance(spec, dict) or spec.get("type") not in _DISCOUNT_TYPES:
                raise _schema_error(f"{where}.discount.type must be absolute or relative", f"{where}.discount.type",
                                    "NotEnumInclude")
            value = _decimal_string(spec.get("value"), f"{where}.discount.value")
            if value < 0 or (spec["type"] == "relative" and value > 100):
                raise _unprocessable(f"{where}.discount.value is out of range")
            discount = {"type": spec["type"], "value": value}
            if spec["type"] == "absolute" and price < 0:
                raise _unprocessable(f"{where}.discount: a credit note line takes a relative discount only")
            if spec["type"] == "relative":
                before = round_money(gross * (Decimal(100) - value) / Decimal(100), currency)
            else:
                before = round_money(gross, currency) - round_money(value, currency)
        rate = self.tax_rates[str(code)]
        tax = round_money(before * rate / Decimal(100), currency)
        return {
            "id": self._new_id(), "rank": n + 1, "label": str(label), "unit": str(unit),
            "description": raw.get("description"), "quantity": quantity, "unit_price": price, "vat_rate": str(code),
            "discount": discount, "before_tax": before, "tax": tax, "total": before + tax,
            "product_id": product["id"] if product else None, "created_at": now, "updated_at": now,
        }

    def _create_invoice(self, req: SandboxRequest) -> SandboxResponse:
        return _json(201, self._render_invoice(self._new_invoice(self._body(req))))

    def _new_invoice(self, body: Mapping[str, Any], *, number: str | None = None) -> dict[str, Any]:
        """A customer invoice or, when its lines add up to a negative total, a credit note (``credited_invoice_id``
        names the invoice it credits). ``number`` is the invoice number of an imported document (else numbered on
        finalization)."""
        draft = body.get("draft", False)
        if not isinstance(draft, bool):
            raise _schema_error("draft must be a boolean", "draft", "NotAnyOf")
        for field in ("date", "deadline"):
            if body.get(field) is not None:
                _date(body[field], field)
        if body.get("customer_id") is not None and (isinstance(body["customer_id"], bool)
                                                    or not isinstance(body["customer_id"], int)):
            raise _schema_error("customer_id must be an integer", "customer_id", "ValidateError")
        credited_id = body.get("credited_invoice_id")
        if credited_id is not None and (isinstance(credited_id, bool) or not isinstance(credited_id, int)):
            raise _schema_error("credited_invoice_id must be an integer", "credited_invoice_id", "ValidateError")
        lines_raw = body.get("invoice_lines")
        if lines_raw is not None:
            if not isinstance(lines_raw, list):
                raise _schema_error("invoice_lines must be an array", "invoice_lines", "NotAnyOf")
            if not lines_raw:
                raise _schema_error("invoice_lines must have at least 1 item", "invoice_lines", "LessThanMinItems")
        ext = body.get("external_reference")
        if ext is not None and not isinstance(ext, str):
            raise _schema_error("external_reference must be a string", "external_reference", "ValidateError")
        for field in ("date", "deadline", "customer_id", "invoice_lines"):
            if body.get(field) is None:
                raise _missing(field)
        currency = self._currency(body.get("currency") or "EUR")
        if body.get("discount") is not None:
            raise _unprocessable("An invoice-level discount is not supported by this simulator")
        customer = self._customers.get(body["customer_id"])
        if customer is None:
            raise _unprocessable(f"Customer {body['customer_id']} not found")
        if ext and self.unique_invoice_reference and any(
                i["external_reference"] == ext and not i["deleted"] for i in self._invoices.values()):
            raise _Reject(_json(409, {"error": "Conflict with the current state of the target resource. Resource "
                                               "already exists.", "status": 409}))
        now = self._record_time()
        raw_lines: list[Any] = body["invoice_lines"]
        lines = [self._build_line(raw, n, currency, now) for n, raw in enumerate(raw_lines)]
        before_tax = sum((ln["before_tax"] for ln in lines), Decimal(0))
        tax = sum((ln["tax"] for ln in lines), Decimal(0))
        credit_note = before_tax + tax < 0
        if before_tax + tax == 0:
            raise _unprocessable("The total amount of an invoice cannot be zero")
        if credited_id is not None:
            if not credit_note:
                raise _unprocessable("credited_invoice_id is only for a credit note (negative amounts)")
            self._check_credit(customer["id"], currency, credited_id, -(before_tax + tax))
        iid = self._new_id()
        texts = {f: body.get(f) for f in ("label", "special_mention", "pdf_invoice_free_text", "pdf_invoice_subject",
                                          "pdf_description")}
        default_label = f"{'Avoir' if credit_note else 'Facture'} {customer['name']}"
        record: dict[str, Any] = {
            "id": iid, "customer_id": customer["id"], "date": body["date"], "deadline": body["deadline"],
            "currency": currency, "exchange_rate": self._rate(currency, str(body["date"])), "draft": draft,
            "external_reference": ext or str(uuid.UUID(int=self._rng.getrandbits(128), version=4)),
            "invoice_number": "", "label": texts["label"] or default_label,
            "language": body.get("language") or customer["billing_language"],
            "special_mention": texts["special_mention"],
            "pdf_invoice_free_text": texts["pdf_invoice_free_text"] or "",
            "pdf_invoice_subject": texts["pdf_invoice_subject"] or "", "pdf_description": texts["pdf_description"],
            "lines": lines, "before_tax": before_tax, "tax": tax, "paid_amount": Decimal(0), "marked_paid": False,
            "cancelled": False, "deleted": False, "created_at": now, "updated_at": now,
            "visible_at": now + self.reference_lookup_delay_s, "credit_note": credit_note,
            "credited_invoice_id": credited_id,
        }
        record["total"] = record["before_tax"] + record["tax"]
        if not draft:
            if number:
                record["invoice_number"] = number
            else:
                self._assign_number(record)
        self._invoices[iid] = record
        self.counters["invoice_creates"] += 1
        self._log_change("customer_invoices", record, "insert")
        if credited_id is not None and not draft:
            self._touch(self._invoices[credited_id])
        return record

    def _check_credit(self, customer_id: int, currency: str, invoice_id: int, amount: Decimal,
                      except_id: int | None = None) -> None:
        """A credit note of ``amount`` (positive) may credit this invoice: a finalized invoice (not a credit note)
        of the same customer and currency, with at least that much not credited yet."""
        target = self._invoices.get(invoice_id)
        if target is None or target["deleted"] or target["draft"] or target.get("credit_note"):
            raise _unprocessable(f"Customer invoice {invoice_id} not found or not finalized")
        if target["customer_id"] != customer_id or target["currency"] != currency:
            raise _unprocessable("A credit note must have the customer and the currency of the invoice it credits")
        if amount > target["total"] - self._credited(target, except_id=except_id):
            raise _unprocessable("The credit note is larger than what is left to credit on the invoice")

    def _credited(self, inv: Mapping[str, Any], *, except_id: int | None = None) -> Decimal:
        """What finalized credit notes credit on ``inv`` (positive)."""
        return -sum((c["total"] for c in self._invoices.values()
                     if c.get("credited_invoice_id") == inv["id"] and c.get("credit_note") and not c["draft"]
                     and not c["deleted"] and c["id"] != except_id), Decimal(0))

    def _rate(self, currency: str, day: str) -> Decimal:
        try:
            when = dt.date.fromisoformat(day[:10])
        except ValueError:
            when = self._today()
        return exchange_rate(currency, when)

    def _assign_number(self, inv: dict[str, Any]) -> None:
        year = dt.date.fromisoformat(inv["date"]).year
        if inv.get("credit_note"):
            self._credit_numbers[year] = self._credit_numbers.get(year, 0) + 1
            inv["invoice_number"] = f"A{year}{self._credit_numbers[year]:04d}"
            return
        self._numbers[year] = self._numbers.get(year, 0) + 1
        inv["invoice_number"] = f"F{year}{self._numbers[year]:04d}"

    def _touch(self, inv: dict[str, Any], operation: str = "update") -> None:
        inv["updated_at"] = self._record_time()
        self._log_change("customer_invoices", inv, operation)

    def _link_credit_note(self, req: SandboxRequest) -> SandboxResponse:
        inv = self._live_invoice(req)
        body = self._body(req)
        note_id = body.get("credit_note_id")
        if note_id is None:
            raise _missing("credit_note_id")
        if isinstance(note_id, bool) or not isinstance(note_id, int):
            raise _schema_error("credit_note_id must be an integer", "credit_note_id", "ValidateError")
        note = self._invoices.get(note_id)
        if note is None or note["deleted"] or not note.get("credit_note"):
            raise _unprocessable(f"Credit note {note_id} not found")
        if note.get("credited_invoice_id") not in (None, inv["id"]):
            raise _unprocessable("The credit note already credits another invoice")
        self._check_credit(note["customer_id"], note["currency"], inv["id"], -note["total"], except_id=note["id"])
        note["credited_invoice_id"] = inv["id"]
        self._touch(note)
        self._touch(inv)
        return _json(200, self._render_invoice(note))

    def _finalize(self, req: SandboxRequest) -> SandboxResponse:
        inv = self._live_invoice(req)
        if not inv["draft"]:
            raise _unprocessable("The invoice is already finalized")
        if inv.get("credit_note") and inv.get("credited_invoice_id") is not None:
            self._check_credit(inv["customer_id"], inv["currency"], inv["credited_invoice_id"], -inv["total"],
                               except_id=inv["id"])
        inv["draft"] = False
        self._assign_number(inv)
        self._touch(inv)
        if inv.get("credit_note") and inv.get("credited_invoice_id") is not None:
            self._touch(self._invoices[inv["credited_invoice_id"]])
        return _json(200, self._render_invoice(inv))

    def _mark_as_paid(self, req: SandboxRequest) -> SandboxResponse:
        inv = self._live_invoice(req)
        if inv["draft"] or inv.get("credit_note"):
            raise _unprocessable("Only a finalized invoice can be marked as paid")
        if not inv["marked_paid"]:
            inv["marked_paid"] = True
            self._touch(inv)
        return SandboxResponse(204, b"", {})

    def _delete_invoice(self, req: SandboxRequest) -> SandboxResponse:
        inv = self._live_invoice(req)
        if not inv["draft"]:
            raise _unprocessable("Only draft invoices can be deleted")
        inv["deleted"] = True
        self._touch(inv, "delete")
        return SandboxResponse(204, b"", {})

    # == ledger accounts, suppliers, supplier invoices, ledger entry lines ===========================
    def _seed_ledger_accounts(self) -> None:
        for number, label in _LEDGER_ACCOUNTS:
            self._new_ledger_account(number, label)

    def _new_ledger_account(self, number: str, label: str) -> dict[str, Any]:
        now = self._record_time()
        lid = self._new_id()
        record = {"id": lid, "number": number, "label": label, "vat_rate": "any", "country_alpha2": "FR",
                  "enabled": True, "created_at": now, "updated_at": now}
        self._ledger_accounts[lid] = record
        return record

    def _account_numbered(self, number: str, label: str = "") -> dict[str, Any]:
        for account in self._ledger_accounts.values():
            if account["number"] == number:
                return account
        return self._new_ledger_account(number, label or f"Compte {number}")

    def _render_ledger_account(self, a: Mapping[str, Any]) -> dict[str, Any]:
        return {k: a[k] for k in ("id", "number", "label", "vat_rate", "country_alpha2", "enabled")}

    def _list_ledger_accounts(self, req: SandboxRequest) -> SandboxResponse:
        conditions = _parse_filter(req.arg("filter"), _LEDGER_ACCOUNT_FILTERS)
        rows = [a for a in self._ledger_accounts.values() if all(_matches(a.get(f), op, v) for f, op, v in conditions)]
        _, body = self._paginate(req, rows, self._render_ledger_account, scope="ledger_accounts",
                                 sorts={"id": lambda a: [a["id"]]})
        return _json(200, body)

    def _get_ledger_account(self, req: SandboxRequest) -> SandboxResponse:
        record = self._ledger_accounts.get(self._record_id(req))
        if record is None:
            raise _not_found()
        return _json(200, self._render_ledger_account(record))

    def _create_ledger_account(self, req: SandboxRequest) -> SandboxResponse:
        body = self._body(req)
        for field in ("number", "label"):
            if body.get(field) is None:
                raise _missing(field)
            if not isinstance(body[field], str):
                raise _schema_error(f"{field} must be a string", field, "ValidateError")
        number = body["number"].strip()
        if not re.fullmatch(r"[0-9][0-9A-Z]*", number):
            raise _unprocessable("number must start with a digit of the chart of accounts")
        if any(a["number"] == number for a in self._ledger_accounts.values()):
            raise _Reject(_json(409, {"error": "Conflict with the current state of the target resource. Resource "
                                               "already exists.", "status": 409}))
        return _json(201, self._render_ledger_account(self._new_ledger_account(number, body["label"])))

    def _render_supplier(self, s: Mapping[str, Any]) -> dict[str, Any]:
        return {"id": s["id"], "name": s["name"], "establishment_no": None, "reg_no": s["reg_no"],
                "vat_number": s["vat_number"], "ledger_account": {"id": s["ledger_account_id"]}, "emails": [],
                "iban": None, "postal_address": dict(s["postal_address"]),
                "supplier_payment_method": "manual_transfer", "supplier_due_date_delay": 30,
                "supplier_due_date_rule": "days", "external_reference": s["external_reference"],
                "created_at": self._ts(s["created_at"]), "updated_at": self._ts(s["updated_at"])}

    def _new_supplier(self, name: str, external_reference: str | None = None, *, reg_no: str = "",
                      vat_number: str = "") -> dict[str, Any]:
        ext = external_reference or str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        if any(s["external_reference"] == ext for s in self._suppliers.values()):
            raise _Reject(_json(409, {"error": "Conflict with the current state of the target resource. Resource "
                                               "already exists.", "status": 409}))
        now = self._record_time()
        sid = self._new_id()
        record = {"id": sid, "name": name, "reg_no": reg_no, "vat_number": vat_number, "external_reference": ext,
                  "ledger_account_id": self._account_numbered("401")["id"],
                  "postal_address": {"address": "", "postal_code": "", "city": "", "country_alpha2": "FR"},
                  "created_at": now, "updated_at": now}
        self._suppliers[sid] = record
        return record

    def _create_supplier(self, req: SandboxRequest) -> SandboxResponse:
        body = self._body(req)
        name = body.get("name")
        if name is None:
            raise _missing("name")
        if not isinstance(name, str) or not name.strip():
            raise _unprocessable("name can't be blank")
        texts = {}
        for field in ("external_reference", "reg_no", "vat_number"):
            value = body.get(field)
            if value is not None and not isinstance(value, str):
                raise _schema_error(f"{field} must be a string", field, "ValidateError")
            texts[field] = value
        return _json(201, self._render_supplier(self._new_supplier(
            name, texts["external_reference"], reg_no=texts["reg_no"] or "", vat_number=texts["vat_number"] or "")))

    def _list_suppliers(self, req: SandboxRequest) -> SandboxResponse:
        conditions = _parse_filter(req.arg("filter"), _SUPPLIER_FILTERS)
        rows = [s for s in self._suppliers.values() if all(_matches(s.get(f), op, v) for f, op, v in conditions)]
        _, body = self._paginate(req, rows, self._render_supplier, scope="suppliers", sorts={"id": lambda s: [s["id"]]})
        return _json(200, body)

    def _get_supplier(self, req: SandboxRequest) -> SandboxResponse:
        record = self._suppliers.get(self._record_id(req))
        if record is None:
            raise _not_found()
        return _json(200, self._render_supplier(record))

    def _new_supplier_invoice(self, supplier: Mapping[str, Any], day: dt.date, currency: str,
                              lines: Sequence[tuple[str, str, Decimal, str]], *, number: str | None = None,
                              external_reference: str | None = None) -> dict[str, Any]:
        """A supplier invoice as Pennylane holds it once imported and booked: lines of (label, expense account
        number, amount before tax, VAT code), and its ledger entry in the purchases journal (each line's amount
        before tax debited to its account, the VAT to 44566, the total credited to the supplier's 401), in euros."""
        now = self._record_time()
        rate = exchange_rate(currency, day)
        sid = self._new_id()
        rows: list[dict[str, Any]] = []
        for label, account_number, net, code in lines:
            before = round_money(net, currency)
            tax = round_money(before * self.tax_rates[code] / Decimal(100), currency)
            rows.append({"id": self._new_id(), "label": label, "description": label, "vat_rate": code,
                         "before_tax": before, "tax": tax, "total": before + tax,
                         "account_id": self._account_numbered(account_number, label.split(" – ")[0][:80])["id"],
                         "created_at": now, "updated_at": now})
        record: dict[str, Any] = {
            "id": sid, "supplier_id": supplier["id"], "date": day.isoformat(),
            "deadline": (day + dt.timedelta(days=30)).isoformat(), "currency": currency, "exchange_rate": rate,
            "invoice_number": number or f"FF-{sid}", "label": rows[0]["label"] if rows else supplier["name"],
            "external_reference": external_reference or str(uuid.UUID(int=self._rng.getrandbits(128), version=4)),
            "lines": rows, "before_tax": sum((r["before_tax"] for r in rows), Decimal(0)),
            "tax": sum((r["tax"] for r in rows), Decimal(0)), "entry_id": self._new_id(), "created_at": now,
            "updated_at": now,
        }
        record["total"] = record["before_tax"] + record["tax"]
        self._supplier_invoices[sid] = record
        entry: list[tuple[int, Decimal, Decimal, str]] = []
        for row in rows:
            entry.append((row["account_id"], round_money(row["before_tax"] * rate, "EUR"), Decimal(0), row["label"]))
        tax_eur = round_money(record["tax"] * rate, "EUR")
        if tax_eur:
            entry.append((self._account_numbered("44566")["id"], tax_eur, Decimal(0), record["label"]))
        total_eur = sum((d for _a, d, _c, _l in entry), Decimal(0))
        entry.append((supplier["ledger_account_id"], Decimal(0), total_eur, f"{supplier['name']} - {record['label']}"))
        self._post_entry("HA", day, record["entry_id"], entry)
        return record

    def _post_entry(self, journal: str, day: dt.date, entry_id: int,
                    lines: Sequence[tuple[int, Decimal, Decimal, str]]) -> None:
        """Ledger entry lines (account id, debit, credit, label) of one entry; debits and credits balance."""
        if sum((d - c for _a, d, c, _l in lines), Decimal(0)) != 0:
            raise ValueError("a ledger entry must balance")
        now = self._record_time()
        for account_id, debit, credit, label in lines:
            lid = self._new_id()
            self._entry_lines[lid] = {"id": lid, "entry_id": entry_id, "journal": journal, "date": day.isoformat(),
                                      "ledger_account_id": account_id, "debit": debit, "credit": credit,
                                      "label": label, "created_at": now, "updated_at": now}

    def _render_supplier_invoice(self, inv: Mapping[str, Any]) -> dict[str, Any]:
        sid = inv["id"]
        cur = inv["currency"]
        eur = inv["exchange_rate"]
        return {
            "id": sid, "label": inv["label"], "invoice_number": inv["invoice_number"], "currency": cur,
            "amount": _money(round_money(inv["total"] * eur, "EUR")), "currency_amount": _money(inv["total"], cur),
            "currency_amount_before_tax": _money(inv["before_tax"], cur), "exchange_rate": _plain(eur),
            "date": inv["date"], "deadline": inv["deadline"], "currency_tax": _money(inv["tax"], cur),
            "tax": _money(round_money(inv["tax"] * eur, "EUR")), "reconciled": False, "accounting_status": "complete",
            "filename": f"{inv['invoice_number']}.pdf",
            "public_file_url": self._url(f"/public/supplier_invoice/{sid}.pdf"),
            "remaining_amount_with_tax": _money(inv["total"], cur),
            "remaining_amount_without_tax": _money(inv["before_tax"], cur), "ledger_entry": {"id": inv["entry_id"]},
            "supplier": {"id": inv["supplier_id"], "url": self._url(f"/suppliers/{inv['supplier_id']}")},
            "invoice_lines": {"url": self._url(f"/supplier_invoices/{sid}/invoice_lines")},
            "categories": {"url": self._url(f"/supplier_invoices/{sid}/categories")}, "transaction_reference": None,
            "payment_status": "to_be_paid", "payments": {"url": self._url(f"/supplier_invoices/{sid}/payments")},
            "matched_transactions": {"url": self._url(f"/supplier_invoices/{sid}/matched_transactions")},
            "external_reference": inv["external_reference"], "e_invoicing": None, "archived_at": None,
            "created_at": self._ts(inv["created_at"]), "updated_at": self._ts(inv["updated_at"]),
        }

    def _render_supplier_line(self, inv: Mapping[str, Any], line: Mapping[str, Any]) -> dict[str, Any]:
        cur = inv["currency"]
        eur = inv["exchange_rate"]
        return {"id": line["id"], "label": line["label"], "amount": _money(round_money(line["total"] * eur, "EUR")),
                "currency_amount": _money(line["total"], cur), "description": line["description"],
                "vat_rate": line["vat_rate"], "currency_amount_before_tax": _money(line["before_tax"], cur),
                "currency_tax": _money(line["tax"], cur), "tax": _money(round_money(line["tax"] * eur, "EUR")),
                "imputation_dates": None, "created_at": self._ts(line["created_at"]),
                "updated_at": self._ts(line["updated_at"])}

    def _list_supplier_invoices(self, req: SandboxRequest) -> SandboxResponse:
        conditions = _parse_filter(req.arg("filter"), _SUPPLIER_INVOICE_FILTERS)

        def value(inv: Mapping[str, Any], field: str) -> Any:
            return dt.date.fromisoformat(inv["date"]) if field == "date" else inv.get(field)

        rows = [i for i in self._supplier_invoices.values()
                if all(_matches(value(i, f), op, v) for f, op, v in conditions)]
        _, body = self._paginate(req, rows, self._render_supplier_invoice, scope="supplier_invoices",
                                 sorts={"id": lambda i: [i["id"]], "date": lambda i: [i["date"], i["id"]]})
        return _json(200, body)

    def _get_supplier_invoice(self, req: SandboxRequest) -> SandboxResponse:
        record = self._supplier_invoices.get(self._record_id(req))
        if record is None:
            raise _not_found()
        return _json(200, self._render_supplier_invoice(record))

    def _list_supplier_lines(self, req: SandboxRequest) -> SandboxResponse:
        inv = self._supplier_invoices.get(self._record_id(req))
        if inv is None:
            raise _not_found()
        _, body = self._paginate(req, inv["lines"], lambda ln: self._render_supplier_line(inv, ln),
                                 scope=f"supplier_invoice_lines:{inv['id']}", sorts={"id": lambda ln: [ln["id"]]})
        return _json(200, body)

    def _render_entry_line(self, line: Mapping[str, Any]) -> dict[str, Any]:
        journal_id, _name = _JOURNALS[line["journal"]]
        return {"id": line["id"], "debit": _money(line["debit"]), "credit": _money(line["credit"]),
                "label": line["label"],
                "ledger_account": {"id": line["ledger_account_id"],
                                   "url": self._url(f"/ledger_accounts/{line['ledger_account_id']}")},
                "journal": {"id": journal_id, "url": self._url(f"/journals/{journal_id}")}, "date": line["date"],
                "ledger_entry": {"id": line["entry_id"]}, "lettered_ledger_entry_lines": {"ids": []},
                "created_at": self._ts(line["created_at"]), "updated_at": self._ts(line["updated_at"])}

    def _list_entry_lines(self, req: SandboxRequest) -> SandboxResponse:
        conditions = _parse_filter(req.arg("filter"), _ENTRY_LINE_FILTERS)

        def value(line: Mapping[str, Any], field: str) -> Any:
            if field == "date":
                return dt.date.fromisoformat(line["date"])
            if field == "journal_id":
                return _JOURNALS[line["journal"]][0]
            return line[field]

        rows = [ln for ln in self._entry_lines.values()
                if all(_matches(value(ln, f), op, v) for f, op, v in conditions)]
        _, body = self._paginate(req, rows, self._render_entry_line, scope="ledger_entry_lines",
                                 sorts={"id": lambda ln: [ln["id"]], "date": lambda ln: [ln["date"], ln["id"]]})
        return _json(200, body)

    # == changelogs ================================================================================
    def _changelog(self, req: SandboxRequest, resource: str) -> SandboxResponse:
        limit = self._limit(req, maximum=1000)
        cursor = req.arg("cursor")
        start_raw = req.arg("start_date")
        if cursor and start_raw:
            raise _bad_request("start_date and cursor cannot be used together")
        self._prune_changes()
        rows = [c for c in self._changes if c["resource"] == resource]
        if start_raw:
            try:
                start = dt.datetime.fromisoformat(start_raw.replace("Z", "+00:00"))
            except ValueError:
                raise _schema_error("start_date must be an RFC 3339 date-time", "start_date",
                                    "InvalidDateTimeFormat") from None
            if start.tzinfo is None:
                start = start.replace(tzinfo=dt.UTC)
            since = start.timestamp()
            if since < self.clock.now() - self.changelog_retention_s:
                raise _unprocessable("start_date is older than the 4-week retention of changes")
            rows = [c for c in rows if c["processed_at"] >= since]
        if cursor:
            after = self._decode_cursor(cursor, f"changelog:{resource}", "processed_at")
            rows = [c for c in rows if [c["seq"]] > after]
        page = rows[:limit]
        has_more = len(rows) > limit
        items = [{"id": c["id"], "operation": c["operation"], "processed_at": self._ts(c["processed_at"]),
                  "updated_at": self._ts(c["updated_at"]), "created_at": self._ts(c["created_at"])} for c in page]
        nxt = self._encode_cursor(f"changelog:{resource}", "processed_at", [page[-1]["seq"]]) if has_more else None
        return _json(200, {"items": items, "has_more": has_more, "next_cursor": nxt})

    # == test and demo helpers =====================================================================
    def admin(self, req: SandboxRequest) -> SandboxResponse:
        """Sandbox controls: ``GET /_sandbox/{stats,invoices,credit_notes,customers,payments}``;
        ``POST /_sandbox/payments`` (``{"invoice_id", "amount", "label"?, "status"?}``: a payment matched to an
        invoice); ``POST /_sandbox/invoices/{id}/cancel`` (a credit note covering the whole invoice);
        ``POST /_sandbox/settle`` (``{"today": "YYYY-MM-DD"}``: the customers pay as planned up to that day, see
        :meth:`settle`); ``POST /_sandbox/authorize`` (a fresh OAuth token set)."""
        path = req.path.rstrip("/")
        h = {"Content-Type": "application/json"}

        def ok(payload: Any) -> SandboxResponse:
            return SandboxResponse(200, json.dumps(payload, default=str).encode(), h)

        def bad(exc: Exception) -> SandboxResponse:
            return SandboxResponse(400, json.dumps({"message": f"{type(exc).__name__}: {exc}"}).encode(), h)

        if req.method == "GET" and path == "/_sandbox/invoices":
            return ok(self.ledger_view())
        if req.method == "GET" and path == "/_sandbox/credit_notes":
            return ok(self.credit_notes())
        if req.method == "GET" and path == "/_sandbox/customers":
            return ok(self.customers())
        if req.method == "GET" and path == "/_sandbox/payments":
            return ok(self.payments())
        if req.method == "POST" and path == "/_sandbox/authorize":
            return ok(self.issue_tokens())
        m = re.fullmatch(r"/_sandbox/invoices/(\d+)/cancel", path)
        if req.method == "POST" and m:
            try:
                self.cancel_invoice(int(m.group(1)))
            except KeyError as exc:
                return SandboxResponse(404, json.dumps({"message": str(exc)}).encode(), h)
            return SandboxResponse(204, b"", {})
        if req.method == "POST" and path == "/_sandbox/payments":
            try:
                body = json.loads(req.body or b"{}", parse_float=Decimal)
                payment = self.create_payment(int(body["invoice_id"]), Decimal(str(body["amount"])),
                                              label=body.get("label"), status=str(body.get("status") or "found"))
            except (ValueError, KeyError, TypeError, InvalidOperation) as exc:
                return bad(exc)
            return ok(payment)
        if req.method == "POST" and path == "/_sandbox/settle":
            try:
                body = json.loads(req.body or b"{}") or {}
                today = dt.date.fromisoformat(str(body["today"])) if body.get("today") else self._today()
                made = self.settle(today)
            except (ValueError, TypeError, AttributeError) as exc:
                return bad(exc)
            return ok({"payments": made, "today": today.isoformat()})
        return super().admin(req)

    def ledger_view(self) -> list[dict[str, Any]]:
        """Every invoice ever created (credit notes apart), in creation order, with the keys of the Xero sandbox's
        ``/_sandbox/invoices`` (``Reference``, ``SubTotal``, ``Total``, ``CurrencyCode``, ``Status``...), so
        that tests compare ledgers. Status: ``DELETED`` (a deleted draft), ``VOIDED`` (cancelled: credited in
        full), ``DRAFT``, else ``AUTHORISED``; ``AmountCredited`` is what credit notes took off; amounts are
        strings."""
        with self.lock:
            out: list[dict[str, Any]] = []
            for inv in self._invoices.values():
                if inv.get("credit_note"):
                    continue
                cur = inv["currency"]
                status = ("DELETED" if inv["deleted"] else "DRAFT" if inv["draft"]
                          else "VOIDED" if self._status(inv) == "cancelled" else "AUTHORISED")
                credited = self._credited(inv) if not inv["draft"] else Decimal(0)
                due = self._remaining(inv) if not inv["draft"] else inv["total"]
                out.append({
                    "InvoiceID": str(inv["id"]), "InvoiceNumber": inv["invoice_number"] or None,
                    "Reference": inv["external_reference"], "ContactID": str(inv["customer_id"]),
                    "Date": inv["date"], "DueDate": inv["deadline"], "CurrencyCode": cur,
                    "SubTotal": _money(inv["before_tax"], cur), "TotalTax": _money(inv["tax"], cur),
                    "Total": _money(inv["total"], cur),
                    "AmountPaid": _money(max(inv["total"] - due - credited, Decimal(0)), cur),
                    "AmountCredited": _money(credited, cur), "AmountDue": _money(due, cur), "Status": status,
                    "LineCount": len(inv["lines"]),
                })
            return out

    def credit_notes(self) -> list[dict[str, Any]]:
        """Every credit note as the API shows it, in creation order."""
        with self.lock:
            return [self._render_invoice(c) for c in self._invoices.values() if c.get("credit_note")]

    def invoices(self) -> list[dict[str, Any]]:
        """Every invoice record, in creation order (amounts as Decimal; deleted drafts included)."""
        with self.lock:
            return copy.deepcopy(list(self._invoices.values()))

    def invoice_by_reference(self, reference: str) -> dict[str, Any] | None:
        """The first invoice with this ``external_reference`` that is not a deleted draft (no lookup delay)."""
        with self.lock:
            for inv in self._invoices.values():
                if inv["external_reference"] == reference and not inv["deleted"]:
                    return copy.deepcopy(inv)
        return None

    def customers(self) -> list[dict[str, Any]]:
        with self.lock:
            return [self._render_customer(c) for c in self._customers.values()]

    def payments(self) -> list[dict[str, Any]]:
        with self.lock:
            return [{**self._render_payment(p), "invoice_id": p["invoice_id"]} for p in self._payments.values()]

    def create_payment(self, invoice_id: int, amount: Decimal, *, label: str | None = None, status: str = "found",
                       day: dt.date | None = None) -> dict[str, Any]:
        """Record a payment against a finalized invoice (a bank transaction matched to it); ``day`` is when the
        money was received (its ``created_at``; now by default), the record is made now."""
        with self.lock:
            inv = self._invoices.get(invoice_id)
            if inv is None or inv["deleted"] or inv["draft"] or inv.get("credit_note"):
                raise KeyError(f"no finalized invoice {invoice_id}")
            now = self._record_time()
            received = self._at_noon(day) if day is not None else now
            pid = self._new_id()
            payment = {"id": pid, "invoice_id": invoice_id, "label": label or f"Virement {inv['invoice_number']}",
                       "currency": inv["currency"], "amount": round_money(amount, inv["currency"]),
                       "status": status, "created_at": received, "updated_at": max(now, received)}
            self._payments[pid] = payment
            if status in ("found", "confirmed", "paid_out", "emitted"):
                inv["paid_amount"] += payment["amount"]
            self._touch(inv)
            return {**self._render_payment(payment), "invoice_id": invoice_id}

    def cancel_invoice(self, invoice_id: int) -> None:
        """Cancel a finalized invoice, as Pennylane does: by a credit note of all of it (the lines negated) that
        credits it."""
        with self.lock:
            inv = self._invoices.get(invoice_id)
            if inv is None or inv["deleted"] or inv["draft"] or inv.get("credit_note"):
                raise KeyError(f"no finalized invoice {invoice_id}")
            left = inv["total"] - self._credited(inv)
            if left <= 0:
                return
            if left == inv["total"]:
                lines = [self._negated(line) for line in inv["lines"]]
            else:
                lines = self._credit_lines(inv, left)
            self._new_invoice({"date": self._today().isoformat(), "deadline": self._today().isoformat(),
                               "customer_id": inv["customer_id"], "currency": inv["currency"], "draft": False,
                               "credited_invoice_id": inv["id"], "invoice_lines": lines,
                               "label": f"Avoir sur la facture {inv['invoice_number']}"})

    @staticmethod
    def _negated(line: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"label": line["label"], "unit": line["unit"], "vat_rate": line["vat_rate"],
                               "quantity": line["quantity"], "raw_currency_unit_price": _plain(-line["unit_price"])}
        discount = line.get("discount")
        if discount and discount["type"] == "relative" and discount["value"]:
            out["discount"] = {"type": "relative", "value": _plain(discount["value"])}
        return out

    def _credit_lines(self, inv: Mapping[str, Any], gross: Decimal) -> list[dict[str, Any]]:
        """Lines of a credit note worth exactly ``gross`` with tax, at the VAT rate of the invoice's first line
        (an exempt line takes the odd cent when no amount before tax gives ``gross`` at that rate)."""
        cur = inv["currency"]
        first = inv["lines"][0]
        rate = self.tax_rates[first["vat_rate"]]
        guess = round_money(gross * Decimal(100) / (Decimal(100) + rate), cur)
        step = Decimal(1).scaleb(-minor_unit(cur))
        label = f"Avoir – {first['label']}"
        for net in (guess, guess - step, guess + step):
            if net > 0 and net + round_money(net * rate / Decimal(100), cur) == gross:
                return [{"label": label, "unit": first["unit"], "vat_rate": first["vat_rate"], "quantity": 1,
                         "raw_currency_unit_price": _plain(-net)}]
        with_tax = guess + round_money(guess * rate / Decimal(100), cur)
        lines = [{"label": label, "unit": first["unit"], "vat_rate": first["vat_rate"], "quantity": 1,
                  "raw_currency_unit_price": _plain(-guess)}]
        if gross != with_tax and "exempt" in self.tax_rates:
            lines.append({"label": "Arrondi", "unit": first["unit"], "vat_rate": "exempt", "quantity": 1,
                          "raw_currency_unit_price": _plain(with_tax - gross)})
        return lines

    def credit_invoice(self, invoice_id: int, gross: Decimal | None = None, day: dt.date | None = None
                       ) -> dict[str, Any]:
        """A finalized credit note of ``gross`` (tax included; all of what is left when None) dated ``day``, for
        the customer and currency of an invoice, which it credits. Returns it as the API shows it."""
        with self.lock:
            inv = self._invoices.get(invoice_id)
            if inv is None or inv["deleted"] or inv["draft"] or inv.get("credit_note"):
                raise KeyError(f"no finalized invoice {invoice_id}")
            amount = gross if gross is not None else inv["total"] - self._credited(inv)
            when = (day or self._today()).isoformat()
            note = self._new_invoice({"date": when, "deadline": when, "customer_id": inv["customer_id"],
                                      "currency": inv["currency"], "draft": False, "credited_invoice_id": inv["id"],
                                      "invoice_lines": self._credit_lines(inv, amount),
                                      "label": f"Avoir sur la facture {inv['invoice_number']}"})
            return self._render_invoice(note)

    def add_supplier_invoice(self, account_code: str, day: dt.date, net: Decimal, description: str = "",
                             currency: str = "EUR", vat_rate: str = "FR_200") -> dict[str, Any]:
        """A supplier invoice of one line of ``net`` before tax, booked to the expense account numbered
        ``account_code`` (created when missing), with its ledger entry. Returns it as the API shows it."""
        with self.lock:
            supplier = self._history_supplier()
            record = self._new_supplier_invoice(supplier, day, currency,
                                                [(description or f"Achat {account_code}", account_code, net,
                                                  vat_rate)])
            return self._render_supplier_invoice(record)

    def _history_supplier(self) -> dict[str, Any]:
        for supplier in self._suppliers.values():
            if supplier["external_reference"] == "fournisseurs-divers":
                return supplier
        return self._new_supplier("Fournisseurs divers", "fournisseurs-divers")

    # == history and settlement ====================================================================
    def _at_noon(self, day: dt.date) -> float:
        return dt.datetime(day.year, day.month, day.day, 12, tzinfo=dt.UTC).timestamp()

    def load_history(self, book: Book, history: History) -> dict[str, int]:
        """Write ``history`` as the company's past: a company customer per company of the history (the name, VAT
        number, SIREN, e-mail and billing address the sync would send, with no external reference of the sync's,
        so that the sync matches it), finalized invoices imported with their numbers and dates (lines from the
        catalogue's products, with the demo configuration's VAT codes), the payments on their days, credit notes
        that credit their invoices, supplier invoices for the expenses (and ledger entries of the miscellaneous
        journal for personnel costs, accounts 64x) booked to expense accounts created when missing. Every record
        is stamped with the day it happened, so the changelogs (4 weeks) show none of the old ones. Records
        already there (the same company, invoice, credit note or expense) are kept, so loading twice adds
        nothing. Returns what was added."""
        from connectors.pennylane.adapter import customer_body

        by_rate = {rate: code for code, rate in self.tax_rates.items()}
        products = {p["external_reference"]: p for p in self._products.values()}
        wanted = ({i.company_id for i in history.invoices} | {c.company_id for c in history.credit_notes}
                  | {p.company_id for p in history.profiles})
        companies = [c for c in book.companies if c.id in wanted]
        first: dict[str, dt.date] = {}
        for hist in history.invoices:
            first[hist.company_id] = min(first.get(hist.company_id, hist.issue_date), hist.issue_date)
        counts = {"customers": 0, "invoices": 0, "payments": 0, "credit_notes": 0, "expenses": 0}
        with self.lock:
            try:
                customer_of: dict[str, int] = {}
                known = {company: cid for cid, company in self._history_customers.items() if cid in self._customers}
                for company in companies:
                    if company.id in known:
                        customer_of[company.id] = known[company.id]
                        continue
                    self._backdate = self._at_noon(first.get(company.id, history.today) - dt.timedelta(days=30))
                    body = customer_body(seedhistory.book_customer(company))
                    record = self._save_customer(body, "company")
                    customer_of[company.id] = record["id"]
                    self._history_customers[record["id"]] = company.id
                    counts["customers"] += 1
                self._history_profiles.update({p.company_id: p for p in history.profiles})
                self._history_names.update({c.name.casefold(): c.id for c in companies})
                refs = {i["external_reference"]: i["id"] for i in self._invoices.values() if not i["deleted"]}
                done_expenses = {s["external_reference"] for s in self._supplier_invoices.values()}
                done_expenses |= {ln["label"].split(" | ")[0] for ln in self._entry_lines.values()}
                invoice_ids: dict[str, int] = {}
                events: list[tuple[dt.date, int, str, Any]] = []
                for hist in history.invoices:
                    if hist.id in refs:
                        invoice_ids[hist.id] = refs[hist.id]
                        continue
                    events.append((hist.issue_date, 0, "invoice", hist))
                    events.extend((p.date, 2, "payment", p) for p in hist.payments)
                events.extend((c.issue_date, 1, "credit", c) for c in history.credit_notes if c.id not in refs)
                events.extend((e.date, 3, "expense", e) for e in history.expenses if e.id not in done_expenses)
                events.sort(key=lambda ev: (ev[0], ev[1]))
                for day, _rank, kind, item in events:
                    self._backdate = self._at_noon(day)
                    if kind == "invoice":
                        record = self._new_invoice(self._history_body(item, customer_of[item.company_id], by_rate,
                                                                      products), number=item.number)
                        invoice_ids[item.id] = record["id"]
                        self._history_keys[record["id"]] = (item.id, history.today)
                        counts["invoices"] += 1
                    elif kind == "payment":
                        target = self._invoices[invoice_ids[item.invoice_id]]
                        amount = min(item.amount, self._remaining(target))
                        if amount > 0:
                            self.create_payment(target["id"], amount, day=day, label=f"Virement {item.id}")
                            counts["payments"] += 1
                    elif kind == "credit":
                        body = self._history_body(item, customer_of[item.company_id], by_rate, products, sign=-1)
                        target_id = invoice_ids.get(item.invoice_id)
                        if target_id is not None:
                            target = self._invoices[target_id]
                            room = target["total"] - self._credited(target)
                            if 0 < -self._lines_total(body) <= room:
                                body["credited_invoice_id"] = target_id
                        self._new_invoice(body, number=item.number)
                        counts["credit_notes"] += 1
                    else:
                        self._history_expense(item)
                        counts["expenses"] += 1
            except _Reject as rejected:
                raise ValueError(f"the history does not fit this Pennylane company: "
                                 f"{rejected.response.body.decode(errors='replace')}") from None
            finally:
                self._backdate = None
        return counts

    def _lines_total(self, body: Mapping[str, Any]) -> Decimal:
        """The total with tax of the lines of an invoice body (as :meth:`_build_line` computes it)."""
        total = Decimal(0)
        for line in body["invoice_lines"]:
            before = round_money(Decimal(line["raw_currency_unit_price"]) * Decimal(str(line["quantity"]))
                                 * (Decimal(100) - Decimal(line.get("discount", {}).get("value", "0")))
                                 / Decimal(100), body["currency"])
            total += before + round_money(before * self.tax_rates[line["vat_rate"]] / Decimal(100), body["currency"])
        return total

    def _history_body(self, doc: HistoryInvoice | HistoryCreditNote, customer_id: int, by_rate: Mapping[Decimal, str],
                      products: Mapping[str, Mapping[str, Any]], *, sign: int = 1) -> dict[str, Any]:
        lines: list[dict[str, Any]] = []
        for line in doc.lines:
            code = by_rate.get(Decimal(line.tax_rate))
            if code is None:
                raise ValueError(f"{doc.id}: no VAT code for {line.tax_rate} %")
            body: dict[str, Any] = {"label": line.description, "unit": "piece", "vat_rate": code,
                                    "quantity": line.quantity,
                                    "raw_currency_unit_price": _plain(line.unit_price * sign)}
            product = products.get(line.sku)
            if product is not None:
                body["product_id"] = product["id"]
            if line.discount_percent:
                body["discount"] = {"type": "relative", "value": _plain(line.discount_percent)}
            lines.append(body)
        due = doc.due_date if isinstance(doc, HistoryInvoice) else doc.issue_date
        return {"date": doc.issue_date.isoformat(), "deadline": due.isoformat(), "customer_id": customer_id,
                "currency": doc.currency, "draft": False, "external_reference": doc.id, "invoice_lines": lines}

    def _history_expense(self, expense: HistoryExpense) -> None:
        if expense.account_code.startswith("64"):
            # Personnel costs: no supplier invoice, an entry of the miscellaneous journal (salaries payable).
            net = round_money(expense.net * exchange_rate(expense.currency, expense.date), "EUR")
            label = f"{expense.id} | {expense.description}"
            self._post_entry("OD", expense.date, self._new_id(), [
                (self._account_numbered(expense.account_code, expense.description.split(" – ")[0])["id"], net,
                 Decimal(0), label),
                (self._account_numbered("421")["id"], Decimal(0), net, label)])
            return
        self._new_supplier_invoice(self._history_supplier(), expense.date, expense.currency,
                                   [(expense.description, expense.account_code, expense.net, "FR_200")],
                                   external_reference=expense.id)

    def _profile_for(self, customer_id: int) -> Any:
        """The payer profile of a customer: by the customer written with the history, else by its name."""
        company = self._history_customers.get(customer_id)
        if company is None:
            customer = self._customers.get(customer_id)
            name = str(customer["name"]).casefold() if customer else ""
            company = self._history_names.get(name)
        return self._history_profiles.get(company) if company is not None else None

    def settle(self, today: dt.date) -> int:
        """Pay the open invoices as their customers would: the payments of
        :func:`~connectors.seedhistory.payment_plan` dated up to ``today`` not made yet (each planned payment once,
        at most what the invoice still owes), received on their planned day. The plan of an invoice of the history
        is drawn for its history id, and only its payments planned after the history's today are made (up to that
        day the history has said what was paid); the plan of any other invoice is drawn for its id. Returns the
        number of payments made."""
        made = 0
        with self.lock:
            for inv in sorted(self._invoices.values(), key=lambda r: r["id"]):
                if inv["deleted"] or inv["draft"] or inv.get("credit_note") or self._remaining(inv) <= 0:
                    continue
                issue = dt.date.fromisoformat(inv["date"])
                if issue > today:
                    continue
                key, decided = self._history_keys.get(inv["id"], (str(inv["id"]), None))
                plan = seedhistory.payment_plan(self._profile_for(inv["customer_id"]), key, issue,
                                                dt.date.fromisoformat(inv["deadline"]), inv["total"], inv["currency"])
                done = self._settled.get(inv["id"], 0)
                for index, (day, amount) in enumerate(plan):
                    if index < done:
                        continue
                    if day > today:
                        break
                    pay = min(amount, self._remaining(inv))
                    if decided is not None and day <= decided:
                        pay = Decimal(0)  # the history has said what was paid up to its today
                    if pay > 0:
                        self.create_payment(inv["id"], pay, day=day)
                        made += 1
                    done = index + 1
                self._settled[inv["id"]] = done
        return made

    def stats(self) -> dict[str, Any]:
        base = super().stats()
        with self.lock:
            base.update(
                invoices=sum(1 for i in self._invoices.values() if not i["deleted"] and not i.get("credit_note")),
                credit_notes=sum(1 for i in self._invoices.values() if not i["deleted"] and i.get("credit_note")),
                customers=len(self._customers),
                products=len(self._products),
                payments=len(self._payments),
                supplier_invoices=len(self._supplier_invoices),
                ledger_entry_lines=len(self._entry_lines),
                changes=len(self._changes),
                **self.counters,
            )
        return base
