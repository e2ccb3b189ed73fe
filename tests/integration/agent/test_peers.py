"""Aborting the host's TCP connections to one guest address (``network.peers``), as the agent
does before a pause and once a VM stops, on real loopback sockets: every connection to that
address ends at once for its holder (and its peer is reset); connections to other addresses
are untouched."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from wrenn.agent.network.peers import abort_connections_to

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="destroying sockets needs root")

#: Loopback addresses standing in for two guests (nothing else here uses them).
GUEST, OTHER = "127.0.0.4", "127.0.0.5"


@pytest.fixture
def listeners() -> Iterator[dict[str, socket.socket]]:
    socks = {}
    for address in (GUEST, OTHER):
        sock = socket.socket()
        sock.bind((address, 0))
        sock.listen()
        socks[address] = sock
    try:
        yield socks
    finally:
        for sock in socks.values():
            sock.close()


def _pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection(listener.getsockname(), timeout=5)
    server, _ = listener.accept()
    server.settimeout(5)
    return client, server


def test_connections_to_the_address_end_and_others_stay(
    listeners: dict[str, socket.socket],
) -> None:
    to_guest = [_pair(listeners[GUEST]) for _ in range(3)]
    to_other = _pair(listeners[OTHER])
    try:
        assert abort_connections_to(GUEST) >= 3
        for client, server in to_guest:
            # Aborted, or reset by its aborted peer: both sides face the guest's address.
            for sock in (client, server):
                with pytest.raises((ConnectionAbortedError, ConnectionResetError)):
                    sock.recv(1)
        client, server = to_other
        client.sendall(b"x")
        assert server.recv(1) == b"x"
        assert abort_connections_to(GUEST) == 0
    finally:
        for client, server in [*to_guest, to_other]:
            client.close()
            server.close()
