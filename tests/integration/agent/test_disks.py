"""The disk store against the real kernel: FICLONE, FIEMAP, XFS in a loop-mounted file."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from wrenn.agent.disks import DiskStore, loopfs, reflink
from wrenn.core.errors import AlreadyExists, InvalidArgument, NotFound

MIB = 2**20
GIB = 2**30


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A scratch directory whose store mount, loop device and files are removed at the end,
    also when the test fails."""
    path = Path(tempfile.mkdtemp(prefix="wrenn-disks-"))
    yield path
    loopfs.unmount(path / "disks", path / "disks.xfs")
    shutil.rmtree(path)


@pytest.fixture
def needs_loop_store(workdir: Path) -> None:
    if reflink.supported(workdir):
        pytest.skip("this filesystem reflinks natively: the store mounts nothing")
    if os.geteuid() != 0:
        pytest.skip("mounting the loop-backed store needs root")
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs (xfsprogs) not installed")


@pytest.fixture
async def store(workdir: Path, needs_loop_store: None) -> AsyncIterator[DiskStore]:
    async with DiskStore(workdir / "disks", backing_size_bytes=3 * GIB) as the_store:
        yield the_store


def write_image(path: Path, size_bytes: int) -> bytes:
    """Fill ``path`` with ``size_bytes`` of non-zero data (so nothing is a hole); returns the
    1 MiB pattern repeated through it."""
    pattern = os.urandom(MIB)
    with open(path, "wb") as f:
        for _ in range(size_bytes // MIB):
            f.write(pattern)
    return pattern


def write_sparse(path: Path, size_bytes: int, *, at: int, data: bytes) -> None:
    """A file of ``size_bytes`` that is all hole except ``data`` at ``at``."""
    with open(path, "wb") as f:
        f.truncate(size_bytes)
        f.seek(at)
        f.write(data)


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        os.fsync(f.fileno())


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def filefrag_extents(path: Path) -> list[str]:
    """The extent lines of ``filefrag -v`` (an independent view of FIEMAP)."""
    out = subprocess.run(
        ["filefrag", "-v", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return [line for line in out.splitlines() if line.strip()[:1].isdigit() and ":" in line]


async def test_on_a_filesystem_without_reflink_the_store_mounts_xfs_and_unmounts_it(
    workdir: Path, needs_loop_store: None
) -> None:
    root, backing = workdir / "disks", workdir / "disks.xfs"
    store = DiskStore(root, backing_size_bytes=3 * GIB)
    await store.open()
    try:
        mounted = loopfs.mount_at(root)
        assert mounted is not None and mounted.fstype == "xfs"
        assert len(loopfs.loops_of(backing)) == 1
        # Memory images mapped from it are read page by page, not megabytes around a fault.
        assert loopfs.read_ahead_kb(loopfs.loops_of(backing)[0]) == loopfs.READ_AHEAD_KB == 0
        assert store.mode == "loop"
        stats = await store.stats()
        assert stats.backing_allocated_bytes is not None
        assert stats.backing_allocated_bytes < stats.total_bytes
        source = workdir / "rootfs.img"
        write_image(source, 4 * MIB)
        await store.import_template("base", source)
        await store.clone("base", "sbx-1")
    finally:
        await store.close()

    assert loopfs.mount_at(root) is None
    assert loopfs.loops_of(backing) == []
    assert not (root / "sandboxes").exists()

    # Reopened: the same filesystem, disks still there.
    async with DiskStore(root, backing_size_bytes=3 * GIB) as again:
        assert again.disks() == ["sbx-1"]
    assert loopfs.mount_at(root) is None


async def test_a_mount_left_by_a_crashed_agent_is_adopted(
    workdir: Path, needs_loop_store: None
) -> None:
    root = workdir / "disks"
    crashed = DiskStore(root, backing_size_bytes=3 * GIB)
    await crashed.open()
    source = workdir / "rootfs.img"
    write_image(source, MIB)
    await crashed.import_template("base", source)
    del crashed  # never closed

    async with DiskStore(root, backing_size_bytes=3 * GIB) as store:
        assert store.mode == "loop"
        assert len(loopfs.loops_of(workdir / "disks.xfs")) == 1
        await store.clone("base", "after-crash")

    assert loopfs.mount_at(root) is None
    assert loopfs.loops_of(workdir / "disks.xfs") == []


async def test_a_clone_of_a_1_gib_image_shares_every_block(store: DiskStore) -> None:
    # Written on the store's filesystem, so the import itself is a reflink too.
    source = store.root / "incoming.img"
    write_image(source, GIB)
    await store.import_template("big", source)
    source.unlink()
    before = await store.stats()

    disk = await store.clone("big", "sbx-big")

    after = await store.stats()
    usage = await store.disk_usage("sbx-big")
    assert usage.size_bytes == GIB
    assert usage.shared_bytes == GIB
    assert usage.exclusive_bytes == 0
    # A full copy would take 1 GiB; the clone takes metadata at most.
    assert before.free_bytes - after.free_bytes < 16 * MIB
    lines = filefrag_extents(disk)
    assert lines
    assert all("shared" in line for line in lines)


async def test_writes_to_a_clone_reach_neither_the_template_nor_other_clones(
    store: DiskStore, workdir: Path
) -> None:
    source = workdir / "rootfs.img"
    pattern = write_image(source, 64 * MIB)
    template = await store.import_template("base", source)
    a = await store.clone("base", "a")
    b = await store.clone("base", "b")
    offset, data = 5 * MIB + 512, b"written by a" * 1000

    write_at(a, offset, data)

    original = (pattern * 2)[512 : 512 + len(data)]
    assert read_at(a, offset, len(data)) == data
    assert read_at(template, offset, len(data)) == original
    assert read_at(b, offset, len(data)) == original
    usage_a, usage_b = await store.disk_usage("a"), await store.disk_usage("b")
    assert usage_a.exclusive_bytes >= len(data)
    assert usage_b.exclusive_bytes == 0
    assert usage_b.shared_bytes == 64 * MIB


async def test_import_keeps_holes_of_a_sparse_image(store: DiskStore, workdir: Path) -> None:
    source = workdir / "sparse.img"
    write_sparse(source, 256 * MIB, at=100 * MIB, data=b"superblock" * 100)

    await store.import_template("sparse", source)

    usage = await store.template_usage("sparse")
    assert usage.size_bytes == 256 * MIB
    assert usage.allocated_bytes < MIB
    assert read_at(store.template_path("sparse"), 100 * MIB, 10) == b"superblock"


async def test_delete_and_the_errors_around_it(store: DiskStore, workdir: Path) -> None:
    source = workdir / "rootfs.img"
    write_image(source, 2 * MIB)
    await store.import_template("base", source)
    disk = await store.clone("base", "sbx-1")

    with pytest.raises(AlreadyExists):
        await store.clone("base", "sbx-1")
    with pytest.raises(AlreadyExists):
        await store.import_template("base", source)
    with pytest.raises(NotFound):
        await store.clone("missing", "sbx-2")
    with pytest.raises(InvalidArgument):
        await store.clone("base", "../escape")

    await store.delete("sbx-1")

    assert not disk.exists()
    assert store.disks() == []
    with pytest.raises(NotFound):
        await store.delete("sbx-1")
    with pytest.raises(NotFound):
        await store.disk_usage("sbx-1")
    # The template is untouched and can be removed on its own.
    await store.delete_template("base")
    assert not store.template_path("base").exists()


async def test_a_disk_and_a_template_can_be_one_file_under_two_names(
    store: DiskStore, workdir: Path
) -> None:
    """``adopt`` (a pause keeping a VM's memory as an image): a second name, no copy;
    removing one name leaves the other."""
    source = workdir / "memory.img"
    write_image(source, 2 * MIB)
    await store.import_template("base", source)
    disk = await store.clone("base", "vm-1.mem")

    image = await store.adopt("vm-1.mem", "mem-build")
    assert image.stat().st_ino == disk.stat().st_ino
    await store.delete("vm-1.mem")
    assert image.read_bytes() == source.read_bytes()

    with pytest.raises(NotFound):
        await store.adopt("vm-1.mem", "mem-other")
    await store.clone("base", "vm-2.mem")
    with pytest.raises(AlreadyExists):
        await store.adopt("vm-2.mem", "mem-build")
    await store.delete("vm-2.mem")
    await store.delete_template("mem-build")
