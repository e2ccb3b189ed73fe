"""The control plane's own refinements of ``wrenn.core.errors`` where its REST API needs a
different HTTP status than the Connect table gives (the code in the body stays the same).

    FailedPrecondition
    └── Conflict            409  the resource is in the wrong state (already paused, ...)
    ResourceExhausted
    └── NoHostAvailable     503  no live host has room; retry later
"""

from __future__ import annotations

from wrenn.core.errors import FailedPrecondition, ResourceExhausted


class Conflict(FailedPrecondition):
    @property
    def http_status(self) -> int:
        return 409


class NoHostAvailable(ResourceExhausted):
    @property
    def http_status(self) -> int:
        return 503
