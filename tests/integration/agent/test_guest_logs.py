"""GetSandboxLogs on a real ``wrenn-agent`` with a real QEMU guest: envd's JSON lines from the
guest's serial console become entries (a loopback listener started in the guest shows up as
envd's ``ports.forwarding``), they survive a pause and a resume, ``start_ms`` and ``limit``
select, and a destroyed sandbox has none."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b import AsyncSandbox

from tests.integration.agent.agent_harness import Agent, AgentHome, Leftovers
from wrenn.gen.hostagent import hostagent_pb as pb
from wrenn.gen.hostagent.hostagent_connect import HostAgentClient

pytestmark = [pytest.mark.vm, pytest.mark.slow]

ENVD_PORT = 49983
LISTEN_PORT = 41234
SANDBOX = "glogs-1"


@pytest.fixture(scope="module")
def agent(agent_home: AgentHome, request: pytest.FixtureRequest) -> Iterator[Agent]:
    failed_before = request.session.testsfailed
    agent = Agent(agent_home, runtime="auto", qemu_accel="auto", warm_base_template="true")
    try:
        yield agent
        if request.session.testsfailed == failed_before:
            idle = Leftovers.count(agent_home)
            assert (idle.vmm_processes, idle.sandbox_disks, idle.run_dirs) == (0, 0, 0), idle
    finally:
        agent.stop()
        if request.session.testsfailed > failed_before:
            sys.stderr.write(f"--- agent log ---\n{agent.logs()[-20000:]}\n")


@pytest.fixture
async def client(agent: Agent) -> AsyncIterator[HostAgentClient]:
    client = agent.client()
    try:
        yield client
    finally:
        listing = await client.list_sandboxes(pb.ListSandboxesRequest())
        for s in listing.sandboxes:
            await client.destroy_sandbox(pb.DestroySandboxRequest(sandbox_id=s.sandbox_id))
        await client.close()


async def logs(
    client: HostAgentClient, start_ms: int = 0, limit: int = 0
) -> list[pb.SandboxLogEntry]:
    resp = await client.get_sandbox_logs(
        pb.GetSandboxLogsRequest(sandbox_id=SANDBOX, start_ms=start_ms, limit=limit)
    )
    return list(resp.entries)


async def forwarding_logged(client: HostAgentClient) -> list[pb.SandboxLogEntry]:
    return [
        e
        for e in await logs(client)
        if e.message == "ports.forwarding" and e.fields.get("port") == str(LISTEN_PORT)
    ]


async def eventually_logged(client: HostAgentClient, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await forwarding_logged(client):
        assert time.monotonic() < deadline, f"no ports.forwarding in {await logs(client)}"
        await asyncio.sleep(0.3)


async def test_envd_logs_are_kept_across_pause_and_resume(
    agent: Agent, client: HostAgentClient
) -> None:
    await client.create_sandbox(pb.CreateSandboxRequest(sandbox_id=SANDBOX, template_id="base"))
    sbx = await AsyncSandbox.create(debug=True, sandbox_url=agent.forward_url(SANDBOX, ENVD_PORT))
    await sbx.commands.run(
        f"python3 -m http.server {LISTEN_PORT} --bind 127.0.0.1", background=True
    )
    await eventually_logged(client)

    entries = await logs(client)
    for e in entries:
        line = json.loads(e.line)  # the line as envd wrote it
        assert line["event"] == e.message and e.level in ("debug", "info", "warn", "error")
        assert e.timestamp_ms > 0
    before_pause = len(entries)

    await client.pause_sandbox(pb.PauseSandboxRequest(sandbox_id=SANDBOX))
    paused = await logs(client)  # the VM and its console file are gone; the entries are not
    assert await forwarding_logged(client)
    assert len(paused) >= before_pause
    assert [e.line for e in paused[:before_pause]] == [e.line for e in entries]

    await client.resume_sandbox(pb.ResumeSandboxRequest(sandbox_id=SANDBOX))
    resumed = await logs(client)
    assert [e.line for e in resumed[: len(paused)]] == [e.line for e in paused]

    # start_ms (included) and limit select, oldest first.
    last = paused[-1].timestamp_ms
    assert all(e.timestamp_ms >= last for e in await logs(client, start_ms=last))
    assert [e.line for e in await logs(client, limit=1)] == [resumed[0].line]

    await client.destroy_sandbox(pb.DestroySandboxRequest(sandbox_id=SANDBOX))
    with pytest.raises(ConnectError) as gone:
        await logs(client)
    assert gone.value.code == Code.NOT_FOUND
