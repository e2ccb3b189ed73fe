"""Wrenn's control plane: the E2B-compatible REST API, teams and keys, hosts, placement and
sandbox lifecycle. It reaches host agents only through proto/hostagent (Connect RPC)."""

from wrenn.controlplane.app import build, run
from wrenn.controlplane.config import ControlPlaneSettings
from wrenn.controlplane.context import BootstrapKey, ControlPlane
from wrenn.controlplane.extension import Extension

__all__ = ["BootstrapKey", "ControlPlane", "ControlPlaneSettings", "Extension", "build", "run"]
