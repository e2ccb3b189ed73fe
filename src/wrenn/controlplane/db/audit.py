"""The audit log: one row per state-changing call (and per change the control plane makes on
its own), newest first when listed."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from wrenn.controlplane.db.records import AuditEntry, AuditQuery, Page
from wrenn.controlplane.db.tables import AuditLogRow


def _entry(row: AuditLogRow) -> AuditEntry:
    return AuditEntry(
        id=row.id,
        time=row.created_at,
        team_id=row.team_id,
        actor=row.actor,
        action=row.action,
        target_type=row.target_type,
        target_id=row.target_id,
        result=row.result,
        details=dict(row.details or {}),
    )


class AuditRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def record(
        self,
        *,
        action: str,
        target_type: str,
        target_id: str,
        result: str = "ok",
        team_id: str | None = None,
        actor: str | None = None,
        details: dict[str, Any] | None = None,
        at: datetime | None = None,
    ) -> None:
        self._s.add(
            AuditLogRow(
                team_id=team_id,
                actor=actor,
                action=action[:64],
                target_type=target_type[:32],
                target_id=target_id[:128],
                result=result[:32],
                details=details or {},
                created_at=at or datetime.now(UTC),
            )
        )
        await self._s.flush()

    async def page(self, query: AuditQuery) -> Page[AuditEntry]:
        conditions: list[ColumnElement[bool]] = []
        if query.team_id is not None:
            conditions.append(AuditLogRow.team_id == query.team_id)
        if query.actor is not None:
            conditions.append(AuditLogRow.actor == query.actor)
        if query.action is not None:
            if query.action.endswith(".*"):
                prefix = query.action[:-1]
                conditions.append(func.substr(AuditLogRow.action, 1, len(prefix)) == prefix)
            else:
                conditions.append(AuditLogRow.action == query.action)
        if query.target_id is not None:
            conditions.append(AuditLogRow.target_id == query.target_id)
        if query.since is not None:
            conditions.append(AuditLogRow.created_at >= query.since)
        if query.until is not None:
            conditions.append(AuditLogRow.created_at < query.until)
        if query.before_id is not None:
            conditions.append(AuditLogRow.id < query.before_id)
        rows = list(
            await self._s.scalars(
                select(AuditLogRow)
                .where(*conditions)
                .order_by(AuditLogRow.id.desc())
                .limit(query.limit + 1)
            )
        )
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        token = str(rows[-1].id) if more and rows else None
        return Page(items=[_entry(r) for r in rows], next_token=token)

    async def count(self) -> int:
        return int(await self._s.scalar(select(func.count()).select_from(AuditLogRow)) or 0)
