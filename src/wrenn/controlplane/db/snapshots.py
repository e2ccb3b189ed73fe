"""Named snapshots: which team owns them, what they were taken from, which host stores them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Row, and_, delete, false, or_, select, true
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from wrenn.controlplane.db.records import Page, SandboxState, Snapshot
from wrenn.controlplane.db.sandboxes import decode_cursor, encode_cursor
from wrenn.controlplane.db.tables import SandboxRow, SnapshotRow
from wrenn.core.errors import AlreadyExists


def _snapshot(row: SnapshotRow | Row[Any]) -> Snapshot:
    return Snapshot(
        id=row.id,
        team_id=row.team_id,
        name=row.name,
        sandbox_id=row.sandbox_id,
        template_id=row.template_id,
        host_id=row.host_id,
        vcpus=row.vcpus,
        memory_mib=row.memory_mib,
        size_bytes=row.size_bytes,
        created_at=row.created_at,
        for_fork=row.for_fork,
    )


class SnapshotRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def insert(self, snapshot: Snapshot) -> None:
        """Raises ``AlreadyExists`` when the team already has a snapshot of that name."""
        row = SnapshotRow(
            id=snapshot.id,
            team_id=snapshot.team_id,
            name=snapshot.name,
            sandbox_id=snapshot.sandbox_id,
            template_id=snapshot.template_id,
            host_id=snapshot.host_id,
            vcpus=snapshot.vcpus,
            memory_mib=snapshot.memory_mib,
            size_bytes=snapshot.size_bytes,
            created_at=snapshot.created_at,
            for_fork=snapshot.for_fork,
        )
        try:
            async with self._s.begin_nested():
                self._s.add(row)
        except IntegrityError as err:
            raise AlreadyExists(f"a snapshot named {snapshot.name!r} already exists") from err

    async def find(self, team_id: str, ref: str) -> Snapshot | None:
        """A team's snapshot by id or by name (not one taken for a fork)."""
        row = await self._s.scalar(
            select(SnapshotRow)
            .where(
                SnapshotRow.team_id == team_id,
                or_(SnapshotRow.id == ref, SnapshotRow.name == ref),
                SnapshotRow.for_fork == false(),
            )
            .order_by(SnapshotRow.id != ref)
        )
        return _snapshot(row) if row else None

    async def unused_forks(self, limit: int) -> list[Snapshot]:
        """Snapshots taken for a fork that no sandbox started from them still needs (every
        one of them killed or failed)."""
        used = (
            select(SandboxRow.id)
            .where(
                SandboxRow.snapshot_id == SnapshotRow.id,
                SandboxRow.state.not_in([SandboxState.KILLED.value, SandboxState.FAILED.value]),
            )
            .exists()
        )
        rows = await self._s.scalars(
            select(SnapshotRow)
            .where(SnapshotRow.for_fork == true(), ~used)
            .order_by(SnapshotRow.created_at)
            .limit(limit)
        )
        return [_snapshot(r) for r in rows]

    async def name_taken(self, team_id: str, name: str) -> bool:
        row = await self._s.scalar(
            select(SnapshotRow.id).where(SnapshotRow.team_id == team_id, SnapshotRow.name == name)
        )
        return row is not None

    async def delete(self, snapshot_id: str) -> None:
        await self._s.execute(delete(SnapshotRow).where(SnapshotRow.id == snapshot_id))


async def snapshot_page(
    conn: AsyncConnection,
    team_id: str,
    *,
    sandbox_id: str | None = None,
    name: str | None = None,
    limit: int = 100,
    next_token: str | None = None,
) -> Page[Snapshot]:
    """One page of a team's snapshots, oldest first, in one statement."""
    conditions: list[ColumnElement[bool]] = [
        SnapshotRow.team_id == team_id,
        SnapshotRow.for_fork == false(),
    ]
    if sandbox_id is not None:
        conditions.append(SnapshotRow.sandbox_id == sandbox_id)
    if name is not None:
        conditions.append(or_(SnapshotRow.name == name, SnapshotRow.id == name))
    if next_token:
        at, last_id = decode_cursor(next_token)
        conditions.append(
            or_(
                SnapshotRow.created_at > at,
                and_(SnapshotRow.created_at == at, SnapshotRow.id > last_id),
            )
        )
    rows = (
        await conn.execute(
            select(SnapshotRow.__table__)
            .where(*conditions)
            .order_by(SnapshotRow.created_at, SnapshotRow.id)
            .limit(limit + 1)
        )
    ).all()
    more = len(rows) > limit
    rows = rows[:limit]
    token = encode_cursor(rows[-1].created_at, rows[-1].id) if more and rows else None
    return Page(items=[_snapshot(r) for r in rows], next_token=token)
