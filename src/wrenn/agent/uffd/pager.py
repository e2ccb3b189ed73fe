"""The page-serving loop for one userfaultfd. It runs on a dedicated thread: blocking poll,
then every queued event read at once, faults de-duplicated and coalesced into runs of
contiguous pages, each run filled with as few UFFDIO_COPY / UFFDIO_ZEROPAGE calls as the
layers allow (ctypes releases the GIL during each ioctl).

Page states, per region, one byte per page:
    MISSING  never populated: a fault copies the snapshot's bytes (zeros: UFFDIO_ZEROPAGE)
    PRESENT  populated by us
    REMOVED  dropped by the guest (UFFD_EVENT_REMOVE, balloon madvise): a later fault reads
             zeros, never the snapshot's bytes
The loop ends when told to (stop fd readable), when the VM is gone (connection hung up, its
process exited, or an ioctl answers ESRCH), or on an error it cannot serve past.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Protocol

from wrenn.agent.uffd import abi
from wrenn.agent.uffd.handshake import GuestRegion
from wrenn.core.errors import Internal
from wrenn.log import get

log = get(__name__)

MISSING, PRESENT, REMOVED = 0, 1, 2

#: Pages copied per prefetch step before looking for faults again.
PREFETCH_STEP_PAGES = 256
#: How long to wait before retrying after EAGAIN (the kernel is queueing an event), ms.
RETRY_WAIT_MS = 1
#: Inside a multi-piece run, zero stretches at least this long are mapped to the zero page;
#: shorter ones are copied as zeros together with their neighbours (fewer ioctls).
ZERO_RUN_BYTES = 64 * 1024
#: Size of the buffer multi-piece runs are assembled in.
BOUNCE_BYTES = 1 << 20


class PageSource(Protocol):
    """The memory file as the guest should see it (``wrenn.agent.snapshots.Reader`` is one)."""

    @property
    def size_bytes(self) -> int: ...

    def extents(self, offset: int, length: int) -> Iterable[tuple[int, int, int | None]]:
        """``(offset, length, address)`` pieces covering the range in order; address is where
        the bytes are in this process, or None for zeros. Valid until the source is closed."""
        ...


@dataclass
class UffdStats:
    #: Page-fault events read from the userfaultfd.
    faults: int = 0
    #: Wake-ups of the loop that read at least one event, and the most events in one.
    batches: int = 0
    max_batch: int = 0
    #: Pages populated because a fault asked, because readahead added them, by prefetch.
    pages_faulted: int = 0
    pages_readahead: int = 0
    pages_prefetched: int = 0
    #: Of all populated pages, those that were zeros (UFFDIO_ZEROPAGE or copied zeros).
    pages_zero: int = 0
    bytes_copied: int = 0
    copy_ioctls: int = 0
    zero_ioctls: int = 0
    #: UFFD_EVENT_REMOVE events and the bytes they dropped.
    removes: int = 0
    removed_bytes: int = 0
    #: Calls answered EAGAIN (retried after reading events) and pages found already present.
    eagain: int = 0
    eexist: int = 0
    #: Seconds from the start of serving until the prefetch list was done.
    prefetch_s: float = 0.0

    def copy(self) -> UffdStats:
        return UffdStats(**{f.name: getattr(self, f.name) for f in fields(self)})


class VmGone(Exception):
    """The process whose memory we serve has exited."""


class _Again(Exception):
    """The kernel answered EAGAIN: events must be read before this run can continue."""

    def __init__(self, page: int) -> None:
        self.page = page


class _Region:
    def __init__(self, spec: GuestRegion) -> None:
        self.spec = spec
        self.base = spec.base_host_virt_addr
        self.end = spec.end_addr
        self.offset = spec.offset
        self.page_size = spec.page_size
        self.pages = spec.size // spec.page_size
        self.state = bytearray(self.pages)
        #: UFFDIO_ZEROPAGE exists only for base pages (not hugetlbfs).
        self.zeropage_ok = spec.page_size == os.sysconf("SC_PAGE_SIZE")


_ONES = b"\x01" * 4096


def _mark(state: bytearray, first: int, count: int, value: int) -> None:
    if value == PRESENT and count <= len(_ONES):
        state[first : first + count] = _ONES[:count]
    else:
        state[first : first + count] = bytes([value]) * count


class Pager:
    """Serves faults on ``uffd`` from ``source`` for the given regions. Not thread-safe: one
    thread runs ``run``; others may only read ``stats`` and ``touched``."""

    def __init__(
        self,
        uffd: int,
        regions: Sequence[GuestRegion],
        source: PageSource,
        *,
        stop_fd: int,
        peer: int | None = None,
        pidfd: int | None = None,
        prefetch: Sequence[int] = (),
        max_events: int = 256,
        readahead_pages: int = 0,
        on_prefetched: Callable[[], None] | None = None,
    ) -> None:
        self.fd = uffd
        self._uffd = abi.Uffd(uffd)
        self._regions = [_Region(r) for r in sorted(regions, key=lambda r: r.base_host_virt_addr)]
        self._bases = [r.base for r in self._regions]
        self._by_offset = sorted(self._regions, key=lambda r: r.offset)
        self._offsets = [r.offset for r in self._by_offset]
        self._source = source
        self._stop_fd = stop_fd
        self._peer = peer
        self._pidfd = pidfd
        self._prefetching = False
        self._prefetch_stalled = False
        self._started = time.monotonic()
        self._max_events = max(1, max_events)
        self._readahead = max(0, readahead_pages)
        self._on_prefetched = on_prefetched
        self._prefetch = deque(self._prefetch_runs(prefetch))
        self._retry: list[tuple[_Region, int, int, bool]] = []
        self._zero_page = {
            r.page_size: (ctypes.c_char * r.page_size)() for r in self._regions if not r.zeropage_ok
        }
        self._bounce: ctypes.Array[ctypes.c_char] | None = None
        self.stats = UffdStats()
        #: Device offsets of pages in the order the guest first faulted on them.
        self.touched: list[int] = []

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> str:
        """Serve until stopped (returns "stopped") or the VM is gone (returns "vm_gone")."""
        self._started = time.monotonic()
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        for fd in (self._peer, self._pidfd):
            if fd is not None:
                poller.register(fd, select.POLLIN)
        if not self._prefetch:
            self._prefetch_done()
        try:
            while True:
                if self._retry or self._prefetch_stalled:
                    timeout = RETRY_WAIT_MS
                elif self._prefetch:
                    timeout = 0
                else:
                    timeout = -1
                ready = dict(poller.poll(timeout))
                if self._stop_fd in ready:
                    return "stopped"
                if self._pidfd in ready or (self._peer in ready and self._peer_closed()):
                    return "vm_gone"
                if ready.get(self.fd, 0) & select.POLLERR:
                    raise Internal("userfaultfd reports an error (is it non-blocking?)")
                if self.fd in ready or self._retry:
                    self._serve(self._read_events())
                elif self._prefetch:
                    self._prefetch_step()
        except VmGone:
            return "vm_gone"

    def _peer_closed(self) -> bool:
        """The VMM says nothing after the handshake: readable means it hung up."""
        assert self._peer is not None
        try:
            data = os.read(self._peer, 4096)
        except BlockingIOError:
            return False
        except OSError:
            return True
        if data:
            log.warning("uffd.unexpected_peer_data", size_bytes=len(data))
        return not data

    def _read_events(self) -> list[tuple[_Region, int]]:
        """Every queued event (up to ``max_events``): removes applied now, faults returned."""
        try:
            data = os.read(self.fd, abi.MSG.size * self._max_events)
        except BlockingIOError:
            return []
        count = len(data) // abi.MSG.size
        if not count:
            return []
        stats = self.stats
        stats.batches += 1
        stats.max_batch = max(stats.max_batch, count)
        faults: list[tuple[_Region, int]] = []
        for event, a, b, _c in abi.MSG.iter_unpack(data):
            if event == abi.UFFD_EVENT_PAGEFAULT:
                stats.faults += 1
                region = self._region_at(b)
                faults.append((region, (b - region.base) // region.page_size))
            elif event in (abi.UFFD_EVENT_REMOVE, abi.UFFD_EVENT_UNMAP):
                stats.removes += 1
                stats.removed_bytes += b - a
                self._remove(a, b)
            else:
                log.warning("uffd.unexpected_event", uffd_event=event)
        return faults

    def _region_at(self, address: int) -> _Region:
        index = bisect_right(self._bases, address) - 1
        if index >= 0 and address < self._regions[index].end:
            return self._regions[index]
        raise Internal(f"fault at {address:#x} outside every registered region")

    def _remove(self, start: int, end: int) -> None:
        for region in self._regions:
            lo, hi = max(start, region.base), min(end, region.end)
            if lo < hi:
                first = (lo - region.base) // region.page_size
                last = -(-(hi - region.base) // region.page_size)
                _mark(region.state, first, last - first, REMOVED)

    # -- serving faults --------------------------------------------------------------------------

    def _serve(self, faults: list[tuple[_Region, int]]) -> None:
        runs = self._retry
        self._retry = []
        if self._max_events == 1:
            runs.extend((region, page, 1, True) for region, page in faults)
        else:
            runs.extend(self._coalesce(faults))
        for index, (region, first, count, from_fault) in enumerate(runs):
            try:
                self._fill(region, first, count, from_fault)
            except _Again as again:
                self.stats.eagain += 1
                self._retry.append((region, again.page, first + count - again.page, from_fault))
                self._retry.extend(runs[index + 1 :])
                return

    def _coalesce(self, faults: list[tuple[_Region, int]]) -> list[tuple[_Region, int, int, bool]]:
        runs: list[tuple[_Region, int, int, bool]] = []
        for region, page in sorted(set(faults), key=lambda f: (f[0].base, f[1])):
            if runs:
                last_region, first, count, _ = runs[-1]
                if last_region is region and first + count == page:
                    runs[-1] = (region, first, count + 1, True)
                    continue
            runs.append((region, page, 1, True))
        if self._readahead:
            runs = [self._extend(*run) for run in runs]
        return runs

    def _extend(
        self, region: _Region, first: int, count: int, from_fault: bool
    ) -> tuple[_Region, int, int, bool]:
        state = region.state
        end = first + count
        limit = min(region.pages, end + self._readahead)
        while end < limit and state[end] == MISSING:
            end += 1
        self.stats.pages_readahead += end - first - count
        return region, first, end - first, from_fault

    def _fill(self, region: _Region, first: int, count: int, from_fault: bool) -> None:
        """Populate pages ``[first, first + count)`` of ``region`` by their state."""
        state = region.state
        page = first
        end = first + count
        while page < end:
            kind = state[page]
            stop = page + 1
            while stop < end and state[stop] == kind:
                stop += 1
            if kind == MISSING:
                if from_fault:
                    self._record_touch(region, page, stop)
                self._copy_missing(region, page, stop)
            elif kind == REMOVED:
                self._zero(region, page, stop)
            elif from_fault:
                # Already present: the event is stale, but make sure nobody stays asleep.
                self._uffd.wake(
                    region.base + page * region.page_size, (stop - page) * region.page_size
                )
            page = stop

    def _record_touch(self, region: _Region, first: int, stop: int) -> None:
        # Readahead pages past the faulting ones are recorded too: they will be wanted next.
        self.touched.extend(region.offset + p * region.page_size for p in range(first, stop))

    def _copy_missing(self, region: _Region, first: int, stop: int) -> None:
        """Fill never-populated pages ``[first, stop)`` from the source. One piece: one ioctl
        straight from it. Several (layer boundaries, zero blocks): aligned zero stretches of
        at least ``ZERO_RUN_BYTES`` get UFFDIO_ZEROPAGE, and what lies between them is
        assembled in a buffer and copied with one UFFDIO_COPY per buffer-full, which also
        covers pages that straddle pieces (pages larger than blocks)."""
        ps = region.page_size
        start = region.offset + first * ps
        end = region.offset + stop * ps
        pieces = list(self._source.extents(start, end - start))
        if len(pieces) == 1:
            self._populate(region, start, end, pieces[0][2])
            return
        zero_run = max(ZERO_RUN_BYTES, ps)
        pending = start
        for offset, length, address in pieces:
            if address is None and length >= zero_run:
                lo = -(-offset // ps) * ps
                hi = (offset + length) // ps * ps
                if hi > lo:
                    self._assemble(region, pieces, pending, lo)
                    self._populate(region, lo, hi, None)
                    pending = hi
        self._assemble(region, pieces, pending, end)

    def _assemble(
        self, region: _Region, pieces: list[tuple[int, int, int | None]], start: int, end: int
    ) -> None:
        """Copy device range ``[start, end)`` (page-aligned) built from ``pieces``."""
        if start >= end:
            return
        covering = [p for p in pieces if p[0] < end and p[0] + p[1] > start]
        if len(covering) == 1:
            offset, _, address = covering[0]
            self._populate(
                region, start, end, None if address is None else address + start - offset
            )
            return
        bounce = self._bounce_buffer(region.page_size)
        base = ctypes.addressof(bounce)
        size = len(bounce)
        for chunk in range(start, end, size):
            chunk_end = min(chunk + size, end)
            zero = True
            for offset, length, address in covering:
                lo, hi = max(offset, chunk), min(offset + length, chunk_end)
                if lo >= hi:
                    continue
                if address is None:
                    ctypes.memset(base + lo - chunk, 0, hi - lo)
                else:
                    ctypes.memmove(base + lo - chunk, address + lo - offset, hi - lo)
                    zero = False
            self._populate(region, chunk, chunk_end, base, zero=zero)

    def _bounce_buffer(self, page_size: int) -> ctypes.Array[ctypes.c_char]:
        size = max(BOUNCE_BYTES, page_size)
        if self._bounce is None or len(self._bounce) < size:
            self._bounce = (ctypes.c_char * size)()
        return self._bounce

    def _zero(self, region: _Region, first: int, stop: int) -> None:
        ps = region.page_size
        self._populate(region, region.offset + first * ps, region.offset + stop * ps, None)

    def _populate(
        self, region: _Region, start: int, end: int, src: int | None, *, zero: bool = False
    ) -> None:
        """Copy (or zero) device range ``[start, end)`` into the region, page-aligned."""
        ps = region.page_size
        stats = self.stats
        while start < end:
            dst = region.base + (start - region.offset)
            length = end - start
            if src is None and region.zeropage_ok:
                done, err = self._uffd.zeropage(dst, length)
                stats.zero_ioctls += 1
            else:
                # Zeros without UFFDIO_ZEROPAGE: one page at a time from a zeroed buffer.
                from_addr = src if src is not None else ctypes.addressof(self._zero_page[ps])
                done, err = self._uffd.copy(dst, from_addr, length if src is not None else ps)
                stats.copy_ioctls += 1
            done -= done % ps
            if done:
                first = (start - region.offset) // ps
                _mark(region.state, first, done // ps, PRESENT)
                self._count(done // ps, src is None or zero)
                if src is not None:
                    stats.bytes_copied += done
                    src += done
                start += done
            if not err:
                continue
            if err == errno.EAGAIN:
                if not done:
                    raise _Again((start - region.offset) // ps)
            elif err == errno.EEXIST:
                stats.eexist += 1
                _mark(region.state, (start - region.offset) // ps, 1, PRESENT)
                self._uffd.wake(dst + done, ps)
                start += ps
                if src is not None:
                    src += ps
            elif err == errno.ESRCH:
                raise VmGone
            elif err == errno.ENOENT:
                # The range is no longer registered (the VMM is tearing its memory down).
                log.warning("uffd.range_gone", address=hex(dst))
                return
            else:
                raise OSError(err, f"userfaultfd populate at {dst:#x}: {os.strerror(err)}")

    def _count(self, pages: int, zero: bool) -> None:
        if zero:
            self.stats.pages_zero += pages
        if self._prefetching:
            self.stats.pages_prefetched += pages
        else:
            self.stats.pages_faulted += pages

    # -- prefetch ------------------------------------------------------------------------------

    def _prefetch_runs(self, offsets: Sequence[int]) -> list[tuple[_Region, int, int]]:
        """Offsets in the order given, as runs of consecutive pages; unknown ones dropped."""
        runs: list[tuple[_Region, int, int]] = []
        seen: set[tuple[int, int]] = set()
        for offset in offsets:
            index = bisect_right(self._offsets, offset) - 1
            if index < 0:
                continue
            region = self._by_offset[index]
            if offset >= region.offset + region.pages * region.page_size:
                continue
            page = (offset - region.offset) // region.page_size
            if (region.base, page) in seen:
                continue
            seen.add((region.base, page))
            if runs and runs[-1][0] is region and runs[-1][1] + runs[-1][2] == page:
                runs[-1] = (region, runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((region, page, 1))
        return runs

    def _prefetch_step(self) -> None:
        budget = PREFETCH_STEP_PAGES
        self._prefetching = True
        self._prefetch_stalled = False
        try:
            while self._prefetch and budget > 0:
                region, first, count = self._prefetch.popleft()
                take = min(count, budget)
                if take < count:
                    self._prefetch.appendleft((region, first + take, count - take))
                budget -= take
                page, end = first, first + take
                while page < end:
                    if region.state[page] != MISSING:
                        page += 1
                        continue
                    stop = page + 1
                    while stop < end and region.state[stop] == MISSING:
                        stop += 1
                    try:
                        self._copy_missing(region, page, stop)
                    except _Again as again:
                        self.stats.eagain += 1
                        self._prefetch.appendleft((region, again.page, end - again.page))
                        self._prefetch_stalled = True
                        return
                    page = stop
        finally:
            self._prefetching = False
        if not self._prefetch:
            self._prefetch_done()

    def _prefetch_done(self) -> None:
        self.stats.prefetch_s = time.monotonic() - self._started
        if self._on_prefetched is not None:
            self._on_prefetched()
            self._on_prefetched = None
