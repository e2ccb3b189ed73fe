"""Stands in for Firecracker's Uffd memory backend, run as its own process: maps anonymous
guest memory, creates a userfaultfd with the features Firecracker asks for (EVENT_REMOVE,
non-blocking, kernel faults included), registers every region for MISSING faults, connects
to the page server and sends the regions as JSON with the userfaultfd as SCM_RIGHTS, keeping
the connection open like Firecracker does. Then it touches its memory as told and prints one
JSON line of results.

    uffd_harness.py SOCKET --size BYTES [--regions N] [--expect FILE]
        [--write OFFSET]... [--remove-before OFFSET:LEN]... [--remove-after OFFSET:LEN]...
        [--wait] [--threads N] [--linger]

--expect: compare the memory with FILE (the snapshot's full contents), after the writes and
removes (removed ranges must read zeros, written bytes must stick). --wait: print "ready" after
the handshake and wait for a line on stdin before touching anything (and report which pages
were already resident). Memory is read in 1 MiB chunks, each page by page upwards. --threads:
read all memory with N threads at once (ctypes.memmove releases the GIL, so the faults are
concurrent). --churn N: meanwhile remove N random pages
one by one from another thread (each may then read as the snapshot's bytes or as zeros).
--linger: after the results, wait for stdin to close before exiting.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import socket
import sys
import threading
import time

from wrenn.agent.uffd import abi

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)


class Region:
    def __init__(self, offset: int, size: int) -> None:
        self.offset = offset
        self.size = size
        self.map = mmap.mmap(
            -1,
            size,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        self._anchor = ctypes.c_char.from_buffer(self.map)
        self.address = ctypes.addressof(self._anchor)

    def resident_pages(self) -> list[int]:
        vec = (ctypes.c_ubyte * (self.size // PAGE))()
        if _libc.mincore(ctypes.c_void_p(self.address), ctypes.c_size_t(self.size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return [self.offset + i * PAGE for i, v in enumerate(vec) if v & 1]


def _ranges(values: list[str]) -> list[tuple[int, int]]:
    out = []
    for value in values:
        offset, length = value.split(":")
        out.append((int(offset, 0), int(length, 0)))
    return out


def _locate(regions: list[Region], offset: int) -> tuple[Region, int]:
    for region in regions:
        if region.offset <= offset < region.offset + region.size:
            return region, offset - region.offset
    raise ValueError(f"offset {offset} outside guest memory")


def _remove(regions: list[Region], offset: int, length: int) -> None:
    region, at = _locate(regions, offset)
    region.map.madvise(mmap.MADV_DONTNEED, at, length)


def _copy_up(dst: int, src: int, n: int) -> None:
    """``n`` bytes from ``src``, one page after the other: the faults come in address order
    (memmove may copy a large block from its end, as glibc does on some CPUs)."""
    for at in range(0, n, PAGE):
        ctypes.memmove(dst + at, src + at, min(PAGE, n - at))


def _read_all(regions: list[Region], threads: int) -> tuple[bytes, float]:
    """All guest memory in device order, each chunk page by page upwards; with threads,
    chunks are read concurrently."""
    total = sum(r.size for r in regions)
    out = (ctypes.c_char * total)()
    base = ctypes.addressof(out)
    ctypes.memset(base, 1, total)  # fault our own buffer in before timing
    chunks = [
        (r.address + at, base + r.offset + at, min(1 << 20, r.size - at))
        for r in regions
        for at in range(0, r.size, 1 << 20)
    ]
    start = time.perf_counter()
    if threads <= 1:
        for src, dst, n in chunks:
            _copy_up(dst, src, n)
    else:

        def work(part: list[tuple[int, int, int]]) -> None:
            for src, dst, n in part:
                _copy_up(dst, src, n)

        workers = [
            threading.Thread(target=work, args=(chunks[i::threads],)) for i in range(threads)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    return bytes(out), time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("socket")
    parser.add_argument("--size", type=lambda v: int(v, 0), required=True)
    parser.add_argument("--regions", type=int, default=1)
    parser.add_argument("--expect")
    parser.add_argument("--write", action="append", default=[], type=lambda v: int(v, 0))
    parser.add_argument("--remove-before", action="append", default=[])
    parser.add_argument("--remove-after", action="append", default=[])
    parser.add_argument("--wait", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--linger", action="store_true")
    parser.add_argument("--churn", type=int, default=0)
    args = parser.parse_args()

    uffd = abi.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK)
    features, _ = abi.api(uffd, abi.UFFD_FEATURE_EVENT_REMOVE)
    assert features & abi.UFFD_FEATURE_EVENT_REMOVE

    per_region = args.size // args.regions
    regions = [Region(i * per_region, per_region) for i in range(args.regions)]
    for region in regions:
        abi.register(uffd, region.address, region.size, abi.UFFDIO_REGISTER_MODE_MISSING)
    message = json.dumps(
        [
            {
                "base_host_virt_addr": r.address,
                "size": r.size,
                "offset": r.offset,
                "page_size": PAGE,
                "page_size_kib": PAGE,
            }
            for r in regions
        ]
    ).encode()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(args.socket)
    socket.send_fds(conn, [message], [uffd])

    result: dict[str, object] = {"ok": True, "pid": os.getpid()}
    if args.wait:
        print("ready", flush=True)
        sys.stdin.readline()
        result["resident_before"] = [p for r in regions for p in r.resident_pages()]

    removed = _ranges(args.remove_before)
    for offset, length in removed:
        _remove(regions, offset, length)
    for offset in args.write:
        region, at = _locate(regions, offset)
        region.map[at : at + 8] = b"WRITTEN!"
    churned: list[int] = []
    churner = None
    if args.churn:
        # Removes racing with the faults being served (the balloon's madvise in a real guest).
        import random

        rng = random.Random(args.churn)
        pages = [rng.randrange(args.size // PAGE) * PAGE for _ in range(args.churn)]

        def churn() -> None:
            for offset in pages:
                _remove(regions, offset, PAGE)
                churned.append(offset)

        churner = threading.Thread(target=churn)
        churner.start()
    memory, elapsed = _read_all(regions, args.threads)
    if churner is not None:
        churner.join()
    result["elapsed_s"] = elapsed
    after = _ranges(args.remove_after)
    for offset, length in after:
        _remove(regions, offset, length)
    if after:
        again, _ = _read_all(regions, 1)
        memory_after = bytearray(memory)
        for offset, length in after:
            memory_after[offset : offset + length] = bytes(length)
        result["after_remove_ok"] = again == bytes(memory_after)
        result["ok"] = result["ok"] and result["after_remove_ok"]

    if args.expect:
        with open(args.expect, "rb") as f:
            expected = bytearray(f.read())
        for offset, length in removed:
            expected[offset : offset + length] = bytes(length)
        for offset in args.write:
            expected[offset : offset + 8] = b"WRITTEN!"
        racing = set(churned)  # read before or after its removal: snapshot bytes or zeros
        bad = [
            at
            for at in range(0, len(expected), PAGE)
            if memory[at : at + PAGE] != expected[at : at + PAGE]
            and not (at in racing and memory[at : at + PAGE] == bytes(PAGE))
        ]
        result["mismatched_pages"] = bad[:20]
        result["ok"] = result["ok"] and not bad
    print(json.dumps(result), flush=True)
    if args.linger:
        sys.stdin.read()
    conn.close()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
