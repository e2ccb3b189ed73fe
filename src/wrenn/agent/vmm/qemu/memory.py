"""Copying guest RAM into a snapshot's memory file: sparse (zero chunks become holes), from
either the shared RAM file or, for a guest whose RAM is a private mapping, the QEMU process's
memory through ``/proc/<pid>/mem``. Blocking: run it on a thread."""

from __future__ import annotations

import os
from pathlib import Path

from wrenn.core.errors import Internal

_CHUNK_BYTES = 2 << 20
_ZERO = bytes(_CHUNK_BYTES)


def _copy_range(src_fd: int, src_offset: int, size: int, dst_fd: int) -> None:
    done = 0
    while done < size:
        want = min(_CHUNK_BYTES, size - done)
        chunk = os.pread(src_fd, want, src_offset + done)
        if len(chunk) != want:
            raise Internal(f"short read of guest memory at {src_offset + done:#x}")
        if chunk != _ZERO[:want]:
            os.pwrite(dst_fd, chunk, done)
        done += want


def copy_file(src: Path, dest: Path) -> None:
    """Copy the shared RAM file ``src`` to ``dest``, skipping holes and zero chunks."""
    size = src.stat().st_size
    src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst_fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(dst_fd, size)
            offset = 0
            while offset < size:
                try:
                    data = os.lseek(src_fd, offset, os.SEEK_DATA)
                except OSError:
                    break  # no data past offset
                hole = os.lseek(src_fd, data, os.SEEK_HOLE)
                _copy_into(src_fd, data, hole - data, dst_fd)
                offset = hole
            os.fsync(dst_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


def _copy_into(src_fd: int, offset: int, size: int, dst_fd: int) -> None:
    done = 0
    while done < size:
        want = min(_CHUNK_BYTES, size - done)
        chunk = os.pread(src_fd, want, offset + done)
        if chunk != _ZERO[: len(chunk)]:
            os.pwrite(dst_fd, chunk, offset + done)
        done += want


def mapping_of(pid: int, path: Path) -> tuple[int, int]:
    """Start and length of the mapping of ``path`` in process ``pid``."""
    target = str(path)
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            return start, end - start
    raise Internal(f"guest memory {path} is not mapped in process {pid}")


def copy_process_memory(pid: int, mapped: Path, dest: Path) -> None:
    """Copy what process ``pid`` sees through its mapping of ``mapped`` (its private pages
    included) to ``dest``. The process must not change it meanwhile (guest paused)."""
    start, size = mapping_of(pid, mapped)
    mem_fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst_fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(dst_fd, size)
            _copy_range(mem_fd, start, size, dst_fd)
            os.fsync(dst_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(mem_fd)
