"""The connector interfaces: a CRM source and an accounting ledger.

A CRM connector implements :class:`CrmSource`, a ledger connector implements :class:`Ledger`. Both are
registered as entry points (``ledgerbridge.crm`` and ``ledgerbridge.ledger``) and built from the
pipeline's config block through their ``from_config`` class method, so a third party can add a vendor
without touching this package. Adapters raise only :mod:`connectors.errors` types.
"""

from __future__ import annotations

import abc
import contextlib
import datetime as dt
import functools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from connectors.domain import CreditNote, Customer, Deal, ExpenseLine, Invoice, Payment

if TYPE_CHECKING:
    from config.schema import ConnectorSettings

__all__ = [
    "ApiStats",
    "CreateOutcome",
    "CrmSource",
    "Cursor",
    "DealPage",
    "FieldSpec",
    "FieldUpdate",
    "InvoiceRequest",
    "Ledger",
    "LedgerCustomer",
    "TokenStore",
    "WriteResult",
]


@functools.total_ordering
@dataclass(frozen=True)
class Cursor:
    """A compound incremental cursor: a timestamp plus the id that breaks ties at equal timestamps.

    Cursors order by timestamp, then by id with numeric ids in numeric order ("9" before "18"), as the
    CRMs hand deals out; ids of one length (Salesforce's 18 characters) order as text.
    """

    value: dt.datetime
    tiebreak: str = ""

    def _key(self) -> tuple[dt.datetime, int, str]:
        return (self.value, len(self.tiebreak), self.tiebreak)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Cursor):
            return NotImplemented
        return self._key() < other._key()


@dataclass
class DealPage:
    """One page of changed deals. ``cursor`` covers every deal in this page and all pages before it."""

    deals: list[Deal]
    cursor: Cursor | None


@dataclass(frozen=True)
class FieldSpec:
    """A custom field the sync writes to CRM records."""

    name: str
    label: str
    type: Literal["string", "number", "date", "datetime", "enumeration", "bool"] = "string"
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class FieldUpdate:
    object_id: str
    values: Mapping[str, str | Decimal | int | dt.date | dt.datetime | None]


@dataclass(frozen=True)
class WriteResult:
    object_id: str
    ok: bool
    error: str | None = None


@dataclass(frozen=True)
class LedgerCustomer:
    """A customer (contact) as the ledger holds it, with the fields used for matching."""

    ledger_id: str
    name: str
    number: str | None = None
    email: str | None = None
    vat_number: str | None = None
    domain: str | None = None
    company_id: str | None = None


@dataclass(frozen=True)
class InvoiceRequest:
    """An invoice to create, with the idempotency key stored before the call."""

    idempotency_key: str
    invoice: Invoice
    customer_ledger_id: str


@dataclass(frozen=True)
class CreateOutcome:
    """Result of one invoice in a batch create."""

    idempotency_key: str
    ok: bool
    invoice: Invoice | None = None
    error: str | None = None


@dataclass
class ApiStats:
    """Calls made by one connector instance, for the run summary and the benchmarks."""

    calls: int = 0
    rate_limited: int = 0
    retries: int = 0
    by_endpoint: dict[str, int] = field(default_factory=dict)

    def record(self, endpoint: str) -> None:
        self.calls += 1
        self.by_endpoint[endpoint] = self.by_endpoint.get(endpoint, 0) + 1


