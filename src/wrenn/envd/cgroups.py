"""Cgroup placement for user processes (stub: filled in by the cgroups work)."""

from __future__ import annotations

from wrenn.envd.config import EnvdSettings


class Cgroups:
    @classmethod
    def setup(cls, settings: EnvdSettings) -> Cgroups | None:
        return None

    def place(self, pid: int) -> None:
        return None
