"""Network slots against the real kernel: namespaces, veths, taps, nftables and conntrack.

No VM runs here, so the guest is stood in for by ``GuestNicDouble``: a namespace of its own
holding a tap with the guest's MAC and 169.254.0.21, whose frames a relay thread copies to and
from the slot's ``tap0`` exactly as a VMM would. "The internet" is ``InternetDouble``, one more
namespace routed from the host. Every packet stays inside namespaces these tests create.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import select
import shutil
import socket
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import TypeVar

import pytest
from pyroute2 import Conntrack, IPRoute, netns

from wrenn.agent.network import (
    GATEWAY_IP,
    GUEST_IP,
    GUEST_MAC,
    GUEST_PREFIX_LEN,
    TAP_NAME,
    Egress,
    NetworkPlan,
    Slot,
    SlotPool,
    reap,
)
from wrenn.agent.network import nftables as nft
from wrenn.core.errors import FailedPrecondition, ResourceExhausted

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network slots need root"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="nft (nftables) not installed"),
    pytest.mark.skipif(not Path("/dev/net/tun").exists(), reason="no /dev/net/tun"),
]

T = TypeVar("T")

ENVD_PORT = 49983
#: TEST-NET-3, only ever routed into the internet double's namespace.
INTERNET_HOST_IP = IPv4Address("203.0.113.1")
INTERNET_SERVER_IP = IPv4Address("203.0.113.2")
#: A second destination out there, routed through the first.
FAR_SERVER_IP = IPv4Address("198.51.100.7")
#: Everything let out.
OPEN = Egress(internet=True)
DIAL_TIMEOUT_S = 2.0

_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_libc = ctypes.CDLL(None, use_errno=True)


# --- running code inside a namespace ------------------------------------------------------


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """``fn()`` on a fresh thread moved into namespace ``name`` (setns is per thread)."""
    box: dict[str, T | BaseException] = {}

    def target() -> None:
        try:
            enter_netns(name)
            box["value"] = fn()
        except BaseException as err:
            box["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def enter_netns(name: str) -> None:
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
    finally:
        os.close(fd)


def socket_in(name: str) -> socket.socket:
    return in_netns(name, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))


def open_tap(ifname: str) -> int:
    """Attach to (or create) tap ``ifname`` in the calling thread's namespace."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", ifname.encode(), _IFF_TAP | _IFF_NO_PI))
    except BaseException:
        os.close(fd)
        raise
    return fd


# --- servers and clients ------------------------------------------------------------------


