"""Pipedrive as a :class:`~connectors.interfaces.CrmSource`, on API v2 through :class:`PipedriveClient`.

Pulling changed deals
    ``GET /api/v2/deals`` sorted by ``update_time`` ascending, with ``updated_since`` (inclusive, whole
    seconds) set to the cursor's second and ``updated_until`` (exclusive) to the second after ``until``, paged
    with the v2 cursor at 500 records a call (a list call costs 10 tokens whatever its size). Deals at the
    cursor's second that the previous pull already delivered are dropped by comparing (update_time, id) with
    the compound cursor; deals updated after ``until`` are dropped too, in case the server ignores the bound.
    Deals deleted in the last 30 days come with ``status=deleted``; archived deals are not in that list at all
    and are read from ``GET /api/v2/deals/archived`` (20 tokens a page). Both streams are merged in
    (update_time, id) order: a deal is handed out only once every stream has moved past its second, so deals
    sharing a second are complete and sorted by id even when they straddle a page boundary or come in another
    order within the second. Deleted deals come back with ``archived=True``, so an invoiced deal that
    disappears is flagged; archived deals (a tidying of Pipedrive's views) stand and come back as they are.
    A deal is won when its ``status`` is ``won`` (Pipedrive keeps won deals in the
    stage they were won from, so stages say nothing about it).

Deals are hydrated in bulk, 100 a call: every deal's organization and contact person (``GET
.../organizations?ids=``, ``.../persons?ids=``: open and lost deals get their customer from the same calls), and
the won deals' products (``GET /api/v2/deals/products?deal_ids=``) and the SKU of each product (``GET
/api/v2/products?ids=``, cached). Pipedrive has no native quotes: a deal's products are its
invoice lines. The VAT number, SIREN, SIRET, billing e-mail and currency are organization custom fields named
in the settings and resolved to their 40-character keys through ``GET /api/v2/organizationFields`` (likewise
the acquisition source through ``dealFields``); v2 nests custom field values under ``custom_fields`` and gives
option fields as option ids, read here as their labels.

A deal's ``probability`` is its own ``probability`` when set, else its stage's ``deal_probability`` (``GET
/api/v2/stages``, 5 tokens, read once), both in percent, divided by 100; 1 once won, 0 once lost. ``created_at``
is ``add_time``; the customer's ``created_at`` is the organization's ``add_time`` and its ``acquisition_source``
the organization field ``customer_acquisition_source_field``. Activity counts come from ``GET
/api/v2/activities`` (see :meth:`PipedriveSource.activity_counts`).

Lines: ``item_price`` and ``quantity``; ``discount`` is a percentage or, with ``discount_type=amount``, an
amount off the line; ``tax`` is the VAT percent and ``tax_method`` says whether prices include it (prices are
then brought back to net) or whether the line is untaxed (``none``: rate 0). A line's description is its
``comments`` when set (the text the salesperson wrote), else the product name. Disabled lines are left out.

Writing back
    Custom fields are created with ``POST /api/v2/{deal,organization}Fields`` (Pipedrive picks the key); the
    field's description carries the marker ``[ledgerbridge:<name>]``, so the field is found again by name in
    later runs even after someone renames its label. ``write_fields`` sends one ``PATCH /api/v2/deals/{id}``
    (or ``/organizations/{id}``) per record with ``custom_fields`` (Pipedrive has no batch update); absolute
    values make the PATCH safe to retry, and a record Pipedrive rejects fails alone.

Only :mod:`connectors.errors` types leave this module.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

import httpx
import structlog
from pydantic import ValidationError

from config.schema import ConnectorSettings
from connectors.domain import Address, Customer, Deal, LineItem
from connectors.errors import (
    AmbiguousWriteError,
    ConfigError,
    RecordError,
    VendorError,
)
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
from connectors.oauth import LockFactory
from connectors.pipedrive.client import MAX_IDS, VENDOR, PipedriveClient, rfc3339
from connectors.pipedrive.settings import PipedriveSettings

__all__ = ["PipedriveSource"]

log = structlog.get_logger("ledgerbridge.pipedrive")
T = TypeVar("T")

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_ENTITY: dict[str, str] = {"deal": "deal", "customer": "organization"}
_RECORD_PATH: dict[str, str] = {"deal": "/api/v2/deals", "organization": "/api/v2/organizations"}
_FIELD_TYPES: dict[str, str] = {"string": "varchar", "number": "double", "date": "date", "datetime": "varchar",
                                "enumeration": "enum", "bool": "enum"}
_BOOL_OPTIONS = ("Yes", "No")
_MARKER = re.compile(r"\[ledgerbridge:([A-Za-z0-9_.-]+)\]")

# Country names as Pipedrive's address autocompletion writes them (or users type them) -> ISO-3166 alpha-2.
_COUNTRIES: dict[str, str] = {
    "france": "FR", "germany": "DE", "deutschland": "DE", "allemagne": "DE", "belgium": "BE", "belgique": "BE",
    "belgië": "BE", "spain": "ES", "espagne": "ES", "españa": "ES", "italy": "IT", "italie": "IT", "italia": "IT",
    "netherlands": "NL", "the netherlands": "NL", "pays-bas": "NL", "nederland": "NL", "luxembourg": "LU",
    "portugal": "PT", "austria": "AT", "autriche": "AT", "österreich": "AT", "ireland": "IE", "irlande": "IE",
    "switzerland": "CH", "suisse": "CH", "schweiz": "CH", "united kingdom": "GB", "uk": "GB",
    "royaume-uni": "GB", "great britain": "GB", "united states": "US", "united states of america": "US",
    "usa": "US", "us": "US", "états-unis": "US", "etats-unis": "US", "canada": "CA", "poland": "PL",
    "pologne": "PL", "sweden": "SE", "suède": "SE", "denmark": "DK", "danemark": "DK", "finland": "FI",
    "finlande": "FI", "greece": "GR", "grèce": "GR", "czechia": "CZ", "czech republic": "CZ", "monaco": "MC",
    "morocco": "MA", "maroc": "MA", "tunisia": "TN", "tunisie": "TN", "algeria": "DZ", "algérie": "DZ",
}

Key = tuple[int, int]  # (update_time in epoch seconds, deal id)


def _chunks(seq: Sequence[T], n: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def _dec(value: Any) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        d = value if isinstance(value, Decimal) else Decimal(str(value).strip())
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, dict):  # an expanded reference ({"value": 12, "name": ...}), as v1 answers
        return _int(value.get("value") if "value" in value else value.get("id"))
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _parse_time(value: Any) -> dt.datetime | None:
    """An aware UTC datetime from v2 (``2025-01-01T10:20:00Z``) or v1 (``2025-01-01 10:20:00``) text."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)


