"""The reconciler on SQLite and PostgreSQL against FakeHostAgent drift: orphans destroyed, lost
sandboxes marked failed, paused ones left alone, silent hosts marked down once (and their
running sandboxes failed after the grace), a host that comes back cleaned of what it still
runs, a host that cannot be asked left as it is."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.controlplane.conftest import Stack
from tests.controlplane.fake_agent import FakeSandbox
from wrenn.controlplane.events import Event
from wrenn.gen.hostagent import hostagent_pb as pb

LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


def create(stack: Stack, **body: Any) -> str:
    resp = stack.admin.post("/v2/sandboxes", json={"templateID": "base", **body})
    assert resp.status_code == 201, resp.text
    sid: str = resp.json()["sandboxID"]
    return sid


def state(stack: Stack, sid: str) -> str | None:
    async def get() -> str | None:
        async with stack.cp.db.transaction() as tx:
            found = await tx.sandboxes.get(sid)
        return found.state.value if found else None

    return stack.run(get())


def record_events(stack: Stack) -> list[Event]:
    seen: list[Event] = []
    stack.cp.events.subscribe(seen.append)
    return seen


def test_orphans_are_destroyed(stack: Stack) -> None:
    agent = stack.hosts[0].agent
    keep = create(stack)
    killed = create(stack)
    leftover = copy.deepcopy(agent.sandboxes[killed])
    assert stack.admin.delete(f"/sandboxes/{killed}").status_code == 204
    # Still on the host although killed in the database (its destroy was lost), and one the
    # database never heard of.
    agent.sandboxes[killed] = leftover
    stranger = copy.deepcopy(leftover)
    stranger.sandbox_id = "istranger"
    agent.sandboxes["istranger"] = stranger

    report = stack.run(stack.reconciler().tick())
    assert sorted(report.orphans_destroyed) == sorted([killed, "istranger"])
    assert report.lost == []
    assert set(agent.sandboxes) == {keep}
    assert state(stack, keep) == "running"
    audit = stack.admin.get("/v1/audit", params={"action": "reconciler.*"}).json()
    assert sorted(e["targetID"] for e in audit) == sorted([killed, "istranger"])
    assert {e["actor"] for e in audit} == {"system"}
    # Nothing left to fix.
    again = stack.run(stack.reconciler().tick())
    assert (again.orphans_destroyed, again.lost) == ([], [])


def test_lost_sandboxes_fail_and_paused_ones_stay(stack: Stack) -> None:
    agent = stack.hosts[0].agent
    events = record_events(stack)
    lost = create(stack)
    paused = create(stack)
    fine = create(stack)
    broken = create(stack)
    assert stack.admin.post(f"/sandboxes/{paused}/pause").status_code == 204
    del agent.sandboxes[lost]
    del agent.sandboxes[paused]  # an agent need not list paused sandboxes
    agent.sandboxes[broken].state = pb.SandboxState.FAILED

    report = stack.run(stack.reconciler().tick())
    assert sorted(report.lost) == sorted([lost, broken])
    assert report.orphans_destroyed == [broken]
    assert broken not in agent.sandboxes
    assert (state(stack, lost), state(stack, broken)) == ("failed", "failed")
    assert (state(stack, paused), state(stack, fine)) == ("paused", "running")
    assert stack.admin.get(f"/sandboxes/{lost}").status_code == 404
    failed = {e.data["sandboxID"]: e.data["reason"] for e in events if e.type == "sandbox.failed"}
    assert failed == {lost: "lost", broken: "failed_on_host"}


def test_silent_host_goes_down_once_then_loses_its_sandboxes(make_stack: Any) -> None:
    stack: Stack = make_stack(host_lost_grace_s=3600)
    host = stack.add_host()
    events = record_events(stack)
    running = create(stack)
    paused = create(stack)
    assert stack.admin.post(f"/sandboxes/{paused}/pause").status_code == 204
    # Silent just past the heartbeat window (the stack's is an hour), well within the grace.
    just_past = datetime.now(UTC) - timedelta(seconds=stack.settings.heartbeat_window_s + 60)
    stack.update_host(host.host_id, last_heartbeat_at=just_past)

    report = stack.run(stack.reconciler().tick())
    assert report.hosts_down == [host.host_id]
    assert report.lost == []  # within the grace: kept
    assert state(stack, running) == "running"
    assert stack.run(stack.reconciler().tick()).hosts_down == []  # marked once
    assert [e.type for e in events if e.type.startswith("host.")] == ["host.down"]

    listed = {h["hostID"]: h for h in stack.admin.get("/v1/hosts").json()}
    assert listed[host.host_id]["live"] is False


def test_lost_host_sandboxes_fail_and_are_destroyed_when_it_returns(make_stack: Any) -> None:
    stack: Stack = make_stack(host_lost_grace_s=0)
    host = stack.add_host()
    running = create(stack)
    paused = create(stack)
    assert stack.admin.post(f"/sandboxes/{paused}/pause").status_code == 204
    events = record_events(stack)
    stack.update_host(host.host_id, last_heartbeat_at=LONG_AGO)

    report = stack.run(stack.reconciler().tick())
    assert report.hosts_down == [host.host_id]
    assert report.lost == [running]
    assert (state(stack, running), state(stack, paused)) == ("failed", "paused")
    assert [(e.type, e.data.get("reason")) for e in events] == [
        ("host.down", None),
        ("sandbox.failed", "host_lost"),
    ]

    stack.heartbeat(host)  # back: what it still runs of the failed sandbox is an orphan
    assert running in host.agent.sandboxes
    report = stack.run(stack.reconciler().tick())
    assert report.orphans_destroyed == [running]
    assert set(host.agent.sandboxes) == {paused}
    assert [e.type for e in events][-1] == "host.up"
    assert stack.admin.post(f"/sandboxes/{paused}/connect", json={}).status_code == 201


def test_a_host_that_cannot_be_asked_is_left_alone(stack: Stack) -> None:
    host = stack.hosts[0]
    sid = create(stack)
    host.served.stop()  # heartbeats are recent, but ListSandboxes finds nobody
    report = stack.run(stack.reconciler().tick())
    assert report.unreachable == [host.host_id]
    assert (report.lost, report.orphans_destroyed) == ([], [])
    assert state(stack, sid) == "running"


def test_a_sandbox_created_during_the_pass_is_not_an_orphan(stack: Stack) -> None:
    # The sandbox row is written before CreateSandbox reaches the host, so whatever the host
    # lists has a row: a create racing the pass is never taken for an orphan.
    agent = stack.hosts[0].agent
    seen: list[FakeSandbox] = []

    async def during_create(sandbox: FakeSandbox) -> None:
        seen.append(sandbox)
        agent.sandboxes[sandbox.sandbox_id] = sandbox
        report = await stack.reconciler().tick()
        assert report.orphans_destroyed == [] and report.lost == []

    agent.on_start = during_create
    sid = create(stack)
    assert [s.sandbox_id for s in seen] == [sid]
    assert state(stack, sid) == "running"
