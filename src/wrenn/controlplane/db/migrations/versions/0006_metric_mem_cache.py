"""Sandbox metric samples keep the guest's page cache (``sandbox_metrics.mem_cache``; 0 in
samples taken before).

Revision ID: 0006
Revises: 0005
Create Date: 2025-04-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: tuple[str, ...] | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column(
        "sandbox_metrics",
        sa.Column("mem_cache", sa.BigInteger(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    with op.batch_alter_table("sandbox_metrics") as batch:
        batch.drop_column("mem_cache")
