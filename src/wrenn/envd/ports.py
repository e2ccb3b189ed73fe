"""Port subsystem (stub)."""

from __future__ import annotations

from wrenn.envd.config import EnvdSettings


class PortSubsystem:
    def __init__(self, settings: EnvdSettings) -> None:
        self.settings = settings

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def restart(self) -> None:
        return None
