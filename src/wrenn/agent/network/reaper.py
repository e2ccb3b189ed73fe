"""Removing what an earlier, crashed agent left behind under a plan's prefix: host veths,
namespaces, host nft tables and conntrack entries of its address pools. Blocking: call from a
worker thread."""

from __future__ import annotations

from dataclasses import dataclass

from pyroute2 import IPRoute, netns

from wrenn.agent.network import conntrack, nftables
from wrenn.agent.network.addressing import NetworkPlan


@dataclass(frozen=True)
class Reaped:
    links: list[str]
    namespaces: list[str]
    tables: list[str]
    conntrack_entries: int

    @property
    def empty(self) -> bool:
        return not (self.links or self.namespaces or self.tables or self.conntrack_entries)


def reap(plan: NetworkPlan) -> Reaped:
    """Delete everything named under ``plan.prefix``. Safe to run when nothing is left."""
    links: list[str] = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get("ifname")
            if name and plan.owns_name(name):
                ipr.link("del", index=link["index"])
                links.append(name)
    namespaces = [name for name in netns.listnetns() if plan.owns_name(name)]
    for name in namespaces:
        netns.remove(name)
    tables = [
        name for family, name in nftables.tables() if family == "inet" and plan.owns_table(name)
    ]
    for name in tables:
        nftables.delete_table("inet", name)
    entries = conntrack.forget([plan.sandbox_pool])
    return Reaped(links=links, namespaces=namespaces, tables=tables, conntrack_entries=entries)
