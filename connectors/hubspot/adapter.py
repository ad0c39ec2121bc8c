"""HubSpot as a :class:`~connectors.interfaces.CrmSource`, built on the official hubspot-api-client.

Pulling changed deals
    The search API is the only way to ask HubSpot for "deals modified since": it takes one sort, caps every
    query at 10,000 results (paging past the cap answers 400), and returns records with equal sort values in
    no particular order. :meth:`HubSpotSource.changed_deals` therefore never pages a time-sorted query: each
    query asks for the first page after the compound cursor (``hs_lastmodifieddate``, ``hs_object_id``),
    expressed as two OR'ed filter groups (same timestamp and a greater id, or a later timestamp), both capped
    at ``until``. The deals of a full page whose timestamp equals the page's last one may continue on the
    next page, so they are left for the next query; the rest are complete and sorted by (timestamp, id).
    When a whole page shares one timestamp, that timestamp is walked alone, sorted by id, restarting the
    query from the last id before the 10,000 cap. A deal is won when HubSpot's calculated
    ``hs_is_closed_won`` is ``"true"`` (never a comparison of stage names: custom pipelines use numeric ids).

Every live deal of a page gets its customer (its primary company) through one v4 associations batch read and
company batch reads of 100, so open and lost deals carry theirs at no call of their own; won deals also get
their lines (associations to line items and quotes, then batch reads of quotes and line items). When the
customer accepted a quote, the invoice lines come from the quote (``lines_source="quote"``), otherwise from
the deal. A quote is accepted when its ``hs_status`` is one of ``quote_accepted_statuses`` (``ACCEPTED``: CPQ
quotes move there when the buyer accepts) or, for legacy quotes, when it is published and every e-signature it
requires is collected.

A deal's ``probability`` is HubSpot's calculated ``hs_deal_stage_probability`` (0..1, the stage's probability;
rounded to four places, as HubSpot writes it as a binary double's decimal expansion), 1 once won and 0 once
lost; ``created_at`` is ``createdate``, and the customer's ``created_at`` and ``acquisition_source`` are the
company's ``createdate`` and ``hs_analytics_source``. :meth:`HubSpotSource.activity_counts` reads the deals'
associations to calls, meetings, emails and tasks (v4 batch reads of 1,000 deals per activity type).

Every SDK call goes through :func:`connectors.http.retrying` (the SDK's own retries are off) after the
proactive :class:`~connectors.http.RateBudget` (``requests_per_10s`` and ``searches_per_s`` less a margin,
windows divided by ``time_scale``). SDK exceptions become :mod:`connectors.errors` types; none escapes.
Writes are safe to retry: batch updates set absolute values, and creating a property or a group that already
exists (409) counts as done.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar, Literal, TypeVar

import structlog
import urllib3
from hubspot import HubSpot
from hubspot.crm.objects import Filter, FilterGroup, PublicObjectSearchRequest
from hubspot.crm.properties import OptionInput, PropertyCreate, PropertyGroupCreate
from pydantic import ValidationError
from urllib3.util.retry import Retry

from config.schema import ConnectorSettings
from connectors.domain import Address, Customer, Deal, LineItem
from connectors.errors import (
    AuthError,
    ConfigError,
    ConnectorError,
    QuotaExhaustedError,
    RateLimitedError,
    TransientError,
    VendorError,
)
from connectors.http import RateBudget, fingerprint, parse_retry_after, retrying, shared_budget
from connectors.hubspot.catalog import ENGAGEMENT_TYPES, PRIMARY_ASSOCIATIONS
from connectors.hubspot.settings import HUBSPOT_API, HubSpotSettings
from connectors.interfaces import (
    ApiStats,
    CrmSource,
    Cursor,
    DealPage,
    FieldSpec,
    FieldUpdate,
    TokenStore,
    WriteResult,
)

__all__ = ["HubSpotSource"]

log = structlog.get_logger("ledgerbridge.hubspot")
T = TypeVar("T")

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS = dt.timedelta(milliseconds=1)
_MAX_SEARCH_PAGE = 200
_ASSOCIATION_BATCH = 1000  # ids per associations batch read (HubSpot changelog, February 2025)

DEAL_PROPERTIES = (
    "dealname", "amount", "deal_currency_code", "dealstage", "pipeline", "closedate", "hubspot_owner_id",
    "hs_analytics_source", "hs_is_closed_won", "hs_is_closed", "hs_deal_stage_probability", "createdate",
    "hs_lastmodifieddate", "hs_object_id",
)
QUOTE_PROPERTIES = (
    "hs_title", "hs_status", "hs_esign_enabled", "hs_esign_num_signers_required",
    "hs_esign_num_signers_completed", "hs_accepted_date", "hs_lastmodifieddate",
)
_PUBLISHED = ("APPROVAL_NOT_NEEDED", "APPROVED")
_FIELD_TYPES: dict[str, tuple[str, str]] = {
    "string": ("string", "text"), "number": ("number", "number"), "date": ("date", "date"),
    "datetime": ("datetime", "date"), "enumeration": ("enumeration", "select"), "bool": ("bool", "booleancheckbox"),
}
_OBJECT_TYPES: dict[str, str] = {"deal": "deals", "customer": "companies"}
_PRIMARY_COMPANY = PRIMARY_ASSOCIATIONS[("deals", "companies")].type_id

# Country names as HubSpot users type them -> ISO-3166 alpha-2.
_COUNTRIES: dict[str, str] = {
    "france": "FR", "germany": "DE", "deutschland": "DE", "allemagne": "DE", "belgium": "BE", "belgique": "BE",
    "belgië": "BE", "spain": "ES", "espagne": "ES", "españa": "ES", "italy": "IT", "italie": "IT", "italia": "IT",
    "netherlands": "NL", "pays-bas": "NL", "nederland": "NL", "luxembourg": "LU", "portugal": "PT",
    "austria": "AT", "autriche": "AT", "österreich": "AT", "ireland": "IE", "irlande": "IE",
    "switzerland": "CH", "suisse": "CH", "schweiz": "CH", "united kingdom": "GB", "royaume-uni": "GB",
    "uk": "GB", "great britain": "GB", "united states": "US", "united states of america": "US", "usa": "US",
    "états-unis": "US", "etats-unis": "US", "canada": "CA", "poland": "PL", "pologne": "PL", "sweden": "SE",
    "suède": "SE", "denmark": "DK", "danemark": "DK", "finland": "FI", "finlande": "FI", "greece": "GR",
    "grèce": "GR", "czech republic": "CZ", "czechia": "CZ", "monaco": "MC", "morocco": "MA", "maroc": "MA",
    "tunisia": "TN", "tunisie": "TN", "algeria": "DZ", "algérie": "DZ",
}


def _to_ms(value: dt.datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return (value - _EPOCH) // _MS


def _from_ms(ms: int) -> dt.datetime:
    return _EPOCH + ms * _MS


def _parse_ms(value: str | None) -> int | None:
    if not value:
        return None
    v = value.strip()
    if v.lstrip("-").isdigit():
        return int(v)
    try:
        if len(v) == 10:
            return _to_ms(dt.datetime.combine(dt.date.fromisoformat(v), dt.time(), dt.UTC))
        return _to_ms(dt.datetime.fromisoformat(v))
    except ValueError:
        return None


def _dec(value: str | None) -> Decimal | None:
    if value is None or not str(value).strip():
        return None
    try:
        d = Decimal(str(value).strip())
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def _probability(value: str | None, *, won: bool, closed: bool) -> Decimal | None:
    """A deal's chance of winning on the 0..1 scale: 1 once won, 0 once lost, else its stage's probability.

    HubSpot writes the calculated ``hs_deal_stage_probability`` as a binary double's decimal expansion
    (``0.200000000000000011102230246251565404236316680908203125``): it is rounded to four places. A value above 1
    is read as a percentage.
    """
    if won:
        return Decimal(1)
    if closed:
        return Decimal(0)
    p = _dec(value)
    if p is None:
        return None
    if p > 1:
        p /= 100
    return min(max(p, Decimal(0)), Decimal(1)).quantize(Decimal("0.0001")).normalize()


def _digits(value: str | None, n: int) -> str | None:
    if not value:
        return None
    cleaned = "".join(ch for ch in value if not ch.isspace() and ch not in ".-")
    return cleaned if len(cleaned) == n and cleaned.isdigit() else None


def _format_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, dt.datetime):
        ms = _to_ms(value)
        t = _from_ms(ms)
        return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)


def _chunks(seq: Sequence[T], n: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def _raised_in(exc: BaseException, prefixes: tuple[str, ...]) -> bool:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", "")) if tb is not None else ""
    return module.startswith(prefixes)


@dataclass(frozen=True)
class _Obj:
    """A HubSpot record reduced to what the adapter reads."""

    id: str
    props: Mapping[str, str | None]
    updated_ms: int
    archived: bool = False

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> _Obj:
        props = {str(k): (None if v is None else str(v)) for k, v in (record.get("properties") or {}).items()}
        updated = _parse_ms(props.get("hs_lastmodifieddate")) or _parse_ms(record.get("updatedAt")) or 0
        return cls(str(record["id"]), props, updated, bool(record.get("archived")))

    def get(self, name: str | None) -> str | None:
        if not name:
            return None
        value = self.props.get(name)
        return value if value not in (None, "") else None


class HubSpotSource(CrmSource):
    """Deals, companies, quotes and line items of one HubSpot portal (see the module docstring)."""

    vendor: ClassVar[str] = "hubspot"
    Settings: ClassVar[type[ConnectorSettings]] = HubSpotSettings

    def __init__(self, settings: HubSpotSettings) -> None:
        self.settings = settings
        self.stats = ApiStats()
        scale = settings.time_scale
        keep = 1 - settings.rate_limit_margin
        # HubSpot counts per app token: every source of this process with the token shares its two budgets.
        account = (self.vendor, settings.base_url or HUBSPOT_API, fingerprint(settings.access_token.get_secret_value()))
        self._budget = shared_budget(
            (*account, "requests"),
            lambda: RateBudget([(max(1, math.floor(settings.requests_per_10s * keep)), 10.0 / scale)]))
        self._search_budget = shared_budget(
            (*account, "search"),
            lambda: RateBudget([(max(1, math.floor(settings.searches_per_s * keep)), 1.0 / scale)]))
        self._client = HubSpot(
            access_token=settings.access_token.get_secret_value(),
            host=settings.base_url or HUBSPOT_API,
            retry=Retry(total=0, connect=0, read=0, redirect=0, status=0, other=0, raise_on_status=False),
        )
        crm = self._client.crm
        # Each SDK API object owns a connection pool: build them once, not per call.
        self._batch = crm.objects.batch_api
        self._basic = crm.objects.basic_api
        self._search = crm.objects.search_api
        self._assoc = crm.associations.v4.batch_api
        self._properties = crm.properties.core_api
        self._groups = crm.properties.groups_api
        self._apis = (self._batch, self._basic, self._search, self._assoc, self._properties, self._groups)
        self._company_properties = tuple(dict.fromkeys(p for p in (
            "name", "domain", "website", "address", "address2", "city", "zip", "state", "country",
            "hs_analytics_source", "createdate", "hs_lastmodifieddate", settings.vat_number_property,
            settings.siren_property, settings.siret_property, settings.email_property, settings.currency_property,
        ) if p))
        self._line_properties = tuple(dict.fromkeys(p for p in (
            "name", "description", "hs_sku", "quantity", "price", "discount", "hs_discount_percentage",
            "hs_position_on_quote", "hs_tax_rate_group_id", settings.tax_rate_property,
        ) if p))

    @classmethod
    def from_config(cls, settings: Mapping[str, Any], tokens: TokenStore) -> HubSpotSource:
        """Build the connector from its ``crm:`` block; ``tokens`` is unused (private-app tokens do not rotate)."""
        try:
            parsed = HubSpotSettings.model_validate(dict(settings))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"hubspot settings: {problems}") from None
        return cls(parsed)

    def close(self) -> None:
        for api in self._apis:
            client = api.api_client
            client.rest_client.pool_manager.clear()
            client.close()

    # -- calling the SDK ---------------------------------------------------------------------------
    def _error(self, exc: BaseException, method: str, path: str) -> ConnectorError | None:
        """The connectors.errors type for an exception raised by the SDK, or None when it is not the SDK's."""
        kw: dict[str, Any] = {"vendor": self.vendor, "method": method, "path": path}
        if isinstance(exc, urllib3.exceptions.HTTPError):
            return TransientError(f"transport failure: {type(exc).__name__}", **kw)
        from_sdk = type(exc).__module__.startswith("hubspot.")
        status = getattr(exc, "status", None)
        if from_sdk and isinstance(status, int) and status >= 100:
            raw = getattr(exc, "body", None)
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw or "")
            headers: Mapping[str, str] = getattr(exc, "headers", None) or {}
            try:
                parsed = json.loads(text) if text.lstrip().startswith("{") else {}
            except ValueError:
                parsed = {}
            parsed = parsed if isinstance(parsed, dict) else {}
            kw.update(status=status, body=text[:500],
                      code=parsed.get("category") or parsed.get("errorType") or parsed.get("subCategory"),
                      request_id=parsed.get("correlationId") or headers.get("X-HubSpot-Correlation-Id"))
            message = str(parsed.get("message") or getattr(exc, "reason", None) or "request failed")
            if status == 429:
                policy = str(parsed.get("policyName") or "")
                if policy == "DAILY":
                    return QuotaExhaustedError(message, **kw)
                return RateLimitedError(message, retry_after=self._rate_wait(headers, policy), **kw)
            if status >= 500:
                return TransientError(message, retry_after=parse_retry_after(headers.get("Retry-After")), **kw)
            if status in (401, 403):
                return AuthError(message, **kw)
            return VendorError(message, **kw)
        if from_sdk or (isinstance(exc, (ValueError, TypeError, KeyError, AttributeError))
                        and _raised_in(exc, ("hubspot", "urllib3", "dateutil", "six"))):
            # Client-side validation or an answer the SDK could not read.
            return VendorError(f"unexpected answer or request: {type(exc).__name__}", **kw)
        return None

    def _rate_wait(self, headers: Mapping[str, str], policy: str) -> float:
        wait = parse_retry_after(headers.get("Retry-After"))
        if wait is not None:
            return wait
        interval = headers.get("X-HubSpot-RateLimit-Interval-Milliseconds")
        if interval and interval.isdigit():
            return int(interval) / 1000
        return (1.0 if policy == "SECONDLY" else 10.0) / self.settings.time_scale

    def _call(self, endpoint: str, fn: Callable[..., Any], *args: Any, search: bool = False,
              **kwargs: Any) -> dict[str, Any]:
        """One SDK call under the rate budget and the retry policy; errors mapped to connectors.errors.

        The SDK builds, authenticates and sends the request and turns error statuses into its exceptions; the
        answer's JSON is read here (``_preload_content=False``) rather than through the SDK's models, whose
        date parsing costs more than the whole round trip to HubSpot.
        """
        budget = self._search_budget if search else self._budget
        method, _, path = endpoint.partition(" ")
        for attempt in retrying(max_attempts=self.settings.max_attempts, stats=self.stats):
            with attempt:
                mapped: ConnectorError | None = None
                status, body = 0, b""
                budget.acquire()
                try:
                    self.stats.record(endpoint)
                    raw = fn(*args, _request_timeout=self.settings.timeout_s, _preload_content=False, **kwargs)
                    status, body = int(raw.status), bytes(raw.data or b"")  # reading releases the connection
                    if not search:
                        # Calls by other instances on this portal count in HubSpot's window, not in ours.
                        left = (getattr(raw, "headers", None) or {}).get("X-HubSpot-RateLimit-Remaining")
                        if isinstance(left, str) and left.isdigit():
                            budget.observe(int(left))
                except Exception as exc:
                    mapped = self._error(exc, method, path)
                    if mapped is None:
                        raise
                finally:
                    budget.release()
                if mapped is not None:
                    # Raised outside the except block so that the SDK exception is not chained to it.
                    if isinstance(mapped, RateLimitedError):
                        self.stats.rate_limited += 1
                        if mapped.retry_after:
                            budget.pause(mapped.retry_after)
                    raise mapped
                return self._json(body, status, method, path)
        raise AssertionError("unreachable")  # pragma: no cover

    def _json(self, body: bytes, status: int, method: str, path: str) -> dict[str, Any]:
        if not body.strip():
            return {}
        try:
            parsed = json.loads(body)
        except ValueError:
            raise VendorError("the answer is not JSON", vendor=self.vendor, status=status, method=method, path=path,
                              body=body[:200].decode("utf-8", "replace")) from None
        return parsed if isinstance(parsed, dict) else {"results": parsed}

    # -- reads ---------------------------------------------------------------------------------------
    def _search_deals(self, groups: list[list[tuple[str, str, str]]], sort: str, limit: int,
                      after: int | None = None) -> tuple[list[_Obj], int | None]:
        request = PublicObjectSearchRequest(
            filter_groups=[FilterGroup(filters=[Filter(property_name=p, operator=op, value=v) for p, op, v in g])
                           for g in groups],
            sorts=[{"propertyName": sort, "direction": "ASCENDING"}],
            properties=list(DEAL_PROPERTIES), limit=limit, after=str(after) if after else None,
        )
        page = self._call("POST /crm/v3/objects/deals/search", self._search.do_search, "deals", request,
                          search=True)
        nxt = ((page.get("paging") or {}).get("next") or {}).get("after")
        return [_Obj.of(r) for r in page.get("results") or []], int(nxt) if nxt is not None else None

    def _batch_read(self, object_type: str, ids: Sequence[str], properties: Sequence[str],
                    *, archived: bool = False) -> dict[str, _Obj]:
        out: dict[str, _Obj] = {}
        unique = list(dict.fromkeys(ids))
        for chunk in _chunks(unique, self.settings.batch_size):
            # Bulk bodies are plain JSON-ready dicts: an SDK model per id costs more than the request itself.
            body = {"inputs": [{"id": i} for i in chunk], "properties": list(properties), "propertiesWithHistory": []}
            resp = self._call(f"POST /crm/v3/objects/{object_type}/batch/read", self._batch.read, object_type,
                              body, archived=archived)
            for r in resp.get("results") or []:
                obj = _Obj.of(r)
                out[obj.id] = obj
        return out

    def _associations(self, from_type: str, to_type: str, ids: Sequence[str]) -> dict[str, list[tuple[str, set[int]]]]:
        """from id -> [(to id, association type ids)] through the v4 batch read (paging each object's list)."""
        out: dict[str, list[tuple[str, set[int]]]] = {}
        pending: list[tuple[str, str | None]] = [(i, None) for i in dict.fromkeys(ids)]
        while pending:
            batch, pending = pending[:_ASSOCIATION_BATCH], pending[_ASSOCIATION_BATCH:]
            body = {"inputs": [{"id": i, "after": a} if a else {"id": i} for i, a in batch]}
            resp = self._call(f"POST /crm/v4/associations/{from_type}/{to_type}/batch/read", self._assoc.get_page,
                              from_type, to_type, body)
            # Objects with no association come back as per-object errors (207): they simply have none.
            for r in resp.get("results") or []:
                fid = str(r["from"]["id"])
                rows = out.setdefault(fid, [])
                for t in r.get("to") or []:
                    rows.append((str(t["toObjectId"]), {int(a["typeId"]) for a in t.get("associationTypes") or []}))
                after = ((r.get("paging") or {}).get("next") or {}).get("after")
                if after:
                    pending.append((fid, str(after)))
        return out

    def _quote_accepted(self, q: _Obj) -> bool:
        status = (q.get("hs_status") or "").upper()
        if status in self.settings.quote_accepted_statuses:
            return True
        if not self.settings.quote_esign_completed_is_accepted or status not in _PUBLISHED:
            return False
        if (q.get("hs_esign_enabled") or "").lower() != "true":
            return False
        required = _dec(q.get("hs_esign_num_signers_required"))
        done = _dec(q.get("hs_esign_num_signers_completed"))
        return required is not None and done is not None and required > 0 and done >= required

    def _customer(self, c: _Obj) -> Customer:
        s = self.settings
        country_raw = c.get("country")
        country = None
        if country_raw:
            raw = country_raw.strip()
            country = raw.upper() if len(raw) == 2 else _COUNTRIES.get(raw.lower())
        currency = (c.get(s.currency_property) or "").strip().upper() or None
        source = c.get("hs_analytics_source")
        created = _parse_ms(c.get("createdate"))
        siren, siret = _digits(c.get(s.siren_property), 9), _digits(c.get(s.siret_property), 14)
        if (c.get(s.siren_property) and siren is None) or (c.get(s.siret_property) and siret is None):
            log.warning("hubspot_company_identifier_ignored", company=c.id)
        return Customer(
            crm_id=c.id, name=c.get("name") or f"HubSpot company {c.id}", domain=c.get("domain"),
            email=(c.get(s.email_property) or "").strip() or None, vat_number=c.get(s.vat_number_property),
            siren=siren, siret=siret, country=country,
            currency=currency if currency and len(currency) == 3 and currency.isalpha() else None,
            address=Address(line1=c.get("address"), line2=c.get("address2"), city=c.get("city"),
                            postal_code=c.get("zip"), region=c.get("state"), country=country),
            acquisition_source=source.lower() if source else None,
            created_at=_from_ms(created) if created is not None else None,
            updated_at=_from_ms(c.updated_ms) if c.updated_ms else None,
        )

    def _line(self, li: _Obj) -> LineItem:
        s = self.settings
        quantity = _dec(li.get("quantity"))
        price = _dec(li.get("price")) or Decimal(0)
        unit_discount = _dec(li.get("discount"))
        tax = _dec(li.get(s.tax_rate_property))
        if tax is None:
            group = li.get("hs_tax_rate_group_id")
            tax = s.tax_rate_groups.get(group) if group else None
        return LineItem(
            sku=li.get("hs_sku"),
            description=li.get("name") or li.get("description") or li.get("hs_sku") or f"Line item {li.id}",
            quantity=Decimal(1) if quantity is None else quantity,
            unit_price=price - unit_discount if unit_discount else price,
            discount_percent=_dec(li.get("hs_discount_percentage")) or Decimal(0),
            tax_rate=tax,
        )

    @staticmethod
    def _line_order(li: _Obj) -> tuple[int, int]:
        pos = _dec(li.get("hs_position_on_quote"))
        return (int(pos) if pos is not None else 1 << 30, int(li.id) if li.id.isdigit() else 0)

    def _deal(self, d: _Obj, hydrated: tuple[Customer | None, list[LineItem], str, str | None] | None) -> Deal:
        currency = (d.get("deal_currency_code") or "").strip().upper()
        if not (len(currency) == 3 and currency.isalpha()):
            currency = self.settings.default_currency
        close_ms = _parse_ms(d.get("closedate"))
        created_ms = _parse_ms(d.get("createdate"))
        source = d.get("hs_analytics_source")
        customer, lines, lines_source, quote_id = hydrated or (None, [], "deal", None)
        won = (d.get("hs_is_closed_won") or "").lower() == "true"
        closed = won or (d.get("hs_is_closed") or "").lower() == "true"
        return Deal(
            crm_id=d.id, name=d.get("dealname") or f"HubSpot deal {d.id}", amount=_dec(d.get("amount")),
            currency=currency, stage=d.get("dealstage"), is_won=won, is_closed=closed,
            probability=_probability(d.get("hs_deal_stage_probability"), won=won, closed=closed),
            created_at=_from_ms(created_ms) if created_ms is not None else None,
            close_date=_from_ms(close_ms).date() if close_ms is not None else None,
            owner=d.get("hubspot_owner_id"), acquisition_source=source.lower() if source else None,
            customer=customer, line_items=lines, lines_source="quote" if lines_source == "quote" else "deal",
            quote_id=quote_id, updated_at=_from_ms(d.updated_ms), archived=d.archived,
        )

    def _hydrate(self, deal_ids: Sequence[str], won_ids: Sequence[str]
                 ) -> dict[str, tuple[Customer | None, list[LineItem], str, str | None]]:
        """The customer of each deal; for the won ones also the invoice lines, their source and the accepted quote.

        One association read and one company batch read serve every deal of a page, so the customers of open and
        lost deals cost no call of their own; lines and quotes are read for won deals only.
        """
        if not deal_ids:
            return {}
        companies_of = self._associations("deals", "companies", deal_ids)
        lines_of = self._associations("deals", "line_items", won_ids) if won_ids else {}
        quotes_of = self._associations("deals", "quotes", won_ids) if won_ids else {}
        company_of: dict[str, str] = {}
        for did, links in companies_of.items():
            primary = [cid for cid, types in links if _PRIMARY_COMPANY in types]
            company_of[did] = (primary or [cid for cid, _ in links])[0]
        companies = self._batch_read("companies", list(company_of.values()), self._company_properties)
        quote_ids = [qid for links in quotes_of.values() for qid, _ in links]
        quotes = self._batch_read("quotes", quote_ids, QUOTE_PROPERTIES) if quote_ids else {}
        accepted: dict[str, str] = {}
        for did, links in quotes_of.items():
            chosen = [quotes[qid] for qid, _ in links if qid in quotes and self._quote_accepted(quotes[qid])]
            if chosen:
                best = max(chosen, key=lambda q: (_parse_ms(q.get("hs_accepted_date")) or q.updated_ms, int(q.id)))
                accepted[did] = best.id
        quote_lines = self._associations("quotes", "line_items", list(accepted.values())) if accepted else {}
        wanted: dict[str, list[str]] = {}
        for did in won_ids:
            if did in accepted:
                wanted[did] = [lid for lid, _ in quote_lines.get(accepted[did], [])]
            else:
                wanted[did] = [lid for lid, _ in lines_of.get(did, [])]
        items = self._batch_read("line_items", [lid for ids in wanted.values() for lid in ids], self._line_properties)
        out: dict[str, tuple[Customer | None, list[LineItem], str, str | None]] = {}
        for did in deal_ids:
            cid = company_of.get(did)
            customer = self._customer(companies[cid]) if cid in companies else None
            rows = sorted((items[lid] for lid in wanted.get(did, []) if lid in items), key=self._line_order)
            source = "quote" if did in accepted else "deal"
            out[did] = (customer, [self._line(li) for li in rows], source, accepted.get(did))
        return out

    @staticmethod
    def _won(r: _Obj) -> bool:
        return (r.get("hs_is_closed_won") or "").lower() == "true" and not r.archived

    def _page(self, rows: list[_Obj]) -> DealPage:
        hydrated = self._hydrate([r.id for r in rows if not r.archived], [r.id for r in rows if self._won(r)])
        deals = [self._deal(r, hydrated.get(r.id)) for r in rows]
        last = rows[-1]
        return DealPage(deals=deals, cursor=Cursor(_from_ms(last.updated_ms), last.id))

    # -- CrmSource -------------------------------------------------------------------------------------
    def changed_deals(self, since: Cursor | None, until: dt.datetime, page_size: int = 100) -> Iterator[DealPage]:
        yield from self._changed_live_deals(since, until, page_size)
        if since is not None:
            # Search never returns archived (deleted) deals: list those archived since the cursor, so that an
            # invoiced deal deleted in HubSpot is noticed. They carry no cursor: the pages above cover it.
            gone = self._archived_deals(since.value, until)
            for start in range(0, len(gone), page_size):
                yield DealPage(deals=[self._deal(o, None) for o in gone[start:start + page_size]], cursor=None)

    def _archived_deals(self, after: dt.datetime, until: dt.datetime) -> list[_Obj]:
        """Deals archived in ``(after, until]``, from the archived listing (newest HubSpot keeps)."""
        lo, hi = _to_ms(after), _to_ms(until)
        out: list[_Obj] = []
        cursor: str | None = None
        while True:
            page = self._call("GET /crm/v3/objects/deals", self._basic.get_page, "deals", limit=100, after=cursor,
                              properties=list(DEAL_PROPERTIES), archived=True)
            for r in page.get("results") or []:
                archived_ms = _parse_ms(r.get("archivedAt"))
                if archived_ms is not None and lo < archived_ms <= hi:
                    out.append(_Obj.of({**r, "archived": True}))
            cursor = ((page.get("paging") or {}).get("next") or {}).get("after")
            if not cursor:
                return out

    def _changed_live_deals(self, since: Cursor | None, until: dt.datetime, page_size: int) -> Iterator[DealPage]:
        limit = max(1, min(page_size, _MAX_SEARCH_PAGE, self.settings.search_result_cap))
        until_ms = _to_ms(until)
        cur_ts = _to_ms(since.value) if since is not None else None
        cur_id = since.tiebreak if since is not None else ""
        ts_prop, id_prop = "hs_lastmodifieddate", "hs_object_id"
        while True:
            groups: list[list[tuple[str, str, str]]] = []
            if cur_ts is None:
                groups.append([(ts_prop, "LTE", str(until_ms))])
            else:
                if cur_ts > until_ms:
                    return
                same = [(ts_prop, "EQ", str(cur_ts))]
                if cur_id:
                    same.append((id_prop, "GT", cur_id))
                groups += [same, [(ts_prop, "GT", str(cur_ts)), (ts_prop, "LTE", str(until_ms))]]
            rows, _ = self._search_deals(groups, ts_prop, limit)
            if not rows:
                return
            full = len(rows) == limit
            last_ts = max(r.updated_ms for r in rows)
            # In a full page, the deals at the last timestamp may go on past it: leave them for the next query.
            complete = [r for r in rows if r.updated_ms < last_ts] if full else rows
            if complete:
                complete.sort(key=lambda r: (r.updated_ms, int(r.id)))
                yield self._page(complete)
                cur_ts, cur_id = complete[-1].updated_ms, complete[-1].id
                if not full:
                    return
                continue
            # One timestamp fills the page: walk it in id order, then carry on after it.
            start_id = cur_id if cur_ts == last_ts else ""
            for page in self._walk_timestamp(last_ts, start_id, limit):
                yield page
                start_id = page.cursor.tiebreak if page.cursor else start_id
            cur_ts, cur_id = last_ts, start_id

    def _walk_timestamp(self, ts: int, after_id: str, limit: int) -> Iterator[DealPage]:
        """Deals modified at exactly ``ts`` with an id above ``after_id``, in id order, under the search cap."""
        cap = self.settings.search_result_cap
        last = after_id
        while True:
            filters = [("hs_lastmodifieddate", "EQ", str(ts))]
            if last:
                filters.append(("hs_object_id", "GT", last))
            offset: int | None = 0
            restart = False
            while offset is not None:
                try:
                    rows, nxt = self._search_deals([filters], "hs_object_id", limit, after=offset)
                except VendorError as exc:
                    if exc.status != 400 or not offset:
                        raise
                    # A cap lower than configured: query again from the last id instead of paging on.
                    log.warning("hubspot_search_cap_reached", offset=offset, configured=cap)
                    restart = True
                    break
                if not rows:
                    return
                rows.sort(key=lambda r: int(r.id))
                yield self._page(rows)
                last = rows[-1].id
                if nxt is None:
                    return
                if nxt + limit > cap:
                    restart = True  # the next page would cross the cap: query again from the last id
                    break
                offset = nxt
            if not restart:
                return

    def get_deals(self, ids: Sequence[str]) -> list[Deal]:
        wanted = [i for i in dict.fromkeys(str(i) for i in ids) if i.isdigit()]
        live = self._batch_read("deals", wanted, DEAL_PROPERTIES)
        missing = [i for i in wanted if i not in live]
        gone = self._batch_read("deals", missing, DEAL_PROPERTIES, archived=True) if missing else {}
        hydrated = self._hydrate([i for i in wanted if i in live], [i for i in live if self._won(live[i])])
        out = []
        for i in wanted:
            if i in live:
                out.append(self._deal(live[i], hydrated.get(i)))
            elif i in gone:
                out.append(self._deal(gone[i], None))
        return out

    def activity_counts(self, deal_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        """Calls, meetings, emails and tasks associated with each deal: one v4 association batch read per activity
        type and 1,000 deals (associated ids counted once each); deals without any, and unknown ids, are absent."""
        wanted = [i for i in dict.fromkeys(str(i).strip() for i in deal_ids) if i.isdigit()]
        out: dict[str, dict[str, int]] = {}
        if not wanted:
            return out
        asked = set(wanted)
        for kind, object_type in ENGAGEMENT_TYPES.items():
            for did, links in self._associations("deals", object_type, wanted).items():
                n = len({tid for tid, _ in links})
                if n and did in asked:
                    out.setdefault(did, {})[kind] = n
        return out

    def ensure_fields(self, object_type: Literal["deal", "customer"], fields: Sequence[FieldSpec]) -> None:
        t = _OBJECT_TYPES[object_type]
        s = self.settings
        groups = self._call(f"GET /crm/v3/properties/{t}/groups", self._groups.get_all, t)
        if s.field_group not in {g.get("name") for g in groups.get("results") or []}:
            try:
                self._call(f"POST /crm/v3/properties/{t}/groups", self._groups.create, t,
                           PropertyGroupCreate(name=s.field_group, label=s.field_group_label))
            except VendorError as exc:
                if exc.status != 409:
                    raise
        listed = self._call(f"GET /crm/v3/properties/{t}", self._properties.get_all, t).get("results") or []
        existing = {str(p.get("name")): str(p.get("type")) for p in listed}
        for f in fields:
            hs_type, field_type = _FIELD_TYPES[f.type]
            if f.name in existing:
                if existing[f.name] != hs_type:
                    log.warning("hubspot_field_type_differs", object_type=t, field=f.name,
                                expected=hs_type, found=existing[f.name])
                continue
            if f.type == "bool":
                options = [OptionInput(label="Yes", value="true", hidden=False, display_order=0),
                           OptionInput(label="No", value="false", hidden=False, display_order=1)]
            else:
                options = [OptionInput(label=o, value=o, hidden=False, display_order=i)
                           for i, o in enumerate(f.options)]
            body = PropertyCreate(name=f.name, label=f.label, type=hs_type, field_type=field_type,
                                  group_name=s.field_group, options=options,
                                  description="Written by LedgerBridge from the accounting system")
            try:
                self._call(f"POST /crm/v3/properties/{t}", self._properties.create, t, body)
            except VendorError as exc:
                if exc.status != 409:  # created by an earlier attempt or by someone else: fine
                    raise

    def write_fields(
        self, object_type: Literal["deal", "customer"], updates: Sequence[FieldUpdate]
    ) -> list[WriteResult]:
        t = _OBJECT_TYPES[object_type]
        merged: dict[str, dict[str, str]] = {}
        for u in updates:
            merged.setdefault(str(u.object_id), {}).update({k: _format_value(v) for k, v in u.values.items()})
        results: dict[str, WriteResult] = {}
        items = list(merged.items())
        for chunk in _chunks(items, self.settings.batch_size):
            self._update(t, list(chunk), results)
        return [results[str(u.object_id)] for u in updates]

    def _update(self, t: str, items: list[tuple[str, dict[str, str]]], results: dict[str, WriteResult]) -> None:
        """Batch-update ``items``; a batch HubSpot rejects as a whole is split until the bad records stand alone."""
        body = {"inputs": [{"id": i, "properties": p} for i, p in items]}
        try:
            resp = self._call(f"POST /crm/v3/objects/{t}/batch/update", self._batch.update, t, body)
        except VendorError as exc:
            if exc.status is None or not 400 <= exc.status < 500 or exc.status == 429:
                raise
            if len(items) == 1:
                results[items[0][0]] = WriteResult(items[0][0], False, error=exc.detail)
                return
            mid = len(items) // 2
            self._update(t, items[:mid], results)
            self._update(t, items[mid:], results)
            return
        done = {str(r.get("id")) for r in resp.get("results") or []}
        problems = "; ".join(str(e.get("message")) for e in resp.get("errors") or []) or "not updated"
        for i, _ in items:
            results[i] = WriteResult(i, True) if i in done else WriteResult(i, False, error=problems[:500])
