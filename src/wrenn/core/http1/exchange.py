"""One request from a client wire: relayed to an upstream and its response back (``forward``),
or answered here (``answer``).

A relayed request's body goes up while the client sends it and the response comes down as
the upstream writes it, both at once (an upstream may answer before it has read the whole
body). Once the client has sent its body, its connection is watched: when it goes away the
upstream connection is closed, so a process stream never outlives its reader. A failure
before the response head reaches the client is answered (``Forward.unreachable``); after it,
the response is cut short.

A request is sent again, once, on a fresh connection only when a reused keep-alive
connection failed before any byte of the response came back and the request had no body
or one read whole already.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Literal, TypeVar

from wrenn import log
from wrenn.core.errors import WrennError
from wrenn.core.http1.body import relay as relay_body
from wrenn.core.http1.head import (
    HOP_BY_HOP,
    Framing,
    HeadError,
    Headers,
    RequestHead,
    ResponseHead,
    framing_headers,
    head_end,
    parse_response,
    render_request,
    render_response,
)
from wrenn.core.http1.pool import Address, ConnectError, Pool, Upstream
from wrenn.core.http1.wire import Broken, Wire

_log = log.get(__name__)
T = TypeVar("T")

#: Request headers a relay sets itself (framing) or answers itself (Expect).
_NOT_FORWARDED = HOP_BY_HOP | {b"content-length", b"expect"}
#: Request bodies up to this size are drained after an answer so the connection stays open.
_DRAIN_BYTES = 1 << 20
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


@dataclass(frozen=True)
class Answer:
    """A response made here instead of relayed (errors: ``{code, message}``)."""

    status: int
    body: bytes
    content_type: bytes = b"application/json"

    @classmethod
    def error(cls, err: WrennError) -> Answer:
        # As starlette's JSONResponse renders it, so both paths answer byte for byte alike.
        text = json.dumps(err.to_body(), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return cls(err.http_status, text.encode())


class UpstreamFailed(Exception):
    """The upstream took the connection but no (well-formed) response head came back."""


@dataclass
class Forward:
    """Where and how to relay one request."""

    address: Address
    #: The request-target the upstream gets (path and query).
    target: bytes
    #: The end-to-end headers to send, Host included; framing is added by the relay.
    headers: Headers
    pool: Pool
    connect_timeout_s: float
    #: The answer when no response came back (``ConnectError`` or ``UpstreamFailed``).
    unreachable: Callable[[Exception], Answer]
    #: Runs for every upstream connection this request opens.
    on_open: Callable[[Upstream], None] | None = None
    #: The relay's log lines are ``{log_name}.upstream_broken`` with these fields.
    log_name: str = "relay"
    log_fields: Mapping[str, object] = field(default_factory=dict)


async def answer(
    client: Wire, head: RequestHead, reply: Answer, *, body: Literal["read", "unread", "part"]
) -> bool:
    """Send ``reply``; whether the connection can take another request. An unread request
    body is read and dropped first when it is small; otherwise (or when only part of it was
    read) the connection closes after the answer."""
    keep = head.keep_alive and body != "part"
    if keep and body == "unread" and head.framing is not Framing.NONE:
        keep = False
        if head.framing is Framing.LENGTH and head.length <= _DRAIN_BYTES:
            try:
                await relay_body(client, None, head.framing, head.length)
                keep = True
            except Broken:
                return False
    headers: Headers = [
        (b"content-type", reply.content_type),
        (b"content-length", b"%d" % len(reply.body)),
    ]
    if not keep:
        headers.append((b"connection", b"close"))
    try:
        out = render_response(reply.status, _reason(reply.status), headers)
        await client.send(out + reply.body)
    except Broken:
        return False
    return keep


async def forward(client: Wire, head: RequestHead, fwd: Forward) -> bool:
    """Relay the request whose head was read (its body is next on ``client``); whether the
    client connection can take another request."""
    return await _Exchange(client, head, fwd).run()


class _ClientGone(Exception):
    pass


class _Retry(Exception):
    pass


class _Exchange:
    """One relayed request, awaited step by step in the task that serves the connection.
    What may happen meanwhile (the client leaving, the request body's relay failing on the
    client's side) interrupts the step in progress: ``_guard`` turns that cancellation into
    the interruption's exception. No task is spawned except for a request body that streams
    while the response is awaited."""

    def __init__(self, client: Wire, head: RequestHead, fwd: Forward) -> None:
        self.client, self.head, self.fwd = client, head, fwd
        headers = [(k, v) for k, v in fwd.headers if k not in _NOT_FORWARDED]
        self.request = render_request(
            head.method, fwd.target, headers, framing_headers(head.framing, head.length)
        )
        #: No body, or all of it read already: the request is sent whole and can be again.
        self.replayable = head.framing is Framing.NONE or (
            head.framing is Framing.LENGTH and head.length <= len(client.buffer)
        )
        if self.replayable and head.framing is Framing.LENGTH:
            self.request += client.buffer[: head.length]
            del client.buffer[: head.length]
        #: The whole body has been read from the client.
        self.body_done = self.replayable
        self.body_started = self.replayable
        self.body_task: asyncio.Task[None] | None = None
        self.task: asyncio.Task[Any] | None = None
        #: Why the step in progress is (to be) interrupted.
        self.interruption: BaseException | None = None
        self.guarded = False
        self.watching = False

    async def run(self) -> bool:
        self.task = asyncio.current_task()
        try:
            return await self._run()
        finally:
            self._unwatch()
            await self._stop_body()

    # --- interruptions -------------------------------------------------------------------

    def _interrupt(self, why: BaseException) -> None:
        if self.interruption is not None:
            return
        self.interruption = why
        if self.guarded and self.task is not None:
            self.task.cancel()

    async def _guard(self, step: Awaitable[T]) -> T:
        """Await ``step``, unless or until an interruption comes: then raise it."""
        if self.interruption is not None:
            if isinstance(step, Coroutine):
                step.close()
            raise self.interruption
        self.guarded = True
        try:
            return await step
        except asyncio.CancelledError:
            why = self.interruption
            if why is None:
                raise
            assert self.task is not None
            self.task.uncancel()
            raise why from None
        finally:
            self.guarded = False

    def _watch(self) -> None:
        """Once the client has sent all it had to, a read becoming possible means it left
        (or pipelines its next request: then stop watching)."""
        if not self.watching and self.interruption is None:
            self.watching = True
            self.client.watch(self._client_readable)

    def _unwatch(self) -> None:
        if self.watching:
            self.watching = False
            self.client.watch(None)

    def _client_readable(self) -> None:
        try:
            gone = self.client.sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return
        except OSError:
            gone = True
        self._unwatch()
        if gone:
            self._interrupt(_ClientGone())

    def _body_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        err = task.exception()
        if err is None:
            self._watch()
        elif isinstance(err, Broken) and err.wire is self.client:
            self._interrupt(_ClientGone())
        elif not isinstance(err, Broken):
            self._interrupt(err)
        # Else the upstream stopped taking the body: its answer, or its failure, comes
        # through the step in progress.

    async def _stop_body(self) -> None:
        task, self.body_task = self.body_task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # --- the exchange ---------------------------------------------------------------------

    async def _run(self) -> bool:
        fwd = self.fwd
        conn = fwd.pool.take(fwd.address)
        while True:
            if conn is None:
                try:
                    conn = await fwd.pool.connect(
                        fwd.address, timeout_s=fwd.connect_timeout_s, on_open=fwd.on_open
                    )
                except ConnectError as err:
                    return await self._refuse(fwd.unreachable(err))
            try:
                response = await self._send(conn)
            except _Retry:
                conn = None
                continue
            except _ClientGone:
                conn.abort()
                return False
            except UpstreamFailed as err:
                conn.abort()
                self._unwatch()
                await self._stop_body()
                return await self._refuse(fwd.unreachable(err))
            return await self._respond(conn, response)

    async def _refuse(self, reply: Answer) -> bool:
        state: Literal["read", "unread", "part"] = (
            "read" if self.body_done else "part" if self.body_started else "unread"
        )
        return await answer(self.client, self.head, reply, body=state)

    async def _send(self, conn: Upstream) -> ResponseHead:
        """Send the request; the response head once it came back."""
        try:
            await self._guard(conn.send(self.request))
            if self.replayable:
                self._watch()
            else:
                if self.head.expects_continue:
                    await self._guard(self.client.send(CONTINUE))
                self.body_started = True
                self.body_task = asyncio.ensure_future(self._body(conn))
                self.body_task.add_done_callback(self._body_ended)
            return await self._guard(_read_head(conn, self.head.method))
        except Broken as err:
            if err.wire is self.client:
                raise _ClientGone from err
            conn.abort()
            if self.replayable and conn.reused and not conn.buffer:
                self._unwatch()
                raise _Retry from err  # a keep-alive connection the upstream had closed
            raise UpstreamFailed(f"connection lost: {err}") from err
        except HeadError as err:
            raise UpstreamFailed(str(err)) from err

    async def _body(self, conn: Upstream) -> None:
        await relay_body(self.client, conn, self.head.framing, self.head.length)
        self.body_done = True

    async def _respond(self, conn: Upstream, response: ResponseHead) -> bool:
        client_keep = self.head.keep_alive and response.framing is not Framing.UNTIL_CLOSE
        headers = [(k, v) for k, v in response.headers if k not in HOP_BY_HOP]
        extra = b"transfer-encoding: chunked\r\n" if response.framing is Framing.CHUNKED else b""
        if not client_keep:
            extra += b"connection: close\r\n"
        try:
            out = render_response(response.status, response.reason, headers, extra)
            await self._guard(self.client.send(out))
            await self._guard(
                relay_body(conn, self.client, response.framing, response.length, last=True)
            )
        except (Broken, _ClientGone) as err:
            conn.abort()
            if isinstance(err, Broken) and err.wire is conn:
                _log.info(
                    f"{self.fwd.log_name}.upstream_broken", error=str(err), **self.fwd.log_fields
                )
            self.client.abort()
            return False
        reusable = (
            response.keep_alive
            and response.framing is not Framing.UNTIL_CLOSE
            and self.body_done
            and not conn.buffer
        )
        if reusable:
            self.fwd.pool.put(conn)
        else:
            conn.close()
        return client_keep and self.body_done


async def _read_head(conn: Upstream, method: bytes) -> ResponseHead:
    """The next final response head on ``conn`` (interim ones are dropped)."""
    while True:
        end = head_end(conn.buffer)
        if end < 0:
            if not await conn.fill():
                raise Broken(conn, "the upstream closed the connection without answering")
            continue
        response = parse_response(conn.buffer[:end], request_method=method)
        del conn.buffer[:end]
        if response.status == 101:
            raise HeadError("unexpected 101 Switching Protocols")
        if not response.interim:
            return response
