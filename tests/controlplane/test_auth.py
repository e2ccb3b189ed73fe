"""Authentication and isolation: API keys (missing, wrong, revoked), teams, admin-only
endpoints, host secrets and one-time registration tokens."""

from __future__ import annotations

import httpx

from tests.controlplane.conftest import Stack


def test_missing_and_wrong_key(stack: Stack) -> None:
    anon = stack.client()
    resp = anon.get("/v2/sandboxes")
    assert resp.status_code == 401 and resp.json()["code"] == "unauthenticated"
    bad = stack.client("wrn_" + "0" * 40)
    assert bad.get("/v2/sandboxes").status_code == 401
    assert bad.post("/v2/sandboxes", json={"templateID": "base"}).status_code == 401
    assert stack.hosts[0].agent.sandboxes == {}


def test_bearer_is_accepted_too(stack: Stack) -> None:
    resp = httpx.get(
        f"{stack.url}/v2/sandboxes", headers={"Authorization": f"Bearer {stack.admin_key}"}
    )
    assert resp.status_code == 200


def test_keys_are_shown_once_and_revocable(stack: Stack) -> None:
    team_id, key = stack.new_team("acme")
    c = stack.client(key)
    assert c.get("/v2/sandboxes").status_code == 200
    keys = c.get(f"/v1/teams/{team_id}/api-keys").json()
    assert len(keys) == 1
    assert "key" not in keys[0] and keys[0]["prefix"] == key[:12]
    assert keys[0]["lastUsedAt"] is not None

    second = c.post(f"/v1/teams/{team_id}/api-keys", json={"name": "ci"}).json()
    assert second["key"].startswith("wrn_") and second["key"] != key
    assert c.delete(f"/v1/teams/{team_id}/api-keys/{keys[0]['keyID']}").status_code == 204
    resp = c.get("/v2/sandboxes")
    assert resp.status_code == 401 and "revoked" in resp.json()["message"]
    c2 = stack.client(second["key"])
    listed = c2.get(f"/v1/teams/{team_id}/api-keys").json()
    assert [k["revokedAt"] is not None for k in listed] == [True, False]
    assert c2.delete(f"/v1/teams/{team_id}/api-keys/key_nope").status_code == 404


def test_other_teams_sandboxes_are_not_found(stack: Stack) -> None:
    _, key_a = stack.new_team("a")
    _, key_b = stack.new_team("b")
    a, b = stack.client(key_a), stack.client(key_b)
    sid = a.post("/v2/sandboxes", json={"templateID": "base"}).json()["sandboxID"]
    for call in (
        lambda: b.get(f"/sandboxes/{sid}"),
        lambda: b.delete(f"/sandboxes/{sid}"),
        lambda: b.post(f"/sandboxes/{sid}/timeout", json={"timeout": 5}),
        lambda: b.post(f"/sandboxes/{sid}/pause"),
        lambda: b.post(f"/v2/sandboxes/{sid}/connect", json={"timeout": 5}),
        lambda: b.post(f"/sandboxes/{sid}/snapshots", json={}),
        lambda: b.get(f"/sandboxes/{sid}/metrics"),
    ):
        resp = call()
        assert resp.status_code == 404, resp.text
        assert resp.json()["code"] == "not_found"
    assert b.get("/v2/sandboxes").json() == []
    assert [s["sandboxID"] for s in a.get("/v2/sandboxes").json()] == [sid]
    assert stack.hosts[0].agent.running() == [sid]  # untouched by b
    snap = a.post(f"/sandboxes/{sid}/snapshots", json={"name": "mine"}).json()["snapshotID"]
    assert b.get(f"/v1/snapshots/{snap}").status_code == 404
    assert b.delete(f"/templates/{snap}").status_code == 404
    assert b.post("/v2/sandboxes", json={"templateID": "mine"}).status_code == 404


def test_admin_only_endpoints(stack: Stack) -> None:
    team_id, key = stack.new_team("plain")
    plain = stack.client(key)
    for resp in (
        plain.post("/v1/teams", json={"name": "x"}),
        plain.get("/v1/hosts"),
        plain.post("/v1/hosts/tokens"),
        plain.post(f"/v1/hosts/{stack.hosts[0].host_id}/drain"),
    ):
        assert resp.status_code == 403, resp.text
        assert resp.json()["code"] == "permission_denied"
    # A team sees only itself, and another team's keys are not found.
    assert [t["teamID"] for t in plain.get("/v1/teams").json()] == [team_id]
    admin_team = stack.cp.bootstrap_key.team_id if stack.cp.bootstrap_key else ""
    assert plain.get(f"/v1/teams/{admin_team}/api-keys").status_code == 404
    assert plain.post(f"/v1/teams/{admin_team}/api-keys", json={}).status_code == 404
    assert len(stack.admin.get("/v1/teams").json()) == 2


def test_host_registration_and_heartbeat_auth(stack: Stack) -> None:
    token = stack.admin.post("/v1/hosts/tokens").json()["token"]
    body = {"token": token, "address": "http://127.0.0.1:1"}
    first = httpx.post(f"{stack.url}/v1/hosts/register", json=body)
    assert first.status_code == 201
    again = httpx.post(f"{stack.url}/v1/hosts/register", json=body)
    assert again.status_code == 401 and again.json()["code"] == "unauthenticated"
    bogus = httpx.post(f"{stack.url}/v1/hosts/register", json={**body, "token": "wrnr_x"})
    assert bogus.status_code == 401
    bad_url = httpx.post(f"{stack.url}/v1/hosts/register", json={**body, "address": "ftp://x"})
    assert bad_url.status_code == 400 and "address" in bad_url.json()["message"]

    host = stack.hosts[0]
    hb = host.agent.heartbeat_body()
    url = f"{stack.url}/v1/hosts/{host.host_id}/heartbeat"
    assert httpx.post(url, json=hb).status_code == 401
    assert httpx.post(url, json=hb, headers={"Authorization": "Bearer wrong"}).status_code == 401
    other = first.json()
    wrong_host = httpx.post(
        url, json=hb, headers={"Authorization": f"Bearer {other['hostSecret']}"}
    )
    assert wrong_host.status_code == 401
    ok = httpx.post(url, json=hb, headers={"Authorization": f"Bearer {host.secret}"})
    assert ok.status_code == 200 and ok.json() == {"hostID": host.host_id, "status": "active"}

    hosts = {h["hostID"]: h for h in stack.admin.get("/v1/hosts").json()}
    assert hosts[host.host_id]["live"] is True
    assert hosts[host.host_id]["cpuCount"] == 8
    assert hosts[other["hostID"]]["live"] is False  # registered, never heard from
