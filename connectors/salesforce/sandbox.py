"""A stateful simulator of the Salesforce REST API, faithful enough for simple-salesforce and the data movers.

What it serves, under ``/services/data/vXX.X/`` (any version from 31.0 up to ``api_version``; a trailing
slash is accepted everywhere):

- ``query`` and ``queryAll`` (``?q=`` SOQL), with batches of at most 2,000 records (``Sforce-Query-Options:
  batchSize=N`` is honoured between 200 and 2,000) and ``nextRecordsUrl`` (``query/<locator>-<offset>``); a
  locator unused for ``locator_ttl_s`` or pushed out by more than ``max_locators`` newer ones answers
  ``INVALID_QUERY_LOCATOR``. The SOQL subset: ``SELECT`` fields, parent relationship paths
  (``Account.Name``, ``SyncedQuote.Status``, ``PricebookEntry.Product2.ProductCode``), child subqueries
  (``(SELECT ... FROM OpportunityLineItems)``) and ``COUNT()``; ``FROM``; ``WHERE`` with ``AND``/``OR``/``NOT``
  and parentheses, ``= != <> < > <= >=``, ``IN``/``NOT IN``, ``LIKE`` (case-insensitive), unquoted datetime and
  date literals (a quoted one is refused, as Salesforce does), ``true``/``false``/``null``; ``GROUP BY`` with
  ``COUNT(field)`` and ``COUNT_DISTINCT(field)`` and aliases (``AggregateResult`` rows, unaliased aggregates
  named ``expr0``...; every field selected must be grouped; all rows in one batch, more than 2,000 answer
  ``EXCEEDED_ID_LIMIT`` as aggregate queries cannot be continued); ``ORDER BY`` several fields with
  ``ASC``/``DESC`` and ``NULLS FIRST``/``LAST``; ``LIMIT``; ``OFFSET``. ``query`` leaves deleted records out,
  ``queryAll`` returns them with ``IsDeleted = true``. Activities are archived once a year old (closed tasks
  by their due date, events by their end): ``query`` leaves archived ones out, ``queryAll`` returns them with
  ``IsArchived = true``, as Salesforce does.
- sObjects: get (``?fields=``), create (201 ``{id, success, errors}``), update (``PATCH`` -> 204), upsert by an
  external id (201 created / 200 updated / 300 several matches), delete (204), get by external id, basic info,
  ``describe``, the global ``sobjects`` list, ``updated/`` and ``deleted/`` (``?start=&end=``, seconds ignored,
  at most 30 days back, more than a minute apart, or ``INVALID_REPLICATION_DATE``).
- ``composite/sobjects`` (``POST`` create, ``PATCH`` update; at most 200 records, ``allOrNone``); per-record
  results ``{id, success, errors: [{statusCode, message, fields}]}``, ``ALL_OR_NONE_OPERATION_ROLLED_BACK`` for
  the good records of a failed all-or-none call.
- ``limits``; ``tooling/sobjects/CustomField`` (creates a custom field: describe lists it, writes accept it).
- ``/services/oauth2/token`` with the ``refresh_token`` and ``password`` grants, answering like Salesforce:
  ``{access_token, instance_url, id, token_type, issued_at, signature, scope}`` and no ``expires_in``; with
  ``refresh_rotation`` each refresh also returns a new refresh token and invalidates the old one.

With ``field_security``, a custom field created through the Tooling API stays invisible to the API (describe,
SOQL, writes) until a FieldPermissions record grants read access to it, as field-level security does for an
integration user whose profile does not see new fields.

Errors are Salesforce's JSON arrays ``[{"message", "errorCode", "fields"}]``; an expired or unknown session is
``401 INVALID_SESSION_ID`` (sessions last ``session_lifetime_s`` of inactivity on the sandbox clock); every API
answer carries ``Sforce-Limit-Info: api-usage=N/MAX`` and, once ``daily_limit`` calls were made in a rolling
24 hours, calls answer ``403 REQUEST_LIMIT_EXCEEDED`` ("TotalRequests Limit exceeded."). Injected 5xx faults
use Salesforce's bodies; an injected 429 (which Salesforce itself does not send) carries ``Retry-After``.

Objects: User, Account, Opportunity, OpportunityLineItem, Product2, Pricebook2, PricebookEntry, Quote,
QuoteLineItem, OpportunityStage, Task, Event, PermissionSet and FieldPermissions, with 18-character ids and
their key prefixes (001, 006, 00k, 01t, 01s, 01u, 0Q0, 0QL, 01J, 00T, 00U, 005, 0PS, 01k). ``IsWon``/``IsClosed``
derive from the stage's OpportunityStage record, and so does ``Probability`` (percent) unless set; every write sets
``SystemModstamp`` from the sandbox clock (a delete too: the delete log's ``deletedDate`` comes from it); line
items roll up into ``Amount``; a quote becomes the synced quote when the opportunity's ``SyncedQuoteId`` is set,
and its line items then replace the opportunity's, as Salesforce quote syncing does.

:meth:`SalesforceSandbox.load_book` loads the seed book: companies become Accounts (custom fields
``VAT_Number__c``, ``SIREN__c``, ``SIRET__c``, ``Billing_Email__c``; ``CurrencyIsoCode``; ``AccountSource``),
products Product2 records with standard price book entries in EUR and USD, deals Opportunities. About 40 % of
the deals follow a French sales process whose won stage is "Signé" (and whose lost stage is "Perdu"); some open
deals sit in "Verbal Won", a stage that is neither won nor closed. A deal whose quote the customer accepted has
that Quote (Status "Accepted") synced, so its line items mirror the quote's; sent, draft and refused quotes exist
but are not synced. Line items carry ``Tax_Rate__c``. Records keep the book id in ``LB_Book_Id__c``. Each
deal's sales activities (:meth:`connectors.seedbook.Book.activities`) hang off its opportunity (``WhatId``):
calls and e-mails as completed Tasks with ``TaskSubtype`` Call or Email, tasks with ``TaskSubtype`` Task,
meetings as Events.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import random
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import parse_qs, unquote

from connectors.salesforce.client import dumps, loads, parse_datetime, to_18
from connectors.sandboxkit import (
    Clock,
    FaultPlan,
    Route,
    SandboxApp,
    SandboxRequest,
    SandboxResponse,
    WindowLimit,
)
from connectors.seedbook import Book, BookLine

__all__ = [
    "COUNTRY_NAMES",
    "DEMO_CLIENT_ID",
    "DEMO_CLIENT_SECRET",
    "DEMO_PASSWORD",
    "DEMO_REFRESH_TOKEN",
    "DEMO_USERNAME",
    "SalesforceSandbox",
    "sandbox_settings",
    "sf_datetime",
]

DEMO_CLIENT_ID = "demo-salesforce-client"
DEMO_CLIENT_SECRET = "demo-salesforce-secret"
DEMO_REFRESH_TOKEN = "demo-salesforce-refresh-token"
DEMO_USERNAME = "integration@atelier-numerique.fr"
DEMO_PASSWORD = "demo-salesforce-password"

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MAX_BATCH = 2000
_MIN_BATCH = 200
_MAX_COLLECTION = 200
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_CURRENCIES = ("EUR", "USD", "GBP", "CHF")
_USD_PER_EUR = Decimal("1.08")
_ORG_EPOCH = dt.datetime(2023, 3, 1, tzinfo=dt.UTC)
_NOT_FOUND = [{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}]


def sandbox_settings(url: str, *, time_scale: float = 1.0) -> dict[str, Any]:
    """The ``crm:`` block that points :class:`~connectors.salesforce.SalesforceSource` at a sandbox served at ``url``.

    The sandbox listens on plain http, hence ``allow_http``; the demo refresh token is valid in every sandbox (it
    does not rotate unless the sandbox was built with ``refresh_rotation``).
    """
    return {"type": "salesforce", "instance_url": url, "login_url": url, "allow_http": True,
            "client_id": DEMO_CLIENT_ID, "client_secret": DEMO_CLIENT_SECRET, "refresh_token": DEMO_REFRESH_TOKEN,
            "time_scale": time_scale}


def sf_datetime(value: dt.datetime) -> str:
    """Salesforce's datetime format: ``2024-05-01T09:30:00.000+0000``."""
    value = value.astimezone(dt.UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}+0000"


