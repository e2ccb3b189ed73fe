"""The local snapshot store: layered builds, checksums, dependency-safe deletion."""

from __future__ import annotations

import random
from pathlib import Path
from uuid import UUID, uuid4

import pytest

from wrenn.agent.snapshots import DeviceInput, LocalSnapshotStore
from wrenn.agent.snapshots.held import boot_id
from wrenn.core.errors import AlreadyExists, Corrupted, FailedPrecondition, NotFound

PAGE = 4096
PAGES = 64


def _memory(seed: int, zero_every: int = 3) -> bytearray:
    rng = random.Random(seed)
    out = bytearray()
    for i in range(PAGES):
        out += bytes(PAGE) if i % zero_every == 0 else rng.randbytes(PAGE)
    return out


@pytest.fixture
def store(tmp_path: Path) -> LocalSnapshotStore:
    return LocalSnapshotStore(tmp_path / "store")


async def _chain(store: LocalSnapshotStore, tmp_path: Path) -> tuple[list[UUID], list[bytes]]:
    """A template and two pauses: the second one finds its dirty blocks by comparison."""
    memory = _memory(1)
    src = tmp_path / "mem"
    src.write_bytes(memory)
    (tmp_path / "state").write_bytes(b"vmstate-0")
    ids = [uuid4(), uuid4(), uuid4()]
    contents = [bytes(memory)]
    await store.create(
        ids[0], devices={"memfile": DeviceInput(src)}, files={"state": tmp_path / "state"}
    )
    memory[5 * PAGE : 7 * PAGE] = b"q" * 2 * PAGE
    memory[9 * PAGE : 10 * PAGE] = bytes(PAGE)
    src.write_bytes(memory)
    contents.append(bytes(memory))
    await store.create(
        ids[1], parent=ids[0], devices={"memfile": DeviceInput(src, dirty=[5, 6, 9])}
    )
    memory[PAGE * 30 : PAGE * 31] = b"z" * PAGE
    src.write_bytes(memory)
    contents.append(bytes(memory))
    manifest = await store.create(ids[2], parent=ids[1], devices={"memfile": DeviceInput(src)})
    assert manifest.devices["memfile"].stored_bytes == PAGE
    assert manifest.depends_on == {ids[0], ids[1]}
    return ids, contents


async def test_generations_read_back_and_materialize(
    store: LocalSnapshotStore, tmp_path: Path
) -> None:
    ids, contents = await _chain(store, tmp_path)
    for generation, (build, expected) in enumerate(zip(ids, contents, strict=True)):
        header = await store.header(build, "memfile")
        assert header.generation == generation
        assert header.base_build_id == ids[0]
        reader = await store.open_device(build, "memfile")
        with reader:
            assert reader.read(0, len(expected)) == expected
        out = tmp_path / f"flat-{generation}"
        await store.materialize(build, "memfile", out)
        assert out.read_bytes() == expected
    assert (await store.file(ids[0], "state")).read_bytes() == b"vmstate-0"
    assert await store.builds() == sorted(ids)
    stored = (await store.manifest(ids[0])).devices["memfile"].stored_bytes
    assert stored == sum(1 for i in range(PAGES) if i % 3) * PAGE


async def test_a_flipped_byte_refuses_the_restore_naming_build_and_file(
    store: LocalSnapshotStore, tmp_path: Path
) -> None:
    ids, _ = await _chain(store, tmp_path)
    layer = store.root / str(ids[1]) / "memfile"
    data = bytearray(layer.read_bytes())
    data[100] ^= 0xFF
    layer.write_bytes(data)
    fresh = LocalSnapshotStore(store.root)
    with pytest.raises(Corrupted, match=f"{ids[1]}: memfile fails its sha256 check"):
        await fresh.open_device(ids[2], "memfile")
    with pytest.raises(Corrupted, match=f"{ids[1]}: memfile"):
        await fresh.materialize(ids[2], "memfile", tmp_path / "out")
    # The template's own layer is intact and still opens.
    (await fresh.open_device(ids[0], "memfile")).close()


async def test_corrupt_header_state_and_missing_layer(
    store: LocalSnapshotStore, tmp_path: Path
) -> None:
    ids, _ = await _chain(store, tmp_path)
    header = store.root / str(ids[2]) / "memfile.header"
    header.write_bytes(header.read_bytes()[:-1] + b"\0")
    with pytest.raises(Corrupted, match=f"{ids[2]}: memfile.header"):
        await LocalSnapshotStore(store.root).header(ids[2], "memfile")
    state = store.root / str(ids[0]) / "state"
    state.write_bytes(b"vmstate-X")
    with pytest.raises(Corrupted, match=f"{ids[0]}: state fails"):
        await LocalSnapshotStore(store.root).file(ids[0], "state")
    (store.root / str(ids[0]) / "memfile").unlink()
    with pytest.raises(Corrupted, match=f"{ids[0]}: memfile is missing"):
        await LocalSnapshotStore(store.root).open_device(ids[1], "memfile")


