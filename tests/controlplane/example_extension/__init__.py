"""An example extension package, as a third party would write one: a route (notes kept in a
table of its own), a worker (counts the events it sees and records its start), a middleware
(a response header) and an Alembic version directory of its own."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body
from sqlalchemy import text
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wrenn.controlplane import BasicExtension, Event, ServerContext
from wrenn.controlplane.auth import CP, Team

router = APIRouter(prefix="/v1/example", tags=["example"])
#: Event types the worker has seen, in order.
SEEN: list[str] = []


@router.post("/notes", status_code=201)
async def add_note(
    cp: CP, who: Team, note: Annotated[str, Body(embed=True, max_length=200)]
) -> dict[str, object]:
    async with cp.db.engine.begin() as conn:
        result = await conn.execute(
            text("INSERT INTO example_notes (team_id, note) VALUES (:team, :note) RETURNING id"),
            {"team": who.team.id, "note": note},
        )
        note_id = int(result.scalar_one())
    return {"id": str(note_id), "note": note}


@router.get("/notes")
async def list_notes(cp: CP, who: Team) -> list[str]:
    async with cp.db.engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT note FROM example_notes WHERE team_id = :team ORDER BY id"),
            {"team": who.team.id},
        )
        return [str(r[0]) for r in rows]


async def watch_events(ctx: ServerContext) -> None:
    """Records its start in its table, then keeps a list of every event type it sees."""
    async with ctx.db.engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO example_notes (team_id, note) VALUES ('-', :note)"),
            {"note": f"worker started {datetime.now(UTC).isoformat()}"},
        )
    queue: asyncio.Queue[Event] = asyncio.Queue()
    unsubscribe = ctx.events.subscribe(queue.put_nowait)
    try:
        while True:
            SEEN.append((await queue.get()).type)
    finally:
        unsubscribe()


class ExampleHeader:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-example", b"1")],
                }
            await send(message)

        await self.app(scope, receive, send_marked)


EXTENSION = BasicExtension(
    name="example",
    routes=router,
    workers=[watch_events],
    middleware=[Middleware(ExampleHeader)],
    migrations=Path(__file__).parent / "migrations",
)
