"""Pause and resume of real QEMU guests through a real ``wrenn-agent``: what a sandbox holds
comes back as it was. Files written up to the moment of the pause, a process that keeps
counting, a loopback-only server forwarded by envd, connections open across the pause (they end
instead of hanging, and new ones work at once), and the guest's clock.

One agent (QEMU under TCG, forced so the accelerator probe is skipped) serves the module; each
test destroys its sandbox, and the module's teardown checks that the agent's host resources are
back to idle. Guests under TCG are slow: every test keeps to one sandbox."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import os
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from e2b import AsyncSandbox
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from tests.integration.agent.agent_harness import Agent, AgentHome, Leftovers
from tests.integration.agent.test_agent import WS_ECHO
from wrenn.gen.hostagent import hostagent_pb as pb

pytestmark = [pytest.mark.vm, pytest.mark.slow]

ENVD_PORT = 49983
CYCLES = 20
#: How long a connection open across a pause may take to end once the sandbox runs again.
CONNECTION_END_TIMEOUT_S = 30.0
#: Clock test: how long the sandbox stays paused, how far its clock may be from the host's, and
#: how soon after the resume it must be that close.
CLOCK_PAUSE_S = 30.0
CLOCK_TOLERANCE_S = 1.0
CLOCK_SETTLE_S = 2.0
#: Appends the next number to /tmp/count.log ten times a second, forever; its PID goes first.
COUNTER = (
    "echo $$ > /tmp/count.pid; i=0; "
    "while true; do i=$((i+1)); echo $i >> /tmp/count.log; sleep 0.1; done"
)

_ids = itertools.count()


@pytest.fixture(scope="module")
def agent(agent_home: AgentHome, request: pytest.FixtureRequest) -> Iterator[Agent]:
    failed_before = request.session.testsfailed
    agent = Agent(agent_home, runtime="qemu", qemu_accel="tcg", warm_base_template="true")
    try:
        yield agent
        if request.session.testsfailed == failed_before:
            idle = Leftovers.count(agent_home)
            assert (idle.vmm_processes, idle.sandbox_disks, idle.run_dirs) == (0, 0, 0), idle
            assert idle.namespaces == idle.taps == idle.host_links == agent_home.slots, idle
    finally:
        agent.stop()
        if request.session.testsfailed > failed_before:
            sys.stderr.write(f"--- agent log ---\n{agent.logs()[-20000:]}\n")


@dataclass
class Box:
    """One sandbox of the test: its id, the agent's client, and the e2b SDK through the
    forwarding path (made anew after each resume, as a client reconnecting would)."""

    agent: Agent
    sandbox_id: str
    client: Any
    sdk: AsyncSandbox

    def url(self, port: int) -> str:
        return self.agent.forward_url(self.sandbox_id, port)

    async def reconnect(self) -> None:
        self.sdk = await _sdk(self.agent, self.sandbox_id)

    async def pause(self) -> None:
        await self.client.pause_sandbox(pb.PauseSandboxRequest(sandbox_id=self.sandbox_id))

    async def resume(self) -> None:
        await self.client.resume_sandbox(pb.ResumeSandboxRequest(sandbox_id=self.sandbox_id))
        await self.reconnect()

    async def sh(self, script: str) -> str:
        result = await self.sdk.commands.run(script)
        assert result.exit_code == 0, result.stderr
        return result.stdout


async def _sdk(agent: Agent, sandbox_id: str) -> AsyncSandbox:
    return await AsyncSandbox.create(
        debug=True, sandbox_url=agent.forward_url(sandbox_id, ENVD_PORT)
    )


@pytest.fixture
async def box(agent: Agent) -> AsyncIterator[Box]:
    sandbox_id = f"pr{os.getpid() % 1000}-{next(_ids)}"
    client = agent.client()
    try:
        await client.create_sandbox(
            pb.CreateSandboxRequest(sandbox_id=sandbox_id, template_id="base")
        )
        try:
            yield Box(agent, sandbox_id, client, await _sdk(agent, sandbox_id))
        finally:
            await client.destroy_sandbox(pb.DestroySandboxRequest(sandbox_id=sandbox_id))
    finally:
        await client.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


async def eventually(
    probe: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await probe():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s:.0f} s"
        await asyncio.sleep(0.2)


def sha256sums(text: str) -> dict[str, str]:
    """``sha256sum`` output as {path: digest}."""
    return {path: digest for digest, path in (line.split() for line in text.splitlines())}


async def test_files_written_up_to_the_pause_survive_twenty_cycles(box: Box) -> None:
    """Each cycle writes a file and pauses at once (envd's /snapshot/prepare syncs filesystems
    first), on the disk and on tmpfs in turn; after every resume all files written so far
    read back with the digests they were written with."""
    expected: dict[str, str] = {}
    for cycle in range(CYCLES):
        directory = "/home/user" if cycle % 2 == 0 else "/tmp"
        path = f"{directory}/cycle-{cycle:02d}.bin"
        data = os.urandom(256 * 1024 + cycle)
        await box.sdk.files.write(path, data)
        expected[path] = hashlib.sha256(data).hexdigest()
        await box.pause()
        await box.resume()
        found = sha256sums(await box.sh(f"sha256sum {' '.join(expected)}"))
        assert found == expected, f"after cycle {cycle}"
    last = await box.sdk.files.read(path, format="bytes")
    assert hashlib.sha256(last).hexdigest() == expected[path]


async def test_a_background_process_keeps_counting_across_a_pause(box: Box) -> None:
    await box.sdk.commands.run(COUNTER, background=True)

    async def counted() -> list[int]:
        text = await box.sh("cat /tmp/count.log 2>/dev/null || true")
        return [int(line) for line in text.split()]

    async def reached(n: int) -> bool:
        return len(await counted()) >= n

    await eventually(lambda: reached(5), "the counter")
    pid = (await box.sh("cat /tmp/count.pid")).strip()
    await box.pause()
    await box.resume()
    at_resume = len(await counted())
    await eventually(lambda: reached(at_resume + 5), "the counter after the resume")
    values = await counted()
    assert values == list(range(1, len(values) + 1)), "the count skipped or repeated"
    assert (await box.sh("cat /tmp/count.pid")).strip() == pid
    assert (await box.sh(f"kill -0 {pid} && echo alive")).strip() == "alive"


async def _serve_page(box: Box, http: httpx.AsyncClient, port: int, bind: str) -> str:
    """``python3 -m http.server`` in the guest bound to ``bind`` (127.0.0.1: reachable from
    outside only through envd's port subsystem); the page's URL on the forwarding path once
    the agent reaches it."""
    await box.sdk.commands.run(
        f"mkdir -p /tmp/www && echo page > /tmp/www/index.html && "
        f"cd /tmp/www && exec python3 -m http.server {port} --bind {bind}",
        background=True,
    )
    page = f"{box.url(port)}/index.html"
    await eventually(lambda: _serves(http, page), f"the guest's web server on {bind}")
    return page


async def _serves(http: httpx.AsyncClient, page: str) -> bool:
    try:
        response = await http.get(page, timeout=5)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and response.text == "page\n"


async def test_a_forwarded_loopback_server_is_reachable_after_resume(
    box: Box, http: httpx.AsyncClient
) -> None:
    """envd's port subsystem stops at /snapshot/prepare and restarts at the /init after the
    resume; the loopback-only server is forwarded again from its next scan of /proc/net/tcp
    (so the check polls rather than expecting it at once)."""
    page = await _serve_page(box, http, 8000, "127.0.0.1")
    await box.pause()
    gone = await http.get(page)
    assert gone.status_code >= 400 and gone.json()["code"] == "failed_precondition"
    await box.resume()
    await eventually(lambda: _serves(http, page), "the forwarded server after the resume")


def _connect_request(script: str) -> bytes:
    message = json.dumps({"process": {"cmd": "/bin/sh", "args": ["-c", script]}}).encode()
    return struct.pack(">BI", 0, len(message)) + message


CONNECT_HEADERS = {
    "Content-Type": "application/connect+json",
    "Connect-Protocol-Version": "1",
}


async def _read_stream(response: httpx.Response, first: asyncio.Event) -> str:
    """Read a Connect server stream to its end; how it ended."""
    try:
        async for chunk in response.aiter_bytes():
            if chunk:
                first.set()
    except httpx.HTTPError as err:
        return f"broken: {type(err).__name__}"
    finally:
        first.set()
    return "ended"


async def _ws_echoes(url: str) -> bool:
    try:
        async with ws_connect(url, proxy=None, open_timeout=10) as ws:
            await ws.send("ready?")
            return await ws.recv() == "ready?"
    except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError):
        return False


async def test_connections_open_across_a_pause_end_and_new_ones_work_at_once(
    box: Box, http: httpx.AsyncClient
) -> None:
    """A process stream (Connect, through the forwarding path), a WebSocket to a guest port
    and an idle keep-alive connection are open when the sandbox pauses. After the resume the
    stream and the WebSocket have ended (within a bound, never hanging), and new requests,
    streams and WebSockets succeed on the first try. (The guest's servers listen on every
    address here: a loopback-only one comes back with envd's next port scan, see above.)"""
    await box.sdk.files.write("/tmp/ws_echo.py", WS_ECHO)
    await box.sdk.commands.run("python3 /tmp/ws_echo.py 8765", background=True)
    page = await _serve_page(box, http, 8001, "0.0.0.0")
    ws_url = box.url(8765).replace("http://", "ws://") + "/echo"
    await eventually(lambda: _ws_echoes(ws_url), "the guest's WebSocket server")

    # Idle keep-alive: one request, the connection stays in the pool.
    keep_alive = httpx.AsyncClient(timeout=30)
    streams = httpx.AsyncClient(timeout=httpx.Timeout(30, read=None))
    try:
        assert (await keep_alive.get(page)).status_code == 200
        request = streams.build_request(
            "POST",
            f"{box.url(ENVD_PORT)}/process.Process/Start",
            content=_connect_request("while true; do echo tick; sleep 0.5; done"),
            headers=CONNECT_HEADERS,
        )
        response = await streams.send(request, stream=True)
        assert response.status_code == 200
        first = asyncio.Event()
        stream = asyncio.ensure_future(_read_stream(response, first))
        async with ws_connect(ws_url, proxy=None, open_timeout=10) as ws:
            await ws.send("before")
            assert await ws.recv() == "before"
            await asyncio.wait_for(first.wait(), 30)

            await box.pause()
            await box.resume()

            async with asyncio.timeout(CONNECTION_END_TIMEOUT_S):
                ended = await stream
                with pytest.raises(ConnectionClosed):
                    while True:
                        await ws.recv()
        print(f"process stream open across the pause: {ended}")
        await response.aclose()

        # New connections work at once: no retries from here on.
        assert (await keep_alive.get(page)).text == "page\n"
        fresh = await http.post(
            f"{box.url(ENVD_PORT)}/process.Process/Start",
            content=_connect_request("echo fresh"),
            headers=CONNECT_HEADERS,
        )
        assert fresh.status_code == 200
        assert b"fresh" in _stdout(fresh.content)
        async with ws_connect(ws_url, proxy=None, open_timeout=10) as ws:
            await ws.send("after")
            assert await ws.recv() == "after"
    finally:
        await keep_alive.aclose()
        await streams.aclose()


def _stdout(body: bytes) -> bytes:
    out, pos = b"", 0
    while pos + 5 <= len(body):
        flags, length = struct.unpack_from(">BI", body, pos)
        payload = json.loads(body[pos + 5 : pos + 5 + length] or b"{}")
        pos += 5 + length
        data = payload.get("event", {}).get("data", {})
        if not flags & 0x02 and "stdout" in data:
            out += base64.b64decode(data["stdout"])
    return out


async def test_the_guest_clock_follows_the_host_after_a_long_pause(box: Box) -> None:
    """Paused for 30 s, the guest's clock would still show the moment of the pause. Under TCG
    there is no PTP clock (/dev/ptp0) for chronyd, so this exercises envd's fallback: /init
    carries the host's time and envd steps the clock to it. Under KVM chronyd on the PTP clock
    corrects it (``makestep``). Within 2 s of the resume the guest's ``date`` must be within
    1 s of the host's."""
    ptp = (await box.sh("test -e /dev/ptp0 && echo ptp || echo none")).strip()
    print(f"guest clock source: {'PTP (chronyd)' if ptp == 'ptp' else 'envd /init fallback'}")
    await box.pause()
    await asyncio.sleep(CLOCK_PAUSE_S)
    await box.resume()
    resumed = time.time()
    offsets = []
    while True:
        before = time.time()
        guest = float(await box.sh("date +%s.%N"))
        after = time.time()
        # The guest read its clock somewhere between the two host readings.
        offset = max(before - guest, guest - after, 0.0)
        offsets.append(round(offset, 3))
        if offset <= CLOCK_TOLERANCE_S:
            break
        assert before - resumed < CLOCK_SETTLE_S, (
            f"guest clock still off by {offsets} s, {before - resumed:.1f} s after the resume"
        )
    print(f"guest clock offsets after the resume: {offsets} s")
