"""The reconciler: every ``reconcile_interval_s`` it compares the database with what each host
runs and fixes the drift. Runs in the app lifespan's TaskGroup.

For a live host (heartbeat within the window) it asks ``ListSandboxes`` and:

- destroys **orphans**: sandboxes on the host that the database does not have, has as killed
  or failed, or has on another host;
- marks **lost** sandboxes failed (``sandbox.failed``, reason ``lost``): running in the
  database (before the listing was asked for) but absent from the host's list, or listed by
  the host as failed (those are destroyed there too);
- leaves paused, pausing, starting, resuming and stopping sandboxes alone: their own request
  is in flight or their state lives in their disk, not in a running VM.

For a host silent past the heartbeat window:

- it is marked down once (``host.down``); its next heartbeat brings it back (``host.up``);
- its running sandboxes are kept for ``host_lost_grace_s`` more, so a network blip does not
  end them; past that they are marked failed (``sandbox.failed``, reason ``host_lost``). If
  the host comes back, they are orphans there and destroyed. Paused sandboxes stay paused:
  their disk is on that host and they resume when it is back.

Every fix is compare-and-set in the database, so replicas reconciling at once agree, and is
recorded in the audit log with actor ``system``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from wrenn import log
from wrenn.controlplane.audit import Audit
from wrenn.controlplane.db import Database
from wrenn.controlplane.db.records import Host, SandboxState
from wrenn.controlplane.events import Events, EventType, host_event
from wrenn.controlplane.hostpool import HostPool
from wrenn.controlplane.sandboxes import Sandboxes
from wrenn.controlplane.scheduler import Scheduler
from wrenn.core.errors import NotFound, WrennError
from wrenn.gen.hostagent import hostagent_pb as pb

_log = log.get(__name__)

CONCURRENCY = 8
_RUNNING = frozenset({SandboxState.RUNNING})
_ENDED = frozenset({SandboxState.KILLED, SandboxState.FAILED})


@dataclass
class Report:
    """What one pass changed (for logs and tests)."""

    orphans_destroyed: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    hosts_down: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)


class Reconciler:
    def __init__(
        self,
        db: Database,
        pool: HostPool,
        sandboxes: Sandboxes,
        scheduler: Scheduler,
        events: Events,
        audit: Audit,
        *,
        interval_s: float,
        lost_grace_s: float,
    ) -> None:
        self._db = db
        self._pool = pool
        self._sandboxes = sandboxes
        self._scheduler = scheduler
        self._events = events
        self._audit = audit
        self._interval_s = interval_s
        self._grace = timedelta(seconds=lost_grace_s)
        self._limit = asyncio.Semaphore(CONCURRENCY)

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:
                # Task boundary: a failed pass (database away, ...) must not end the worker.
                _log.exception("reconciler.tick_failed")
            await asyncio.sleep(self._interval_s)

    async def tick(self) -> Report:
        report = Report()
        now = datetime.now(UTC)
        async with self._db.transaction() as tx:
            hosts = await tx.hosts.all()
        async with asyncio.TaskGroup() as tg:
            for host in hosts:
                if self._scheduler.is_live(host, now):
                    tg.create_task(self._guarded(self._live(host, report), host))
                elif host.last_heartbeat_at is not None:
                    tg.create_task(self._guarded(self._silent(host, now, report), host))
        if report.orphans_destroyed or report.lost or report.hosts_down:
            _log.info(
                "reconciler.fixed",
                orphans=len(report.orphans_destroyed),
                lost=len(report.lost),
                hosts_down=len(report.hosts_down),
            )
        return report

    async def _guarded(self, work: Coroutine[Any, Any, None], host: Host) -> None:
        async with self._limit:
            try:
                await work
            except Exception:
                _log.exception("reconciler.host_failed", host_id=host.id)

    async def _live(self, host: Host, report: Report) -> None:
        async with self._db.transaction() as tx:
            running_before = await tx.sandboxes.on_host(host.id, _RUNNING)
        agent = await self._pool.get(host)
        try:
            listed = {info.sandbox_id: info for info in await agent.list_sandboxes()}
        except WrennError as err:
            # Heartbeating but not answering us: nothing can be concluded this pass.
            _log.warning("reconciler.host_unreachable", host_id=host.id, message=err.message)
            report.unreachable.append(host.id)
            return
        async with self._db.transaction() as tx:
            records = await tx.sandboxes.get_many(list(listed))
        for sandbox_id, info in listed.items():
            record = records.get(sandbox_id)
            orphan = record is None or record.state in _ENDED or record.host_id != host.id
            agent_failed = info.state == pb.SandboxState.FAILED
            if not orphan and not agent_failed:
                continue
            if record is not None and not orphan:
                await self._lost(record.id, host, report, "failed_on_host")
            with contextlib.suppress(NotFound):
                await agent.destroy_sandbox(sandbox_id)
            report.orphans_destroyed.append(sandbox_id)
            await self._audit.record(
                action="reconciler.destroy_orphan",
                target_type="sandboxes",
                target_id=sandbox_id,
                team_id=record.team_id if record else None,
                details={"hostID": host.id, "state": record.state.value if record else None},
            )
        for sandbox in running_before:
            if sandbox.id not in listed:
                await self._lost(sandbox.id, host, report, "lost")

    async def _lost(self, sandbox_id: str, host: Host, report: Report, reason: str) -> None:
        async with self._db.transaction() as tx:
            sandbox = await tx.sandboxes.get(sandbox_id)
        if sandbox is None:
            return
        if await self._sandboxes.mark_failed(sandbox, _RUNNING, reason) is None:
            return  # moved on meanwhile (paused, killed): not lost
        report.lost.append(sandbox_id)
        await self._audit.record(
            action="reconciler.mark_failed",
            target_type="sandboxes",
            target_id=sandbox_id,
            team_id=sandbox.team_id,
            details={"hostID": host.id, "reason": reason},
        )

    async def _silent(self, host: Host, now: datetime, report: Report) -> None:
        assert host.last_heartbeat_at is not None
        window = self._scheduler.policy.heartbeat_window
        if host.down_at is None:
            async with self._db.transaction() as tx:
                marked = await tx.hosts.mark_down(host.id, now - window)
                if marked is not None:
                    await self._events.emit(
                        tx,
                        host_event(
                            EventType.HOST_DOWN,
                            marked,
                            lastHeartbeatAt=host.last_heartbeat_at.isoformat(),
                        ),
                    )
            if marked is not None:
                report.hosts_down.append(host.id)
                await self._audit.record(
                    action="reconciler.host_down", target_type="hosts", target_id=host.id
                )
        if now - host.last_heartbeat_at <= window + self._grace:
            return
        async with self._db.transaction() as tx:
            running = await tx.sandboxes.on_host(host.id, _RUNNING)
        for sandbox in running:
            await self._lost(sandbox.id, host, report, "host_lost")
