"""Lets a server-stream handler notice that its client went away while it has nothing to
send. The Connect server only checks for a disconnect when the handler yields a message, so
a quiet watch would otherwise live on until its next keepalive.

:func:`watch_disconnects` wraps an ASGI app: for every request it publishes an event in a
context variable, set when the request's ``receive`` reports ``http.disconnect``. Handlers
running in that request (and tasks they start) await :func:`client_gone`.
"""

from __future__ import annotations

import asyncio
import contextvars

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_gone: contextvars.ContextVar[asyncio.Event | None] = contextvars.ContextVar(
    "wrenn_client_gone", default=None
)


def watch_disconnects(app: ASGIApp) -> ASGIApp:
    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        gone = asyncio.Event()
        token = _gone.set(gone)

        async def observed_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            return message

        try:
            await app(scope, observed_receive, send)
        finally:
            _gone.reset(token)

    return wrapped


async def client_gone() -> None:
    """Return once the current request's client has disconnected (never, outside a
    request wrapped by :func:`watch_disconnects`)."""
    gone = _gone.get()
    if gone is None:
        await asyncio.Event().wait()
    else:
        await gone.wait()
