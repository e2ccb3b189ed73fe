"""The sandbox proxy, on its own port and on the API port, in front of the forwarding path test
double (ForwardingHost: FakeHostAgent serving the agent's real forwarding path, a real envd
process behind it, and loopback servers for a sandbox's other ports). The official e2b SDK
drives envd through it in E2B_SANDBOX_URL mode; raw HTTP and WebSocket clients check routing,
access, relaying (streams, chunked bodies, keep-alive, 100-continue, bodies without length)
and the answers when a sandbox cannot be reached. Every test runs against the proxy port's
fast path and against its ASGI app alone: both must behave the same."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b import Sandbox, SandboxNotRunningException
from starlette.types import Receive, Scope, Send
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from tests.conftest import EnvdProcess
from tests.controlplane.conftest import FakeHost, Stack, wait_for
from tests.controlplane.fake_agent import FakeHostAgent
from tests.controlplane.forward_double import ForwardingHost
from wrenn.agent.network.peers import abort_connections_to
from wrenn.core.http1 import wire
from wrenn.core.network_id import network_id
from wrenn.envd.config import ENVD_VERSION

ENVD = "49983"
#: What ``/bytes/{n}`` answers with, over and over.
BLOCK = os.urandom(1 << 20)


def _blocks(n: int) -> bytes:
    return (BLOCK * (n // len(BLOCK) + 1))[:n]


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
        if scope["path"] == "/early":  # answers without reading the body
            await send({"type": "http.response.start", "status": 413, "headers": []})
            await send({"type": "http.response.body", "body": b"too large"})
            return
        if scope["path"].startswith("/bytes/"):  # n bytes of BLOCK over and over
            pause = scope["query_string"].startswith(b"pause")
            await self._bytes(int(scope["path"].rsplit("/", 1)[1]), send, pause=pause)
            return
        if scope["path"].startswith("/status/"):
            status = int(scope["path"].rsplit("/", 1)[1])
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b""})
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
                "peer": scope["client"][1],
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(body)),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _bytes(self, n: int, send: Send, *, pause: bool = False) -> None:
        """``pause``: the head and the first byte, then a pause (the relays have read them by
        then), then the rest: the rest is not already waiting when a relay takes the body."""
        headers = [(b"content-length", b"%d" % n)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        view, at = memoryview(BLOCK), 0  # at: where in BLOCK the next piece starts
        if pause and n:
            await send({"type": "http.response.body", "body": BLOCK[:1], "more_body": n > 1})
            at, n = 1, n - 1
            await asyncio.sleep(0.1)
        while n:
            piece = view[at : at + n]
            n -= len(piece)
            at = 0
            await send({"type": "http.response.body", "body": bytes(piece), "more_body": bool(n)})

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
    fast_path: bool

    def headers(self, sandbox_id: str, port: int | str = ENVD, **extra: str) -> dict[str, str]:
        return {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(port), **extra}

    def create(self, **body: Any) -> dict[str, Any]:
        resp = self.stack.admin.post("/v2/sandboxes", json={"templateID": "base", **body})
        assert resp.status_code == 201, resp.text
        created: dict[str, Any] = resp.json()
        return created


@pytest.fixture(params=["fast-path", "asgi"])
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
        fast_path = request.param == "fast-path"
        proxy_url = stack.serve_proxy(fast_path=fast_path)
        yield Proxied(stack, host, forward, envd, proxy_url, served.port, app, fast_path)
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
            "/v2/sandboxes", json={"templateID": "base", "network": {"allowOut": ["example.com"]}}
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


def _roundtrip(sock: socket.socket, request: bytes) -> tuple[bytes, bytes]:
    """Send ``request`` and read one response framed by Content-Length (or without a body):
    (head, body)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or _closed()
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next((v for k, v in _head_fields(head) if k == b"content-length"), b"0"))
    while len(body) < length:
        body += sock.recv(65536) or _closed()
    return head, body