async def test_a_build_others_read_from_cannot_be_deleted(
    store: LocalSnapshotStore, tmp_path: Path
) -> None:
    ids, contents = await _chain(store, tmp_path)
    assert await store.dependents(ids[0]) == {ids[1], ids[2]}
    with pytest.raises(FailedPrecondition, match=str(ids[2])):
        await store.delete(ids[1])
    await store.delete(ids[2])
    await store.delete(ids[1])
    assert await store.builds() == [ids[0]]
    assert not any((store.root / ".trash").iterdir())
    with pytest.raises(NotFound):
        await store.manifest(ids[1])
    with await store.open_device(ids[0], "memfile") as reader:
        assert reader.read(0, PAGES * PAGE) == contents[0]
    await store.delete(ids[0])
    assert await store.builds() == []


async def test_create_refuses_duplicates_and_missing_parents(
    store: LocalSnapshotStore, tmp_path: Path
) -> None:
    src = tmp_path / "mem"
    src.write_bytes(_memory(2))
    build = uuid4()
    await store.create(build, devices={"memfile": DeviceInput(src)})
    with pytest.raises(AlreadyExists):
        await store.create(build, devices={"memfile": DeviceInput(src)})
    with pytest.raises(NotFound):
        await store.create(uuid4(), parent=uuid4(), devices={"memfile": DeviceInput(src)})
    assert await store.builds() == [build]
    assert not any((store.root / ".staging").iterdir())


async def test_sweep_removes_leftovers_of_interrupted_writes(
    store: LocalSnapshotStore, tmp_path: Path
) -> None:
    src = tmp_path / "mem"
    src.write_bytes(_memory(8))
    build = uuid4()
    await store.create(build, devices={"memfile": DeviceInput(src)})
    (store.root / ".staging" / f"{uuid4()}-x").mkdir()
    (store.root / ".trash").mkdir()
    (store.root / ".trash" / f"{uuid4()}-y").mkdir()
    assert await store.sweep() == 2
    assert await store.sweep() == 0
    assert await store.builds() == [build]


async def test_unchanged_diff_stores_nothing_and_rootfs_is_its_own_device(
    store: LocalSnapshotStore, tmp_path: Path
) -> None:
    mem, disk = tmp_path / "mem", tmp_path / "disk"
    mem.write_bytes(_memory(3))
    disk.write_bytes(_memory(4, zero_every=2))
    first, second = uuid4(), uuid4()
    await store.create(first, devices={"memfile": DeviceInput(mem), "rootfs": DeviceInput(disk)})
    manifest = await store.create(
        second,
        parent=first,
        devices={"memfile": DeviceInput(mem), "rootfs": DeviceInput(disk, dirty=[])},
    )
    assert manifest.devices["memfile"].stored_bytes == 0
    assert manifest.devices["rootfs"].generation == 1
    assert (store.root / str(second) / "memfile").stat().st_size == 0
    with await store.open_device(second, "rootfs") as reader:
        assert reader.read(0, PAGES * PAGE) == disk.read_bytes()


async def test_prefetch_list_round_trips_with_its_checksum(
    store: LocalSnapshotStore, tmp_path: Path
) -> None:
    src = tmp_path / "mem"
    src.write_bytes(_memory(5))
    build = uuid4()
    await store.create(build, devices={"memfile": DeviceInput(src)}, prefetch=[PAGE * 3, 0])
    assert await store.prefetch(build) == [PAGE * 3, 0]
    await store.set_prefetch(build, [PAGE * 7, PAGE * 8])
    assert await LocalSnapshotStore(store.root).prefetch(build) == [PAGE * 7, PAGE * 8]
    path = store.root / str(build) / "prefetch"
    path.write_bytes(path.read_bytes()[:-8] + (PAGE * 9).to_bytes(8, "little"))
    with pytest.raises(Corrupted, match="prefetch fails"):
        await LocalSnapshotStore(store.root).prefetch(build)
    await store.set_prefetch(build, [])
    assert await store.prefetch(build) == []
    assert not path.exists()


