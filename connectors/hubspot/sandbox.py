"""A stateful simulator of the HubSpot CRM API, faithful enough for the official SDK and the data movers.

What it serves (and how HubSpot behaves there):

- ``/crm/v3/objects/{type}`` for deals, companies, contacts, line items, products, quotes, tickets and the
  engagements (calls, emails, meetings and tasks, which carry ``hs_createdate`` and ``hs_timestamp`` rather
  than ``createdate``); the type may be plural, singular or an object type id (``0-3``, ``0-48``). Lists
  page with ``limit`` (default 10, at most 100) and ``after`` *or* ``offset``; ``paging.next`` carries
  ``after`` and an absolute ``link``.
  ``properties``, ``propertiesWithHistory``, ``associations`` and ``archived`` are honoured.
- search (``POST .../search``): filter groups OR'ed, filters AND'ed, at most 5 groups, 10 filters per group
  and 25 in all, one sort, ``limit`` at most 200, ``total``, and the hard cap: paging to ``after`` at or
  past ``search_cap`` (10,000) answers 400. Records with equal sort values come in an unspecified (but
  stable) order, as they do on HubSpot: a client must not assume ties are ordered by id.
- batch read/create/update/upsert/archive (100 inputs at most; unknown ids give a 207 with per-id
  errors; invalid property values reject the whole batch with a 400, as HubSpot does);
- associations v4 (per object, batch read, default and labelled PUT, labels) and the v3 batch read;
- properties and property groups (v3, plus the v1/v2 listings older clients read), pipelines with
  string stage metadata, owners, schemas, the legacy paged deal and company lists, and the OAuth token
  endpoints.

Every property value is a string; ids are numeric strings; datetimes are ISO-8601 in UTC with
milliseconds and can be filtered with epoch milliseconds. ``hs_is_closed_won`` and ``hs_is_closed`` are
derived from the deal's stage (won = probability 1.0 and closed), and so is ``hs_deal_stage_probability``, on
the 0..1 scale and written as HubSpot writes it, the exact expansion of a binary double (a stage at 0.2 gives
``"0.200000000000000011102230246251565404236316680908203125"``). Besides the ``default`` pipeline the
portal has a custom pipeline whose stage ids are numeric. Every write sets ``hs_lastmodifieddate`` from
the sandbox clock, so writes within one millisecond share a timestamp, as on HubSpot.

Auth is a private-app bearer token (``access_tokens``). Limits: ``requests_per_10s`` (100) on a rolling
ten-second window, ``searches_per_s`` (5) for search, ``daily_limit``; answers carry the
``X-HubSpot-RateLimit-*`` headers (search answers do not, as documented) and a 429 carries HubSpot's body
(``errorType: RATE_LIMIT``, ``policyName``). Errors carry HubSpot's body (``status``, ``category``,
``message``, ``correlationId``).

Seeding (:meth:`HubSpotSandbox.load_book`) and the portal's custom properties:

- companies: ``vat_number``, ``siren``, ``siret``, ``billing_email``, ``billing_currency`` (group
  "billing"), ``hs_analytics_source`` (upper-case channel);
- line items and products: ``tax_rate_percent`` (the VAT rate in percent) and HubSpot's own
  ``hs_tax_rate_group_id`` (see :meth:`HubSpotSandbox.tax_rate_groups`);
- deals, companies and quotes: ``ledgerbridge_book_id`` (the seed book's id, for tests);
- each deal's sales activities (:meth:`connectors.seedbook.Book.activities`): calls, meetings, emails and
  tasks, associated with the deal, its company and its contact (HubSpot's engagement association types).

Quotes use HubSpot's ``hs_status``. A quote the customer accepted is either a CPQ quote in state
``ACCEPTED`` ("The state will automatically be updated to ACCEPTED when the buyer accepts the quote",
developers.hubspot.com, create CPQ quotes) or a legacy quote, published (``APPROVAL_NOT_NEEDED``), whose
e-signature is complete (``hs_esign_num_signers_completed`` = ``hs_esign_num_signers_required``). A sent
quote is published with a signature still pending; a draft is ``DRAFT``; a rejected one ``REJECTED``.
"""

from __future__ import annotations

import bisect
import datetime as dt
import functools
import hashlib
import heapq
import json
import operator
import random
import re
import unicodedata
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from connectors.hubspot.catalog import (
    ASSOCIATION_TYPES,
    CURRENCIES,
    DEFAULT_PROPERTIES,
    ENGAGEMENT_TYPES,
    OBJECT_TYPES,
    PRIMARY_ASSOCIATIONS,
    STANDARD_GROUPS,
    AssociationType,
    PropertyDef,
    canonical_type,
    reverse_type_id,
    singular,
    standard_properties,
)
from connectors.sandboxkit import (
    Clock,
    FaultPlan,
    Route,
    SandboxApp,
    SandboxRequest,
    SandboxResponse,
    WindowLimit,
    json_response,
)
from connectors.sandboxwebhooks import (
    WebhookSender,
    WebhookTarget,
    compact_json,
    epoch_ms,
    new_event_id,
    sign_hubspot_v1,
    sign_hubspot_v3,
    webhook_admin,
)
from connectors.seedbook import Book, BookActivity, BookLine

__all__ = ["COUNTRY_NAMES", "CUSTOM_PIPELINE_ID", "HubSpotSandbox", "iso_ms", "parse_ms", "to_ms"]

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS = dt.timedelta(milliseconds=1)


def to_ms(value: dt.datetime) -> int:
    """Epoch milliseconds of ``value`` (a naive value is taken as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return (value - _EPOCH) // _MS


def iso_ms(ms: int) -> str:
    """HubSpot's datetime format: ``2024-05-01T09:30:00.123Z``."""
    t = _EPOCH + ms * _MS
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


@functools.lru_cache(maxsize=262_144)
def parse_ms(value: str) -> int | None:
    """Epoch milliseconds from epoch milliseconds, an ISO-8601 datetime or a date; None when unreadable."""
    v = value.strip()
    if re.fullmatch(r"-?\d{1,15}", v):
        return int(v)
    try:
        if len(v) == 10:
            return to_ms(dt.datetime.combine(dt.date.fromisoformat(v), dt.time(), dt.UTC))
        return to_ms(dt.datetime.fromisoformat(v))
    except ValueError:
        return None


COUNTRY_NAMES = {"FR": "France", "DE": "Germany", "BE": "Belgium", "ES": "Spain", "IT": "Italy",
                 "US": "United States"}
CUSTOM_PIPELINE_ID = "84213556"

# (stage id, label, probability, isClosed); the book's neutral stages map onto them in this order.
_DEFAULT_STAGES = (
    ("appointmentscheduled", "Appointment Scheduled", "0.2", "false"),
    ("qualifiedtobuy", "Qualified To Buy", "0.4", "false"),
    ("presentationscheduled", "Presentation Scheduled", "0.6", "false"),
    ("decisionmakerboughtin", "Decision Maker Bought-In", "0.8", "false"),
    ("contractsent", "Contract Sent", "0.9", "false"),
    ("closedwon", "Closed Won", "1.0", "true"),
    ("closedlost", "Closed Lost", "0.0", "true"),
)
_CUSTOM_STAGES = (
    ("84213557", "Découverte", "0.1", "false"),
    ("84213558", "Qualification", "0.3", "false"),
    ("84213559", "Proposition envoyée", "0.5", "false"),
    ("84213560", "Négociation", "0.8", "false"),
    ("84213561", "Signé", "1.0", "true"),
    ("84213562", "Perdu", "0.0", "true"),
)
_BOOK_STAGE = {
    "default": {"prospect": "appointmentscheduled", "qualified": "qualifiedtobuy",
                "proposal": "presentationscheduled", "negotiation": "contractsent", "won": "closedwon",
                "lost": "closedlost"},
    CUSTOM_PIPELINE_ID: {"prospect": "84213557", "qualified": "84213558", "proposal": "84213559",
                         "negotiation": "84213560", "won": "84213561", "lost": "84213562"},
}
_PORTAL_EPOCH = dt.datetime(2023, 6, 1, tzinfo=dt.UTC)  # before any book record
_TAX_GROUPS = {"20": "1001", "10": "1002", "5.5": "1003", "2.1": "1004"}
_FIRST_NAMES = ("Camille", "Léa", "Manon", "Chloé", "Emma", "Hugo", "Lucas", "Louis", "Thomas", "Nathan",
                "Inès", "Sarah", "Julie", "Antoine", "Maxime", "Pauline", "Marie", "Paul", "Anna", "Jules")

_FIELD_TYPES = frozenset({"booleancheckbox", "calculation_equation", "checkbox", "date", "file", "html", "number",
                          "phonenumber", "radio", "select", "text", "textarea"})
_TYPES = frozenset({"string", "number", "date", "datetime", "enumeration", "bool"})
_MAX_BATCH = 100
_MAX_LIST = 100
_MAX_SEARCH_LIMIT = 200
_ASSOC_PAGE = 500
# Association batch reads take at most 1,000 ids (developers.hubspot.com changelog, February 2025).
_MAX_ASSOC_BATCH = 1000
_ENGAGEMENTS = frozenset(ENGAGEMENT_TYPES.values())
_SEARCH_TEXT_PROPS = ("name", "domain", "dealname", "email", "firstname", "lastname", "hs_title", "hs_sku",
                      "subject")


