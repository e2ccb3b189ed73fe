"""Recording which pages of a file are cached and reading them ahead again, against the real
page cache (a file on a disk filesystem: tmpfs pages cannot be dropped)."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wrenn.agent import workingset

PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def cold_file() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="wrenn-ws-", dir="/var/tmp") as tmp:
        path = Path(tmp) / "memory"
        path.write_bytes(os.urandom(256 * PAGE))
        _drop(path)
        if workingset.resident_ranges(path):
            pytest.skip("this filesystem keeps the file cached (tmpfs?)")
        yield path


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_pages(path: Path, pages: list[int]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        for page in pages:
            os.pread(fd, 1, page * PAGE)
    finally:
        os.close(fd)


def test_resident_ranges_are_the_pages_read_coalesced(cold_file: Path) -> None:
    # Reads ahead would blur the picture: ask for none on this file's reads.
    fd = os.open(cold_file, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for page in (3, 4, 5, 100, 255):
            os.pread(fd, 1, page * PAGE)
    finally:
        os.close(fd)
    assert workingset.resident_ranges(cold_file) == [
        (3 * PAGE, 3 * PAGE),
        (100 * PAGE, PAGE),
        (255 * PAGE, PAGE),
    ]


def test_read_ahead_brings_a_recorded_set_back_into_the_cache(cold_file: Path) -> None:
    _read_pages(cold_file, [0])
    ranges = [(10 * PAGE, 40 * PAGE), (200 * PAGE, 2 * PAGE)]
    _drop(cold_file)
    assert workingset.read_ahead(cold_file, ranges) == 42 * PAGE
    deadline = time.monotonic() + 10
    while True:
        cached = workingset.resident_ranges(cold_file)
        covered = all(
            any(s <= off and off + n <= s + length for s, length in cached) for off, n in ranges
        )
        if covered or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert covered, cached


async def test_working_sets_prefetch_only_what_was_recorded(cold_file: Path) -> None:
    import uuid

    sets = workingset.WorkingSets()
    build = uuid.uuid4()
    assert await sets.prefetch(build, cold_file) == 0
    _read_pages(cold_file, [7])
    await sets.record(build, cold_file)
    recorded = sets.get(build)
    assert recorded and all(length > 0 for _, length in recorded)
    _drop(cold_file)
    assert await sets.prefetch(build, cold_file) == sum(n for _, n in recorded)
    sets.forget(build)
    assert sets.get(build) is None


async def test_a_pause_build_inherits_its_parents_set(cold_file: Path) -> None:
    import uuid

    sets = workingset.WorkingSets()
    template, pause, orphan = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    _read_pages(cold_file, [7, 8])
    await sets.record(template, cold_file)

    sets.inherit(pause, template)
    sets.inherit(orphan, uuid.uuid4())  # a parent with nothing recorded: nothing inherited
    sets.inherit(uuid.uuid4(), None)

    assert sets.get(pause) == sets.get(template)
    assert sets.get(orphan) is None
    sets.forget(pause)
    assert sets.get(pause) is None
    assert sets.get(template) is not None
