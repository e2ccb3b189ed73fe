"""HTTP/1.1 relaying at the byte level, shared by the control plane's sandbox proxy and the
host agent's forwarding path: heads are parsed, bodies are moved from socket to socket.

    front     FastPathProtocol: a uvicorn protocol that relays what a route claims and hands
              every other connection to uvicorn's own protocol and the ASGI app
    exchange  one request relayed (Forward) or answered (Answer)
    body      one body moved as framed: length, chunks, until close
    head      heads parsed (httptools) and written
    pool      upstream connections kept alive
    wire      one socket driven by the loop; bodies moved between two (splice, in batches
              from a peer elsewhere, one buffer, or a kernel redirect: ``redirect_in_kernel``)
    sockmap   the kernel redirect: a BPF verdict program moving a body socket to socket

Imports nothing of the project but ``core.errors`` and ``log``.
"""

from wrenn.core.http1.exchange import Answer, Forward, UpstreamFailed
from wrenn.core.http1.front import FastPathApp, FastPathProtocol, Route
from wrenn.core.http1.head import HOP_BY_HOP, Headers, RequestHead
from wrenn.core.http1.pool import ConnectError, Pool, Upstream
from wrenn.core.http1.wire import redirect_in_kernel

__all__ = [
    "HOP_BY_HOP",
    "Answer",
    "ConnectError",
    "FastPathApp",
    "FastPathProtocol",
    "Forward",
    "Headers",
    "Pool",
    "RequestHead",
    "Route",
    "Upstream",
    "UpstreamFailed",
    "redirect_in_kernel",
]
