"""The sandbox proxy: SDK traffic to a sandbox (envd's Connect services and /files, and any
port the sandbox serves) routed to the sandbox's host agent, whose forwarding path
``/sandboxes/{id}/port/{port}/{path}`` reaches the guest.

Which sandbox and port a request is for:

- the ``E2b-Sandbox-Id`` and ``E2b-Sandbox-Port`` headers (the e2b SDK sends them on every
  sandbox request; with ``E2B_SANDBOX_URL`` pointing here they are all it needs), else
- the Host ``{port}-{sandbox_id}.{domain}`` (E2B_DOMAIN mode, behind a TLS front).

Who may reach it: envd's port (49983) is protected by envd itself (the sandbox's
``X-Access-Token``, checked in the guest). Other ports are public, as in E2B, unless the
sandbox was created with ``network.allowPublicTraffic: false``: then the request must carry
the sandbox's ``e2b-traffic-access-token`` (401 without it, 403 with a wrong one); the header
is not passed on to the sandbox.

What a request gets when it cannot be forwarded (bodies ``{code, message}``):

- 404 ``not_found`` "sandbox … was not found": no such sandbox;
- 502 ``unavailable`` "sandbox … was not found: it has ended": killed or failed (the e2b SDK
  reads this message on a 502 as "sandbox not running"; ``is_running()`` becomes False);
- 409 ``failed_precondition``: paused — unless created with auto-resume, which resumes it and
  then forwards (requests arriving meanwhile wait for it, up to ``proxy_resume_wait_s``);
- 502 ``unavailable`` "… could not be reached": its host is silent or does not accept the
  connection within ``proxy_connect_timeout_s``;
- 503 ``unavailable``: still starting or resuming after ``proxy_resume_wait_s``, or the control
  plane itself is starting.

Two ways in, one behaviour: ``route`` is the fast path (``core.http1``, how ``wrenn-cp`` serves
the proxy port and sandbox traffic on the API port): a plain HTTP request is looked up and
checked as above, then relayed byte for byte to the host agent, bodies moved socket to socket
(``core.http1.wire``), over kept-alive connections. When the host's agent runs beside this
process (``guestdial``) and the sandbox's guest address is known, the fast path dials the
guest's port itself instead, and answers as the agent would when it does not answer
(``core.sandboxport``). WebSocket upgrades, HTTP/1.0, hosts reached over TLS and connections
uvicorn serves already (one that carried an API call first) take the ASGI app (``__call__``),
which relays through ``relay`` and ``upstream`` to the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from wrenn import log
from wrenn.controlplane import ids, relay
from wrenn.controlplane.context import ServerContext
from wrenn.controlplane.db.records import Host, Sandbox, SandboxState
from wrenn.controlplane.errors import BadGateway, Conflict
from wrenn.controlplane.events import Event
from wrenn.controlplane.guestdial import GuestDialing
from wrenn.controlplane.upstream import Origin, UpstreamPool
from wrenn.core import http1, sandboxport
from wrenn.core.errors import (
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    WrennError,
)

_log = log.get(__name__)

ENVD_PORT = 49983
SANDBOX_ID_HEADER = b"e2b-sandbox-id"
SANDBOX_PORT_HEADER = b"e2b-sandbox-port"
TRAFFIC_TOKEN_HEADER = b"e2b-traffic-access-token"
#: Headers the proxy consumes (or answers itself, as ``Expect``): never passed on.
_OWN_HEADERS = frozenset(
    {SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER, TRAFFIC_TOKEN_HEADER, b"host", b"expect"}
)
_HOST = re.compile(r"^([0-9]{1,5})-([a-z0-9]{1,64})\.([^:]+)(?::[0-9]+)?$")
_ENDED = frozenset({SandboxState.KILLED, SandboxState.FAILED, SandboxState.STOPPING})
_PAUSED = frozenset({SandboxState.PAUSED, SandboxState.PAUSING})
_POLL_S = 0.1
_WS_OPEN_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Target:
    sandbox_id: str
    port: int


Headers = Iterable[tuple[bytes, bytes]]


def _header(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return bytes(value)
    return None


def target_of(headers: Headers, domain: str) -> Target | None:
    """The sandbox and port a request (its lower-cased headers) is for, or ``None`` when it
    names none. With an empty ``domain``, any ``{port}-{id}.…`` Host counts."""
    sandbox_id = _header(headers, SANDBOX_ID_HEADER)
    if sandbox_id is not None:
        raw_port = _header(headers, SANDBOX_PORT_HEADER)
        port = ENVD_PORT
        if raw_port is not None:
            if not raw_port.isdigit() or not 0 < int(raw_port) < 65536:
                raise InvalidArgument(f"E2b-Sandbox-Port: not a port ({raw_port[:16]!r})")
            port = int(raw_port)
        return Target(sandbox_id.decode("latin-1"), port)
    host = _header(headers, b"host")
    if host is None:
        return None
    match = _HOST.match(host.decode("latin-1").lower())
    if match is None or (domain and match.group(3) != domain.lower()):
        return None
    port = int(match.group(1))
    if not 0 < port < 65536:
        raise InvalidArgument(f"invalid port {port} in the Host header")
    return Target(match.group(2), port)


@dataclass(frozen=True)
class _Route:
    sandbox: Sandbox | None
    host: Host | None
    expires: float


class SandboxProxy:
    """ASGI app serving sandbox traffic (see the module docstring)."""

    def __init__(self, ctx: ServerContext) -> None:
        self._ctx = ctx
        cfg = ctx.config
        self._domain = cfg.domain
        self._cache_s = cfg.proxy_cache_s
        self._wait_s = cfg.proxy_resume_wait_s
        self._connect_timeout_s = cfg.proxy_connect_timeout_s
        self._routes: dict[str, _Route] = {}
        self._upstream = UpstreamPool(connect_timeout_s=cfg.proxy_connect_timeout_s)
        self._pool = http1.Pool()
        self._guests = GuestDialing(ctx.hosts, enabled=cfg.proxy_dial_guests)
        ctx.events.subscribe(self._forget)

    async def aclose(self) -> None:
        self._pool.close()
        await self._upstream.aclose()

    def _forget(self, event: Event) -> None:
        sandbox_id = event.data.get("sandboxID")
        if sandbox_id:
            self._routes.pop(str(sandbox_id), None)
        elif event.type.startswith("host."):
            self._routes.clear()

    def handles(self, headers: Headers) -> bool:
        """Whether a request arriving on the API port is sandbox traffic (the domain must
        match there, so the API's own Host names never do)."""
        if _header(headers, SANDBOX_ID_HEADER) is not None:
            return True
        if not self._domain:
            return False
        try:
            return target_of(headers, self._domain) is not None
        except InvalidArgument:
            return True

    async def _admit(self, headers: Headers) -> tuple[Target, Sandbox, Host]:
        """The sandbox a request is for, once it runs and the request may reach it."""
        target = target_of(headers, self._domain)
        if target is None:
            raise NotFound(
                "no sandbox named: send E2b-Sandbox-Id (and E2b-Sandbox-Port) or use the "
                "Host {port}-{sandbox_id}.{domain}"
            )
        if not self._ctx.started.is_set():
            raise Unavailable("the control plane is starting; retry shortly")
        sandbox, host = await self._running(target.sandbox_id)
        _check_traffic_token(headers, sandbox, target.port)
        return target, sandbox, host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        try:
            target, _, host = await self._admit(scope["headers"])
        except WrennError as err:
            await _refuse(scope, receive, send, err)
            return
        except Exception:
            # Request boundary: log once, answer 500 without detail.
            _log.exception("proxy.crashed", path=scope.get("path"))
            await _refuse(scope, receive, send, Internal("internal error"))
            return
        await self._forward(scope, receive, send, target, host)

    async def route(
        self, head: http1.RequestHead, client: str | None
    ) -> http1.Forward | http1.Answer | None:
        """The fast path on the proxy port: every request there is sandbox traffic."""
        try:
            target, sandbox, host = await self._admit(head.headers)
            if sandbox.guest_address and await self._guests.reaches(host):
                return self._to_guest(head, client, target, sandbox.guest_address)
        except WrennError as err:
            return http1.Answer.error(err)
        except Exception:
            # Request boundary: log once, answer 500 without detail.
            _log.exception("proxy.crashed", path=head.path.decode("latin-1")[:200])
            return http1.Answer.error(Internal("internal error"))
        unreachable = _unreachable_message(target)
        try:
            origin = Origin.parse(host.address)
        except ValueError:
            return http1.Answer.error(BadGateway(f"{unreachable} (bad host address)"))
        if origin.scheme != "http":
            return None  # TLS to the host: the ASGI path's client speaks it
        headers = _upstream_headers(head.headers, client)
        headers.append((b"host", origin.authority))

        def refuse(err: Exception) -> http1.Answer:
            _log.warning("proxy.unreachable", sandbox_id=target.sandbox_id, host_id=host.id)
            return http1.Answer.error(BadGateway(f"{unreachable} ({err})"))

        return http1.Forward(
            address=(origin.host, origin.port),
            target=_upstream_target(target, head.target),
            headers=headers,
            pool=self._pool,
            connect_timeout_s=self._connect_timeout_s,
            unreachable=refuse,
            log_name="proxy",
            log_fields={"sandbox_id": target.sandbox_id},
        )

    def _to_guest(
        self, head: http1.RequestHead, client: str | None, target: Target, address: str
    ) -> http1.Forward:
        """The fast path's relay straight to the guest's port (see ``guestdial``)."""
        headers = _upstream_headers(head.headers, client)
        headers.append((b"host", f"{address}:{target.port}".encode()))

        def refuse(err: Exception) -> http1.Answer:
            return http1.Answer.error(sandboxport.dial_failed(err, target.sandbox_id, target.port))

        return http1.Forward(
            address=(address, target.port),
            target=head.target,
            headers=headers,
            pool=self._pool,
            connect_timeout_s=self._connect_timeout_s,
            unreachable=refuse,
            log_name="proxy",
            log_fields={"sandbox_id": target.sandbox_id, "port": target.port},
        )

    async def route_api(
        self, head: http1.RequestHead, client: str | None
    ) -> http1.Forward | http1.Answer | None:
        """The fast path on the API port: sandbox traffic only, the API gets the rest."""
        if not self.handles(head.headers):
            return None
        return await self.route(head, client)

    # --- where the sandbox is ------------------------------------------------------------

    async def _lookup(self, sandbox_id: str, *, fresh: bool) -> _Route:
        now = time.monotonic()
        cached = self._routes.get(sandbox_id)
        if cached is not None and not fresh and cached.expires > now:
            return cached
        sandbox: Sandbox | None = None
        host: Host | None = None
        if ids.is_sandbox_id(sandbox_id):
            async with self._ctx.db.transaction(read_only=True) as tx:
                sandbox = await tx.sandboxes.get(sandbox_id)
                if sandbox is not None and sandbox.host_id is not None:
                    host = await tx.hosts.get(sandbox.host_id)
        route = _Route(sandbox, host, now + self._cache_s)
        if self._cache_s > 0 and sandbox is not None:
            if len(self._routes) > 100_000:
                self._routes.clear()
            self._routes[sandbox_id] = route
        return route

    async def _running(self, sandbox_id: str) -> tuple[Sandbox, Host]:
        """The sandbox once it runs (auto-resuming it if it may), and its host."""
        deadline = time.monotonic() + self._wait_s
        route = await self._lookup(sandbox_id, fresh=False)
        while True:
            sandbox = route.sandbox
            if sandbox is None:
                raise NotFound(f"sandbox {sandbox_id[:64]!r} was not found")
            if sandbox.state in _ENDED:
                raise BadGateway(f"sandbox {sandbox.id!r} was not found: it has ended")
            if sandbox.state is SandboxState.RUNNING:
                host = route.host
                if host is None or not self._ctx.scheduler.is_live(host):
                    raise BadGateway(
                        f"sandbox {sandbox.id!r} could not be reached: its host is not answering"
                    )
                return sandbox, host
            if sandbox.state in _PAUSED and not sandbox.auto_resume:
                raise Conflict(
                    f"sandbox {sandbox.id!r} is paused: resume it (Sandbox.connect) to reach it"
                )
            if sandbox.state is SandboxState.PAUSED:
                # A Conflict: another request resumes it; the next lookup waits for that.
                with contextlib.suppress(Conflict):
                    await self._ctx.sandboxes.resume_sandbox(sandbox, self._resume_timeout(sandbox))
            elif time.monotonic() > deadline:
                raise Unavailable(
                    f"sandbox {sandbox.id!r} is still {sandbox.state.value}; retry shortly"
                )
            else:
                await asyncio.sleep(_POLL_S)
            route = await self._lookup(sandbox_id, fresh=True)

    def _resume_timeout(self, sandbox: Sandbox) -> int:
        """An auto-resumed sandbox gets the lifetime it was last given."""
        lifetime = max(sandbox.end_at - sandbox.started_at, timedelta(seconds=60))
        return min(int(lifetime.total_seconds()), self._ctx.config.max_timeout_s)

    # --- forwarding ----------------------------------------------------------------------

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, target: Target, host: Host
    ) -> None:
        client = scope.get("client")
        headers = _upstream_headers(scope["headers"], str(client[0]) if client else None)
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        path = _upstream_target(
            target, raw_path.split(b"?", 1)[0] + (b"?" + query if query else b"")
        )
        unreachable = _unreachable_message(target)
        try:
            origin = Origin.parse(host.address)
        except ValueError:
            await _refuse(scope, receive, send, BadGateway(f"{unreachable} (bad host address)"))
            return
        if scope["type"] == "websocket":
            scheme = "wss" if origin.scheme == "https" else "ws"
            url = f"{scheme}://{origin.authority.decode()}{path.decode('latin-1')}"
            await relay.relay_websocket(
                scope, receive, send, url, headers, open_timeout_s=_WS_OPEN_TIMEOUT_S
            )
            return
        try:
            await relay.relay_http(
                scope, receive, send, self._upstream, origin, path, headers, unreachable=unreachable
            )
        except BadGateway as err:
            _log.warning("proxy.unreachable", sandbox_id=target.sandbox_id, host_id=host.id)
            await _refuse(scope, receive, send, err)


