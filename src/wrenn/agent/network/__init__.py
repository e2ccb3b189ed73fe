"""Per-sandbox network slots: a namespace per slot holding the guest's ``tap0``, a veth pair
from the host into it, and nftables NAT between the slot's host-reachable address and the
guest. Every slot looks the same from inside (see ``addressing``), so any snapshot restores
into any slot."""

from wrenn.agent.network.addressing import (
    GATEWAY_IP,
    GUEST_IP,
    GUEST_MAC,
    GUEST_PREFIX_LEN,
    TAP_MAC,
    TAP_NAME,
    NetworkPlan,
    SlotAddresses,
    kernel_ip_arg,
)
from wrenn.agent.network.pool import Slot, SlotPool
from wrenn.agent.network.reaper import Reaped, reap
from wrenn.core.egress import Egress

__all__ = [
    "GATEWAY_IP",
    "GUEST_IP",
    "GUEST_MAC",
    "GUEST_PREFIX_LEN",
    "TAP_MAC",
    "TAP_NAME",
    "Egress",
    "NetworkPlan",
    "Reaped",
    "Slot",
    "SlotAddresses",
    "SlotPool",
    "kernel_ip_arg",
    "reap",
]
