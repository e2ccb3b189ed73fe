"""HTTP routes, one module per resource."""

from wrenn.controlplane.routes import hosts, sandboxes, snapshots, teams, templates

ROUTERS = (sandboxes.router, templates.router, hosts.router, teams.router, snapshots.router)

__all__ = ["ROUTERS"]
