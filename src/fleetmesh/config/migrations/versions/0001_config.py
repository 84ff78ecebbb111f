"""config: versioned configuration entries and their full history

Revision ID: config_0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "config_0001"
down_revision = None
branch_labels = ("config",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "config_entries",
        sa.Column("namespace", sa.String(63), primary_key=True),
        sa.Column("service", sa.String(63), primary_key=True),
        sa.Column("key", sa.String(128), primary_key=True),
        sa.Column("current_version", sa.Integer, nullable=False),
        sa.Column("schema_json", sa.Text, nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "config_versions",
        sa.Column("namespace", sa.String(63), primary_key=True),
        sa.Column("service", sa.String(63), primary_key=True),
        sa.Column("key", sa.String(128), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("value_json", sa.Text, nullable=True),
        sa.Column("author", sa.String(128), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("comment", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("config_versions")
    op.drop_table("config_entries")
