"""Reads a device through its header: each block comes from the layer (build file) that holds
it, or is zeros. Layer files are memory-mapped once; ``extents`` hands out addresses inside
those mappings, so a page server can copy from them without an intermediate buffer."""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator
from collections.abc import Mapping as MappingOf
from pathlib import Path
from types import TracebackType
from typing import NamedTuple
from uuid import UUID

from wrenn.agent.snapshots.header import Header
from wrenn.core.errors import Corrupted, FailedPrecondition, NotFound


class Extent(NamedTuple):
    """``length`` bytes of the device at ``offset``: at ``address`` in this process, or zeros
    when ``address`` is None."""

    offset: int
    length: int
    address: int | None


_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class _Layer:
    """One build's file, mapped shared and read-only through libc (Python's mmap cannot hand
    out the address of a read-only mapping; a private writable one would be charged against
    the overcommit limit for its whole size)."""

    def __init__(self, path: Path, needed_bytes: int) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as err:
            raise NotFound(f"layer file missing: {path}") from err
        try:
            size = os.fstat(fd).st_size
            if size < needed_bytes:
                raise Corrupted(f"layer {path} is {size} bytes, header needs {needed_bytes}")
            address = 0
            if size:
                address = _mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0) or 0
                if address in (0, _MAP_FAILED):
                    code = ctypes.get_errno()
                    raise OSError(code, f"mmap {path}: {os.strerror(code)}")
        finally:
            os.close(fd)
        self.size = size
        self.address: int = address

    def bytes_at(self, offset: int, length: int) -> bytes:
        if not self.address:
            raise FailedPrecondition("reader is closed")
        return ctypes.string_at(self.address + offset, length)

    def close(self) -> None:
        if self.address:
            _munmap(self.address, self.size)
            self.address = 0


class Reader:
    """A read-only view of one device of one build. Close it (or use ``with``) once no page
    server or reader still uses the addresses it handed out."""

    def __init__(self, header: Header, layers: MappingOf[UUID, Path]) -> None:
        self.header = header
        needed: dict[UUID, int] = {}
        for m in header.mappings:
            if not m.is_zero:
                needed[m.build_id] = max(needed.get(m.build_id, 0), m.build_offset + m.length)
        self._layers: dict[UUID, _Layer] = {}
        try:
            for build_id, size in needed.items():
                if build_id not in layers:
                    raise NotFound(f"no file given for layer {build_id}")
                self._layers[build_id] = _Layer(layers[build_id], size)
        except BaseException:
            self.close()
            raise

    @property
    def size_bytes(self) -> int:
        return self.header.size_bytes

    @property
    def block_size(self) -> int:
        return self.header.block_size

    def _layer(self, build_id: UUID) -> _Layer:
        layer = self._layers.get(build_id)
        if layer is None or not layer.address:
            raise FailedPrecondition("reader is closed")
        return layer

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        """The range ``[offset, offset + length)`` as addresses of mapped layers or zeros."""
        for m in self.header.resolve(offset, length):
            if m.is_zero:
                yield Extent(m.offset, m.length, None)
            else:
                yield Extent(m.offset, m.length, self._layer(m.build_id).address + m.build_offset)

    def read(self, offset: int, length: int) -> bytes:
        """A copy of the range ``[offset, offset + length)``."""
        parts: list[bytes] = []
        for m in self.header.resolve(offset, length):
            if m.is_zero:
                parts.append(bytes(m.length))
            else:
                parts.append(self._layer(m.build_id).bytes_at(m.build_offset, m.length))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        for layer in self._layers.values():
            layer.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
