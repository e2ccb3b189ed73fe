"""A real ``wrenn-agent`` process with real QEMU guests, driven through its Connect API (the
generated HostAgentClient) and its forwarding path (the official e2b SDK, raw HTTP and a
WebSocket): create from the base template, pause, resume into another slot, named snapshots
and sandboxes spawned from them, guest ports, metrics, host info and bad input.

One agent serves the module (its runtime is probed for real); each test removes the sandboxes
it made, and the module's teardown checks that the agent's host resources are back to idle."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b import AsyncSandbox, FileNotFoundException
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from tests.integration.agent.agent_harness import Agent, AgentHome, Leftovers
from wrenn.gen.hostagent import hostagent_pb as pb
from wrenn.gen.hostagent.hostagent_connect import HostAgentClient

pytestmark = [pytest.mark.vm, pytest.mark.slow]

ENVD_PORT = 49983
#: Counts in /tmp/count five times a second, forever; each value replaces the file whole (a
#: reader racing an in-place rewrite could see it shrink under it).
COUNTER = (
    "i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; "
    "sleep 0.2; done"
)
#: A WebSocket echo server on the standard library (the base image has no WebSocket package).
WS_ECHO = r"""
import base64, hashlib, socket, struct, sys, threading
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
def serve(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk
    key = next(l.split(b":", 1)[1].strip() for l in data.split(b"\r\n")
               if l.lower().startswith(b"sec-websocket-key:"))
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    f = conn.makefile("rb")
    while True:
        head = f.read(2)
        if len(head) < 2:
            return
        opcode, n = head[0] & 0x0F, head[1] & 0x7F
        if n == 126:
            n = struct.unpack(">H", f.read(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", f.read(8))[0]
        mask = f.read(4) if head[1] & 0x80 else b"\0\0\0\0"
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(f.read(n)))
        if opcode == 8:
            conn.sendall(b"\x88\x02\x03\xe8")
            conn.close()
            return
        n = len(payload)
        size = bytes([n]) if n < 126 else b"\x7e" + struct.pack(">H", n)
        conn.sendall(bytes([0x80 | opcode]) + size + payload)
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


@pytest.fixture(scope="module")
def agent(agent_home: AgentHome, request: pytest.FixtureRequest) -> Iterator[Agent]:
    failed_before = request.session.testsfailed
    agent = Agent(agent_home, runtime="auto", qemu_accel="auto", warm_base_template="true")
    try:
        yield agent
        left = asyncio.run(_destroy_all(agent))
        if request.session.testsfailed == failed_before:
            assert not left, f"tests left sandboxes behind: {left}"
            idle = Leftovers.count(agent_home)
            assert (idle.vmm_processes, idle.sandbox_disks, idle.run_dirs) == (0, 0, 0), idle
            assert idle.namespaces == idle.taps == idle.host_links == agent_home.slots, idle
    finally:
        agent.stop()
        if request.session.testsfailed > failed_before:
            sys.stderr.write(f"--- agent log ---\n{agent.logs()[-20000:]}\n")


async def _destroy_all(agent: Agent) -> list[str]:
    """Destroy whatever sandboxes are left; their ids."""
    client = agent.client()
    try:
        listing = await client.list_sandboxes(pb.ListSandboxesRequest())
        left = [s.sandbox_id for s in listing.sandboxes]
        for sandbox_id in left:
            await client.destroy_sandbox(pb.DestroySandboxRequest(sandbox_id=sandbox_id))
        return left
    finally:
        await client.close()


@pytest.fixture
async def client(agent: Agent) -> AsyncIterator[HostAgentClient]:
    client = agent.client()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


async def sdk(agent: Agent, sandbox_id: str) -> AsyncSandbox:
    """The e2b SDK pointed at the sandbox's envd through the agent's forwarding path."""
    return await AsyncSandbox.create(
        debug=True, sandbox_url=agent.forward_url(sandbox_id, ENVD_PORT)
    )


async def create(client: HostAgentClient, sandbox_id: str, **fields: Any) -> pb.SandboxInfo:
    fields.setdefault("template_id", "base")
    request = pb.CreateSandboxRequest(sandbox_id=sandbox_id, **fields)
    response = await client.create_sandbox(request)
    assert response.sandbox is not None
    return response.sandbox


async def eventually(
    probe: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await probe():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s:.0f} s"
        await asyncio.sleep(0.2)


async def expect(code: Code, call: Awaitable[Any]) -> ConnectError:
    with pytest.raises(ConnectError) as failure:
        await call
    assert failure.value.code == code, failure.value.message
    return failure.value


async def test_host_info_names_the_runtime_and_why(client: HostAgentClient) -> None:
    info = await client.get_host_info(pb.GetHostInfoRequest())
    assert info.runtime in ("qemu-tcg", "qemu-kvm", "firecracker")
    assert info.runtime_reason
    assert info.vcpus >= 1 and info.memory_bytes > 0 and info.disk_free_bytes > 0
    print(f"runtime: {info.runtime} ({info.runtime_reason})")


async def test_create_pause_resume_snapshot_spawn_destroy(
    agent: Agent, client: HostAgentClient, http: httpx.AsyncClient
) -> None:
    parent = await create(client, "life", env_vars={"GREETING": "hello"})
    assert parent.state == pb.SandboxState.RUNNING
    assert parent.envd_version and parent.address and (parent.vcpus, parent.memory_mib) != (0, 0)

    box = await sdk(agent, "life")
    result = await box.commands.run('echo "$(id -un) $GREETING"')
    assert (result.exit_code, result.stdout) == (0, "user hello\n")
    await box.files.write("/home/user/note.txt", "kept across pause")
    await box.commands.run(COUNTER, background=True)

    async def count() -> int:
        try:
            text = await (await sdk(agent, "life")).files.read("/tmp/count")
        except FileNotFoundException:
            return 0
        return int(text.strip() or 0)

    async def counted_to(n: int) -> bool:
        return await count() >= n

    await eventually(lambda: counted_to(3), "the counter")
    metrics = await client.get_sandbox_metrics(pb.GetSandboxMetricsRequest(sandbox_id="life"))
    assert metrics.metrics is not None
    assert metrics.metrics.cpu_count == parent.vcpus
    assert metrics.metrics.mem_total_bytes > 0 and metrics.metrics.vmm_rss_bytes > 0
    assert metrics.metrics.mem_cache_bytes > 0  # the guest's page cache holds its files

    before_pause = await count()
    paused = await client.pause_sandbox(pb.PauseSandboxRequest(sandbox_id="life"))
    listing = await client.list_sandboxes(pb.ListSandboxesRequest())
    listed = {s.sandbox_id: s for s in listing.sandboxes}
    assert listed["life"].state == pb.SandboxState.PAUSED
    assert listed["life"].build_id == paused.build_id
    gone = await http.get(f"{agent.forward_url('life', ENVD_PORT)}/health")
    assert gone.status_code >= 400 and gone.json()["code"] == "failed_precondition"

    # The slot it left went to the back of the free list: it resumes in another one.
    resumed = (await client.resume_sandbox(pb.ResumeSandboxRequest(sandbox_id="life"))).sandbox
    assert resumed is not None and resumed.state == pb.SandboxState.RUNNING
    assert resumed.address != parent.address

    box = await sdk(agent, "life")
    assert await box.files.read("/home/user/note.txt") == "kept across pause"
    after_resume = await count()
    assert after_resume >= before_pause
    await eventually(lambda: counted_to(after_resume + 1), "the counter after the resume")

    # A named snapshot: the sandbox keeps running, new sandboxes spawn from it.
    snap = (
        await client.create_snapshot(
            pb.CreateSnapshotRequest(sandbox_id="life", snapshot_id="life-snap")
        )
    ).snapshot
    assert snap is not None and (snap.vcpus, snap.memory_mib) == (parent.vcpus, parent.memory_mib)
    assert (await box.commands.run("echo still here")).stdout == "still here\n"

    await expect(
        Code.INVALID_ARGUMENT,
        create(client, "wrong", snapshot_id="life-snap", memory_mib=parent.memory_mib * 2),
    )
    await create(client, "child", snapshot_id="life-snap", envd_access_token="secret")
    files = f"{agent.forward_url('child', ENVD_PORT)}/files"
    token = {"X-Access-Token": "secret"}
    note = await http.get(files, params={"path": "/home/user/note.txt"}, headers=token)
    assert (note.status_code, note.text) == (200, "kept across pause")
    assert (await http.get(files, params={"path": "/tmp/count"})).status_code == 401

    async def child_counted_to(n: int) -> bool:
        got = await http.get(files, params={"path": "/tmp/count"}, headers=token)
        return int(got.text.strip() or 0) >= n

    spawned_at = int((await http.get(files, params={"path": "/tmp/count"}, headers=token)).text)
    await eventually(lambda: child_counted_to(spawned_at + 1), "the spawned sandbox's counter")

    # A paused sandbox spawned from the snapshot depends on its build.
    await client.pause_sandbox(pb.PauseSandboxRequest(sandbox_id="child"))
    await expect(
        Code.FAILED_PRECONDITION,
        client.delete_snapshot(pb.DeleteSnapshotRequest(snapshot_id="life-snap")),
    )
    await client.destroy_sandbox(pb.DestroySandboxRequest(sandbox_id="child"))
    await client.delete_snapshot(pb.DeleteSnapshotRequest(snapshot_id="life-snap"))
    await client.destroy_sandbox(pb.DestroySandboxRequest(sandbox_id="life"))
    info = await client.get_host_info(pb.GetHostInfoRequest())
    assert not info.snapshots and info.sandboxes == 0
    assert [t.template_id for t in info.templates] == ["base"]
    assert info.templates[0].envd_version == parent.envd_version
    assert not (await client.list_sandboxes(pb.ListSandboxesRequest())).sandboxes


async def test_forwarding_reaches_guest_ports_over_http_and_websocket(
    agent: Agent, client: HostAgentClient, http: httpx.AsyncClient
) -> None:
    await create(client, "ports")
    try:
        box = await sdk(agent, "ports")
        await box.files.write("/tmp/ws_echo.py", WS_ECHO)
        await box.commands.run("python3 /tmp/ws_echo.py 8765", background=True)
        await box.commands.run(
            "mkdir -p /tmp/www && echo page > /tmp/www/index.html && "
            "cd /tmp/www && exec python3 -m http.server 8000",
            background=True,
        )
        page = f"{agent.forward_url('ports', 8000)}/index.html?x=1"

        async def serving() -> bool:
            try:
                return (await http.get(page, timeout=5)).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(serving, "the guest's web server")
        response = await http.get(page)
        assert response.text == "page\n"
        assert response.headers["content-length"] == "5"

        closed = await http.get(f"{agent.forward_url('ports', 9)}/")
        assert (closed.status_code, closed.json()["code"]) == (502, "unavailable")
        assert "port is not open" in closed.json()["message"]  # what the e2b SDK recognises
        unknown = await http.get(f"{agent.forward_url('nobody', 8000)}/")
        assert (unknown.status_code, unknown.json()["code"]) == (404, "not_found")

        ws_url = agent.forward_url("ports", 8765).replace("http://", "ws://") + "/echo"

        async def echoing() -> bool:
            try:
                async with ws_connect(ws_url, proxy=None, open_timeout=10) as ws:
                    await ws.send("ready?")
                    return await ws.recv() == "ready?"
            except (OSError, InvalidHandshake, ConnectionClosed):
                return False

        await eventually(echoing, "the guest's WebSocket server")
        async with ws_connect(ws_url, proxy=None, open_timeout=30) as ws:
            await ws.send("ping")
            assert await ws.recv() == "ping"
            await ws.send(b"\x00\x01" * 1000)
            assert await ws.recv() == b"\x00\x01" * 1000
    finally:
        await client.destroy_sandbox(pb.DestroySandboxRequest(sandbox_id="ports"))


async def test_bad_requests_fail_clearly_and_leave_nothing(
    agent: Agent, client: HostAgentClient
) -> None:
    await expect(Code.NOT_FOUND, create(client, "x1", template_id="no-such-template"))
    await expect(Code.NOT_FOUND, create(client, "x2", snapshot_id="no-such-snapshot"))
    await expect(Code.INVALID_ARGUMENT, create(client, "x3", vcpus=4096))
    await expect(Code.INVALID_ARGUMENT, create(client, "x4", memory_mib=1 << 30))
    await expect(Code.INVALID_ARGUMENT, create(client, "../escape"))
    for call in (
        client.destroy_sandbox(pb.DestroySandboxRequest(sandbox_id="x1")),
        client.pause_sandbox(pb.PauseSandboxRequest(sandbox_id="x1")),
        client.resume_sandbox(pb.ResumeSandboxRequest(sandbox_id="x1")),
        client.get_sandbox_metrics(pb.GetSandboxMetricsRequest(sandbox_id="x1")),
        client.delete_snapshot(pb.DeleteSnapshotRequest(snapshot_id="x1")),
    ):
        await expect(Code.NOT_FOUND, call)

    # Every slot taken: the next create is refused, and leaves nothing behind.
    held = [await create(client, f"slot{i}") for i in range(agent.home.slots)]
    try:
        await expect(Code.ALREADY_EXISTS, create(client, "slot0"))
        mib = held[0].memory_mib + 256
        await expect(Code.INVALID_ARGUMENT, create(client, "x5", memory_mib=mib))
        await expect(
            Code.FAILED_PRECONDITION,
            client.resume_sandbox(pb.ResumeSandboxRequest(sandbox_id="slot0")),
        )
        await expect(Code.RESOURCE_EXHAUSTED, create(client, "one-too-many"))
        listed = (await client.list_sandboxes(pb.ListSandboxesRequest())).sandboxes
        assert sorted(s.sandbox_id for s in listed) == [s.sandbox_id for s in held]
        disks = {p.name for p in (agent.home.state_dir / "disks" / "sandboxes").glob("*.img")}
        assert {f"{s.sandbox_id}.img" for s in held} <= disks
        assert not [d for d in disks if "one-too-many" in d], disks
    finally:
        for sandbox in held:
            await client.destroy_sandbox(pb.DestroySandboxRequest(sandbox_id=sandbox.sandbox_id))
