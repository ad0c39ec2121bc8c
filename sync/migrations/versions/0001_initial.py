"""Initial state schema: runs, cursors, links, intents, flags, audit events, OAuth tokens.

Revision ID: 0001
Revises:
Create Date: 2025-11-26 00:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("pipeline", sa.String(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("api_calls", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("host", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.CheckConstraint("status IN ('running', 'ok', 'partial', 'failed')", name="ck_runs_status"),
    )
    op.create_index("ix_runs_pipeline_started_at", "runs", ["pipeline", "started_at"])

    op.create_table(
        "cursors",
        sa.Column("pipeline", sa.String(), nullable=False),
        sa.Column("stream", sa.String(), nullable=False),
        sa.Column("value", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tiebreak", sa.String(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("pipeline", "stream"),
    )

    op.create_table(
        "links",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pipeline", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("crm_id", sa.String(), nullable=False),
        sa.Column("ledger_id", sa.String(), nullable=False),
        sa.Column("ledger_number", sa.String(), nullable=True),
        sa.Column("reference", sa.String(), nullable=True),
        sa.Column("fingerprint", sa.String(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("pipeline", "kind", "crm_id", name="uq_links_pipeline_kind_crm_id"),
        sa.CheckConstraint("kind IN ('deal', 'customer')", name="ck_links_kind"),
        sa.CheckConstraint("ledger_id <> ''", name="ck_links_ledger_id_not_empty"),
    )

    op.create_table(
        "intents",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pipeline", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("crm_id", sa.String(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(), nullable=False),
        sa.Column("reference", sa.String(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("request_fingerprint", sa.String(), nullable=False),
        sa.Column("ledger_id", sa.String(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "pipeline", "kind", "crm_id", "revision", name="uq_intents_pipeline_kind_crm_id_revision"
        ),
        sa.UniqueConstraint("idempotency_key", name="uq_intents_idempotency_key"),
        sa.CheckConstraint("kind IN ('invoice', 'customer')", name="ck_intents_kind"),
        sa.CheckConstraint("state IN ('pending', 'sent', 'confirmed', 'failed')", name="ck_intents_state"),
        sa.CheckConstraint("idempotency_key <> ''", name="ck_intents_key_not_empty"),
    )
    op.create_index("ix_intents_pipeline_kind_state", "intents", ["pipeline", "kind", "state"])

    op.create_table(
        "flags",
        sa.Column("pipeline", sa.String(), nullable=False),
        sa.Column("crm_id", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("pipeline", "crm_id"),
    )

    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("pipeline", sa.String(), nullable=False),
        sa.Column("run_id", sa.String(), nullable=True),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("object_kind", sa.String(), nullable=False),
        sa.Column("object_id", sa.String(), nullable=False),
        sa.Column("location", sa.String(), nullable=False),
        sa.Column("before", sa.JSON(), nullable=True),
        sa.Column("after", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.CheckConstraint("location IN ('crm', 'ledger', 'state')", name="ck_audit_events_location"),
    )
    op.create_index("ix_audit_events_pipeline_id", "audit_events", ["pipeline", "id"])

    op.create_table(
        "oauth_tokens",
        sa.Column("connection", sa.String(), nullable=False),
        sa.Column("ciphertext", sa.Text(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("connection"),
    )


def downgrade() -> None:
    op.drop_table("oauth_tokens")
    op.drop_index("ix_audit_events_pipeline_id", table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_table("flags")
    op.drop_index("ix_intents_pipeline_kind_state", table_name="intents")
    op.drop_table("intents")
    op.drop_table("links")
    op.drop_table("cursors")
    op.drop_index("ix_runs_pipeline_started_at", table_name="runs")
    op.drop_table("runs")
