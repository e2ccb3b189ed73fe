"""Sandboxes keep their guest's address on its host (``sandboxes.guest_address``, as the agent
reports it at create and resume; empty for sandboxes made before), so the proxy can dial the
guest itself when it runs beside the agent.

Revision ID: 0008
Revises: 0007
Create Date: 2025-04-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: tuple[str, ...] | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column(
        "sandboxes",
        sa.Column("guest_address", sa.String(64), nullable=False, server_default=""),
    )


def downgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:
        batch.drop_column("guest_address")
