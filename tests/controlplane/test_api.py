"""The E2B-compatible REST API on SQLite and PostgreSQL, with responses parsed by the e2b SDK's
own models (``from_dict``) so field names and types are what the SDK reads."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

import httpx
from e2b.api.client.models import (
    Error,
    ListedSandbox,
    SandboxDetail,
    SandboxForkResult,
    SandboxLogs,
    SandboxMetric,
    SnapshotInfo,
    Template,
    TemplateWithBuilds,
)
from e2b.api.client.models import Sandbox as SandboxModel
from e2b.api.client.models.sandbox_state import SandboxState
from e2b.api.client.types import Unset

from tests.controlplane.conftest import Stack, wait_for
from tests.controlplane.fake_agent import FakeHostAgent


def create(client: httpx.Client, **body: Any) -> SandboxModel:
    resp = client.post("/v2/sandboxes", json={"templateID": "base", **body})
    assert resp.status_code == 201, resp.text
    return SandboxModel.from_dict(resp.json())


def error(resp: httpx.Response, status: int, code: str) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"code", "message"}
    assert body["code"] == code
    Error.from_dict(body)
    message: str = body["message"]
    return message


def test_create_get_kill(stack: Stack) -> None:
    c = stack.admin
    before = datetime.now(UTC)
    sbx = create(c, timeout=90, metadata={"owner": "me"}, envVars={"K": "V"})
    assert sbx.template_id == "base"
    assert sbx.envd_version == "0.3.0"
    assert sbx.domain == "wrenn.test"
    assert isinstance(sbx.envd_access_token, str) and sbx.envd_access_token
    fake = stack.hosts[0].agent.sandboxes[sbx.sandbox_id]
    assert fake.env_vars == {"K": "V"}
    assert fake.metadata == {"owner": "me"}
    assert fake.envd_access_token == sbx.envd_access_token
    assert (fake.vcpus, fake.memory_mib) == (2, 512)

    detail = SandboxDetail.from_dict(c.get(f"/sandboxes/{sbx.sandbox_id}").json())
    assert detail.state == SandboxState.RUNNING
    assert detail.metadata == {"owner": "me"}
    assert (detail.cpu_count, detail.memory_mb, detail.disk_size_mb) == (2, 512, 2048)
    assert detail.envd_access_token == sbx.envd_access_token
    assert detail.started_at >= before - timedelta(seconds=1)
    assert detail.end_at - detail.started_at == timedelta(seconds=90)
    assert detail.lifecycle.on_timeout.value == "kill"
    assert detail.client_id == stack.hosts[0].host_id

    assert c.delete(f"/sandboxes/{sbx.sandbox_id}").status_code == 204
    assert sbx.sandbox_id not in stack.hosts[0].agent.sandboxes
    error(c.get(f"/sandboxes/{sbx.sandbox_id}"), 404, "not_found")
    error(c.delete(f"/sandboxes/{sbx.sandbox_id}"), 404, "not_found")


def test_v1_create_defaults_to_15_seconds(stack: Stack) -> None:
    c = stack.admin
    resp = c.post("/sandboxes", json={"templateID": "base"})
    assert resp.status_code == 201, resp.text
    sid = SandboxModel.from_dict(resp.json()).sandbox_id
    detail = SandboxDetail.from_dict(c.get(f"/sandboxes/{sid}").json())
    assert detail.end_at - detail.started_at == timedelta(seconds=15)
    v2 = create(c)
    detail = SandboxDetail.from_dict(c.get(f"/sandboxes/{v2.sandbox_id}").json())
    assert detail.end_at - detail.started_at == timedelta(seconds=300)


def test_list_filters_and_pagination(stack: Stack) -> None:
    c = stack.admin
    a = create(c, metadata={"env": "prod", "tier": "1"}).sandbox_id
    b = create(c, metadata={"env": "prod", "tier": "2"}).sandbox_id
    d = create(c, metadata={"env": "dev", "odd key&=": "va=l&ue"}).sandbox_id

    def listed(**params: Any) -> tuple[list[str], str | None]:
        resp = c.get("/v2/sandboxes", params=params)
        assert resp.status_code == 200, resp.text
        items = [ListedSandbox.from_dict(x) for x in resp.json()]
        return [x.sandbox_id for x in items], resp.headers.get("x-next-token")

    def meta(m: dict[str, str]) -> str:  # as the SDK encodes it
        return urlencode({quote(k): quote(v) for k, v in m.items()})

    assert sorted(listed()[0]) == sorted([a, b, d])
    assert sorted(listed(metadata=meta({"env": "prod"}))[0]) == sorted([a, b])
    assert listed(metadata=meta({"env": "prod", "tier": "2"}))[0] == [b]
    assert listed(metadata=meta({"odd key&=": "va=l&ue"}))[0] == [d]
    assert listed(metadata=meta({"env": "nope"}))[0] == []

    assert listed(order="asc")[0] == [a, b, d]
    assert listed(order="desc")[0] == [d, b, a]
    first, token = listed(order="asc", limit=2)
    assert first == [a, b] and token
    rest, token2 = listed(order="asc", limit=2, nextToken=token)
    assert rest == [d] and token2 is None

    assert c.post(f"/sandboxes/{a}/pause").status_code == 204
    assert listed(state="paused")[0] == [a]
    assert sorted(listed(state="running")[0]) == sorted([b, d])
    assert sorted(listed(state="running,paused")[0]) == sorted([a, b, d])
    assert listed(template="base", order="asc")[0] == [a, b, d]
    assert listed(template="other")[0] == []
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert listed(startedAfter=future)[0] == []

    v1 = c.get("/sandboxes", params={"metadata": meta({"env": "prod"})})
    assert [ListedSandbox.from_dict(x).sandbox_id for x in v1.json()] == [b]  # running only


def test_timeout_and_refresh(stack: Stack) -> None:
    c = stack.admin
    sid = create(c, timeout=600).sandbox_id

    def end_at() -> datetime:
        return SandboxDetail.from_dict(c.get(f"/sandboxes/{sid}").json()).end_at

    assert c.post(f"/sandboxes/{sid}/timeout", json={"timeout": 30}).status_code == 204
    now = datetime.now(UTC)
    assert now < end_at() <= now + timedelta(seconds=31)  # shortened
    assert c.post(f"/sandboxes/{sid}/refreshes", json={"duration": 3000}).status_code == 204
    extended = end_at()
    assert extended >= now + timedelta(seconds=2990)
    assert c.post(f"/sandboxes/{sid}/refreshes", json={"duration": 10}).status_code == 204
    assert end_at() == extended  # a refresh never shortens
    assert c.post(f"/sandboxes/{sid}/refreshes").status_code == 204  # body is optional
    msg = error(
        c.post(f"/sandboxes/{sid}/timeout", json={"timeout": 10**6}), 400, "invalid_argument"
    )
    assert "exceeds the maximum" in msg


def test_pause_resume_connect(stack: Stack) -> None:
    c = stack.admin
    agent = stack.hosts[0].agent
    sid = create(c, timeout=60).sandbox_id
    assert c.post(f"/sandboxes/{sid}/pause").status_code == 204
    assert agent.paused() == [sid]
    detail = SandboxDetail.from_dict(c.get(f"/sandboxes/{sid}").json())
    assert detail.state == SandboxState.PAUSED
    error(c.post(f"/sandboxes/{sid}/pause"), 409, "failed_precondition")

    resp = c.post(f"/v2/sandboxes/{sid}/connect", json={"timeout": 120})
    assert resp.status_code == 201, resp.text  # resumed
    resumed = SandboxModel.from_dict(resp.json())
    assert resumed.sandbox_id == sid and resumed.envd_access_token == detail.envd_access_token
    assert agent.running() == [sid]

    resp = c.post(f"/sandboxes/{sid}/connect", json={"timeout": 10})
    assert resp.status_code == 200, resp.text  # already running: nothing resumed
    SandboxModel.from_dict(resp.json())

    error(c.post(f"/sandboxes/{sid}/resume", json={}), 409, "failed_precondition")
    assert c.post(f"/sandboxes/{sid}/pause", json={"memory": True}).status_code == 204
    resp = c.post(f"/sandboxes/{sid}/resume", json={"timeout": 50, "autoPause": True})
    assert resp.status_code == 201, resp.text
    detail = SandboxDetail.from_dict(c.get(f"/sandboxes/{sid}").json())
    assert detail.state == SandboxState.RUNNING
    assert detail.lifecycle.on_timeout.value == "pause"


def test_agent_errors_keep_their_code(stack: Stack) -> None:
    from connectrpc.code import Code
    from connectrpc.errors import ConnectError

    c = stack.admin
    agent = stack.hosts[0].agent
    agent.fail_next["CreateSandbox"] = ConnectError(Code.RESOURCE_EXHAUSTED, "no free slot")
    msg = error(c.post("/v2/sandboxes", json={"templateID": "base"}), 429, "resource_exhausted")
    assert "no free slot" in msg
    assert c.get("/v2/sandboxes").json() == []  # the failed sandbox is not listed

    sid = create(c).sandbox_id
    agent.fail_next["PauseSandbox"] = ConnectError(Code.UNAVAILABLE, "guest busy")
    error(c.post(f"/sandboxes/{sid}/pause"), 503, "unavailable")
    detail = SandboxDetail.from_dict(c.get(f"/sandboxes/{sid}").json())
    assert detail.state == SandboxState.RUNNING  # rolled back, can pause again
    assert c.post(f"/sandboxes/{sid}/pause").status_code == 204


def test_a_sandbox_being_killed_is_gone_for_reads_and_a_kill_retries(stack: Stack) -> None:
    """A kill whose host fails it leaves the sandbox stopping: GET, the listing and metrics
    agree it is gone (a listing never omits what a GET still shows); a second kill retries
    the host and ends it."""
    from connectrpc.code import Code
    from connectrpc.errors import ConnectError

    c = stack.admin
    agent = stack.hosts[0].agent
    sid = create(c).sandbox_id
    agent.fail_next["DestroySandbox"] = ConnectError(Code.UNAVAILABLE, "guest busy")
    error(c.delete(f"/sandboxes/{sid}"), 503, "unavailable")
    assert sid in agent.sandboxes
    error(c.get(f"/sandboxes/{sid}"), 404, "not_found")
    assert c.get("/v2/sandboxes").json() == []
    assert c.get("/sandboxes").json() == []
    error(c.post(f"/sandboxes/{sid}/pause"), 404, "not_found")
    assert c.delete(f"/sandboxes/{sid}").status_code == 204
    assert sid not in agent.sandboxes
    error(c.delete(f"/sandboxes/{sid}"), 404, "not_found")


def test_unreachable_host_is_unavailable(stack: Stack) -> None:
    c = stack.admin
    host = stack.hosts[0]
    sid = create(c).sandbox_id
    host.served.stop()
    error(c.post(f"/sandboxes/{sid}/pause"), 503, "unavailable")
    error(c.post("/v2/sandboxes", json={"templateID": "base"}), 503, "unavailable")


def test_snapshots(stack: Stack) -> None:
    c = stack.admin
    # Roomier in every resource, so new sandboxes go there.
    other = stack.add_host(FakeHostAgent(vcpus=64, memory_mib=64 * 1024))
    sid = create(c).sandbox_id
    source = stack.host_of(sid)
    assert source is other

    resp = c.post(f"/sandboxes/{sid}/snapshots", json={"name": "tpl-1"})
    assert resp.status_code == 201, resp.text
    info = SnapshotInfo.from_dict(resp.json())
    assert info.names == ["tpl-1"]
    error(c.post(f"/sandboxes/{sid}/snapshots", json={"name": "tpl-1"}), 409, "failed_precondition")

    v1 = c.get(f"/v1/snapshots/{info.snapshot_id}").json()
    assert v1["hostID"] == source.host_id and v1["sandboxID"] == sid
    assert v1["cpuCount"] == 2 and v1["sizeBytes"] == 512 * 1024 * 1024
    assert c.get("/v1/snapshots/tpl-1").json()["snapshotID"] == info.snapshot_id

    # Drain the storing host: a sandbox from its snapshot can go nowhere else.
    assert c.post(f"/v1/hosts/{source.host_id}/drain").status_code == 200
    msg = error(c.post("/v2/sandboxes", json={"templateID": "tpl-1"}), 503, "resource_exhausted")
    assert info.snapshot_id in msg and "draining" in msg
    assert c.post(f"/v1/hosts/{source.host_id}/activate").status_code == 200
    child = create(c, templateID="tpl-1").sandbox_id
    assert stack.host_of(child) is source
    assert source.agent.sandboxes[child].snapshot_id == info.snapshot_id

    listed = c.get("/snapshots", params={"sandboxID": sid})
    assert [SnapshotInfo.from_dict(x).snapshot_id for x in listed.json()] == [info.snapshot_id]
    second = c.post("/v1/snapshots", json={"sandboxID": sid})
    assert second.status_code == 201, second.text
    page = c.get("/snapshots", params={"limit": 1})
    assert page.headers.get("x-next-token")
    page2 = c.get("/snapshots", params={"limit": 1, "nextToken": page.headers["x-next-token"]})
    ids = {page.json()[0]["snapshotID"], page2.json()[0]["snapshotID"]}
    assert ids == {info.snapshot_id, second.json()["snapshotID"]}

    assert c.delete(f"/templates/{info.snapshot_id}").status_code == 204
    assert info.snapshot_id not in source.agent.snapshots
    error(c.get(f"/v1/snapshots/{info.snapshot_id}"), 404, "not_found")
    assert c.delete(f"/v1/snapshots/{second.json()['snapshotID']}").status_code == 204
    assert c.get("/v1/snapshots").json() == []


def test_fork(stack: Stack) -> None:
    """One hidden snapshot of the source, ``count`` sandboxes from it with the source's
    template, metadata and settings; each fork's outcome on its own; the snapshot deleted on
    its host once every fork has ended."""
    from connectrpc.code import Code
    from connectrpc.errors import ConnectError

    c = stack.admin
    agent = stack.hosts[0].agent
    sid = create(c, metadata={"role": "source"}, autoPause=True).sandbox_id
    resp = c.post(f"/sandboxes/{sid}/fork", json={"count": 2, "timeout": 120})
    assert resp.status_code == 201, resp.text
    results = [SandboxForkResult.from_dict(r) for r in resp.json()]
    forks = [r.sandbox for r in results if isinstance(r.sandbox, SandboxModel)]
    assert len(forks) == 2 and all(isinstance(r.error, Unset) for r in results)
    (snapshot_id,) = agent.snapshots
    for fork in forks:
        assert fork.template_id == "base" and fork.envd_access_token
        assert agent.sandboxes[fork.sandbox_id].snapshot_id == snapshot_id
        assert agent.sandboxes[fork.sandbox_id].metadata == {"role": "source"}
        detail = SandboxDetail.from_dict(c.get(f"/sandboxes/{fork.sandbox_id}").json())
        assert detail.lifecycle.on_timeout.value == "pause"
        assert detail.end_at - detail.started_at == timedelta(seconds=120)
    # Nobody's to see or to start from.
    assert c.get("/snapshots").json() == [] and c.get("/v1/snapshots").json() == []
    error(c.get(f"/v1/snapshots/{snapshot_id}"), 404, "not_found")
    error(c.post("/v2/sandboxes", json={"templateID": snapshot_id}), 404, "not_found")

    assert c.delete(f"/sandboxes/{forks[0].sandbox_id}").status_code == 204
    stack.run(asyncio.sleep(0.3))  # several lifecycle ticks: the other fork still needs it
    assert snapshot_id in agent.snapshots
    assert c.delete(f"/sandboxes/{forks[1].sandbox_id}").status_code == 204
    wait_for(lambda: snapshot_id not in agent.snapshots, "the fork snapshot deleted")

    # A fork that fails is reported in its entry; the others start.
    agent.fail_next["CreateSandbox"] = ConnectError(Code.RESOURCE_EXHAUSTED, "no free slot")
    results = [
        SandboxForkResult.from_dict(r)
        for r in c.post(f"/sandboxes/{sid}/fork", json={"count": 2}).json()
    ]
    errors = [r.error for r in results if isinstance(r.error, Error)]
    assert [(e.code, "no free slot" in e.message) for e in errors] == [(429, True)]
    (fork,) = [r.sandbox for r in results if isinstance(r.sandbox, SandboxModel)]
    assert c.delete(f"/sandboxes/{fork.sandbox_id}").status_code == 204
    wait_for(lambda: not agent.snapshots, "the fork snapshot deleted")

    error(c.post(f"/sandboxes/{sid}/fork", json={"count": 0}), 400, "invalid_argument")
    too_many = c.post(f"/sandboxes/{sid}/fork", json={"count": 21})
    assert "count" in error(too_many, 400, "invalid_argument")
    error(c.post("/sandboxes/isb_unknown/fork", json={}), 404, "not_found")
    assert c.post(f"/sandboxes/{sid}/pause").status_code == 204
    error(c.post(f"/sandboxes/{sid}/fork", json={}), 409, "failed_precondition")
    assert not agent.snapshots


def test_templates(stack: Stack) -> None:
    c = stack.admin
    resp = c.get("/templates")
    assert resp.status_code == 200, resp.text
    templates = [Template.from_dict(x) for x in resp.json()]
    assert [t.template_id for t in templates] == ["base"]
    assert templates[0].build_id == "build-base" and templates[0].public

    create(c)
    one = TemplateWithBuilds.from_dict(c.get("/templates/base").json())
    assert one.spawn_count == 1 and one.last_spawned_at is not None
    assert len(one.builds) == 1 and one.builds[0].cpu_count == 2
    error(c.get("/templates/nope"), 404, "not_found")

    _, key = stack.new_team("plain")
    plain = stack.client(key)
    error(plain.delete("/templates/base"), 403, "permission_denied")
    assert c.delete("/templates/base").status_code == 204  # admins may delete public ones
    assert c.get("/templates").json() == []
    stack.heartbeat(stack.hosts[0])  # the same build is not revived by a heartbeat
    assert c.get("/templates").json() == []
    error(c.post("/v2/sandboxes", json={"templateID": "base"}), 404, "not_found")


def test_metrics_and_logs(stack: Stack) -> None:
    c = stack.admin
    sid = create(c).sandbox_id
    resp = c.get(f"/sandboxes/{sid}/metrics")
    assert resp.status_code == 200, resp.text
    metrics = [SandboxMetric.from_dict(x) for x in resp.json()]
    assert len(metrics) == 1
    assert metrics[0].cpu_count == 2 and metrics[0].mem_total == 512 * 1024 * 1024
    assert metrics[0].mem_cache == 50 * 1024 * 1024
    logs = SandboxLogs.from_dict(c.get(f"/sandboxes/{sid}/logs").json())
    assert logs.logs == [] and logs.log_entries == []
    c.post(f"/sandboxes/{sid}/pause")
    assert c.get(f"/sandboxes/{sid}/metrics").json() == []
    error(c.get("/sandboxes/inope/metrics"), 404, "not_found")


def test_invalid_requests_get_400_naming_the_field(stack: Stack) -> None:
    c = stack.admin
    msg = error(
        c.post("/v2/sandboxes", json={"templateID": "base", "timeout": "soon"}),
        400,
        "invalid_argument",
    )
    assert "timeout" in msg and "'soon'" in msg
    msg = error(c.post("/v2/sandboxes", json={"timeout": 5}), 400, "invalid_argument")
    assert "templateID" in msg
    msg = error(
        c.post("/v2/sandboxes", json={"templateID": "base", "timeout": -1}), 400, "invalid_argument"
    )
    assert "timeout" in msg and "-1" in msg
    msg = error(
        c.post("/v2/sandboxes", json={"templateID": "base", "metadata": {"k": 1}}),
        400,
        "invalid_argument",
    )
    assert "metadata.k" in msg
    msg = error(
        c.post("/v2/sandboxes", content=b"{not json", headers={"content-type": "application/json"}),
        400,
        "invalid_argument",
    )
    msg = error(
        c.post(
            "/v2/sandboxes",
            json={"templateID": "base", "volumeMounts": [{"name": "v", "path": "/x"}]},
        ),
        400,
        "invalid_argument",
    )
    assert "volumeMounts" in msg
    msg = error(
        c.post("/v2/sandboxes", json={"templateID": "base", "autoPauseMemory": False}),
        400,
        "invalid_argument",
    )
    msg = error(c.get("/v2/sandboxes", params={"state": "sleeping"}), 400, "invalid_argument")
    assert "sleeping" in msg
    msg = error(c.get("/v2/sandboxes", params={"nextToken": "!!!"}), 400, "invalid_argument")
    assert "nextToken" in msg
    msg = error(c.get("/v2/sandboxes", params={"limit": 0}), 400, "invalid_argument")
    assert "limit" in msg
    error(c.get("/no/such/route"), 404, "not_found")
    error(c.put("/v2/sandboxes"), 405, "unimplemented")
    error(c.get("/sandboxes/NOT-AN-ID!"), 404, "not_found")


def test_no_host_is_503(make_stack: Any) -> None:
    stack = make_stack()
    msg = error(stack.admin.post("/v2/sandboxes", json={"templateID": "base"}), 404, "not_found")
    assert "template" in msg  # no host ever reported a template
    host = stack.add_host()
    assert stack.admin.post(f"/v1/hosts/{host.host_id}/drain").status_code == 200
    msg = error(
        stack.admin.post("/v2/sandboxes", json={"templateID": "base"}), 503, "resource_exhausted"
    )
    assert "draining" in msg


def test_openapi(stack: Stack) -> None:
    spec = httpx.get(f"{stack.url}/openapi.json").json()
    for path in (
        "/sandboxes",
        "/v2/sandboxes",
        "/sandboxes/{sandbox_id}",
        "/v1/hosts/register",
        "/v1/teams/{team_id}/api-keys",
        "/v1/snapshots",
        "/templates",
    ):
        assert path in spec["paths"], path
    assert "X-API-Key" in str(spec["components"]["securitySchemes"])
    assert httpx.get(f"{stack.url}/health").status_code == 204


def test_egress_rules(stack: Stack) -> None:
    """allowOut / denyOut and allow_internet_access at create, replaced by PUT .../network,
    kept across pause and resume and copied to forks; what the host got each time."""
    c = stack.admin
    agent = stack.hosts[0].agent
    sid = create(
        c,
        allow_internet_access=False,
        network={"allowOut": ["10.1.0.0/16", "8.8.8.8", "10.0.0.0/8"], "dnsServers": ["1.1.1.1"]},
    ).sandbox_id
    assert agent.sandboxes[sid].egress == (False, ["8.8.8.8/32", "10.0.0.0/8"], [])
    detail = c.get(f"/sandboxes/{sid}").json()
    assert detail["allowInternetAccess"] is False
    assert detail["network"] == {
        "allowPublicTraffic": True,
        "allowOut": ["8.8.8.8/32", "10.0.0.0/8"],
        "denyOut": [],
    }

    resp = c.put(f"/sandboxes/{sid}/network", json={"denyOut": ["192.0.2.0/24"]})
    assert resp.status_code == 204, resp.text
    assert agent.sandboxes[sid].egress == (True, [], ["192.0.2.0/24"])
    detail = c.get(f"/sandboxes/{sid}").json()
    assert detail["allowInternetAccess"] is True
    assert (detail["network"]["allowOut"], detail["network"]["denyOut"]) == ([], ["192.0.2.0/24"])
    assert c.get("/v1/audit", params={"action": "sandboxes.update_network"}).json()

    # Bad input names the bad value; nothing changes.
    for body, named in (
        ({"allowOut": ["example.com"]}, "'example.com'"),
        ({"denyOut": ["10.0.0.0/33"]}, "'10.0.0.0/33'"),
        ({"dnsServers": ["dns.example"]}, "'dns.example'"),
        ({"allowOut": "8.8.8.8"}, "allowOut"),
        ({"egressProxy": {"address": "socks5://proxy:1080"}}, "egressProxy"),
        ({"rules": {"api.example.com": {}}}, "rules"),
    ):
        message = error(c.put(f"/sandboxes/{sid}/network", json=body), 400, "invalid_argument")
        assert named in message, message
    assert agent.sandboxes[sid].egress == (True, [], ["192.0.2.0/24"])
    error(
        c.post("/v2/sandboxes", json={"templateID": "base", "network": {"allowOut": ["a.b"]}}),
        400,
        "invalid_argument",
    )

    # Kept across a pause; the resume hands the host the same.
    assert c.post(f"/sandboxes/{sid}/pause").status_code == 204
    error(c.put(f"/sandboxes/{sid}/network", json={}), 409, "failed_precondition")
    assert c.post(f"/sandboxes/{sid}/resume", json={"timeout": 60}).status_code == 201
    assert agent.sandboxes[sid].egress == (True, [], ["192.0.2.0/24"])
    # Forks start with the source's.
    resp = c.post(f"/sandboxes/{sid}/fork", json={"count": 1})
    assert resp.status_code == 201, resp.text
    fork_id = resp.json()[0]["sandbox"]["sandboxID"]
    assert agent.sandboxes[fork_id].egress == (True, [], ["192.0.2.0/24"])

    error(c.put("/sandboxes/nope/network", json={}), 404, "not_found")
