"""The port subsystem with real sockets: a loopback-only listener becomes reachable on the
forward address (another loopback address here, so nothing leaves the machine), and restarts
leak no task, socket or process.

The subsystem forwards every loopback-only listener of the machine, not only the test's; the
checks look at the test's port and at resources that must return to their baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import EnvdProcess
from wrenn.envd.config import EnvdSettings
from wrenn.envd.ports import PortSubsystem

SAFETY_TIMEOUT_S = 30.0
RESTARTS = 50


def unique_loopback() -> str:
    return f"127.{random.randint(100, 250)}.{random.randint(1, 250)}.{random.randint(1, 250)}"


def settings(forward: str) -> EnvdSettings:
    return EnvdSettings(port_forward_address=forward, port_scan_interval_s=0.05)


async def scanned(ports: PortSubsystem) -> None:
    async with asyncio.timeout(SAFETY_TIMEOUT_S):
        await ports.wait_for_scan()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def echo_server() -> AsyncIterator[int]:
    """An echo service listening on 127.0.0.1 only; yields its port."""
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def echo_through(host: str, port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(payload)
        await writer.drain()
        return await reader.readexactly(len(payload))
    finally:
        writer.close()
        await writer.wait_closed()


async def ended(reader: asyncio.StreamReader) -> bool:
    """Whether the peer ends the connection (EOF or reset) before sending anything."""
    try:
        async with asyncio.timeout(SAFETY_TIMEOUT_S):
            return await reader.read() == b""
    except ConnectionResetError:
        return True


def open_files() -> set[str]:
    """What this process's descriptors point to (``socket:[inode]`` for a socket): unlike a
    count, untouched by descriptors other code in the process closes meanwhile (an earlier
    test's objects collected)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
    return out


async def settle(condition: Callable[[], bool]) -> None:
    """Wait until ``condition`` holds (cleanup in the event loop is asynchronous)."""
    async with asyncio.timeout(SAFETY_TIMEOUT_S):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


async def test_loopback_listener_is_forwarded_until_it_goes_away(echo_server: int) -> None:
    forward = unique_loopback()
    ports = PortSubsystem(settings(forward))
    try:
        await ports.start()
        await scanned(ports)
        assert echo_server in ports.forwarded
        assert await echo_through(forward, echo_server, b"through the forwarder") == (
            b"through the forwarder"
        )
    finally:
        await ports.stop()
    assert ports.forwarded == {}
    with pytest.raises(ConnectionRefusedError):
        await echo_through(forward, echo_server, b"x")


async def test_forwarder_closes_when_its_listener_disappears() -> None:
    forward = unique_loopback()
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ports = PortSubsystem(settings(forward))
    try:
        await ports.start()
        await scanned(ports)
        assert port in ports.forwarded
        server.close()
        await server.wait_closed()
        await scanned(ports)
        assert port not in ports.forwarded
        with pytest.raises(ConnectionRefusedError):
            await echo_through(forward, port, b"x")
    finally:
        server.close()
        await ports.stop()


async def test_stop_is_idempotent_and_start_works_after_stop(echo_server: int) -> None:
    forward = unique_loopback()
    ports = PortSubsystem(settings(forward))
    await ports.stop()
    try:
        for _ in range(2):
            await ports.start()
            await ports.start()
            await scanned(ports)
            assert await echo_through(forward, echo_server, b"again") == b"again"
            await ports.stop()
            await ports.stop()
            assert not ports.running
    finally:
        await ports.stop()


async def test_restart_soon_forwards_again_and_a_stop_right_after_it_wins(
    echo_server: int,
) -> None:
    forward = unique_loopback()
    ports = PortSubsystem(settings(forward))
    try:
        await ports.start()
        ports.restart_soon()
        # Asked in the same breath as the restart: the subsystem must end up stopped.
        await ports.stop()
        assert not ports.running
        ports.restart_soon()
        await ports.settle()
        assert ports.running
        await scanned(ports)
        assert await echo_through(forward, echo_server, b"back") == b"back"
    finally:
        await ports.stop()
    assert not ports.running


async def test_no_forward_address_leaves_the_subsystem_idle() -> None:
    ports = PortSubsystem(settings(""))
    await ports.start()
    assert not ports.running
    await ports.stop()


async def test_restart_cycles_leak_no_task_socket_or_process() -> None:
    forward = unique_loopback()
    me = psutil.Process()
    children_before = me.children(recursive=True)
    tasks_before = asyncio.all_tasks()
    files_before = open_files()

    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ports = PortSubsystem(settings(forward))
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(RESTARTS):
            await ports.restart()
            await scanned(ports)
            if held:
                # The relayed connection opened before the restart was ended by it.
                assert await ended(held[-1][0])
            reader, writer = await asyncio.open_connection(forward, port)
            writer.write(b"ping")
            await writer.drain()
            assert await reader.readexactly(4) == b"ping"
            held.append((reader, writer))
    finally:
        await ports.stop()
        for _, writer in held:
            writer.close()
        server.close()
        await server.wait_closed()

    assert not ports.running and ports.forwarded == {}
    await settle(lambda: asyncio.all_tasks() == tasks_before)
    await settle(lambda: open_files() <= files_before)
    assert me.children(recursive=True) == children_before


# --- the same through a real envd process ---------------------------------------------------


class ThreadedEcho:
    """An echo service on 127.0.0.1 only, in a thread of the test process."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(SAFETY_TIMEOUT_S)
                try:
                    while data := conn.recv(65536):
                        conn.sendall(data)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def threaded_echo() -> Iterator[ThreadedEcho]:
    echo = ThreadedEcho()
    yield echo
    echo.close()


@pytest.fixture
def forwarding_envd(request: pytest.FixtureRequest) -> Iterator[tuple[EnvdProcess, str]]:
    forward = unique_loopback()
    proc = EnvdProcess(
        env={
            "WRENN_ENVD_PORT_FORWARD_ADDRESS": forward,
            "WRENN_ENVD_PORT_SCAN_INTERVAL_S": "0.1",
        }
    )
    yield proc, forward
    proc.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"--- envd log ---\n{proc.logs()}")
    proc.log.unlink(missing_ok=True)


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + SAFETY_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition never held")
        time.sleep(0.02)


def echoes(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=SAFETY_TIMEOUT_S) as conn:
            conn.sendall(b"hello")
            return conn.recv(5) == b"hello"
    except OSError:
        return False


def envd_fds_beside_forwarders(pid: int, forward: str) -> int | None:
    """fds of envd that are not forwarder listeners (those follow the machine's loopback
    listeners, which other processes open and close); None while a TCP connection is open."""
    proc = psutil.Process(pid)
    conns = proc.net_connections(kind="tcp")
    if any(c.status != psutil.CONN_LISTEN for c in conns):
        return None
    forwarders = [c.laddr.port for c in conns if c.laddr.ip == forward]
    assert len(set(forwarders)) == len(forwarders), "duplicate forwarders"
    fds: int = proc.num_fds()
    return fds - len(forwarders)


def settled_fds(pid: int, forward: str) -> int:
    found: list[int] = []

    def check() -> bool:
        count = envd_fds_beside_forwarders(pid, forward)
        if count is None:
            return False
        found.append(count)
        return True

    wait_until(check)
    return found[-1]


def test_envd_forwards_a_loopback_listener(
    forwarding_envd: tuple[EnvdProcess, str], threaded_echo: ThreadedEcho
) -> None:
    _, forward = forwarding_envd
    wait_until(lambda: echoes(forward, threaded_echo.port))


def test_envd_snapshot_cycles_restart_ports_without_leaks(
    forwarding_envd: tuple[EnvdProcess, str], threaded_echo: ThreadedEcho
) -> None:
    envd, forward = forwarding_envd
    pid = envd.proc.pid
    wait_until(lambda: echoes(forward, threaded_echo.port))
    baseline = settled_fds(pid, forward)

    with httpx.Client(base_url=envd.url, timeout=SAFETY_TIMEOUT_S) as client:
        for _ in range(RESTARTS):
            assert client.post("/snapshot/prepare").status_code == 204
            assert client.post("/init", json={}).status_code == 204

    wait_until(lambda: echoes(forward, threaded_echo.port))
    assert settled_fds(pid, forward) == baseline
    assert psutil.Process(pid).children(recursive=True) == []


async def test_a_failing_scan_does_not_end_the_subsystem(tmp_path: Path) -> None:
    (tmp_path / "net" / "tcp").mkdir(parents=True)  # unreadable as a file
    ports = PortSubsystem(settings(unique_loopback()), proc_root=str(tmp_path))
    try:
        await ports.start()
        for _ in range(3):
            await scanned(ports)
        assert ports.running and ports.forwarded == {}
    finally:
        await ports.stop()
