"""Facts about a guest image read straight from its root filesystem, without booting it."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from wrenn import log

_log = log.get(__name__)

#: Where the image builder installs envd, and the constant holding the version it reports.
ENVD_CONFIG = "/opt/wrenn/lib/python{python}/site-packages/wrenn/envd/config.py"
_VERSION = re.compile(r'^ENVD_VERSION\s*=\s*"([^"]+)"', re.M)
_TIMEOUT_S = 10.0


async def envd_version(rootfs: Path, python_version: str = "3.11") -> str:
    """The envd version installed in the ext4 image ``rootfs`` (read with ``debugfs``); empty
    when it cannot be read."""
    path = ENVD_CONFIG.format(python=python_version)
    try:
        proc = await asyncio.create_subprocess_exec(
            "debugfs",
            "-R",
            f"cat {path}",
            str(rootfs),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError as err:
        _log.warning("guest.envd_version_unknown", rootfs=str(rootfs), error=err.strerror)
        return ""
    try:
        async with asyncio.timeout(_TIMEOUT_S):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        out = b""
    match = _VERSION.search(out.decode(errors="replace"))
    if match is None:
        _log.warning("guest.envd_version_unknown", rootfs=str(rootfs), path=path)
        return ""
    return match.group(1)
