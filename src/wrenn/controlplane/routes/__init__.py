"""HTTP routes, one module per resource."""

from wrenn.controlplane.routes import (
    audit,
    channels,
    hosts,
    sandboxes,
    snapshots,
    teams,
    templates,
)

ROUTERS = (
    sandboxes.router,
    templates.router,
    hosts.router,
    teams.router,
    snapshots.router,
    audit.router,
    channels.router,
)

__all__ = ["ROUTERS"]
