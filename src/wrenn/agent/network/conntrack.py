"""Forgetting connection-tracking state, so a recycled slot starts without its previous
sandbox's flows. Blocking netlink: call from a worker thread."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from pyroute2 import Conntrack, NetlinkError, NFCTSocket


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
    ``addresses`` (host namespace, or ``netns``); returns how many were deleted."""
    nets = [IPv4Network(a) for a in addresses]
    if not nets:
        return 0

    def matches(address: Any) -> bool:
        return address is not None and any(IPv4Address(address) in net for net in nets)

    deleted = 0
    ct = Conntrack() if netns is None else Conntrack(netns=netns, flags=0)
    try:
        stale = [
            entry
            for entry in ct.dump_entries()
            if matches(entry.tuple_orig.saddr) or matches(entry.tuple_orig.daddr)
        ]
        for entry in stale:
            try:
                ct.delete(entry)
                deleted += 1
            except NetlinkError as err:  # an entry may expire between dump and delete
                if err.code != errno.ENOENT:
                    raise
    finally:
        ct.close()
    return deleted
