"""The address plan of network slots: what is identical in every slot (the guest's side) and
what each slot owns (its namespace, host veth and host-reachable addresses).

Every slot looks the same from inside, so a snapshot taken in one slot restores into any other:

    guest NIC  169.254.0.21/30  MAC 02:57:52:a9:fe:15   (configured inside the guest)
    tap0       169.254.0.22/30  MAC 02:57:52:a9:fe:16   (gateway, inside the slot's netns)

What differs per slot is only seen from the host:

    transit    <transit_pool> split into /30s; slot i takes the i-th: .1 host veth, .2 veth0
    sandbox    <sandbox_pool> host i+1: the address the host dials; the slot NATs it 1:1 to the
               guest (every port) and its outbound traffic leaves with it as source
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from wrenn.core.errors import InvalidArgument

#: Interface names inside every slot's namespace.
TAP_NAME = "tap0"
NS_VETH_NAME = "veth0"
#: The guest's side, the same in every slot.
GUEST_IP = IPv4Address("169.254.0.21")
GATEWAY_IP = IPv4Address("169.254.0.22")
GUEST_PREFIX_LEN = 30
GUEST_MAC = "02:57:52:a9:fe:15"
TAP_MAC = "02:57:52:a9:fe:16"
#: The nft table inside every slot's namespace.
SLOT_TABLE = "wrenn"

#: Linux limits interface names to 15 bytes.
_IFNAME_MAX = 15
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9-]*[a-z0-9]$")


def kernel_ip_arg(ifname: str = "eth0") -> str:
    """The ``ip=`` kernel argument that configures the guest NIC (same for every slot)."""
    mask = IPv4Network(f"0.0.0.0/{GUEST_PREFIX_LEN}").netmask
    return f"ip={GUEST_IP}::{GATEWAY_IP}:{mask}::{ifname}:off"


@dataclass(frozen=True)
class SlotAddresses:
    """Names and host-side addresses of one slot."""

    index: int
    #: Network namespace name (``ip netns`` name; its file is /run/netns/<netns>).
    netns: str
    #: Host end of the veth pair; the other end is ``veth0`` inside the namespace.
    host_veth: str
    transit: IPv4Network
    host_ip: IPv4Address
    ns_ip: IPv4Address
    #: The address the agent and the proxy dial to reach the guest (any port).
    sandbox_ip: IPv4Address


@dataclass(frozen=True)
class NetworkPlan:
    """Where slots live: their name prefix, how many, and the two address pools.

    ``prefix`` names everything the pool creates on the host: namespaces ``<prefix>-slot-<i>``,
    veths ``<prefix>-v<i>`` and the host nft table (``prefix`` with ``-`` turned into ``_``).
    The reaper removes everything under the prefix, so two pools must not share one.
    """

    slot_count: int = 8
    prefix: str = "wrenn"
    transit_pool: IPv4Network = field(default_factory=lambda: IPv4Network("10.12.0.0/16"))
    sandbox_pool: IPv4Network = field(default_factory=lambda: IPv4Network("10.11.0.0/16"))

    def __post_init__(self) -> None:
        if not _PREFIX_RE.match(self.prefix):
            raise InvalidArgument(f"invalid slot name prefix: {self.prefix!r}")
        if self.slot_count < 1:
            raise InvalidArgument("a slot pool needs at least one slot")
        if self.transit_pool.prefixlen > 30:
            raise InvalidArgument(f"transit pool {self.transit_pool} is smaller than a /30")
        if self.transit_pool.overlaps(self.sandbox_pool):
            raise InvalidArgument("transit and sandbox pools overlap")
        guest_net = IPv4Network(f"{GUEST_IP}/{GUEST_PREFIX_LEN}", strict=False)
        for pool in (self.transit_pool, self.sandbox_pool):
            if pool.overlaps(guest_net):
                raise InvalidArgument(f"pool {pool} overlaps the guest network {guest_net}")
        capacity = min(2 ** (30 - self.transit_pool.prefixlen), self.sandbox_pool.num_addresses - 2)
        if self.slot_count > capacity:
            raise InvalidArgument(f"the address pools hold at most {capacity} slots")
        longest = self.host_veth(self.slot_count - 1)
        if len(longest) > _IFNAME_MAX:
            raise InvalidArgument(f"interface name {longest!r} exceeds {_IFNAME_MAX} bytes")

    @property
    def host_table(self) -> str:
        """The nft table (family inet) in the host namespace."""
        return self.prefix.replace("-", "_")

    @property
    def host_veth_glob(self) -> str:
        """An nft wildcard matching every slot's host veth."""
        return f"{self.prefix}-v*"

    def host_veth(self, index: int) -> str:
        return f"{self.prefix}-v{index}"

    def netns(self, index: int) -> str:
        return f"{self.prefix}-slot-{index}"

    def owns_name(self, name: str) -> bool:
        """Whether a namespace or interface name belongs to this plan's prefix."""
        return name.startswith(f"{self.prefix}-")

    def owns_table(self, name: str) -> bool:
        return name == self.host_table or name.startswith(f"{self.host_table}_")

    def slot(self, index: int) -> SlotAddresses:
        if not 0 <= index < self.slot_count:
            raise InvalidArgument(f"slot index {index} outside 0..{self.slot_count - 1}")
        base = int(self.transit_pool.network_address) + 4 * index
        transit = IPv4Network((base, 30))
        return SlotAddresses(
            index=index,
            netns=self.netns(index),
            host_veth=self.host_veth(index),
            transit=transit,
            host_ip=IPv4Address(base + 1),
            ns_ip=IPv4Address(base + 2),
            sandbox_ip=IPv4Address(int(self.sandbox_pool.network_address) + index + 1),
        )

    def slots(self) -> list[SlotAddresses]:
        return [self.slot(i) for i in range(self.slot_count)]
