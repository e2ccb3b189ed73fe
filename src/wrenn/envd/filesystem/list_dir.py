"""ListDir: the entries below a directory, down to ``depth`` levels (0 means 1).

The directory itself may be a symlink (it is followed); entries below it are not followed.
Entries come in pre-order, each directory's children sorted by name, with paths under the
path the client asked for. Subdirectories the user cannot read are listed but not entered.
"""

from __future__ import annotations

import os
import stat as stat_module

from wrenn.core.errors import InvalidArgument
from wrenn.envd.defaults import Defaults
from wrenn.envd.filesystem import entry, paths
from wrenn.envd.filesystem.calls import as_user
from wrenn.envd.users import User
from wrenn.gen.filesystem.filesystem_pb import EntryInfo, ListDirRequest, ListDirResponse


def list_entries(path: str, depth: int) -> list[EntryInfo]:
    """Blocking, as the user."""
    if not stat_module.S_ISDIR(os.stat(path).st_mode):
        raise InvalidArgument(f"path is not a directory: {path}")
    names = entry.Names()
    entries: list[EntryInfo] = []

    def walk(directory: str, level: int) -> None:
        with os.scandir(directory) as it:
            children = sorted(it, key=lambda child: child.name)
        for child in children:
            shown = os.path.join(directory, child.name)
            try:
                st = child.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            entries.append(entry.from_stat(shown, st, names))
            if level < depth and stat_module.S_ISDIR(st.st_mode):
                try:
                    walk(shown, level + 1)
                except (PermissionError, FileNotFoundError):
                    continue

    walk(path, 1)
    return entries


async def list_dir(request: ListDirRequest, user: User, defaults: Defaults) -> ListDirResponse:
    path = paths.resolve(request.path, user, defaults.workdir)
    depth = request.depth or 1
    return ListDirResponse(entries=await as_user(user, path, list_entries, path, depth))
