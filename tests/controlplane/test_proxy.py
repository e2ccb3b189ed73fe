"""The sandbox proxy, on its own port and on the API port, in front of the forwarding path test
double (ForwardingHost: FakeHostAgent plus a real envd process, and loopback servers for a
sandbox's other ports). The official e2b SDK drives envd through it in E2B_SANDBOX_URL mode;
raw HTTP and WebSocket clients check routing, access and the answers when a sandbox cannot be
reached."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from e2b import Sandbox, SandboxNotRunningException
from starlette.types import Receive, Scope, Send
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from tests.conftest import EnvdProcess
from tests.controlplane.conftest import FakeHost, Stack, wait_for
from tests.controlplane.fake_agent import FakeHostAgent
from tests.controlplane.forward_double import ForwardingHost
from wrenn.envd.config import ENVD_VERSION

ENVD = "49983"


@dataclass
class LoopbackApp:
    """What a sandbox would serve on another port: echoes requests, streams until the client
    leaves, echoes WebSocket messages."""

    stream_ended: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                await send({"type": "websocket.send", "text": "echo:" + message.get("text", "")})
        if scope["path"] == "/stream":
            await self._stream(receive, send)
            return
        digest = hashlib.sha256()
        size = 0
        while True:
            message = await receive()
            digest.update(message.get("body", b""))
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = json.dumps(
            {
                "method": scope["method"],
                "path": scope["path"],
                "query": scope["query_string"].decode(),
                "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
                "size": size,
                "sha256": digest.hexdigest(),
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _stream(self, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

        async def chunks() -> None:
            while True:
                await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
                await asyncio.sleep(0.05)

        task = asyncio.ensure_future(chunks())
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self.stream_ended.set()


@dataclass
class Proxied:
    stack: Stack
    host: FakeHost
    forward: ForwardingHost
    envd: EnvdProcess
    proxy_url: str
    app_port: int
    app: LoopbackApp

    def headers(self, sandbox_id: str, port: int | str = ENVD, **extra: str) -> dict[str, str]:
        return {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(port), **extra}

    def create(self, **body: Any) -> dict[str, Any]:
        resp = self.stack.admin.post("/v2/sandboxes", json={"templateID": "base", **body})
        assert resp.status_code == 201, resp.text
        created: dict[str, Any] = resp.json()
        return created


@pytest.fixture
def proxied(make_stack: Any, request: pytest.FixtureRequest) -> Iterator[Proxied]:
    envd = EnvdProcess()
    stack: Stack | None = None
    try:
        stack = make_stack(proxy_connect_timeout_s=0.5, proxy_resume_wait_s=10)
        assert stack is not None
        agent = FakeHostAgent(envd_version=ENVD_VERSION)
        forward = ForwardingHost(agent, envd.url)
        host = stack.add_host(agent, asgi=forward)
        app = LoopbackApp()
        served = stack.serve(app)
        yield Proxied(stack, host, forward, envd, stack.serve_proxy(), served.port, app)
        stack.run(forward.aclose())
    finally:
        envd.stop()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f"--- envd log ---\n{envd.logs()}")
        envd.log.unlink(missing_ok=True)


@pytest.fixture
def sdk(proxied: Proxied, monkeypatch: pytest.MonkeyPatch) -> Proxied:
    monkeypatch.setenv("E2B_API_URL", proxied.stack.url)
    monkeypatch.setenv("E2B_API_KEY", proxied.stack.admin_key)
    monkeypatch.setenv("E2B_DOMAIN", "wrenn.test")
    monkeypatch.setenv("E2B_SANDBOX_URL", proxied.proxy_url)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    return proxied


def test_sdk_commands_files_and_streams_through_the_proxy(sdk: Proxied) -> None:
    workdir = tempfile.mkdtemp(prefix="wrenn-proxy-")
    sbx = Sandbox.create(timeout=300)
    try:
        result = sbx.commands.run("echo hello; echo oops >&2")
        assert (result.stdout, result.stderr, result.exit_code) == ("hello\n", "oops\n", 0)

        # A Connect server stream: output arrives while the process still runs.
        handle = sbx.commands.run("echo ready; sleep 60", background=True)
        seen: list[str] = []
        for stdout, _, _ in handle:
            if stdout:
                seen.append(stdout)
                break
        assert seen == ["ready\n"]
        assert any(p.pid == handle.pid for p in sbx.commands.list())
        handle.kill()

        data = os.urandom(10 * 2**20)
        path = f"{workdir}/blob.bin"
        sbx.files.write(path, data)
        back = sbx.files.read(path, format="bytes")
        assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()

        forwarded = [f for f in sdk.forward.forwarded if f[0] == sbx.sandbox_id]
        assert forwarded and all(port == 49983 for _, port, _, _ in forwarded)
        headers = forwarded[-1][3]
        assert headers["x-access-token"] == sdk.forward.envd_token
        assert not {"e2b-sandbox-id", "e2b-sandbox-port"} & set(headers)

        assert sbx.is_running()
        sbx.kill()
        assert not sbx.is_running()  # the proxy's 502 "was not found"
        with pytest.raises(SandboxNotRunningException):
            sbx.commands.run("true")
    finally:
        Sandbox.kill(sbx.sandbox_id)
        shutil.rmtree(workdir, ignore_errors=True)


def _error(resp: httpx.Response, status: int, code: str) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"code", "message"} and body["code"] == code, body
    message: str = body["message"]
    return message


def test_unknown_paused_and_ended_sandboxes(proxied: Proxied) -> None:
    c = httpx.Client(base_url=proxied.proxy_url, timeout=30)
    for unknown in ("inope", "../../etc", "I" * 300):
        message = _error(c.get("/health", headers=proxied.headers(unknown)), 404, "not_found")
        assert "was not found" in message
    _error(c.get("/health"), 404, "not_found")  # names no sandbox at all
    _error(c.get("/health", headers=proxied.headers("inope", "x")), 400, "invalid_argument")

    sid = proxied.create()["sandboxID"]
    assert c.get("/health", headers=proxied.headers(sid)).status_code == 204
    assert proxied.stack.admin.post(f"/sandboxes/{sid}/pause").status_code == 204
    message = _error(c.get("/health", headers=proxied.headers(sid)), 409, "failed_precondition")
    assert "paused" in message
    assert proxied.stack.admin.post(f"/sandboxes/{sid}/connect", json={}).status_code == 201
    assert c.get("/health", headers=proxied.headers(sid)).status_code == 204
    assert proxied.stack.admin.delete(f"/sandboxes/{sid}").status_code == 204
    message = _error(c.get("/health", headers=proxied.headers(sid)), 502, "unavailable")
    assert "was not found" in message


def test_auto_resume_on_traffic(proxied: Proxied) -> None:
    sid = proxied.create(autoResume={"enabled": True}, timeout=600)["sandboxID"]
    assert proxied.stack.admin.post(f"/sandboxes/{sid}/pause").status_code == 204
    c = httpx.Client(base_url=proxied.proxy_url, timeout=30)
    resp = c.get("/echo", headers=proxied.headers(sid, proxied.app_port))
    assert resp.status_code == 200, resp.text
    detail = proxied.stack.admin.get(f"/sandboxes/{sid}").json()
    assert detail["state"] == "running"
    assert [rpc for rpc, target in proxied.host.agent.calls if target == sid].count(
        "ResumeSandbox"
    ) == 1


def test_unreachable_hosts_answer_502_without_hanging(proxied: Proxied) -> None:
    c = httpx.Client(base_url=proxied.proxy_url, timeout=60)
    sid = proxied.create()["sandboxID"]
    host_id = proxied.host.host_id

    # Silent past the heartbeat window.
    proxied.stack.update_host(host_id, last_heartbeat_at=datetime(2000, 1, 1, tzinfo=UTC))
    message = _error(c.get("/health", headers=proxied.headers(sid)), 502, "unavailable")
    assert "could not be reached" in message
    proxied.stack.heartbeat(proxied.host)

    # Nothing listens at the host's address: refused at once.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    proxied.stack.update_host(host_id, address=f"http://127.0.0.1:{closed_port}")
    message = _error(c.get("/health", headers=proxied.headers(sid)), 502, "unavailable")
    assert "could not be reached" in message

    # A listener whose accept queue is full never completes the handshake: the bounded
    # connect timeout answers instead of a hang.
    with contextlib.ExitStack() as cleanup:
        listener = cleanup.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        for _ in range(4):
            filler = cleanup.enter_context(socket.socket())
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
        proxied.stack.update_host(host_id, address=f"http://127.0.0.1:{listener.getsockname()[1]}")
        message = _error(c.get("/health", headers=proxied.headers(sid)), 502, "unavailable")
        assert "could not be reached" in message


def test_other_ports_public_or_behind_the_traffic_token(proxied: Proxied) -> None:
    c = httpx.Client(base_url=proxied.proxy_url, timeout=30)
    public = proxied.create()
    assert "trafficAccessToken" not in public
    resp = c.get(
        "/echo/a%2Fb?x=1&y=2", headers=proxied.headers(public["sandboxID"], proxied.app_port)
    )
    assert resp.status_code == 200, resp.text
    echoed = resp.json()
    assert (echoed["path"], echoed["query"]) == ("/echo/a/b", "x=1&y=2")
    assert "e2b-sandbox-id" not in echoed["headers"]
    assert echoed["headers"]["x-forwarded-for"] == "127.0.0.1"

    private = proxied.create(network={"allowPublicTraffic": False})
    sid, token = private["sandboxID"], private["trafficAccessToken"]
    at_app = proxied.headers(sid, proxied.app_port)
    _error(c.get("/echo", headers=at_app), 401, "unauthenticated")
    wrong = {**at_app, "e2b-traffic-access-token": "nope"}
    _error(c.get("/echo", headers=wrong), 403, "permission_denied")
    resp = c.get("/echo", headers={**at_app, "e2b-traffic-access-token": token})
    assert resp.status_code == 200
    assert "e2b-traffic-access-token" not in resp.json()["headers"]
    # envd's port is guarded by envd's own token, not the traffic token.
    assert c.get("/health", headers=proxied.headers(sid)).status_code == 204

    upload = os.urandom(3 * 2**20)
    resp = c.post(
        "/echo",
        content=upload,
        headers=proxied.headers(sid, proxied.app_port, **{"e2b-traffic-access-token": token}),
    )
    assert resp.json()["sha256"] == hashlib.sha256(upload).hexdigest()

    _error(
        proxied.stack.admin.post(
            "/v2/sandboxes", json={"templateID": "base", "network": {"allowOut": ["1.1.1.1"]}}
        ),
        400,
        "invalid_argument",
    )


def test_host_routing_on_the_proxy_and_api_ports(proxied: Proxied) -> None:
    sid = proxied.create()["sandboxID"]
    host = {"Host": f"{proxied.app_port}-{sid}.wrenn.test"}
    for base in (proxied.proxy_url, proxied.stack.url):
        resp = httpx.get(f"{base}/echo", headers=host, timeout=30)
        assert resp.status_code == 200, resp.text
        assert resp.json()["headers"]["x-forwarded-host"] == host["Host"]
    # Another domain is not sandbox traffic on the API port: the API answers.
    other = {"Host": f"{proxied.app_port}-{sid}.elsewhere.test"}
    assert httpx.get(f"{proxied.stack.url}/echo", headers=other).status_code == 404
    # The SDK's headers work on the API port too.
    resp = httpx.get(f"{proxied.stack.url}/health", headers=proxied.headers(sid))
    assert resp.status_code == 204


def test_websocket_through_the_proxy(proxied: Proxied) -> None:
    sid = proxied.create()["sandboxID"]
    url = proxied.proxy_url.replace("http://", "ws://") + "/ws"
    with ws_connect(url, additional_headers=proxied.headers(sid, proxied.app_port)) as ws:
        for text in ("one", "two"):
            ws.send(text)
            assert ws.recv(timeout=30) == "echo:" + text
    with (
        pytest.raises(InvalidStatus) as refused,
        ws_connect(url, additional_headers=proxied.headers("inope", proxied.app_port)),
    ):
        pass
    assert refused.value.response.status_code == 404


def test_client_leaving_ends_the_upstream_stream(proxied: Proxied) -> None:
    sid = proxied.create()["sandboxID"]
    with httpx.stream(
        "GET",
        f"{proxied.proxy_url}/stream",
        headers=proxied.headers(sid, proxied.app_port),
        timeout=30,
    ) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert next(lines) == "tick"
        assert next(lines) == "tick"
    wait_for(proxied.app.stream_ended.is_set, "the upstream stream to end")
