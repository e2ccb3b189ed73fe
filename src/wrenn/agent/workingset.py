"""The pages of a build's memory a restore touches before the sandbox answers, recorded once
and read ahead into every later copy of that build's memory image (QEMU).

Each restored VM maps its own reflinked copy of the build's memory image, whose page cache
starts empty, and the disk store reads ahead nothing (``disks.loopfs``): so every page the
guest touches on its way to answering ``/init`` would be a synchronous read, one page at a
time. Those pages are nearly the same for every sandbox of a template: the first sandbox made
from a build after the agent starts records them (the pages of its copy in the page cache once
it answered), and each later copy gets them asked for (``POSIX_FADV_WILLNEED``) right after it
is cloned, while QEMU starts. The guest then finds them cached; nothing else is read, so what a
sandbox holds stays what it touches. A pause build inherits its parent's set: its resume
restores the same kernel and envd and answers the same /init.

Recorded sets live in memory only (an agent restart records them again) and are tiny: a few
hundred byte ranges per build.
"""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
import re
from pathlib import Path
from uuid import UUID

from wrenn import log

_log = log.get(__name__)

Ranges = list[tuple[int, int]]

#: One WILLNEED asks the kernel for at most about this much at a time (its readahead caps a
#: request at the device's largest I/O), so longer ranges are asked for in pieces.
_ADVICE_BYTES = 128 * 1024
_PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_MAP_FAILED = ctypes.c_void_p(-1).value
_RESIDENT = bytes(i & 1 for i in range(256))
_RUN = re.compile(rb"\x01+")


def resident_ranges(path: Path) -> Ranges:
    """Byte ranges (offset, length) of ``path`` now in the page cache. Blocking."""
    size = path.stat().st_size
    if size == 0:
        return []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            pages = (size + _PAGE - 1) // _PAGE
            vec = ctypes.create_string_buffer(pages)
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            resident = vec.raw
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)
    # mincore sets bit 0 of a page's byte when it is resident (the other bits are reserved):
    # runs of resident pages found in C, not page by page.
    flags = resident.translate(_RESIDENT)
    return [
        (run.start() * _PAGE, min(size, run.end() * _PAGE) - run.start() * _PAGE)
        for run in _RUN.finditer(flags)
    ]


def read_ahead(path: Path, ranges: Ranges) -> int:
    """Ask the kernel to read ``ranges`` of ``path`` into the page cache (it does so in the
    background); returns the bytes asked for. Blocking only for the asking."""
    asked = 0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for offset, length in ranges:
            end = offset + length
            while offset < end:
                piece = min(_ADVICE_BYTES, end - offset)
                os.posix_fadvise(fd, offset, piece, os.POSIX_FADV_WILLNEED)
                offset += piece
                asked += piece
    finally:
        os.close(fd)
    return asked


class WorkingSets:
    """The recorded working set of each build restored since the agent started."""

    def __init__(self) -> None:
        self._sets: dict[UUID, Ranges] = {}

    def get(self, build_id: UUID) -> Ranges | None:
        return self._sets.get(build_id)

    def inherit(self, build_id: UUID, parent: UUID | None) -> None:
        """``build_id`` (a pause of a VM restored from ``parent``) gets ``parent``'s working
        set: restoring it and answering /init touch the guest's kernel and envd where the
        parent's restore did."""
        ranges = self._sets.get(parent) if parent is not None else None
        if ranges is not None:
            self._sets.setdefault(build_id, ranges)

    def forget(self, build_id: UUID) -> None:
        self._sets.pop(build_id, None)

    async def prefetch(self, build_id: UUID, copy: Path) -> int:
        """Read the recorded working set of ``build_id`` ahead into ``copy`` (a fresh copy of
        its memory image); 0 when none is recorded yet."""
        ranges = self._sets.get(build_id)
        if not ranges:
            return 0
        try:
            return await asyncio.to_thread(read_ahead, copy, ranges)
        except OSError as err:
            _log.warning("workingset.prefetch_failed", build_id=str(build_id), error=str(err))
            return 0

    async def record(self, build_id: UUID, copy: Path) -> None:
        """Record ``build_id``'s working set from ``copy``, the memory of a VM restored from it
        that has just answered, unless one is recorded already."""
        if build_id in self._sets:
            return
        try:
            ranges = await asyncio.to_thread(resident_ranges, copy)
        except OSError as err:
            _log.warning("workingset.record_failed", build_id=str(build_id), error=str(err))
            return
        self._sets[build_id] = ranges
        _log.info(
            "workingset.recorded",
            build_id=str(build_id),
            ranges=len(ranges),
            bytes=sum(length for _, length in ranges),
        )
