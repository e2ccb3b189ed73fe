"""A QMP client on QEMU's unix socket: commands and replies as JSON lines, asynchronous events
set aside while a command waits for its reply, file descriptors passed with SCM_RIGHTS.

One command at a time (a lock orders them); QMP replies come in command order.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wrenn.core.errors import Internal, Unavailable

_READ_BYTES = 65536


class QmpError(Internal):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error: dict[str, Any]) -> None:
        super().__init__(f"QMP {command}: {error.get('class')}: {error.get('desc')}")
        self.error_class = str(error.get("class", ""))


class QmpClient:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""
        self._lock = asyncio.Lock()
        #: Events received so far and not yet taken by ``wait_event``.
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, path: Path) -> QmpClient:
        """Connect, read the greeting and leave capability negotiation. Raises ``Unavailable``
        when nothing listens on ``path``."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, str(path))
        except OSError as err:
            sock.close()
            raise Unavailable(f"QMP socket {path}: {err.strerror}") from err
        client = cls(sock)
        try:
            greeting = await client._read_message()
            if "QMP" not in greeting:
                raise Internal(f"unexpected QMP greeting: {greeting}")
            await client.execute("qmp_capabilities")
        except BaseException:
            client.close()
            raise
        return client

    def close(self) -> None:
        self._sock.close()

    async def _read_message(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        while b"\n" not in self._buf:
            try:
                chunk = await loop.sock_recv(self._sock, _READ_BYTES)
            except ConnectionError as err:  # QEMU exited under us (reset rather than EOF)
                raise Unavailable(f"QMP connection lost: {err.strerror}") from err
            if not chunk:
                raise Unavailable("QMP connection closed by QEMU")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    async def _send(self, data: bytes, fds: Sequence[int]) -> None:
        loop = asyncio.get_running_loop()
        if not fds:
            await loop.sock_sendall(self._sock, data)
            return
        # Ancillary data rides on the first byte sent; the rest goes as a plain write.
        while True:
            try:
                sent = socket.send_fds(self._sock, [data], list(fds))
                break
            except BlockingIOError:
                await asyncio.sleep(0.005)
        if sent < len(data):
            await loop.sock_sendall(self._sock, data[sent:])

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, fds: Sequence[int] = ()
    ) -> Any:
        """Run ``command`` and return its ``return`` value; ``fds`` go along (``getfd``)."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        async with self._lock:
            await self._send(json.dumps(request).encode() + b"\n", fds)
            while True:
                message = await self._read_message()
                if "event" in message:
                    self.events.append(message)
                elif "error" in message:
                    raise QmpError(command, message["error"])
                elif "return" in message:
                    return message["return"]

    async def wait_event(self, name: str) -> dict[str, Any]:
        """The next event called ``name`` (bound it with ``asyncio.timeout``)."""
        async with self._lock:
            while True:
                for i, event in enumerate(self.events):
                    if event["event"] == name:
                        return self.events.pop(i)
                message = await self._read_message()
                if "event" in message:
                    self.events.append(message)
