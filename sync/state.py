"""The sync state store: runs, cursors, deal/customer links, write intents, flags, audit log and tokens.

One :class:`StateStore` wraps one database, SQLite (the default, single host) or PostgreSQL (production,
several replicas). The schema is owned by Alembic (``sync/migrations``); :meth:`StateStore.migrate` brings
a database to the head revision and is safe to run from several processes at once.

Crash safety rests on two rules, both kept here:

- an external write is preceded by a committed *intent* row that carries its idempotency key
  (:meth:`StateStore.add_intents`), and
- the outcome of a batch of writes, the links it creates and the cursor that moves past it are committed in
  one transaction (:meth:`StateStore.record_outcomes`), so after a crash the state either shows the whole
  batch or none of it.

Every timestamp is stored in UTC and read back as an aware UTC :class:`~datetime.datetime`, on both
databases. JSON columns take :class:`~decimal.Decimal`, dates and pydantic models (written as strings)
and refuse floats, so that money can never be stored as a binary float. The tables are SQLModel classes;
queries are written with SQLAlchemy Core on an explicit connection, because upserts need the dialects'
``INSERT ... ON CONFLICT`` and every transaction here has a deliberate scope. Read results are frozen
dataclasses, detached from any session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import hashlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic.config import Config as AlembicConfig
from pydantic import BaseModel
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect, Engine, RowMapping
from sqlalchemy.engine.url import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import registry
from sqlalchemy.pool import StaticPool
from sqlmodel import Field, SQLModel

from connectors.errors import ConfigError, LedgerBridgeError
from connectors.interfaces import Cursor, TokenStore
from sync.crypto import TokenCipher, generate_key, load_or_create_key_file

__all__ = [
    "AUDIT_LOCATIONS",
    "INTENT_KINDS",
    "INTENT_STATES",
    "LINK_KINDS",
    "METADATA",
    "RUN_STATUSES",
    "VERSION_TABLE",
    "AuditData",
    "AuditRow",
    "Confirmed",
    "Failed",
    "FlagRow",
    "IntentData",
    "IntentRow",
    "LinkData",
    "LinkRow",
    "RunRow",
    "StateError",
    "StateStore",
    "alembic_config",
    "to_json_value",
]

RUN_STATUSES = ("running", "ok", "partial", "failed")
LINK_KINDS = ("deal", "customer")
INTENT_KINDS = ("invoice", "customer")
INTENT_STATES = ("pending", "sent", "confirmed", "failed")
AUDIT_LOCATIONS = ("crm", "ledger", "state")

#: Alembic's version table; named for the project so the store can share a database or schema.
VERSION_TABLE = "ledgerbridge_alembic_version"

#: SQLite waits this long for another writer before giving up ("database is locked").
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: How long :meth:`StateStore.token_lock` waits for another holder.
TOKEN_LOCK_TIMEOUT_S = 120.0

# Intent kind -> the kind of link a confirmed intent of that kind produces.
_LINK_KIND_OF_INTENT = {"invoice": "deal", "customer": "customer"}
_CHUNK = 500  # ids per IN (...) clause
_PG_TOKEN_LOCK_SPACE = 0x4C42  # first key of the two-key advisory locks taken by token_lock ("LB")


class StateError(LedgerBridgeError):
    """The state store was asked for something inconsistent with what it holds (e.g. an unknown key)."""


# --------------------------------------------------------------------------------------------------
# Column types
# --------------------------------------------------------------------------------------------------


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _as_utc(value: dt.datetime, what: str = "datetime") -> dt.datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got naive {value.isoformat()}")
    return value.astimezone(dt.UTC)


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """An aware datetime stored in UTC: ``timestamptz`` on PostgreSQL, naive-UTC text on SQLite.

    Naive values are refused on the way in; values come back aware, in UTC, with microseconds.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        value = _as_utc(value)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def to_json_value(value: object) -> Any:
    """``value`` as plain JSON types: Decimal, dates, UUIDs and enums become strings; floats are refused."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        raise TypeError(
            "a float cannot be stored in the state database (money is Decimal); pass a Decimal or a str"
        )
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, dt.date | dt.time):  # datetime is a date
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return to_json_value(value.value)
    if isinstance(value, BaseModel):
        return to_json_value(value.model_dump(mode="python"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json_value({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"JSON object keys must be str, not {type(key).__name__}")
            out[key] = to_json_value(item)
        return out
    if isinstance(value, list | tuple):
        return [to_json_value(item) for item in value]
    if isinstance(value, set | frozenset):
        return sorted((to_json_value(item) for item in value), key=repr)
    raise TypeError(f"a {type(value).__name__} cannot be stored in a JSON column")


class JSONValue(sa.TypeDecorator[Any]):
    """JSON that accepts Decimal/date values (stored as strings) and stores ``None`` as SQL NULL."""

    impl = sa.JSON(none_as_null=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else to_json_value(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return value


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class _StateModel(SQLModel, registry=registry()):
    """Base of the state tables, on a metadata of their own (not SQLModel's global one)."""


class RunRecord(_StateModel, table=True):
    __tablename__ = "runs"
    __table_args__ = (
        sa.CheckConstraint(_in("status", RUN_STATUSES), name="ck_runs_status"),
        sa.Index("ix_runs_pipeline_started_at", "pipeline", "started_at"),
    )

    id: str = Field(primary_key=True, sa_type=sa.String())
    pipeline: str = Field(sa_type=sa.String(), nullable=False)
    started_at: dt.datetime = Field(sa_type=UTCDateTime, nullable=False)
    finished_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime, nullable=True)
    status: str = Field(sa_type=sa.String(), nullable=False)
    counts: dict[str, int] = Field(default_factory=dict, sa_type=JSONValue, nullable=False)
    api_calls: dict[str, int] = Field(default_factory=dict, sa_type=JSONValue, nullable=False)
    error: str | None = Field(default=None, sa_type=sa.Text(), nullable=True)
    pid: int | None = Field(default=None, sa_type=sa.Integer(), nullable=True)
    host: str | None = Field(default=None, sa_type=sa.String(), nullable=True)
    job: str = Field(default="sync", sa_type=sa.String(), nullable=False, sa_column_kwargs={"server_default": "sync"})


class CursorRecord(_StateModel, table=True):
    __tablename__ = "cursors"

    pipeline: str = Field(primary_key=True, sa_type=sa.String())
    stream: str = Field(primary_key=True, sa_type=sa.String())
    value: dt.datetime = Field(sa_type=UTCDateTime, nullable=False)
    tiebreak: str = Field(default="", sa_type=sa.String(), nullable=False)
    updated_at: dt.datetime = Field(sa_type=UTCDateTime, nullable=False)


