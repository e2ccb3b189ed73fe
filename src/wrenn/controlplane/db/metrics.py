"""Sandbox metric samples: written by the metrics sampler, read by the metrics routes, pruned
past their retention."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from wrenn.controlplane.db.inserts import insert_ignoring_conflict
from wrenn.controlplane.db.records import VISIBLE_STATES, MetricSample, SandboxState
from wrenn.controlplane.db.tables import SandboxMetricRow, SandboxRow


def _sample(row: SandboxMetricRow) -> MetricSample:
    return MetricSample(
        sandbox_id=row.sandbox_id,
        sampled_at=row.sampled_at,
        cpu_count=row.cpu_count,
        cpu_used_pct=row.cpu_used_pct,
        mem_used_bytes=row.mem_used,
        mem_total_bytes=row.mem_total,
        disk_used_bytes=row.disk_used,
        disk_total_bytes=row.disk_total,
        mem_cache_bytes=row.mem_cache,
    )


class MetricRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def running(self) -> list[tuple[str, str]]:
        """(sandbox id, host id) of every running sandbox, of every team."""
        rows = await self._s.execute(
            select(SandboxRow.id, SandboxRow.host_id)
            .where(
                SandboxRow.state == SandboxState.RUNNING.value,
                SandboxRow.host_id.is_not(None),
            )
            .order_by(SandboxRow.id)
        )
        return [(str(sid), str(host)) for sid, host in rows]

    async def sampled_since(self, since: datetime) -> set[str]:
        """Sandboxes with a sample taken after ``since`` (by this or another replica)."""
        rows = await self._s.scalars(
            select(SandboxMetricRow.sandbox_id)
            .where(SandboxMetricRow.sampled_at > since)
            .distinct()
        )
        return set(rows)

    async def add(self, samples: Iterable[MetricSample]) -> None:
        values = [
            {
                "sandbox_id": s.sandbox_id,
                "sampled_at": s.sampled_at,
                "cpu_count": s.cpu_count,
                "cpu_used_pct": s.cpu_used_pct,
                "mem_used": s.mem_used_bytes,
                "mem_total": s.mem_total_bytes,
                "disk_used": s.disk_used_bytes,
                "disk_total": s.disk_total_bytes,
                "mem_cache": s.mem_cache_bytes,
            }
            for s in samples
        ]
        if values:
            await self._s.execute(
                insert_ignoring_conflict(self._s, SandboxMetricRow, ["sandbox_id", "sampled_at"]),
                values,
            )

    async def series(
        self, sandbox_id: str, start: datetime | None, end: datetime | None, limit: int
    ) -> list[MetricSample]:
        """Samples of one sandbox in [start, end], oldest first; the newest ``limit`` when
        there are more."""
        query = select(SandboxMetricRow).where(SandboxMetricRow.sandbox_id == sandbox_id)
        if start is not None:
            query = query.where(SandboxMetricRow.sampled_at >= start)
        if end is not None:
            query = query.where(SandboxMetricRow.sampled_at <= end)
        rows = await self._s.scalars(
            query.order_by(SandboxMetricRow.sampled_at.desc()).limit(limit)
        )
        return [_sample(r) for r in reversed(list(rows))]

    async def latest(self, team_id: str, sandbox_ids: Sequence[str]) -> dict[str, MetricSample]:
        """The newest sample of each of ``sandbox_ids`` that ``team_id`` can see and that has
        one."""
        if not sandbox_ids:
            return {}
        newest = (
            select(
                SandboxMetricRow.sandbox_id.label("sid"),
                func.max(SandboxMetricRow.sampled_at).label("at"),
            )
            .join(SandboxRow, SandboxRow.id == SandboxMetricRow.sandbox_id)
            .where(
                SandboxMetricRow.sandbox_id.in_(list(sandbox_ids)),
                SandboxRow.team_id == team_id,
                SandboxRow.state.in_([s.value for s in VISIBLE_STATES]),
            )
            .group_by(SandboxMetricRow.sandbox_id)
            .subquery()
        )
        rows = await self._s.scalars(
            select(SandboxMetricRow).join(
                newest,
                (SandboxMetricRow.sandbox_id == newest.c.sid)
                & (SandboxMetricRow.sampled_at == newest.c.at),
            )
        )
        return {r.sandbox_id: _sample(r) for r in rows}

    async def prune(self, before: datetime) -> int:
        """Delete samples taken before ``before``; how many."""
        result = await self._s.execute(
            delete(SandboxMetricRow)
            .where(SandboxMetricRow.sampled_at < before)
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)
