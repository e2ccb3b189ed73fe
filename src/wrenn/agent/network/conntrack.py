"""Forgetting connection-tracking state, so a recycled slot starts without its previous
sandbox's flows. Blocking netlink: call from a worker thread."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from pyroute2 import Conntrack, NetlinkError, NFCTSocket
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple


def flush_netns(netns: str) -> None:
    """Drop every IPv4 and IPv6 conntrack entry of a slot's namespace."""
    for family in (socket.AF_INET, socket.AF_INET6):
        # flags=0: fail on a missing namespace instead of creating it.
        nfct = NFCTSocket(nfgen_family=family, netns=netns, flags=0)
        try:
            nfct.flush()
        finally:
            nfct.close()


def forget(addresses: Iterable[IPv4Address | IPv4Network], *, netns: str | None = None) -> int:
    """Delete IPv4 conntrack entries whose original source or destination is in
    ``addresses`` (host namespace, or ``netns``); returns how many were deleted.

    Single addresses are matched by the kernel (a filtered dump per address and direction), so
    the cost does not grow with the host's whole table: parsing every entry of a busy host's
    table in Python takes hundreds of milliseconds of the agent's CPU on each slot reset.
    Wider networks (the reaper's pools, once at start) are matched here over a full dump."""
    nets = [IPv4Network(a) for a in addresses]
    if not nets:
        return 0
    hosts = [net.network_address for net in nets if net.prefixlen == net.max_prefixlen]
    wide = [net for net in nets if net.prefixlen != net.max_prefixlen]

    def within(address: Any, among: list[IPv4Network]) -> bool:
        return address is not None and any(IPv4Address(address) in net for net in among)

    deleted = 0
    ct = Conntrack() if netns is None else Conntrack(netns=netns, flags=0)
    try:
        stale: list[Any] = []
        for host in hosts:
            for side in ("saddr", "daddr"):
                found = ct.dump_entries(tuple_orig=NFCTAttrTuple(**{side: str(host)}))
                # Checked again here: a kernel older than 5.8 ignores the filter and dumps
                # every entry (slower, never wrong).
                mine = [IPv4Network(host)]
                stale.extend(e for e in found if within(getattr(e.tuple_orig, side), mine))
        if wide:
            stale.extend(
                entry
                for entry in ct.dump_entries()
                if within(entry.tuple_orig.saddr, wide) or within(entry.tuple_orig.daddr, wide)
            )
        for entry in stale:
            try:
                ct.delete(entry)
                deleted += 1
            except NetlinkError as err:
                # An entry may expire between dump and delete, or be listed twice (source
                # and destination both forgotten).
                if err.code != errno.ENOENT:
                    raise
    finally:
        ct.close()
    return deleted
