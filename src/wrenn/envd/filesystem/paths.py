"""Where a client's path points: ``~`` expands to the user's home, an empty path means the
default working directory (else the home), and a relative path resolves against the home."""

from __future__ import annotations

import os.path

from wrenn.core.errors import InvalidArgument
from wrenn.envd.users import User


def resolve(path: str, user: User, default_workdir: str | None = None) -> str:
    """The absolute, normalised path ``path`` names for ``user``. Symlinks are left alone:
    the operation that uses the path decides whether to follow them."""
    if "\x00" in path:
        raise InvalidArgument(f"path contains a NUL byte: {path!r}")
    if not path and default_workdir:
        path = default_workdir
    if path.startswith("~"):
        if len(path) > 1 and path[1] != "/":
            raise InvalidArgument(f"cannot expand another user's home directory: {path}")
        path = user.home + path[1:]
    if not os.path.isabs(path):
        path = os.path.join(user.home, path)
    normal = os.path.normpath(path)
    # POSIX keeps a leading "//" as implementation-defined; Linux treats it as "/".
    return "/" + normal.lstrip("/")
