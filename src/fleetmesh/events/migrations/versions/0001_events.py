"""events: contracts, subscriptions, delivery log and dead letters

Revision ID: events_0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "events_0001"
down_revision = None
branch_labels = ("events",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "event_contracts",
        sa.Column("event_type", sa.String(255), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("schema", sa.JSON, nullable=False),
        sa.Column("publisher", sa.String(200), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("compatibility", sa.String(32), nullable=False),
        sa.Column("builtin", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "event_subscriptions",
        sa.Column("id", sa.String(26), primary_key=True),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("types", sa.JSON, nullable=False),
        sa.Column("filters", sa.JSON, nullable=False),
        sa.Column("endpoint", sa.Text, nullable=False),
        sa.Column("secret", sa.String(200), nullable=False),
        sa.Column("timeout_s", sa.Float, nullable=False),
        sa.Column("retry", sa.JSON, nullable=True),
        sa.Column("ordered", sa.Boolean, nullable=False),
        sa.Column("batch_size", sa.Integer, nullable=False),
        sa.Column("max_in_flight", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "event_deliveries",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("subscription_id", sa.String(26), nullable=False),
        sa.Column("event_id", sa.String(255), nullable=False),
        sa.Column("event_type", sa.String(255), nullable=False),
        sa.Column("sequence", sa.BigInteger, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("http_status", sa.Integer, nullable=True),
        sa.Column("latency_ms", sa.Float, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(
        "ix_event_deliveries_subscription", "event_deliveries", ["subscription_id", "id"]
    )
    op.create_index("ix_event_deliveries_created_at", "event_deliveries", ["created_at"])
    op.create_table(
        "event_dead_letters",
        sa.Column("id", sa.String(26), primary_key=True),
        sa.Column("subscription_id", sa.String(26), nullable=False),
        sa.Column("event_id", sa.String(255), nullable=False),
        sa.Column("event_type", sa.String(255), nullable=False),
        sa.Column("sequence", sa.BigInteger, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("last_status", sa.Integer, nullable=True),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index(
        "ix_event_dead_letters_subscription", "event_dead_letters", ["subscription_id", "status"]
    )


def downgrade() -> None:
    op.drop_table("event_dead_letters")
    op.drop_table("event_deliveries")
    op.drop_table("event_subscriptions")
    op.drop_table("event_contracts")
