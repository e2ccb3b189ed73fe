"""Sandbox lifecycles through the e2b SDK: the end of a timeout, pause and resume (a running
process and memory-only files survive), connect resuming a paused sandbox, every host
connection to a guest ended by a pause (a download under way too), a named snapshot that new
sandboxes start from, and forks of a running sandbox."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time

import httpx
import pytest
from e2b import Sandbox, SandboxNotFoundException, SandboxQuery, SandboxState

from tests.e2e.conftest import Sandboxes, Stack

pytestmark = [pytest.mark.vm, pytest.mark.slow]

#: The control plane checks for expired sandboxes every second; killing one takes the agent a
#: moment, under TCG and a loaded machine several.
GONE_WITHIN_S = 120.0
#: Counts in /tmp/count (a tmpfs: guest memory) five times a second, forever; each value
#: replaces the file whole, so a reader never sees it half written.
COUNTER = (
    "i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; "
    "sleep 0.2; done"
)


def _count(sbx: Sandbox) -> int:
    """The counter's value; 0 before its first write."""
    return int(sbx.commands.run("cat /tmp/count 2>/dev/null || echo 0").stdout)


def _counting(sbx: Sandbox) -> bool:
    """Whether the counter still runs: its value grows while we wait."""
    first = _count(sbx)
    for _ in range(50):
        time.sleep(0.2)
        if _count(sbx) > first:
            return True
    return False


def _state(sbx_id: str) -> SandboxState:
    return Sandbox.get_info(sbx_id).state


def test_sandbox_is_gone_after_its_timeout(sandboxes: Sandboxes, run_id: str) -> None:
    short = sandboxes.create(timeout=10, metadata={"role": "short"})
    assert short.commands.run("echo alive").stdout == "alive\n"
    query = SandboxQuery(metadata={"e2e": run_id, "role": "short"})
    deadline = time.monotonic() + GONE_WITHIN_S
    while Sandbox.list(query=query).next_items() and time.monotonic() < deadline:
        time.sleep(1)
    assert Sandbox.list(query=query).next_items() == []
    assert not short.is_running()
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(short.sandbox_id)


def test_pause_resume_and_connect(sandboxes: Sandboxes, run_id: str) -> None:
    sbx = sandboxes.create(metadata={"role": "paused"})
    counter = sbx.commands.run(COUNTER, background=True)
    sbx.files.write("/home/user/disk.txt", "on disk")
    sbx.files.write("/tmp/memory.txt", "in memory")
    assert _counting(sbx)

    assert sbx.pause() is True
    assert _state(sbx.sandbox_id) == SandboxState.PAUSED
    paused = Sandbox.list(
        query=SandboxQuery(metadata={"e2e": run_id}, state=[SandboxState.PAUSED])
    ).next_items()
    assert [s.sandbox_id for s in paused] == [sbx.sandbox_id]
    assert Sandbox.pause(sbx.sandbox_id) is False  # already paused

    # Resume: the same object reconnects; processes, memory and disk are as they were.
    sbx.connect()
    assert _state(sbx.sandbox_id) == SandboxState.RUNNING
    assert sbx.files.read("/home/user/disk.txt") == "on disk"
    assert sbx.files.read("/tmp/memory.txt") == "in memory"
    assert counter.pid in [p.pid for p in sbx.commands.list()]
    assert _counting(sbx)

    # Connecting by id to a paused sandbox resumes it too.
    Sandbox.pause(sbx.sandbox_id)
    assert _state(sbx.sandbox_id) == SandboxState.PAUSED
    again = Sandbox.connect(sbx.sandbox_id)
    assert again.sandbox_id == sbx.sandbox_id
    assert _state(sbx.sandbox_id) == SandboxState.RUNNING
    assert again.files.read("/tmp/memory.txt") == "in memory"
    assert _counting(again)


