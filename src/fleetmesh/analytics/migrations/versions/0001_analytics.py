"""analytics: models, deployments, detector checkpoints, analyses, anomalies

Revision ID: analytics_0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "analytics_0001"
down_revision = None
branch_labels = ("analytics",)
depends_on = None


def _time(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "analytics_models",
        sa.Column("id", sa.String(26), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("algorithm", sa.String(64), nullable=False),
        sa.Column("parameters", sa.JSON, nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("training_device_id", sa.String(64), nullable=False),
        sa.Column("training_metric", sa.String(128), nullable=False),
        _time("training_from"),
        _time("training_to"),
        sa.Column("training_points", sa.BigInteger, nullable=False),
        sa.Column("training_summary", sa.JSON, nullable=True),
        sa.Column("evaluation", sa.JSON, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("progress", sa.Float, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("fitted_state", sa.JSON, nullable=True),
        _time("created_at"),
        _time("updated_at"),
        _time("completed_at", nullable=True),
        sa.UniqueConstraint("name", "version", name="uq_analytics_models_name_version"),
    )
    op.create_index("ix_analytics_models_status", "analytics_models", ["status"])
    op.create_table(
        "analytics_deployments",
        sa.Column("id", sa.String(26), primary_key=True),
        sa.Column("model_id", sa.String(26), nullable=False),
        sa.Column("metric", sa.String(128), nullable=False),
        sa.Column("device_ids", sa.JSON, nullable=True),
        sa.Column("device_type", sa.String(63), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        _time("created_at"),
        _time("undeployed_at", nullable=True),
    )
    op.create_index("ix_analytics_deployments_status", "analytics_deployments", ["status"])
    op.create_index("ix_analytics_deployments_model_id", "analytics_deployments", ["model_id"])
    op.create_table(
        "analytics_checkpoints",
        sa.Column("deployment_id", sa.String(26), primary_key=True),
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("state", sa.JSON, nullable=False),
        _time("last_ts", nullable=True),
        sa.Column("points", sa.BigInteger, nullable=False),
        _time("updated_at"),
    )
    op.create_table(
        "analytics_analyses",
        sa.Column("id", sa.String(26), primary_key=True),
        sa.Column("model_id", sa.String(26), nullable=False),
        sa.Column("input", sa.JSON, nullable=False),
        sa.Column("summary", sa.JSON, nullable=False),
        sa.Column("anomalies", sa.JSON, nullable=False),
        sa.Column("timing", sa.JSON, nullable=False),
        _time("created_at"),
    )
    op.create_table(
        "analytics_anomalies",
        sa.Column("id", sa.String(26), primary_key=True),
        sa.Column("source_key", sa.String(64), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("metric", sa.String(128), nullable=False),
        _time("ts"),
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("model_id", sa.String(26), nullable=False),
        sa.Column("deployment_id", sa.String(26), nullable=True),
        sa.Column("analysis_id", sa.String(26), nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        _time("detected_at"),
        sa.UniqueConstraint(
            "source_key", "device_id", "metric", "ts", name="uq_analytics_anomalies_source_point"
        ),
    )
    op.create_index("ix_analytics_anomalies_device_ts", "analytics_anomalies", ["device_id", "ts"])
    op.create_index("ix_analytics_anomalies_ts", "analytics_anomalies", ["ts"])
    op.create_table(
        "analytics_devices",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("type_name", sa.String(63), nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        _time("updated_at"),
    )
    op.create_table(
        "analytics_dead_letters",
        sa.Column("id", sa.String(26), primary_key=True),
        sa.Column("consumer", sa.String(100), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("stream_sequence", sa.BigInteger, nullable=False),
        sa.Column("deliveries", sa.Integer, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        _time("failed_at"),
    )


def downgrade() -> None:
    for table in (
        "analytics_dead_letters",
        "analytics_devices",
        "analytics_anomalies",
        "analytics_analyses",
        "analytics_checkpoints",
        "analytics_deployments",
        "analytics_models",
    ):
        op.drop_table(table)
