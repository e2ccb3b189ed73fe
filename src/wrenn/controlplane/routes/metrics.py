"""Sandbox metrics, E2B-compatible: a sandbox's samples over time, and the latest sample of
several sandboxes at once. The metrics sampler (``wrenn.controlplane.sampler``) takes the
samples; they are kept for ``metrics_retention_s``.

Mounted before the sandbox routes, so ``/sandboxes/metrics`` is not read as a sandbox id."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query

from wrenn.controlplane.auth import CP, Team
from wrenn.controlplane.db.records import MetricSample
from wrenn.controlplane.schemas import e2b
from wrenn.core.errors import InvalidArgument

router = APIRouter(tags=["sandboxes"])

#: Sandboxes one ``GET /sandboxes/metrics`` may name.
MAX_SANDBOX_IDS = 100
#: The last second a timestamp can name (9999-12-31T23:59:59Z).
_UNIX_MAX = 253_402_300_799


def metric_out(m: MetricSample) -> e2b.SandboxMetric:
    return e2b.SandboxMetric(
        timestamp=m.sampled_at,
        timestamp_unix=int(m.sampled_at.timestamp()),
        cpu_count=m.cpu_count,
        cpu_used_pct=m.cpu_used_pct,
        mem_used=m.mem_used_bytes,
        mem_total=m.mem_total_bytes,
        mem_cache=m.mem_cache_bytes,
        disk_used=m.disk_used_bytes,
        disk_total=m.disk_total_bytes,
    )


def _at(unix_s: int | None) -> datetime | None:
    return datetime.fromtimestamp(unix_s, UTC) if unix_s is not None else None


@router.get("/sandboxes/metrics", response_model_exclude_none=True)
async def latest_metrics(
    cp: CP,
    who: Team,
    sandbox_ids: Annotated[str, Query(max_length=MAX_SANDBOX_IDS * 70)],
) -> e2b.SandboxesWithMetrics:
    """The latest sample of each named sandbox (comma-separated ``sandbox_ids``) that has
    one; unknown ids and sandboxes without a sample yet are left out."""
    wanted = list(dict.fromkeys(s.strip() for s in sandbox_ids.split(",") if s.strip()))
    if not wanted:
        raise InvalidArgument("sandbox_ids: name at least one sandbox")
    if len(wanted) > MAX_SANDBOX_IDS:
        raise InvalidArgument(
            f"sandbox_ids: at most {MAX_SANDBOX_IDS} sandboxes (got {len(wanted)})"
        )
    latest = await cp.sandboxes.latest_metrics(who.team.id, wanted)
    return e2b.SandboxesWithMetrics(sandboxes={sid: metric_out(m) for sid, m in latest.items()})


@router.get("/sandboxes/{sandbox_id}/metrics")
async def metrics(
    sandbox_id: str,
    cp: CP,
    who: Team,
    start: Annotated[int | None, Query(ge=0, le=_UNIX_MAX)] = None,
    end: Annotated[int | None, Query(ge=0, le=_UNIX_MAX)] = None,
) -> list[e2b.SandboxMetric]:
    """The sandbox's samples between ``start`` and ``end`` (unix seconds, both included),
    oldest first. Before the first sample is kept, a running sandbox's current one."""
    if start is not None and end is not None and start > end:
        raise InvalidArgument(f"start {start} is after end {end}")
    samples = await cp.sandboxes.metrics(who.team.id, sandbox_id, _at(start), _at(end))
    return [metric_out(m) for m in samples]