class TagServer:
    """A TCP listener that answers every connection with ``<tag> <peer ip>``."""

    def __init__(self, sock: socket.socket, address: IPv4Address, port: int, tag: str) -> None:
        self.tag = tag
        self.sock = sock
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((str(address), port))
        self.sock.listen()
        self.port: int = self.sock.getsockname()[1]
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            ready, _, _ = select.select([self.sock, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            conn, peer = self.sock.accept()
            with conn:
                conn.sendall(f"{self.tag} {peer[0]}".encode())

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join()
        self.sock.close()
        os.close(self._stop_r)
        os.close(self._stop_w)


def dial(sock: socket.socket, address: str | IPv4Address, port: int) -> str:
    """Connect ``sock`` and return what the server says; raises OSError when blocked."""
    with sock:
        sock.settimeout(DIAL_TIMEOUT_S)
        sock.connect((str(address), port))
        chunks = []
        while chunk := sock.recv(256):
            chunks.append(chunk)
        return b"".join(chunks).decode()


def dial_from_host(address: str | IPv4Address, port: int) -> str:
    return dial(socket.socket(socket.AF_INET, socket.SOCK_STREAM), address, port)


# --- test doubles -------------------------------------------------------------------------


class GuestNicDouble:
    """Test double of a guest's NIC in ``slot``: namespace ``<prefix>-g<i>`` with a tap
    ``eth0`` (guest MAC, 169.254.0.21/30, default route via 169.254.0.22), its frames relayed
    to and from the slot's tap0 the way a VMM relays them."""

    def __init__(self, plan: NetworkPlan, slot: Slot) -> None:
        self.netns = f"{plan.prefix}-g{slot.index}"
        self.slot = slot
        self._stop_r, self._stop_w = os.pipe()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        netns.create(self.netns)
        self._thread = threading.Thread(target=self._relay, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self.close()
            raise self._error
        with IPRoute(netns=self.netns, flags=0) as ipr:
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.link("set", index=eth0, address=GUEST_MAC)
            ipr.addr("add", index=eth0, address=str(GUEST_IP), prefixlen=GUEST_PREFIX_LEN)
            ipr.link("set", index=eth0, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=str(GATEWAY_IP))

    def _relay(self) -> None:
        fds: list[int] = []
        try:
            enter_netns(self.slot.netns)
            fds.append(open_tap(TAP_NAME))
            enter_netns(self.netns)
            fds.append(open_tap("eth0"))
        except BaseException as err:
            self._error = err
        self._ready.set()
        if self._error is None:
            peer = {fds[0]: fds[1], fds[1]: fds[0]}
            while True:
                ready, _, _ = select.select([*fds, self._stop_r], [], [])
                if self._stop_r in ready:
                    break
                for fd in ready:
                    with contextlib.suppress(OSError):
                        os.write(peer[fd], os.read(fd, 65536))
        for fd in fds:
            os.close(fd)

    def serve(self, port: int, tag: str) -> TagServer:
        return TagServer(socket_in(self.netns), GUEST_IP, port, tag)

    def dial(self, address: str | IPv4Address, port: int) -> str:
        return dial(socket_in(self.netns), address, port)

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join()
        os.close(self._stop_r)
        os.close(self._stop_w)
        if self.netns in netns.listnetns():
            netns.remove(self.netns)


class InternetDouble:
    """Test double of the internet: namespace ``<prefix>-inet`` behind host link
    ``<prefix>-i`` (203.0.113.1/30 on the host, the server on 203.0.113.2)."""

    def __init__(self, plan: NetworkPlan) -> None:
        self.netns = f"{plan.prefix}-inet"
        self.host_link = f"{plan.prefix}-i"
        netns.create(self.netns)
        try:
            with IPRoute() as ipr:
                ipr.link(
                    "add",
                    ifname=self.host_link,
                    kind="veth",
                    peer={"ifname": "eth0", "net_ns_fd": self.netns},
                )
                index = ipr.link_lookup(ifname=self.host_link)[0]
                ipr.addr("add", index=index, address=str(INTERNET_HOST_IP), prefixlen=30)
                ipr.link("set", index=index, state="up")
            with IPRoute(netns=self.netns, flags=0) as ipr:
                eth0 = ipr.link_lookup(ifname="eth0")[0]
                ipr.addr("add", index=eth0, address=str(INTERNET_SERVER_IP), prefixlen=30)
                ipr.addr("add", index=eth0, address=str(FAR_SERVER_IP), prefixlen=32)
                ipr.link("set", index=eth0, state="up")
            with IPRoute() as ipr:
                ipr.route("add", dst=f"{FAR_SERVER_IP}/32", gateway=str(INTERNET_SERVER_IP))
            self.server = TagServer(socket_in(self.netns), INTERNET_SERVER_IP, 0, "internet")
            self.far = TagServer(socket_in(self.netns), FAR_SERVER_IP, 0, "far")
        except BaseException:
            self._remove()
            raise

    def _remove(self) -> None:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=self.host_link)
            if found:
                ipr.link("del", index=found[0])
        if self.netns in netns.listnetns():
            netns.remove(self.netns)

    def close(self) -> None:
        self.server.close()
        self.far.close()
        self._remove()


# --- fixtures -----------------------------------------------------------------------------


def leftovers(plan: NetworkPlan) -> list[str]:
    """Everything under the plan's prefix still present on the host."""
    found = [f"netns {n}" for n in netns.listnetns() if plan.owns_name(n)]
    with IPRoute() as ipr:
        found += [
            f"link {link.get('ifname')}"
            for link in ipr.get_links()
            if plan.owns_name(link.get("ifname") or "")
        ]
        for route in ipr.get_routes(family=socket.AF_INET, table=254):
            dst = route.get("RTA_DST")
            if dst is not None and IPv4Address(dst) in plan.sandbox_pool:
                found.append(f"route {dst}")
    found += [f"table {f} {n}" for f, n in nft.tables() if plan.owns_table(n)]
    return found


@pytest.fixture(scope="module", autouse=True)
def ip_forward_restored() -> Iterator[None]:
    """The pool turns IPv4 forwarding on for the host; put back what the machine had."""
    path = Path("/proc/sys/net/ipv4/ip_forward")
    before = path.read_text()
    yield
    path.write_text(before)


@pytest.fixture
def plan() -> Iterator[NetworkPlan]:
    the_plan = NetworkPlan(
        slot_count=3,
        prefix=f"wrenn-t{os.getpid() % 0xFFF:03x}",
        transit_pool=IPv4Network("10.250.0.0/24"),
        sandbox_pool=IPv4Network("10.251.0.0/24"),
    )
    yield the_plan
    reap(the_plan)  # whatever a failing test left behind


@pytest.fixture
async def pool(plan: NetworkPlan) -> AsyncIterator[SlotPool]:
    async with SlotPool(plan) as the_pool:
        yield the_pool


@pytest.fixture
def doubles() -> Iterator[list[GuestNicDouble | InternetDouble]]:
    """Collects test doubles and closes them, also when the test fails."""
    made: list[GuestNicDouble | InternetDouble] = []
    yield made
    for double in reversed(made):
        double.close()


@pytest.fixture
def servers() -> Iterator[list[TagServer]]:
    made: list[TagServer] = []
    yield made
    for server in made:
        server.close()


async def guest(
    plan: NetworkPlan, slot: Slot, doubles: list[GuestNicDouble | InternetDouble]
) -> GuestNicDouble:
    double = await asyncio.to_thread(GuestNicDouble, plan, slot)
    doubles.append(double)
    return double


async def internet(
    plan: NetworkPlan, doubles: list[GuestNicDouble | InternetDouble]
) -> InternetDouble:
    double = await asyncio.to_thread(InternetDouble, plan)
    doubles.append(double)
    return double


# --- tests --------------------------------------------------------------------------------


async def test_slots_share_the_guest_side_and_differ_on_the_host_side(pool: SlotPool) -> None:
    slots = pool.slots
    assert len(slots) == 3
    assert len({s.sandbox_ip for s in slots}) == 3
    assert len({s.netns for s in slots}) == 3
    for slot in slots:
        assert slot.netns_path.exists()
        assert await asyncio.to_thread(tap_address, slot) == f"{GATEWAY_IP}/{GUEST_PREFIX_LEN}"
    assert len({s.tap_name for s in slots}) == 1
    assert len({s.guest_mac for s in slots}) == 1


async def test_host_reaches_the_guest_on_any_port_through_the_sandbox_address(
    plan: NetworkPlan,
    pool: SlotPool,
    doubles: list[GuestNicDouble | InternetDouble],
    servers: list[TagServer],
) -> None:
    slot = await pool.acquire()
    double = await guest(plan, slot, doubles)
    servers.append(double.serve(ENVD_PORT, "envd"))
    servers.append(double.serve(8080, "app"))

    envd = await asyncio.to_thread(dial_from_host, slot.sandbox_ip, ENVD_PORT)
    app = await asyncio.to_thread(dial_from_host, slot.sandbox_ip, 8080)

    # The guest sees the host's end of the slot's veth as the peer.
    assert envd == f"envd {slot.addresses.host_ip}"
    assert app == f"app {slot.addresses.host_ip}"


async def test_two_slots_with_identical_inner_addressing_work_at_once(
    plan: NetworkPlan,
    pool: SlotPool,
    doubles: list[GuestNicDouble | InternetDouble],
    servers: list[TagServer],
) -> None:
    first, second = await pool.acquire(), await pool.acquire()
    servers.append((await guest(plan, first, doubles)).serve(ENVD_PORT, "first"))
    servers.append((await guest(plan, second, doubles)).serve(ENVD_PORT, "second"))

    replies = await asyncio.gather(
        asyncio.to_thread(dial_from_host, first.sandbox_ip, ENVD_PORT),
        asyncio.to_thread(dial_from_host, second.sandbox_ip, ENVD_PORT),
    )

    assert [r.split()[0] for r in replies] == ["first", "second"]


async def test_internet_access_gates_connections_the_guest_opens(
    plan: NetworkPlan,
    pool: SlotPool,
    doubles: list[GuestNicDouble | InternetDouble],
    servers: list[TagServer],
) -> None:
    inet = await internet(plan, doubles)
    slot = await pool.acquire(egress=OPEN)
    double = await guest(plan, slot, doubles)
    port = inet.server.port

    # On: out through the host, masqueraded to the host's address.
    reply = await asyncio.to_thread(double.dial, INTERNET_SERVER_IP, port)
    assert reply == f"internet {INTERNET_HOST_IP}"

    await slot.set_egress(Egress())
    assert slot.egress == Egress()
    with pytest.raises(OSError):
        await asyncio.to_thread(double.dial, INTERNET_SERVER_IP, port)

    await slot.set_egress(OPEN)
    assert await asyncio.to_thread(double.dial, INTERNET_SERVER_IP, port) == reply


async def test_allowed_and_denied_destinations_come_before_the_internet(
    plan: NetworkPlan,
    pool: SlotPool,
    doubles: list[GuestNicDouble | InternetDouble],
    servers: list[TagServer],
) -> None:
    inet = await internet(plan, doubles)
    slot = await pool.acquire(egress=Egress.parse(internet=False, allow=[str(INTERNET_SERVER_IP)]))
    double = await guest(plan, slot, doubles)

    async def reaches(address: IPv4Address, port: int) -> bool:
        try:
            await asyncio.to_thread(double.dial, address, port)
        except OSError:
            return False
        return True

    near, far = (INTERNET_SERVER_IP, inet.server.port), (FAR_SERVER_IP, inet.far.port)
    # No internet, one address allowed.
    assert [await reaches(*near), await reaches(*far)] == [True, False]
    # The internet but a denied block.
    await slot.set_egress(Egress.parse(internet=True, deny=["198.51.100.0/24"]))
    assert [await reaches(*near), await reaches(*far)] == [True, False]
    # An allowed address inside the denied block gets through.
    both = Egress.parse(internet=True, allow=[str(FAR_SERVER_IP)], deny=["198.51.100.0/24"])
    await slot.set_egress(both)
    assert [await reaches(*near), await reaches(*far)] == [True, True]
    rules = await asyncio.to_thread(nft.egress_rules, netns=slot.netns)
    assert "198.51.100.7 accept" in rules and "198.51.100.0/24 drop" in rules
    # Nothing at all: the slot's reset state.
    await slot.set_egress(Egress())
    assert [await reaches(*near), await reaches(*far)] == [False, False]


async def test_guests_reach_neither_the_host_nor_other_sandboxes(
    plan: NetworkPlan,
    pool: SlotPool,
    doubles: list[GuestNicDouble | InternetDouble],
    servers: list[TagServer],
) -> None:
    slot = await pool.acquire(egress=OPEN)
    other = await pool.acquire(egress=OPEN)
    double = await guest(plan, slot, doubles)
    servers.append((await guest(plan, other, doubles)).serve(ENVD_PORT, "other"))
    host_listener = TagServer(
        socket.socket(socket.AF_INET, socket.SOCK_STREAM), slot.addresses.host_ip, 0, "host"
    )
    servers.append(host_listener)
    # Both listeners answer the host itself.
    assert (await asyncio.to_thread(dial_from_host, other.sandbox_ip, ENVD_PORT)).startswith(
        "other"
    )
    host_reply = await asyncio.to_thread(dial_from_host, slot.addresses.host_ip, host_listener.port)
    assert host_reply.startswith("host")

    for address, port in (
        (slot.addresses.host_ip, host_listener.port),
        (other.sandbox_ip, ENVD_PORT),
        (other.addresses.ns_ip, ENVD_PORT),
    ):
        with pytest.raises(OSError):
            await asyncio.to_thread(double.dial, address, port)


async def test_release_resets_the_slot_for_the_next_sandbox(
    plan: NetworkPlan,
    pool: SlotPool,
    doubles: list[GuestNicDouble | InternetDouble],
    servers: list[TagServer],
) -> None:
    inet = await internet(plan, doubles)
    slots = [await pool.acquire(egress=OPEN) for _ in range(3)]
    with pytest.raises(ResourceExhausted):
        await pool.acquire()
    slot = slots[0]
    double = await guest(plan, slot, doubles)
    servers.append(double.serve(ENVD_PORT, "before"))
    await asyncio.to_thread(dial_from_host, slot.sandbox_ip, ENVD_PORT)
    await asyncio.to_thread(double.dial, INTERNET_SERVER_IP, inet.server.port)
    assert await asyncio.to_thread(host_entries, slot) > 0
    # A flow of the host's own, open across the reset: only the slot's are forgotten.
    with loopback_flow() as port:
        assert await asyncio.to_thread(loopback_entries, port) > 0

        await pool.release(slot)

        assert await asyncio.to_thread(loopback_entries, port) > 0
    assert slot.egress == Egress()
    assert "accept" not in await asyncio.to_thread(nft.egress_rules, netns=slot.netns)
    assert await asyncio.to_thread(host_entries, slot) == 0
    assert await asyncio.to_thread(netns_entries, slot) == 0
    with pytest.raises(FailedPrecondition):
        await pool.release(slot)

    again = await pool.acquire()
    assert again is slot
    assert pool.free_count == 0
    # Internet access is off for the new sandbox; the host still reaches it.
    with pytest.raises(OSError):
        await asyncio.to_thread(double.dial, INTERNET_SERVER_IP, inet.server.port)
    reply = await asyncio.to_thread(dial_from_host, slot.sandbox_ip, ENVD_PORT)
    assert reply.startswith("before")


async def test_pools_overlapping_the_hosts_addresses_are_refused(plan: NetworkPlan) -> None:
    clashing = NetworkPlan(
        slot_count=1,
        prefix=plan.prefix,
        transit_pool=plan.transit_pool,
        sandbox_pool=IPv4Network("127.255.0.0/24"),  # inside loopback's 127.0.0.0/8
    )

    with pytest.raises(FailedPrecondition, match="overlaps"):
        await SlotPool(clashing).start()

    assert await asyncio.to_thread(leftovers, plan) == []


async def test_close_leaves_nothing_behind(plan: NetworkPlan) -> None:
    pool = SlotPool(plan)
    await pool.start()
    await pool.acquire(egress=OPEN)
    assert await asyncio.to_thread(leftovers, plan)

    await pool.close()

    assert await asyncio.to_thread(leftovers, plan) == []
    assert pool.slots == []


async def test_reaper_removes_what_a_crashed_agent_left(plan: NetworkPlan) -> None:
    crashed = SlotPool(plan)
    await crashed.start()
    await crashed.acquire(egress=OPEN)
    del crashed  # the agent dies: nothing is torn down
    assert await asyncio.to_thread(leftovers, plan)

    reaped = await asyncio.to_thread(reap, plan)

    assert sorted(reaped.namespaces) == [plan.netns(i) for i in range(plan.slot_count)]
    assert plan.host_table in reaped.tables
    assert await asyncio.to_thread(leftovers, plan) == []


async def test_a_new_pool_starts_over_the_leftovers_of_a_crashed_one(plan: NetworkPlan) -> None:
    crashed = SlotPool(plan)
    await crashed.start()
    del crashed

    async with SlotPool(plan) as pool:
        assert pool.free_count == plan.slot_count

    assert await asyncio.to_thread(leftovers, plan) == []


# --- probes (blocking netlink: run them on a thread) --------------------------------------


def tap_address(slot: Slot) -> str:
    with IPRoute(netns=slot.netns, flags=0) as ipr:
        (tap,) = ipr.get_links(ifname=TAP_NAME)
        (addr,) = ipr.get_addr(index=tap["index"], family=socket.AF_INET)
    return f"{addr.get('IFA_ADDRESS')}/{addr['prefixlen']}"


@contextlib.contextmanager
def loopback_flow() -> Iterator[int]:
    """A TCP connection over 127.0.0.1 held open; yields the listener's port."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            with accepted:
                client.sendall(b"x")
                accepted.recv(1)
                yield port


def loopback_entries(port: int) -> int:
    with contextlib.closing(Conntrack()) as ct:
        return sum(
            1
            for entry in ct.dump_entries()
            if entry.tuple_orig.daddr == "127.0.0.1" and entry.tuple_orig.dport == port
        )


def host_entries(slot: Slot) -> int:
    return _entries_with(Conntrack(), IPv4Address(slot.sandbox_ip))


def netns_entries(slot: Slot) -> int:
    return _entries_with(Conntrack(netns=slot.netns, flags=0), GUEST_IP)


def _entries_with(ct: Conntrack, address: IPv4Address) -> int:
    with contextlib.closing(ct):
        return sum(
            1
            for entry in ct.dump_entries()
            if str(address) in (entry.tuple_orig.saddr, entry.tuple_orig.daddr)
        )
