"""Guest memory for QEMU restores, as files on the disk store (reflinks, XFS).

A template's or named snapshot's memory is materialised from the snapshot store once and
imported into the disk store as the image ``mem-<build-id>``; every VM restored from that build
gets a reflinked copy of it (O(1), blocks shared until written) and maps it shared, as a booted
guest maps its RAM. So the guest writes into its own file, the build's image is never written,
and a snapshot of the guest carries no RAM in QEMU's migration stream (the memory goes through
the store's block diff instead).

A paused sandbox's build needs no import: once its VM is paused for good, the VM's own memory
file holds exactly that build's memory, and ``keep`` makes it the build's image under a second
name (a hard link: nothing copied, nothing written back). Until the pause's background store
has read which blocks the guest wrote (``changed_ranges``: the extents the image no longer
shares with its parent's), the image is not cloned: a clone would share those blocks too, and
the extent map could no longer tell them apart. ``copy_for`` waits for that.

The paused VM's own name for that file stays while the build is being stored: a resume that
comes first takes the image back (``take``) by mapping the file under that name, with no
filesystem operation on it (a link or unlink would wait for the inode behind the write-back the
store's extent read has started). The store lets go of the name when it ends (``let_go``).

Images are written without fsync. They are caches of what the snapshot store holds (except a
pause's image while its build is being stored, which is only recoverable in the same boot), so
``forget_if_rebooted`` drops them all when the host has restarted since they were made.

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
from wrenn.agent.snapshots.held import boot_id
from wrenn.core.errors import FailedPrecondition, NotFound

_log = log.get(__name__)

PREFIX = "mem-"


class MemoryImages:
    def __init__(self, scratch: Path, store: SnapshotStore, disks: DiskStore) -> None:
        self.scratch = scratch
        #: The boot the images were made in.
        self._boot_marker = scratch.with_name(f"{scratch.name}.boot")
        self._store = store
        self._disks = disks
        self._locks: dict[UUID, asyncio.Lock] = {}
        #: Images kept by a pause whose changed ranges are not read yet: not cloned until then.
        self._unread: dict[UUID, asyncio.Event] = {}
        #: Kept images whose paused VM's memory copy keeps its name (``keep``): the VM.
        self._kept_names: dict[UUID, str] = {}

    def clear(self) -> None:
        """Remove half-imported files (blocking; at start, before any VM runs)."""
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir(parents=True, exist_ok=True)

    async def forget_if_rebooted(self) -> None:
        """Drop every memory image when the host restarted since they were made (at start,
        once the disk store is open, before any VM runs)."""
        now = boot_id()
        try:
            then = await asyncio.to_thread(self._boot_marker.read_text)
        except FileNotFoundError:
            then = ""
        if then.strip() != now:
            images = [t for t in self._disks.templates() if t.startswith(PREFIX)]
            for image_id in images:
                with contextlib.suppress(NotFound):
                    await self._disks.delete_template(image_id)
            if images:
                _log.warning("memory.images_dropped_after_reboot", images=len(images))
            await asyncio.to_thread(self._boot_marker.write_text, now)

    @staticmethod
    def image_id(build_id: UUID) -> str:
        return f"{PREFIX}{build_id}"

    def image_path(self, build_id: UUID) -> Path:
        return self._disks.template_path(self.image_id(build_id))

    async def image(self, build_id: UUID) -> str:
        """The disk-store image holding ``build_id``'s memory, imported on first use."""
        image_id = self.image_id(build_id)
        async with self._locks.setdefault(build_id, asyncio.Lock()):
            if not await asyncio.to_thread(self.image_path(build_id).exists):
                flat = self.scratch / str(build_id)
                try:
                    await self._store.materialize(build_id, "memfile", flat)
                    await self._disks.import_template(image_id, flat)
                finally:
                    await asyncio.to_thread(flat.unlink, missing_ok=True)
                _log.info("memory.imported", build_id=str(build_id))
        return image_id

    async def has_image(self, build_id: UUID) -> bool:
        return await asyncio.to_thread(self.image_path(build_id).exists)

    async def copy_for(self, build_id: UUID, vm: str) -> Path:
        """A VM's own copy of ``build_id``'s memory (a disk-store disk named ``<vm>.mem``);
        ``delete_copy(vm)`` removes it once the VM is gone. Waits while the image is a pause's
        whose changed ranges are not read yet."""
        unread = self._unread.get(build_id)
        if unread is not None:
            await unread.wait()
        return await self._disks.clone(await self.image(build_id), f"{vm}.mem")

    def take(self, build_id: UUID, parent: UUID) -> VmMemory:
        """Give ``build_id``'s kept image back as a VM's own memory, descending from
        ``parent``'s: the paused VM's copy under its name, page cache and all; nothing on the
        filesystem changes. The VM will write it, so the build can never be restored again:
        the caller must make sure nothing restores it first, even after a restart of the agent
        (its record gone). The image's own name goes with the build (``drop``, once the store's
        extent read has ended). Only for a pause build whose store was called off
        (``PendingBuilds.take_over``)."""
        vm = self._kept_names.pop(build_id, None)
        if vm is None:
            raise FailedPrecondition(f"snapshot build {build_id} has no memory to take back")
        self.allow_clones(build_id)
        return VmMemory(self, vm, parent)

    async def let_go(self, build_id: UUID) -> None:
        """The store of ``build_id`` has ended without a take-over: the paused VM's name for
        its kept image goes (the image stays)."""
        vm = self._kept_names.pop(build_id, None)
        if vm is not None:
            with contextlib.suppress(NotFound):
                await self._disks.delete(f"{vm}.mem")

    def copy_path(self, vm: str) -> Path:
        return self._disks.disk_path(f"{vm}.mem")

    async def delete_copy(self, vm: str) -> None:
        """Delete VM ``vm``'s memory copy, unless it is a kept image's: that name stays
        until the image is taken back or let go of."""
        if vm in self._kept_names.values():
            return
        with contextlib.suppress(NotFound):
            await self._disks.delete(f"{vm}.mem")

    async def keep(self, build_id: UUID, vm: str) -> None:
        """Make VM ``vm``'s memory copy ``build_id``'s image (a hard link). Only while the VM
        is paused and its memory is exactly the build's; the VM must not run again unless
        ``drop(build_id)`` comes first (the image *is* its memory). The image is not cloned
        until ``changed_ranges(build_id)`` has read it. The VM's copy keeps its name too,
        for ``take`` (until ``let_go``)."""
        async with self._locks.setdefault(build_id, asyncio.Lock()):
            self._unread[build_id] = asyncio.Event()
            try:
                await self._disks.adopt(f"{vm}.mem", self.image_id(build_id))
            except BaseException:
                self.allow_clones(build_id)
                raise
            self._kept_names[build_id] = vm

    async def changed_ranges(self, build_id: UUID) -> list[tuple[int, int]] | None:
        """Byte ranges of a kept image that may differ from the memory its VM was restored
        from: the extents it no longer shares with any file (the guest wrote them; see
        ``VmMemory.changed_ranges``). None when the filesystem cannot tell. Clones of the image
        are allowed from here on."""
        try:
            return await asyncio.to_thread(extents.unshared_ranges, self.image_path(build_id))
        except OSError as err:
            _log.warning("memory.extents_unknown", build_id=str(build_id), error=str(err))
            return None
        finally:
            self.allow_clones(build_id)

    def allow_clones(self, build_id: UUID) -> None:
        """Clones of a kept image may be made from here on (idempotent)."""
        unread = self._unread.pop(build_id, None)
        if unread is not None:
            unread.set()

    async def drop(self, build_id: UUID) -> None:
        """Forget ``build_id``'s image (copies made from it keep their blocks). A name its
        paused VM's copy kept is left to the VM (a failed pause runs on with it)."""
        self._kept_names.pop(build_id, None)
        async with self._locks.setdefault(build_id, asyncio.Lock()):
            with contextlib.suppress(NotFound):
                await self._disks.delete_template(self.image_id(build_id))
            self.allow_clones(build_id)
        self._locks.pop(build_id, None)


class VmMemory:
    """One VM's own memory copy, reflinked from ``source``'s image. ``release`` (once the VM
    is gone) deletes it (an image ``keep`` made of it stays)."""

    def __init__(self, images: MemoryImages, vm: str, source: UUID) -> None:
        self._images = images
        self.vm = vm
        self.source = source

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

    async def keep_as(self, build_id: UUID) -> None:
        """``MemoryImages.keep``: this copy becomes ``build_id``'s image."""
        await self._images.keep(build_id, self.vm)

    async def release(self) -> None:
        await self._images.delete_copy(self.vm)
