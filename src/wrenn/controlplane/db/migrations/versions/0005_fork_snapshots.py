"""Snapshots taken for a fork (``POST /sandboxes/{id}/fork``): hidden from the API and deleted
once no sandbox started from them is left (``snapshots.for_fork``).

Revision ID: 0005
Revises: 0004
Create Date: 2025-04-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: tuple[str, ...] | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column(
        "snapshots",
        sa.Column("for_fork", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    # Which sandboxes still use a snapshot (the sweep of fork snapshots asks it).
    op.create_index("ix_sandboxes_snapshot_id", "sandboxes", ["snapshot_id"])


def downgrade() -> None:
    op.drop_index("ix_sandboxes_snapshot_id", "sandboxes")
    with op.batch_alter_table("snapshots") as batch:
        batch.drop_column("for_fork")
