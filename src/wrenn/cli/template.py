"""``wrenn template``: build, list, delete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from wrenn.cli import context, output
from wrenn.cli.output import Column, field, when
from wrenn.core.errors import InvalidArgument, Unavailable

app = typer.Typer(
    help="Build and manage templates.", no_args_is_help=True, rich_markup_mode="markdown"
)

#: Templates ``build`` knows how to make.
BUILDABLE = ("base",)
#: The image builder, run as its own process so the CLI imports nothing of the host agent.
BUILDER_MODULE = "wrenn.agent.images"

COLUMNS = [
    Column("TEMPLATE", field("templateID"), key=True),
    Column("BUILD", field("buildID"), key=True),
    Column("CPU", field("cpuCount")),
    Column("MEMORY MB", field("memoryMB")),
    Column("DISK MB", field("diskSizeMB")),
    Column("PUBLIC", lambda r: "yes" if r.get("public") else "no"),
    Column("SPAWNS", field("spawnCount")),
    Column("UPDATED", lambda r: when(r.get("updatedAt"))),
]


def builder_command(
    state_dir: Path | None, envd_wheel: Path | None, force: bool, python: str
) -> list[str]:
    argv = [python, "-m", BUILDER_MODULE]
    if state_dir is not None:
        argv += ["--state-dir", str(state_dir)]
    if envd_wheel is not None:
        argv += ["--envd-wheel", str(envd_wheel)]
    if force:
        argv.append("--force")
    return argv


@app.command()
def build(
    name: Annotated[str, typer.Argument(help="Template to build: base.")],
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="Host agent state directory (default: its settings)."),
    ] = None,
    envd_wheel: Annotated[
        Path | None, typer.Option("--envd-wheel", help="Install this envd wheel in the guest.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when cached.")] = False,
) -> None:
    """Build a template's guest image on this machine.

    Runs the host agent's image builder (needs root and debootstrap); the agent snapshots
    the image into the template when it starts."""
    if name not in BUILDABLE:
        raise typer.BadParameter(
            f"{name!r}: only {', '.join(BUILDABLE)} can be built", param_hint="NAME"
        )
    argv = builder_command(state_dir, envd_wheel, force, sys.executable)
    try:
        done = subprocess.run(argv, check=False)
    except OSError as err:
        raise Unavailable(f"cannot run the image builder ({err.strerror})") from err
    if done.returncode != 0:
        raise typer.Exit(1)


@app.command("list")
def list_(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """List the templates your team can start sandboxes from."""
    with context.of(ctx).client() as api:
        rows = api.get("/templates")
    output.listing(rows, COLUMNS, as_json=as_json, empty="no templates")


@app.command()
def delete(ctx: typer.Context, template_ids: Annotated[list[str], typer.Argument()]) -> None:
    """Delete templates your team owns."""
    for template_id in template_ids:
        if not template_id:
            raise InvalidArgument("empty template id")
    with context.of(ctx).client() as api:
        for template_id in template_ids:
            api.delete(f"/templates/{template_id}")
            output.info(f"deleted {template_id}")
