"""Pause builds stored in the background, after the pause has answered.

A pause under QEMU answers once its build is *recoverable*, not yet stored: the VM's device
state is held in the snapshot store (``SnapshotStore.hold``), the VM's memory file has become
the build's memory image (``MemoryImages.keep``), and the catalog names the build. What is
left, ``PendingBuilds`` does on a task of its own, one per build:

    window    when a resume could take the image back (below), up to ``TAKE_OVER_WINDOW_S``
              for one to come first: a resume often follows a pause at once, and the
              write-back the extents need would compete with it for the CPU, for nothing
    extents   which blocks of the kept image the guest wrote (its extent map, read after the
              image's dirty pages are written back); clones of the image wait for this
    parent    the parent build, when it is pending too, stored first
    quiet     while a resume restores a guest, the store waits (up to ``QUIET_WAIT_S``): the
              guest being restored needs the CPU more, and it would wait for the interpreter
              behind the store's Python work
    store     ``SnapshotStore.complete``: the diff over the parent written, hashed, fsynced,
              the build renamed into place

Invariants:

- A pending build and its parent are never collected (``builds``); nor is a held build (its
  store failed, or has not started since the agent did) that a sandbox still names, or any
  held ancestor of one (the manager's collector): the paused sandbox resumes from the kept
  image and the held state, and a later store needs the parent.
- The kept image is never written (the VM is gone, and copies of it are reflinks), so the
  store reads it in place; it is cloned only after its extents were read (``MemoryImages``).
- Everything that needs the build *stored* waits for it (``stored``): a named snapshot of a
  sandbox resumed from it, the store of a later pause. A resume does not: it restores from the
  kept image and the held state. A destroy ``abandon``s it: skipped unless it has begun.
- A resume that comes before the store has begun reading the kept image takes the image back
  (``take_over``): the store is called off and the VM maps the image itself under the paused
  VM's name (kept until the store ends, ``MemoryImages.let_go``), so the build can never be
  restored again: the sandbox's record goes before the VM starts, the image's own name when
  the store's extent read has ended, the held state with the collector. The VM's memory
  descends from the build's parent, whose extent map still tells what its guest wrote.
- ``close`` waits for every store under way (they end; none is cut short).
- An agent that dies before a build is stored finds it held at its next start, in the same
  boot, with its image: the store is redone from there (comparing all of the memory with the
  parent's, since a resume may have cloned the image). After a host restart held builds and
  memory images are not trusted (written without fsync): their sandboxes are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from wrenn import log
from wrenn.agent.cleanup import finish
from wrenn.agent.memory import MemoryImages, VmMemory
from wrenn.agent.snapshots import DeviceInput, SnapshotStore
from wrenn.agent.steps import Steps
from wrenn.core.errors import FailedPrecondition, WrennError

_log = log.get(__name__)

#: How long a store waits for restores under way to end before it runs beside them.
QUIET_WAIT_S = 5.0
#: How long a store whose image a resume could take back waits for one before it starts.
TAKE_OVER_WINDOW_S = 0.5


@dataclass
class _Pending:
    build_id: UUID
    parent: UUID | None
    extents_known: bool
    done: asyncio.Event = field(default_factory=asyncio.Event)
    #: Nobody wants the build any more (its sandbox is being destroyed): skip the store.
    abandoned: asyncio.Event = field(default_factory=asyncio.Event)
    #: The store has begun reading the kept image: it can no longer be taken over.
    committed: bool = False
    #: A resumed VM took the kept image back (``take_over``).
    taken: bool = False

    @property
    def takeable(self) -> bool:
        """Whether a resume could take the kept image back: its extent map tells what the
        guest wrote since it was reflinked from the parent's."""
        return self.extents_known and self.parent is not None


