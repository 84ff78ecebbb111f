"""devices: device types and devices

Revision ID: devices_0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "devices_0001"
down_revision = None
branch_labels = ("devices",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_types",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("capabilities", sa.JSON, nullable=False),
        sa.Column("telemetry_schema", sa.JSON, nullable=False),
        sa.Column("offline_timeout_s", sa.Float, nullable=False),
        sa.Column("expected_interval_s", sa.Float, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("type_name", sa.String(63), nullable=False),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("lifecycle", sa.String(20), nullable=False),
        sa.Column("capabilities", sa.JSON, nullable=False),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("offline_timeout_s", sa.Float, nullable=True),
        sa.Column("credential_hash", sa.String(200), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deregistered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("credentials_rotated_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_devices_type_name", "devices", ["type_name"])
    op.create_index("ix_devices_lifecycle", "devices", ["lifecycle"])
    op.create_index("ix_devices_name", "devices", ["name"])


def downgrade() -> None:
    op.drop_table("devices")
    op.drop_table("device_types")
