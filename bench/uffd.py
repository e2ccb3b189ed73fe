"""Page server and snapshot diff figures: a 256 MiB guest memory (two layers, some zero
pages) served over a real userfaultfd to a process that reads all of it, with and without
batching, readahead and prefetch; then the diff helpers on the same memory. Prints tables.

    .venv/bin/python bench/uffd.py [--size-mib 256]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import machine, table
from wrenn import log
from wrenn.agent.snapshots import DeviceInput, LocalSnapshotStore, Reader
from wrenn.agent.snapshots.diff import find_dirty_blocks, write_diff
from wrenn.agent.uffd import UffdServer

HARNESS = Path(__file__).resolve().parents[1] / "tests/integration/agent/uffd_harness.py"
PAGE = 4096


def memory(size: int, seed: int) -> bytearray:
    rng = random.Random(seed)
    out = bytearray(os.urandom(size))
    for page in rng.sample(range(size // PAGE), size // PAGE // 8):
        out[page * PAGE : (page + 1) * PAGE] = bytes(PAGE)
    return out


async def snapshot(root: Path, size: int) -> tuple[LocalSnapshotStore, list[Any], Path]:
    store = LocalSnapshotStore(root / "store")
    mem = memory(size, 1)
    src = root / "mem"
    src.write_bytes(mem)
    base, child = uuid4(), uuid4()
    await store.create(base, devices={"memfile": DeviceInput(src)})
    rng = random.Random(2)
    for page in rng.sample(range(size // PAGE), size // PAGE // 10):
        mem[page * PAGE : page * PAGE + 64] = os.urandom(64)
    src.write_bytes(mem)
    await store.create(child, parent=base, devices={"memfile": DeviceInput(src)})
    return store, [base, child], src


async def serve_once(
    sock: Path,
    reader: Reader,
    size: int,
    *,
    threads: int,
    prefetch: list[int] | None = None,
    **server_args: Any,
) -> dict[str, Any]:
    server = UffdServer(sock, reader, prefetch=prefetch or (), **server_args)
    await server.start()
    args = [sys.executable, str(HARNESS), str(sock), "--size", str(size), "--threads", str(threads)]
    if prefetch:
        args.append("--wait")
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 26
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        if prefetch:
            await proc.stdout.readline()
            await server.wait_prefetched()
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        result = json.loads(await proc.stdout.readline())
        proc.stdin.close()
        await proc.wait()
        await server.wait_closed()
        return {
            "result": result,
            "stats": server.stats,
            "touched": server.touched_offsets(),
        }
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await server.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=256)
    size = parser.parse_args().size_mib << 20
    log.configure("warning")
    mib = size / (1 << 20)
    print(f"machine: {machine()}")
    print(f"guest memory: {mib:.0f} MiB, two layers, 1/8 zero pages")
    with tempfile.TemporaryDirectory(prefix="wrenn-bench-") as tmp:
        root = Path(tmp)
        store, builds, src = await snapshot(root, size)
        reader = await store.open_device(builds[-1], "memfile")
        sock = root / "uffd.sock"
        scenarios: list[tuple[str, dict[str, Any]]] = [
            ("unbatched, 1 reader thread", {"threads": 1, "max_events": 1}),
            ("unbatched, 4 reader threads", {"threads": 4, "max_events": 1}),
            ("batched, 4 reader threads", {"threads": 4}),
            ("batched + readahead 16, 1 thread", {"threads": 1, "readahead_pages": 16}),
            ("batched + readahead 64, 4 threads", {"threads": 4, "readahead_pages": 64}),
        ]
        rows = []
        touched: list[int] = []
        try:
            for name, kwargs in scenarios:
                out = await serve_once(sock, reader, size, **kwargs)
                touched = touched or out["touched"]
                s, elapsed = out["stats"], out["result"]["elapsed_s"]
                rows.append(
                    [
                        name,
                        f"{s.faults}",
                        f"{s.batches}",
                        f"{s.max_batch}",
                        f"{s.faults / elapsed:,.0f}",
                        f"{mib / elapsed:,.0f}",
                        f"{elapsed:.2f}",
                    ]
                )
            out = await serve_once(sock, reader, size, threads=1, prefetch=touched)
            s, elapsed = out["stats"], out["result"]["elapsed_s"]
            rows.append(
                [
                    "prefetch all touched pages, 1 thread",
                    f"{s.faults}",
                    f"{s.batches}",
                    f"{s.max_batch}",
                    "-",
                    f"{mib / elapsed:,.0f}",
                    f"{elapsed:.2f}",
                ]
            )
            prefetch_row = [
                "prefetch itself (before the guest runs)",
                "-",
                "-",
                "-",
                "-",
                f"{mib / s.prefetch_s:,.0f}",
                f"{s.prefetch_s:.2f}",
            ]
            rows.append(prefetch_row)
        finally:
            reader.close()
        print()
        print(
            table(
                "page server: guest reads all its memory once",
                ["scenario", "faults", "wake-ups", "max batch", "faults/s", "MiB/s", "seconds"],
                rows,
            )
        )

        # Diffs over the latest build, whose contents are exactly ``src``.
        header = await store.header(builds[-1], "memfile")
        diff_rows = []
        with await store.open_device(builds[-1], "memfile") as parent:
            mem = bytearray(src.read_bytes())
            rng = random.Random(3)
            for share in (0.0, 0.01, 0.1, 0.5):
                changed = bytearray(mem)
                for page in rng.sample(range(size // PAGE), int(size // PAGE * share)):
                    changed[page * PAGE : page * PAGE + 8] = b"changed!"
                current = root / "current"
                current.write_bytes(changed)
                find_dirty_blocks(current, parent, PAGE)  # warm the page cache
                start = time.perf_counter()
                dirty = find_dirty_blocks(current, parent, PAGE)
                compare_s = time.perf_counter() - start
                start = time.perf_counter()
                write_diff(
                    parent=header, source=current, dirty=dirty, dest=root / "diff", build_id=uuid4()
                )
                write_s = time.perf_counter() - start
                diff_rows.append(
                    [
                        f"{share:.0%} of pages changed",
                        f"{len(dirty)}",
                        f"{mib / compare_s:,.0f}",
                        f"{compare_s:.3f}",
                        f"{len(dirty) / write_s:,.0f}" if dirty else "-",
                        f"{write_s:.3f}",
                    ]
                )
        start = time.perf_counter()
        write_diff(parent=None, source=src, dirty=None, dest=root / "full", build_id=uuid4())
        full_s = time.perf_counter() - start
        diff_rows.append(
            [
                "generation 0 (all pages)",
                f"{size // PAGE}",
                "-",
                "-",
                f"{size // PAGE / full_s:,.0f}",
                f"{full_s:.3f}",
            ]
        )
        print()
        print(
            table(
                "snapshot diff helpers (page cache warm)",
                ["case", "dirty pages", "compare MiB/s", "compare s", "write pages/s", "write s"],
                diff_rows,
            )
        )


if __name__ == "__main__":
    asyncio.run(main())