def _parse_date(value: Any) -> dt.date | None:
    if not isinstance(value, str) or len(value.strip()) < 10:
        return None
    try:
        return dt.date.fromisoformat(value.strip()[:10])
    except ValueError:
        return None


def _second(value: dt.datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return math.floor(value.timestamp())


def _from_second(second: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(seconds=second)


def _digits(value: str | None, n: int) -> str | None:
    if not value:
        return None
    cleaned = "".join(ch for ch in value if not ch.isspace() and ch not in ".-")
    return cleaned if len(cleaned) == n and cleaned.isdigit() else None


def _domain(website: str | None) -> str | None:
    if not website or not website.strip():
        return None
    text = website.strip()
    host = urlsplit(text if "//" in text else f"//{text}").hostname
    return host or None


def _country(raw: str | None) -> str | None:
    if not raw or not raw.strip():
        return None
    text = raw.strip()
    if len(text) == 2 and text.isalpha():
        return text.upper()
    return _COUNTRIES.get(text.lower())


@dataclass
class _Stream:
    """One cursor-paged list of deals sorted by update_time, read a page at a time."""

    pages: Iterator[list[dict[str, Any]]]
    frontier: int = -(1 << 62)  # the latest update_time seen; later pages hold nothing earlier
    done: bool = False

    def pull(self) -> list[dict[str, Any]]:
        try:
            rows = next(self.pages)
        except StopIteration:
            self.done = True
            return []
        for r in rows:
            t = _parse_time(r.get("update_time"))
            if t is not None:
                self.frontier = max(self.frontier, _second(t))
        return rows


@dataclass
class _FieldIndex:
    """The fields of one entity (``GET /api/v2/{entity}Fields``), looked up by key, label or marker."""

    fields: list[dict[str, Any]]
    adopted: dict[str, str] = field(default_factory=dict)  # write-back name -> key, found by label this run

    def by_key(self, key: str) -> dict[str, Any] | None:
        return next((f for f in self.fields if f.get("field_code") == key), None)

    def by_label(self, label: str, *, custom_only: bool = False) -> dict[str, Any] | None:
        wanted = label.strip().casefold()
        matches = [f for f in self.fields if str(f.get("field_name") or "").strip().casefold() == wanted
                   and (f.get("is_custom_field") or not custom_only)]
        matches.sort(key=lambda f: not f.get("is_custom_field"))  # a custom field wins over a built-in one
        return matches[0] if matches else None

    def by_marker(self, name: str) -> dict[str, Any] | None:
        for f in self.fields:
            found = _MARKER.search(str(f.get("description") or ""))
            if found and found.group(1) == name:
                return f
        return None

    def resolve(self, ref: str) -> dict[str, Any] | None:
        """A field named in the settings: by key first, then by its label."""
        return self.by_key(ref) or self.by_label(ref)

    def option_label(self, f: Mapping[str, Any], option_id: Any) -> str | None:
        for o in f.get("options") or []:
            if isinstance(o, dict) and str(o.get("id")) == str(option_id):
                return str(o.get("label"))
        return None

    def option_id(self, f: Mapping[str, Any], label: str) -> Any:
        wanted = label.strip().casefold()
        for o in f.get("options") or []:
            if isinstance(o, dict) and str(o.get("label", "")).strip().casefold() == wanted:
                return o.get("id")
        return None


_Hydrated = tuple[Customer | None, list[LineItem]]


class PipedriveSource(CrmSource):
    """Deals, organizations, persons and products of one Pipedrive company (see the module docstring)."""

    vendor: ClassVar[str] = VENDOR
    Settings: ClassVar[type[ConnectorSettings]] = PipedriveSettings

    def __init__(
        self,
        settings: PipedriveSettings,
        tokens: TokenStore,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], float] = time.time,
        lock_factory: LockFactory | None = None,
    ) -> None:
        """``transport`` (an in-process sandbox), ``sleep``/``monotonic`` (pacing and backoff) and ``clock``
        (token expiry, the daily allowance) are for tests and the sandboxes; production uses the defaults."""
        self.settings = settings
        self.stats = ApiStats()
        self.client = PipedriveClient(settings, tokens, transport=transport, stats=self.stats, sleep=sleep,
                                      monotonic=monotonic, clock=clock, lock_factory=lock_factory)
        self._fields: dict[str, _FieldIndex] = {}
        self._product_codes: dict[int, str | None] = {}
        self._stage_percent: dict[int, Decimal | None] | None = None
        self._unknown_stages: set[int] = set()
        self._warned: set[str] = set()

    @classmethod
    def from_config(
        cls,
        settings: Mapping[str, Any],
        tokens: TokenStore,
        *,
        transport: httpx.BaseTransport | None = None,
        lock_factory: LockFactory | None = None,
    ) -> PipedriveSource:
        """Validate the pipeline's ``crm:`` block and build the connector."""
        try:
            parsed = PipedriveSettings.model_validate(dict(settings))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'crm'}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"crm (pipedrive): {problems}") from None
        return cls(parsed, tokens, transport=transport, lock_factory=lock_factory)

    def close(self) -> None:
        self.client.close()

    # -- field metadata ----------------------------------------------------------------------------------
    def _field_index(self, entity: str, *, refresh: bool = False) -> _FieldIndex:
        index = self._fields.get(entity)
        if index is None or refresh:
            rows = [f for page in self.client.pages(f"/api/v2/{entity}Fields") for f in page]
            adopted = index.adopted if index is not None else {}
            index = self._fields[entity] = _FieldIndex(rows, dict(adopted))
        return index

    def _warn_once(self, what: str, **kw: Any) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning(what, **kw)

    def _read_field(self, entity: str, ref: str | None) -> dict[str, Any] | None:
        if not ref:
            return None
        f = self._field_index(entity).resolve(ref)
        if f is None:
            self._warn_once(f"pipedrive_{entity}_field_missing:{ref}", field=ref, entity=entity)
        return f

    def _value(self, entity: str, record: Mapping[str, Any], f: Mapping[str, Any] | None) -> str | None:
        """A field's value as text; option ids become their labels."""
        if f is None:
            return None
        key = str(f.get("field_code"))
        custom = record.get("custom_fields")
        raw = custom.get(key) if f.get("is_custom_field") and isinstance(custom, dict) else record.get(key)
        if raw is None or raw == "" or raw == []:
            return None
        index = self._field_index(entity)
        ftype = f.get("field_type")
        if isinstance(raw, dict):
            if "label" in raw:
                return str(raw["label"])
            raw = raw.get("value")
            if raw is None:
                return None
        if ftype in ("enum", "status", "set", "varchar_options"):
            items = raw if isinstance(raw, list) else [raw]
            labels = [str(i["label"]) if isinstance(i, dict) and "label" in i
                      else index.option_label(f, i) or str(i) for i in items]
            return ", ".join(labels)
        if isinstance(raw, Decimal):
            return format(raw, "f")
        return str(raw).strip() or None

    # -- mapping -------------------------------------------------------------------------------------------
    def _customer(self, org: Mapping[str, Any], person_email: str | None) -> Customer:
        s = self.settings
        fields = {name: self._read_field("organization", ref) for name, ref in (
            ("vat", s.vat_number_field), ("siren", s.siren_field), ("siret", s.siret_field),
            ("email", s.email_field), ("currency", s.currency_field))}
        get = {name: self._value("organization", org, f) for name, f in fields.items()}
        oid = str(org.get("id"))
        siren, siret = _digits(get["siren"], 9), _digits(get["siret"], 14)
        if (get["siren"] and siren is None) or (get["siret"] and siret is None):
            log.warning("pipedrive_org_identifier_ignored", organization=oid)
        currency = (get["currency"] or "").strip().upper()
        raw_address = org.get("address")
        address: Mapping[str, Any] = raw_address if isinstance(raw_address, dict) else {}
        country = _country(address.get("country"))
        route = str(address.get("route") or "").strip()
        number = str(address.get("street_number") or "").strip()
        line1 = f"{number} {route}".strip() if route else str(address.get("value") or "").strip() or None
        email = (get["email"] or "").strip() or (person_email if s.email_from_person else None)
        source = self._value("organization", org, self._read_field("organization", s.customer_acquisition_source_field))
        return Customer(
            crm_id=oid, name=str(org.get("name") or f"Pipedrive organization {oid}"),
            domain=_domain(org.get("website")), email=email or None, vat_number=get["vat"],
            siren=siren, siret=siret, country=country,
            currency=currency if len(currency) == 3 and currency.isalpha() else None,
            address=Address(line1=line1, line2=address.get("subpremise") or None, city=address.get("locality") or None,
                            postal_code=address.get("postal_code") or None,
                            region=address.get("admin_area_level_1") or None, country=country),
            acquisition_source=source.lower() if source else None,
            created_at=_parse_time(org.get("add_time")),
            updated_at=_parse_time(org.get("update_time")),
        )

    def _line(self, p: Mapping[str, Any]) -> LineItem:
        quantity = _dec(p.get("quantity"))
        quantity = Decimal(1) if quantity is None else quantity
        price = _dec(p.get("item_price")) or Decimal(0)
        tax = _dec(p.get("tax"))
        method = str(p.get("tax_method") or "exclusive").lower()
        if method == "none":
            tax = Decimal(0)
        elif method == "inclusive" and tax:
            # Prices include the tax: bring them back to net, to 4 decimals (what ledgers accept).
            price = (price * 100 / (100 + tax)).quantize(Decimal("0.0001"))
        discount = _dec(p.get("discount")) or Decimal(0)
        percent = Decimal(0)
        if discount and str(p.get("discount_type") or "percentage").lower() == "amount":
            # An amount off the whole line: per unit when it divides exactly, else as an equivalent percentage.
            per_unit = discount / quantity if quantity else discount
            if per_unit == per_unit.quantize(Decimal("0.0001")):
                price -= per_unit
            elif quantity * price:
                percent = (discount * 100 / (quantity * price)).quantize(Decimal("0.000001"))
        elif discount:
            percent = discount
        product_id = _int(p.get("product_id"))
        comments = str(p.get("comments") or "").strip()
        return LineItem(
            sku=self._product_codes.get(product_id) if product_id is not None else None,
            description=comments or str(p.get("name") or "").strip() or f"Product {product_id}",
            quantity=quantity, unit_price=price, discount_percent=percent, tax_rate=tax,
        )

    def _deal(self, d: Mapping[str, Any], hydrated: _Hydrated | None) -> Deal:
        status = str(d.get("status") or "").lower()
        deleted = bool(d.get("is_deleted")) or status == "deleted"
        currency = str(d.get("currency") or "").strip().upper()
        if not (len(currency) == 3 and currency.isalpha()):
            currency = self.settings.default_currency
        if status == "won":
            close_date = (_parse_time(d.get("won_time")) or _parse_time(d.get("close_time")))
            closed: dt.date | None = close_date.date() if close_date else None
        elif status == "lost":
            lost = _parse_time(d.get("lost_time")) or _parse_time(d.get("close_time"))
            closed = lost.date() if lost else None
        else:
            closed = _parse_date(d.get("expected_close_date"))
        source = self._value("deal", d, self._read_field("deal", self.settings.acquisition_source_field))
        updated = _parse_time(d.get("update_time"))
        customer, lines = hydrated or (None, [])
        deal_id = str(d.get("id"))
        owner = _int(d.get("owner_id"))
        stage = _int(d.get("stage_id"))
        return Deal(
            crm_id=deal_id, name=str(d.get("title") or f"Pipedrive deal {deal_id}"), amount=_dec(d.get("value")),
            currency=currency, stage=str(stage) if stage is not None else None,
            is_won=status == "won" and not deleted, is_closed=status in ("won", "lost") and not deleted,
            probability=None if deleted else self._probability(status, d.get("probability"), stage),
            created_at=_parse_time(d.get("add_time")), close_date=closed,
            owner=str(owner) if owner is not None else None,
            acquisition_source=source.lower() if source else None, customer=customer, line_items=lines,
            lines_source="deal", quote_id=None, updated_at=updated or _EPOCH,
            # Archiving in Pipedrive tidies the pipeline view; the deal still stands. Only deletion retracts it.
            archived=deleted,
        )

    @staticmethod
    def _won(d: Mapping[str, Any]) -> bool:
        return str(d.get("status") or "").lower() == "won" and not d.get("is_deleted")

    @staticmethod
    def _live(d: Mapping[str, Any]) -> bool:
        return not d.get("is_deleted") and str(d.get("status") or "").lower() != "deleted"

    def _probability(self, status: str, own: Any, stage: int | None) -> Decimal | None:
        """The deal's chance of winning on the 0..1 scale: 1 once won, 0 once lost, else the probability set on
        the deal, else its stage's ``deal_probability`` (both in percent)."""
        if status == "won":
            return Decimal(1)
        if status == "lost":
            return Decimal(0)
        percent = _dec(own)
        if percent is None and stage is not None:
            percent = self._stage_probability(stage)
        if percent is None:
            return None
        return min(max(percent / 100, Decimal(0)), Decimal(1)).quantize(Decimal("0.0001")).normalize()

    def _stage_probability(self, stage: int) -> Decimal | None:
        """A stage's ``deal_probability`` from ``GET /api/v2/stages`` (read once; again for a stage not seen yet)."""
        if self._stage_percent is None or (stage not in self._stage_percent and stage not in self._unknown_stages):
            self._stage_percent = {sid: _dec(row.get("deal_probability"))
                                   for page in self.client.pages("/api/v2/stages")
                                   for row in page if (sid := _int(row.get("id"))) is not None}
            if stage not in self._stage_percent:
                self._unknown_stages.add(stage)
        return self._stage_percent.get(stage)

    # -- hydration -------------------------------------------------------------------------------------
    def _by_ids(self, path: str, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for chunk in _chunks(sorted(set(ids)), MAX_IDS):
            for page in self.client.pages(path, {"ids": ",".join(str(i) for i in chunk)}):
                for row in page:
                    rid = _int(row.get("id"))
                    if rid is not None:
                        out[rid] = row
        return out

    def _hydrate(self, deals: Sequence[Mapping[str, Any]]) -> dict[int, _Hydrated]:
        """The customer of each deal not deleted, and the invoice lines of the won ones.

        The organizations (and contact persons) of a whole page come in the same ``ids`` calls, so open and lost
        deals get their customer at no call of their own.
        """
        live = [d for d in deals if self._live(d) and _int(d.get("id")) is not None]
        if not live:
            return {}
        won = [d for d in live if self._won(d)]
        ids = [_int(d.get("id")) or 0 for d in won]
        lines_of: dict[int, list[dict[str, Any]]] = {}
        for chunk in _chunks(ids, MAX_IDS):
            params = {"deal_ids": ",".join(str(i) for i in chunk), "sort_by": "id"}
            for page in self.client.pages("/api/v2/deals/products", params):
                for p in page:
                    did = _int(p.get("deal_id"))
                    if did is not None and p.get("is_enabled", True) is not False:
                        lines_of.setdefault(did, []).append(p)
        wanted = {pid for rows in lines_of.values() for p in rows if (pid := _int(p.get("product_id"))) is not None
                  and pid not in self._product_codes}
        if wanted:
            found = self._by_ids("/api/v2/products", sorted(wanted))
            for pid in wanted:
                code = found.get(pid, {}).get("code")
                self._product_codes[pid] = (str(code).strip() or None) if code else None
        org_ids = sorted({oid for d in live if (oid := _int(d.get("org_id"))) is not None})
        orgs = self._by_ids("/api/v2/organizations", org_ids) if org_ids else {}
        emails: dict[int, str] = {}
        if self.settings.email_from_person:
            email_field = self._read_field("organization", self.settings.email_field)
            need = sorted({pid for d in live if (pid := _int(d.get("person_id"))) is not None
                           and not self._value("organization", orgs.get(_int(d.get("org_id")) or -1, {}),
                                               email_field)})
            for pid, person in (self._by_ids("/api/v2/persons", need) if need else {}).items():
                addresses = [e for e in person.get("emails") or [] if isinstance(e, dict) and e.get("value")]
                primary = next((e for e in addresses if e.get("primary")), addresses[0] if addresses else None)
                if primary is not None:
                    emails[pid] = str(primary["value"]).strip()
        out: dict[int, _Hydrated] = {}
        for d in live:
            did = _int(d.get("id")) or 0
            oid = _int(d.get("org_id"))
            org = orgs.get(oid) if oid is not None else None
            person_id = _int(d.get("person_id"))
            email = emails.get(person_id) if person_id is not None else None
            customer = self._customer(org, email) if org else None
            rows = sorted(lines_of.get(did, []), key=lambda p: (_int(p.get("order_nr")) or 1 << 30,
                                                                 _int(p.get("id")) or 0))
            out[did] = (customer, [self._line(p) for p in rows])
        return out

    def _page(self, rows: list[dict[str, Any]]) -> DealPage:
        hydrated = self._hydrate(rows)
        deals = [self._deal(r, hydrated.get(_int(r.get("id")) or 0)) for r in rows]
        last = deals[-1]
        return DealPage(deals=deals, cursor=Cursor(last.updated_at, last.crm_id))

    # -- CrmSource -------------------------------------------------------------------------------------
    def _statuses(self, *, deleted: bool) -> str:
        return "open,won,lost,deleted" if deleted else "open,won,lost"

    def changed_deals(self, since: Cursor | None, until: dt.datetime, page_size: int = 100) -> Iterator[DealPage]:
        size = max(1, page_size)
        until_s = _second(until)
        after: Key | None = None
        params: dict[str, Any] = {"sort_by": "update_time", "sort_direction": "asc",
                                  "updated_until": rfc3339(_from_second(until_s + 1)),
                                  "status": self._statuses(deleted=self.settings.include_deleted)}
        if since is not None:
            since_s = _second(since.value)
            if since_s > until_s:
                return
            tiebreak = since.tiebreak.strip()
            # A cursor exactly on a second resumes after its id; one between seconds resumes at the next second.
            if since.value.microsecond:
                after = (since_s, 1 << 62)
            else:
                after = (since_s, int(tiebreak) if tiebreak.isdigit() else -1)
            params["updated_since"] = rfc3339(_from_second(since_s))
        streams = [_Stream(self.client.pages("/api/v2/deals", params))]
        if self.settings.include_archived:
            streams.append(_Stream(self.client.pages("/api/v2/deals/archived", params)))
        buffered: dict[int, tuple[Key, dict[str, Any]]] = {}
        emitted: dict[int, Key] = {}
        outbox: list[dict[str, Any]] = []
        while True:
            live = [s for s in streams if not s.done]
            frontier = min((s.frontier for s in live), default=None)
            ready = sorted((v for v in buffered.values() if frontier is None or v[0][0] < frontier),
                           key=lambda v: v[0])
            for key, row in ready:
                did = key[1]
                del buffered[did]
                emitted[did] = key
                outbox.append(row)
            while len(outbox) >= size:
                yield self._page(outbox[:size])
                del outbox[:size]
            if not live:
                if outbox:
                    yield self._page(outbox)
                return
            stream = min(live, key=lambda s: s.frontier)
            for row in stream.pull():
                row_id = _int(row.get("id"))
                updated = _parse_time(row.get("update_time"))
                if row_id is None or updated is None:
                    continue
                key = (_second(updated), row_id)
                if key[0] > until_s or (after is not None and key <= after):
                    continue
                if row_id in emitted and emitted[row_id] >= key:
                    continue
                held = buffered.get(row_id)
                if held is None or held[0] < key:
                    buffered[row_id] = (key, row)

    def get_deals(self, ids: Sequence[str]) -> list[Deal]:
        wanted = [int(i) for i in dict.fromkeys(str(i).strip() for i in ids) if i.isdigit()]
        if not wanted:
            return []
        status = self._statuses(deleted=True)
        found: dict[int, dict[str, Any]] = {}
        for chunk in _chunks(wanted, MAX_IDS):
            query = {"ids": ",".join(str(i) for i in chunk), "status": status}
            for page in self.client.pages("/api/v2/deals", query):
                found.update({rid: r for r in page if (rid := _int(r.get("id"))) is not None})
            missing = [i for i in chunk if i not in found]
            if missing:
                query["ids"] = ",".join(str(i) for i in missing)
                for page in self.client.pages("/api/v2/deals/archived", query):
                    found.update({rid: r for r in page if (rid := _int(r.get("id"))) is not None})
        rows = [found[i] for i in wanted if i in found]
        hydrated = self._hydrate(rows)
        return [self._deal(r, hydrated.get(_int(r.get("id")) or 0)) for r in rows]

    def activity_counts(self, deal_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        """Activities linked to each deal, counted by kind through ``activity_types`` (other types not counted).

        ``GET /api/v2/activities`` filters by one deal at a time: up to ``activity_scan_threshold`` deals are read
        deal by deal (10 tokens each); above it every activity of the company is paged through once, 500 at a
        time, and counted for the deals asked. Deleted activities are not listed; keys are the ids as asked.
        """
        wanted: dict[int, str] = {}
        for raw in deal_ids:
            text = str(raw).strip()
            if text.isdigit():
                wanted.setdefault(int(text), text)
        out: dict[str, dict[str, int]] = {}
        if not wanted:
            return out
        kinds = self.settings.activity_types

        def count(rows: list[dict[str, Any]]) -> None:
            for row in rows:
                did = _int(row.get("deal_id"))
                kind = kinds.get(str(row.get("type") or ""))
                if did in wanted and kind is not None and not row.get("is_deleted"):
                    counts = out.setdefault(wanted[did], {})
                    counts[kind] = counts.get(kind, 0) + 1

        if len(wanted) > self.settings.activity_scan_threshold:
            for page in self.client.pages("/api/v2/activities", {"sort_by": "id"}):
                count(page)
        else:
            for did in wanted:
                for page in self.client.pages("/api/v2/activities", {"deal_id": did, "sort_by": "id"}):
                    count(page)
        return out

    # -- writing back ----------------------------------------------------------------------------------
    def _write_field(self, entity: str, name: str) -> dict[str, Any] | None:
        index = self._field_index(entity)
        configured = self.settings.field_keys.get(name)
        if configured:
            return index.by_key(configured)
        adopted = index.adopted.get(name)
        return (index.by_marker(name) or index.by_key(name) or (index.by_key(adopted) if adopted else None)
                or index.by_label(name, custom_only=True))

    def ensure_fields(self, object_type: Literal["deal", "customer"], fields: Sequence[FieldSpec]) -> None:
        entity = _ENTITY[object_type]
        index = self._field_index(entity, refresh=True)
        for spec in fields:
            f = self._write_field(entity, spec.name)
            if f is None:
                f = index.by_label(spec.label, custom_only=True)
                if f is not None:
                    index.adopted[spec.name] = str(f.get("field_code"))
                    log.warning("pipedrive_field_adopted_by_label", entity=entity, field=spec.name, label=spec.label,
                                hint="set crm.field_keys to pin it")
            if f is not None:
                expected = _FIELD_TYPES[spec.type]
                if f.get("field_type") != expected and not (expected == "double" and f.get("field_type") == "monetary"):
                    log.warning("pipedrive_field_type_differs", entity=entity, field=spec.name, expected=expected,
                                found=f.get("field_type"))
                continue
            self._create_field(entity, spec, index)

    def _create_field(self, entity: str, spec: FieldSpec, index: _FieldIndex) -> None:
        body: dict[str, Any] = {
            "field_name": spec.label, "field_type": _FIELD_TYPES[spec.type],
            "description": f"Written by LedgerBridge from the accounting system [ledgerbridge:{spec.name}]",
        }
        if spec.type == "bool":
            body["options"] = [{"label": label} for label in _BOOL_OPTIONS]
        elif spec.type == "enumeration":
            body["options"] = [{"label": o} for o in spec.options] or [{"label": "-"}]
        try:
            created = self.client.data("POST", f"/api/v2/{entity}Fields", body=body)
        except AmbiguousWriteError:
            # The field may have been created: look before creating it again (a second one would be a duplicate).
            index = self._field_index(entity, refresh=True)
            if index.by_marker(spec.name) is not None:
                return
            created = self.client.data("POST", f"/api/v2/{entity}Fields", body=body)
        if isinstance(created, dict):
            index.fields.append(created)
        else:
            self._field_index(entity, refresh=True)

    def _format(self, entity: str, f: Mapping[str, Any], value: Any) -> Any:
        """A value in the JSON type the field takes; anything unconvertible is sent as is for Pipedrive to judge.

        Values may come as text (``"1234.50"``, ``"2026-01-31"``, ``"true"``): they are converted to the field's
        type; an empty text clears the field (null), as None does.
        """
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        ftype = f.get("field_type")
        if ftype in ("enum", "set"):
            label = ("Yes" if value else "No") if isinstance(value, bool) else str(value)
            option = self._field_index(entity).option_id(f, label)
            if option is None and label.strip().lower() in ("true", "false"):  # a yes/no field written as text
                option = self._field_index(entity).option_id(f, "Yes" if label.strip().lower() == "true" else "No")
            if option is None:
                raise ValueError(f"{label!r} is not an option of field {f.get('field_name')!r}")
            return [option] if ftype == "set" else option
        if ftype in ("double", "monetary"):
            if isinstance(value, bool):
                return value
            number = _dec(value) if isinstance(value, int | Decimal | str) else None
            return number if number is not None else value
        if ftype == "date":
            if isinstance(value, str) and len(value.strip()) > 10:
                value = _parse_time(value) or value  # a datetime's text: its UTC day
            if isinstance(value, dt.datetime):
                return value.astimezone(dt.UTC).date().isoformat() if value.tzinfo else value.date().isoformat()
            if isinstance(value, dt.date):
                return value.isoformat()
            return value
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, Decimal):
            return format(value, "f")
        if isinstance(value, dt.datetime):
            return rfc3339(value)
        if isinstance(value, dt.date):
            return value.isoformat()
        return str(value)

    def write_fields(
        self, object_type: Literal["deal", "customer"], updates: Sequence[FieldUpdate]
    ) -> list[WriteResult]:
        entity = _ENTITY[object_type]
        merged: dict[str, dict[str, Any]] = {}
        for u in updates:
            merged.setdefault(str(u.object_id), {}).update(u.values)
        results: dict[str, WriteResult] = {}
        for object_id, values in merged.items():
            results[object_id] = self._write_one(entity, object_id, values)
        return [results[str(u.object_id)] for u in updates]

    def _write_one(self, entity: str, object_id: str, values: Mapping[str, Any]) -> WriteResult:
        if not object_id.isdigit():
            return WriteResult(object_id, False, error=f"not a Pipedrive {entity} id")
        custom: dict[str, Any] = {}
        for name, value in values.items():
            f = self._write_field(entity, name)
            if f is None:
                return WriteResult(object_id, False, error=f"no {entity} field {name!r}; run ensure_fields first")
            try:
                custom[str(f.get("field_code"))] = self._format(entity, f, value)
            except ValueError as exc:
                return WriteResult(object_id, False, error=str(exc))
        try:
            self.client.request("PATCH", f"{_RECORD_PATH[entity]}/{object_id}", body={"custom_fields": custom},
                                replay_safe=True)
        except (RecordError, VendorError) as exc:
            if not isinstance(exc, RecordError) and exc.status not in (404, 410):
                raise
            return WriteResult(object_id, False, error=exc.detail)
        return WriteResult(object_id, True)