class TokenStore(abc.ABC):
    """Where a connector keeps OAuth tokens that rotate. Implemented by the state store.

    ``save`` must be durable before it returns: a rotated refresh token is persisted before the new
    access token is used.
    """

    @abc.abstractmethod
    def load(self, connection: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    def save(self, connection: str, token: dict[str, Any]) -> None: ...

    def lock(self, connection: str) -> AbstractContextManager[None]:
        """A lock held while a token is refreshed, across processes where the store can provide one."""
        return contextlib.nullcontext()


class CrmSource(abc.ABC):
    """A CRM that deals are pulled from and finance fields are written back to."""

    vendor: ClassVar[str]
    #: The pydantic model that validates this connector's config block.
    Settings: ClassVar[type[ConnectorSettings]]
    stats: ApiStats

    @classmethod
    @abc.abstractmethod
    def from_config(cls, settings: Mapping[str, Any], tokens: TokenStore) -> CrmSource:
        """Build the connector from its pipeline config block (secrets already resolved)."""

    @abc.abstractmethod
    def changed_deals(
        self, since: Cursor | None, until: dt.datetime, page_size: int = 100
    ) -> Iterator[DealPage]:
        """Deals modified in ``(since, until]``, oldest first.

        Deals are ordered by (modification time, id); ``since`` is exclusive on that pair. Won deals
        carry their customer and line items (lines come from the quote the customer accepted when the
        deal has one, otherwise from the deal itself); other deals may come without them.
        """

    @abc.abstractmethod
    def get_deals(self, ids: Sequence[str]) -> list[Deal]:
        """Read the given deals (with customers and lines); unknown ids are left out."""

    @abc.abstractmethod
    def activity_counts(self, deal_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        """Sales activities logged on each deal, by kind: ``{deal_id: {"call": 3, "meeting": 1, ...}}``.

        Kinds are ``call``, ``meeting``, ``email`` and ``task``; a deal without activities may be absent.
        Used to cost the sales effort that went into winning a customer (CAC).
        """

    @abc.abstractmethod
    def ensure_fields(self, object_type: Literal["deal", "customer"], fields: Sequence[FieldSpec]) -> None:
        """Create the custom fields that do not exist yet."""

    @abc.abstractmethod
    def write_fields(
        self, object_type: Literal["deal", "customer"], updates: Sequence[FieldUpdate]
    ) -> list[WriteResult]:
        """Write field values in batches; one bad record does not fail the others."""

    def close(self) -> None:  # noqa: B027 - optional hook with a documented default
        """Release connections."""


class Ledger(abc.ABC):
    """An accounting system that invoices are created in and payments are read from."""

    vendor: ClassVar[str]
    #: The pydantic model that validates this connector's config block.
    Settings: ClassVar[type[ConnectorSettings]]
    stats: ApiStats
    max_batch: ClassVar[int] = 50
    #: False when the ledger has no idempotency key for creates (Pennylane): an unanswered create can then
    #: only be resolved by looking its reference up, and a "not found" is trusted only ``lookup_settle_s``
    #: seconds after the create was sent (the ledger's search may lag behind its writes).
    idempotent_creates: ClassVar[bool] = True
    lookup_settle_s: ClassVar[float] = 0.0

    @classmethod
    @abc.abstractmethod
    def from_config(cls, settings: Mapping[str, Any], tokens: TokenStore) -> Ledger:
        """Build the connector from its pipeline config block (secrets already resolved)."""

    @abc.abstractmethod
    def list_customers(self) -> Iterator[LedgerCustomer]:
        """Every active customer of the organisation, for matching."""

    @abc.abstractmethod
    def find_customers_by_number(self, numbers: Sequence[str]) -> dict[str, LedgerCustomer]:
        """Customers whose external number (ContactNumber, external reference...) is in ``numbers``."""

    @abc.abstractmethod
    def create_customers(
        self, customers: Sequence[tuple[str, Customer]], idempotency_key: str
    ) -> dict[str, LedgerCustomer]:
        """Create customers; each pair is (external number, customer). Returns number -> created."""

    @abc.abstractmethod
    def create_invoices(self, requests: Sequence[InvoiceRequest], idempotency_key: str) -> list[CreateOutcome]:
        """Create up to ``max_batch`` invoices in one call.

        Validation failures are returned per invoice (``ok=False``). A failure whose outcome is unknown
        raises :class:`~connectors.errors.AmbiguousWriteError` for the whole batch.
        """

    @abc.abstractmethod
    def find_invoices_by_reference(self, references: Sequence[str]) -> dict[str, Invoice]:
        """Invoices whose reference is in ``references`` (the lookup that resolves ambiguous writes)."""

    @abc.abstractmethod
    def list_invoices(self, modified_since: dt.datetime | None = None) -> Iterator[Invoice]:
        """Sales invoices changed since ``modified_since`` (all when None), with lines."""

    @abc.abstractmethod
    def list_payments(self, modified_since: dt.datetime | None = None) -> Iterator[Payment]:
        """Payments changed since ``modified_since``."""

    @abc.abstractmethod
    def list_credit_notes(self, modified_since: dt.datetime | None = None) -> Iterator[CreditNote]:
        """Sales credit notes changed since ``modified_since``, with their allocations to invoices."""

    @abc.abstractmethod
    def list_expenses(self, account_codes: Sequence[str], start: dt.date, end: dt.date) -> Iterator[ExpenseLine]:
        """Purchase lines booked to ``account_codes`` dated within ``[start, end]`` (approved, not voided)."""

    @abc.abstractmethod
    def base_currency(self) -> str:
        """The organisation's home currency (ISO-4217)."""

    def invoice_url(self, invoice: Invoice) -> str | None:
        """Where a person opens ``invoice`` in the ledger's web app, when the ledger has such an address."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook with a documented default
        """Release connections."""
