"""Template-aware placement through the API: a sandbox of a template goes only to a host that
reported it in its latest heartbeat; none has it → 409 naming the template; only hosts that
cannot take it now have it → 503 naming the template. FakeHostAgent test doubles."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tests.controlplane.conftest import Stack
from tests.controlplane.fake_agent import FakeHostAgent


def test_sandboxes_go_where_their_template_is(make_stack: Any) -> None:
    stack: Stack = make_stack()
    # The roomier host has only "base": without template-aware placement "py" would go there.
    base_only = stack.add_host(
        FakeHostAgent(templates={"base": (2, 512)}, vcpus=64, memory_mib=64 * 1024)
    )
    both = stack.add_host(FakeHostAgent(templates={"base": (2, 512), "py": (1, 256)}))
    c = stack.admin
    for _ in range(3):
        resp = c.post("/v2/sandboxes", json={"templateID": "py"})
        assert resp.status_code == 201, resp.text
        assert stack.host_of(resp.json()["sandboxID"]) is both
    assert not any(rpc == "CreateSandbox" for rpc, _ in base_only.agent.calls)

    # "py" gone from the host's heartbeat: no host has it.
    both.agent.templates.pop("py")
    stack.heartbeat(both)
    resp = c.post("/v2/sandboxes", json={"templateID": "py"})
    assert resp.status_code == 409, resp.text
    assert resp.json()["code"] == "failed_precondition"
    assert "'py'" in resp.json()["message"] and "no host" in resp.json()["message"]

    # Back on the host, which then falls silent: a retry-later answer naming the template.
    both.agent.templates["py"] = (1, 256)
    stack.heartbeat(both)
    stack.update_host(both.host_id, last_heartbeat_at=datetime(2020, 1, 1, tzinfo=UTC))
    resp = c.post("/v2/sandboxes", json={"templateID": "py"})
    assert resp.status_code == 503, resp.text
    assert "'py'" in resp.json()["message"] and "silent" in resp.json()["message"]
    # "base" still goes to the live host that has it.
    resp = c.post("/v2/sandboxes", json={"templateID": "base"})
    assert resp.status_code == 201 and stack.host_of(resp.json()["sandboxID"]) is base_only


def test_a_named_snapshot_stays_pinned_to_its_host(make_stack: Any) -> None:
    stack: Stack = make_stack()
    holder = stack.add_host(FakeHostAgent(templates={"base": (2, 512)}))
    c = stack.admin
    sid = c.post("/v2/sandboxes", json={"templateID": "base"}).json()["sandboxID"]
    snap = c.post("/v1/snapshots", json={"sandboxID": sid, "name": "warm"})
    assert snap.status_code == 201, snap.text
    # A second host with room, and the template: the snapshot's sandboxes still go to its host.
    stack.add_host(FakeHostAgent(templates={"base": (2, 512)}, vcpus=64, memory_mib=64 * 1024))
    for _ in range(2):
        resp = c.post("/v2/sandboxes", json={"templateID": "warm"})
        assert resp.status_code == 201, resp.text
        assert stack.host_of(resp.json()["sandboxID"]) is holder
