"""Building and tearing down one slot's kernel objects: its namespace, the veth pair from the
host into it, the tap, addresses, routes, neighbour entry and nft table. Blocking netlink and
subprocesses: call from a worker thread."""

from __future__ import annotations

from pyroute2 import IPRoute, NetlinkError, netns

from wrenn import log
from wrenn.agent.network import command, conntrack, nftables
from wrenn.agent.network.addressing import (
    GATEWAY_IP,
    GUEST_IP,
    GUEST_MAC,
    GUEST_PREFIX_LEN,
    NS_VETH_NAME,
    TAP_MAC,
    TAP_NAME,
    SlotAddresses,
)
from wrenn.core.egress import Egress
from wrenn.core.errors import Internal

_log = log.get(__name__)
_NUD_PERMANENT = 0x80


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise Internal(f"interface {ifname} vanished while being configured")
    return int(found[0])


def build(slot: SlotAddresses) -> None:
    """Create every kernel object of ``slot``; on failure remove what was made and raise."""
    try:
        netns.create(slot.netns)
        # Forwarding between veth0 and tap0 is per namespace and off in a new one.
        command.run(command.in_netns(slot.netns, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]))
        with IPRoute() as host:
            host.link(
                "add",
                ifname=slot.host_veth,
                kind="veth",
                peer={"ifname": NS_VETH_NAME, "net_ns_fd": slot.netns},
            )
            veth = _index(host, slot.host_veth)
            host.addr("add", index=veth, address=str(slot.host_ip), prefixlen=30)
            host.link("set", index=veth, state="up")
        with IPRoute(netns=slot.netns, flags=0) as ns:
            ns.link("set", index=_index(ns, "lo"), state="up")
            inner = _index(ns, NS_VETH_NAME)
            ns.addr("add", index=inner, address=str(slot.ns_ip), prefixlen=30)
            ns.link("set", index=inner, state="up")
            ns.route("add", dst="0.0.0.0/0", gateway=str(slot.host_ip))
            ns.link("add", ifname=TAP_NAME, kind="tuntap", mode="tap")
            tap = _index(ns, TAP_NAME)
            ns.link("set", index=tap, address=TAP_MAC)
            ns.addr("add", index=tap, address=str(GATEWAY_IP), prefixlen=GUEST_PREFIX_LEN)
            ns.link("set", index=tap, state="up")
            # The guest's MAC is the same in every slot: no ARP round after a restore.
            ns.neigh(
                "add",
                dst=str(GUEST_IP),
                lladdr=GUEST_MAC,
                ifindex=tap,
                state=_NUD_PERMANENT,
            )
        with IPRoute() as host:
            host.route(
                "add",
                dst=f"{slot.sandbox_ip}/32",
                gateway=str(slot.ns_ip),
                oif=_index(host, slot.host_veth),
            )
        nftables.apply(nftables.slot_ruleset(slot), netns=slot.netns)
    except BaseException as err:
        try:
            teardown(slot)
        except Exception:
            _log.warning("network.slot_teardown_failed", slot=slot.index, exc_info=True)
        if isinstance(err, NetlinkError | OSError):
            raise Internal(f"building network slot {slot.index} failed: {err}") from err
        raise


def teardown(slot: SlotAddresses) -> None:
    """Remove every kernel object of ``slot``. Idempotent.

    The host veth is deleted explicitly: deleting a namespace drops its devices only once the
    kernel has finished with it, asynchronously."""
    with IPRoute() as host:
        found = host.link_lookup(ifname=slot.host_veth)
        if found:
            host.link("del", index=found[0])
    if slot.netns in netns.listnetns():
        netns.remove(slot.netns)


def set_egress(slot: SlotAddresses, egress: Egress) -> None:
    """Let the guest open connections out of the slot as ``egress`` says. Unless everything
    is let out, the flows it opened are forgotten: the next packet of each is judged anew
    (a flow still allowed goes on, a refused one stops)."""
    nftables.apply(nftables.egress_ruleset(egress), netns=slot.netns)
    if not egress.unrestricted:
        conntrack.forget([GUEST_IP], netns=slot.netns)


def reset(slot: SlotAddresses) -> None:
    """Return ``slot`` to its pristine state for the next sandbox: internet access off and no
    connection-tracking state left in the namespace or on the host for its sandbox address."""
    nftables.apply(nftables.egress_ruleset(Egress()), netns=slot.netns)
    conntrack.flush_netns(slot.netns)
    conntrack.forget([slot.sandbox_ip])
