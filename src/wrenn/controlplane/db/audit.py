"""The audit log table. Nothing writes to it yet beyond ``record``; the audit module that
decides what is recorded comes later."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from wrenn.controlplane.db.tables import AuditLogRow


class AuditRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def record(
        self,
        *,
        action: str,
        target_type: str,
        target_id: str,
        team_id: str | None = None,
        actor: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        self._s.add(
            AuditLogRow(
                team_id=team_id,
                actor=actor,
                action=action,
                target_type=target_type,
                target_id=target_id,
                details=details or {},
                created_at=datetime.now(UTC),
            )
        )
        await self._s.flush()

    async def count(self) -> int:
        return int(await self._s.scalar(select(func.count()).select_from(AuditLogRow)) or 0)
