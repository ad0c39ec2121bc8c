"""A stateful simulator of the Pipedrive API (v2, plus the v1 field listings other tools still read).

What it serves, and how Pipedrive behaves there (from Pipedrive's v1/v2 OpenAPI descriptions):

- API v2 under ``/api/v2``: ``GET /deals`` and ``GET /deals/archived`` (filters ``ids`` (100 at most),
  ``owner_id``, ``person_id``, ``org_id``, ``pipeline_id``, ``stage_id``, ``status`` (comma list of open, won,
  lost, deleted; deleted deals only when asked, and only those deleted in the last 30 days),
  ``updated_since`` (inclusive) and ``updated_until`` (exclusive) in RFC 3339, ``sort_by`` id, update_time or
  add_time, ``sort_direction``, ``custom_fields`` (15 keys at most), ``include_option_labels``), ``GET`` and
  ``PATCH /deals/{id}``, ``GET /deals/products?deal_ids=`` (100 deals at most) and ``GET /deals/{id}/products``,
  ``GET /organizations``, ``GET``/``PATCH /organizations/{id}``, ``GET /persons[/{id}]``, ``GET
  /products[/{id}]``, ``GET /pipelines[/{id}]`` and ``GET /stages[/{id}]`` (each stage's ``deal_probability``,
  in percent), ``GET``/``POST /activities`` and ``GET``/``DELETE /activities/{id}`` (filters ``ids``,
  ``owner_id``, ``deal_id`` (one deal), ``person_id``, ``org_id``, ``lead_id``, ``done``, ``updated_since``,
  ``updated_until``; ``sort_by`` id, update_time, add_time or due_date; ``include_fields=attendees``), and
  ``GET``/``POST /{deal,organization,person,product,activity}Fields`` with ``GET /...Fields/{field_code}``.
  Lists page with ``limit`` (default 100, at most 500) and an opaque ``cursor``;
  answers are ``{success, data, additional_data: {next_cursor}}``, ``next_cursor`` null on the last page.
  Ties in the sort order are broken by id, so cursors are stable keysets.
- API v1 field listings under ``/v1``: ``GET``/``POST /{deal,organization,person,product,activity}Fields`` with
  ``start``/``limit`` and ``additional_data.pagination``; ``GET /v1/activityTypes`` (call, meeting, task,
  deadline, email, lunch).
- Custom fields are keyed by random 40-character hashes; v2 nests their values under ``custom_fields`` (every
  custom field of the entity, null when empty); single-option values are option ids (``{id, label}`` with
  ``include_option_labels=true``); to clear a value, send null (an empty array is refused, as documented).
- Timestamps are whole seconds, written ``2025-01-01T10:20:00Z`` (v1 field listings: ``2025-01-01 10:20:00``).
  Every write sets ``update_time`` from the sandbox clock, so writes within one second share it.
- Numbers travel as exact JSON numbers (amounts are held as Decimal).

Auth: ``x-api-token`` header with one of ``api_tokens``; the ``api_token`` query parameter is accepted too,
as Pipedrive accepts it (other tools send it), and counted in the stats; an OAuth2 bearer token from ``POST
/oauth/token`` (refresh_token grant, client authentication by HTTP Basic; ``POST /_sandbox/authorize``
issues a refresh token as the consent flow would). Anything else: 401 ``unauthorized access``.

Limits: a daily *token* budget per company (``daily_token_budget``, reset at UTC midnight on the sandbox
clock), each operation costing its ``x-token-cost``
(:func:`connectors.pipedrive.client.token_cost`), and a burst limit per credential per 2-second window
(``burst_limit``). Every API answer carries ``x-ratelimit-limit``, ``x-ratelimit-remaining``,
``x-ratelimit-reset`` (seconds until the window frees, in real seconds) and ``x-daily-requests-left``.
Pipedrive documents that last header as the POST/PUT requests left in the day (api_token requests); no header
for the token budget is documented, so the sandbox reports the tokens left today there. Over the burst: 429
with ``Retry-After``. Budget too low for the operation's cost: 429 "Daily API token budget exceeded" with
``Retry-After`` until midnight. Errors carry Pipedrive's body ``{success: false, error, error_info, data:
null, additional_data: null}``.

Seeding (:meth:`PipedriveSandbox.load_book`): products (``code`` = SKU, prices in EUR and USD, ``tax``),
one organization per company with the custom fields ``VAT number``, ``SIREN``, ``SIRET``, ``Billing email``,
``Billing currency`` and the option field ``Acquisition source``, one contact person per company (with the
company's e-mail), the deals (value, currency, status, ``won_time``/``lost_time``, a stage in one of two
pipelines, owner, ``origin``, the custom option field ``Acquisition source``, and for about a quarter of the
open deals a ``probability`` of their own, which overrides their stage's), and each deal's sales activities
(:meth:`connectors.seedbook.Book.activities`, done, of type call, meeting, email or task). Pipedrive has no
native quotes, so a deal's products are its
*effective* lines (:func:`connectors.seedbook.effective_lines`): quantity, item price, a percentage discount
and the tax percent (``tax_method`` exclusive); a line whose description is not the product's name carries it
in ``comments``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import json
import math
import random
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from connectors.domain import round_money
from connectors.pipedrive.client import dumps, loads, token_cost
from connectors.sandboxkit import (
    Clock,
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
    basic_authorization,
    host_of,
    iso_ms_utc,
    new_uuid,
    webhook_admin,
)
from connectors.seedbook import ACQUISITION_SOURCES, Book, BookActivity, BookDeal, effective_lines

__all__ = ["COUNTRY_NAMES", "PipedriveSandbox", "iso", "parse_time"]

COUNTRY_NAMES = {"FR": "France", "DE": "Germany", "BE": "Belgium", "ES": "Spain", "IT": "Italy",
                 "US": "United States"}
_ERROR_INFO = "Please check developers.pipedrive.com"
_MAX_LIMIT = 500
_DEFAULT_LIMIT = 100
_MAX_IDS = 100
_MAX_CUSTOM_KEYS = 15
_DELETED_VISIBLE_S = 30 * 86_400
_BURST_WINDOW_S = 2.0
_ACCESS_TOKEN_TTL_S = 3599
_COMPANY_EPOCH = dt.datetime(2023, 6, 1, tzinfo=dt.UTC)
_FIRST_NAMES = ("Camille", "Léa", "Manon", "Chloé", "Emma", "Hugo", "Lucas", "Louis", "Thomas", "Nathan",
                "Inès", "Sarah", "Julie", "Antoine", "Maxime", "Pauline", "Marie", "Paul", "Anna", "Jules")
_USD_PER_EUR = Decimal("1.08")

# Field types a client may create (v2 addDealField), and the option types among them.
_CREATABLE_TYPES = frozenset({"varchar", "text", "double", "phone", "date", "daterange", "time", "timerange", "set",
                              "enum", "varchar_auto", "address", "monetary", "org", "people", "user"})
_OPTION_TYPES = frozenset({"enum", "set"})
_ENTITIES = {"deal": "dealFields", "organization": "organizationFields", "person": "personFields",
             "product": "productFields", "activity": "activityFields"}
_STATUSES = ("open", "won", "lost", "deleted")

# (pipeline id, name, stages [(stage id, name, deal probability in percent)]); the book's open stages map onto
# the first four, and won or lost deals stay in the stage they were closed from, as in Pipedrive.
_PIPELINES = (
    (1, "Ventes", ((1, "Prospect", 10), (2, "Qualifié", 25), (3, "Proposition", 50), (4, "Négociation", 75),
                   (5, "Signature", 90))),
    (2, "Grands comptes", ((6, "Découverte", 10), (7, "Cadrage", 30), (8, "Offre remise", 50), (9, "Négociation", 70),
                           (10, "Contrat", 90))),
)
# Pipedrive's default activity types: (id, key_string, name).
_ACTIVITY_TYPES = ((1, "call", "Call"), (2, "meeting", "Meeting"), (3, "task", "Task"), (4, "deadline", "Deadline"),
                   (5, "email", "Email"), (6, "lunch", "Lunch"))
_ACTIVITY_SORTS = ("id", "update_time", "add_time", "due_date")
_STAGE_INDEX = {"prospect": 0, "qualified": 1, "proposal": 2, "negotiation": 3, "won": 4, "lost": 3}


def iso(seconds: int | None) -> str | None:
    """Pipedrive v2's timestamp form: ``2025-01-01T10:20:00Z``."""
    if seconds is None:
        return None
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc(seconds: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def _v1_time(seconds: int | None) -> str | None:
    if seconds is None:
        return None
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def parse_time(value: str) -> float | None:
    """Epoch seconds of an RFC 3339 timestamp (``Z`` or an offset); None when unreadable."""
    v = value.strip()
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?", v):
        return None
    try:
        parsed = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def _seconds(value: dt.datetime) -> int:
    return math.floor(value.timestamp())


def _fmt_seconds(value: float) -> str:
    """A duration in seconds for a header: whole seconds from one second up, else milliseconds."""
    if value >= 1:
        return str(math.ceil(value))
    return f"{max(math.ceil(value * 1000) / 1000, 0.001):g}"


class _ApiError(Exception):
    """An error answer in Pipedrive's shape, raised inside a handler."""

    def __init__(self, status: int, error: str, info: str = _ERROR_INFO, **extra: Any) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.info = info
        self.extra = extra


def _not_found() -> _ApiError:
    return _ApiError(404, "Entity was not found", "Object was not found.")


def _bad(message: str) -> _ApiError:
    return _ApiError(400, message)


@dataclass
class _Field:
    """One field of an entity, built-in or custom."""

    id: int
    key: str
    name: str
    field_type: str
    custom: bool
    order_nr: int
    add_time: int
    update_time: int
    options: list[dict[str, Any]] | None = None
    subfields: list[dict[str, str]] | None = None
    description: str = ""
    optional: bool = False


@dataclass
class _Grant:
    refresh_token: str
    client_id: str


@dataclass
class _Access:
    client_id: str
    expires_at: float


@dataclass
class _Limits:
    """Burst windows per credential and the company's daily token budget."""

    burst: dict[str, WindowLimit] = field(default_factory=dict)
    day: dt.date | None = None
    tokens_used: int = 0


def _number(value: Any) -> Decimal | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | Decimal):
        d = Decimal(value)
    elif isinstance(value, float):
        d = Decimal(str(value))
    else:
        return None
    return d if d.is_finite() else None


