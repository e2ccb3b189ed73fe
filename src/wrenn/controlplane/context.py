"""What one control plane process owns; request handlers reach it through ``current``."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from wrenn.controlplane.config import ControlPlaneSettings
from wrenn.controlplane.db import Database
from wrenn.controlplane.hostpool import HostPool
from wrenn.controlplane.sandboxes import Sandboxes


@dataclass(frozen=True)
class BootstrapKey:
    """The admin team and API key made on first start with an empty database."""

    team_id: str
    api_key: str


@dataclass
class ControlPlane:
    settings: ControlPlaneSettings
    db: Database
    hosts: HostPool
    sandboxes: Sandboxes
    #: Set by the first start on an empty database; ``None`` otherwise.
    bootstrap_key: BootstrapKey | None = None
    extensions: list[object] = field(default_factory=list)


def current(request: Request) -> ControlPlane:
    cp: ControlPlane = request.app.state.controlplane
    return cp
