"""The page server against a real userfaultfd: a harness process plays Firecracker's side of
the handshake and touches its guest memory; pages come from a layered snapshot store."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from wrenn.agent.snapshots import DeviceInput, LocalSnapshotStore, Reader
from wrenn.agent.uffd import UffdServer, abi
from wrenn.agent.uffd.handshake import parse_regions
from wrenn.core.errors import InvalidArgument

HARNESS = Path(__file__).with_name("uffd_harness.py")
PAGE = 4096
SIZE = 4 << 20
GUARD_S = 60  # hang guard only: every wait below normally ends in well under a second


def _memory(rng: random.Random, size: int) -> bytearray:
    """Random pages, every third page zeros."""
    out = bytearray()
    for i in range(size // PAGE):
        out += bytes(PAGE) if i % 3 == 0 else rng.randbytes(PAGE)
    return out


async def _layered_snapshot(root: Path, *, block_size: int = PAGE) -> tuple[Reader, bytes]:
    """Three generations: a template and two diffs; returns a reader of the last and its bytes."""
    rng = random.Random(7)
    store = LocalSnapshotStore(root / "store")
    memory = _memory(rng, SIZE)
    src = root / "mem"
    src.write_bytes(memory)
    builds = [uuid4(), uuid4(), uuid4()]
    await store.create(builds[0], devices={"memfile": DeviceInput(src, block_size=block_size)})
    for build, parent in zip(builds[1:], builds, strict=False):
        for _ in range(40):
            at = rng.randrange(0, SIZE // block_size) * block_size
            fill = bytes(block_size) if rng.random() < 0.2 else rng.randbytes(block_size)
            memory[at : at + block_size] = fill
        src.write_bytes(memory)
        await store.create(build, parent=parent, devices={"memfile": DeviceInput(src)})
    (root / "expected").write_bytes(memory)
    reader = await store.open_device(builds[-1], "memfile")
    assert len(reader.header.dependencies()) == 3
    return reader, bytes(memory)


class Harness:
    """One harness process; ``kill`` ends it by PID."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self) -> str:
        assert self.proc.stdout is not None
        async with asyncio.timeout(GUARD_S):
            return (await self.proc.stdout.readline()).decode()

    async def result(self) -> dict[str, Any]:
        line = await self.line()
        assert line, await self.stderr()
        result: dict[str, Any] = json.loads(line)
        return result

    async def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        await self.proc.stdin.drain()

    async def exit_code(self) -> int:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        async with asyncio.timeout(GUARD_S):
            return await self.proc.wait()

    async def stderr(self) -> str:
        assert self.proc.stderr is not None
        return (await self.proc.stderr.read()).decode(errors="replace")

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


@pytest.fixture
async def harnesses() -> AsyncIterator[Callable[..., Any]]:
    made: list[Harness] = []

    async def start(socket_path: Path, *args: str) -> Harness:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HARNESS),
            str(socket_path),
            "--size",
            str(SIZE),
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        made.append(Harness(proc))
        return made[-1]

    yield start
    for harness in made:
        harness.kill()
        await harness.proc.wait()


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., Any]]:
    made: list[tuple[UffdServer, Reader]] = []

    async def start(socket_path: Path, reader: Reader, **kwargs: Any) -> UffdServer:
        server = UffdServer(socket_path, reader, **kwargs)
        made.append((server, reader))
        await server.start()
        return server

    yield start
    for server, reader in made:
        await server.stop()
        reader.close()


async def _closed(server: UffdServer) -> str:
    async with asyncio.timeout(GUARD_S):
        return await server.wait_closed()


