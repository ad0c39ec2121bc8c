"""Ledger facts, CRM deal snapshots, written field values, forecast snapshots, job leases, webhook events.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 00:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("job", sa.String(), nullable=False, server_default="sync"))

    op.create_table(
        "ledger_invoices",
        sa.Column("pipeline", sa.String(), nullable=False),
        sa.Column("ledger_id", sa.String(), nullable=False),
        sa.Column("number", sa.String(), nullable=True),
        sa.Column("reference", sa.String(), nullable=True),
        sa.Column("customer_ledger_id", sa.String(), nullable=True),
        sa.Column("currency", sa.String(), nullable=False),
        sa.Column("issue_date", sa.Date(), nullable=False),
        sa.Column("due_date", sa.Date(), nullable=True),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("subtotal", sa.String(), nullable=False),
        sa.Column("total", sa.String(), nullable=False),
        sa.Column("amount_paid", sa.String(), nullable=True),
        sa.Column("amount_due", sa.String(), nullable=True),
        sa.Column("exchange_rate", sa.String(), nullable=True),
        sa.Column("lines", sa.JSON(), nullable=False),
        sa.Column("url", sa.String(), nullable=True),
        sa.Column("updated_at", _TS, nullable=True),
        sa.Column("pulled_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("pipeline", "ledger_id"),
    )
    op.create_index("ix_ledger_invoices_pipeline_customer", "ledger_invoices", ["pipeline", "customer_ledger_id"])

    op.create_table(
        "ledger_credit_notes",
        sa.Column("pipeline", sa.String(), nullable=False),
        sa.Column("ledger_id", sa.String(), nullable=False),
        sa.Column("number", sa.String(), nullable=True),
        sa.Column("customer_ledger_id", sa.String(), nullable=True),
        sa.Column("currency", sa.String(), nullable=False),
        sa.Column("issue_date", sa.Date(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("subtotal", sa.String(), nullable=False),
        sa.Column("total", sa.String(), nullable=False),
        sa.Column("remaining", sa.String(), nullable=False),
        sa.Column("credited_invoice_id", sa.String(), nullable=True),
        sa.Column("allocations", sa.JSON(), nullable=False),
        sa.Column("exchange_rate", sa.String(), nullable=True),
        sa.Column("updated_at", _TS, nullable=True),
        sa.Column("pulled_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("pipeline", "ledger_id"),
    )

    op.create_table(
        "ledger_payments",
        sa.Column("pipeline", sa.String(), nullable=False),
        sa.Column("ledger_id", sa.String(), nullable=False),
        sa.Column("invoice_ledger_id", sa.String(), nullable=False),
        sa.Column("amount", sa.String(), nullable=False),
        sa.Column("currency", sa.String(), nullable=False),
        sa.Column("date", sa.Date(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("updated_at", _TS, nullable=True),
        sa.Column("pulled_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("pipeline", "ledger_id"),
    )

    op.create_table(
        "crm_deals",
        sa.Column("pipeline", sa.String(), nullable=False),
        sa.Column("deal_id", sa.String(), nullable=False),
        sa.Column("customer_id", sa.String(), nullable=True),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("amount", sa.String(), nullable=True),
        sa.Column("currency", sa.String(), nullable=False),
        sa.Column("stage", sa.String(), nullable=True),
        sa.Column("probability", sa.String(), nullable=True),
        sa.Column("is_won", sa.Boolean(), nullable=False),
        sa.Column("is_closed", sa.Boolean(), nullable=False),
        sa.Column("archived", sa.Boolean(), nullable=False),
        sa.Column("close_date", sa.Date(), nullable=True),
        sa.Column("created_at", _TS, nullable=True),
        sa.Column("acquisition_source", sa.String(), nullable=True),
        sa.Column("owner", sa.String(), nullable=True),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("pipeline", "deal_id"),
    )

    op.create_table(
        "crm_customers",
        sa.Column("pipeline", sa.String(), nullable=False),
        sa.Column("customer_id", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("acquisition_source", sa.String(), nullable=True),
        sa.Column("created_at", _TS, nullable=True),
        sa.Column("updated_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("pipeline", "customer_id"),
    )

    op.create_table(
        "field_values",
        sa.Column("pipeline", sa.String(), nullable=False),
        sa.Column("object_type", sa.String(), nullable=False),
        sa.Column("object_id", sa.String(), nullable=False),
        sa.Column("field", sa.String(), nullable=False),
        sa.Column("value", sa.Text(), nullable=True),
        sa.Column("written_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("pipeline", "object_type", "object_id", "field"),
    )

    op.create_table(
        "forecast_snapshots",
        sa.Column("pipeline", sa.String(), nullable=False),
        sa.Column("month", sa.String(), nullable=False),
        sa.Column("currency", sa.String(), nullable=False),
        sa.Column("weighted", sa.String(), nullable=False),
        sa.Column("taken_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("pipeline", "month"),
    )

    op.create_table(
        "job_leases",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("owner", sa.String(), nullable=False),
        sa.Column("token", sa.Integer(), nullable=False),
        sa.Column("acquired_at", _TS, nullable=False),
        sa.Column("expires_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )

    op.create_table(
        "webhook_events",
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("event_id", sa.String(), nullable=False),
        sa.Column("pipeline", sa.String(), nullable=True),
        sa.Column("received_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("source", "event_id"),
    )


def downgrade() -> None:
    for table in ("webhook_events", "job_leases", "forecast_snapshots", "field_values", "crm_customers",
                  "crm_deals", "ledger_payments", "ledger_credit_notes"):
        op.drop_table(table)
    op.drop_index("ix_ledger_invoices_pipeline_customer", table_name="ledger_invoices")
    op.drop_table("ledger_invoices")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("job")
