"""Carrying one WebSocket between an ASGI client and an upstream ``websockets`` connection,
shared by the agent's forwarding path and the control plane's proxy: messages flow both
ways until either side ends; the upstream's close code and reason reach the client.

Imported only by host-side packages (``websockets`` is in the ``host`` extra)."""

from __future__ import annotations

import asyncio

from starlette.types import Receive, Send
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed


async def pump(receive: Receive, send: Send, upstream: ClientConnection) -> None:
    """Relay until the client disconnects or the upstream closes. The caller accepted the
    client's WebSocket and closes ``upstream`` afterwards."""
    down = asyncio.ensure_future(_down(upstream, send))
    try:
        await _up(receive, upstream)
    finally:
        down.cancel()
        await asyncio.gather(down, return_exceptions=True)


async def _up(receive: Receive, upstream: ClientConnection) -> None:
    """Client → upstream until the client disconnects or the upstream closes."""
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("bytes")
        if data is None:
            data = message.get("text")
        if data is None:
            continue
        try:
            await upstream.send(data)
        except ConnectionClosed:
            return


async def _down(upstream: ClientConnection, send: Send) -> None:
    """Upstream → client; the upstream's close is passed on with its code."""
    try:
        async for data in upstream:
            if isinstance(data, bytes):
                await send({"type": "websocket.send", "bytes": data})
            else:
                await send({"type": "websocket.send", "text": data})
    except ConnectionClosed:
        pass
    code = upstream.close_code or 1000
    await send({"type": "websocket.close", "code": code, "reason": upstream.close_reason or ""})
