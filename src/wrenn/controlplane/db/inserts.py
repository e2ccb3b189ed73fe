"""Inserts that leave an existing row alone, on every backend we run on."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Insert, insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from wrenn.controlplane.db.tables import Base


def insert_ignoring_conflict(
    session: AsyncSession, table: type[Base], keys: Sequence[str]
) -> Insert:
    """``INSERT ... ON CONFLICT (keys) DO NOTHING``: a row another transaction inserted first
    stays as it is (the result's ``rowcount`` tells whether this one went in)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=list(keys))
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=list(keys))
    return insert(table)
