"""Nothing the agent acquires outlives its use: not after 20 create/destroy cycles, not after
the agent is SIGKILLed in the middle of a create and started again (its reaper), not after a
guest fails to boot. Counted from the kernel and the file system: network namespaces, host
veths, taps, VMM processes, mounts, loop devices, sandbox disks and VM run directories."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from tests.integration.agent.agent_harness import Agent, AgentHome, Leftovers
from tests.integration.agent.conftest import Agents
from wrenn.gen.hostagent import hostagent_pb as pb

pytestmark = [pytest.mark.vm, pytest.mark.slow]

CYCLES = 20


def idle(home: AgentHome, counted: Leftovers) -> None:
    """A running agent with no sandbox: its slots and the disk store's mount, nothing else."""
    assert (counted.vmm_processes, counted.sandbox_disks, counted.run_dirs) == (0, 0, 0), counted
    assert counted.namespaces == counted.taps == counted.host_links == home.slots, counted
    assert (counted.mounts, counted.loop_devices) == (1, 1), counted


def gone(counted: Leftovers) -> None:
    """A stopped agent: nothing at all on the host."""
    assert counted == Leftovers(0, 0, 0, 0, 0, 0, 0, 0), counted


async def create(agent: Agent, sandbox_id: str) -> pb.SandboxInfo:
    client = agent.client()
    try:
        request = pb.CreateSandboxRequest(sandbox_id=sandbox_id, template_id="base")
        response = await client.create_sandbox(request)
    finally:
        await client.close()
    assert response.sandbox is not None
    return response.sandbox


async def destroy(agent: Agent, sandbox_id: str) -> None:
    client = agent.client()
    try:
        await client.destroy_sandbox(pb.DestroySandboxRequest(sandbox_id=sandbox_id))
    finally:
        await client.close()


async def test_create_destroy_cycles_leave_nothing(agents: Agents) -> None:
    home = agents.home
    agent = await agents.start()
    await create(agent, "warm")  # the base template exists from here on
    await destroy(agent, "warm")
    before = Leftovers.count(home)
    idle(home, before)
    for i in range(CYCLES):
        await create(agent, f"cycle-{i}")
        await destroy(agent, f"cycle-{i}")
    assert Leftovers.count(home) == before
    await agents.stop(agent)
    gone(Leftovers.count(home))


async def test_agent_killed_mid_create_is_reaped_when_it_starts_again(agents: Agents) -> None:
    home = agents.home
    agent = await agents.start()
    await create(agent, "warm")
    await destroy(agent, "warm")

    doomed = asyncio.ensure_future(create(agent, "doomed"))
    deadline = time.monotonic() + 60
    while Leftovers.count(home).vmm_processes == 0:
        assert not doomed.done(), "the create ended before its VMM was seen"
        assert time.monotonic() < deadline, "no VMM process appeared"
        await asyncio.sleep(0.005)
    agent.kill()
    with pytest.raises((ConnectError, OSError)):
        await doomed
    orphaned = Leftovers.count(home)
    assert orphaned.vmm_processes == 1 and orphaned.namespaces == home.slots, orphaned

    restarted = await agents.start()
    idle(home, Leftovers.count(home))
    client = restarted.client()
    try:
        listing = await client.list_sandboxes(pb.ListSandboxesRequest())
    finally:
        await client.close()
    assert not listing.sandboxes
    await create(restarted, "after")  # the restarted agent works
    await destroy(restarted, "after")
    await agents.stop(restarted)
    gone(Leftovers.count(home))


def _builds(home: AgentHome) -> list[str]:
    store = home.state_dir / "snapshots"
    return sorted(os.listdir(store)) if store.is_dir() else []


def _variant(home: AgentHome, key: str, *, broken_kernel: bool) -> Path:
    """An image directory beside the real one, under another cache key (so the base template
    is built from it afresh): the real files linked, the kernel replaced by zeros if asked."""
    variant = home.image_dir.with_name(f"base-{key}")
    variant.mkdir()
    for name in ("vmlinuz", "vmlinux", "initrd.img", "rootfs.ext4"):
        (variant / name).symlink_to(home.image_dir / name)
    manifest = json.loads((home.image_dir / "manifest.json").read_text())
    (variant / "manifest.json").write_text(json.dumps({**manifest, "key": key}))
    if broken_kernel:
        (variant / "vmlinuz").unlink()
        (variant / "vmlinuz").write_bytes(bytes(4096))
    return variant


async def test_guests_that_fail_to_boot_fail_clearly_and_leave_nothing(agents: Agents) -> None:
    home = agents.home
    cases = [
        # QEMU cannot load the kernel and exits: the VMM dies during the boot.
        ("broken-kernel", {}, Code.UNAVAILABLE, "qemu"),
        # A guest that does not answer /health within the bound (TCG boots take seconds).
        ("silent-guest", {"boot_timeout_s": "2"}, Code.DEADLINE_EXCEEDED, "did not answer"),
    ]
    for key, settings, code, says in cases:
        image = _variant(home, key, broken_kernel=key == "broken-kernel")
        agent = await agents.start(
            base_image_dir=str(image), warm_base_template="false", **settings
        )
        before = Leftovers.count(home)
        idle(home, before)
        builds = _builds(home)
        with pytest.raises(ConnectError) as failure:
            await create(agent, f"on-{key}")
        assert failure.value.code == code, failure.value.message
        assert says in failure.value.message.lower(), failure.value.message
        assert Leftovers.count(home) == before
        assert _builds(home) == builds
        await agents.stop(agent)
        gone(Leftovers.count(home))
