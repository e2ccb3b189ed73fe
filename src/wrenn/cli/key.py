"""``wrenn key``: create, list, revoke API keys of your team (an admin team's key may name
another team with ``--team``)."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from wrenn.cli import config, context, output
from wrenn.cli.client import ControlPlaneClient
from wrenn.cli.output import Column, field, when
from wrenn.core.errors import NotFound

app = typer.Typer(help="API keys of your team.", no_args_is_help=True, rich_markup_mode="markdown")

COLUMNS = [
    Column("KEY", field("keyID"), key=True),
    Column("NAME", field("name")),
    Column("PREFIX", field("prefix"), key=True),
    Column("CREATED", lambda r: when(r.get("createdAt"))),
    Column("LAST USED", lambda r: when(r.get("lastUsedAt"))),
    Column("REVOKED", lambda r: when(r.get("revokedAt"))),
]

Team = Annotated[
    str | None, typer.Option("--team", help="Team id (default: the team of the key in use).")
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the API's JSON.")]


def own_team(api: ControlPlaneClient, api_key: str) -> str:
    """The id of the team ``api_key`` belongs to. A non-admin key sees only its own team; an
    admin key sees every team, so its team is the one listing a live key with its prefix."""
    teams: list[dict[str, Any]] = api.get("/v1/teams")
    if len(teams) == 1:
        return str(teams[0]["teamID"])
    for team in teams:
        for key in api.get(f"/v1/teams/{team['teamID']}/api-keys"):
            if not key.get("revokedAt") and api_key.startswith(key["prefix"]):
                return str(team["teamID"])
    raise NotFound("cannot tell which team this API key belongs to: pass --team")


@app.command()
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("--name", help="A label to tell keys apart.")] = "cli",
    team: Team = None,
    save: Annotated[
        bool, typer.Option("--save", help="Store the new key in the config file and use it.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Create an API key and print its secret (shown this once)."""
    cli = context.of(ctx)
    with cli.client() as api:
        team_id = team or own_team(api, cli.require_key())
        made = api.post(f"/v1/teams/{team_id}/api-keys", {"name": name})
    if save:
        config.update(cli.config_path, api_url=cli.api_url, api_key=made["key"])
    if as_json:
        output.print_json(made)
    else:
        sys.stdout.write(f"{made['key']}\n")
        output.info(
            f"key {made['keyID']} of team {made['teamID']}; the secret above is not shown again"
        )
    if save:
        output.info(f"saved to {cli.config_path}")


@app.command("list")
def list_(ctx: typer.Context, team: Team = None, as_json: JsonFlag = False) -> None:
    """List API keys (secrets are never shown, only their prefix)."""
    cli = context.of(ctx)
    with cli.client() as api:
        team_id = team or own_team(api, cli.require_key())
        rows = api.get(f"/v1/teams/{team_id}/api-keys")
    output.listing(rows, COLUMNS, as_json=as_json, empty="no API keys")


@app.command()
def revoke(
    ctx: typer.Context,
    key_ids: Annotated[list[str], typer.Argument(help="Key ids (key_...).")],
    team: Team = None,
) -> None:
    """Revoke API keys; requests with them fail from now on."""
    cli = context.of(ctx)
    with cli.client() as api:
        team_id = team or own_team(api, cli.require_key())
        for key_id in key_ids:
            api.delete(f"/v1/teams/{team_id}/api-keys/{key_id}")
            output.info(f"revoked {key_id}")
