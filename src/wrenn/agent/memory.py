"""Guest memory for QEMU restores, as files on the disk store (reflinks, XFS).

A template's or named snapshot's memory is materialised from the snapshot store once and
imported into the disk store as the image ``mem-<build-id>``; every VM restored from that build
gets a reflinked copy of it (O(1), blocks shared until written) and maps it shared, as a booted
guest maps its RAM. So the guest writes into its own file, the build's image is never written,
and a snapshot of the guest carries no RAM in QEMU's migration stream (the memory goes through
the store's block diff instead).

``<scratch>`` (under ``run/``) holds a build's flat memory only while it is being imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path
from uuid import UUID

from wrenn import log
from wrenn.agent.disks import DiskStore
from wrenn.agent.snapshots import SnapshotStore
from wrenn.core.errors import NotFound

_log = log.get(__name__)

PREFIX = "mem-"


class MemoryImages:
    def __init__(self, scratch: Path, store: SnapshotStore, disks: DiskStore) -> None:
        self.scratch = scratch
        self._store = store
        self._disks = disks
        self._locks: dict[UUID, asyncio.Lock] = {}

    def clear(self) -> None:
        """Remove half-imported files (blocking; at start, before any VM runs)."""
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def image_id(build_id: UUID) -> str:
        return f"{PREFIX}{build_id}"

    async def image(self, build_id: UUID) -> str:
        """The disk-store image holding ``build_id``'s memory, imported on first use."""
        image_id = self.image_id(build_id)
        async with self._locks.setdefault(build_id, asyncio.Lock()):
            if not await asyncio.to_thread(self._disks.template_path(image_id).exists):
                flat = self.scratch / str(build_id)
                try:
                    await self._store.materialize(build_id, "memfile", flat)
                    await self._disks.import_template(image_id, flat)
                finally:
                    await asyncio.to_thread(flat.unlink, missing_ok=True)
                _log.info("memory.imported", build_id=str(build_id))
        return image_id

    async def copy_for(self, build_id: UUID, vm: str) -> Path:
        """A VM's own copy of ``build_id``'s memory (a disk-store disk named ``<vm>.mem``);
        ``delete_copy(vm)`` removes it once the VM is gone."""
        return await self._disks.clone(await self.image(build_id), f"{vm}.mem")

    async def delete_copy(self, vm: str) -> None:
        with contextlib.suppress(NotFound):
            await self._disks.delete(f"{vm}.mem")

    async def drop(self, build_id: UUID) -> None:
        """Forget ``build_id``'s image (copies made from it keep their blocks)."""
        async with self._locks.setdefault(build_id, asyncio.Lock()):
            with contextlib.suppress(NotFound):
                await self._disks.delete_template(self.image_id(build_id))
        self._locks.pop(build_id, None)
