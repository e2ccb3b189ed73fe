"""TEST DOUBLE of a host agent's HTTP side: ``ForwardingHost`` serves, on one address as the
real agent does, FakeHostAgent's Connect service and a stand-in for the agent's forwarding
path ``ANY /sandboxes/{sandbox_id}/port/{port}/{path}``. Port 49983 (envd) of every sandbox
is one real envd process; any other port is that port on 127.0.0.1, where a test runs the
server the sandbox would. Like the agent, it answers 404 for a sandbox it does not run, and
it runs envd's ``/init`` with the sandbox's access token when a sandbox starts."""

from __future__ import annotations

import re
from typing import Any

import httpx
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from tests.controlplane.fake_agent import FakeHostAgent, FakeSandbox
from wrenn.controlplane import relay
from wrenn.controlplane.errors import BadGateway
from wrenn.controlplane.upstream import Origin, UpstreamPool
from wrenn.gen.hostagent import hostagent_pb as pb

ENVD_PORT = 49983
_PATH = re.compile(r"^/sandboxes/([^/]+)/port/([0-9]+)(/.*)?$")


class ForwardingHost:
    def __init__(self, agent: FakeHostAgent, envd_url: str) -> None:
        self.agent = agent
        self.envd_url = envd_url.rstrip("/")
        self.rpc = agent.asgi()
        self.client = httpx.AsyncClient(timeout=10)
        self.upstream = UpstreamPool(connect_timeout_s=10)
        #: The token envd requires now (the last /init set it).
        self.envd_token: str | None = None
        #: Every forwarded request: (sandbox id, port, path with query, headers).
        self.forwarded: list[tuple[str, int, str, dict[str, str]]] = []
        agent.on_start = self._init_envd

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.upstream.aclose()

    async def _init_envd(self, sandbox: FakeSandbox) -> None:
        headers = {"X-Access-Token": self.envd_token} if self.envd_token else {}
        resp = await self.client.post(
            f"{self.envd_url}/init",
            json={"accessToken": sandbox.envd_access_token},
            headers=headers,
        )
        resp.raise_for_status()
        self.envd_token = sandbox.envd_access_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] not in ("http", "websocket") or not path.startswith("/sandboxes/"):
            await self.rpc(scope, receive, send)
            return
        raw = (scope.get("raw_path") or path.encode()).decode("latin-1").split("?", 1)[0]
        match = _PATH.match(raw)
        assert match is not None, raw
        sandbox_id, port, rest = match.group(1), int(match.group(2)), match.group(3) or "/"
        query = scope.get("query_string", b"").decode("latin-1")
        rest += f"?{query}" if query else ""
        headers = [(k, v) for k, v in scope["headers"] if k not in relay.HOP_BY_HOP | {b"host"}]
        self.forwarded.append(
            (sandbox_id, port, rest, {k.decode(): v.decode("latin-1") for k, v in headers})
        )
        sandbox = self.agent.sandboxes.get(sandbox_id)
        if sandbox is None or sandbox.state != pb.SandboxState.RUNNING:
            body: Any = {"code": "not_found", "message": f"sandbox {sandbox_id} not running here"}
            if scope["type"] == "websocket":
                await receive()
                await send({"type": "websocket.close", "code": 1008})
            else:
                await JSONResponse(body, status_code=404)(scope, receive, send)
            return
        base = self.envd_url if port == ENVD_PORT else f"http://127.0.0.1:{port}"
        if scope["type"] == "websocket":
            await relay.relay_websocket(
                scope, receive, send, "ws" + base[4:] + rest, headers, open_timeout_s=10
            )
            return
        try:
            await relay.relay_http(
                scope,
                receive,
                send,
                self.upstream,
                Origin.parse(base),
                rest.encode("latin-1"),
                headers,
                unreachable=f"port {port} of sandbox {sandbox_id} is not open",
            )
        except BadGateway as err:
            await JSONResponse(err.to_body(), status_code=502)(scope, receive, send)
