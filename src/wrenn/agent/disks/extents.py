"""How much of a file is allocated, and how much of that it shares with reflink copies, read
from the kernel's extent map (FS_IOC_FIEMAP). Blocking ioctls: call from a worker thread.

The ioctl goes through ctypes, which lets go of the interpreter lock while it runs:
``fcntl.ioctl`` keeps it for a buffer this large, and a FIEMAP that first writes back a file's
dirty pages (``FIEMAP_FLAG_SYNC``) can take a second, during which no other thread of the
process would run."""

from __future__ import annotations

import ctypes
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
_BATCH = 4096
_MAX_LENGTH = 2**64 - 1

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.restype = ctypes.c_int
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


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
        buf = ctypes.create_string_buffer(_HEADER.size + _EXTENT.size * _BATCH)
        view = memoryview(buf).cast("B")
        while True:
            _HEADER.pack_into(buf, 0, start, _MAX_LENGTH - start, FIEMAP_FLAG_SYNC, 0, _BATCH, 0)
            if _ioctl(fd, FS_IOC_FIEMAP, buf) < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), str(path))
            found = _HEADER.unpack_from(buf, 0)[3]
            if found == 0:
                return
            end = _HEADER.size + found * _EXTENT.size
            for logical, _, length, _, _, flags, *_ in _EXTENT.iter_unpack(
                view[_HEADER.size : end]
            ):
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