class PendingBuilds:
    def __init__(self, store: SnapshotStore, memory: MemoryImages) -> None:
        self._store = store
        self._memory = memory
        #: Added and not stored yet (running, or waiting for ``start``).
        self._builds: dict[UUID, _Pending] = {}
        #: Builds whose store failed, and why (they stay held; the next start retries them).
        self._failed: dict[UUID, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._restores = 0
        self._quiet = asyncio.Event()
        self._quiet.set()

    @contextlib.asynccontextmanager
    async def restoring(self) -> AsyncIterator[None]:
        """Around a restore: stores not begun yet wait until it has ended."""
        self._restores += 1
        self._quiet.clear()
        try:
            yield
        finally:
            self._restores -= 1
            if not self._restores:
                self._quiet.set()

    def add(self, build_id: UUID, parent: UUID | None, *, extents_known: bool) -> None:
        """Register held ``build_id`` (its memory in its kept image) to be stored by
        ``start``; from here on it and its parent are in ``builds``. ``extents_known``: the
        image was reflinked from ``parent``'s and not cloned since, so its extent map tells
        which blocks may differ; otherwise all of it is compared with the parent's."""
        if build_id in self._builds:
            raise FailedPrecondition(f"snapshot build {build_id} is already being stored")
        self._failed.pop(build_id, None)
        self._builds[build_id] = _Pending(build_id, parent, extents_known)

    def start(self, build_id: UUID) -> None:
        """Store an added build in the background."""
        task = asyncio.ensure_future(self._run(self._builds[build_id]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def builds(self) -> set[UUID]:
        """Builds not to collect: every pending one and its parent."""
        out: set[UUID] = set()
        for p in self._builds.values():
            out.add(p.build_id)
            if p.parent is not None:
                out.add(p.parent)
        return out

    async def stored(self, build_id: UUID | None) -> None:
        """Return once ``build_id`` is stored (at once if it was not pending);
        ``FailedPrecondition`` if its store failed."""
        if build_id is None:
            return
        pending = self._builds.get(build_id)
        if pending is not None:
            await pending.done.wait()
        error = self._failed.get(build_id)
        if error is not None:
            raise FailedPrecondition(f"snapshot build {build_id} could not be stored: {error}")

    async def abandon(self, build_id: UUID | None) -> None:
        """``build_id`` is not wanted any more: its store is skipped unless it has begun.
        Returns once it has ended; the build stays held (for the collector to release)."""
        pending = self._builds.get(build_id) if build_id is not None else None
        if pending is not None:
            pending.abandoned.set()
            await pending.done.wait()

    def take_over(self, build_id: UUID | None) -> VmMemory | None:
        """Call off the store of ``build_id`` for a resume of its sandbox that maps the kept
        image itself (``MemoryImages.take``) rather than a copy of it. Possible until the
        store has begun reading the image, and only where the image's extent map tells what
        its guest wrote since it was reflinked from the parent's (the resumed VM's next pause
        reads it against that parent). Returns the VM's memory, a descendant of the parent's;
        None when the store cannot be called off (the resume copies the image)."""
        pending = self._builds.get(build_id) if build_id is not None else None
        if (
            pending is None
            or pending.committed
            or pending.abandoned.is_set()
            or not pending.takeable
        ):
            return None
        assert pending.parent is not None  # takeable
        memory = self._memory.take(pending.build_id, pending.parent)
        pending.taken = True
        pending.abandoned.set()
        _log.info("snapshot.store_taken_over", build_id=str(build_id))
        return memory

    def forget(self, build_id: UUID) -> None:
        """Forget why a build's store failed (the build is being deleted)."""
        self._failed.pop(build_id, None)

    async def close(self) -> None:
        """Wait for every store under way. Idempotent."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def _run(self, p: _Pending) -> None:
        steps = Steps()
        try:
            if p.takeable:
                # A resume often follows a pause at once: until it comes (or the window
                # ends) the kept image is not written back, so a take-over finds the machine
                # quiet and the store has nothing to do.
                await _first(p.abandoned.wait(), timeout_s=TAKE_OVER_WINDOW_S)
                steps.mark("window")
            ranges = None
            try:
                if p.extents_known and not p.abandoned.is_set():
                    ranges = await self._memory.changed_ranges(p.build_id)
            finally:
                self._memory.allow_clones(p.build_id)
            steps.mark("extents")
            await self.stored(p.parent)
            steps.mark("parent")
            await _first(self._quiet.wait(), p.abandoned.wait(), timeout_s=QUIET_WAIT_S)
            steps.mark("quiet")
            if p.abandoned.is_set():
                _log.info("snapshot.store_abandoned", build_id=str(p.build_id))
                return
            p.committed = True
            _log.info("snapshot.storing", build_id=str(p.build_id))
            memfile = self._memory.image_path(p.build_id)
            manifest = await self._store.complete(
                p.build_id,
                devices={"memfile": DeviceInput(source=memfile, changed_ranges=ranges)},
            )
            steps.mark("store")
        except (WrennError, OSError) as err:
            self._failed[p.build_id] = str(err)
            _log.error("snapshot.store_failed", build_id=str(p.build_id), error=str(err))
        except Exception as err:
            self._failed[p.build_id] = repr(err)
            _log.exception("snapshot.store_failed", build_id=str(p.build_id))
        else:
            _log.info(
                "snapshot.stored",
                build_id=str(p.build_id),
                parent_id=str(p.parent),
                changed_bytes=sum(n for _, n in ranges) if ranges is not None else None,
                stored_bytes=manifest.devices["memfile"].stored_bytes,
                total_ms=steps.total_ms,
                steps_ms=steps.ms,
            )
        finally:
            # Taken over: the build's image name goes (the extent read that the name's
            # removal would have waited behind has ended). Otherwise the paused VM's name.
            try:
                if p.taken:
                    await finish(self._memory.drop(p.build_id))
                else:
                    await finish(self._memory.let_go(p.build_id))
            except (WrennError, OSError) as err:
                _log.warning("snapshot.memory_name_kept", build_id=str(p.build_id), error=str(err))
            finally:
                del self._builds[p.build_id]
                p.done.set()


async def _first(*waits: Coroutine[Any, Any, object], timeout_s: float) -> None:
    """Until the first of ``waits`` returns, or ``timeout_s``; the others are cancelled."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
