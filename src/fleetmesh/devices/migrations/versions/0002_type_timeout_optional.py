"""devices: a device type's offline timeout is optional (none: the live platform default)

Revision ID: devices_0002
Revises: devices_0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "devices_0002"
down_revision = "devices_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("device_types") as batch:
        batch.alter_column("offline_timeout_s", existing_type=sa.Float, nullable=True)


def downgrade() -> None:
    op.execute("UPDATE device_types SET offline_timeout_s = 300 WHERE offline_timeout_s IS NULL")
    with op.batch_alter_table("device_types") as batch:
        batch.alter_column("offline_timeout_s", existing_type=sa.Float, nullable=False)