def _head_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (k.strip().lower(), v.strip())
        for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
    ]


def _closed() -> bytes:
    raise AssertionError("the connection closed early")


def test_request_and_response_bodies_in_every_framing(proxied: Proxied) -> None:
    sid = proxied.create()["sandboxID"]
    at_app = proxied.headers(sid, proxied.app_port)
    with httpx.Client(base_url=proxied.proxy_url, headers=at_app, timeout=30) as c:
        # Fixed lengths, copied (small) and spliced (large), and no body at all.
        for size in (0, 10, 70_000, 5 * 2**20 + 3):
            data = os.urandom(size)
            echoed = c.post("/echo", content=data).json()
            assert (echoed["size"], echoed["sha256"]) == (size, hashlib.sha256(data).hexdigest())
        # Chunked: a body of unknown length, in pieces of every size.
        data = os.urandom(3 * 2**20 + 7)
        cuts = [0, 1, 2, 100, 65_536, 65_537, 200_000, 1_300_000, len(data)]

        def pieces() -> Iterator[bytes]:
            for start, end in itertools.pairwise(cuts):
                yield data[start:end]

        echoed = c.post("/echo", content=pieces()).json()
        assert (echoed["size"], echoed["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        # Answers without a body, on the same connection.
        head = c.head("/echo")
        assert (head.status_code, head.content) == (200, b"")
        for status in (204, 304):
            resp = c.get(f"/status/{status}")
            assert (resp.status_code, resp.content) == (status, b"")
        assert c.get("/echo").status_code == 200


def test_a_response_that_ends_with_its_connection(proxied: Proxied) -> None:
    """No Content-Length and no chunks: the body is everything up to the server's close."""
    body = os.urandom(300_000)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(30)

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-raw\r\n\r\n" + body)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        sid = proxied.create()["sandboxID"]
        port = listener.getsockname()[1]
        resp = httpx.get(f"{proxied.proxy_url}/raw", headers=proxied.headers(sid, port), timeout=30)
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "application/x-raw"
        assert hashlib.sha256(resp.content).digest() == hashlib.sha256(body).digest()
    finally:
        listener.close()
        server.join(30)


def test_keep_alive_on_every_hop_and_100_continue(proxied: Proxied) -> None:
    sid = proxied.create()["sandboxID"]
    address = urlsplit(proxied.proxy_url)
    fields = b"".join(
        b"%s: %s\r\n" % (k.encode(), v.encode())
        for k, v in proxied.headers(sid, proxied.app_port).items()
    )
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        peers = set()
        for _ in range(5):
            head, body = _roundtrip(sock, b"GET /echo HTTP/1.1\r\nhost: x\r\n%s\r\n" % fields)
            assert head.startswith(b"HTTP/1.1 200 "), head
            peers.add(json.loads(body)["peer"])
        # The sandbox's server saw one connection: every hop kept its upstream alive.
        assert len(peers) == 1

        # Expect: 100-continue: the proxy says go before the body is sent.
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nhost: x\r\n%scontent-length: 5\r\n"
            b"expect: 100-continue\r\n\r\n" % fields
        )
        interim = b""
        while b"\r\n\r\n" not in interim:
            interim += sock.recv(1) or _closed()
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        head, body = _roundtrip(sock, b"hello")
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert json.loads(body)["size"] == 5
        assert "expect" not in json.loads(body)["headers"]


def test_api_calls_and_sandbox_traffic_share_a_connection_on_the_api_port(
    proxied: Proxied,
) -> None:
    sid = proxied.create()["sandboxID"]
    at_app = proxied.headers(sid, proxied.app_port)
    key = {"X-API-Key": proxied.stack.admin_key}
    with httpx.Client(base_url=proxied.stack.url, timeout=30) as c:
        # Sandbox traffic first (the fast path), then the API on the same connection...
        assert c.post("/echo", content=b"one", headers=at_app).json()["size"] == 3
        assert c.get(f"/sandboxes/{sid}", headers=key).json()["sandboxID"] == sid
        # ...after which the connection belongs to the API's server, which still relays.
        assert c.post("/echo", content=b"four", headers=at_app).json()["size"] == 4
        assert c.get(f"/sandboxes/{sid}", headers=key).status_code == 200


def test_heads_too_large_or_malformed_are_answered_as_uvicorn_answers_them(
    proxied: Proxied,
) -> None:
    sid = proxied.create()["sandboxID"]
    address = urlsplit(proxied.proxy_url)
    large = b"x-large: " + b"a" * 100_000 + b"\r\n"
    request = b"GET /health HTTP/1.1\r\nhost: x\r\ne2b-sandbox-id: %s\r\n%s\r\n" % (
        sid.encode(),
        large,
    )
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        head, _ = _roundtrip(sock, request)
        assert head.startswith(b"HTTP/1.1 204 "), head[:100]
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nbad header: x\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 "), answer


def test_an_answer_before_the_whole_upload_reaches_the_client(proxied: Proxied) -> None:
    sid = proxied.create()["sandboxID"]
    at_app = proxied.headers(sid, proxied.app_port)
    with httpx.Client(base_url=proxied.proxy_url, headers=at_app, timeout=30) as c:
        for body in (os.urandom(8 * 2**20), iter([os.urandom(2**20)] * 8)):
            resp = c.post("/early", content=body)
            assert (resp.status_code, resp.content) == (413, b"too large")


def test_a_pause_ends_the_guest_connections_and_the_next_requests_work(proxied: Proxied) -> None:
    """A pause closes the agent's connections into the guest, idle or busy (as the agent does
    through GuestConnections): an open stream ends for its client instead of hanging, and the
    next requests, on kept-alive client connections too, go through at once."""
    sid = proxied.create()["sandboxID"]
    at_app = proxied.headers(sid, proxied.app_port)
    with httpx.Client(base_url=proxied.proxy_url, headers=at_app, timeout=30) as keep:
        with httpx.stream("GET", f"{proxied.proxy_url}/stream", headers=at_app, timeout=30) as resp:
            lines = resp.iter_lines()
            assert next(lines) == "tick"
            assert keep.get("/echo").status_code == 200  # an idle connection into the guest
            connections = proxied.forward.connections[sid]
            closed = proxied.stack.run(connections.close_all("sandbox pausing"))
            assert closed == 2  # the stream's and the idle one
            with pytest.raises(httpx.HTTPError):
                for _ in lines:
                    pass
        wait_for(proxied.app.stream_ended.is_set, "the guest's stream to end")
        for _ in range(3):
            assert keep.get("/echo").status_code == 200
        assert httpx.get(f"{proxied.proxy_url}/echo", headers=at_app).status_code == 200


def test_long_downloads_move_in_the_kernel_and_a_pause_still_ends_them(proxied: Proxied) -> None:
    """A long response body goes from socket to socket in the kernel on both relays here
    (the agent's forwarding path and the proxy's fast path; the ASGI path copies its own
    hop) and arrives exact; a pause mid-download ends it for the client instead of leaving
    it waiting, and the next requests go through."""
    sid = proxied.create()["sandboxID"]
    at_app = proxied.headers(sid, proxied.app_port)
    before = wire.redirecting.bodies
    with httpx.Client(base_url=proxied.proxy_url, headers=at_app, timeout=30) as c:
        for size in (40 * 2**20 + 5, 9 * 2**20):
            got = c.get(f"/bytes/{size}?pause")
            assert got.status_code == 200
            assert hashlib.sha256(got.content).digest() == hashlib.sha256(_blocks(size)).digest()
        if os.geteuid() == 0:  # loading the BPF program needs root
            assert wire.redirecting.unavailable is None
            assert wire.redirecting.bodies - before >= (4 if proxied.fast_path else 2)
        with c.stream("GET", f"/bytes/{1 << 30}") as resp:
            pieces = resp.iter_raw(1 << 20)
            for _ in range(8):
                next(pieces)
            connections = proxied.forward.connections[sid]
            assert proxied.stack.run(connections.close_all("sandbox pausing")) >= 1
            with pytest.raises(httpx.HTTPError):
                for _ in pieces:
                    pass
        for _ in range(3):
            assert c.get("/echo").status_code == 200


#: The "guest" address in the direct-dial test: a loopback address nothing else here uses.
GUEST = "127.0.0.2"


@pytest.mark.parametrize("proxied", ["fast-path"], indirect=True)  # the ASGI path: via the agent
def test_a_guest_beside_the_control_plane_is_dialled_directly(proxied: Proxied) -> None:
    """When the host's agent reports this process's network, the fast path dials the
    sandbox's guest address itself (the agent's forwarding path sees nothing), answers as the
    agent would when a port is closed, and its connections end when the agent aborts the
    host's connections to the guest (as it does before a pause): an open stream ends for its
    client instead of hanging, and the next requests, on kept-alive client connections too,
    go through at once."""
    assert proxied.fast_path
    guest = LoopbackApp()
    port = proxied.stack.serve(guest, address=GUEST).port
    proxied.host.agent.network_id = network_id()
    proxied.host.agent.sandbox_address = GUEST
    sid = proxied.create()["sandboxID"]
    at_guest = proxied.headers(sid, port)
    with httpx.Client(base_url=proxied.proxy_url, headers=at_guest, timeout=30) as keep:
        resp = keep.get("/echo?x=1")
        assert resp.status_code == 200, resp.text
        echoed = resp.json()
        assert (echoed["path"], echoed["query"]) == ("/echo", "x=1")
        assert echoed["headers"]["host"] == f"{GUEST}:{port}"
        assert echoed["headers"]["x-forwarded-for"] == "127.0.0.1"
        assert "e2b-sandbox-id" not in echoed["headers"]
        assert [f for f in proxied.forward.forwarded if f[0] == sid] == []

        with socket.socket() as probe:  # a port nothing listens on
            probe.bind((GUEST, 0))
            closed = probe.getsockname()[1]
        msg = _error(
            httpx.get(f"{proxied.proxy_url}/", headers=proxied.headers(sid, closed)),
            502,
            "unavailable",
        )
        assert f"port is not open: {closed}" in msg

        with httpx.stream("GET", f"{proxied.proxy_url}/stream", headers=at_guest, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines) == "tick"
            assert keep.get("/echo").status_code == 200  # kept alive into the guest
            assert abort_connections_to(GUEST) >= 2  # the stream's and the idle one
            with pytest.raises(httpx.HTTPError):
                for _ in lines:
                    pass
        wait_for(guest.stream_ended.is_set, "the guest's stream to end")
        for _ in range(3):
            assert keep.get("/echo").status_code == 200
    assert [f for f in proxied.forward.forwarded if f[0] == sid] == []


@pytest.mark.parametrize("proxied", ["fast-path"], indirect=True)
def test_traffic_goes_through_the_agent_while_it_does_not_say_where_it_runs(
    proxied: Proxied,
) -> None:
    """An agent whose GetHostInfo fails (or does not come) gets its sandboxes' traffic through
    its forwarding path meanwhile: the request is answered, never failed for it."""
    proxied.host.agent.network_id = network_id()
    proxied.host.agent.fail_next["GetHostInfo"] = ConnectError(Code.UNAVAILABLE, "busy")
    sid = proxied.create()["sandboxID"]
    resp = httpx.get(f"{proxied.proxy_url}/echo", headers=proxied.headers(sid, proxied.app_port))
    assert resp.status_code == 200, resp.text
    assert [f[2] for f in proxied.forward.forwarded if f[0] == sid] == ["/echo"]