class LinkRecord(_StateModel, table=True):
    __tablename__ = "links"
    __table_args__ = (
        sa.UniqueConstraint("pipeline", "kind", "crm_id", name="uq_links_pipeline_kind_crm_id"),
        sa.CheckConstraint(_in("kind", LINK_KINDS), name="ck_links_kind"),
        sa.CheckConstraint("ledger_id <> ''", name="ck_links_ledger_id_not_empty"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=sa.Integer())
    pipeline: str = Field(sa_type=sa.String(), nullable=False)
    kind: str = Field(sa_type=sa.String(), nullable=False)
    crm_id: str = Field(sa_type=sa.String(), nullable=False)
    ledger_id: str = Field(sa_type=sa.String(), nullable=False)
    ledger_number: str | None = Field(default=None, sa_type=sa.String(), nullable=True)
    reference: str | None = Field(default=None, sa_type=sa.String(), nullable=True)
    fingerprint: str = Field(default="", sa_type=sa.String(), nullable=False)
    revision: int = Field(default=0, sa_type=sa.Integer(), nullable=False)
    created_at: dt.datetime = Field(sa_type=UTCDateTime, nullable=False)
    updated_at: dt.datetime = Field(sa_type=UTCDateTime, nullable=False)


class IntentRecord(_StateModel, table=True):
    __tablename__ = "intents"
    __table_args__ = (
        sa.UniqueConstraint(
            "pipeline", "kind", "crm_id", "revision", name="uq_intents_pipeline_kind_crm_id_revision"
        ),
        sa.UniqueConstraint("idempotency_key", name="uq_intents_idempotency_key"),
        sa.CheckConstraint(_in("kind", INTENT_KINDS), name="ck_intents_kind"),
        sa.CheckConstraint(_in("state", INTENT_STATES), name="ck_intents_state"),
        sa.CheckConstraint("idempotency_key <> ''", name="ck_intents_key_not_empty"),
        sa.Index("ix_intents_pipeline_kind_state", "pipeline", "kind", "state"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=sa.Integer())
    pipeline: str = Field(sa_type=sa.String(), nullable=False)
    kind: str = Field(sa_type=sa.String(), nullable=False)
    crm_id: str = Field(sa_type=sa.String(), nullable=False)
    revision: int = Field(sa_type=sa.Integer(), nullable=False)
    idempotency_key: str = Field(sa_type=sa.String(), nullable=False)
    reference: str = Field(sa_type=sa.String(), nullable=False)
    state: str = Field(default="pending", sa_type=sa.String(), nullable=False)
    attempts: int = Field(default=0, sa_type=sa.Integer(), nullable=False)
    request_fingerprint: str = Field(sa_type=sa.String(), nullable=False)
    ledger_id: str | None = Field(default=None, sa_type=sa.String(), nullable=True)
    error: str | None = Field(default=None, sa_type=sa.Text(), nullable=True)
    created_at: dt.datetime = Field(sa_type=UTCDateTime, nullable=False)
    updated_at: dt.datetime = Field(sa_type=UTCDateTime, nullable=False)


class FlagRecord(_StateModel, table=True):
    __tablename__ = "flags"

    pipeline: str = Field(primary_key=True, sa_type=sa.String())
    crm_id: str = Field(primary_key=True, sa_type=sa.String())
    reason: str = Field(sa_type=sa.String(), nullable=False)
    detail: str = Field(default="", sa_type=sa.Text(), nullable=False)
    first_seen: dt.datetime = Field(sa_type=UTCDateTime, nullable=False)
    last_seen: dt.datetime = Field(sa_type=UTCDateTime, nullable=False)
    resolved_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime, nullable=True)


class AuditRecord(_StateModel, table=True):
    __tablename__ = "audit_events"
    __table_args__ = (
        sa.CheckConstraint(_in("location", AUDIT_LOCATIONS), name="ck_audit_events_location"),
        sa.Index("ix_audit_events_pipeline_id", "pipeline", "id"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=sa.Integer())
    at: dt.datetime = Field(sa_type=UTCDateTime, nullable=False)
    pipeline: str = Field(sa_type=sa.String(), nullable=False)
    run_id: str | None = Field(default=None, sa_type=sa.String(), nullable=True)
    action: str = Field(sa_type=sa.String(), nullable=False)
    object_kind: str = Field(sa_type=sa.String(), nullable=False)
    object_id: str = Field(sa_type=sa.String(), nullable=False)
    location: str = Field(sa_type=sa.String(), nullable=False)
    before: dict[str, Any] | None = Field(default=None, sa_type=JSONValue, nullable=True)
    after: dict[str, Any] | None = Field(default=None, sa_type=JSONValue, nullable=True)


class TokenRecord(_StateModel, table=True):
    __tablename__ = "oauth_tokens"

    connection: str = Field(primary_key=True, sa_type=sa.String())
    ciphertext: str = Field(sa_type=sa.Text(), nullable=False)  # Fernet token (sync.crypto)
    generation: int = Field(default=0, sa_type=sa.Integer(), nullable=False)
    updated_at: dt.datetime = Field(sa_type=UTCDateTime, nullable=False)


class DecimalText(sa.TypeDecorator[Decimal]):
    """An exact decimal stored as its text (no binary float on any database); floats are refused."""

    impl = sa.String()
    cache_ok = True

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        if not isinstance(value, Decimal):
            raise TypeError(f"a {type(value).__name__} cannot be stored as a decimal; pass a Decimal")
        return str(value)

    def process_result_value(self, value: str | None, dialect: Dialect) -> Decimal | None:
        return None if value is None else Decimal(value)


class LedgerInvoiceRecord(_StateModel, table=True):
    """A sales invoice as last read from the ledger (every invoice of the organisation, not only ours)."""

    __tablename__ = "ledger_invoices"
    __table_args__ = (sa.Index("ix_ledger_invoices_pipeline_customer", "pipeline", "customer_ledger_id"),)

    pipeline: str = Field(primary_key=True, sa_type=sa.String())
    ledger_id: str = Field(primary_key=True, sa_type=sa.String())
    number: str | None = Field(default=None, sa_type=sa.String(), nullable=True)
    reference: str | None = Field(default=None, sa_type=sa.String(), nullable=True)
    customer_ledger_id: str | None = Field(default=None, sa_type=sa.String(), nullable=True)
    currency: str = Field(sa_type=sa.String(), nullable=False)
    issue_date: dt.date = Field(sa_type=sa.Date(), nullable=False)
    due_date: dt.date | None = Field(default=None, sa_type=sa.Date(), nullable=True)
    status: str = Field(sa_type=sa.String(), nullable=False)
    subtotal: Decimal = Field(sa_type=DecimalText, nullable=False)
    total: Decimal = Field(sa_type=DecimalText, nullable=False)
    amount_paid: Decimal | None = Field(default=None, sa_type=DecimalText, nullable=True)
    amount_due: Decimal | None = Field(default=None, sa_type=DecimalText, nullable=True)
    exchange_rate: Decimal | None = Field(default=None, sa_type=DecimalText, nullable=True)
    lines: list[Any] = Field(default_factory=list, sa_type=JSONValue, nullable=False)
    url: str | None = Field(default=None, sa_type=sa.String(), nullable=True)
    updated_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime, nullable=True)
    pulled_at: dt.datetime = Field(sa_type=UTCDateTime, nullable=False)


class LedgerCreditNoteRecord(_StateModel, table=True):
    __tablename__ = "ledger_credit_notes"

    pipeline: str = Field(primary_key=True, sa_type=sa.String())
    ledger_id: str = Field(primary_key=True, sa_type=sa.String())
    number: str | None = Field(default=None, sa_type=sa.String(), nullable=True)
    customer_ledger_id: str | None = Field(default=None, sa_type=sa.String(), nullable=True)
    currency: str = Field(sa_type=sa.String(), nullable=False)
    issue_date: dt.date = Field(sa_type=sa.Date(), nullable=False)
    status: str = Field(sa_type=sa.String(), nullable=False)
    subtotal: Decimal = Field(sa_type=DecimalText, nullable=False)
    total: Decimal = Field(sa_type=DecimalText, nullable=False)
    remaining: Decimal = Field(sa_type=DecimalText, nullable=False)
    credited_invoice_id: str | None = Field(default=None, sa_type=sa.String(), nullable=True)
    allocations: list[Any] = Field(default_factory=list, sa_type=JSONValue, nullable=False)
    exchange_rate: Decimal | None = Field(default=None, sa_type=DecimalText, nullable=True)
    updated_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime, nullable=True)
    pulled_at: dt.datetime = Field(sa_type=UTCDateTime, nullable=False)


