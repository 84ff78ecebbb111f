"""telemetry: device projection, points, batches, latest values, roll-ups

Revision ID: telemetry_0001
Revises:
Create Date: 2026-11-27

The points table is the hot path; its layout was measured on the 2-core dev machine
(shared with other work, so +-30 %): 10M rows, 1,000 devices x 5 metrics interleaved (the
worst case for a series index: every transaction touches every series), 5 points per
message, 20,000 rows per transaction; insert rate over the last 200k rows; the query is one
device, one metric, a one-hour range (1,000 rows) at 10M rows:

    store   layout                                       insert rows/s   query   size
    SQLite  rowid table, no index                           300,000    835 ms   836 MB
    SQLite  rowid table + index (device_id, metric, ts)      63,000    2.1 ms  1193 MB
    SQLite  WITHOUT ROWID, PK (device_id, metric, ts, id)    49,000    0.3 ms   878 MB
    PG      heap, COPY, no index                            917,000    683 ms   964 MB
    PG      heap, COPY + btree (device_id, metric, ts)      144,000    3.6 ms  1739 MB

At 2M rows the two SQLite layouts insert at the same rate (~40-60k rows/s), and with 100
points per message (fewer series per transaction) at ~80-100k rows/s. Any series-ordered
index costs 3-6x on inserts (DESIGN.md measured the same for ``(device_id, ts)``); without
one, a one-device query scans everything. The writer's batches grow with load, which is what
keeps the per-row cost of the index down.

Hence: SQLite ``WITHOUT ROWID`` with the primary key ``(device_id, metric, ts,
message_id)`` (one B-tree per row instead of table + index, covering range reads);
PostgreSQL a heap loaded with ``COPY`` plus a non-unique ``(device_id, metric, ts)``
B-tree (no unique index: idempotency is checked once per message in
``telemetry_batches``).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.schema import SchemaItem

revision = "telemetry_0001"
down_revision = None
branch_labels = ("telemetry",)
depends_on = None


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.create_table(
        "telemetry_device_types",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("telemetry_schema", sa.JSON, nullable=False),
        sa.Column("expected_interval_s", sa.Float, nullable=True),
        sa.Column("offline_timeout_s", sa.Float, nullable=True),
        sa.Column("transforms", sa.JSON, nullable=True),
        sa.Column("retention_days", sa.Float, nullable=True),
        sa.Column("rollup_days", sa.Float, nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "telemetry_devices",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("type_name", sa.String(63), nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deregistered_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_telemetry_devices_type_name", "telemetry_devices", ["type_name"])

    point_columns: list[SchemaItem] = [
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("metric", sa.String(128), nullable=False),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("value_num", sa.Double, nullable=True),
        sa.Column("value_text", sa.Text, nullable=True),
        sa.Column("value_bool", sa.Boolean, nullable=True),
        sa.Column("quality", sa.Float, nullable=False),
        sa.Column("message_id", sa.String(64), nullable=False),
    ]
    if sqlite:
        op.create_table(
            "telemetry_points",
            *point_columns,
            sa.PrimaryKeyConstraint(
                "device_id", "metric", "ts", "message_id", name="pk_telemetry_points"
            ),
            sqlite_with_rowid=False,
        )
    else:
        op.create_table("telemetry_points", *point_columns)
        op.create_index(
            "ix_telemetry_points_series", "telemetry_points", ["device_id", "metric", "ts"]
        )

    op.create_table(
        "telemetry_batches",
        sa.Column("message_id", sa.String(64), primary_key=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("first_ts", sa.BigInteger, nullable=False),
        sa.Column("last_ts", sa.BigInteger, nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "telemetry_latest",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("metric", sa.String(128), primary_key=True),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("value_num", sa.Double, nullable=True),
        sa.Column("value_text", sa.Text, nullable=True),
        sa.Column("value_bool", sa.Boolean, nullable=True),
        sa.Column("quality", sa.Float, nullable=False),
        sa.Column("message_id", sa.String(64), nullable=False),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "telemetry_rollups",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("metric", sa.String(128), primary_key=True),
        sa.Column("bucket", sa.BigInteger, primary_key=True),
        sa.Column("count", sa.BigInteger, nullable=False),
        sa.Column("sum", sa.Double, nullable=False),
        sa.Column("min", sa.Double, nullable=False),
        sa.Column("max", sa.Double, nullable=False),
        sa.Column("last_ts", sa.BigInteger, nullable=False),
        sa.Column("last_value", sa.Double, nullable=False),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    for table in (
        "telemetry_rollups",
        "telemetry_latest",
        "telemetry_batches",
        "telemetry_points",
        "telemetry_devices",
        "telemetry_device_types",
    ):
        op.drop_table(table)
