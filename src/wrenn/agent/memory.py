"""Guest memory for QEMU restores, as files on the disk store (reflinks, XFS).

A template's or named snapshot's memory is materialised from the snapshot store once and
imported into the disk store as the image ``mem-<build-id>``; every VM restored from that build
gets a reflinked copy of it (O(1), blocks shared until written) and maps it shared, as a booted
guest maps its RAM. So the guest writes into its own file, the build's image is never written,
and a snapshot of the guest carries no RAM in QEMU's migration stream (the memory goes through
the store's block diff instead).

A paused sandbox's build needs no import: when its VM stops, the VM's own memory file holds
exactly that build's memory (the diff was read from it while the guest was paused, and the
guest never ran again), so ``VmMemory.keep_as`` makes it the build's image by reflink before
the file goes. Resuming costs one more reflink, not a copy of the memory.

``<scratch>`` (under ``run/``) holds a build's flat memory only while it is being imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path
from uuid import UUID

from wrenn import log
from wrenn.agent.disks import DiskStore, extents
from wrenn.agent.snapshots import SnapshotStore
from wrenn.core.errors import NotFound, WrennError

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

    def copy_path(self, vm: str) -> Path:
        return self._disks.disk_path(f"{vm}.mem")

    async def delete_copy(self, vm: str) -> None:
        with contextlib.suppress(NotFound):
            await self._disks.delete(f"{vm}.mem")

    async def adopt(self, build_id: UUID, vm: str) -> None:
        """Make VM ``vm``'s memory copy ``build_id``'s image (a reflink). Only for a VM that
        is gone and whose memory is exactly the build's."""
        image_id = self.image_id(build_id)
        async with self._locks.setdefault(build_id, asyncio.Lock()):
            if not await asyncio.to_thread(self._disks.template_path(image_id).exists):
                await self._disks.import_template(image_id, self.copy_path(vm))

    async def drop(self, build_id: UUID) -> None:
        """Forget ``build_id``'s image (copies made from it keep their blocks)."""
        async with self._locks.setdefault(build_id, asyncio.Lock()):
            with contextlib.suppress(NotFound):
                await self._disks.delete_template(self.image_id(build_id))
        self._locks.pop(build_id, None)


class VmMemory:
    """One VM's own memory copy, reflinked from ``source``'s image. ``release`` (once the VM
    is gone) deletes it, after making it the image of ``keep_as`` when that is set."""

    def __init__(self, images: MemoryImages, vm: str, source: UUID) -> None:
        self._images = images
        self.vm = vm
        self.source = source
        #: The build the VM's memory holds exactly (set once the VM will not run again).
        self.keep_as: UUID | None = None

    @property
    def path(self) -> Path:
        return self._images.copy_path(self.vm)

    async def changed_ranges(self) -> list[tuple[int, int]] | None:
        """Byte ranges of the copy that may differ from ``source``'s memory: those no longer
        shared with any other file (the guest wrote them). Every block still shared is the
        source's (the image's blocks, or shared with other copies of it). None when the
        filesystem cannot tell. The guest must be paused."""
        try:
            return await asyncio.to_thread(extents.unshared_ranges, self.path)
        except OSError as err:
            _log.warning("memory.extents_unknown", vm=self.vm, error=str(err))
            return None

    async def release(self) -> None:
        if self.keep_as is not None:
            try:
                await self._images.adopt(self.keep_as, self.vm)
            except (WrennError, OSError) as err:
                # Resuming the build then imports its memory from the snapshot store.
                _log.warning("memory.keep_failed", build_id=str(self.keep_as), error=str(err))
        await self._images.delete_copy(self.vm)