class LedgerPaymentRecord(_StateModel, table=True):
    __tablename__ = "ledger_payments"

    pipeline: str = Field(primary_key=True, sa_type=sa.String())
    ledger_id: str = Field(primary_key=True, sa_type=sa.String())
    invoice_ledger_id: str = Field(sa_type=sa.String(), nullable=False)
    amount: Decimal = Field(sa_type=DecimalText, nullable=False)
    currency: str = Field(sa_type=sa.String(), nullable=False)
    date: dt.date = Field(sa_type=sa.Date(), nullable=False)
    status: str = Field(sa_type=sa.String(), nullable=False)
    updated_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime, nullable=True)
    pulled_at: dt.datetime = Field(sa_type=UTCDateTime, nullable=False)


class CrmDealRecord(_StateModel, table=True):
    """The last state of every deal the sync pulled (open, won and lost), for the forecast and CAC."""

    __tablename__ = "crm_deals"

    pipeline: str = Field(primary_key=True, sa_type=sa.String())
    deal_id: str = Field(primary_key=True, sa_type=sa.String())
    customer_id: str | None = Field(default=None, sa_type=sa.String(), nullable=True)
    name: str = Field(default="", sa_type=sa.String(), nullable=False)
    amount: Decimal | None = Field(default=None, sa_type=DecimalText, nullable=True)
    currency: str = Field(sa_type=sa.String(), nullable=False)
    stage: str | None = Field(default=None, sa_type=sa.String(), nullable=True)
    probability: Decimal | None = Field(default=None, sa_type=DecimalText, nullable=True)
    is_won: bool = Field(default=False, sa_type=sa.Boolean(), nullable=False)
    is_closed: bool = Field(default=False, sa_type=sa.Boolean(), nullable=False)
    archived: bool = Field(default=False, sa_type=sa.Boolean(), nullable=False)
    close_date: dt.date | None = Field(default=None, sa_type=sa.Date(), nullable=True)
    created_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime, nullable=True)
    acquisition_source: str | None = Field(default=None, sa_type=sa.String(), nullable=True)
    owner: str | None = Field(default=None, sa_type=sa.String(), nullable=True)
    updated_at: dt.datetime = Field(sa_type=UTCDateTime, nullable=False)


class CrmCustomerRecord(_StateModel, table=True):
    __tablename__ = "crm_customers"

    pipeline: str = Field(primary_key=True, sa_type=sa.String())
    customer_id: str = Field(primary_key=True, sa_type=sa.String())
    name: str = Field(sa_type=sa.String(), nullable=False)
    acquisition_source: str | None = Field(default=None, sa_type=sa.String(), nullable=True)
    created_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime, nullable=True)
    updated_at: dt.datetime | None = Field(default=None, sa_type=UTCDateTime, nullable=True)


class FieldValueRecord(_StateModel, table=True):
    """The value last written to a CRM field, so a write-back sends only what changed."""

    __tablename__ = "field_values"

    pipeline: str = Field(primary_key=True, sa_type=sa.String())
    object_type: str = Field(primary_key=True, sa_type=sa.String())
    object_id: str = Field(primary_key=True, sa_type=sa.String())
    field: str = Field(primary_key=True, sa_type=sa.String())
    value: str | None = Field(default=None, sa_type=sa.Text(), nullable=True)
    written_at: dt.datetime = Field(sa_type=UTCDateTime, nullable=False)


class ForecastSnapshotRecord(_StateModel, table=True):
    """The weighted forecast of a month as it stood when the month began (first metrics run of the month)."""

    __tablename__ = "forecast_snapshots"

    pipeline: str = Field(primary_key=True, sa_type=sa.String())
    month: str = Field(primary_key=True, sa_type=sa.String())  # YYYY-MM
    currency: str = Field(sa_type=sa.String(), nullable=False)
    weighted: Decimal = Field(sa_type=DecimalText, nullable=False)
    taken_at: dt.datetime = Field(sa_type=UTCDateTime, nullable=False)


class JobLeaseRecord(_StateModel, table=True):
    """Who runs a (pipeline, job) now: a lease that expires unless its holder renews it."""

    __tablename__ = "job_leases"

    name: str = Field(primary_key=True, sa_type=sa.String())
    owner: str = Field(sa_type=sa.String(), nullable=False)
    token: int = Field(default=0, sa_type=sa.Integer(), nullable=False)
    acquired_at: dt.datetime = Field(sa_type=UTCDateTime, nullable=False)
    expires_at: dt.datetime = Field(sa_type=UTCDateTime, nullable=False)


class WebhookEventRecord(_StateModel, table=True):
    """A verified webhook event, kept so that a redelivery is recognised and processed once."""

    __tablename__ = "webhook_events"

    source: str = Field(primary_key=True, sa_type=sa.String())
    event_id: str = Field(primary_key=True, sa_type=sa.String())
    pipeline: str | None = Field(default=None, sa_type=sa.String(), nullable=True)
    received_at: dt.datetime = Field(sa_type=UTCDateTime, nullable=False)


#: The metadata of the state tables (the target of the Alembic migrations).
METADATA: sa.MetaData = _StateModel.metadata
RUNS = METADATA.tables["runs"]
CURSORS = METADATA.tables["cursors"]
LINKS = METADATA.tables["links"]
INTENTS = METADATA.tables["intents"]
FLAGS = METADATA.tables["flags"]
AUDIT = METADATA.tables["audit_events"]
TOKENS = METADATA.tables["oauth_tokens"]
LEDGER_INVOICES = METADATA.tables["ledger_invoices"]
LEDGER_CREDIT_NOTES = METADATA.tables["ledger_credit_notes"]
LEDGER_PAYMENTS = METADATA.tables["ledger_payments"]
CRM_DEALS = METADATA.tables["crm_deals"]
CRM_CUSTOMERS = METADATA.tables["crm_customers"]
FIELD_VALUES = METADATA.tables["field_values"]
FORECAST_SNAPSHOTS = METADATA.tables["forecast_snapshots"]
JOB_LEASES = METADATA.tables["job_leases"]
WEBHOOK_EVENTS = METADATA.tables["webhook_events"]


# --------------------------------------------------------------------------------------------------
# Data in and rows out
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinkData:
    """A CRM object's counterpart in the ledger, to save with :meth:`StateStore.save_links`.

    ``kind`` may be left out: :meth:`StateStore.save_links` takes it as an argument (and checks it when set).
    """

    crm_id: str
    ledger_id: str
    ledger_number: str | None = None
    reference: str | None = None
    fingerprint: str = ""
    revision: int = 0
    kind: str | None = None


@dataclasses.dataclass(frozen=True)
class IntentData:
    """A ledger write about to be made; committed before the call (:meth:`StateStore.add_intents`)."""

    pipeline: str
    kind: str
    crm_id: str
    revision: int
    idempotency_key: str
    reference: str
    request_fingerprint: str


@dataclasses.dataclass(frozen=True)
class Confirmed:
    """An intent the ledger carried out (or that a lookup found done) and the object it created.

    ``action`` names the audit event; it defaults to ``invoice.created`` / ``customer.created`` after the
    intent's kind (pass e.g. ``intent.adopted`` when a lookup resolved an ambiguous write).
    """

    key: str
    crm_id: str
    ledger_id: str
    ledger_number: str | None
    reference: str
    fingerprint: str
    revision: int
    action: str | None = None


