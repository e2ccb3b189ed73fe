"""``wrenn snapshot``: create, list, delete named snapshots of running sandboxes."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from wrenn.cli import context, output
from wrenn.cli.output import Column, field, when

app = typer.Typer(
    help="Snapshot running sandboxes.", no_args_is_help=True, rich_markup_mode="markdown"
)

COLUMNS = [
    Column("SNAPSHOT", field("snapshotID"), key=True),
    Column("NAME", field("name")),
    Column("SANDBOX", field("sandboxID"), key=True),
    Column("TEMPLATE", field("templateID")),
    Column("CPU", field("cpuCount")),
    Column("MEMORY MB", field("memoryMB")),
    Column("SIZE MB", lambda r: f"{(r.get('sizeBytes') or 0) / 2**20:.1f}"),
    Column("CREATED", lambda r: when(r.get("createdAt"))),
]

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the API's JSON.")]


@app.command()
def create(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(help="Running sandbox to snapshot.")],
    name: Annotated[str | None, typer.Option("--name", help="Name to start sandboxes by.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Snapshot a running sandbox (it keeps running) and print the snapshot's id."""
    body = {"sandboxID": sandbox_id, **({"name": name} if name else {})}
    with context.of(ctx).client() as api:
        made = api.post("/v1/snapshots", body)
    if as_json:
        output.print_json(made)
    else:
        sys.stdout.write(f"{made['snapshotID']}\n")


@app.command("list")
def list_(
    ctx: typer.Context,
    sandbox_id: Annotated[
        str | None, typer.Option("--sandbox", help="Only snapshots of this sandbox.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """List your team's snapshots."""
    params = {"sandboxID": sandbox_id} if sandbox_id else {}
    with context.of(ctx).client() as api:
        rows = list(api.pages("/v1/snapshots", params))
    output.listing(rows, COLUMNS, as_json=as_json, empty="no snapshots")


@app.command()
def delete(
    ctx: typer.Context,
    refs: Annotated[list[str], typer.Argument(help="Snapshot ids or names.")],
) -> None:
    """Delete snapshots."""
    with context.of(ctx).client() as api:
        for ref in refs:
            api.delete(f"/v1/snapshots/{ref}")
            output.info(f"deleted {ref}")
