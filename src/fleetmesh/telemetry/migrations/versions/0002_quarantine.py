"""telemetry: the quarantine of refused device messages

Revision ID: telemetry_0002
Revises: telemetry_0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "telemetry_0002"
down_revision = "telemetry_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "telemetry_quarantine",
        sa.Column("id", sa.String(26), primary_key=True),
        sa.Column("message_key", sa.String(128), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("sequence", sa.BigInteger, nullable=True),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("errors", sa.JSON, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("payload_size", sa.Integer, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("quarantined_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("message_key", name="uq_telemetry_quarantine_message_key"),
    )
    op.create_index(
        "ix_telemetry_quarantine_device_id", "telemetry_quarantine", ["device_id", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_telemetry_quarantine_device_id", table_name="telemetry_quarantine")
    op.drop_table("telemetry_quarantine")
