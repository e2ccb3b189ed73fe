"""Remove: delete a file, symlink or directory tree. A path that does not exist is not an
error (as in E2B's envd); anything the user may not delete is ``permission_denied``."""

from __future__ import annotations

import os
import shutil
import stat as stat_module

from wrenn.core.errors import from_os_error
from wrenn.envd.defaults import Defaults
from wrenn.envd.filesystem import paths
from wrenn.envd.filesystem.calls import as_user
from wrenn.envd.users import User
from wrenn.gen.filesystem.filesystem_pb import RemoveRequest, RemoveResponse


def delete(path: str) -> None:
    """Blocking, as the user. OSErrors name the path that failed inside a tree."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    try:
        if stat_module.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as err:
        failed = err.filename if isinstance(err.filename, str) else path
        raise from_os_error(err, failed) from err


async def remove(request: RemoveRequest, user: User, defaults: Defaults) -> RemoveResponse:
    path = paths.resolve(request.path, user, defaults.workdir)
    await as_user(user, path, delete, path)
    return RemoveResponse()
