"""What one control plane process owns, handed to routes (``current``), background workers and
extensions alike."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection

from wrenn.controlplane.audit import Audit
from wrenn.controlplane.config import ControlPlaneSettings
from wrenn.controlplane.db import Database
from wrenn.controlplane.events import Events
from wrenn.controlplane.hostpool import HostPool
from wrenn.controlplane.keycache import KeyCache
from wrenn.controlplane.sandboxes import Sandboxes
from wrenn.controlplane.scheduler import Scheduler

if TYPE_CHECKING:
    from wrenn.controlplane.extension import Extension


@dataclass(frozen=True)
class BootstrapKey:
    """The admin team and API key made on first start with an empty database."""

    team_id: str
    api_key: str


@dataclass
class ServerContext:
    config: ControlPlaneSettings
    db: Database
    #: Connect clients to the host agents.
    hosts: HostPool
    scheduler: Scheduler
    sandboxes: Sandboxes
    audit: Audit
    events: Events
    #: API keys recently authenticated (see ``keycache``).
    keys: KeyCache
    extensions: list[Extension] = field(default_factory=list)
    #: Set by the first start on an empty database; ``None`` otherwise.
    bootstrap_key: BootstrapKey | None = None
    #: Set once migrations ran and the workers started (the proxy answers 503 until then).
    started: asyncio.Event = field(default_factory=asyncio.Event)


def current(conn: HTTPConnection) -> ServerContext:
    """The context of the app serving ``conn`` (a FastAPI dependency)."""
    ctx: ServerContext = conn.app.state.context
    return ctx
