"""A pause answers before its memory is stored: the build is held (device state in the store,
the VM's memory file kept as the build's memory image) and stored in the background. These
tests drive real QEMU guests through a real ``wrenn-agent`` into every state that store can be
in when something else comes: a resume, a named snapshot and a destroy while it runs, the
agent stopped (SIGTERM) or killed (SIGKILL) while it runs (or while a resume takes its memory
back) and started again, and a restart that finds a hold from an earlier boot of the host.

Each guest writes 100 MiB of random data to /dev/shm (memory only) and a file to its disk
before the pause; after a resume both must read back with the digests they were written
with. Each test checks that the agent's host resources are back to idle at its end."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from e2b import AsyncSandbox

from tests.integration.agent.agent_harness import Agent, AgentHome, Leftovers
from tests.integration.agent.conftest import Agents
from tests.integration.agent.test_leaks import gone, idle
from wrenn.gen.hostagent import hostagent_pb as pb
from wrenn.gen.hostagent.hostagent_connect import HostAgentClient

pytestmark = [pytest.mark.vm, pytest.mark.slow]

ENVD_PORT = 49983
DIRTY_MIB = 100
#: Bounds for waiting on the background store (none of them measures speed).
STORED_TIMEOUT_S = 120.0
#: How many pauses a test tries before giving up on landing its kill inside the store.
KILL_ATTEMPTS = 5


async def _create(agent: Agent, sandbox_id: str, snapshot_id: str = "") -> None:
    async with _client(agent) as client:
        await client.create_sandbox(
            pb.CreateSandboxRequest(
                sandbox_id=sandbox_id, template_id="base", snapshot_id=snapshot_id
            )
        )


async def _pause(agent: Agent, sandbox_id: str) -> str:
    async with _client(agent) as client:
        paused = await client.pause_sandbox(pb.PauseSandboxRequest(sandbox_id=sandbox_id))
    return paused.build_id


async def _resume(agent: Agent, sandbox_id: str) -> None:
    async with _client(agent) as client:
        await client.resume_sandbox(pb.ResumeSandboxRequest(sandbox_id=sandbox_id))


async def _destroy(agent: Agent, sandbox_id: str) -> None:
    async with _client(agent) as client:
        await client.destroy_sandbox(pb.DestroySandboxRequest(sandbox_id=sandbox_id))


async def _listing(agent: Agent) -> dict[str, pb.SandboxInfo]:
    async with _client(agent) as client:
        listing = await client.list_sandboxes(pb.ListSandboxesRequest())
    return {s.sandbox_id: s for s in listing.sandboxes}


@contextlib.asynccontextmanager
async def _client(agent: Agent) -> AsyncIterator[HostAgentClient]:
    client = agent.client()
    try:
        yield client
    finally:
        await client.close()


async def _sh(agent: Agent, sandbox_id: str, script: str) -> str:
    sdk = await AsyncSandbox.create(
        debug=True, sandbox_url=agent.forward_url(sandbox_id, ENVD_PORT)
    )
    result = await sdk.commands.run(script, timeout=0)
    assert result.exit_code == 0, result.stderr
    return result.stdout


async def _dirty(agent: Agent, sandbox_id: str, tag: str) -> dict[str, str]:
    """100 MiB of random data in memory (replacing the last) and a file on the disk; their
    sha256s."""
    out = await _sh(
        agent,
        sandbox_id,
        f"head -c {DIRTY_MIB}M /dev/urandom > /dev/shm/dirty && "
        f"head -c 300K /dev/urandom > /home/user/disk-{tag} && "
        f"sha256sum /dev/shm/dirty /home/user/disk-{tag}",
    )
    return {path: digest for digest, path in (line.split() for line in out.splitlines())}


async def _digests(agent: Agent, sandbox_id: str, paths: list[str]) -> dict[str, str]:
    out = await _sh(agent, sandbox_id, f"sha256sum {' '.join(paths)}")
    return {path: digest for digest, path in (line.split() for line in out.splitlines())}


def _store(home: AgentHome) -> Path:
    return home.state_dir / "snapshots"


def _stored(home: AgentHome, build_id: str) -> bool:
    return (_store(home) / build_id / "manifest.json").is_file()


def _held(home: AgentHome) -> list[str]:
    held = _store(home) / ".held"
    return sorted(p.name for p in held.iterdir()) if held.is_dir() else []


async def _until_stored(home: AgentHome, build_id: str) -> None:
    deadline = time.monotonic() + STORED_TIMEOUT_S
    while not _stored(home, build_id):
        assert time.monotonic() < deadline, f"build {build_id} not stored"
        await asyncio.sleep(0.1)


async def _until_event(agent: Agent, name: str, build_id: str) -> None:
    deadline = time.monotonic() + STORED_TIMEOUT_S
    while build_id not in [e.get("build_id") for e in _events(agent, name)]:
        assert time.monotonic() < deadline, f"no {name} for build {build_id}"
        await asyncio.sleep(0.05)


def _taken_over(agent: Agent, build_id: str) -> bool:
    return build_id in [e["build_id"] for e in _events(agent, "snapshot.store_taken_over")]


def _memory_taken_back(agent: Agent, build_id: str) -> bool:
    """A resume took the memory of ``build_id`` back and its sandbox's record is gone: from
    here the VM may write it."""
    return build_id in [e["build_id"] for e in _events(agent, "sandbox.memory_taken_back")]


async def _first_of(task: asyncio.Task[None], check: Callable[[], bool]) -> None:
    """Until ``task`` ends or ``check()`` holds (checked every 5 ms)."""
    while not task.done() and not check():
        await asyncio.wait({task}, timeout=0.005)


def _events(agent: Agent, name: str) -> list[dict[str, object]]:
    out = []
    for line in agent.logs().splitlines():
        if line.startswith("{") and f'"{name}"' in line:
            event = json.loads(line)
            if event.get("event") == name:
                out.append(event)
    return out


async def _pause_and_kill(agent: Agent, sandbox_id: str) -> tuple[dict[str, str], str]:
    """Dirty the sandbox, pause it and SIGKILL the agent as soon as the pause answered, while
    the build is still being stored (tried again, after a resume, when the store was faster
    than the check). What was written, and the build."""
    written: dict[str, str] = {}
    for attempt in range(KILL_ATTEMPTS):
        written |= await _dirty(agent, sandbox_id, str(attempt))
        build = await _pause(agent, sandbox_id)
        if not _stored(agent.home, build):
            agent.kill()
            return written, build
        await _resume(agent, sandbox_id)
    pytest.fail(f"every store ended before the kill ({KILL_ATTEMPTS} tries)")


async def _template_only(agent: Agent) -> None:
    """Nothing of the test's sandboxes is left in the snapshot store or as a memory image:
    the base template's build (and its memory image) only."""
    async with _client(agent) as client:
        info = await client.get_host_info(pb.GetHostInfoRequest())
    templates = {t.build_id for t in info.templates}
    home = agent.home
    builds = {p.name for p in _store(home).iterdir() if not p.name.startswith(".")}
    assert builds == templates, builds
    assert _held(home) == []
    images = {p.stem for p in (home.state_dir / "disks" / "templates").glob("mem-*.img")}
    assert images <= {f"mem-{b}" for b in templates}, images


