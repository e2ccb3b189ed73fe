"""The lifecycle worker: every sandbox has an end time; when it passes, the sandbox is paused
(created with auto-pause) or killed. It also deletes the snapshots taken for forks once no
fork needs them (``Sandboxes.sweep_forks``). Runs in the app lifespan's TaskGroup."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from wrenn import log
from wrenn.controlplane.audit import Audit
from wrenn.controlplane.db import Database
from wrenn.controlplane.db.records import Sandbox
from wrenn.controlplane.sandboxes import Sandboxes
from wrenn.core.errors import FailedPrecondition, NotFound, WrennError

_log = log.get(__name__)

#: Expired sandboxes handled at once; the rest wait for the next tick.
BATCH = 100
CONCURRENCY = 8


class LifecycleWorker:
    def __init__(self, db: Database, sandboxes: Sandboxes, audit: Audit, interval_s: float) -> None:
        self._db = db
        self._sandboxes = sandboxes
        self._audit = audit
        self._interval_s = interval_s
        self._limit = asyncio.Semaphore(CONCURRENCY)

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:
                # Task boundary: a failed tick (database away, ...) must not end the worker.
                _log.exception("lifecycle.tick_failed")
            await asyncio.sleep(self._interval_s)

    async def tick(self) -> int:
        """Handle the sandboxes expired by now, then the fork snapshots no longer needed; how
        many sandboxes had expired."""
        async with self._db.transaction() as tx:
            expired = await tx.sandboxes.expired(datetime.now(UTC), BATCH)
        if expired:
            async with asyncio.TaskGroup() as tg:
                for sandbox in expired:
                    tg.create_task(self._expire(sandbox))
        await self._sandboxes.sweep_forks()
        return len(expired)

    async def _expire(self, sandbox: Sandbox) -> None:
        async with self._limit:
            try:
                if sandbox.auto_pause:
                    await self._sandboxes.pause_sandbox(sandbox)
                else:
                    await self._sandboxes.kill_sandbox(sandbox)
                await self._audit.record(
                    action="lifecycle.pause" if sandbox.auto_pause else "lifecycle.kill",
                    target_type="sandboxes",
                    target_id=sandbox.id,
                    team_id=sandbox.team_id,
                    details={"endAt": sandbox.end_at.isoformat()},
                )
            except (NotFound, FailedPrecondition):
                pass  # killed, paused or resumed by a request meanwhile
            except WrennError as err:
                # Retried on the next tick; a sandbox meant to be paused is never killed instead.
                _log.warning(
                    "lifecycle.expire_failed",
                    sandbox_id=sandbox.id,
                    code=err.code.value,
                    message=err.message,
                )
            except Exception:
                _log.exception("lifecycle.expire_crashed", sandbox_id=sandbox.id)
