"""The header of a snapshotted device (guest memory or rootfs): which build's file holds each
block, merged generation over generation, and its binary codec (layout in docs/snapshots.md).

Invariants of a valid header:
- mappings are sorted, contiguous, start at 0 and end at ``size_bytes``;
- every offset, length and build offset is a multiple of ``block_size`` (a power of two);
- a mapping to ``NIL_BUILD_ID`` reads as zeros and has build offset 0.
"""

from __future__ import annotations

import struct
import zlib
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from uuid import UUID

from wrenn.core.errors import Corrupted, InvalidArgument

#: The build id that means "no layer": its blocks read as zeros.
NIL_BUILD_ID = UUID(int=0)

MAGIC = b"WRNSNAPH"
VERSION = 1

_PREFIX = struct.Struct("<8sIIQQQ16s16sQ")
_MAPPING = struct.Struct("<QQ16sQ")
_CRC = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class Mapping:
    """``length`` bytes of the device at ``offset`` are stored in ``build_id``'s file at
    ``build_offset``."""

    offset: int
    length: int
    build_id: UUID
    build_offset: int

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def is_zero(self) -> bool:
        return self.build_id == NIL_BUILD_ID


@dataclass(frozen=True)
class Header:
    """Metadata of one build's view of a device plus the mappings covering all of it."""

    block_size: int
    size_bytes: int
    generation: int
    build_id: UUID
    base_build_id: UUID
    mappings: tuple[Mapping, ...]
    version: int = VERSION
    _starts: list[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _validate(self)
        object.__setattr__(self, "_starts", [m.offset for m in self.mappings])

    @property
    def block_count(self) -> int:
        return self.size_bytes // self.block_size

    def lookup(self, offset: int) -> Mapping:
        """The mapping that holds the byte at ``offset``."""
        if not 0 <= offset < self.size_bytes:
            raise InvalidArgument(f"offset {offset} outside the device (size {self.size_bytes})")
        return self.mappings[bisect_right(self._starts, offset) - 1]

    def resolve(self, offset: int, length: int) -> Iterator[Mapping]:
        """The mappings covering ``[offset, offset + length)``, clipped to that range, in order."""
        if length <= 0:
            return
        end = offset + length
        if offset < 0 or end > self.size_bytes:
            raise InvalidArgument(
                f"range {offset}+{length} outside the device (size {self.size_bytes})"
            )
        index = bisect_right(self._starts, offset) - 1
        while offset < end:
            mapping = self.mappings[index]
            stop = min(end, mapping.end)
            yield _clip(mapping, offset, stop)
            offset = stop
            index += 1

    def dependencies(self) -> frozenset[UUID]:
        """Every build whose file this header reads from (the nil build excluded)."""
        return frozenset(m.build_id for m in self.mappings if not m.is_zero)

    def stored_bytes(self, build_id: UUID) -> int:
        """How many bytes of the device are read from ``build_id``'s file."""
        return sum(m.length for m in self.mappings if m.build_id == build_id)


def _clip(mapping: Mapping, start: int, stop: int) -> Mapping:
    if start == mapping.offset and stop == mapping.end:
        return mapping
    shift = 0 if mapping.is_zero else start - mapping.offset
    return Mapping(start, stop - start, mapping.build_id, mapping.build_offset + shift)


def _validate(header: Header) -> None:
    bs = header.block_size
    if header.version != VERSION:
        raise InvalidArgument(f"unsupported header version {header.version}")
    if bs <= 0 or bs & (bs - 1):
        raise InvalidArgument(f"block size {bs} is not a power of two")
    if header.size_bytes < 0 or header.size_bytes % bs:
        raise InvalidArgument(f"size {header.size_bytes} is not a multiple of block size {bs}")
    if header.generation < 0:
        raise InvalidArgument(f"negative generation {header.generation}")
    position = 0
    for m in header.mappings:
        if m.offset != position:
            raise InvalidArgument(f"mapping at {m.offset} leaves a gap or overlap at {position}")
        if m.length <= 0 or m.length % bs or m.build_offset % bs or m.build_offset < 0:
            raise InvalidArgument(f"mapping {m} is not aligned to block size {bs}")
        if m.is_zero and m.build_offset:
            raise InvalidArgument(f"zero mapping at {m.offset} has a build offset")
        position = m.end
    if position != header.size_bytes:
        raise InvalidArgument(f"mappings cover {position} of {header.size_bytes} bytes")


def normalize(mappings: Iterable[Mapping]) -> tuple[Mapping, ...]:
    """Drop empty mappings and merge neighbours that continue each other in the same build
    (for zeros: any two neighbours). Never changes what reads back."""
    out: list[Mapping] = []
    for m in mappings:
        if m.length == 0:
            continue
        if out:
            last = out[-1]
            if (
                last.build_id == m.build_id
                and last.end == m.offset
                and (m.is_zero or last.build_offset + last.length == m.build_offset)
            ):
                out[-1] = Mapping(
                    last.offset, last.length + m.length, last.build_id, last.build_offset
                )
                continue
        out.append(
            m
            if not m.is_zero or m.build_offset == 0
            else Mapping(m.offset, m.length, m.build_id, 0)
        )
    return tuple(out)


def overlay(base: Sequence[Mapping], top: Sequence[Mapping]) -> tuple[Mapping, ...]:
    """``top`` (sorted, non-overlapping) laid over ``base`` (covering the device), normalised."""
    out: list[Mapping] = []
    index = 0

    def take_base(start: int, stop: int) -> None:
        nonlocal index
        while index < len(base) and base[index].end <= start:
            index += 1
        i = index
        while start < stop and i < len(base):
            m = base[i]
            cut = min(stop, m.end)
            out.append(_clip(m, start, cut))
            start = cut
            if cut == m.end:
                i += 1

    position = 0
    for m in top:
        if m.offset < position:
            raise InvalidArgument(f"overlay mapping at {m.offset} overlaps the previous one")
        take_base(position, m.offset)
        out.append(m)
        position = m.end
    take_base(position, base[-1].end if base else position)
    return normalize(out)


def initial(
    build_id: UUID, size_bytes: int, block_size: int, top: Sequence[Mapping] = ()
) -> Header:
    """Generation 0: ``top`` over a device that is zeros everywhere else."""
    zeros = (Mapping(0, size_bytes, NIL_BUILD_ID, 0),) if size_bytes else ()
    return Header(
        block_size=block_size,
        size_bytes=size_bytes,
        generation=0,
        build_id=build_id,
        base_build_id=build_id,
        mappings=overlay(zeros, top),
    )


def child(parent: Header, build_id: UUID, top: Sequence[Mapping]) -> Header:
    """The next generation: ``top`` (this build's own blocks) merged over ``parent``."""
    return Header(
        block_size=parent.block_size,
        size_bytes=parent.size_bytes,
        generation=parent.generation + 1,
        build_id=build_id,
        base_build_id=parent.base_build_id,
        mappings=overlay(parent.mappings, top),
    )


def encode(header: Header) -> bytes:
    """The binary form: fixed prefix, 40 bytes per mapping, CRC-32 of everything before it."""
    parts = [
        _PREFIX.pack(
            MAGIC,
            header.version,
            0,
            header.block_size,
            header.size_bytes,
            header.generation,
            header.build_id.bytes,
            header.base_build_id.bytes,
            len(header.mappings),
        )
    ]
    pack = _MAPPING.pack
    parts.extend(
        pack(m.offset, m.length, m.build_id.bytes, m.build_offset) for m in header.mappings
    )
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


def decode(data: bytes, *, source: str = "header") -> Header:
    """Parse ``encode``'s output; anything malformed raises ``Corrupted`` naming ``source``."""
    if len(data) < _PREFIX.size + _CRC.size:
        raise Corrupted(f"{source}: truncated ({len(data)} bytes)")
    magic, version, _flags, block_size, size_bytes, generation, build, base, count = (
        _PREFIX.unpack_from(data)
    )
    if magic != MAGIC:
        raise Corrupted(f"{source}: not a snapshot header (bad magic)")
    if version != VERSION:
        raise Corrupted(f"{source}: unsupported header version {version}")
    expected = _PREFIX.size + count * _MAPPING.size + _CRC.size
    if len(data) != expected:
        raise Corrupted(f"{source}: {len(data)} bytes, expected {expected}")
    (crc,) = _CRC.unpack_from(data, expected - _CRC.size)
    if crc != zlib.crc32(memoryview(data)[: expected - _CRC.size]):
        raise Corrupted(f"{source}: CRC mismatch")
    ids: dict[bytes, UUID] = {}
    mappings = []
    body = memoryview(data)[_PREFIX.size : expected - _CRC.size]
    for offset, length, raw_id, build_offset in _MAPPING.iter_unpack(body):
        build_id = ids.get(raw_id)
        if build_id is None:
            build_id = ids[raw_id] = UUID(bytes=raw_id)
        mappings.append(Mapping(offset, length, build_id, build_offset))
    try:
        return Header(
            block_size=block_size,
            size_bytes=size_bytes,
            generation=generation,
            build_id=UUID(bytes=build),
            base_build_id=UUID(bytes=base),
            mappings=tuple(mappings),
            version=version,
        )
    except InvalidArgument as err:
        raise Corrupted(f"{source}: {err.message}") from err
