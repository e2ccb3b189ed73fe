"""The forwarding path: ``ANY /sandboxes/{sandbox_id}/port/{port}/{path...}`` relayed to port
``port`` of that sandbox's guest (its sandbox address), which is how the control plane's proxy
reaches envd (49983) and the ports a sandbox serves.

Two ways in, one behaviour:

- the fast path (``Forwarder.route``, served by ``core.http1.FastPathProtocol``): plain HTTP
  requests are relayed byte for byte, bodies moved socket to socket; the agent's
  connections into a guest are kept alive, and each is tracked by the sandbox's VM
  (``GuestConnections``) so that a pause or a stop closes it, idle or not;
- the ASGI app (``Forwarder.__call__``): WebSocket upgrades, relayed message by message and
  tracked the same way, and requests on a connection uvicorn serves already (one that carried
  an RPC first), relayed through the VM's streaming envd client, whose connections a pause
  closes too.

Either way the response comes down as the guest writes it (Connect server streams, /files
downloads), and when the client goes away the guest connection is closed, so a process stream
never outlives its reader. Hop-by-hop headers stay on their hop. A port nothing listens on
answers 502 "port is not open" (E2B's proxy's answer, which the SDK recognises).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

import httpx
from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake

from wrenn import log
from wrenn.agent.edge import error_response
from wrenn.agent.guestconns import GOING_AWAY, GuestConnections
from wrenn.core import http1, sandboxport, wspump
from wrenn.core.errors import InvalidArgument, WrennError

_log = log.get(__name__)

PREFIX = "/sandboxes/"
_PREFIX = PREFIX.encode()
_PATH = re.compile(rb"^/sandboxes/([^/]+)/port/([0-9]{1,5})(/.*)?$")
#: Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus Host (the upstream's
#: is set for its address).
_HOP = http1.HOP_BY_HOP | {b"host"}
#: A WebSocket's own handshake headers, made anew for the upstream connection.
_WS_OWN = frozenset(
    {
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
    }
)
#: Request body chunks read ahead of the upstream.
_BODY_QUEUE = 4
#: Bound on connecting to a guest port (as the agent's envd clients).
_CONNECT_TIMEOUT_S = 5.0
_WS_OPEN_TIMEOUT_S = 10.0
#: How long a closing guest connection gets to answer the close handshake.
_WS_CLOSE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Target:
    """Where a forwarded request goes: the guest's address, an HTTP client for it (the ASGI
    path's), and the set its connections (WebSockets, the fast path's) join while open."""

    address: str
    client: httpx.AsyncClient
    connections: GuestConnections
    #: Guest ports served at another port of ``address`` (a test double's envd); a VM has none.
    port_map: Mapping[int, int] = field(default_factory=dict)

    def endpoint(self, port: int) -> tuple[str, int]:
        """Where guest port ``port`` is dialled."""
        return self.address, self.port_map.get(port, port)


#: Resolves a sandbox id to its target; raises ``NotFound`` / ``FailedPrecondition``.
Resolve = Callable[[str], Target]


def _split(path: bytes, query: bytes) -> tuple[str, int, bytes]:
    """The sandbox, the port and the request-target in the guest."""
    match = _PATH.match(path)
    if match is None:
        raise InvalidArgument("expected /sandboxes/{sandbox_id}/port/{port}/{path}")
    port = int(match.group(2))
    if not 0 < port < 65536:
        raise InvalidArgument(f"invalid port {port}")
    rest = match.group(3) or b"/"
    return match.group(1).decode("latin-1"), port, rest + (b"?" + query if query else b"")


def _parse(scope: Scope) -> tuple[str, int, str]:
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    sandbox_id, port, rest = _split(raw.split(b"?", 1)[0], scope.get("query_string", b""))
    return sandbox_id, port, rest.decode("latin-1")


def _headers(scope: Scope, drop: frozenset[bytes] = _HOP) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in scope["headers"] if k.lower() not in drop]


class _GuestSocket:
    """A fast-path connection into a guest, as ``GuestConnections`` ends it: closed at once
    (a relay waiting on it ends, cutting its response short)."""

    def __init__(self, conn: http1.Upstream) -> None:
        self._conn = conn

    async def close(self, code: int = GOING_AWAY, reason: str = "") -> None:
        self._conn.close()


def _tracked_by(connections: GuestConnections) -> Callable[[http1.Upstream], None]:
    def on_open(conn: http1.Upstream) -> None:
        tracking = contextlib.ExitStack()
        tracking.enter_context(connections.track(_GuestSocket(conn)))
        conn.on_close(tracking.close)

    return on_open


class Forwarder:
    """ASGI application for paths under ``/sandboxes/``, and the fast path's route for them."""

    def __init__(self, resolve: Resolve) -> None:
        self._resolve = resolve
        self._pool = http1.Pool()

    def close(self) -> None:
        """Close the idle connections into guests."""
        self._pool.close()

    async def route(
        self, head: http1.RequestHead, client: str | None
    ) -> http1.Forward | http1.Answer | None:
        """The fast path: a relay for requests under ``/sandboxes/``; ``None`` (the ASGI app)
        for the rest."""
        path, _, query = head.target.partition(b"?")
        if not path.startswith(_PREFIX):
            return None
        try:
            sandbox_id, port, rest = _split(path, query)
            target = self._resolve(sandbox_id)
        except WrennError as err:
            return http1.Answer.error(err)
        host, dial_port = target.endpoint(port)
        authority = f"{host}:{dial_port}" if dial_port != 80 else host
        headers = [(k, v) for k, v in head.headers if k not in _HOP]
        headers.append((b"host", authority.encode()))

        def unreachable(err: Exception) -> http1.Answer:
            return http1.Answer.error(sandboxport.dial_failed(err, sandbox_id, port))

        return http1.Forward(
            address=(host, dial_port),
            target=rest,
            headers=headers,
            pool=self._pool,
            connect_timeout_s=_CONNECT_TIMEOUT_S,
            unreachable=unreachable,
            on_open=_tracked_by(target.connections),
            log_name="forward",
            log_fields={"sandbox_id": sandbox_id, "port": port},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            sandbox_id, port, rest = _parse(scope)
            target = self._resolve(sandbox_id)
        except WrennError as err:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008, "reason": err.message})
            else:
                await error_response(err)(scope, receive, send)
            return
        host, dial_port = target.endpoint(port)
        if scope["type"] == "websocket":
            url = f"ws://{host}:{dial_port}{rest}"
            await _relay_websocket(scope, receive, send, url, target.connections)
        else:
            url = f"http://{host}:{dial_port}{rest}"
            await _Exchange(scope, receive, send, target.client, url, sandbox_id, port).run()


