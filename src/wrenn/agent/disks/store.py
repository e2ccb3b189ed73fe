"""Copy-on-write disks: template rootfs images and the per-sandbox reflink copies made from
them, as raw files (Firecracker and QEMU both take them as they are).

Layout under ``root``:

    templates/<template_id>.img   imported once per template
    sandboxes/<disk_id>.img       a reflink copy of a template: O(1) in the image's size

``root`` must be on a filesystem with reflink (XFS, btrfs). Where it is not (ext4), the store
formats ``backing_file`` (default: ``<root>.xfs`` next to ``root``) as XFS once, mounts it on
``root`` while open and unmounts it on close. A mount left by a crashed agent is adopted.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from wrenn import log
from wrenn.agent.disks import extents, loopfs, reflink
from wrenn.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    from_os_error,
)

_log = log.get(__name__)

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TMP_MARK = ".tmp-"
_SUFFIX = ".img"
DEFAULT_BACKING_SIZE_BYTES = 64 * 2**30


@dataclass(frozen=True)
class DiskUsage:
    #: Apparent size: what the guest sees as the device size.
    size_bytes: int
    #: Blocks allocated to the file, shared or not (holes excluded).
    allocated_bytes: int
    #: Of those, bytes shared with other files (the template, other clones).
    shared_bytes: int

    @property
    def exclusive_bytes(self) -> int:
        """Bytes only this file holds: what deleting it frees."""
        return max(self.allocated_bytes - self.shared_bytes, 0)


@dataclass(frozen=True)
class StoreStats:
    total_bytes: int
    free_bytes: int
    #: "native" (root's own filesystem reflinks) or "loop" (XFS in ``backing_file``).
    mode: str
    #: Host space the backing file really takes (None in native mode).
    backing_allocated_bytes: int | None


def _check_id(kind: str, value: str) -> str:
    if not _ID_RE.match(value):
        raise InvalidArgument(f"invalid {kind} id: {value!r}")
    return value


class DiskStore:
    """Templates and sandbox disks under ``root``. Open before use (or ``async with``)."""

    def __init__(
        self,
        root: Path,
        *,
        backing_file: Path | None = None,
        backing_size_bytes: int = DEFAULT_BACKING_SIZE_BYTES,
    ) -> None:
        self.root = root
        self.backing_file = backing_file or root.with_name(root.name + ".xfs")
        self.backing_size_bytes = backing_size_bytes
        self._mounted = False
        self._open = False

    @property
    def mode(self) -> str:
        return "loop" if self._mounted else "native"

    # --- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        if self._open:
            raise FailedPrecondition("disk store already open")
        await asyncio.to_thread(self._open_sync)
        self._open = True
        _log.info("disks.store_opened", root=str(self.root), mode=self.mode)

    def _open_sync(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if loopfs.is_mounted_from(self.root, self.backing_file):
            self._mounted = True  # left mounted by an agent that did not shut down
        elif not reflink.supported(self.root):
            if os.geteuid() != 0:
                raise FailedPrecondition(
                    f"{self.root} has no reflink support and mounting a store needs root"
                )
            if not self.backing_file.exists():
                loopfs.create(self.backing_file, self.backing_size_bytes)
            loopfs.mount(self.backing_file, self.root)
            self._mounted = True
        try:
            if not reflink.supported(self.root):
                raise FailedPrecondition(f"{self.root} does not support reflink copies")
            for sub in ("templates", "sandboxes"):
                directory = self.root / sub
                directory.mkdir(exist_ok=True)
                for stale in directory.glob(f"*{_TMP_MARK}*"):
                    stale.unlink()
        except BaseException:
            self._close_sync()
            raise

    async def close(self) -> None:
        """Unmount the store if it mounted one. Idempotent; disks stay in the backing file."""
        await asyncio.to_thread(self._close_sync)
        self._open = False

    def _close_sync(self) -> None:
        if self._mounted:
            loopfs.unmount(self.root, self.backing_file)
            self._mounted = False

    async def __aenter__(self) -> DiskStore:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.shield(self.close())

    # --- paths -----------------------------------------------------------------------------

    def template_path(self, template_id: str) -> Path:
        return self.root / "templates" / f"{_check_id('template', template_id)}{_SUFFIX}"

    def disk_path(self, disk_id: str) -> Path:
        return self.root / "sandboxes" / f"{_check_id('disk', disk_id)}{_SUFFIX}"

    def _require_open(self) -> None:
        if not self._open:
            raise FailedPrecondition("disk store is not open")

    # --- templates -------------------------------------------------------------------------

    async def import_template(self, template_id: str, source: Path) -> Path:
        """Copy the rootfs image ``source`` into the store as ``template_id`` (reflinked
        when ``source`` is on the store's filesystem; holes kept either way)."""
        self._require_open()
        dest = self.template_path(template_id)
        await asyncio.to_thread(self._check_import, source, dest, template_id)
        tmp = self._tmp_for(dest)
        try:
            proc = await asyncio.create_subprocess_exec(
                "cp",
                "--reflink=auto",
                "--sparse=always",
                "--",
                str(source),
                str(tmp),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            _, stderr = await proc.communicate()
            if proc.returncode != 0:
                raise Internal(f"importing template {template_id} failed: {stderr.decode()}")
            await asyncio.to_thread(self._publish, tmp, dest, f"template {template_id}")
        finally:
            tmp.unlink(missing_ok=True)
        _log.info("disks.template_imported", template_id=template_id)
        return dest

    @staticmethod
    def _check_import(source: Path, dest: Path, template_id: str) -> None:
        if not source.is_file():
            raise NotFound(f"image not found: {source}")
        if dest.exists():
            raise AlreadyExists(f"template {template_id} already exists")

    async def adopt(self, disk_id: str, template_id: str) -> Path:
        """Make sandbox disk ``disk_id`` template ``template_id`` as well: the same file under a
        second name (a hard link: no copy, nothing written back). Only for a disk nothing
        writes any more; deleting the disk leaves the template."""
        self._require_open()
        src = self.disk_path(disk_id)
        dest = self.template_path(template_id)
        try:
            await asyncio.to_thread(self._publish, src, dest, f"template {template_id}")
        except FileNotFoundError as err:
            raise NotFound(f"disk {disk_id} not found") from err
        return dest

    def templates(self) -> list[str]:
        """Ids of every template in the store."""
        self._require_open()
        return sorted(
            p.name.removesuffix(_SUFFIX)
            for p in (self.root / "templates").glob(f"*{_SUFFIX}")
            if _TMP_MARK not in p.name
        )

    async def delete_template(self, template_id: str) -> None:
        """Remove a template; sandbox disks cloned from it keep their data."""
        self._require_open()
        await asyncio.to_thread(self._unlink, self.template_path(template_id), "template")

    # --- sandbox disks ---------------------------------------------------------------------

    async def clone(self, template_id: str, disk_id: str) -> Path:
        """A new sandbox disk sharing every block of the template until written."""
        self._require_open()
        src = self.template_path(template_id)
        dest = self.disk_path(disk_id)
        await asyncio.to_thread(self._clone_sync, src, dest, template_id, disk_id)
        _log.info("disks.cloned", template_id=template_id, disk_id=disk_id)
        return dest

    def _clone_sync(self, src: Path, dest: Path, template_id: str, disk_id: str) -> None:
        if not src.exists():
            raise NotFound(f"template {template_id} not found")
        if dest.exists():
            raise AlreadyExists(f"disk {disk_id} already exists")
        tmp = self._tmp_for(dest)
        try:
            reflink.clone(src, tmp)
            self._publish(tmp, dest, f"disk {disk_id}")
        except OSError as err:
            raise from_os_error(err, f"disk {disk_id}") from err
        finally:
            tmp.unlink(missing_ok=True)

    async def delete(self, disk_id: str) -> None:
        self._require_open()
        await asyncio.to_thread(self._unlink, self.disk_path(disk_id), "disk")
        _log.info("disks.deleted", disk_id=disk_id)

    def disks(self) -> list[str]:
        """Ids of every sandbox disk in the store."""
        self._require_open()
        return sorted(
            p.name.removesuffix(_SUFFIX)
            for p in (self.root / "sandboxes").glob(f"*{_SUFFIX}")
            if _TMP_MARK not in p.name
        )

    # --- sizes -----------------------------------------------------------------------------

    async def disk_usage(self, disk_id: str) -> DiskUsage:
        self._require_open()
        return await asyncio.to_thread(self._usage, self.disk_path(disk_id), f"disk {disk_id}")

    async def template_usage(self, template_id: str) -> DiskUsage:
        self._require_open()
        path = self.template_path(template_id)
        return await asyncio.to_thread(self._usage, path, f"template {template_id}")

    async def stats(self) -> StoreStats:
        self._require_open()
        return await asyncio.to_thread(self._stats_sync)

    def _stats_sync(self) -> StoreStats:
        st = os.statvfs(self.root)
        backing = None
        if self._mounted:
            backing = os.stat(self.backing_file).st_blocks * 512
        return StoreStats(
            total_bytes=st.f_blocks * st.f_frsize,
            free_bytes=st.f_bavail * st.f_frsize,
            mode=self.mode,
            backing_allocated_bytes=backing,
        )

    # --- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _tmp_for(dest: Path) -> Path:
        return dest.with_name(f"{dest.name}{_TMP_MARK}{uuid.uuid4().hex}")

    @staticmethod
    def _publish(tmp: Path, dest: Path, what: str) -> None:
        """Make ``tmp`` visible as ``dest``; fails rather than replace an existing file."""
        try:
            os.link(tmp, dest)
        except FileExistsError as err:
            raise AlreadyExists(f"{what} already exists") from err

    @staticmethod
    def _unlink(path: Path, kind: str) -> None:
        try:
            path.unlink()
        except FileNotFoundError as err:
            raise NotFound(f"{kind} {path.stem} not found") from err

    @staticmethod
    def _usage(path: Path, what: str) -> DiskUsage:
        try:
            st = os.stat(path)
            mapped = extents.usage(path)
        except FileNotFoundError as err:
            raise NotFound(f"{what} not found") from err
        return DiskUsage(
            size_bytes=st.st_size,
            allocated_bytes=st.st_blocks * 512,
            shared_bytes=mapped.shared_bytes,
        )
