"""filesystem.Filesystem service (stub)."""

from __future__ import annotations

from wrenn.envd.defaults import Defaults
from wrenn.gen.filesystem.filesystem_connect import Filesystem


class FilesystemService(Filesystem):
    def __init__(self, defaults: Defaults) -> None:
        self.defaults = defaults

    async def aclose(self) -> None:
        return None
