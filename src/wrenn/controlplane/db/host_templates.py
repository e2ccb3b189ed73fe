"""Which host has which template: the set each host reported in its latest heartbeat. The
scheduler sends a sandbox of a template only to a host that has it."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from wrenn.controlplane.db.records import TemplateReport
from wrenn.controlplane.db.tables import HostTemplateRow


class HostTemplateRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def replace(self, host_id: str, reports: Iterable[TemplateReport]) -> None:
        """The host has exactly ``reports`` now (the caller holds the host's row, as a
        heartbeat does, so two reports of one host do not interleave)."""
        reported = {r.id: r.build_id for r in reports}
        rows = {
            row.template_id: row
            for row in await self._s.scalars(
                select(HostTemplateRow).where(HostTemplateRow.host_id == host_id)
            )
        }
        gone = [t for t in rows if t not in reported]
        if gone:
            await self._s.execute(
                delete(HostTemplateRow).where(
                    HostTemplateRow.host_id == host_id, HostTemplateRow.template_id.in_(gone)
                )
            )
        now = datetime.now(UTC)
        for template_id, build_id in reported.items():
            row = rows.get(template_id)
            if row is None:
                self._s.add(
                    HostTemplateRow(
                        host_id=host_id,
                        template_id=template_id,
                        build_id=build_id,
                        reported_at=now,
                    )
                )
            elif row.build_id != build_id:
                row.build_id = build_id
                row.reported_at = now
        await self._s.flush()

    async def hosts_with(self, template_id: str) -> set[str]:
        """Ids of the hosts that reported ``template_id``."""
        rows = await self._s.scalars(
            select(HostTemplateRow.host_id).where(HostTemplateRow.template_id == template_id)
        )
        return set(rows)