def _ms(value: dt.datetime) -> dt.datetime:
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def _money(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


# ------------------------------------------------------------------------------------------------------
# schema
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _F:
    """A field definition."""

    name: str
    type: str  # id boolean string textarea url email phone picklist currency double percent int date datetime
    #            reference address
    label: str = ""
    length: int = 0
    precision: int = 0
    scale: int = 0
    ref: tuple[str, ...] = ()
    rel: str | None = None
    createable: bool = True
    updateable: bool = True
    nillable: bool = True
    custom: bool = False
    external_id: bool = False
    unique: bool = False
    picklist: tuple[str, ...] = ()
    restricted: bool = False


@dataclass
class _Obj:
    name: str
    label: str
    prefix: str
    fields: dict[str, _F]
    children: list[tuple[str, str, str]] = field(default_factory=list)  # (relationship, child type, field)
    createable: bool = True

    def field(self, name: str) -> _F | None:
        f = self.fields.get(name)
        if f is not None:
            return f
        low = name.lower()
        return next((f for k, f in self.fields.items() if k.lower() == low), None)

    def relationship(self, name: str) -> _F | None:
        low = name.lower()
        return next((f for f in self.fields.values() if f.rel is not None and f.rel.lower() == low), None)

    def child(self, name: str) -> tuple[str, str, str] | None:
        low = name.lower()
        return next((c for c in self.children if c[0].lower() == low), None)


_TEXT_TYPES = frozenset({"string", "textarea", "url", "email", "phone", "picklist"})
_NUMBER_TYPES = frozenset({"currency", "double", "percent", "int"})
_ID_TYPES = frozenset({"id", "reference"})
_SOAP = {"id": "tns:ID", "reference": "tns:ID", "boolean": "xsd:boolean", "currency": "xsd:double",
         "double": "xsd:double", "percent": "xsd:double", "int": "xsd:int", "date": "xsd:date",
         "datetime": "xsd:dateTime", "address": "urn:address"}

_STAGES: tuple[tuple[str, int, bool, bool, str], ...] = (
    # (name, default probability, closed, won, forecast category)
    ("Prospecting", 10, False, False, "Pipeline"),
    ("Qualification", 10, False, False, "Pipeline"),
    ("Needs Analysis", 20, False, False, "Pipeline"),
    ("Value Proposition", 50, False, False, "Pipeline"),
    ("Id. Decision Makers", 60, False, False, "Pipeline"),
    ("Perception Analysis", 70, False, False, "Pipeline"),
    ("Proposal/Price Quote", 75, False, False, "Pipeline"),
    ("Negotiation/Review", 90, False, False, "Pipeline"),
    ("Verbal Won", 95, False, False, "Commit"),
    ("Closed Won", 100, True, True, "Closed"),
    ("Closed Lost", 0, True, False, "Omitted"),
    ("Découverte", 10, False, False, "Pipeline"),
    ("Étude du besoin", 25, False, False, "Pipeline"),
    ("Proposition envoyée", 50, False, False, "Pipeline"),
    ("Négociation", 80, False, False, "BestCase"),
    ("Signé", 100, True, True, "Closed"),
    ("Perdu", 0, True, False, "Omitted"),
)
#: The book's neutral stages in the standard sales process and in the French "Grands comptes" one.
_BOOK_STAGES = {
    "standard": {"prospect": "Prospecting", "qualified": "Qualification", "proposal": "Proposal/Price Quote",
                 "negotiation": "Negotiation/Review", "won": "Closed Won", "lost": "Closed Lost"},
    "grands_comptes": {"prospect": "Découverte", "qualified": "Étude du besoin", "proposal": "Proposition envoyée",
                       "negotiation": "Négociation", "won": "Signé", "lost": "Perdu"},
}
_QUOTE_STATUS = {"accepted": "Accepted", "sent": "Presented", "draft": "Draft", "rejected": "Denied"}
# Activities (Task and Event): the standard picklists of a Sales Cloud org.
_TASK_STATUSES = ("Not Started", "In Progress", "Completed", "Waiting on someone else", "Deferred")
_TASK_SUBTYPES = ("Task", "Email", "ListEmail", "Cadence", "Call", "LinkedIn")
_ACTIVITY_TYPES = ("Call", "Email", "Meeting", "Other")
#: Closed tasks due, and events that ended, more than this long ago are archived: ``query`` leaves them out,
#: ``queryAll`` returns them (with ``IsArchived = true``).
_ARCHIVE_AFTER = dt.timedelta(days=365)
_QUOTE_STATUSES = ("Draft", "Needs Review", "In Review", "Approved", "Rejected", "Presented", "Accepted", "Denied")
_SOURCES = ("Web", "Phone Inquiry", "Partner Referral", "Purchased List", "Other", "Organic Search", "Paid Search",
            "Email Marketing", "Social Media", "Referrals", "Direct Traffic", "Offline", "Paid Social",
            "Other Campaigns")
COUNTRY_NAMES = {"FR": "France", "DE": "Germany", "BE": "Belgium", "ES": "Spain", "IT": "Italy",
                 "US": "United States", "GB": "United Kingdom", "NL": "Netherlands", "CH": "Switzerland"}


class _Flags(TypedDict, total=False):
    createable: bool
    updateable: bool


def _system_fields() -> list[_F]:
    ro: _Flags = {"createable": False, "updateable": False}
    return [
        _F("Id", "id", "Record ID", 18, nillable=False, **ro),
        _F("IsDeleted", "boolean", "Deleted", nillable=False, **ro),
        _F("CreatedDate", "datetime", "Created Date", nillable=False, **ro),
        _F("CreatedById", "reference", "Created By ID", 18, ref=("User",), rel="CreatedBy", nillable=False, **ro),
        _F("LastModifiedDate", "datetime", "Last Modified Date", nillable=False, **ro),
        _F("LastModifiedById", "reference", "Last Modified By ID", 18, ref=("User",), rel="LastModifiedBy",
           nillable=False, **ro),
        _F("SystemModstamp", "datetime", "System Modstamp", nillable=False, **ro),
    ]


def _base_schema() -> dict[str, _Obj]:
    ro: _Flags = {"createable": False, "updateable": False}
    create_only: _Flags = {"updateable": False}
    cur = _F("CurrencyIsoCode", "picklist", "Currency ISO Code", 3, picklist=_CURRENCIES, restricted=True)
    cur_ro = replace(cur, createable=False, updateable=False)
    book = _F("LB_Book_Id__c", "string", "Seed book id", 20, custom=True, external_id=True, unique=True)
    tax = _F("Tax_Rate__c", "percent", "Taux de TVA", precision=5, scale=2, custom=True)
    stages = tuple(s[0] for s in _STAGES)
    defs: dict[str, tuple[str, str, list[_F]]] = {
        "User": ("User", "005", [
            _F("Username", "string", "Username", 80, nillable=False), _F("Name", "string", "Full Name", 121, **ro),
            _F("FirstName", "string", "First Name", 40), _F("LastName", "string", "Last Name", 80, nillable=False),
            _F("Email", "email", "Email", 128, nillable=False), _F("Alias", "string", "Alias", 8),
            _F("IsActive", "boolean", "Active"),
        ]),
        "Account": ("Account", "001", [
            _F("Name", "string", "Account Name", 255, nillable=False), _F("Website", "url", "Website", 255),
            _F("Phone", "phone", "Account Phone", 40), _F("Description", "textarea", "Account Description", 32000),
            _F("AccountSource", "picklist", "Account Source", 255, picklist=_SOURCES),
            _F("BillingStreet", "textarea", "Billing Street", 255), _F("BillingCity", "string", "Billing City", 40),
            _F("BillingState", "string", "Billing State/Province", 80),
            _F("BillingPostalCode", "string", "Billing Zip/Postal Code", 20),
            _F("BillingCountry", "string", "Billing Country", 80),
            _F("BillingCountryCode", "picklist", "Billing Country Code", 10, picklist=tuple(COUNTRY_NAMES),
               restricted=True),
            _F("BillingAddress", "address", "Billing Address", **ro), cur,
            _F("OwnerId", "reference", "Owner ID", 18, ref=("User",), rel="Owner"),
            _F("VAT_Number__c", "string", "Numéro de TVA intracommunautaire", 20, custom=True),
            _F("SIREN__c", "string", "SIREN", 9, custom=True), _F("SIRET__c", "string", "SIRET", 14, custom=True),
            _F("Billing_Email__c", "email", "E-mail de facturation", 80, custom=True), book,
        ]),
        "Opportunity": ("Opportunity", "006", [
            _F("Name", "string", "Name", 120, nillable=False),
            _F("AccountId", "reference", "Account ID", 18, ref=("Account",), rel="Account"),
            _F("StageName", "picklist", "Stage", 255, picklist=stages, restricted=True, nillable=False),
            _F("CloseDate", "date", "Close Date", nillable=False),
            _F("Amount", "currency", "Amount", precision=18, scale=2),
            _F("Probability", "percent", "Probability (%)", precision=3, scale=0),
            _F("IsWon", "boolean", "Won", **ro), _F("IsClosed", "boolean", "Closed", **ro),
            _F("ForecastCategoryName", "picklist", "Forecast Category", 40,
               picklist=("Omitted", "Pipeline", "BestCase", "Commit", "Closed")),
            _F("Type", "picklist", "Opportunity Type", 255, picklist=("Existing Business", "New Business")),
            _F("LeadSource", "picklist", "Lead Source", 255, picklist=_SOURCES),
            _F("NextStep", "string", "Next Step", 255), _F("Description", "textarea", "Description", 32000), cur,
            _F("Pricebook2Id", "reference", "Price Book ID", 18, ref=("Pricebook2",), rel="Pricebook2"),
            _F("SyncedQuoteId", "reference", "Quote ID", 18, ref=("Quote",), rel="SyncedQuote"),
            _F("HasOpportunityLineItem", "boolean", "Has Line Item", **ro),
            _F("OwnerId", "reference", "Owner ID", 18, ref=("User",), rel="Owner"), book,
        ]),
        "Product2": ("Product", "01t", [
            _F("Name", "string", "Product Name", 255, nillable=False), _F("ProductCode", "string", "Product Code", 255),
            _F("Description", "textarea", "Product Description", 4000), _F("IsActive", "boolean", "Active"),
            _F("Family", "picklist", "Product Family", 255, picklist=("Services", "Licences", "Matériel",
                                                                      "Travaux", "Édition")), tax,
        ]),
        "Pricebook2": ("Price Book", "01s", [
            _F("Name", "string", "Price Book Name", 255, nillable=False), _F("IsActive", "boolean", "Active"),
            _F("IsStandard", "boolean", "Is Standard Price Book", **ro),
            _F("Description", "string", "Description", 255),
        ]),
        "PricebookEntry": ("Price Book Entry", "01u", [
            _F("Name", "string", "Product Name", 255, **ro),
            _F("Pricebook2Id", "reference", "Price Book ID", 18, ref=("Pricebook2",), rel="Pricebook2",
               nillable=False, **create_only),
            _F("Product2Id", "reference", "Product ID", 18, ref=("Product2",), rel="Product2", nillable=False,
               **create_only),
            _F("UnitPrice", "currency", "List Price", precision=18, scale=2, nillable=False),
            _F("IsActive", "boolean", "Active"), _F("UseStandardPrice", "boolean", "Use Standard Price"),
            _F("ProductCode", "string", "Product Code", 255, **ro), replace(cur, updateable=False),
        ]),
        "OpportunityLineItem": ("Opportunity Product", "00k", [
            _F("OpportunityId", "reference", "Opportunity ID", 18, ref=("Opportunity",), rel="Opportunity",
               nillable=False, **create_only),
            _F("PricebookEntryId", "reference", "Price Book Entry ID", 18, ref=("PricebookEntry",),
               rel="PricebookEntry", **create_only),
            _F("Product2Id", "reference", "Product ID", 18, ref=("Product2",), rel="Product2", **create_only),
            _F("ProductCode", "string", "Product Code", 255, **ro), _F("Name", "string", "Opportunity Product Name",
                                                                          376, **ro),
            _F("Quantity", "double", "Quantity", precision=12, scale=2, nillable=False),
            _F("UnitPrice", "currency", "Sales Price", precision=18, scale=2),
            _F("ListPrice", "currency", "List Price", precision=18, scale=2, **ro),
            _F("Discount", "percent", "Discount", precision=18, scale=2),
            _F("Subtotal", "currency", "Subtotal", precision=18, scale=2, **ro),
            _F("TotalPrice", "currency", "Total Price", precision=18, scale=2),
            _F("Description", "string", "Line Description", 255), _F("SortOrder", "int", "Sort Order"),
            _F("ServiceDate", "date", "Date"), tax, cur_ro,
        ]),
        "Quote": ("Quote", "0Q0", [
            _F("Name", "string", "Quote Name", 255, nillable=False),
            _F("OpportunityId", "reference", "Opportunity ID", 18, ref=("Opportunity",), rel="Opportunity",
               nillable=False, **create_only),
            _F("AccountId", "reference", "Account ID", 18, ref=("Account",), rel="Account", **ro),
            _F("Status", "picklist", "Status", 40, picklist=_QUOTE_STATUSES),
            _F("IsSyncing", "boolean", "Syncing", **ro),
            _F("Pricebook2Id", "reference", "Price Book ID", 18, ref=("Pricebook2",), rel="Pricebook2"),
            _F("QuoteNumber", "string", "Quote Number", 30, **ro), _F("ExpirationDate", "date", "Expiration Date"),
            _F("Description", "textarea", "Description", 32000),
            _F("Subtotal", "currency", "Subtotal", precision=18, scale=2, **ro),
            _F("TotalPrice", "currency", "Total Price", precision=18, scale=2, **ro),
            _F("GrandTotal", "currency", "Grand Total", precision=18, scale=2, **ro),
            _F("LineItemCount", "int", "Line Items", **ro), cur_ro, book,
        ]),
        "QuoteLineItem": ("Quote Line Item", "0QL", [
            _F("QuoteId", "reference", "Quote ID", 18, ref=("Quote",), rel="Quote", nillable=False, **create_only),
            _F("PricebookEntryId", "reference", "Price Book Entry ID", 18, ref=("PricebookEntry",),
               rel="PricebookEntry", **create_only),
            _F("Product2Id", "reference", "Product ID", 18, ref=("Product2",), rel="Product2", **create_only),
            _F("LineNumber", "string", "Line Item Number", 255, **ro),
            _F("Quantity", "double", "Quantity", precision=12, scale=2, nillable=False),
            _F("UnitPrice", "currency", "Sales Price", precision=18, scale=2, nillable=False),
            _F("ListPrice", "currency", "List Price", precision=18, scale=2, **ro),
            _F("Discount", "percent", "Discount", precision=18, scale=2),
            _F("Subtotal", "currency", "Subtotal", precision=18, scale=2, **ro),
            _F("TotalPrice", "currency", "Total Price", precision=18, scale=2, **ro),
            _F("Description", "string", "Line Item Description", 255), _F("SortOrder", "int", "Sort Order"),
            _F("ServiceDate", "date", "Date"), tax, cur_ro,
        ]),
        "Task": ("Task", "00T", [
            _F("Subject", "string", "Subject", 255), _F("Description", "textarea", "Comments", 32000),
            _F("WhatId", "reference", "Related To ID", 18, ref=("Opportunity", "Account", "Quote"), rel="What"),
            _F("AccountId", "reference", "Account ID", 18, ref=("Account",), rel="Account", **ro),
            _F("ActivityDate", "date", "Due Date Only"),
            _F("Status", "picklist", "Status", 40, picklist=_TASK_STATUSES),  # defaults: Not Started, Normal
            _F("Priority", "picklist", "Priority", 40, picklist=("High", "Normal", "Low")),
            _F("IsClosed", "boolean", "Closed", **ro),
            _F("TaskSubtype", "picklist", "Task Subtype", 40, picklist=_TASK_SUBTYPES, restricted=True,
               **create_only),
            _F("Type", "picklist", "Type", 40, picklist=_ACTIVITY_TYPES),
            _F("CallType", "picklist", "Call Type", 40, picklist=("Internal", "Inbound", "Outbound")),
            _F("CallDurationInSeconds", "int", "Call Duration"),
            _F("CompletedDateTime", "datetime", "Completed Date/Time", **ro),
            _F("IsArchived", "boolean", "Archived", **ro),
            _F("OwnerId", "reference", "Assigned To ID", 18, ref=("User",), rel="Owner"),
        ]),
        "Event": ("Event", "00U", [
            _F("Subject", "string", "Subject", 255), _F("Description", "textarea", "Description", 32000),
            _F("WhatId", "reference", "Related To ID", 18, ref=("Opportunity", "Account", "Quote"), rel="What"),
            _F("AccountId", "reference", "Account ID", 18, ref=("Account",), rel="Account", **ro),
            _F("ActivityDateTime", "datetime", "Due Date Time"), _F("ActivityDate", "date", "Due Date Only", **ro),
            _F("StartDateTime", "datetime", "Start Date Time"), _F("EndDateTime", "datetime", "End Date Time"),
            _F("DurationInMinutes", "int", "Duration"), _F("IsAllDayEvent", "boolean", "All-Day Event"),
            _F("EventSubtype", "picklist", "Event Subtype", 40, picklist=("Event",), restricted=True,
               **create_only),
            _F("Type", "picklist", "Type", 40, picklist=_ACTIVITY_TYPES),
            _F("Location", "string", "Location", 255),
            _F("ShowAs", "picklist", "Show Time As", 40, picklist=("Busy", "OutOfOffice", "Free")),
            _F("IsArchived", "boolean", "Archived", **ro),
            _F("OwnerId", "reference", "Assigned To ID", 18, ref=("User",), rel="Owner"),
        ]),
        "PermissionSet": ("Permission Set", "0PS", [
            _F("Name", "string", "Name", 80, nillable=False), _F("Label", "string", "Label", 80, nillable=False),
            _F("IsOwnedByProfile", "boolean", "Is Owned by Profile", **ro),
        ]),
        "FieldPermissions": ("Field Permissions", "01k", [
            _F("ParentId", "reference", "Parent ID", 18, ref=("PermissionSet",), rel="Parent", nillable=False,
               **create_only),
            _F("SobjectType", "string", "Object Type", 80, nillable=False, **create_only),
            _F("Field", "string", "Field Name", 255, nillable=False, **create_only),
            _F("PermissionsRead", "boolean", "Read Access"), _F("PermissionsEdit", "boolean", "Edit Access"),
        ]),
        "OpportunityStage": ("Opportunity Stage", "01J", [
            _F("MasterLabel", "string", "Master Label", 255, **ro), _F("ApiName", "string", "Api Name", 255, **ro),
            _F("IsActive", "boolean", "Is Active", **ro), _F("IsWon", "boolean", "Is Won", **ro),
            _F("IsClosed", "boolean", "Is Closed", **ro),
            _F("DefaultProbability", "percent", "Default Probability", precision=3, scale=0, **ro),
            _F("SortOrder", "int", "Sort Order", **ro),
            _F("ForecastCategoryName", "string", "Forecast Category", 40, **ro),
        ]),
    }
    schema: dict[str, _Obj] = {}
    for name, (label, prefix, fields) in defs.items():
        all_fields = {f.name: f for f in _system_fields() + fields}
        schema[name] = _Obj(name, label, prefix, all_fields, createable=name != "OpportunityStage")
    schema["Account"].children.append(("Opportunities", "Opportunity", "AccountId"))
    schema["Opportunity"].children += [("OpportunityLineItems", "OpportunityLineItem", "OpportunityId"),
                                       ("Quotes", "Quote", "OpportunityId")]
    schema["Quote"].children.append(("QuoteLineItems", "QuoteLineItem", "QuoteId"))
    for name in ("Opportunity", "Account"):
        schema[name].children += [("Tasks", "Task", "WhatId"), ("Events", "Event", "WhatId")]
    schema["Pricebook2"].children.append(("PricebookEntries", "PricebookEntry", "Pricebook2Id"))
    schema["Product2"].children.append(("PricebookEntries", "PricebookEntry", "Product2Id"))
    return schema


# ------------------------------------------------------------------------------------------------------
# errors and records
# ------------------------------------------------------------------------------------------------------


class _Err(Exception):
    """An error answer, raised inside a handler."""

    def __init__(self, status: int, code: str, message: str, fields: Iterable[str] = (),
                 body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body if body is not None else [{"message": message, "errorCode": code, "fields": list(fields)}]


def _rec_error(code: str, message: str, fields: Iterable[str] = ()) -> dict[str, Any]:
    return {"statusCode": code, "message": message, "fields": list(fields)}


@dataclass
class _Rec:
    id: str
    type: str
    values: dict[str, Any]

    @property
    def deleted(self) -> bool:
        return bool(self.values.get("IsDeleted"))


# ------------------------------------------------------------------------------------------------------
# SOQL
# ------------------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>'(?:[^'\\]|\\.)*')
  | (?P<dt>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]\d{2}:?\d{2}))
  | (?P<date>\d{4}-\d{2}-\d{2}(?![\dT:]))
  | (?P<num>[+-]?\d+(?:\.\d+)?)
  | (?P<op>!=|<>|<=|>=|=|<|>|\(|\)|,)
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
""", re.VERBOSE)
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f", "'": "'", '"': '"', "\\": "\\"}


@dataclass(frozen=True)
class _Lit:
    kind: str  # str num dt date bool null
    value: Any


@dataclass(frozen=True)
class _Agg:
    """An aggregate function in a SELECT list: ``COUNT(Id) n``."""

    func: str  # COUNT | COUNT_DISTINCT
    path: str
    alias: str | None


@dataclass
class _Query:
    obj: str
    fields: list[Any]  # str paths, nested _Query (child subquery, obj = relationship name) or _Agg
    where: Any = None
    order: list[tuple[str, bool, bool]] = field(default_factory=list)  # (path, descending, nulls first)
    limit: int | None = None
    offset: int | None = None
    count: bool = False
    group_by: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)  # field path -> alias (aggregate queries)

    @property
    def aggregate(self) -> bool:
        return bool(self.group_by) or any(isinstance(f, _Agg) for f in self.fields)


#: The SELECT-list aggregate functions the sandbox computes.
_AGGREGATES = ("COUNT", "COUNT_DISTINCT")
#: Field types SOQL cannot group by.
_UNGROUPABLE = frozenset({"textarea", "address", "datetime", "currency", "double", "percent"})
_CLAUSE_WORDS = frozenset({"FROM", "WHERE", "GROUP", "ORDER", "LIMIT", "OFFSET"})


def _malformed(message: str) -> _Err:
    return _Err(400, "MALFORMED_QUERY", message)


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN_RE.match(text, pos)
            if m is None:
                raise _malformed(f"unexpected character at column {pos + 1}: {text[pos]!r}")
            pos = m.end()
            kind = m.lastgroup or ""
            if kind != "ws":
                self.tokens.append((kind, m.group()))
        self.i = 0

    def peek(self, offset: int = 0) -> tuple[str, str]:
        j = self.i + offset
        return self.tokens[j] if j < len(self.tokens) else ("end", "")

    def next(self) -> tuple[str, str]:
        tok = self.peek()
        self.i += 1
        return tok

    def is_word(self, *words: str, offset: int = 0) -> bool:
        kind, text = self.peek(offset)
        return kind == "word" and text.upper() in words

    def expect_word(self, word: str) -> None:
        kind, text = self.next()
        if kind != "word" or text.upper() != word:
            raise _malformed(f"expecting '{word}', found '{text or 'end of query'}'")

    def expect_op(self, op: str) -> None:
        kind, text = self.next()
        if kind != "op" or text != op:
            raise _malformed(f"expecting '{op}', found '{text or 'end of query'}'")

    def name(self) -> str:
        kind, text = self.next()
        if kind != "word":
            raise _malformed(f"expecting a field or object name, found '{text or 'end of query'}'")
        return text

    def alias(self) -> str | None:
        """An alias after a SELECT item (``COUNT(Id) n``), when one follows."""
        kind, text = self.peek()
        if kind == "word" and text.upper() not in _CLAUSE_WORDS and "." not in text:
            self.next()
            return text
        return None

    def query(self, nested: bool = False) -> _Query:
        self.expect_word("SELECT")
        fields: list[Any] = []
        aliases: dict[str, str] = {}
        count = False
        while True:
            if self.peek() == ("op", "("):
                self.next()
                fields.append(self.query(nested=True))
                self.expect_op(")")
            elif self.is_word("COUNT") and self.peek(1) == ("op", "(") and self.peek(2) == ("op", ")"):
                self.next()
                self.expect_op("(")
                self.expect_op(")")
                count = True
            elif self.is_word(*_AGGREGATES) and self.peek(1) == ("op", "("):
                func = self.next()[1].upper()
                self.expect_op("(")
                path = self.name()
                self.expect_op(")")
                fields.append(_Agg(func, path, self.alias()))
            else:
                path = self.name()
                fields.append(path)
                alias = self.alias()
                if alias is not None:
                    aliases[path] = alias
            if self.peek() == ("op", ","):
                self.next()
                continue
            break
        self.expect_word("FROM")
        q = _Query(self.name(), fields, count=count, aliases=aliases)
        if self.is_word("WHERE"):
            self.next()
            q.where = self.disjunction()
        if self.is_word("GROUP"):
            self.next()
            self.expect_word("BY")
            q.group_by.append(self.name())
            while self.peek() == ("op", ","):
                self.next()
                q.group_by.append(self.name())
        if self.is_word("ORDER"):
            self.next()
            self.expect_word("BY")
            while True:
                path = self.name()
                desc = False
                if self.is_word("ASC", "DESC"):
                    desc = self.next()[1].upper() == "DESC"
                nulls_first = not desc
                if self.is_word("NULLS"):
                    self.next()
                    if not self.is_word("FIRST", "LAST"):
                        raise _malformed("expecting FIRST or LAST after NULLS")
                    nulls_first = self.next()[1].upper() == "FIRST"
                q.order.append((path, desc, nulls_first))
                if self.peek() != ("op", ","):
                    break
                self.next()
        if self.is_word("LIMIT"):
            self.next()
            q.limit = self.integer()
        if self.is_word("OFFSET"):
            self.next()
            q.offset = self.integer()
        if not nested and self.peek()[0] != "end":
            raise _malformed(f"unexpected token: '{self.peek()[1]}'")
        return q

    def integer(self) -> int:
        kind, text = self.next()
        if kind != "num" or not text.isdigit():
            raise _malformed(f"expecting a non-negative integer, found '{text}'")
        return int(text)

    def disjunction(self) -> Any:
        parts = [self.conjunction()]
        while self.is_word("OR"):
            self.next()
            parts.append(self.conjunction())
        return parts[0] if len(parts) == 1 else ("or", parts)

    def conjunction(self) -> Any:
        parts = [self.negation()]
        while self.is_word("AND"):
            self.next()
            parts.append(self.negation())
        return parts[0] if len(parts) == 1 else ("and", parts)

    def negation(self) -> Any:
        if self.is_word("NOT"):
            self.next()
            return ("not", self.negation())
        return self.primary()

    def primary(self) -> Any:
        if self.peek() == ("op", "("):
            self.next()
            cond = self.disjunction()
            self.expect_op(")")
            return cond
        path = self.name()
        negate = False
        if self.is_word("NOT") and self.is_word("IN", offset=1):
            self.next()
            negate = True
        if self.is_word("IN"):
            self.next()
            self.expect_op("(")
            if self.is_word("SELECT"):
                raise _malformed("semi-join subqueries are not supported by this sandbox")
            values = [self.literal()]
            while self.peek() == ("op", ","):
                self.next()
                values.append(self.literal())
            self.expect_op(")")
            return ("in", path, values, negate)
        if self.is_word("LIKE"):
            self.next()
            return ("like", path, self.literal())
        kind, op = self.next()
        if kind != "op" or op not in ("=", "!=", "<>", "<", ">", "<=", ">="):
            raise _malformed(f"expecting a comparison operator after {path}, found '{op or 'end of query'}'")
        return ("cmp", path, "!=" if op == "<>" else op, self.literal())

    def literal(self) -> _Lit:
        kind, text = self.next()
        if kind == "str":
            return _Lit("str", re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), "\\" + m.group(1)), text[1:-1]))
        if kind == "num":
            return _Lit("num", Decimal(text))
        if kind == "dt":
            value = parse_datetime(text)
            if value is None:
                raise _malformed(f"invalid date/time: {text}")
            return _Lit("dt", value)
        if kind == "date":
            try:
                return _Lit("date", dt.date.fromisoformat(text))
            except ValueError:
                raise _malformed(f"invalid date: {text}") from None
        if kind == "word" and text.lower() in ("true", "false"):
            return _Lit("bool", text.lower() == "true")
        if kind == "word" and text.lower() == "null":
            return _Lit("null", None)
        raise _malformed(f"unexpected value: '{text or 'end of query'}'")


@dataclass
class _Locator:
    records: list[dict[str, Any]]
    batch: int
    used_at: float


# ------------------------------------------------------------------------------------------------------
# the sandbox
# ------------------------------------------------------------------------------------------------------


class SalesforceSandbox(SandboxApp):
    """The Salesforce REST API simulator (see the module docstring). Thread-safe; state under ``self.lock``."""

    vendor = "salesforce"
    state_attrs = ("_schema", "_data", "_delete_log", "_counters", "_book_ids", "_refresh_tokens", "_autonumbers",
                   "_integration_user", "_standard_pricebook", "_permission_set", "_pending_fields", "org_id")

    def __init__(
        self,
        *,
        seed: int = 0,
        faults: str | FaultPlan | None = None,
        clock: Clock | None = None,
        api_version: str = "62.0",
        daily_limit: int = 100_000,
        users: Mapping[str, str] | None = None,
        security_tokens: Mapping[str, str] | None = None,
        client_id: str = DEMO_CLIENT_ID,
        client_secret: str = DEMO_CLIENT_SECRET,
        initial_refresh_token: str | None = DEMO_REFRESH_TOKEN,
        refresh_rotation: bool = False,
        session_lifetime_s: float = 7200.0,
        locator_ttl_s: float = 900.0,
        max_locators: int = 10,
        field_security: bool = False,
    ) -> None:
        super().__init__(seed=seed, faults=faults, clock=clock)
        if not re.fullmatch(r"\d{2,3}\.0", api_version):
            raise ValueError("api_version looks like 62.0")
        self.api_version = api_version
        self.users = dict(users if users is not None else {DEMO_USERNAME: DEMO_PASSWORD})
        self.security_tokens = dict(security_tokens or {})
        self.client_id = client_id
        self.client_secret = client_secret
        self.refresh_rotation = refresh_rotation
        self.session_lifetime_s = session_lifetime_s
        self.locator_ttl_s = locator_ttl_s
        self.max_locators = max_locators
        self.field_security = field_security
        self._pending_fields: dict[tuple[str, str], _F] = {}
        self._daily = WindowLimit(self.clock, daily_limit, 86_400.0, "DailyApiRequests")
        self._rng = random.Random(f"salesforce-{seed}")
        self._token_rng = random.Random(f"salesforce-tokens-{seed}")
        self.org_id = to_18("00D" + "8d0" + self._base62(self._rng.randrange(62 ** 9), 9))
        self._schema = _base_schema()
        self._data: dict[str, dict[str, _Rec]] = {name: {} for name in self._schema}
        self._delete_log: list[tuple[str, str, dt.datetime]] = []
        self._counters: dict[str, int] = {}
        self._autonumbers: dict[str, int] = {}
        self._book_ids: dict[str, dict[str, str]] = {name: {} for name in self._schema}
        self._refresh_tokens: dict[str, str] = {}
        if initial_refresh_token:
            self._refresh_tokens[initial_refresh_token] = DEMO_USERNAME
        self._sessions: dict[str, tuple[str, float]] = {}
        self._locators: OrderedDict[str, _Locator] = OrderedDict()
        self._served_limit = 0
        self._token_requests = 0
        self._session_lock = threading.Lock()
        self._setup_org()
        self._register_routes()

    # -- identifiers, time ---------------------------------------------------------------------------
    @staticmethod
    def _base62(n: int, width: int) -> str:
        out = ""
        for _ in range(width):
            n, r = divmod(n, 62)
            out = _BASE62[r] + out
        return out

    def _new_id(self, prefix: str, rng: random.Random | None = None) -> str:
        counter = self._counters.get(prefix)
        if counter is None:
            digest = hashlib.blake2b(f"{self.seed}:{prefix}".encode(), digest_size=4).digest()
            counter = 62 ** 6 + int.from_bytes(digest, "big") % (62 ** 7)
        counter += 1 + (rng or self._rng).randrange(37)
        self._counters[prefix] = counter
        return to_18(prefix + "8d0" + self._base62(counter, 9))

    def _autonumber(self, name: str, width: int) -> str:
        n = self._autonumbers.get(name, 0) + 1
        self._autonumbers[name] = n
        return f"{n:0{width}d}"

    def _now(self) -> dt.datetime:
        return _EPOCH + dt.timedelta(milliseconds=int(self.clock.now() * 1000))

    def _token(self, n: int) -> str:
        alphabet = _BASE62 + "._"
        return "".join(self._token_rng.choice(alphabet) for _ in range(n))

    # -- org -----------------------------------------------------------------------------------------
    def _setup_org(self) -> None:
        at = _ORG_EPOCH
        self._integration_user = self._insert("User", {
            "Username": DEMO_USERNAME, "FirstName": "Intégration", "LastName": "LedgerBridge",
            "Email": DEMO_USERNAME, "Alias": "integ", "IsActive": True}, at, at).id
        for order, (name, prob, closed, won, forecast) in enumerate(_STAGES):
            self._insert("OpportunityStage", {
                "MasterLabel": name, "ApiName": name, "IsActive": True, "IsWon": won, "IsClosed": closed,
                "DefaultProbability": Decimal(prob), "SortOrder": order + 1, "ForecastCategoryName": forecast}, at, at)
        self._standard_pricebook = self._insert("Pricebook2", {
            "Name": "Standard Price Book", "IsActive": True, "IsStandard": True}, at, at).id
        self._permission_set = self._insert("PermissionSet", {
            "Name": "LedgerBridge_Integration", "Label": "LedgerBridge integration", "IsOwnedByProfile": False},
            at, at).id

    def _stage(self, name: Any) -> _Rec | None:
        for rec in self._data["OpportunityStage"].values():
            if rec.values.get("MasterLabel") == name:
                return rec
        return None

    # -- routing -------------------------------------------------------------------------------------
    def _r(self, method: str, pattern: str, handler: Callable[[SandboxRequest], SandboxResponse],
           *, is_write: bool | None = None, versioned: bool = True) -> None:
        def wrapped(req: SandboxRequest) -> SandboxResponse:
            try:
                if versioned:
                    self._check_version(req.params.get("ver", ""))
                with self.lock:
                    return handler(req)
            except _Err as exc:
                return self._json(exc.status, exc.body)

        self.route(method, pattern, wrapped, is_write=is_write)

    def _register_routes(self) -> None:
        r = self._r
        v = "/services/data/{ver}"
        r("GET", "/services/data", self._h_versions, versioned=False)
        r("GET", v, self._h_resources)
        r("GET", v + "/limits", self._h_limits)
        r("GET", v + "/sobjects", self._h_global)
        r("GET", v + "/query", self._h_query)
        r("GET", v + "/queryAll", self._h_query)
        r("GET", v + "/query/{locator}", self._h_query_more)
        r("GET", v + "/queryAll/{locator}", self._h_query_more)
        r("POST", v + "/composite/sobjects", self._h_collection)
        r("PATCH", v + "/composite/sobjects", self._h_collection)
        r("POST", v + "/tooling/sobjects/CustomField", self._h_custom_field)
        s = v + "/sobjects/{type}"
        r("GET", s + "/describe", self._h_describe)
        r("GET", s + "/updated", self._h_updated)
        r("GET", s + "/deleted", self._h_deleted)
        r("GET", s, self._h_basic_info)
        r("POST", s, self._h_create)
        r("GET", s + "/{id}", self._h_get)
        r("PATCH", s + "/{id}", self._h_update)
        r("DELETE", s + "/{id}", self._h_delete)
        r("GET", s + "/{field}/{value}", self._h_get_by_external_id)
        r("PATCH", s + "/{field}/{value}", self._h_upsert)
        r("POST", "/services/oauth2/token", self._h_token, versioned=False)

    def _check_version(self, ver: str) -> None:
        m = re.fullmatch(r"v(\d{2,3})\.0", ver)
        if m is None or not 31 <= int(m.group(1)) <= int(self.api_version.split(".")[0]):
            raise _Err(404, "NOT_FOUND", "The requested resource does not exist")

    @staticmethod
    def _json(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> SandboxResponse:
        h = {"Content-Type": "application/json;charset=UTF-8"}
        if headers:
            h.update(headers)
        return SandboxResponse(status, dumps(payload).encode(), h)

    @staticmethod
    def _body(req: SandboxRequest) -> Any:
        if not req.body:
            return None
        try:
            return loads(req.body)
        except (ValueError, UnicodeDecodeError):
            raise _Err(400, "JSON_PARSER_ERROR", "Unexpected character: was expecting a JSON value") from None

    # -- SandboxApp hooks ----------------------------------------------------------------------------
    @staticmethod
    def _is_api(req: SandboxRequest) -> bool:
        return req.path.startswith("/services/data/v")

    def is_exempt(self, req: SandboxRequest) -> bool:
        return super().is_exempt(req) or not self._is_api(req)

    def not_found(self, req: SandboxRequest) -> SandboxResponse:
        return self._json(404, _NOT_FOUND)

    def authorize(self, req: SandboxRequest) -> SandboxResponse | None:
        if not self._is_api(req):
            return None
        scheme, _, token = (req.header("authorization") or "").partition(" ")
        token = token.strip()
        now = self.clock.now()
        with self._session_lock:
            session = self._sessions.get(token) if scheme.lower() in ("bearer", "oauth") else None
            if session is not None and now - session[1] <= self.session_lifetime_s:
                self._sessions[token] = (session[0], now)
                return None
            if session is not None:
                del self._sessions[token]
        return self._json(401, [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}],
                          {"WWW-Authenticate": 'Token realm="Salesforce", error="invalid_token"'})

    def pre_request(self, req: SandboxRequest, route: Route) -> SandboxResponse | None:
        if not self._is_api(req):
            return None
        ok, _remaining, _wait = self._daily.try_acquire()
        if ok:
            return None
        with self.lock:
            self._served_limit += 1
        return self._json(403, [{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}])

    def post_request(self, req: SandboxRequest, resp: SandboxResponse) -> None:
        if self._is_api(req):
            used, total = self.api_usage()
            resp.headers["Sforce-Limit-Info"] = f"api-usage={used}/{total}"

    def fault_response(self, req: SandboxRequest, kind: str) -> SandboxResponse:
        status = int(kind)
        if status == 429:
            return self._json(429, [{"message": "Too many requests; retry later.",
                                     "errorCode": "REQUEST_LIMIT_EXCEEDED"}],
                              {"Retry-After": f"{max(self.clock.to_real(1.0), 0.001):.3f}"})
        if status in (502, 504):
            text = f"<html><head><title>{status}</title></head><body>Gateway error</body></html>"
            return SandboxResponse(status, text.encode(), {"Content-Type": "text/html; charset=utf-8"})
        if status == 503:
            return self._json(503, [{"message": "Server temporarily unavailable", "errorCode": "SERVER_UNAVAILABLE"}])
        return self._json(status, [{"message": "An unexpected error occurred. Please include this ErrorId if you "
                                    f"contact support: {self._rng.randrange(10 ** 9)}-{status}",
                                    "errorCode": "UNKNOWN_EXCEPTION"}])

    def api_usage(self) -> tuple[int, int]:
        """(calls counted in the rolling 24 hours, the daily allocation)."""
        return self._daily.limit - max(self._daily.remaining(), 0), self._daily.limit

    # -- admin ---------------------------------------------------------------------------------------
    def admin(self, req: SandboxRequest) -> SandboxResponse:
        """Sandbox-only endpoints for tests in other processes.

        ``GET /_sandbox/deals``: every live opportunity as ``{id, book_id, name, won, closed, stage, amount,
        currency, updated_at}`` (amount as a decimal string); ``PATCH /_sandbox/deals/{id}`` with
        ``{"fields": {...}}``: a user's edit; ``DELETE /_sandbox/deals/{id}``: a user's delete;
        ``POST /_sandbox/authorize``: a fresh refresh token (``{"refresh_token"}``);
        ``POST /_sandbox/expire-sessions``: every access token becomes invalid; ``GET /_sandbox/stats``.
        """
        path = req.path.rstrip("/")
        if req.method == "GET" and path == "/_sandbox/deals":
            return self._json(200, self.deals_snapshot())
        m = re.fullmatch(r"/_sandbox/deals/([A-Za-z0-9]{15,18})", path)
        if m and req.method in ("PATCH", "DELETE"):
            try:
                if req.method == "DELETE":
                    self.delete("Opportunity", m.group(1))
                    return SandboxResponse(204)
                fields = (loads(req.body) if req.body else {}).get("fields") or {}
                return self._json(200, {"id": m.group(1), "fields": self.modify("Opportunity", m.group(1), **fields)})
            except KeyError:
                return self._json(404, _NOT_FOUND)
            except ValueError as exc:
                return self._json(400, {"message": str(exc)})
        if req.method == "POST" and path == "/_sandbox/authorize":
            return self._json(200, {"refresh_token": self.issue_refresh_token()})
        if req.method == "POST" and path == "/_sandbox/expire-sessions":
            return self._json(200, {"expired": self.expire_sessions()})
        return super().admin(req)

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        used, total = self.api_usage()
        with self.lock:
            out["objects"] = {t: sum(1 for r in recs.values() if not r.deleted) for t, recs in self._data.items()}
            out["deleted"] = len(self._delete_log)
        out["api_usage"] = {"used": used, "max": total}
        out["request_limit_exceeded"] = self._served_limit
        out["token_requests"] = self._token_requests
        out["open_locators"] = len(self._locators)
        return out

    def load(self, path: Path) -> bool:
        with self.lock:
            self._locators.clear()
            schema = self._schema
            loaded = super().load(path)
            # State saved before an object existed here (Task, Event): it starts empty.
            for name, obj in schema.items():
                if name not in self._schema:
                    self._schema[name] = obj
                    for parent in self._schema.values():
                        fresh = schema.get(parent.name)
                        parent.children += [c for c in (fresh.children if fresh else []) if c[1] == name
                                            and c not in parent.children]
                self._data.setdefault(name, {})
                self._book_ids.setdefault(name, {})
            return loaded

    # -- record access -------------------------------------------------------------------------------
    def _obj(self, name: str) -> _Obj:
        obj = self._schema.get(name)
        if obj is None:
            low = name.lower()
            obj = next((o for k, o in self._schema.items() if k.lower() == low), None)
        if obj is None:
            raise _Err(404, "NOT_FOUND", f"The requested resource does not exist: sObject type '{name}' "
                       "is not supported")
        return obj

    def _find(self, record_id: str, types: Iterable[str] | None = None) -> _Rec | None:
        if len(record_id) not in (15, 18) or not record_id.isalnum():
            return None
        try:
            rid = to_18(record_id[:15]) if len(record_id) in (15, 18) else record_id
        except ValueError:
            return None
        for t in types if types is not None else self._data:
            rec = self._data.get(t, {}).get(rid)
            if rec is not None:
                return rec
        return None

    def _value(self, obj: _Obj, rec: _Rec, f: _F) -> Any:
        if f.type == "address":
            prefix = f.name[: -len("Address")]
            parts = {k: rec.values.get(prefix + s) for k, s in (
                ("city", "City"), ("country", "Country"), ("countryCode", "CountryCode"), ("postalCode", "PostalCode"),
                ("state", "State"), ("street", "Street"))}
            if not any(parts.values()):
                return None
            return {"city": parts["city"], "country": parts["country"], "countryCode": parts["countryCode"],
                    "geocodeAccuracy": None, "latitude": None, "longitude": None, "postalCode": parts["postalCode"],
                    "state": parts["state"], "stateCode": None, "street": parts["street"]}
        return rec.values.get(f.name)

    @staticmethod
    def _out(value: Any) -> Any:
        if isinstance(value, dt.datetime):
            return sf_datetime(value)
        if isinstance(value, dt.date):
            return value.isoformat()
        return value

    def _attributes(self, obj: str, rid: str, ver: str) -> dict[str, str]:
        return {"type": obj, "url": f"/services/data/{ver}/sobjects/{obj}/{rid}"}

    def _record_json(self, obj: _Obj, rec: _Rec, ver: str, names: Iterable[str] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"attributes": self._attributes(obj.name, rec.id, ver)}
        for f in obj.fields.values() if names is None else [self._field_or_400(obj, n) for n in names]:
            out[f.name] = self._out(self._value(obj, rec, f))
        return out

    def _field_or_400(self, obj: _Obj, name: str) -> _F:
        f = obj.field(name)
        if f is None:
            raise _Err(400, "INVALID_FIELD", f"No such column '{name}' on entity '{obj.name}'. If you are attempting "
                       "to use a custom field, be sure to append the '__c' after the custom field name. Please "
                       "reference your WSDL or the describe call for the appropriate names.")
        return f

    # -- SOQL execution ------------------------------------------------------------------------------
    def _path(self, obj: _Obj, path: str) -> list[tuple[_Obj, _F]]:
        """The (object, field) steps of a field path; INVALID_FIELD when a step does not exist."""
        parts = path.split(".")
        steps: list[tuple[_Obj, _F]] = []
        current = obj
        if len(parts) > 1 and parts[0].lower() == obj.name.lower() and current.relationship(parts[0]) is None:
            parts = parts[1:]  # SELECT Opportunity.Name FROM Opportunity
        for i, part in enumerate(parts):
            if i == len(parts) - 1:
                steps.append((current, self._field_or_400(current, part)))
                break
            rel = current.relationship(part)
            if rel is None:
                raise _Err(400, "INVALID_FIELD", f"Didn't understand relationship '{part}' in field path. If you are "
                           "attempting to use a custom relationship, be sure to append the '__r' after the custom "
                           "relationship name. Please reference your WSDL or the describe call for the appropriate "
                           "names.")
            steps.append((current, rel))
            current = self._schema[rel.ref[0]]
        return steps

    def _resolve(self, steps: list[tuple[_Obj, _F]], rec: _Rec) -> tuple[_F, Any]:
        current: _Rec | None = rec
        for i, (obj, f) in enumerate(steps):
            if current is None:
                return f, None
            if i == len(steps) - 1:
                return f, self._value(obj, current, f)
            target = current.values.get(f.name)
            current = self._find(target, f.ref) if isinstance(target, str) else None
        raise AssertionError("unreachable")  # pragma: no cover

    def _coerce_literal(self, f: _F, lit: _Lit) -> Any:
        if lit.kind == "null":
            return None
        expected = {"datetime": "dt", "date": "date", "boolean": "bool"}.get(f.type)
        if expected is None:
            expected = "num" if f.type in _NUMBER_TYPES else "str"
        if lit.kind != expected:
            if f.type == "datetime":
                raise _Err(400, "INVALID_FIELD", f"value of filter criterion for field '{f.name}' must be of type "
                           "dateTime and should not be enclosed in quotes")
            if f.type == "date":
                raise _Err(400, "INVALID_FIELD", f"value of filter criterion for field '{f.name}' must be of type "
                           "date and should not be enclosed in quotes")
            kind = "string and should be enclosed in quotes" if expected == "str" else f"{f.type}"
            raise _Err(400, "INVALID_FIELD", f"value of filter criterion for field '{f.name}' must be of type {kind}")
        if f.type in _ID_TYPES:
            text = str(lit.value)
            try:
                return to_18(text[:15]) if len(text) in (15, 18) and text.isalnum() else text
            except ValueError:
                return text
        return lit.value

    @staticmethod
    def _fold(f: _F, value: Any) -> Any:
        if isinstance(value, str) and f.type not in _ID_TYPES:
            return value.casefold()
        return value

    def _compile(self, obj: _Obj, cond: Any) -> Callable[[_Rec], bool]:
        op = cond[0]
        if op in ("and", "or"):
            parts = [self._compile(obj, c) for c in cond[1]]
            if op == "and":
                return lambda rec: all(p(rec) for p in parts)
            return lambda rec: any(p(rec) for p in parts)
        if op == "not":
            inner = self._compile(obj, cond[1])
            return lambda rec: not inner(rec)
        steps = self._path(obj, cond[1])
        f = steps[-1][1]
        if f.type == "address":
            raise _Err(400, "INVALID_FIELD", f"field '{f.name}' can not be filtered in a query call")
        if op == "in":
            values = {self._fold(f, self._coerce_literal(f, lit)) for lit in cond[2]}
            negate = cond[3]
            return lambda rec: (self._fold(f, self._resolve(steps, rec)[1]) in values) != negate
        if op == "like":
            if f.type not in _TEXT_TYPES and f.type not in _ID_TYPES:
                raise _Err(400, "INVALID_FIELD", f"invalid operator on {f.type} field: {f.name}")
            lit = cond[2]
            if lit.kind != "str":
                raise _malformed("LIKE needs a quoted string")
            pattern = ""
            text = str(lit.value)
            i = 0
            while i < len(text):
                ch = text[i]
                if ch == "\\" and i + 1 < len(text):
                    pattern += re.escape(text[i + 1])
                    i += 2
                    continue
                pattern += ".*" if ch == "%" else "." if ch == "_" else re.escape(ch)
                i += 1
            regex = re.compile(f"^{pattern}$", re.IGNORECASE | re.DOTALL)
            return lambda rec: isinstance(v := self._resolve(steps, rec)[1], str) and bool(regex.match(v))
        comparison, lit = cond[2], cond[3]
        if f.type == "boolean" and comparison not in ("=", "!="):
            raise _Err(400, "INVALID_FIELD", f"invalid operator on boolean field: {f.name}")
        target = self._fold(f, self._coerce_literal(f, lit))

        def test(rec: _Rec) -> bool:
            value = self._fold(f, self._resolve(steps, rec)[1])
            if f.type == "boolean":
                value = bool(value)
            if comparison == "=":
                return bool(value == target)
            if comparison == "!=":
                return bool(value != target)
            if value is None or target is None:
                return False
            try:
                if comparison == "<":
                    return bool(value < target)
                if comparison == ">":
                    return bool(value > target)
                if comparison == "<=":
                    return bool(value <= target)
                return bool(value >= target)
            except TypeError:
                return False

        return test

    def _sort(self, obj: _Obj, recs: list[_Rec], order: list[tuple[str, bool, bool]]) -> list[_Rec]:
        out = list(recs)
        for path, desc, nulls_first in reversed(order):
            steps = self._path(obj, path)
            f = steps[-1][1]
            if f.type == "address":
                raise _Err(400, "INVALID_FIELD", f"field '{f.name}' can not be sorted in a query call")
            present = [(self._fold(f, self._resolve(steps, r)[1]), r) for r in out]
            nulls = [r for v, r in present if v is None]
            values = [(v, r) for v, r in present if v is not None]
            values.sort(key=lambda vr: vr[0], reverse=desc)
            ordered = [r for _, r in values]
            out = nulls + ordered if nulls_first else ordered + nulls
        return out

    def _run(self, obj: _Obj, q: _Query, recs: list[_Rec], ver: str) -> tuple[int, list[dict[str, Any]]]:
        if q.where is not None:
            test = self._compile(obj, q.where)
            recs = [r for r in recs if test(r)]
        if q.aggregate:
            rows = self._aggregate(obj, q, recs)
            return len(rows), rows
        if q.aliases:
            raise _malformed("Only aggregate expressions use field aliasing")
        if q.order:
            recs = self._sort(obj, recs, q.order)
        if q.offset:
            if q.offset > 2000:
                raise _Err(400, "NUMBER_OUTSIDE_VALID_RANGE", "Maximum SOQL offset allowed is 2000")
            recs = recs[q.offset:]
        if q.limit is not None:
            recs = recs[: q.limit]
        if q.count:
            if any(isinstance(s, _Query) for s in q.fields) or [s for s in q.fields if isinstance(s, str)]:
                raise _malformed("COUNT() must be the only element in the SELECT list")
            return len(recs), []
        plan: list[tuple[str, Any]] = []
        for sel in q.fields:
            if isinstance(sel, _Query):
                child = obj.child(sel.obj)
                if child is None:
                    raise _Err(400, "INVALID_TYPE", f"Didn't understand relationship '{sel.obj}' in FROM part of "
                               "query call. If you are attempting to use a custom relationship, be sure to append the "
                               "'__r' after the custom relationship name.")
                plan.append(("child", (child, sel)))
            else:
                plan.append(("path", self._path(obj, sel)))
        return len(recs), [self._select(obj, r, plan, ver) for r in recs]

    def _aggregate(self, obj: _Obj, q: _Query, recs: list[_Rec]) -> list[dict[str, Any]]:
        """The AggregateResult rows of a ``GROUP BY`` / aggregate-function query over ``recs`` (already filtered).

        Grouped fields come back under their field name (or alias), unaliased aggregates as ``expr0``,
        ``expr1``..., as Salesforce names them; a query without ``GROUP BY`` answers one row.
        """
        if q.count or any(isinstance(f, _Query) for f in q.fields):
            raise _malformed("COUNT() and relationship queries cannot be combined with GROUP BY or aggregate "
                             "functions")
        group_steps = [self._path(obj, g) for g in q.group_by]
        for steps in group_steps:
            f = steps[-1][1]
            if f.type in _UNGROUPABLE:
                raise _Err(400, "INVALID_FIELD", f"field '{f.name}' can not be grouped in a query call")
        grouped = [g.lower() for g in q.group_by]
        for sel in q.fields:
            if isinstance(sel, str) and sel.lower() not in grouped:
                raise _malformed(f"Field must be grouped or aggregated: {sel.rsplit('.', 1)[-1]}")
        buckets: dict[tuple[Any, ...], list[_Rec]] = {} if group_steps else {(): []}
        for r in recs:
            buckets.setdefault(tuple(self._resolve(steps, r)[1] for steps in group_steps), []).append(r)
        rows: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (sort keys by grouped path, record)
        for key, members in buckets.items():
            values = dict(zip(grouped, key, strict=True))
            row: dict[str, Any] = {"attributes": {"type": "AggregateResult"}}
            unnamed = 0
            for sel in q.fields:
                if isinstance(sel, str):
                    row[q.aliases.get(sel) or self._path(obj, sel)[-1][1].name] = self._out(values[sel.lower()])
                    continue
                steps = self._path(obj, sel.path)
                present = [v for r in members if (v := self._resolve(steps, r)[1]) is not None]
                name = sel.alias or f"expr{unnamed}"
                unnamed += sel.alias is None
                row[name] = len(present) if sel.func == "COUNT" else len(set(present))
            rows.append((values, row))
        for path, desc, nulls_first in reversed(q.order):
            if path.lower() not in grouped:
                raise _malformed(f"Ordered field must be grouped or aggregated: {path}")
            nulls = [vr for vr in rows if vr[0][path.lower()] is None]
            present_rows = sorted((vr for vr in rows if vr[0][path.lower()] is not None),
                                  key=lambda vr: vr[0][path.lower()], reverse=desc)
            rows = nulls + present_rows if nulls_first else present_rows + nulls
        out = [row for _, row in rows]
        if q.offset:
            out = out[q.offset:]
        return out[: q.limit] if q.limit is not None else out

    def _select(self, obj: _Obj, rec: _Rec, plan: list[tuple[str, Any]], ver: str) -> dict[str, Any]:
        out: dict[str, Any] = {"attributes": self._attributes(obj.name, rec.id, ver)}
        for kind, item in plan:
            if kind == "child":
                (rel, child_type, fk), sub = item
                child_obj = self._schema[child_type]
                kids = [r for r in self._data[child_type].values() if not r.deleted and r.values.get(fk) == rec.id]
                total, rows = self._run(child_obj, _Query(child_type, sub.fields, sub.where, sub.order, sub.limit,
                                                          sub.offset), kids, ver)
                out[rel] = {"totalSize": total, "done": True, "records": rows} if rows else None
                continue
            node = out
            current: _Rec | None = rec
            for i, (step_obj, f) in enumerate(item):
                if i == len(item) - 1:
                    node[f.name] = self._out(self._value(step_obj, current, f)) if current is not None else None
                    break
                assert f.rel is not None
                target = current.values.get(f.name) if current is not None else None
                current = self._find(target, f.ref) if isinstance(target, str) else None
                if current is None:
                    node[f.rel] = None
                    break
                existing = node.get(f.rel)
                if not isinstance(existing, dict):
                    existing = {"attributes": self._attributes(current.type, current.id, ver)}
                    node[f.rel] = existing
                node = existing
        return out

    def execute(self, soql: str, *, include_deleted: bool = False, ver: str | None = None
                ) -> tuple[int, list[dict[str, Any]]]:
        """Run a SOQL query; returns (totalSize, records as Salesforce would send them)."""
        q = _Parser(soql).query()
        obj = self._schema.get(q.obj) or next((o for k, o in self._schema.items() if k.lower() == q.obj.lower()),
                                              None)
        if obj is None:
            raise _Err(400, "INVALID_TYPE", f"sObject type '{q.obj}' is not supported. If you are attempting to use a "
                       "custom object, be sure to append the '__c' after the entity name. Please reference your WSDL "
                       "or the describe call for the appropriate names.")
        recs = [r for r in self._data[obj.name].values() if include_deleted or not r.deleted]
        if obj.name in ("Task", "Event"):
            # Archiving happens as time passes: query leaves archived activities out, queryAll returns them.
            now = self._now()
            for r in recs:
                r.values["IsArchived"] = self._archived(r, now)
            if not include_deleted:
                recs = [r for r in recs if not r.values["IsArchived"]]
        return self._run(obj, q, recs, ver or f"v{self.api_version}")

    # -- query handlers ------------------------------------------------------------------------------
    def _batch_size(self, req: SandboxRequest) -> int:
        options = req.header("sforce-query-options") or ""
        m = re.search(r"batchSize\s*=\s*(\d+)", options, re.IGNORECASE)
        if m is None:
            return _MAX_BATCH
        return max(_MIN_BATCH, min(_MAX_BATCH, int(m.group(1))))

    def _page(self, ver: str, locator: str, lc: _Locator, start: int) -> dict[str, Any]:
        rows = lc.records[start:start + lc.batch]
        nxt = start + lc.batch
        out: dict[str, Any] = {"totalSize": len(lc.records), "done": nxt >= len(lc.records)}
        if nxt < len(lc.records):
            out["nextRecordsUrl"] = f"/services/data/{ver}/query/{locator}-{nxt}"
        else:
            self._locators.pop(locator, None)
        out["records"] = rows
        return out

    def _h_query(self, req: SandboxRequest) -> SandboxResponse:
        soql = req.arg("q")
        if not soql:
            raise _malformed("A query string has to be specified")
        ver = req.params["ver"]
        total, rows = self.execute(soql, include_deleted=req.path.rstrip("/").endswith("queryAll"), ver=ver)
        if rows and rows[0]["attributes"].get("type") == "AggregateResult":
            if len(rows) > _MAX_BATCH:
                raise _Err(400, "EXCEEDED_ID_LIMIT", "Aggregate query does not support queryMore(), use LIMIT to "
                           "restrict the results to a single batch")
            return self._json(200, {"totalSize": total, "done": True, "records": rows})
        batch = self._batch_size(req)
        if len(rows) <= batch:
            return self._json(200, {"totalSize": total, "done": True, "records": rows})
        locator = to_18("01g" + "8d0" + self._base62(self._rng.randrange(62 ** 9), 9))
        self._locators[locator] = _Locator(rows, batch, self.clock.now())
        while len(self._locators) > self.max_locators:
            self._locators.popitem(last=False)
        return self._json(200, self._page(ver, locator, self._locators[locator], 0))

    def _h_query_more(self, req: SandboxRequest) -> SandboxResponse:
        locator, _, start = req.params["locator"].rpartition("-")
        lc = self._locators.get(locator)
        if lc is None or not start.isdigit() or self.clock.now() - lc.used_at > self.locator_ttl_s:
            self._locators.pop(locator, None)
            raise _Err(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
        lc.used_at = self.clock.now()
        self._locators.move_to_end(locator)
        return self._json(200, self._page(req.params["ver"], locator, lc, int(start)))

    # -- describe ------------------------------------------------------------------------------------
    def _field_json(self, f: _F) -> dict[str, Any]:
        numeric = f.type in _NUMBER_TYPES
        return {
            "name": f.name, "label": f.label or f.name, "type": f.type, "soapType": _SOAP.get(f.type, "xsd:string"),
            "length": f.length if not numeric else 0, "byteLength": f.length * 3 if not numeric else 0,
            "precision": f.precision, "scale": f.scale, "digits": 9 if f.type == "int" else 0,
            "nillable": f.nillable, "createable": f.createable, "updateable": f.updateable,
            "custom": f.custom, "externalId": f.external_id, "unique": f.unique, "idLookup": f.type == "id"
            or f.external_id, "calculated": not f.createable and not f.updateable and f.type != "id",
            "defaultedOnCreate": f.name in ("Id", "IsDeleted", "CreatedDate", "CreatedById", "LastModifiedDate",
                                            "LastModifiedById", "SystemModstamp", "OwnerId"),
            "filterable": f.type != "address", "sortable": f.type != "address", "groupable": f.type != "address",
            "referenceTo": list(f.ref), "relationshipName": f.rel, "relationshipOrder": None,
            "picklistValues": [{"active": True, "defaultValue": False, "label": v, "validFor": None, "value": v}
                               for v in f.picklist],
            "restrictedPicklist": f.restricted, "defaultValue": None, "defaultValueFormula": None,
            "calculatedFormula": None, "controllerName": None, "dependentPicklist": False, "htmlFormatted": False,
            "inlineHelpText": None, "nameField": f.name == "Name", "namePointing": False, "autoNumber": False,
            "caseSensitive": False, "deprecatedAndHidden": False, "writeRequiresMasterRead": False,
            "compoundFieldName": "BillingAddress" if f.name.startswith("Billing") and f.type != "address" else None,
        }

    def _urls(self, obj: _Obj, ver: str) -> dict[str, str]:
        base = f"/services/data/{ver}/sobjects/{obj.name}"
        return {"sobject": base, "describe": base + "/describe", "rowTemplate": base + "/{ID}"}

    def _object_summary(self, obj: _Obj, ver: str) -> dict[str, Any]:
        return {"name": obj.name, "label": obj.label, "labelPlural": obj.label + "s", "keyPrefix": obj.prefix,
                "custom": False, "queryable": True, "retrieveable": True, "searchable": True,
                "createable": obj.createable, "updateable": obj.createable, "deletable": obj.createable,
                "replicateable": True, "layoutable": True, "urls": self._urls(obj, ver)}

    def _h_versions(self, req: SandboxRequest) -> SandboxResponse:
        top = int(self.api_version.split(".")[0])
        return self._json(200, [{"label": f"API {v}.0", "url": f"/services/data/v{v}.0", "version": f"{v}.0"}
                                for v in range(31, top + 1)])

    def _h_resources(self, req: SandboxRequest) -> SandboxResponse:
        base = f"/services/data/{req.params['ver']}"
        return self._json(200, {name: f"{base}/{name}" for name in (
            "sobjects", "query", "queryAll", "limits", "composite", "tooling")})

    def _h_global(self, req: SandboxRequest) -> SandboxResponse:
        ver = req.params["ver"]
        return self._json(200, {"encoding": "UTF-8", "maxBatchSize": _MAX_COLLECTION,
                                "sobjects": [self._object_summary(o, ver) for o in self._schema.values()]})

    def _h_basic_info(self, req: SandboxRequest) -> SandboxResponse:
        obj = self._obj(req.params["type"])
        return self._json(200, {"objectDescribe": self._object_summary(obj, req.params["ver"]), "recentItems": []})

    def _h_describe(self, req: SandboxRequest) -> SandboxResponse:
        obj = self._obj(req.params["type"])
        ver = req.params["ver"]
        body = self._object_summary(obj, ver)
        body["fields"] = [self._field_json(f) for f in obj.fields.values()]
        body["childRelationships"] = [{"childSObject": t, "field": fk, "relationshipName": rel,
                                       "cascadeDelete": t in ("OpportunityLineItem", "QuoteLineItem", "Quote"),
                                       "deprecatedAndHidden": False, "restrictedDelete": False}
                                      for rel, t, fk in obj.children]
        return self._json(200, body)

    def _h_limits(self, req: SandboxRequest) -> SandboxResponse:
        used, total = self.api_usage()
        return self._json(200, {
            "DailyApiRequests": {"Max": total, "Remaining": max(total - used, 0)},
            "DailyBulkApiBatches": {"Max": 15000, "Remaining": 15000},
            "DailyBulkV2QueryJobs": {"Max": 10000, "Remaining": 10000},
            "DataStorageMB": {"Max": 1024, "Remaining": 1000},
            "FileStorageMB": {"Max": 1024, "Remaining": 1024},
            "ConcurrentAsyncGetReportInstances": {"Max": 200, "Remaining": 200},
            "HourlyODataCallout": {"Max": 10000, "Remaining": 10000},
        })

    # -- replication ---------------------------------------------------------------------------------
    def _window(self, req: SandboxRequest) -> tuple[dt.datetime, dt.datetime]:
        start = parse_datetime(unquote(req.arg("start") or ""))
        end = parse_datetime(unquote(req.arg("end") or ""))
        if start is None or end is None:
            raise _Err(400, "INVALID_REPLICATION_DATE", "start and end must be dateTime values")
        start = start.replace(second=0, microsecond=0)  # the API ignores seconds
        end = end.replace(second=0, microsecond=0)
        if end - start < dt.timedelta(minutes=1):
            raise _Err(400, "INVALID_REPLICATION_DATE", "startDate must chronologically precede endDate by more "
                       "than one minute")
        if start < self._now() - dt.timedelta(days=30):
            raise _Err(400, "INVALID_REPLICATION_DATE", "startDate cannot be more than 30 days ago")
        return start, end

    def _h_updated(self, req: SandboxRequest) -> SandboxResponse:
        obj = self._obj(req.params["type"])
        start, end = self._window(req)
        ids = [r.id for r in self._data[obj.name].values()
               if not r.deleted and start <= r.values["SystemModstamp"] < end]
        return self._json(200, {"ids": ids, "latestDateCovered": sf_datetime(end)})

    def _h_deleted(self, req: SandboxRequest) -> SandboxResponse:
        obj = self._obj(req.params["type"])
        start, end = self._window(req)
        earliest = (self._now() - dt.timedelta(days=15)).replace(second=0, microsecond=0)
        rows = [{"id": rid, "deletedDate": sf_datetime(at)} for t, rid, at in self._delete_log
                if t == obj.name and start <= at < end and at >= earliest]
        return self._json(200, {"deletedRecords": rows, "earliestDateAvailable": sf_datetime(earliest),
                                "latestDateCovered": sf_datetime(end)})

    # -- writes: validation --------------------------------------------------------------------------
    def _coerce(self, obj: _Obj, f: _F, value: Any) -> Any:
        """The stored value of ``value`` for ``f``; JSON_PARSER_ERROR (the whole request) when it cannot be read."""
        if value is None:
            return None

        def bad(kind: str) -> _Err:
            shown = value if isinstance(value, str) else dumps(value)
            return _Err(400, "JSON_PARSER_ERROR", f"Cannot deserialize instance of {kind} from VALUE_STRING value "
                        f"{shown} or request may be missing a required field")

        if f.type == "boolean":
            if isinstance(value, bool):
                return value
            raise bad("boolean")
        if f.type in ("currency", "double", "percent"):
            if isinstance(value, bool):
                raise bad("double")
            if isinstance(value, Decimal | int):
                return Decimal(value)
            if isinstance(value, str):
                try:
                    number = Decimal(value.strip())
                except InvalidOperation:
                    raise bad("double") from None
                if number.is_finite():
                    return number
            raise bad("double")
        if f.type == "int":
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, Decimal) and value == value.to_integral_value():
                return int(value)
            raise bad("int")
        if f.type == "date":
            if isinstance(value, str):
                try:
                    return dt.date.fromisoformat(value.strip()[:10])
                except ValueError:
                    pass
            raise bad("date")
        if f.type == "datetime":
            parsed = parse_datetime(value) if isinstance(value, str) else None
            if parsed is None:
                raise bad("dateTime")
            return _ms(parsed)
        if isinstance(value, bool | dict | list):
            raise bad("string")
        if isinstance(value, Decimal | int):
            return str(value)
        return str(value)

    def _clean(self, obj: _Obj, body: Mapping[str, Any], *, creating: bool, rec: _Rec | None
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(stored values, record errors); request-level problems raise."""
        clean: dict[str, Any] = {}
        errors: list[dict[str, Any]] = []
        not_writable: list[str] = []
        for key, raw in body.items():
            if key == "attributes" or (key.lower() == "id" and not creating):
                continue
            f = obj.field(key)
            if f is None:
                raise _Err(400, "INVALID_FIELD", f"No such column '{key}' on sobject of type {obj.name}")
            if (creating and not f.createable) or (not creating and not f.updateable):
                not_writable.append(f.name)
                continue
            value = self._coerce(obj, f, raw)
            if isinstance(value, str) and f.length and len(value) > f.length:
                errors.append(_rec_error("STRING_TOO_LONG", f"{f.label or f.name}: data value too large: "
                                         f"{value[:40]}{'...' if len(value) > 40 else ''} (max length={f.length})",
                                         [f.name]))
                continue
            if f.type == "picklist" and f.restricted and value is not None and value not in f.picklist:
                errors.append(_rec_error("INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                                         f"{f.label or f.name}: bad value for restricted picklist field: {value}",
                                         [f.name]))
                continue
            if f.type == "reference" and value is not None:
                if not re.fullmatch(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?", value):
                    errors.append(_rec_error("MALFORMED_ID", f"{f.label or f.name}: id value of incorrect type: "
                                             f"{value}", [f.name]))
                    continue
                target = self._find(value, f.ref)
                if target is None or target.deleted:
                    errors.append(_rec_error("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", [f.name]))
                    continue
                value = target.id
            if f.type == "email" and value and not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", value):
                errors.append(_rec_error("INVALID_EMAIL_ADDRESS", f"{f.label or f.name}: invalid email address: "
                                         f"{value}", [f.name]))
                continue
            clean[f.name] = value
        if not_writable:
            errors.append(_rec_error("INVALID_FIELD_FOR_INSERT_UPDATE", f"Unable to create/update fields: "
                                     f"{', '.join(not_writable)}. Please check the security settings of this field and "
                                     "verify that it is read/write for your profile or permission set.", not_writable))
        if creating:
            missing = [f.name for f in obj.fields.values()
                       if not f.nillable and f.createable and clean.get(f.name) in (None, "")
                       and f.name not in ("OwnerId", "IsActive")]
            if missing:
                errors.append(_rec_error("REQUIRED_FIELD_MISSING",
                                         f"Required fields are missing: [{', '.join(missing)}]", missing))
        if not errors:
            errors.extend(self._object_rules(obj, clean, creating=creating, rec=rec))
        return clean, errors

    def _object_rules(self, obj: _Obj, clean: dict[str, Any], *, creating: bool, rec: _Rec | None
                      ) -> list[dict[str, Any]]:
        merged = {**(rec.values if rec is not None else {}), **clean}
        if obj.name in ("OpportunityLineItem", "QuoteLineItem") and creating:
            parent_field = "OpportunityId" if obj.name == "OpportunityLineItem" else "QuoteId"
            parent = self._find(merged.get(parent_field) or "")
            pbe = self._find(merged.get("PricebookEntryId") or "", ("PricebookEntry",))
            if pbe is None and merged.get("Product2Id") and parent is not None:
                book = parent.values.get("Pricebook2Id") or self._standard_pricebook
                currency = parent.values.get("CurrencyIsoCode")
                pbe = next((p for p in self._data["PricebookEntry"].values()
                            if p.values.get("Product2Id") == merged["Product2Id"]
                            and p.values.get("Pricebook2Id") == book and p.values.get("CurrencyIsoCode") == currency),
                           None)
                if pbe is not None:
                    clean["PricebookEntryId"] = pbe.id
            if pbe is None:
                return [_rec_error("REQUIRED_FIELD_MISSING", "Required fields are missing: [PricebookEntryId]",
                                   ["PricebookEntryId"])]
            if parent is not None:
                book = parent.values.get("Pricebook2Id")
                if book and pbe.values.get("Pricebook2Id") != book:
                    return [_rec_error("FIELD_INTEGRITY_EXCEPTION", "field integrity exception: PricebookEntryId "
                                       "(pricebook entry is in a different pricebook than the one assigned to the "
                                       f"{'opportunity' if parent_field == 'OpportunityId' else 'quote'})",
                                       ["PricebookEntryId"])]
                if pbe.values.get("CurrencyIsoCode") != parent.values.get("CurrencyIsoCode"):
                    return [_rec_error("FIELD_INTEGRITY_EXCEPTION", "field integrity exception: PricebookEntryId "
                                       "(pricebook entry currency code does not match the parent's currency code)",
                                       ["PricebookEntryId"])]
            if "UnitPrice" in clean and "TotalPrice" in clean and clean["UnitPrice"] is not None \
                    and clean["TotalPrice"] is not None:
                return [_rec_error("FIELD_INTEGRITY_EXCEPTION", "field integrity exception: TotalPrice (cannot "
                                   "specify both unit price and total price)", ["TotalPrice"])]
        if obj.name == "FieldPermissions" and creating:
            sobject, field_name = str(merged.get("SobjectType") or ""), str(merged.get("Field") or "")
            target = self._schema.get(sobject)
            name = field_name.partition(".")[2]
            if target is None or not field_name.startswith(sobject + ".") or (
                    target.field(name) is None and (sobject, name) not in self._pending_fields):
                return [_rec_error("INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                                   f"Field Name: bad value for restricted picklist field: {field_name}", ["Field"])]
            for other in self._data["FieldPermissions"].values():
                if other.values.get("ParentId") == merged.get("ParentId") and other.values.get("Field") == field_name:
                    return [_rec_error("DUPLICATE_VALUE", "duplicate value found: <unknown> duplicates value on "
                                       f"record with id: {other.id}", [])]
        if obj.name == "Opportunity" and clean.get("SyncedQuoteId") and rec is not None:
            quote = self._find(clean["SyncedQuoteId"], ("Quote",))
            if quote is None or quote.values.get("OpportunityId") != rec.id:
                return [_rec_error("FIELD_INTEGRITY_EXCEPTION", "field integrity exception: SyncedQuoteId (the quote "
                                   "belongs to another opportunity)", ["SyncedQuoteId"])]
        return []

    # -- writes: applying ----------------------------------------------------------------------------
    def _insert(self, obj_name: str, values: Mapping[str, Any], created: dt.datetime, modified: dt.datetime,
                *, by: str | None = None, ids: random.Random | None = None) -> _Rec:
        """Store a new record with explicit system times (seeding) and derive its calculated fields."""
        obj = self._schema[obj_name]
        rid = self._new_id(obj.prefix, ids)
        user = by or getattr(self, "_integration_user", None) or rid
        rec = _Rec(rid, obj_name, {f.name: None for f in obj.fields.values() if f.type != "address"})
        rec.values.update(values)
        rec.values.update({"Id": rid, "IsDeleted": False, "CreatedDate": _ms(created), "CreatedById": user,
                           "LastModifiedDate": _ms(modified), "LastModifiedById": user,
                           "SystemModstamp": _ms(modified)})
        if "OwnerId" in obj.fields and rec.values.get("OwnerId") is None:
            rec.values["OwnerId"] = user
        self._data[obj_name][rid] = rec
        self._derive(rec)
        return rec

    def _stamp(self, rec: _Rec, now: dt.datetime) -> None:
        rec.values["LastModifiedDate"] = now
        rec.values["LastModifiedById"] = self._integration_user
        rec.values["SystemModstamp"] = now

    def _derive(self, rec: _Rec) -> None:
        v = rec.values
        if rec.type == "Opportunity":
            stage = self._stage(v.get("StageName"))
            if stage is not None:
                v["IsWon"] = bool(stage.values["IsWon"])
                v["IsClosed"] = bool(stage.values["IsClosed"])
                v["ForecastCategoryName"] = stage.values["ForecastCategoryName"]
                if v.get("Probability") is None:
                    v["Probability"] = stage.values["DefaultProbability"]
            if v.get("CurrencyIsoCode") is None:
                v["CurrencyIsoCode"] = "EUR"
            v["HasOpportunityLineItem"] = bool(v.get("HasOpportunityLineItem"))
        elif rec.type in ("OpportunityLineItem", "QuoteLineItem"):
            pbe = self._find(v.get("PricebookEntryId") or "", ("PricebookEntry",))
            parent = self._find(v.get("OpportunityId") or v.get("QuoteId") or "")
            if pbe is not None:
                v["Product2Id"] = pbe.values.get("Product2Id")
                v["ListPrice"] = pbe.values.get("UnitPrice")
                if rec.type == "OpportunityLineItem":
                    v["ProductCode"] = pbe.values.get("ProductCode")
                    v["Name"] = f"{parent.values.get('Name') if parent else ''} {pbe.values.get('Name')}".strip()[:376]
            if parent is not None:
                v["CurrencyIsoCode"] = parent.values.get("CurrencyIsoCode")
            quantity = v.get("Quantity") or Decimal(0)
            discount = v.get("Discount") or Decimal(0)
            if v.get("UnitPrice") is None and v.get("TotalPrice") is not None and quantity:
                v["UnitPrice"] = _money(v["TotalPrice"] / quantity)
            if v.get("UnitPrice") is None:
                v["UnitPrice"] = v.get("ListPrice")
            unit = v.get("UnitPrice") or Decimal(0)
            v["Subtotal"] = _money(quantity * unit)
            v["TotalPrice"] = _money(quantity * unit * (Decimal(100) - discount) / Decimal(100))
            if rec.type == "QuoteLineItem" and not v.get("LineNumber"):
                v["LineNumber"] = self._autonumber("QuoteLineItem", 7)
        elif rec.type == "PricebookEntry":
            product = self._find(v.get("Product2Id") or "", ("Product2",))
            if product is not None:
                v["Name"] = product.values.get("Name")
                v["ProductCode"] = product.values.get("ProductCode")
        elif rec.type == "Quote":
            opp = self._find(v.get("OpportunityId") or "", ("Opportunity",))
            if opp is not None:
                v["AccountId"] = opp.values.get("AccountId")
                v["CurrencyIsoCode"] = opp.values.get("CurrencyIsoCode")
                v["IsSyncing"] = opp.values.get("SyncedQuoteId") == rec.id
                if v.get("Pricebook2Id") is None:
                    v["Pricebook2Id"] = opp.values.get("Pricebook2Id")
            if not v.get("QuoteNumber"):
                v["QuoteNumber"] = self._autonumber("Quote", 8)
            lines = [r for r in self._data["QuoteLineItem"].values()
                     if not r.deleted and r.values.get("QuoteId") == rec.id]
            total = sum((r.values.get("TotalPrice") or Decimal(0) for r in lines), Decimal(0))
            v["Subtotal"] = sum((r.values.get("Subtotal") or Decimal(0) for r in lines), Decimal(0))
            v["TotalPrice"] = v["GrandTotal"] = total
            v["LineItemCount"] = len(lines)
        elif rec.type == "User":
            v["Name"] = " ".join(p for p in (v.get("FirstName"), v.get("LastName")) if p)
        elif rec.type in ("Task", "Event"):
            self._derive_activity(rec)

    def _derive_activity(self, rec: _Rec) -> None:
        """A Task's or an Event's calculated fields: account, closed, times, subtype, archived."""
        v = rec.values
        what = self._find(v.get("WhatId") or "")
        if what is not None:
            v["AccountId"] = what.id if what.type == "Account" else what.values.get("AccountId")
        if rec.type == "Task":
            v["Status"] = v.get("Status") or "Not Started"
            v["Priority"] = v.get("Priority") or "Normal"
            v["TaskSubtype"] = v.get("TaskSubtype") or "Task"
            v["IsClosed"] = v["Status"] == "Completed"
            if v["IsClosed"] and v.get("CompletedDateTime") is None:
                v["CompletedDateTime"] = v.get("LastModifiedDate")
            elif not v["IsClosed"]:
                v["CompletedDateTime"] = None
        else:
            v["EventSubtype"] = v.get("EventSubtype") or "Event"
            start = v.get("ActivityDateTime") or v.get("StartDateTime")
            if start is not None:
                v["ActivityDateTime"] = v["StartDateTime"] = start
                v["ActivityDate"] = start.date()
                if v.get("DurationInMinutes") is not None:
                    v["EndDateTime"] = start + dt.timedelta(minutes=int(v["DurationInMinutes"]))
                elif v.get("EndDateTime") is not None:
                    v["DurationInMinutes"] = int((v["EndDateTime"] - start).total_seconds() // 60)
        v["IsArchived"] = self._archived(rec, self._now())

    @staticmethod
    def _archived(rec: _Rec, now: dt.datetime) -> bool:
        """Salesforce archives closed tasks due, and events that ended, more than 365 days ago."""
        v = rec.values
        if rec.type == "Task":
            due = v.get("ActivityDate") or v["CreatedDate"].date()
            return bool(v.get("IsClosed")) and due < (now - _ARCHIVE_AFTER).date()
        end = v.get("EndDateTime") or v.get("ActivityDateTime")
        return end is not None and end < now - _ARCHIVE_AFTER

    def _lines_of(self, opp_id: str) -> list[_Rec]:
        return [r for r in self._data["OpportunityLineItem"].values()
                if not r.deleted and r.values.get("OpportunityId") == opp_id]

    def _rollup(self, opp: _Rec, now: dt.datetime | None) -> None:
        lines = self._lines_of(opp.id)
        if lines:
            opp.values["Amount"] = sum((r.values.get("TotalPrice") or Decimal(0) for r in lines), Decimal(0))
        opp.values["HasOpportunityLineItem"] = bool(lines)
        if now is not None:
            self._stamp(opp, now)

    def _sync_quote(self, opp: _Rec, quote: _Rec, now: dt.datetime) -> None:
        """Quote syncing: the opportunity's line items are replaced by copies of the quote's."""
        for line in self._lines_of(opp.id):
            self._remove(line, now, cascade=False)
        qlis = sorted((r for r in self._data["QuoteLineItem"].values()
                       if not r.deleted and r.values.get("QuoteId") == quote.id),
                      key=lambda r: (r.values.get("SortOrder") or 0, r.values.get("LineNumber") or ""))
        for q in qlis:
            self._insert("OpportunityLineItem", {
                "OpportunityId": opp.id, "PricebookEntryId": q.values.get("PricebookEntryId"),
                "Quantity": q.values.get("Quantity"), "UnitPrice": q.values.get("UnitPrice"),
                "Discount": q.values.get("Discount"), "Description": q.values.get("Description"),
                "SortOrder": q.values.get("SortOrder"), "ServiceDate": q.values.get("ServiceDate"),
                "Tax_Rate__c": q.values.get("Tax_Rate__c")}, now, now)
        self._rollup(opp, now)
        for other in self._data["Quote"].values():
            if other.values.get("OpportunityId") == opp.id:
                self._derive(other)

    def _reveal(self, sobject: str, name: str) -> None:
        """A custom field pending field-level security becomes visible to the API user."""
        f = self._pending_fields.pop((sobject, name), None)
        if f is None:
            return
        self._schema[sobject].fields[f.name] = f
        for rec in self._data[sobject].values():
            rec.values.setdefault(f.name, False if f.type == "boolean" else None)

    def _after_write(self, rec: _Rec, changed: Iterable[str], now: dt.datetime) -> None:
        changed = set(changed)
        self._derive(rec)
        if rec.type == "FieldPermissions" and rec.values.get("PermissionsRead"):
            self._reveal(str(rec.values.get("SobjectType")), str(rec.values.get("Field")).partition(".")[2])
        if rec.type == "OpportunityLineItem":
            opp = self._find(rec.values.get("OpportunityId") or "", ("Opportunity",))
            if opp is not None:
                self._rollup(opp, now)
        elif rec.type == "QuoteLineItem":
            quote = self._find(rec.values.get("QuoteId") or "", ("Quote",))
            if quote is not None:
                self._derive(quote)
                self._stamp(quote, now)
                opp = self._find(quote.values.get("OpportunityId") or "", ("Opportunity",))
                if opp is not None and opp.values.get("SyncedQuoteId") == quote.id:
                    self._sync_quote(opp, quote, now)
        elif rec.type == "Opportunity":
            if "SyncedQuoteId" in changed:
                quote = self._find(rec.values.get("SyncedQuoteId") or "", ("Quote",))
                if quote is not None:
                    self._sync_quote(rec, quote, now)
                for other in self._data["Quote"].values():
                    if other.values.get("OpportunityId") == rec.id:
                        self._derive(other)
            if changed & {"Name"}:
                for line in self._lines_of(rec.id):
                    self._derive(line)
            self._rollup(rec, None)

    def _create(self, obj: _Obj, clean: dict[str, Any], now: dt.datetime) -> _Rec:
        rec = self._insert(obj.name, clean, now, now)
        self._after_write(rec, clean, now)
        return rec

    def _update(self, rec: _Rec, clean: dict[str, Any], now: dt.datetime) -> None:
        rec.values.update(clean)
        self._stamp(rec, now)
        self._after_write(rec, clean, now)

    def _remove(self, rec: _Rec, now: dt.datetime, *, cascade: bool = True) -> None:
        """Move a record to the recycle bin: IsDeleted, SystemModstamp bumped, an entry in the delete log."""
        if rec.deleted:
            return
        rec.values["IsDeleted"] = True
        self._stamp(rec, now)
        self._delete_log.append((rec.type, rec.id, now))
        if not cascade:
            return
        if rec.type == "Opportunity":
            for line in self._lines_of(rec.id):
                self._remove(line, now, cascade=False)
            for quote in list(self._data["Quote"].values()):
                if quote.values.get("OpportunityId") == rec.id:
                    self._remove(quote, now)
        elif rec.type == "Quote":
            for q in list(self._data["QuoteLineItem"].values()):
                if q.values.get("QuoteId") == rec.id:
                    self._remove(q, now, cascade=False)
            opp = self._find(rec.values.get("OpportunityId") or "", ("Opportunity",))
            if opp is not None and opp.values.get("SyncedQuoteId") == rec.id and not opp.deleted:
                opp.values["SyncedQuoteId"] = None
                self._stamp(opp, now)
        elif rec.type == "Account":
            for opp in list(self._data["Opportunity"].values()):
                if opp.values.get("AccountId") == rec.id:
                    self._remove(opp, now)
        elif rec.type == "OpportunityLineItem":
            opp = self._find(rec.values.get("OpportunityId") or "", ("Opportunity",))
            if opp is not None and not opp.deleted:
                self._rollup(opp, now)
        elif rec.type == "QuoteLineItem":
            parent = self._find(rec.values.get("QuoteId") or "", ("Quote",))
            if parent is not None and not parent.deleted:
                self._derive(parent)
                self._stamp(parent, now)

    # -- sObject handlers ----------------------------------------------------------------------------
    def _writable(self, obj: _Obj) -> None:
        if not obj.createable:
            raise _Err(400, "INVALID_TYPE_FOR_OPERATION", f"entity type {obj.name} does not support this operation")

    def _h_create(self, req: SandboxRequest) -> SandboxResponse:
        obj = self._obj(req.params["type"])
        self._writable(obj)
        body = self._body(req)
        if not isinstance(body, dict):
            raise _Err(400, "JSON_PARSER_ERROR", "Cannot deserialize instance of sObject from a non-object value")
        if any(k.lower() == "id" for k in body):
            raise _Err(400, "INVALID_FIELD_FOR_INSERT_UPDATE", "cannot specify Id in an insert call", ["Id"])
        clean, errors = self._clean(obj, body, creating=True, rec=None)
        if errors:
            return self._json(400, [{"message": e["message"], "errorCode": e["statusCode"], "fields": e["fields"]}
                                    for e in errors])
        rec = self._create(obj, clean, self._now())
        return self._json(201, {"id": rec.id, "success": True, "errors": []},
                          {"Location": f"/services/data/{req.params['ver']}/sobjects/{obj.name}/{rec.id}"})

    def _existing(self, obj: _Obj, record_id: str) -> _Rec:
        rec = self._find(record_id, (obj.name,))
        if rec is None:
            raise _Err(404, "NOT_FOUND", "The requested resource does not exist")
        if rec.deleted:
            raise _Err(404, "ENTITY_IS_DELETED", "entity is deleted")
        return rec

    def _h_get(self, req: SandboxRequest) -> SandboxResponse:
        obj = self._obj(req.params["type"])
        rec = self._existing(obj, req.params["id"])
        names = req.args("fields") or None
        return self._json(200, self._record_json(obj, rec, req.params["ver"], names))

    def _h_update(self, req: SandboxRequest) -> SandboxResponse:
        obj = self._obj(req.params["type"])
        self._writable(obj)
        rec = self._existing(obj, req.params["id"])
        body = self._body(req)
        if not isinstance(body, dict):
            raise _Err(400, "JSON_PARSER_ERROR", "Cannot deserialize instance of sObject from a non-object value")
        clean, errors = self._clean(obj, body, creating=False, rec=rec)
        if errors:
            return self._json(400, [{"message": e["message"], "errorCode": e["statusCode"], "fields": e["fields"]}
                                    for e in errors])
        self._update(rec, clean, self._now())
        return SandboxResponse(204)

    def _h_delete(self, req: SandboxRequest) -> SandboxResponse:
        obj = self._obj(req.params["type"])
        self._writable(obj)
        rec = self._existing(obj, req.params["id"])
        self._remove(rec, self._now())
        return SandboxResponse(204)

    def _external(self, obj: _Obj, name: str) -> _F:
        f = obj.field(name)
        if f is None or not (f.external_id or f.type == "id"):
            raise _Err(404, "NOT_FOUND", f"Provided external ID field does not exist or is not accessible: {name}")
        return f

    def _h_get_by_external_id(self, req: SandboxRequest) -> SandboxResponse:
        obj = self._obj(req.params["type"])
        f = self._external(obj, req.params["field"])
        value = unquote(req.params["value"])
        matches = [r for r in self._data[obj.name].values() if not r.deleted and r.values.get(f.name) == value]
        if not matches:
            raise _Err(404, "NOT_FOUND", "The requested resource does not exist")
        if len(matches) > 1:
            ver = req.params["ver"]
            return self._json(300, [f"/services/data/{ver}/sobjects/{obj.name}/{r.id}" for r in matches])
        return self._json(200, self._record_json(obj, matches[0], req.params["ver"]))

    def _h_upsert(self, req: SandboxRequest) -> SandboxResponse:
        obj = self._obj(req.params["type"])
        self._writable(obj)
        f = self._external(obj, req.params["field"])
        if f.type == "id":
            raise _Err(400, "INVALID_FIELD", "Use PATCH on the record URL to update by Id")
        value = unquote(req.params["value"])
        body = self._body(req)
        if not isinstance(body, dict):
            raise _Err(400, "JSON_PARSER_ERROR", "Cannot deserialize instance of sObject from a non-object value")
        matches = [r for r in self._data[obj.name].values() if not r.deleted and r.values.get(f.name) == value]
        ver = req.params["ver"]
        if len(matches) > 1:
            return self._json(300, [f"/services/data/{ver}/sobjects/{obj.name}/{r.id}" for r in matches])
        body = {k: v for k, v in body.items() if k.lower() != f.name.lower()}
        creating = not matches
        if creating:
            body[f.name] = value
        clean, errors = self._clean(obj, body, creating=creating, rec=matches[0] if matches else None)
        if errors:
            return self._json(400, [{"message": e["message"], "errorCode": e["statusCode"], "fields": e["fields"]}
                                    for e in errors])
        now = self._now()
        if creating:
            rec = self._create(obj, clean, now)
            return self._json(201, {"id": rec.id, "success": True, "errors": [], "created": True})
        self._update(matches[0], clean, now)
        return self._json(200, {"id": matches[0].id, "success": True, "errors": [], "created": False})

    def _h_collection(self, req: SandboxRequest) -> SandboxResponse:
        body = self._body(req)
        if not isinstance(body, dict) or not isinstance(body.get("records"), list):
            raise _Err(400, "JSON_PARSER_ERROR", "The request body must hold a records list")
        records = body["records"]
        if len(records) > _MAX_COLLECTION:
            raise _Err(400, "EXCEEDED_ID_LIMIT", "record limit reached. cannot submit more than 200 records into this "
                       "call")
        all_or_none = body.get("allOrNone") is True
        creating = req.method == "POST"
        prepared: list[tuple[_Obj, _Rec | None, dict[str, Any], list[dict[str, Any]]]] = []
        for item in records:
            if not isinstance(item, dict):
                raise _Err(400, "JSON_PARSER_ERROR", "Each record must be a JSON object")
            attributes = item.get("attributes")
            type_name = attributes.get("type") if isinstance(attributes, dict) else None
            if not isinstance(type_name, str):
                raise _Err(400, "INVALID_TYPE", "Must send a concrete entity type.")
            obj = self._obj(type_name)
            self._writable(obj)
            rid = next((v for k, v in item.items() if k.lower() == "id"), None)
            if creating:
                if rid is not None:
                    prepared.append((obj, None, {}, [_rec_error("INVALID_FIELD_FOR_INSERT_UPDATE",
                                                                "cannot specify Id in an insert call", ["Id"])]))
                    continue
                clean, errors = self._clean(obj, item, creating=True, rec=None)
                prepared.append((obj, None, clean, errors))
                continue
            if not isinstance(rid, str) or not re.fullmatch(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?", rid):
                prepared.append((obj, None, {}, [_rec_error("MALFORMED_ID", f"{obj.label} ID: id value of incorrect "
                                                            f"type: {rid}", ["Id"])]))
                continue
            rec = self._find(rid, (obj.name,))
            if rec is None:
                wrong_type = self._find(rid)
                code = "MALFORMED_ID" if wrong_type is not None else "INVALID_CROSS_REFERENCE_KEY"
                message = (f"{obj.label} ID: id value of incorrect type: {rid}" if wrong_type is not None
                           else "invalid cross reference id")
                prepared.append((obj, None, {}, [_rec_error(code, message, [])]))
                continue
            if rec.deleted:
                prepared.append((obj, rec, {}, [_rec_error("ENTITY_IS_DELETED", "entity is deleted", [])]))
                continue
            clean, errors = self._clean(obj, item, creating=False, rec=rec)
            prepared.append((obj, rec, clean, errors))
        failed = any(errors for *_x, errors in prepared)
        now = self._now()
        results: list[dict[str, Any]] = []
        for obj, rec, clean, errors in prepared:
            rid_out = rec.id if rec is not None else None
            if errors:
                results.append({"id": rid_out, "success": False, "errors": errors} if rid_out else
                               {"success": False, "errors": errors})
            elif all_or_none and failed:
                rolled = [_rec_error("ALL_OR_NONE_OPERATION_ROLLED_BACK", "Record rolled back because not all records "
                                     "were valid and the request was using AllOrNone header", [])]
                results.append({"id": rid_out, "success": False, "errors": rolled} if rid_out else
                               {"success": False, "errors": rolled})
            elif creating:
                created = self._create(obj, clean, now)
                results.append({"id": created.id, "success": True, "errors": []})
            else:
                assert rec is not None
                self._update(rec, clean, now)
                results.append({"id": rec.id, "success": True, "errors": []})
        return self._json(200, results)

    # -- Tooling API ---------------------------------------------------------------------------------
    def _h_custom_field(self, req: SandboxRequest) -> SandboxResponse:
        body = self._body(req)
        if not isinstance(body, dict):
            raise _Err(400, "JSON_PARSER_ERROR", "Cannot deserialize instance of CustomField from a non-object value")
        full = str(body.get("FullName") or "")
        raw_meta = body.get("Metadata")
        meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
        obj_name, _, field_name = full.partition(".")
        if not obj_name or not field_name:
            raise _Err(400, "REQUIRED_FIELD_MISSING", "Required fields are missing: [FullName]", ["FullName"])
        obj = self._obj(obj_name)
        if not re.fullmatch(r"[A-Za-z](?:[A-Za-z0-9]|_(?!_))*[A-Za-z0-9]__c", field_name) or len(field_name) > 43:
            raise _Err(400, "INVALID_FIELD", f"The field name {field_name} is not valid: it must begin with a letter, "
                       "contain only letters, digits and single underscores, not end with an underscore, be at "
                       "most 40 characters, and end with __c", ["FullName"])
        if obj.field(field_name) is not None or (obj.name, field_name) in self._pending_fields:
            raise _Err(400, "DUPLICATE_DEVELOPER_NAME", f"There is already a field named {field_name} on {obj.name}.",
                       ["FullName"])
        label = str(meta.get("label") or "")
        if not label:
            raise _Err(400, "REQUIRED_FIELD_MISSING", "Required fields are missing: [Label]", ["Label"])
        kind = str(meta.get("type") or "")

        def number(name: str, default: int) -> int:
            raw = meta.get(name, default)
            try:
                return int(raw)
            except (TypeError, ValueError):
                raise _Err(400, "FIELD_INTEGRITY_EXCEPTION", f"{name} must be a number", [name]) from None

        if kind == "Text":
            length = number("length", 0)
            if not 1 <= length <= 255:
                raise _Err(400, "FIELD_INTEGRITY_EXCEPTION", "Length: a Text field is 1 to 255 characters long",
                           ["length"])
            f = _F(field_name, "string", label, length, custom=True, external_id=meta.get("externalId") is True,
                   unique=meta.get("unique") is True)
        elif kind in ("TextArea", "LongTextArea"):
            f = _F(field_name, "textarea", label, 255 if kind == "TextArea" else number("length", 32768), custom=True)
        elif kind in ("Number", "Currency", "Percent"):
            precision, scale = number("precision", 18), number("scale", 0)
            if not 1 <= precision <= 18 or not 0 <= scale <= precision:
                raise _Err(400, "FIELD_INTEGRITY_EXCEPTION", "precision is 1 to 18 and scale at most precision",
                           ["precision"])
            f = _F(field_name, {"Number": "double", "Currency": "currency", "Percent": "percent"}[kind], label,
                   precision=precision, scale=scale, custom=True)
        elif kind == "Checkbox":
            f = _F(field_name, "boolean", label, custom=True, nillable=False)
        elif kind in ("Date", "DateTime", "Email", "Url", "Phone"):
            f = _F(field_name, kind.lower(), label, 80 if kind == "Email" else 255 if kind != "Date" else 0,
                   custom=True)
        elif kind == "Picklist":
            raw_set = meta.get("valueSet")
            value_set: dict[str, Any] = raw_set if isinstance(raw_set, dict) else {}
            raw_definition = value_set.get("valueSetDefinition")
            definition: dict[str, Any] = raw_definition if isinstance(raw_definition, dict) else {}
            values = tuple(str(v.get("fullName")) for v in definition.get("value") or [] if isinstance(v, dict))
            if not values:
                raise _Err(400, "FIELD_INTEGRITY_EXCEPTION", "Picklist: at least one value is required", ["valueSet"])
            f = _F(field_name, "picklist", label, 255, custom=True, picklist=values,
                   restricted=value_set.get("restricted") is True)
        else:
            raise _Err(400, "FIELD_INTEGRITY_EXCEPTION", f"Unsupported field type: {kind or 'none'}", ["type"])
        self._pending_fields[(obj.name, f.name)] = f
        if not self.field_security:
            self._reveal(obj.name, f.name)
        return self._json(201, {"id": self._new_id("00N"), "success": True, "errors": [], "warnings": [],
                                "infos": []})

    # -- OAuth ---------------------------------------------------------------------------------------
    def _oauth_error(self, code: str, description: str, status: int = 400) -> SandboxResponse:
        return self._json(status, {"error": code, "error_description": description})

    def _session_for(self, username: str) -> str:
        token = f"{self.org_id[:15]}!{self._token(96)}"
        with self._session_lock:
            self._sessions[token] = (username, self.clock.now())
        return token

    def _token_answer(self, req: SandboxRequest, username: str, refresh_token: str | None) -> dict[str, Any]:
        user = next((r for r in self._data["User"].values() if r.values.get("Username") == username), None)
        user_id = user.id if user is not None else self._integration_user
        issued = str(int(self.clock.now() * 1000))
        access = self._session_for(username)
        signature = base64.b64encode(hashlib.sha256(f"{user_id}{issued}{access}".encode()).digest()).decode()
        out: dict[str, Any] = {"access_token": access}
        if refresh_token:
            out["refresh_token"] = refresh_token
        out.update({"signature": signature, "scope": "api refresh_token", "instance_url": req.base_url,
                    "id": f"{req.base_url}/id/{self.org_id}/{user_id}", "token_type": "Bearer", "issued_at": issued})
        return out

    def _h_token(self, req: SandboxRequest) -> SandboxResponse:
        self._token_requests += 1
        form = {k: v[-1] for k, v in parse_qs(req.body.decode("utf-8", "replace")).items()}
        if form.get("client_id") != self.client_id:
            return self._oauth_error("invalid_client_id", "client identifier invalid")
        secret = form.get("client_secret")
        grant = form.get("grant_type")
        if (secret is not None and secret != self.client_secret) or (grant == "password" and secret is None):
            return self._oauth_error("invalid_client", "invalid client credentials")
        if grant == "refresh_token":
            presented = form.get("refresh_token") or ""
            username = self._refresh_tokens.get(presented)
            if username is None:
                return self._oauth_error("invalid_grant", "expired access/refresh token")
            new_refresh: str | None = None
            if self.refresh_rotation:
                del self._refresh_tokens[presented]
                new_refresh = "5Aep861" + self._token(80)
                self._refresh_tokens[new_refresh] = username
            return self._json(200, self._token_answer(req, username, new_refresh))
        if grant == "password":
            username = form.get("username") or ""
            expected = self.users.get(username)
            if expected is None or form.get("password") != expected + self.security_tokens.get(username, ""):
                return self._oauth_error("invalid_grant", "authentication failure")
            return self._json(200, self._token_answer(req, username, None))
        return self._oauth_error("unsupported_grant_type", "grant type not supported")

    # -- seeding -------------------------------------------------------------------------------------
    def load_book(self, book: Book) -> None:
        """Create the book's users, products, price book entries, accounts, opportunities, line items and quotes."""
        rng = random.Random(f"salesforce-load-{self.seed}")
        with self.lock:
            owners: dict[str, str] = {}
            for email in sorted({d.owner for d in book.deals}):
                first, _, last = email.split("@")[0].partition(".")
                owners[email] = self._insert("User", {
                    "Username": email, "FirstName": first.title(), "LastName": last.title() or first.title(),
                    "Email": email, "Alias": (first[:1] + last[:4]).lower(), "IsActive": True},
                    _ORG_EPOCH, _ORG_EPOCH).id
            start = _ORG_EPOCH + dt.timedelta(days=30)
            entries: dict[tuple[str, str], str] = {}
            for p in book.products:
                family = {"SVC": "Services", "LIC": "Licences", "HW-": "Matériel", "WOR": "Travaux"}.get(p.sku[:3],
                                                                                                       "Édition")
                product = self._insert("Product2", {
                    "Name": p.name, "ProductCode": p.sku, "Description": p.name, "IsActive": True, "Family": family,
                    "Tax_Rate__c": p.tax_rate}, start, start)
                for currency in ("EUR", "USD"):
                    price = p.unit_price if currency == "EUR" else _money(p.unit_price * _USD_PER_EUR)
                    entries[(p.sku, currency)] = self._insert("PricebookEntry", {
                        "Pricebook2Id": self._standard_pricebook, "Product2Id": product.id, "UnitPrice": price,
                        "IsActive": True, "UseStandardPrice": False, "CurrencyIsoCode": currency}, start, start).id
            first_deal: dict[str, dt.datetime] = {}
            for d in book.deals:
                first_deal[d.company_id] = min(first_deal.get(d.company_id, d.created_at), d.created_at)
            accounts: dict[str, str] = {}
            for c in book.companies:
                created = first_deal.get(c.id, start + dt.timedelta(days=60)) - dt.timedelta(
                    days=rng.randint(1, 200), milliseconds=rng.randrange(86_400_000))
                values: dict[str, Any] = {
                    "Name": c.name, "BillingStreet": c.address, "BillingCity": c.city,
                    "BillingPostalCode": c.postal_code, "BillingCountry": COUNTRY_NAMES.get(c.country, c.country),
                    "BillingCountryCode": c.country if c.country in COUNTRY_NAMES else None,
                    "CurrencyIsoCode": c.currency, "AccountSource": c.acquisition_source.replace("_", " ").title(),
                    "VAT_Number__c": c.vat_number, "SIREN__c": c.siren, "SIRET__c": c.siret,
                    "Billing_Email__c": c.email, "LB_Book_Id__c": c.id,
                    "Website": f"https://www.{c.domain}" if c.domain else None,
                }
                rec = self._insert("Account", values, created, created + dt.timedelta(days=rng.randint(1, 60)))
                accounts[c.id] = rec.id
                self._book_ids["Account"][c.id] = rec.id
            for d in book.deals:
                process = "grands_comptes" if rng.random() < 0.4 else "standard"
                stage = _BOOK_STAGES[process][d.stage]
                if stage == "Negotiation/Review" and rng.random() < 0.5:
                    stage = "Verbal Won"  # open, whatever its name says
                close = d.close_date or (d.created_at.date() + dt.timedelta(days=60))
                opp = self._insert("Opportunity", {
                    "Name": d.name, "AccountId": accounts[d.company_id], "StageName": stage, "CloseDate": close,
                    "Amount": d.amount, "CurrencyIsoCode": d.currency, "Pricebook2Id": self._standard_pricebook,
                    "OwnerId": owners[d.owner], "LeadSource": d.acquisition_source.replace("_", " ").title(),
                    "Type": "New Business", "LB_Book_Id__c": d.id}, d.created_at, d.updated_at)
                self._book_ids["Opportunity"][d.id] = opp.id
                accepted = d.quote is not None and d.quote.status == "accepted"
                quote: _Rec | None = None
                if d.quote is not None:
                    span = max(int((d.updated_at - d.created_at).total_seconds() * 1000), 1)
                    q_created = d.created_at + dt.timedelta(milliseconds=span // 3)
                    q_updated = d.updated_at - dt.timedelta(milliseconds=rng.randrange(0, max(span - span // 3, 1)))
                    quote = self._insert("Quote", {
                        "Name": f"Devis – {d.name}"[:255], "OpportunityId": opp.id,
                        "Status": _QUOTE_STATUS[d.quote.status], "LB_Book_Id__c": d.quote.id,
                        "ExpirationDate": q_created.date() + dt.timedelta(days=30)},
                        q_created, max(q_created, q_updated))
                    self._book_ids["Quote"][d.quote.id] = quote.id
                    self._seed_lines("QuoteLineItem", "QuoteId", quote.id, d.quote.lines, d.currency, entries,
                                     q_created)
                    self._derive(quote)
                own_lines = d.quote.lines if accepted and d.quote is not None else d.lines
                self._seed_lines("OpportunityLineItem", "OpportunityId", opp.id, own_lines, d.currency, entries,
                                 d.created_at)
                if accepted and quote is not None:
                    opp.values["SyncedQuoteId"] = quote.id
                    self._derive(quote)
                self._rollup(opp, None)
                self._derive(opp)
            self._seed_activities(book, owners)

    def _seed_activities(self, book: Book, owners: Mapping[str, str]) -> None:
        """Every deal's sales activities (:meth:`Book.activities`) on its opportunity: calls and e-mails are logged
        Tasks (``TaskSubtype`` Call or Email), tasks are Tasks, meetings are Events; all done, as they are past.

        Their ids come from a random stream of their own, so that seeding them moves no other record's id.
        """
        ids = random.Random(f"salesforce-activities-{self.seed}")
        opps = self._book_ids["Opportunity"]
        for d in book.deals:
            for a in book.activities(d):
                common = {"WhatId": opps[d.id], "Subject": a.subject, "OwnerId": owners[d.owner]}
                if a.kind == "meeting":
                    values: dict[str, Any] = {**common, "ActivityDateTime": _ms(a.at), "Type": "Meeting",
                                              "DurationInMinutes": a.duration_minutes, "ShowAs": "Busy"}
                    self._insert("Event", values, a.at, a.at, ids=ids)
                    continue
                values = {**common, "ActivityDate": a.at.date(), "Status": "Completed", "Priority": "Normal",
                          "TaskSubtype": {"call": "Call", "email": "Email"}.get(a.kind, "Task"),
                          "Type": {"call": "Call", "email": "Email"}.get(a.kind, "Other")}
                if a.kind == "call":
                    values.update(CallType="Outbound", CallDurationInSeconds=a.duration_minutes * 60)
                self._insert("Task", values, a.at, a.at, ids=ids)

    def _seed_lines(self, obj: str, parent_field: str, parent_id: str, lines: tuple[BookLine, ...], currency: str,
                    entries: Mapping[tuple[str, str], str], at: dt.datetime) -> None:
        for pos, ln in enumerate(lines, start=1):
            self._insert(obj, {
                parent_field: parent_id, "PricebookEntryId": entries[(ln.sku, currency)], "Quantity": ln.quantity,
                "UnitPrice": ln.unit_price, "Discount": ln.discount_percent or None, "Description": ln.description,
                "SortOrder": pos, "Tax_Rate__c": ln.tax_rate}, at, at)

    # -- helpers for tests and the admin endpoints -----------------------------------------------------
    def deal_ids_by_book_id(self) -> dict[str, str]:
        """Book deal id (``D00001``) -> Opportunity id."""
        with self.lock:
            return dict(self._book_ids["Opportunity"])

    def account_ids_by_book_id(self) -> dict[str, str]:
        with self.lock:
            return dict(self._book_ids["Account"])

    def quote_ids_by_book_id(self) -> dict[str, str]:
        with self.lock:
            return dict(self._book_ids["Quote"])

    def object_ids(self, obj: str, *, deleted: bool = False) -> list[str]:
        """Ids of live (or deleted) records of ``obj``, in creation order."""
        with self.lock:
            return [r.id for r in self._data[self._obj(obj).name].values() if r.deleted == deleted]

    def record(self, obj: str, record_id: str) -> dict[str, Any]:
        """A copy of one record's stored values (Python types: Decimal, date, datetime)."""
        with self.lock:
            return dict(self._data[self._obj(obj).name][to_18(record_id[:15])].values)

    def query(self, soql: str, *, include_deleted: bool = False) -> list[dict[str, Any]]:
        """Run SOQL without the HTTP layer (records as Salesforce sends them)."""
        with self.lock:
            return self.execute(soql, include_deleted=include_deleted)[1]

    def modify(self, obj: str, record_id: str, **values: Any) -> dict[str, Any]:
        """Change a record as a user would (validated, ``SystemModstamp`` bumped); ValueError when refused."""
        with self.lock:
            o = self._obj(obj)
            rec = self._data[o.name][to_18(record_id[:15])]
            try:
                clean, errors = self._clean(o, values, creating=False, rec=rec)
            except _Err as exc:
                raise ValueError(dumps(exc.body)) from None
            if errors:
                raise ValueError(dumps(errors))
            self._update(rec, clean, self._now())
            return {k: self._out(v) for k, v in rec.values.items()}

    def touch(self, obj: str, ids: Iterable[str], at: dt.datetime | None = None) -> dt.datetime:
        """Set ``SystemModstamp`` of ``ids`` to one instant (default: now), as a bulk system update would."""
        with self.lock:
            when = _ms(at) if at is not None else self._now()
            o = self._obj(obj)
            for rid in ids:
                self._data[o.name][to_18(rid[:15])].values["SystemModstamp"] = when
            return when

    def delete(self, obj: str, record_id: str) -> None:
        """Delete a record to the recycle bin (cascading to its children)."""
        with self.lock:
            o = self._obj(obj)
            self._remove(self._data[o.name][to_18(record_id[:15])], self._now())

    def purge(self, obj: str, record_id: str) -> None:
        """Empty one record from the recycle bin: queryAll no longer finds it; the delete log keeps it."""
        with self.lock:
            o = self._obj(obj)
            rec = self._data[o.name][to_18(record_id[:15])]
            if not rec.deleted:
                self._remove(rec, self._now())
            del self._data[o.name][rec.id]

    def deals_snapshot(self) -> list[dict[str, Any]]:
        """Every live opportunity, in the shape of ``GET /_sandbox/deals``."""
        with self.lock:
            activities = self._activities_by_opportunity()
            return [{
                "id": r.id, "book_id": r.values.get("LB_Book_Id__c"), "name": r.values.get("Name"),
                "won": bool(r.values.get("IsWon")), "closed": bool(r.values.get("IsClosed")),
                "stage": r.values.get("StageName"),
                "amount": format(r.values["Amount"], "f") if r.values.get("Amount") is not None else None,
                "currency": r.values.get("CurrencyIsoCode"), "created_at": sf_datetime(r.values["CreatedDate"]),
                "updated_at": sf_datetime(r.values["SystemModstamp"]), "activities": activities.get(r.id, {}),
            } for r in self._data["Opportunity"].values() if not r.deleted]

    def _activities_by_opportunity(self) -> dict[str, dict[str, int]]:
        """Live (not deleted; archived or not) Tasks and Events by opportunity, counted by the kind each records."""
        out: dict[str, dict[str, int]] = {}
        for obj in ("Task", "Event"):
            for r in self._data[obj].values():
                what = r.values.get("WhatId")
                if r.deleted or not isinstance(what, str) or not what.startswith("006"):
                    continue
                kind = "meeting" if obj == "Event" else {"Call": "call", "Email": "email", "ListEmail": "email"}.get(
                    str(r.values.get("TaskSubtype")), "task")
                counts = out.setdefault(what, {})
                counts[kind] = counts.get(kind, 0) + 1
        return out

    def activity_counts_of(self, opportunity_id: str) -> dict[str, int]:
        """The live activities on one opportunity, counted by kind (call, meeting, email, task; zeros left out)."""
        with self.lock:
            return self._activities_by_opportunity().get(to_18(opportunity_id[:15]), {})

    def issue_session(self, username: str = DEMO_USERNAME) -> str:
        """An access token for ``username``, as if it had just logged in."""
        return self._session_for(username)

    def issue_refresh_token(self, username: str = DEMO_USERNAME) -> str:
        """A new valid refresh token (the result of a consent flow)."""
        with self.lock:
            token = "5Aep861" + self._token(80)
            self._refresh_tokens[token] = username
            return token

    def permission_set_id(self) -> str:
        """The integration user's permission set (the place to grant access to new fields)."""
        return self._permission_set

    def valid_refresh_tokens(self) -> list[str]:
        with self.lock:
            return list(self._refresh_tokens)

    def expire_sessions(self) -> int:
        """Invalidate every access token (a session timeout or a revoked session); returns how many."""
        with self._session_lock:
            n = len(self._sessions)
            self._sessions.clear()
            return n
