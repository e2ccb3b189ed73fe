"""Fan-out of one process's output to every stream attached to it (Start and Connect).

Policy
------
Each subscriber owns a queue of output chunks, bounded by bytes. The readers of the process's
pipes (or PTY) publish every chunk to all current subscribers; nobody ever reads a queue but
its own subscriber.

* **Pacing by the fastest subscriber.** Before publishing a chunk, a reader waits while *every*
  pacing subscriber already holds ``soft_limit_bytes`` or more. With one client this is plain
  flow control: the process runs as fast as the client reads (the kernel pipe buffer blocks
  its writes meanwhile) and no output is lost, however large. With several clients the fastest
  one sets the pace; the others fall behind.
* **Cut-off at the hard limit.** A subscriber whose queue would exceed ``hard_limit_bytes``
  (it is that far behind the fastest one) is detached: it still receives what it has queued,
  then its stream fails with ``resource_exhausted``. It never sees a stream with a hole in it,
  and it never slows the others down.
* **Stall release.** If no pacing subscriber consumes anything for ``stall_s`` seconds, they
  stop pacing (they are "stalled") and the process runs on; a stalled subscriber keeps
  receiving until it either catches up below the soft limit (and paces again) or reaches the
  hard limit (and is cut off). A client that stops reading therefore holds a process up for at
  most ``stall_s`` and costs at most ``hard_limit_bytes`` of memory.
* **No subscribers, no buffering.** Output published while nobody is attached is dropped: a
  stream attached later (Connect) receives output from the moment it attached.
* The end event is never dropped: every subscriber that was not cut off receives it after all
  its queued output; one attaching after the end receives the end event alone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Literal

from wrenn import log
from wrenn.core.errors import ResourceExhausted

_log = log.get(__name__)

OutputKind = Literal["stdout", "stderr", "pty"]

SOFT_LIMIT_BYTES = 1 << 20
HARD_LIMIT_BYTES = 16 << 20
STALL_S = 10.0
#: Adjacent chunks of one kind are merged into one event up to this size.
MAX_EVENT_BYTES = 256 << 10


@dataclass(frozen=True, slots=True)
class Chunk:
    kind: OutputKind
    data: bytes


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How a process ended, in the terms of E2B's end event."""

    exit_code: int
    exited: bool
    status: str
    error: str | None


class Subscriber:
    """One stream's view of a process's output: queued chunks, then the end or a cut-off."""

    def __init__(self, fanout: Fanout, label: str) -> None:
        self._fanout = fanout
        self._label = label
        self._chunks: deque[Chunk] = deque()
        self.pending_bytes = 0
        self.stalled = False
        self._end: ExitStatus | None = None
        self._cut = False
        self._wake = asyncio.Event()

    def _push(self, chunk: Chunk) -> None:
        self._chunks.append(chunk)
        self.pending_bytes += len(chunk.data)
        self._wake.set()

    def _finish(self, status: ExitStatus) -> None:
        self._end = status
        self._wake.set()

    def _cut_off(self) -> None:
        self._cut = True
        self._wake.set()

    def _take(self) -> Chunk:
        first = self._chunks.popleft()
        if not self._chunks or self._chunks[0].kind != first.kind:
            taken = first
        else:
            parts = [first.data]
            size = len(first.data)
            while self._chunks and self._chunks[0].kind == first.kind:
                nxt = self._chunks[0]
                if size + len(nxt.data) > MAX_EVENT_BYTES:
                    break
                self._chunks.popleft()
                parts.append(nxt.data)
                size += len(nxt.data)
            taken = Chunk(first.kind, b"".join(parts))
        self.pending_bytes -= len(taken.data)
        self._fanout._consumed(self)
        return taken

    async def get(self, timeout_s: float) -> Chunk | ExitStatus | None:
        """The next chunk, else the end status; ``None`` when nothing came within
        ``timeout_s``. Raises ``ResourceExhausted`` once a cut-off subscriber has drained."""
        while True:
            if self._chunks:
                return self._take()
            if self._cut:
                raise ResourceExhausted(
                    f"{self._label}: this stream fell more than "
                    f"{self._fanout.hard_limit_bytes} bytes behind the process output and was "
                    "detached; connect again to follow the output from now on"
                )
            if self._end is not None:
                return self._end
            self._wake.clear()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._wake.wait()
            except TimeoutError:
                return None

    def close(self) -> None:
        """Detach from the process (the stream ended or its client went away)."""
        self._fanout._unsubscribe(self)


class Fanout:
    """Delivers one process's output to its subscribers under the module's policy."""

    def __init__(
        self,
        label: str,
        *,
        soft_limit_bytes: int = SOFT_LIMIT_BYTES,
        hard_limit_bytes: int = HARD_LIMIT_BYTES,
        stall_s: float = STALL_S,
    ) -> None:
        if not 0 < soft_limit_bytes <= hard_limit_bytes:
            raise ValueError("need 0 < soft_limit_bytes <= hard_limit_bytes")
        self.label = label
        self.soft_limit_bytes = soft_limit_bytes
        self.hard_limit_bytes = hard_limit_bytes
        self.stall_s = stall_s
        self._subscribers: list[Subscriber] = []
        self._progress = asyncio.Event()
        self._end: ExitStatus | None = None

    @property
    def end(self) -> ExitStatus | None:
        return self._end

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> Subscriber:
        sub = Subscriber(self, self.label)
        if self._end is not None:
            sub._finish(self._end)
        else:
            self._subscribers.append(sub)
        return sub

    def _unsubscribe(self, sub: Subscriber) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)
            self._progress.set()

    def _consumed(self, sub: Subscriber) -> None:
        if sub.stalled and sub.pending_bytes < self.soft_limit_bytes:
            sub.stalled = False
        self._progress.set()

    def _all_pacers_full(self) -> list[Subscriber] | None:
        pacers = [s for s in self._subscribers if not s.stalled]
        if pacers and all(s.pending_bytes >= self.soft_limit_bytes for s in pacers):
            return pacers
        return None

    async def publish(self, chunk: Chunk) -> None:
        """Queue ``chunk`` for every subscriber, waiting first while all pacing subscribers
        are at the soft limit (see the module policy)."""
        if self._end is not None:
            raise RuntimeError("publish after finish")
        while (pacers := self._all_pacers_full()) is not None:
            self._progress.clear()
            try:
                async with asyncio.timeout(self.stall_s):
                    await self._progress.wait()
            except TimeoutError:
                for sub in pacers:
                    sub.stalled = True
                _log.info("process.output_stalled", process=self.label, subscribers=len(pacers))
        for sub in list(self._subscribers):
            sub._push(chunk)
            if sub.pending_bytes > self.hard_limit_bytes:
                self._subscribers.remove(sub)
                sub._cut_off()
                _log.warning("process.subscriber_cut_off", process=self.label)

    def finish(self, status: ExitStatus) -> None:
        """Deliver the end to every subscriber; later subscribers get it at once."""
        self._end = status
        for sub in self._subscribers:
            sub._finish(status)
        self._subscribers.clear()
        self._progress.set()
