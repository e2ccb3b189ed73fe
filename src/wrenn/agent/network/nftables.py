"""nftables rulesets of the host and of each slot, applied with ``nft -f -`` (one atomic
transaction per call). Every value put into a ruleset is an address object, an int or a name
validated by ``NetworkPlan``, so no ruleset text comes from outside.

Host table ``inet <prefix>`` (one per pool):
  * forward: no new connection is forwarded into a slot (sandboxes cannot reach each other;
    only the host itself opens connections to sandboxes);
  * input: no new connection from a slot to the host itself;
  * postrouting: traffic from the sandbox pool leaving through a non-slot interface is
    masqueraded to the host's address (it only gets there when the slot lets it out).

Slot table ``inet wrenn`` (inside each namespace):
  * prerouting: <sandbox_ip> → 169.254.0.21, every port;
  * postrouting: 169.254.0.21 → <sandbox_ip> on the way out;
  * forward (policy drop): replies, connections into the guest, and guest-initiated traffic
    only as chain ``egress`` lets it out (``egress.Egress``: allowed destinations, then denied
    ones, then the internet on or off).
"""

from __future__ import annotations

import json

from wrenn.agent.network import command
from wrenn.agent.network.addressing import (
    GUEST_IP,
    NS_VETH_NAME,
    SLOT_TABLE,
    TAP_NAME,
    NetworkPlan,
    SlotAddresses,
)
from wrenn.core.egress import Egress


def host_ruleset(plan: NetworkPlan) -> str:
    table = plan.host_table
    slots = plan.host_veth_glob
    # "add + delete" first makes the script replace a table left over by an earlier run.
    return f"""\
add table inet {table}
delete table inet {table}
table inet {table} {{
    chain forward {{
        type filter hook forward priority filter; policy accept;
        oifname "{slots}" ct state new drop
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{slots}" ct state new drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {plan.sandbox_pool} oifname != "{slots}" masquerade
    }}
}}
"""


def slot_ruleset(slot: SlotAddresses) -> str:
    return f"""\
add table inet {SLOT_TABLE}
delete table inet {SLOT_TABLE}
table inet {SLOT_TABLE} {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{NS_VETH_NAME}" ip daddr {slot.sandbox_ip} dnat ip to {GUEST_IP}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{NS_VETH_NAME}" ip saddr {GUEST_IP} snat ip to {slot.sandbox_ip}
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "{NS_VETH_NAME}" oifname "{TAP_NAME}" ip daddr {GUEST_IP} ct status dnat accept
        iifname "{TAP_NAME}" oifname "{NS_VETH_NAME}" ip saddr {GUEST_IP} jump egress
    }}
    chain egress {{
    }}
}}
"""


def egress_ruleset(egress: Egress) -> str:
    """The slot's ``egress`` chain for ``egress``: allowed destinations accepted, then denied
    ones dropped, then everything accepted when the internet is on (the forward chain's
    policy drops what falls through)."""
    chain = f"inet {SLOT_TABLE} egress"
    script = f"flush chain {chain}\n"
    if egress.allow:
        script += f"add rule {chain} ip daddr {{ {', '.join(egress.allow_out)} }} accept\n"
    if egress.deny and egress.internet:
        script += f"add rule {chain} ip daddr {{ {', '.join(egress.deny_out)} }} drop\n"
    if egress.internet:
        script += f"add rule {chain} accept\n"
    return script


def apply(script: str, *, netns: str | None = None) -> None:
    """Apply ``script`` atomically in the host or a slot namespace."""
    command.run(command.in_netns(netns, ["nft", "-f", "-"]), stdin=script)


def tables(*, netns: str | None = None) -> list[tuple[str, str]]:
    """(family, name) of every nft table."""
    out = command.run(command.in_netns(netns, ["nft", "-j", "list", "tables"]))
    found: list[tuple[str, str]] = []
    for item in json.loads(out).get("nftables", []):
        table = item.get("table")
        if table is not None:
            found.append((str(table["family"]), str(table["name"])))
    return found


def delete_table(family: str, name: str, *, netns: str | None = None) -> None:
    command.run(command.in_netns(netns, ["nft", "delete", "table", family, name]))


def egress_rules(*, netns: str) -> str:
    """The ``egress`` chain of a slot, as nft prints it (for diagnostics and tests)."""
    return command.run(
        command.in_netns(netns, ["nft", "list", "chain", "inet", SLOT_TABLE, "egress"])
    )
