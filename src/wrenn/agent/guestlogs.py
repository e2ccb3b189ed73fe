"""The guest's own logs: envd's structured lines, read from each VM's serial console.

envd runs on the guest's console (wrenn-init → tini → envd) and writes one JSON object per line
there; the VMM appends the console to a file in the VM's run directory (QEMU ``console.log``,
Firecracker ``serial.log``). ``GuestLogs`` follows that file for every sandbox from the moment
its VM runs and keeps a bounded tail of the parsed entries, which ``GetSandboxLogs`` answers.

Invariants:
- a console file is held open from ``attach`` on, so stopping the VM (a pause removes its run
  directory) loses nothing: the next read drains the removed file, then closes it; a resume
  attaches the new VM's console and the entries kept so far stay;
- memory per sandbox is bounded: at most ``max_entries`` entries and ``max_kept_bytes`` of
  line text; a line longer than ``MAX_LINE_BYTES`` is dropped; a read takes at most
  ``MAX_READ_BYTES`` of new console output (older output is skipped);
- only lines that are JSON objects with an ``event`` (envd's structlog lines) become entries:
  kernel messages and wrenn-init's notes on the same console do not;
- an agent restart starts empty (nothing is persisted).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from wrenn import log
from wrenn.agent.vmm.base import Vmm
from wrenn.agent.vmm.firecracker import FirecrackerVmm
from wrenn.agent.vmm.qemu import QemuVmm

_log = log.get(__name__)

#: Entries kept per sandbox (the oldest go first).
MAX_ENTRIES = 2000
#: Line text kept per sandbox.
MAX_KEPT_BYTES = 1 << 20
#: A longer console line is not envd's and is skipped.
MAX_LINE_BYTES = 16 << 10
#: New console output taken by one read; more means older output is skipped.
MAX_READ_BYTES = 4 << 20
#: Longest field value handed out (longer ones are cut).
MAX_FIELD_CHARS = 2048

_LEVELS = {
    "debug": "debug",
    "info": "info",
    "warn": "warn",
    "warning": "warn",
    "error": "error",
    "exception": "error",
    "critical": "error",
    "fatal": "error",
}
_RESERVED = frozenset({"event", "level", "timestamp"})


@dataclass(frozen=True)
class LogEntry:
    timestamp_ms: int
    #: debug, info, warn or error.
    level: str
    message: str
    fields: dict[str, str]
    #: The line as the guest wrote it.
    line: str


def console_path(vmm: Vmm) -> Path | None:
    """The file the VMM appends the guest's serial console to."""
    if isinstance(vmm, QemuVmm):
        return vmm.console_log
    if isinstance(vmm, FirecrackerVmm):
        return vmm.serial_log_path
    return None


def _timestamp_ms(value: object, fallback_ms: int) -> int:
    if not isinstance(value, str):
        return fallback_ms
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return fallback_ms
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


def _field(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:MAX_FIELD_CHARS]


def parse_line(raw: bytes, now_ms: int) -> LogEntry | None:
    """An envd structlog JSON line as an entry; ``None`` for anything else. ``now_ms`` stands
    in for a missing or unreadable timestamp."""
    text = raw.strip().decode("utf-8", errors="replace")
    if not text.startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("event"), str):
        return None
    level = obj.get("level")
    return LogEntry(
        timestamp_ms=_timestamp_ms(obj.get("timestamp"), now_ms),
        level=_LEVELS.get(level.lower(), "info") if isinstance(level, str) else "info",
        message=obj["event"],
        fields={str(k): _field(v) for k, v in obj.items() if k not in _RESERVED},
        line=text,
    )


