"""process.Process service (stub)."""

from __future__ import annotations

from wrenn.envd.cgroups import Cgroups
from wrenn.envd.config import EnvdSettings
from wrenn.envd.defaults import Defaults
from wrenn.gen.process.process_connect import Process


class ProcessService(Process):
    def __init__(self, defaults: Defaults, settings: EnvdSettings, cgroups: Cgroups | None) -> None:
        self.defaults = defaults

    async def aclose(self) -> None:
        return None