async def test_resume_snapshot_and_destroy_while_the_pause_is_being_stored(
    agents: Agents,
) -> None:
    """A resume sent as soon as the pause answers takes the kept memory image back (the
    store is called off) and restores from it and the held state; one sent once the store
    has begun restores from a copy, and a named snapshot of that sandbox waits for the build
    it diffs over; a sandbox spawned from it has the memory; a sandbox destroyed while its
    pause is stored leaves nothing."""
    home = agents.home
    agent = await agents.start()
    await _create(agent, "ps-a")
    written = await _dirty(agent, "ps-a", "1")
    build = await _pause(agent, "ps-a")
    await _resume(agent, "ps-a")
    assert await _digests(agent, "ps-a", list(written)) == written
    taken = _taken_over(agent, build)
    print(f"the resume took the memory back: {taken}")
    if taken:
        await _until_event(agent, "snapshot.store_abandoned", build)
        assert not _stored(home, build)
    else:  # the store had begun already (a fast write-back)
        await _until_stored(home, build)
    # Its next pause diffs over what it was restored from: still all there after a resume
    # from the stored build.
    written |= await _dirty(agent, "ps-a", "1b")
    again = await _pause(agent, "ps-a")
    await _until_stored(home, again)
    await _resume(agent, "ps-a")
    assert await _digests(agent, "ps-a", list(written)) == written

    written |= await _dirty(agent, "ps-a", "2")
    second = await _pause(agent, "ps-a")
    await _until_event(agent, "snapshot.storing", second)
    await _resume(agent, "ps-a")
    assert not _taken_over(agent, second)
    async with _client(agent) as client:
        await client.create_snapshot(
            pb.CreateSnapshotRequest(sandbox_id="ps-a", snapshot_id="ps-snap")
        )
    assert _stored(home, second)
    await _create(agent, "ps-child", snapshot_id="ps-snap")
    assert await _digests(agent, "ps-child", list(written)) == written
    await _destroy(agent, "ps-child")
    async with _client(agent) as client:
        await client.delete_snapshot(pb.DeleteSnapshotRequest(snapshot_id="ps-snap"))

    await _dirty(agent, "ps-a", "3")
    third = await _pause(agent, "ps-a")
    await _destroy(agent, "ps-a")
    assert not await _listing(agent)
    assert not _stored(home, third)
    await _template_only(agent)
    idle(home, Leftovers.count(home))
    await agents.stop(agent)
    gone(Leftovers.count(home))


