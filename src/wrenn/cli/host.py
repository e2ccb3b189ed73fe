"""``wrenn host``: list hosts, drain one (admin)."""

from __future__ import annotations

from typing import Annotated

import typer

from wrenn.cli import context, output
from wrenn.cli.output import Column, field, when

app = typer.Typer(
    help="Hosts running sandboxes (needs an admin team's key).",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)

COLUMNS = [
    Column("HOST", field("hostID"), key=True),
    Column("ADDRESS", field("address"), key=True),
    Column("STATUS", field("status")),
    Column("LIVE", lambda r: "yes" if r.get("live") else "no"),
    Column("RUNTIME", field("runtime")),
    Column("SANDBOXES", field("sandboxes")),
    Column("CPU", field("cpuCount")),
    Column("MEMORY FREE MB", lambda r: f"{r.get('memoryFreeMB')}/{r.get('memoryMB')}"),
    Column("DISK FREE MB", lambda r: f"{r.get('diskFreeMB')}/{r.get('diskSizeMB')}"),
    Column("HEARTBEAT", lambda r: when(r.get("lastHeartbeatAt"))),
]


@app.command("list")
def list_(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """List registered hosts with their capacity and load."""
    with context.of(ctx).client() as api:
        rows = api.get("/v1/hosts")
    output.listing(rows, COLUMNS, as_json=as_json, empty="no hosts")


@app.command()
def drain(ctx: typer.Context, host_id: Annotated[str, typer.Argument(help="Host id.")]) -> None:
    """Send no new sandboxes to a host; those on it keep running."""
    with context.of(ctx).client() as api:
        host = api.post(f"/v1/hosts/{host_id}/drain")
    output.info(f"host {host['hostID']} is {host['status']} ({host['sandboxes']} sandboxes on it)")


@app.command()
def activate(ctx: typer.Context, host_id: Annotated[str, typer.Argument(help="Host id.")]) -> None:
    """Undo a drain."""
    with context.of(ctx).client() as api:
        host = api.post(f"/v1/hosts/{host_id}/activate")
    output.info(f"host {host['hostID']} is {host['status']}")
