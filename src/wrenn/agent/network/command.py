"""Running the few networking tools that have no netlink equivalent here (nft, sysctl inside a
namespace). Blocking: call from a worker thread."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

from wrenn.core.errors import FailedPrecondition, Internal

_TIMEOUT_S = 30.0


def require(binary: str, package: str) -> None:
    if shutil.which(binary) is None:
        raise FailedPrecondition(f"{binary} not found; install the {package} package")


def in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside the named namespace (unchanged for the caller's own)."""
    if netns is None:
        return list(argv)
    return ["nsenter", f"--net=/run/netns/{netns}", "--", *argv]


def run(argv: Sequence[str], *, stdin: str | None = None) -> str:
    """Run ``argv`` (never through a shell); its stdout, or ``Internal`` carrying stderr."""
    try:
        done = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise Internal(f"{argv[0]} failed to run") from err
    if done.returncode != 0:
        raise Internal(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout
