"""``wrenn up``: the control plane and a host agent on this machine, in the foreground.

The agent is wired to the control plane unless the environment already says otherwise:
``WRENN_AGENT_CONTROL_PLANE_URL`` is the control plane's address (from ``WRENN_CP_HOST`` /
``WRENN_CP_PORT``) and ``WRENN_AGENT_REGISTRATION_TOKEN`` a fresh one-time token from
``wrenn-cp create-host-token`` (an agent registered before keeps its stored credentials and
ignores it). The agent starts once the control plane answers ``/health``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated

import httpx
import typer

from wrenn.cli.quickstart import Announcer, Endpoints, create_key
from wrenn.cli.supervisor import ChildSpec, Supervisor
from wrenn.core.errors import FailedPrecondition

CONTROL_PLANE = "wrenn-cp"
HOST_AGENT = "wrenn-agent"
#: The control plane's defaults (``WRENN_CP_HOST`` / ``WRENN_CP_PORT``).
CP_HOST = "127.0.0.1"
CP_PORT = "3000"
TOKEN_TIMEOUT_S = 120.0


def find_script(name: str, bin_dir: Path | None) -> str:
    """The console script ``name``: in ``bin_dir`` when given, else next to the running
    Python (the same installation as this CLI), else on PATH."""
    places = [bin_dir] if bin_dir is not None else [Path(sys.executable).parent]
    for place in places:
        candidate = place / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    if bin_dir is None:
        found = shutil.which(name)
        if found:
            return found
    where = str(bin_dir) if bin_dir is not None else f"{places[0]} or on PATH"
    raise FailedPrecondition(
        f"{name} not found (looked in {where}); install wrenn with its host extra "
        "(pip install 'wrenn[host]') or point --bin-dir at the directory holding it"
    )


def control_plane_url(env: Mapping[str, str]) -> str:
    """Where the control plane that ``env`` configures listens, as a client reaches it."""
    host = env.get("WRENN_CP_HOST") or CP_HOST
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{env.get('WRENN_CP_PORT') or CP_PORT}"


def host_token(cp_script: str, env: Mapping[str, str]) -> str:
    """A one-time host registration token from ``wrenn-cp create-host-token``."""
    try:
        done = subprocess.run(
            [cp_script, "create-host-token"],
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=TOKEN_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise FailedPrecondition(f"`{CONTROL_PLANE} create-host-token` failed: {err}") from err
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        why = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise FailedPrecondition(f"`{CONTROL_PLANE} create-host-token` failed: {why}")
    return lines[-1].strip()


def healthy(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 204
        except httpx.HTTPError:
            return False

    return check


def up(
    no_agent: Annotated[
        bool, typer.Option("--no-agent", help="Start only the control plane.")
    ] = False,
    bin_dir: Annotated[
        Path | None,
        typer.Option("--bin-dir", help=f"Where {CONTROL_PLANE} and {HOST_AGENT} are installed."),
    ] = None,
    grace_s: Annotated[
        float,
        typer.Option("--grace", min=0, help="Seconds to wait for a clean stop before SIGKILL."),
    ] = 10.0,
    quickstart: Annotated[
        bool,
        typer.Option(
            "--quickstart",
            help="Once sandboxes can be created, print the URLs, a new API key of the team "
            "'default' and an e2b SDK example.",
        ),
    ] = False,
) -> None:
    """Run the control plane and a host agent in the foreground.

    Their logs are interleaved under their names; Ctrl-C (or SIGTERM) stops both, waiting
    `--grace` seconds before SIGKILL. Configure them with `WRENN_CP_*` and
    `WRENN_AGENT_*` variables; the agent registers with this control plane unless
    `WRENN_AGENT_CONTROL_PLANE_URL` says otherwise."""
    env = dict(os.environ)
    cp_script = find_script(CONTROL_PLANE, bin_dir)
    agent_script = None if no_agent else find_script(HOST_AGENT, bin_dir)
    cp_url = control_plane_url(env)
    specs = [ChildSpec("cp", [cp_script], env, ready=healthy(cp_url) if agent_script else None)]
    if agent_script is not None:
        agent_env = dict(env)
        if not agent_env.get("WRENN_AGENT_CONTROL_PLANE_URL"):
            agent_env["WRENN_AGENT_CONTROL_PLANE_URL"] = cp_url
            if not agent_env.get("WRENN_AGENT_REGISTRATION_TOKEN"):
                agent_env["WRENN_AGENT_REGISTRATION_TOKEN"] = host_token(cp_script, env)
        specs.append(ChildSpec("agent", [agent_script], agent_env))
    supervisor = Supervisor(specs, grace_s=grace_s)
    announcer = None
    if quickstart:
        announcer = Announcer(
            Endpoints.of(cp_url, env, with_agent=agent_script is not None),
            lambda: create_key(cp_script, env),
            lambda message, style: supervisor.say("up", message, style),
            supervisor.show,
        ).start()
    code = supervisor.run()
    if announcer is not None:
        announcer.stop()
    raise typer.Exit(code)
