"""Flat guest-memory files materialised from snapshot builds, for QEMU's file-backed RAM.

A template's or named snapshot's memory is materialised once into ``<root>/<build-id>`` and
shared by every VM restored from it: each maps it privately, so none ever writes it. A file
may only be dropped once no running VM maps it (QEMU finds its RAM by the file's path when it
snapshots). The directory is a cache: it is emptied when the agent starts.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from uuid import UUID

from wrenn import log
from wrenn.agent.snapshots import SnapshotStore

_log = log.get(__name__)


class MemfileCache:
    def __init__(self, root: Path, store: SnapshotStore) -> None:
        self.root = root
        self._store = store
        self._locks: dict[UUID, asyncio.Lock] = {}

    def clear(self) -> None:
        """Remove every cached file (blocking; at start, before any VM runs)."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, build_id: UUID) -> Path:
        return self.root / str(build_id)

    async def get(self, build_id: UUID) -> Path:
        """The flat memory file of ``build_id``, materialised on first use."""
        path = self.path(build_id)
        async with self._locks.setdefault(build_id, asyncio.Lock()):
            if not path.exists():
                tmp = path.with_name(f".{build_id}.tmp")
                try:
                    await self._store.materialize(build_id, "memfile", tmp)
                    tmp.rename(path)
                finally:
                    tmp.unlink(missing_ok=True)
                _log.info("memfile.materialized", build_id=str(build_id))
        return path

    async def drop(self, build_id: UUID) -> None:
        async with self._locks.setdefault(build_id, asyncio.Lock()):
            await asyncio.to_thread(self.path(build_id).unlink, missing_ok=True)
        self._locks.pop(build_id, None)
