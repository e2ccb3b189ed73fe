"""Wrenn's control plane: the E2B-compatible REST API, teams and keys, hosts, placement,
sandbox lifecycle, the sandbox proxy, audit, events and webhooks, reconciliation. It reaches
host agents only through proto/hostagent (Connect RPC) and their HTTP forwarding path."""

from wrenn.controlplane.app import build, run
from wrenn.controlplane.config import ControlPlaneSettings
from wrenn.controlplane.context import BootstrapKey, ServerContext
from wrenn.controlplane.events import Event, EventType
from wrenn.controlplane.extension import BasicExtension, Extension

__all__ = [
    "BasicExtension",
    "BootstrapKey",
    "ControlPlaneSettings",
    "Event",
    "EventType",
    "Extension",
    "ServerContext",
    "build",
    "run",
]
