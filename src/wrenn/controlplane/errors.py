"""The control plane's own refinements of ``wrenn.core.errors`` where its REST API needs a
different HTTP status than the Connect table gives (the code in the body stays the same).

    FailedPrecondition
    └── Conflict            409  the resource is in the wrong state (already paused, ...)
    ResourceExhausted
    └── NoHostAvailable     503  no live host has room; retry later
    Unavailable
    └── BadGateway          502  the proxy cannot reach a sandbox (or it has ended)
"""

from __future__ import annotations

from wrenn.core.errors import FailedPrecondition, ResourceExhausted, Unavailable


class Conflict(FailedPrecondition):
    @property
    def http_status(self) -> int:
        return 409


class NoHostAvailable(ResourceExhausted):
    @property
    def http_status(self) -> int:
        return 503


class BadGateway(Unavailable):
    """What the sandbox proxy answers when the sandbox is gone or cannot be reached. The e2b
    SDK reads a 502 as "sandbox not running" when the message says ``was not found`` and as
    "unreachable" otherwise."""

    @property
    def http_status(self) -> int:
        return 502
