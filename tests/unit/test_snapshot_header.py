"""Snapshot headers: codec, normalisation, and diffs read back through layers."""

from __future__ import annotations

import random
import tempfile
import zlib
from pathlib import Path
from uuid import UUID, uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wrenn.agent.snapshots import header as hdr
from wrenn.agent.snapshots.diff import (
    blocks_from_bitmap,
    dirty_blocks_from_sparse,
    find_dirty_blocks,
    runs,
    write_diff,
)
from wrenn.agent.snapshots.header import NIL_BUILD_ID, Header, Mapping
from wrenn.agent.snapshots.reader import Reader
from wrenn.core.errors import Corrupted, InvalidArgument

BLOCK = 16
MAX_BUILD_BLOCK = 40


def _ids(n: int) -> list[UUID]:
    return [UUID(int=i + 1) for i in range(n)]


@st.composite
def headers(draw: st.DrawFn, block_sizes: tuple[int, ...] = (512, 4096, 1 << 21)) -> Header:
    """Valid headers with arbitrary (not necessarily normalised) mappings."""
    block_size = draw(st.sampled_from(block_sizes))
    lengths = draw(st.lists(st.integers(1, 8), min_size=0, max_size=30))
    builds = [NIL_BUILD_ID, *_ids(4)]
    mappings = []
    offset = 0
    for n in lengths:
        build = draw(st.sampled_from(builds))
        build_offset = (
            0 if build == NIL_BUILD_ID else draw(st.integers(0, MAX_BUILD_BLOCK)) * block_size
        )
        mappings.append(Mapping(offset, n * block_size, build, build_offset))
        offset += n * block_size
    return Header(
        block_size=block_size,
        size_bytes=offset,
        generation=draw(st.integers(0, 2**40)),
        build_id=uuid4(),
        base_build_id=uuid4(),
        mappings=tuple(mappings),
    )


@given(headers())
def test_codec_round_trips(header: Header) -> None:
    assert hdr.decode(hdr.encode(header)) == header


@given(headers(), st.data())
def test_codec_rejects_any_flipped_byte(header: Header, data: st.DataObject) -> None:
    raw = bytearray(hdr.encode(header))
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(Corrupted):
        hdr.decode(bytes(raw))


def test_codec_rejects_truncation_magic_and_version() -> None:
    header = hdr.initial(uuid4(), 8 * BLOCK, BLOCK)
    raw = hdr.encode(header)
    with pytest.raises(Corrupted, match="truncated"):
        hdr.decode(raw[:20])
    with pytest.raises(Corrupted, match="expected"):
        hdr.decode(raw[:-1])
    with pytest.raises(Corrupted, match="magic"):
        hdr.decode(b"X" + raw[1:])
    future = bytearray(raw)
    future[8] = 2
    body = bytes(future[:-4])
    with pytest.raises(Corrupted, match="version 2"):
        hdr.decode(body + zlib.crc32(body).to_bytes(4, "little"))


def test_codec_layout_is_little_endian_and_documented_size() -> None:
    build = UUID("00112233-4455-6677-8899-aabbccddeeff")
    header = hdr.initial(build, 4 * 4096, 4096, [Mapping(4096, 4096, build, 0)])
    raw = hdr.encode(header)
    assert raw[:8] == b"WRNSNAPH"
    assert int.from_bytes(raw[8:12], "little") == 1
    assert int.from_bytes(raw[16:24], "little") == 4096
    assert int.from_bytes(raw[24:32], "little") == 4 * 4096
    assert raw[40:56] == build.bytes
    assert int.from_bytes(raw[72:80], "little") == 3
    assert len(raw) == 80 + 3 * 40 + 4


