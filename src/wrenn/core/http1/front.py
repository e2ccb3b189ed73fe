"""The fast path in front of an ASGI app, as a uvicorn HTTP protocol:
``uvicorn.Config(FastPathApp(app, route), http=FastPathProtocol)``.

Each request head on a connection is read here and shown to ``route``:

- a ``Forward``: the request is relayed byte for byte (``exchange.forward``), never becoming
  ASGI messages;
- an ``Answer``: sent from here;
- ``None``: the connection is handed to uvicorn's own protocol (httptools) with everything
  read so far, and serves the ASGI app from then on.

WebSocket upgrades, HTTP/1.0 requests and heads that are malformed or too large (uvicorn
answers those as it always has) are always handed over, and so is every connection of an app
without a route and every TLS connection. Between requests a connection is closed
after uvicorn's keep-alive timeout; on shutdown an idle one at once, a busy one after its
response (or when uvicorn's graceful timeout cancels it).

While the fast path serves a connection, uvicorn's transport is paused and a duplicate of its
socket is driven directly (``wire.Wire``); a hand-over gives the transport back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, cast

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from wrenn import log
from wrenn.core.errors import Internal
from wrenn.core.http1.exchange import Answer, Forward, answer, forward
from wrenn.core.http1.head import HeadError, RequestHead, head_end, parse_request
from wrenn.core.http1.wire import Broken, Wire

_log = log.get(__name__)

#: What the fast path does with a request: relay it, answer it, or leave it to the ASGI app
#: (``None``). Given the head and the client's address (``X-Forwarded-For`` applied from
#: trusted proxies, as uvicorn does for ``scope["client"]``).
Route = Callable[[RequestHead, str | None], Awaitable[Forward | Answer | None]]

_HEAD_READ_BYTES = 64 * 1024
#: How long, and how much, a closing connection reads what its client still sends.
_LINGER_S = 2.0
_LINGER_BYTES = 64 * 2**20


class FastPathApp:
    """An ASGI app plus the route of its fast path (see the module docstring)."""

    def __init__(self, app: ASGIApp, route: Route) -> None:
        self.app = app
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


async def _linger(client: Wire) -> None:
    """End our side, then read and drop what the client still sends until it closes (for a
    while, up to a bound): closing with unread bytes would reset the connection and could
    destroy the response before the client read it (a client still uploading a body the
    upstream answered early)."""
    with contextlib.suppress(OSError):
        client.sock.shutdown(socket.SHUT_WR)
    dropped = 0
    with contextlib.suppress(TimeoutError, Broken):
        async with asyncio.timeout(_LINGER_S):
            while dropped < _LINGER_BYTES and await client.fill():
                dropped += len(client.buffer)
                client.buffer.clear()


async def _ignore(scope: Scope, receive: Receive, send: Send) -> None:
    return None


#: uvicorn's own X-Forwarded-For handling, per server configuration.
_trust: weakref.WeakKeyDictionary[Config, ProxyHeadersMiddleware] = weakref.WeakKeyDictionary()


def _raise_fd_limit() -> None:
    """A relayed connection holds three descriptors (the client's socket, its duplicate, the
    upstream's) and a pipe while it splices: lift the soft limit to the hard one, once, so a
    busy proxy does not run out at the default 1024."""
    global _fd_limit_raised
    if _fd_limit_raised:
        return
    _fd_limit_raised = True
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_fd_limit_raised = False


class FastPathProtocol(asyncio.Protocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        self.loop = _loop or asyncio.get_event_loop()
        app = config.app
        self.route: Route | None = app.route if isinstance(app, FastPathApp) else None
        if self.route is not None:
            _raise_fd_limit()
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.early = bytearray()
        self.client: Wire | None = None
        #: Waiting for the next request head with none of it read.
        self.idle = False
        self.closing = False

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not its subclasses
        self.transport = transport
        if self.route is None or transport.get_extra_info("sslcontext") is not None:
            self._hand_over(b"")
            return
        self.server_state.connections.add(self)  # type: ignore[arg-type]
        self.task = self.loop.create_task(self._serve())
        self.server_state.tasks.add(self.task)
        self.task.add_done_callback(self.server_state.tasks.discard)

    def data_received(self, data: bytes) -> None:
        # Only before ``_serve`` has paused the transport (uvloop starts reading right after
        # ``connection_made``, whatever it did).
        if self.client is not None:
            self.client.feed(data)
        else:
            self.early += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()

    # --- uvicorn's server ----------------------------------------------------------------

    def shutdown(self) -> None:
        """Close when idle, now or after the response in progress."""
        self.closing = True
        if self.idle and self.task is not None:
            self.task.cancel()

    # --- serving -------------------------------------------------------------------------

    def _hand_over(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        self.server_state.connections.discard(self)
        inner = HttpToolsProtocol(
            config=self.config,
            server_state=self.server_state,
            app_state=self.app_state,
            _loop=self.loop,
        )
        transport.set_protocol(inner)
        inner.connection_made(transport)
        transport.resume_reading()
        if data:
            inner.data_received(data)

    async def _serve(self) -> None:
        transport = self.transport
        route = self.route
        assert transport is not None and route is not None
        transport.pause_reading()
        raw = transport.get_extra_info("socket")
        client = self.client = Wire(socket.socket(fileno=os.dup(raw.fileno())))
        if client.sock.family in (socket.AF_INET, socket.AF_INET6):
            client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        handed_over = False
        try:
            client.buffer += self.early
            while not self.closing:
                decision: Forward | Answer | None = None
                try:
                    end = await self._next_head(client)
                    if end < 0:
                        return
                    head = parse_request(client.buffer[:end])
                except HeadError:
                    pass  # too large or malformed: uvicorn answers it as it always has
                else:
                    if head.http_11 and not head.upgrade and head.target.startswith(b"/"):
                        decision = await self._route(route, head, peer)
                if decision is None:
                    data = bytes(client.buffer)
                    client.close()
                    handed_over = True
                    self._hand_over(data)
                    return
                del client.buffer[:end]
                self.server_state.total_requests += 1
                if isinstance(decision, Answer):
                    keep = await answer(client, head, decision, body="unread")
                else:
                    keep = await forward(client, head, decision)
                if not keep:
                    break
            if not client.closed:
                await _linger(client)
        except Broken:
            return
        except Exception:
            # Connection boundary: log once; the client sees the connection end.
            _log.exception("http1.connection_failed")
            client.abort()
        finally:
            if not handed_over:
                reset = client.closed
                client.close()
                if reset:
                    transport.abort()
                else:
                    transport.close()

    async def _next_head(self, client: Wire) -> int:
        """Where the next request head ends in ``client.buffer``; -1 when the connection
        ended or stayed idle past the keep-alive timeout."""
        while (end := head_end(client.buffer)) < 0:
            self.idle = not client.buffer
            try:
                async with asyncio.timeout(self.config.timeout_keep_alive if self.idle else None):
                    got = await client.fill(_HEAD_READ_BYTES)
            except TimeoutError:
                return -1
            finally:
                self.idle = False
            if not got:
                return -1
        return end

    async def _route(
        self, route: Route, head: RequestHead, peer: tuple[str, int] | None
    ) -> Forward | Answer | None:
        try:
            return await route(head, await self._client_host(head, peer))
        except Exception:
            # Request boundary: log once, answer 500 without detail.
            _log.exception("http1.route_failed", path=head.path.decode("latin-1")[:200])
            return Answer.error(Internal("internal error"))

    async def _client_host(self, head: RequestHead, peer: tuple[str, int] | None) -> str | None:
        if not isinstance(peer, tuple):
            return None
        if not self.config.proxy_headers:
            return str(peer[0])
        trust = _trust.get(self.config)
        if trust is None:
            trust = _trust[self.config] = ProxyHeadersMiddleware(
                _ignore,  # type: ignore[arg-type]
                trusted_hosts=self.config.forwarded_allow_ips,
            )
        scope: dict[str, Any] = {"type": "http", "client": peer, "headers": head.headers}
        await trust(scope, _nothing, _nothing)  # type: ignore[arg-type]
        client = scope.get("client")
        return str(client[0]) if client else None


async def _nothing(*_: object) -> None:
    return None
