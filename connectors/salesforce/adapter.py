"""Salesforce as a :class:`~connectors.interfaces.CrmSource`, built on simple-salesforce.

Pulling changed deals
    One SOQL query through ``queryAll`` (so deleted opportunities still in the recycle bin come back, with
    ``IsDeleted = true``) walks the opportunities modified after the compound cursor (``SystemModstamp``, ``Id``)
    and up to ``until``::

        WHERE SystemModstamp <= <until>
          AND (SystemModstamp > <ts> OR (SystemModstamp = <ts> AND Id > '<id>'))
        ORDER BY SystemModstamp, Id

    following ``nextRecordsUrl`` batch after batch. ``SystemModstamp`` rather than ``LastModifiedDate``: it also
    moves on system changes (roll-ups, quote syncing) and on delete. Should a query locator expire while the
    engine is busy with earlier pages, the query restarts from the last deal handed out. A deal is won when
    ``IsWon`` is true, which Salesforce derives from the stage's OpportunityStage record; stage names are never
    compared (orgs name their won stages as they like: "Closed Won", "Signé", ...).

    Deleted deals are also read from the delete log (``sobjects/Opportunity/deleted/?start=&end=``) before the
    query: those the query will not return (emptied from the recycle bin, or deleted at a time before the
    cursor) are handed out first, as ``Deal(archived=True)``, in a page without a cursor. The engine flags a
    deleted deal that was invoiced.

Deals are hydrated with batched ``IN`` queries (at most 300 ids each): every live deal's account (open and lost
deals get theirs from the same queries), and the won deals' lines: the synced quote's QuoteLineItems when the
customer accepted that quote (``SyncedQuote.Status`` in ``quote_accepted_statuses``), else the
OpportunityLineItems. SKUs are ``Product2.ProductCode``; tax rates are read from the configured custom fields. A
deal's ``probability`` is ``Probability`` / 100 (1 once won, 0 once lost), ``created_at`` its ``CreatedDate``;
the customer's ``created_at`` and ``acquisition_source`` are the account's ``CreatedDate`` and ``AccountSource``.

Activity counts come from two aggregate queries per 200 opportunities, ``SELECT WhatId, TaskSubtype, Type,
COUNT(Id) n FROM Task ... GROUP BY WhatId, TaskSubtype, Type`` and the same on Event (meetings), through
``queryAll``: Salesforce archives activities a year old and ``query`` no longer returns archived ones. A Task is
a call or an e-mail by its ``TaskSubtype`` (by its ``Type`` when the subtype is the generic Task), else a task.

Writes go through sObject Collections (``PATCH composite/sobjects``, 200 records per call, ``allOrNone=false``):
each record succeeds or fails on its own. A call Salesforce refuses as a whole (a value it cannot parse) is
split in halves until the bad record stands alone. Custom fields are created through the Tooling API
(``POST tooling/sobjects/CustomField``) when describe does not list them. Writes set absolute values and an
existing field counts as created, so every call is safe to repeat after a transport failure.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

import structlog
from pydantic import ValidationError

from config.schema import ConnectorSettings
from connectors.domain import Address, Customer, Deal, LineItem
from connectors.errors import ConfigError, VendorError
from connectors.interfaces import CrmSource, Cursor, DealPage, FieldSpec, FieldUpdate, TokenStore, WriteResult
from connectors.salesforce.client import (
    SalesforceClient,
    SalesforceStats,
    SfRecord,
    format_datetime,
    is_salesforce_id,
    parse_date,
    parse_datetime,
    parse_deleted,
    parse_describe,
    parse_save_results,
    soql_quote,
    to_18,
)
from connectors.salesforce.settings import SalesforceSettings

__all__ = ["SalesforceSource", "api_field_name"]

log = structlog.get_logger("ledgerbridge.salesforce")
T = TypeVar("T")

_IN_CHUNK = 300  # ids per IN (...) list: about 6,300 characters of URL
_ACTIVITY_CHUNK = 200  # opportunities per activity count query: a few hundred groups, well under 2,000
_COLLECTION = 200  # records per sObject Collections call
#: Codes of a call refused as a whole because of one record's value.
_VALUE_ERRORS = frozenset({"JSON_PARSER_ERROR", "INVALID_TYPE_ON_FIELD_IN_RECORD", "STRING_TOO_LONG",
                           "NUMBER_OUTSIDE_VALID_RANGE", "INVALID_DATE_FORMAT"})
_OBJECTS: dict[str, str] = {"deal": "Opportunity", "customer": "Account"}
_FIELD_TYPES: dict[str, str] = {"string": "string", "number": "double", "date": "date", "datetime": "datetime",
                                "enumeration": "picklist", "bool": "boolean"}
_COUNTRIES: dict[str, str] = {
    "france": "FR", "germany": "DE", "deutschland": "DE", "allemagne": "DE", "belgium": "BE", "belgique": "BE",
    "spain": "ES", "espagne": "ES", "españa": "ES", "italy": "IT", "italie": "IT", "italia": "IT",
    "netherlands": "NL", "pays-bas": "NL", "luxembourg": "LU", "portugal": "PT", "austria": "AT", "ireland": "IE",
    "switzerland": "CH", "suisse": "CH", "united kingdom": "GB", "royaume-uni": "GB", "united states": "US",
    "united states of america": "US", "usa": "US", "états-unis": "US", "canada": "CA", "monaco": "MC",
}


def api_field_name(name: str) -> str:
    """The API name of a field written back: ``ledgerbridge_invoice_number`` -> ``ledgerbridge_invoice_number__c``.

    A name that already ends in ``__c``, or that starts with an upper-case letter (a standard field such as
    ``Description``), is used as it is.
    """
    if name.endswith("__c") or name[:1].isupper():
        return name
    base = re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9]+", "_", name)).strip("_")
    if not base or not base[0].isalpha():
        base = "LB_" + base
    return base[:40].rstrip("_") + "__c"


def _chunks(seq: Sequence[T], n: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def _digits(value: str | None, n: int) -> str | None:
    if not value:
        return None
    cleaned = "".join(ch for ch in value if not ch.isspace() and ch not in ".-")
    return cleaned if len(cleaned) == n and cleaned.isdigit() else None


def _source(value: str | None) -> str | None:
    """A picklist label as a channel key: ``Organic Search`` -> ``organic_search``."""
    if not value:
        return None
    key = re.sub(r"[^a-z0-9]+", "_", value.strip().lower()).strip("_")
    return key or None


def _probability(r: SfRecord) -> Decimal | None:
    """The opportunity's chance of winning on the 0..1 scale: 1 once won, 0 once lost, else ``Probability`` / 100."""
    if r.flag("IsWon"):
        return Decimal(1)
    if r.flag("IsClosed"):
        return Decimal(0)
    percent = r.decimal("Probability")
    if percent is None:
        return None
    return min(max(percent / 100, Decimal(0)), Decimal(1)).quantize(Decimal("0.0001")).normalize()


