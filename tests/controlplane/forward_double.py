"""TEST DOUBLE of a host agent's HTTP side: ``ForwardingHost`` serves, on one address as the
real agent does, FakeHostAgent's Connect service and the agent's real forwarding path
(``wrenn.agent.forward.Forwarder``: its fast path, and its ASGI app for WebSockets)
``ANY /sandboxes/{sandbox_id}/port/{port}/{path}``. What stands in is the sandbox behind it:
port 49983 (envd) of every sandbox is one real envd process, any other port is that port on
127.0.0.1, where a test runs the server the sandbox would. Like the agent, it answers 404 for
a sandbox it does not run, and it runs envd's ``/init`` with the sandbox's access token when
a sandbox starts."""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx
from starlette.types import Receive, Scope, Send

from tests.controlplane.fake_agent import FakeHostAgent, FakeSandbox
from wrenn.agent import forward
from wrenn.agent.guestconns import GuestConnections
from wrenn.core import http1
from wrenn.core.errors import NotFound
from wrenn.gen.hostagent import hostagent_pb as pb

ENVD_PORT = 49983
_NOT_RECORDED = http1.HOP_BY_HOP | {b"host"}


class ForwardingHost(http1.FastPathApp):
    def __init__(self, agent: FakeHostAgent, envd_url: str) -> None:
        super().__init__(self._asgi, self._route)
        self.agent = agent
        self.envd_url = envd_url.rstrip("/")
        envd = urlsplit(self.envd_url)
        assert envd.hostname is not None and envd.port is not None
        self._envd_host, self._envd_port = envd.hostname, envd.port
        self.rpc = agent.asgi()
        self.client = httpx.AsyncClient(timeout=10)
        #: The ASGI path's client into "guests", as a VM's streaming envd client.
        self.streaming = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5))
        self.forwarder = forward.Forwarder(self._resolve)
        #: Per sandbox, as each VM has its own.
        self.connections: dict[str, GuestConnections] = {}
        #: The token envd requires now (the last /init set it).
        self.envd_token: str | None = None
        #: Every forwarded request: (sandbox id, port, path with query, headers).
        self.forwarded: list[tuple[str, int, str, dict[str, str]]] = []
        agent.on_start = self._init_envd

    async def aclose(self) -> None:
        self.forwarder.close()
        for connections in self.connections.values():
            await connections.close_all("closing")
        await self.client.aclose()
        await self.streaming.aclose()

    async def _init_envd(self, sandbox: FakeSandbox) -> None:
        headers = {"X-Access-Token": self.envd_token} if self.envd_token else {}
        resp = await self.client.post(
            f"{self.envd_url}/init",
            json={"accessToken": sandbox.envd_access_token},
            headers=headers,
        )
        resp.raise_for_status()
        self.envd_token = sandbox.envd_access_token

    def _resolve(self, sandbox_id: str) -> forward.Target:
        sandbox = self.agent.sandboxes.get(sandbox_id)
        if sandbox is None or sandbox.state != pb.SandboxState.RUNNING:
            raise NotFound(f"sandbox {sandbox_id} not running here")
        return forward.Target(
            address=self._envd_host,
            client=self.streaming,
            connections=self.connections.setdefault(sandbox_id, GuestConnections()),
            port_map={ENVD_PORT: self._envd_port},
        )

    def _record(self, target: bytes, headers: http1.Headers) -> None:
        parts = target.decode("latin-1").split("/", 5)  # '', sandboxes, id, port, N, rest
        if len(parts) < 5 or not parts[4].split("?")[0].isdigit():
            return
        rest = "/" + parts[5] if len(parts) > 5 else "/"
        recorded = {k.decode(): v.decode("latin-1") for k, v in headers if k not in _NOT_RECORDED}
        self.forwarded.append((parts[2], int(parts[4].split("?")[0]), rest, recorded))

    async def _route(
        self, head: http1.RequestHead, client: str | None
    ) -> http1.Forward | http1.Answer | None:
        decision = await self.forwarder.route(head, client)
        if decision is not None:
            self._record(head.target, head.headers)
        return decision

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] not in ("http", "websocket") or not path.startswith(forward.PREFIX):
            await self.rpc(scope, receive, send)
            return
        raw: bytes = scope.get("raw_path") or path.encode()
        query: bytes = scope.get("query_string", b"")
        self._record(raw + (b"?" + query if query else b""), scope["headers"])
        await self.forwarder(scope, receive, send)
