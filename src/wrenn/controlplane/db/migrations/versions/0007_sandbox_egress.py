"""Sandboxes keep their egress lists (``sandboxes.egress_json``: ``{"allowOut", "denyOut"}``;
empty for sandboxes made before).

Revision ID: 0007
Revises: 0006
Create Date: 2025-04-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: tuple[str, ...] | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column(
        "sandboxes", sa.Column("egress_json", sa.Text(), nullable=False, server_default="{}")
    )


def downgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:
        batch.drop_column("egress_json")
