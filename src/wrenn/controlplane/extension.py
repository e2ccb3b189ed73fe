"""What an extension package gives the control plane. A stub for now: ``run`` and ``build``
accept extensions, run their migrations after ours and let them add routes."""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from fastapi import FastAPI

    from wrenn.controlplane.context import ControlPlane


@runtime_checkable
class Extension(Protocol):
    #: Short, unique; names its migration branch.
    name: str

    def migration_locations(self) -> Sequence[Traversable | Path]:
        """Alembic version directories whose revisions depend on ours (may be empty)."""
        ...

    def install(self, app: FastAPI, cp: ControlPlane) -> None:
        """Add routes, middleware or hooks to the app before it starts."""
        ...
