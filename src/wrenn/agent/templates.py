"""Template snapshots: the only place guests cold-boot.

    build   image rootfs → CoW disk → slot → boot → envd /health → /snapshot/prepare →
            close idle envd connections → pause → snapshot → build stored (generation 0) →
            VM stopped → the disk becomes the template's disk image → record written

A build's memory and VM state live in the snapshot store; its disk is a reflinked image in the
disk store (``disks/templates/<build-id>.img``), which every sandbox disk is cloned from.

The base template is built from the base image once per (image key, runtime, vCPUs, memory)
and cached; ``base()`` returns the cached one or builds it, one build at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path

from wrenn import log
from wrenn.agent import guestinfo, instance
from wrenn.agent.catalog import Catalog, TemplateRecord
from wrenn.agent.cleanup import finish
from wrenn.agent.disks import DiskStore
from wrenn.agent.images import GuestImage
from wrenn.agent.instance import ColdBoot, HostResources, Shape
from wrenn.core.errors import NotFound

_log = log.get(__name__)

BASE_TEMPLATE = "base"


def image_template_id(image: GuestImage) -> str:
    """The disk store's copy of an image's root filesystem."""
    return f"image-{image.name}-{image.key}"


class Templates:
    def __init__(
        self,
        host: HostResources,
        disks: DiskStore,
        catalog: Catalog,
        base_image: GuestImage,
        pins: set[uuid.UUID],
    ) -> None:
        self._host = host
        self._disks = disks
        self._catalog = catalog
        self.base_image = base_image
        #: Builds being written and not yet recorded: garbage collection leaves them alone.
        self._pins = pins
        self._base_lock = asyncio.Lock()

    def _base_shape(self) -> tuple[int, int]:
        settings = self._host.settings
        return settings.default_vcpus, settings.default_memory_mib

    async def usable(self, record: TemplateRecord) -> bool:
        """Whether ``record``'s build, disk image and guest image are all still here."""
        if record.runtime != self._host.runtime.label:
            return False
        try:
            await self._host.store.manifest(record.build_id)
        except NotFound:
            return False
        disk = self._disks.template_path(str(record.build_id))
        return await asyncio.to_thread(disk.exists)

    async def cached_base(self) -> TemplateRecord | None:
        """The base template if it was built from the current image, runtime and shape."""
        record = self._catalog.templates.get(BASE_TEMPLATE)
        if record is None:
            return None
        vcpus, memory_mib = self._base_shape()
        if (record.image_key, record.vcpus, record.memory_mib) != (
            self.base_image.key,
            vcpus,
            memory_mib,
        ):
            return None
        return record if await self.usable(record) else None

    async def base(self) -> TemplateRecord:
        """The base template, built now if it is missing or stale."""
        async with self._base_lock:
            record = await self.cached_base()
            if record is None:
                vcpus, memory_mib = self._base_shape()
                record = await self.build(BASE_TEMPLATE, self.base_image, vcpus, memory_mib)
            return record

    async def _image_disk(self, image: GuestImage) -> str:
        template_id = image_template_id(image)
        if not await asyncio.to_thread(self._disks.template_path(template_id).exists):
            await self._disks.import_template(template_id, image.rootfs)
        return template_id

    async def build(
        self, template_id: str, image: GuestImage, vcpus: int, memory_mib: int
    ) -> TemplateRecord:
        """Cold-boot ``image`` and snapshot it as ``template_id``'s new build. On failure
        nothing is left: not the VM, its slot, its disk, nor a partial build."""
        started = time.monotonic()
        envd_version = await guestinfo.envd_version(image.rootfs)
        image_disk = await self._image_disk(image)
        build_id = uuid.uuid4()
        store = self._host.store
        self._pins.add(build_id)
        try:
            async with contextlib.AsyncExitStack() as undo:
                disk_id = f"tpl-{build_id}"
                disk = await self._disks.clone(image_disk, disk_id)
                undo.push_async_callback(self._disks.delete, disk_id)
                shape = Shape(image=image, vcpus=vcpus, memory_mib=memory_mib, disk=disk)
                vm = await instance.start(
                    self._host, name=f"tpl-{template_id}", shape=shape, source=ColdBoot()
                )
                undo.push_async_callback(vm.close)
                booted_s = time.monotonic() - started
                await vm.capture(store, build_id, parent=None)
                failed = undo.pop_all()
                # Once stored, a failure must also drop the build and the disk image.
                undo.push_async_callback(self._forget_build, build_id)
                undo.push_async_callback(failed.aclose)
                await vm.close()
                await self._disks.import_template(str(build_id), disk)
                size = (await asyncio.to_thread(disk.stat)).st_size
                record = TemplateRecord(
                    template_id=template_id,
                    build_id=build_id,
                    vcpus=vcpus,
                    memory_mib=memory_mib,
                    runtime=self._host.runtime.label,
                    image_key=image.key,
                    image_dir=str(image.dir),
                    envd_version=envd_version,
                    disk_size_bytes=size,
                    created_at_ms=int(time.time() * 1000),
                )
                await self._catalog.templates.put(record)
                undo.pop_all()
                await finish(self._disks.delete(disk_id))
        finally:
            self._pins.discard(build_id)
        _log.info(
            "template.built",
            template_id=template_id,
            build_id=str(build_id),
            image=image.key,
            runtime=record.runtime,
            boot_s=round(booted_s, 2),
            total_s=round(time.monotonic() - started, 2),
        )
        return record

    async def _forget_build(self, build_id: uuid.UUID) -> None:
        with contextlib.suppress(NotFound):
            await self._host.store.delete(build_id)
        with contextlib.suppress(NotFound):
            await self._disks.delete_template(str(build_id))

    def template_disk(self, build_id: uuid.UUID) -> Path:
        return self._disks.template_path(str(build_id))
