"""Where builds live: ``<root>/<build-id>/`` holds, per device (``memfile``, ``rootfs``), the
build's own blocks (``<device>``) and its header (``<device>.header``), plus plain artifacts
(``state``), an optional ``prefetch`` list, and ``manifest.json`` (sha256 and size of every
file, recorded at write time, and the builds its headers read from).

A build appears atomically: it is written under ``.staging/`` and renamed into place. Every
file is checked against its recorded sha256 before use; a mismatch raises ``Corrupted``
naming the build and the file. A build that others depend on cannot be deleted.

A build can also be *held* before it is stored: its plain files (``state``) are kept under
``.held/<build-id>/`` with their checksums, its parent and the host's boot id, while its
devices are still elsewhere (a paused QEMU guest's memory file). ``file`` serves a held build's
files; ``complete`` stores the build from them plus its devices. The hold stays until the build
is deleted or the next ``sweep`` (a path ``file`` returned for it stays valid meanwhile). Held
files are written without fsync: a held build is only usable in the boot that held it
(``HeldBuild.this_boot``), since a host crash may have lost them, as it may have lost the
unsynced memory file beside them.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Mapping as MappingOf
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol
from uuid import UUID

from wrenn.agent.snapshots import header as hdr
from wrenn.agent.snapshots import prefetch as prefetch_codec
from wrenn.agent.snapshots.diff import find_dirty_blocks, write_diff
from wrenn.agent.snapshots.header import Header
from wrenn.agent.snapshots.held import HeldBuild, boot_id
from wrenn.agent.snapshots.manifest import DeviceRecord, FileRecord, Manifest
from wrenn.agent.snapshots.reader import Reader
from wrenn.core.errors import (
    AlreadyExists,
    Corrupted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from wrenn.log import get

log = get(__name__)

MANIFEST = "manifest.json"
PREFETCH = "prefetch"
HELD = "held.json"
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_RESERVED = {MANIFEST, PREFETCH}


@dataclass(frozen=True)
class DeviceInput:
    """A device's contents now, for a new build."""

    #: The full device (or a sparse file holding at least the dirty blocks at their offsets).
    source: Path
    #: Indices of blocks changed since the parent; None: found by comparing with the parent.
    dirty: Sequence[int] | None = None
    #: ``(offset, length)`` byte ranges outside which the device is known to equal the parent
    #: (a reflink copy of the parent's contents shares every block nobody wrote); the
    #: comparison then reads only these. None: the whole device.
    changed_ranges: Sequence[tuple[int, int]] | None = None
    #: Only for a device the parent lacks (generation 0).
    block_size: int = 4096


class SnapshotStore(Protocol):
    """Builds (template, pause, named snapshot) and their layered device files."""

    async def create(
        self,
        build_id: UUID,
        *,
        parent: UUID | None = None,
        devices: MappingOf[str, DeviceInput] | None = None,
        files: MappingOf[str, Path] | None = None,
        prefetch: Sequence[int] = (),
    ) -> Manifest:
        """Store a new build: each device as a diff over ``parent``'s (generation 0 where the
        parent has none), each file copied. Refused if ``build_id`` exists."""

    async def hold(
        self, build_id: UUID, *, parent: UUID | None, files: MappingOf[str, Path]
    ) -> HeldBuild:
        """Keep ``files`` for a build whose devices are stored later (``complete``); ``file``
        serves them meanwhile. Refused if ``build_id`` exists or is held."""

    async def complete(self, build_id: UUID, *, devices: MappingOf[str, DeviceInput]) -> Manifest:
        """Store a held build: its devices as diffs over its parent's, and its held files. A
        build already stored is returned as it is."""

    async def held(self) -> list[HeldBuild]:
        """Every held build not stored yet (of this boot or an earlier one)."""

    async def release(self, build_id: UUID) -> None:
        """Forget a hold (its files go; a stored build of that id stays)."""

    async def manifest(self, build_id: UUID) -> Manifest: ...

    async def header(self, build_id: UUID, device: str) -> Header:
        """The verified header of ``device`` in ``build_id``."""

    async def open_device(self, build_id: UUID, device: str) -> Reader:
        """A reader over ``device`` with every layer it needs verified. Close it after use."""

    async def file(self, build_id: UUID, name: str) -> Path:
        """The verified path of a plain artifact (``state``) of a stored or held build."""

    async def materialize(self, build_id: UUID, device: str, dest: Path) -> None:
        """Write the whole device as one flat (sparse where zero) file at ``dest``."""

    async def prefetch(self, build_id: UUID) -> list[int]:
        """The recorded prefetch offsets; empty if none were recorded."""

    async def set_prefetch(self, build_id: UUID, offsets: Sequence[int]) -> None: ...

    async def dependents(self, build_id: UUID) -> frozenset[UUID]:
        """Builds whose headers read from ``build_id``."""

    async def delete(self, build_id: UUID) -> None:
        """Remove a build; ``FailedPrecondition`` while other builds depend on it."""

    async def builds(self) -> list[UUID]: ...