def test_invalid_headers_are_refused() -> None:
    build = uuid4()
    with pytest.raises(InvalidArgument, match="power of two"):
        Header(3000, 0, 0, build, build, ())
    with pytest.raises(InvalidArgument, match="cover"):
        Header(BLOCK, 2 * BLOCK, 0, build, build, (Mapping(0, BLOCK, build, 0),))
    with pytest.raises(InvalidArgument, match="gap"):
        Header(
            BLOCK,
            2 * BLOCK,
            0,
            build,
            build,
            (Mapping(0, BLOCK, build, 0), Mapping(2 * BLOCK, BLOCK, build, 0)),
        )
    with pytest.raises(InvalidArgument, match="aligned"):
        Header(BLOCK, BLOCK, 0, build, build, (Mapping(0, BLOCK, build, 3),))


def _layer_bytes(header: Header, layers: dict[UUID, bytes]) -> bytes:
    """What the header reads back, computed by the simplest possible model."""
    out = bytearray()
    for m in header.mappings:
        if m.is_zero:
            out += bytes(m.length)
        else:
            out += layers[m.build_id][m.build_offset : m.build_offset + m.length]
    return bytes(out)


@given(headers(block_sizes=(16, 512)))
def test_normalisation_never_changes_what_reads_back(header: Header) -> None:
    rng = random.Random(0)
    layers = {
        b: rng.randbytes((MAX_BUILD_BLOCK + 8) * header.block_size) for b in header.dependencies()
    }
    normal = Header(
        header.block_size,
        header.size_bytes,
        header.generation,
        header.build_id,
        header.base_build_id,
        hdr.normalize(header.mappings),
    )
    assert _layer_bytes(normal, layers) == _layer_bytes(header, layers)
    assert len(normal.mappings) <= len(header.mappings)
    assert hdr.normalize(normal.mappings) == normal.mappings
    for a, b in zip(normal.mappings, normal.mappings[1:], strict=False):
        contiguous = a.build_id == b.build_id and (
            a.is_zero or a.build_offset + a.length == b.build_offset
        )
        assert not contiguous


@given(headers(block_sizes=(16, 512)), st.data())
def test_resolve_matches_the_model_on_any_range(header: Header, data: st.DataObject) -> None:
    if header.size_bytes == 0:
        return
    rng = random.Random(1)
    layers = {
        b: rng.randbytes((MAX_BUILD_BLOCK + 8) * header.block_size) for b in header.dependencies()
    }
    whole = _layer_bytes(header, layers)
    start = data.draw(st.integers(0, header.size_bytes - 1))
    length = data.draw(st.integers(1, header.size_bytes - start))
    got = bytearray()
    for m in header.resolve(start, length):
        got += (
            bytes(m.length)
            if m.is_zero
            else layers[m.build_id][m.build_offset : m.build_offset + m.length]
        )
    assert bytes(got) == whole[start : start + length]
    assert header.lookup(start).offset <= start < header.lookup(start).end


@st.composite
def generations(draw: st.DrawFn) -> tuple[bytes, list[dict[int, bytes]]]:
    """A device's first contents and a sequence of writes (block -> new bytes) per diff."""
    blocks = draw(st.integers(1, 48))
    block_data = st.one_of(st.just(bytes(BLOCK)), st.binary(min_size=BLOCK, max_size=BLOCK))
    first = b"".join(draw(st.lists(block_data, min_size=blocks, max_size=blocks)))
    steps = draw(
        st.lists(
            st.dictionaries(st.integers(0, blocks - 1), block_data, max_size=blocks), max_size=6
        )
    )
    return first, steps


