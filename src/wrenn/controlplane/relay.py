"""Relaying one client request to an upstream URL and its answer back, as it flows: the
proxy's ASGI path (WebSockets, and requests its fast path leaves to it, see ``proxy``).

HTTP (through ``upstream.UpstreamPool``): the request body goes up while the client sends it,
the response comes down piece by piece as the upstream writes it (bytes as they arrive,
encodings untouched).
Nothing is buffered beyond one chunk. Once the request body is in, the client's connection is
watched: when it goes away the upstream request is cancelled, so a process stream never
outlives its reader. WebSockets: both directions message by message.

Hop-by-hop headers stay on their hop (RFC 9110 §7.6.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterable

from starlette.types import Message, Receive, Scope, Send
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake, InvalidStatus

from wrenn import log
from wrenn.controlplane.errors import BadGateway
from wrenn.controlplane.upstream import Origin, UpstreamError, UpstreamPool
from wrenn.core import wspump
from wrenn.core.errors import WrennError
from wrenn.core.http1 import HOP_BY_HOP

_log = log.get(__name__)

#: A WebSocket's own handshake headers: made anew on the upstream connection.
WS_HANDSHAKE = frozenset(
    {
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
    }
)

Headers = list[tuple[bytes, bytes]]


class _ClientGone(Exception):
    """The client disconnected while its request body was being read."""


def _body_length(scope: Scope) -> tuple[bool, int | None]:
    """Whether the request has a body, and its Content-Length when given."""
    has_body, length = False, None
    for key, value in scope["headers"]:
        if key == b"content-length":
            has_body = True
            with contextlib.suppress(ValueError):
                length = int(value)
        elif key == b"transfer-encoding":
            has_body = True
    return has_body, length


async def relay_http(
    scope: Scope,
    receive: Receive,
    send: Send,
    pool: UpstreamPool,
    origin: Origin,
    target: bytes,
    headers: Headers,
    *,
    unreachable: str,
) -> None:
    """Forward the request to ``target`` at ``origin``; ``BadGateway(unreachable)`` when it
    cannot be sent or no answer comes back."""
    body_done = asyncio.Event()
    has_body, length = _body_length(scope)
    if not has_body:
        body_done.set()

    async def request_body() -> AsyncIterator[bytes]:
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _ClientGone
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    return
        finally:
            body_done.set()

    async def exchange() -> None:
        try:
            response = await pool.request(
                origin,
                scope["method"],
                target,
                headers,
                request_body() if has_body else None,
                body_length=length,
            )
        except _ClientGone:
            return
        except UpstreamError as err:
            raise BadGateway(f"{unreachable} ({err})") from err
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": [(k, v) for k, v in response.headers if k not in HOP_BY_HOP],
                }
            )
            try:
                async for chunk in response.body():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except UpstreamError as err:
                # The status is out; all that is left is to cut the response short.
                _log.info("proxy.upstream_broken", error=str(err))
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            response.close()

    async def watch(relay: asyncio.Future[None]) -> None:
        await body_done.wait()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                relay.cancel()
                return

    relay = asyncio.ensure_future(exchange())
    watcher = asyncio.ensure_future(watch(relay))
    try:
        await relay
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # this request is being cancelled, not only the relay (client gone)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


async def relay_websocket(
    scope: Scope, receive: Receive, send: Send, url: str, headers: Headers, *, open_timeout_s: float
) -> None:
    """Accept the client's WebSocket once the upstream one is open, then relay both ways."""
    first = await receive()
    if first["type"] != "websocket.connect":
        return
    try:
        upstream = await connect(
            url,
            subprotocols=scope.get("subprotocols") or None,
            additional_headers=[
                (k.decode("latin-1"), v.decode("latin-1"))
                for k, v in headers
                if k.lower() not in WS_HANDSHAKE
            ],
            user_agent_header=None,
            compression=None,
            proxy=None,
            open_timeout=open_timeout_s,
            max_size=None,
            ping_interval=None,
        )
    except InvalidStatus as err:
        response = err.response
        await deny_websocket(
            scope,
            send,
            response.status_code,
            bytes(response.body or b""),
            response.headers.raw_items(),
        )
        return
    except (OSError, TimeoutError, InvalidHandshake) as err:
        await refuse_websocket(scope, send, BadGateway(f"websocket upstream: {type(err).__name__}"))
        return
    try:
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
        await wspump.pump(receive, send, upstream)
    finally:
        await upstream.close()


async def deny_websocket(
    scope: Scope,
    send: Send,
    status: int,
    body: bytes,
    headers: Iterable[tuple[str, str]] = (),
) -> None:
    """Answer a WebSocket handshake with a plain HTTP response when the server can (the ASGI
    denial-response extension), else close it."""
    if "websocket.http.response" in scope.get("extensions", {}):
        out: Headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1"))
            for k, v in headers
            if k.lower().encode("latin-1") not in HOP_BY_HOP | {b"content-length"}
        ]
        out.append((b"content-length", str(len(body)).encode()))
        start: Message = {"type": "websocket.http.response.start", "status": status}
        start["headers"] = out
        await send(start)
        await send({"type": "websocket.http.response.body", "body": body})
        return
    await send({"type": "websocket.close", "code": 1008 if status < 500 else 1011})


async def refuse_websocket(scope: Scope, send: Send, err: WrennError) -> None:
    body = json.dumps(err.to_body()).encode()
    await deny_websocket(scope, send, err.http_status, body, [("content-type", "application/json")])