class LocalSnapshotStore:
    """``SnapshotStore`` in a local directory. Blocking work runs on worker threads; one lock
    orders creations and deletions so that no build is removed while one referencing it is
    committed. Checksums are verified once per process for each unchanged file (same inode,
    size and mtime)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._verified: dict[tuple[UUID, str], tuple[int, int, int, int]] = {}

    # -- paths -------------------------------------------------------------------------------

    def _dir(self, build_id: UUID) -> Path:
        return self.root / str(build_id)

    def _held_dir(self, build_id: UUID) -> Path:
        return self.root / ".held" / str(build_id)

    def _stored(self, build_id: UUID) -> bool:
        return (self._dir(build_id) / MANIFEST).is_file()

    def _require(self, build_id: UUID) -> Path:
        path = self._dir(build_id)
        if not (path / MANIFEST).is_file():
            raise NotFound(f"snapshot build {build_id} not found")
        return path

    # -- writing -----------------------------------------------------------------------------

    async def create(
        self,
        build_id: UUID,
        *,
        parent: UUID | None = None,
        devices: MappingOf[str, DeviceInput] | None = None,
        files: MappingOf[str, Path] | None = None,
        prefetch: Sequence[int] = (),
    ) -> Manifest:
        return await asyncio.to_thread(
            self._create, build_id, parent, dict(devices or {}), dict(files or {}), prefetch
        )

    def _create(
        self,
        build_id: UUID,
        parent: UUID | None,
        devices: dict[str, DeviceInput],
        files: dict[str, Path],
        prefetch: Sequence[int],
    ) -> Manifest:
        if build_id == hdr.NIL_BUILD_ID:
            raise InvalidArgument("the nil build id cannot name a build")
        names = [*devices, *(f"{d}.header" for d in devices), *files]
        for name in [*devices, *files]:
            if not _NAME.match(name) or name in _RESERVED:
                raise InvalidArgument(f"invalid artifact name {name!r}")
        if len(set(names)) != len(names):
            raise InvalidArgument("artifact names collide")
        if self._dir(build_id).exists() or self._held_dir(build_id).exists():
            raise AlreadyExists(f"snapshot build {build_id} already exists")
        return self._write_build(build_id, parent, devices, files, prefetch)

    def _write_build(
        self,
        build_id: UUID,
        parent: UUID | None,
        devices: dict[str, DeviceInput],
        files: dict[str, Path],
        prefetch: Sequence[int],
    ) -> Manifest:
        parent_manifest = self._manifest(parent) if parent is not None else None
        staging_root = self.root / ".staging"
        staging_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{build_id}-", dir=staging_root))
        try:
            records: dict[str, FileRecord] = {}
            device_records: dict[str, DeviceRecord] = {}
            depends: set[UUID] = set()
            for name, device in devices.items():
                parent_header = (
                    self._header(parent, name)
                    if parent is not None and parent_manifest and name in parent_manifest.devices
                    else None
                )
                dirty = device.dirty
                if dirty is None and parent_header is not None:
                    assert parent is not None
                    with self._open_device(parent, name) as parent_reader:
                        dirty = find_dirty_blocks(
                            device.source,
                            parent_reader,
                            parent_header.block_size,
                            ranges=device.changed_ranges,
                        )
                result = write_diff(
                    parent=parent_header,
                    source=device.source,
                    dirty=dirty,
                    dest=staging / name,
                    build_id=build_id,
                    block_size=device.block_size,
                )
                records[name] = FileRecord(result.sha256, result.stored_bytes)
                encoded = hdr.encode(result.header)
                _write(staging / f"{name}.header", encoded)
                records[f"{name}.header"] = FileRecord(
                    hashlib.sha256(encoded).hexdigest(), len(encoded)
                )
                device_records[name] = DeviceRecord(
                    generation=result.header.generation,
                    size_bytes=result.header.size_bytes,
                    block_size=result.header.block_size,
                    stored_bytes=result.stored_bytes,
                )
                depends |= result.header.dependencies()
                log.info(
                    "snapshot.device_written",
                    build_id=str(build_id),
                    device=name,
                    generation=result.header.generation,
                    dirty_blocks=result.dirty_blocks,
                    zero_blocks=result.zero_blocks,
                    stored_bytes=result.stored_bytes,
                    mappings=len(result.header.mappings),
                )
            for name, src in files.items():
                shutil.copyfile(src, staging / name)
                records[name] = _record(staging / name)
            if prefetch:
                _write(staging / PREFETCH, prefetch_codec.encode(prefetch))
                records[PREFETCH] = _record(staging / PREFETCH)
            depends.discard(build_id)
            manifest = Manifest(
                build_id=build_id,
                parent_id=parent,
                created_at=datetime.now(UTC).isoformat(),
                devices=device_records,
                files=records,
                depends_on=frozenset(depends),
            )
            _write(staging / MANIFEST, manifest.to_json().encode())
            with self._lock:
                for dep in manifest.depends_on:
                    self._require(dep)
                if self._dir(build_id).exists():
                    raise AlreadyExists(f"snapshot build {build_id} already exists")
                staging.rename(self._dir(build_id))
                _fsync_dir(self.root)
                # Hashed while written: the next use (this build as a parent) need not read
                # its files again to check them.
                for name in records:
                    self._remember_verified(build_id, name, self._dir(build_id) / name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("snapshot.created", build_id=str(build_id), parent_id=str(parent))
        return manifest

    async def set_prefetch(self, build_id: UUID, offsets: Sequence[int]) -> None:
        await asyncio.to_thread(self._set_prefetch, build_id, list(offsets))

    def _set_prefetch(self, build_id: UUID, offsets: list[int]) -> None:
        with self._lock:
            path = self._require(build_id)
            manifest = self._manifest(build_id)
            files = dict(manifest.files)
            if offsets:
                _write_atomic(path / PREFETCH, prefetch_codec.encode(offsets))
                files[PREFETCH] = _record(path / PREFETCH)
            else:
                (path / PREFETCH).unlink(missing_ok=True)
                files.pop(PREFETCH, None)
            updated = Manifest(
                manifest.build_id,
                manifest.parent_id,
                manifest.created_at,
                manifest.devices,
                files,
                manifest.depends_on,
            )
            _write_atomic(path / MANIFEST, updated.to_json().encode())
            self._verified.pop((build_id, PREFETCH), None)

    # -- held builds -------------------------------------------------------------------------

    async def hold(
        self, build_id: UUID, *, parent: UUID | None, files: MappingOf[str, Path]
    ) -> HeldBuild:
        return await asyncio.to_thread(self._hold, build_id, parent, dict(files))

    def _hold(self, build_id: UUID, parent: UUID | None, files: dict[str, Path]) -> HeldBuild:
        if build_id == hdr.NIL_BUILD_ID:
            raise InvalidArgument("the nil build id cannot name a build")
        for name in files:
            if not _NAME.match(name) or name in _RESERVED or name.endswith(".header"):
                raise InvalidArgument(f"invalid artifact name {name!r}")
        if self._dir(build_id).exists() or self._held_dir(build_id).exists():
            raise AlreadyExists(f"snapshot build {build_id} already exists")
        staging_root = self.root / ".staging"
        staging_root.mkdir(parents=True, exist_ok=True)
        (self.root / ".held").mkdir(exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{build_id}-", dir=staging_root))
        try:
            records: dict[str, FileRecord] = {}
            for name, src in files.items():
                digest = hashlib.sha256()
                with src.open("rb") as f_in, (staging / name).open("wb") as f_out:
                    while chunk := f_in.read(1 << 20):
                        digest.update(chunk)
                        f_out.write(chunk)
                records[name] = FileRecord(digest.hexdigest(), (staging / name).stat().st_size)
            held = HeldBuild(build_id, parent, boot_id(), records)
            (staging / HELD).write_text(held.to_json())
            with self._lock:
                if self._dir(build_id).exists() or self._held_dir(build_id).exists():
                    raise AlreadyExists(f"snapshot build {build_id} already exists")
                staging.rename(self._held_dir(build_id))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for name in records:
            self._remember_verified(build_id, name, self._held_dir(build_id) / name)
        log.info("snapshot.held", build_id=str(build_id), parent_id=str(parent))
        return held

    async def complete(self, build_id: UUID, *, devices: MappingOf[str, DeviceInput]) -> Manifest:
        return await asyncio.to_thread(self._complete, build_id, dict(devices))

    def _complete(self, build_id: UUID, devices: dict[str, DeviceInput]) -> Manifest:
        if self._stored(build_id):
            return self._manifest(build_id)
        held = self._held(build_id)
        files = {name: self._verify_held(held, name) for name in held.files}
        try:
            return self._write_build(build_id, held.parent_id, devices, files, ())
        except AlreadyExists:
            return self._manifest(build_id)

    async def held(self) -> list[HeldBuild]:
        return await asyncio.to_thread(self._held_builds)

    def _held_builds(self) -> list[HeldBuild]:
        root = self.root / ".held"
        if not root.is_dir():
            return []
        out = []
        for entry in sorted(root.iterdir()):
            try:
                build_id = UUID(entry.name)
                if not self._stored(build_id):
                    out.append(self._held(build_id))
            except (ValueError, NotFound, Corrupted) as err:
                log.warning("snapshot.held_unreadable", path=str(entry), error=str(err))
        return out

    def _held(self, build_id: UUID) -> HeldBuild:
        path = self._held_dir(build_id) / HELD
        try:
            text = path.read_text()
        except FileNotFoundError as err:
            raise NotFound(f"snapshot build {build_id} is not held") from err
        return HeldBuild.from_json(text, source=f"held snapshot build {build_id}")

    async def release(self, build_id: UUID) -> None:
        await asyncio.to_thread(self._release, build_id)

    def _release(self, build_id: UUID) -> None:
        with self._lock:
            directory = self._held_dir(build_id)
            if not directory.exists():
                return
            trash = self.root / ".trash"
            trash.mkdir(exist_ok=True)
            doomed = Path(tempfile.mkdtemp(prefix=f"{build_id}-held-", dir=trash))
            directory.rename(doomed / "held")
            if not self._stored(build_id):
                self._verified = {k: v for k, v in self._verified.items() if k[0] != build_id}
        shutil.rmtree(doomed, ignore_errors=True)
        log.info("snapshot.released", build_id=str(build_id))

    def _verify_held(self, held: HeldBuild, name: str) -> Path:
        record = held.files.get(name)
        if record is None:
            raise NotFound(f"held snapshot build {held.build_id} has no file {name!r}")
        return self._check(held.build_id, name, self._held_dir(held.build_id) / name, record)

    # -- reading -----------------------------------------------------------------------------

    async def manifest(self, build_id: UUID) -> Manifest:
        return await asyncio.to_thread(self._manifest, build_id)

    def _manifest(self, build_id: UUID) -> Manifest:
        path = self._require(build_id) / MANIFEST
        return Manifest.from_json(path.read_text(), source=f"snapshot build {build_id}")

    async def header(self, build_id: UUID, device: str) -> Header:
        return await asyncio.to_thread(self._header, build_id, device)

    def _header(self, build_id: UUID, device: str) -> Header:
        manifest = self._manifest(build_id)
        if device not in manifest.devices:
            raise NotFound(f"snapshot build {build_id} has no device {device!r}")
        path = self._verify(build_id, f"{device}.header", manifest)
        header = hdr.decode(path.read_bytes(), source=f"snapshot build {build_id}: {path.name}")
        if header.build_id != build_id:
            raise Corrupted(f"snapshot build {build_id}: {path.name} names build {header.build_id}")
        return header

    async def open_device(self, build_id: UUID, device: str) -> Reader:
        return await asyncio.to_thread(self._open_device, build_id, device)

    def _open_device(self, build_id: UUID, device: str) -> Reader:
        header = self._header(build_id, device)
        return Reader(header, self._layers(header, device))

    def _layers(self, header: Header, device: str) -> dict[UUID, Path]:
        layers: dict[UUID, Path] = {}
        for dep in header.dependencies():
            try:
                layers[dep] = self._verify(dep, device)
            except NotFound as err:
                raise Corrupted(
                    f"snapshot build {header.build_id}: layer {device} of build {dep} is missing"
                ) from err
        return layers

    async def file(self, build_id: UUID, name: str) -> Path:
        return await asyncio.to_thread(self._file, build_id, name)

    def _file(self, build_id: UUID, name: str) -> Path:
        if not self._stored(build_id) and self._held_dir(build_id).is_dir():
            return self._verify_held(self._held(build_id), name)
        return self._verify(build_id, name)

    async def materialize(self, build_id: UUID, device: str, dest: Path) -> None:
        await asyncio.to_thread(self._materialize, build_id, device, dest)

    def _materialize(self, build_id: UUID, device: str, dest: Path) -> None:
        header = self._header(build_id, device)
        layers = self._layers(header, device)
        fds: dict[UUID, int] = {}
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(out, header.size_bytes)
            for m in header.mappings:
                if m.is_zero:
                    continue
                if m.build_id not in fds:
                    fds[m.build_id] = os.open(layers[m.build_id], os.O_RDONLY | os.O_CLOEXEC)
                _copy_range(fds[m.build_id], m.build_offset, out, m.offset, m.length)
            os.fsync(out)
        finally:
            os.close(out)
            for fd in fds.values():
                os.close(fd)

    async def prefetch(self, build_id: UUID) -> list[int]:
        return await asyncio.to_thread(self._prefetch, build_id)

    def _prefetch(self, build_id: UUID) -> list[int]:
        manifest = self._manifest(build_id)
        if PREFETCH not in manifest.files:
            return []
        path = self._verify(build_id, PREFETCH, manifest)
        return prefetch_codec.decode(path.read_bytes(), source=f"snapshot build {build_id}")

    async def builds(self) -> list[UUID]:
        return await asyncio.to_thread(self._builds)

    def _builds(self) -> list[UUID]:
        if not self.root.is_dir():
            return []
        out = []
        for entry in self.root.iterdir():
            try:
                build_id = UUID(entry.name)
            except ValueError:
                continue
            if (entry / MANIFEST).is_file():
                out.append(build_id)
        return sorted(out)

    # -- dependencies and deletion -------------------------------------------------------------

    async def dependents(self, build_id: UUID) -> frozenset[UUID]:
        return await asyncio.to_thread(self._dependents, build_id)

    def _dependents(self, build_id: UUID) -> frozenset[UUID]:
        return frozenset(
            other
            for other in self._builds()
            if other != build_id and build_id in self._manifest(other).depends_on
        )

    async def delete(self, build_id: UUID) -> None:
        await asyncio.to_thread(self._delete, build_id)

    def _delete(self, build_id: UUID) -> None:
        with self._lock:
            path = self._require(build_id)
            dependents = self._dependents(build_id)
            if dependents:
                names = ", ".join(sorted(str(d) for d in dependents))
                raise FailedPrecondition(
                    f"snapshot build {build_id} is a layer of {len(dependents)} other "
                    f"build(s): {names}"
                )
            trash = self.root / ".trash"
            trash.mkdir(exist_ok=True)
            doomed = Path(tempfile.mkdtemp(prefix=f"{build_id}-", dir=trash))
            path.rename(doomed / "build")
            if self._held_dir(build_id).exists():
                self._held_dir(build_id).rename(doomed / "held")
            self._verified = {k: v for k, v in self._verified.items() if k[0] != build_id}
        shutil.rmtree(doomed, ignore_errors=True)
        log.info("snapshot.deleted", build_id=str(build_id))

    async def sweep(self) -> int:
        """Remove what an interrupted create or delete left behind, the holds of builds stored
        since and unreadable holds (call at start, before any create). Returns how many
        leftovers went."""
        return await asyncio.to_thread(self._sweep)

    def _sweep(self) -> int:
        removed = 0
        with self._lock:
            for scratch in (self.root / ".staging", self.root / ".trash"):
                if scratch.is_dir():
                    for entry in scratch.iterdir():
                        shutil.rmtree(entry, ignore_errors=True)
                        removed += 1
            held = self.root / ".held"
            if held.is_dir():
                for entry in held.iterdir():
                    try:
                        build_id = UUID(entry.name)
                        done = self._stored(build_id)
                        self._held(build_id)
                    except (ValueError, NotFound, Corrupted):
                        done = True  # unreadable: nothing could use it
                    if done:
                        shutil.rmtree(entry, ignore_errors=True)
                        removed += 1
        if removed:
            log.info("snapshot.swept", leftovers=removed)
        return removed

    # -- integrity -------------------------------------------------------------------------------

    def _verify(self, build_id: UUID, name: str, manifest: Manifest | None = None) -> Path:
        """``name`` in ``build_id`` after checking it against the manifest's sha256."""
        manifest = manifest or self._manifest(build_id)
        record = manifest.files.get(name)
        if record is None:
            raise NotFound(f"snapshot build {build_id} has no file {name!r}")
        return self._check(build_id, name, self._dir(build_id) / name, record)

    def _check(self, build_id: UUID, name: str, path: Path, record: FileRecord) -> Path:
        """``path`` after checking it against ``record`` (once per unchanged file)."""
        try:
            st = path.stat()
        except FileNotFoundError as err:
            raise Corrupted(f"snapshot build {build_id}: {name} is missing") from err
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if self._verified.get((build_id, name)) == identity:
            return path
        if st.st_size != record.size_bytes:
            raise Corrupted(
                f"snapshot build {build_id}: {name} is {st.st_size} bytes, "
                f"{record.size_bytes} were written"
            )
        if sha256_file(path) != record.sha256:
            raise Corrupted(f"snapshot build {build_id}: {name} fails its sha256 check")
        self._verified[(build_id, name)] = identity
        return path

    def _remember_verified(self, build_id: UUID, name: str, path: Path) -> None:
        """``path`` was hashed as it was written: its next use need not read it again."""
        st = path.stat()
        self._verified[(build_id, name)] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def sha256_file(path: Path) -> str:
    """sha256 of a file, streamed."""
    with path.open("rb", buffering=0) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _record(path: Path) -> FileRecord:
    return FileRecord(sha256_file(path), path.stat().st_size)


def _write(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    _write(tmp, data)
    tmp.replace(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_range(src: int, src_offset: int, dst: int, dst_offset: int, length: int) -> None:
    """In-kernel copy where the filesystem allows it, plain reads and writes otherwise."""
    while length:
        try:
            n = os.copy_file_range(src, dst, length, src_offset, dst_offset)
        except OSError:
            n = 0
        if n <= 0:
            data = os.pread(src, min(length, 1 << 20), src_offset)
            if not data:
                raise Corrupted(f"layer ended {length} bytes early")
            n = os.pwrite(dst, data, dst_offset)
        src_offset += n
        dst_offset += n
        length -= n
