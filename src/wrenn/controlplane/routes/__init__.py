"""HTTP routes, one module per resource."""

from wrenn.controlplane.routes import (
    audit,
    channels,
    hosts,
    metrics,
    sandboxes,
    snapshots,
    teams,
    templates,
)

ROUTERS = (
    # Before sandboxes: /sandboxes/metrics is no sandbox id.
    metrics.router,
    sandboxes.router,
    templates.router,
    hosts.router,
    teams.router,
    snapshots.router,
    audit.router,
    channels.router,
)

__all__ = ["ROUTERS"]
