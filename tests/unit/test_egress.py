"""A sandbox's egress policy from the API's strings, and the nft chain it becomes (applied
for real in tests/integration/agent/test_network.py)."""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest

from wrenn.agent.network import Egress
from wrenn.agent.network.nftables import egress_ruleset
from wrenn.core.egress import MAX_ENTRIES
from wrenn.core.errors import InvalidArgument


def test_entries_become_collapsed_networks() -> None:
    egress = Egress.parse(
        internet=True,
        allow=["8.8.8.8", " 10.1.0.0/16", "10.0.0.0/8", "192.168.1.7/24"],
        deny=["0.0.0.0/0"],
    )
    assert egress.allow == (
        IPv4Network("8.8.8.8/32"),
        IPv4Network("10.0.0.0/8"),
        IPv4Network("192.168.1.0/24"),
    )
    assert egress.allow_out == ["8.8.8.8/32", "10.0.0.0/8", "192.168.1.0/24"]
    assert egress.deny_out == ["0.0.0.0/0"]
    assert not egress.unrestricted
    assert Egress(internet=True).unrestricted


@pytest.mark.parametrize(
    ("field", "entry"),
    [
        ("allowOut", "example.com"),
        ("allowOut", "*.example.com"),
        ("denyOut", "2001:db8::/32"),
        ("denyOut", "10.0.0.0/33"),
        ("allowOut", ""),
    ],
)
def test_a_bad_entry_is_named(field: str, entry: str) -> None:
    kwargs = {"allow": [entry]} if field == "allowOut" else {"deny": [entry]}
    with pytest.raises(InvalidArgument, match=field) as raised:
        Egress.parse(internet=True, **kwargs)
    assert repr(entry) in str(raised.value)


def test_too_many_entries() -> None:
    with pytest.raises(InvalidArgument, match=f"at most {MAX_ENTRIES}"):
        Egress.parse(internet=False, allow=[f"10.0.{i // 256}.{i % 256}" for i in range(300)])


def test_the_chain_allows_then_denies_then_lets_the_rest_out() -> None:
    egress = Egress.parse(internet=True, allow=["1.2.3.4"], deny=["1.2.0.0/16", "5.6.7.8"])
    assert egress_ruleset(egress).splitlines() == [
        "flush chain inet wrenn egress",
        "add rule inet wrenn egress ip daddr { 1.2.3.4/32 } accept",
        "add rule inet wrenn egress ip daddr { 1.2.0.0/16, 5.6.7.8/32 } drop",
        "add rule inet wrenn egress accept",
    ]
    # Without the internet a denied block has nothing to take away: only what is allowed.
    closed = Egress.parse(internet=False, allow=["1.2.3.4"], deny=["1.2.0.0/16"])
    assert egress_ruleset(closed).splitlines() == [
        "flush chain inet wrenn egress",
        "add rule inet wrenn egress ip daddr { 1.2.3.4/32 } accept",
    ]
    assert egress_ruleset(Egress()).splitlines() == ["flush chain inet wrenn egress"]