class ConsoleTail:
    """One sandbox's entries, and the console file being followed. The blocking methods
    (``follow``, ``drain``, ``close``) run on a thread, one at a time (``lock``)."""

    def __init__(self, max_entries: int, max_kept_bytes: int) -> None:
        self.lock = asyncio.Lock()
        self._entries: deque[LogEntry] = deque()
        self._kept_bytes = 0
        self._max_entries = max_entries
        self._max_kept_bytes = max_kept_bytes
        self._file: io.FileIO | None = None
        self._partial = b""
        #: Inside an overlong line: drop bytes up to the next newline.
        self._skipping = False

    def follow(self, path: Path) -> None:
        """Take what is left of the console followed so far, then follow ``path`` from its
        start."""
        self.drain()
        self.close()
        self._file = path.open("rb", buffering=0)

    def drain(self) -> None:
        """Parse what the console got since the last drain; close a console whose file is
        gone (its VM stopped) once it is read to its end."""
        file = self._file
        if file is None:
            return
        stat = os.fstat(file.fileno())
        position = file.tell()
        if stat.st_size < position:
            # Truncated under us: start over.
            file.seek(0)
            position, self._partial, self._skipping = 0, b"", False
        if stat.st_size - position > MAX_READ_BYTES:
            file.seek(stat.st_size - MAX_READ_BYTES)
            self._partial, self._skipping = b"", True
        data = file.read(max(0, stat.st_size - file.tell())) or b""
        self._take(data)
        if stat.st_nlink == 0:
            # The VM is gone and so is the file; what it wrote last may lack a newline.
            self._take(b"\n")
            self.close()

    def _take(self, data: bytes) -> None:
        if not data:
            return
        if self._skipping:
            newline = data.find(b"\n")
            if newline < 0:
                return
            data, self._skipping = data[newline + 1 :], False
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE_BYTES:
            self._partial, self._skipping = b"", True
        now_ms = int(time.time() * 1000)
        for raw in lines:
            if len(raw) > MAX_LINE_BYTES:
                continue
            entry = parse_line(raw, now_ms)
            if entry is not None:
                self._keep(entry)

    def _keep(self, entry: LogEntry) -> None:
        self._entries.append(entry)
        self._kept_bytes += len(entry.line)
        while self._entries and (
            len(self._entries) > self._max_entries or self._kept_bytes > self._max_kept_bytes
        ):
            self._kept_bytes -= len(self._entries.popleft().line)

    def entries(self, start_ms: int = 0, limit: int = 0) -> list[LogEntry]:
        """Kept entries logged at or after ``start_ms``, oldest first; at most ``limit``
        (0: all)."""
        out = [e for e in self._entries if e.timestamp_ms >= start_ms]
        return out[:limit] if limit > 0 else out

    def close(self) -> None:
        file, self._file = self._file, None
        self._partial, self._skipping = b"", False
        if file is not None:
            file.close()


class GuestLogs:
    """The console tails of every sandbox on this host."""

    def __init__(
        self, max_entries: int = MAX_ENTRIES, max_kept_bytes: int = MAX_KEPT_BYTES
    ) -> None:
        self._max_entries = max_entries
        self._max_kept_bytes = max_kept_bytes
        self._tails: dict[str, ConsoleTail] = {}

    async def attach(
        self, sandbox_id: str, console: Path | None, stack: contextlib.AsyncExitStack
    ) -> None:
        """Follow the console of the sandbox's VM, which runs now. The first attach of a
        sandbox pushes ``forget`` onto its ``stack`` (which closes when it is destroyed)."""
        tail = self._tails.get(sandbox_id)
        if tail is None:
            tail = ConsoleTail(self._max_entries, self._max_kept_bytes)
            self._tails[sandbox_id] = tail
            stack.push_async_callback(self.forget, sandbox_id)
        if console is None:
            return
        async with tail.lock:
            try:
                await asyncio.to_thread(tail.follow, console)
            except OSError as err:
                # The sandbox runs on without its logs rather than fail for them.
                _log.warning("guest_logs.unreadable", sandbox_id=sandbox_id, error=str(err))

    async def read(self, sandbox_id: str, start_ms: int = 0, limit: int = 0) -> list[LogEntry]:
        """What the sandbox logged and is still kept (empty for one never attached)."""
        tail = self._tails.get(sandbox_id)
        if tail is None:
            return []
        async with tail.lock:
            try:
                await asyncio.to_thread(tail.drain)
            except OSError as err:
                _log.warning("guest_logs.unreadable", sandbox_id=sandbox_id, error=str(err))
                tail.close()
            return tail.entries(start_ms, limit)

    async def forget(self, sandbox_id: str) -> None:
        tail = self._tails.pop(sandbox_id, None)
        if tail is not None:
            async with tail.lock:
                tail.close()

    def close(self) -> None:
        """Close every console file (the agent is stopping)."""
        tails, self._tails = list(self._tails.values()), {}
        for tail in tails:
            tail.close()
