"""status: device status, history, health checks, quality

Revision ID: status_0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "status_0001"
down_revision = None
branch_labels = ("status",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "status_device_types",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("offline_timeout_s", sa.Float, nullable=True),
        sa.Column("expected_interval_s", sa.Float, nullable=True),
    )
    op.create_table(
        "status_devices",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("type_name", sa.String(63), nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("cause", sa.String(20), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_update", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sequence", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("timeout_override_s", sa.Float, nullable=True),
        sa.Column("mqtt_connected", sa.Boolean, nullable=False),
        sa.Column("check_attempt", sa.Integer, nullable=False),
        sa.Column("next_check_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("quality_recent", sa.Float, nullable=True),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_status_devices_status_since", "status_devices", ["status", "since"])
    op.create_index("ix_status_devices_type_status", "status_devices", ["type_name", "status"])
    op.create_index(
        "ix_status_devices_status_quality", "status_devices", ["status", "quality_recent"]
    )
    op.create_table(
        "status_history",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("sequence", sa.Integer, primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("previous", sa.String(20), nullable=True),
        sa.Column("current", sa.String(20), nullable=False),
        sa.Column("cause", sa.String(20), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
    )
    op.create_index("ix_status_history_at", "status_history", ["at"])
    op.create_table(
        "status_health_checks",
        sa.Column("command_id", sa.String(26), primary_key=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(10), nullable=False),
    )
    op.create_index(
        "ix_status_health_checks_device_sent", "status_health_checks", ["device_id", "sent_at"]
    )
    op.create_table(
        "status_quality",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("bucket", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("points", sa.BigInteger, nullable=False),
        sa.Column("quality_sum", sa.Float, nullable=False),
    )
    op.create_table(
        "status_offsets",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("status_offsets")
    op.drop_table("status_quality")
    op.drop_table("status_health_checks")
    op.drop_table("status_history")
    op.drop_table("status_devices")
    op.drop_table("status_device_types")
