"""``wrenn sandbox``: create, list, exec, shell, pause, resume, kill, logs."""

from __future__ import annotations

import shlex
import sys
from typing import Annotated, Any

import typer

from wrenn.cli import context, output, sdk
from wrenn.cli.output import Column, field, when
from wrenn.core.errors import InvalidArgument

app = typer.Typer(
    help="Create, inspect and drive sandboxes.", no_args_is_help=True, rich_markup_mode="markdown"
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the API's JSON.")]
SandboxId = Annotated[str, typer.Argument(help="Sandbox id.", show_default=False)]
User = Annotated[
    str | None, typer.Option("--user", "-u", help="User to run as (default: the sandbox's).")
]
Cwd = Annotated[str | None, typer.Option("--cwd", help="Working directory in the sandbox.")]

COLUMNS = [
    Column("SANDBOX", field("sandboxID"), key=True),
    Column("TEMPLATE", field("templateID")),
    Column("STATE", field("state")),
    Column("CPU", field("cpuCount")),
    Column("MEMORY MB", field("memoryMB")),
    Column("STARTED", lambda r: when(r.get("startedAt"))),
    Column("ENDS", lambda r: when(r.get("endAt"))),
    Column(
        "METADATA", lambda r: " ".join(f"{k}={v}" for k, v in (r.get("metadata") or {}).items())
    ),
]


def pairs(values: list[str] | None, what: str) -> dict[str, str]:
    """``KEY=VALUE`` options as a dict."""
    out: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{what} must be KEY=VALUE (got {item!r})")
        out[key] = value
    return out


@app.command()
def create(
    ctx: typer.Context,
    template: Annotated[str, typer.Argument(help="Template id or snapshot.")] = "base",
    timeout_s: Annotated[
        int | None,
        typer.Option("--timeout", min=0, help="Seconds until the sandbox ends (server default)."),
    ] = None,
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", "-m", help="KEY=VALUE, repeatable.")
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE, repeatable.")
    ] = None,
    auto_pause: Annotated[
        bool, typer.Option("--auto-pause", help="Pause instead of ending at the timeout.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Create a sandbox and print its id."""
    body: dict[str, Any] = {
        "templateID": template,
        "metadata": pairs(metadata, "--metadata"),
        "envVars": pairs(env, "--env"),
    }
    if timeout_s is not None:
        body["timeout"] = timeout_s
    if auto_pause:
        body["autoPause"] = True
    with context.of(ctx).client() as api:
        made = api.post("/v2/sandboxes", body)
    if as_json:
        output.print_json(made)
    else:
        sys.stdout.write(f"{made['sandboxID']}\n")


@app.command("list")
def list_(
    ctx: typer.Context,
    state: Annotated[
        list[str] | None,
        typer.Option("--state", help="running or paused, repeatable (default: both)."),
    ] = None,
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", "-m", help="KEY=VALUE filter, repeatable.")
    ] = None,
    template: Annotated[str | None, typer.Option("--template", help="Only this template.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="At most this many.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """List running and paused sandboxes, newest first."""
    params: dict[str, str | int | list[str]] = {"limit": min(limit or 100, 100)}
    if state:
        params["state"] = state
    if metadata:
        # As the e2b SDK sends it: k=v&k2=v2, each part percent-quoted.
        from urllib.parse import urlencode

        params["metadata"] = urlencode(pairs(metadata, "--metadata"))
    if template:
        params["template"] = template
    with context.of(ctx).client() as api:
        rows = list(api.pages("/v2/sandboxes", params, limit))
    output.listing(rows, COLUMNS, as_json=as_json, empty="no sandboxes")


def command_line(argv: list[str]) -> str:
    """One argument is a shell command as typed; several are quoted into one."""
    if argv and argv[0] == "--":  # kept by the parser once arguments have started
        argv = argv[1:]
    if not argv:
        raise InvalidArgument("no command given: wrenn sandbox exec SANDBOX -- COMMAND [ARGS...]")
    return argv[0] if len(argv) == 1 else shlex.join(argv)


@app.command(
    "exec", context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True}
)
def exec_(
    ctx: typer.Context,
    sandbox_id: SandboxId,
    command: Annotated[
        list[str], typer.Argument(help="Command (after --); one argument runs as a shell line.")
    ],
    user: User = None,
    cwd: Cwd = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE, repeatable.")
    ] = None,
) -> None:
    """Run a command in a sandbox; its output streams here and its exit code is ours."""
    import e2b

    line = command_line(command)
    envs = pairs(env, "--env")
    sandbox = sdk.connect(context.of(ctx), sandbox_id)

    def out(chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    def err(chunk: str) -> None:
        sys.stderr.write(chunk)
        sys.stderr.flush()

    try:
        with sdk.sdk_errors(sandbox_id):
            sandbox.commands.run(
                line,
                envs=envs,
                user=user,
                cwd=cwd,
                on_stdout=out,
                on_stderr=err,
                timeout=0,
                retain_output=False,
            )
    except e2b.CommandExitException as exited:
        raise typer.Exit(exited.exit_code) from None


@app.command()
def shell(ctx: typer.Context, sandbox_id: SandboxId, user: User = None, cwd: Cwd = None) -> None:
    """Open an interactive terminal in a sandbox (exit the shell to leave)."""
    from wrenn.cli.shell import require_terminal, run_shell

    require_terminal()
    sandbox = sdk.connect(context.of(ctx), sandbox_id)
    with sdk.sdk_errors(sandbox_id):
        code = run_shell(sandbox, user=user, cwd=cwd)
    raise typer.Exit(code)


@app.command()
def pause(ctx: typer.Context, sandbox_ids: Annotated[list[str], typer.Argument()]) -> None:
    """Pause sandboxes (memory and disk kept; resume or connect brings them back)."""
    with context.of(ctx).client() as api:
        for sandbox_id in sandbox_ids:
            api.post(f"/sandboxes/{sandbox_id}/pause")
            output.info(f"paused {sandbox_id}")


@app.command()
def resume(
    ctx: typer.Context,
    sandbox_id: SandboxId,
    timeout_s: Annotated[
        int | None, typer.Option("--timeout", min=0, help="Seconds until it ends again.")
    ] = None,
) -> None:
    """Resume a paused sandbox."""
    body = {"timeout": timeout_s} if timeout_s is not None else {}
    with context.of(ctx).client() as api:
        api.post(f"/sandboxes/{sandbox_id}/resume", body)
    output.info(f"resumed {sandbox_id}")


@app.command()
def kill(ctx: typer.Context, sandbox_ids: Annotated[list[str], typer.Argument()]) -> None:
    """End sandboxes for good."""
    with context.of(ctx).client() as api:
        for sandbox_id in sandbox_ids:
            api.delete(f"/sandboxes/{sandbox_id}")
            output.info(f"killed {sandbox_id}")


@app.command()
def logs(
    ctx: typer.Context,
    sandbox_id: SandboxId,
    limit: Annotated[int, typer.Option("--limit", min=0, max=10_000)] = 1000,
    as_json: JsonFlag = False,
) -> None:
    """Print a sandbox's logs."""
    with context.of(ctx).client() as api:
        got = api.get(f"/sandboxes/{sandbox_id}/logs", params={"limit": limit})
    entries = got.get("logs") or []
    if as_json:
        output.print_json(entries)
        return
    for entry in entries:
        sys.stdout.write(f"{when(entry.get('timestamp'))}  {entry.get('line', '')}\n")
