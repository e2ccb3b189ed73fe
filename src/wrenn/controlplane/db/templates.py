"""Templates: learned from host heartbeats (public), visible to every team; a team's own
templates only to it. Deleting one leaves a tombstone so the same build is not revived by the
next heartbeat; a new build of it is."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from sqlalchemy import ColumnElement, Insert, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from wrenn.controlplane.db.records import Template, TemplateReport
from wrenn.controlplane.db.tables import TemplateRow


def _template(row: TemplateRow) -> Template:
    return Template(
        id=row.id,
        team_id=row.team_id,
        build_id=row.build_id,
        vcpus=row.vcpus,
        memory_mib=row.memory_mib,
        disk_mib=row.disk_mib,
        envd_version=row.envd_version,
        public=row.public,
        spawn_count=row.spawn_count,
        last_spawned_at=row.last_spawned_at,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _insert_ignoring_conflict(session: AsyncSession) -> Insert:
    """An insert that does nothing when another host's heartbeat inserted the row first."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(TemplateRow).on_conflict_do_nothing(index_elements=["id"])
    if dialect == "sqlite":
        return sqlite.insert(TemplateRow).on_conflict_do_nothing(index_elements=["id"])
    return insert(TemplateRow)


class TemplateRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def record_reported(self, reports: Iterable[TemplateReport]) -> None:
        now = datetime.now(UTC)
        for report in reports:
            row = await self._s.get(TemplateRow, report.id)
            if row is None:
                await self._s.execute(
                    _insert_ignoring_conflict(self._s).values(
                        id=report.id,
                        team_id=None,
                        build_id=report.build_id,
                        vcpus=report.vcpus,
                        memory_mib=report.memory_mib,
                        disk_mib=report.disk_mib,
                        envd_version=report.envd_version,
                        public=True,
                        spawn_count=0,
                        created_at=now,
                        updated_at=now,
                    )
                )
                continue
            if row.deleted_at is not None and row.build_id == report.build_id:
                continue
            changed = (
                row.build_id,
                row.vcpus,
                row.memory_mib,
                row.disk_mib,
                row.envd_version,
            ) != (
                report.build_id,
                report.vcpus,
                report.memory_mib,
                report.disk_mib,
                report.envd_version or row.envd_version,
            )
            if changed or row.deleted_at is not None:
                row.build_id = report.build_id
                row.vcpus = report.vcpus
                row.memory_mib = report.memory_mib
                row.disk_mib = report.disk_mib
                row.envd_version = report.envd_version or row.envd_version
                row.deleted_at = None
                row.updated_at = now
        await self._s.flush()

    def _visible(self, team_id: str) -> list[ColumnElement[bool]]:
        return [
            TemplateRow.deleted_at.is_(None),
            or_(TemplateRow.public.is_(True), TemplateRow.team_id == team_id),
        ]

    async def get(self, template_id: str, team_id: str) -> Template | None:
        row = await self._s.scalar(
            select(TemplateRow).where(TemplateRow.id == template_id, *self._visible(team_id))
        )
        return _template(row) if row else None

    async def visible(self, team_id: str) -> list[Template]:
        rows = await self._s.scalars(
            select(TemplateRow).where(*self._visible(team_id)).order_by(TemplateRow.id)
        )
        return [_template(r) for r in rows]

    async def delete(self, template_id: str) -> None:
        await self._s.execute(
            update(TemplateRow)
            .where(TemplateRow.id == template_id)
            .values(deleted_at=datetime.now(UTC))
        )

    async def record_spawn(self, template_id: str) -> None:
        await self._s.execute(
            update(TemplateRow)
            .where(TemplateRow.id == template_id)
            .values(spawn_count=TemplateRow.spawn_count + 1, last_spawned_at=datetime.now(UTC))
        )
