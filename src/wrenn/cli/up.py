"""``wrenn up``: the control plane and a host agent on this machine, in the foreground."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from wrenn.cli.supervisor import ChildSpec, Supervisor
from wrenn.core.errors import FailedPrecondition

CONTROL_PLANE = "wrenn-cp"
HOST_AGENT = "wrenn-agent"


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
) -> None:
    """Run the control plane and a host agent in the foreground.

    Their logs are interleaved under their names; Ctrl-C (or SIGTERM) stops both, waiting
    `--grace` seconds before SIGKILL. Configure them with `WRENN_CP_*` and
    `WRENN_AGENT_*` variables."""
    names = [CONTROL_PLANE] if no_agent else [CONTROL_PLANE, HOST_AGENT]
    specs = [ChildSpec(name.removeprefix("wrenn-"), [find_script(name, bin_dir)]) for name in names]
    code = Supervisor(specs, grace_s=grace_s).run()
    raise typer.Exit(code)
