"""The port scanner's reading of /proc/net/tcp{,6} and its choice of ports to forward."""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys
from pathlib import Path

import pytest

from wrenn.envd.ports import (
    Listener,
    decode_address,
    default_route_address,
    forward_targets,
    parse_proc_net_tcp,
    read_listeners,
)

little_endian = pytest.mark.skipif(sys.byteorder != "little", reason="samples from x86/arm64")

HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
    "   uid  timeout inode"
)


def row(n: int, local: str, remote: str, state: str, inode: int) -> str:
    """One line as the kernel prints it (trailing columns shortened)."""
    queues = "00000000:00000000 00:00000000 00000000"
    return f"   {n}: {local} {remote} {state} {queues}     0        0 {inode} 1"


ZERO6 = "0" * 32
TCP_SAMPLE = "\n".join(
    [
        HEADER,
        row(0, "0100007F:1F90", "00000000:0000", "0A", 1111),
        row(1, "00000000:0016", "00000000:0000", "0A", 2222),
        row(2, "020200C0:8008", "507100CB:0050", "01", 3333),
        row(3, "0100007F:1F90", "0100007F:C350", "06", 0),
    ]
)
TCP6_SAMPLE = "\n".join(
    [
        HEADER,
        row(0, "00000000000000000000000001000000:0BB8", f"{ZERO6}:0000", "0A", 4444),
        row(1, "0000000000000000FFFF00000100007F:0FA0", f"{ZERO6}:0000", "0A", 5555),
        row(2, f"{ZERO6}:0050", f"{ZERO6}:0000", "0A", 6666),
    ]
)

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
FORWARD = V4("192.0.2.2")


def proc_hex(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """How the kernel prints ``address``: 32-bit words in host byte order."""
    packed = address.packed
    words = struct.unpack(f">{len(packed) // 4}I", packed)
    return struct.pack(f"={len(words)}I", *words).hex().upper()


@little_endian
def test_parses_only_listening_ipv4_sockets() -> None:
    assert parse_proc_net_tcp(TCP_SAMPLE) == [
        Listener(V4("127.0.0.1"), 8080, 1111),
        Listener(V4("0.0.0.0"), 22, 2222),
    ]


@little_endian
def test_parses_ipv6_loopback_mapped_and_wildcard() -> None:
    assert parse_proc_net_tcp(TCP6_SAMPLE) == [
        Listener(V6("::1"), 3000, 4444),
        Listener(V6("::ffff:127.0.0.1"), 4000, 5555),
        Listener(V6("::"), 80, 6666),
    ]


@pytest.mark.parametrize(
    "address",
    [V4("127.0.0.1"), V4("10.1.2.3"), V6("::1"), V6("fe80::1:2:3:4"), V6("::ffff:127.0.0.5")],
)
def test_decode_is_the_kernels_encoding_reversed(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    assert decode_address(proc_hex(address)) == address


def test_malformed_lines_are_skipped() -> None:
    text = "\n".join([HEADER, row(0, "zz:1F90", "00000000:0000", "0A", 1), "   1: short"])
    assert parse_proc_net_tcp(text) == []


def test_loopback_only_listeners_are_forwarded() -> None:
    listeners = [
        Listener(V4("127.0.0.1"), 8080, 1),
        Listener(V6("::1"), 3000, 2),
        Listener(V4("127.0.0.53"), 53, 3),
    ]
    assert forward_targets(listeners, FORWARD, ()) == {
        8080: V4("127.0.0.1"),
        3000: V6("::1"),
        53: V4("127.0.0.53"),
    }


def test_ports_already_reachable_are_left_alone() -> None:
    listeners = [
        Listener(V4("127.0.0.1"), 22, 1),
        Listener(V4("0.0.0.0"), 22, 2),
        Listener(V4("127.0.0.1"), 80, 3),
        Listener(V6("::"), 80, 4),
        Listener(V4("127.0.0.1"), 443, 5),
        Listener(FORWARD, 443, 6),
        Listener(V4("10.9.9.9"), 9000, 7),
    ]
    assert forward_targets(listeners, FORWARD, ()) == {}


def test_own_forwarders_are_not_mistaken_for_other_listeners() -> None:
    listeners = [Listener(V4("127.0.0.1"), 8080, 1), Listener(FORWARD, 8080, 2)]
    assert forward_targets(listeners, FORWARD, [8080]) == {8080: V4("127.0.0.1")}


def test_listeners_on_a_loopback_forward_address_are_never_forwarded() -> None:
    forward = V4("127.0.0.2")
    listeners = [Listener(forward, 7000, 1), Listener(V4("127.0.0.1"), 7001, 2)]
    assert forward_targets(listeners, forward, [7000]) == {7001: V4("127.0.0.1")}


def test_ipv4_target_preferred_and_mapped_addresses_unmapped() -> None:
    listeners = [
        Listener(V6("::1"), 5000, 1),
        Listener(V4("127.0.0.9"), 5000, 2),
        Listener(V4("127.0.0.1"), 5000, 3),
        Listener(V6("::ffff:127.0.0.1"), 6000, 4),
    ]
    assert forward_targets(listeners, FORWARD, ()) == {
        5000: V4("127.0.0.1"),
        6000: V4("127.0.0.1"),
    }


def test_a_real_loopback_listener_is_seen_in_proc() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        found = [li for li in read_listeners() if li.port == port]
    assert found and found[0].address == V4("127.0.0.1")
    assert forward_targets(found, FORWARD, ()) == {port: V4("127.0.0.1")}


def test_default_route_address_is_the_route_interfaces_address(tmp_path: Path) -> None:
    (tmp_path / "net").mkdir()
    header = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
    (tmp_path / "net" / "route").write_text(
        header
        + "lo\t0000007F\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n"
        + "lo\t00000000\t0100007F\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
    )
    assert default_route_address(str(tmp_path)) == V4("127.0.0.1")


def test_no_default_route_means_no_address(tmp_path: Path) -> None:
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "route").write_text("Iface\tDestination\tGateway\tFlags\n")
    assert default_route_address(str(tmp_path)) is None
    assert default_route_address(str(tmp_path / "missing")) is None
