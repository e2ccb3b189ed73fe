"""Templates each host has (placement); sandbox metric samples; idempotency keys of creates.

Revision ID: 0003
Revises: 0002
Create Date: 2025-03-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: tuple[str, ...] | None = None
depends_on: str | None = None


def _ts(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "host_templates",
        sa.Column("host_id", sa.String(32), nullable=False),
        sa.Column("template_id", sa.String(128), nullable=False),
        sa.Column("build_id", sa.String(64), nullable=False),
        _ts("reported_at"),
        sa.PrimaryKeyConstraint("host_id", "template_id", name="pk_host_templates"),
        sa.ForeignKeyConstraint(
            ["host_id"], ["hosts.id"], name="fk_host_templates_host_id_hosts", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_host_templates_template_id", "host_templates", ["template_id"])
    op.create_table(
        "sandbox_metrics",
        sa.Column("sandbox_id", sa.String(64), nullable=False),
        _ts("sampled_at"),
        sa.Column("cpu_count", sa.Integer(), nullable=False),
        sa.Column("cpu_used_pct", sa.Float(), nullable=False),
        sa.Column("mem_used", sa.BigInteger(), nullable=False),
        sa.Column("mem_total", sa.BigInteger(), nullable=False),
        sa.Column("disk_used", sa.BigInteger(), nullable=False),
        sa.Column("disk_total", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("sandbox_id", "sampled_at", name="pk_sandbox_metrics"),
        sa.ForeignKeyConstraint(
            ["sandbox_id"],
            ["sandboxes.id"],
            name="fk_sandbox_metrics_sandbox_id_sandboxes",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_sandbox_metrics_sampled_at", "sandbox_metrics", ["sampled_at"])
    op.create_table(
        "idempotency_keys",
        sa.Column("team_id", sa.String(32), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("response", sa.JSON(), nullable=True),
        _ts("created_at"),
        _ts("expires_at"),
        sa.PrimaryKeyConstraint("team_id", "key", name="pk_idempotency_keys"),
        sa.ForeignKeyConstraint(
            ["team_id"],
            ["teams.id"],
            name="fk_idempotency_keys_team_id_teams",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_idempotency_keys_expires_at", "idempotency_keys", ["expires_at"])


def downgrade() -> None:
    op.drop_table("idempotency_keys")
    op.drop_table("sandbox_metrics")
    op.drop_table("host_templates")
