"""Every HTTP connection envd serves, so that a snapshot never leaves zombie connections behind.

uvicorn has no connection-state hook, so ``protocol_class`` subclasses its httptools protocol to
report connection open/close and request begin/finish to a ``ConnTracker`` (and to give every
connection a ``CoalescingTransport``, see ``coalesce``, and its requests a ``FileSender`` and a
``BodyReceiver``, see ``sendfile`` and ``splicebody``).

Snapshot contract:

- ``prepare_snapshot()`` runs while the VM still runs, before it pauses: keep-alive goes off
  (every response from then on carries ``Connection: close`` and ends its connection), idle
  connections are closed so their FINs reach the peers, and every connection still open is
  marked pre-snapshot.
- ``restore(keep=...)`` runs on the first /init after the restore: the peers of pre-snapshot
  connections are gone, so those connections are aborted, except the one carrying the /init;
  connections opened after the snapshot stay; keep-alive comes back on.

Every method runs on the event loop thread; nothing here blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from wrenn import log
from wrenn.envd.coalesce import CoalescingTransport
from wrenn.envd.dupsockets import DupSockets
from wrenn.envd.sendfile import FILE_BODY, FileSender
from wrenn.envd.splicebody import UPLOAD_BODY, BodyReceiver

_log = log.get(__name__)

#: Key under the ASGI scope's ``extensions``: ``{"id": <connection id>}`` of the connection a
#: request arrived on.
SCOPE_EXTENSION = "wrenn.conn"


class _Endpoint(Protocol):
    def apply_keep_alive(self, enabled: bool) -> None: ...


@dataclass(eq=False, slots=True)
class Conn:
    """One client connection. ``generation`` is the tracker's generation when it was opened;
    a connection is pre-snapshot when it was opened before the last ``prepare_snapshot``."""

    id: int
    transport: asyncio.Transport
    peer: tuple[str, int] | None
    created_at: float
    generation: int
    endpoint: _Endpoint
    requests_begun: int = 0
    responses_done: int = 0

    @property
    def idle(self) -> bool:
        """No request in progress: no byte of a next request read, no response pending."""
        return self.requests_begun == self.responses_done

    def close(self) -> None:
        """Graceful close: buffered output is flushed, then FIN."""
        if not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """Immediate close without flushing: for connections whose peer is gone."""
        self.transport.abort()


class ConnTracker:
    def __init__(self) -> None:
        self._conns: dict[int, Conn] = {}
        self._ids = itertools.count(1)
        self.generation = 0
        self.keep_alive = True
        self._snapshot_generation: int | None = None

    @property
    def open_count(self) -> int:
        return len(self._conns)

    def __iter__(self) -> Iterator[Conn]:
        return iter(list(self._conns.values()))

    @property
    def snapshot_pending(self) -> bool:
        """A snapshot was prepared and no /init has restored since."""
        return self._snapshot_generation is not None

    def opened(
        self, transport: asyncio.Transport, endpoint: _Endpoint, peer: tuple[str, int] | None
    ) -> Conn:
        conn = Conn(
            id=next(self._ids),
            transport=transport,
            peer=peer,
            created_at=time.monotonic(),
            generation=self.generation,
            endpoint=endpoint,
        )
        self._conns[conn.id] = conn
        return conn

    def closed(self, conn: Conn) -> None:
        self._conns.pop(conn.id, None)

    def set_keep_alive(self, enabled: bool) -> None:
        """Turn keep-alive on or off, for responses not yet started on open connections too."""
        self.keep_alive = enabled
        for conn in self:
            conn.endpoint.apply_keep_alive(enabled)

    def close_idle(self) -> int:
        idle = [conn for conn in self if conn.idle]
        for conn in idle:
            conn.close()
        return len(idle)

    def prepare_snapshot(self) -> int:
        """Quiesce before a snapshot; returns how many idle connections were closed."""
        self.set_keep_alive(False)
        closed = self.close_idle()
        self.generation += 1
        self._snapshot_generation = self.generation
        _log.info("conntrack.snapshot_prepared", closed=closed, still_open=self.open_count - closed)
        return closed

    def restore(self, keep: int | None = None) -> int:
        """After a restore: abort every pre-snapshot connection except ``keep`` (the id of the
        connection carrying the /init); returns how many were aborted (the caller logs it). A
        no-op unless a snapshot was prepared."""
        cutoff = self._snapshot_generation
        if cutoff is None:
            return 0
        zombies = [conn for conn in self if conn.generation < cutoff and conn.id != keep]
        for conn in zombies:
            conn.abort()
        self._snapshot_generation = None
        self.set_keep_alive(True)
        return len(zombies)


def conn_id(scope: Mapping[str, Any]) -> int | None:
    """The id of the connection an ASGI request arrived on, when served through the tracker."""
    ext = scope.get("extensions") or {}
    info = ext.get(SCOPE_EXTENSION)
    if isinstance(info, dict):
        value = info.get("id")
        if isinstance(value, int):
            return value
    return None


def _client_wants_keep_alive(scope: Mapping[str, Any]) -> bool:
    """What uvicorn decides from the request alone: HTTP/1.1 without ``Connection: close``."""
    if scope.get("http_version") == "1.0":
        return False
    headers: Iterable[tuple[bytes, bytes]] = scope.get("headers", ())
    for name, value in headers:
        if name == b"connection" and b"close" in (t.strip().lower() for t in value.split(b",")):
            return False
    return True


class TrackedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol reporting to ``tracker`` (set on subclasses made by
    ``protocol_class``)."""

    tracker: ClassVar[ConnTracker]
    _conn: Conn | None = None
    _files: FileSender | None = None
    _bodies: BodyReceiver | None = None
    _dups: DupSockets | None = None

    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        coalescing = CoalescingTransport(transport, asyncio.get_running_loop())
        super().connection_made(coalescing)
        self._conn = self.tracker.opened(coalescing, self, self.client)
        self._dups = DupSockets(coalescing)
        self._files = FileSender(coalescing, self._dups)
        self._bodies = BodyReceiver(self, coalescing, self._dups)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self.tracker.closed(self._conn)
        if self._dups is not None:
            self._dups.connection_lost()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._conn is not None:
            self._conn.requests_begun += 1
            self.scope["extensions"] = {SCOPE_EXTENSION: {"id": self._conn.id}}

    def on_headers_complete(self) -> None:
        scope = self.scope
        super().on_headers_complete()
        cycle = self.cycle
        if self._files and self._bodies and cycle is not None and cycle.scope is scope:
            extensions: dict[str, Any] = scope.setdefault("extensions", {})
            extensions[FILE_BODY] = self._files.extension(cycle)
            extensions[UPLOAD_BODY] = self._bodies.extension(cycle)
        if not self.tracker.keep_alive and self.cycle is not None:
            self.cycle.keep_alive = False

    def on_body(self, body: bytes) -> None:
        if self._bodies is not None and self._bodies.owns(self.cycle):
            return  # spliced into a file already; this connection closes after the response
        super().on_body(body)

    def on_response_complete(self) -> None:
        if self._conn is not None:
            self._conn.responses_done += 1
        super().on_response_complete()

    def _open_cycles(self) -> Iterator[RequestResponseCycle]:
        if self.cycle is not None and not self.cycle.response_complete:
            yield self.cycle
        for cycle, _app in self.pipeline:
            yield cycle

    def apply_keep_alive(self, enabled: bool) -> None:
        for cycle in self._open_cycles():
            if not enabled:
                cycle.keep_alive = False
            elif not cycle.response_started:
                cycle.keep_alive = _client_wants_keep_alive(cycle.scope)


def protocol_class(tracker: ConnTracker) -> type[asyncio.Protocol]:
    """The HTTP protocol class for uvicorn's ``http=`` setting, reporting to ``tracker``."""
    return type("TrackedHttpToolsProtocol", (TrackedHttpToolsProtocol,), {"tracker": tracker})