class PipedriveSandbox(SandboxApp):
    """The Pipedrive API simulator (see the module docstring). Thread-safe; state under ``self.lock``.

    Options: ``api_tokens`` (accepted API tokens), ``daily_token_budget`` (tokens per UTC day for the
    company), ``burst_limit`` (requests per credential per 2-second window), ``oauth_client`` (``(client_id,
    client_secret)`` of an OAuth app allowed to use ``POST /oauth/token``), ``company_domain`` (the
    ``api_domain`` the token endpoint answers; default the sandbox's own URL).
    """

    vendor = "pipedrive"
    state_attrs = ("_deals", "_orgs", "_persons", "_products", "_deal_products", "_fields", "_next_ids",
                   "_book_ids", "_users", "_grants", "_activities")

    def __init__(
        self,
        *,
        seed: int = 0,
        faults: str | FaultPlan | None = None,
        clock: Clock | None = None,
        api_tokens: Iterable[str] = ("demo-pipedrive-token",),
        daily_token_budget: int = 1_000_000,
        burst_limit: int = 80,
        oauth_client: tuple[str, str] | None = None,
        company_domain: str | None = None,
    ) -> None:
        super().__init__(seed=seed, faults=faults, clock=clock)
        self.api_tokens = tuple(api_tokens)
        self.daily_token_budget = daily_token_budget
        self.burst_limit = burst_limit
        self.oauth_client = oauth_client
        self.company_domain = company_domain
        self._key_rng = random.Random(f"pipedrive-keys-{seed}")
        self._token_rng = random.Random(f"pipedrive-tokens-{seed}")
        self._limits = _Limits()
        self._limits_lock = threading.Lock()
        self._access: dict[str, _Access] = {}
        self._deals: dict[int, dict[str, Any]] = {}
        self._orgs: dict[int, dict[str, Any]] = {}
        self._persons: dict[int, dict[str, Any]] = {}
        self._products: dict[int, dict[str, Any]] = {}
        self._deal_products: dict[int, dict[str, Any]] = {}
        self._activities: dict[int, dict[str, Any]] = {}
        self._fields: dict[str, list[_Field]] = {e: [] for e in _ENTITIES}
        self._next_ids: dict[str, int] = {"deal": 1, "organization": 1, "person": 1, "product": 1,
                                          "deal_product": 1, "field": 1, "option": 1, "activity": 1}
        self._book_ids: dict[str, dict[str, int]] = {"deals": {}, "organizations": {}, "persons": {}}
        self._users: list[dict[str, Any]] = []
        self._grants: dict[str, _Grant] = {}
        #: Every request that reached a route: method, path, query parameter names, how it authenticated.
        self.access_log: list[dict[str, Any]] = []
        self.served_429 = 0
        self.quota_refused = 0
        self.tokens_charged = 0
        self._install_fields()
        self._install_routes()

    # -- routes ----------------------------------------------------------------------------------------
    def _r(self, method: str, pattern: str, fn: Callable[[SandboxRequest], SandboxResponse]) -> None:
        def handler(req: SandboxRequest) -> SandboxResponse:
            try:
                return fn(req)
            except _ApiError as exc:
                return self._error(exc)

        self.route(method, pattern, handler)

    def _install_routes(self) -> None:
        v2 = "/api/v2"
        self._r("POST", "/oauth/token", self._h_oauth_token)
        # Specific paths first: ``/deals/products`` and ``/deals/archived`` would otherwise match ``/deals/{id}``.
        self._r("GET", f"{v2}/deals/products", self._h_deals_products)
        self._r("GET", f"{v2}/deals/archived", lambda r: self._h_list_deals(r, archived=True))
        self._r("GET", f"{v2}/deals", lambda r: self._h_list_deals(r, archived=False))
        self._r("GET", f"{v2}/deals/{{id}}/products", self._h_deal_products)
        self._r("GET", f"{v2}/deals/{{id}}", self._h_get_deal)
        self._r("PATCH", f"{v2}/deals/{{id}}", self._h_patch_deal)
        self._r("GET", f"{v2}/organizations", self._h_list_orgs)
        self._r("GET", f"{v2}/organizations/{{id}}", self._h_get_org)
        self._r("PATCH", f"{v2}/organizations/{{id}}", self._h_patch_org)
        self._r("GET", f"{v2}/persons", self._h_list_persons)
        self._r("GET", f"{v2}/persons/{{id}}", self._h_get_person)
        self._r("GET", f"{v2}/products", self._h_list_products)
        self._r("GET", f"{v2}/products/{{id}}", self._h_get_product)
        self._install_activity_routes()
        for entity, path in _ENTITIES.items():
            self._r("GET", f"{v2}/{path}", functools.partial(self._h_fields_v2, entity=entity))
            self._r("POST", f"{v2}/{path}", functools.partial(self._h_add_field_v2, entity=entity))
            self._r("GET", f"{v2}/{path}/{{code}}", functools.partial(self._h_field_v2, entity=entity))
            self._r("GET", f"/v1/{path}", functools.partial(self._h_fields_v1, entity=entity))
            self._r("POST", f"/v1/{path}", functools.partial(self._h_add_field_v1, entity=entity))

    # -- envelopes ---------------------------------------------------------------------------------------
    @staticmethod
    def _json(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> SandboxResponse:
        h = {"Content-Type": "application/json; charset=utf-8"}
        if headers:
            h.update(headers)
        return SandboxResponse(status, dumps(payload).encode(), h)

    def _ok(self, data: Any, additional: Any = None, status: int = 200) -> SandboxResponse:
        payload: dict[str, Any] = {"success": True, "data": data}
        if additional is not None:
            payload["additional_data"] = additional
        return self._json(status, payload)

    def _error(self, exc: _ApiError) -> SandboxResponse:
        return self._json(exc.status, {"success": False, "error": exc.error, "error_info": exc.info, "data": None,
                                       "additional_data": None, **exc.extra})

    def fault_response(self, req: SandboxRequest, kind: str) -> SandboxResponse:
        status = int(kind)
        message = "Too Many Requests" if status == 429 else "Service temporarily unavailable"
        resp = self._error(_ApiError(status, message))
        if status == 429:
            resp.headers["Retry-After"] = _fmt_seconds(self.clock.to_real(_BURST_WINDOW_S / 2))
        return resp

    def not_found(self, req: SandboxRequest) -> SandboxResponse:
        return self._error(_ApiError(404, "Unknown method .", _ERROR_INFO))

    def is_exempt(self, req: SandboxRequest) -> bool:
        return req.path.startswith("/_sandbox") or req.path.rstrip("/") == "/oauth/token"

    # -- auth and limits ---------------------------------------------------------------------------------
    def _credential(self, req: SandboxRequest) -> tuple[str | None, str | None]:
        """(credential, how it came: header, query or bearer); (None, None) when there is none valid."""
        token = req.header("x-api-token")
        if token and token in self.api_tokens:
            return token, "header"
        auth = req.header("authorization") or ""
        if auth[:7].lower() == "bearer ":
            bearer = auth[7:].strip()
            with self.lock:
                grant = self._access.get(bearer)
            if grant is not None and grant.expires_at > self.clock.now():
                return bearer, "bearer"
        query = req.arg("api_token")
        if query and query in self.api_tokens:
            return query, "query"
        return None, None

    def handle(self, req: SandboxRequest) -> SandboxResponse:
        if not req.path.startswith("/_sandbox"):
            _, how = self._credential(req)
            self.access_log.append({
                "method": req.method, "path": req.path, "query": sorted(req.query), "auth": how,
                "api_token_in_query": "api_token" in req.query,
            })
        return super().handle(req)

    def authorize(self, req: SandboxRequest) -> SandboxResponse | None:
        if self.is_exempt(req):
            return None
        credential, _ = self._credential(req)
        if credential is None:
            return self._json(401, {"success": False, "error": "unauthorized access", "errorCode": 401,
                                    "error_info": _ERROR_INFO, "data": None, "additional_data": None})
        return None

    def _window(self, credential: str) -> WindowLimit:
        with self._limits_lock:
            w = self._limits.burst.get(credential)
            if w is None:
                w = self._limits.burst[credential] = WindowLimit(self.clock, self.burst_limit, _BURST_WINDOW_S,
                                                                 "burst")
            return w

    def _roll_day(self) -> None:
        today = dt.datetime.fromtimestamp(self.clock.now(), dt.UTC).date()
        if self._limits.day != today:
            self._limits.day = today
            self._limits.tokens_used = 0

    def _seconds_to_midnight(self) -> float:
        now = dt.datetime.fromtimestamp(self.clock.now(), dt.UTC)
        midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
        return self.clock.to_real((midnight - now).total_seconds())

    def pre_request(self, req: SandboxRequest, route: Route) -> SandboxResponse | None:
        if self.is_exempt(req):
            return None
        credential, _ = self._credential(req)
        allowed, _, wait = self._window(credential or "").try_acquire()
        if not allowed:
            with self._limits_lock:
                self.served_429 += 1
            resp = self._error(_ApiError(429, "Too Many Requests"))
            resp.headers["Retry-After"] = _fmt_seconds(wait)
            return resp
        cost = token_cost(req.method, req.path)
        with self._limits_lock:
            self._roll_day()
            if self._limits.tokens_used + cost > self.daily_token_budget:
                self.quota_refused += 1
                refused = True
            else:
                self._limits.tokens_used += cost
                self.tokens_charged += cost
                refused = False
        if refused:
            resp = self._error(_ApiError(429, "Daily API token budget exceeded",
                                         "The company's daily token budget is used up; it resets at midnight UTC"))
            resp.headers["Retry-After"] = _fmt_seconds(self._seconds_to_midnight())
            return resp
        return None

    def post_request(self, req: SandboxRequest, resp: SandboxResponse) -> None:
        if self.is_exempt(req):
            return
        credential, _ = self._credential(req)
        window = self._window(credential or "")
        resp.headers["x-ratelimit-limit"] = str(self.burst_limit)
        resp.headers["x-ratelimit-remaining"] = str(max(window.remaining(), 0))
        resp.headers["x-ratelimit-reset"] = _fmt_seconds(self.clock.to_real(_BURST_WINDOW_S))
        with self._limits_lock:
            self._roll_day()
            left = max(self.daily_token_budget - self._limits.tokens_used, 0)
        resp.headers["x-daily-requests-left"] = str(left)

    def tokens_left(self) -> int:
        """Tokens left in today's company budget."""
        with self._limits_lock:
            self._roll_day()
            return max(self.daily_token_budget - self._limits.tokens_used, 0)

    # -- OAuth -------------------------------------------------------------------------------------------
    def issue_refresh_token(self) -> str:
        """A refresh token for the OAuth client, as the consent flow would hand it out."""
        if self.oauth_client is None:
            raise ValueError("the sandbox has no OAuth client (oauth_client option)")
        with self.lock:
            token = f"{self.seed}:{self._token_rng.getrandbits(128):032x}"
            self._grants[token] = _Grant(token, self.oauth_client[0])
            return token

    def _h_oauth_token(self, req: SandboxRequest) -> SandboxResponse:
        form = {k: v[-1] for k, v in parse_qs(req.body.decode("utf-8", "replace")).items()}
        client_id, secret = form.get("client_id"), form.get("client_secret")
        auth = req.header("authorization") or ""
        if auth[:6].lower() == "basic ":
            try:
                client_id, _, secret = base64.b64decode(auth[6:].strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                client_id = secret = None
        if self.oauth_client is None or (client_id, secret) != self.oauth_client:
            return self._json(401, {"success": False, "error": "invalid_client",
                                    "error_description": "Invalid client credentials"})
        if form.get("grant_type") != "refresh_token":
            return self._json(400, {"success": False, "error": "unsupported_grant_type"})
        refresh = form.get("refresh_token") or ""
        with self.lock:
            grant = self._grants.get(refresh)
            if grant is None or grant.client_id != client_id:
                return self._json(400, {"success": False, "error": "invalid_grant",
                                        "error_description": "Invalid refresh token"})
            access = f"{self.seed}:{self._token_rng.getrandbits(160):040x}"
            self._access[access] = _Access(client_id, self.clock.now() + _ACCESS_TOKEN_TTL_S)
        return self._json(200, {
            "access_token": access, "token_type": "Bearer", "refresh_token": refresh,
            "scope": "base,deals:full,contacts:full,products:read,deal-fields:full,contact-fields:full",
            "expires_in": _ACCESS_TOKEN_TTL_S, "api_domain": self.company_domain or self.base_url,
        }, {"Cache-Control": "no-store"})

    # -- fields ------------------------------------------------------------------------------------------
    def _new_id(self, kind: str) -> int:
        n = self._next_ids[kind]
        self._next_ids[kind] = n + 1
        return n

    def _new_key(self) -> str:
        return f"{self._key_rng.getrandbits(160):040x}"

    def _options(self, labels: Iterable[str]) -> list[dict[str, Any]]:
        return [{"id": self._new_id("option"), "label": label} for label in labels]

    def _add_field(self, entity: str, key: str | None, name: str, field_type: str, *, options: list[str] | None
                   = None, description: str = "", at: int | None = None,
                   builtin_options: list[dict[str, Any]] | None = None,
                   subfields: list[dict[str, str]] | None = None, optional: bool = False) -> _Field:
        at = at if at is not None else math.floor(self.clock.now())
        custom = key is None
        f = _Field(id=self._new_id("field"), key=key or self._new_key(), name=name, field_type=field_type,
                   custom=custom, order_nr=len(self._fields[entity]) + 1, add_time=at, update_time=at,
                   options=builtin_options if builtin_options is not None
                   else (self._options(options) if options is not None else None),
                   subfields=subfields, description=description, optional=optional)
        self._fields[entity].append(f)
        return f

    def _install_fields(self) -> None:
        at = _seconds(_COMPANY_EPOCH)
        add = self._add_field
        status_options = [{"id": s, "label": s.title()} for s in _STATUSES]
        for key, name, ftype in (("id", "ID", "int"), ("title", "Title", "varchar"), ("creator_user_id", "Creator",
                                 "user"), ("owner_id", "Owner", "user")):
            add("deal", key, name, ftype, at=at)
        add("deal", "value", "Value", "monetary", at=at, subfields=[
            {"field_code": "value", "field_name": "Amount of Value", "field_type": "double"},
            {"field_code": "currency", "field_name": "Currency of Value", "field_type": "varchar"}])
        for key, name, ftype in (("person_id", "Contact person", "people"), ("org_id", "Organization", "org"),
                                 ("pipeline_id", "Pipeline", "int"), ("stage_id", "Stage", "stage")):
            add("deal", key, name, ftype, at=at)
        add("deal", "status", "Status", "status", at=at, builtin_options=status_options)
        for key, name, ftype in (("probability", "Probability", "double"), ("lost_reason", "Lost reason",
                                 "varchar"), ("add_time", "Deal created", "date"), ("update_time",
                                 "Update time", "date"), ("won_time", "Won time", "date"), ("lost_time",
                                 "Lost time", "date"), ("close_time", "Deal closed on", "date"),
                                 ("expected_close_date", "Expected close date", "date"),
                                 ("visible_to", "Visible to", "visible_to"), ("label_ids", "Label", "set"),
                                 ("origin", "Origin", "varchar")):
            add("deal", key, name, ftype, at=at)
        add("deal", "channel", "Source channel", "enum", at=at,
            builtin_options=[{"id": 52, "label": "Billboards"}, {"id": 53, "label": "Newsletter"}])
        add("deal", None, "Acquisition source", "enum", options=list(ACQUISITION_SOURCES), at=at,
            description="Channel the customer came from")
        for key, name, ftype in (("id", "ID", "int"), ("name", "Name", "varchar"), ("owner_id", "Owner", "user"),
                                 ("address", "Address", "address"), ("website", "Website", "varchar"),
                                 ("add_time", "Organization created", "date"), ("update_time", "Update time",
                                 "date"), ("visible_to", "Visible to", "visible_to"), ("label_ids", "Label",
                                 "set")):
            add("organization", key, name, ftype, at=at)
        for name in ("VAT number", "SIREN", "SIRET", "Billing email", "Billing currency"):
            add("organization", None, name, "varchar", at=at)
        for key, name, ftype in (("id", "ID", "int"), ("name", "Name", "varchar"), ("first_name", "First name",
                                 "varchar"), ("last_name", "Last name", "varchar"), ("org_id", "Organization",
                                 "org"), ("owner_id", "Owner", "user"), ("emails", "Email", "varchar"),
                                 ("phones", "Phone", "phone"), ("job_title", "Job title", "varchar"),
                                 ("add_time", "Person created", "date"), ("update_time", "Update time", "date")):
            add("person", key, name, ftype, at=at)
        for key, name, ftype in (("id", "ID", "int"), ("name", "Name", "varchar"), ("code", "Product code",
                                 "varchar"), ("unit", "Unit", "varchar"), ("tax", "Tax", "double"),
                                 ("prices", "Unit prices", "price_list"), ("owner_id", "Owner", "user"),
                                 ("add_time", "Product created", "date"), ("update_time", "Update time",
                                 "date")):
            add("product", key, name, ftype, at=at)
        # Added after every other field, so that the keys and ids drawn before stay what they were.
        add("organization", None, "Acquisition source", "enum", options=list(ACQUISITION_SOURCES), at=at,
            description="Channel the customer came from")
        self._install_activity_fields(at)

    def _field_by_key(self, entity: str, key: str) -> _Field | None:
        for f in self._fields[entity]:
            if f.key == key:
                return f
        return None

    def custom_field_key(self, entity: str, name: str) -> str:
        """The hash key of the custom field of ``entity`` named ``name`` (first match)."""
        with self.lock:
            for f in self._fields[entity]:
                if f.custom and f.name == name:
                    return f.key
        raise KeyError(name)

    @staticmethod
    def _field_v2(f: _Field) -> dict[str, Any]:
        options = None
        if f.options is not None:
            options = [{"id": o["id"], "label": o["label"], "color": o.get("color")} for o in f.options]
        return {"field_name": f.name, "field_code": f.key, "description": f.description or None,
                "field_type": f.field_type, "options": options, "subfields": f.subfields,
                "is_custom_field": f.custom, "is_optional_response_field": f.optional}

    @staticmethod
    def _field_v1(f: _Field) -> dict[str, Any]:
        return {"id": f.id, "key": f.key, "name": f.name, "order_nr": f.order_nr, "field_type": f.field_type,
                "add_time": _v1_time(f.add_time), "update_time": _v1_time(f.update_time),
                "last_updated_by_user_id": 1, "created_by_user_id": 1, "active_flag": True,
                "edit_flag": f.custom, "index_visible_flag": True, "details_visible_flag": True,
                "add_visible_flag": not f.custom, "important_flag": False, "bulk_edit_allowed": True,
                "searchable_flag": False, "filtering_allowed": True, "sortable_flag": True,
                "options": [{"id": o["id"], "label": o["label"]} for o in f.options] if f.options else None,
                "mandatory_flag": f.key == "title"}

    def _h_fields_v2(self, req: SandboxRequest, entity: str) -> SandboxResponse:
        with self.lock:
            rows = list(self._fields[entity])
        page, nxt = self._keyset(req, rows, "order_nr", "asc", key_of=lambda f: (f.order_nr, f.id))
        return self._ok([self._field_v2(f) for f in page], {"next_cursor": nxt})

    def _h_field_v2(self, req: SandboxRequest, entity: str) -> SandboxResponse:
        with self.lock:
            f = self._field_by_key(entity, req.params["code"])
            if f is None:
                raise _not_found()
            return self._ok(self._field_v2(f))

    def _create_field(self, entity: str, body: Any, *, name_key: str) -> _Field:
        if not isinstance(body, dict):
            raise _bad("Request body must be a JSON object")
        name = body.get(name_key)
        ftype = body.get("field_type")
        if not isinstance(name, str) or not 1 <= len(name.strip()) <= 255:
            raise _bad(f"Validation failed: {name_key}: must be a string of 1 to 255 characters")
        if ftype not in _CREATABLE_TYPES:
            raise _bad(f"Validation failed: field_type: must be one of {', '.join(sorted(_CREATABLE_TYPES))}")
        labels: list[str] | None = None
        raw = body.get("options")
        if ftype in _OPTION_TYPES:
            if not isinstance(raw, list) or not raw:
                raise _bad("Validation failed: options: required for enum and set fields")
            labels = []
            for o in raw:
                label = o.get("label") if isinstance(o, dict) else o
                if not isinstance(label, str) or not label.strip():
                    raise _bad("Validation failed: options: every option needs a label")
                labels.append(label)
        description = body.get("description")
        with self.lock:
            return self._add_field(entity, None, name.strip(), str(ftype), options=labels,
                                   description=description if isinstance(description, str) else "")

    def _h_add_field_v2(self, req: SandboxRequest, entity: str) -> SandboxResponse:
        f = self._create_field(entity, self._body(req), name_key="field_name")
        return self._ok(self._field_v2(f))

    def _h_fields_v1(self, req: SandboxRequest, entity: str) -> SandboxResponse:
        start = self._int_arg(req, "start", 0)
        limit = self._int_arg(req, "limit", _DEFAULT_LIMIT)
        if start < 0 or not 1 <= limit <= _MAX_LIMIT:
            raise _bad(f"start must be 0 or more and limit between 1 and {_MAX_LIMIT}")
        with self.lock:
            fields = list(self._fields[entity])
        page = fields[start:start + limit]
        more = start + limit < len(fields)
        pagination: dict[str, Any] = {"start": start, "limit": limit, "more_items_in_collection": more}
        if more:
            pagination["next_start"] = start + limit
        return self._ok([self._field_v1(f) for f in page], {"pagination": pagination})

    def _h_add_field_v1(self, req: SandboxRequest, entity: str) -> SandboxResponse:
        f = self._create_field(entity, self._body(req), name_key="name")
        return self._ok(self._field_v1(f), status=201 if entity == "product" else 200)

    # -- request helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _body(req: SandboxRequest) -> Any:
        try:
            return loads(req.body) if req.body else None
        except (ValueError, UnicodeDecodeError):
            raise _bad("Request body is not valid JSON") from None

    @staticmethod
    def _int_arg(req: SandboxRequest, name: str, default: int) -> int:
        raw = req.arg(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise _bad(f"Validation failed: {name}: must be an integer") from None

    @staticmethod
    def _id_param(req: SandboxRequest, name: str = "id") -> int:
        raw = req.params.get(name, "")
        if not raw.isdigit():
            raise _bad(f"Validation failed: {name}: must be a positive integer")
        return int(raw)

    @staticmethod
    def _ids_arg(req: SandboxRequest, name: str) -> set[int] | None:
        raw = req.args(name)
        if not raw:
            return None
        if len(raw) > _MAX_IDS:
            raise _bad(f"Validation failed: {name}: at most {_MAX_IDS} ids")
        try:
            return {int(v) for v in raw}
        except ValueError:
            raise _bad(f"Validation failed: {name}: must be integers") from None

    @staticmethod
    def _bool_arg(req: SandboxRequest, name: str) -> bool:
        return (req.arg(name) or "").lower() in ("true", "1")

    @staticmethod
    def _encode_cursor(sort_by: str, value: Any, direction: str, ident: int) -> str:
        raw = json.dumps({"field": sort_by, "fieldValue": value, "sortDirection": direction, "id": ident},
                         separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @staticmethod
    def _decode_cursor(cursor: str, sort_by: str, direction: str) -> tuple[Any, int]:
        try:
            data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
            if data["field"] != sort_by or data["sortDirection"] != direction:
                raise ValueError("cursor of another query")
            return data["fieldValue"], int(data["id"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise _bad("Invalid cursor") from None

    def _keyset(self, req: SandboxRequest, rows: list[Any], sort_by: str, direction: str, *,
                key_of: Callable[[Any], tuple[Any, int]]) -> tuple[list[Any], str | None]:
        """One page of ``rows`` in (sort value, id) order after the request's cursor, and the next cursor."""
        limit = self._int_arg(req, "limit", _DEFAULT_LIMIT)
        if not 1 <= limit <= _MAX_LIMIT:
            raise _bad(f"Validation failed: limit: must be between 1 and {_MAX_LIMIT}")
        keyed = sorted(((key_of(rec), rec) for rec in rows), key=lambda kr: kr[0],
                       reverse=direction == "desc")
        cursor = req.arg("cursor")
        if cursor:
            value, last_id = self._decode_cursor(cursor, sort_by, direction)
            after = (value, last_id)
            if direction == "desc":
                keyed = [kr for kr in keyed if kr[0] < after]
            else:
                keyed = [kr for kr in keyed if kr[0] > after]
        page = keyed[:limit]
        nxt = None
        if len(keyed) > limit:
            (value, last_id), _ = page[-1]
            nxt = self._encode_cursor(sort_by, value, direction, last_id)
        return [rec for _, rec in page], nxt

    def _sorting(self, req: SandboxRequest, allowed: tuple[str, ...]) -> tuple[str, str]:
        sort_by = req.arg("sort_by") or "id"
        direction = (req.arg("sort_direction") or "asc").lower()
        if sort_by not in allowed:
            raise _bad(f"Validation failed: sort_by: must be one of {', '.join(allowed)}")
        if direction not in ("asc", "desc"):
            raise _bad("Validation failed: sort_direction: must be asc or desc")
        return sort_by, direction

    def _time_window(self, req: SandboxRequest) -> tuple[float | None, float | None]:
        bounds: list[float | None] = []
        for name in ("updated_since", "updated_until"):
            raw = req.arg(name)
            if raw is None or raw == "":
                bounds.append(None)
                continue
            value = parse_time(raw)
            if value is None:
                raise _bad(f"Validation failed: {name}: must be an RFC3339 date-time, e.g. 2025-01-01T10:20:00Z")
            bounds.append(value)
        return bounds[0], bounds[1]

    def _custom_filter(self, req: SandboxRequest) -> set[str] | None:
        keys = req.args("custom_fields")
        if not keys:
            return None
        if len(keys) > _MAX_CUSTOM_KEYS:
            raise _bad(f"Validation failed: custom_fields: at most {_MAX_CUSTOM_KEYS} keys")
        return set(keys)

    def _list_records(self, req: SandboxRequest, records: list[dict[str, Any]], sorts: tuple[str, ...],
                      render: Callable[[dict[str, Any]], dict[str, Any]]) -> SandboxResponse:
        sort_by, direction = self._sorting(req, sorts)
        since, until = self._time_window(req)
        rows = [r for r in records if (since is None or r["update_time"] >= since)
                and (until is None or r["update_time"] < until)]
        page, nxt = self._keyset(req, rows, sort_by, direction,
                                 key_of=lambda r: (r[sort_by], r["id"]))
        return self._ok([render(r) for r in page], {"next_cursor": nxt})

    # -- custom field values ---------------------------------------------------------------------------
    def _render_custom(self, entity: str, values: Mapping[str, Any], only: set[str] | None,
                       labels: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in self._fields[entity]:
            if not f.custom or (only is not None and f.key not in only):
                continue
            value = values.get(f.key)
            if labels and value is not None and f.field_type == "enum":
                label = next((o["label"] for o in f.options or [] if o["id"] == value), None)
                value = {"id": value, "label": label}
            elif labels and value is not None and f.field_type == "set":
                value = [{"id": v, "label": next((o["label"] for o in f.options or [] if o["id"] == v), None)}
                         for v in value]
            out[f.key] = value
        return out

    def _coerce_custom(self, entity: str, values: Any) -> dict[str, Any]:
        if not isinstance(values, dict):
            raise _bad("Validation failed: custom_fields: must be an object")
        out: dict[str, Any] = {}
        for key, value in values.items():
            f = self._field_by_key(entity, key)
            if f is None or not f.custom:
                raise _bad(f"Validation failed: custom_fields.{key}: unknown custom field")
            out[key] = self._coerce_value(f, value)
        return out

    def _coerce_value(self, f: _Field, value: Any) -> Any:
        where = f"custom_fields.{f.key}"
        if value is None:
            return None
        t = f.field_type
        if t in ("varchar", "varchar_auto", "text", "phone"):
            if not isinstance(value, str):
                raise _bad(f"Validation failed: {where}: must be a string")
            if t != "text" and len(value) > 255:
                raise _bad(f"Validation failed: {where}: at most 255 characters")
            return value
        if t == "double":
            number = _number(value)
            if number is None:
                raise _bad(f"Validation failed: {where}: must be a number")
            return number
        if t == "monetary":
            if isinstance(value, dict):
                number, currency = _number(value.get("value")), value.get("currency")
                if number is None or not (isinstance(currency, str) and re.fullmatch(r"[A-Z]{3}", currency)):
                    raise _bad(f"Validation failed: {where}: needs a numeric value and a currency code")
                return {"value": number, "currency": currency}
            number = _number(value)
            if number is None:
                raise _bad(f"Validation failed: {where}: must be a number")
            return {"value": number, "currency": "EUR"}
        if t == "date":
            if not (isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value)):
                raise _bad(f"Validation failed: {where}: must be a date YYYY-MM-DD")
            try:
                dt.date.fromisoformat(value)
            except ValueError:
                raise _bad(f"Validation failed: {where}: must be a date YYYY-MM-DD") from None
            return value
        if t == "time":
            if not (isinstance(value, str) and re.fullmatch(r"\d{2}:\d{2}(:\d{2})?", value)):
                raise _bad(f"Validation failed: {where}: must be a time HH:MM:SS")
            return value
        ids = {o["id"] for o in f.options or []}
        if t == "enum":
            if isinstance(value, bool) or not isinstance(value, int) or value not in ids:
                raise _bad(f"Validation failed: {where}: must be the id of one of the field's options")
            return value
        if t == "set":
            if not isinstance(value, list) or not value:
                raise _bad(f"Validation failed: {where}: must be a non-empty array of option ids (null clears)")
            if any(isinstance(v, bool) or not isinstance(v, int) or v not in ids for v in value):
                raise _bad(f"Validation failed: {where}: unknown option id")
            return list(value)
        return value

    # -- deals -------------------------------------------------------------------------------------------
    def _deal_v2(self, d: dict[str, Any], only: set[str] | None = None, labels: bool = False) -> dict[str, Any]:
        won, lost = d.get("won_time"), d.get("lost_time")
        close = won if d["status"] == "won" else lost if d["status"] == "lost" else None
        status = "deleted" if d["is_deleted"] else d["status"]
        return {
            "id": d["id"], "title": d["title"], "creator_user_id": d["creator_user_id"], "owner_id": d["owner_id"],
            "value": d["value"], "person_id": d["person_id"], "org_id": d["org_id"], "stage_id": d["stage_id"],
            "pipeline_id": d["pipeline_id"], "currency": d["currency"], "archive_time": iso(d.get("archive_time")),
            "add_time": iso(d["add_time"]), "update_time": iso(d["update_time"]),
            "stage_change_time": iso(d.get("stage_change_time")), "status": status,
            "is_archived": d["is_archived"], "is_deleted": d["is_deleted"], "probability": d.get("probability"),
            "lost_reason": d.get("lost_reason"), "visible_to": d.get("visible_to", 3), "close_time": iso(close),
            "won_time": iso(won), "lost_time": iso(lost),
            "local_won_date": (iso(won) or "")[:10] or None, "local_lost_date": (iso(lost) or "")[:10] or None,
            "local_close_date": (iso(close) or "")[:10] or None,
            "expected_close_date": d.get("expected_close_date"), "label_ids": list(d.get("label_ids") or []),
            "origin": d.get("origin"), "origin_id": d.get("origin_id"), "channel": d.get("channel"),
            "channel_id": d.get("channel_id"), "acv": None, "arr": None, "mrr": None,
            "custom_fields": self._render_custom("deal", d["custom_fields"], only, labels),
        }

    def _visible_deal(self, d: dict[str, Any], statuses: set[str], archived: bool, now: float) -> bool:
        if d["is_archived"] != archived:
            return False
        if d["is_deleted"]:
            return "deleted" in statuses and (d.get("deleted_time") or 0) >= now - _DELETED_VISIBLE_S
        return d["status"] in statuses

    def _h_list_deals(self, req: SandboxRequest, *, archived: bool) -> SandboxResponse:
        raw_status = req.args("status")
        if any(s not in _STATUSES for s in raw_status):
            raise _bad("Validation failed: status: must be open, won, lost or deleted")
        statuses = set(raw_status) if raw_status else {"open", "won", "lost"}
        ids = self._ids_arg(req, "ids")
        filters = {}
        for name in ("owner_id", "person_id", "org_id", "pipeline_id", "stage_id"):
            if req.arg(name):
                filters[name] = self._int_arg(req, name, 0)
        only = self._custom_filter(req)
        labels = self._bool_arg(req, "include_option_labels")
        now = self.clock.now()
        with self.lock:
            deals = [d for d in self._deals.values() if self._visible_deal(d, statuses, archived, now)
                     and (ids is None or d["id"] in ids) and all(d[k] == v for k, v in filters.items())]
            return self._list_records(req, deals, ("id", "update_time", "add_time"),
                                      lambda d: self._deal_v2(d, only, labels))

    def _deal(self, deal_id: int) -> dict[str, Any]:
        d = self._deals.get(deal_id)
        if d is None:
            raise _not_found()
        return d

    def _h_get_deal(self, req: SandboxRequest) -> SandboxResponse:
        deal_id = self._id_param(req)
        only = self._custom_filter(req)
        labels = self._bool_arg(req, "include_option_labels")
        with self.lock:
            return self._ok(self._deal_v2(self._deal(deal_id), only, labels))

    _DEAL_WRITABLE = frozenset({"title", "owner_id", "person_id", "org_id", "pipeline_id", "stage_id", "value",
                                "currency", "status", "probability", "lost_reason", "visible_to",
                                "expected_close_date", "label_ids", "is_archived", "custom_fields"})

    def _apply_deal(self, d: dict[str, Any], body: Any) -> None:
        """Validate ``body`` fully, then apply it to deal ``d`` and bump ``update_time``."""
        if not isinstance(body, dict) or not body:
            raise _bad("Request body must be a non-empty JSON object")
        unknown = sorted(set(body) - self._DEAL_WRITABLE)
        if unknown:
            raise _bad(f"Validation failed: unknown parameter(s): {', '.join(unknown)}")
        changes: dict[str, Any] = {}
        for key, value in body.items():
            if key == "custom_fields":
                changes[key] = self._coerce_custom("deal", value)
            elif key == "title":
                if not isinstance(value, str) or not value.strip():
                    raise _bad("Validation failed: title: must be a non-empty string")
                changes[key] = value
            elif key == "value":
                number = _number(value)
                if number is None:
                    raise _bad("Validation failed: value: must be a number")
                changes[key] = number
            elif key == "currency":
                if not (isinstance(value, str) and re.fullmatch(r"[A-Z]{3}", value)):
                    raise _bad("Validation failed: currency: must be a 3-letter currency code")
                changes[key] = value
            elif key == "status":
                if value not in ("open", "won", "lost"):
                    raise _bad("Validation failed: status: must be open, won or lost")
                changes[key] = value
            elif key == "org_id":
                if value is not None and (not isinstance(value, int) or value not in self._orgs):
                    raise _bad("Validation failed: org_id: organization not found")
                changes[key] = value
            elif key == "person_id":
                if value is not None and (not isinstance(value, int) or value not in self._persons):
                    raise _bad("Validation failed: person_id: person not found")
                changes[key] = value
            elif key == "is_archived":
                if not isinstance(value, bool):
                    raise _bad("Validation failed: is_archived: must be a boolean")
                changes[key] = value
            elif key == "expected_close_date":
                if value is not None:
                    try:
                        dt.date.fromisoformat(str(value))
                    except ValueError:
                        raise _bad("Validation failed: expected_close_date: must be YYYY-MM-DD") from None
                changes[key] = value
            else:
                changes[key] = value
        now = math.floor(self.clock.now())
        before = self._webhook_before(d)
        for key, value in changes.items():
            if key == "custom_fields":
                d["custom_fields"].update(value)
            elif key == "status" and value != d["status"]:
                d["status"] = value
                d["won_time"] = now if value == "won" else None
                d["lost_time"] = now if value == "lost" else None
            elif key == "is_archived":
                d["is_archived"] = value
                d["archive_time"] = now if value else None
            elif key == "stage_id" and value != d["stage_id"]:
                d["stage_id"] = value
                d["stage_change_time"] = now
            else:
                d[key] = value
        d["update_time"] = now
        self._webhook_deal_event("change", d, before)

    def _h_patch_deal(self, req: SandboxRequest) -> SandboxResponse:
        deal_id = self._id_param(req)
        body = self._body(req)
        with self.lock:
            d = self._deal(deal_id)
            if d["is_deleted"]:
                raise _not_found()
            self._apply_deal(d, body)
            return self._ok(self._deal_v2(d))

    # -- deal products -----------------------------------------------------------------------------------
    @staticmethod
    def _deal_product_v2(p: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": p["id"], "sum": p["sum"], "tax": p["tax"], "deal_id": p["deal_id"], "name": p["name"],
            "product_id": p["product_id"], "product_variation_id": None, "order_nr": p["order_nr"],
            "add_time": iso(p["add_time"]), "update_time": iso(p["update_time"]), "comments": p["comments"],
            "currency": p["currency"], "discount": p["discount"], "quantity": p["quantity"],
            "item_price": p["item_price"], "tax_method": p["tax_method"], "discount_type": p["discount_type"],
            "is_enabled": p["is_enabled"], "billing_frequency": "one-time", "billing_frequency_cycles": None,
            "billing_start_date": None,
        }

    def _h_deals_products(self, req: SandboxRequest) -> SandboxResponse:
        deal_ids = self._ids_arg(req, "deal_ids")
        if deal_ids is None:
            raise _bad("Validation failed: deal_ids: required")
        sort_by, direction = self._sorting(req, ("id", "deal_id", "add_time", "update_time", "order_nr"))
        with self.lock:
            rows = [p for p in self._deal_products.values() if p["deal_id"] in deal_ids]
            page, nxt = self._keyset(req, rows, sort_by, direction,
                                     key_of=lambda p: (p[sort_by], p["id"]))
            return self._ok([self._deal_product_v2(p) for p in page], {"next_cursor": nxt})

    def _h_deal_products(self, req: SandboxRequest) -> SandboxResponse:
        deal_id = self._id_param(req)
        sort_by, direction = self._sorting(req, ("id", "add_time", "update_time", "order_nr"))
        with self.lock:
            self._deal(deal_id)
            rows = [p for p in self._deal_products.values() if p["deal_id"] == deal_id]
            page, nxt = self._keyset(req, rows, sort_by, direction,
                                     key_of=lambda p: (p[sort_by], p["id"]))
            return self._ok([self._deal_product_v2(p) for p in page], {"next_cursor": nxt})

    # -- organizations, persons, products --------------------------------------------------------------
    def _org_v2(self, o: dict[str, Any], only: set[str] | None = None, labels: bool = False) -> dict[str, Any]:
        return {
            "id": o["id"], "name": o["name"], "owner_id": o["owner_id"], "add_time": iso(o["add_time"]),
            "update_time": iso(o["update_time"]), "is_deleted": o["is_deleted"], "visible_to": 3,
            "address": dict(o["address"]) if o.get("address") else None, "label_ids": [],
            "website": o.get("website"), "linkedin": None, "industry": None, "annual_revenue": None,
            "employee_count": None,
            "custom_fields": self._render_custom("organization", o["custom_fields"], only, labels),
        }

    def _h_list_orgs(self, req: SandboxRequest) -> SandboxResponse:
        ids = self._ids_arg(req, "ids")
        owner = self._int_arg(req, "owner_id", 0)
        only = self._custom_filter(req)
        labels = self._bool_arg(req, "include_option_labels")
        with self.lock:
            orgs = [o for o in self._orgs.values() if not o["is_deleted"] and (ids is None or o["id"] in ids)
                    and (not owner or o["owner_id"] == owner)]
            return self._list_records(req, orgs, ("id", "update_time", "add_time"),
                                      lambda o: self._org_v2(o, only, labels))

    def _h_get_org(self, req: SandboxRequest) -> SandboxResponse:
        org_id = self._id_param(req)
        with self.lock:
            o = self._orgs.get(org_id)
            if o is None:
                raise _not_found()
            return self._ok(self._org_v2(o, self._custom_filter(req), self._bool_arg(req, "include_option_labels")))

    _ORG_WRITABLE = frozenset({"name", "owner_id", "visible_to", "label_ids", "address", "website", "linkedin",
                               "industry", "annual_revenue", "employee_count", "custom_fields"})

    def _h_patch_org(self, req: SandboxRequest) -> SandboxResponse:
        org_id = self._id_param(req)
        body = self._body(req)
        if not isinstance(body, dict) or not body:
            raise _bad("Request body must be a non-empty JSON object")
        unknown = sorted(set(body) - self._ORG_WRITABLE)
        if unknown:
            raise _bad(f"Validation failed: unknown parameter(s): {', '.join(unknown)}")
        with self.lock:
            o = self._orgs.get(org_id)
            if o is None or o["is_deleted"]:
                raise _not_found()
            custom = self._coerce_custom("organization", body["custom_fields"]) if "custom_fields" in body else {}
            if "name" in body and not (isinstance(body["name"], str) and body["name"].strip()):
                raise _bad("Validation failed: name: must be a non-empty string")
            if "address" in body and body["address"] is not None and not isinstance(body["address"], dict):
                raise _bad("Validation failed: address: must be an object")
            for key, value in body.items():
                if key != "custom_fields":
                    o[key] = value
            o["custom_fields"].update(custom)
            o["update_time"] = math.floor(self.clock.now())
            return self._ok(self._org_v2(o))

    def _person_v2(self, p: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": p["id"], "name": p["name"], "first_name": p["first_name"], "last_name": p["last_name"],
            "owner_id": p["owner_id"], "org_id": p["org_id"], "add_time": iso(p["add_time"]),
            "update_time": iso(p["update_time"]), "emails": [dict(e) for e in p["emails"]],
            "phones": [dict(e) for e in p["phones"]], "is_deleted": p["is_deleted"], "visible_to": 3,
            "label_ids": [], "picture_id": None, "job_title": p.get("job_title"),
            "custom_fields": self._render_custom("person", p.get("custom_fields", {}), None, False),
        }

    def _h_list_persons(self, req: SandboxRequest) -> SandboxResponse:
        ids = self._ids_arg(req, "ids")
        org = self._int_arg(req, "org_id", 0)
        with self.lock:
            persons = [p for p in self._persons.values() if not p["is_deleted"] and (ids is None or p["id"] in ids)
                       and (not org or p["org_id"] == org)]
            return self._list_records(req, persons, ("id", "update_time", "add_time"), self._person_v2)

    def _h_get_person(self, req: SandboxRequest) -> SandboxResponse:
        person_id = self._id_param(req)
        with self.lock:
            p = self._persons.get(person_id)
            if p is None:
                raise _not_found()
            return self._ok(self._person_v2(p))

    def _product_v2(self, p: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": p["id"], "name": p["name"], "code": p["code"], "description": p.get("description"),
            "unit": p.get("unit", ""), "tax": p["tax"], "category": p.get("category"), "is_linkable": True,
            "is_deleted": p["is_deleted"], "visible_to": 3, "owner_id": p["owner_id"],
            "add_time": iso(p["add_time"]), "update_time": iso(p["update_time"]), "billing_frequency": "one-time",
            "billing_frequency_cycles": None, "prices": [dict(x) for x in p["prices"]],
            "custom_fields": self._render_custom("product", p.get("custom_fields", {}), None, False),
        }

    def _h_list_products(self, req: SandboxRequest) -> SandboxResponse:
        ids = self._ids_arg(req, "ids")
        with self.lock:
            products = [p for p in self._products.values() if not p["is_deleted"] and (ids is None or p["id"] in ids)]
            return self._list_records(req, products, ("id", "name", "add_time", "update_time"), self._product_v2)

    def _h_get_product(self, req: SandboxRequest) -> SandboxResponse:
        product_id = self._id_param(req)
        with self.lock:
            p = self._products.get(product_id)
            if p is None:
                raise _not_found()
            return self._ok(self._product_v2(p))

    # -- pipelines, stages and activities ---------------------------------------------------------------
    def _install_activity_routes(self) -> None:
        v2 = "/api/v2"
        self._r("GET", f"{v2}/pipelines", self._h_list_pipelines)
        self._r("GET", f"{v2}/pipelines/{{id}}", self._h_get_pipeline)
        self._r("GET", f"{v2}/stages", self._h_list_stages)
        self._r("GET", f"{v2}/stages/{{id}}", self._h_get_stage)
        self._r("GET", f"{v2}/activities", self._h_list_activities)
        self._r("POST", f"{v2}/activities", self._h_add_activity)
        self._r("GET", f"{v2}/activities/{{id}}", self._h_get_activity)
        self._r("DELETE", f"{v2}/activities/{{id}}", self._h_delete_activity)
        self._r("GET", "/v1/activityTypes", self._h_activity_types)

    def _install_activity_fields(self, at: int) -> None:
        types = [{"id": tid, "label": name} for tid, _, name in _ACTIVITY_TYPES]
        for key, name, ftype in (("id", "ID", "int"), ("subject", "Subject", "varchar"), ("type", "Type",
                                 "varchar_options"), ("owner_id", "Assigned to user", "user"),
                                 ("due_date", "Due date", "date"), ("due_time", "Due time", "time"),
                                 ("duration", "Duration", "time"), ("deal_id", "Deal", "deal"),
                                 ("person_id", "Contact person", "people"), ("org_id", "Organization", "org"),
                                 ("done", "Done", "boolean"), ("add_time", "Add time", "date"),
                                 ("update_time", "Update time", "date"), ("marked_as_done_time",
                                 "Marked as done time", "date"), ("note", "Note", "text")):
            self._add_field("activity", key, name, ftype, at=at, builtin_options=types if key == "type" else None)

    def _pipelines_v2(self) -> list[dict[str, Any]]:
        at = _seconds(_COMPANY_EPOCH)
        return [{"id": pid, "name": name, "order_nr": order, "is_deleted": False, "is_deal_probability_enabled": True,
                 "add_time": at, "update_time": at} for order, (pid, name, _stages) in enumerate(_PIPELINES, start=1)]

    def _stages_v2(self) -> list[dict[str, Any]]:
        at = _seconds(_COMPANY_EPOCH)
        return [{"id": sid, "order_nr": order, "name": name, "is_deleted": False, "deal_probability": probability,
                 "pipeline_id": pid, "is_deal_rot_enabled": False, "days_to_rotten": None, "add_time": at,
                 "update_time": at}
                for pid, _name, stages in _PIPELINES for order, (sid, name, probability) in enumerate(stages, start=1)]

    @staticmethod
    def _times(row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "add_time": iso(row["add_time"]), "update_time": iso(row["update_time"])}

    def _h_list_pipelines(self, req: SandboxRequest) -> SandboxResponse:
        sort_by, direction = self._sorting(req, ("id", "update_time", "add_time"))
        page, nxt = self._keyset(req, self._pipelines_v2(), sort_by, direction, key_of=lambda r: (r[sort_by], r["id"]))
        return self._ok([self._times(r) for r in page], {"next_cursor": nxt})

    def _h_get_pipeline(self, req: SandboxRequest) -> SandboxResponse:
        pipeline_id = self._id_param(req)
        row = next((r for r in self._pipelines_v2() if r["id"] == pipeline_id), None)
        if row is None:
            raise _not_found()
        return self._ok(self._times(row))

    def _h_list_stages(self, req: SandboxRequest) -> SandboxResponse:
        sort_by, direction = self._sorting(req, ("id", "update_time", "add_time", "order_nr"))
        rows = self._stages_v2()
        if req.arg("pipeline_id"):
            pipeline_id = self._int_arg(req, "pipeline_id", 0)
            rows = [r for r in rows if r["pipeline_id"] == pipeline_id]
        page, nxt = self._keyset(req, rows, sort_by, direction, key_of=lambda r: (r[sort_by], r["id"]))
        return self._ok([self._times(r) for r in page], {"next_cursor": nxt})

    def _h_get_stage(self, req: SandboxRequest) -> SandboxResponse:
        stage_id = self._id_param(req)
        row = next((r for r in self._stages_v2() if r["id"] == stage_id), None)
        if row is None:
            raise _not_found()
        return self._ok(self._times(row))

    def _h_activity_types(self, req: SandboxRequest) -> SandboxResponse:
        at = _v1_time(_seconds(_COMPANY_EPOCH))
        return self._ok([{"id": tid, "order_nr": tid, "name": name, "key_string": key, "icon_key": key,
                          "active_flag": True, "color": None, "is_custom_flag": False, "add_time": at,
                          "update_time": at} for tid, key, name in _ACTIVITY_TYPES])

    @staticmethod
    def _activity_v2(a: dict[str, Any], attendees: bool = False) -> dict[str, Any]:
        out = {
            "id": a["id"], "subject": a["subject"], "type": a["type"], "owner_id": a["owner_id"],
            "creator_user_id": a["creator_user_id"], "is_deleted": a["is_deleted"], "add_time": iso(a["add_time"]),
            "update_time": iso(a["update_time"]), "deal_id": a["deal_id"], "lead_id": None,
            "person_id": a["person_id"], "org_id": a["org_id"], "project_id": None, "due_date": a["due_date"],
            "due_time": a["due_time"], "duration": a["duration"], "busy": a["busy"], "done": a["done"],
            "marked_as_done_time": iso(a.get("marked_as_done_time")), "location": None,
            "participants": [{"person_id": a["person_id"], "primary": True}] if a["person_id"] else [],
            "conference_meeting_client": None, "conference_meeting_url": None, "conference_meeting_id": None,
            "public_description": None, "priority": None, "note": a.get("note"),
        }
        if attendees:
            out["attendees"] = []
        return out

    def _h_list_activities(self, req: SandboxRequest) -> SandboxResponse:
        if req.arg("filter_id"):
            raise _bad("Validation failed: filter_id: no such filter")
        ids = self._ids_arg(req, "ids")
        filters = {name: self._int_arg(req, name, 0) for name in ("owner_id", "deal_id", "person_id", "org_id")
                   if req.arg(name)}
        done_arg = (req.arg("done") or "").lower()
        if done_arg not in ("", "true", "false", "1", "0"):
            raise _bad("Validation failed: done: must be a boolean")
        done = None if done_arg == "" else done_arg in ("true", "1")
        include = {f for raw in req.args("include_fields") for f in raw.split(",") if f}
        if include - {"attendees"}:
            raise _bad("Validation failed: include_fields: must be one of attendees")
        lead = req.arg("lead_id")
        with self.lock:
            rows = [a for a in self._activities.values() if not a["is_deleted"] and (ids is None or a["id"] in ids)
                    and all(a[k] == v for k, v in filters.items()) and (done is None or a["done"] == done)
                    and (not lead or a.get("lead_id") == lead)]
            return self._list_records(req, rows, _ACTIVITY_SORTS,
                                      lambda a: self._activity_v2(a, "attendees" in include))

    def _h_get_activity(self, req: SandboxRequest) -> SandboxResponse:
        activity_id = self._id_param(req)
        with self.lock:
            a = self._activities.get(activity_id)
            if a is None:
                raise _not_found()
            return self._ok(self._activity_v2(a))

    def _h_add_activity(self, req: SandboxRequest) -> SandboxResponse:
        body = self._body(req)
        if not isinstance(body, dict):
            raise _bad("Request body must be a JSON object")
        kind = body.get("type", "task")
        if kind not in {key for _, key, _ in _ACTIVITY_TYPES}:
            raise _bad("Validation failed: type: unknown activity type")
        with self.lock:
            deal_id = body.get("deal_id")
            deal = self._deals.get(deal_id) if isinstance(deal_id, int) and not isinstance(deal_id, bool) else None
            if deal_id is not None and (deal is None or deal["is_deleted"]):
                raise _bad("Validation failed: deal_id: deal not found")
            now = math.floor(self.clock.now())
            owner = body.get("owner_id") or (deal["owner_id"] if deal else (self._users[0]["id"] if self._users else 1))
            names = {key: name for _, key, name in _ACTIVITY_TYPES}
            a = self._new_activity(
                kind=str(kind), subject=str(body.get("subject") or names[kind]), owner_id=owner, deal=deal, at=now,
                done=body.get("done") is True, due_date=str(body.get("due_date") or _utc(now).date().isoformat()),
                due_time=str(body.get("due_time") or ""), duration=str(body.get("duration") or ""),
                note=body.get("note"))
            return self._ok(self._activity_v2(a))

    def _h_delete_activity(self, req: SandboxRequest) -> SandboxResponse:
        activity_id = self._id_param(req)
        with self.lock:
            a = self._activities.get(activity_id)
            if a is None or a["is_deleted"]:
                raise _not_found()
            a["is_deleted"] = True
            a["update_time"] = math.floor(self.clock.now())
            return self._ok({"id": activity_id})

    def _new_activity(self, *, kind: str, subject: str, owner_id: int, deal: dict[str, Any] | None, at: int,
                      done: bool, due_date: str, due_time: str = "", duration: str = "",
                      note: str | None = None) -> dict[str, Any]:
        aid = self._new_id("activity")
        a = self._activities[aid] = {
            "id": aid, "subject": subject, "type": kind, "owner_id": owner_id, "creator_user_id": owner_id,
            "is_deleted": False, "add_time": at, "update_time": at, "deal_id": deal["id"] if deal else None,
            "person_id": deal["person_id"] if deal else None, "org_id": deal["org_id"] if deal else None,
            "due_date": due_date, "due_time": due_time, "duration": duration, "busy": kind == "meeting",
            "done": done, "marked_as_done_time": at if done else None, "note": note,
        }
        return a

    def _seed_activities(self, book: Book) -> None:
        """Every deal's sales activities (:meth:`Book.activities`) on the deal, its person and organization, done.

        Created after every other record of the book, so that seeding them moves no other record's id.
        """
        deal_ids = self._book_ids["deals"]
        for d in book.deals:
            deal = self._deals[deal_ids[d.id]]
            for activity in book.activities(d):
                self._seed_activity(deal, activity)

    def _seed_activity(self, deal: dict[str, Any], activity: BookActivity) -> None:
        at = _seconds(activity.at)
        minutes = activity.duration_minutes
        self._new_activity(kind=activity.kind, subject=activity.subject, owner_id=deal["owner_id"], deal=deal, at=at,
                           done=True, due_date=_utc(at).date().isoformat(), due_time=_utc(at).strftime("%H:%M:%S"),
                           duration=f"{minutes // 60:02d}:{minutes % 60:02d}:00" if minutes else "")

    def activity_counts_of(self, deal_id: int) -> dict[str, int]:
        """The live activities of one deal, counted by type (call, meeting, email, task; zeros left out)."""
        with self.lock:
            return self._activity_counts().get(deal_id, {})

    def _activity_counts(self) -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = {}
        for a in self._activities.values():
            if a["is_deleted"] or a["deal_id"] is None:
                continue
            counts = out.setdefault(a["deal_id"], {})
            counts[a["type"]] = counts.get(a["type"], 0) + 1
        return out

    def activities_of(self, deal_id: int) -> list[dict[str, Any]]:
        """The v2 rendering of every live activity of one deal."""
        with self.lock:
            return [self._activity_v2(a) for a in self._activities.values()
                    if a["deal_id"] == deal_id and not a["is_deleted"]]

    # -- sandbox administration ------------------------------------------------------------------------
    def admin(self, req: SandboxRequest) -> SandboxResponse:
        """Sandbox-only endpoints for tests in other processes.

        ``GET /_sandbox/deals``: every deal not deleted as ``{id, book_id, name, won, closed, stage, pipeline,
        amount, currency, updated_at, archived}`` (the HubSpot sandbox's shape); ``PATCH /_sandbox/deals/{id}``
        with ``{"properties": {...}}`` (a v2 deal body): a user's edit; ``POST /_sandbox/authorize``: a refresh
        token for the OAuth client; ``GET /_sandbox/stats``.
        """
        path = req.path.rstrip("/")
        if path.startswith("/_sandbox/webhooks"):
            return self._webhook_admin(req)
        if req.method == "GET" and path == "/_sandbox/deals":
            return self._json(200, self.deals_snapshot())
        m = re.fullmatch(r"/_sandbox/deals/(\d+)", path)
        if req.method == "PATCH" and m:
            try:
                body = self._body(req) or {}
                props = body.get("properties") if isinstance(body, dict) else None
                deal = self.modify_deal(int(m.group(1)), **(props or {}))
            except KeyError:
                return self._json(404, {"message": f"no deal {m.group(1)}"})
            except (_ApiError, ValueError) as exc:
                return self._json(400, {"message": str(exc)})
            return self._json(200, deal)
        if req.method == "POST" and path == "/_sandbox/authorize":
            try:
                return self._json(200, {"refresh_token": self.issue_refresh_token()})
            except ValueError as exc:
                return self._json(400, {"message": str(exc)})
        return super().admin(req)

    def load(self, path: Path) -> bool:
        with self.lock:
            fields, next_ids = self._fields, self._next_ids
            loaded = super().load(path)
            # State saved before a kind of record existed here (activities): it starts empty.
            for entity, rows in fields.items():
                self._fields.setdefault(entity, rows)
            for kind, n in next_ids.items():
                self._next_ids.setdefault(kind, n)
            return loaded

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        with self.lock:
            out["objects"] = {
                "deals": sum(1 for d in self._deals.values() if not d["is_deleted"]),
                "organizations": len(self._orgs), "persons": len(self._persons),
                "products": len(self._products), "deal_products": len(self._deal_products),
                "activities": sum(1 for a in self._activities.values() if not a["is_deleted"]),
            }
        out["rate_limited"] = self.served_429
        out["quota_refused"] = self.quota_refused
        out["tokens_charged"] = self.tokens_charged
        out["tokens_left"] = self.tokens_left()
        by_auth: dict[str, int] = {}
        for entry in list(self.access_log):
            by_auth[str(entry["auth"])] = by_auth.get(str(entry["auth"]), 0) + 1
        out["requests_by_auth"] = by_auth
        return out

    # -- seeding -----------------------------------------------------------------------------------------
    def load_book(self, book: Book) -> None:
        """Create the book's users, products, organizations, persons, deals and deal products."""
        rng = random.Random(f"pipedrive-load-{self.seed}")
        with self.lock:
            users: dict[str, int] = {}
            for i, email in enumerate(sorted({d.owner for d in book.deals})):
                uid = 24_117_001 + i * 13
                users[email] = uid
                self._users.append({"id": uid, "email": email, "name": email.split("@")[0].replace(".", " ").title()})
            admin = min(users.values()) if users else 1
            start = _seconds(_COMPANY_EPOCH)
            products: dict[str, int] = {}
            for p in book.products:
                pid = self._new_id("product")
                usd = round_money(p.unit_price * _USD_PER_EUR, "USD")
                self._products[pid] = {
                    "id": pid, "name": p.name, "code": p.sku, "description": p.name, "unit": "", "tax": p.tax_rate,
                    "category": None, "is_deleted": False, "owner_id": admin, "add_time": start - 400 * 86_400,
                    "update_time": start - 300 * 86_400, "custom_fields": {},
                    "prices": [{"product_id": pid, "price": p.unit_price, "currency": "EUR", "cost": Decimal(0),
                                "direct_cost": None, "notes": ""},
                               {"product_id": pid, "price": usd, "currency": "USD", "cost": Decimal(0),
                                "direct_cost": None, "notes": ""}],
                }
                products[p.sku] = pid
            names = {p.sku: p.name for p in book.products}
            keys = {f.name: f.key for f in self._fields["organization"] if f.custom}
            org_source = next(f for f in self._fields["organization"] if f.custom and f.name == "Acquisition source")
            org_source_ids = {o["label"]: o["id"] for o in org_source.options or []}
            first_deal: dict[str, int] = {}
            for d in book.deals:
                first_deal[d.company_id] = min(first_deal.get(d.company_id, _seconds(d.created_at)),
                                               _seconds(d.created_at))
            orgs: dict[str, int] = {}
            persons: dict[str, int] = {}
            for c in book.companies:
                created = first_deal.get(c.id, start) - rng.randint(1, 200) * 86_400 - rng.randrange(86_400)
                oid = self._new_id("organization")
                number, _, route = c.address.partition(" ")
                if not number.isdigit():
                    number, route = "", c.address
                country = COUNTRY_NAMES.get(c.country, c.country)
                custom = {keys["VAT number"]: c.vat_number, keys["SIREN"]: c.siren, keys["SIRET"]: c.siret,
                          keys["Billing email"]: c.email, keys["Billing currency"]: c.currency,
                          org_source.key: org_source_ids.get(c.acquisition_source)}
                self._orgs[oid] = {
                    "id": oid, "name": c.name, "owner_id": admin, "add_time": created,
                    "update_time": created + rng.randint(1, 60) * 86_400, "is_deleted": False,
                    "address": {"value": f"{c.address}, {c.postal_code} {c.city}, {country}", "country": country,
                                "admin_area_level_1": None, "admin_area_level_2": None, "locality": c.city,
                                "sublocality": None, "route": route, "street_number": number or None,
                                "subpremise": None, "postal_code": c.postal_code},
                    "website": f"https://www.{c.domain}" if c.domain else None,
                    "custom_fields": {k: v for k, v in custom.items() if v},
                }
                orgs[c.id] = oid
                self._book_ids["organizations"][c.id] = oid
                first = rng.choice(_FIRST_NAMES)
                last = c.name.split()[1] if len(c.name.split()) > 1 else c.name
                pid = self._new_id("person")
                self._persons[pid] = {
                    "id": pid, "name": f"{first} {last}", "first_name": first, "last_name": last,
                    "owner_id": admin, "org_id": oid, "add_time": created, "update_time": created + 86_400,
                    "emails": [{"value": c.email, "primary": True, "label": "work"}] if c.email else [],
                    "phones": [], "is_deleted": False, "job_title": "Direction", "custom_fields": {},
                }
                persons[c.id] = pid
                self._book_ids["persons"][c.id] = pid
            source_key = next(f for f in self._fields["deal"] if f.custom and f.name == "Acquisition source")
            source_ids = {o["label"]: o["id"] for o in source_key.options or []}
            for d in book.deals:
                self._insert_deal(d, rng, users, orgs, persons, products, names, source_key.key, source_ids)
            self._seed_activities(book)

    def _insert_deal(self, d: BookDeal, rng: random.Random, users: Mapping[str, int], orgs: Mapping[str, int],
                     persons: Mapping[str, int], products: Mapping[str, int], names: Mapping[str, str],
                     source_key: str, source_ids: Mapping[str, int]) -> None:
        pipeline, _, stages = _PIPELINES[1] if rng.random() < 0.35 else _PIPELINES[0]
        created, updated = _seconds(d.created_at), _seconds(d.updated_at)
        status = "won" if d.is_won else "lost" if d.stage == "lost" else "open"
        closed_at: int | None = None
        if status != "open" and d.close_date is not None:
            day = _seconds(dt.datetime.combine(d.close_date, dt.time(9), dt.UTC))
            closed_at = max(min(day + rng.randrange(8 * 3600), updated), created)
        deal_id = self._new_id("deal")
        stage_at = min(created + (updated - created) // 2, updated)
        self._deals[deal_id] = {
            "id": deal_id, "title": d.name, "creator_user_id": users[d.owner], "owner_id": users[d.owner],
            "value": d.amount, "currency": d.currency, "person_id": persons[d.company_id],
            "org_id": orgs[d.company_id], "pipeline_id": pipeline, "stage_id": stages[_STAGE_INDEX[d.stage]][0],
            "status": status, "won_time": closed_at if status == "won" else None,
            "lost_time": closed_at if status == "lost" else None,
            "lost_reason": "Budget" if status == "lost" else None,
            "expected_close_date": d.close_date.isoformat() if status == "open" and d.close_date else None,
            "add_time": created, "update_time": updated, "stage_change_time": stage_at,
            "is_archived": False, "archive_time": None, "is_deleted": False, "deleted_time": None,
            "probability": self._deal_probability(d), "visible_to": 3, "label_ids": [],
            "origin": "Import" if rng.random() < 0.2 else "ManuallyCreated", "origin_id": None,
            "channel": None, "channel_id": None,
            "custom_fields": {source_key: source_ids.get(d.acquisition_source)},
            "book_id": d.id,
        }
        self._book_ids["deals"][d.id] = deal_id
        for pos, ln in enumerate(effective_lines(d), start=1):
            aid = self._new_id("deal_product")
            gross = ln.quantity * ln.unit_price
            product_name = names.get(ln.sku, ln.description)
            self._deal_products[aid] = {
                "id": aid, "deal_id": deal_id, "product_id": products[ln.sku], "name": product_name,
                "order_nr": pos, "comments": ln.description if ln.description != product_name else "",
                "currency": d.currency, "quantity": ln.quantity, "item_price": ln.unit_price,
                "discount": ln.discount_percent, "discount_type": "percentage", "tax": ln.tax_rate,
                "tax_method": "exclusive", "is_enabled": True,
                "sum": round_money(gross * (Decimal(100) - ln.discount_percent) / Decimal(100), d.currency),
                "add_time": created, "update_time": created,
            }

    def _deal_probability(self, d: BookDeal) -> Decimal | None:
        """A probability set on the deal itself (percent), for about a quarter of the open deals; None otherwise,
        when the stage's applies. Drawn from a stream of its own per deal, leaving every other draw as it was."""
        if d.is_closed:
            return None
        rng = random.Random(f"pipedrive-probability-{self.seed}-{d.id}")
        return Decimal(rng.choice((15, 35, 60, 85))) if rng.random() < 0.25 else None

    # -- inspection and user actions for tests ----------------------------------------------------------
    def deal_ids_by_book_id(self) -> dict[str, int]:
        """Book deal id (``D00001``) -> Pipedrive deal id."""
        with self.lock:
            return dict(self._book_ids["deals"])

    def org_ids_by_book_id(self) -> dict[str, int]:
        with self.lock:
            return dict(self._book_ids["organizations"])

    def deal_ids(self, *, include_deleted: bool = False) -> list[int]:
        with self.lock:
            return sorted(i for i, d in self._deals.items() if include_deleted or not d["is_deleted"])

    def deal(self, deal_id: int) -> dict[str, Any]:
        """The v2 rendering of one deal (deleted and archived ones included)."""
        with self.lock:
            return self._deal_v2(self._deals[deal_id])

    def organization(self, org_id: int) -> dict[str, Any]:
        with self.lock:
            return self._org_v2(self._orgs[org_id])

    def deal_products_of(self, deal_id: int) -> list[dict[str, Any]]:
        with self.lock:
            return [self._deal_product_v2(p) for p in sorted(self._deal_products.values(), key=lambda p: p["id"])
                    if p["deal_id"] == deal_id]

    def deals_snapshot(self) -> list[dict[str, Any]]:
        """Every deal not deleted, in the HubSpot sandbox's ``/_sandbox/deals`` shape (amounts as strings)."""
        with self.lock:
            activities = self._activity_counts()
            return [{
                "id": str(d["id"]), "book_id": d.get("book_id"), "name": d["title"], "won": d["status"] == "won",
                "closed": d["status"] in ("won", "lost"), "stage": str(d["stage_id"]),
                "pipeline": str(d["pipeline_id"]), "amount": format(d["value"], "f"), "currency": d["currency"],
                "created_at": iso(d["add_time"]), "updated_at": iso(d["update_time"]), "archived": d["is_archived"],
                "activities": activities.get(d["id"], {}),
            } for d in sorted(self._deals.values(), key=lambda d: d["id"]) if not d["is_deleted"]]

    def modify_deal(self, deal_id: int, **fields: Any) -> dict[str, Any]:
        """Change a deal as a user would (validated like ``PATCH /api/v2/deals/{id}``, ``update_time`` bumped)."""
        with self.lock:
            d = self._deals[deal_id]
            self._apply_deal(d, fields)
            return self._deal_v2(d)

    def modify_deal_product(self, attachment_id: int, **fields: Any) -> dict[str, Any]:
        """Change a product line of a deal (quantity, item_price, discount, discount_type, tax, tax_method,
        is_enabled, comments); the deal's ``update_time`` is bumped as Pipedrive does."""
        allowed = {"quantity", "item_price", "discount", "discount_type", "tax", "tax_method", "is_enabled",
                   "comments"}
        if set(fields) - allowed:
            raise ValueError(f"unknown deal product fields: {sorted(set(fields) - allowed)}")
        with self.lock:
            p = self._deal_products[attachment_id]
            p.update(fields)
            now = math.floor(self.clock.now())
            p["update_time"] = now
            self._deals[p["deal_id"]]["update_time"] = now
            return self._deal_product_v2(p)

    def touch(self, deal_ids: Iterable[int], at: dt.datetime | None = None) -> int:
        """Set ``update_time`` of ``deal_ids`` to one second (default: now); returns it as epoch seconds."""
        with self.lock:
            second = _seconds(at) if at is not None else math.floor(self.clock.now())
            for i in deal_ids:
                self._deals[i]["update_time"] = second
            return second

    def archive_deal(self, deal_id: int) -> None:
        with self.lock:
            self._apply_deal(self._deals[deal_id], {"is_archived": True})

    def delete_deal(self, deal_id: int) -> None:
        """Delete a deal as a user would: it leaves the default listings and shows with ``status=deleted``."""
        with self.lock:
            d = self._deals[deal_id]
            now = math.floor(self.clock.now())
            before = self._webhook_before(d)
            d["is_deleted"] = True
            d["deleted_time"] = now
            d["update_time"] = now
            self._webhook_deal_event("delete", d, before)

    def fields_of(self, entity: str) -> list[dict[str, Any]]:
        """The v2 rendering of every field of ``entity`` (deal, organization, person, product)."""
        with self.lock:
            return [self._field_v2(f) for f in self._fields[entity]]

    def new_api_token(self) -> str:
        """Another valid API token (a second user's), e.g. to test per-token burst windows."""
        with self.lock:
            token = f"sandbox-{self._token_rng.getrandbits(64):016x}"
        self.api_tokens = (*self.api_tokens, token)
        return token

    # == webhooks (sending) ===========================================================================
    # Pipedrive's webhooks v2 for deals: one request per event, ``{"meta": {...}, "data": ..., "previous": ...}``
    # with ``meta.action`` change or delete, ``meta.id`` a fresh uuid per event, ``meta.attempt`` counting
    # from 1; ``previous`` holds the old values of the fields that changed (the whole deal for a delete, whose
    # ``data`` is null). Pipedrive signs nothing: the request carries the HTTP Basic credentials set on the
    # webhook (``http_auth_user``/``http_auth_password``). Off until POST /_sandbox/webhooks {"url",
    # "http_auth_user"?, "http_auth_password"?, "deliveries"?, ...} (see connectors.sandboxwebhooks). Not
    # persisted: save() writes no registration and load() keeps the one in force. This sandbox has no deal
    # creation endpoint, so it sends no create events.

    _webhook_sender: WebhookSender | None = None
    _webhook_hook: dict[str, Any] | None = None

    def _webhook_admin(self, req: SandboxRequest) -> SandboxResponse:
        resp, self._webhook_sender = webhook_admin(req, self._webhook_sender, self._webhook_start)
        return resp

    def _webhook_start(self, body: Any) -> tuple[WebhookSender, dict[str, Any]]:
        user, password = body.get("http_auth_user"), body.get("http_auth_password")
        if (user is None) != (password is None) or any(v is not None and not isinstance(v, str)
                                                       for v in (user, password)):
            raise ValueError("give both 'http_auth_user' and 'http_auth_password' (strings), or neither")
        target = WebhookTarget.from_body({"batch_size": 1, **body}, batch_size=1)
        webhook_id = random.SystemRandom().randrange(100_000, 10_000_000)
        auth = basic_authorization(user, password) if user is not None and password is not None else None

        def build(events: list[dict[str, Any]], attempt: int) -> tuple[bytes, dict[str, str]]:
            event = events[0]
            payload = dumps({**event, "meta": {**event["meta"], "attempt": attempt + 1}}).encode()
            headers = {"Content-Type": "application/json", "User-Agent": "Pipedrive Webhooks"}
            if auth is not None:
                headers["Authorization"] = auth
            return payload, headers

        with self.lock:
            self._webhook_hook = {"webhook_id": webhook_id}
        return WebhookSender(target, build, name="pipedrive-webhooks"), {"webhook_id": webhook_id}

    def _webhook_before(self, d: dict[str, Any]) -> dict[str, Any] | None:
        """The deal as rendered before a change, when webhooks are on (None otherwise: nothing to compare)."""
        return self._deal_v2(d) if self._webhook_sender is not None else None

    def _webhook_deal_event(self, action: str, d: dict[str, Any], before: dict[str, Any] | None) -> None:
        sender = self._webhook_sender
        if sender is None or before is None:
            return
        data: dict[str, Any] | None = None
        if action == "delete":
            previous: dict[str, Any] = before
        else:
            data = self._deal_v2(d)
            previous = {k: before.get(k) for k, v in data.items()
                        if k not in ("update_time", "custom_fields") and before.get(k) != v}
            old_custom, new_custom = before.get("custom_fields") or {}, data.get("custom_fields") or {}
            changed = {k: old_custom.get(k) for k, v in new_custom.items() if old_custom.get(k) != v}
            if changed:
                previous["custom_fields"] = changed
            if not previous:
                return  # an edit that changed nothing sends nothing
        now = self.clock.now()
        owner = str(d.get("owner_id"))
        meta = {
            "action": action, "entity": "deal", "company_id": str(13_000_000 + self.seed % 1_000_000),
            "correlation_id": new_uuid(), "entity_id": str(d["id"]), "id": new_uuid(),
            "is_bulk_edit": False, "timestamp": iso_ms_utc(now),
            "type": "general", "user_id": owner, "version": "2.0",
            "webhook_id": str((self._webhook_hook or {}).get("webhook_id")), "webhook_owner_id": owner,
            "change_source": "app", "attempt": 1, "host": host_of(self.company_domain or self.base_url),
            "permitted_user_ids": [owner],
        }
        sender.emit([{"meta": meta, "data": data, "previous": previous}])

    def webhook_sender(self) -> WebhookSender | None:
        """The sender in force (None while sending is off)."""
        return self._webhook_sender
