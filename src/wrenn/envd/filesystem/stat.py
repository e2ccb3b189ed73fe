"""Stat: the EntryInfo of one path (a final symlink is reported, not followed)."""

from __future__ import annotations

from wrenn.envd.defaults import Defaults
from wrenn.envd.filesystem import entry, paths
from wrenn.envd.filesystem.calls import as_user
from wrenn.envd.users import User
from wrenn.gen.filesystem.filesystem_pb import StatRequest, StatResponse


async def stat(request: StatRequest, user: User, defaults: Defaults) -> StatResponse:
    path = paths.resolve(request.path, user, defaults.workdir)
    return StatResponse(entry=await as_user(user, path, entry.of_path, path))