class _Exchange:
    """One forwarded HTTP request and its response."""

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        client: httpx.AsyncClient,
        url: str,
        sandbox_id: str,
        port: int,
    ) -> None:
        self.scope, self.receive, self.send = scope, receive, send
        self.client, self.url = client, url
        self.sandbox_id, self.port = sandbox_id, port
        self.started = False
        self.body: asyncio.Queue[bytes | None] = asyncio.Queue(_BODY_QUEUE)

    def _has_body(self) -> bool:
        names = {k.lower() for k, _ in self.scope["headers"]}
        return b"content-length" in names or b"transfer-encoding" in names

    async def run(self) -> None:
        relay = asyncio.ensure_future(self._relay())
        watch = asyncio.ensure_future(self._watch(relay))
        try:
            await relay
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this request is being cancelled, not just the relay (client gone)
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)

    async def _watch(self, relay: asyncio.Future[None]) -> None:
        """Feed the request body to the queue; cancel the relay when the client leaves."""
        more = self._has_body()
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                relay.cancel()
                return
            if more:
                await self.body.put(message.get("body", b""))
                more = message.get("more_body", False)
                if not more:
                    await self.body.put(None)

    async def _request_body(self) -> AsyncIterator[bytes]:
        while (chunk := await self.body.get()) is not None:
            if chunk:
                yield chunk

    async def _relay(self) -> None:
        request = self.client.build_request(
            self.scope["method"],
            self.url,
            headers=_headers(self.scope),
            content=self._request_body() if self._has_body() else None,
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TimeoutException:
            await self._fail(sandboxport.timed_out(self.sandbox_id, self.port))
            return
        except httpx.ConnectError:
            # Nothing listens there: the answer E2B's proxy gives, which the SDK recognises.
            await self._fail(sandboxport.not_open(self.sandbox_id, self.port))
            return
        except httpx.TransportError as err:
            await self._fail(
                sandboxport.unreachable(self.sandbox_id, self.port, err.__class__.__name__)
            )
            return
        try:
            await self.send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP],
                }
            )
            self.started = True
            async for chunk in response.aiter_raw():
                await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.TransportError as err:
            # The status is out: all that is left is to cut the response short.
            _log.info(
                "forward.upstream_broken",
                sandbox_id=self.sandbox_id,
                port=self.port,
                error=err.__class__.__name__,
            )
        finally:
            await response.aclose()

    async def _fail(self, err: WrennError) -> None:
        await error_response(err)(self.scope, self.receive, self.send)


async def _relay_websocket(
    scope: Scope, receive: Receive, send: Send, url: str, connections: GuestConnections
) -> None:
    first = await receive()
    if first["type"] != "websocket.connect":
        return
    try:
        upstream = await connect(
            url,
            subprotocols=scope.get("subprotocols") or None,
            additional_headers=[
                (k.decode("latin-1"), v.decode("latin-1"))
                for k, v in _headers(scope, _HOP | _WS_OWN)
            ],
            user_agent_header=None,
            compression=None,
            proxy=None,
            open_timeout=_WS_OPEN_TIMEOUT_S,
            max_size=None,
            ping_interval=None,
            close_timeout=_WS_CLOSE_TIMEOUT_S,
        )
    except (OSError, TimeoutError, InvalidHandshake) as err:
        await send({"type": "websocket.close", "code": 1011, "reason": type(err).__name__})
        return
    try:
        with connections.track(upstream):
            await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
            await wspump.pump(receive, send, upstream)
    finally:
        await upstream.close()