def _holders(address: str) -> set[int]:
    """PIDs of the host processes with a TCP connection to ``address``."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "connected", "dst", address],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out)}


def _start_stream(address: str, token: str, command: str) -> bytes:
    """A raw process.Process/Start request (Connect, JSON) running ``command``."""
    message = json.dumps({"process": {"cmd": "/bin/sh", "args": ["-c", command]}}).encode()
    envelope = b"\x00" + len(message).to_bytes(4, "big") + message
    head = (
        f"POST /process.Process/Start HTTP/1.1\r\nHost: {address}:49983\r\n"
        "Content-Type: application/connect+json\r\nConnect-Protocol-Version: 1\r\n"
        f"X-Access-Token: {token}\r\nContent-Length: {len(envelope)}\r\n\r\n"
    )
    return head.encode() + envelope


def test_a_pause_ends_every_host_connection_to_the_guest(
    sandboxes: Sandboxes, stack: Stack
) -> None:
    """``wrenn up`` runs the control plane beside the agent, so its proxy dials a guest itself
    (one relay, not two). A pause ends the host's connections to the guest, whoever holds
    them, while the guest still runs: a process stream held open through the proxy ends for
    the SDK, a connection another host process dialled to the guest's address is aborted (it
    would otherwise wait forever: the guest comes back at another address), nothing on the
    host is left connected to the old address, and the resumed sandbox answers."""
    sbx = sandboxes.create()
    address = stack.address_of(sbx.sandbox_id)
    handle = sbx.commands.run("sleep 600", background=True)
    assert stack.pid_of("cp") in _holders(address)
    with socket.create_connection((address, 49983), timeout=30) as dialled:
        # A process stream of its own, straight to the guest: in flight, so envd's
        # /snapshot/prepare (which closes idle connections) leaves it open.
        dialled.sendall(_start_stream(address, sbx._envd_access_token or "", "sleep 600"))
        assert dialled.recv(65536).startswith(b"HTTP/1.1 200 ")
        ended: list[BaseException | None] = []

        def wait() -> None:
            try:
                handle.wait()
                ended.append(None)
            except BaseException as err:  # the stream is cut: what the SDK raises for it
                ended.append(err)

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        assert sbx.pause() is True
        with pytest.raises(ConnectionAbortedError):
            while dialled.recv(65536):  # the stream's events, up to the abort
                pass
        waiter.join(60)
        assert not waiter.is_alive(), "the process stream outlived the pause"
        assert ended and ended[0] is not None
    deadline = time.monotonic() + 10
    while _holders(address) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _holders(address) == set()

    sbx.connect()
    assert sbx.commands.run("echo back").stdout == "back\n"
    again = sbx.commands.run("sleep 600", background=True)
    assert stack.pid_of("cp") in _holders(stack.address_of(sbx.sandbox_id))
    again.kill()


def test_a_pause_ends_a_download_under_way(sandboxes: Sandboxes, stack: Stack) -> None:
    """A long download through the proxy moves socket to socket in the kernel (docs/api.md,
    *Relaying*); paused meanwhile, the agent's abort of the proxy's connection to the guest
    ends it for its client, cut short, instead of leaving it waiting; the sandbox resumes."""
    sbx = sandboxes.create()
    size = 8 << 30
    sbx.commands.run(f"truncate -s {size} /home/user/huge.bin")  # sparse: nothing to write
    headers = {
        "E2b-Sandbox-Id": sbx.sandbox_id,
        "E2b-Sandbox-Port": "49983",
        "X-Access-Token": sbx._envd_access_token or "",
    }
    got: list[int] = [0]
    ended: list[BaseException | None] = []
    with httpx.stream(
        "GET",
        f"{stack.quickstart.env['E2B_SANDBOX_URL']}/files",
        params={"path": "/home/user/huge.bin"},
        headers=headers,
        timeout=60,
    ) as resp:
        assert resp.status_code == 200
        assert int(resp.headers["content-length"]) == size

        def read() -> None:
            try:
                for chunk in resp.iter_raw(1 << 20):
                    got[0] += len(chunk)
                ended.append(None)
            except httpx.HTTPError as err:
                ended.append(err)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = time.monotonic() + 60
        while got[0] < 64 << 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got[0] >= 64 << 20 and not ended
        assert sbx.pause() is True
        reader.join(60)
        assert not reader.is_alive(), "the download outlived the pause"
        assert ended and ended[0] is not None, "the download was not cut"
        assert got[0] < size
    sbx.connect()
    assert sbx.commands.run("echo back").stdout == "back\n"


def test_named_snapshot_starts_new_sandboxes(sandboxes: Sandboxes, run_id: str) -> None:
    source = sandboxes.create(metadata={"role": "snapshot-source"})
    source.files.write("/home/user/before.txt", "before the snapshot")
    source.commands.run(COUNTER, background=True)
    name = f"e2e-{run_id}"
    snapshot = source.create_snapshot(name=name)
    assert name in snapshot.names
    try:
        # The source keeps running; what it writes after the snapshot stays its own.
        source.files.write("/home/user/after.txt", "after the snapshot")
        assert _counting(source)

        spawned = sandboxes.create(template=name, metadata={"role": "from-snapshot"})
        assert spawned.sandbox_id != source.sandbox_id
        assert spawned.files.read("/home/user/before.txt") == "before the snapshot"
        assert not spawned.files.exists("/home/user/after.txt")
        assert _counting(spawned)  # the counter was running in the snapshot's memory
        spawned.files.write("/home/user/spawned.txt", "mine")
        assert not source.files.exists("/home/user/spawned.txt")
        listed = Sandbox.list_snapshots(sandbox_id=source.sandbox_id).next_items()
        assert [s.snapshot_id for s in listed] == [snapshot.snapshot_id]
        spawned.kill()
    finally:
        sandboxes.close()  # a snapshot a running sandbox was restored from cannot be deleted
        Sandbox.delete_snapshot(snapshot.snapshot_id)


def test_fork_starts_copies_of_a_running_sandbox(
    sandboxes: Sandboxes, stack: Stack, run_id: str
) -> None:
    """``Sandbox.fork``: one snapshot of the running source, two sandboxes started from it
    with its disk, memory, running processes and metadata; each goes its own way. The
    snapshot is nobody's to see and is deleted on the host once both forks are gone."""
    source = sandboxes.create(metadata={"role": "fork-source"})
    source.files.write("/home/user/before.txt", "before the fork")
    source.files.write("/tmp/memory.txt", "in memory")
    source.commands.run(COUNTER, background=True)
    assert _counting(source)

    forks = source.fork(count=2, timeout=120)
    assert all(isinstance(f, Sandbox) for f in forks), forks
    sandboxes.made.extend(f.sandbox_id for f in forks if isinstance(f, Sandbox))
    first, second = (f for f in forks if isinstance(f, Sandbox))
    assert len({source.sandbox_id, first.sandbox_id, second.sandbox_id}) == 3
    for fork in (first, second):
        assert fork.files.read("/home/user/before.txt") == "before the fork"
        assert fork.files.read("/tmp/memory.txt") == "in memory"
        assert _counting(fork)  # the counter was running in the snapshot's memory
        assert Sandbox.get_info(fork.sandbox_id).metadata["role"] == "fork-source"
    first.files.write("/home/user/mine.txt", "first's")
    assert not second.files.exists("/home/user/mine.txt")
    assert not source.files.exists("/home/user/mine.txt")
    assert _counting(source)
    assert Sandbox.list_snapshots(sandbox_id=source.sandbox_id).next_items() == []

    catalog = stack.home.state_dir / "catalog" / "snapshots"
    assert len(list(catalog.glob("*.json"))) == 1
    first.kill()
    second.kill()
    deadline = time.monotonic() + GONE_WITHIN_S
    while list(catalog.glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert list(catalog.glob("*.json")) == []
