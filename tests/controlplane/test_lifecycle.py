"""Lifecycle with several hosts: expired sandboxes are killed, or paused when created with
auto-pause; connect resumes a paused one; drained and silent hosts get nothing new."""

from __future__ import annotations

from typing import Any

from e2b.api.client.models import SandboxDetail
from e2b.api.client.models.sandbox_state import SandboxState

from tests.controlplane.conftest import Stack, wait_for
from tests.controlplane.fake_agent import FakeHostAgent
from wrenn.controlplane.db.records import SandboxState as StoredState


def three_hosts(make_stack: Any) -> Stack:
    """Hosts that differ in memory only (with CPUs to spare, memory is the bottleneck)."""
    stack: Stack = make_stack()
    for memory_gib in (8, 16, 32):
        stack.add_host(FakeHostAgent(vcpus=64, memory_mib=memory_gib * 1024))
    return stack


def test_expiry_kills(make_stack: Any) -> None:
    stack = three_hosts(make_stack)
    c = stack.admin
    short = c.post("/v2/sandboxes", json={"templateID": "base", "timeout": 1}).json()["sandboxID"]
    long = c.post("/v2/sandboxes", json={"templateID": "base", "timeout": 3600}).json()["sandboxID"]
    host = stack.host_of(short)
    wait_for(lambda: c.get(f"/sandboxes/{short}").status_code == 404, "expiry")
    assert short not in host.agent.sandboxes
    assert ("DestroySandbox", short) in host.agent.calls
    assert c.get(f"/sandboxes/{long}").status_code == 200
    assert stack.host_of(long).agent.running() == [long]


def test_expiry_pauses_with_auto_pause_and_connect_resumes(make_stack: Any) -> None:
    stack = three_hosts(make_stack)
    c = stack.admin
    body = {"templateID": "base", "timeout": 1, "autoPause": True}
    sid = c.post("/v2/sandboxes", json=body).json()["sandboxID"]
    host = stack.host_of(sid)

    def state() -> SandboxState:
        return SandboxDetail.from_dict(c.get(f"/sandboxes/{sid}").json()).state

    def stored_state() -> StoredState | None:
        async def read() -> StoredState | None:
            async with stack.cp.db.transaction(read_only=True) as tx:
                found = await tx.sandboxes.get(sid)
            return found.state if found else None

        return stack.run(read())

    # The API shows "paused" from the moment pausing starts; connect answers 409 until the
    # pause is done.
    wait_for(lambda: stored_state() is StoredState.PAUSED, "auto-pause")
    assert state() == SandboxState.PAUSED
    assert host.agent.paused() == [sid]
    assert not any(call[0] == "DestroySandbox" for call in host.agent.calls)

    resp = c.post(f"/v2/sandboxes/{sid}/connect", json={"timeout": 3600})
    assert resp.status_code == 201
    assert state() == SandboxState.RUNNING
    assert host.agent.running() == [sid]  # resumed where its disk is


def test_timeout_change_moves_expiry(make_stack: Any) -> None:
    stack = three_hosts(make_stack)
    c = stack.admin
    sid = c.post("/v2/sandboxes", json={"templateID": "base", "timeout": 3600}).json()["sandboxID"]
    assert c.post(f"/sandboxes/{sid}/timeout", json={"timeout": 0}).status_code == 204
    wait_for(lambda: c.get(f"/sandboxes/{sid}").status_code == 404, "expiry after /timeout")


def test_spreads_by_headroom_and_skips_drained_hosts(make_stack: Any) -> None:
    stack = three_hosts(make_stack)
    c = stack.admin
    small, mid, big = stack.hosts
    first = c.post("/v2/sandboxes", json={"templateID": "base"}).json()["sandboxID"]
    assert stack.host_of(first) is big  # most free memory
    assert c.post(f"/v1/hosts/{big.host_id}/drain").status_code == 200
    placed = [
        c.post("/v2/sandboxes", json={"templateID": "base"}).json()["sandboxID"] for _ in range(4)
    ]
    assert all(stack.host_of(s) in (small, mid) for s in placed)
    assert stack.host_of(placed[0]) is mid  # then the most memory left of the two
    assert big.agent.running() == [first]  # draining keeps what it runs
    hosts = {h["hostID"]: h for h in c.get("/v1/hosts").json()}
    assert hosts[big.host_id]["status"] == "draining"
    assert sum(h["sandboxes"] for h in hosts.values()) == 5


def test_silent_host_gets_nothing(make_stack: Any) -> None:
    stack: Stack = make_stack(heartbeat_window_s=0.5)
    stack.add_host()
    c = stack.admin
    wait_for(lambda: not c.get("/v1/hosts").json()[0]["live"], "host to fall silent")
    resp = c.post("/v2/sandboxes", json={"templateID": "base"})
    assert resp.status_code == 503 and resp.json()["code"] == "resource_exhausted"
    assert "silent" in resp.json()["message"]
    stack.heartbeat(stack.hosts[0])
    assert c.post("/v2/sandboxes", json={"templateID": "base"}).status_code == 201
