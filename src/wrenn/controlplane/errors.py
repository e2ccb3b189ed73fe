"""The control plane's own refinements of ``wrenn.core.errors`` where its REST API needs a
different HTTP status than the Connect table gives (the code in the body stays the same).

    FailedPrecondition
    └── Conflict            409  the resource is in the wrong state (already paused, ...)
    ResourceExhausted
    └── NoHostAvailable     503  no live host has room; retry later

BadGateway (502: the proxy cannot reach a sandbox, or it has ended) is ``wrenn.core.errors``'s,
shared with the host agent's forwarding path.
"""

from __future__ import annotations

from wrenn.core.errors import BadGateway, FailedPrecondition, ResourceExhausted

__all__ = ["BadGateway", "Conflict", "NoHostAvailable"]


class Conflict(FailedPrecondition):
    @property
    def http_status(self) -> int:
        return 409


class NoHostAvailable(ResourceExhausted):
    @property
    def http_status(self) -> int:
        return 503
