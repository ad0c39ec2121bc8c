"""Ledger facts and CRM snapshots in the state store: what the metrics are computed from.

- Ledger facts (:meth:`FactStore.record_ledger_page`): every sales invoice, credit note and payment of the
  ledger organisation as last read, upserted by ledger id together with the cursor that covers them, in
  one transaction, so a cursor never passes facts that are not stored.
- CRM snapshots (:meth:`FactStore.save_deals`): the last state of every deal the sync pulled (open, won,
  lost) and of the customers those deals carry; the forecast and CAC read them.
- Written field values (:meth:`FactStore.written_values` / :meth:`FactStore.record_written`): what was last
  written to each CRM field, so the write-back sends only values that changed.
- Forecast snapshots (:meth:`FactStore.snapshot_forecast`): the weighted forecast of a month as it stood
  at the month's first metrics run, the base of forecast accuracy.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from connectors.domain import CreditNote, Deal, Invoice, Payment
from connectors.interfaces import Cursor
from sync.state import (
    CRM_CUSTOMERS,
    CRM_DEALS,
    FIELD_VALUES,
    FORECAST_SNAPSHOTS,
    LEDGER_CREDIT_NOTES,
    LEDGER_INVOICES,
    LEDGER_PAYMENTS,
    StateStore,
    to_json_value,
)

__all__ = ["CrmCustomerRow", "CrmDealRow", "FactStore", "LedgerCreditRow", "LedgerInvoiceRow", "LedgerPaymentRow"]

_CHUNK = 500


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class LedgerInvoiceRow:
    ledger_id: str
    number: str | None
    reference: str | None
    customer_ledger_id: str | None
    currency: str
    issue_date: dt.date
    due_date: dt.date | None
    status: str
    subtotal: Decimal
    total: Decimal
    amount_paid: Decimal | None
    amount_due: Decimal | None
    exchange_rate: Decimal | None
    url: str | None
    updated_at: dt.datetime | None


@dataclass(frozen=True)
class LedgerCreditRow:
    ledger_id: str
    number: str | None
    customer_ledger_id: str | None
    currency: str
    issue_date: dt.date
    status: str
    subtotal: Decimal
    total: Decimal
    remaining: Decimal
    credited_invoice_id: str | None
    allocations: list[dict[str, Any]]
    exchange_rate: Decimal | None


@dataclass(frozen=True)
class LedgerPaymentRow:
    ledger_id: str
    invoice_ledger_id: str
    amount: Decimal
    currency: str
    date: dt.date
    status: str


@dataclass(frozen=True)
class CrmDealRow:
    deal_id: str
    customer_id: str | None
    name: str
    amount: Decimal | None
    currency: str
    stage: str | None
    probability: Decimal | None
    is_won: bool
    is_closed: bool
    archived: bool
    close_date: dt.date | None
    created_at: dt.datetime | None
    acquisition_source: str | None
    owner: str | None
    updated_at: dt.datetime


@dataclass(frozen=True)
class CrmCustomerRow:
    customer_id: str
    name: str
    acquisition_source: str | None
    created_at: dt.datetime | None


def _fields(cls: type[Any], m: Any) -> Any:
    return cls(**{k: m[k] for k in cls.__dataclass_fields__})


class FactStore:
    """The facts tables of one :class:`~sync.state.StateStore`."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    # ---- ledger facts ---------------------------------------------------------------------------

    def record_ledger_page(
        self,
        pipeline: str,
        *,
        invoices: Sequence[tuple[Invoice, str | None]] = (),
        credit_notes: Sequence[CreditNote] = (),
        payments: Sequence[Payment] = (),
        cursor: tuple[str, Cursor] | None = None,
    ) -> None:
        """Upsert facts (invoices come with their web URL) and move ``cursor`` past them, in one transaction."""
        now = _utcnow()
        with self.store._write() as conn:
            if invoices:
                self._upsert(conn, LEDGER_INVOICES, ["pipeline", "ledger_id"], [
                    {"pipeline": pipeline, "ledger_id": inv.ledger_id, "number": inv.number,
                     "reference": inv.reference or None, "customer_ledger_id": inv.customer_ledger_id,
                     "currency": inv.currency, "issue_date": inv.issue_date, "due_date": inv.due_date,
                     "status": inv.status, "subtotal": inv.subtotal,
                     "total": inv.ledger_total if inv.ledger_total is not None else inv.total,
                     "amount_paid": inv.amount_paid, "amount_due": inv.amount_due,
                     "exchange_rate": inv.exchange_rate,
                     "lines": to_json_value([ln.model_dump(mode="python") for ln in inv.lines]),
                     "url": url, "updated_at": inv.updated_at, "pulled_at": now}
                    for inv, url in invoices if inv.ledger_id
                ])
            if credit_notes:
                self._upsert(conn, LEDGER_CREDIT_NOTES, ["pipeline", "ledger_id"], [
                    {"pipeline": pipeline, "ledger_id": cn.ledger_id, "number": cn.number,
                     "customer_ledger_id": cn.customer_ledger_id, "currency": cn.currency,
                     "issue_date": cn.issue_date, "status": cn.status, "subtotal": cn.subtotal,
                     "total": cn.total, "remaining": cn.remaining, "credited_invoice_id": cn.credited_invoice_ledger_id,
                     "allocations": to_json_value([a.model_dump(mode="python") for a in cn.allocations]),
                     "exchange_rate": cn.exchange_rate, "updated_at": cn.updated_at, "pulled_at": now}
                    for cn in credit_notes
                ])
            if payments:
                self._upsert(conn, LEDGER_PAYMENTS, ["pipeline", "ledger_id"], [
                    {"pipeline": pipeline, "ledger_id": p.ledger_id, "invoice_ledger_id": p.invoice_ledger_id,
                     "amount": p.amount, "currency": p.currency, "date": p.date, "status": p.status,
                     "updated_at": p.updated_at, "pulled_at": now}
                    for p in payments
                ])
            if cursor is not None:
                self.store._upsert_cursor(conn, pipeline, cursor[0], cursor[1])

    def _upsert(self, conn: Connection, table: sa.Table, keys: list[str], rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        # One statement per chunk; the last version of a key in a chunk wins.
        for i in range(0, len(rows), _CHUNK):
            chunk = list({tuple(r[k] for k in keys): r for r in rows[i:i + _CHUNK]}.values())
            stmt = self.store._insert(table)
            stmt = stmt.on_conflict_do_update(
                index_elements=[table.c[k] for k in keys],
                set_={c.name: stmt.excluded[c.name] for c in table.columns if c.name not in keys},
            )
            conn.execute(stmt, chunk)

    def ledger_invoices(self, pipeline: str) -> list[LedgerInvoiceRow]:
        with self.store._read() as conn:
            rows = conn.execute(sa.select(LEDGER_INVOICES).where(LEDGER_INVOICES.c.pipeline == pipeline)
                                .order_by(LEDGER_INVOICES.c.ledger_id)).mappings()
            return [_fields(LedgerInvoiceRow, m) for m in rows]

    def ledger_credit_notes(self, pipeline: str) -> list[LedgerCreditRow]:
        with self.store._read() as conn:
            rows = conn.execute(sa.select(LEDGER_CREDIT_NOTES).where(LEDGER_CREDIT_NOTES.c.pipeline == pipeline)
                                .order_by(LEDGER_CREDIT_NOTES.c.ledger_id)).mappings()
            return [_fields(LedgerCreditRow, m) for m in rows]

    def ledger_payments(self, pipeline: str) -> list[LedgerPaymentRow]:
        with self.store._read() as conn:
            rows = conn.execute(sa.select(LEDGER_PAYMENTS).where(LEDGER_PAYMENTS.c.pipeline == pipeline)
                                .order_by(LEDGER_PAYMENTS.c.ledger_id)).mappings()
            return [_fields(LedgerPaymentRow, m) for m in rows]

    # ---- CRM snapshots --------------------------------------------------------------------------

    def save_deals(self, pipeline: str, deals: Iterable[Deal]) -> None:
        """Keep the latest state of ``deals`` and of the customers they carry (newer ``updated_at`` wins)."""
        deal_rows: list[dict[str, Any]] = []
        customer_rows: dict[str, dict[str, Any]] = {}
        for d in deals:
            deal_rows.append({
                "pipeline": pipeline, "deal_id": d.crm_id, "customer_id": d.customer.crm_id if d.customer else None,
                "name": d.name, "amount": d.amount, "currency": d.currency, "stage": d.stage,
                "probability": d.probability, "is_won": d.is_won, "is_closed": d.is_closed or d.is_won,
                "archived": d.archived, "close_date": d.close_date, "created_at": d.created_at,
                "acquisition_source": d.acquisition_source, "owner": d.owner, "updated_at": d.updated_at,
            })
            c = d.customer
            if c is not None:
                customer_rows[c.crm_id] = {
                    "pipeline": pipeline, "customer_id": c.crm_id, "name": c.name,
                    "acquisition_source": c.acquisition_source or d.acquisition_source,
                    "created_at": c.created_at, "updated_at": c.updated_at,
                }
        if not deal_rows:
            return
        with self.store._write() as conn:
            for i in range(0, len(deal_rows), _CHUNK):
                chunk = list({r["deal_id"]: r for r in deal_rows[i:i + _CHUNK]}.values())
                stmt = self.store._insert(CRM_DEALS)
                stmt = stmt.on_conflict_do_update(
                    index_elements=[CRM_DEALS.c.pipeline, CRM_DEALS.c.deal_id],
                    set_={c.name: stmt.excluded[c.name] for c in CRM_DEALS.columns
                          if c.name not in ("pipeline", "deal_id")},
                    where=CRM_DEALS.c.updated_at <= stmt.excluded.updated_at,
                )
                conn.execute(stmt, chunk)
            self._upsert(conn, CRM_CUSTOMERS, ["pipeline", "customer_id"], list(customer_rows.values()))

    def crm_deals(self, pipeline: str) -> list[CrmDealRow]:
        with self.store._read() as conn:
            rows = conn.execute(sa.select(CRM_DEALS).where(CRM_DEALS.c.pipeline == pipeline)
                                .order_by(CRM_DEALS.c.deal_id)).mappings()
            return [_fields(CrmDealRow, m) for m in rows]

    def crm_customers(self, pipeline: str) -> list[CrmCustomerRow]:
        with self.store._read() as conn:
            rows = conn.execute(sa.select(CRM_CUSTOMERS).where(CRM_CUSTOMERS.c.pipeline == pipeline)
                                .order_by(CRM_CUSTOMERS.c.customer_id)).mappings()
            return [_fields(CrmCustomerRow, m) for m in rows]

    # ---- written field values -------------------------------------------------------------------

    def written_values(self, pipeline: str, object_type: str) -> dict[tuple[str, str], str | None]:
        """(object id, field) -> the value last written, as text."""
        with self.store._read() as conn:
            rows = conn.execute(sa.select(FIELD_VALUES.c.object_id, FIELD_VALUES.c.field, FIELD_VALUES.c.value)
                                .where(FIELD_VALUES.c.pipeline == pipeline,
                                       FIELD_VALUES.c.object_type == object_type))
            return {(r.object_id, r.field): r.value for r in rows}

    def record_written(self, pipeline: str, object_type: str, values: Mapping[tuple[str, str], str | None]) -> None:
        now = _utcnow()
        with self.store._write() as conn:
            self._upsert(conn, FIELD_VALUES, ["pipeline", "object_type", "object_id", "field"], [
                {"pipeline": pipeline, "object_type": object_type, "object_id": oid, "field": f, "value": v,
                 "written_at": now}
                for (oid, f), v in values.items()
            ])

    def forget_written(self, pipeline: str) -> None:
        """Drop the record of written values (the next write-back sends every value again)."""
        with self.store._write() as conn:
            conn.execute(FIELD_VALUES.delete().where(FIELD_VALUES.c.pipeline == pipeline))

    # ---- forecast snapshots ---------------------------------------------------------------------

    def snapshot_forecast(self, pipeline: str, currency: str, forecast: Mapping[str, Decimal]) -> None:
        """Store the forecast of each month that has none yet (the first figure seen for a month is kept)."""
        if not forecast:
            return
        now = _utcnow()
        with self.store._write() as conn:
            stmt = self.store._insert(FORECAST_SNAPSHOTS).on_conflict_do_nothing(
                index_elements=[FORECAST_SNAPSHOTS.c.pipeline, FORECAST_SNAPSHOTS.c.month])
            conn.execute(stmt, [{"pipeline": pipeline, "month": m, "currency": currency, "weighted": v,
                                 "taken_at": now} for m, v in forecast.items()])

    def forecast_snapshots(self, pipeline: str) -> dict[str, Decimal]:
        with self.store._read() as conn:
            rows = conn.execute(sa.select(FORECAST_SNAPSHOTS.c.month, FORECAST_SNAPSHOTS.c.weighted)
                                .where(FORECAST_SNAPSHOTS.c.pipeline == pipeline))
            return {r.month: r.weighted for r in rows}
