"""What an extension package adds to the control plane, and what it gets to work with.

An extension is any object with these attributes (``Extension``); ``BasicExtension`` is a
ready dataclass for the common case. ``wrenn.controlplane.run(extensions=[...])`` then:

1. runs our migrations, then each extension's version directory (``migrations``: an Alembic
   version directory whose first revision ``depends_on = "0001"`` and carries its own
   ``branch_labels``);
2. mounts its ``routes`` (one ``APIRouter`` or several) — audited like ours, and reaching the
   ``ServerContext`` through the ``wrenn.controlplane.auth.CP`` dependency;
3. wraps the API in its ``middleware`` (starlette ``Middleware`` entries, outermost first,
   inside Wrenn's own request id, error and audit layers);
4. starts each of its ``workers`` — ``async def worker(ctx: ServerContext) -> None`` — in the
   TaskGroup that lives as long as the server; a worker that returns is done, one that raises
   is logged and not restarted, and all are cancelled at shutdown.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from fastapi import APIRouter
from starlette.middleware import Middleware

if TYPE_CHECKING:
    from wrenn.controlplane.context import ServerContext

Worker = Callable[["ServerContext"], Awaitable[None]]


@runtime_checkable
class Extension(Protocol):
    #: Short and unique; names the extension in logs.
    name: str
    routes: APIRouter | Sequence[APIRouter]
    workers: Sequence[Worker]
    middleware: Sequence[Middleware]
    #: An Alembic version directory, or ``None``.
    migrations: Traversable | Path | None


@dataclass(frozen=True)
class BasicExtension:
    """An ``Extension`` from plain values; leave out what it does not add."""

    name: str
    routes: APIRouter | Sequence[APIRouter] = ()
    workers: Sequence[Worker] = ()
    middleware: Sequence[Middleware] = ()
    migrations: Traversable | Path | None = None


def routers_of(ext: Extension) -> list[APIRouter]:
    return [ext.routes] if isinstance(ext.routes, APIRouter) else list(ext.routes)