def _unreachable_message(target: Target) -> str:
    return f"sandbox {target.sandbox_id!r} could not be reached through its host"


def _upstream_headers(headers: Headers, client: str | None) -> list[tuple[bytes, bytes]]:
    """The request's end-to-end headers for the host agent, less the proxy's own, plus
    where it came from."""
    out = [(k, v) for k, v in headers if k not in _OWN_HEADERS and k not in http1.HOP_BY_HOP]
    if client:
        out.append((b"x-forwarded-for", client.encode("latin-1")))
    original_host = _header(headers, b"host")
    if original_host is not None:
        out.append((b"x-forwarded-host", original_host))
    return out


def _upstream_target(target: Target, request_target: bytes) -> bytes:
    """The forwarding path's request-target for a request-target sent to the proxy."""
    path, sep, query = request_target.partition(b"?")
    return b"/sandboxes/%s/port/%d%s%s%s" % (
        target.sandbox_id.encode(),
        target.port,
        path or b"/",
        sep,
        query,
    )


def _check_traffic_token(headers: Headers, sandbox: Sandbox, port: int) -> None:
    if port == ENVD_PORT or sandbox.traffic_access_token is None:
        return
    given = _header(headers, TRAFFIC_TOKEN_HEADER)
    if given is None:
        raise Unauthenticated(
            f"sandbox {sandbox.id!r} takes no public traffic: send its traffic access token "
            "in the e2b-traffic-access-token header"
        )
    if not hmac.compare_digest(given, sandbox.traffic_access_token.encode()):
        raise PermissionDenied(f"wrong traffic access token for sandbox {sandbox.id!r}")


async def _refuse(scope: Scope, receive: Receive, send: Send, err: WrennError) -> None:
    if scope["type"] == "websocket":
        await receive()  # the handshake's connect event comes first
        await relay.refuse_websocket(scope, send, err)
        return
    await JSONResponse(err.to_body(), status_code=err.http_status)(scope, receive, send)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class ProxyDispatch:
    """On the API port: sandbox traffic (``SandboxProxy.handles``) goes to the proxy, the
    rest to the API."""

    def __init__(self, app: ASGIApp, proxy: SandboxProxy) -> None:
        self.app = app
        self.proxy = proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and self.proxy.handles(scope["headers"]):
            await self.proxy(scope, receive, send)
        else:
            await self.app(scope, receive, send)
