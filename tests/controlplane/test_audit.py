"""The audit trail on SQLite and PostgreSQL: every state-changing call is recorded by the
middleware (actor, team, action, target, result, time), failed and unauthenticated ones
included, heartbeats left out; GET /v1/audit filters and pages; changes the control plane
makes on its own are recorded with actor ``system``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from tests.controlplane.conftest import Stack, wait_for


def entries(client: httpx.Client, **query: Any) -> list[dict[str, Any]]:
    resp = client.get("/v1/audit", params=query)
    assert resp.status_code == 200, resp.text
    found: list[dict[str, Any]] = resp.json()
    return found


def test_state_changing_calls_are_recorded(stack: Stack) -> None:
    team_id, key = stack.new_team("audited")
    me = stack.client(key)
    key_id = me.get(f"/v1/teams/{team_id}/api-keys").json()[0]["keyID"]
    start = datetime.now(UTC)

    sid = me.post("/v2/sandboxes", json={"templateID": "base"}).json()["sandboxID"]
    assert me.post(f"/sandboxes/{sid}/pause").status_code == 204
    assert me.post(f"/sandboxes/{sid}/pause").status_code == 409
    assert me.post("/sandboxes/inope/timeout", json={"timeout": 60}).status_code == 404
    assert me.delete(f"/sandboxes/{sid}").status_code == 204
    assert me.get(f"/sandboxes/{sid}").status_code == 404  # reads are not audited
    assert httpx.post(f"{stack.url}/v2/sandboxes", json={"templateID": "base"}).status_code == 401
    stack.heartbeat(stack.hosts[0])

    mine = entries(me)
    assert [(e["action"], e["targetID"], e["result"]) for e in mine] == [
        ("sandboxes.kill_sandbox", sid, "ok"),
        ("sandboxes.set_timeout", "inope", "not_found"),
        ("sandboxes.pause", sid, "failed_precondition"),
        ("sandboxes.pause", sid, "ok"),
        ("sandboxes.create_sandbox_v2", sid, "ok"),
    ]
    for e in mine:
        assert (e["actor"], e["teamID"], e["targetType"]) == (key_id, team_id, "sandboxes")
        assert start - timedelta(seconds=5) <= datetime.fromisoformat(e["time"])
        assert e["details"]["method"] in ("POST", "DELETE")
        assert e["details"]["requestId"]
    assert mine[-1]["details"]["status"] == 201

    everything = entries(stack.admin)
    # Registration authenticates by its one-time token, not as anyone yet.
    anonymous = [e for e in everything if e["actor"] is None and e["action"] != "hosts.register"]
    assert [(e["action"], e["result"], e["teamID"]) for e in anonymous] == [
        ("sandboxes.create_sandbox_v2", "unauthenticated", None)
    ]
    assert not [e for e in everything if e["action"] == "hosts.heartbeat"]
    registered = [e for e in everything if e["action"] == "hosts.register"]
    assert [e["targetID"] for e in registered] == [stack.hosts[0].host_id]


def test_filters_and_pages(stack: Stack) -> None:
    team_a, key_a = stack.new_team("a")
    team_b, key_b = stack.new_team("b")
    a, b = stack.client(key_a), stack.client(key_b)
    sids = [a.post("/v2/sandboxes", json={"templateID": "base"}).json()["sandboxID"] for _ in "xyz"]
    b.post("/v2/sandboxes", json={"templateID": "base"})
    middle = datetime.now(UTC)
    a.post(f"/sandboxes/{sids[0]}/timeout", json={"timeout": 100})

    assert len(entries(a)) == 4 and len(entries(b)) == 1
    # A team reads only its own trail; an admin any team's.
    assert b.get("/v1/audit", params={"teamID": team_a}).status_code == 404
    assert len(entries(stack.admin, teamID=team_a)) == 4
    assert [e["targetID"] for e in entries(a, target=sids[0])] == [sids[0], sids[0]]
    assert len(entries(a, action="sandboxes.create_sandbox_v2")) == 3
    assert len(entries(a, action="sandboxes.*")) == 4
    assert entries(a, action="teams.*") == []
    assert [e["action"] for e in entries(a, since=middle.isoformat())] == ["sandboxes.set_timeout"]
    assert len(entries(a, until=middle.isoformat())) == 3
    actor = entries(a)[0]["actor"]
    assert len(entries(stack.admin, actor=actor)) == 4
    assert entries(stack.admin, teamID=team_b)[0]["teamID"] == team_b

    seen: list[int] = []
    token: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 3}
        if token:
            params["nextToken"] = token
        resp = a.get("/v1/audit", params=params)
        seen += [e["id"] for e in resp.json()]
        token = resp.headers.get("x-next-token")
        if not token:
            break
    assert seen == sorted(seen, reverse=True) and len(seen) == 4
    assert a.get("/v1/audit", params={"nextToken": "x"}).status_code == 400


def test_system_changes_are_recorded(make_stack: Any) -> None:
    stack: Stack = make_stack()
    stack.add_host()
    sid = stack.admin.post("/v2/sandboxes", json={"templateID": "base", "timeout": 0}).json()[
        "sandboxID"
    ]

    def expired() -> bool:
        return bool(entries(stack.admin, target=sid, action="lifecycle.*"))

    wait_for(expired, "the lifecycle worker to kill the sandbox")
    entry = entries(stack.admin, target=sid, action="lifecycle.*")[0]
    assert (entry["action"], entry["actor"], entry["result"]) == ("lifecycle.kill", "system", "ok")