async def test_a_sparse_diff_file_needs_only_its_dirty_pages(
    store: LocalSnapshotStore, tmp_path: Path
) -> None:
    """A VMM diff snapshot writes dirty pages at their offsets into an otherwise empty file."""
    from wrenn.agent.snapshots import dirty_blocks_from_sparse

    memory = _memory(6)
    full = tmp_path / "mem"
    full.write_bytes(memory)
    base = uuid4()
    await store.create(base, devices={"memfile": DeviceInput(full)})
    sparse = tmp_path / "diff"
    with sparse.open("wb") as f:
        f.truncate(len(memory))
        for page in (2, 3, 50):
            f.seek(page * PAGE)
            f.write(bytes([page]) * PAGE)
            memory[page * PAGE : (page + 1) * PAGE] = bytes([page]) * PAGE
    dirty = dirty_blocks_from_sparse(sparse, PAGE)
    assert dirty == [2, 3, 50]
    child = uuid4()
    await store.create(child, parent=base, devices={"memfile": DeviceInput(sparse, dirty=dirty)})
    with await store.open_device(child, "memfile") as reader:
        assert reader.read(0, len(memory)) == bytes(memory)
    assert (store.root / str(child) / "memfile").stat().st_size == 3 * PAGE


async def test_a_held_build_serves_its_state_then_is_stored_from_it(
    store: LocalSnapshotStore, tmp_path: Path
) -> None:
    """A pause holds the device state at once and stores the memory later: until then the
    state is served from the hold; ``complete`` stores the build with it; the hold stays (a
    path handed out stays valid) until the next sweep."""
    memory = _memory(9)
    mem, state = tmp_path / "mem", tmp_path / "state"
    mem.write_bytes(memory)
    parent = uuid4()
    await store.create(parent, devices={"memfile": DeviceInput(mem)})
    memory[4 * PAGE : 6 * PAGE] = b"h" * 2 * PAGE
    mem.write_bytes(memory)
    state.write_bytes(b"held-state")
    build = uuid4()
    held = await store.hold(build, parent=parent, files={"state": state})
    state.write_bytes(b"changed afterwards")
    assert held.this_boot and held.parent_id == parent
    assert [h.build_id for h in await store.held()] == [build]
    assert await store.builds() == [parent]
    served = await LocalSnapshotStore(store.root).file(build, "state")
    assert served.read_bytes() == b"held-state"
    with pytest.raises(AlreadyExists):
        await store.hold(build, parent=parent, files={"state": state})
    with pytest.raises(AlreadyExists):
        await store.create(build, devices={"memfile": DeviceInput(mem)})

    manifest = await store.complete(build, devices={"memfile": DeviceInput(mem)})
    assert manifest.parent_id == parent
    assert manifest.devices["memfile"].stored_bytes == 2 * PAGE
    assert await store.complete(build, devices={"memfile": DeviceInput(mem)}) == manifest
    assert await store.held() == []
    assert served.read_bytes() == b"held-state"
    assert (await store.file(build, "state")).read_bytes() == b"held-state"
    with await store.open_device(build, "memfile") as reader:
        assert reader.read(0, len(memory)) == bytes(memory)
    assert await store.sweep() == 1
    assert not served.exists()
    assert (await LocalSnapshotStore(store.root).file(build, "state")).read_bytes() == (
        b"held-state"
    )


async def test_held_files_are_checked_and_a_hold_can_be_released(
    store: LocalSnapshotStore, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.write_bytes(b"vm-state")
    build = uuid4()
    await store.hold(build, parent=None, files={"state": state})
    held_state = store.root / ".held" / str(build) / "state"
    held_state.write_bytes(b"vm-statX")
    with pytest.raises(Corrupted, match=f"{build}: state fails its sha256 check"):
        await LocalSnapshotStore(store.root).file(build, "state")
    await store.release(build)
    assert await store.held() == []
    with pytest.raises(NotFound):
        await store.file(build, "state")
    with pytest.raises(NotFound):
        await store.complete(build, devices={})


async def test_a_hold_records_its_boot_and_deleting_the_build_removes_it(
    store: LocalSnapshotStore, tmp_path: Path
) -> None:
    """Held files are not fsynced: a hold from an earlier boot of the host is marked as such.
    (The boot id is rewritten in the record, standing in for a host restart.)"""
    state, mem = tmp_path / "state", tmp_path / "mem"
    state.write_bytes(b"s")
    mem.write_bytes(_memory(10))
    build, other = uuid4(), uuid4()
    await store.hold(build, parent=None, files={"state": state})
    await store.hold(other, parent=None, files={"state": state})
    record = store.root / ".held" / str(other) / "held.json"
    record.write_text(record.read_text().replace(boot_id(), "an-earlier-boot"))
    assert {h.build_id: h.this_boot for h in await store.held()} == {build: True, other: False}
    await store.complete(build, devices={"memfile": DeviceInput(mem)})
    await store.delete(build)
    assert not (store.root / ".held" / str(build)).exists()
    assert await store.builds() == []
    assert [h.build_id for h in await store.held()] == [other]
