"""Directories created on a client's behalf (MakeDir, Move and upload destinations)."""

from __future__ import annotations

import os
import stat

from wrenn.core.errors import InvalidArgument

#: Mode of directories envd creates, before the umask.
DIR_MODE = 0o755


def ensure(path: str) -> None:
    """Make ``path`` and any missing parents, owned by the calling thread's filesystem
    identity. Blocking; raises OSError, or InvalidArgument when a component is a file."""
    try:
        os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    except FileExistsError:
        raise InvalidArgument(f"path is not a directory: {path}") from None
    except NotADirectoryError:
        parent = path
        while parent != "/" and not os.path.lexists(parent):
            parent = os.path.dirname(parent)
        if not stat.S_ISDIR(os.stat(parent).st_mode):
            raise InvalidArgument(f"path is not a directory: {parent}") from None
        raise