@settings(max_examples=60, deadline=None)
@given(generations(), st.booleans())
def test_any_sequence_of_diffs_reads_back_as_the_full_memory(
    case: tuple[bytes, list[dict[int, bytes]]], compare: bool
) -> None:
    first, steps = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        memory = bytearray(first)
        source = root / "memory"
        source.write_bytes(memory)
        builds = [uuid4()]
        layers = {builds[0]: root / str(builds[0])}
        result = write_diff(
            parent=None,
            source=source,
            dirty=None,
            dest=layers[builds[0]],
            build_id=builds[0],
            block_size=BLOCK,
        )
        header = result.header
        assert result.stored_bytes == sum(
            BLOCK for i in range(0, len(first), BLOCK) if first[i : i + BLOCK] != bytes(BLOCK)
        )
        for step in steps:
            before = bytes(memory)
            for block, data in step.items():
                memory[block * BLOCK : (block + 1) * BLOCK] = data
            source.write_bytes(memory)
            changed = [
                i
                for i in range(len(memory) // BLOCK)
                if memory[i * BLOCK : (i + 1) * BLOCK] != before[i * BLOCK : (i + 1) * BLOCK]
            ]
            with Reader(header, layers) as parent:
                found = find_dirty_blocks(source, parent, BLOCK)
            assert found == changed
            build = uuid4()
            layers[build] = root / str(build)
            result = write_diff(
                parent=header,
                source=source,
                dirty=found if compare else list(step),
                dest=layers[build],
                build_id=build,
            )
            assert result.header.generation == header.generation + 1
            assert result.header.base_build_id == builds[0]
            assert layers[build].stat().st_size == result.stored_bytes
            header = result.header
            builds.append(build)
            assert hdr.normalize(header.mappings) == header.mappings
            with Reader(header, layers) as reader:
                assert reader.read(0, len(memory)) == bytes(memory)
                assert all(
                    reader.read(i * BLOCK, BLOCK) == memory[i * BLOCK : (i + 1) * BLOCK]
                    for i in range(len(memory) // BLOCK)
                )
            assert hdr.decode(hdr.encode(header)) == header


def test_extents_point_into_the_mapped_layers(tmp_path: Path) -> None:
    import ctypes

    build = uuid4()
    data = bytes(BLOCK) + b"a" * BLOCK + b"b" * BLOCK + bytes(BLOCK)
    (tmp_path / "src").write_bytes(data)
    result = write_diff(
        parent=None,
        source=tmp_path / "src",
        dirty=None,
        dest=tmp_path / "layer",
        build_id=build,
        block_size=BLOCK,
    )
    with Reader(result.header, {build: tmp_path / "layer"}) as reader:
        extents = list(reader.extents(0, len(data)))
        assert [(e.offset, e.length, e.address is None) for e in extents] == [
            (0, BLOCK, True),
            (BLOCK, 2 * BLOCK, False),
            (3 * BLOCK, BLOCK, True),
        ]
        address = extents[1].address
        assert address is not None
        assert ctypes.string_at(address, 2 * BLOCK) == b"a" * BLOCK + b"b" * BLOCK


def test_layer_shorter_than_the_header_needs_is_corrupted(tmp_path: Path) -> None:
    build = uuid4()
    header = hdr.initial(build, 4 * BLOCK, BLOCK, [Mapping(0, 4 * BLOCK, build, 0)])
    (tmp_path / "layer").write_bytes(b"x" * BLOCK)
    with pytest.raises(Corrupted, match="header needs"):
        Reader(header, {build: tmp_path / "layer"})


def test_bitmaps_runs_and_sparse_files(tmp_path: Path) -> None:
    assert blocks_from_bitmap(bytes([0b1000_0101, 0, 0b1]), 17) == [0, 2, 7, 16]
    with pytest.raises(InvalidArgument):
        blocks_from_bitmap(bytes([0, 0, 0b10]), 17)
    assert list(runs([5, 1, 2, 3, 9, 2])) == [(1, 3), (5, 1), (9, 1)]
    sparse = tmp_path / "sparse"
    with sparse.open("wb") as f:
        f.truncate(64 * 4096)
        f.seek(3 * 4096)
        f.write(b"x" * 4096)
        f.seek(40 * 4096)
        f.write(b"y" * 2 * 4096)
    assert dirty_blocks_from_sparse(sparse, 4096) == [3, 40, 41]