@dataclasses.dataclass(frozen=True)
class Failed:
    """An intent the ledger definitively rejected."""

    key: str
    crm_id: str
    error: str
    action: str | None = None


@dataclasses.dataclass(frozen=True)
class AuditData:
    """One audit event. ``pipeline``/``run_id`` may be left out where the call supplies them."""

    action: str
    object_kind: str
    object_id: str
    location: str
    before: Mapping[str, Any] | None = None
    after: Mapping[str, Any] | None = None
    pipeline: str | None = None
    run_id: str | None = None
    at: dt.datetime | None = None


@dataclasses.dataclass(frozen=True)
class RunRow:
    id: str
    pipeline: str
    started_at: dt.datetime
    finished_at: dt.datetime | None
    status: str
    counts: Mapping[str, int]
    api_calls: Mapping[str, int]
    error: str | None
    pid: int | None
    host: str | None
    job: str = "sync"


@dataclasses.dataclass(frozen=True)
class LinkRow:
    id: int
    pipeline: str
    kind: str
    crm_id: str
    ledger_id: str
    ledger_number: str | None
    reference: str | None
    fingerprint: str
    revision: int
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class IntentRow:
    id: int
    pipeline: str
    kind: str
    crm_id: str
    revision: int
    idempotency_key: str
    reference: str
    state: str
    attempts: int
    request_fingerprint: str
    ledger_id: str | None
    error: str | None
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class FlagRow:
    pipeline: str
    crm_id: str
    reason: str
    detail: str
    first_seen: dt.datetime
    last_seen: dt.datetime
    resolved_at: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class AuditRow:
    id: int
    at: dt.datetime
    pipeline: str
    run_id: str | None
    action: str
    object_kind: str
    object_id: str
    location: str
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None


def _row(cls: type[Any], m: RowMapping) -> Any:
    return cls(**{f.name: m[f.name] for f in dataclasses.fields(cls)})


def _run_row(m: RowMapping) -> RunRow:
    row: RunRow = _row(RunRow, m)
    return row


def _link_row(m: RowMapping) -> LinkRow:
    row: LinkRow = _row(LinkRow, m)
    return row


def _intent_row(m: RowMapping) -> IntentRow:
    row: IntentRow = _row(IntentRow, m)
    return row


def _flag_row(m: RowMapping) -> FlagRow:
    row: FlagRow = _row(FlagRow, m)
    return row


def _audit_row(m: RowMapping) -> AuditRow:
    row: AuditRow = _row(AuditRow, m)
    return row


def _link_snapshot(link: LinkRow) -> dict[str, Any]:
    return {
        "ledger_id": link.ledger_id,
        "ledger_number": link.ledger_number,
        "reference": link.reference,
        "fingerprint": link.fingerprint,
        "revision": link.revision,
    }


