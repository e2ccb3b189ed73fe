"""Move: rename a file or directory, creating the destination's missing parents. An
existing destination file is replaced, as rename(2) does."""

from __future__ import annotations

import errno
import os

from wrenn.core.errors import NotFound, from_os_error
from wrenn.envd.defaults import Defaults
from wrenn.envd.filesystem import dirs, entry, paths
from wrenn.envd.filesystem.calls import as_user
from wrenn.envd.users import User
from wrenn.gen.filesystem.filesystem_pb import EntryInfo, MoveRequest, MoveResponse


def rename(source: str, destination: str) -> EntryInfo:
    """Blocking, as the user."""
    try:
        os.lstat(source)
    except FileNotFoundError:
        raise NotFound(f"path not found: {source}") from None
    dirs.ensure(os.path.dirname(destination))
    try:
        os.rename(source, destination)
    except OSError as err:
        shown = source if err.errno == errno.ENOENT else f"{source} -> {destination}"
        raise from_os_error(err, shown) from err
    return entry.of_path(destination)


async def move(request: MoveRequest, user: User, defaults: Defaults) -> MoveResponse:
    source = paths.resolve(request.source, user, defaults.workdir)
    destination = paths.resolve(request.destination, user, defaults.workdir)
    return MoveResponse(entry=await as_user(user, source, rename, source, destination))
