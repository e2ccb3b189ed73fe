"""Sandboxes' metadata as one JSON object on their row (``metadata_json``), filled in from
``sandbox_metadata`` for the sandboxes that exist.

Revision ID: 0004
Revises: 0003
Create Date: 2025-03-15
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: tuple[str, ...] | None = None
depends_on: str | None = None

_sandboxes = sa.table("sandboxes", sa.column("id", sa.String), sa.column("metadata_json", sa.Text))
_metadata = sa.table(
    "sandbox_metadata",
    sa.column("sandbox_id", sa.String),
    sa.column("key", sa.String),
    sa.column("value", sa.Text),
)


def upgrade() -> None:
    op.add_column(
        "sandboxes", sa.Column("metadata_json", sa.Text(), nullable=False, server_default="{}")
    )
    conn = op.get_bind()
    found: dict[str, dict[str, str]] = {}
    for sandbox_id, key, value in conn.execute(
        sa.select(_metadata.c.sandbox_id, _metadata.c.key, _metadata.c.value).order_by(
            _metadata.c.sandbox_id, _metadata.c.key
        )
    ):
        found.setdefault(str(sandbox_id), {})[str(key)] = str(value)
    for sandbox_id, metadata in found.items():
        conn.execute(
            sa.update(_sandboxes)
            .where(_sandboxes.c.id == sandbox_id)
            .values(metadata_json=json.dumps(metadata, ensure_ascii=False, separators=(",", ":")))
        )


def downgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:
        batch.drop_column("metadata_json")
