"""What a slot pool needs from the host namespace: preconditions, the host nft table and IPv4
forwarding. Blocking: call from a worker thread."""

from __future__ import annotations

import os
from ipaddress import IPv4Network
from pathlib import Path

from pyroute2 import IPRoute

from wrenn.agent.network import command, nftables
from wrenn.agent.network.addressing import NetworkPlan
from wrenn.core.errors import FailedPrecondition

_IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def require() -> None:
    """Raise ``FailedPrecondition`` unless this process can build slots at all."""
    if os.geteuid() != 0:
        raise FailedPrecondition("network slots need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)")
    if not Path("/dev/net/tun").exists():
        raise FailedPrecondition("/dev/net/tun is missing (tun module not loaded?)")
    command.require("nft", "nftables")
    command.require("nsenter", "util-linux")
    command.require("sysctl", "procps")


def check_pools(plan: NetworkPlan) -> None:
    """Raise ``FailedPrecondition`` when ``plan``'s pools overlap an address or route of the
    host (other than the plan's own)."""
    pools = (plan.transit_pool, plan.sandbox_pool)
    with IPRoute() as ipr:
        names = {link["index"]: link.get("ifname") for link in ipr.get_links()}
        in_use: list[tuple[str, IPv4Network]] = []
        for addr in ipr.get_addr(family=2):
            net = IPv4Network(f"{addr.get('IFA_ADDRESS')}/{addr['prefixlen']}", strict=False)
            in_use.append((str(names.get(addr["index"], "?")), net))
        for route in ipr.get_routes(family=2, table=254):
            dst = route.get("RTA_DST")
            if dst is not None:
                net = IPv4Network(f"{dst}/{route['dst_len']}", strict=False)
                in_use.append((str(names.get(route.get("RTA_OIF"), "?")), net))
    for ifname, net in in_use:
        if plan.owns_name(ifname):
            continue
        for pool in pools:
            if pool.overlaps(net):
                raise FailedPrecondition(f"address pool {pool} overlaps {net} on {ifname}")


def ip_forward_enabled() -> bool:
    return _IP_FORWARD.read_text().strip() == "1"


def enable_ip_forward() -> None:
    """Sandboxes with internet access are routed through the host: IPv4 forwarding on."""
    if not ip_forward_enabled():
        _IP_FORWARD.write_text("1\n")


def install(plan: NetworkPlan) -> None:
    nftables.apply(nftables.host_ruleset(plan))


def uninstall(plan: NetworkPlan) -> None:
    if ("inet", plan.host_table) in nftables.tables():
        nftables.delete_table("inet", plan.host_table)
