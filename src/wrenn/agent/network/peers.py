"""Ending the host's TCP connections to one guest, whoever holds them: the agent's own (the
streaming envd client's requests in flight, which no pool closes), or any other process on
the host that dialled the guest's address (a control plane beside the agent: its proxy dials
guests itself). A guest that pauses comes back in another slot,
at another address, and a stopped one never comes back, so a connection to the old address
would hang for as long as its holder waits: each is aborted instead (``SOCK_DESTROY`` over
``sock_diag`` netlink, what ``ss -K`` does), its holder's next read or write fails at once
and the guest gets a reset.

Blocking netlink: call from a worker thread. Sockets in the caller's network namespace only,
IPv4 (guest addresses are).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from ipaddress import IPv4Address

from wrenn import log

_log = log.get(__name__)

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_SOCK_DESTROY = 21
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3

#: struct nlmsghdr: length, type, flags, sequence, port id.
_HEADER = struct.Struct("=IHHII")
#: struct inet_diag_req_v2 before its socket id: family, protocol, extensions, pad, states.
_REQUEST = struct.Struct("=BBBxI")
#: struct inet_diag_sockid: ports and addresses (big-endian), interface, cookie.
_SOCKID_BYTES = 48
#: Where the remote address starts in a socket id (after two ports and the local address).
_DST_AT = 4 + 16
#: struct inet_diag_msg: family, state, timer, retransmits, then the socket id.
_MSG_SOCKID_AT = 4

#: Every TCP state (a bit each), and those with a peer that would wait on the guest: all but
#: LISTEN (10), CLOSE (7), TIME_WAIT (6) and SYN_RECV (3).
_ALL_STATES = (1 << 12) - 1
_CONNECTED_STATES = _ALL_STATES & ~((1 << 10) | (1 << 7) | (1 << 6) | (1 << 3))

_unsupported_logged = False


def abort_connections_to(address: IPv4Address | str) -> int:
    """Abort every TCP connection of this network namespace whose peer is ``address``; how
    many. 0 when the kernel cannot (built without ``CONFIG_INET_DIAG_DESTROY``: logged once)."""
    peer = IPv4Address(address).packed
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as nl:
        nl.bind((0, 0))
        ids = [sockid for sockid in _dump(nl) if sockid[_DST_AT : _DST_AT + 4] == peer]
        aborted = 0
        for seq, sockid in enumerate(ids, start=2):
            err = _destroy(nl, seq, sockid)
            if err == 0:
                aborted += 1
            elif err == errno.EOPNOTSUPP:
                _unsupported()
                return 0
            elif err != errno.ENOENT:  # gone between the dump and now: nothing to do
                raise OSError(err, f"aborting a connection to {address}: {os.strerror(err)}")
        return aborted


def _request(msg_type: int, flags: int, seq: int, states: int, sockid: bytes) -> bytes:
    body = _REQUEST.pack(socket.AF_INET, socket.IPPROTO_TCP, 0, states) + sockid
    return _HEADER.pack(_HEADER.size + len(body), msg_type, flags, seq, 0) + body


def _messages(nl: socket.socket) -> list[tuple[int, bytes]]:
    """One read's messages: (type, payload)."""
    data = nl.recv(1 << 16)
    out: list[tuple[int, bytes]] = []
    at = 0
    while at + _HEADER.size <= len(data):
        length, msg_type, _, _, _ = _HEADER.unpack_from(data, at)
        if length < _HEADER.size:
            break
        out.append((msg_type, data[at + _HEADER.size : at + length]))
        at += (length + 3) & ~3
    return out


def _error(payload: bytes) -> int:
    """The errno an NLMSG_ERROR carries (0: an acknowledgement)."""
    code: int = struct.unpack_from("=i", payload)[0]
    return -code


def _dump(nl: socket.socket) -> list[bytes]:
    """The socket ids of this namespace's connected IPv4 TCP sockets."""
    nl.sendall(
        _request(
            _SOCK_DIAG_BY_FAMILY,
            _NLM_F_REQUEST | _NLM_F_DUMP,
            1,
            _CONNECTED_STATES,
            bytes(_SOCKID_BYTES),
        )
    )
    ids: list[bytes] = []
    while True:
        for msg_type, payload in _messages(nl):
            if msg_type == _NLMSG_DONE:
                return ids
            if msg_type == _NLMSG_ERROR:
                err = _error(payload)
                raise OSError(err, f"listing TCP sockets: {os.strerror(err)}")
            if msg_type == _SOCK_DIAG_BY_FAMILY:
                ids.append(payload[_MSG_SOCKID_AT : _MSG_SOCKID_AT + _SOCKID_BYTES])


def _destroy(nl: socket.socket, seq: int, sockid: bytes) -> int:
    nl.sendall(_request(_SOCK_DESTROY, _NLM_F_REQUEST | _NLM_F_ACK, seq, _ALL_STATES, sockid))
    while True:
        for msg_type, payload in _messages(nl):
            if msg_type == _NLMSG_ERROR:
                return _error(payload)


def _unsupported() -> None:
    global _unsupported_logged
    if not _unsupported_logged:
        _unsupported_logged = True
        _log.warning(
            "peers.abort_unsupported",
            reason="the kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY)",
        )