async def test_serves_a_layered_snapshot_with_zeros_writes_and_removes(
    tmp_path: Path, harnesses: Callable[..., Any], servers: Callable[..., Any]
) -> None:
    reader, _ = await _layered_snapshot(tmp_path)
    sock = tmp_path / "uffd.sock"
    server = await servers(sock, reader)
    harness = await harnesses(
        sock,
        "--regions",
        "2",
        "--expect",
        str(tmp_path / "expected"),
        "--write",
        str(5 * PAGE + 100),
        "--write",
        str(SIZE // 2 + 3 * PAGE),
        "--remove-before",
        f"{10 * PAGE}:{4 * PAGE}",
        "--remove-after",
        f"{SIZE // 2 + 2 * PAGE}:{3 * PAGE}",
    )
    async with asyncio.timeout(GUARD_S):
        regions = await server.wait_connected()
    assert sorted((r.offset, r.size, r.page_size) for r in regions) == [
        (0, SIZE // 2, PAGE),
        (SIZE // 2, SIZE // 2, PAGE),
    ]
    result = await harness.result()
    assert result["ok"], result
    assert result["after_remove_ok"]
    assert await harness.exit_code() == 0
    # The VMM going away ends serving on its own.
    assert await _closed(server) == "vm_gone"
    assert server.peer_pid == result["pid"]
    stats = server.stats
    assert stats.removes == 2 and stats.removed_bytes == 7 * PAGE
    assert stats.faults > 0 and stats.pages_zero > 0
    assert stats.pages_faulted == SIZE // PAGE + 3
    assert stats.bytes_copied <= SIZE
    assert not sock.exists() or sock.is_socket()


async def test_prefetch_fills_pages_before_the_guest_touches_them(
    tmp_path: Path, harnesses: Callable[..., Any], servers: Callable[..., Any]
) -> None:
    reader, _ = await _layered_snapshot(tmp_path)
    sock = tmp_path / "uffd.sock"
    prefetch = [p * PAGE for p in (900, 3, 4, 5, 1000, 7, 901, 3)] + [SIZE * 2]
    server = await servers(sock, reader, prefetch=prefetch)
    harness = await harnesses(sock, "--wait", "--expect", str(tmp_path / "expected"))
    assert (await harness.line()).strip() == "ready"
    async with asyncio.timeout(GUARD_S):
        await server.wait_prefetched()
    assert server.stats.faults == 0
    assert server.stats.pages_prefetched == 7
    await harness.send("go\n")
    result = await harness.result()
    assert result["ok"], result
    assert sorted(result["resident_before"]) == sorted({o for o in prefetch if o < SIZE})
    assert await harness.exit_code() == 0
    assert await _closed(server) == "vm_gone"
    stats = server.stats
    assert stats.pages_faulted == SIZE // PAGE - 7
    touched = server.touched_offsets()
    assert len(touched) == SIZE // PAGE - 7
    assert not set(touched) & set(prefetch)
    assert touched[:3] == [0, PAGE, 2 * PAGE]


@pytest.mark.parametrize(
    ("max_events", "readahead_pages", "threads"),
    [(1, 0, 4), (256, 0, 4), (256, 16, 1)],
    ids=["unbatched", "batched", "readahead"],
)
async def test_concurrent_faults_batched_or_not_read_the_same_bytes(
    tmp_path: Path,
    harnesses: Callable[..., Any],
    servers: Callable[..., Any],
    max_events: int,
    readahead_pages: int,
    threads: int,
) -> None:
    reader, _ = await _layered_snapshot(tmp_path)
    sock = tmp_path / "uffd.sock"
    server = await servers(sock, reader, max_events=max_events, readahead_pages=readahead_pages)
    harness = await harnesses(
        sock, "--threads", str(threads), "--expect", str(tmp_path / "expected")
    )
    result = await harness.result()
    assert result["ok"], result
    assert await harness.exit_code() == 0
    assert await _closed(server) == "vm_gone"
    stats = server.stats
    assert stats.pages_faulted == SIZE // PAGE
    if max_events == 1:
        assert stats.max_batch == 1
    if readahead_pages:
        assert stats.faults < SIZE // PAGE // 4


async def test_removes_racing_with_faults_never_hang_or_read_garbage(
    tmp_path: Path, harnesses: Callable[..., Any], servers: Callable[..., Any]
) -> None:
    reader, _ = await _layered_snapshot(tmp_path)
    sock = tmp_path / "uffd.sock"
    server = await servers(sock, reader, prefetch=[p * PAGE for p in range(0, SIZE // PAGE, 2)])
    harness = await harnesses(
        sock, "--threads", "3", "--churn", "300", "--expect", str(tmp_path / "expected")
    )
    result = await harness.result()
    assert result["ok"], result
    assert await harness.exit_code() == 0
    assert await _closed(server) == "vm_gone"
    assert server.stats.removes == 300


async def test_blocks_smaller_than_pages_are_assembled(
    tmp_path: Path, harnesses: Callable[..., Any], servers: Callable[..., Any]
) -> None:
    """1 KiB blocks: a page can straddle several layers and must be copied in one piece."""
    reader, _ = await _layered_snapshot(tmp_path, block_size=1024)
    assert any(m.offset % PAGE for m in reader.header.mappings)
    sock = tmp_path / "uffd.sock"
    server = await servers(sock, reader)
    harness = await harnesses(sock, "--expect", str(tmp_path / "expected"))
    result = await harness.result()
    assert result["ok"], result
    assert await harness.exit_code() == 0
    assert await _closed(server) == "vm_gone"


async def test_stop_while_the_vm_lives_releases_everything(
    tmp_path: Path, harnesses: Callable[..., Any], servers: Callable[..., Any]
) -> None:
    reader, _ = await _layered_snapshot(tmp_path)
    sock = tmp_path / "uffd.sock"
    server = await servers(sock, reader)
    harness = await harnesses(sock, "--linger")
    result = await harness.result()
    assert result["ok"]
    fds_before = len(os.listdir("/proc/self/fd"))
    await server.stop()
    assert await server.wait_closed() == "stopped"
    assert not sock.exists()
    assert len(os.listdir("/proc/self/fd")) < fds_before
    assert harness.proc.returncode is None
    await server.stop()  # idempotent


async def test_stop_before_any_vm_connected(tmp_path: Path, servers: Callable[..., Any]) -> None:
    reader, _ = await _layered_snapshot(tmp_path)
    server = await servers(tmp_path / "uffd.sock", reader)
    await server.stop()
    assert await server.wait_closed() == "stopped"
    with pytest.raises(Exception, match="ended before"):
        await server.wait_connected()


@pytest.mark.parametrize(
    ("payload", "with_fd", "error"),
    [
        (b"not json]", True, "not JSON"),
        (b"[]", True, "non-empty"),
        (b'[{"base_host_virt_addr": 4096, "size": 4096, "offset": 0}]', True, "page size"),
        (
            json.dumps(
                [{"base_host_virt_addr": 4096, "size": SIZE, "offset": 4096, "page_size": PAGE}]
            ).encode(),
            True,
            "past the memory file",
        ),
        (
            b'[{"base_host_virt_addr": 4096, "size": 4096, "offset": 0, "page_size": 4096}]',
            False,
            "one userfaultfd",
        ),
    ],
    ids=["garbage", "empty", "no-page-size", "too-big", "no-fd"],
)
async def test_a_bad_handshake_fails_the_server_with_a_clear_error(
    tmp_path: Path, servers: Callable[..., Any], payload: bytes, with_fd: bool, error: str
) -> None:
    reader, _ = await _layered_snapshot(tmp_path)
    sock = tmp_path / "uffd.sock"
    server = await servers(sock, reader)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        await asyncio.get_running_loop().sock_connect(client, str(sock))
        socket.send_fds(client, [payload], [r] if with_fd else [])
        with pytest.raises(InvalidArgument, match=error):
            async with asyncio.timeout(GUARD_S):
                await server.wait_connected()
        with pytest.raises(InvalidArgument):
            await server.wait_closed()
    finally:
        client.close()
        os.close(r)
        os.close(w)


def test_ioctl_numbers_match_linux_userfaultfd_h() -> None:
    assert abi.UFFDIO_API == 0xC018AA3F
    assert abi.UFFDIO_REGISTER == 0xC020AA00
    assert abi.UFFDIO_UNREGISTER == 0x8010AA01
    assert abi.UFFDIO_WAKE == 0x8010AA02
    assert abi.UFFDIO_COPY == 0xC028AA03
    assert abi.UFFDIO_ZEROPAGE == 0xC020AA04


def test_regions_accept_both_page_size_spellings() -> None:
    def one(**page: int) -> Sequence[Any]:
        return parse_regions(
            json.dumps([{"base_host_virt_addr": 1 << 30, "size": 1 << 21, "offset": 0, **page}]),
            1 << 21,
        )

    assert one(page_size=4096)[0].page_size == 4096
    assert one(page_size_kib=4096)[0].page_size == 4096  # bytes, despite the name
    assert one(page_size=1 << 21, page_size_kib=1 << 21)[0].page_size == 1 << 21
    with pytest.raises(InvalidArgument, match="overlap"):
        parse_regions(
            json.dumps(
                [
                    {"base_host_virt_addr": 1 << 30, "size": 8192, "offset": 0, "page_size": 4096},
                    {
                        "base_host_virt_addr": 1 << 30,
                        "size": 4096,
                        "offset": 8192,
                        "page_size": 4096,
                    },
                ]
            ),
            1 << 20,
        )
