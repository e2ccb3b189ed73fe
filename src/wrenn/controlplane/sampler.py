"""The metrics sampler: every ``interval_s`` it asks the hosts for the usage of each running
sandbox and records the samples (``GET /sandboxes/{id}/metrics`` answers from them); samples
older than ``retention_s`` are deleted. Runs in the app lifespan's TaskGroup.

Several control plane replicas share the work without coordinating: a sandbox sampled (by any
of them) within the last half interval is skipped, and a duplicate sample of the same moment
is dropped by the table's key.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from wrenn import log
from wrenn.controlplane.db import Database
from wrenn.controlplane.db.records import Host, MetricSample
from wrenn.controlplane.hostpool import HostPool
from wrenn.controlplane.sandboxes import sample_of
from wrenn.controlplane.scheduler import Scheduler
from wrenn.core.errors import WrennError

_log = log.get(__name__)

#: Metrics RPCs in flight at once.
CONCURRENCY = 16
#: How often old samples are deleted.
PRUNE_EVERY_S = 60.0


class MetricsSampler:
    def __init__(
        self,
        db: Database,
        pool: HostPool,
        placement: Scheduler,
        *,
        interval_s: float,
        retention_s: float,
    ) -> None:
        self._db = db
        self._pool = pool
        self._scheduler = placement
        self._interval_s = interval_s
        self._retention = timedelta(seconds=retention_s)
        self._limit = asyncio.Semaphore(CONCURRENCY)
        self._pruned_at: datetime | None = None

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:
                # Task boundary: a failed tick (database away, ...) must not end the worker.
                _log.exception("metrics.tick_failed")
            await asyncio.sleep(self._interval_s)

    async def tick(self) -> int:
        """Sample every running sandbox not sampled lately; how many samples were recorded."""
        now = datetime.now(UTC)
        async with self._db.transaction(read_only=True) as tx:
            running = await tx.metrics.running()
            recent = await tx.metrics.sampled_since(now - timedelta(seconds=self._interval_s / 2))
            hosts = {h.id: h for h in await tx.hosts.all()}
        due = [
            (sandbox_id, hosts[host_id])
            for sandbox_id, host_id in running
            if sandbox_id not in recent
            and host_id in hosts
            and self._scheduler.is_live(hosts[host_id], now)
        ]
        samples: list[MetricSample] = []
        if due:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._sample(sid, host)) for sid, host in due]
            samples = [s for s in (t.result() for t in tasks) if s is not None]
        prune = self._pruned_at is None or (now - self._pruned_at).total_seconds() >= PRUNE_EVERY_S
        if samples or prune:
            async with self._db.transaction() as tx:
                await tx.metrics.add(samples)
                if prune:
                    await tx.metrics.prune(now - self._retention)
            if prune:
                self._pruned_at = now
        return len(samples)

    async def _sample(self, sandbox_id: str, host: Host) -> MetricSample | None:
        async with self._limit:
            try:
                async with asyncio.timeout(max(self._interval_s, 1.0)):
                    agent = await self._pool.get(host)
                    m = await agent.sandbox_metrics(sandbox_id)
            except (WrennError, TimeoutError) as err:
                # Paused, killed or failing meanwhile: the next tick tries again.
                _log.debug("metrics.sample_failed", sandbox_id=sandbox_id, error=str(err))
                return None
        return sample_of(sandbox_id, m, 0) if m is not None else None
