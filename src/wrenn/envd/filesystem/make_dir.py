"""MakeDir: create a directory and its missing parents, owned by the requesting user.
An existing directory is ``already_exists`` (the SDK's make_dir then returns False)."""

from __future__ import annotations

import os
import stat as stat_module

from wrenn.core.errors import AlreadyExists, InvalidArgument
from wrenn.envd.defaults import Defaults
from wrenn.envd.filesystem import dirs, entry, paths
from wrenn.envd.filesystem.calls import as_user
from wrenn.envd.users import User
from wrenn.gen.filesystem.filesystem_pb import EntryInfo, MakeDirRequest, MakeDirResponse


def make(path: str) -> EntryInfo:
    """Blocking, as the user."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        dirs.ensure(path)
        return entry.of_path(path)
    if stat_module.S_ISDIR(st.st_mode):
        raise AlreadyExists(f"directory already exists: {path}")
    raise InvalidArgument(f"path already exists but it is not a directory: {path}")


async def make_dir(request: MakeDirRequest, user: User, defaults: Defaults) -> MakeDirResponse:
    path = paths.resolve(request.path, user, defaults.workdir)
    return MakeDirResponse(entry=await as_user(user, path, make, path))
