"""Two sandboxes of one team cannot see each other: a file written in one is absent from the
other, and a server listening in one is unreachable from the other by its sandbox address
(the host-side address the agent and the proxy reach it at), while the host reaches it. A
sandbox's egress rules, given through the SDK, are its slot's rules on the host."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Network

import httpx
import pytest
from e2b import CommandExitException, Sandbox

from tests.e2e.conftest import Sandboxes, Stack

pytestmark = [pytest.mark.vm, pytest.mark.slow]

PORT = 8000
CONNECT = (
    "import socket, sys\n"
    "try:\n"
    "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()\n"
    "except OSError as err:\n"
    "    sys.exit('unreachable: ' + repr(err))\n"
    "print('connected')\n"
)


@pytest.fixture
def pair(sandboxes: Sandboxes) -> Iterator[tuple[Sandbox, Sandbox]]:
    yield sandboxes.create(metadata={"role": "a"}), sandboxes.create(metadata={"role": "b"})


def test_files_are_not_shared(pair: tuple[Sandbox, Sandbox]) -> None:
    a, b = pair
    for path in ("/home/user/secret.txt", "/tmp/secret.txt", "/opt/secret.txt"):
        a.commands.run(f"echo a > {path}", user="root")
        assert not b.files.exists(path)
    b.files.write("/home/user/b.txt", "b")
    assert not a.files.exists("/home/user/b.txt")
    assert a.files.read("/home/user/secret.txt") == "a\n"


def _reachable(address: str) -> bool:
    try:
        return httpx.get(f"http://{address}:{PORT}/", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _connect(sbx: Sandbox, address: str) -> None:
    """Connect to ``address``:PORT from inside ``sbx``; CommandExitException if it cannot."""
    sbx.commands.run(f"python3 /tmp/connect.py {address} {PORT}")


def test_network_is_not_shared(pair: tuple[Sandbox, Sandbox], stack: Stack) -> None:
    a, b = pair
    for sbx in pair:
        sbx.files.write("/tmp/connect.py", CONNECT)
    a.commands.run(f"python3 -m http.server {PORT} --directory /tmp", background=True)
    for _ in range(100):
        try:
            _connect(a, "127.0.0.1")
            break
        except CommandExitException:
            time.sleep(0.2)
    # A's sandbox address: the one address of the pool where the host finds its server.
    pool = [str(h) for h in IPv4Network(stack.home.sandbox_pool).hosts()][: stack.home.slots]
    serving: list[str] = []
    for _ in range(20):
        serving = [address for address in pool if _reachable(address)]
        if serving:
            break
        time.sleep(0.5)
    assert len(serving) == 1, serving

    with pytest.raises(CommandExitException) as refused:
        _connect(b, serving[0])
    assert "unreachable" in refused.value.stderr


def _egress_chain(stack: Stack, sbx: Sandbox) -> str:
    """The egress chain of the slot ``sbx`` runs in, as nft prints it on the host."""
    pool = [str(h) for h in IPv4Network(stack.home.sandbox_pool).hosts()]
    netns = f"{stack.home.prefix}-slot-{pool.index(stack.address_of(sbx.sandbox_id))}"
    return subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "list", "chain", "inet", "wrenn", "egress"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_egress_rules_are_the_slots(sandboxes: Sandboxes, stack: Stack) -> None:
    sbx = sandboxes.create(allow_internet_access=False, network={"allow_out": ["198.51.100.7"]})
    chain = _egress_chain(stack, sbx)
    assert "ip daddr { 198.51.100.7 } accept" in chain or "ip daddr 198.51.100.7 accept" in chain
    assert "drop" not in chain and chain.count("accept") == 1

    sbx.update_network({"deny_out": ["198.51.100.0/24"]})
    chain = _egress_chain(stack, sbx)
    assert "198.51.100.0/24 drop" in chain
    assert re.search(r"^\s*accept$", chain, re.M)  # the rest: internet on

    # After a pause the sandbox resumes into whichever slot is free, with the same rules.
    assert sbx.pause() is True
    again = Sandbox.connect(sbx.sandbox_id)
    assert "198.51.100.0/24 drop" in _egress_chain(stack, again)
