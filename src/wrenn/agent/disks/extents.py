"""How much of a file is allocated, and how much of that it shares with reflink copies, read
from the kernel's extent map (FS_IOC_FIEMAP). Blocking ioctls: call from a worker thread."""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000

_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, 2 reserved, flags, 3 reserved
_BATCH = 256
_MAX_LENGTH = 2**64 - 1


@dataclass(frozen=True)
class ExtentUsage:
    #: Bytes mapped to disk blocks (holes excluded).
    mapped_bytes: int
    #: Of those, bytes in extents shared with another file (reflink copies).
    shared_bytes: int
    extents: int


def unshared_ranges(path: Path) -> list[tuple[int, int]]:
    """``(offset, length)`` of every extent of ``path`` holding data it shares with no other
    file (written since it was reflinked, or never shared), after writing its dirty pages back
    (copy-on-write remaps a block only once it is written back). ``OSError`` (EOPNOTSUPP)
    where FIEMAP is unsupported."""
    return [(start, length) for start, length, shared in _extents(path) if not shared]


def _extents(path: Path) -> Iterator[tuple[int, int, bool]]:
    start = 0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while True:
            buf = bytearray(_HEADER.size + _EXTENT.size * _BATCH)
            _HEADER.pack_into(buf, 0, start, _MAX_LENGTH - start, FIEMAP_FLAG_SYNC, 0, _BATCH, 0)
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
            found = _HEADER.unpack_from(buf, 0)[3]
            if found == 0:
                return
            for i in range(found):
                logical, _, length, _, _, flags, *_ = _EXTENT.unpack_from(
                    buf, _HEADER.size + i * _EXTENT.size
                )
                yield logical, length, bool(flags & FIEMAP_EXTENT_SHARED)
                start = logical + length
                if flags & FIEMAP_EXTENT_LAST:
                    return
    finally:
        os.close(fd)


def usage(path: Path) -> ExtentUsage:
    """Walk ``path``'s extent map; ``OSError`` (EOPNOTSUPP) where FIEMAP is unsupported."""
    mapped = shared = count = 0
    for _, length, is_shared in _extents(path):
        mapped += length
        count += 1
        if is_shared:
            shared += length
    return ExtentUsage(mapped_bytes=mapped, shared_bytes=shared, extents=count)
