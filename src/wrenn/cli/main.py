"""The ``wrenn`` command: global options, the command groups, and the one place errors
become messages and exit codes (0 ok, 1 error, 2 usage)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from wrenn.cli import config, context, host, key, output, sandbox, snapshot, template
from wrenn.cli.context import DEFAULT_API_URL, CliContext
from wrenn.cli.up import up
from wrenn.core.errors import InvalidArgument, WrennError


class _Edge(TyperGroup):
    """Every ``WrennError`` a command raises ends here: one line on stderr, exit code 1."""

    def invoke(self, ctx: Any) -> Any:  # typer's own click Context
        try:
            return super().invoke(ctx)
        except WrennError as err:
            output.error(err.message)
            raise typer.Exit(1) from None


app = typer.Typer(
    name="wrenn",
    cls=_Edge,
    help="Wrenn: self-hosted microVM sandboxes (E2B-compatible).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(sandbox.app, name="sandbox")
app.add_typer(template.app, name="template")
app.add_typer(snapshot.app, name="snapshot")
app.add_typer(host.app, name="host")
app.add_typer(key.app, name="key")
app.command()(up)


@app.callback()
def root(
    ctx: typer.Context,
    api_url: Annotated[
        str | None,
        typer.Option(
            "--api-url",
            envvar="WRENN_API_URL",
            help=f"Control plane URL (default: config file, else {DEFAULT_API_URL}).",
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="WRENN_API_KEY", help="API key (default: config file)."),
    ] = None,
    sandbox_url: Annotated[
        str | None,
        typer.Option(
            "--sandbox-url",
            envvar="WRENN_SANDBOX_URL",
            help="Where exec/shell traffic goes: the sandbox proxy, or one envd when debugging "
            "(default: config file, else {port}-{sandbox}.{domain} when the control plane "
            "announces a domain, else the API URL).",
        ),
    ] = None,
    config_path: Annotated[
        Path | None,
        typer.Option(
            "--config",
            envvar="WRENN_CONFIG",
            dir_okay=False,
            help="Config file (default: ~/.config/wrenn/config.toml).",
        ),
    ] = None,
) -> None:
    try:
        ctx.obj = CliContext.resolve(
            api_url=api_url, api_key=api_key, sandbox_url=sandbox_url, config_path=config_path
        )
    except WrennError as err:
        output.error(err.message)
        raise typer.Exit(1) from None


@app.command()
def login(ctx: typer.Context) -> None:
    """Check an API key and save it to the config file.

    The key comes from --api-key or WRENN_API_KEY, else it is asked for; the control plane
    URL (and --sandbox-url, when given) are saved with it."""
    cli = context.of(ctx)
    api_key = cli.api_key
    if not api_key:
        if not sys.stdin.isatty():
            raise InvalidArgument("no API key: pass --api-key or set WRENN_API_KEY")
        api_key = typer.prompt("API key", hide_input=True).strip()
    checked = CliContext(cli.api_url, api_key, cli.sandbox_url, cli.config_path)
    with checked.client() as api:
        teams = api.get("/v1/teams")
    config.update(
        cli.config_path, api_url=cli.api_url, api_key=api_key, sandbox_url=cli.sandbox_url
    )
    names = ", ".join(t["name"] for t in teams)
    output.info(f"logged in to {cli.api_url} (teams: {names}); saved to {cli.config_path}")


def main() -> None:
    app(prog_name="wrenn")