async def test_a_pause_survives_the_agent_killed_while_it_is_stored(agents: Agents) -> None:
    """SIGKILL right after the pause answered, while its memory is still being stored: the
    agent started again finds the build held with its memory image, stores it, and the
    sandbox resumes with its memory and disk as they were, its processes still running."""
    home = agents.home
    agent = await agents.start()
    await _create(agent, "ps-k")
    await _sh(agent, "ps-k", "nohup sleep 100000 > /dev/null 2>&1 & echo $! > /tmp/sleeper.pid")
    pid = (await _sh(agent, "ps-k", "cat /tmp/sleeper.pid")).strip()
    written, build = await _pause_and_kill(agent, "ps-k")
    assert build in _held(home)

    agent = await agents.start()
    assert (await _listing(agent))["ps-k"].build_id == build
    assert [e["builds"] for e in _events(agent, "snapshot.store_redone")] == [[build]]
    await _until_stored(home, build)
    await _resume(agent, "ps-k")
    assert await _digests(agent, "ps-k", list(written)) == written
    assert (await _sh(agent, "ps-k", f"kill -0 {pid} && echo alive")).strip() == "alive"
    await _destroy(agent, "ps-k")
    await _template_only(agent)
    idle(home, Leftovers.count(home))
    await agents.stop(agent)
    gone(Leftovers.count(home))


async def test_an_agent_killed_during_a_take_over_never_resumes_from_that_memory(
    agents: Agents,
) -> None:
    """SIGKILL while a resume that took the kept image back is restoring: the resumed VM
    writes that image, so the build is lost with the sandbox (a running sandbox does not
    outlive the agent). The agent started again must not list the sandbox as paused nor redo
    the build's store from the written image; nothing of either is left."""
    home = agents.home
    agent = await agents.start()
    await _create(agent, "ps-x")
    for attempt in range(KILL_ATTEMPTS):
        await _dirty(agent, "ps-x", str(attempt))
        build = await _pause(agent, "ps-x")
        resume = asyncio.create_task(_resume(agent, "ps-x"))
        await _first_of(resume, functools.partial(_memory_taken_back, agent, build))
        if not resume.done():
            agent.kill()
            with contextlib.suppress(Exception):
                await resume
            break
        await resume
    else:
        pytest.fail(f"no resume took the memory back while it ran ({KILL_ATTEMPTS} tries)")

    agent = await agents.start()
    assert not await _listing(agent)
    assert not _events(agent, "snapshot.store_redone")
    await _template_only(agent)
    idle(home, Leftovers.count(home))
    await agents.stop(agent)
    gone(Leftovers.count(home))


async def test_an_agent_stopped_during_the_store_finishes_it_first(agents: Agents) -> None:
    """SIGTERM right after the pause answered: the agent ends the store before it exits, and
    the next start finds the build stored (nothing to redo)."""
    home = agents.home
    agent = await agents.start()
    await _create(agent, "ps-t")
    written = await _dirty(agent, "ps-t", "t")
    build = await _pause(agent, "ps-t")
    await agents.stop(agent)
    assert _stored(home, build)

    agent = await agents.start()
    assert not _events(agent, "snapshot.store_redone")
    await _resume(agent, "ps-t")
    assert await _digests(agent, "ps-t", list(written)) == written
    await _destroy(agent, "ps-t")
    await _template_only(agent)
    await agents.stop(agent)
    gone(Leftovers.count(home))


async def test_a_hold_from_an_earlier_boot_is_never_restored(agents: Agents) -> None:
    """Held state and memory images are written without fsync, so after a host restart they
    may be torn: a paused sandbox whose build was still held then is dropped, not restored.
    The restart is stood in for by rewriting the boot id the hold and the images recorded
    (the agent reads the real one from /proc)."""
    home = agents.home
    agent = await agents.start()
    await _create(agent, "ps-b")
    _, build = await _pause_and_kill(agent, "ps-b")
    record = _store(home) / ".held" / build / "held.json"
    held = json.loads(record.read_text())
    record.write_text(json.dumps({**held, "boot_id": "an-earlier-boot"}))
    marker = home.state_dir / "run" / "memfiles.boot"
    marker.write_text("an-earlier-boot")

    agent = await agents.start()
    assert not await _listing(agent)
    assert [e["sandbox_id"] for e in _events(agent, "sandbox.unrecoverable")] == ["ps-b"]
    await _template_only(agent)
    idle(home, Leftovers.count(home))
    await _create(agent, "ps-b2")  # the template's memory is imported again from the store
    await _destroy(agent, "ps-b2")
    await agents.stop(agent)
    gone(Leftovers.count(home))
