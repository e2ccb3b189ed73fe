"""Alembic environment for the control plane schema. The connection comes from the caller
(``wrenn.controlplane.db.migrate``) through ``config.attributes``; nothing here opens one."""

from __future__ import annotations

from alembic import context

from wrenn.controlplane.db.tables import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
