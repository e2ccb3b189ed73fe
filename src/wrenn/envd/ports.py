"""Port subsystem: makes services that listen on loopback only reachable from outside the guest.

A scanner reads ``/proc/net/tcp`` and ``/proc/net/tcp6`` every ``port_scan_interval_s`` and
finds sockets in LISTEN bound to loopback only (127.0.0.0/8, ::1). For each such port, an
in-process asyncio relay listens on the forward address (``port_forward_address``; by default
the address of the interface holding the default route) and pipes every connection to the
loopback listener. Forwarders whose listener disappears are closed.

One task owns the scanner and every forwarder; ``stop`` cancels it and waits for it, so nothing
(listening socket, relayed connection, task) outlives a stop. start/stop/restart are idempotent
and serialized (``restart_soon`` runs a restart in a task of its own; a stop waits for it
first); a stopped subsystem starts again (cancellation, never an irreversible flag).
Scanning and forwarding run in that one task, one after the other, so they cannot deadlock.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import socket
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from wrenn import log
from wrenn.envd.config import EnvdSettings

_log = log.get(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: ``st`` column of /proc/net/tcp for a listening socket.
TCP_LISTEN = 0x0A
RELAY_CHUNK_BYTES = 64 * 1024
#: ioctl reading an interface's IPv4 address (struct ifreq: 16-byte name, then a sockaddr_in).
_SIOCGIFADDR = 0x8915
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Listener:
    address: IPAddress
    port: int
    inode: int


def decode_address(hex_address: str) -> IPAddress:
    """An address as /proc/net/tcp{,6} prints it: 32-bit words in host byte order, in hex."""
    raw = bytes.fromhex(hex_address)
    if len(raw) not in (4, 16):
        raise ValueError(f"not an IPv4 or IPv6 address: {hex_address!r}")
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def parse_proc_net_tcp(text: str) -> list[Listener]:
    """The listening sockets in the text of /proc/net/tcp or /proc/net/tcp6."""
    listeners = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        try:
            if int(fields[3], 16) != TCP_LISTEN:
                continue
            hex_address, _, hex_port = fields[1].partition(":")
            listeners.append(
                Listener(decode_address(hex_address), int(hex_port, 16), int(fields[9]))
            )
        except ValueError:
            continue
    return listeners


def read_listeners(proc_root: str = "/proc") -> list[Listener]:
    """Every listening TCP socket of this network namespace (blocking)."""
    listeners: list[Listener] = []
    for name in ("tcp", "tcp6"):
        try:
            text = Path(proc_root, "net", name).read_text()
        except FileNotFoundError:
            continue
        listeners.extend(parse_proc_net_tcp(text))
    return listeners


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def forward_targets(
    listeners: Iterable[Listener], forward_address: IPAddress, forwarded: Iterable[int]
) -> dict[int, IPAddress]:
    """Port → loopback address to relay to, for every port listened on by loopback only.

    A port is left alone when it is already reachable: listened on by a wildcard address, or
    on the forward address by a socket that is not one of ``forwarded`` (ours). Listeners on
    the forward address itself are never relayed (the forwarder's own listeners among them).
    IPv4 loopback targets are preferred over ::1.
    """
    ours = set(forwarded)
    forward_address = _unmapped(forward_address)
    loopback: dict[int, set[IPAddress]] = {}
    reachable: set[int] = set()
    for listener in listeners:
        address = _unmapped(listener.address)
        if address == forward_address:
            if listener.port not in ours:
                reachable.add(listener.port)
        elif address.is_unspecified:
            reachable.add(listener.port)
        elif address.is_loopback:
            loopback.setdefault(listener.port, set()).add(address)
    return {
        port: min(addresses, key=lambda a: (a.version, int(a)))
        for port, addresses in loopback.items()
        if port not in reachable
    }


def default_route_address(proc_root: str = "/proc") -> IPAddress | None:
    """The IPv4 address of the interface holding the default route, if any (blocking)."""
    try:
        lines = Path(proc_root, "net", "route").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 8 or fields[1] != "00000000" or fields[7] != "00000000":
            continue
        if not int(fields[3], 16) & 0x1:  # RTF_UP
            continue
        address = interface_ipv4(fields[0])
        if address is not None:
            return address
    return None


def interface_ipv4(name: str) -> ipaddress.IPv4Address | None:
    """The (primary) IPv4 address of interface ``name``, if it has one."""
    request = struct.pack("256s", name.encode()[:15])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            reply = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
        except OSError:
            return None
    return ipaddress.IPv4Address(reply[20:24])


def resolve_forward_address(settings: EnvdSettings) -> IPAddress | None:
    """The configured forward address; None when forwarding is off or no address is found."""
    configured = settings.port_forward_address
    if configured is None:
        return default_route_address()
    if not configured.strip():
        return None
    return ipaddress.ip_address(configured.strip())


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(RELAY_CHUNK_BYTES):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


class Forwarder:
    """Listens on ``listen``:``port`` and relays every connection to ``target``:``port``."""

    def __init__(self, listen: IPAddress, port: int, target: IPAddress) -> None:
        self.listen = listen
        self.port = port
        self.target = target
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()
        self._closed = False

    async def open(self) -> None:
        # Created without serving, then started: a cancellation between the two cannot lose
        # the listening socket, ``close`` finds it in ``_server``.
        self._server = await asyncio.start_server(
            self._relay,
            host=str(self.listen),
            port=self.port,
            reuse_address=True,
            start_serving=False,
        )
        await self._server.start_serving()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._closed:  # accepted just before close, started after it
            writer.transport.abort()
            return
        self._relays.add(task)
        upstream: asyncio.StreamWriter | None = None
        finished = False
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                up_reader, upstream = await asyncio.open_connection(str(self.target), self.port)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_pump(reader, upstream))
                tg.create_task(_pump(up_reader, writer))
            finished = True
        except* OSError as group:
            _log.debug("ports.relay_ended", port=self.port, reason=str(group.exceptions[0]))
        finally:
            # Both directions reached EOF: close gracefully; else (error, stop) drop at once.
            for w in (writer, upstream):
                if w is None:
                    continue
                if finished:
                    w.close()
                else:
                    w.transport.abort()
            self._relays.discard(task)

    async def close(self) -> None:
        """Stop listening and end every relayed connection."""
        self._closed = True
        if self._server is not None:
            self._server.close()
        relays = list(self._relays)
        for task in relays:
            task.cancel()
        if relays:
            await asyncio.wait(relays)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


class PortSubsystem:
    def __init__(self, settings: EnvdSettings, proc_root: str = "/proc") -> None:
        self.settings = settings
        self.proc_root = proc_root
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._forwarders: dict[int, Forwarder] = {}
        self._bind_failures: set[int] = set()
        self._scans_started = 0
        self._scans_done = 0
        self._scan_done = asyncio.Condition()
        #: ``restart_soon`` tasks not finished yet (kept referenced until they are).
        self._pending: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def forwarded(self) -> dict[int, IPAddress]:
        """Port → loopback target of every open forwarder."""
        return {port: fwd.target for port, fwd in self._forwarders.items()}

    async def start(self) -> None:
        async with self._lock:
            await self._start_locked()

    async def stop(self) -> None:
        # A restart asked for just before must not start the scanner again after this stop.
        await self.settle()
        async with self._lock:
            await self._stop_locked()

    async def restart(self) -> None:
        async with self._lock:
            await self._stop_locked()
            await self._start_locked()

    def restart_soon(self) -> None:
        """``restart`` in a task of its own (the caller need not wait for it); a later
        ``start``, ``stop`` or ``restart`` queues behind it on the lock."""
        task = asyncio.create_task(self.restart(), name="envd-ports-restart")
        self._pending.add(task)
        task.add_done_callback(self._restarted)

    async def settle(self) -> None:
        """Wait for the restarts ``restart_soon`` began."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    def _restarted(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("ports.restart_failed", error=repr(task.exception()))

    async def wait_for_scan(self) -> None:
        """Return once a scan that started after this call has finished."""
        if not self.running:
            raise RuntimeError("port subsystem is not running")
        want = self._scans_started + 1
        async with self._scan_done:
            await self._scan_done.wait_for(lambda: self._scans_done >= want or not self.running)

    async def _start_locked(self) -> None:
        if self.running:
            return
        try:
            address = await asyncio.to_thread(resolve_forward_address, self.settings)
        except ValueError:
            _log.error("ports.bad_forward_address", address=self.settings.port_forward_address)
            return
        if address is None:
            _log.info("ports.idle", reason="no forward address")
            return
        self._task = asyncio.create_task(self._run(address), name="envd-ports")
        _log.debug("ports.started", forward_address=str(address))

    async def _stop_locked(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait([task])
        if not task.cancelled() and task.exception() is not None:
            _log.error("ports.failed", exc_info=task.exception())
        async with self._scan_done:
            self._scan_done.notify_all()
        _log.debug("ports.stopped")

    async def _run(self, address: IPAddress) -> None:
        try:
            failing = False
            while True:
                self._scans_started += 1
                try:
                    await self._scan(address)
                    failing = False
                except Exception:
                    # Task boundary: one failed scan must not end forwarding; log once per streak.
                    if not failing:
                        _log.error("ports.scan_failed", exc_info=True)
                    failing = True
                self._scans_done += 1
                async with self._scan_done:
                    self._scan_done.notify_all()
                await asyncio.sleep(self.settings.port_scan_interval_s)
        finally:
            forwarders = list(self._forwarders.values())
            self._forwarders.clear()
            self._bind_failures.clear()
            for fwd in forwarders:
                await fwd.close()

    async def _scan(self, address: IPAddress) -> None:
        listeners = await asyncio.to_thread(read_listeners, self.proc_root)
        wanted = forward_targets(listeners, address, self._forwarders)
        for port, fwd in list(self._forwarders.items()):
            if wanted.get(port) != fwd.target:
                del self._forwarders[port]
                await fwd.close()
                _log.info("ports.forward_closed", port=port)
        for port, target in wanted.items():
            if port in self._forwarders:
                continue
            fwd = Forwarder(address, port, target)
            self._forwarders[port] = fwd  # before open: a stop during open closes it too
            try:
                await fwd.open()
            except OSError as exc:
                del self._forwarders[port]
                await fwd.close()
                if port not in self._bind_failures:
                    _log.warning("ports.forward_failed", port=port, reason=exc.strerror)
                    self._bind_failures.add(port)
                continue
            self._bind_failures.discard(port)
            _log.info("ports.forwarding", port=port, target=str(target), address=str(address))
        self._bind_failures &= set(wanted)
