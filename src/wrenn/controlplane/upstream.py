"""A small HTTP/1.1 client for the proxy's ASGI path (its fast path relays on its own, see
``wrenn.core.http1``): send a request to a host agent and hand its response back as it
arrives. Responses are parsed by ``httptools`` (llhttp) and read in large
pieces; connections are kept alive per origin and reused.

Why not httpx: relaying a 100 MB download through httpx's ``aiter_raw`` ran at about two
thirds of this client's throughput on the same machine (bench/controlplane.py measures the
proxy against talking to envd directly).

Invariants:
- a connection goes back to the pool only after its response was read to the end and both
  sides allow keep-alive; idle connections older than ``idle_s`` are closed, not reused
  (uvicorn, which the agent runs on, drops them after 5 s);
- a request is retried once, on a fresh connection, only when a reused connection failed
  before any byte of the response arrived and its body can be sent again (none, or small
  enough to have been read whole first).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools

Headers = list[tuple[bytes, bytes]]

#: Bodies up to this size are read whole before sending, so a stale connection can be retried.
REPLAYABLE_BYTES = 64 * 1024
_READ_BYTES = 256 * 1024


class UpstreamError(Exception):
    """The request could not be sent or no complete response head came back."""


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port)

    @property
    def authority(self) -> bytes:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return (host if self.port == default else f"{host}:{self.port}").encode()


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = 0.0
    reused: bool = False

    def usable(self, now: float, idle_s: float) -> bool:
        return (
            now - self.idle_since < idle_s
            and not self.reader.at_eof()
            and not self.writer.transport.is_closing()
        )

    def close(self) -> None:
        self.writer.close()


@dataclass
class _Parsed:
    """httptools callbacks: what has been parsed of one response so far. Interim answers
    (100 Continue, 103 Early Hints) are skipped: the final one follows on the same stream."""

    headers: Headers = field(default_factory=list)
    head_done: bool = False
    body: list[bytes] = field(default_factory=list)
    done: bool = False
    interim: bool = False
    #: Both sides allow the connection to carry another request, read with the head: once a
    #: message is complete, the parser reports False whatever it was.
    keep_alive: bool = False
    parser: httptools.HttpResponseParser | None = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.interim = True
            self.headers = []
            return
        self.head_done = True
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.done = True


class UpstreamResponse:
    """A response whose head has arrived; iterate ``body()`` to the end (or ``close()``)."""

    def __init__(
        self,
        pool: UpstreamPool,
        origin: Origin,
        conn: _Connection,
        parser: httptools.HttpResponseParser,
        parsed: _Parsed,
        *,
        head_only: bool,
    ) -> None:
        self.status: int = parser.get_status_code()
        self.headers = parsed.headers
        self._pool, self._origin, self._conn = pool, origin, conn
        self._parser: httptools.HttpResponseParser | None = parser
        self._parsed = parsed
        self._complete = head_only or parsed.done
        self._released = False

    async def body(self) -> AsyncIterator[bytes]:
        """The body as it arrives, in pieces of whatever size came in one read."""
        parsed = self._parsed
        try:
            while True:
                if parsed.body:
                    piece = parsed.body[0] if len(parsed.body) == 1 else b"".join(parsed.body)
                    parsed.body.clear()
                    yield piece
                if self._complete or parsed.done:
                    self._complete = True
                    return
                data = await self._conn.reader.read(_READ_BYTES)
                if not data:
                    if not _framed(parsed.headers):
                        self._complete = True  # ends with the connection: that was all
                        self._parser = None  # nothing to reuse
                        return
                    raise UpstreamError("the upstream closed the connection mid-response")
                assert self._parser is not None
                try:
                    self._parser.feed_data(data)
                except httptools.HttpParserError as err:
                    raise UpstreamError(f"malformed response body: {err}") from err
        finally:
            self.close()

    def close(self) -> None:
        if self._released:
            return
        self._released = True
        reusable = (
            self._complete
            and self._parser is not None
            and self._parsed.keep_alive
            and not self._parsed.body
        )
        if reusable:
            self._pool._put(self._origin, self._conn)
        else:
            self._conn.close()


def _framed(headers: Headers) -> bool:
    return any(k in (b"content-length", b"transfer-encoding") for k, _ in headers)


class UpstreamPool:
    def __init__(
        self, *, connect_timeout_s: float, idle_s: float = 4.0, max_idle_per_origin: int = 64
    ) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._idle_s = idle_s
        self._max_idle = max_idle_per_origin
        self._idle: dict[Origin, list[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None

    async def _connect(self, origin: Origin) -> _Connection:
        tls = None
        if origin.scheme == "https":
            self._tls = self._tls or ssl.create_default_context()
            tls = self._tls
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                reader, writer = await asyncio.open_connection(
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls else None,
                    limit=_READ_BYTES,
                )
        except TimeoutError as err:
            raise UpstreamError(f"connect timed out after {self._connect_timeout_s} s") from err
        except OSError as err:
            raise UpstreamError(f"connect failed: {err.strerror or type(err).__name__}") from err
        return _Connection(reader, writer)

    def _take(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.usable(now, self._idle_s):
                conn.reused = True
                return conn
            conn.close()
        return None

    def _put(self, origin: Origin, conn: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if len(idle) >= self._max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    async def request(
        self,
        origin: Origin,
        method: str,
        target: bytes,
        headers: Headers,
        body: AsyncIterator[bytes] | None,
        *,
        body_length: int | None = None,
    ) -> UpstreamResponse:
        """Send the request and read the response head. ``body_length`` is the body's
        Content-Length when the client gave one (else a body is sent chunked)."""
        whole: bytes | None = None
        if body is None:
            whole = b""
        elif body_length is not None and body_length <= REPLAYABLE_BYTES:
            whole = b"".join([chunk async for chunk in body])
        conn = self._take(origin) if whole is not None else None
        if conn is not None:
            try:
                return await self._exchange(
                    conn, origin, method, target, headers, whole, body, body_length
                )
            except UpstreamError:
                pass  # a stale keep-alive connection: once more on a fresh one
        conn = await self._connect(origin)
        return await self._exchange(conn, origin, method, target, headers, whole, body, body_length)

    async def _exchange(
        self,
        conn: _Connection,
        origin: Origin,
        method: str,
        target: bytes,
        headers: Headers,
        whole: bytes | None,
        body: AsyncIterator[bytes] | None,
        body_length: int | None,
    ) -> UpstreamResponse:
        out = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (method.encode(), target, origin.authority)]
        for name, value in headers:
            if name not in (b"content-length", b"transfer-encoding", b"host"):
                out.append(b"%s: %s\r\n" % (name, value))
        chunked = whole is None and body_length is None
        if chunked:
            out.append(b"transfer-encoding: chunked\r\n")
        elif whole is None:
            out.append(b"content-length: %d\r\n" % (body_length or 0))
        elif whole or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            out.append(b"content-length: %d\r\n" % len(whole))
        out.append(b"\r\n")
        try:
            conn.writer.write(b"".join(out))
            if whole:
                conn.writer.write(whole)
            elif whole is None and body is not None:
                async for chunk in body:
                    if chunk:
                        conn.writer.write(
                            b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk
                        )
                        await conn.writer.drain()
                if chunked:
                    conn.writer.write(b"0\r\n\r\n")
            await conn.writer.drain()
            return await self._head(conn, origin, method)
        except (OSError, EOFError) as err:
            conn.close()
            why = getattr(err, "strerror", None) or type(err).__name__
            raise UpstreamError(f"connection lost: {why}") from err
        except BaseException:
            conn.close()
            raise

    async def _head(self, conn: _Connection, origin: Origin, method: str) -> UpstreamResponse:
        parsed = _Parsed()
        parser = httptools.HttpResponseParser(parsed)
        parsed.parser = parser
        while not parsed.head_done:
            data = await conn.reader.read(_READ_BYTES)
            if not data:
                conn.close()
                raise UpstreamError("the upstream closed the connection without answering")
            try:
                parser.feed_data(data)
            except httptools.HttpParserError as err:
                conn.close()
                raise UpstreamError(f"malformed response: {err}") from err
        return UpstreamResponse(self, origin, conn, parser, parsed, head_only=method == "HEAD")

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                with contextlib.suppress(Exception):
                    conn.close()