class _ApiError(Exception):
    """An error answer in HubSpot's shape, raised inside a handler."""

    def __init__(self, status: int, category: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.category = category
        self.message = message
        self.extra = extra


def _validation(errors: list[dict[str, Any]]) -> _ApiError:
    return _ApiError(400, "VALIDATION_ERROR", "Property values were not valid: " + json.dumps(errors))


@dataclass
class _Record:
    id: str
    type: str
    props: dict[str, str]
    created_ms: int
    updated_ms: int
    tie: int
    archived: bool = False
    archived_ms: int | None = None


def _str_value(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _dec(value: str | None) -> Decimal | None:
    if value is None or value == "":
        return None
    try:
        d = Decimal(value)
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def _plain(d: Decimal) -> str:
    return format(d.quantize(Decimal("0.01")), "f")


def _float_text(value: str) -> str:
    """A number as HubSpot writes its calculated ones: the binary double's exact decimal expansion.

    ``hs_deal_stage_probability`` of a stage at 0.2 comes back as
    ``"0.200000000000000011102230246251565404236316680908203125"`` (1.0 as ``"1"``, 0.0 as ``"0"``).
    """
    return str(Decimal(float(value)))


class HubSpotSandbox(SandboxApp):
    """The HubSpot CRM API simulator (see the module docstring). Thread-safe; state under ``self.lock``."""

    vendor = "hubspot"
    state_attrs = ("_objects", "_assoc", "_props", "_groups", "_pipelines", "_owners", "_next_id", "_book_ids")

    def __init__(
        self,
        *,
        seed: int = 0,
        faults: str | FaultPlan | None = None,
        clock: Clock | None = None,
        access_tokens: Iterable[str] = ("demo-hubspot-token",),
        requests_per_10s: int = 100,
        searches_per_s: int = 5,
        daily_limit: int = 250_000,
        search_cap: int = 10_000,
        portal_id: int | None = None,
    ) -> None:
        super().__init__(seed=seed, faults=faults, clock=clock)
        self.access_tokens = tuple(access_tokens)
        self.search_cap = search_cap
        self.portal_id = portal_id if portal_id is not None else 24_000_000 + seed % 1_000_000
        self._ten_secondly = WindowLimit(self.clock, requests_per_10s, 10.0, "TEN_SECONDLY_ROLLING")
        self._secondly_search = WindowLimit(self.clock, searches_per_s, 1.0, "SECONDLY")
        self._daily = WindowLimit(self.clock, daily_limit, 86_400.0, "DAILY")
        self._ids_rng = random.Random(f"hubspot-ids-{seed}")
        self._cid_rng = random.Random(f"hubspot-correlation-{seed}")
        self.served_429 = 0
        self.search_calls = 0
        self._objects: dict[str, dict[str, _Record]] = {t: {} for t in OBJECT_TYPES}
        # (from type, to type) -> from id -> to id -> association type ids
        self._assoc: dict[tuple[str, str], dict[str, dict[str, set[int]]]] = {}
        self._props: dict[str, dict[str, dict[str, Any]]] = {}
        self._groups: dict[str, dict[str, dict[str, Any]]] = {}
        self._pipelines: list[dict[str, Any]] = []
        self._owners: list[dict[str, Any]] = []
        self._next_id = 10_000_000_000 + (seed % 1000) * 10_000_000
        self._book_ids: dict[str, dict[str, str]] = {t: {} for t in OBJECT_TYPES}
        # type -> (modification times, records) sorted by time; rebuilt after any write.
        self._time_index: dict[str, tuple[list[int], list[_Record]]] = {}
        self._setup_portal()
        self._register_routes()

    # -- portal setup ------------------------------------------------------------------------------
    def _setup_portal(self) -> None:
        created = iso_ms(to_ms(dt.datetime(2019, 6, 1, tzinfo=dt.UTC)))
        for order, (pid, label, stages) in enumerate((("default", "Sales Pipeline", _DEFAULT_STAGES),
                                                      (CUSTOM_PIPELINE_ID, "Grands comptes", _CUSTOM_STAGES))):
            self._pipelines.append({
                "id": pid, "label": label, "displayOrder": order, "createdAt": created, "updatedAt": created,
                "archived": False,
                "stages": [
                    {"id": sid, "label": slabel, "displayOrder": i,
                     "metadata": {"isClosed": closed, "probability": prob},
                     "createdAt": created, "updatedAt": created, "archived": False,
                     "writePermissions": "CRM_PERMISSIONS_ENFORCEMENT"}
                    for i, (sid, slabel, prob, closed) in enumerate(stages)
                ],
            })
        pipeline_opts = tuple((p["id"], p["label"]) for p in self._pipelines)
        stage_opts = tuple((s["id"], s["label"]) for p in self._pipelines for s in p["stages"])
        std = standard_properties(pipeline_opts, stage_opts)
        custom: dict[str, list[PropertyDef]] = {
            "companies": [
                PropertyDef("vat_number", "Numéro de TVA intracommunautaire", "string", "text", "billing",
                            hubspot_defined=False),
                PropertyDef("siren", "SIREN", "string", "text", "billing", hubspot_defined=False),
                PropertyDef("siret", "SIRET", "string", "text", "billing", hubspot_defined=False),
                PropertyDef("billing_email", "E-mail de facturation", "string", "text", "billing",
                            hubspot_defined=False),
                PropertyDef("billing_currency", "Devise de facturation", "enumeration", "select", "billing",
                            CURRENCIES, hubspot_defined=False),
                PropertyDef("ledgerbridge_book_id", "Seed book id", "string", "text", "sandbox",
                            hubspot_defined=False, has_unique_value=True),
            ],
            "deals": [PropertyDef("ledgerbridge_book_id", "Seed book id", "string", "text", "sandbox",
                                  hubspot_defined=False, has_unique_value=True)],
            "quotes": [PropertyDef("ledgerbridge_book_id", "Seed book id", "string", "text", "sandbox",
                                   hubspot_defined=False, has_unique_value=True)],
            "line_items": [PropertyDef("tax_rate_percent", "Taux de TVA (%)", "number", "number", "billing",
                                       hubspot_defined=False)],
            "products": [PropertyDef("tax_rate_percent", "Taux de TVA (%)", "number", "number", "billing",
                                     hubspot_defined=False)],
        }
        for t in OBJECT_TYPES:
            groups = list(STANDARD_GROUPS.get(t, ()))
            if any(p.group == "billing" for p in custom.get(t, [])):
                groups.append(("billing", "Facturation"))
            if any(p.group == "sandbox" for p in custom.get(t, [])):
                groups.append(("sandbox", "Sandbox"))
            self._groups[t] = {name: {"name": name, "label": label, "displayOrder": i, "archived": False}
                               for i, (name, label) in enumerate(groups)}
            defs = std.get(t, []) + custom.get(t, [])
            self._props[t] = {p.name: p.to_json(i, created) for i, p in enumerate(defs)}

    # -- identifiers, time, bodies -------------------------------------------------------------------
    def _now_ms(self) -> int:
        return int(self.clock.now() * 1000)

    def _new_id(self) -> str:
        self._next_id += self._ids_rng.randint(1, 40)
        return str(self._next_id)

    def _tie(self, object_id: str) -> int:
        digest = hashlib.blake2b(f"{self.seed}:{object_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big")

    def _correlation_id(self) -> str:
        with self.lock:
            return str(uuid.UUID(int=self._cid_rng.getrandbits(128), version=4))

    def _error(self, status: int, category: str, message: str, **extra: Any) -> SandboxResponse:
        cid = self._correlation_id()
        body = {"status": "error", "message": message, "correlationId": cid, "category": category, **extra}
        return json_response(status, body, {"X-HubSpot-Correlation-Id": cid})

    @staticmethod
    def _body(req: SandboxRequest) -> Any:
        try:
            return req.json()
        except (ValueError, UnicodeDecodeError):
            raise _ApiError(400, "VALIDATION_ERROR", "Invalid input JSON on line 1") from None

    @staticmethod
    def _obj_type(name: str) -> str:
        t = canonical_type(name)
        if t is None:
            raise _ApiError(400, "VALIDATION_ERROR", f"Unable to infer object type from: {name}")
        return t

    @staticmethod
    def _modified_prop(t: str) -> str:
        return "lastmodifieddate" if t == "contacts" else "hs_lastmodifieddate"

    # -- routing -----------------------------------------------------------------------------------
    def _r(self, method: str, pattern: str, handler: Callable[[SandboxRequest], SandboxResponse],
           *, is_write: bool | None = None) -> None:
        def wrapped(req: SandboxRequest) -> SandboxResponse:
            try:
                return handler(req)
            except _ApiError as exc:
                return self._error(exc.status, exc.category, exc.message, **exc.extra)

        self.route(method, pattern, wrapped, is_write=is_write)

    def _register_routes(self) -> None:
        r = self._r
        o = "/crm/v3/objects/{type}"
        r("POST", o + "/search", self._h_search, is_write=False)
        r("POST", o + "/batch/read", self._h_batch_read, is_write=False)
        r("POST", o + "/batch/create", self._h_batch_create)
        r("POST", o + "/batch/update", self._h_batch_update)
        r("POST", o + "/batch/upsert", self._h_batch_upsert)
        r("POST", o + "/batch/archive", self._h_batch_archive)
        r("GET", o, self._h_list)
        r("POST", o, self._h_create)
        r("GET", o + "/{id}", self._h_get)
        r("PATCH", o + "/{id}", self._h_update)
        r("DELETE", o + "/{id}", self._h_archive)
        a4 = "/crm/v4/objects/{type}/{id}/associations"
        r("GET", a4 + "/{to}", self._h_assoc_list)
        r("PUT", a4 + "/default/{to}/{to_id}", self._h_assoc_put_default)
        r("PUT", a4 + "/{to}/{to_id}", self._h_assoc_put)
        r("POST", "/crm/v4/associations/{type}/{to}/batch/read", self._h_assoc_batch_read, is_write=False)
        r("POST", "/crm/v4/associations/{type}/{to}/batch/associate/default", self._h_assoc_batch_default)
        r("POST", "/crm/v4/associations/{type}/{to}/batch/create", self._h_assoc_batch_create)
        r("GET", "/crm/v4/associations/{type}/{to}/labels", self._h_assoc_labels)
        r("POST", "/crm/v3/associations/{type}/{to}/batch/read", self._h_assoc_v3_batch_read, is_write=False)
        p = "/crm/v3/properties/{type}"
        r("GET", p + "/groups", self._h_groups_list)
        r("POST", p + "/groups", self._h_group_create)
        r("GET", p + "/groups/{name}", self._h_group_get)
        r("POST", p + "/batch/read", self._h_props_batch_read, is_write=False)
        r("POST", p + "/batch/create", self._h_props_batch_create)
        r("GET", p, self._h_props_list)
        r("POST", p, self._h_prop_create)
        r("GET", p + "/{name}", self._h_prop_get)
        r("GET", "/properties/v2/{type}/properties", self._h_props_legacy)
        r("GET", "/properties/v1/{type}/properties", self._h_props_legacy)
        r("GET", "/companies/v2/properties", self._h_props_legacy_companies)
        r("GET", "/crm/v3/pipelines/{type}", self._h_pipelines)
        r("GET", "/crm/v3/pipelines/{type}/{pipeline}", self._h_pipeline)
        r("GET", "/crm/v3/pipelines/{type}/{pipeline}/stages", self._h_pipeline_stages)
        r("GET", "/crm/v3/schemas", lambda req: json_response(200, {"results": []}))
        r("GET", "/crm/v3/owners", self._h_owners)
        r("GET", "/deals/v1/deal/paged", self._h_legacy_deals)
        r("GET", "/companies/v2/companies/paged", self._h_legacy_companies)
        r("GET", "/companies/v2/companies/{id}", self._h_legacy_company)
        r("POST", "/oauth/v1/token", self._h_oauth_token)
        r("POST", "/oauth/{version}/token", self._h_oauth_token)
        r("GET", "/oauth/v1/access-tokens/{token}", self._h_oauth_token_info)

    # -- SandboxApp hooks ----------------------------------------------------------------------------
    @staticmethod
    def _is_oauth(req: SandboxRequest) -> bool:
        return req.path.startswith("/oauth/")

    @staticmethod
    def _is_search(req: SandboxRequest) -> bool:
        return req.method == "POST" and req.path.rstrip("/").endswith("/search")

    def is_exempt(self, req: SandboxRequest) -> bool:
        return super().is_exempt(req) or self._is_oauth(req)

    def authorize(self, req: SandboxRequest) -> SandboxResponse | None:
        if self._is_oauth(req):
            return None
        auth = req.header("authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip() in self.access_tokens:
            return None
        return self._error(
            401, "INVALID_AUTHENTICATION",
            "Authentication credentials not found. This API supports OAuth 2.0 authentication and you can "
            "find more details at https://developers.hubspot.com/docs/methods/auth/oauth-overview",
        )

    def _limit_headers(self, limit: WindowLimit, remaining: int) -> dict[str, str]:
        return {
            "X-HubSpot-RateLimit-Daily": str(self._daily.limit),
            "X-HubSpot-RateLimit-Daily-Remaining": str(max(self._daily.remaining(), 0)),
            "X-HubSpot-RateLimit-Interval-Milliseconds": str(round(self.clock.to_real(limit.window) * 1000)),
            "X-HubSpot-RateLimit-Max": str(limit.limit),
            "X-HubSpot-RateLimit-Remaining": str(max(remaining, 0)),
        }

    def _rate_limited(self, limit: WindowLimit) -> SandboxResponse:
        with self.lock:
            self.served_429 += 1
        cid = self._correlation_id()
        policy = limit.name
        body = {"status": "error", "message": f"You have reached your {policy.lower()} limit.",
                "errorType": "RATE_LIMIT", "correlationId": cid, "policyName": policy,
                "requestId": self._correlation_id()}
        return json_response(429, body, {"X-HubSpot-Correlation-Id": cid, **self._limit_headers(limit, 0)})

    def pre_request(self, req: SandboxRequest, route: Route) -> SandboxResponse | None:
        if self._is_oauth(req):
            return None
        limit = self._secondly_search if self._is_search(req) else self._ten_secondly
        ok, _remaining, _wait = limit.try_acquire()
        if not ok:
            return self._rate_limited(limit)
        ok, _remaining, _wait = self._daily.try_acquire()
        if not ok:
            return self._rate_limited(self._daily)
        if self._is_search(req):
            with self.lock:
                self.search_calls += 1
        return None

    def post_request(self, req: SandboxRequest, resp: SandboxResponse) -> None:
        if self._is_oauth(req) or resp.status == 429 or self._is_search(req):
            return
        resp.headers.update(self._limit_headers(self._ten_secondly, self._ten_secondly.remaining()))

    def fault_response(self, req: SandboxRequest, kind: str) -> SandboxResponse:
        if kind == "429":
            limit = self._secondly_search if self._is_search(req) else self._ten_secondly
            resp = self._rate_limited(limit)
            resp.headers["Retry-After"] = f"{self.clock.to_real(1.0):.3f}"
            return resp
        status = int(kind)
        if status in (502, 504):
            text = f"<html><head><title>{status}</title></head><body><h1>{status} Gateway error</h1></body></html>"
            return SandboxResponse(status, text.encode(), {"Content-Type": "text/html; charset=utf-8"})
        return self._error(status, "INTERNAL_ERROR" if status == 500 else "SERVICE_UNAVAILABLE",
                           "internal error" if status == 500 else "Service temporarily unavailable")

    def admin(self, req: SandboxRequest) -> SandboxResponse:
        """Sandbox-only endpoints for tests in other processes.

        ``GET /_sandbox/deals``: every live deal as ``{id, book_id, name, won, closed, stage, pipeline, amount,
        currency, created_at, updated_at, activities}`` (``activities``: the live engagements associated with the
        deal, counted by kind); ``PATCH /_sandbox/deals/{id}`` with ``{"properties": {...}}``: a user's edit.
        """
        path = req.path.rstrip("/")
        if path.startswith("/_sandbox/webhooks"):
            return self._webhook_admin(req)
        if req.method == "GET" and path == "/_sandbox/deals":
            with self.lock:
                rows = [{
                    "id": d["id"], "book_id": d.get("ledgerbridge_book_id"), "name": d.get("dealname"),
                    "won": d.get("hs_is_closed_won") == "true", "closed": d.get("hs_is_closed") == "true",
                    "stage": d.get("dealstage"), "pipeline": d.get("pipeline"), "amount": d.get("amount"),
                    "currency": d.get("deal_currency_code"), "created_at": d.get("createdate"),
                    "updated_at": d.get("hs_lastmodifieddate"), "activities": self._activity_counts(d["id"]),
                } for d in self.deals_snapshot()]
            return json_response(200, rows)
        m = re.fullmatch(r"/_sandbox/deals/(\d+)", path)
        if req.method == "PATCH" and m:
            try:
                props = (req.json() or {}).get("properties") or {}
                return json_response(200, {"id": m.group(1), "properties": self.modify_deal(m.group(1), **props)})
            except KeyError:
                return json_response(404, {"message": f"no deal {m.group(1)}"})
            except ValueError as exc:
                return json_response(400, {"message": str(exc)})
        return super().admin(req)

    def load(self, path: Path) -> bool:
        with self.lock:
            self._time_index.clear()
            props, groups = self._props, self._groups
            loaded = super().load(path)
            # State saved before an object type existed here: that type starts empty, with its standard properties.
            for t in OBJECT_TYPES:
                self._objects.setdefault(t, {})
                self._book_ids.setdefault(t, {})
                self._props.setdefault(t, props[t])
                self._groups.setdefault(t, groups[t])
            return loaded

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        with self.lock:
            out["objects"] = {t: sum(1 for r in recs.values() if not r.archived)
                              for t, recs in self._objects.items()}
        out["rate_limited"] = self.served_429
        out["search_calls"] = self.search_calls
        return out

    # -- records -------------------------------------------------------------------------------------
    def _insert(self, t: str, props: dict[str, str], created_ms: int, updated_ms: int) -> _Record:
        rid = self._new_id()
        rec = _Record(rid, t, dict(props), created_ms, updated_ms, self._tie(rid))
        rec.props["hs_object_id"] = rid
        if t in _ENGAGEMENTS:
            rec.props["hs_createdate"] = iso_ms(created_ms)  # engagements have no createdate
        else:
            rec.props["createdate"] = iso_ms(created_ms)
        if t == "quotes":
            rec.props["hs_createdate"] = iso_ms(created_ms)
        self._derive(t, rec)
        self._stamp(t, rec, updated_ms)
        self._objects[t][rid] = rec
        self._webhook_created(t, rec)
        return rec

    def _stamp(self, t: str, rec: _Record, ms: int) -> None:
        self._time_index.pop(t, None)
        rec.updated_ms = ms
        rec.props["hs_lastmodifieddate"] = iso_ms(ms)
        if t == "contacts":
            rec.props["lastmodifieddate"] = iso_ms(ms)

    def _stage_meta(self, stage: str | None) -> tuple[str, str, str] | None:
        for p in self._pipelines:
            for s in p["stages"]:
                if s["id"] == stage:
                    return p["id"], s["metadata"]["probability"], s["metadata"]["isClosed"]
        return None

    def _derive(self, t: str, rec: _Record) -> None:
        props = rec.props
        if t == "deals":
            props.setdefault("pipeline", "default")
            meta = self._stage_meta(props.get("dealstage"))
            if meta is None:
                for k in ("hs_is_closed_won", "hs_is_closed", "hs_deal_stage_probability"):
                    props.pop(k, None)
            else:
                _pid, prob, closed = meta
                props["hs_deal_stage_probability"] = _float_text(prob)
                props["hs_is_closed"] = closed
                props["hs_is_closed_won"] = "true" if closed == "true" and Decimal(prob) == 1 else "false"
            amount = _dec(props.get("amount"))
            if amount is not None:
                props["amount_in_home_currency"] = props["amount"]
        elif t == "line_items":
            qty = _dec(props.get("quantity"))
            price = _dec(props.get("price"))
            if price is None:
                props.pop("amount", None)
                return
            qty = Decimal(1) if qty is None else qty
            unit = price - (_dec(props.get("discount")) or Decimal(0))
            pct = _dec(props.get("hs_discount_percentage")) or Decimal(0)
            props["amount"] = _plain(qty * unit * (Decimal(100) - pct) / Decimal(100))

    def _find(self, t: str, rid: str, *, archived: bool = False, id_property: str | None = None) -> _Record | None:
        if id_property and id_property != "hs_object_id":
            for cand in self._objects[t].values():
                if cand.archived == archived and cand.props.get(id_property) == rid:
                    return cand
            return None
        rec = self._objects[t].get(str(rid).strip())
        if rec is None or rec.archived != archived:
            return None
        return rec

    # -- property values -----------------------------------------------------------------------------
    def _normalise(self, t: str, name: str, value: Any, errors: list[dict[str, Any]]) -> tuple[bool, str | None]:
        pdef = self._props[t].get(name)

        def bad(code: str, message: str) -> tuple[bool, str | None]:
            errors.append({"isValid": False, "message": message, "error": code, "name": name})
            return False, None

        if pdef is None:
            return bad("PROPERTY_DOESNT_EXIST", f'Property "{name}" does not exist')
        if pdef["modificationMetadata"]["readOnlyValue"]:
            return bad("READ_ONLY_VALUE", f"{name} is a read only property; its value cannot be set.")
        text = _str_value(value)
        if text is None or text == "":
            return True, None
        ptype = pdef["type"]
        if ptype == "number":
            if _dec(text) is None:
                return bad("INVALID_DECIMAL", f"{text!r} is not a valid decimal")
            return True, text
        if ptype == "bool":
            if text.lower() not in ("true", "false"):
                return bad("INVALID_BOOLEAN", f"{text!r} is not a valid boolean (true or false)")
            return True, text.lower()
        if ptype in ("date", "datetime"):
            ms = parse_ms(text)
            if ms is None:
                return bad("INVALID_DATE", f"{text!r} is not a valid date")
            if ptype == "date":
                if ms % 86_400_000 and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
                    return bad("INVALID_DATE", f"{text!r} is not midnight UTC; date values must be at midnight")
                return True, iso_ms(ms)[:10]
            return True, iso_ms(ms)
        if ptype == "enumeration" and pdef["options"] and name != "hubspot_owner_id":
            allowed = {o["value"] for o in pdef["options"]}
            chosen = text.split(";") if pdef["fieldType"] == "checkbox" else [text]
            if any(c not in allowed for c in chosen):
                return bad("INVALID_OPTION",
                           f"{text} was not one of the allowed options: {sorted(allowed)}")
            return True, text
        if len(text) > 65_536:
            return bad("TOO_LONG", f"{name} exceeds 65536 characters")
        return True, text

    def _validate(self, t: str, props: Any, errors: list[dict[str, Any]],
                  current: dict[str, str] | None = None) -> dict[str, str | None]:
        if not isinstance(props, dict):
            raise _ApiError(400, "VALIDATION_ERROR", "properties must be an object")
        clean: dict[str, str | None] = {}
        for name, value in props.items():
            ok, norm = self._normalise(t, str(name), value, errors)
            if ok:
                clean[str(name)] = norm
        if t == "deals" and clean.get("dealstage"):
            pipeline = clean.get("pipeline") or (current or {}).get("pipeline") or "default"
            meta = self._stage_meta(clean["dealstage"])
            if meta is None or meta[0] != pipeline:
                errors.append({"isValid": False, "error": "INVALID_OPTION", "name": "dealstage",
                               "message": f"{clean['dealstage']} is not a valid stage of pipeline {pipeline}"})
        return clean

    def _apply(self, t: str, rec: _Record, clean: dict[str, str | None], now: int) -> None:
        self._webhook_changed(t, rec, clean, now)
        for name, value in clean.items():
            if value is None:
                rec.props.pop(name, None)
            else:
                rec.props[name] = value
        self._derive(t, rec)
        self._stamp(t, rec, now)

    # -- record output -------------------------------------------------------------------------------
    def _props_out(self, t: str, rec: _Record, names: list[str] | None) -> dict[str, str | None]:
        wanted = list(names) if names else list(DEFAULT_PROPERTIES.get(t, ()))
        wanted += ["hs_object_id", "hs_createdate" if t in _ENGAGEMENTS else "createdate", "hs_lastmodifieddate"]
        defs = self._props[t]
        out: dict[str, str | None] = {}
        for n in wanted:
            if n in rec.props:
                out[n] = rec.props[n]
            elif n in defs:
                out[n] = None
        return out

    def _v3_type_name(self, t: str, to: str, type_id: int) -> str:
        base = f"{singular(t)}_to_{singular(to)}"
        primary = PRIMARY_ASSOCIATIONS.get((t, to))
        if primary is not None and type_id != primary.type_id:
            return base + "_unlabeled"
        return base

    def _rec_json(self, t: str, rec: _Record, names: list[str] | None, *, assoc: list[str] | None = None,
                  history: list[str] | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": rec.id,
            "properties": self._props_out(t, rec, names),
            "createdAt": iso_ms(rec.created_ms),
            "updatedAt": iso_ms(rec.updated_ms),
            "archived": rec.archived,
        }
        if rec.archived:
            d["archivedAt"] = iso_ms(rec.archived_ms or rec.updated_ms)
        if history:
            d["propertiesWithHistory"] = {
                n: [{"value": rec.props[n], "timestamp": iso_ms(rec.updated_ms), "sourceType": "API"}]
                for n in history if n in rec.props
            }
        if assoc:
            links: dict[str, Any] = {}
            for name in assoc:
                to = canonical_type(name)
                if to is None:
                    continue
                results = [
                    {"id": to_id, "type": self._v3_type_name(t, to, tid)}
                    for to_id, tids in self._assoc.get((t, to), {}).get(rec.id, {}).items()
                    for tid in sorted(tids)
                ]
                if results:
                    links[to] = {"results": results}
            if links:
                d["associations"] = links
        return d

    def _batch_json(self, results: list[dict[str, Any]], errors: list[dict[str, Any]], started: int,
                    status: int = 200) -> SandboxResponse:
        body: dict[str, Any] = {
            "status": "COMPLETE", "results": results, "startedAt": iso_ms(started),
            "completedAt": iso_ms(self._now_ms()),
        }
        if errors:
            body["numErrors"] = len(errors)
            body["errors"] = errors
            return json_response(207, body)
        return json_response(status, body)

    @staticmethod
    def _std_error(category: str, message: str, context: dict[str, list[str]], **extra: Any) -> dict[str, Any]:
        return {"status": "error", "category": category, "message": message, "context": context,
                "errors": [], "links": {}, **extra}

    # -- objects: list, get, create, update, archive ------------------------------------------------
    @staticmethod
    def _int_arg(req: SandboxRequest, name: str, default: int) -> int:
        raw = req.arg(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise _ApiError(400, "VALIDATION_ERROR", f"{name} must be an integer, got {raw!r}") from None

    @staticmethod
    def _link(req: SandboxRequest, after: str) -> str:
        query = {k: v for k, v in req.query.items() if k not in ("after", "offset")}
        query["after"] = [after]
        return f"{req.base_url}{req.path}?{urlencode(query, doseq=True)}"

    def _h_list(self, req: SandboxRequest) -> SandboxResponse:
        t = self._obj_type(req.params["type"])
        limit = min(max(self._int_arg(req, "limit", 10), 1), _MAX_LIST)
        archived = (req.arg("archived") or "false").lower() == "true"
        names = req.args("properties") or None
        with self.lock:
            items = [r for r in self._objects[t].values() if r.archived == archived]
            start = 0
            after = req.arg("after")
            if after:
                try:
                    bound = int(after)
                except ValueError:
                    raise _ApiError(400, "VALIDATION_ERROR", f"Invalid paging cursor: {after}") from None
                start = next((i for i, r in enumerate(items) if int(r.id) >= bound), len(items))
            elif req.arg("offset"):
                start = max(self._int_arg(req, "offset", 0), 0)
            page = items[start:start + limit]
            body: dict[str, Any] = {
                "results": [self._rec_json(t, r, names, assoc=req.args("associations"),
                                           history=req.args("propertiesWithHistory")) for r in page],
            }
            if start + limit < len(items):
                nxt = items[start + limit].id
                body["paging"] = {"next": {"after": nxt, "link": self._link(req, nxt)}}
        return json_response(200, body)

    def _not_found(self, rid: str) -> _ApiError:
        return _ApiError(404, "OBJECT_NOT_FOUND", "Object not found.  objectId are usually numeric.",
                         context={"id": [rid]})

    def _h_get(self, req: SandboxRequest) -> SandboxResponse:
        t = self._obj_type(req.params["type"])
        archived = (req.arg("archived") or "false").lower() == "true"
        with self.lock:
            rec = self._find(t, req.params["id"], archived=archived, id_property=req.arg("idProperty"))
            if rec is None:
                raise self._not_found(req.params["id"])
            body = self._rec_json(t, rec, req.args("properties") or None, assoc=req.args("associations"),
                                  history=req.args("propertiesWithHistory"))
        return json_response(200, body)

    def _type_for_association(self, t: str, type_id: int) -> str | None:
        for (f, to), a in list(ASSOCIATION_TYPES.items()) + list(PRIMARY_ASSOCIATIONS.items()):
            if f == t and a.type_id == type_id:
                return to
        return None

    def _create_one(self, t: str, item: Any, errors: list[dict[str, Any]], now: int) -> _Record | None:
        if not isinstance(item, dict):
            raise _ApiError(400, "VALIDATION_ERROR", "each input must be an object")
        clean = self._validate(t, item.get("properties") or {}, errors)
        links: list[tuple[str, str, int]] = []
        for a in item.get("associations") or []:
            try:
                to_id = str(a["to"]["id"])
                type_ids = [int(x["associationTypeId"]) for x in a["types"]]
            except (KeyError, TypeError, ValueError):
                raise _ApiError(400, "VALIDATION_ERROR", "invalid association input") from None
            for tid in type_ids:
                to = self._type_for_association(t, tid)
                if to is None or self._find(to, to_id) is None:
                    raise _ApiError(400, "VALIDATION_ERROR",
                                    f"association {tid} to {to_id} is not valid for {singular(t)}")
                links.append((to, to_id, tid))
        if errors:
            return None
        rec = self._insert(t, {k: v for k, v in clean.items() if v is not None}, now, now)
        for to, to_id, tid in links:
            self._link_ids(t, rec.id, to, to_id, {tid}, now)
        return rec

    def _h_create(self, req: SandboxRequest) -> SandboxResponse:
        t = self._obj_type(req.params["type"])
        body = self._body(req) or {}
        errors: list[dict[str, Any]] = []
        with self.lock:
            rec = self._create_one(t, body, errors, self._now_ms())
            if rec is None:
                raise _validation(errors)
            out = self._rec_json(t, rec, list((body.get("properties") or {}).keys()))
        return json_response(201, out)

    def _h_update(self, req: SandboxRequest) -> SandboxResponse:
        t = self._obj_type(req.params["type"])
        body = self._body(req) or {}
        errors: list[dict[str, Any]] = []
        with self.lock:
            rec = self._find(t, req.params["id"], id_property=req.arg("idProperty"))
            if rec is None:
                raise self._not_found(req.params["id"])
            clean = self._validate(t, body.get("properties") or {}, errors, rec.props)
            if errors:
                raise _validation(errors)
            self._apply(t, rec, clean, self._now_ms())
            out = self._rec_json(t, rec, list(clean))
        return json_response(200, out)

    def _archive(self, t: str, rec: _Record, now: int) -> None:
        rec.archived = True
        rec.archived_ms = now
        self._webhook_archived(t, rec, now)
        self._stamp(t, rec, now)

    def _h_archive(self, req: SandboxRequest) -> SandboxResponse:
        t = self._obj_type(req.params["type"])
        with self.lock:
            rec = self._find(t, req.params["id"])
            if rec is not None:
                self._archive(t, rec, self._now_ms())
        return SandboxResponse(204)

    # -- batch -----------------------------------------------------------------------------------------
    @staticmethod
    def _inputs(body: Any) -> list[Any]:
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            raise _ApiError(400, "VALIDATION_ERROR", "inputs is required")
        inputs: list[Any] = body["inputs"]
        if len(inputs) > _MAX_BATCH:
            raise _ApiError(400, "VALIDATION_ERROR",
                            f"Batch input size {len(inputs)} exceeds the limit of {_MAX_BATCH}")
        return inputs

    def _not_found_error(self, t: str, ids: list[str]) -> dict[str, Any]:
        return self._std_error(
            "OBJECT_NOT_FOUND",
            f"Could not get some {singular(t).upper()} objects, they may be deleted or not exist. "
            "Check that ids are valid.",
            {"ids": ids},
        )

    def _h_batch_read(self, req: SandboxRequest) -> SandboxResponse:
        t = self._obj_type(req.params["type"])
        body = self._body(req)
        inputs = self._inputs(body)
        started = self._now_ms()
        archived = (req.arg("archived") or "false").lower() == "true"
        names = body.get("properties") or None
        history = body.get("propertiesWithHistory") or None
        id_property = body.get("idProperty")
        results, missing, seen = [], [], set()
        with self.lock:
            for item in inputs:
                rid = str((item or {}).get("id", ""))
                rec = self._find(t, rid, archived=archived, id_property=id_property)
                if rec is None:
                    missing.append(rid)
                elif rec.id not in seen:
                    seen.add(rec.id)
                    results.append(self._rec_json(t, rec, names, history=history))
        return self._batch_json(results, [self._not_found_error(t, missing)] if missing else [], started)

    def _h_batch_create(self, req: SandboxRequest) -> SandboxResponse:
        t = self._obj_type(req.params["type"])
        inputs = self._inputs(self._body(req))
        started = self._now_ms()
        errors: list[dict[str, Any]] = []
        with self.lock:
            for item in inputs:
                self._validate(t, (item or {}).get("properties") or {}, errors)
            if errors:
                raise _validation(errors)
            recs = [self._create_one(t, item, errors, self._now_ms()) for item in inputs]
            results = [self._rec_json(t, r, list((item.get("properties") or {}).keys()))
                       for r, item in zip(recs, inputs, strict=True) if r is not None]
        return self._batch_json(results, [], started, status=201)

    def _h_batch_update(self, req: SandboxRequest) -> SandboxResponse:
        t = self._obj_type(req.params["type"])
        body = self._body(req)
        inputs = self._inputs(body)
        started = self._now_ms()
        id_property = body.get("idProperty") if isinstance(body, dict) else None
        ids = [str((item or {}).get("id", "")) for item in inputs]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise _ApiError(400, "VALIDATION_ERROR", f"Duplicate IDs found in batch input: {dupes}. "
                            "IDs must be unique", context={"ids": dupes})
        errors: list[dict[str, Any]] = []
        with self.lock:
            found: list[tuple[_Record, dict[str, str | None]]] = []
            missing: list[str] = []
            for rid, item in zip(ids, inputs, strict=True):
                rec = self._find(t, rid, id_property=id_property or item.get("idProperty"))
                props = self._validate(t, item.get("properties") or {}, errors, rec.props if rec else None)
                if rec is None:
                    missing.append(rid)
                else:
                    found.append((rec, props))
            if errors:
                raise _validation(errors)
            now = self._now_ms()
            results = []
            for rec, props in found:
                self._apply(t, rec, props, now)
                results.append(self._rec_json(t, rec, list(props)))
        return self._batch_json(results, [self._not_found_error(t, missing)] if missing else [], started)

    def _h_batch_upsert(self, req: SandboxRequest) -> SandboxResponse:
        t = self._obj_type(req.params["type"])
        inputs = self._inputs(self._body(req))
        started = self._now_ms()
        errors: list[dict[str, Any]] = []
        with self.lock:
            plan = []
            for item in inputs:
                id_property = item.get("idProperty")
                pdef = self._props[t].get(id_property or "")
                if pdef is None or not pdef["hasUniqueValue"]:
                    raise _ApiError(400, "VALIDATION_ERROR",
                                    f"idProperty {id_property!r} must be a property with unique values")
                rec = self._find(t, str(item.get("id")), id_property=id_property)
                props = dict(item.get("properties") or {})
                if rec is None:
                    props[id_property] = str(item.get("id"))
                plan.append((rec, self._validate(t, props, errors, rec.props if rec else None)))
            if errors:
                raise _validation(errors)
            now = self._now_ms()
            results = []
            for rec, props in plan:
                new = rec is None
                if rec is None:
                    rec = self._insert(t, {k: v for k, v in props.items() if v is not None}, now, now)
                else:
                    self._apply(t, rec, props, now)
                results.append({**self._rec_json(t, rec, list(props)), "new": new})
        return self._batch_json(results, [], started)

    def _h_batch_archive(self, req: SandboxRequest) -> SandboxResponse:
        t = self._obj_type(req.params["type"])
        inputs = self._inputs(self._body(req))
        with self.lock:
            now = self._now_ms()
            for item in inputs:
                rec = self._find(t, str((item or {}).get("id", "")))
                if rec is not None:
                    self._archive(t, rec, now)
        return SandboxResponse(204)

    # -- search ----------------------------------------------------------------------------------------
    def _ptype(self, t: str, name: str) -> str:
        pdef = self._props[t].get(name)
        return str(pdef["type"]) if pdef else "string"

    def _raw(self, rec: _Record, name: str) -> str | None:
        return rec.props.get(name)

    def _key(self, t: str, name: str, rec: _Record) -> Any:
        """The comparable value of a record's property (None when unset)."""
        return self._accessor(t, name)(rec)

    def _accessor(self, t: str, name: str) -> Callable[[_Record], Any]:
        """A fast function giving a record's comparable value of property ``name`` (None when unset)."""
        if name == "hs_object_id":
            return lambda rec: int(rec.id)
        if name in ("hs_lastmodifieddate", "lastmodifieddate"):
            return lambda rec: rec.updated_ms
        if name in ("createdate", "hs_createdate"):
            return lambda rec: rec.created_ms
        ptype = self._ptype(t, name)

        def get(rec: _Record) -> Any:
            raw = rec.props.get(name)
            if raw is None or raw == "":
                return None
            return self._coerce(ptype, raw, strict=False)

        return get

    def _coerce(self, ptype: str, value: Any, *, strict: bool = True) -> Any:
        text = _str_value(value)
        if text is None:
            if strict:
                raise _ApiError(400, "VALIDATION_ERROR", "filter value is required")
            return None
        if ptype == "number":
            d = _dec(text)
            if d is None and strict:
                raise _ApiError(400, "VALIDATION_ERROR", f"{text!r} is not a valid number")
            return d
        if ptype in ("date", "datetime"):
            ms = parse_ms(text)
            if ms is None and strict:
                raise _ApiError(400, "VALIDATION_ERROR", f"{text!r} is not a valid date or epoch milliseconds")
            return ms
        return text.lower()

    def _compile(self, t: str, flt: Any) -> Callable[[_Record], bool]:
        """A predicate for one filter; the filter's values are checked and converted once per request."""
        if not isinstance(flt, dict) or not flt.get("propertyName") or not flt.get("operator"):
            raise _ApiError(400, "VALIDATION_ERROR", "each filter needs propertyName and operator")
        name, op = str(flt["propertyName"]), str(flt["operator"])
        key = self._accessor(t, name)

        if op == "HAS_PROPERTY":
            return lambda rec: key(rec) is not None
        if op == "NOT_HAS_PROPERTY":
            return lambda rec: key(rec) is None
        ptype = "number" if name == "hs_object_id" else self._ptype(t, name)
        if op in ("IN", "NOT_IN"):
            values = flt.get("values")
            if not isinstance(values, list):
                raise _ApiError(400, "VALIDATION_ERROR", f"operator {op} requires values")
            members = {self._coerce(ptype, v) for v in values}
            if op == "IN":
                return lambda rec: key(rec) in members
            return lambda rec: key(rec) not in members
        if op in ("CONTAINS_TOKEN", "NOT_CONTAINS_TOKEN"):
            token = str(flt.get("value", "")).lower().strip("*")
            want = op == "CONTAINS_TOKEN"
            return lambda rec: (token in (rec.props.get(name) or "").lower()) == want
        value = self._coerce(ptype, flt.get("value"))
        direct = {"hs_object_id": "id", "hs_lastmodifieddate": "updated_ms", "lastmodifieddate": "updated_ms",
                  "createdate": "created_ms", "hs_createdate": "created_ms"}.get(name)
        if direct == "updated_ms" or direct == "created_ms":  # never unset: plain comparisons on the field
            get = operator.attrgetter(direct)
            fast: dict[str, Callable[[_Record], bool]] = {
                "EQ": lambda rec: get(rec) == value, "NEQ": lambda rec: get(rec) != value,
                "LT": lambda rec: get(rec) < value, "LTE": lambda rec: get(rec) <= value,
                "GT": lambda rec: get(rec) > value, "GTE": lambda rec: get(rec) >= value,
            }
            if op in fast:
                return fast[op]
        if op == "NEQ":
            return lambda rec: bool(key(rec) != value)
        if op == "BETWEEN":
            high = self._coerce(ptype, flt.get("highValue"))
            return lambda rec: (k := key(rec)) is not None and bool(value <= k <= high)
        compare: Callable[[Any, Any], bool] | None = {
            "EQ": lambda a, b: bool(a == b), "LT": lambda a, b: bool(a < b), "LTE": lambda a, b: bool(a <= b),
            "GT": lambda a, b: bool(a > b), "GTE": lambda a, b: bool(a >= b),
        }.get(op)
        if compare is None:
            raise _ApiError(400, "VALIDATION_ERROR", f"Unknown operator {op}")
        cmp = compare

        def test(rec: _Record) -> bool:
            k = key(rec)
            if k is None:
                return False
            try:
                return cmp(k, value)
            except TypeError:
                return False

        return test

    def _time_window(self, t: str, groups: list[Any]) -> Iterable[_Record]:
        """The records whose modification time can satisfy some group (an index on ``hs_lastmodifieddate``)."""
        if not groups:
            return self._objects[t].values()
        lows, highs = [], []
        for g in groups:
            lo, hi = -(1 << 62), 1 << 62
            for f in g.get("filters") or []:
                if f.get("propertyName") not in ("hs_lastmodifieddate", "lastmodifieddate"):
                    continue
                op = f.get("operator")
                v = parse_ms(str(f.get("value"))) if f.get("value") is not None else None
                if v is None:
                    continue
                if op in ("EQ", "GT", "GTE", "BETWEEN"):
                    lo = max(lo, v)
                if op in ("EQ", "LT", "LTE"):
                    hi = min(hi, v)
                if op == "BETWEEN" and (high := parse_ms(str(f.get("highValue")))) is not None:
                    hi = min(hi, high)
            lows.append(lo)
            highs.append(hi)
        index = self._time_index.get(t)
        if index is None:
            recs = sorted(self._objects[t].values(), key=lambda r: r.updated_ms)
            index = ([r.updated_ms for r in recs], recs)
            self._time_index[t] = index
        keys, records = index
        return records[bisect.bisect_left(keys, min(lows)):bisect.bisect_right(keys, max(highs))]

    @staticmethod
    def _compile_groups(groups: list[list[Callable[[_Record], bool]]]) -> Callable[[_Record], bool]:
        """One predicate: groups OR'ed, the filters of a group AND'ed."""

        def conj(tests: list[Callable[[_Record], bool]]) -> Callable[[_Record], bool]:
            if len(tests) == 1:
                return tests[0]
            if len(tests) == 2:
                a, b = tests
                return lambda rec: a(rec) and b(rec)
            return lambda rec: all(test(rec) for test in tests)

        parts = [conj(g) for g in groups if g]
        if not parts:
            return lambda rec: True
        if len(parts) == 1:
            return parts[0]
        if len(parts) == 2:
            p1, p2 = parts
            return lambda rec: p1(rec) or p2(rec)
        return lambda rec: any(part(rec) for part in parts)

    @staticmethod
    def _sort_spec(sorts: Any) -> tuple[str, bool] | None:
        if not sorts:
            return None
        if not isinstance(sorts, list):
            raise _ApiError(400, "VALIDATION_ERROR", "sorts must be a list")
        if len(sorts) > 1:
            raise _ApiError(400, "VALIDATION_ERROR", "Only one sort is supported by the search API")
        s = sorts[0]
        if isinstance(s, str):
            return (s[1:], True) if s.startswith("-") else (s, False)
        if isinstance(s, dict) and s.get("propertyName"):
            return str(s["propertyName"]), str(s.get("direction", "ASCENDING")).upper() == "DESCENDING"
        raise _ApiError(400, "VALIDATION_ERROR", f"invalid sort {s!r}")

    def _h_search(self, req: SandboxRequest) -> SandboxResponse:
        t = self._obj_type(req.params["type"])
        body = self._body(req) or {}
        if not isinstance(body, dict):
            raise _ApiError(400, "VALIDATION_ERROR", "the search request must be an object")
        groups = body.get("filterGroups") or []
        if len(groups) > 5:
            raise _ApiError(400, "VALIDATION_ERROR", f"Too many filter groups ({len(groups)}); the limit is 5")
        total_filters = 0
        for g in groups:
            n = len(g.get("filters") or [])
            if n > 10:
                raise _ApiError(400, "VALIDATION_ERROR", f"Too many filters in a group ({n}); the limit is 10")
            total_filters += n
        if total_filters > 25:
            raise _ApiError(400, "VALIDATION_ERROR", f"Too many filters ({total_filters}); the limit is 25")
        try:
            limit = int(body.get("limit", 10))
            offset = int(body.get("after") or 0)
        except (TypeError, ValueError):
            raise _ApiError(400, "VALIDATION_ERROR", "limit and after must be integers") from None
        if not 0 <= limit <= _MAX_SEARCH_LIMIT:
            raise _ApiError(400, "VALIDATION_ERROR", f"limit must be between 0 and {_MAX_SEARCH_LIMIT}")
        if offset >= self.search_cap:
            raise _ApiError(400, "VALIDATION_ERROR",
                            f"The search API cannot page past {self.search_cap} results (after={offset}); "
                            "narrow the query instead.")
        sort = self._sort_spec(body.get("sorts"))
        query = str(body.get("query") or "").strip().lower()
        with self.lock:
            match = self._compile_groups([[self._compile(t, f) for f in g.get("filters") or []] for g in groups])
            hits = []
            for rec in self._time_window(t, groups):
                if rec.archived or not match(rec):
                    continue
                if query and not any(query in (rec.props.get(p) or "").lower() for p in _SEARCH_TEXT_PROPS):
                    continue
                hits.append(rec)
            total = len(hits)
            end = min(offset + limit, self.search_cap)
            if sort is None:
                hits = heapq.nsmallest(end, hits, key=lambda r: int(r.id))
            elif sort in (("hs_lastmodifieddate", False), ("lastmodifieddate", False)) and groups:
                # The time window is already in time order: order ties, and only as far as the page needs.
                stop = end
                while 0 < stop < len(hits) and hits[stop].updated_ms == hits[stop - 1].updated_ms:
                    stop += 1
                hits = sorted(hits[:stop], key=lambda r: (r.updated_ms, r.tie))
            else:
                # Equal sort values come in an arbitrary (per-record) but stable order, not in id order.
                name, desc = sort
                get = self._accessor(t, name)
                keyed = [(get(r), r.tie, r) for r in hits]
                present = [x for x in keyed if x[0] is not None]
                missing = sorted((x for x in keyed if x[0] is None), key=lambda x: x[1])
                if desc:
                    present.sort(key=lambda x: x[1])
                    present.sort(key=lambda x: x[0], reverse=True)
                else:
                    present = heapq.nsmallest(end, present, key=lambda x: (x[0], x[1]))
                hits = [r for _, _, r in present + missing]
            page = hits[offset:end]
            out: dict[str, Any] = {
                "total": total,
                "results": [self._rec_json(t, r, body.get("properties") or None) for r in page],
            }
            if offset + len(page) < total and limit:
                out["paging"] = {"next": {"after": str(offset + len(page))}}
        return json_response(200, out)

    # -- associations ------------------------------------------------------------------------------
    def _link_ids(self, f: str, fid: str, to: str, tid: str, type_ids: set[int], now: int | None = None) -> None:
        fwd = self._assoc.setdefault((f, to), {}).setdefault(fid, {}).setdefault(tid, set())
        fwd.update(type_ids)
        back = self._assoc.setdefault((to, f), {}).setdefault(tid, {}).setdefault(fid, set())
        back.update(x for x in (reverse_type_id(i) for i in type_ids) if x is not None)
        if now is not None:
            for t, rid in ((f, fid), (to, tid)):
                rec = self._objects[t].get(rid)
                if rec is not None:
                    self._stamp(t, rec, now)

    def _assoc_type(self, f: str, to: str) -> AssociationType:
        a = ASSOCIATION_TYPES.get((f, to))
        if a is None:
            raise _ApiError(400, "VALIDATION_ERROR", f"{singular(f)} to {singular(to)} associations are not supported")
        return a

    def _spec(self, f: str, to: str, type_id: int) -> dict[str, Any]:
        primary = PRIMARY_ASSOCIATIONS.get((f, to))
        label = "Primary" if primary is not None and primary.type_id == type_id else None
        return {"category": "HUBSPOT_DEFINED", "typeId": type_id, "label": label}

    def _assoc_results(self, f: str, to: str, fid: str) -> list[dict[str, Any]]:
        return [
            {"toObjectId": int(tid), "associationTypes": [self._spec(f, to, i) for i in sorted(types)]}
            for tid, types in self._assoc.get((f, to), {}).get(fid, {}).items()
            if (rec := self._objects[to].get(tid)) is not None and not rec.archived
        ]

    def _h_assoc_list(self, req: SandboxRequest) -> SandboxResponse:
        f, to = self._obj_type(req.params["type"]), self._obj_type(req.params["to"])
        limit = min(max(self._int_arg(req, "limit", _ASSOC_PAGE), 1), _ASSOC_PAGE)
        start = self._int_arg(req, "after", 0)
        with self.lock:
            if self._find(f, req.params["id"]) is None:
                raise self._not_found(req.params["id"])
            rows = self._assoc_results(f, to, req.params["id"])
        body: dict[str, Any] = {"results": rows[start:start + limit]}
        if start + limit < len(rows):
            nxt = str(start + limit)
            body["paging"] = {"next": {"after": nxt, "link": self._link(req, nxt)}}
        return json_response(200, body)

    def _h_assoc_put_default(self, req: SandboxRequest) -> SandboxResponse:
        f, to = self._obj_type(req.params["type"]), self._obj_type(req.params["to"])
        fid, tid = req.params["id"], req.params["to_id"]
        with self.lock:
            a = self._assoc_type(f, to)
            if self._find(f, fid) is None or self._find(to, tid) is None:
                raise self._not_found(fid if self._find(f, fid) is None else tid)
            now = self._now_ms()
            self._link_ids(f, fid, to, tid, {a.type_id}, now)
        return json_response(200, {
            "status": "COMPLETE",
            "results": [{"from": {"id": fid}, "to": {"id": tid}, "associationSpec": {
                "associationCategory": "HUBSPOT_DEFINED", "associationTypeId": a.type_id}}],
            "startedAt": iso_ms(now), "completedAt": iso_ms(self._now_ms()),
        })

    def _h_assoc_put(self, req: SandboxRequest) -> SandboxResponse:
        f, to = self._obj_type(req.params["type"]), self._obj_type(req.params["to"])
        fid, tid = req.params["id"], req.params["to_id"]
        specs = self._body(req) or []
        try:
            type_ids = {int(s["associationTypeId"]) for s in specs}
        except (KeyError, TypeError, ValueError):
            raise _ApiError(400, "VALIDATION_ERROR", "expected [{associationCategory, associationTypeId}]") from None
        with self.lock:
            valid = {a.type_id for (x, y), a in list(ASSOCIATION_TYPES.items()) + list(PRIMARY_ASSOCIATIONS.items())
                     if (x, y) == (f, to)}
            if not type_ids or not type_ids <= valid:
                raise _ApiError(400, "VALIDATION_ERROR", f"invalid association types {sorted(type_ids)}")
            if self._find(f, fid) is None or self._find(to, tid) is None:
                raise self._not_found(fid if self._find(f, fid) is None else tid)
            self._link_ids(f, fid, to, tid, type_ids, self._now_ms())
        return json_response(201, {
            "fromObjectTypeId": OBJECT_TYPES[f][0], "fromObjectId": int(fid),
            "toObjectTypeId": OBJECT_TYPES[to][0], "toObjectId": int(tid),
            "labels": ["Primary"] if any(self._spec(f, to, i)["label"] for i in type_ids) else [],
        })

    def _h_assoc_batch_read(self, req: SandboxRequest) -> SandboxResponse:
        f, to = self._obj_type(req.params["type"]), self._obj_type(req.params["to"])
        body = self._body(req)
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            raise _ApiError(400, "VALIDATION_ERROR", "inputs is required")
        if len(body["inputs"]) > _MAX_ASSOC_BATCH:
            raise _ApiError(400, "VALIDATION_ERROR", f"Batch input size exceeds the limit of {_MAX_ASSOC_BATCH}")
        started = self._now_ms()
        results, errors = [], []
        with self.lock:
            for item in body["inputs"]:
                fid = str((item or {}).get("id", ""))
                start = int((item or {}).get("after") or 0)
                rows = self._assoc_results(f, to, fid) if self._find(f, fid) is not None else []
                if not rows:
                    errors.append(self._std_error(
                        "OBJECT_NOT_FOUND", f"No {singular(to)} is associated with {singular(f)} {fid}.",
                        {"fromObjectId": [fid]}, subCategory="crm.associations.NO_ASSOCIATIONS_FOUND"))
                    continue
                entry: dict[str, Any] = {"from": {"id": fid}, "to": rows[start:start + _ASSOC_PAGE]}
                if start + _ASSOC_PAGE < len(rows):
                    entry["paging"] = {"next": {"after": str(start + _ASSOC_PAGE)}}
                results.append(entry)
        return self._batch_json(results, errors, started)

    def _h_assoc_batch_default(self, req: SandboxRequest) -> SandboxResponse:
        f, to = self._obj_type(req.params["type"]), self._obj_type(req.params["to"])
        inputs = self._inputs(self._body(req))
        started = self._now_ms()
        results = []
        with self.lock:
            a = self._assoc_type(f, to)
            now = self._now_ms()
            for item in inputs:
                fid, tid = str(item["from"]["id"]), str(item["to"]["id"])
                if self._find(f, fid) is None or self._find(to, tid) is None:
                    raise self._not_found(fid if self._find(f, fid) is None else tid)
                self._link_ids(f, fid, to, tid, {a.type_id}, now)
                results.append({"from": {"id": fid}, "to": {"id": tid}, "associationSpec": {
                    "associationCategory": "HUBSPOT_DEFINED", "associationTypeId": a.type_id}})
        return self._batch_json(results, [], started)

    def _h_assoc_batch_create(self, req: SandboxRequest) -> SandboxResponse:
        f, to = self._obj_type(req.params["type"]), self._obj_type(req.params["to"])
        inputs = self._inputs(self._body(req))
        started = self._now_ms()
        results = []
        with self.lock:
            now = self._now_ms()
            for item in inputs:
                fid, tid = str(item["from"]["id"]), str(item["to"]["id"])
                type_ids = {int(s["associationTypeId"]) for s in item.get("types") or []}
                if not type_ids or self._find(f, fid) is None or self._find(to, tid) is None:
                    raise _ApiError(400, "VALIDATION_ERROR", f"invalid association {fid} -> {tid}")
                self._link_ids(f, fid, to, tid, type_ids, now)
                results.append({"fromObjectTypeId": OBJECT_TYPES[f][0], "fromObjectId": int(fid),
                                "toObjectTypeId": OBJECT_TYPES[to][0], "toObjectId": int(tid), "labels": []})
        return self._batch_json(results, [], started, status=201)

    def _h_assoc_labels(self, req: SandboxRequest) -> SandboxResponse:
        f, to = self._obj_type(req.params["type"]), self._obj_type(req.params["to"])
        rows = []
        for table in (ASSOCIATION_TYPES, PRIMARY_ASSOCIATIONS):
            a = table.get((f, to))
            if a is not None:
                rows.append({"category": "HUBSPOT_DEFINED", "typeId": a.type_id, "label": a.label})
        return json_response(200, {"results": rows})

    def _h_assoc_v3_batch_read(self, req: SandboxRequest) -> SandboxResponse:
        f, to = self._obj_type(req.params["type"]), self._obj_type(req.params["to"])
        body = self._body(req)
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            raise _ApiError(400, "VALIDATION_ERROR", "inputs is required")
        if len(body["inputs"]) > _MAX_ASSOC_BATCH:
            raise _ApiError(400, "VALIDATION_ERROR", f"Batch input size exceeds the limit of {_MAX_ASSOC_BATCH}")
        inputs = body["inputs"]
        started = self._now_ms()
        results = []
        with self.lock:
            for item in inputs:
                fid = str((item or {}).get("id", ""))
                links = self._assoc.get((f, to), {}).get(fid, {})
                if links:
                    results.append({"from": {"id": fid}, "to": [
                        {"id": tid, "type": self._v3_type_name(f, to, min(types))} for tid, types in links.items()]})
        return self._batch_json(results, [], started)

    # -- properties and groups -----------------------------------------------------------------------
    def _h_props_list(self, req: SandboxRequest) -> SandboxResponse:
        t = self._obj_type(req.params["type"])
        with self.lock:
            return json_response(200, {"results": list(self._props[t].values())})

    def _h_prop_get(self, req: SandboxRequest) -> SandboxResponse:
        t = self._obj_type(req.params["type"])
        with self.lock:
            prop = self._props[t].get(req.params["name"])
        if prop is None:
            raise _ApiError(404, "OBJECT_NOT_FOUND", f"Unable to find property {req.params['name']}")
        return json_response(200, prop)

    def _new_property(self, t: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _ApiError(400, "VALIDATION_ERROR", "property definition must be an object")
        missing = [k for k in ("name", "label", "type", "fieldType", "groupName") if not body.get(k)]
        if missing:
            raise _ApiError(400, "VALIDATION_ERROR", f"Missing required fields: {missing}")
        name = str(body["name"])
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,99}", name) or name.startswith("hs_"):
            raise _ApiError(400, "VALIDATION_ERROR", f"Property name {name!r} is invalid: use lower-case letters, "
                            "digits and underscores, not starting with hs_")
        if name in self._props[t]:
            raise _ApiError(409, "OBJECT_ALREADY_EXISTS", f"Property named '{name}' already exists.")
        if body["type"] not in _TYPES or body["fieldType"] not in _FIELD_TYPES:
            raise _ApiError(400, "VALIDATION_ERROR", f"invalid type/fieldType {body['type']}/{body['fieldType']}")
        if body["groupName"] not in self._groups[t]:
            raise _ApiError(400, "VALIDATION_ERROR", f"Property group {body['groupName']} does not exist.")
        options = tuple((str(o["value"]), str(o["label"])) for o in body.get("options") or [])
        if body["type"] == "enumeration" and not options:
            raise _ApiError(400, "VALIDATION_ERROR", "enumeration properties need options")
        pdef = PropertyDef(name, str(body["label"]), str(body["type"]), str(body["fieldType"]),
                           str(body["groupName"]), options, hubspot_defined=False,
                           has_unique_value=bool(body.get("hasUniqueValue")),
                           description=str(body.get("description") or ""))
        if pdef.type == "bool" and not options:
            pdef = PropertyDef(pdef.name, pdef.label, pdef.type, pdef.field_type, pdef.group,
                               (("true", "Yes"), ("false", "No")), hubspot_defined=False,
                               has_unique_value=pdef.has_unique_value, description=pdef.description)
        prop = pdef.to_json(len(self._props[t]), iso_ms(self._now_ms()))
        self._props[t][name] = prop
        return prop

    def _h_prop_create(self, req: SandboxRequest) -> SandboxResponse:
        t = self._obj_type(req.params["type"])
        body = self._body(req)
        with self.lock:
            return json_response(201, self._new_property(t, body))

    def _h_props_batch_read(self, req: SandboxRequest) -> SandboxResponse:
        t = self._obj_type(req.params["type"])
        inputs = self._inputs(self._body(req))
        started = self._now_ms()
        with self.lock:
            names = [str((i or {}).get("name", "")) for i in inputs]
            found = [self._props[t][n] for n in names if n in self._props[t]]
            missing = [n for n in names if n not in self._props[t]]
        errors = [self._std_error("OBJECT_NOT_FOUND", f"Unable to find properties {missing}", {"names": missing})]
        return self._batch_json(found, errors if missing else [], started)

    def _h_props_batch_create(self, req: SandboxRequest) -> SandboxResponse:
        t = self._obj_type(req.params["type"])
        inputs = self._inputs(self._body(req))
        started = self._now_ms()
        results, errors = [], []
        with self.lock:
            for item in inputs:
                try:
                    results.append(self._new_property(t, item))
                except _ApiError as exc:
                    errors.append(self._std_error(exc.category, exc.message,
                                                  {"name": [str((item or {}).get("name"))]}))
        return self._batch_json(results, errors, started, status=201)

    def _h_groups_list(self, req: SandboxRequest) -> SandboxResponse:
        t = self._obj_type(req.params["type"])
        with self.lock:
            return json_response(200, {"results": list(self._groups[t].values())})

    def _h_group_get(self, req: SandboxRequest) -> SandboxResponse:
        t = self._obj_type(req.params["type"])
        with self.lock:
            group = self._groups[t].get(req.params["name"])
        if group is None:
            raise _ApiError(404, "OBJECT_NOT_FOUND", f"Unable to find property group {req.params['name']}")
        return json_response(200, group)

    def _h_group_create(self, req: SandboxRequest) -> SandboxResponse:
        t = self._obj_type(req.params["type"])
        body = self._body(req)
        if not isinstance(body, dict) or not body.get("name") or not body.get("label"):
            raise _ApiError(400, "VALIDATION_ERROR", "name and label are required")
        name = str(body["name"])
        with self.lock:
            if name in self._groups[t]:
                raise _ApiError(409, "OBJECT_ALREADY_EXISTS", f"A property group named '{name}' already exists.")
            group = {"name": name, "label": str(body["label"]),
                     "displayOrder": int(body.get("displayOrder", len(self._groups[t]))), "archived": False}
            self._groups[t][name] = group
        return json_response(201, group)

    def _legacy_props(self, t: str) -> list[dict[str, Any]]:
        out = []
        for p in self._props[t].values():
            out.append({
                "name": p["name"], "label": p["label"], "description": p["description"],
                "groupName": p["groupName"], "type": p["type"], "fieldType": p["fieldType"],
                "options": [{"label": o["label"], "value": o["value"], "displayOrder": o["displayOrder"],
                             "hidden": False, "readOnly": False} for o in p["options"]],
                "hidden": False, "calculated": p["calculated"], "externalOptions": False,
                "readOnlyValue": p["modificationMetadata"]["readOnlyValue"],
                "readOnlyDefinition": p["modificationMetadata"]["readOnlyDefinition"],
                "hubspotDefined": p["hubspotDefined"], "formField": p["formField"],
                "displayOrder": p["displayOrder"], "hasUniqueValue": p["hasUniqueValue"], "deleted": False,
                "createdAt": parse_ms(p["createdAt"]), "updatedAt": parse_ms(p["updatedAt"]), "favorited": False,
            })
        return out

    def _h_props_legacy(self, req: SandboxRequest) -> SandboxResponse:
        t = self._obj_type(req.params["type"])
        with self.lock:
            return json_response(200, self._legacy_props(t))

    def _h_props_legacy_companies(self, req: SandboxRequest) -> SandboxResponse:
        with self.lock:
            return json_response(200, self._legacy_props("companies"))

    # -- pipelines, owners -------------------------------------------------------------------------
    def _pipelines_of(self, name: str) -> list[dict[str, Any]]:
        t = self._obj_type(name)
        if t == "deals":
            return self._pipelines
        if t == "tickets":
            created = self._pipelines[0]["createdAt"]
            return [{"id": "0", "label": "Support Pipeline", "displayOrder": 0, "createdAt": created,
                     "updatedAt": created, "archived": False, "stages": [
                         {"id": sid, "label": label, "displayOrder": i, "metadata": {"ticketState": state},
                          "createdAt": created, "updatedAt": created, "archived": False,
                          "writePermissions": "CRM_PERMISSIONS_ENFORCEMENT"}
                         for i, (sid, label, state) in enumerate((("1", "New", "OPEN"), ("2", "Waiting", "OPEN"),
                                                                  ("4", "Closed", "CLOSED")))]}]
        raise _ApiError(400, "VALIDATION_ERROR", f"{name} has no pipelines")

    def _h_pipelines(self, req: SandboxRequest) -> SandboxResponse:
        return json_response(200, {"results": self._pipelines_of(req.params["type"])})

    def _pipeline(self, req: SandboxRequest) -> dict[str, Any]:
        for p in self._pipelines_of(req.params["type"]):
            if p["id"] == req.params["pipeline"]:
                return p
        raise _ApiError(404, "OBJECT_NOT_FOUND", f"Unable to find pipeline {req.params['pipeline']}")

    def _h_pipeline(self, req: SandboxRequest) -> SandboxResponse:
        return json_response(200, self._pipeline(req))

    def _h_pipeline_stages(self, req: SandboxRequest) -> SandboxResponse:
        return json_response(200, {"results": self._pipeline(req)["stages"]})

    def _h_owners(self, req: SandboxRequest) -> SandboxResponse:
        limit = min(max(self._int_arg(req, "limit", 100), 1), 500)
        start = self._int_arg(req, "after", 0)
        with self.lock:
            rows = self._owners[start:start + limit]
            body: dict[str, Any] = {"results": rows}
            if start + limit < len(self._owners):
                nxt = str(start + limit)
                body["paging"] = {"next": {"after": nxt, "link": self._link(req, nxt)}}
        return json_response(200, body)

    # -- legacy v1/v2 lists ------------------------------------------------------------------------
    def _legacy_record(self, t: str, rec: _Record, names: list[str]) -> dict[str, Any]:
        props = {}
        for n in names or list(rec.props):
            if n in rec.props:
                v = rec.props[n]
                props[n] = {"value": v, "timestamp": rec.updated_ms, "source": "API", "sourceId": None,
                            "versions": [{"name": n, "value": v, "timestamp": rec.updated_ms, "source": "API",
                                          "sourceVid": []}]}
        return props

    def _legacy_page(self, req: SandboxRequest, t: str) -> tuple[list[_Record], int, bool]:
        limit = min(max(self._int_arg(req, "limit", 100), 1), 250)
        offset = self._int_arg(req, "offset", 0)
        items = [r for r in self._objects[t].values() if not r.archived and int(r.id) > offset]
        page = items[:limit]
        nxt = int(page[-1].id) if page else offset
        return page, nxt, len(items) > limit

    def _h_legacy_deals(self, req: SandboxRequest) -> SandboxResponse:
        names = req.args("properties")
        with self.lock:
            page, nxt, more = self._legacy_page(req, "deals")
            deals = [{
                "portalId": self.portal_id, "dealId": int(r.id), "isDeleted": False,
                "associations": {
                    "associatedCompanyIds": [int(x) for x in self._assoc.get(("deals", "companies"), {}).get(r.id, {})],
                    "associatedVids": [int(x) for x in self._assoc.get(("deals", "contacts"), {}).get(r.id, {})],
                    "associatedDealIds": [], "associatedTicketIds": [],
                },
                "properties": self._legacy_record("deals", r, names),
            } for r in page]
        return json_response(200, {"deals": deals, "hasMore": more, "offset": nxt})

    def _legacy_company(self, r: _Record, names: list[str]) -> dict[str, Any]:
        return {"portalId": self.portal_id, "companyId": int(r.id), "isDeleted": False,
                "properties": self._legacy_record("companies", r, names)}

    def _h_legacy_companies(self, req: SandboxRequest) -> SandboxResponse:
        names = req.args("properties")
        with self.lock:
            page, nxt, more = self._legacy_page(req, "companies")
            rows = [self._legacy_company(r, names) for r in page]
        return json_response(200, {"companies": rows, "has-more": more, "offset": nxt})

    def _h_legacy_company(self, req: SandboxRequest) -> SandboxResponse:
        with self.lock:
            rec = self._find("companies", req.params["id"])
            if rec is None:
                raise self._not_found(req.params["id"])
            return json_response(200, self._legacy_company(rec, []))

    # -- OAuth ---------------------------------------------------------------------------------------
    def _h_oauth_token(self, req: SandboxRequest) -> SandboxResponse:
        form = {k: v[-1] for k, v in parse_qs(req.body.decode("utf-8", "replace")).items()}
        if form.get("grant_type") not in ("refresh_token", "authorization_code") or not self.access_tokens:
            return json_response(400, {"status": "BAD_GRANT_TYPE", "message": "unsupported grant_type",
                                       "correlationId": self._correlation_id()})
        return json_response(200, {
            "token_type": "bearer", "access_token": self.access_tokens[0], "expires_in": 1800,
            "refresh_token": form.get("refresh_token") or "sandbox-refresh-token",
        })

    def _h_oauth_token_info(self, req: SandboxRequest) -> SandboxResponse:
        token = req.params["token"]
        if token not in self.access_tokens:
            return json_response(404, {"status": "error", "message": "Token not found",
                                       "correlationId": self._correlation_id()})
        return json_response(200, {
            "token": token, "user": "sandbox@atelier-numerique.fr", "hub_domain": "sandbox.hubspot.com",
            "scopes": ["oauth", "crm.objects.deals.read", "crm.objects.deals.write",
                       "crm.objects.companies.read", "crm.objects.companies.write", "crm.objects.quotes.read",
                       "crm.objects.line_items.read", "crm.schemas.deals.write"],
            "hub_id": self.portal_id, "app_id": 1, "expires_in": 1800, "user_id": 1, "token_type": "access",
        })

    # -- seeding -----------------------------------------------------------------------------------
    def tax_rate_groups(self) -> dict[str, Decimal]:
        """``hs_tax_rate_group_id`` -> rate in percent, as the portal's tax library defines them."""
        return {gid: Decimal(rate) for rate, gid in _TAX_GROUPS.items()}

    def load_book(self, book: Book) -> None:
        """Create the book's products, companies, contacts, deals, line items, quotes and sales activities."""
        rng = random.Random(f"hubspot-load-{self.seed}")
        with self.lock:
            owners: dict[str, str] = {}
            for i, email in enumerate(sorted({d.owner for d in book.deals})):
                oid = str(51_230_000 + i * 17)
                first, _, last = email.split("@")[0].partition(".")
                owners[email] = oid
                at = iso_ms(to_ms(_PORTAL_EPOCH))
                self._owners.append({"id": oid, "email": email, "type": "PERSON", "firstName": first.title(),
                                     "lastName": last.title(), "userId": 7_000_000 + i, "createdAt": at,
                                     "updatedAt": at, "archived": False, "teams": []})
            self._props["deals"]["hubspot_owner_id"]["options"] = [
                {"label": o["email"], "value": o["id"], "displayOrder": i, "hidden": False, "description": ""}
                for i, o in enumerate(self._owners)]
            start = to_ms(_PORTAL_EPOCH)
            products: dict[str, str] = {}
            for p in book.products:
                rec = self._insert("products", {
                    "name": p.name, "description": p.name, "price": str(p.unit_price), "hs_sku": p.sku,
                    "tax_rate_percent": str(p.tax_rate),
                    "hs_product_type": "service" if p.sku.startswith(("SVC", "LIC", "WORKS")) else "inventory",
                }, start - 400 * 86_400_000, start - 300 * 86_400_000)
                products[p.sku] = rec.id
            first_deal: dict[str, int] = {}
            for d in book.deals:
                ms = to_ms(d.created_at)
                first_deal[d.company_id] = min(first_deal.get(d.company_id, ms), ms)
            companies: dict[str, str] = {}
            contacts: dict[str, str] = {}
            for c in book.companies:
                created = first_deal.get(c.id, start) - rng.randint(1, 200) * 86_400_000 - rng.randrange(86_400_000)
                props = {"name": c.name, "country": COUNTRY_NAMES.get(c.country, c.country), "city": c.city,
                         "zip": c.postal_code, "address": c.address, "billing_currency": c.currency,
                         "hs_analytics_source": c.acquisition_source.upper(), "ledgerbridge_book_id": c.id}
                if c.domain:
                    props["domain"] = c.domain
                    props["website"] = f"https://www.{c.domain}"
                for key, value in (("billing_email", c.email), ("vat_number", c.vat_number), ("siren", c.siren),
                                   ("siret", c.siret)):
                    if value:
                        props[key] = value
                rec = self._insert("companies", props, created, created + rng.randint(1, 60) * 86_400_000)
                companies[c.id] = rec.id
                self._book_ids["companies"][c.id] = rec.id
                first = rng.choice(_FIRST_NAMES)
                last = c.name.split()[1] if len(c.name.split()) > 1 else c.name
                cprops = {"firstname": first, "lastname": last, "company": c.name, "jobtitle": "Direction"}
                if c.domain:
                    local = unicodedata.normalize("NFKD", first.lower()).encode("ascii", "ignore").decode()
                    cprops["email"] = f"{local}@{c.domain}"
                contact = self._insert("contacts", cprops, created, created + 86_400_000)
                contacts[c.id] = contact.id
                self._link_ids("contacts", contact.id, "companies", rec.id,
                               {ASSOCIATION_TYPES[("contacts", "companies")].type_id,
                                PRIMARY_ASSOCIATIONS[("contacts", "companies")].type_id})
            for d in book.deals:
                pipeline = CUSTOM_PIPELINE_ID if rng.random() < 0.4 else "default"
                created, updated = to_ms(d.created_at), to_ms(d.updated_at)
                props = {"dealname": d.name, "amount": str(d.amount), "deal_currency_code": d.currency,
                         "pipeline": pipeline, "dealstage": _BOOK_STAGE[pipeline][d.stage],
                         "hubspot_owner_id": owners[d.owner], "dealtype": "newbusiness",
                         "hs_analytics_source": d.acquisition_source.upper(), "ledgerbridge_book_id": d.id}
                if d.close_date is not None:
                    props["closedate"] = iso_ms(to_ms(dt.datetime.combine(d.close_date, dt.time(), dt.UTC)))
                deal = self._insert("deals", props, created, updated)
                self._book_ids["deals"][d.id] = deal.id
                cid = companies[d.company_id]
                self._link_ids("deals", deal.id, "companies", cid,
                               {ASSOCIATION_TYPES[("deals", "companies")].type_id,
                                PRIMARY_ASSOCIATIONS[("deals", "companies")].type_id})
                self._link_ids("deals", deal.id, "contacts", contacts[d.company_id],
                               {ASSOCIATION_TYPES[("deals", "contacts")].type_id})
                for line in self._insert_lines(d.lines, d.currency, products, created):
                    self._link_ids("deals", deal.id, "line_items", line.id,
                                   {ASSOCIATION_TYPES[("deals", "line_items")].type_id})
                if d.quote is not None:
                    q_created = created + (updated - created) // 3
                    q_updated = max(q_created, updated - rng.randrange(0, max(updated - q_created, 1)))
                    qlines = self._insert_lines(d.quote.lines, d.currency, products, q_created)
                    total = sum((Decimal(x.props.get("amount", "0")) for x in qlines), Decimal(0))
                    qprops = {"hs_title": f"Devis – {d.name}", "hs_currency": d.currency,
                              "hs_expiration_date": iso_ms(q_created + 30 * 86_400_000)[:10],
                              "hs_quote_amount": _plain(total), "hs_public_url_key": f"{rng.getrandbits(64):016x}",
                              "hs_quote_number": f"{d.quote.id}-{deal.id[-4:]}", "ledgerbridge_book_id": d.quote.id}
                    qprops.update(self._quote_state(d.quote.status, rng, q_updated))
                    quote = self._insert("quotes", qprops, q_created, q_updated)
                    self._book_ids["quotes"][d.quote.id] = quote.id
                    self._link_ids("quotes", quote.id, "deals", deal.id,
                                   {ASSOCIATION_TYPES[("quotes", "deals")].type_id})
                    self._link_ids("quotes", quote.id, "companies", cid,
                                   {ASSOCIATION_TYPES[("quotes", "companies")].type_id})
                    for line in qlines:
                        self._link_ids("quotes", quote.id, "line_items", line.id,
                                       {ASSOCIATION_TYPES[("quotes", "line_items")].type_id})
            self._seed_activities(book, companies, contacts, owners)

    def _seed_activities(self, book: Book, companies: dict[str, str], contacts: dict[str, str],
                         owners: dict[str, str]) -> None:
        """Every deal's sales activities (:meth:`Book.activities`) as engagements, each associated with its deal,
        the deal's company and its contact, as HubSpot associates a logged activity.

        Created after every other record of the book, so that seeding them moves no other record's id.
        """
        deal_ids = self._book_ids["deals"]
        for d in book.deals:
            links = (("deals", deal_ids[d.id]), ("companies", companies[d.company_id]),
                     ("contacts", contacts[d.company_id]))
            for activity in book.activities(d):
                t = ENGAGEMENT_TYPES[activity.kind]
                at = to_ms(activity.at)
                rec = self._insert(t, self._engagement_props(activity, owners[d.owner]), at, at)
                for to, tid in links:
                    self._link_ids(t, rec.id, to, tid, {ASSOCIATION_TYPES[(t, to)].type_id})

    @staticmethod
    def _engagement_props(activity: BookActivity, owner_id: str) -> dict[str, str]:
        at = to_ms(activity.at)
        props = {"hs_timestamp": iso_ms(at), "hubspot_owner_id": owner_id}
        if activity.kind == "call":
            props.update(hs_call_title=activity.subject, hs_call_direction="OUTBOUND", hs_call_status="COMPLETED",
                         hs_call_duration=str(activity.duration_minutes * 60_000))
        elif activity.kind == "meeting":
            props.update(hs_meeting_title=activity.subject, hs_meeting_start_time=iso_ms(at),
                         hs_meeting_end_time=iso_ms(at + activity.duration_minutes * 60_000),
                         hs_meeting_outcome="COMPLETED")
        elif activity.kind == "email":
            props.update(hs_email_subject=activity.subject, hs_email_direction="EMAIL", hs_email_status="SENT")
        else:
            props.update(hs_task_subject=activity.subject, hs_task_status="COMPLETED", hs_task_priority="MEDIUM",
                         hs_task_type="TODO")
        return props

    def _activity_counts(self, deal_id: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for kind, t in ENGAGEMENT_TYPES.items():
            linked = self._assoc.get(("deals", t), {}).get(deal_id, {})
            n = sum(1 for eid in linked if (rec := self._objects[t].get(eid)) is not None and not rec.archived)
            if n:
                counts[kind] = n
        return counts

    @staticmethod
    def _quote_state(status: str, rng: random.Random, at_ms: int) -> dict[str, str]:
        if status == "accepted":
            if rng.random() < 0.5:  # a CPQ quote the buyer accepted
                return {"hs_status": "ACCEPTED", "hs_accepted_date": iso_ms(at_ms), "hs_esign_enabled": "false"}
            return {"hs_status": "APPROVAL_NOT_NEEDED", "hs_esign_enabled": "true",  # legacy, signed
                    "hs_esign_num_signers_required": "1", "hs_esign_num_signers_completed": "1"}
        if status == "sent":
            if rng.random() < 0.5:
                return {"hs_status": "APPROVAL_NOT_NEEDED", "hs_esign_enabled": "true",
                        "hs_esign_num_signers_required": "2", "hs_esign_num_signers_completed": "1"}
            return {"hs_status": "APPROVAL_NOT_NEEDED", "hs_esign_enabled": "false"}
        if status == "rejected":
            return {"hs_status": "REJECTED", "hs_esign_enabled": "false"}
        return {"hs_status": "DRAFT", "hs_esign_enabled": "false"}

    def _insert_lines(self, lines: tuple[BookLine, ...], currency: str, products: dict[str, str],
                      created: int) -> list[_Record]:
        out = []
        for pos, ln in enumerate(lines):
            props = {"name": ln.description, "hs_sku": ln.sku, "quantity": str(ln.quantity),
                     "price": str(ln.unit_price), "tax_rate_percent": str(ln.tax_rate),
                     "hs_line_item_currency_code": currency, "hs_position_on_quote": str(pos)}
            if ln.discount_percent:
                props["hs_discount_percentage"] = str(ln.discount_percent)
            group = _TAX_GROUPS.get(str(ln.tax_rate))
            if group:
                props["hs_tax_rate_group_id"] = group
            if ln.sku in products:
                props["hs_product_id"] = products[ln.sku]
            out.append(self._insert("line_items", props, created, created))
        return out

    # -- inspection helpers for tests ------------------------------------------------------------------
    def deal_ids_by_book_id(self) -> dict[str, str]:
        """Book deal id (``D00001``) -> HubSpot deal id."""
        with self.lock:
            return dict(self._book_ids["deals"])

    def company_ids_by_book_id(self) -> dict[str, str]:
        with self.lock:
            return dict(self._book_ids["companies"])

    def quote_ids_by_book_id(self) -> dict[str, str]:
        with self.lock:
            return dict(self._book_ids["quotes"])

    def properties_of(self, object_type: str, object_id: str) -> dict[str, str]:
        """A copy of every property of one record (archived ones included)."""
        t = self._obj_type(object_type)
        with self.lock:
            return dict(self._objects[t][object_id].props)

    def object_ids(self, object_type: str, *, archived: bool = False) -> list[str]:
        t = self._obj_type(object_type)
        with self.lock:
            return [r.id for r in self._objects[t].values() if r.archived == archived]

    def associated_ids(self, from_type: str, object_id: str, to_type: str) -> list[str]:
        f, to = self._obj_type(from_type), self._obj_type(to_type)
        with self.lock:
            return list(self._assoc.get((f, to), {}).get(object_id, {}))

    def activity_counts_of(self, deal_id: str) -> dict[str, int]:
        """The live calls, meetings, emails and tasks associated with one deal, counted by kind (zeros left out)."""
        with self.lock:
            return self._activity_counts(deal_id)

    def deals_snapshot(self) -> list[dict[str, str]]:
        """Every live deal's properties (with ``id``)."""
        with self.lock:
            return [{"id": r.id, **r.props} for r in self._objects["deals"].values() if not r.archived]

    def modify_deal(self, deal_id: str, **props: Any) -> dict[str, str]:
        """Change a deal as a user would in HubSpot (validated, ``hs_lastmodifieddate`` bumped)."""
        return self.modify("deals", deal_id, **props)

    def modify(self, object_type: str, object_id: str, **props: Any) -> dict[str, str]:
        t = self._obj_type(object_type)
        errors: list[dict[str, Any]] = []
        with self.lock:
            rec = self._objects[t][object_id]
            clean = self._validate(t, props, errors, rec.props)
            if errors:
                raise ValueError(json.dumps(errors))
            self._apply(t, rec, clean, self._now_ms())
            return dict(rec.props)

    def touch(self, object_type: str, ids: Iterable[str], at: dt.datetime | None = None) -> int:
        """Set ``hs_lastmodifieddate`` of ``ids`` to one instant (default: now); returns that epoch ms."""
        t = self._obj_type(object_type)
        with self.lock:
            ms = to_ms(at) if at is not None else self._now_ms()
            for rid in ids:
                self._stamp(t, self._objects[t][rid], ms)
            return ms

    def archive_object(self, object_type: str, object_id: str) -> None:
        t = self._obj_type(object_type)
        with self.lock:
            self._archive(t, self._objects[t][object_id], self._now_ms())

    # == webhooks (sending) ===========================================================================
    # HubSpot's webhooks for deals: deal.creation, deal.propertyChange (one event per changed property; every
    # property unless the registration names some, as a HubSpot subscription does) and deal.deletion, sent
    # as JSON arrays of at most 100 events and signed with the app's client secret (X-HubSpot-Signature-v3
    # over method, URL, body and X-HubSpot-Request-Timestamp; the older v1 signature beside it). Off until
    # POST /_sandbox/webhooks {"url", "client_secret", "app_id"?, "properties"?, "deliveries"?, ...} (see
    # connectors.sandboxwebhooks). Not persisted: save() writes no registration and load() keeps the one in
    # force. Event ids are random, so they never repeat across restarts.

    _webhook_sender: WebhookSender | None = None
    _webhook_app: dict[str, Any] | None = None

    def _webhook_admin(self, req: SandboxRequest) -> SandboxResponse:
        resp, self._webhook_sender = webhook_admin(req, self._webhook_sender, self._webhook_start)
        return resp

    def _webhook_start(self, body: Any) -> tuple[WebhookSender, dict[str, Any]]:
        secret = body.get("client_secret")
        if not isinstance(secret, str) or not secret:
            raise ValueError("'client_secret' (the app's client secret, which signs the requests) is required")
        props = body.get("properties")
        if props is not None and (not isinstance(props, list) or not all(isinstance(p, str) for p in props)):
            raise ValueError("'properties' must be a list of deal property names")
        app_id = body.get("app_id", 1_000_000 + self.seed % 1_000_000)
        if not isinstance(app_id, int) or isinstance(app_id, bool):
            raise ValueError("'app_id' must be an integer")
        target = WebhookTarget.from_body(body, batch_size=100)

        def build(events: list[dict[str, Any]], attempt: int) -> tuple[bytes, dict[str, str]]:
            payload = compact_json([{**e, "attemptNumber": attempt} for e in events])
            timestamp = str(epoch_ms())  # the sending moment, on the real clock
            return payload, {
                "Content-Type": "application/json",
                "User-Agent": "HubSpot Connect 2.0 (http://dev.hubspot.com/)",
                "X-HubSpot-Signature-v3": sign_hubspot_v3(secret, "POST", target.url, payload, timestamp),
                "X-HubSpot-Request-Timestamp": timestamp,
                "X-HubSpot-Signature": sign_hubspot_v1(secret, payload),
                "X-HubSpot-Signature-Version": "v1",
            }

        with self.lock:
            self._webhook_app = {"app_id": app_id, "properties": None if props is None else frozenset(props),
                                 "subscriptions": {}}
        sender = WebhookSender(target, build, name="hubspot-webhooks")
        return sender, {"app_id": app_id, "portal_id": self.portal_id,
                        "properties": None if props is None else sorted(props)}

    def _webhook_event(self, kind: str, rec: _Record, at_ms: int, **extra: Any) -> dict[str, Any]:
        app = self._webhook_app or {}
        subs: dict[str, int] = app.setdefault("subscriptions", {})
        key = f"{kind}:{extra.get('propertyName', '')}"
        sub_id = subs.setdefault(key, 3_000_000 + len(subs) + 1)
        return {"eventId": new_event_id(), "subscriptionId": sub_id, "portalId": self.portal_id,
                "appId": app.get("app_id"), "occurredAt": at_ms, "subscriptionType": kind, "attemptNumber": 0,
                "objectId": int(rec.id), "changeSource": "CRM", **extra}

    def _webhook_created(self, t: str, rec: _Record) -> None:
        sender = self._webhook_sender
        if sender is not None and t == "deals":
            sender.emit([self._webhook_event("deal.creation", rec, rec.updated_ms, changeFlag="NEW")])

    def _webhook_changed(self, t: str, rec: _Record, clean: dict[str, str | None], now: int) -> None:
        """Called before ``clean`` is applied to ``rec``: one event per property whose value changes."""
        sender = self._webhook_sender
        if sender is None or t != "deals" or rec.archived:
            return
        wanted = (self._webhook_app or {}).get("properties")
        sender.emit([
            self._webhook_event("deal.propertyChange", rec, now, propertyName=name, propertyValue=value or "")
            for name, value in clean.items()
            if rec.props.get(name) != value and (wanted is None or name in wanted)
        ])

    def _webhook_archived(self, t: str, rec: _Record, now: int) -> None:
        sender = self._webhook_sender
        if sender is not None and t == "deals":
            sender.emit([self._webhook_event("deal.deletion", rec, now, changeFlag="DELETED")])

    def webhook_sender(self) -> WebhookSender | None:
        """The sender in force (None while sending is off)."""
        return self._webhook_sender