def _check(value: str, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")


def _chunks(items: Sequence[str], size: int = _CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


# --------------------------------------------------------------------------------------------------
# Engine and migrations
# --------------------------------------------------------------------------------------------------

_SQLITE_BEGIN_MODES = {"DEFERRED", "IMMEDIATE"}


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" hook (below) emit BEGIN, so that SELECTs and DDL are transactional too.
    dbapi_connection.isolation_level = None
    cur = dbapi_connection.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        _sqlite_enable_wal(cur)
        cur.execute("PRAGMA synchronous = FULL")
        cur.execute("PRAGMA foreign_keys = ON")
    finally:
        cur.close()


def _sqlite_enable_wal(cur: Any) -> None:
    # Switching a new database to WAL needs an exclusive lock, and SQLite answers "database is locked"
    # at once, without its busy handler, while another connection is doing the same: retry until it is.
    import sqlite3

    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            mode = str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower()
            if mode not in ("wal", "memory"):
                cur.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _sqlite_on_begin(conn: Connection) -> None:
    # Writers take the write lock up front (BEGIN IMMEDIATE): a deferred transaction that reads and then
    # writes can fail with SQLITE_BUSY without waiting when another writer committed in between.
    mode = str(conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")).upper()
    if mode not in _SQLITE_BEGIN_MODES:
        raise ValueError(f"unknown SQLite BEGIN mode {mode!r}")
    conn.exec_driver_sql(f"BEGIN {mode}")


def alembic_config() -> AlembicConfig:
    """An Alembic ``Config`` for the state migrations, built in code (no ``alembic.ini`` needed)."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(__file__).resolve().parent / "migrations"))
    return cfg


# --------------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------------


class _DbTokenStore(TokenStore):
    """The :class:`~connectors.interfaces.TokenStore` view of a :class:`StateStore`."""

    def __init__(self, store: StateStore) -> None:
        self._store = store

    def load(self, connection: str) -> dict[str, Any] | None:
        return self._store.load_token(connection)

    def save(self, connection: str, token: dict[str, Any]) -> None:
        self._store.save_token(connection, token)

    def lock(self, connection: str) -> AbstractContextManager[None]:
        return self._store.token_lock(connection)


class StateStore:
    """The sync state of every pipeline, in one SQLite or PostgreSQL database."""

    def __init__(self, url: str, *, secret_key: str | None = None, key_file: Path | None = None) -> None:
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise ConfigError("state database URL is not a valid SQLAlchemy URL") from None
        backend = parsed.get_backend_name()
        self._db_path: Path | None = None
        if backend == "sqlite":
            database = parsed.database or ""
            if database and database != ":memory:" and not database.startswith("file:"):
                path = Path(database).expanduser().resolve()  # sqlite:///relative.db is relative to CWD
                path.parent.mkdir(parents=True, exist_ok=True)
                parsed = parsed.set(database=str(path))
                self._db_path = path
        elif backend == "postgresql":
            if parsed.drivername == "postgresql":
                parsed = parsed.set(drivername="postgresql+psycopg")
            if secret_key is None:
                raise ConfigError(
                    "a PostgreSQL state store needs secret_key (a Fernet key from the environment or a "
                    "secrets file) to encrypt OAuth tokens; key files are only used with SQLite"
                )
        else:
            raise ConfigError(f"state database must be sqlite or postgresql, not {backend!r}")

        if secret_key is None:
            if key_file is None and self._db_path is not None:
                key_file = self._db_path.with_name(self._db_path.name + ".key")
            if key_file is not None:
                secret_key = load_or_create_key_file(key_file)
            elif self._is_memory(parsed):
                secret_key = generate_key()  # the tokens die with the database anyway
            else:
                raise ConfigError("this SQLite URL names no plain file: give the state store a secret_key or key_file")
        self._cipher = TokenCipher(secret_key)
        self._url: URL = parsed
        self._is_pg = backend == "postgresql"
        self._engine = self._create_engine(parsed)
        self._local = threading.local()
        self._memory_locks: dict[str, threading.Lock] = {}
        self._memory_locks_guard = threading.Lock()

    # ---- lifecycle ------------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, secret_key: str | None = None) -> StateStore:
        """Open the store (SQLite keeps its key in ``<db>.key`` unless ``secret_key`` is given), migrated."""
        store = cls(url, secret_key=secret_key)
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
        return store

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StateStore({self._url.render_as_string(hide_password=True)!r})"

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for diagnostics and tests)."""
        return self._engine

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return "postgresql" if self._is_pg else "sqlite"

    def close(self) -> None:
        self._engine.dispose()

    @staticmethod
    def _is_memory(url: URL) -> bool:
        return url.get_backend_name() == "sqlite" and (not url.database or url.database == ":memory:")

    @classmethod
    def _create_engine(cls, url: URL) -> Engine:
        if url.get_backend_name() == "sqlite":
            kwargs: dict[str, Any] = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}}
            if cls._is_memory(url):
                # One shared connection, or every pooled connection would see its own empty database.
                kwargs = {"connect_args": {"check_same_thread": False}, "poolclass": StaticPool}
            engine = sa.create_engine(url, **kwargs)
            event.listen(engine, "connect", _sqlite_on_connect)
            event.listen(engine, "begin", _sqlite_on_begin)
            return engine
        return sa.create_engine(url, pool_pre_ping=True)

    def migrate(self) -> None:
        """Upgrade the schema to the head revision. Idempotent; concurrent callers wait for each other."""
        from alembic import command

        cfg = alembic_config()
        with self._engine.connect() as conn, conn.begin():
            # SQLite: the transaction is BEGIN IMMEDIATE, which already excludes other writers.
            if self._is_pg:
                conn.execute(
                    sa.text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                    {"key": "ledgerbridge.migrate:" + str(conn.scalar(sa.text("SELECT current_schema()")))},
                )
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def schema_revision(self) -> str | None:
        """The Alembic revision the database is at (None before the first migration)."""
        from alembic.runtime.migration import MigrationContext

        with self._read() as conn:
            ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            return ctx.get_current_revision()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._engine.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            conn.execution_options(sqlite_begin="DEFERRED")
            yield conn

    def _insert(self, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
        return postgresql.insert(table) if self._is_pg else sqlite.insert(table)

    # ---- runs -----------------------------------------------------------------------------------

    def start_run(self, pipeline: str, job: str = "sync") -> str:
        """Record a run of ``job`` (sync, ledger, metrics) as started; returns its id."""
        run_id = str(uuid.uuid4())
        with self._write() as conn:
            conn.execute(
                RUNS.insert().values(
                    id=run_id,
                    pipeline=pipeline,
                    started_at=_utcnow(),
                    status="running",
                    counts={},
                    api_calls={},
                    pid=os.getpid(),
                    host=socket.gethostname(),
                    job=job,
                )
            )
        return run_id

    def finish_run(
        self,
        run_id: str,
        status: str,
        counts: Mapping[str, int],
        api_calls: Mapping[str, int],
        error: str | None = None,
    ) -> None:
        """Close a run with its outcome, counters and API usage."""
        _check(status, RUN_STATUSES[1:], "run status")
        with self._write() as conn:
            result = conn.execute(
                RUNS.update()
                .where(RUNS.c.id == run_id)
                .values(
                    finished_at=_utcnow(),
                    status=status,
                    counts=to_json_value(counts),
                    api_calls=to_json_value(api_calls),
                    error=error,
                )
            )
            if result.rowcount != 1:
                raise StateError(f"unknown run {run_id!r}")

    def recent_runs(self, limit: int = 20, pipeline: str | None = None) -> list[RunRow]:
        """The latest runs, newest first."""
        stmt = sa.select(RUNS).order_by(RUNS.c.started_at.desc(), RUNS.c.id).limit(limit)
        if pipeline is not None:
            stmt = stmt.where(RUNS.c.pipeline == pipeline)
        with self._read() as conn:
            return [_run_row(m) for m in conn.execute(stmt).mappings()]

    # ---- cursors --------------------------------------------------------------------------------

    def get_cursor(self, pipeline: str, stream: str) -> Cursor | None:
        with self._read() as conn:
            m = (
                conn.execute(
                    sa.select(CURSORS.c.value, CURSORS.c.tiebreak).where(
                        CURSORS.c.pipeline == pipeline, CURSORS.c.stream == stream
                    )
                )
                .mappings()
                .first()
            )
        return None if m is None else Cursor(value=m["value"], tiebreak=m["tiebreak"])

    def set_cursor(self, pipeline: str, stream: str, cursor: Cursor) -> None:
        """Set a cursor on its own (rebuilds and manual resets; runs move it in record_outcomes)."""
        with self._write() as conn:
            self._upsert_cursor(conn, pipeline, stream, cursor)

    def _upsert_cursor(self, conn: Connection, pipeline: str, stream: str, cursor: Cursor) -> None:
        value = _as_utc(cursor.value, "cursor value")
        stmt = self._insert(CURSORS).values(
            pipeline=pipeline, stream=stream, value=value, tiebreak=cursor.tiebreak, updated_at=_utcnow()
        )
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[CURSORS.c.pipeline, CURSORS.c.stream],
                set_={
                    "value": stmt.excluded.value,
                    "tiebreak": stmt.excluded.tiebreak,
                    "updated_at": stmt.excluded.updated_at,
                },
            )
        )

    # ---- links ----------------------------------------------------------------------------------

    def links(self, pipeline: str, kind: str, crm_ids: Iterable[str] | None = None) -> dict[str, LinkRow]:
        """Links of ``kind`` by CRM id (all of the pipeline's when ``crm_ids`` is None)."""
        _check(kind, LINK_KINDS, "link kind")
        with self._read() as conn:
            return self._links(conn, pipeline, kind, crm_ids)

    def _links(
        self, conn: Connection, pipeline: str, kind: str, crm_ids: Iterable[str] | None
    ) -> dict[str, LinkRow]:
        base = sa.select(LINKS).where(LINKS.c.pipeline == pipeline, LINKS.c.kind == kind)
        if crm_ids is None:
            return {m["crm_id"]: _link_row(m) for m in conn.execute(base).mappings()}
        out: dict[str, LinkRow] = {}
        for chunk in _chunks(_unique(crm_ids)):
            for m in conn.execute(base.where(LINKS.c.crm_id.in_(chunk))).mappings():
                out[m["crm_id"]] = _link_row(m)
        return out

    def save_links(self, pipeline: str, kind: str, rows: Sequence[LinkData]) -> None:
        """Insert or update links (keyed by pipeline, kind and CRM id) in one transaction."""
        _check(kind, LINK_KINDS, "link kind")
        if not rows:
            return
        for r in rows:
            if r.kind is not None and r.kind != kind:
                raise ValueError(f"link for {r.crm_id!r} is a {r.kind!r} link, saved as {kind!r}")
        with self._write() as conn:
            self._upsert_links(conn, pipeline, kind, rows)

    def _upsert_links(self, conn: Connection, pipeline: str, kind: str, rows: Sequence[LinkData]) -> None:
        now = _utcnow()
        stmt = self._insert(LINKS)
        stmt = stmt.on_conflict_do_update(
            index_elements=[LINKS.c.pipeline, LINKS.c.kind, LINKS.c.crm_id],
            set_={
                "ledger_id": stmt.excluded.ledger_id,
                "ledger_number": stmt.excluded.ledger_number,
                "reference": stmt.excluded.reference,
                "fingerprint": stmt.excluded.fingerprint,
                "revision": stmt.excluded.revision,
                "updated_at": stmt.excluded.updated_at,
            },
        )
        conn.execute(
            stmt,
            [
                {
                    "pipeline": pipeline,
                    "kind": kind,
                    "crm_id": r.crm_id,
                    "ledger_id": r.ledger_id,
                    "ledger_number": r.ledger_number,
                    "reference": r.reference,
                    "fingerprint": r.fingerprint,
                    "revision": r.revision,
                    "created_at": now,
                    "updated_at": now,
                }
                for r in rows
            ],
        )

    def has_any_state(self, pipeline: str) -> bool:
        """Whether the pipeline has a cursor or a link (i.e. it has synced before)."""
        with self._read() as conn:
            for table in (CURSORS, LINKS):
                found = conn.execute(
                    sa.select(sa.literal(1)).select_from(table).where(table.c.pipeline == pipeline).limit(1)
                ).first()
                if found is not None:
                    return True
        return False

    # ---- intents --------------------------------------------------------------------------------

    def open_intents(
        self, pipeline: str, kind: str, states: Sequence[str] = ("pending", "sent")
    ) -> list[IntentRow]:
        """Intents of ``kind`` in ``states``, oldest first."""
        _check(kind, INTENT_KINDS, "intent kind")
        for state in states:
            _check(state, INTENT_STATES, "intent state")
        stmt = (
            sa.select(INTENTS)
            .where(INTENTS.c.pipeline == pipeline, INTENTS.c.kind == kind, INTENTS.c.state.in_(list(states)))
            .order_by(INTENTS.c.created_at, INTENTS.c.id)
        )
        with self._read() as conn:
            return [_intent_row(m) for m in conn.execute(stmt).mappings()]

    def intents_for(self, pipeline: str, kind: str, crm_ids: Iterable[str]) -> dict[str, IntentRow]:
        """The latest-revision intent of each CRM id that has one."""
        _check(kind, INTENT_KINDS, "intent kind")
        out: dict[str, IntentRow] = {}
        with self._read() as conn:
            for chunk in _chunks(_unique(crm_ids)):
                stmt = sa.select(INTENTS).where(
                    INTENTS.c.pipeline == pipeline, INTENTS.c.kind == kind, INTENTS.c.crm_id.in_(chunk)
                )
                for m in conn.execute(stmt).mappings():
                    row = _intent_row(m)
                    seen = out.get(row.crm_id)
                    if seen is None or row.revision > seen.revision:
                        out[row.crm_id] = row
        return out

    def add_intents(self, rows: Sequence[IntentData]) -> list[IntentRow]:
        """Commit intents before their writes; rows that exist already come back unchanged.

        Returns one row per input, in order. An idempotency key already used by another
        (pipeline, kind, crm_id, revision) raises :class:`StateError` and nothing is written.
        """
        if not rows:
            return []
        for r in rows:
            _check(r.kind, INTENT_KINDS, "intent kind")
        now = _utcnow()
        with self._write() as conn:
            conn.execute(
                self._insert(INTENTS).on_conflict_do_nothing(),
                [
                    {
                        "pipeline": r.pipeline,
                        "kind": r.kind,
                        "crm_id": r.crm_id,
                        "revision": r.revision,
                        "idempotency_key": r.idempotency_key,
                        "reference": r.reference,
                        "state": "pending",
                        "attempts": 0,
                        "request_fingerprint": r.request_fingerprint,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for r in rows
                ],
            )
            found: dict[tuple[str, str, str, int], IntentRow] = {}
            groups: dict[tuple[str, str], list[str]] = {}
            for r in rows:
                groups.setdefault((r.pipeline, r.kind), []).append(r.crm_id)
            for (pipeline, kind), crm_ids in groups.items():
                for chunk in _chunks(_unique(crm_ids)):
                    stmt = sa.select(INTENTS).where(
                        INTENTS.c.pipeline == pipeline, INTENTS.c.kind == kind, INTENTS.c.crm_id.in_(chunk)
                    )
                    for m in conn.execute(stmt).mappings():
                        row = _intent_row(m)
                        found[(row.pipeline, row.kind, row.crm_id, row.revision)] = row
            missing = [r for r in rows if (r.pipeline, r.kind, r.crm_id, r.revision) not in found]
            if missing:
                raise StateError(
                    f"idempotency key {missing[0].idempotency_key!r} of {missing[0].kind} intent for "
                    f"{missing[0].crm_id!r} revision {missing[0].revision} is already used by another intent"
                )
        return [found[(r.pipeline, r.kind, r.crm_id, r.revision)] for r in rows]

    def mark_intents(self, keys: Sequence[str], state: str, error: str | None = None) -> None:
        """Set the state (and error) of intents; ``sent`` also counts an attempt.

        All or nothing: an unknown key, or a confirmed intent asked to leave ``confirmed`` (its ledger
        object exists; moving it back could create a duplicate), raises :class:`StateError`.
        """
        _check(state, INTENT_STATES, "intent state")
        unique_keys = _unique(keys)
        if not unique_keys:
            return
        values: dict[str, Any] = {"state": state, "error": error, "updated_at": _utcnow()}
        if state == "sent":
            values["attempts"] = INTENTS.c.attempts + 1
        with self._write() as conn:
            current: dict[str, str] = {}
            for chunk in _chunks(unique_keys):
                stmt = sa.select(INTENTS.c.idempotency_key, INTENTS.c.state).where(
                    INTENTS.c.idempotency_key.in_(chunk)
                )
                current.update((k, st) for k, st in conn.execute(stmt.with_for_update()))
            unknown = [k for k in unique_keys if k not in current]
            if unknown:
                raise StateError(f"{len(unknown)} intent key(s) to mark are unknown, e.g. {unknown[0]!r}")
            if state != "confirmed":
                done = [k for k in unique_keys if current[k] == "confirmed"]
                if done:
                    raise StateError(
                        f"{len(done)} intent(s) are already confirmed and cannot become {state!r}, "
                        f"e.g. {done[0]!r}"
                    )
            for chunk in _chunks(unique_keys):
                conn.execute(INTENTS.update().where(INTENTS.c.idempotency_key.in_(chunk)).values(**values))

    def record_outcomes(
        self,
        pipeline: str,
        run_id: str,
        *,
        confirmed: Sequence[Confirmed],
        failed: Sequence[Failed],
        cursor: tuple[str, Cursor] | None = None,
        audits: Sequence[AuditData] = (),
    ) -> None:
        """Commit the outcome of a batch of writes, all or nothing.

        Each confirmed intent becomes ``confirmed`` with its ledger id, its link (kind ``deal`` for an
        invoice, ``customer`` for a customer) is upserted and an audit event written; each failed intent
        becomes ``failed`` with its error and an audit event; ``audits`` are written; then the cursor
        ``(stream, Cursor)`` moves. The store's own event for an outcome (``invoice.created``,
        ``invoice.failed``...) is left out when ``audits`` holds an event about the same object, so a caller
        can describe an outcome in its own words without doubling it. Any error (unknown key, confirmed
        intent reported failed, constraint violation, ...) rolls the whole batch back.
        """
        now = _utcnow()
        described = {(a.object_kind, a.object_id) for a in audits}
        keys = _unique([c.key for c in confirmed] + [f.key for f in failed])
        with self._write() as conn:
            intents: dict[str, IntentRow] = {}
            for chunk in _chunks(keys):
                stmt = sa.select(INTENTS).where(INTENTS.c.idempotency_key.in_(chunk))
                for m in conn.execute(stmt).mappings():
                    intents[m["idempotency_key"]] = _intent_row(m)
            outcomes: list[Confirmed | Failed] = [*confirmed, *failed]
            if len(keys) != len(outcomes):
                raise StateError("an intent key appears more than once in the outcomes of one batch")
            for outcome in outcomes:
                intent = intents.get(outcome.key)
                if intent is None or intent.pipeline != pipeline:
                    raise StateError(f"no intent with key {outcome.key!r} in pipeline {pipeline!r}")
                if intent.crm_id != outcome.crm_id:
                    raise StateError(f"intent {outcome.key!r} is for {intent.crm_id!r}, not {outcome.crm_id!r}")
                if isinstance(outcome, Confirmed) and intent.revision != outcome.revision:
                    raise StateError(
                        f"intent {outcome.key!r} is revision {intent.revision}, not {outcome.revision}"
                    )
                if isinstance(outcome, Failed) and intent.state == "confirmed":
                    raise StateError(
                        f"intent {outcome.key!r} is already confirmed (ledger id {intent.ledger_id!r}); "
                        "a confirmed write cannot become failed"
                    )

            events: list[AuditData] = []
            if confirmed:
                conn.execute(
                    INTENTS.update()
                    .where(INTENTS.c.idempotency_key == sa.bindparam("b_key"))
                    .values(state="confirmed", ledger_id=sa.bindparam("b_ledger_id"), error=None, updated_at=now),
                    [{"b_key": c.key, "b_ledger_id": c.ledger_id} for c in confirmed],
                )
                by_kind: dict[str, list[Confirmed]] = {}
                for c in confirmed:
                    by_kind.setdefault(_LINK_KIND_OF_INTENT[intents[c.key].kind], []).append(c)
                for link_kind, group in by_kind.items():
                    before = self._links(conn, pipeline, link_kind, [c.crm_id for c in group])
                    link_rows = [
                        LinkData(c.crm_id, c.ledger_id, c.ledger_number, c.reference, c.fingerprint, c.revision)
                        for c in group
                    ]
                    self._upsert_links(conn, pipeline, link_kind, link_rows)
                    for c, link in zip(group, link_rows, strict=True):
                        if (link_kind, c.crm_id) in described:
                            continue
                        previous = before.get(c.crm_id)
                        events.append(
                            AuditData(
                                action=c.action or f"{intents[c.key].kind}.created",
                                object_kind=link_kind,
                                object_id=c.crm_id,
                                location="ledger",
                                before=None if previous is None else _link_snapshot(previous),
                                after={
                                    **{k: v for k, v in dataclasses.asdict(link).items() if k != "kind"},
                                    "idempotency_key": c.key,
                                },
                            )
                        )
            if failed:
                conn.execute(
                    INTENTS.update()
                    .where(INTENTS.c.idempotency_key == sa.bindparam("b_key"))
                    .values(state="failed", error=sa.bindparam("b_error"), updated_at=now),
                    [{"b_key": f.key, "b_error": f.error} for f in failed],
                )
                for f in failed:
                    kind = intents[f.key].kind
                    if (_LINK_KIND_OF_INTENT[kind], f.crm_id) in described:
                        continue
                    events.append(
                        AuditData(
                            action=f.action or f"{kind}.failed",
                            object_kind=_LINK_KIND_OF_INTENT[kind],
                            object_id=f.crm_id,
                            location="ledger",
                            after={"error": f.error, "idempotency_key": f.key},
                        )
                    )
            events.extend(audits)
            self._insert_audits(conn, events, pipeline=pipeline, run_id=run_id, at=now)
            if cursor is not None:
                stream, value = cursor
                self._upsert_cursor(conn, pipeline, stream, value)

    # ---- flags ----------------------------------------------------------------------------------

    def flag(self, pipeline: str, run_id: str, crm_id: str, reason: str, detail: str) -> None:
        """Open (or refresh) the flag on a deal that cannot be invoiced.

        An audit event ``deal.flagged`` is written when the flag is new, reopened, or its reason or detail
        changed; re-flagging an unchanged open flag only moves ``last_seen``.
        """
        now = _utcnow()
        with self._write() as conn:
            m = (
                conn.execute(
                    sa.select(FLAGS)
                    .where(FLAGS.c.pipeline == pipeline, FLAGS.c.crm_id == crm_id)
                    .with_for_update()
                )
                .mappings()
                .first()
            )
            previous = None if m is None else _flag_row(m)
            stmt = self._insert(FLAGS).values(
                pipeline=pipeline,
                crm_id=crm_id,
                reason=reason,
                detail=detail,
                first_seen=now,
                last_seen=now,
                resolved_at=None,
            )
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[FLAGS.c.pipeline, FLAGS.c.crm_id],
                    set_={
                        "reason": stmt.excluded.reason,
                        "detail": stmt.excluded.detail,
                        "last_seen": stmt.excluded.last_seen,
                        "first_seen": sa.case(
                            (FLAGS.c.resolved_at.is_(None), FLAGS.c.first_seen),
                            else_=stmt.excluded.first_seen,
                        ),
                        "resolved_at": None,
                    },
                )
            )
            is_open = previous is not None and previous.resolved_at is None
            if not is_open or previous is None or (previous.reason, previous.detail) != (reason, detail):
                self._insert_audits(
                    conn,
                    [
                        AuditData(
                            action="deal.flagged",
                            object_kind="deal",
                            object_id=crm_id,
                            location="state",
                            before=(
                                {"reason": previous.reason, "detail": previous.detail}
                                if previous is not None and is_open
                                else None
                            ),
                            after={"reason": reason, "detail": detail},
                        )
                    ],
                    pipeline=pipeline,
                    run_id=run_id,
                    at=now,
                )

    def open_flags(self, pipeline: str) -> dict[str, FlagRow]:
        """The pipeline's unresolved flags by CRM id."""
        stmt = sa.select(FLAGS).where(FLAGS.c.pipeline == pipeline, FLAGS.c.resolved_at.is_(None))
        with self._read() as conn:
            return {m["crm_id"]: _flag_row(m) for m in conn.execute(stmt).mappings()}

    def resolve_flags(self, pipeline: str, crm_ids: Iterable[str]) -> None:
        """Close the open flags of these deals (each closed flag gets a ``deal.flag_resolved`` event)."""
        ids = _unique(crm_ids)
        if not ids:
            return
        now = _utcnow()
        with self._write() as conn:
            closed: list[FlagRow] = []
            for chunk in _chunks(ids):
                where = (FLAGS.c.pipeline == pipeline, FLAGS.c.crm_id.in_(chunk), FLAGS.c.resolved_at.is_(None))
                closed.extend(_flag_row(m) for m in conn.execute(sa.select(FLAGS).where(*where)).mappings())
                conn.execute(FLAGS.update().where(*where).values(resolved_at=now))
            self._insert_audits(
                conn,
                [
                    AuditData(
                        action="deal.flag_resolved",
                        object_kind="deal",
                        object_id=f.crm_id,
                        location="state",
                        before={"reason": f.reason, "detail": f.detail},
                    )
                    for f in closed
                ],
                pipeline=pipeline,
                run_id=None,
                at=now,
            )

    # ---- audit ----------------------------------------------------------------------------------

    def audit(self, events: Sequence[AuditData]) -> None:
        """Append audit events (each must name its pipeline)."""
        if not events:
            return
        with self._write() as conn:
            self._insert_audits(conn, events, pipeline=None, run_id=None, at=_utcnow())

    def _insert_audits(
        self,
        conn: Connection,
        events: Sequence[AuditData],
        *,
        pipeline: str | None,
        run_id: str | None,
        at: dt.datetime,
    ) -> None:
        if not events:
            return
        rows: list[dict[str, Any]] = []
        for e in events:
            _check(e.location, AUDIT_LOCATIONS, "audit location")
            event_pipeline = e.pipeline or pipeline
            if not event_pipeline:
                raise ValueError(f"audit event {e.action!r} names no pipeline")
            rows.append(
                {
                    "at": at if e.at is None else _as_utc(e.at, "audit time"),
                    "pipeline": event_pipeline,
                    "run_id": e.run_id or run_id,
                    "action": e.action,
                    "object_kind": e.object_kind,
                    "object_id": e.object_id,
                    "location": e.location,
                    # Converted here, not only in the column type, so a bad value raises a plain TypeError.
                    "before": None if e.before is None else to_json_value(e.before),
                    "after": None if e.after is None else to_json_value(e.after),
                }
            )
        conn.execute(AUDIT.insert(), rows)

    def audit_events(self, pipeline: str | None = None, limit: int = 100) -> list[AuditRow]:
        """The latest audit events, newest first."""
        stmt = sa.select(AUDIT).order_by(AUDIT.c.id.desc()).limit(limit)
        if pipeline is not None:
            stmt = stmt.where(AUDIT.c.pipeline == pipeline)
        with self._read() as conn:
            return [_audit_row(m) for m in conn.execute(stmt).mappings()]

    # ---- OAuth tokens ---------------------------------------------------------------------------

    def token_store(self) -> TokenStore:
        """The :class:`~connectors.interfaces.TokenStore` that connectors keep rotating tokens in."""
        return _DbTokenStore(self)

    def _held(self) -> set[str]:
        held: set[str] | None = getattr(self._local, "held", None)
        if held is None:
            held = set()
            self._local.held = held
        return held

    def load_token(self, connection: str) -> dict[str, Any] | None:
        """The decrypted token of ``connection`` (None when none was saved)."""
        with self._read() as conn:
            ciphertext = conn.execute(
                sa.select(TOKENS.c.ciphertext).where(TOKENS.c.connection == connection)
            ).scalar()
        return None if ciphertext is None else self._cipher.decrypt(connection, ciphertext)

    def token_generation(self, connection: str) -> int:
        """How many times the token of ``connection`` was saved (0 if never); tells a lost refresh race."""
        with self._read() as conn:
            generation = conn.execute(
                sa.select(TOKENS.c.generation).where(TOKENS.c.connection == connection)
            ).scalar()
        return 0 if generation is None else int(generation)

    def save_token(self, connection: str, token: dict[str, Any]) -> None:
        """Encrypt and commit ``token`` (durable when this returns); bumps the row's generation."""
        ciphertext = self._cipher.encrypt(connection, token)
        with self._write() as conn:
            stmt = self._insert(TOKENS).values(
                connection=connection, ciphertext=ciphertext, generation=1, updated_at=_utcnow()
            )
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[TOKENS.c.connection],
                    set_={
                        "ciphertext": stmt.excluded.ciphertext,
                        "generation": TOKENS.c.generation + 1,
                        "updated_at": stmt.excluded.updated_at,
                    },
                )
            )

    @contextmanager
    def token_lock(self, connection: str) -> Iterator[None]:
        """Hold the refresh lock of ``connection`` against other threads, processes and replicas.

        PostgreSQL: a transaction-level advisory lock (``pg_advisory_xact_lock`` on the schema and the
        connection name) held by a transaction of its own for the whole block, so it survives PgBouncer
        transaction pooling and dies with a crashed holder. SQLite: an exclusive ``flock`` on a lock file
        beside the database (an in-process lock for an in-memory database). The lock is independent of
        the ``oauth_tokens`` row, so :meth:`save_token` inside the block commits at once from any thread.
        Reentrant in one thread. Re-reading the token once the lock is held is the caller's job.
        """
        held = self._held()
        if connection in held:
            yield
            return
        if self._is_pg:
            lock: contextlib.AbstractContextManager[None] = self._pg_lock(connection)
        elif self._db_path is not None:
            lock = self._file_lock(self._token_lock_path(connection))
        else:
            lock = self._memory_lock(connection)
        with lock:
            held.add(connection)
            try:
                yield
            finally:
                held.discard(connection)

    @contextmanager
    def _pg_lock(self, connection: str) -> Iterator[None]:
        with self._engine.connect() as conn, conn.begin():
            conn.execute(sa.text(f"SET LOCAL lock_timeout = '{int(TOKEN_LOCK_TIMEOUT_S * 1000)}ms'"))
            conn.execute(
                sa.text("SELECT pg_advisory_xact_lock(:space, hashtext(current_schema() || ':' || :name))"),
                {"space": _PG_TOKEN_LOCK_SPACE, "name": connection},
            )
            yield

    def _token_lock_path(self, connection: str) -> Path:
        assert self._db_path is not None
        digest = hashlib.sha256(connection.encode("utf-8")).hexdigest()[:16]
        return self._db_path.with_name(f"{self._db_path.name}.token-{digest}.lock")

    @staticmethod
    @contextmanager
    def _file_lock(path: Path) -> Iterator[None]:
        import fcntl

        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + TOKEN_LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StateError(
                            f"timed out after {TOKEN_LOCK_TIMEOUT_S:.0f} s waiting for the token lock {path.name}"
                        ) from None
                    time.sleep(0.02)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @contextmanager
    def _memory_lock(self, connection: str) -> Iterator[None]:
        with self._memory_locks_guard:
            lock = self._memory_locks.setdefault(connection, threading.Lock())
        if not lock.acquire(timeout=TOKEN_LOCK_TIMEOUT_S):
            raise StateError(f"timed out waiting for the token lock of {connection!r}")
        try:
            yield
        finally:
            lock.release()


    # ---- webhook events (the receiver's dedupe table) ---------------------------------------------

    #: How long a received webhook event is remembered; vendors stop retrying a delivery well before
    #: (Xero after 24 hours, HubSpot after 3 days).
    WEBHOOK_EVENT_RETENTION = dt.timedelta(days=7)

    def record_webhook_events(self, source: str, pipeline: str | None, event_ids: Sequence[str]) -> list[str]:
        """Remember verified webhook events; returns the ids seen for the first time, in their order.

        ``source`` names the sender and the endpoint (the receiver uses ``<vendor>:<pipeline>``). Each id is
        written with INSERT ... ON CONFLICT DO NOTHING in one transaction, so a redelivery, even one
        arriving at the same moment on another connection or replica, comes back as not new.
        """
        ids = _unique(event_ids)
        if not ids:
            return []
        now = _utcnow()
        new: list[str] = []
        with self._write() as conn:
            for event_id in ids:
                stmt = self._insert(WEBHOOK_EVENTS).values(
                    source=source, event_id=event_id, pipeline=pipeline, received_at=now
                ).on_conflict_do_nothing(index_elements=[WEBHOOK_EVENTS.c.source, WEBHOOK_EVENTS.c.event_id])
                if conn.execute(stmt).rowcount == 1:
                    new.append(event_id)
        return new

    def prune_webhook_events(self, older_than: dt.timedelta | None = None, *, now: dt.datetime | None = None) -> int:
        """Forget webhook events received more than ``older_than`` (default 7 days) ago; returns how many."""
        cutoff = (_utcnow() if now is None else _as_utc(now, "now")) - (older_than or self.WEBHOOK_EVENT_RETENTION)
        with self._write() as conn:
            return int(conn.execute(WEBHOOK_EVENTS.delete().where(WEBHOOK_EVENTS.c.received_at < cutoff)).rowcount)

    def webhook_event_count(self, source: str | None = None) -> int:
        """How many webhook events are remembered (of one source, or all)."""
        stmt = sa.select(sa.func.count()).select_from(WEBHOOK_EVENTS)
        if source is not None:
            stmt = stmt.where(WEBHOOK_EVENTS.c.source == source)
        with self._read() as conn:
            return int(conn.execute(stmt).scalar_one())