def _task_kind(r: SfRecord) -> str:
    """The kind of activity a Task records: its ``TaskSubtype`` (Call, Email, ListEmail), else its ``Type``."""
    subtype = (r.text("TaskSubtype") or "").casefold()
    if subtype == "call":
        return "call"
    if subtype in ("email", "listemail"):
        return "email"
    if subtype in ("", "task"):
        kind = (r.text("Type") or "").casefold()
        if kind in ("call", "email", "meeting"):
            return kind
    return "task"


def _domain(website: str | None) -> str | None:
    if not website:
        return None
    text = website.strip()
    host = urlsplit(text if "://" in text else "//" + text).hostname
    return host.removeprefix("www.") if host else None


def _wire(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        return None  # an empty text clears the field, whatever its type
    if isinstance(value, dt.datetime):
        return format_datetime(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def _minute(value: dt.datetime) -> dt.datetime:
    return value.astimezone(dt.UTC).replace(second=0, microsecond=0)


def _replication_time(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")


_Hydrated = tuple[Customer | None, list[LineItem], Literal["deal", "quote"], str | None]


class SalesforceSource(CrmSource):
    """Opportunities, accounts, quotes and line items of one Salesforce org (see the module docstring)."""

    vendor: ClassVar[str] = "salesforce"
    Settings: ClassVar[type[ConnectorSettings]] = SalesforceSettings

    def __init__(
        self,
        settings: SalesforceSettings,
        tokens: TokenStore,
        *,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``sleep`` and ``monotonic`` (pacing and backoff) are for tests; production uses the defaults."""
        self.settings = settings
        self.stats: SalesforceStats = SalesforceStats()
        self.client = SalesforceClient(settings, tokens, stats=self.stats, sleep=sleep, monotonic=monotonic)
        s = settings
        product_tax = f"Product2.{s.product_tax_rate_field}" if s.product_tax_rate_field else None
        quote_fields = ("SyncedQuoteId", "SyncedQuote.Status") if s.quotes_enabled else ()
        self._opp_fields = self._fields(
            "Id", "Name", "AccountId", "StageName", "IsWon", "IsClosed", "IsDeleted", "Amount", "Probability",
            "CloseDate", "OwnerId", "Owner.Email", "LeadSource", *quote_fields, "CreatedDate", "SystemModstamp",
            s.currency_field)
        self._account_fields = self._fields(
            "Id", "Name", "Website", "BillingAddress", "AccountSource", "CreatedDate", "SystemModstamp",
            s.customer_currency_field,
            s.vat_number_field, s.siren_field, s.siret_field, s.email_field)
        line_common = ("Id", "Product2Id", "Product2.ProductCode", "Product2.Name", "PricebookEntry.ProductCode",
                       "PricebookEntry.Name", "Description", "Quantity", "UnitPrice", "Discount", "SortOrder",
                       product_tax)
        self._oli_fields = self._fields("OpportunityId", *line_common, s.line_tax_rate_field)
        self._qli_fields = self._fields("QuoteId", "LineNumber", *line_common, s.quote_line_tax_rate_field)
        self._accepted = {st.casefold() for st in s.quote_accepted_statuses}

    @staticmethod
    def _fields(*names: str | None) -> str:
        return ", ".join(dict.fromkeys(n for n in names if n))

    @classmethod
    def from_config(cls, settings: Mapping[str, Any], tokens: TokenStore) -> SalesforceSource:
        """Build the connector from its ``crm:`` block; rotated tokens live in ``tokens``."""
        try:
            parsed = SalesforceSettings.model_validate(dict(settings))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'crm'}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"salesforce settings: {problems}") from None
        return cls(parsed, tokens)

    def close(self) -> None:
        self.client.close()

    # -- reading -------------------------------------------------------------------------------------
    def _by_ids(self, sobject: str, fields: str, ids: Iterable[str], *, include_deleted: bool = False,
                key: str = "Id", order: str = "Id") -> list[SfRecord]:
        out: list[SfRecord] = []
        for chunk in self.client.ids_in_chunks(list(ids), _IN_CHUNK):
            listed = ", ".join(soql_quote(i) for i in chunk)
            # SOQL built from fixed field lists and quoted, escaped values.
            soql = f"SELECT {fields} FROM {sobject} WHERE {key} IN ({listed}) ORDER BY {order}"  # noqa: S608
            out.extend(self.client.query_all(soql, include_deleted=include_deleted))
        return out

    def _lines(self, records: Iterable[SfRecord], parent: str, tax_field: str | None) -> dict[str, list[LineItem]]:
        by_parent: dict[str, list[SfRecord]] = {}
        for r in records:
            by_parent.setdefault(str(r.get(parent)), []).append(r)
        out: dict[str, list[LineItem]] = {}
        for pid, rows in by_parent.items():
            rows.sort(key=lambda r: (r.decimal("SortOrder") is None, r.decimal("SortOrder") or 0,
                                     r.text("LineNumber") or "", r.id))
            out[pid] = [self._line(r, tax_field) for r in rows]
        return out

    def _line(self, r: SfRecord, tax_field: str | None) -> LineItem:
        s = self.settings
        sku = r.text("Product2.ProductCode") or r.text("PricebookEntry.ProductCode")
        quantity = r.decimal("Quantity")
        tax = r.decimal(tax_field)
        if tax is None and s.product_tax_rate_field:
            tax = r.decimal(f"Product2.{s.product_tax_rate_field}")
        return LineItem(
            sku=sku,
            description=r.text("Description") or r.text("Product2.Name") or r.text("PricebookEntry.Name") or sku
            or f"Salesforce line {r.id}",
            quantity=Decimal(1) if quantity is None else quantity,
            unit_price=r.decimal("UnitPrice") or Decimal(0),
            discount_percent=r.decimal("Discount") or Decimal(0),
            tax_rate=tax,
        )

    def _customer(self, a: SfRecord) -> Customer:
        s = self.settings
        address = a.get("BillingAddress")
        addr: Mapping[str, Any] = address if isinstance(address, Mapping) else {}

        def part(name: str) -> str | None:
            value = addr.get(name)
            return str(value).strip() or None if value is not None else None

        country = part("countryCode")
        name = part("country")
        if country is None and name:
            country = name.upper() if len(name) == 2 and name.isalpha() else _COUNTRIES.get(name.casefold())
        street = [ln.strip() for ln in (part("street") or "").splitlines() if ln.strip()]
        siren_raw, siret_raw = a.text(s.siren_field), a.text(s.siret_field)
        siren, siret = _digits(siren_raw, 9), _digits(siret_raw, 14)
        if (siren_raw and siren is None) or (siret_raw and siret is None):
            log.warning("salesforce_account_identifier_ignored", account=a.id)
        currency = (a.text(s.customer_currency_field) or "").upper()
        return Customer(
            crm_id=a.id, name=a.text("Name") or f"Salesforce account {a.id}", domain=_domain(a.text("Website")),
            email=a.text(s.email_field), vat_number=a.text(s.vat_number_field), siren=siren, siret=siret,
            country=country, currency=currency if len(currency) == 3 and currency.isalpha() else None,
            address=Address(line1=street[0] if street else None, line2=", ".join(street[1:]) or None,
                            city=part("city"), postal_code=part("postalCode"), region=part("state"), country=country),
            acquisition_source=_source(a.text("AccountSource")),
            created_at=parse_datetime(a.get("CreatedDate")),
            updated_at=parse_datetime(a.get("SystemModstamp")),
        )

    def _accepted_quote(self, r: SfRecord) -> str | None:
        if not self.settings.quotes_enabled:
            return None
        quote = r.text("SyncedQuoteId")
        status = r.text("SyncedQuote.Status")
        return quote if quote and status and status.casefold() in self._accepted else None

    def _hydrate(self, records: Sequence[SfRecord]) -> dict[str, _Hydrated]:
        """The customer of each live opportunity; for the won ones also the invoice lines, their source and the
        accepted quote. The accounts of a whole batch come in the same ``IN`` queries, open and lost deals' too."""
        live = [r for r in records if not r.flag("IsDeleted")]
        if not live:
            return {}
        won = [r for r in live if r.flag("IsWon")]
        s = self.settings
        account_ids = [str(r.get("AccountId")) for r in live if r.text("AccountId")]
        accounts = {a.id: a for a in self._by_ids("Account", self._account_fields, account_ids)}
        quotes = {r.id: q for r in won if (q := self._accepted_quote(r))}
        quote_lines = self._lines(self._by_ids("QuoteLineItem", self._qli_fields, quotes.values(), key="QuoteId",
                                               order="QuoteId, Id"),
                                  "QuoteId", s.quote_line_tax_rate_field) if quotes else {}
        plain = [r.id for r in won if r.id not in quotes]
        opp_lines = self._lines(self._by_ids("OpportunityLineItem", self._oli_fields, plain, key="OpportunityId",
                                             order="OpportunityId, Id"),
                                "OpportunityId", s.line_tax_rate_field) if plain else {}
        out: dict[str, _Hydrated] = {}
        for r in live:
            account = accounts.get(r.text("AccountId") or "")
            customer = self._customer(account) if account is not None else None
            if not r.flag("IsWon"):
                out[r.id] = (customer, [], "deal", None)
            elif r.id in quotes:
                out[r.id] = (customer, quote_lines.get(quotes[r.id], []), "quote", quotes[r.id])
            else:
                out[r.id] = (customer, opp_lines.get(r.id, []), "deal", None)
        return out

    def _deal(self, r: SfRecord, hydrated: _Hydrated | None) -> Deal:
        s = self.settings
        currency = (r.text(s.currency_field) or "").upper()
        if not (len(currency) == 3 and currency.isalpha()):
            currency = s.default_currency
        updated = parse_datetime(r.get("SystemModstamp"))
        if updated is None:
            raise VendorError(f"opportunity {r.id} has no SystemModstamp", vendor=self.vendor)
        customer, lines, source, quote_id = hydrated or (None, [], "deal", None)
        return Deal(
            crm_id=r.id, name=r.text("Name") or f"Salesforce opportunity {r.id}", amount=r.decimal("Amount"),
            currency=currency, stage=r.text("StageName"), is_won=r.flag("IsWon"),
            is_closed=r.flag("IsWon") or r.flag("IsClosed"), probability=_probability(r),
            created_at=parse_datetime(r.get("CreatedDate")), close_date=parse_date(r.get("CloseDate")),
            owner=r.text("Owner.Email") or r.text("OwnerId"),
            acquisition_source=_source(r.text("LeadSource")), customer=customer, line_items=lines,
            lines_source=source, quote_id=quote_id, updated_at=updated, archived=r.flag("IsDeleted"),
        )

    def _deals(self, records: Sequence[SfRecord]) -> list[Deal]:
        hydrated = self._hydrate(records)
        return [self._deal(r, hydrated.get(r.id)) for r in records]

    # -- CrmSource -------------------------------------------------------------------------------------
    def _stream_soql(self, after: tuple[dt.datetime, str] | None, until: dt.datetime) -> str:
        conditions = [f"SystemModstamp <= {format_datetime(until)}"]
        if after is not None:
            ts, rid = format_datetime(after[0]), after[1]
            if rid:
                conditions.append(f"(SystemModstamp > {ts} OR (SystemModstamp = {ts} AND Id > {soql_quote(rid)}))")
            else:
                conditions.append(f"SystemModstamp >= {ts}")
        where = " AND ".join(conditions)
        return f"SELECT {self._opp_fields} FROM Opportunity WHERE {where} ORDER BY SystemModstamp ASC, Id ASC"  # noqa: S608

    def changed_deals(self, since: Cursor | None, until: dt.datetime, page_size: int = 100) -> Iterator[DealPage]:
        size = max(1, page_size)
        if since is not None:
            swept = self._deleted_outside_stream(since, until)
            for chunk in _chunks(swept, size):
                yield DealPage(list(chunk), None)
        after = (since.value, since.tiebreak) if since is not None else None
        restarts = 0
        while True:
            soql = self._stream_soql(after, until)
            try:
                page = self.client.query(soql, include_deleted=True)
                while True:
                    if page.records:
                        restarts = 0
                        deals = self._deals(page.records)
                        for chunk in _chunks(deals, size):
                            last = chunk[-1]
                            after = (last.updated_at, last.crm_id)
                            yield DealPage(list(chunk), Cursor(last.updated_at, last.crm_id))
                    if page.done or not page.next_url:
                        return
                    page = self.client.query_more(page.next_url)
            except VendorError as exc:
                if exc.code != "INVALID_QUERY_LOCATOR" or restarts >= 3:
                    raise
                restarts += 1
                log.warning("salesforce_query_locator_expired; querying again from the last deal handed out")

    def _deleted_outside_stream(self, since: Cursor, until: dt.datetime) -> list[Deal]:
        """Deleted opportunities in the delete log that the queryAll stream will not hand out."""
        s = self.settings
        # The delete log's times are truncated to the minute: read up to the end of the minute of the horizon.
        horizon = min(until, dt.datetime.now(dt.UTC))
        end = _minute(horizon) + dt.timedelta(minutes=1)
        start = _minute(since.value - dt.timedelta(seconds=s.deleted_overlap_s))
        oldest = end - dt.timedelta(days=14)
        if start < oldest:
            # Older deletes are out of the log's reach; those still in the recycle bin come through queryAll.
            log.info("salesforce_delete_log_window_clamped", since=since.value.isoformat(), start=oldest.isoformat())
            start = oldest
        if end - start <= dt.timedelta(minutes=1):
            start = end - dt.timedelta(minutes=2)
        try:
            payload = self.client.rest("GET", "sobjects/Opportunity/deleted/", params={
                "start": _replication_time(start), "end": _replication_time(end)},
                endpoint="sobjects/Opportunity/deleted")
        except VendorError as exc:
            if exc.code != "INVALID_REPLICATION_DATE":
                raise
            # The window is refused (clocks apart, a purged log): queryAll still returns the recycle bin.
            log.warning("salesforce_delete_log_unreadable", detail=exc.detail)
            return []
        log_entries = [(rid, at) for rid, at in parse_deleted(payload).records
                       if is_salesforce_id(rid, "006") and at <= until]
        if not log_entries:
            return []
        found = {r.id: r for r in self._by_ids("Opportunity", self._opp_fields, [rid for rid, _ in log_entries],
                                               include_deleted=True)}
        since_key = (since.value, since.tiebreak)
        out: dict[str, Deal] = {}
        for rid, deleted_at in log_entries:
            rec = found.get(rid)
            if rec is None:
                # Emptied from the recycle bin: only its id and the time of the delete are left.
                out[rid] = Deal(crm_id=rid, name=f"Deleted Salesforce opportunity {rid}", currency=s.default_currency,
                                updated_at=deleted_at, archived=True)
                continue
            if not rec.flag("IsDeleted"):
                continue  # undeleted since: the query hands it out if it changed
            stamp = parse_datetime(rec.get("SystemModstamp"))
            if stamp is not None and (stamp, rec.id) > since_key and stamp <= until:
                continue  # the query hands it out, in order
            out[rid] = self._deal(rec, None)
        return sorted(out.values(), key=lambda d: (d.updated_at, d.crm_id))

    def get_deals(self, ids: Sequence[str]) -> list[Deal]:
        wanted: dict[str, str] = {}
        for raw in ids:
            text = str(raw)
            if is_salesforce_id(text, "006"):
                wanted.setdefault(to_18(text[:15]), text)
        records = {r.id: r for r in self._by_ids("Opportunity", self._opp_fields, list(wanted), include_deleted=True)}
        deals = {d.crm_id: d for d in self._deals([records[i] for i in wanted if i in records])}
        return [deals[i] for i in wanted if i in deals]

    def activity_counts(self, deal_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        """Tasks and Events on each opportunity, counted by kind with two aggregate queries per 200 opportunities.

        ``queryAll`` because Salesforce archives activities after a year and ``query`` leaves archived ones out;
        deleted ones are filtered out by ``IsDeleted``. Keys are the ids as asked; unknown ids are absent.
        """
        wanted: dict[str, str] = {}
        for raw in deal_ids:
            text = str(raw).strip()
            if is_salesforce_id(text, "006"):
                wanted.setdefault(to_18(text[:15]), text)
        out: dict[str, dict[str, int]] = {}
        for chunk in _chunks(list(wanted), _ACTIVITY_CHUNK):
            self._count_activities(list(chunk), wanted, out)
        return out

    def _count_activities(self, ids: list[str], wanted: Mapping[str, str], out: dict[str, dict[str, int]]) -> None:
        listed = ", ".join(soql_quote(i) for i in ids)
        where = f"WHERE WhatId IN ({listed}) AND IsDeleted = false"
        # SOQL built from fixed field lists and quoted, escaped ids.
        queries: tuple[tuple[str, Callable[[SfRecord], str]], ...] = (
            (f"SELECT WhatId, TaskSubtype, Type, COUNT(Id) n FROM Task {where} "  # noqa: S608
             "GROUP BY WhatId, TaskSubtype, Type", _task_kind),
            (f"SELECT WhatId, COUNT(Id) n FROM Event {where} GROUP BY WhatId", lambda _row: "meeting"),  # noqa: S608
        )
        try:
            rows = [(row, kind_of) for soql, kind_of in queries
                    for row in self.client.query_all(soql, include_deleted=True)]
        except VendorError as exc:
            if exc.code != "EXCEEDED_ID_LIMIT" or len(ids) < 2:
                raise
            # More groups than one aggregate answer holds (2,000): count each half on its own.
            mid = len(ids) // 2
            self._count_activities(ids[:mid], wanted, out)
            self._count_activities(ids[mid:], wanted, out)
            return
        for row, kind_of in rows:
            what = row.text("WhatId") or ""
            key = wanted.get(to_18(what[:15])) if is_salesforce_id(what) else None
            n = int(row.decimal("n") or 0)
            if key is None or n <= 0:
                continue
            counts = out.setdefault(key, {})
            kind = kind_of(row)
            counts[kind] = counts.get(kind, 0) + n

    def ensure_fields(self, object_type: Literal["deal", "customer"], fields: Sequence[FieldSpec]) -> None:
        sobject = _OBJECTS[object_type]
        described = parse_describe(self.client.rest("GET", f"sobjects/{sobject}/describe",
                                                    endpoint=f"sobjects/{sobject}/describe"))
        for f in fields:
            name = api_field_name(f.name)
            existing = described.field(name)
            if existing is not None:
                if existing.type != _FIELD_TYPES[f.type]:
                    log.warning("salesforce_field_type_differs", sobject=sobject, field=name,
                                expected=_FIELD_TYPES[f.type], found=existing.type)
                continue
            body = {"FullName": f"{sobject}.{name}", "Metadata": self._metadata(f)}
            try:
                answer = self.client.tooling("POST", "sobjects/CustomField", body)
            except VendorError as exc:
                if exc.code not in ("DUPLICATE_DEVELOPER_NAME", "DUPLICATE_VALUE"):
                    raise
                # Created by an earlier attempt or by someone else; describe did not list it, so the
                # integration user may not see it yet.
                answer = {"success": True}
            if not isinstance(answer, Mapping) or answer.get("success") is not True:
                raise VendorError(f"creating {sobject}.{name} was not confirmed", vendor=self.vendor,
                                  method="POST", path="tooling/sobjects/CustomField")
            log.info("salesforce_field_created", sobject=sobject, field=name)
            self._grant_access(sobject, name, f.type)

    def _grant_access(self, sobject: str, name: str, field_type: str) -> None:
        """Read and edit access to a new field through the configured permission set (field-level security)."""
        permission_set = self.settings.field_permission_set_id
        if not permission_set:
            log.warning("salesforce_field_needs_access", sobject=sobject, field=name,
                        hint="grant the integration user read/edit access, or set field_permission_set_id")
            return
        body = {"ParentId": permission_set, "SobjectType": sobject, "Field": f"{sobject}.{name}",
                "PermissionsRead": True, "PermissionsEdit": True}
        try:
            self.client.rest("POST", "sobjects/FieldPermissions", body=body, endpoint="sobjects/FieldPermissions")
        except VendorError as exc:
            if exc.code not in ("DUPLICATE_VALUE", "DUPLICATE_DEVELOPER_NAME"):
                raise

    @staticmethod
    def _metadata(f: FieldSpec) -> dict[str, Any]:
        meta: dict[str, Any] = {"label": f.label[:40] or f.name[:40],
                                "description": "Written by LedgerBridge from the accounting system"}
        if f.type == "string":
            meta.update(type="Text", length=255)
        elif f.type == "number":
            meta.update(type="Number", precision=18, scale=2)
        elif f.type == "date":
            meta.update(type="Date")
        elif f.type == "datetime":
            meta.update(type="DateTime")
        elif f.type == "bool":
            meta.update(type="Checkbox", defaultValue="false")
        else:
            meta.update(type="Picklist", valueSet={"restricted": True, "valueSetDefinition": {
                "sorted": False, "value": [{"fullName": o, "label": o, "default": False} for o in f.options]}})
        return meta

    def write_fields(
        self, object_type: Literal["deal", "customer"], updates: Sequence[FieldUpdate]
    ) -> list[WriteResult]:
        sobject = _OBJECTS[object_type]
        merged: dict[str, dict[str, Any]] = {}
        results: dict[str, WriteResult] = {}
        for u in updates:
            oid = str(u.object_id)
            if not is_salesforce_id(oid):
                results[oid] = WriteResult(oid, False, error="not a Salesforce record id")
                continue
            merged.setdefault(oid, {}).update({api_field_name(k): _wire(v) for k, v in u.values.items()})
        items = list(merged.items())
        for chunk in _chunks(items, _COLLECTION):
            self._update(sobject, list(chunk), results)
        return [results[str(u.object_id)] for u in updates]

    def _update(self, sobject: str, items: list[tuple[str, dict[str, Any]]], results: dict[str, WriteResult]) -> None:
        """One sObject Collections update; a call refused as a whole is split until the bad records stand alone."""
        body = {"allOrNone": False,
                "records": [{"attributes": {"type": sobject}, "id": oid, **values} for oid, values in items]}
        try:
            answer = self.client.rest("PATCH", "composite/sobjects", body=body)
        except VendorError as exc:
            if exc.status != 400:
                raise
            if len(items) == 1 or exc.code not in _VALUE_ERRORS:
                # A value Salesforce cannot read is one record's fault: split to find it. Anything else (an
                # unknown or invisible field...) is the same for every record of the call.
                error = f"{exc.code}: {exc.detail}" if exc.code else exc.detail
                for oid, _ in items:
                    results[oid] = WriteResult(oid, False, error=error[:500])
                return
            mid = len(items) // 2
            self._update(sobject, items[:mid], results)
            self._update(sobject, items[mid:], results)
            return
        saved = parse_save_results(answer)
        if len(saved) != len(items):
            raise VendorError(f"sObject Collections answered {len(saved)} results for {len(items)} records",
                              vendor=self.vendor, method="PATCH", path="composite/sobjects")
        for (oid, _), result in zip(items, saved, strict=True):
            results[oid] = WriteResult(oid, True) if result.success else WriteResult(oid, False,
                                                                                     error=result.message()[:500])
